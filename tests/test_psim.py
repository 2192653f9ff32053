"""PSIM (defenses.md §6.6): rejection accounting, random labels, what trains, the victim left alone,
calibration, the initialisation rule, and whole cells through the pipeline (data poisoning and a
stand-in model-supply attack)."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_context, toy_budget, toy_texts, write_toy_dataset

from nlpbd.attacks._common import insert_triggers, row_rng
from nlpbd.cache import ArtifactCache
from nlpbd.data import Dataset, TextSplit
from nlpbd.defenses.psim import (
    PSIM,
    PSIMConfig,
    build_psim,
    confidence,
    copy_of_victim,
    fit_psim,
    initial_model,
    random_labels,
    resolve_init,
)
from nlpbd.errors import InputError
from nlpbd.evaluation import Predictions, attack_metrics, detection_metrics, evaluate_with_detector
from nlpbd.finetune import FINETUNE, wrap
from nlpbd.methods import ATTACKS, AccessDenied, Detector, ModelSupplyAttack, PoisonedData, SupplyContext, ThreatModel
from nlpbd.models import TINY_DEFAULTS, load_classifier, local_ref, save_model
from nlpbd.pipeline import CellSpec, RunEnv, run_cell
from nlpbd.seeding import numpy_rng

GRANTS = {"suspect", "train_set", "budget"}
FAST_CELL = {"train.epochs": "1", "train.batch_size": "16", "train.max_length": "32", "eval.floor": "false",
             "defense.min_steps": "0"}


def context(tokenizer, granted=GRANTS, suspect=None, n: int = 64, **objects):
    objects = {"suspect": suspect, "train_set": toy_texts(n, seed=3), "budget": toy_budget(), **objects}
    return make_context(tokenizer, set(granted), **{k: v for k, v in objects.items() if k in granted})


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def init_name(psim_name: str) -> str | None:
    """The init checkpoint's name of a PSIM parameter; None for the prompt encoder (new)."""
    if psim_name.startswith("prompt_encoder."):
        return None
    name = psim_name.removeprefix("base_model.")
    return name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")


@pytest.fixture
def suspect_ref(tiny_dir, tiny_tokenizer, tmp_path):
    """A released checkpoint with a shipped head that no initialiser would draw."""
    model = load_classifier(str(tiny_dir), 2)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.linspace(-1, 1, model.classifier.weight.numel()).view(2, -1))
        model.classifier.bias.copy_(torch.tensor([0.25, -0.5]))
        model.bert.encoder.layer[0].output.dense.weight.add_(0.01)  # differs from θ_pre
    save_model(model, tiny_tokenizer, tmp_path / "suspect")
    return local_ref("suspect", tmp_path / "suspect", TINY_DEFAULTS)


# --- §6.6 (1): rejection accounting on hand-built scores ------------------------------------------


def fake_detector(scores: dict[str, float], tau: float = 0.7) -> Detector:
    return Detector(scores=lambda texts: np.array([scores[t] for t in texts]), threshold=tau)


def test_rejection_accounting_on_hand_built_scores():
    test = TextSplit.build(["c0", "c1", "c2", "c3"], [0, 1, 0, 1])
    asr_set = TextSplit.build(["p0", "p1", "p2", "p3"], [1, 1, 1, 1])  # target 1
    preds = Predictions(clean=np.array([0, 1, 1, 1]), poisoned=np.array([1, 1, 0, 1]))
    scores = {"c0": 0.9, "c1": 0.5, "c2": 0.6, "c3": 0.8, "p0": 0.95, "p1": 0.6, "p2": 0.99, "p3": 0.7}
    metrics = evaluate_with_detector(preds, fake_detector(scores), test, asr_set)
    # c0 and c3 are right but rejected → wrong; only c1 stays correct. p0 hits the target but is
    # rejected → failed; p3 (s == τ) is not rejected. Denominators stay 4 and 4.
    assert (metrics["clean_correct"], metrics["n_clean"], metrics["cacc"]) == (1, 4, 0.25)
    assert (metrics["poison_hits"], metrics["n_poison"], metrics["asr"]) == (2, 4, 0.5)
    assert attack_metrics(preds, test, asr_set)["cacc"] == 0.75  # the victim alone
    assert metrics["frr"] == 2 / 4 and metrics["far"] == 2 / 4  # c0, c3 flagged; p1, p3 not flagged
    assert (metrics["clean_flagged"], metrics["poison_flagged"]) == (2, 2)
    assert metrics["precision"] == 0.5 and metrics["recall"] == 0.5 and metrics["f1"] == 0.5
    # AUROC: P(s_poison > s_clean), ties half: (4 + 1.5 + 4 + 2) / 16.
    assert metrics["auroc"] == 11.5 / 16
    assert metrics["scores"] == {"clean": [0.9, 0.5, 0.6, 0.8], "poison": [0.95, 0.6, 0.99, 0.7]}


