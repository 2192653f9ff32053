"""A whole cell on the tiny model: records, victim reuse, cache invalidation, failure records."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import tiny_train_config, toy_texts, write_toy_dataset

from nlpbd import training
from nlpbd.cache import ArtifactCache
from nlpbd.errors import InputError
from nlpbd.pipeline import CellSpec, RunEnv, prepare_cell, run_cell
from nlpbd.results import load_records

FAST = {"train.epochs": "2", "train.batch_size": "16", "train.max_length": "32"}


@pytest.fixture
def toy_dataset(tmp_path) -> Path:
    return write_toy_dataset(tmp_path / "toy")


@pytest.fixture
def env(tmp_path) -> RunEnv:
    return RunEnv(results_dir=tmp_path / "results", cache=ArtifactCache(tmp_path / "cache"))


def cell(dataset: Path, defense: str = "none", **overrides: str) -> CellSpec:
    return CellSpec(attack="badnet", defense=defense, dataset=str(dataset), model="tiny-bert",
                    overrides={**FAST, **overrides})


def test_record_counts_are_consistent(toy_dataset, env):
    record = run_cell(cell(toy_dataset), env)
    metrics = record["metrics"]
    assert record["status"] == "ok"
    assert metrics["cacc"] == pytest.approx(metrics["clean_correct"] / metrics["n_clean"])
    assert metrics["asr"] == pytest.approx(metrics["poison_hits"] / metrics["n_poison"])
    test_labels = toy_texts(60, seed=2).labels
    assert metrics["n_poison"] == sum(1 for y in test_labels if y != 1)  # only non-target rows
    assert metrics["n_clean"] == 60
    assert record["attack_info"]["n_p"] == 20  # floor(0.1 * 200): the denominator is the whole train split
    assert metrics["asr_floor"] is not None and 0.0 <= metrics["asr_floor"] <= 1.0
    assert record["budget"]["n_c"] == 10  # ceil(0.05 * 200)
    saved = json.loads((env.results_dir / "records" / f"{record['cell_id']}.json").read_text())
    assert saved == json.loads(json.dumps(record))


def test_post_training_defense_reuses_the_victim(toy_dataset, env):
    first = run_cell(cell(toy_dataset, "none"), env)
    second = run_cell(cell(toy_dataset, "ft", **{"defense.epochs": "1"}), env)
    assert first["timings"]["victim"]["cached"] is False
    assert second["timings"]["victim"]["cached"] is True
    assert second["timings"]["victim"]["original_seconds"] == pytest.approx(
        first["timings"]["victim"]["seconds"], rel=0.5)
    assert second["victim"]["key"] == first["victim"]["key"]
    assert second["metrics"]["victim_asr"] == first["metrics"]["asr"]
    assert {r["cell"]["defense"] for r in load_records(env.results_dir)} == {"none", "ft"}


@pytest.mark.parametrize("change", [{"attack.triggers": "mn"}, {"attack.poison_rate": "0.2"},
                                    {"train.lr": "0.002"}, {"train.precision": "bf16"}])
def test_settings_that_matter_retrain_the_victim(toy_dataset, env, change):
    base = run_cell(cell(toy_dataset), env)
    changed = run_cell(cell(toy_dataset, **change), env)
    assert changed["timings"]["victim"]["cached"] is False
    assert changed["victim"]["key"] != base["victim"]["key"]
    assert changed["cell_id"] != base["cell_id"]


def test_settings_added_later_leave_existing_keys_alone_until_set(toy_dataset, env):
    """precision and compile join the identity only when set: cached victims keep their keys."""
    default = prepare_cell(cell(toy_dataset), env)
    assert not {"precision", "compile"} & set(default.identity["train_params"])
    assert prepare_cell(cell(toy_dataset, **{"train.precision": "auto"}), env).cell_id == default.cell_id
    bf16 = prepare_cell(cell(toy_dataset, **{"train.precision": "bf16"}), env)
    assert bf16.identity["train_params"]["precision"] == "bf16" and bf16.cell_id != default.cell_id


def test_the_victim_records_the_arithmetic_it_trained_in(toy_dataset, env):
    cells = [run_cell(cell(toy_dataset, **{"train.precision": p}), env) for p in ("fp32", "bf16")]
    default = run_cell(cell(toy_dataset), env)
    trained = [env.cache.lookup("victim", r["victim"]["key"]).meta["train"] for r in (*cells, default)]
    expected_default = training.training_precision(training.default_device(), "auto")
    assert [t["precision"] for t in trained] == ["fp32", "bf16", expected_default]
    assert [t["compiled"] for t in trained] == [False, False, False]
    assert cells[1]["status"] == "ok" and 0.0 <= cells[1]["metrics"]["cacc"] <= 1.0


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_trains_in_bf16_only_on_a_cpu_that_computes_it_natively(tiny_model, tiny_tokenizer, monkeypatch,
                                                                     native, expected):
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert training.training_precision(cpu, "auto") == expected
    assert [training.training_precision(cpu, p) for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    result = training.train_classifier(tiny_model, tiny_tokenizer, toy_texts(16), None, tiny_train_config(), seed=0,
                                       device=cpu)
    assert result.precision == expected
    assert training.use_bf16(cpu) is False  # inference stays fp32 on the CPU either way


@pytest.mark.slow
def test_a_compiled_training_step_trains_the_same_model_object(toy_dataset, env):
    record = run_cell(cell(toy_dataset, **{"train.compile": "true"}), env)
    trained = env.cache.lookup("victim", record["victim"]["key"]).meta["train"]
    assert record["status"] == "ok" and trained["compiled"] is True
    eager = run_cell(cell(toy_dataset), env)
    # compiled kernels may reorder floating-point sums; the same data and seed land close
    assert abs(record["metrics"]["cacc"] - eager["metrics"]["cacc"]) <= 0.1


def test_a_compiled_run_wraps_the_model_once_for_all_epochs(tiny_model, tiny_tokenizer, monkeypatch):
    wrapped = []
    monkeypatch.setattr(training.torch, "compile", lambda model, **_: wrapped.append(model) or model)
    config = tiny_train_config(epochs=3, compile=True)
    result = training.train_classifier(tiny_model, tiny_tokenizer, toy_texts(24), None, config, seed=0)
    assert result.epochs == 3 and result.compiled and wrapped == [tiny_model]


def test_same_seed_gives_the_same_numbers(toy_dataset, tmp_path):
    records = []
    for name in ("a", "b"):  # separate caches: both runs really train
        env = RunEnv(results_dir=tmp_path / name / "results", cache=ArtifactCache(tmp_path / name / "cache"))
        records.append(run_cell(cell(toy_dataset), env))
    keys = ("cacc", "asr", "clean_correct", "poison_hits", "asr_floor")
    assert [records[0]["metrics"][k] for k in keys] == [records[1]["metrics"][k] for k in keys]


def test_rerun_replaces_the_record(toy_dataset, env):
    first = run_cell(cell(toy_dataset), env)
    second = run_cell(cell(toy_dataset), env)
    assert first["cell_id"] == second["cell_id"]
    assert len(load_records(env.results_dir)) == 1


def test_bad_settings_fail_before_any_work(toy_dataset, env):
    with pytest.raises(InputError, match="Did you mean 'attack.poison_rate'"):
        run_cell(cell(toy_dataset, **{"attack.poison_rat": "0.2"}), env)
    with pytest.raises(InputError, match="out of range"):
        run_cell(cell(toy_dataset, **{"attack.poison_rate": "0"}), env)
    assert not (env.results_dir / "records").exists()
    assert not (env.cache.root / "victim").exists()


def test_failure_inside_a_cell_is_recorded(toy_dataset, env):
    # synbkd needs side files the toy dataset does not have: the cell fails after validation.
    spec = CellSpec(attack="synbkd", defense="none", dataset=str(toy_dataset), model="tiny-bert", overrides=FAST)
    with pytest.raises(InputError, match="synbkd"):
        run_cell(spec, env)
    (record,) = load_records(env.results_dir)
    assert record["status"] == "failed" and "synbkd" in record["error"]


# --- test subsample -------------------------------------------------------------------------------

# The identity of a cell on the whole test split, as records have always stored it: its digest is
# part of cell_id, the record file name that grids use to skip finished cells.
WHOLE_SPLIT_IDENTITY = {"dataset", "model", "finetune", "attack", "defense", "seed", "train_size", "variant",
                        "attack_params", "defense_params", "train_params", "budget_params"}


def test_identity_without_test_size_is_unchanged_and_test_sizes_get_their_own_ids(toy_dataset, env):
    whole = prepare_cell(cell(toy_dataset), env)
    assert set(whole.identity) == WHOLE_SPLIT_IDENTITY
    subsampled = [prepare_cell(replace(cell(toy_dataset), test_size=n), env) for n in (20, 30)]
    assert subsampled[0].identity == {**whole.identity, "test_size": 20}
    assert len({whole.cell_id, *(c.cell_id for c in subsampled)}) == 3
    assert [len(c.dataset.test) for c in (whole, *subsampled)] == [60, 20, 30]


def test_test_subsample_is_the_same_for_every_seed(toy_dataset, env):
    tests = [prepare_cell(replace(cell(toy_dataset), seed=seed, test_size=20), env).dataset.test for seed in (0, 1)]
    assert tests[0] == tests[1] and len(tests[0]) == 20


@pytest.mark.parametrize("size", [0, -5])
def test_non_positive_test_size_fails_before_any_work(toy_dataset, env, size):
    with pytest.raises(InputError, match=f"--test-size must be positive, got {size}"):
        run_cell(replace(cell(toy_dataset), test_size=size), env)
    assert not (env.results_dir / "records").exists()


def test_cacc_and_asr_are_scored_on_the_test_subsample(toy_dataset, env):
    record = run_cell(replace(cell(toy_dataset, **{"eval.floor": "false"}), test_size=20), env)
    metrics = record["metrics"]
    assert metrics["n_clean"] == 20
    assert metrics["n_poison"] == 10  # the non-target half of a stratified 10 / 10 subsample
    assert record["cell"]["test_size"] == 20 and record["dataset_info"]["sizes"]["test"] == 20
    assert record["attack_info"]["n_p"] == 20  # poisoning still covers the whole train split


def test_records_carry_the_host_name_only_when_asked(monkeypatch):
    import socket

    import torch

    from nlpbd.provenance import RECORD_HOST, provenance

    monkeypatch.delenv(RECORD_HOST, raising=False)
    assert "hostname" not in provenance(torch.device("cpu"))
    monkeypatch.setenv(RECORD_HOST, "1")
    assert provenance(torch.device("cpu"))["hostname"] == socket.gethostname()
