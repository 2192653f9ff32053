"""PEFT victims: each method trains exactly the parameters it should, saves and reloads, and
weight-editing defenses get a merged LoRA model or a clear refusal."""

from __future__ import annotations

import pytest
import torch
from helpers import write_toy_dataset

from nlpbd.cache import ArtifactCache
from nlpbd.errors import InputError
from nlpbd.finetune import FINETUNE, load_trained, plain_model, trainable_parameter_count, wrap
from nlpbd.models import TINY_CONFIG, load_classifier
from nlpbd.pipeline import CellSpec, RunEnv, run_cell

H, LAYERS, K, VIRTUAL = TINY_CONFIG["hidden_size"], TINY_CONFIG["num_hidden_layers"], 2, 5
HEAD = H * K + K


def expected_trainable(method: str, total: int) -> int:
    return {
        "full": total,
        "lora": LAYERS * 2 * (8 * H + H * 8) + HEAD,           # A (r×H) and B (H×r) on query and value
        "prompt": VIRTUAL * H + HEAD,                            # virtual token embeddings
        "ptuning": VIRTUAL * H + (H * 128 + 128) + (128 * 128 + 128) + (128 * H + H) + HEAD,  # embeddings + MLP
        "prefix": VIRTUAL * LAYERS * 2 * H + HEAD,               # a key and a value per layer and token
    }[method]


@pytest.mark.parametrize("method", ["full", "lora", "prompt", "ptuning", "prefix"])
def test_each_method_trains_only_its_parameters(tiny_dir, method):
    base = load_classifier(str(tiny_dir), K)
    total = sum(p.numel() for p in base.parameters())
    model = wrap(base, FINETUNE.get(method))
    assert trainable_parameter_count(model) == expected_trainable(method, total)
    if method != "full":
        for name, parameter in model.named_parameters():
            own = "lora_" in name or "prompt_encoder" in name or "modules_to_save" in name
            assert parameter.requires_grad == own, name


@pytest.mark.parametrize("method", ["lora", "prompt", "ptuning", "prefix"])
def test_adapter_round_trip(tiny_dir, tmp_path, method, tiny_tokenizer):
    torch.manual_seed(0)
    model = wrap(load_classifier(str(tiny_dir), K), FINETUNE.get(method))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1)  # a trained adapter differs from its initialisation
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_trained(tmp_path / "adapter", str(tiny_dir), K, FINETUNE.get(method))
    batch = tiny_tokenizer(["the movie was good", "bad film"], return_tensors="pt", padding=True)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_lora_is_merged_and_prompt_types_are_refused(tiny_dir, tiny_tokenizer):
    lora = wrap(load_classifier(str(tiny_dir), K), FINETUNE.get("lora"))
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05)
    batch = tiny_tokenizer(["a good movie"], return_tensors="pt")
    lora.eval()
    with torch.no_grad():
        before = lora(**batch).logits
    merged, info = plain_model(lora, "ft")
    merged.eval()
    assert "lora" in info["peft"] and not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(before, merged(**batch).logits, atol=1e-5)
    with pytest.raises(InputError, match="cannot be merged"):
        plain_model(wrap(load_classifier(str(tiny_dir), K), FINETUNE.get("prompt")), "finemix")


def test_peft_victims_in_cells(tmp_path):
    dataset = write_toy_dataset(tmp_path / "toy")
    env = RunEnv(results_dir=tmp_path / "results", cache=ArtifactCache(tmp_path / "cache"))
    fast = {"train.epochs": "1", "train.batch_size": "16", "train.max_length": "32", "eval.floor": "false"}
    full = run_cell(CellSpec("badnet", "none", str(dataset), "tiny-bert", overrides=fast), env)
    lora = run_cell(CellSpec("badnet", "ft", str(dataset), "tiny-bert", "lora",
                             overrides={**fast, "defense.epochs": "1"}), env)
    assert lora["victim"]["key"] != full["victim"]["key"]
    assert lora["cell"]["finetune"] == "lora" and "merged" in lora["defense_info"]["peft"]
    assert lora["cell"]["train_params"]["lr"] == 2e-3  # the PEFT default, not the model's
    with pytest.raises(InputError, match="cannot be merged"):
        run_cell(CellSpec("badnet", "finemix", str(dataset), "tiny-bert", "prompt", overrides=fast), env)
    with pytest.raises(InputError, match="Did you mean 'lora'"):
        run_cell(CellSpec("badnet", "none", str(dataset), "tiny-bert", "loraa", overrides=fast), env)
