"""Running a grid plan: in this process, in local worker processes, or as Ray tasks.

The unit of work is a victim group (``nlpbd.plan.VictimGroup``): its cells run one after another
in one process, so the first cell trains the victim and the others load it from the cache; a group
whose victim is cached already is split into one unit per cell (``Plan.work_units``). Units
are independent and run in parallel across processes (``local`` with ``workers > 1``: a spawn
``ProcessPoolExecutor``, one GPU per worker when there are several) or across a Ray cluster (one
task per unit asking for a GPU, or a CPU on CPU-only clusters; cache and results on shared storage).

Crash safety comes from the files, not from this module: a record is renamed into place only when
complete and cached artifacts likewise, so after ``kill -9`` the same command re-plans, skips every
cell whose record says ok, and rebuilds only what was in flight. A cell that fails has its error in
its record (written by ``run_cell``); the grid goes on.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import logging
import multiprocessing
import os
import queue as queue_module
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from nlpbd.errors import InputError
from nlpbd.plan import Plan, PlannedCell, record_state
from nlpbd.quiet import quiet_libraries
from nlpbd.results import RECORDS_SUBDIR

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class EnvSpec:
    """What a worker needs to rebuild the run environment: plain absolute paths (shared storage)."""

    results_dir: str
    cache_root: str
    data_dir: str | None = None
    device: str | None = None  # None: CUDA when available, else CPU

    def build(self):
        import torch

        from nlpbd.cache import open_cache
        from nlpbd.specs import RunEnv
        from nlpbd.training import default_device

        device = torch.device(self.device) if self.device else default_device()
        return RunEnv(results_dir=Path(self.results_dir), cache=open_cache(Path(self.cache_root)),
                      data_dir=self.data_dir, device=device)


@dataclass(frozen=True)
class CellOutcome:
    cell_id: str
    status: Literal["ok", "gated", "failed", "skipped"]  # gated: reported, not defended (sanity gate);
    # skipped: found done when its turn came
    seconds: float = 0.0
    error: str | None = None


class GridObserver(Protocol):
    """How a run reports; the CLI renders it. Called from the main thread only."""

    def cell_started(self, cell: PlannedCell) -> None: ...

    def cell_finished(self, cell: PlannedCell, outcome: CellOutcome) -> None: ...


class NullObserver:
    def cell_started(self, cell: PlannedCell) -> None:
        pass

    def cell_finished(self, cell: PlannedCell, outcome: CellOutcome) -> None:
        pass


@dataclass
class GridRun:
    """What one ``run_plan`` call did."""

    outcomes: list[CellOutcome] = field(default_factory=list)
    seconds: float = 0.0


# --- one group, wherever it runs -------------------------------------------------------------------

Emit = Callable[[str, object], None]


def _remove_stale_temp_records(results_dir: Path, cell_id: str) -> None:
    """A temp record of this cell can only be left by a writer that was killed: this cell is ours now."""
    for path in (Path(results_dir) / RECORDS_SUBDIR).glob(f".{cell_id}.*.tmp"):
        path.unlink(missing_ok=True)


def run_one(spec, cell_id: str, env, retry_failed: bool) -> CellOutcome:
    """One cell; never raises except on interrupt. A cell found done (another run finished it) is skipped."""
    from nlpbd.pipeline import run_cell

    state, _ = record_state(env.results_dir, cell_id)
    if state == "done" or (state == "failed" and not retry_failed):
        return CellOutcome(cell_id, "skipped")
    _remove_stale_temp_records(env.results_dir, cell_id)
    began = time.perf_counter()
    try:
        record = run_cell(spec, env)
    except Exception as exc:  # every failure is this cell's alone; the grid goes on
        log.debug("cell %s failed", cell_id, exc_info=True)
        return CellOutcome(cell_id, "failed", time.perf_counter() - began, str(exc) or type(exc).__name__)
    if record["cell_id"] != cell_id:
        log.warning("cell id changed between planning and running: %s -> %s", cell_id, record["cell_id"])
    status = "gated" if record.get("status") == "gated" else "ok"
    return CellOutcome(cell_id, status, time.perf_counter() - began, record.get("error") if status == "gated" else None)


def run_group(items: list[tuple], env, retry_failed: bool, emit: Emit) -> list[CellOutcome]:
    """``items`` are (spec, cell_id) of one unit (a victim group, or one cell of a cached victim's group),
    run in order so a victim is trained once."""
    outcomes = []
    for spec, cell_id in items:
        emit("started", cell_id)
        outcome = run_one(spec, cell_id, env, retry_failed)
        emit("finished", outcome)
        outcomes.append(outcome)
    return outcomes


def _payload(unit: list[PlannedCell]) -> list[tuple]:
    return [(c.spec, c.cell_id) for c in unit]


# --- in this process --------------------------------------------------------------------------------


def _run_inline(units: list[list[PlannedCell]], plan: Plan, env, observer: GridObserver, run: GridRun) -> None:
    by_id = {c.cell_id: c for c in plan.cells}

    def emit(kind: str, payload) -> None:
        _dispatch(kind, payload, by_id, observer, run)

    for unit in units:
        run_group(_payload(unit), env, plan.retry_failed, emit)


def _dispatch(kind: str, payload, by_id: dict[str, PlannedCell], observer: GridObserver, run: GridRun) -> None:
    if kind == "started":
        observer.cell_started(by_id[payload])
    else:
        run.outcomes.append(payload)
        observer.cell_finished(by_id[payload.cell_id], payload)


# --- local worker processes ------------------------------------------------------------------------

_worker_events = None  # set in each worker by _init_worker
_worker_share: CoreShare | None = None


class CoreShare:
    """A progress reporter for pool workers that keeps each busy worker at its share of the CPU cores.

    A worker pinned to ``cores // workers`` threads for its whole life would crawl on through a long
    unit (a 1,000-step pre-training) on one core after the other workers ran out of work. Every
    training step reports progress, so there, at most every ``every`` seconds, the worker sets its
    thread count to ``cores // busy workers``: intra-op threads can only be changed from the thread
    that runs the ops. Thread counts change reduction order, so results match a serial run to float
    tolerance, not bit for bit (as with any thread count).
    """

    def __init__(self, busy, cores: int, every: float = 5.0):
        self.busy, self.cores, self.every = busy, cores, every
        self._next_check = 0.0

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        yield self._advance

    def _advance(self, n: int = 1, **_: object) -> None:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.every
            self.rebalance()

    def rebalance(self) -> None:
        import torch

        share = max(1, self.cores // max(1, self.busy.value))
        if torch.get_num_threads() != share:
            torch.set_num_threads(share)


def _init_worker(events, counter, busy, gpus: list[str]) -> None:
    """Runs once per worker process, before torch is imported there: pin a GPU; threads follow ``busy``."""
    global _worker_events, _worker_share
    _worker_events = events
    _worker_share = CoreShare(busy, cpu_count())
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    quiet_libraries()


def _worker_group(items: list[tuple], env_spec: EnvSpec, retry_failed: bool) -> list[CellOutcome]:
    from nlpbd import progress

    def emit(kind: str, payload) -> None:
        _worker_events.put((kind, payload))

    with _busy(_worker_share.busy), progress.using(_worker_share):
        _worker_share.rebalance()
        return run_group(items, env_spec.build(), retry_failed, emit)


@contextlib.contextmanager
def _busy(counter) -> Iterator[None]:
    with counter.get_lock():
        counter.value += 1
    try:
        yield
    finally:
        with counter.get_lock():
            counter.value -= 1


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable CUDA runtime: CPU only
        return []


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _own_gpu(env_spec: EnvSpec) -> EnvSpec:
    """A worker that sees only its own GPU: any ``cuda:N`` becomes ``cuda``."""
    if env_spec.device and env_spec.device.startswith("cuda"):
        return EnvSpec(env_spec.results_dir, env_spec.cache_root, env_spec.data_dir, "cuda")
    return env_spec


def _run_pool(units: list[list[PlannedCell]], plan: Plan, env_spec: EnvSpec, workers: int, observer: GridObserver,
              run: GridRun) -> None:
    context = multiprocessing.get_context("spawn")
    events, counter, busy = context.Queue(), context.Value("i", 0), context.Value("i", 0)
    gpus = visible_gpus() if (env_spec.device or "cuda").startswith("cuda") else []
    gpus = gpus if len(gpus) > 1 else []
    env_spec = _own_gpu(env_spec) if gpus else env_spec
    by_id = {c.cell_id: c for c in plan.cells}
    with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                     initargs=(events, counter, busy, gpus)) as pool:
        pending = {pool.submit(_worker_group, _payload(unit), env_spec, plan.retry_failed): unit for unit in units}
        try:
            _drain_until_done(pending, events, by_id, observer, run)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _drain_until_done(pending: dict, events, by_id: dict, observer: GridObserver, run: GridRun) -> None:
    """Relay worker events to the observer until every unit's future has finished."""
    while pending:
        _drain(events, by_id, observer, run, timeout=0.2)
        for future in [f for f in pending if f.done()]:
            unit = pending.pop(future)
            _drain(events, by_id, observer, run, timeout=0)
            try:
                future.result()
            except Exception as exc:  # the worker process died (killed, out of memory)
                _fail_unfinished(unit, run, by_id, observer, f"worker process died: {exc or type(exc).__name__}")


def _drain(events, by_id: dict, observer: GridObserver, run: GridRun, timeout: float) -> None:
    while True:
        try:
            kind, payload = events.get(timeout=timeout) if timeout else events.get_nowait()
        except queue_module.Empty:
            return
        _dispatch(kind, payload, by_id, observer, run)
        timeout = 0


def _fail_unfinished(unit: list[PlannedCell], run: GridRun, by_id: dict, observer: GridObserver, error: str) -> None:
    """Cells of a unit whose process died before reporting them; they have no record (or an old one)."""
    finished = {o.cell_id for o in run.outcomes}
    for cell in unit:
        if cell.cell_id not in finished:
            _dispatch("finished", CellOutcome(cell.cell_id, "failed", 0.0, error), by_id, observer, run)


# --- Ray -------------------------------------------------------------------------------------------


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError("--executor ray needs Ray: pip install 'nlpbd[ray]'") from None
    return ray


def _ray_group(items: list[tuple], env_spec: EnvSpec, retry_failed: bool, events) -> list[CellOutcome]:
    """The body of one Ray task: the unit's cells in order, events through a Ray queue."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    quiet_libraries()
    env_spec = _own_gpu(env_spec) if ray.get_gpu_ids() else env_spec

    def emit(kind: str, payload) -> None:
        events.put((kind, payload))

    return run_group(items, env_spec.build(), retry_failed, emit)


def _run_ray(units: list[list[PlannedCell]], plan: Plan, env_spec: EnvSpec, observer: GridObserver,
             run: GridRun) -> None:
    ray = import_ray()
    from ray.util.queue import Queue

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False, logging_level=logging.WARNING)
    try:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1 and env_spec.device != "cpu"
        task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1, max_retries=1)(_ray_group)
        events = Queue()
        by_id = {c.cell_id: c for c in plan.cells}
        pending = {task.remote(_payload(unit), env_spec, plan.retry_failed, events): unit for unit in units}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.2)
            _drain_ray(events, by_id, observer, run)
            for ref in done:
                unit = pending.pop(ref)
                try:
                    ray.get(ref)
                except Exception as exc:  # the task's process or node died
                    _drain_ray(events, by_id, observer, run)
                    _fail_unfinished(unit, run, by_id, observer, f"ray task failed: {str(exc).splitlines()[0]}")
        _drain_ray(events, by_id, observer, run)
    finally:
        if started_here:
            ray.shutdown()


def _drain_ray(events, by_id: dict, observer: GridObserver, run: GridRun) -> None:
    while not events.empty():
        for kind, payload in events.get_nowait_batch(events.qsize()):
            _dispatch(kind, payload, by_id, observer, run)


# --- entry point -----------------------------------------------------------------------------------


def env_spec_of(env, device: str | None) -> EnvSpec:
    """Absolute paths for workers that may run elsewhere; the data directory resolved here, once."""
    from nlpbd.data import resolve_data_dir

    data_dir = resolve_data_dir(env.data_dir)
    return EnvSpec(str(Path(env.results_dir).resolve()), str(Path(env.cache.root).resolve()),
                   str(data_dir) if data_dir else None, device)


def run_plan(plan: Plan, env, executor: str = "local", workers: int = 1, observer: GridObserver | None = None,
             device: str | None = None) -> GridRun:
    """Run every cell the plan has to do; returns the outcomes (records are on disk)."""
    if executor not in EXECUTORS:
        raise InputError(f"unknown executor '{executor}'. Valid: {', '.join(EXECUTORS)}")
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    observer = observer or NullObserver()
    run, began = GridRun(), time.perf_counter()
    env_spec, units = env_spec_of(env, device), plan.work_units(env.cache)
    if executor == "ray":
        _run_ray(units, plan, env_spec, observer, run)
    elif workers == 1 or len(units) <= 1:
        _run_inline(units, plan, env, observer, run)
    else:
        _run_pool(units, plan, env_spec, min(workers, len(units)), observer, run)
    run.seconds = time.perf_counter() - began
    return run

