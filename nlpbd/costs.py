"""Where a cell's time goes, from its records, and what a planned grid will cost before it runs.

Every record times its stages (``timings``); a stage served from the artifact cache keeps the
seconds its build took (``original_seconds``). Stages shared by the cells of a victim group (the
attacker's release, the poisoned data, the victim, the clean reference model) are paid once per
group; the rest (the defense's stages, the defended model's evaluation) once per cell.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Stages built once and shared: by the cells of a victim group (suspect, poison, victim) or of a
# dataset and model (clean_model).
SHARED_STAGES = ("suspect", "poison", "victim", "clean_model")
NOT_A_STAGE = ("total_seconds",)
# Measurements of the undefended cell, not part of any defense: the evaluation, stealthiness, survival.
MEASUREMENT_STAGES = ("evaluate", "stealth", "survival")


def stage_seconds(record: dict) -> dict[str, float]:
    """Seconds each stage of a record took to compute (its build time when it came from the cache)."""
    out: dict[str, float] = {}
    for name, timing in (record.get("timings") or {}).items():
        if name in NOT_A_STAGE or not isinstance(timing, dict):
            continue
        if name in SHARED_STAGES and timing.get("cached") is None:
            continue  # nothing to build for this cell (a data-poisoning attack has no release)
        seconds = timing.get("original_seconds") if timing.get("cached") else timing.get("seconds")
        if seconds is not None:
            out[name] = float(seconds)
    return out


def per_cell_seconds(stages: dict[str, float]) -> float:
    return sum(v for k, v in stages.items() if k not in SHARED_STAGES)


@dataclass(frozen=True)
class CostKey:
    """What a stage's cost depends on, as far as records tell: the data, the model and its size."""

    dataset: str
    model: str
    finetune: str
    train_size: int | None

    @classmethod
    def of(cls, dataset: str, model: str, finetune: str, train_size: int | None) -> CostKey:
        return cls(Path(str(dataset)).name, Path(str(model)).name, finetune, train_size)


def defense_label(defense: str, variant: str | None) -> str:
    return f"{defense}[{variant}]" if variant else defense


@dataclass
class Timed:
    """The timings of ok records, indexed for lookups by what a cost depends on."""

    rows: list[tuple[CostKey, str, str, dict[str, float]]] = field(default_factory=list)  # key, attack, defense

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> Timed:
        timed = cls()
        for record in records:
            cell = record.get("cell") or {}
            if record.get("status") != "ok" or not cell:
                continue
            key = CostKey.of(cell["dataset"], cell["model"], cell.get("finetune", "full"), cell.get("train_size"))
            timed.rows.append((key, cell["attack"], defense_label(cell["defense"], cell.get("variant")),
                               stage_seconds(record)))
        return timed

    def median(self, stage: str, key: CostKey, attack: str | None = None, defense: str | None = None) -> float | None:
        """Median seconds of ``stage`` over matching records; ``attack`` is preferred, not required."""
        matching = [(a, s[stage] if stage != "cell" else per_cell_seconds(s)) for k, a, d, s in self.rows
                    if k == key and (defense is None or d == defense) and (stage == "cell" or stage in s)]
        same_attack = [v for a, v in matching if a == attack]
        values = same_attack or [v for _, v in matching]
        return statistics.median(values) if values else None


# --- the per-stage table ----------------------------------------------------------------------------

TABLE_STAGES = ("suspect", "victim", "clean_model", "defense_stages", "evaluate")


def cost_rows(records: Iterable[dict]) -> list[dict]:
    """One row per (dataset, model, finetune, train size, defense): median seconds of each stage."""
    timed = Timed.from_records(records)
    groups: dict[tuple[CostKey, str], list[dict[str, float]]] = {}
    for key, _attack, defense, stages in timed.rows:
        groups.setdefault((key, defense), []).append(stages)
    rows = []
    for (key, defense), stage_list in sorted(groups.items(), key=lambda item: _sort_key(*item[0])):
        row: dict = {"dataset": key.dataset, "model": key.model, "finetune": key.finetune,
                     "train_size": key.train_size, "defense": defense, "records": len(stage_list)}
        for stage in TABLE_STAGES:
            values = [_table_stage(s, stage) for s in stage_list]
            present = [v for v in values if v is not None]
            row[stage] = statistics.median(present) if present else None
        row["cell"] = statistics.median(per_cell_seconds(s) for s in stage_list)
        rows.append(row)
    return rows


