"""CAcc-versus-ASR scatter plots of a results directory, one figure per dataset and model.

Each point is one (attack, defense) pair, CAcc against ASR (AASR for task-agnostic attacks), averaged
over seeds (the same aggregation as ``nlpbd table``), with ±1 sample-std error bars on both axes when
there is more than one seed. Colour encodes the defense and marker shape the attack, consistently across
every figure of one call; the undefended victim is drawn as a large black outlined marker. The best
place is the top left (clean accuracy kept, attack removed). Figures are drawn with the non-interactive
Agg backend, without dates in the files, so a rerun on the same records writes identical bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from nlpbd.cache import atomic_write_bytes
from nlpbd.errors import InputError
from nlpbd.results import SummaryTable, summary_table
from nlpbd.specs import BASELINE

FORMATS = ("png", "svg")
DPI = 200
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "8", "d")
UNDEFENDED = BASELINE


@dataclass(frozen=True)
class Point:
    attack: str
    defense: str
    cacc: float
    asr: float  # ASR, or AASR for task-agnostic attacks (which have no fixed target)
    cacc_std: float
    asr_std: float
    n: int
    aasr: bool = False


@dataclass(frozen=True)
class Style:
    """Colour per defense and marker per attack, fixed for all figures of one call."""

    colours: dict[str, tuple]
    markers: dict[str, str]

    @classmethod
    def for_table(cls, table: SummaryTable) -> Style:
        from matplotlib import colormaps

        palette = colormaps["tab10"].colors + colormaps["Dark2"].colors
        defended = [d for d in table.defenses if d != UNDEFENDED]
        colours = {d: palette[i % len(palette)] for i, d in enumerate(defended)}
        colours[UNDEFENDED] = (0.0, 0.0, 0.0)
        attacks = list(dict.fromkeys(table.mean.index.get_level_values("attack")))
        return cls(colours, {a: MARKERS[i % len(MARKERS)] for i, a in enumerate(attacks)})


def _panel_key(row_key: tuple, names: list[str]) -> tuple:
    """The row key without the attack: (dataset, model[, finetune])."""
    return tuple(v for v, n in zip(row_key, names) if n != "attack")


def panels(table: SummaryTable) -> dict[tuple, list[Point]]:
    """The points of each figure, keyed by (dataset, model[, finetune]); pairs without numbers are left out."""
    names = [str(n) for n in table.mean.index.names]
    out: dict[tuple, list[Point]] = {}
    for key in table.mean.index:
        key = key if isinstance(key, tuple) else (key,)
        for defense in table.defenses:
            point = _point(table, key, key[names.index("attack")], defense)
            if point is not None:
                out.setdefault(_panel_key(key, names), []).append(point)
    return out


def _point(table: SummaryTable, key: tuple, attack: str, defense: str) -> Point | None:
    attack_metric = "asr" if not pd.isna(table.mean.at[key, (defense, "asr")]) else "aasr"
    cacc, asr = table.mean.at[key, (defense, "cacc")], table.mean.at[key, (defense, attack_metric)]
    if pd.isna(cacc) or pd.isna(asr):
        return None
    n = int(min(table.n.at[key, (defense, "cacc")], table.n.at[key, (defense, attack_metric)]))
    return Point(attack, defense, float(cacc), float(asr), _std(table.std.at[key, (defense, "cacc")], n),
                 _std(table.std.at[key, (defense, attack_metric)], n), n, aasr=attack_metric == "aasr")


def _std(value, n: int) -> float:
    return 0.0 if n < 2 or pd.isna(value) else float(value)


def _draw_point(ax, point: Point, style: Style) -> None:
    colour = style.colours[point.defense]
    victim = point.defense == UNDEFENDED
    if point.n > 1:
        ax.errorbar(point.asr, point.cacc, xerr=point.asr_std, yerr=point.cacc_std, fmt="none", ecolor=colour,
                    elinewidth=0.8, capsize=2, alpha=0.7, zorder=2, clip_on=False)
    ax.scatter([point.asr], [point.cacc], marker=style.markers[point.attack], s=110 if victim else 55,
               facecolors="none" if victim else [colour], edgecolors=[colour], linewidths=1.6 if victim else 0.6,
               zorder=4 if victim else 3, clip_on=False)


def _legends(ax, points: list[Point], style: Style) -> None:
    from matplotlib.lines import Line2D

    defenses = list(dict.fromkeys(p.defense for p in points))
    defenses = [d for d in defenses if d == UNDEFENDED] + [d for d in defenses if d != UNDEFENDED]
    attacks = list(dict.fromkeys(p.attack for p in points))
    defense_handles = [Line2D([], [], linestyle="none", marker="o", markersize=7,
                              markerfacecolor="none" if d == UNDEFENDED else style.colours[d],
                              markeredgecolor=style.colours[d], label="no defense (victim)" if d == UNDEFENDED else d)
                       for d in defenses]
    attack_handles = [Line2D([], [], linestyle="none", marker=style.markers[a], markersize=7, color="0.35", label=a)
                      for a in attacks]
    # Figure legends (not axes legends) so that the tight bounding box on save includes them whole.
    fig = ax.figure
    fig.legend(handles=defense_handles, title="defense", loc="upper left", bbox_to_anchor=(1.02, 1.0),
               bbox_transform=ax.transAxes, frameon=False, fontsize=8, title_fontsize=9, alignment="left")
    fig.legend(handles=attack_handles, title="attack", loc="lower left", bbox_to_anchor=(1.02, 0.0),
               bbox_transform=ax.transAxes, frameon=False, fontsize=8, title_fontsize=9, alignment="left")


def figure(key: tuple, points: list[Point], style: Style):
    """One CAcc-vs-ASR figure; returns the matplotlib Figure (not saved)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    for point in points:
        _draw_point(ax, point, style)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    kinds = {p.aasr for p in points}
    metric = {frozenset({False}): "ASR", frozenset({True}): "AASR"}.get(frozenset(kinds), "ASR (AASR: task-agnostic)")
    ax.set_xlabel(f"{metric} (lower is better)")
    ax.set_ylabel("CAcc (higher is better)")
    ax.set_title(" · ".join(str(k) for k in key))
    ax.grid(True, linewidth=0.4, alpha=0.4)
    ax.set_aspect("equal")
    seeds = max(p.n for p in points)
    if seeds > 1:
        ax.text(0.99, 0.01, f"mean ± std over {seeds} seeds", transform=ax.transAxes, ha="right", va="bottom",
                fontsize=7, color="0.4")
    _legends(ax, points, style)
    fig.subplots_adjust(right=0.68)
    return fig


