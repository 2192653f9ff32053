"""One battery for every registered defense: it runs a cell on the tiny model, and it never reads
the trigger, the target or which rows are poisoned (DESIGN.md: make it impossible, not unlikely).

While a defense's own code runs (repair / train / fit), any read of the poisoned-data object's
secret fields, of an attack's settings, or of the cached poisoned-data file raises. A deliberately
cheating defense shows that the guard catches such reads.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import pathlib
from dataclasses import dataclass
from typing import Iterator

import pytest

from helpers import write_toy_dataset
from nlpbd.cache import ArtifactCache
from nlpbd.errors import RunError
from nlpbd.methods import (DEFENSES, GRANTABLE, Attack, DefenseOutcome, InferenceDefense, PoisonedData,
                           PretrainedDefense, RepairDefense,
                           TrainingDefense)
from nlpbd.pipeline import CellSpec, RunEnv, run_cell

FAST = {"train.epochs": "1", "train.batch_size": "16", "train.max_length": "32", "eval.floor": "false"}
FAST_DEFENSE = {"ft": {"epochs": "1"}, "finemix": {"epochs": "1"}, "epur": {"epochs": "1"},
                "finemix-epur": {"epochs": "1"}, "d3": {"epochs": "1"}, "psim": {"min_steps": "0"},
                "recipe": {"max_steps": "3", "graft_steps": "3"},
                # the baselines at tiny scale: ONION's LM is the tiny random Llama built in code; CUBE's
                # neighbourhoods shrink to the toy set's size
                "onion": {"lm": "tiny-llama"}, "strip": {"repeat": "2"}, "rap": {"epochs": "1"},
                "bki": {"top_words": "3"}, "cube": {"n_neighbors": "15", "min_samples": "10"}}
SECRET_FIELDS = {"poisoned_positions", "asr_set", "target", "info"}
STAGE_METHODS = {RepairDefense: "repair", TrainingDefense: "train", InferenceDefense: "fit", PretrainedDefense: "purify"}


class SecretRead(AssertionError):
    pass


class Guard:
    active = False


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
        if Guard.active and str(file).endswith("poisoned.json"):
            raise SecretRead("a defense opened the cached poisoned data")
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
def guarded(monkeypatch):
    monkeypatch.setattr(PoisonedData, "__getattribute__", _guarded_getattribute(object.__getattribute__))
    monkeypatch.setattr(Attack, "__getattribute__", _guarded_attack_getattribute(object.__getattribute__))
    monkeypatch.setattr(builtins, "open", _guarded_open(builtins.open))
    monkeypatch.setattr(io, "open", _guarded_open(io.open))
    for base, method in STAGE_METHODS.items():
        for _, cls in DEFENSES.items():
            if issubclass(cls, base) and method in vars(cls):
                monkeypatch.setattr(cls, method, _while_guarded(vars(cls)[method]))


def _while_guarded(function):
    def wrapper(*args, **kwargs):
        with active():
            return function(*args, **kwargs)

    return wrapper


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    return write_toy_dataset(root / "toy"), RunEnv(results_dir=root / "results", cache=ArtifactCache(root / "cache"))


def spec(dataset, defense: str) -> CellSpec:
    settings = {f"defense.{k}": v for k, v in FAST_DEFENSE.get(defense, {}).items()}
    return CellSpec(attack="badnet", defense=defense, dataset=str(dataset), model="tiny-bert",
                    overrides={**FAST, **settings})


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


def test_the_guard_catches_a_cheating_defense(shared, guarded, monkeypatch):
    dataset, env = shared
    monkeypatch.setattr(Cheat, "cache_root", env.cache.root)
    monkeypatch.setitem(DEFENSES._items, "cheat", Cheat)
    monkeypatch.setattr(Cheat, "repair", _while_guarded(Cheat.repair))
    with pytest.raises(RunError, match="opened the cached poisoned data"):
        run_cell(spec(dataset, "cheat"), env)


def test_context_holds_only_granted_objects(shared):
    from nlpbd.pipeline import CellState, _context, draw_budget, poison_stage, prepare_cell
    from nlpbd.provenance import StageClock

    dataset, env = shared
    for name in DEFENSES.names():
        cell = prepare_cell(spec(dataset, name), env)
        state = CellState(StageClock(env.device))
        state.poisoned, _ = poison_stage(cell, env.cache)
        state.budget = draw_budget(cell.dataset.train, cell.dataset.dev, state.poisoned.poisoned_positions, 0,
                                   cell.budget)
        ctx = _context(cell, env, state, tokenizer=None)
        assert set(ctx._objects) == set(cell.defense.grants)
        assert not any(isinstance(v, (PoisonedData, Attack)) for v in ctx._objects.values())
        if "budget" in ctx._objects:
            poisoned_ids = {cell.dataset.train.ids[p] for p in state.poisoned.poisoned_positions}
            assert not poisoned_ids & set(ctx.budget.rows.ids)