def test_detection_metrics_with_every_poisoned_input_flagged():
    metrics = detection_metrics(np.array([0.5, 0.55, 0.8]), np.array([0.9, 0.99]), 0.7)
    assert metrics["frr"] == 1 / 3 and metrics["far"] == 0.0 and metrics["precision"] == 2 / 3
    assert metrics["auroc"] == 1.0


# --- §6.6 (2): random labels ----------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4])
def test_random_labels_are_seeded_independent_uniform_draws(k):
    n = 10_000
    labels = random_labels(n, k, seed=0)
    assert np.array_equal(labels, random_labels(n, k, seed=0))
    assert not np.array_equal(labels, random_labels(n, k, seed=1))
    assert np.array_equal(labels, numpy_rng(0, "psim_labels").integers(0, k, size=n))
    assert set(labels.tolist()) == set(range(k))
    # Independent per sample: a text's label does not depend on how many texts there are (a
    # permutation of a balanced label vector would), and the counts are not forced to balance.
    assert np.array_equal(random_labels(100, k, seed=0), labels[:100])
    assert np.bincount(labels, minlength=k).tolist() != [n // k] * k
    true = np.arange(n) % k
    assert abs((labels == true).mean() - 1 / k) < 0.02


# --- initialisation -------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, epochs", [(6920, 1), (1000, 7), (2000, 4), (64, 100)])
def test_random_label_training_is_counted_in_steps(rows, epochs):
    """Whole epochs until 200 steps: the reference's 1 epoch (217 steps) on SST-2, more on small sets."""
    from nlpbd.defenses.psim import random_label_epochs

    assert random_label_epochs(rows, PSIMConfig()) == epochs
    assert random_label_epochs(rows, PSIMConfig(min_steps=0)) == 1
    assert random_label_epochs(rows, PSIMConfig(epochs=3, min_steps=0)) == 3


def test_init_auto_follows_the_cell(tiny_tokenizer, suspect_ref):
    assert resolve_init("auto", context(tiny_tokenizer, suspect=suspect_ref)) == "suspect_checkpoint"
    assert resolve_init("auto", context(tiny_tokenizer)) == "victim"
    assert resolve_init("victim", context(tiny_tokenizer, suspect=suspect_ref)) == "victim"
    with pytest.raises(InputError, match="init=suspect_checkpoint"):
        resolve_init("suspect_checkpoint", context(tiny_tokenizer))


# --- §6.6 (3): what trains, and the starting point ------------------------------------------------


def test_only_prompt_encoder_and_head_train_from_the_released_weights(tiny_model, tiny_tokenizer, suspect_ref,
                                                                      deterministic):
    ctx = context(tiny_tokenizer, suspect=suspect_ref)
    released = parameters(load_classifier(suspect_ref, 2))
    init_model, info = initial_model("suspect_checkpoint", tiny_model, ctx)
    assert info["init_new_parameters"] == [] and "shipped head" in info["init_note"]
    psim = build_psim(init_model, "ptuning", ctx.seed)
    before = parameters(psim)
    for name, value in before.items():
        if init_name(name) is not None:
            assert torch.equal(value, released[init_name(name)]), name  # backbone and head as released
    trainable = {n for n, p in psim.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if n.startswith("prompt_encoder.") or ".modules_to_save." in n}
    assert any(n.startswith("prompt_encoder.") for n in trainable) and any("classifier" in n for n in trainable)

    trained, info = fit_psim(tiny_model, ctx, PSIMConfig(min_steps=0, init="suspect_checkpoint"))
    after = parameters(trained)
    assert after.keys() == before.keys()
    for name in before:
        changed = not torch.equal(after[name], before[name])
        assert changed == (name in trainable), name
    assert info["trainable_parameters"] == sum(before[n].numel() for n in trainable)
    assert info["init"] == "suspect_checkpoint" and info["train"]["steps"] == 2  # 64 texts, batch 32


def test_an_unshipped_head_is_reported_and_seeded(tiny_dir, tiny_tokenizer, tiny_model):
    ref = local_ref("encoder-only", tiny_dir, TINY_DEFAULTS)  # a BertModel: no classifier in it
    ctx = context(tiny_tokenizer, suspect=ref)
    first, info = initial_model("suspect_checkpoint", tiny_model, ctx)
    second, _ = initial_model("suspect_checkpoint", tiny_model, ctx)
    assert info["init_new_parameters"] == ["classifier.bias", "classifier.weight"]
    assert "not shipped" in info["init_note"]
    assert torch.equal(first.classifier.weight, second.classifier.weight)


# --- §6.6 (4): the victim is left alone; init=victim starts from it --------------------------------


def trained_victim(tiny_dir, method: str):
    torch.manual_seed(0)
    victim = wrap(load_classifier(str(tiny_dir), 2), FINETUNE.get(method))
    with torch.no_grad():
        for parameter in victim.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05)  # a trained victim differs from its initialisation
    return victim