def figures(frame: pd.DataFrame, include_failed: bool = False) -> dict[tuple, object]:
    """Every figure of a records frame, keyed by (dataset, model[, finetune])."""
    table = summary_table(frame, ["cacc", "asr", "aasr"], include_failed=include_failed)
    style = Style.for_table(table)
    return {key: figure(key, points, style) for key, points in panels(table).items()}


def _file_name(key: tuple, fmt: str) -> str:
    slug = "__".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", str(k)) for k in key)
    return f"cacc_vs_asr__{slug}.{fmt}"


def save_plots(frame: pd.DataFrame, output: Path, fmt: str = "png", include_failed: bool = False) -> list[Path]:
    """Write one figure per dataset (and model) to ``output``; returns the paths written."""
    import matplotlib

    if fmt not in FORMATS:
        raise InputError(f"unknown plot format '{fmt}'. Valid: {', '.join(FORMATS)}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    with matplotlib.rc_context({"svg.hashsalt": "nlpbd", "font.size": 9}):
        for key, fig in figures(frame, include_failed).items():
            path = output / _file_name(key, fmt)
            atomic_write_bytes(path, _render(fig, fmt))
            written.append(path)
    return written


def _render(fig, fmt: str) -> bytes:
    """The figure's file bytes; no creation date in the metadata, so reruns give identical files."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    fig.savefig(buffer, format=fmt, dpi=DPI, bbox_inches="tight", metadata=metadata)
    return buffer.getvalue()
