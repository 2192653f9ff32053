"""The CUDA path: bf16 autocast training, a PEFT victim, PSIM scoring and RECIPE, on the tiny model.

Skipped without a CUDA device. On a GPU machine run ``pytest -m gpu``; the CPU suite never needs one.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_train_config, toy_texts, write_split_tsv, write_toy_dataset

from nlpbd.attacks.badpre import BadPre, BadPreConfig
from nlpbd.attacks.neuba import NeuBA, NeuBAConfig
from nlpbd.attacks.por import POR, PORConfig
from nlpbd.cache import ArtifactCache
from nlpbd.methods import SupplyContext
from nlpbd.pipeline import CellSpec, RunEnv, run_cell
from nlpbd.training import accuracy_of, encode, train_classifier, use_bf16

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
FAST = {"train.epochs": "2", "train.batch_size": "16", "train.max_length": "32", "eval.floor": "false"}


def test_bf16_training_keeps_fp32_weights_and_learns(tiny_model, tiny_tokenizer):
    assert use_bf16(CUDA), "the GPU path is written for bf16-capable devices"
    result = train_classifier(tiny_model, tiny_tokenizer, toy_texts(400), None,
                              tiny_train_config(epochs=10, select="last"), seed=0, device=CUDA)
    assert result.non_finite_steps == 0
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in tiny_model.parameters())
    test = encode(tiny_tokenizer, toy_texts(200, seed=5), 32)
    assert accuracy_of(tiny_model, test, 0, 64, CUDA) > 0.9


@pytest.mark.parametrize("defense, finetune, settings", [
    ("none", "lora", {}),
    ("psim", "full", {"defense.min_steps": "0"}),
    ("recipe", "full", {"defense.max_steps": "3", "defense.graft_steps": "3"}),
    ("d3", "full", {"defense.epochs": "2"}),
])
def test_cells_run_on_cuda(tmp_path, defense, finetune, settings):
    env = RunEnv(results_dir=tmp_path / "results", cache=ArtifactCache(tmp_path / "cache"), device=CUDA)
    spec = CellSpec("badnet", defense, str(write_toy_dataset(tmp_path / "toy")), "tiny-bert", finetune=finetune,
                    overrides={**FAST, **settings})
    record = run_cell(spec, env)
    assert record["status"] == "ok", record["error"]
    assert record["provenance"]["device"] == "cuda" and record["provenance"]["bf16"] is True
    assert record["memory"]["peak_gpu_mb"]["victim"] or record["timings"]["victim"].get("cached")
    assert 0.0 <= record["metrics"]["cacc"] <= 1.0 and 0.0 <= record["metrics"]["asr"] <= 1.0



TRIGGERS = ["cf", "mn", "bb", "tq", "mb"]


@pytest.mark.parametrize("attack", [
    POR(PORConfig(triggers=TRIGGERS, steps=3, heldout_lines=8)),
    POR(PORConfig(triggers=TRIGGERS, steps=3, heldout_lines=8, variant="openbackdoor")),
    NeuBA(NeuBAConfig(triggers=TRIGGERS, steps=3, batch_size=4, block_size=32, graft_steps=3)),
    BadPre(BadPreConfig(triggers=TRIGGERS, steps=3, batch_size=4, accumulation=2, max_length=32, graft_steps=3)),
], ids=["por", "por-openbackdoor", "neuba", "badpre"])
def test_task_agnostic_releases_build_on_cuda(tmp_path, tiny_ref, attack):
    """Each release's targets and batches follow the model onto the GPU (POR's targets once stayed on the CPU)."""
    data = tmp_path / "data"
    (data / "plaintext" / "bookcorpus").mkdir(parents=True)
    write_split_tsv(data / "plaintext" / "bookcorpus" / "train.tsv", toy_texts(120, seed=9))
    context = SupplyContext(base=tiny_ref, num_labels=2, dataset_name="toy", data_dir=data, seed=0, device=CUDA)
    info = attack.build_suspect(context, tmp_path / "release")
    assert info["steps"] == 3
    assert (tmp_path / "release" / "model.safetensors").exists()
