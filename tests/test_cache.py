"""Cache keys (what changes an artifact changes its key) and atomic artifact writes (nlpbd/cache.py)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import SHARED_DATA, needs_data

from nlpbd.attacks.addsent import AddSent
from nlpbd.attacks.badnet import BadNet, BadNetConfig
from nlpbd.cache import ArtifactCache, atomic_directory, atomic_write_text, canonical_json, content_key
from nlpbd.data import Dataset, TextSplit, subsample_train
from nlpbd.pipeline import CellSpec, RunEnv, poison_stage, prepare_cell, victim_payload


def test_content_key_is_the_hash_of_canonical_json_and_ignores_key_order():
    payload = {"b": {"y": 2, "x": [1, "a"]}, "a": None}
    assert canonical_json(payload) == '{"a":null,"b":{"x":[1,"a"],"y":2}}'
    assert content_key(payload) == hashlib.sha256(canonical_json(payload).encode()).hexdigest()
    assert content_key({"a": None, "b": {"x": [1, "a"], "y": 2}}) == content_key(payload)
    assert content_key({"a": None, "b": {"x": ["a", 1], "y": 2}}) != content_key(payload)  # list order matters


# --- the poison key -------------------------------------------------------------------------------


def toy_dataset(n: int = 120, first_text: str = "row zero") -> Dataset:
    texts = [first_text] + [f"row {i} text" for i in range(1, n)]
    split = TextSplit.build(texts, [i % 2 for i in range(n)])
    return Dataset("toy", 2, split, split.subset(range(10)), split.subset(range(10, 40)), 1, source="memory")


class BadNetV2(BadNet):
    version = "2"


def poison_key(cache: ArtifactCache, attack=None, dataset: Dataset | None = None, seed: int = 0) -> str:
    cell = SimpleNamespace(attack=attack or BadNet(), dataset=dataset or toy_dataset(), spec=SimpleNamespace(seed=seed))
    _, artifact = poison_stage(cell, cache)
    return artifact.meta["key"]


def test_every_poison_setting_changes_the_poison_key(tmp_path):
    cache = ArtifactCache(tmp_path)
    base = poison_key(cache)
    assert poison_key(cache) == base
    assert poison_key(cache, BadNet(BadNetConfig())) == base
    variants = {
        "triggers": poison_key(cache, BadNet(BadNetConfig(triggers=["cf", "mn", "bb", "mb"]))),
        "trigger order": poison_key(cache, BadNet(BadNetConfig(triggers=["mn", "cf", "bb", "tq"]))),
        "rate": poison_key(cache, BadNet(BadNetConfig(poison_rate=0.2))),
        "label mode": poison_key(cache, BadNet(BadNetConfig(label_mode="mix"))),
        "target": poison_key(cache, BadNet(BadNetConfig(target_label=0))),
        "explicit default target": poison_key(cache, BadNet(BadNetConfig(target_label=1))),
        "insertions": poison_key(cache, BadNet(BadNetConfig(num_insertions=2))),
        "train size": poison_key(cache, dataset=subsample_train(toy_dataset(), 100)),
        "other train size": poison_key(cache, dataset=subsample_train(toy_dataset(), 101)),
        "data": poison_key(cache, dataset=toy_dataset(first_text="row zero!")),
        "seed": poison_key(cache, seed=1),
        "version": poison_key(cache, BadNetV2()),
        "attack": poison_key(cache, AddSent()),
    }
    assert base not in variants.values()
    assert len(set(variants.values())) == len(variants)


def test_poison_stage_caches_and_round_trips(tmp_path):
    cache = ArtifactCache(tmp_path)
    cell = SimpleNamespace(attack=BadNet(), dataset=toy_dataset(), spec=SimpleNamespace(seed=0))
    first, artifact = poison_stage(cell, cache)
    assert not artifact.cached and first == BadNet().poison(toy_dataset(), 0)
    second, again = poison_stage(cell, cache)
    assert again.cached and again.path == artifact.path and second == first


# --- the victim key -------------------------------------------------------------------------------


@pytest.fixture
def cell(tmp_path):
    env = RunEnv(results_dir=tmp_path / "results", cache=ArtifactCache(tmp_path / "cache"), data_dir=SHARED_DATA)
    spec = CellSpec(attack="badnet", defense="none", dataset="sst2", model="tiny-bert", train_size=200)
    return prepare_cell(spec, env), env


@needs_data
def test_every_training_input_changes_the_victim_key(cell):
    cell, env = cell
    base = content_key(victim_payload(cell, cell.model.identity, "data-a"))
    changed = {
        "model": victim_payload(cell, "sha256:another", "data-a"),
        "data": victim_payload(cell, cell.model.identity, "data-b"),
        "seed": victim_payload(replace(cell, spec=replace(cell.spec, seed=1)), cell.model.identity, "data-a"),
        "finetune": victim_payload(replace(cell, spec=replace(cell.spec, finetune="lora")), cell.model.identity,
                                   "data-a"),
    }
    for name, value in [("lr", 5e-4), ("epochs", 4), ("batch_size", 16), ("max_length", 64), ("select", "last")]:
        changed[name] = victim_payload(replace(cell, train=replace(cell.train, **{name: value})), cell.model.identity,
                                       "data-a")
    keys = {name: content_key(payload) for name, payload in changed.items()}
    assert base not in keys.values() and len(set(keys.values())) == len(keys)


@needs_data
def test_victim_key_is_shared_by_defenses_and_repeatable(cell):
    cell, env = cell
    key = content_key(victim_payload(cell, cell.model.identity, "data-a"))
    other_defense = prepare_cell(replace(cell.spec, defense="ft", overrides={"defense.epochs": "1"}), env)
    assert content_key(victim_payload(other_defense, other_defense.model.identity, "data-a")) == key
    again = prepare_cell(cell.spec, env)
    assert content_key(victim_payload(again, again.model.identity, "data-a")) == key
    assert victim_payload(cell, cell.model.identity, "data-a")["train"]["lr"] == 1e-3  # the model default was resolved


# --- atomic builds --------------------------------------------------------------------------------


def test_get_or_build_builds_once(tmp_path):
    cache = ArtifactCache(tmp_path)
    calls = []

    def build(directory: Path) -> dict:
        calls.append(directory)
        (directory / "data.txt").write_text("built")
        return {"size": 5}

    first = cache.get_or_build("thing", {"x": 1}, build)
    second = cache.get_or_build("thing", {"x": 1}, build)
    assert (first.cached, second.cached, len(calls)) == (False, True, 1)
    assert second.path == first.path == tmp_path / "thing" / content_key({"x": 1})
    assert second.meta == first.meta and first.meta["size"] == 5 and first.meta["payload"] == {"x": 1}
    assert (second.path / "data.txt").read_text() == "built"
    assert calls[0] != first.path and not calls[0].exists()  # built elsewhere, then renamed into place
    assert cache.get_or_build("thing", {"x": 2}, build).cached is False and len(calls) == 2


def test_failed_build_leaves_nothing_behind(tmp_path):
    cache = ArtifactCache(tmp_path)

    def broken(directory: Path) -> dict:
        (directory / "half.bin").write_bytes(b"\0" * 10)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cache.get_or_build("thing", {"x": 1}, broken)
    assert list((tmp_path / "thing").iterdir()) == []
    assert cache.lookup("thing", content_key({"x": 1})) is None
    rebuilt = cache.get_or_build("thing", {"x": 1}, lambda d: {"ok": True})
    assert rebuilt.cached is False and rebuilt.meta["ok"] is True


def test_concurrent_builders_of_one_key_build_it_once(tmp_path):
    cache = ArtifactCache(tmp_path)
    builds: list[int] = []

    def slow_build(directory: Path) -> dict:
        builds.append(1)
        time.sleep(0.5)  # the other thread arrives while this build is under way
        (directory / "data.txt").write_text("built")
        return {}

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: cache.get_or_build("thing", {"x": 1}, slow_build), range(2)))
    assert len(builds) == 1 and sorted(r.cached for r in results) == [False, True]
    assert results[0].path == results[1].path and (results[0].path / "data.txt").read_text() == "built"


def test_a_concurrent_complete_copy_wins(tmp_path):
    final = tmp_path / "kind" / "key"
    final.mkdir(parents=True)
    (final / "theirs.txt").write_text("first")
    with atomic_directory(final) as tmp:
        (tmp / "ours.txt").write_text("second")
    assert sorted(p.name for p in final.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in final.parent.iterdir()) == ["key"]


def test_atomic_write_text_replaces_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "record.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]


def test_atomic_write_text_failure_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "record.json"
    atomic_write_text(target, "old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("nlpbd.cache.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NLPBD_CACHE", str(tmp_path / "c"))
    assert ArtifactCache().root == tmp_path / "c"
    monkeypatch.delenv("NLPBD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ArtifactCache().root == tmp_path / "xdg" / "nlpbd"


def test_a_killed_builders_temporary_directory_is_swept_by_the_next_build(tmp_path):
    cache = ArtifactCache(tmp_path)
    key, other = content_key({"x": 1}), content_key({"x": 2})
    abandoned = tmp_path / "thing" / f".tmp-{key}-dead0001"  # what kill -9 mid-build leaves
    unrelated = tmp_path / "thing" / f".tmp-{other}-dead0002"  # another key's build may be live
    for directory in (abandoned, unrelated):
        directory.mkdir(parents=True)
        (directory / "half.bin").write_bytes(b"\0" * 10)
    built = cache.get_or_build("thing", {"x": 1}, lambda d: {})
    assert built.cached is False and not abandoned.exists() and unrelated.is_dir()
