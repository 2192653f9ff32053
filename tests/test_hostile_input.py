"""Hostile input (issue 16): every bad input is one line and exit 2 before any work starts, nothing a run
computed is lost to a late error, and nothing surprising happens silently."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import toy_texts, write_split_tsv, write_toy_dataset
from typer.testing import CliRunner

from nlpbd.cli import app
from nlpbd.data import TextSplit

FAST = ["--set", "train.epochs=1", "--set", "train.batch_size=16", "--set", "train.max_length=32",
        "--set", "eval.floor=false"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    """Any training fails the test: bad input must be refused before work starts."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("nlpbd.pipeline.train_classifier", refuse)


@pytest.fixture
def toy(tmp_path) -> Path:
    return write_toy_dataset(tmp_path / "toy")


def run_args(dataset: Path, results: Path, *extra: str) -> list[str]:
    return ["run", "--attack", "badnet", "--dataset", str(dataset), "--model", "tiny-bert",
            "--results-dir", str(results), "--quiet", *FAST, *extra]


def no_records(results: Path) -> bool:
    return not list((results / "records").glob("*.json")) if (results / "records").is_dir() else True


# 1 --- output directories -------------------------------------------------------------------------


def test_results_dir_that_is_a_file_is_refused_before_training(toy, tmp_path, no_training):
    target = tmp_path / "FILE"
    target.write_text("x")
    one_line_error(invoke(*run_args(toy, target)), "results directory", "FILE")


def test_records_that_is_a_file_is_refused(toy, tmp_path, no_training):
    results = tmp_path / "r"
    results.mkdir()
    (results / "records").write_text("x")
    one_line_error(invoke(*run_args(toy, results)), "is not a directory")


def test_cache_dir_that_is_a_file_is_refused(toy, tmp_path, no_training):
    cache = tmp_path / "cache-file"
    cache.write_text("x")
    one_line_error(invoke(*run_args(toy, tmp_path / "r", "--cache-dir", str(cache))), "cache directory")


def test_table_output_into_a_file_path_is_one_line(tmp_path):
    from nlpbd.results import write_record

    write_record(tmp_path / "r", _record("c1", "none", 0.9))
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    one_line_error(invoke("table", "--results-dir", str(tmp_path / "r"), "-f", "md", "-o",
                          str(blocker / "t.md")), "--output directory")


def test_a_record_that_cannot_be_written_at_the_end_is_one_line_and_the_models_stay_cached(toy, tmp_path,
                                                                                           monkeypatch):
    from nlpbd import pipeline

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    cache = tmp_path / "cache"
    monkeypatch.setattr(pipeline, "write_record", disk_full)
    result = invoke(*run_args(toy, tmp_path / "r", "--cache-dir", str(cache)))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "No space left on device" in result.output and "cached" in result.output
    assert list((cache / "victim").glob("*/model.safetensors"))


# 2 --- YAML bombs -------------------------------------------------------------------------------------

BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
                 + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 12)]
                 + ["datasets: *a11", "attacks: [badnet]", "defenses: [none]"]) + "\n"


def test_a_billion_laughs_grid_is_refused_at_once(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    began = time.monotonic()
    one_line_error(invoke("validate", str(bomb)), "line 1", "anchors and aliases")
    assert time.monotonic() - began < 5


# 3 --- huge labels --------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["1000000", "1000000000"])
def test_a_huge_label_is_a_short_line(tmp_path, label, no_training):
    folder = write_toy_dataset(tmp_path / "toy")
    lines = (folder / "train.tsv").read_text().splitlines()
    lines[3] = lines[3].split("\t")[0] + "\t" + label
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    line = one_line_error(invoke(*run_args(folder, tmp_path / "r")), "train.tsv line 4", f"label {label}")
    assert len(line) < 300


def test_missing_classes_are_listed_briefly():
    from nlpbd.data import listing

    assert listing(list(range(3))) == "0, 1, 2"
    assert listing(list(range(50))).endswith("... (50 in all)")


# 4 --- non-finite numbers -----------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["badnet.poison_rate=.nan", "train.lr=.inf", "train.lr=-.inf",
                                     "budget.fraction=nan"])
