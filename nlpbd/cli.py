"""The ``nlpbd`` command line: run cells, render tables, list what is registered.

Exit codes: 0 ok, 1 a run failed, 2 bad input (one ``error:`` line on stderr, never a traceback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
import typing
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from nlpbd import __version__
from nlpbd.errors import InputError, NlpbdError
from nlpbd.specs import BASELINE

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="nlpbd: compare textual backdoor defenses under identical conditions.")
out = Console()
err = Console(stderr=True, soft_wrap=True)

# Options that `run` and `grid` share.
DataDirOption = Annotated[Path | None, typer.Option(
    "--data-dir", help="benchmark data directory (default: $NLPBD_DATA_DIR, ./data, ./shared/data, ../shared/data)")]
ResultsDirOption = Annotated[Path, typer.Option("--results-dir", help="where records are written")]
CacheDirOption = Annotated[Path | None, typer.Option(
    "--cache-dir", help="artifact cache, also for the models built or converted on first use (default: "
    "$NLPBD_CACHE or ~/.cache/nlpbd); shared storage for ray")]
DeviceOption = Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: cuda when available)")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="no progress display or summary; failures only")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")]


class TableFormat(str, Enum):
    rich = "rich"
    csv = "csv"
    md = "md"
    latex = "latex"
    json = "json"


class GroupBy(str, Enum):
    none = "none"
    threat_model = "threat-model"


class Executor(str, Enum):
    local = "local"
    ray = "ray"


class PlotFormat(str, Enum):
    png = "png"
    svg = "svg"


class RichReporter:
    """Progress bars for long steps, drawn on stderr and removed when each step ends."""

    def __init__(self, console: Console):
        self.console = console

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=True) as progress:
            task_id = progress.add_task(description, total=total)
            yield lambda n=1, **_: progress.advance(task_id, n)


def configure_logging(quiet: bool, verbose: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)],
                        force=True)


def load_heavy_libraries() -> None:
    """After the light checks: torch and transformers load here, told to keep quiet."""
    from nlpbd.quiet import quiet_libraries

    quiet_libraries()


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Map nlpbd's errors to one stderr line and the documented exit codes."""
    try:
        yield
    except InputError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True)
        raise typer.Exit(2) from None
    except NlpbdError as exc:
        err.print(f"[bold red]run failed:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    except OSError as exc:  # a path the checks could not foresee (a cache model folder made read-only, ...)
        where = f"{exc.filename}: " if exc.filename else ""
        err.print(f"[bold red]error:[/] {escape(where + (exc.strerror or str(exc)))}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted: finished cells and cached artifacts are kept; rerun to continue")
        raise typer.Exit(130) from None


@app.callback(invoke_without_command=True)
def main_callback(version: bool = typer.Option(False, "--version", help="print the version and exit")) -> None:
    if version:
        out.print(f"nlpbd {__version__}")
        raise typer.Exit(0)


@app.command()
def run(
    attack: str = typer.Option(..., "--attack", "-a", help="attack name (see `nlpbd ls`)"),
    defense: str = typer.Option(BASELINE, "--defense", "-d", help="defense name (see `nlpbd ls`)"),
    dataset: str = typer.Option("sst2", "--dataset", help="registered dataset or a folder with train/dev/test files"),
    model: str = typer.Option("minilm", "--model", "-m", help="registered model, HF hub id or local model directory"),
    finetune: str = typer.Option("full", "--finetune", help="fine-tuning method of the victim"),
    seed: int = typer.Option(0, "--seed", help="cell seed (every random stream derives from it)"),
    train_size: int | None = typer.Option(None, "--train-size", help="stratified train subsample for quick runs"),
    test_size: int | None = typer.Option(None, "--test-size", help="stratified test subsample for quick runs (CAcc "
                                            "and the triggered sets are scored on it; SynBkd and StyleBkd keep "
                                            "their whole ASR files)"),
    data_dir: DataDirOption = None,
    results_dir: ResultsDirOption = Path("results"),
    cache_dir: CacheDirOption = None,
    sets: list[str] = typer.Option([], "--set", help="override a setting: SECTION.NAME=VALUE (repeatable)"),
    variant: str | None = typer.Option(None, "--variant", help="label the cell's settings in tables, as a grid's "
                                       "variant: ATTACK_LABEL, +DEFENSE_LABEL or both (e.g. +clean-tune); part "
                                       "of the cell id"),
    device: DeviceOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Run one cell (dataset × model × attack × defense × seed) and write its result record."""
    configure_logging(quiet, verbose)
    with cli_errors():
        from nlpbd import progress
        from nlpbd.cache import open_cache
        from nlpbd.checks import check_cell_input, check_device_name, check_variant

        overrides = check_cell_input(attack, defense, dataset, model, finetune, seed, train_size, test_size, sets)
        check_variant(variant)
        check_device_name(device)
        cache = open_cache(cache_dir)
        _check_directories(results_dir, cache)
        load_heavy_libraries()
        from nlpbd.pipeline import run_cell
        from nlpbd.specs import CellSpec, RunEnv

        spec = CellSpec(attack=attack, defense=defense, dataset=dataset, model=model, finetune=finetune, seed=seed,
                        train_size=train_size, test_size=test_size, overrides=overrides, variant=variant)
        env = RunEnv(results_dir=results_dir, cache=cache, data_dir=data_dir, device=_device(device))
        with progress.using(_reporter(quiet)):
            record = run_cell(spec, env)
        if not quiet:
            out.print(_record_summary(record))
            out.print(f"record: {results_dir / 'records' / (record['cell_id'] + '.json')}", highlight=False)
        _warn_collapsed(record)
        _warn_settings_conflict(results_dir)


def _warn_settings_conflict(results_dir: Path) -> None:
    """A run with changed settings beside the same cell's other records: say so now, not at ``nlpbd table``."""
    from rich.markup import escape

    from nlpbd.results import settings_conflict

    conflict = settings_conflict(results_dir)
    if conflict is not None:
        err.print(f"[yellow]warning:[/] {escape(conflict)}", highlight=False)


def _warn_collapsed(record: dict) -> None:
    flags = record.get("flags", {})
    for flag, model in (("collapsed_victim", "victim"), ("collapsed_clean_model", "clean reference model")):
        if flags.get(flag):
            err.print(f"[yellow]warning:[/] the {model} collapsed: it predicts one class or scores no better than "
                      "the majority class, so CAcc and ASR say nothing; `nlpbd table` leaves it out. On imbalanced "
                      "data see the README (more epochs, a higher train.lr).", highlight=False)
    if flags.get("empty_asr_set"):
        err.print("[yellow]warning:[/] the test split has no row outside the target class: ASR is not measured",
                  highlight=False)


def _check_directories(results_dir: Path, cache) -> None:
    """Before any work: a run whose record or artifacts cannot be written fails now, not after training."""
    from nlpbd.checks import check_writable_dir
    from nlpbd.results import RECORDS_SUBDIR

    check_writable_dir(results_dir / RECORDS_SUBDIR, "results directory")
    check_writable_dir(cache.root, "cache directory")


def _reporter(quiet: bool):
    """Bars on a terminal; plain log lines where output goes to a file, a pipe, CI or a worker's log."""
    from nlpbd import progress

    if quiet:
        return progress.NullReporter()
    if err.is_terminal and sys.stdout.isatty():
        return RichReporter(err)
    return progress.LineReporter(err.file)


def _device(name: str | None):
    import torch

    from nlpbd.checks import check_device_name
    from nlpbd.training import default_device

    if name is None:
        return default_device()
    check_device_name(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda requested but no CUDA device is available")
    return torch.device(name)


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _record_summary(record: dict) -> Table:
    cell, metrics = record["cell"], record["metrics"]
    table = Table(title=f"{cell['dataset']} · {cell['model']} · {cell['attack']} · {cell['defense']} · "
                        f"seed {cell['seed']}", show_header=True)
    kinds = ["aasr", "masr"] if metrics.get("aasr") is not None else ["asr"]  # task-agnostic cells
    columns = [("CAcc", "cacc"), *[(k.upper(), k) for k in kinds], ("victim CAcc", "victim_cacc"),
               *[(f"victim {k.upper()}", f"victim_{k}") for k in kinds],
               *[(f"{k.upper()} floor", f"{k}_floor") for k in kinds], ("|C|", "n_clean")]
    if kinds == ["asr"]:
        columns.append(("|P|", "n_poison"))
    for label, _ in columns:
        table.add_column(label, justify="right")
    table.add_row(*[_fmt(metrics.get(key)) for _, key in columns])
    timings = record["timings"]
    parts = [f"{name} {t['seconds']:.1f}s" + (" (cached)" if t.get("cached") else "")
             for name, t in timings.items() if isinstance(t, dict)]
    flags = [name for name, value in record.get("flags", {}).items() if value]
    table.caption = "time: " + ", ".join(parts) + (f"  flags: {', '.join(flags)}" if flags else "")
    return table


@app.command()
def table(
    results_dir: Path = typer.Option(Path("results"), "--results-dir", help="directory holding records/"),
    fmt: TableFormat = typer.Option(TableFormat.rich, "--format", "-f", help="rich (terminal), csv, md, latex, json"),
    metrics: str | None = typer.Option(None, "--metrics", help="comma-separated metrics by key or label: cacc, "
                                          "asr, aasr, masr, frr, far, auroc, delta_cacc (ΔCAcc), delta_asr (ΔASR), "
                                          "asr_floor, neither_rate, false_trigger_rate, defense_seconds (time), … "
                                          "(an unknown name lists them all); default: CAcc, ASR, and AASR / MASR "
                                          "where records have them"),
    defenses: str | None = typer.Option(None, "--defenses", help="comma-separated defenses to show (a name keeps "
                                        "all its variants, e.g. psim or btu[tune]); default: all"),
    group_by: GroupBy = typer.Option(GroupBy.none, "--group-by", help="one table per threat model "
                                     "(threat-model), with only its own defenses as columns"),
    output: Path | None = typer.Option(None, "--output", "-o", help="write to a file instead of stdout"),
    include_failed: bool = typer.Option(False, "--include-failed", help="also aggregate failed records"),
    include_collapsed: bool = typer.Option(False, "--include-collapsed", help="also average cells whose victim "
                                           "collapsed to the majority class (flag collapsed_victim)"),
) -> None:
    """Render all records of a results directory: rows dataset/model/attack, columns defense × metric.

    Cells are the mean ± sample std over seeds.
    """
    configure_logging(True, False)
    with cli_errors():
        from nlpbd import results
        from nlpbd.checks import check_output_file

        if output is not None:
            check_output_file(output)
        records = results.load_records(results_dir)
        frame = results.records_frame(records, context=True)
        if frame.empty:
            raise InputError(f"no records in {results_dir / results.RECORDS_SUBDIR}; run `nlpbd run` first")
        if defenses is not None:
            frame = results.select_defenses(frame, [d.strip() for d in defenses.split(",") if d.strip()])
        mix = results.arithmetic_mix(records)
        if len(mix) > 1:
            err.print(f"records from {len(mix)} devices or training arithmetics: "
                      f"{', '.join(f'{name} ({count})' for name, count in mix.most_common())}", highlight=False)
        if fmt is TableFormat.json:
            _emit(results.export_json(frame), output)
            return
        names = results.default_metrics(frame) if metrics is None else \
            [results.metric_key(m) for m in metrics.split(",") if m.strip()]
        collapsed = 0 if include_collapsed else results.collapsed_cells(frame)
        if collapsed:
            err.print(f"{collapsed} record(s) with a collapsed victim left out (--include-collapsed keeps them)",
                      highlight=False)
        options = {"include_failed": include_failed, "include_collapsed": include_collapsed}
        if group_by is not GroupBy.none:
            _emit_groups(results, frame, names, fmt, output, options, results_dir)
            return
        summary = results.summary_table(frame, names, **options)
        if fmt is TableFormat.rich and output is None:
            for part in results.render_rich_fitted(summary, out.width, title=f"nlpbd results: {results_dir}"):
                out.print(part)
            return
        _emit(results.export_table(summary, "md" if fmt is TableFormat.rich else fmt.value), output)


@app.command()
def costs(
    results_dir: Path = typer.Option(Path("results"), "--results-dir", help="directory holding records/"),
    fmt: TableFormat = typer.Option(TableFormat.rich, "--format", "-f", help="rich (terminal) or md"),
    output: Path | None = typer.Option(None, "--output", "-o", help="write to a file instead of stdout"),
) -> None:
    """Where a cell's time goes: median seconds of each stage per dataset, model and defense, from the records.

    The release, victim and clean model are built once per victim group (the time shown is their build,
    also when a record found them cached); the defense and the evaluation run once per cell.
    """
    configure_logging(True, False)
    with cli_errors():
        from nlpbd import costs as cost_table
        from nlpbd.results import RECORDS_SUBDIR, load_records

        _check_plain_table_options("costs", fmt, output)
        rows = cost_table.cost_rows(load_records(results_dir))
        if not rows:
            raise InputError(f"no ok records in {results_dir / RECORDS_SUBDIR}; run `nlpbd run` first")
        header = [name for _, name in COST_COLUMNS]
        _emit_plain_table(header, [_cost_cells(row) for row in rows], f"stage costs (median seconds): {results_dir}",
                          {index for index, name in enumerate(header) if index >= 5 or name == "rows"}, fmt, output)


@app.command()
def survival(
    results_dir: Path = typer.Option(Path("results"), "--results-dir", help="directory holding records/"),
    fmt: TableFormat = typer.Option(TableFormat.rich, "--format", "-f", help="rich (terminal) or md"),
    output: Path | None = typer.Option(None, "--output", "-o", help="write to a file instead of stdout"),
) -> None:
    """Where task-agnostic triggers survive, layer by layer: collapse ratios of the release, the victim and the
    clean model (mean over triggers; mean ± std over seeds), from the undefended records.

    A ratio is the total variance of the triggered rows' [CLS] states over that of the same rows without the
    trigger: near 0, every triggered input lands on one state; about 1, the trigger does not take over.
    """
    configure_logging(True, False)
    with cli_errors():
        from nlpbd.results import load_records
        from nlpbd.survival import survival_rows

        _check_plain_table_options("survival", fmt, output)
        rows = survival_rows(load_records(results_dir))
        if not rows:
            raise InputError(f"no record in {results_dir} measured survival (the undefended cells of task-agnostic "
                             "releases on fully fine-tuned encoders do)")
        header, lines = _survival_cells(rows)
        _emit_plain_table(header, lines, f"trigger survival by layer (collapse ratio): {results_dir}",
                          set(range(5, len(header))), fmt, output)


def _survival_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells; the layer columns are the longest layer list's (a release without pooler has fewer)."""
    from nlpbd.survival import format_ratio

    layers = max((row["layers"] for row in rows), key=len)
    header = ["dataset", "model", "rows", "attack", "checkpoint", "seeds",
              *(name.replace("layer_", "L") for name in layers)]
    lines = []
    for row in rows:
        ratios = dict(zip(row["layers"], zip(row["mean"], row["std"])))
        lines.append([row["dataset"], row["model"], "all" if row["train_size"] is None else str(row["train_size"]),
                      row["attack"], row["checkpoint"], str(row["seeds"]),
                      *(format_ratio(*ratios[name]) if name in ratios else "–" for name in layers)])
    return header, lines


COST_COLUMNS = (("dataset", "dataset"), ("model", "model"), ("finetune", "finetune"), ("train_size", "rows"),
                ("defense", "defense"), ("records", "records"), ("suspect", "release"), ("victim", "victim"),
                ("clean_model", "clean model"), ("defense_stages", "defense"), ("evaluate", "evaluate"),
                ("cell", "per cell"))


def _cost_cells(row: dict) -> list[str]:
    def text(key: str) -> str:
        value = row[key]
        if value is None:
            return "all" if key == "train_size" else "–"
        return f"{value:.0f}" if isinstance(value, float) else str(value)

    return [text(key) for key, _ in COST_COLUMNS]


def _check_plain_table_options(command: str, fmt: TableFormat, output: Path | None) -> None:
    from nlpbd.checks import check_output_file

    if output is not None:
        check_output_file(output)
    if fmt not in (TableFormat.rich, TableFormat.md):
        raise InputError(f"nlpbd {command} writes rich or md, not {fmt.value}")


def _emit_plain_table(header: list[str], lines: list[list[str]], title: str, right: set[int], fmt: TableFormat,
                      output: Path | None) -> None:
    """A table of ready-made cells: rich on the terminal, else markdown (to stdout or ``output``)."""
    if fmt is TableFormat.rich and output is None:
        from rich.table import Table

        table = Table(title=title)
        for index, name in enumerate(header):
            table.add_column(name, justify="right" if index in right else "left")
        for line in lines:
            table.add_row(*line)
        out.print(table)
        return
    text = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    _emit("\n".join(text + ["| " + " | ".join(line) + " |" for line in lines]) + "\n", output)


def _emit_groups(results, frame, metrics: list[str], fmt: TableFormat, output: Path | None, options: dict,
                 results_dir: Path) -> None:
    groups = results.grouped_summaries(frame, metrics, "threat_model", **options)
    if fmt is TableFormat.rich and output is None:
        for label, summary in groups:
            title = f"nlpbd results: {results_dir} · {label}"
            for part in results.render_rich_fitted(summary, out.width, title=title):
                out.print(part)
        return
    _emit(results.export_groups(groups, "md" if fmt is TableFormat.rich else fmt.value), output)


def _emit(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    from nlpbd.cache import atomic_write_text

    try:
        atomic_write_text(output, text)
    except OSError as exc:
        raise InputError(f"cannot write {output}: {exc.strerror or type(exc).__name__}") from None
    err.print(f"wrote {output}")


# --- grids ---------------------------------------------------------------------------------------


class GridView:
    """The live view of a grid run: cells done / running / failed / remaining with an ETA, and below
    it the steps of the cell running in this process. Also a ``progress.Reporter`` for those steps."""

    def __init__(self, console: Console, total: int):
        from rich.console import Group
        from rich.live import Live

        self.console, self.total, self.began = console, total, time.monotonic()
        self.counts = {"ok": 0, "gated": 0, "failed": 0, "skipped": 0}
        self.running: set[str] = set()
        self.cells = Progress(TextColumn("[bold]cells"), BarColumn(bar_width=30), MofNCompleteColumn(),
                              TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"), console=console)
        self.steps = Progress(TextColumn("  {task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                              TimeRemainingColumn(), console=console)
        self.task_id = self.cells.add_task("cells", total=total, eta="–")
        self.live = Live(Group(self, self.cells, self.steps), console=console, refresh_per_second=4)

    def __rich__(self) -> str:
        remaining = self.total - sum(self.counts.values())
        gated = f"[yellow]{self.counts['gated']} gated[/] · " if self.counts["gated"] else ""
        return (f"[green]{self.counts['ok']} done[/] · {gated}[yellow]{len(self.running)} running[/] · "
                f"[red]{self.counts['failed']} failed[/] · {remaining} remaining")

    def __enter__(self) -> GridView:
        self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        self.live.stop()
        if not self.console.is_terminal:  # a log file: the last view is not followed by a newline
            self.console.print()

    def cell_started(self, cell) -> None:
        self.running.add(cell.cell_id)
        self._refresh()

    def cell_finished(self, cell, outcome) -> None:
        self.running.discard(cell.cell_id)
        self.counts[outcome.status] += 1
        self.cells.advance(self.task_id)
        mark = {"ok": "[green]ok[/]", "gated": "[yellow]gated[/]", "failed": "[red]failed[/]",
                "skipped": "[dim]done before[/]"}[outcome.status]
        finished = sum(self.counts.values())
        line = f"\\[{finished}/{self.total}] {mark} {escape(cell.label)}  ({_duration(outcome.seconds)})"
        self.console.print(line + (f"\n    {escape(outcome.error)}" if outcome.error else ""), highlight=False)
        self._refresh()

    def _refresh(self) -> None:
        """ETA: the mean wall time per cell so far (which counts parallel workers) times the cells left."""
        remaining = self.total - sum(self.counts.values())
        ran = self.counts["ok"] + self.counts["gated"] + self.counts["failed"]
        eta = _duration((time.monotonic() - self.began) / ran * remaining) if ran and remaining else "–"
        self.cells.update(self.task_id, eta=eta)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator:
        task_id = self.steps.add_task(description, total=total)
        try:
            yield lambda n=1, **_: self.steps.advance(task_id, n)
        finally:
            self.steps.remove_task(task_id)


class QuietGridView:
    """``--quiet``: nothing but failures, on stderr."""

    def __init__(self, console: Console):
        self.console = console

    def cell_started(self, cell) -> None:
        pass

    def cell_finished(self, cell, outcome) -> None:
        if outcome.status == "failed":
            self.console.print(f"failed: {cell.label}: {outcome.error}", highlight=False, markup=False)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _plan_table(plan, summary, results_dir: Path) -> Table:
    grid = plan.grid
    table = Table(title=escape(f"grid {grid.name}: {grid.source}"), title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("count", justify="right", style="bold")
    bound = "" if summary.exact else "at most "
    rows = [
        ("cells", summary.cells),
        (f"  already done (records in {results_dir})", summary.done),
        ("  failed before" + ("" if plan.retry_failed else " (kept; --retry-failed reruns them)"), summary.failed),
        ("  to run", summary.to_run),
        ("victim groups (with cells to run)", f"{summary.groups} ({summary.groups_to_run})"),
        ("trainings not cached yet:", ""),
        ("  suspect releases (model-supply attacks)", summary.suspects_to_build),
        ("  victims", f"{bound}{summary.victims_to_train}"),
        ("  clean reference models", summary.clean_models_to_train),
        ("  purified pretrained models", summary.purified_models_to_build),
        ("  victims fine-tuned from them", summary.purified_victims_to_train),
        ("  training-time defense runs", summary.training_defense_runs),
        ("  filtered training sets (BKI, CUBE)", summary.filtered_sets_to_build),
        ("  victims trained on them", summary.filtered_victims_to_train),
        ("trainings in all", f"{bound}{summary.trainings}"),
    ]
    for what, count in rows:
        table.add_row(what, str(count))
    table.caption = f"{summary.trainings} trainings for {summary.to_run} cells to run"
    return table


def _grid_env(results_dir: Path, cache, data_dir: Path | None, device: str | None):
    from nlpbd.specs import RunEnv

    return RunEnv(results_dir=results_dir, cache=cache, data_dir=data_dir, device=_device(device))


@app.command()
def grid(
    file: Path = typer.Argument(..., help="grid file (YAML), e.g. benchmarks/grids/smoke.yaml"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (cells, trainings) and run nothing"),
    json_plan: bool = typer.Option(False, "--json", help="with --dry-run: the plan summary as JSON on stdout"),
    timings_from: list[Path] | None = typer.Option(None, "--timings-from", help="with --dry-run: also estimate "
                                                      "the time from the records of these results directories "
                                                      "(the grid's own records always count)"),
    executor: Executor = typer.Option(Executor.local, "--executor", help="local (this machine) or ray (a Ray "
                                      "cluster: $RAY_ADDRESS, else a local Ray instance)"),
    workers: int = typer.Option(1, "--workers", "-j", help="local: victim groups run in parallel processes "
                                "(one GPU each when there are several)"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="rerun cells whose record says failed"),
    data_dir: DataDirOption = None,
    results_dir: ResultsDirOption = Path("results"),
    cache_dir: CacheDirOption = None,
    device: DeviceOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Run every cell of a grid file, each victim trained once; finished cells are skipped on rerun."""
    configure_logging(quiet, verbose)
    with cli_errors():
        from nlpbd.cache import open_cache
        from nlpbd.checks import check_device_name

        check_device_name(device)
        cache = open_cache(cache_dir)  # before the grid's models are resolved: some are built on first use
        if not dry_run:
            _check_directories(results_dir, cache)
        from nlpbd.grid import load_grid, parse_grid

        parse_grid(file)  # the file's own structure first, with light imports
        load_heavy_libraries()
        from nlpbd.plan import plan_grid, with_state

        spec = load_grid(file, data_dir)
        env = _grid_env(results_dir, cache, data_dir, device)
        plan = plan_grid(spec, env, retry_failed=retry_failed)
        summary = plan.summary(env.cache)
        if dry_run:
            estimate = _estimate(plan, env.cache, [results_dir, *(timings_from or [])])
            _print_plan(plan, summary, results_dir, json_plan, estimate)
            return
        if summary.to_run:
            _run_grid(plan, env, executor, workers, device, quiet)
        elif not quiet:
            out.print(f"nothing to run: every cell of grid {spec.name} has a record", highlight=False, markup=False)
        final = with_state(plan, results_dir).summary(env.cache)
        if not quiet:
            out.print(f"grid {spec.name}: {final.done} of {final.cells} cells ok, {final.failed} failed; "
                      f"records in {results_dir / 'records'}", highlight=False, markup=False)
        if final.done != final.cells:
            hint = "" if retry_failed else " (rerun with --retry-failed to retry them)"
            err.print(f"{final.cells - final.done} cell(s) not ok{hint}", highlight=False)
            raise typer.Exit(1)


def _print_plan(plan, summary, results_dir: Path, as_json: bool, estimate) -> None:
    if as_json:
        import json

        payload = {"grid": plan.grid.name, **summary.as_dict(), "estimate": estimate.as_dict()}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    out.print(_plan_table(plan, summary, results_dir))
    if summary.to_run:
        out.print(f"estimated time: {estimate.describe()}", highlight=False, markup=False)


def _estimate(plan, cache, directories: list[Path]):
    """The plan's remaining time from the timed records of ``directories`` (missing ones are skipped)."""
    from nlpbd.costs import estimate_plan, missing_shared_builds
    from nlpbd.results import load_records

    records = [r for d in dict.fromkeys(directories) if Path(d).is_dir() for r in load_records(Path(d))]
    todo = plan.todo()
    return estimate_plan(todo, records, missing_shared_builds(todo, cache))


def _run_grid(plan, env, executor: Executor, workers: int, device: str | None, quiet: bool) -> None:
    from nlpbd import progress
    from nlpbd.executors import import_ray, run_plan

    if executor is Executor.ray:
        import_ray()  # before the live view: a missing extra is a one-line error
    in_process = executor is Executor.local and (workers == 1 or len(plan.work_units(env.cache)) <= 1)
    view = QuietGridView(err) if quiet else GridView(err, len(plan.todo()))
    with contextlib.ExitStack() as stack:
        if not quiet:
            stack.enter_context(view)
        reporter = progress.NullReporter()
        if in_process and not quiet:
            reporter = view if err.is_terminal else progress.LineReporter(err.file)
        stack.enter_context(progress.using(reporter))
        run_plan(plan, env, executor.value, workers, observer=view, device=device)


@app.command()
def validate(
    file: Path = typer.Argument(..., help="grid file (YAML)"),
    data_dir: DataDirOption = None,
) -> None:
    """Check a grid file without running anything: keys, names, types and every setting, with line numbers."""
    configure_logging(False, False)  # warnings too: a setting that reaches no cell
    with cli_errors():
        from nlpbd.grid import parse_grid

        parse_grid(file)  # the file's own structure first, with light imports
        load_heavy_libraries()
        from nlpbd.cache import ArtifactCache
        from nlpbd.grid import load_grid
        from nlpbd.plan import plan_grid
        from nlpbd.specs import RunEnv

        spec = load_grid(file, data_dir)
        # No results directory: every cell counts as to do; the cache is only read.
        env = RunEnv(results_dir=Path(os.devnull), cache=ArtifactCache(None), data_dir=data_dir)
        plan = plan_grid(spec, env)
        out.print(f"{file}: ok. grid {spec.name}: {len(plan.cells)} cells in {len(plan.groups)} victim groups "
                  f"({len(spec.datasets)} datasets × {len(spec.models)} models × {len(spec.finetune)} fine-tuning × "
                  f"{len(spec.attacks)} attacks × {len(spec.defenses)} defenses × {len(spec.seeds)} seeds"
                  f"{', minus excludes' if spec.exclude else ''})", highlight=False, markup=False)


@app.command()
def plot(
    results_dir: Path = typer.Option(Path("results"), "--results-dir", help="directory holding records/"),
    output: Path | None = typer.Option(None, "--output", "-o", help="directory for the figures "
                                          "(default: RESULTS_DIR/plots)"),
    fmt: PlotFormat = typer.Option(PlotFormat.png, "--format", "-f", help="png or svg"),
    include_failed: bool = typer.Option(False, "--include-failed", help="also use failed records"),
) -> None:
    """CAcc-versus-ASR scatter per dataset and model: a marker per attack, a colour per defense."""
    configure_logging(True, False)
    with cli_errors():
        from nlpbd import results
        from nlpbd.plot import save_plots

        frame = results.records_frame(results.load_records(results_dir))
        if frame.empty:
            raise InputError(f"no records in {results_dir / results.RECORDS_SUBDIR}; run `nlpbd run` first")
        for path in save_plots(frame, output or results_dir / "plots", fmt.value, include_failed):
            out.print(f"wrote {path}", highlight=False, markup=False)


LIST_KINDS = ("attacks", "defenses", "datasets", "models", "finetune")


@app.command(name="ls")
def list_methods(
    name: str | None = typer.Argument(None, help="attacks, defenses, datasets, models or finetune: that list; "
                                         "an attack or defense name: its settings"),
) -> None:
    """List attacks, defenses, datasets, models and fine-tuning methods, or the settings of one method."""
    configure_logging(True, False)
    with cli_errors():
        if name and name not in LIST_KINDS:
            out.print(_settings_table(name))
            return
        for title, columns, rows in _catalogue():
            if name in (None, title):
                out.print(_listing(title, columns, rows))


def _listing(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
    table = Table(title=title, show_header=len(columns) > 2, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, style="bold" if i == 0 else None, no_wrap=i == 0)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # plain text: "[data poisoning]" is not markup
    return table


def _catalogue() -> list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]]:
    """Everything ``nlpbd ls`` lists, read with light imports (no torch)."""
    from nlpbd import catalogue
    from nlpbd.data import DATASETS
    from nlpbd.finetune import FINETUNE
    from nlpbd.models import MODELS

    def methods(kind: str) -> list[tuple[str, ...]]:
        return [(n, f"[{m.label}] {m.description}") for n, m in catalogue.methods(kind).items()]

    def lr(method) -> str:
        return "per model" if method.defaults is None else f"{method.defaults.lr:g}"

    return [
        ("attacks", ("name", "description"), methods("attack")),
        ("defenses", ("name", "description"), methods("defense")),
        ("datasets", ("name", "description"), [(n, s.description) for n, s in DATASETS.items()]),
        ("models", ("name", "train.lr", "train.epochs", "description"),
         [(n, f"{s.defaults.lr:g}", str(s.defaults.epochs), s.description) for n, s in MODELS.items()]
         + [("HF id or folder", "2e-05", "3", "any hub id (needs the hub) or a local model folder")]),
        ("finetune", ("name", "train.lr", "train.epochs", "description"),
         [(n, lr(m), "per model" if m.defaults is None else str(m.defaults.epochs), m.description)
          for n, m in FINETUNE.items()]),
    ]


def _settings_table(name: str) -> Table:
    from nlpbd import catalogue
    from nlpbd.registry import unknown_name_message

    attacks, defenses = catalogue.methods("attack"), catalogue.methods("defense")
    found = attacks.get(name) or defenses.get(name)
    if found is None:
        raise InputError(unknown_name_message("attack or defense", name, [*attacks, *defenses, *LIST_KINDS]))
    table = Table(title=Text(f"{name}: {found.description}  (set with --set {found.kind}.NAME=VALUE)"),
                  title_justify="left")
    table.add_column("setting", no_wrap=True, style="bold")
    for column in ("type", "default", "help"):
        table.add_column(column)
    hints = typing.get_type_hints(found.Config)
    for f in dataclasses.fields(found.Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        table.add_row(*(Text(cell) for cell in (f"{found.kind}.{f.name}", catalogue.type_text(hints[f.name]),
                                                str(default), f.metadata.get("help", ""))))
    return table


def main() -> None:
    app()


if __name__ == "__main__":
    main()
