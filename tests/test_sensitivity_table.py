"""benchmarks/sensitivity_table.py: settings and budgets come from each record's own parameters."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sensitivity_table.py"


@pytest.fixture
def script(monkeypatch):
    spec = importlib.util.spec_from_file_location("sensitivity_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def record(defense: str, fraction: float, cacc: float, asr: float, attack: str = "badnet",
           rho: float = 0.5, select: bool = False, chosen: float | None = None, variant: str | None = None,
           seed: int = 0) -> dict:
    info = {"select_rho": {"selected_rho": chosen}} if chosen is not None else {}
    return {"status": "ok", "metrics": {"cacc": cacc, "asr": asr}, "defense_info": info,
            "budget": {"n_c": int(6920 * fraction)}, "timings": {"defense_fit": {"seconds": 1.0}},
            "cell": {"attack": attack, "defense": defense, "variant": variant, "seed": seed,
                     "defense_params": {"rho": rho, "select_rho": select}, "budget_params": {"fraction": fraction}}}


def test_rows_are_settings_and_columns_budgets(script):
    records = [
        record("none", 0.05, 0.88, 1.0),
        record("ft", 0.05, 0.87, 0.99),
        record("ft", 0.01, 0.86, 1.0, variant="b0.01"),
        record("finemix", 0.05, 0.85, 0.6, rho=0.5),
        record("finemix", 0.01, 0.80, 0.4, rho=0.2, variant="labels-are-not-read"),
        record("finemix", 0.01, 0.84, 0.7, select=True, chosen=0.3),
        record("ft", 0.05, 0.1, 0.1, attack="addsent"),  # another attack: left out
        {**record("d3", 0.05, 0.5, 0.5), "status": "failed"},  # failed: left out
    ]
    frame, victims = script.sensitivity_frame(records, "badnet")
    assert victims.to_dict("records") == [{"seed": 0, "cacc": 0.88, "asr": 1.0}]
    assert sorted(frame["setting"].unique()) == ["finemix rho=0.2", "finemix rho=0.5", "finemix select-rho", "ft"]
    lines = script.to_markdown(script.summarise(frame), victims).splitlines()
    assert lines[0] == "| setting | 1% of train (69 rows) | 5% of train (346 rows) |"
    assert lines[2] == "| none (victim) | 0.880 / 1.000 | 0.880 / 1.000 |"
    assert lines[3] == "| ft | 0.860 / 1.000 | 0.870 / 0.990 |"
    assert "| finemix rho=0.2 | 0.800 / 0.400 | — |" in lines
    assert "| finemix select-rho | 0.840 / 0.700 (rho 0.3) | — |" in lines


def test_two_records_of_one_point_are_refused(script):
    with pytest.raises(SystemExit, match="two records"):
        script.sensitivity_frame([record("ft", 0.05, 0.8, 1.0), record("ft", 0.05, 0.8, 0.9, variant="b0.05")],
                                 "badnet")


def test_missing_directory_is_a_one_line_error(script, tmp_path, capsys):
    assert script.main([str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_seeds_are_averaged_with_their_spread_and_count(script):
    records = [record("none", 0.05, 0.88, 1.0, seed=0), record("none", 0.05, 0.86, 1.0, seed=1),
               record("ft", 0.05, 0.80, 0.90, seed=0), record("ft", 0.05, 0.90, 0.70, seed=1),
               record("ft", 0.01, 0.85, 1.0, seed=0),
               record("finemix", 0.05, 0.84, 0.6, select=True, chosen=0.5, seed=1),
               record("finemix", 0.05, 0.86, 0.8, select=True, chosen=0.3, seed=0)]
    frame, victims = script.sensitivity_frame(records, "badnet")
    summary = script.summarise(frame)
    lines = script.to_markdown(summary, victims).splitlines()
    assert lines[2] == "| none (victim) | 0.870 ± 0.014 / 1.000 ± 0.000 | 0.870 ± 0.014 / 1.000 ± 0.000 |"
    assert lines[3] == "| ft | 0.850 / 1.000 [1 of 2 seeds] | 0.850 ± 0.071 / 0.800 ± 0.141 |"
    assert "| finemix select-rho | — | 0.850 ± 0.014 / 0.700 ± 0.141 (rho 0.3, 0.5) |" in lines


def test_one_seed_twice_is_refused(script):
    with pytest.raises(SystemExit, match="two records"):
        script.sensitivity_frame([record("none", 0.05, 0.8, 1.0), record("none", 0.05, 0.8, 1.0)], "badnet")


def test_plot_draws_both_metrics_with_error_bars(script, tmp_path):
    records = [record("ft", b, 0.8 + s / 100, 1.0 - s / 10, seed=s) for b in (0.01, 0.05) for s in (0, 1, 2)]
    records += [record("none", 0.05, 0.88, 1.0, seed=s) for s in (0, 1, 2)]
    assert script.main([str(d) for d in _write(tmp_path, records)] + ["--plot", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 10_000


def _write(tmp_path, records):
    from nlpbd.results import SCHEMA, write_record

    directory = tmp_path / "results"
    for i, rec in enumerate(records):
        write_record(directory, {"schema": SCHEMA, "cell_id": f"cell{i}", **rec})
    return [directory]
