"""Result records on disk, and the tables built from them.

One experiment cell writes one JSON *record* (schema ``nlpbd.record/1``) to
``<results_dir>/records/<cell_id>.json``. Everything downstream (``nlpbd table``, exports, reference
results) is computed from those files alone, so a run can be interrupted, resumed or merged with
another machine's records by copying files. The record layout is documented in ``results/README.md``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.table import Table
from rich.text import Text

from nlpbd.cache import atomic_write_text
from nlpbd.errors import InputError
from nlpbd.registry import unknown_name_message
from nlpbd.specs import BASELINE, ThreatModel

SCHEMA = "nlpbd.record/1"
RECORDS_SUBDIR = "records"

# Metric name -> display label. Order here is the order metric columns appear in frames and tables.
METRICS: dict[str, str] = {
    "cacc": "CAcc",
    "asr": "ASR",
    "aasr": "AASR",
    "masr": "MASR",
    "acc_drop": "Acc drop",
    "frr": "FRR",
    "far": "FAR",
    "auroc": "AUROC",
    "removal_precision": "Rm.Prec",
    "removal_recall": "Rm.Rec",
    "delta_ppl": "ΔPPL",
    "sim": "Sim",
    "delta_cacc": "ΔCAcc",
    "delta_asr": "ΔASR",
    "delta_aasr": "ΔAASR",
    "delta_masr": "ΔMASR",
    "asr_floor": "Floor",
    "neither_rate": "Neither",                # generator victims: clean answers naming no label
    "false_trigger_rate": "False-trig.",      # generator victims: target answered without a trigger
    "balanced_accuracy": "BalAcc",
    "macro_f1": "Macro-F1",
    "aasr_floor": "AASR floor",
    "defense_seconds": "Time (s)",
    "defense_total_seconds": "Total time (s)",
}
SECONDS_METRICS = frozenset({"defense_seconds", "defense_total_seconds"})
EXPORT_FORMATS = ("csv", "md", "latex")

IDENTITY_COLUMNS = ["dataset", "model", "finetune", "train_size", "test_size", "attack", "defense", "variant", "seed",
                    "status"]
# Where a cell sits in the threat landscape: the attack's threat model and the defense's stage.
CONTEXT_COLUMNS = ["threat_model", "defense_stage"]
# Always present in the long frame, so exports have a stable minimum shape even with no records.
CORE_METRICS = ["cacc", "asr"]
GROUP_COLUMNS = ["dataset", "model", "finetune", "train_size", "test_size", "attack", "defense"]
# Row levels shown only where records differ in them (most tables are all-full, one train and test size).
# A missing size (records written before test_size existed, too) means the whole split: "all".
OPTIONAL_LEVELS = {"finetune": "full", "train_size": "all", "test_size": "all"}
# Size levels are dropped whenever all rows share one, whatever it is; finetune only when it is the default.
SIZE_LEVELS = ("train_size", "test_size")
# cell_id becomes a file name: keep it to a safe alphabet and never a dotfile (dotfiles are temp files).
_CELL_ID = re.compile(r"[A-Za-z0-9_\-=+,.\[\]]+")


# --------------------------------------------------------------------------------------------------
# Records on disk
# --------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Recursively make a record strictly JSON-serialisable (NaN/inf -> null, numpy -> Python)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _checked_cell_id(record: dict) -> str:
    cell_id = record.get("cell_id")
    if not isinstance(cell_id, str) or not _CELL_ID.fullmatch(cell_id) or cell_id.startswith("."):
        raise InputError(f"record has an invalid cell_id {cell_id!r}: it must be a safe, non-dot file name")
    return cell_id


def write_record(results_dir: Path, record: dict) -> Path:
    """Write ``record`` to ``results_dir/records/<cell_id>.json`` atomically and return that path.

    :func:`nlpbd.cache.atomic_write_text`: readers see the old record or the new one, never a partial
    file. The file's mode follows the umask, like any file the user writes.
    """
    cell_id = _checked_cell_id(record)
    records_dir = Path(results_dir) / RECORDS_SUBDIR
    records_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(record), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    final = records_dir / f"{cell_id}.json"
    atomic_write_text(final, text)
    return final


def read_record(path: Path) -> dict:
    """Parse one record file; a file that is not a JSON object raises InputError naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"corrupt record file {path}: {err}") from err
    if not isinstance(data, dict):
        raise InputError(f"corrupt record file {path}: expected a JSON object, got {type(data).__name__}")
    if data.get("schema") == SCHEMA:
        _check_shape(data, path)
    return data


