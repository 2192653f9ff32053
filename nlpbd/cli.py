"""The ``nlpbd`` command line: run cells, render tables, list what is registered.

Exit codes: 0 ok, 1 a run failed, 2 bad input (one ``error:`` line on stderr, never a traceback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from nlpbd import __version__
from nlpbd.errors import InputError, NlpbdError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="nlpbd: compare textual backdoor defenses under identical conditions.")
out = Console()
err = Console(stderr=True, soft_wrap=True)


class TableFormat(str, Enum):
    rich = "rich"
    csv = "csv"
    md = "md"
    latex = "latex"
    json = "json"


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
            yield lambda n=1: progress.advance(task_id, n)


def configure_logging(quiet: bool, verbose: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)],
                        force=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Map nlpbd's errors to one stderr line and the documented exit codes."""
    try:
        yield
    except InputError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
        raise typer.Exit(2) from None
    except NlpbdError as exc:
        err.print(f"[bold red]run failed:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
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
    defense: str = typer.Option("none", "--defense", "-d", help="defense name (see `nlpbd ls`)"),
    dataset: str = typer.Option("sst2", "--dataset", help="registered dataset or a folder with train/dev/test files"),
    model: str = typer.Option("minilm", "--model", "-m", help="registered model, HF hub id or local model directory"),
    finetune: str = typer.Option("full", "--finetune", help="fine-tuning method of the victim"),
    seed: int = typer.Option(0, "--seed", help="cell seed (every random stream derives from it)"),
    train_size: Optional[int] = typer.Option(None, "--train-size", help="stratified train subsample for quick runs"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="benchmark data directory (default: "
                                            "$NLPBD_DATA_DIR, ./data, ./shared/data, ../shared/data)"),
    results_dir: Path = typer.Option(Path("results"), "--results-dir", help="where records are written"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="artifact cache (default: $NLPBD_CACHE "
                                             "or ~/.cache/nlpbd)"),
    sets: list[str] = typer.Option([], "--set", help="override a setting: SECTION.NAME=VALUE (repeatable)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or summary"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
) -> None:
    """Run one cell (dataset × model × attack × defense × seed) and write its result record."""
    configure_logging(quiet, verbose)
    with cli_errors():
        from nlpbd import progress
        from nlpbd.cache import ArtifactCache
        from nlpbd.config import parse_set_options
        from nlpbd.pipeline import CellSpec, RunEnv, run_cell

        spec = CellSpec(attack=attack, defense=defense, dataset=dataset, model=model, finetune=finetune, seed=seed,
                        train_size=train_size, overrides=parse_set_options(sets))
        env = RunEnv(results_dir=results_dir, cache=ArtifactCache(cache_dir), data_dir=data_dir,
                     device=_device(device))
        reporter = progress.NullReporter() if quiet else RichReporter(err)
        with progress.using(reporter):
            record = run_cell(spec, env)
        if not quiet:
            out.print(_record_summary(record))
            out.print(f"record: {results_dir / 'records' / (record['cell_id'] + '.json')}", highlight=False)


def _device(name: str | None):
    import torch

    from nlpbd.training import default_device

    if name is None:
        return default_device()
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise InputError(f"--device must be cpu or cuda, got '{name}'")
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
    for column in ("CAcc", "ASR", "victim CAcc", "victim ASR", "ASR floor", "|C|", "|P|"):
        table.add_column(column, justify="right")
    table.add_row(*map(_fmt, [metrics.get("cacc"), metrics.get("asr"), metrics.get("victim_cacc"),
                              metrics.get("victim_asr"), metrics.get("asr_floor"), metrics.get("n_clean"),
                              metrics.get("n_poison")]))
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
    metrics: str = typer.Option("cacc,asr", "--metrics", help="comma-separated metrics, e.g. cacc,asr,asr_floor"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write to a file instead of stdout"),
    include_failed: bool = typer.Option(False, "--include-failed", help="also aggregate failed records"),
) -> None:
    """Render all records of a results directory: rows dataset/model/attack, columns defense × metric."""
    configure_logging(True, False)
    with cli_errors():
        from nlpbd import results

        frame = results.records_frame(results.load_records(results_dir))
        if frame.empty:
            raise InputError(f"no records in {results_dir / results.RECORDS_SUBDIR}; run `nlpbd run` first")
        if fmt is TableFormat.json:
            _emit(results.export_json(frame), output)
            return
        summary = results.summary_table(frame, [m.strip() for m in metrics.split(",") if m.strip()],
                                        include_failed=include_failed)
        if fmt is TableFormat.rich and output is None:
            out.print(results.render_rich(summary, title=f"nlpbd results: {results_dir}"))
            return
        _emit(results.export_table(summary, "md" if fmt is TableFormat.rich else fmt.value), output)


def _emit(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    from nlpbd.cache import atomic_write_text

    atomic_write_text(output, text)
    err.print(f"wrote {output}")


@app.command(name="ls")
def list_methods(
    name: Optional[str] = typer.Argument(None, help="an attack or defense name: list its settings"),
) -> None:
    """List attacks, defenses, datasets and models, or the settings of one attack or defense."""
    configure_logging(True, False)
    with cli_errors():
        if name:
            out.print(_settings_table(name))
            return
        for title, rows in _catalogue():
            table = Table(title=title, show_header=False, title_justify="left")
            table.add_column("name", style="bold")
            table.add_column("description")
            for row in rows:
                table.add_row(*row)
            out.print(table)


def _catalogue() -> list[tuple[str, list[tuple[str, str]]]]:
    from nlpbd.data import DATASETS
    from nlpbd.methods import ATTACKS, DEFENSES
    from nlpbd.models import MODELS

    return [
        ("attacks", [(n, f"[{c.threat_model.value}] {c.description}") for n, c in ATTACKS.items()]),
        ("defenses", [(n, f"[{c.stage.value}] {c.description}") for n, c in DEFENSES.items()]),
        ("datasets", [(n, s.description) for n, s in DATASETS.items()]),
        ("models", [(n, s.description) for n, s in MODELS.items()]),
    ]


def _settings_table(name: str) -> Table:
    import typing

    from nlpbd.methods import ATTACKS, DEFENSES
    from nlpbd.registry import unknown_name_message

    if name in ATTACKS:
        cls, section = ATTACKS.get(name), "attack"
    elif name in DEFENSES:
        cls, section = DEFENSES.get(name), "defense"
    else:
        raise InputError(unknown_name_message("attack or defense", name, ATTACKS.names() + DEFENSES.names()))
    table = Table(title=f"{name}: {cls.description}  (set with --set {section}.NAME=VALUE)", title_justify="left")
    table.add_column("setting", no_wrap=True, style="bold")
    for column in ("type", "default", "help"):
        table.add_column(column)
    hints = typing.get_type_hints(cls.Config)
    for f in dataclasses.fields(cls.Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        table.add_row(f"{section}.{f.name}", _type_name(hints[f.name]), str(default), f.metadata.get("help", ""))
    return table


def _type_name(tp: object) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
