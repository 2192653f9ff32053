"""One battery for every registered defense: it runs a cell on the tiny model, and it never reads
the trigger, the target or which rows are poisoned (DESIGN.md: make it impossible, not unlikely).

While a defense's own code runs (repair / train / fit / purify), any read of the poisoned-data object's
secret fields, of an attack's settings, or of any file under the cache root outside the defense's own
scratch area (``artifact.json`` files record the attack's settings) raises. Deliberately cheating
defenses show that the guard catches such reads, and the context is checked to hold no path into the
cache outside the scratch area at all.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from helpers import write_toy_dataset

from nlpbd.cache import ArtifactCache
from nlpbd.errors import RunError
from nlpbd.methods import (
    DEFENSES,
    GRANTABLE,
    Attack,
    DefenseOutcome,
    InferenceDefense,
    PoisonedData,
    PretrainedDefense,
    RepairDefense,
    TrainingDefense,
)
from nlpbd.pipeline import CellSpec, RunEnv, run_cell
from nlpbd.scratch import DefenseScratch

FAST = {"train.epochs": "1", "train.batch_size": "16", "train.max_length": "32", "eval.floor": "false"}
# Every defense's settings at tiny scale; a new defense fails test_every_defense_has_a_tiny_configuration
# until it has an entry here, instead of running at paper scale.
TINY_DEFENSE = {"none": {}, "ft": {"epochs": "1"}, "finemix": {"epochs": "1"}, "epur": {"epochs": "1"},
                "finemix-epur": {"epochs": "1"}, "d3": {"epochs": "1"}, "psim": {"min_steps": "0"},
                "recipe": {"max_steps": "3", "graft_steps": "3"},
                # BTU's exposure runs are one epoch each already
                "btu": {},
                # the baselines at tiny scale: ONION's LM is the tiny random Llama built in code; CUBE's
                # neighbourhoods shrink to the toy set's size
                "onion": {"lm": "tiny-llama"}, "strip": {"repeat": "2"}, "rap": {"epochs": "1"},
                "bki": {"top_words": "3"}, "cube": {"n_neighbors": "15", "min_samples": "10"}}
# A tiny wpoison release.
RELEASE = {"attack.n_poison": "10", "attack.epochs": "1", "attack.batch_size": "8", "attack.proxy_train": "40",
           "attack.proxy_dev": "10", "attack.max_length": "32"}
SECRET_FIELDS = {"poisoned_positions", "asr_set", "target", "info"}
STAGE_METHODS = {RepairDefense: "repair", TrainingDefense: "train", InferenceDefense: "fit",
                 PretrainedDefense: "purify"}


class SecretRead(AssertionError):
    pass


class Guard:
    active = False
    cache_root = pathlib.Path("/nonexistent")
    scratch = pathlib.Path("/nonexistent")


def _guarded_getattribute(original):
    def getattribute(self, name):
        if Guard.active and name in SECRET_FIELDS:
            raise SecretRead(f"a defense read PoisonedData.{name}")
        return original(self, name)

    return getattribute


def _guarded_attack_getattribute(original):
    def getattribute(self, name):
        if Guard.active and name in ("config", "params", "triggers", "cache_payload"):
            raise SecretRead(f"a defense read the attack's {name}")
        return original(self, name)

    return getattribute


def _guarded_open(original):
    def guarded(file, *args, **kwargs):
        if Guard.active and isinstance(file, (str, os.PathLike)):
            path = pathlib.Path(os.fsdecode(file)).resolve()
            if path.name == "poisoned.json":
                raise SecretRead("a defense opened the cached poisoned data")
            if Guard.cache_root in path.parents and Guard.scratch not in path.parents:
                raise SecretRead(f"a defense read {path.name} under the cache root, outside its scratch area")
        return original(file, *args, **kwargs)

    return guarded


@contextlib.contextmanager
def active() -> Iterator[None]:
    Guard.active = True
    try:
        yield
    finally:
        Guard.active = False


@pytest.fixture
def guarded(monkeypatch, shared):
    monkeypatch.setattr(Guard, "cache_root", shared[1].cache.root.resolve())
    monkeypatch.setattr(PoisonedData, "__getattribute__", _guarded_getattribute(object.__getattribute__))
    monkeypatch.setattr(Attack, "__getattribute__", _guarded_attack_getattribute(object.__getattribute__))
    monkeypatch.setattr(builtins, "open", _guarded_open(builtins.open))
    monkeypatch.setattr(io, "open", _guarded_open(io.open))
    for base, method in STAGE_METHODS.items():
        for _, cls in DEFENSES.items():
            if issubclass(cls, base) and method in vars(cls):
                monkeypatch.setattr(cls, method, _while_guarded(vars(cls)[method]))


def _while_guarded(function):
    def wrapper(self, *args, **kwargs):
        Guard.scratch = DefenseScratch.of(Guard.cache_root, self.name).root.resolve()
        with active():
            return function(self, *args, **kwargs)

    return wrapper


def guarded_as(defense: str, function):
    """``function`` (not a defense method, e.g. the evaluator's scoring) run as ``defense`` under the guard."""
    def wrapper(*args, **kwargs):
        Guard.scratch = DefenseScratch.of(Guard.cache_root, defense).root.resolve()
        with active():
            return function(*args, **kwargs)

    return wrapper


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    return write_toy_dataset(root / "toy"), RunEnv(results_dir=root / "results", cache=ArtifactCache(root / "cache"))


def spec(dataset, defense: str) -> CellSpec:
    settings = {f"defense.{k}": v for k, v in TINY_DEFENSE.get(defense, {}).items()}
    return CellSpec(attack="badnet", defense=defense, dataset=str(dataset), model="tiny-bert",
                    overrides={**FAST, **settings})


def test_every_defense_has_a_tiny_configuration():
    assert sorted(TINY_DEFENSE) == sorted(DEFENSES.names())


@pytest.mark.parametrize("name", sorted(DEFENSES.names()))
def test_every_defense_runs_without_attack_secrets(name, shared, guarded):
    dataset, env = shared
    record = run_cell(spec(dataset, name), env)
    assert record["status"] == "ok"
    assert 0.0 <= record["metrics"]["cacc"] <= 1.0 and 0.0 <= record["metrics"]["asr"] <= 1.0
    assert set(record["defense_info"]["grants"]) <= set(GRANTABLE)


@dataclass
class CheatConfig:
    """No settings."""


class Cheat(RepairDefense):
    """Reads the cached poisoned data behind the pipeline's back."""

    name = "cheat"
    description = "test only"
    Config = CheatConfig

    cache_root: pathlib.Path | None = None

    def repair(self, model, ctx):
        for path in pathlib.Path(str(Cheat.cache_root)).glob("**/poisoned.json"):
            path.read_text()
        return DefenseOutcome(model)


class ScratchCheat(RepairDefense):
    """Given only ``budget``, walks up from its own scratch cache to the cache root and reads the attack's
    settings from the artifacts' metadata."""

    name = "scratch-cheat"
    description = "test only"
    Config = CheatConfig
    grants = frozenset({"budget"})

    def repair(self, model, ctx):
        root = next(p for p in pathlib.Path(ctx.cache.root).parents if (p / "poison").is_dir())
        for path in sorted(root.glob("*/*/artifact.json")):
            if "triggers" in path.read_text():
                raise AssertionError(f"read the attack's settings from {path}")
        return DefenseOutcome(model)


class SuspectCheat(InferenceDefense):
    """Looks next to the suspect model it is granted for the release's build metadata."""

    name = "suspect-cheat"
    description = "test only"
    Config = CheatConfig
    grants = frozenset({"suspect"})

    def fit(self, model, ctx):
        found = pathlib.Path(ctx.suspect.location) / "artifact.json"
        if found.exists():
            found.read_text()
        raise AssertionError("the suspect view has no artifact.json to read")


def _install(monkeypatch, cls) -> None:
    monkeypatch.setitem(DEFENSES._items, cls.name, cls)
    method = "repair" if issubclass(cls, RepairDefense) else "fit"
    monkeypatch.setattr(cls, method, _while_guarded(vars(cls)[method]))


def test_the_guard_catches_a_cheating_defense(shared, guarded, monkeypatch):
    dataset, env = shared
    monkeypatch.setattr(Cheat, "cache_root", env.cache.root)
    _install(monkeypatch, Cheat)
    with pytest.raises(RunError, match="opened the cached poisoned data"):
        run_cell(spec(dataset, "cheat"), env)


def test_a_defense_cannot_read_any_artifact_metadata_from_its_scratch_area(shared, guarded, monkeypatch):
    dataset, env = shared
    _install(monkeypatch, ScratchCheat)
    with pytest.raises(RunError, match="read artifact.json under the cache root"):
        run_cell(spec(dataset, "scratch-cheat"), env)


def test_a_granted_release_is_a_view_without_build_metadata(shared, guarded, monkeypatch):
    dataset, env = shared
    _install(monkeypatch, SuspectCheat)
    cell = CellSpec(attack="wpoison", defense="suspect-cheat", dataset=str(dataset), model="tiny-bert",
                    overrides={**FAST, **RELEASE})
    with pytest.raises(RunError, match="the suspect view has no artifact.json"):
        run_cell(cell, env)


def _paths_in(value, seen: set[int]) -> Iterator[str]:
    """Every string reachable from ``value``'s attributes, dicts and sequences (paths included)."""
    if id(value) in seen or isinstance(value, (int, float, bool, type(None), bytes)):
        return
    seen.add(id(value))
    if isinstance(value, (str, os.PathLike)):
        yield os.fspath(value)
        return
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    else:
        items = [v for k, v in vars(value).items() if not k.startswith("__")] if hasattr(value, "__dict__") else []
    for item in items:
        yield from _paths_in(item, seen)


def _state_before_defense(cell, env):
    """What the pipeline has when it builds a defense's context: release, poisoned data, budget, victim."""
    from nlpbd.pipeline import CellState, artifact_ref, draw_budget, poison_stage, suspect_stage, train_victim
    from nlpbd.provenance import StageClock

    state = CellState(StageClock(env.device))
    state.suspect = suspect_stage(cell, env)
    state.start = artifact_ref("release", state.suspect, cell.model) if state.suspect else cell.model
    state.poisoned, artifact = poison_stage(cell, env.cache)
    state.budget = draw_budget(cell.dataset.train, cell.dataset.dev, state.poisoned.poisoned_positions, 0,
                               cell.budget)
    state.victim = train_victim(cell, env.cache, state.start, state.poisoned.train, artifact.meta["key"],
                                env.device, "victim")
    return state


@pytest.mark.parametrize("name", ["psim", "recipe", "finemix", "btu"])
def test_context_points_nowhere_in_the_cache_but_the_scratch_area(shared, name):
    """By construction: no path in a defense's context (its models, tokenizer, cache) leads outside its
    scratch area of the cache, and views hold no build metadata."""
    from nlpbd.pipeline import _context, prepare_cell

    dataset, env = shared
    overrides = {**FAST, **RELEASE} if name == "psim" else FAST
    cell = prepare_cell(CellSpec(attack="wpoison" if name == "psim" else "badnet", defense=name,
                                 dataset=str(dataset), model="tiny-bert", overrides=overrides), env)
    state = _state_before_defense(cell, env)
    scratch = DefenseScratch.of(env.cache.root, name)
    ctx = _context(cell, env, state, scratch)
    objects = [ctx.tokenizer, ctx.cache, *ctx._objects.values()]
    if "victim_factory" in ctx.granted:
        objects.append(ctx.victim().config)
    root, own = env.cache.root.resolve(), scratch.root.resolve()
    checked = 0
    for text in (t for obj in objects for t in _paths_in(obj, set())):
        path = pathlib.Path(text)
        if path.is_absolute() and path.exists():
            resolved, checked = path.resolve(), checked + 1
            assert root not in resolved.parents or own == resolved or own in resolved.parents, text
            if resolved.is_dir():
                assert not (resolved / "artifact.json").exists(), text
    assert checked  # the walk did reach the context's paths


def test_context_holds_only_granted_objects(shared):
    from nlpbd.pipeline import _context, prepare_cell

    dataset, env = shared
    for name in DEFENSES.names():
        cell = prepare_cell(spec(dataset, name), env)
        state = _state_before_defense(cell, env)
        ctx = _context(cell, env, state, DefenseScratch.of(env.cache.root, name))
        assert set(ctx._objects) == set(cell.defense.grants)
        assert not any(isinstance(v, (PoisonedData, Attack)) for v in ctx._objects.values())
        if "budget" in ctx._objects:
            poisoned_ids = {cell.dataset.train.ids[p] for p in state.poisoned.poisoned_positions}
            assert not poisoned_ids & set(ctx.budget.rows.ids)