def test_non_finite_numbers_are_refused(toy, tmp_path, setting, no_training):
    one_line_error(invoke(*run_args(toy, tmp_path / "r", "--set", setting)), "finite number")


def test_non_finite_numbers_in_a_grid_are_refused(tmp_path, toy):
    grid = tmp_path / "g.yaml"
    grid.write_text(f"datasets: [{toy}]\nmodels: [tiny-bert]\nattacks: [badnet]\ndefenses: [none]\n"
                    "set:\n  train.lr: .inf\n")
    one_line_error(invoke("validate", str(grid)), "line 6", "finite number")


# 5 --- tiny training sets ---------------------------------------------------------------------------


def _folder(tmp_path: Path, train: TextSplit, test_rows: int = 20) -> Path:
    folder = tmp_path / "small"
    folder.mkdir()
    write_split_tsv(folder / "train.tsv", train)
    write_split_tsv(folder / "test.tsv", toy_texts(test_rows, 3))
    return folder


@pytest.mark.parametrize("rows", [2, 4])
def test_too_few_rows_after_the_dev_carve_out(tmp_path, rows, no_training):
    folder = _folder(tmp_path, toy_texts(rows))
    one_line_error(invoke(*run_args(folder, tmp_path / "r")), "too few training rows", "dev carve-out")


def test_a_poison_rate_that_poisons_no_row_is_refused(tmp_path, no_training):
    folder = _folder(tmp_path, toy_texts(12))
    write_split_tsv(folder / "dev.tsv", toy_texts(4, 5))
    one_line_error(invoke(*run_args(folder, tmp_path / "r", "--set", "badnet.poison_rate=0.05")),
                   "poisons no row")
    assert no_records(tmp_path / "r")


# 6 --- model folders and settings refused up front, without a record ------------------------------------


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _model_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    return model


def test_a_malicious_pickle_is_bad_input_and_never_runs(tiny_dir, toy, tmp_path, no_training):
    model = _model_copy(tiny_dir, tmp_path)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"weight": Evil(marker)}, model / "pytorch_model.bin")
    result = invoke(*run_args(toy, tmp_path / "r")[:5], "--model", str(model), "--results-dir",
                    str(tmp_path / "r"), "--quiet", *FAST)
    one_line_error(result, "pytorch_model.bin", "weights-only loader")
    assert not marker.exists() and no_records(tmp_path / "r")


@pytest.mark.parametrize("damage, fragment", [
    ("remote_code", "auto_map"), ("corrupt_safetensors", "safetensors"), ("no_weights", "no model weights"),
])
def test_a_bad_model_folder_is_refused_without_a_record(tiny_dir, toy, tmp_path, damage, fragment, no_training):
    model = _model_copy(tiny_dir, tmp_path)
    if damage == "remote_code":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil.EvilModel"}}))
    elif damage == "corrupt_safetensors":
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (model / "model.safetensors").unlink()
    args = ["run", "--attack", "badnet", "--dataset", str(toy), "--model", str(model), "--results-dir",
            str(tmp_path / "r"), "--quiet", *FAST]
    one_line_error(invoke(*args), fragment)
    assert no_records(tmp_path / "r")


@pytest.mark.parametrize("setting, fragment", [("badnet.triggers=", "at least 1 item"),
                                               ("badnet.triggers=[cf, ' ']", "non-empty strings"),
                                               ("badnet.target_label=5", "out of range")])
def test_settings_are_refused_without_a_record(toy, tmp_path, setting, fragment, no_training):
    one_line_error(invoke(*run_args(toy, tmp_path / "r", "--set", setting)), fragment)
    assert no_records(tmp_path / "r")