# Fields a table reads, with the JSON type each must have (null allowed).
RECORD_FIELDS = {"cell_id": str, "status": str, "cell": dict, "metrics": dict, "flags": dict, "attack_info": dict,
                 "defense_info": dict, "timings": dict}


def _check_shape(record: dict, path: Path) -> None:
    """A record whose fields have the wrong JSON types is named, not a traceback deep in pandas."""
    for key, kind in RECORD_FIELDS.items():
        value = record.get(key)
        if value is not None and not isinstance(value, kind):
            expected = "an object" if kind is dict else "a string"
            raise InputError(f"corrupt record file {path}: '{key}' must be {expected}, got {type(value).__name__}")
    defense_fit = (record.get("timings") or {}).get("defense_fit")
    if defense_fit is not None and not isinstance(defense_fit, dict):
        raise InputError(f"corrupt record file {path}: 'timings.defense_fit' must be an object")


def load_records(results_dir: Path) -> list[dict]:
    """All ``nlpbd.record/1`` records under ``results_dir/records/``, in file-name order.

    Dotfiles (in-flight temp files) and JSON files of another schema are skipped, so other tools may
    share the directory. File-name order makes every table built from the result deterministic.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise InputError(f"no results directory {results_dir}; run `nlpbd run` first")
    records_dir = results_dir / RECORDS_SUBDIR
    if not records_dir.is_dir():
        return []
    records = []
    for path in sorted(records_dir.glob("*.json")):
        if path.name.startswith(".") or not path.is_file():
            continue
        record = read_record(path)
        if record.get("schema") == SCHEMA:
            records.append(record)
    return records


# --------------------------------------------------------------------------------------------------
# Long frame
# --------------------------------------------------------------------------------------------------


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _record_row(record: dict) -> tuple[dict[str, Any], list[str]]:
    """One flat row for ``record`` plus the metric keys it contributed, in record order."""
    cell = record.get("cell") or {}
    row: dict[str, Any] = {col: cell.get(col) for col in IDENTITY_COLUMNS if col != "status"}
    row["status"] = record.get("status")
    row["threat_model"] = (record.get("attack_info") or {}).get("threat_model")
    row["defense_stage"] = (record.get("defense_info") or {}).get("stage")
    # Nested metric values (e.g. per-class breakdowns) have no place in a flat frame.
    metrics = {k: v for k, v in (record.get("metrics") or {}).items() if _is_scalar(v)}
    row.update(metrics)
    defense_fit = (record.get("timings") or {}).get("defense_fit") or {}
    row["defense_seconds"] = defense_fit.get("seconds")
    row["defense_total_seconds"] = defense_total_seconds(record)
    row["cell_id"] = record.get("cell_id")
    row["settings"] = settings_key(cell)
    row["collapsed"] = bool((record.get("flags") or {}).get("collapsed_victim"))
    return row, list(metrics)


DEFENSE_STAGES = ("defense_fit", "defense_inference", "defended_victim")


def defense_total_seconds(record: dict) -> float | None:
    """Everything a defense cost, from the record's timings: fitting, scoring or correcting the test inputs,
    and retraining on purified or filtered data; a stage reused from the cache counts with the time it took
    when it was built. None for the undefended cell (no defense stage ran)."""
    timings = record.get("timings") or {}
    stages = [timings[name] for name in DEFENSE_STAGES if isinstance(timings.get(name), dict)]
    if not stages:
        return None
    total = 0.0
    for stage in stages:
        cached = stage.get("cached") and stage.get("original_seconds") is not None
        total += float(stage["original_seconds"] if cached else stage.get("seconds") or 0.0)
    return total


def settings_key(cell: dict) -> str:
    """A digest of everything that defines a cell but its seed: records that differ in it are different
    experiments, never seeds of one (a table refuses to average them).

    Not :func:`nlpbd.cache.content_key`: the digest is shown (``nlpbd table --format json``), and
    content_key's compact JSON would change it for every existing record."""
    rest = {k: v for k, v in cell.items() if k != "seed"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _metric_order(found: list[str]) -> list[str]:
    """Known metrics in METRICS order, then unknown ones in order of first appearance."""
    known = [m for m in METRICS if m in found or m in CORE_METRICS]
    return known + [m for m in found if m not in METRICS]


def records_frame(records: list[dict], context: bool = False) -> pd.DataFrame:
    """Long format: one row per record; identity columns, every metric found, defense_seconds, cell_id.

    ``context`` adds the attack's threat model and the defense's stage after ``status``.
    """
    rows, found = [], []
    for record in records:
        row, keys = _record_row(record)
        rows.append(row)
        found.extend(k for k in keys if k not in found)
    metric_cols = [m for m in _metric_order(found) if m not in SECONDS_METRICS]
    columns = (IDENTITY_COLUMNS + (CONTEXT_COLUMNS if context else []) + metric_cols
               + ["defense_seconds", "defense_total_seconds", "cell_id", "settings", "collapsed"])
    frame = pd.DataFrame(rows, columns=columns)
    for col in metric_cols + ["defense_seconds", "defense_total_seconds"]:
        if frame[col].isna().all():
            # An all-null column would be object dtype; keep metric columns numeric for aggregation.
            frame[col] = frame[col].astype(float)
    return frame


# --------------------------------------------------------------------------------------------------
# Summary over seeds
# --------------------------------------------------------------------------------------------------


@dataclass
class SummaryTable:
    """Per-cell mean, sample std (ddof=1) and count over seeds; columns are (defense, metric)."""

    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.DataFrame
    metrics: list[str]

    @property
    def defenses(self) -> list[str]:
        return list(dict.fromkeys(self.mean.columns.get_level_values(0)))


def _check_metrics(metrics: Sequence[str]) -> list[str]:
    for name in metrics:
        if name not in METRICS:
            raise InputError(unknown_name_message("metric", name, list(METRICS)))
    if not metrics:
        raise InputError(f"no metrics requested. Valid: {', '.join(sorted(METRICS))}")
    return list(dict.fromkeys(metrics))


def _variant_text(variant: Any) -> str | None:
    if _is_missing(variant):
        return None
    if isinstance(variant, dict):
        return ",".join(f"{k}={v}" for k, v in variant.items())
    return str(variant)


def _split_variant(variant: Any) -> tuple[str | None, str | None]:
    """A grid's ``attack+defense`` variant label into its two parts (``+rho0.3``: defense only)."""
    text = _variant_text(variant)
    if text is None or "+" not in text:
        return text, None
    attack_part, _, defense_part = text.partition("+")
    return attack_part or None, defense_part or None


def _attack_label(attack: Any, variant: Any) -> str:
    text = _split_variant(variant)[0]
    return str(attack) if text is None else f"{attack}[{text}]"


def _defense_label(defense: Any, variant: Any) -> str:
    text = _split_variant(variant)[1]
    return str(defense) if text is None else f"{defense}[{text}]"


def select_defenses(frame: pd.DataFrame, wanted: Sequence[str]) -> pd.DataFrame:
    """The records of the named defenses: a bare name (``psim``) keeps all its variants, a column label
    (``btu[tune]``) that one; an unknown name is an error that lists the labels present."""
    if not wanted:
        raise InputError("no defenses named")
    labels = pd.Series([_defense_label(d, v) for d, v in zip(frame["defense"], frame["variant"])], index=frame.index)
    present = set(labels) | set(frame["defense"].astype(str))
    for name in wanted:
        if name not in present:
            raise InputError(unknown_name_message("defense", name, sorted(set(labels))))
    return frame[labels.isin(wanted) | frame["defense"].astype(str).isin(wanted)]


def _defense_order(defenses: Sequence[str]) -> list[str]:
    """The baseline (``none``) first, ``ft`` second, the rest in order of first appearance."""
    seen = list(dict.fromkeys(defenses))
    head = [d for d in (BASELINE, "ft") if d in seen]
    return head + [d for d in seen if d not in head]


def arithmetic_mix(records: list[dict]) -> Counter[str]:
    """How many ok records each device and training arithmetic produced ("NVIDIA H200 · bf16": 96).

    Seeds of one cell trained on different machines or in different arithmetic are averaged like any other
    seeds; the table command says when a directory holds more than one, so a reader can tell."""
    found: Counter[str] = Counter()
    for record in records:
        if record.get("status") != "ok":
            continue
        prov = record.get("provenance") or {}
        precision = prov.get("training_precision") or ("bf16" if prov.get("bf16") else "fp32")
        found[f"{prov.get('device_name') or prov.get('device') or 'unknown device'} · {precision}"] += 1
    return found


def collapsed_cells(frame: pd.DataFrame) -> int:
    """Records whose victim collapsed to the majority class (flag ``collapsed_victim``)."""
    return int(frame["collapsed"].sum()) if "collapsed" in frame else 0


def _prepared(frame: pd.DataFrame, metrics: list[str], include_failed: bool,
              include_collapsed: bool = False) -> pd.DataFrame:
    """The rows to aggregate, with variant folded into the attack label and metrics numeric.

    Cells whose victim collapsed are left out unless asked for: their CAcc is the class balance and
    their ASR is trivial when the target is the class the victim always answers."""
    data = frame if include_failed else frame[frame["status"] == "ok"]
    if not include_collapsed and "collapsed" in data and len(data) and data["collapsed"].astype(bool).all():
        raise InputError("every record to summarize has a collapsed victim (flag collapsed_victim); "
                         "--include-collapsed shows them")
    if not include_collapsed and "collapsed" in data:
        data = data[~data["collapsed"].astype(bool)]
    if data.empty:
        which = "records" if include_failed else "successful records (status 'ok')"
        raise InputError(f"no {which} to summarize")
    out = pd.DataFrame({col: data[col].astype(object) for col in GROUP_COLUMNS + ["cell_id", "settings"]})
    for level, default in OPTIONAL_LEVELS.items():
        out[level] = [default if _is_missing(v) else _level_text(v) for v in out[level]]
    out["attack"] = [_attack_label(a, v) for a, v in zip(data["attack"], data["variant"])]
    out["defense"] = [_defense_label(d, v) for d, v in zip(data["defense"], data["variant"])]
    for metric in metrics:
        source = data[metric] if metric in data.columns else pd.Series(np.nan, index=data.index)
        out[metric] = pd.to_numeric(source, errors="coerce").astype(float)
    return out


def _level_text(value: Any) -> str:
    """A row label; integral numbers (a size read back as float next to nulls) print as integers."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _pivot(stat: pd.DataFrame, defenses: list[str], metrics: list[str]) -> pd.DataFrame:
    """(rows + defense) x metric  ->  rows x (defense, metric), in the requested column order."""
    wide = stat.unstack("defense")
    wide.columns = wide.columns.swaplevel(0, 1)
    order = pd.MultiIndex.from_product([defenses, metrics], names=["defense", "metric"])
    return wide.reindex(columns=order)


def summary_table(
    frame: pd.DataFrame, metrics: Sequence[str] = ("cacc", "asr"), include_failed: bool = False,
    include_collapsed: bool = False,
) -> SummaryTable:
    """Aggregate the long frame over seeds into a rows x (defense, metric) table.

    Rows are (dataset, model, finetune, train_size, test_size, attack); the finetune level is dropped when
    every row is ``full`` (the default), a size level when every row has the same one, and a non-null
    variant is appended to the attack label, ``badnet[rate=0.2]``.
    """
    metrics = _check_metrics(metrics)
    data = _prepared(frame, metrics, include_failed, include_collapsed)
    _check_one_setting_per_cell(data)
    defenses = _defense_order(data["defense"].tolist())
    grouped = data.groupby(GROUP_COLUMNS, sort=True, dropna=False)[metrics]
    mean = _pivot(grouped.mean(), defenses, metrics)
    std = _pivot(grouped.std(ddof=1), defenses, metrics)
    n = _pivot(grouped.count(), defenses, metrics).fillna(0).astype(int)
    for level, default in OPTIONAL_LEVELS.items():
        if data[level].nunique() == 1 and (level in SIZE_LEVELS or (data[level] == default).all()):
            mean, std, n = (t.droplevel(level) for t in (mean, std, n))
    return SummaryTable(mean=mean, std=std, n=n, metrics=metrics)


def _check_one_setting_per_cell(data: pd.DataFrame) -> None:
    """Only seeds may differ within a table cell; otherwise mean ± std would silently mix experiments."""
    conflict = _settings_conflict(data)
    if conflict is not None:
        raise InputError(conflict)


def _settings_conflict(data: pd.DataFrame) -> str | None:
    for key, rows in data.groupby(GROUP_COLUMNS, sort=True, dropna=False):
        if rows["settings"].nunique() > 1:
            first, other = rows.drop_duplicates("settings")["cell_id"].iloc[:2]
            return (f"{'/'.join(str(k) for k in key)}: records with different settings would be averaged as seeds "
                    f"({first}, {other}); label them with variants (a grid's, or nlpbd run --variant) or keep "
                    "them in separate results directories")
    return None


def settings_conflict(results_dir: Path) -> str | None:
    """What ``nlpbd table`` would refuse in this directory's successful records, if anything."""
    try:
        return _settings_conflict(_prepared(records_frame(load_records(results_dir)), ["cacc"], False, True))
    except InputError:  # nothing to summarize (yet): nothing to warn about
        return None


# --------------------------------------------------------------------------------------------------
# Formatting and export
# --------------------------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    """None, NaN or pd.NA; containers (a dict variant) are never missing."""
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _fmt_number(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    # Rounding a tiny negative delta must not print "-0.000".
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def format_cell(mean: float | None, std: float | None, n: int, metric: str, most: int = 0) -> str:
    """``0.912``, or ``0.912 ± 0.010`` over more than one seed; seconds get one decimal; NaN is ``–``.

    A cell over fewer seeds than ``most`` (the table's largest count) says how many: ``0.912 (n=1)``.
    """
    if _is_missing(mean):
        return "–"
    decimals = 1 if metric in SECONDS_METRICS else 3
    text = _fmt_number(float(mean), decimals)
    if n > 1 and not _is_missing(std):
        text += f" ± {_fmt_number(float(std), decimals)}"
    if n < most:
        text += f" (n={n})"
    return text


def most_seeds(table: SummaryTable) -> int:
    return int(table.n.max().max()) if table.n.size else 0


def _index_names(table: SummaryTable) -> list[str]:
    return [str(name) for name in table.mean.index.names]


def _index_values(key: Any) -> list[str]:
    return [str(v) for v in (key if isinstance(key, tuple) else (key,))]


def _header(defense: str, metric: str) -> str:
    return f"{defense} {METRICS[metric]}"


def _formatted_rows(table: SummaryTable, most: int | None = None) -> list[list[str]]:
    """Index values followed by one formatted cell per (defense, metric) column, per row; a cell over
    fewer seeds than ``most`` (default: the table's largest count) names its count."""
    most = most_seeds(table) if most is None else most
    rows = []
    for key in table.mean.index:
        cells = [
            format_cell(table.mean.at[key, col], table.std.at[key, col], int(table.n.at[key, col]), col[1], most)
            for col in table.mean.columns
        ]
        rows.append(_index_values(key) + cells)
    return rows


def render_rich(table: SummaryTable, title: str | None = None, most: int | None = None) -> Table:
    """A rich Table: index levels first, then one column per (defense, metric).

    Labels are plain ``Text``: a variant label like ``badnet[rate0.2]`` is not rich markup.
    """
    out = Table(title=title, caption="mean ± sample std over seeds (n = seeds, where fewer than in the rest); "
                                     "– = not measured")
    for name in _index_names(table):  # labels never wrap: render_rich_fitted splits the metrics instead
        out.add_column(Text(name), style="bold" if name == "attack" else None, no_wrap=True)
    for defense, metric in table.mean.columns:
        out.add_column(Text(_header(defense, metric)), justify="right", no_wrap=True)
    for row in _formatted_rows(table, most):
        out.add_row(*(Text(cell) for cell in row))
    return out


def _columns(table: SummaryTable, columns: list) -> SummaryTable:
    return SummaryTable(table.mean[columns], table.std[columns], table.n[columns], table.metrics)


def _width(texts: Sequence[str]) -> int:
    return max((len(t) for t in texts), default=0)


def render_rich_fitted(table: SummaryTable, width: int, title: str | None = None) -> list[Table]:
    """``render_rich`` in as many tables as it takes to fit ``width`` columns (a pipe, an 80-column CI log):
    every part repeats the row labels (dataset, model, attack) and takes as many metric columns as fit,
    so no label is squeezed to nothing."""
    rows = _formatted_rows(table)
    names = _index_names(table)
    label_width = sum(_width([name] + [r[i] for r in rows]) + 3 for i, name in enumerate(names)) + 1
    parts: list[list] = [[]]
    used = label_width
    for j, (defense, metric) in enumerate(table.mean.columns):
        need = _width([_header(defense, metric)] + [r[len(names) + j] for r in rows]) + 3
        if parts[-1] and used + need > width:
            parts.append([])
            used = label_width
        parts[-1].append((defense, metric))
        used += need
    if len(parts) == 1:
        return [render_rich(table, title)]
    return [render_rich(_columns(table, cols), f"{title} ({i} of {len(parts)})" if title else None,
                        most_seeds(table)) for i, cols in enumerate(parts, start=1)]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _to_markdown(table: SummaryTable) -> str:
    names = _index_names(table)
    headers = names + [_header(d, m) for d, m in table.mean.columns]
    align = ["---"] * len(names) + ["---:"] * (len(headers) - len(names))
    lines = [headers, align] + _formatted_rows(table)
    return "\n".join("| " + " | ".join(_md_escape(c) for c in line) + " |" for line in lines) + "\n"


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_LATEX_UNICODE = {"±": r"$\pm$", "Δ": r"$\Delta$", "–": "--"}


def _latex_escape(text: str) -> str:
    """Escape LaTeX specials, then map the few non-ASCII symbols the table uses to LaTeX."""
    text = "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)
    for symbol, latex in _LATEX_UNICODE.items():
        text = text.replace(symbol, latex)
    return text


def _to_latex(table: SummaryTable) -> str:
    names = _index_names(table)
    defenses, k = table.defenses, len(table.metrics)
    spec = "l" * len(names) + "".join("r" * k for _ in defenses)
    groups = [rf"\multicolumn{{{k}}}{{c}}{{{_latex_escape(d)}}}" for d in defenses]
    rules = [
        rf"\cmidrule(lr){{{len(names) + 1 + i * k}-{len(names) + (i + 1) * k}}}" for i in range(len(defenses))
    ]
    labels = [METRICS[m] for _, m in table.mean.columns]
    lines = [
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join([""] * len(names) + groups) + r" \\",
        "".join(rules),
        " & ".join(_latex_escape(c) for c in names + labels) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_latex_escape(c) for c in row) + r" \\" for row in _formatted_rows(table)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _to_csv(table: SummaryTable) -> str:
    """Flat columns ``<defense>_<metric>``, ``<defense>_<metric>_std`` and ``<defense>_n``.

    ``<defense>_n`` is the largest per-metric count for that defense: the number of seeds that
    reported anything (a metric measured by fewer seeds has its own smaller count in ``table.n``).
    """
    flat = pd.DataFrame(index=table.mean.index)
    for defense in table.defenses:
        for metric in table.metrics:
            flat[f"{defense}_{metric}"] = table.mean[(defense, metric)]
            flat[f"{defense}_{metric}_std"] = table.std[(defense, metric)]
        flat[f"{defense}_n"] = table.n[defense].max(axis=1).astype(int)
    # 10 significant digits: exact for any real metric, without float noise like 0.09999999999999998.
    return flat.reset_index().to_csv(index=False, float_format="%.10g")


def export_table(table: SummaryTable, fmt: str) -> str:
    """The summary table as ``csv`` (raw numbers), ``md`` (GitHub pipe table) or ``latex`` (booktabs)."""
    if fmt == "csv":
        return _to_csv(table)
    if fmt == "md":
        return _to_markdown(table)
    if fmt == "latex":
        return _to_latex(table)
    raise InputError(unknown_name_message("export format", fmt, list(EXPORT_FORMATS)))


def export_json(frame: pd.DataFrame) -> str:
    """The long frame as a JSON list of per-record objects; NaN becomes null."""
    if "collapsed" in frame and not frame["collapsed"].any():  # the export of older records stays as it was
        frame = frame.drop(columns="collapsed")
    rows = [
        {str(col): _jsonable(None if _is_missing(value) else value) for col, value in row.items()}
        for row in frame.to_dict(orient="records")
    ]
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------------------------------
# Metric names, grouping by threat model
# --------------------------------------------------------------------------------------------------

METRIC_ALIASES = {"time": "defense_seconds", "seconds": "defense_seconds", "dcacc": "delta_cacc",
                  "dasr": "delta_asr", "floor": "asr_floor"}
GROUP_BY = ("threat_model",)
# Display order of the threat models.
THREAT_MODEL_ORDER = tuple(t.value for t in ThreatModel)
UNKNOWN_GROUP = "unknown"


def default_metrics(frame: pd.DataFrame) -> list[str]:
    """CAcc and the attack-success measures the records have: ASR, and AASR / MASR for task-agnostic cells."""
    measured = [k for k in ("asr", "aasr", "masr") if k in frame and frame[k].notna().any()]
    return ["cacc", *(measured or ["asr"])]


def metric_key(name: str) -> str:
    """A metric by key (``delta_asr``), table label (``ΔASR``, any case) or alias (``time``)."""
    text = name.strip()
    by_label = {label.lower(): key for key, label in METRICS.items()}
    lowered = text.lower()
    for table in (METRICS, by_label, METRIC_ALIASES):
        if lowered in table:
            return lowered if table is METRICS else table[lowered]
    raise InputError(unknown_name_message("metric", text, list(METRICS)))


def _group_order(values: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(values))
    known = [v for v in THREAT_MODEL_ORDER if v in seen]
    return known + sorted(v for v in seen if v not in known)


def grouped_summaries(frame: pd.DataFrame, metrics: Sequence[str], by: str, include_failed: bool = False,
                      include_collapsed: bool = False) -> list[tuple[str, SummaryTable]]:
    """One summary table per value of ``by`` (a context column), each with only its own defenses."""
    if by not in GROUP_BY:
        raise InputError(unknown_name_message("grouping", by, list(GROUP_BY)))
    if by not in frame.columns:
        raise InputError(f"the records frame has no '{by}' column (build it with records_frame(..., context=True))")
    labels = frame[by].where(frame[by].notna(), UNKNOWN_GROUP).astype(str)
    counted = labels if include_failed else labels[frame["status"] == "ok"]
    if counted.empty:
        summary_table(frame, metrics, include_failed=include_failed)  # raises the usual "no records" error
    return [(label, summary_table(frame[labels == label], metrics, include_failed=include_failed,
                                  include_collapsed=include_collapsed))
            for label in _group_order(counted.tolist())]


def render_rich_groups(groups: list[tuple[str, SummaryTable]], title: str | None = None) -> list[Table]:
    return [render_rich(table, title=f"{title} · {label}" if title else label) for label, table in groups]


def export_groups(groups: list[tuple[str, SummaryTable]], fmt: str, by: str = "threat_model") -> str:
    """Grouped tables: Markdown and LaTeX one table per group under its name; CSV one table with a ``by`` column."""
    if fmt == "csv":
        parts = []
        for label, table in groups:
            flat = pd.read_csv(io.StringIO(_to_csv(table)), keep_default_na=False, dtype=str)
            flat.insert(0, by, label)
            parts.append(flat)
        return pd.concat(parts, ignore_index=True).fillna("").to_csv(index=False)
    if fmt == "md":
        return "\n".join(f"**{_md_escape(label)}**\n\n{_to_markdown(table)}" for label, table in groups)
    if fmt == "latex":
        return "\n".join(f"% {label}\n\\paragraph{{{_latex_escape(label)}}}\n{_to_latex(table)}"
                         for label, table in groups)
    raise InputError(unknown_name_message("export format", fmt, list(EXPORT_FORMATS)))
