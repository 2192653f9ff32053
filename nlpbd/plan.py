"""The plan of a grid: every cell's id and cache keys, its state on disk, cells grouped by victim.

Planning groups cells by the victim they train on, and counts what has to be trained: the cache keys
of the suspect release (model-supply attacks), the victim, the clean reference model, and for
pre-fine-tuning defenses the purified model and the victim fine-tuned from it, all computed from the
pipeline's own payload functions, so planning builds nothing. Post-training and inference-time defenses
and BTU-like training defenses only reuse their group's victim (BTU adds its exposure runs); a purifying
defense's cell also needs the standard victim (for the undefended numbers), so it stays in that group and
its two extra models are counted on their own. Executors (:mod:`nlpbd.executors`) run the plan's units.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from nlpbd.cache import ArtifactCache, canonical_json, content_key
from nlpbd.config import to_dict
from nlpbd.data import DatasetLoader, load_dataset, loading_once
from nlpbd.errors import InputError, NlpbdError
from nlpbd.grid import Grid, GridCell, expand
from nlpbd.methods import ModelSupplyAttack
from nlpbd.pipeline import (
    Cell,
    artifact_identity,
    clean_data_key,
    filter_payload,
    poison_payload,
    prepare_cell,
    purified_payload,
    supply_context,
    suspect_payload,
    victim_payload,
)
from nlpbd.results import RECORDS_SUBDIR
from nlpbd.specs import CellSpec, RunEnv, Stage

log = logging.getLogger(__name__)

CellState = Literal["done", "failed", "pending"]
# A gated cell (a task-agnostic release below the sanity gate, pipeline._sanity_gate) is complete: it is
# reported, not defended, and a rerun would gate it again.
DONE_STATUSES = ("ok", "gated")


@dataclass(frozen=True)
class Builds:
    """The cached artifacts a cell needs, with the keys the pipeline gives them (None: not needed)."""

    suspect: str | None = None  # a model-supply attack's release
    victim: str | None = None  # the standard victim: it groups cells
    clean: str | None = None  # the clean reference model (eval.floor)
    purified: str | None = None  # a pretrained-stage defense's purified start ...
    defended: str | None = None  # ... and the victim fine-tuned from it (or from a filter's kept rows)
    filtered: str | None = None  # a training-data filter's kept rows (BKI, CUBE)
    exact: bool = True  # False: a key could not be computed up front (counts become upper bounds)


@dataclass
class PlannedCell:
    cell: GridCell
    cell_id: str
    group: str
    stage: str  # the defense's Stage name: PRETRAINED, TRAINING, POST, INFERENCE
    builds: Builds
    state: CellState = "pending"
    error: str | None = None

    @property
    def spec(self) -> CellSpec:
        return self.cell.spec

    @property
    def label(self) -> str:
        return self.cell.label


@dataclass
class VictimGroup:
    """Cells that share one victim; they run in order in one process, the first one training it."""

    key: str
    cells: list[PlannedCell]

    def todo(self, retry_failed: bool) -> list[PlannedCell]:
        return [c for c in self.cells if c.state == "pending" or (retry_failed and c.state == "failed")]


@dataclass(frozen=True)
class PlanSummary:
    cells: int
    done: int
    failed: int
    to_run: int
    groups: int
    groups_to_run: int
    suspects_to_build: int
    victims_to_train: int
    clean_models_to_train: int
    purified_models_to_build: int
    purified_victims_to_train: int
    training_defense_runs: int  # e.g. BTU's exposure runs (not cached: one per cell)
    exact: bool  # False: some keys were unknown before running; the counts are upper bounds
    filtered_sets_to_build: int = 0  # training-data filters' kept rows (BKI, CUBE) ...
    filtered_victims_to_train: int = 0  # ... and the victims trained on them

    @property
    def trainings(self) -> int:
        return (self.suspects_to_build + self.victims_to_train + self.clean_models_to_train
                + self.purified_models_to_build + self.purified_victims_to_train + self.training_defense_runs
                + self.filtered_sets_to_build + self.filtered_victims_to_train)

    def as_dict(self) -> dict:
        return {**self.__dict__, "trainings": self.trainings}


# Which cache kind each build lives under (clean and purified victims are victims).
BUILD_KINDS = {"suspect": "suspect", "victim": "victim", "clean": "victim", "purified": "purified",
               "defended": "victim", "filtered": "filtered"}


@dataclass
class Plan:
    grid: Grid
    cells: list[PlannedCell]
    groups: list[VictimGroup]
    retry_failed: bool = False

    def todo_groups(self) -> list[VictimGroup]:
        return [g for g in self.groups if g.todo(self.retry_failed)]

    def todo(self) -> list[PlannedCell]:
        return [c for g in self.groups for c in g.todo(self.retry_failed)]

    def work_units(self, cache: ArtifactCache) -> list[list[PlannedCell]]:
        """What executors hand out, in plan order, each unit's cells run in order in one process.

        A group whose victim (or clean reference model) is still to be trained is one unit, so it is
        trained once. Once both are cached the group's cells share nothing that needs training, so
        each is a unit of its own and they spread over the workers: a sweep of post-training
        defenses on one victim runs in parallel.
        """
        units: list[list[PlannedCell]] = []
        for group in self.todo_groups():
            todo = group.todo(self.retry_failed)
            if all(_shared_builds_cached(c, cache) for c in todo):
                units.extend([c] for c in todo)
            else:
                units.append(todo)
        return units

    def summary(self, cache: ArtifactCache) -> PlanSummary:
        todo = self.todo()

        def missing(build: str, stage: str | None = None) -> int:
            keys = {getattr(c.builds, build) if c.builds.exact else c.group for c in todo
                    if (stage is None or c.stage == stage)
                    and (getattr(c.builds, build) or (not c.builds.exact and build == "victim"))}
            return sum(1 for key in keys if cache.lookup(BUILD_KINDS[build], key) is None)

        return PlanSummary(
            cells=len(self.cells), done=sum(c.state == "done" for c in self.cells),
            failed=sum(c.state == "failed" for c in self.cells), to_run=len(todo), groups=len(self.groups),
            groups_to_run=len(self.todo_groups()), suspects_to_build=missing("suspect"),
            victims_to_train=missing("victim"), clean_models_to_train=missing("clean"),
            purified_models_to_build=missing("purified"), purified_victims_to_train=missing("defended", "PRETRAINED"),
            training_defense_runs=sum(c.stage == "TRAINING" for c in todo), exact=all(c.builds.exact for c in todo),
            filtered_sets_to_build=missing("filtered"), filtered_victims_to_train=missing("defended", "FILTER"))


def _shared_builds_cached(cell: PlannedCell, cache: ArtifactCache) -> bool:
    """Whether the models a cell shares with its group (its victim, the clean one) are cached."""
    builds = cell.builds
    return (builds.exact and builds.victim is not None
            and all(cache.lookup("victim", key) is not None for key in (builds.victim, builds.clean) if key))


def _suspect_key(cell: Cell, env: RunEnv, fingerprint: str, memo: dict) -> str | None:
    """The release's key (None for data attacks); its payload hashes proxy files: once per release."""
    if not isinstance(cell.attack, ModelSupplyAttack):
        return None
    key = canonical_json([cell.model.identity, cell.attack.cache_payload(), cell.spec.seed, fingerprint,
                          str(env.device)])
    if key not in memo:
        memo[key] = content_key(suspect_payload(cell, supply_context(cell, env)))
    return memo[key]