@pytest.mark.parametrize("method", ["full", "lora", "ptuning"])
def test_victim_state_dict_is_unchanged_by_psim_training(tiny_dir, tiny_tokenizer, method):
    victim = trained_victim(tiny_dir, method)
    state = {k: v.clone() for k, v in victim.state_dict().items()}
    detector = PSIM(PSIMConfig(min_steps=0)).fit(victim, context(tiny_tokenizer))
    assert detector.info["init"] == "victim"
    after = victim.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert all(p.requires_grad == (method == "full" or "lora_" in n or "modules_to_save" in n
                                   or "prompt_encoder" in n) for n, p in victim.named_parameters())


def test_init_victim_copies_full_victims_exactly(tiny_dir):
    victim = trained_victim(tiny_dir, "full")
    copied, info = copy_of_victim(victim)
    assert copied is not victim and info["init_note"] == "trained victim θ_bd"
    source = victim.state_dict()
    assert all(torch.equal(v, source[k]) for k, v in copied.state_dict().items())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(copied.parameters(), victim.parameters()))


def test_init_victim_merges_lora(tiny_dir, tiny_tokenizer):
    victim = trained_victim(tiny_dir, "lora")
    copied, info = copy_of_victim(victim)
    assert "lora merged" in info["init_note"] and not any("lora_" in n for n, _ in copied.named_parameters())
    batch = tiny_tokenizer(["the movie was good", "a bad film"], return_tensors="pt", padding=True)
    victim.eval(), copied.eval()
    with torch.no_grad():
        torch.testing.assert_close(copied(**batch).logits, victim(**batch).logits, atol=1e-5, rtol=0)


def test_init_victim_of_a_prompt_type_victim_keeps_backbone_and_trained_head(tiny_dir):
    victim = trained_victim(tiny_dir, "ptuning")
    copied, info = copy_of_victim(victim)
    assert "dropped" in info["init_note"]
    source = dict(victim.named_parameters())
    for name, value in copied.named_parameters():
        key = f"base_model.{name}"
        if name.startswith("classifier."):
            key = key.replace("classifier.", "classifier.modules_to_save.default.")
        assert torch.equal(value, source[key]), name
    assert not torch.equal(copied.classifier.weight, victim.base_model.classifier.original_module.weight)


