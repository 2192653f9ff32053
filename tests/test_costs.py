"""Stage costs from records, and a planned grid's time estimate from them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from nlpbd.cli import app
from nlpbd.costs import Timed, cost_rows, estimate_plan, missing_shared_builds, stage_seconds


def timing(seconds: float, cached: bool | None = None, original: float | None = None) -> dict:
    return {"seconds": seconds, "cached": cached, "original_seconds": original}


def record(defense: str, attack: str = "badnet", victim: float = 100.0, defense_fit: float = 10.0,
           evaluate: float = 5.0, variant: str | None = None, status: str = "ok", train_size: int | None = 2000,
           victim_cached: bool = True) -> dict:
    timings = {"suspect": timing(1e-5), "poison": timing(0.01, True, 0.02),
               "victim": timing(1e-4, True, victim) if victim_cached else timing(victim, False),
               "clean_model": timing(1e-4, True, 80.0), "evaluate": timing(evaluate), "total_seconds": 99.0}
    if defense != "none":
        timings["defense_fit"] = timing(defense_fit)
    return {"status": status, "timings": timings,
            "cell": {"dataset": "sst2", "model": "minilm", "finetune": "full", "attack": attack, "defense": defense,
                     "variant": variant, "seed": 0, "train_size": train_size}}


def test_a_cached_stage_costs_what_its_build_took_and_a_data_attack_has_no_release():
    stages = stage_seconds(record("ft", defense_fit=12.0, victim=300.0))
    assert stages["victim"] == 300.0 and stages["clean_model"] == 80.0 and stages["poison"] == 0.02
    assert stages["defense_fit"] == 12.0 and stages["evaluate"] == 5.0
    assert "suspect" not in stages and "total_seconds" not in stages
    assert stage_seconds(record("ft", victim=7.0, victim_cached=False))["victim"] == 7.0


def test_cost_rows_take_medians_per_defense_and_skip_failed_records():
    records = [record("ft", defense_fit=s) for s in (10.0, 30.0, 20.0)]
    records += [record("ft", defense_fit=999.0, status="failed"), record("none", evaluate=4.0),
                record("finemix", variant="rho0.2", defense_fit=50.0)]
    rows = {row["defense"]: row for row in cost_rows(records)}
    assert list(rows) == ["none", "finemix[rho0.2]", "ft"]  # the baseline first
    assert rows["ft"]["records"] == 3 and rows["ft"]["defense_stages"] == 20.0 and rows["ft"]["cell"] == 25.0
    assert rows["none"]["defense_stages"] is None and rows["none"]["cell"] == 4.0
    assert rows["ft"]["victim"] == 100.0 and rows["ft"]["suspect"] is None


def test_measurements_of_the_undefended_cell_are_not_defense_time():
    measured = record("none", evaluate=4.0)
    measured["timings"].update(survival=timing(30.0), stealth=timing(6.0))
    row = cost_rows([measured])[0]
    assert row["defense_stages"] is None and row["evaluate"] == 4.0 and row["cell"] == 40.0


def test_a_timing_of_the_same_attack_is_preferred_over_another_attacks():
    timed = Timed.from_records([record("ft", attack="badnet", defense_fit=10.0),
                                record("ft", attack="addsent", defense_fit=40.0)])
    key = timed.rows[0][0]
    assert timed.median("cell", key, "addsent", "ft") == 45.0
    assert timed.median("cell", key, "synbkd", "ft") == pytest.approx(30.0)  # no synbkd: every attack's median
    assert timed.median("cell", key, "badnet", "d3") is None


@dataclass
class Builds:
    suspect: str | None = None
    victim: str | None = None
    clean: str | None = None
    exact: bool = True


def planned(defense: str, victim: str, attack: str = "badnet", seed: int = 0):
    spec = SimpleNamespace(dataset="sst2", model="minilm", finetune="full", train_size=2000, attack=attack,
                           defense=defense, variant=None, seed=seed)
    return SimpleNamespace(spec=spec, builds=Builds(victim=victim, clean="clean-key"), group=victim)


class FakeCache:
    def __init__(self, cached: set[str]):
        self.cached = cached

    def lookup(self, kind: str, key: str):
        return object() if key in self.cached else None


def test_an_estimate_pays_each_missing_victim_once_and_counts_what_it_cannot_time():
    todo = [planned("none", "v0"), planned("ft", "v0"), planned("ft", "v1", seed=1), planned("d3", "v1", seed=1)]
    missing = missing_shared_builds(todo, FakeCache({"v0", "clean-key"}))
    assert missing == {"suspect": set(), "victim": {"v1"}, "clean_model": set()}
    records = [record("none", evaluate=4.0), record("ft", defense_fit=10.0, victim=100.0)]
    estimate = estimate_plan(todo, records, missing)
    assert estimate.seconds == pytest.approx(4.0 + 15.0 + 15.0 + 100.0)  # cells, then victim v1 once
    assert (estimate.cells_timed, estimate.cells_untimed) == (3, 1)  # no d3 record
    assert (estimate.trainings_timed, estimate.trainings_untimed) == (1, 0)
    assert "1 without a matching timing" in estimate.describe()


def test_costs_command_renders_markdown_and_refuses_an_empty_directory(tmp_path):
    runner = CliRunner()
    (tmp_path / "records").mkdir()
    empty = runner.invoke(app, ["costs", "--results-dir", str(tmp_path)])
    assert empty.exit_code != 0 and "no ok records" in empty.output
    for i, rec in enumerate([record("none"), record("ft")]):
        rec["schema"], rec["cell_id"] = "nlpbd.record/1", f"cell{i}"
        (tmp_path / "records" / f"cell{i}.json").write_text(json.dumps(rec))
    result = runner.invoke(app, ["costs", "--results-dir", str(tmp_path), "--format", "md"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("| dataset | model |") and len(lines) == 4
    assert "| sst2 | minilm | full | 2000 | ft | 1 | – | 100 | 80 | 10 | 5 | 15 |" in lines