# 7 --- hub ids without a slash ------------------------------------------------------------------------


def test_a_bare_hub_id_is_a_hub_model_and_offline_says_so(toy, tmp_path, monkeypatch, no_training):
    from huggingface_hub import constants

    from nlpbd.models import resolve_model

    assert resolve_model("distilbert-base-uncased").identity == "hub:distilbert-base-uncased@main"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = ["run", "--attack", "badnet", "--dataset", str(toy), "--model", "distilbert-base-uncased",
            "--results-dir", str(tmp_path / "r")]
    one_line_error(invoke(*args), "'distilbert-base-uncased'", "needs the HF hub")


# 8 --- no tracebacks ----------------------------------------------------------------------------------


def _record(cell_id: str, defense: str, cacc: float, collapsed: bool | None = None) -> dict:
    return {"schema": "nlpbd.record/1", "cell_id": cell_id, "status": "ok",
            "cell": {"dataset": "d", "model": "m", "finetune": "full", "attack": "badnet", "defense": defense,
                     "seed": 0},
            "metrics": {"cacc": cacc, "asr": 0.5}, "flags": {"collapsed_victim": collapsed},
            "attack_info": {"threat_model": "data poisoning"}, "defense_info": {"stage": "x"}, "timings": {}}


@pytest.mark.parametrize("field, value", [("cell", ["not", "an", "object"]), ("metrics", "high"),
                                          ("timings", [1, 2]), ("status", 3)])
def test_a_record_with_wrong_types_is_one_line(tmp_path, field, value):
    records = tmp_path / "records"
    records.mkdir()
    (records / "bad.json").write_text(json.dumps({**_record("bad", "none", 0.9), field: value}))
    one_line_error(invoke("table", "--results-dir", str(tmp_path)), "bad.json", field)


