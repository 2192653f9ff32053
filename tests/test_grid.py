"""Grids: YAML expansion, validation with line numbers, planning by victim, resume, executors, reports."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import SHARED_DATA, needs_data, write_toy_dataset
from typer.testing import CliRunner

from nlpbd.cache import ArtifactCache
from nlpbd.cli import app
from nlpbd.data import loading_once
from nlpbd.errors import InputError
from nlpbd.executors import CoreShare, run_plan
from nlpbd.grid import expand, load_grid, parse_grid
from nlpbd.pipeline import RunEnv
from nlpbd.plan import plan_grid, with_state
from nlpbd.results import load_records

REPO = Path(__file__).resolve().parents[1]
BUNDLED = sorted((REPO / "benchmarks" / "grids").glob("*.yaml"))
FAST_SET = """\
set:
  train.epochs: 1
  train.batch_size: 16
  train.max_length: 32
  eval.floor: false
  ft.epochs: 1
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("grid-data") / "toy")


def write_grid(directory: Path, body: str, name: str = "grid.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


def toy_grid(directory: Path, toy: Path, attacks: str = "[badnet]", defenses: str = "[none, ft]",
             seeds: str = "[0]", extra: str = "") -> Path:
    body = f"name: toy\ndatasets: [{toy}]\nmodels: [tiny-bert]\nattacks: {attacks}\ndefenses: {defenses}\n" \
           f"seeds: {seeds}\n{FAST_SET}{extra}"
    return write_grid(directory, body)


def make_env(tmp_path: Path) -> RunEnv:
    return RunEnv(results_dir=tmp_path / "results", cache=ArtifactCache(tmp_path / "cache"))


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# --- expansion ------------------------------------------------------------------------------------


def test_expansion_counts_excludes_and_variants(tmp_path, toy):
    variant = "{name: badnet, variant: rate0.2, set: {poison_rate: 0.2}}"
    path = toy_grid(tmp_path, toy, attacks=f"[badnet, {variant}, addsent]",
                    defenses="[none, ft, {name: ft, variant: e3, set: {epochs: 3, budget.fraction: 0.1}}]",
                    seeds="[0, 1]", extra="exclude:\n  - {attack: addsent, seed: 1}\n  - {variant: rate0.2+e3}\n")
    cells = expand(parse_grid(path))
    # 3 attack entries x 3 defense entries x 2 seeds = 18, minus addsent x 3 x seed 1, minus rate0.2+e3 x 2 seeds
    assert len(cells) == 18 - 3 - 2
    variants = [(c.spec.attack, c.spec.defense, c.spec.seed, c.spec.variant) for c in cells]
    assert ("badnet", "ft", 0, "+e3") in variants and ("badnet", "none", 1, "rate0.2") in variants
    assert not any(v[3] == "rate0.2+e3" for v in variants) and ("addsent", "none", 1, None) not in variants
    e3 = next(c for c in cells if c.spec.variant == "+e3")
    assert e3.spec.overrides == {"budget.fraction": 0.1, "defense.epochs": 3, "eval.floor": False,
                                 "train.batch_size": 16, "train.epochs": 1, "train.max_length": 32}
    plain_none = next(c for c in cells if c.spec.defense == "none" and c.spec.variant is None)
    assert "defense.epochs" not in plain_none.spec.overrides  # ft.epochs reaches only ft cells
    # dataset, model, finetune, attack, seed, defense: a victim group's cells are contiguous
    assert [c.spec.defense for c in cells[:3]] == ["none", "ft", "ft"] and cells[0].spec.seed == cells[2].spec.seed


def test_global_method_settings_yield_to_entry_settings(tmp_path, toy):
    path = toy_grid(tmp_path, toy, attacks="[{name: badnet, variant: r3, set: {poison_rate: 0.3}}]",
                    extra="  attack.poison_rate: 0.05\n  badnet.poison_rate: 0.2\n")
    (cell,) = [c for c in expand(parse_grid(path)) if c.spec.defense == "none"]
    assert cell.spec.overrides["attack.poison_rate"] == 0.3


# --- validation -----------------------------------------------------------------------------------

BASE = """\
name: t
datasets: [sst2]
models: [tiny-bert]
attacks: [badnet]
defenses: [none, ft]
seeds: [0]
"""


@pytest.mark.parametrize("body, line, fragments", [
    (BASE + "seedz: [1]\n", 7, ["unknown key 'seedz'", "Did you mean 'seeds'"]),
    (BASE.replace("[badnet]", "[badnet, badnett]"), 4, ["unknown attack 'badnett'", "Did you mean 'badnet'"]),
    (BASE.replace("[none, ft]", "\n  - none\n  - fine-tune"), 7, ["unknown defense 'fine-tune'"]),
    (BASE.replace("[sst2]", "[sst]"), 2, ["unknown dataset 'sst'", "sst2"]),
    (BASE.replace("[tiny-bert]", "[minilmm]"), 3, ["model 'minilmm'", "Did you mean the registered model 'minilm'"]),
    (BASE.replace("[0]", "[0, one]"), 6, ["seeds: expected an integer", "'one'"]),
    (BASE + "train_size: many\n", 7, ["train_size: expected a positive integer"]),
    (BASE + "test_size: 0\n", 7, ["test_size: expected a positive integer, got 0"]),
    (BASE + "test_size: abc\n", 7, ["test_size: expected a positive integer, got 'abc'"]),
    (BASE + "test_size: true\n", 7, ["test_size: expected a positive integer, got True"]),
    (BASE + "set:\n  train.epochs: 1\n  ft.epoch: 2\n", 9, ["unknown setting 'defense.epoch'", "defense.epochs"]),
    (BASE + "set:\n  train.epochs: two\n", 8, ["train.epochs: expected an integer", "'two'"]),
    (BASE + "set:\n  trian.epochs: 2\n", 8, ["unknown section", "'trian'", "Did you mean 'train'"]),
    (BASE + "set:\n  attack.poison_rate: 1.5\n", 8, ["out of range"]),
    (BASE.replace("[badnet]", "\n  - name: badnet\n    set: {poison_rate: 0.2}"), 5, ["no 'variant' label"]),
    (BASE.replace("[badnet]", "\n  - name: badnet\n    variant: r\n    set:\n      poison_rte: 0.2"), 8,
     ["unknown setting 'attack.poison_rte'", "attack.poison_rate"]),
    (BASE.replace("[badnet]", "\n  - {name: badnet, varient: r}"), 5, ["unknown attack entry key 'varient'",
                                                                       "Did you mean 'variant'"]),
    (BASE + "exclude:\n  - {dataset: olid}\n", 8, ["exclude: dataset 'olid' is not in this grid"]),
    (BASE + "exclude:\n  - {defence: ft}\n", 8, ["unknown exclude key 'defence'", "Did you mean 'defense'"]),
    (BASE.replace("[none, ft]", "[none, ft, ft]"), 5, ["'ft' appears twice"]),
    (BASE + "set: [1, 2]\n", 7, ["'set' must be a mapping"]),
    (BASE + "exclude:\n  - {dataset: sst2\n", 9, ["not valid YAML"]),
    (BASE.replace("datasets: [sst2]\n", ""), 1, ["'datasets' is required"]),
    (BASE.replace("[full]", "") + "finetune: [fulll]\n", 7, ["unknown fine-tuning method 'fulll'", "'full'"]),
])
def test_validation_errors_name_the_line(tmp_path, body, line, fragments):
    path = write_grid(tmp_path, body)
    with pytest.raises(InputError) as caught:
        load_grid(path, SHARED_DATA if SHARED_DATA.is_dir() else None)
    message = str(caught.value)
    assert message.startswith(f"{path} line {line}: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_test_size_reaches_every_cell_and_the_dataset_check(tmp_path, toy):
    cells = expand(parse_grid(toy_grid(tmp_path, toy, extra="test_size: 20\n")))
    assert [c.spec.test_size for c in cells] == [20, 20]
    assert {c.spec.test_size for c in expand(parse_grid(toy_grid(tmp_path, toy)))} == {None}
    path = toy_grid(tmp_path, toy, extra="test_size: 3\n")
    with pytest.raises(InputError) as caught:
        load_grid(path)
    message = str(caught.value)
    assert message.startswith(f"{path} line 2: ") and "--test-size 3 is too small" in message, message


def test_planning_keeps_test_sizes_apart(tmp_path, toy):
    load = loading_once()  # the memo of planning: one load per (dataset, settings, sizes)
    subsampled = load(str(toy), None, None, None, 20)
    whole = load(str(toy), None, None, None, None)
    assert load(str(toy), None, None, None, 20) is subsampled
    assert (len(subsampled.test), len(whole.test)) == (20, 60)
    env = make_env(tmp_path)
    ids = [{c.cell_id for c in plan_grid(load_grid(toy_grid(tmp_path, toy, extra=extra)), env).cells}
           for extra in ("", "test_size: 20\n")]
    assert len(ids[0]) == len(ids[1]) == 2 and not ids[0] & ids[1]


def test_validate_command_ok_and_error(tmp_path, toy):
    ok = invoke("validate", toy_grid(tmp_path, toy))
    assert ok.exit_code == 0 and "2 cells in 1 victim groups" in ok.output, ok.output
    bad = invoke("validate", write_grid(tmp_path, BASE + "seedz: 1\n", "bad.yaml"))
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert bad.exit_code == 2 and len(lines) == 1 and "bad.yaml line 7" in lines[0], bad.output


@needs_data
@pytest.mark.parametrize("path", BUNDLED, ids=[p.stem for p in BUNDLED])
def test_bundled_grids_are_valid(path, monkeypatch):
    stand_in_for_smollm2(path, monkeypatch)
    load_grid(path, SHARED_DATA)  # every method of every bundled grid is registered


def stand_in_for_smollm2(path: Path, monkeypatch) -> None:
    """SmolLM2's first use converts a 540 MB GGUF file: grids that name it get the tiny Llama instead."""
    if "smollm2" in parse_grid(path).models:
        from dataclasses import replace

        from nlpbd.models import MODELS

        tiny = MODELS.get("tiny-llama")
        monkeypatch.setitem(MODELS._items, "smollm2", replace(
            MODELS.get("smollm2"), resolve=lambda: replace(tiny.resolve(), name="smollm2")))


# --- planning -------------------------------------------------------------------------------------


def test_planning_groups_cells_by_victim(tmp_path, toy):
    path = toy_grid(tmp_path, toy, attacks="[badnet, addsent]", defenses="[none, ft, btu, {name: ft, variant: e2, "
                    "set: {epochs: 2}}]", seeds="[0, 1]")
    path.write_text(path.read_text().replace("  eval.floor: false\n", ""))  # with the clean reference model
    env = make_env(tmp_path)
    plan = plan_grid(load_grid(path), env)
    summary = plan.summary(env.cache)
    assert (summary.cells, summary.groups, summary.victims_to_train) == (16, 4, 4)
    assert summary.exact and summary.clean_models_to_train == 2  # one per seed
    assert summary.training_defense_runs == 4  # BTU's exposure runs, one per victim
    assert summary.trainings == 10 < summary.cells
    assert all(len({c.spec.attack for c in g.cells}) == 1 and len(g.cells) == 4 for g in plan.groups)


# cells, victim groups, and the trainings not cached yet: suspect releases, victims, clean models,
# purified pretrained models, victims fine-tuned from those, training-time defense runs
BUNDLED_PLANS = {
    # what CI runs: 2 attacks x {none, ft, btu}: 2 victims, 1 clean model, 2 BTU exposures
    "smoke": (6, 2, (0, 2, 1, 0, 0, 2)),
    # 4 attacks x 8 defenses (BTU twice: without and with the clean tune) x 3 seeds; BTU exposes per cell
    "sst2_reference": (96, 12, (0, 12, 3, 0, 0, 24)),
    # 24 defense variants (budgets, rho) on one victim per seed
    "sst2_sensitivity": (72, 3, (0, 3, 3, 0, 0, 0)),
    # 3 datasets x 4 attacks x 7 defenses x 3 seeds, minus OLID x StyleBkd (no style data) x 7 x 3;
    # one victim per dataset x attack x seed, one clean model per dataset x seed, BTU's exposure per victim
    "data_poisoning": (231, 33, (0, 33, 9, 0, 0, 33)),
    # per dataset and seed: WP x {full, lora, ptuning} + EP + RIPPLe victims, 3 releases (the fine-tuning
    # method does not change a release), a clean model per fine-tuning method; P-tuning keeps none and psim
    "checkpoint_poisoning": (270, 45, (27, 45, 27, 0, 0, 0)),
    # task-agnostic releases and RECIPE's purified models are shared by all datasets: one per attack x seed
    "pretrained_backdoor": (135, 27, (9, 27, 9, 9, 27, 0)),
    # the CPU-scale references, per seed (3 seeds): 3 releases, 3 victims, 1 clean model, RECIPE on each
    # release plus the pooler-reset control on POR's and NeuBA's, each purified model fine-tuned once
    "pretrained_reference_sst2": (42, 9, (9, 9, 3, 15, 15, 0)),
    "pretrained_reference_agnews": (42, 9, (9, 9, 3, 15, 15, 0)),
    # {MiniLM, SmolLM2} x {full, LoRA} x 8 defenses (PSIM twice) x 2 attacks + the generator x 5 (no D3, PSIM),
    # x 2 attacks x 3 seeds, the generator BadNet only; a clean model per model x fine-tuning method x seed,
    # BTU's exposure per victim
    "sst2_decoder": (207, 27, (0, 27, 15, 0, 0, 27)),
}


@needs_data
@pytest.mark.parametrize("name", sorted(BUNDLED_PLANS))
def test_bundled_grids_plan_the_expected_trainings(tmp_path, name, monkeypatch):
    stand_in_for_smollm2(REPO / "benchmarks" / "grids" / f"{name}.yaml", monkeypatch)
    result = invoke("grid", REPO / "benchmarks" / "grids" / f"{name}.yaml", "--dry-run", "--json",
                    "--data-dir", SHARED_DATA, "--results-dir", tmp_path / "r", "--cache-dir", tmp_path / "c")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    cells, groups, builds = BUNDLED_PLANS[name]
    assert (plan["cells"], plan["to_run"], plan["groups"], plan["exact"]) == (cells, cells, groups, True)
    keys = ("suspects_to_build", "victims_to_train", "clean_models_to_train", "purified_models_to_build",
            "purified_victims_to_train", "training_defense_runs")
    assert tuple(plan[k] for k in keys) == builds
    assert plan["trainings"] == sum(builds)
    if not name.startswith("pretrained_reference"):  # there, each RECIPE cell purifies and fine-tunes its own
        assert plan["trainings"] < cells


def test_planned_keys_match_the_pipeline(tmp_path, toy):
    path = toy_grid(tmp_path, toy)
    path.write_text(path.read_text().replace("  eval.floor: false\n", ""))
    env = make_env(tmp_path)
    plan = plan_grid(load_grid(path), env)
    run = run_plan(plan, env)
    assert [o.status for o in run.outcomes] == ["ok", "ok"]
    for cell, record in zip(plan.cells, sorted(load_records(env.results_dir), key=lambda r: r["cell"]["defense"],
                                               reverse=True)):
        assert record["cell_id"] == cell.cell_id and record["victim"]["key"] == cell.builds.victim
        assert env.cache.lookup("victim", cell.builds.clean) is not None  # the floor's clean model, as planned
    again = plan_grid(load_grid(path), env).summary(env.cache)
    assert (again.to_run, again.victims_to_train, again.clean_models_to_train) == (0, 0, 0)


def test_planned_keys_of_supply_attacks_and_purifying_defenses_match_the_pipeline(tmp_path, toy, monkeypatch):
    from test_pipeline_supply import ATTACKS, DEFENSES, CopyPurifier, CopyRelease

    monkeypatch.setitem(ATTACKS._items, "copy-release", CopyRelease)
    monkeypatch.setitem(DEFENSES._items, "copy-purifier", CopyPurifier)
    path = toy_grid(tmp_path, toy, attacks="[copy-release]", defenses="[none, copy-purifier]", seeds="[0, 1]")
    env = make_env(tmp_path)
    plan = plan_grid(load_grid(path), env)
    summary = plan.summary(env.cache)
    # one release, victim, purified model and purified victim per seed; both defenses share the victim
    assert (summary.groups, summary.suspects_to_build, summary.victims_to_train) == (2, 2, 2)
    assert (summary.purified_models_to_build, summary.purified_victims_to_train, summary.trainings) == (2, 2, 8)
    assert [o.status for o in run_plan(plan, env).outcomes] == ["ok"] * 4
    records = {r["cell_id"]: r for r in load_records(env.results_dir)}
    for cell in plan.cells:
        record = records[cell.cell_id]
        assert record["victim"]["key"] == cell.builds.victim
        assert env.cache.lookup("suspect", cell.builds.suspect) is not None
        if cell.stage == "PRETRAINED":
            assert record["defense_info"]["purified_key"] == cell.builds.purified
            assert record["defense_info"]["defended_victim_key"] == cell.builds.defended
    assert plan_grid(load_grid(path), env).summary(env.cache).trainings == 0


# --- running and resuming -------------------------------------------------------------------------


def test_failed_cells_do_not_stop_the_grid_and_rerun_only_with_the_flag(tmp_path, toy):
    # synbkd has no side files in the toy dataset: its cells fail at run time, after validation.
    path = toy_grid(tmp_path, toy, attacks="[synbkd, badnet]")
    env = make_env(tmp_path)
    first = run_plan(plan_grid(load_grid(path), env), env)
    assert [o.status for o in first.outcomes] == ["failed", "failed", "ok", "ok"]
    assert "synbkd" in first.outcomes[0].error
    records = {r["cell_id"]: r for r in load_records(env.results_dir)}
    assert sorted(r["status"] for r in records.values()) == ["failed", "failed", "ok", "ok"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (env.results_dir / "records").iterdir()}

    rerun = plan_grid(load_grid(path), env)
    assert (rerun.summary(env.cache).to_run, rerun.summary(env.cache).failed) == (0, 2)
    assert run_plan(rerun, env).outcomes == []

    retry = plan_grid(load_grid(path), env, retry_failed=True)
    outcomes = run_plan(retry, env).outcomes
    assert [o.status for o in outcomes] == ["failed", "failed"]
    after = {p.name: p.stat().st_mtime_ns for p in (env.results_dir / "records").iterdir()}
    ok_files = [f"{i}.json" for i, r in records.items() if r["status"] == "ok"]
    assert all(after[name] == stamps[name] for name in ok_files)  # finished cells untouched
    assert all(after[name] != stamps[name] for name in after if name not in ok_files)


def test_grid_command_exit_codes_and_second_run_plans_nothing(tmp_path, toy):
    path = toy_grid(tmp_path, toy, attacks="[synbkd, badnet]")
    common = ["--results-dir", tmp_path / "results", "--cache-dir", tmp_path / "cache"]
    first = invoke("grid", path, *common)
    assert first.exit_code == 1 and "2 of 4 cells ok, 2 failed" in first.output, first.output
    plan = json.loads(invoke("grid", path, "--dry-run", "--json", *common).output)
    assert (plan["done"], plan["failed"], plan["to_run"]) == (2, 2, 0)
    good = toy_grid(tmp_path, toy, attacks="[badnet]")
    assert invoke("grid", good, "--quiet", *common).exit_code == 0  # its two cells are done already


def test_cache_dir_also_holds_the_models_built_on_first_use(tmp_path, toy, monkeypatch):
    """tiny-bert (like SmolLM2's converted copy) is built on first use: under --cache-dir, not the default."""
    default = tmp_path / "default-cache"
    monkeypatch.setenv("NLPBD_CACHE", str(default))
    path = toy_grid(tmp_path, toy, attacks="[badnet]")
    assert invoke("grid", path, "--dry-run", "--results-dir", tmp_path / "r", "--cache-dir",
                  tmp_path / "chosen").exit_code == 0
    assert (tmp_path / "chosen" / "models" / "tiny-bert-v2" / "model.safetensors").is_file()
    assert not (default / "models").exists()


def test_dry_run_estimates_the_time_from_timed_records(tmp_path, toy):
    path = toy_grid(tmp_path, toy, attacks="[badnet]")
    done = tmp_path / "done"
    assert invoke("grid", path, "--quiet", "--results-dir", done, "--cache-dir", tmp_path / "cache").exit_code == 0
    fresh = ["--results-dir", tmp_path / "fresh", "--cache-dir", tmp_path / "empty-cache"]
    blind = json.loads(invoke("grid", path, "--dry-run", "--json", *fresh).output)["estimate"]
    assert blind["records"] == 0 and blind["seconds"] == 0
    assert (blind["cells_untimed"], blind["trainings_untimed"]) == (2, 1)
    plan = json.loads(invoke("grid", path, "--dry-run", "--json", *fresh, "--timings-from", done).output)
    estimate = plan["estimate"]
    assert estimate["records"] == 2 and estimate["cells_timed"] == plan["to_run"] == 2
    assert estimate["trainings_timed"] == 1 and estimate["trainings_untimed"] == 0  # the victim (eval.floor is off)
    assert estimate["seconds"] > 0
    text = invoke("grid", path, "--dry-run", *fresh, "--timings-from", done).output
    assert "estimated time: about" in text


def test_local_workers_give_the_same_records(tmp_path, toy):
    path = toy_grid(tmp_path, toy, attacks="[badnet, addsent]", defenses="[none]")
    sequential, parallel = make_env(tmp_path / "a"), make_env(tmp_path / "b")
    run_plan(plan_grid(load_grid(path), sequential), sequential)
    plan = plan_grid(load_grid(path), parallel)
    outcomes = run_plan(plan, parallel, workers=2).outcomes
    assert sorted(o.status for o in outcomes) == ["ok", "ok"]
    expected = {r["cell_id"]: r["status"] for r in load_records(sequential.results_dir)}
    assert {r["cell_id"]: r["status"] for r in load_records(parallel.results_dir)} == expected
    assert with_state(plan, parallel.results_dir).summary(parallel.cache).to_run == 0


def test_a_worker_left_alone_takes_the_idle_cores():
    import torch

    busy = SimpleNamespace(value=2)
    share = CoreShare(busy, cores=4, every=0.0)
    previous = torch.get_num_threads()
    try:
        with share.task("training", 10) as advance:
            advance(1)
            assert torch.get_num_threads() == 2  # two busy workers split four cores
            busy.value = 1  # the other worker ran out of units
            advance(1)
            assert torch.get_num_threads() == 4
            busy.value = 8  # more workers than cores: never below one thread
            advance(1)
            assert torch.get_num_threads() == 1
        slow = CoreShare(SimpleNamespace(value=1), cores=3, every=3600.0)
        with slow.task("training", 10) as advance:
            advance(1)  # the first step checks
            torch.set_num_threads(2)
            advance(1)  # the next check is an hour away: left as it is
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_cells_of_a_cached_victim_spread_over_workers(tmp_path, toy):
    sweep = "[none, ft, {name: ft, variant: e2, set: {epochs: 2}}]"
    env = make_env(tmp_path)
    plan = plan_grid(load_grid(toy_grid(tmp_path, toy, attacks="[badnet, addsent]", defenses=sweep)), env)
    assert [len(unit) for unit in plan.work_units(env.cache)] == [3, 3]  # victims to train: a unit per group

    run_plan(plan_grid(load_grid(toy_grid(tmp_path, toy, attacks="[badnet]", defenses="[none]")), env), env)
    plan = plan_grid(load_grid(toy_grid(tmp_path, toy, attacks="[badnet, addsent]", defenses=sweep)), env)
    # badnet's victim is cached now: its two open cells are units of their own; addsent's group is not split
    assert [[c.spec.defense for c in unit] for unit in plan.work_units(env.cache)] == [
        ["ft"], ["ft"], ["none", "ft", "ft"]]
    outcomes = run_plan(plan, env, workers=2).outcomes
    assert sorted(o.status for o in outcomes) == ["ok"] * 5
    assert with_state(plan, env.results_dir).summary(env.cache).to_run == 0


def test_ray_executor_gives_the_same_records_as_local(tmp_path, toy):
    ray = pytest.importorskip("ray")
    path = toy_grid(tmp_path, toy, attacks="[badnet, addsent]", defenses="[none, ft, btu]")
    local, remote = make_env(tmp_path / "local"), make_env(tmp_path / "ray")
    run_plan(plan_grid(load_grid(path), local), local)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run = run_plan(plan_grid(load_grid(path), remote), remote, executor="ray")
    finally:
        ray.shutdown()
    assert sorted(o.status for o in run.outcomes) == ["ok"] * 6
    def results(directory) -> dict:  # wall times differ from run to run; every other number must not
        return {r["cell_id"]: {k: v for k, v in r["metrics"].items() if not k.endswith("_seconds")}
                for r in load_records(directory)}

    assert results(remote.results_dir) == results(local.results_dir)


def test_ray_executor_without_ray_says_how_to_install_it(tmp_path, toy, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # an import of ray now fails
    result = invoke("grid", toy_grid(tmp_path, toy), "--executor", "ray", "--results-dir", tmp_path / "r")
    assert result.exit_code == 2 and "pip install 'nlpbd[ray]'" in result.output, result.output


# --- reports --------------------------------------------------------------------------------------


def test_table_groups_by_threat_model_and_accepts_metric_labels(tmp_path, toy):
    path = toy_grid(tmp_path, toy)
    common = ["--results-dir", tmp_path / "results", "--cache-dir", tmp_path / "cache"]
    assert invoke("grid", path, "--quiet", *common).exit_code == 0
    md = invoke("table", "--results-dir", tmp_path / "results", "--include-collapsed", "--group-by",
                "threat-model", "-f", "md", "--metrics", "CAcc,ΔASR,time")
    assert md.exit_code == 0, md.output
    assert md.output.startswith("**data poisoning**\n") and "none ΔASR" in md.output and "ft Time (s)" in md.output
    csv = invoke("table", "--results-dir", tmp_path / "results", "--include-collapsed", "--group-by", "threat-model",
                 "-f", "csv").output
    assert csv.splitlines()[0].startswith("threat_model,dataset,model,attack,none_cacc")
    assert csv.splitlines()[1].startswith("data poisoning,toy,tiny-bert,badnet,")
    rows = json.loads(invoke("table", "--results-dir", tmp_path / "results", "-f", "json").output)
    assert {(r["defense"], r["threat_model"], r["defense_stage"]) for r in rows} == {
        ("none", "data poisoning", "no defense (the victim as trained)"),
        ("ft", "data poisoning", "repair the trained victim")}
