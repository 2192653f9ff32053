"""The clean-budget / rho sensitivity table: one row per defense setting, one column per clean budget.

Reads the records of one or more results directories (the reference table's cells give the 5% points
at default settings, the sensitivity grid the rest) and writes CAcc / ASR for one attack:

    python benchmarks/sensitivity_table.py results/reference/sst2-data-poisoning \
        results/reference/sst2-sensitivity --attack badnet -o results/reference/sst2-sensitivity/table.md

Budgets and rho are read from each record's own settings, never from its variant label. For
Fine-mixing with ``select_rho`` the cell also names the rho that D_c^val chose.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from nlpbd.errors import NlpbdError
from nlpbd.results import load_records

SWEPT = ("ft", "epur", "d3", "finemix")


def setting_label(record: dict) -> str:
    """The row a record belongs to: the defense, plus rho (or 'select') for Fine-mixing."""
    cell = record["cell"]
    if cell["defense"] != "finemix":
        return cell["defense"]
    params = cell["defense_params"]
    return "finemix select-rho" if params["select_rho"] else f"finemix rho={params['rho']:g}"


def point(record: dict) -> dict:
    cell, metrics = record["cell"], record["metrics"]
    chosen = record["defense_info"].get("select_rho", {}).get("selected_rho")
    return {"setting": setting_label(record), "budget": cell["budget_params"]["fraction"],
            "n_c": record["budget"]["n_c"], "cacc": metrics["cacc"], "asr": metrics["asr"],
            "chosen_rho": chosen, "seconds": record["timings"]["defense_fit"]["seconds"]}


def sensitivity_frame(records: list[dict], attack: str) -> tuple[pd.DataFrame, dict | None]:
    """The swept cells of ``attack`` as a long frame, and the undefended victim's metrics (or None)."""
    ok = [r for r in records if r["status"] == "ok" and r["cell"]["attack"] == attack]
    victim = next((r["metrics"] for r in ok if r["cell"]["defense"] == "none"), None)
    rows = [point(r) for r in ok if r["cell"]["defense"] in SWEPT]
    frame = pd.DataFrame(rows, columns=["setting", "budget", "n_c", "cacc", "asr", "chosen_rho", "seconds"])
    duplicated = frame.duplicated(["setting", "budget"], keep=False)
    if duplicated.any():
        raise SystemExit(f"error: two records for the same setting and budget: "
                         f"{frame[duplicated][['setting', 'budget']].values.tolist()}")
    return frame, victim


def cell_text(row: pd.Series) -> str:
    text = f"{row.cacc:.3f} / {row.asr:.3f}"
    return text + (f" (rho {row.chosen_rho:g})" if pd.notna(row.chosen_rho) else "")


def to_markdown(frame: pd.DataFrame, victim: dict | None) -> str:
    """Rows: settings; columns: budgets (with the size of D_c); cells: CAcc / ASR."""
    budgets = sorted(frame["budget"].unique())
    sizes = frame.groupby("budget")["n_c"].first()
    header = ["setting"] + [f"{b:.0%} of train ({sizes[b]:,} rows)" for b in budgets]
    lines = [header, ["---"] + ["---:"] * len(budgets)]
    if victim is not None:
        lines.append(["none (victim)"] + [f"{victim['cacc']:.3f} / {victim['asr']:.3f}"] * len(budgets))
    order = sorted(frame["setting"].unique(), key=lambda s: (SWEPT.index(s.split()[0]), s))
    for setting in order:
        rows = frame[frame["setting"] == setting].set_index("budget")
        lines.append([setting] + [cell_text(rows.loc[b]) if b in rows.index else "—" for b in budgets])
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dirs", nargs="+", type=Path, help="directories holding records/")
    parser.add_argument("--attack", default="badnet", help="attack whose cells are tabulated")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        records = [r for directory in args.results_dirs for r in load_records(directory)]
    except NlpbdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    frame, victim = sensitivity_frame(records, args.attack)
    if frame.empty:
        print(f"error: no finished {', '.join(SWEPT)} cells of attack '{args.attack}' in "
              f"{', '.join(map(str, args.results_dirs))}", file=sys.stderr)
        return 1
    text = to_markdown(frame, victim)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