def _table_stage(stages: dict[str, float], stage: str) -> float | None:
    if stage == "defense_stages":  # every per-cell stage but the measurements
        parts = [v for k, v in stages.items() if k not in SHARED_STAGES and k not in MEASUREMENT_STAGES]
        return sum(parts) if parts else None
    return stages.get(stage)


def _sort_key(key: CostKey, defense: str) -> tuple:
    return (key.dataset, key.model, key.finetune, key.train_size or 0, defense != "none", defense)


# --- a plan's estimate --------------------------------------------------------------------------------


@dataclass
class Estimate:
    """Seconds a plan's remaining work will take at the speed its timed records were made at."""

    seconds: float = 0.0
    cells_timed: int = 0
    cells_untimed: int = 0
    trainings_timed: int = 0
    trainings_untimed: int = 0
    records: int = 0

    def as_dict(self) -> dict:
        return {**self.__dict__, "hours": self.seconds / 3600}

    def describe(self) -> str:
        if not self.records:
            return "no timed records to estimate from"
        text = (f"about {_duration(self.seconds)} at the speed of {self.records} timed record(s): "
                f"{self.cells_timed} cell(s) and {self.trainings_timed} shared training(s) timed")
        missing = self.cells_untimed + self.trainings_untimed
        return text + (f"; {missing} without a matching timing, not counted" if missing else "")


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"


def estimate_plan(todo: Iterable, records: Iterable[dict], missing_builds: dict[str, set[str]]) -> Estimate:
    """Estimate the cells still to run (planned cells with ``spec`` and ``builds``) from timed records.

    ``missing_builds`` maps a shared stage (suspect, victim, clean_model) to the keys of the artifacts
    not cached yet: each is paid once, by the first cell that needs it.
    """
    record_list = list(records)
    timed, estimate = Timed.from_records(record_list), Estimate(records=len(record_list))
    paid: set[tuple[str, str]] = set()
    for planned in todo:
        spec = planned.spec
        key = CostKey.of(spec.dataset, spec.model, spec.finetune, spec.train_size)
        _add(estimate, timed.median("cell", key, spec.attack, defense_label(spec.defense, spec.variant)), cell=True)
        for stage, build_key in _shared_builds(planned):
            if build_key in missing_builds.get(stage, set()) and (stage, build_key) not in paid:
                paid.add((stage, build_key))
                _add(estimate, timed.median(stage, key, spec.attack), cell=False)
    return estimate


def _shared_builds(planned) -> list[tuple[str, str]]:
    builds = planned.builds
    pairs = [("suspect", builds.suspect), ("victim", builds.victim if builds.exact else planned.group),
             ("clean_model", builds.clean)]
    return [(stage, key) for stage, key in pairs if key]


def _add(estimate: Estimate, seconds: float | None, cell: bool) -> None:
    if seconds is None:
        if cell:
            estimate.cells_untimed += 1
        else:
            estimate.trainings_untimed += 1
        return
    estimate.seconds += seconds
    if cell:
        estimate.cells_timed += 1
    else:
        estimate.trainings_timed += 1


def missing_shared_builds(todo: Iterable, cache) -> dict[str, set[str]]:
    """The shared artifacts (by stage) the cells still to run need and the cache does not hold."""
    kinds = {"suspect": "suspect", "victim": "victim", "clean_model": "victim"}
    missing: dict[str, set[str]] = {stage: set() for stage in kinds}
    for planned in todo:
        for stage, key in _shared_builds(planned):
            exact = planned.builds.exact or stage != "victim"
            if not exact or cache.lookup(kinds[stage], key) is None:
                missing[stage].add(key)
    return missing