def cell_builds(cell: Cell, env: RunEnv, fingerprint: str, memo: dict) -> Builds:
    """Every key a cell's stages will use, from the pipeline's own payload functions; nothing is built.

    A test checks all keys against real records.
    """
    def victim(start: str, data_key: str) -> str:
        return content_key(victim_payload(cell, start, data_key))

    try:
        suspect = _suspect_key(cell, env, fingerprint, memo)
    except (NlpbdError, OSError) as exc:  # e.g. a proxy file missing: the cell will fail and say so
        log.debug("no release key for %s: %s", cell.cell_id, exc)
        return Builds(exact=False)
    start = artifact_identity(suspect) if suspect else cell.model.identity
    poison = content_key(poison_payload(cell))
    clean = victim(cell.model.identity, clean_data_key(cell)) if cell.eval.floor else None
    purified = defended = filtered = None
    if cell.defense.stage is Stage.PRETRAINED:
        purified = content_key(purified_payload(cell, start))
        defended = victim(artifact_identity(purified), poison)
    standard = victim(start, poison)
    if cell.defense.stage is Stage.FILTER:
        filtered = content_key(filter_payload(cell, poison, standard))
        defended = victim(start, filtered)
    return Builds(suspect, standard, clean, purified, defended, filtered)


def _group_key(cell: Cell, builds: Builds) -> str:
    """The victim's key; without one, everything the victim depends on."""
    return builds.victim or content_key({"dataset": cell.dataset.name, "model": cell.model.identity,
                                         "finetune": cell.spec.finetune, "attack": cell.attack.cache_payload(),
                                         "seed": cell.spec.seed, "train": to_dict(cell.train),
                                         "train_size": cell.spec.train_size, "test_size": cell.spec.test_size})


