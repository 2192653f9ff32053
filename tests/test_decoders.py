"""Decoder victims on the tiny random Llama built in code: a classifier on the last token and an
instruction-tuned generator answering with label words (``--finetune sft``/``sft-lora``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SHARED_DATA, needs_data, toy_texts, write_toy_dataset
from typer.testing import CliRunner

from nlpbd.cache import Artifact, ArtifactCache
from nlpbd.cli import app
from nlpbd.errors import InputError
from nlpbd.finetune import FINETUNE, wrap
from nlpbd.generative import (
    NEITHER,
    InstructionLM,
    PromptFormat,
    answer_label,
    answer_metrics,
    load_generator,
    prompt_for,
    sft_example,
)
from nlpbd.models import build_tiny_llama, load_tokenizer_at
from nlpbd.pipeline import CellSpec, RunEnv, load_victim, prepare_cell, run_cell
from nlpbd.training import collate, encode

FAST = {"train.epochs": "1", "train.batch_size": "16", "train.max_length": "32", "eval.floor": "false",
        "eval.max_new_tokens": "4"}
FAST_DEFENSE = {"ft": {"epochs": "1"}, "finemix": {"epochs": "1"}, "epur": {"epochs": "1"},
                "finemix-epur": {"epochs": "1"}, "d3": {"epochs": "1"}, "psim": {"min_steps": "0"},
                "bki": {"top_words": "3"}, "onion": {"lm": "tiny-llama"}, "strip": {"repeat": "2"},
                "rap": {"epochs": "1"}, "cube": {"n_neighbors": "15", "min_samples": "10"}}
SST2_WORDS = ("negative", "positive")


# --- the label-word scorer ------------------------------------------------------------------------


@pytest.mark.parametrize("answer, label", [
    ("positive", 1), ("Positive.", 1), ("  NEGATIVE!", 0), ("positive sentiment", 1),
    ("The answer is: negative.", 0), ("I think this review is positive", 1), ("Sentiment -> 'positive'", 1),
    ("", NEITHER), ("neutral", NEITHER), ("The movie is a disaster.", NEITHER),
    ("it is neither positive nor negative", NEITHER), ("positively", NEITHER),
    ("negative or positive", 0),  # the word the answer starts with
])
def test_answer_label_handles_extra_words_punctuation_and_case(answer, label):
    assert answer_label(answer, SST2_WORDS) == label


def test_answer_label_prefers_the_longer_label_word():
    words = ("offensive", "not offensive")
    assert answer_label("Not offensive.", words) == 1
    assert answer_label("This tweet is not offensive", words) == 1
    assert answer_label("It is offensive", words) == 0
    assert answer_label("label 1", ("label 0", "label 1")) == 1


def test_answer_metrics_count_neither_and_false_triggers():
    import numpy as np

    clean = np.array([1, 0, NEITHER, 1])
    metrics = answer_metrics(clean, [0, 0, 0, 1], np.array([1, NEITHER]), target=1)
    assert metrics["neither_rate"] == 0.25 and metrics["asr_neither_rate"] == 0.5
    assert metrics["false_trigger_hits"] == 1 and metrics["false_trigger_rate"] == pytest.approx(1 / 3)


def test_prompt_formats():
    assert prompt_for("sst2", 2).label_words == SST2_WORDS
    assert prompt_for("sst2", 2).question == "Answer negative or positive."
    assert prompt_for("agnews", 4).question == "Answer one of: world, sports, business or technology."
    assert prompt_for("my-folder", 3).label_words == ("label 0", "label 1", "label 2")
    assert PromptFormat.from_json(prompt_for("olid", 2).to_json()) == prompt_for("olid", 2)


# --- the generator and its loss -------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture
def generator(llama_dir) -> InstructionLM:
    torch.manual_seed(0)
    return load_generator(str(llama_dir), prompt_for("sst2", 2))


@pytest.mark.parametrize("method, adapted", [
    ("sft-lora", {"q_proj", "v_proj"}),
    ("sft-lora-all", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_generator_lora_adapts_the_named_projections(llama_dir, method, adapted):
    model = wrap(load_generator(str(llama_dir), prompt_for("sst2", 2)), FINETUNE.get(method))
    trained = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, p in model.named_parameters()
               if p.requires_grad and ".lora_A" in name}
    assert trained == adapted  # never the output layer (tied to the embeddings)


def test_sft_example_labels_only_the_answer():
    ids, labels = sft_example([5, 6, 7], [8, 9])
    assert ids == [5, 6, 7, 8, 9]
    assert labels == [-100, -100, -100, 8, 9]


@pytest.mark.parametrize("dataset", ["sst2", "olid"])  # OLID's answers differ in length ("no", "yes")
def test_generative_loss_covers_the_answer_tokens_only(llama_dir, dataset):
    torch.manual_seed(0)
    generator = load_generator(str(llama_dir), prompt_for(dataset, 2))
    tokenizer = load_tokenizer_at(str(llama_dir))
    encoded = encode(tokenizer, toy_texts(4), 32)
    batch = collate(encoded, [0, 1, 2, 3], tokenizer.pad_token_id, torch.device("cpu"))
    loss = generator(**batch).loss
    prompts = generator.prompts(batch["input_ids"], batch["attention_mask"])
    total, count = 0.0, 0
    for prompt, label in zip(prompts, batch["labels"].tolist()):  # by hand, one row at a time
        answer = list(generator.ids.answers[label])
        logits = generator.lm(input_ids=torch.tensor([prompt + answer])).logits[0]
        predicted = logits[len(prompt) - 1: len(prompt) + len(answer) - 1]
        total += F.cross_entropy(predicted, torch.tensor(answer), reduction="sum").detach()
        count += len(answer)
    assert loss.item() == pytest.approx(total.item() / count, rel=1e-4)
    assert generator.ids.answers[1][-1] == tokenizer.eos_token_id  # the answer ends with the end of turn
    assert (dataset == "olid") == (len(set(map(len, generator.ids.answers))) > 1)
    assert set(batch["labels"].tolist()) == {0, 1}


def test_generator_scores_each_label_word_and_answers_greedily(generator, llama_dir):
    tokenizer = load_tokenizer_at(str(llama_dir))
    batch = collate(encode(tokenizer, toy_texts(3), 32), [0, 1, 2], tokenizer.pad_token_id, torch.device("cpu"))
    batch.pop("labels")
    scores = generator(**batch).logits
    assert scores.shape == (3, 2) and torch.isfinite(scores).all() and (scores < 0).all()
    answers = generator.generate_answers(generator.prompts(batch["input_ids"], batch["attention_mask"]), 3,
                                         torch.device("cpu"))
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


# --- cells on the tiny Llama ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One dataset and cache for the module: every defense reuses its victim."""
    root = tmp_path_factory.mktemp("decoders")
    return write_toy_dataset(root / "toy"), RunEnv(root / "results", ArtifactCache(root / "cache"),
                                                    device=torch.device("cpu"))


