"""Behaviour on real data: SST-2 subset, the real offline model (MiniLM), the real CLI.

BadNet without defense must reach a high ASR; BTU must lower it measurably on the same cached
victim. Marked slow (a few minutes on 2 CPU cores); CI runs it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import SHARED_DATA, needs_data
from typer.testing import CliRunner

from nlpbd.cli import app

pytestmark = [pytest.mark.slow, needs_data]

TRAIN_SIZE = "2000"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The real model uses every core (the suite default is one thread for tiny models)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield tmp_path_factory.mktemp("smoke")
    torch.set_num_threads(previous)


def run(workdir, defense: str, *extra: str) -> dict:
    args = ["run", "--attack", "badnet", "--defense", defense, "--dataset", "sst2", "--train-size", TRAIN_SIZE,
            "--data-dir", str(SHARED_DATA), "--results-dir", str(workdir / "results"),
            "--cache-dir", str(workdir / "cache"), "--quiet", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = {json.loads(p.read_text())["cell"]["defense"]: json.loads(p.read_text())
               for p in (workdir / "results" / "records").glob("*.json")}
    return records[defense]


@pytest.fixture(scope="module")
def baseline(workdir) -> dict:
    return run(workdir, "none")


def test_badnet_without_defense_is_a_strong_attack(baseline):
    metrics = baseline["metrics"]
    assert metrics["asr"] >= 0.90
    assert metrics["cacc"] >= 0.78
    assert metrics["asr_floor"] < 0.5  # the clean model does not predict the target on triggered rows
    flags = baseline["flags"]
    assert flags["weak_attack"] is False and flags["degraded_victim"] is False
    assert flags["collapsed_victim"] is False and flags["collapsed_clean_model"] is False
    assert flags["empty_asr_set"] is False
    assert metrics["balanced_accuracy"] >= 0.78 and metrics["predicted_classes"] == 2
    assert metrics["n_clean"] == 1821 and metrics["n_poison"] == 912


def test_ft_reuses_the_victim(workdir, baseline):
    record = run(workdir, "ft")
    assert record["timings"]["victim"]["cached"] is True
    assert record["metrics"]["victim_asr"] == baseline["metrics"]["asr"]


def test_btu_lowers_asr_on_the_same_victim(workdir, baseline):
    record = run(workdir, "btu")
    metrics = record["metrics"]
    assert record["timings"]["victim"]["cached"] is True
    assert metrics["asr"] <= baseline["metrics"]["asr"] - 0.3
    assert metrics["cacc"] >= baseline["metrics"]["cacc"] - 0.05
