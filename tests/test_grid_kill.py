"""Crash safety: ``kill -9`` a running grid while it trains a victim, rerun it, get every cell exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import write_toy_dataset

from nlpbd.cache import META_FILE, ArtifactCache
from nlpbd.grid import load_grid
from nlpbd.pipeline import RunEnv
from nlpbd.plan import plan_grid
from nlpbd.scratch import SCRATCH_DIR

GRID = """\
name: kill
datasets: [{dataset}]
models: [tiny-bert]
attacks: [badnet, addsent]
defenses: [none, ft]
seeds: [0, 1]
set:
  train.epochs: 3
  train.batch_size: 8
  train.max_length: 32
  eval.floor: false
  ft.epochs: 1
"""
TIMEOUT = 180


def grid_command(path: Path, results: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "nlpbd.cli", "grid", str(path), "--results-dir", str(results),
            "--cache-dir", str(cache), "--quiet"]


def victim_in_flight(records: Path, cache: Path) -> bool:
    """A cell has finished and a later victim is being built (its temp directory exists)."""
    finished = records.is_dir() and any(p.suffix == ".json" and not p.name.startswith(".") for p in records.iterdir())
    victims = cache / "victim"
    return finished and victims.is_dir() and any(p.name.startswith(".tmp-") for p in victims.iterdir())


def single_threaded() -> dict:
    """Tiny models train many times faster on one thread than on oversubscribed cores (as in conftest)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def kill_while_training(command: list[str], records: Path, cache: Path) -> None:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=single_threaded())
    deadline = time.monotonic() + TIMEOUT
    try:
        while not victim_in_flight(records, cache):
            assert process.poll() is None, f"the grid ended before it could be killed: {process.stderr.read()!r}"
            assert time.monotonic() < deadline, "no victim training seen in time"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


def test_kill_minus_nine_then_rerun_finishes_every_cell_once(tmp_path):
    dataset = write_toy_dataset(tmp_path / "toy")
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.format(dataset=dataset))
    results, cache = tmp_path / "results", tmp_path / "cache"
    records = results / "records"
    command = grid_command(path, results, cache)

    kill_while_training(command, records, cache)
    done_before = sorted(p.name for p in records.glob("*.json"))
    assert 1 <= len(done_before) < 8
    # The victim being built when the process died (nearly always there; gone only if its rename won the race).
    in_flight = [p for p in (cache / "victim").iterdir() if p.name.startswith(".tmp-")]
    print(f"killed after {len(done_before)} cells with {len(in_flight)} victim build(s) in flight")

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=single_threaded())
    assert rerun.returncode == 0, rerun.stderr

    env = RunEnv(results_dir=results, cache=ArtifactCache(cache))
    plan = plan_grid(load_grid(path), env)
    assert len(plan.cells) == 8 and all(c.state == "done" for c in plan.cells)
    files = sorted(records.iterdir())
    assert [p.name for p in files] == sorted(f"{c.cell_id}.json" for c in plan.cells)  # once each, no temp files
    parsed = [json.loads(p.read_text()) for p in files]
    assert all(r["status"] == "ok" for r in parsed)
    assert set(done_before) <= {p.name for p in files}
    assert_cache_is_sound(cache, {r["victim"]["key"] for r in parsed})


def assert_cache_is_sound(cache: Path, victim_keys: set[str]) -> None:
    """Every artifact is complete; a temp directory left by the killed build is never taken for one: the
    rerun built that key again, completely, under its own name."""
    store = ArtifactCache(cache)
    for kind_dir in (p for p in cache.iterdir() if p.is_dir() and p.name != "models" and not p.name.startswith(".")):
        if kind_dir.name == SCRATCH_DIR:  # each defense's own cache, sound in the same way
            for scratch in (p / "cache" for p in kind_dir.iterdir() if (p / "cache").is_dir()):
                assert_cache_is_sound(scratch, set())
            continue
        for entry in kind_dir.iterdir():
            if entry.name.startswith(".tmp-"):
                key = entry.name[len(".tmp-"):-9]  # .tmp-<key>-<8 hex>
                rebuilt = store.lookup(kind_dir.name, key)
                assert rebuilt is not None and rebuilt.path != entry and rebuilt.meta["key"] == key
                continue
            meta = json.loads((entry / META_FILE).read_text())
            assert meta["key"] == entry.name and meta["kind"] == kind_dir.name
    for key in victim_keys:
        artifact = store.lookup("victim", key)
        assert artifact is not None and (artifact.path / "model.safetensors").is_file()