# --- §6.6 (5): calibration, and the budget is read only for it -------------------------------------


def test_release_initialised_psim_is_trained_once_per_release(tiny_model, tiny_tokenizer, suspect_ref, tmp_path,
                                                              deterministic):
    ctx = dataclasses.replace(context(tiny_tokenizer, suspect=suspect_ref), cache=ArtifactCache(tmp_path / "cache"))
    texts = list(toy_texts(10, seed=9).texts) + ["cf the movie"]
    fresh, _ = fit_psim(tiny_model, dataclasses.replace(ctx, cache=None), PSIMConfig(min_steps=0))
    built, info = fit_psim(tiny_model, ctx, PSIMConfig(min_steps=0))
    reused, again = fit_psim(tiny_model, ctx, PSIMConfig(min_steps=0, tau=0.9, calibrate=True))  # τ: not in the key
    assert not info["cached"] and again["cached"] and again["psim_key"] == info["psim_key"]
    assert again["train"]["steps"] == 2 and again["trainable_parameters"] == info["trainable_parameters"]
    scores = confidence(fresh, ctx, texts)
    assert np.array_equal(confidence(built, ctx, texts), scores)
    assert np.allclose(confidence(reused, ctx, texts), scores, atol=1e-6)
    _, other = fit_psim(tiny_model, dataclasses.replace(ctx, seed=1), PSIMConfig(min_steps=0))
    _, longer = fit_psim(tiny_model, ctx, PSIMConfig(min_steps=0, epochs=2))
    assert not other["cached"] and not longer["cached"]  # the seed and the training settings are


def test_calibrated_tau_is_the_95th_percentile_of_clean_val_scores(tiny_model, tiny_tokenizer):
    ctx = context(tiny_tokenizer)
    detector = PSIM(PSIMConfig(min_steps=0, calibrate=True)).fit(tiny_model, ctx)
    val_scores = detector.scores(list(ctx.budget.val.texts))
    assert detector.threshold == float(np.percentile(val_scores, 95))
    assert detector.info["tau"] == detector.threshold and "95th percentile" in detector.info["tau_rule"]
    assert (val_scores > detector.threshold).sum() == 1  # 8 val rows: the top one lies above


def test_fixed_tau_never_reads_the_budget(tiny_model, tiny_tokenizer):
    ctx = context(tiny_tokenizer, granted={"suspect", "train_set"})
    with pytest.raises(AccessDenied):
        _ = ctx.budget
    detector = PSIM(PSIMConfig(min_steps=0, tau=0.6)).fit(tiny_model, ctx)
    assert detector.threshold == 0.6 and detector.info["tau_rule"] == "fixed tau = 0.6"


# --- scores and what the detector records -----------------------------------------------------------


