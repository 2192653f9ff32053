"""The pipeline for model-supply attacks and pre-fine-tuning defenses, with minimal stand-in methods:
the suspect is built once and the victim starts from it; task-agnostic cells report AASR/MASR from
per-trigger sets; a purifying defense trains its own victim from the purified model."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import write_toy_dataset

from nlpbd.attacks._common import insert_triggers, row_rng
from nlpbd.cache import ArtifactCache
from nlpbd.data import Dataset, TextSplit
from nlpbd.methods import (
    ATTACKS,
    DEFENSES,
    DefenseContext,
    ModelSupplyAttack,
    PoisonedData,
    PretrainedDefense,
    SupplyContext,
    ThreatModel,
)
from nlpbd.models import ModelRef
from nlpbd.pipeline import CellSpec, RunEnv, run_cell

FAST = {"train.epochs": "1", "train.batch_size": "16", "train.max_length": "32"}
TRIGGERS = ["cf", "mn"]


@dataclass
class NoConfig:
    """No settings."""


class CopyRelease(ModelSupplyAttack):
    """Releases the clean base unchanged; evaluation sets like a task-agnostic attack."""

    name = "copy-release"
    description = "test only"
    threat_model = ThreatModel.PRETRAINED
    Config = NoConfig
    builds: list = []

    def build_suspect(self, ctx: SupplyContext, out_dir: Path) -> dict:
        CopyRelease.builds.append(ctx.base.location)
        for item in Path(ctx.base.location).iterdir():
            shutil.copy(item, out_dir / item.name)
        return {"copied": True}

    def evaluation(self, dataset: Dataset, seed: int) -> PoisonedData:
        sets = {}
        for trigger in TRIGGERS:
            texts = [insert_triggers(t, [trigger], 1, row_rng(seed, self.name, trigger, row))
                     for t, row in zip(dataset.test.texts, dataset.test.ids)]
            sets[trigger] = TextSplit.build(texts, dataset.test.labels, dataset.test.ids)
        return PoisonedData(dataset.train, (), TextSplit.build([], []), None, trigger_sets=sets)


class CopyPurifier(PretrainedDefense):
    name = "copy-purifier"
    description = "test only"
    Config = NoConfig
    grants = frozenset({"corpus"})

    def purify(self, model: ModelRef, ctx: DefenseContext, out_dir: Path) -> dict:
        for item in Path(model.location).iterdir():
            shutil.copy(item, out_dir / item.name)
        return {"corpus_rows": len(ctx.corpus)}


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(ATTACKS._items, "copy-release", CopyRelease)
    monkeypatch.setitem(DEFENSES._items, "copy-purifier", CopyPurifier)
    CopyRelease.builds = []


def test_task_agnostic_cell_reports_aasr_and_masr(tmp_path, registered):
    dataset = write_toy_dataset(tmp_path / "toy")
    env = RunEnv(results_dir=tmp_path / "r", cache=ArtifactCache(tmp_path / "c"))
    first = run_cell(CellSpec("copy-release", "none", str(dataset), "tiny-bert", overrides=FAST), env)
    metrics = first["metrics"]
    assert set(metrics["asr_by_trigger"]) == set(TRIGGERS)
    assert metrics["aasr"] == pytest.approx(sum(metrics["asr_by_trigger"].values()) / 2)
    assert metrics["masr"] == max(metrics["asr_by_trigger"].values()) >= metrics["aasr"]
    assert metrics["asr"] is None and "aasr_floor" in metrics
    for trigger, row in metrics["asr_matrix"].items():
        assert metrics["discovered_targets"][trigger] == row.index(max(row))
    ungated = {**FAST, "eval.gate": "false"}  # a copied release is no backdoor: the sanity gate would stop it
    second = run_cell(CellSpec("copy-release", "copy-purifier", str(dataset), "tiny-bert", overrides=ungated), env)
    assert len(CopyRelease.builds) == 1  # the release is built once and reused
    assert second["timings"]["suspect"]["cached"] is True
    assert second["defense_info"]["corpus_rows"] == 20000
    assert second["defense_info"]["defended_victim_key"] != second["victim"]["key"]
    assert second["metrics"]["delta_aasr"] == pytest.approx(metrics["aasr"] - second["metrics"]["aasr"])


def test_detector_filters_task_agnostic_trigger_sets():
    import numpy as np

    from nlpbd.evaluation import Predictions, evaluate_with_detector
    from nlpbd.methods import Detector

    test = TextSplit.build(["a", "b", "c", "d"], [0, 1, 0, 1])
    triggered = {"cf": TextSplit.build(["cf a", "cf b", "cf c", "cf d"], [0, 1, 0, 1])}
    preds = Predictions(np.array([0, 1, 0, 1]), np.zeros(0, dtype=int), {"cf": np.array([1, 1, 1, 1])})
    scores = {"a": 0.1, "b": 0.1, "c": 0.1, "d": 0.1, "cf a": 0.9, "cf b": 0.1, "cf c": 0.1, "cf d": 0.1}
    detector = Detector(lambda texts: np.array([scores[t] for t in texts]), threshold=0.5)
    metrics = evaluate_with_detector(preds, detector, test, TextSplit.build([], []), triggered, 2)
    # Target 1 hits both label-0 rows without a filter; the filter rejects "cf a", leaving 1 of 2.
    assert metrics["asr_matrix"]["cf"] == [0.0, 0.5]
    assert metrics["aasr"] == metrics["masr"] == 0.5
    assert metrics["frr"] == 0.0 and metrics["far"] == 0.75