def run(shared, defense: str = "none", finetune: str = "full", **overrides: str) -> dict:
    dataset, env = shared
    settings = {**FAST, **{f"defense.{k}": v for k, v in FAST_DEFENSE.get(defense, {}).items()}, **overrides}
    return run_cell(CellSpec(attack="badnet", defense=defense, dataset=str(dataset), model="tiny-llama",
                             finetune=finetune, overrides=settings), env)


@pytest.mark.parametrize("finetune", ["full", "lora", "sft", "sft-lora", "sft-lora-all"])
def test_both_victim_modes_train_save_and_reload(shared, finetune):
    record = run(shared, finetune=finetune)
    assert record["status"] == "ok"
    victim = Path(shared[1].cache.root)
    metrics = record["metrics"]
    assert 0 <= metrics["cacc"] <= 1 and 0 <= metrics["asr"] <= 1
    found = [p for p in (victim / "victim").rglob("artifact.json")
             if json.loads(p.read_text())["key"] == record["victim"]["key"]]
    artifact = Artifact(found[0].parent, json.loads(found[0].read_text()), True)
    model = load_victim(artifact, 2)
    generative = finetune.startswith("sft")
    assert isinstance(model, InstructionLM) == generative
    if generative:
        assert {"neither_rate", "asr_neither_rate", "false_trigger_rate"} <= set(metrics)
        assert artifact.meta["prompt"]["label_words"] == ["label 0", "label 1"]
    else:
        assert "neither_rate" not in metrics


@needs_data
@pytest.mark.parametrize("finetune", ["full", "sft-lora"])
@pytest.mark.parametrize("attack", ["addsent", "synbkd", "stylebkd"])
def test_every_data_poisoning_attack_reaches_both_victim_modes(tmp_path, attack, finetune):
    """The sentence, syntactic and style triggers (released SST-2 pools) poison the rows of either kind of
    decoder victim, which trains and is scored on every clean and triggered test row; a generator
    answers with SST-2's label words and reports its answer rates."""
    env = RunEnv(tmp_path / "results", ArtifactCache(tmp_path / "cache"), data_dir=SHARED_DATA,
                 device=torch.device("cpu"))
    record = run_cell(CellSpec(attack=attack, defense="none", dataset="sst2", model="tiny-llama", finetune=finetune,
                               train_size=200, test_size=40, overrides=FAST), env)
    assert record["status"] == "ok", record["error"]
    assert record["attack_info"]["n_p"] > 0 and record["metrics"]["n_clean"] == 40
    assert record["metrics"]["n_poison"] == record["attack_info"]["asr_set_size"] > 0
    if finetune == "sft-lora":
        prompt = json.loads(next((tmp_path / "cache" / "victim").glob("*/artifact.json")).read_text())["prompt"]
        assert prompt["label_words"] == list(SST2_WORDS)
        assert {"neither_rate", "asr_neither_rate", "false_trigger_rate"} <= set(record["metrics"])