def record_state(results_dir: Path, cell_id: str) -> tuple[CellState, str | None]:
    """done / failed / pending from ``records/<cell_id>.json``; an unreadable file counts as pending."""
    path = Path(results_dir) / RECORDS_SUBDIR / f"{cell_id}.json"
    if not path.is_file():
        return "pending", None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("unreadable record %s (%s): the cell will run again", path, exc)
        return "pending", None
    if record.get("status") in DONE_STATUSES:
        return "done", None
    return "failed", record.get("error")


def prepare(grid_cell: GridCell, env: RunEnv, grid: Grid, load: DatasetLoader = load_dataset) -> Cell:
    """``prepare_cell`` with errors pointing at the attack entry's line."""
    try:
        return prepare_cell(grid_cell.spec, env, load)
    except InputError as exc:
        raise grid.lines.error(grid_cell.attack.where, f"cell {grid_cell.label}: {exc}") from None


def plan_grid(grid: Grid, env: RunEnv, retry_failed: bool = False) -> Plan:
    """Every cell prepared (ids, keys), its state read from the results directory, grouped by victim."""
    planned, groups, fingerprints, suspects = [], {}, {}, {}
    cells = expand(grid)
    if not cells:
        log.warning("%s: the excludes remove every cell; the grid has nothing to run", grid.source)
    load = loading_once()  # identical datasets are read once for the whole grid
    for grid_cell in cells:
        cell = prepare(grid_cell, env, grid, load)
        if id(cell.dataset) not in fingerprints:  # a hash over every row: once per dataset
            fingerprints[id(cell.dataset)] = cell.dataset.fingerprint
        builds = cell_builds(cell, env, fingerprints[id(cell.dataset)], suspects)
        state, error = record_state(env.results_dir, cell.cell_id)
        item = PlannedCell(grid_cell, cell.cell_id, _group_key(cell, builds), cell.defense.stage.name, builds,
                           state, error)
        planned.append(item)
        groups.setdefault(item.group, []).append(item)
    _check_unique_ids(planned, grid)
    return Plan(grid, planned, [VictimGroup(k, v) for k, v in groups.items()], retry_failed)


def _check_unique_ids(planned: list[PlannedCell], grid: Grid) -> None:
    seen: dict[str, PlannedCell] = {}
    for item in planned:
        if item.cell_id in seen:
            raise grid.lines.error(item.cell.attack.where, f"cells {seen[item.cell_id].label} and {item.label} are "
                                   "the same cell (same resolved settings): remove one of the entries")
        seen[item.cell_id] = item


def with_state(plan: Plan, results_dir: Path) -> Plan:
    """The plan with every cell's state re-read from disk (after a run)."""
    cells = [replace(c, state=s, error=e) for c in plan.cells for s, e in [record_state(results_dir, c.cell_id)]]
    by_id = {c.cell_id: c for c in cells}
    groups = [VictimGroup(g.key, [by_id[c.cell_id] for c in g.cells]) for g in plan.groups]
    return Plan(plan.grid, cells, groups, plan.retry_failed)
