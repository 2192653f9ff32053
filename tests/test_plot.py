"""`nlpbd plot`: one CAcc-vs-ASR figure per dataset and model, a point per (attack, defense) pair."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from matplotlib.collections import LineCollection, PathCollection
from typer.testing import CliRunner

from nlpbd.cli import app
from nlpbd.plot import figures, save_plots
from nlpbd.results import SCHEMA, load_records, records_frame, write_record

ATTACKS = ("badnet", "addsent", "synbkd")
DEFENSES = ("none", "ft", "btu")


def record(dataset: str, attack: str, defense: str, seed: int, variant: str | None = None) -> dict:
    """A schema-shaped record whose metrics differ per pair and seed."""
    asr = {"none": 0.95, "ft": 0.6, "btu": 0.2}[defense] - 0.01 * seed
    cacc = {"none": 0.9, "ft": 0.88, "btu": 0.86}[defense] - 0.02 * ATTACKS.index(attack) + 0.005 * seed
    return {"schema": SCHEMA, "cell_id": f"{dataset}__minilm__full__{attack}__{defense}__s{seed}__{variant or 'x'}",
            "status": "ok", "error": None,
            "cell": {"dataset": dataset, "model": "minilm", "finetune": "full", "attack": attack, "defense": defense,
                     "seed": seed, "variant": variant},
            "metrics": {"cacc": cacc, "asr": asr}, "timings": {}}


def write_records(results: Path, datasets=("sst2", "olid"), seeds=(0, 1, 2)) -> int:
    pairs = list(itertools.product(ATTACKS, DEFENSES))
    for dataset, (attack, defense), seed in itertools.product(datasets, pairs, seeds):
        if dataset == "olid" and attack == "synbkd":
            continue
        write_record(results, record(dataset, attack, defense, seed))
    return len(pairs)


def scatter_points(fig) -> list[tuple[float, float]]:
    (ax,) = fig.axes
    return [tuple(xy) for c in ax.collections if isinstance(c, PathCollection) for xy in c.get_offsets()]


def test_one_point_per_attack_defense_pair_with_error_bars(tmp_path):
    pairs = write_records(tmp_path)
    figs = figures(records_frame(load_records(tmp_path)))
    assert set(figs) == {("sst2", "minilm"), ("olid", "minilm")}
    assert len(scatter_points(figs[("sst2", "minilm")])) == pairs
    assert len(scatter_points(figs[("olid", "minilm")])) == pairs - len(DEFENSES)  # no synbkd on olid
    (ax,) = figs[("sst2", "minilm")].axes
    assert sum(isinstance(c, LineCollection) for c in ax.collections) == 2 * pairs  # x and y bars per point
    means = [(round(x, 6), round(y, 6)) for x, y in scatter_points(figs[("sst2", "minilm")])]
    assert (0.59, 0.885) in means  # ft on badnet: ASR 0.6 - 0.01·s and CAcc 0.88 + 0.005·s averaged over s = 0, 1, 2
    assert ax.get_xlim() == (0.0, 1.0) and ax.get_ylim() == (0.0, 1.0)
    assert ax.get_title() == "sst2 · minilm"


def test_colours_and_markers_are_consistent_across_figures(tmp_path):
    write_records(tmp_path)
    figs = figures(records_frame(load_records(tmp_path)))

    def styles(fig) -> dict:
        (ax,) = fig.axes
        found = {}
        for c in (c for c in ax.collections if isinstance(c, PathCollection)):
            found[tuple(c.get_offsets()[0])] = (tuple(c.get_edgecolor()[0]), c.get_paths()[0].vertices.shape)
        return found

    sst2, olid = styles(figs[("sst2", "minilm")]), styles(figs[("olid", "minilm")])
    same_points = set(sst2) & set(olid)  # badnet and addsent points have equal values on both datasets
    assert len(same_points) == 2 * len(DEFENSES)
    assert all(sst2[p] == olid[p] for p in same_points)
    victim_edges = {v[0] for p, v in sst2.items() if p[0] > 0.93}
    assert victim_edges == {(0.0, 0.0, 0.0, 1.0)}  # the undefended victim: black outline


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_plot_command_writes_files(tmp_path, fmt):
    write_records(tmp_path / "results")
    result = CliRunner().invoke(app, ["plot", "--results-dir", str(tmp_path / "results"), "--output",
                                      str(tmp_path / "plots"), "--format", fmt])
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "plots").iterdir())
    assert [p.name for p in files] == [f"cacc_vs_asr__olid__minilm.{fmt}", f"cacc_vs_asr__sst2__minilm.{fmt}"]
    assert all(p.stat().st_size > 5000 for p in files)
    first = files[0].read_bytes()
    save_plots(records_frame(load_records(tmp_path / "results")), tmp_path / "plots", fmt)
    assert files[0].read_bytes() == first  # no dates in the files: a rerun gives identical bytes


def test_plot_without_records_is_an_input_error(tmp_path):
    (tmp_path / "records").mkdir()
    result = CliRunner().invoke(app, ["plot", "--results-dir", str(tmp_path)])
    assert result.exit_code == 2 and "no records" in result.output


def test_task_agnostic_attacks_are_placed_by_aasr(tmp_path):
    for defense, seed in itertools.product(("none", "ft"), (0, 1)):
        rec = record("sst2", "badnet", defense, seed)
        rec["cell"]["attack"], rec["cell_id"] = "neuba", rec["cell_id"].replace("badnet", "neuba")
        rec["metrics"] = {"cacc": rec["metrics"]["cacc"], "asr": None, "aasr": rec["metrics"]["asr"]}
        write_record(tmp_path, rec)
    (fig,) = figures(records_frame(load_records(tmp_path))).values()
    assert sorted(round(x, 6) for x, _ in scatter_points(fig)) == [0.595, 0.945]  # mean AASR over both seeds
    assert fig.axes[0].get_xlabel() == "AASR (lower is better)"