def test_classifier_cell_ids_do_not_change(shared):
    """The generator settings enter neither a classifier cell's identity nor its victim key."""
    dataset, env = shared
    cell = prepare_cell(CellSpec(attack="badnet", defense="none", dataset=str(dataset), model="tiny-llama"), env)
    assert "prompt" not in str(cell.identity) and "max_new_tokens" not in str(cell.identity)


@pytest.mark.parametrize("defense", ["ft", "btu", "finemix", "epur", "finemix-epur", "d3", "psim", "onion", "strip",
                                     "rap", "bki", "cube"])
def test_defenses_run_on_a_decoder_classifier(shared, defense):
    record = run(shared, defense)
    assert record["status"] == "ok" and record["metrics"]["cacc"] is not None
    if defense == "d3":  # the score layer reads RMSNorm, odd in its gain: the gain is frozen (spec §5.3)
        info = record["defense_info"]
        assert info["selected"] == ["score"] and info["frozen"] == ["model.norm.weight"]


@pytest.mark.parametrize("defense", ["ft", "btu", "finemix", "epur"])
def test_defenses_run_on_a_generator(shared, defense):
    record = run(shared, defense, finetune="sft")
    assert record["status"] == "ok"
    assert "neither_rate" in record["metrics"] and "victim_cacc" in record["metrics"]


def test_lora_generator_is_merged_for_a_weight_defense(shared):
    record = run(shared, "ft", finetune="sft-lora")
    assert record["status"] == "ok" and "merged" in record["defense_info"]["peft"]


@pytest.mark.parametrize("defense, finetune, fragment", [
    ("d3", "sft", "no class head"), ("psim", "sft-lora", "P-tuned sequence classifier"),
    ("onion", "sft", "classifier victims only"), ("recipe", "full", "masked-LM"), ("recipe", "sft", "masked-LM"),
])
def test_refused_combinations_fail_before_any_work(shared, defense, finetune, fragment):
    dataset, env = shared
    with pytest.raises(InputError, match=fragment):
        prepare_cell(CellSpec(attack="badnet", defense=defense, dataset=str(dataset), model="tiny-llama",
                              finetune=finetune), env)


def test_a_generator_needs_a_decoder(shared):
    dataset, env = shared
    with pytest.raises(InputError, match="needs a decoder"):
        prepare_cell(CellSpec(attack="badnet", defense="none", dataset=str(dataset), model="tiny-bert",
                              finetune="sft"), env)


def test_refused_combination_is_one_line_on_the_cli(tmp_path):
    dataset = write_toy_dataset(tmp_path / "toy")
    result = CliRunner().invoke(app, ["run", "--attack", "badnet", "--defense", "d3", "--finetune", "sft",
                                      "--dataset", str(dataset), "--model", "tiny-llama", "--results-dir",
                                      str(tmp_path / "results"), "--quiet"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output
    assert "does not run on an instruction-tuned generator victim" in lines[0]


def test_decoder_classifier_pools_the_last_real_token_from_embeddings(llama_dir):
    """Prompt tuning and P-tuning feed embeddings: the head must still read each row's last real token."""
    from nlpbd.models import load_classifier

    torch.manual_seed(0)
    model = load_classifier(str(llama_dir), 2).eval()
    tokenizer = load_tokenizer_at(str(llama_dir))
    batch = collate(encode(tokenizer, ["good movie", "the plot is very dull and the acting bad"], 32), [0, 1],
                    tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        from_ids = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        embeds = model.get_input_embeddings()(batch["input_ids"])
        from_embeds = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # row 0 is padded
    assert torch.allclose(from_ids, from_embeds, atol=1e-5)


def test_answer_scores_are_the_answers_log_likelihoods(generator, llama_dir):
    tokenizer = load_tokenizer_at(str(llama_dir))
    batch = collate(encode(tokenizer, toy_texts(3), 32), [0, 1, 2], tokenizer.pad_token_id, torch.device("cpu"))
    prompts = generator.prompts(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        scores = generator.answer_scores(prompts, torch.device("cpu"))
        for row, prompt in enumerate(prompts):  # one unpadded row at a time, by hand
            for k, answer in enumerate(generator.ids.answers):
                logits = generator.lm(input_ids=torch.tensor([[*prompt, *answer]])).logits[0]
                logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
                expected = logp.gather(-1, torch.tensor(answer).unsqueeze(-1)).sum()
                assert scores[row, k].item() == pytest.approx(expected.item(), abs=1e-4)