def test_scores_are_unrounded_max_softmax_and_reproducible(tiny_model, tiny_tokenizer, deterministic):
    ctx = context(tiny_tokenizer)
    psim, info = fit_psim(tiny_model, ctx, PSIMConfig(min_steps=0))
    texts = list(toy_texts(10, seed=9).texts) + ["cf the movie", ""]
    scores = confidence(psim, ctx, texts)
    psim.eval()
    with torch.no_grad():
        batch = tiny_tokenizer([texts[0]], return_tensors="pt")
        single = torch.softmax(psim(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               -1).max().item()
    assert scores[0] == pytest.approx(single, abs=1e-6) and scores.shape == (12,)
    assert np.all((scores >= 0.5) & (scores <= 1.0))  # K = 2
    again, _ = fit_psim(tiny_model, ctx, PSIMConfig(min_steps=0))
    assert np.array_equal(confidence(again, ctx, texts), scores)
    labels = random_labels(64, 2, ctx.seed)
    assert info["label_agreement"] == float((labels == np.asarray(ctx.train_set.labels)).mean())
    assert confidence(psim, ctx, []).shape == (0,)


def test_detector_records_inference_overhead(tiny_model, tiny_tokenizer):
    detector = PSIM(PSIMConfig(min_steps=0, diagnostic_rows=16)).fit(tiny_model, context(tiny_tokenizer))
    assert detector.info["train_text_rows"] == 16 and 0.5 <= detector.info["train_text_score_mean"] <= 1.0
    assert detector.info["inference"]["inputs"] == 0
    detector.scores(["a good film", "cf a bad film", "the plot"])
    detector.scores([])
    stats = detector.info["inference"]
    assert stats["inputs"] == 3 and stats["forward_passes_per_input"] == 1 and stats["ms_per_input"] > 0


# --- §6.6 (6): whole cells ------------------------------------------------------------------------


def test_data_poisoning_cell_through_the_pipeline(tmp_path):
    dataset = write_toy_dataset(tmp_path / "toy")
    env = RunEnv(results_dir=tmp_path / "results", cache=ArtifactCache(tmp_path / "cache"))
    record = run_cell(CellSpec("badnet", "psim", str(dataset), "tiny-bert", overrides=FAST_CELL), env)
    metrics, info = record["metrics"], record["defense_info"]
    assert record["status"] == "ok" and info["init"] == "victim" and info["tau"] == 0.7
    for name in ("frr", "far", "auroc", "victim_cacc", "victim_asr"):
        assert metrics[name] is not None and 0.0 <= metrics[name] <= 1.0, name
    assert len(info["scores"]["clean"]) == metrics["n_clean"] == 60
    assert len(info["scores"]["poison"]) == metrics["n_poison"]
    clean = np.array(info["scores"]["clean"])
    assert metrics["clean_flagged"] == int((clean > 0.7).sum()) and metrics["frr"] == metrics["clean_flagged"] / 60
    assert metrics["cacc"] <= metrics["victim_cacc"] and metrics["asr"] <= metrics["victim_asr"]
    assert info["train_rows"] == 200 and info["inference"]["inputs"] == 60 + metrics["n_poison"]
    assert record["timings"]["defense_fit"]["seconds"] > 0 and "defense_inference" in record["timings"]


@dataclass
class NoConfig:
    """No settings."""


class CopyRelease(ModelSupplyAttack):
    """Releases the clean base (with a seeded head) unchanged; ASR set: 'cf' in non-target test rows."""

    name = "copy-release-psim"
    description = "test only"
    threat_model = ThreatModel.CHECKPOINT
    Config = NoConfig

    def build_suspect(self, ctx: SupplyContext, out_dir: Path) -> dict:
        torch.manual_seed(5)
        model = load_classifier(ctx.base, ctx.num_labels)
        model.save_pretrained(out_dir, safe_serialization=True)
        for item in Path(ctx.base.location).iterdir():
            if item.suffix in (".txt", ".json") and item.name != "config.json":
                shutil.copy(item, out_dir / item.name)
        return {}

    def evaluation(self, dataset: Dataset, seed: int) -> PoisonedData:
        rows = [i for i, y in enumerate(dataset.test.labels) if y != 1]
        texts = [insert_triggers(dataset.test.texts[i], ["cf"], 1, row_rng(seed, self.name, "cf", i)) for i in rows]
        asr_set = TextSplit.build(texts, [1] * len(rows), [dataset.test.ids[i] for i in rows])
        return PoisonedData(dataset.train, (), asr_set, 1)


def test_model_supply_cell_starts_from_the_release(tmp_path, monkeypatch):
    monkeypatch.setitem(ATTACKS._items, CopyRelease.name, CopyRelease)
    dataset = write_toy_dataset(tmp_path / "toy")
    env = RunEnv(results_dir=tmp_path / "results", cache=ArtifactCache(tmp_path / "cache"))
    record = run_cell(CellSpec(CopyRelease.name, "psim", str(dataset), "tiny-bert", overrides=FAST_CELL), env)
    info = record["defense_info"]
    assert record["status"] == "ok" and info["init"] == "suspect_checkpoint"
    assert info["init_new_parameters"] == [] and "suspect" in info["grants"]
    assert len(info["scores"]["poison"]) == record["metrics"]["n_poison"] == 30
