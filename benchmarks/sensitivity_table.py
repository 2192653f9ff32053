"""The clean-budget / rho sensitivity table: one row per defense setting, one column per clean budget.

Reads the records of one or more results directories (the reference table's cells give the 5% points
at default settings, the sensitivity grid the rest) and writes CAcc / ASR for one attack, as mean ±
sample std over the seeds present (the count is named where fewer seeds landed than elsewhere):

    python benchmarks/sensitivity_table.py results/reference/sst2-data-poisoning \
        results/reference/sst2-sensitivity --attack badnet -o results/reference/sst2-sensitivity/table.md \
        --plot results/reference/sst2-sensitivity/sensitivity.png

Budgets and rho are read from each record's own settings, never from its variant label. For
Fine-mixing with ``select_rho`` the cell also names the rho that D_c^val chose in each seed.
``--plot`` draws CAcc and ASR against the budget, one line per setting, with ±1 std error bars.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from nlpbd.errors import NlpbdError
from nlpbd.results import format_cell, load_records

SWEPT = ("ft", "epur", "d3", "finemix")
POINT_COLUMNS = ["setting", "budget", "seed", "n_c", "cacc", "asr", "chosen_rho", "seconds"]


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
            "seed": cell.get("seed", 0), "n_c": record["budget"]["n_c"], "cacc": metrics["cacc"],
            "asr": metrics["asr"], "chosen_rho": chosen, "seconds": record["timings"]["defense_fit"]["seconds"]}


def sensitivity_frame(records: list[dict], attack: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The swept cells of ``attack`` (one row per seed) and the undefended victims' metrics per seed."""
    ok = [r for r in records if r["status"] == "ok" and r["cell"]["attack"] == attack]
    victims = pd.DataFrame([{"seed": r["cell"].get("seed", 0), "cacc": r["metrics"]["cacc"],
                             "asr": r["metrics"]["asr"]} for r in ok if r["cell"]["defense"] == "none"],
                           columns=["seed", "cacc", "asr"])
    frame = pd.DataFrame([point(r) for r in ok if r["cell"]["defense"] in SWEPT], columns=POINT_COLUMNS)
    for what, data, key in (("setting and budget", frame, ["setting", "budget", "seed"]),
                            ("undefended victim", victims, ["seed"])):
        duplicated = data.duplicated(key, keep=False)
        if duplicated.any():
            raise SystemExit(f"error: two records for the same {what} and seed: "
                             f"{data[duplicated][key].values.tolist()}")
    return frame, victims


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std and seed count of CAcc / ASR per (setting, budget); the chosen rho of each seed."""
    grouped = frame.sort_values("seed").groupby(["setting", "budget"])
    summary = grouped.agg(n_c=("n_c", "first"), seeds=("seed", "count"), cacc=("cacc", "mean"),
                          cacc_std=("cacc", "std"), asr=("asr", "mean"), asr_std=("asr", "std"))
    summary["chosen_rho"] = grouped["chosen_rho"].agg(lambda s: [v for v in s if pd.notna(v)])
    return summary.reset_index()


def cell_text(row: pd.Series, full: int) -> str:
    cacc, asr = (format_cell(row[m], row[f"{m}_std"], row.seeds, m) for m in ("cacc", "asr"))
    text = f"{cacc} / {asr}"
    if row.chosen_rho:
        text += f" (rho {', '.join(f'{v:g}' for v in row.chosen_rho)})"
    return text + (f" [{row.seeds} of {full} seeds]" if row.seeds < full else "")


def setting_order(settings) -> list[str]:
    return sorted(settings, key=lambda s: (SWEPT.index(s.split()[0]), s))


def to_markdown(summary: pd.DataFrame, victims: pd.DataFrame) -> str:
    """Rows: settings; columns: budgets (with the size of D_c); cells: CAcc / ASR, mean ± std over seeds."""
    budgets = sorted(summary["budget"].unique())
    sizes = summary.groupby("budget")["n_c"].first()
    full = int(summary["seeds"].max())
    header = ["setting"] + [f"{b:.0%} of train ({sizes[b]:,} rows)" for b in budgets]
    lines = [header, ["---"] + ["---:"] * len(budgets)]
    if not victims.empty:
        n = len(victims)
        text = (f"{format_cell(victims.cacc.mean(), victims.cacc.std(), n, 'cacc')} / "
                f"{format_cell(victims.asr.mean(), victims.asr.std(), n, 'asr')}")
        lines.append(["none (victim)"] + [text] * len(budgets))
    for setting in setting_order(summary["setting"].unique()):
        rows = summary[summary["setting"] == setting].set_index("budget")
        lines.append([setting] + [cell_text(rows.loc[b], full) if b in rows.index else "—" for b in budgets])
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


def plot(summary: pd.DataFrame, victims: pd.DataFrame, attack: str, path: Path) -> None:
    """CAcc and ASR against the clean budget, one line per setting, ±1 sample std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for axis, metric in zip(axes, ("cacc", "asr")):
        for setting in setting_order(summary["setting"].unique()):
            rows = summary[summary["setting"] == setting].sort_values("budget")
            axis.errorbar(rows["budget"] * 100, rows[metric], yerr=rows[f"{metric}_std"].fillna(0.0),
                          marker="o", capsize=3, label=setting)
        if not victims.empty:
            axis.axhline(victims[metric].mean(), color="grey", linestyle="--", label="none (victim)")
        axis.set_xscale("log")
        budgets = sorted(summary["budget"].unique() * 100)
        axis.set_xticks(budgets, [f"{b:g}%" for b in budgets])
        axis.minorticks_off()
        axis.set_xlabel("clean budget D_c (% of the training split)")
        axis.set_ylabel(metric.upper() if metric == "asr" else "CAcc")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{attack}: mean ± sample std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dirs", nargs="+", type=Path, help="directories holding records/")
    parser.add_argument("--attack", default="badnet", help="attack whose cells are tabulated")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    parser.add_argument("--plot", type=Path, help="also draw CAcc / ASR against the budget (PNG) here")
    args = parser.parse_args(argv)
    try:
        records = [r for directory in args.results_dirs for r in load_records(directory)]
    except NlpbdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    frame, victims = sensitivity_frame(records, args.attack)
    if frame.empty:
        print(f"error: no finished {', '.join(SWEPT)} cells of attack '{args.attack}' in "
              f"{', '.join(map(str, args.results_dirs))}", file=sys.stderr)
        return 1
    summary = summarise(frame)
    text = to_markdown(summary, victims)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    if args.plot:
        plot(summary, victims, args.attack, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