def test_a_grid_with_non_utf8_bytes_is_one_line(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_bytes(b"datasets: [sst2]\nattacks: [badnet]\ndefenses: [caf\xe9]\n")
    one_line_error(invoke("validate", str(grid)), "line 3", "not UTF-8")


# 9 --- no silent surprises ------------------------------------------------------------------------------


def test_a_stray_label_in_train_only_is_refused(tmp_path, no_training):
    folder = write_toy_dataset(tmp_path / "toy")
    with (folder / "train.tsv").open("a") as handle:
        handle.write("good movie\t2\n")
    one_line_error(invoke(*run_args(folder, tmp_path / "r")), "label 2", "never occurs in")


def test_an_empty_asr_set_is_flagged():
    """A test split with no row outside the target class (a registered dataset's subsample, say): ASR is
    not measured, so the record says so instead of a silent null."""
    from types import SimpleNamespace

    from nlpbd.pipeline import _flags

    cell = SimpleNamespace(eval=SimpleNamespace(weak_attack_margin=0.5, degraded_points=0.05))
    assert _flags(cell, {"n_poison": 0, "cacc": 0.9, "asr": None})["empty_asr_set"] is True
    assert _flags(cell, {"n_poison": 10, "cacc": 0.9, "asr": 0.5})["empty_asr_set"] is False


def test_a_grid_whose_excludes_remove_every_cell_warns(tmp_path, toy):
    grid = tmp_path / "g.yaml"
    grid.write_text(f"datasets: [{toy}]\nmodels: [tiny-bert]\nattacks: [badnet]\ndefenses: [none]\n"
                    "exclude:\n  - {attack: badnet}\n")
    result = invoke("validate", str(grid))
    assert "excludes remove every cell" in result.output


# 10 --- record permissions ---------------------------------------------------------------------------


def test_records_follow_the_umask(tmp_path):
    from nlpbd.results import write_record

    previous = os.umask(0o022)
    try:
        path = write_record(tmp_path, _record("c1", "none", 0.9))
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


# 12 --- light imports --------------------------------------------------------------------------------


LIGHT = """
import sys
from nlpbd.cli import app
try:
    app({args})
except SystemExit as exc:
    code = exc.code
print("TORCH" if "torch" in sys.modules or "transformers" in sys.modules else "LIGHT", code)
"""


@pytest.mark.parametrize("args, code", [(["ls"], 0), (["ls", "btu"], 0), (["ls", "models"], 0),
                                        (["run", "--attack", "badnte"], 2),
                                        (["run", "--attack", "badnet", "--set", "badnet.poison_rate=2"], 2)])
def test_names_and_settings_are_checked_without_torch(args, code):
    result = subprocess.run([sys.executable, "-c", LIGHT.format(args=args)], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip().splitlines()[-1] == f"LIGHT {code}", result.stdout + result.stderr


def test_the_catalogue_is_current():
    from nlpbd import catalogue

    assert json.loads(catalogue.CATALOGUE_FILE.read_text()) == json.loads(json.dumps(catalogue.build())), \
        "run `python -m nlpbd.catalogue` after changing a method's settings"


def test_catalogue_configs_check_like_the_real_ones():
    from nlpbd import catalogue
    from nlpbd.config import apply_overrides
    from nlpbd.methods import ATTACKS

    light = catalogue.methods("attack")["badnet"].Config()
    real = ATTACKS.get("badnet").Config()
    for raw in ({"poison_rate": "0.2"}, {"triggers": "cf,mn"}):
        assert vars(apply_overrides(light, raw, "attack")) == vars(apply_overrides(real, raw, "attack"))


def test_ls_lists_fine_tuning_and_model_defaults_and_full_types():
    listing = invoke("ls").output
    assert "finetune" in listing and "lora" in listing and "prefix" in listing
    models = invoke("ls", "models")
    assert models.exit_code == 0 and "5e-05" in models.output and "0.001" in models.output
    assert "list[str]" in invoke("ls", "btu").output


# 13 --- plain progress off a terminal ------------------------------------------------------------------


def test_plain_progress_lines_off_a_terminal(toy, tmp_path):
    args = ["run", "--attack", "badnet", "--dataset", str(toy), "--model", "tiny-bert", "--results-dir",
            str(tmp_path / "r"), *FAST]
    output = invoke(*args).output
    assert "stage victim" in output
    steps = [line for line in output.splitlines() if "training the victim: step" in line]
    assert steps and all(k in steps[-1] for k in ("loss", "samples/s", "elapsed", "(100%)"))


# 14 --- collapsed victims -------------------------------------------------------------------------------


def test_class_balance_sees_what_cacc_hides():
    import numpy as np

    from nlpbd.evaluation import class_balance

    test = TextSplit.build(["x"] * 10, [0] * 9 + [1])
    always_majority = class_balance(np.zeros(10, dtype=int), test)
    f1_majority = 2 * 0.9 * 1.0 / (0.9 + 1.0)  # precision 0.9, recall 1; the minority class scores 0
    assert always_majority == {"balanced_accuracy": 0.5, "macro_f1": pytest.approx(f1_majority / 2),
                               "majority_rate": 0.9, "predicted_classes": 1}
    perfect = class_balance(np.array([0] * 9 + [1]), test)
    assert perfect["balanced_accuracy"] == 1.0 and perfect["macro_f1"] == 1.0


def test_a_victim_that_always_answers_the_majority_is_flagged():
    from types import SimpleNamespace

    from nlpbd.pipeline import _flags

    cell = SimpleNamespace(eval=SimpleNamespace(weak_attack_margin=0.5, degraded_points=0.05))
    base = {"majority_rate": 0.88, "n_poison": 10}
    collapsed = _flags(cell, {**base, "victim_cacc": 0.88, "victim_predicted_classes": 1,
                              "clean_model_cacc": 0.88, "clean_model_predicted_classes": 2})
    assert collapsed["collapsed_victim"] is True and collapsed["collapsed_clean_model"] is True
    healthy = _flags(cell, {**base, "victim_cacc": 0.93, "victim_predicted_classes": 2})
    assert healthy["collapsed_victim"] is False and healthy["collapsed_clean_model"] is None


def test_tables_leave_collapsed_cells_out_unless_asked(tmp_path):
    from nlpbd.results import write_record

    write_record(tmp_path, _record("ok1", "none", 0.9, collapsed=False))
    write_record(tmp_path, {**_record("col1", "none", 0.5, collapsed=True), "cell": {
        **_record("x", "none", 0)["cell"], "seed": 1}})
    plain = invoke("table", "--results-dir", str(tmp_path), "-f", "csv")
    assert plain.exit_code == 0 and "0.9," in plain.output and "left out" in plain.output
    both = invoke("table", "--results-dir", str(tmp_path), "-f", "csv", "--include-collapsed")
    assert "0.7," in both.output


# 15 --- narrow terminals -----------------------------------------------------------------------------------


def test_a_narrow_table_keeps_its_row_labels(tmp_path):
    from rich.console import Console

    from nlpbd import results

    for i, defense in enumerate(("none", "finemix-epur")):
        record = _record(f"c{i}", defense, 0.912)
        record["cell"].update(dataset="sst2-glue", model="bert-base-uncased", attack="stylebkd")
        record["metrics"].update(delta_cacc=0.013, asr_floor=0.123)
        results.write_record(tmp_path, record)
    frame = results.records_frame(results.load_records(tmp_path))
    summary = results.summary_table(frame, ["cacc", "asr", "delta_cacc", "asr_floor"])
    parts = results.render_rich_fitted(summary, 80, title="t")
    assert len(parts) > 1
    for part in parts:
        with open(os.devnull, "w") as sink:
            console = Console(width=80, record=True, file=sink)
            console.print(part)
        text = console.export_text()
        assert all(label in text for label in ("sst2-glue", "bert-base-uncased", "stylebkd")), text
        assert "…" not in text, text


def test_an_unwritable_default_cache_is_one_line(toy, tmp_path, monkeypatch, no_training):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("NLPBD_CACHE", str(blocker))
    one_line_error(invoke(*run_args(toy, tmp_path / "r")), "not-a-dir")
    # --cache-dir replaces it for everything, the tiny model built on first use included (the run then
    # stops at no_training's refusal, not at the unwritable default)
    result = invoke(*run_args(toy, tmp_path / "r", "--cache-dir", str(tmp_path / "c")))
    assert "not-a-dir" not in result.output and "training started" in result.output
    assert (tmp_path / "c" / "models" / "tiny-bert-v2" / "model.safetensors").is_file()


def test_poisoning_that_eats_the_minority_class_warns(tmp_path, caplog):
    """88/12 data with the majority class as target: 10% of N relabels most minority rows (issue 16 #14)."""
    from nlpbd.data import load_dataset
    from nlpbd.methods import ATTACKS

    folder = tmp_path / "imbalanced"
    folder.mkdir()
    rows = toy_texts(200)
    majority = [i for i, y in enumerate(rows.labels) if y == 0] * 2
    keep = sorted(majority[:88]) + [i for i, y in enumerate(rows.labels) if y == 1][:12]
    write_split_tsv(folder / "train.tsv", TextSplit.build([rows.texts[i] + f" {n % 7}" for n, i in enumerate(keep)],
                                                          [rows.labels[i] for i in keep]))
    write_split_tsv(folder / "test.tsv", toy_texts(20, 3))
    dataset = load_dataset(str(folder))
    attack = ATTACKS.get("badnet")()
    with caplog.at_level("WARNING"):
        attack.check(replace_target(dataset, 0))
    assert "may collapse" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        attack.check(replace_target(dataset, 1))
    assert "may collapse" not in caplog.text


def replace_target(dataset, target: int):
    from dataclasses import replace

    return replace(dataset, default_target=target)
