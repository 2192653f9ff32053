"""The CLI contract: commands, exit codes (0 ok, 1 run failure, 2 bad input) and one-line errors."""

from __future__ import annotations

import csv
import io
import json

import pytest
from helpers import write_toy_dataset
from typer.testing import CliRunner

from nlpbd.cli import app

FAST = ["--set", "train.epochs=1", "--set", "train.batch_size=16", "--set", "train.max_length=32",
        "--set", "eval.floor=false"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Two cells (none, ft) run through the CLI into one results directory."""
    root = tmp_path_factory.mktemp("cli")
    dataset = write_toy_dataset(root / "toy")
    results = root / "results"
    runner = CliRunner()
    outcomes = []
    for defense in ("none", "ft"):
        args = ["run", "--attack", "badnet", "--defense", defense, "--dataset", str(dataset), "--model", "tiny-bert",
                "--results-dir", str(results), "--cache-dir", str(root / "cache"), "--quiet", *FAST,
                "--set", "ft.epochs=1"] if defense == "ft" else \
               ["run", "--attack", "badnet", "--defense", defense, "--dataset", str(dataset), "--model", "tiny-bert",
                "--results-dir", str(results), "--cache-dir", str(root / "cache"), "--quiet", *FAST]
        outcomes.append(runner.invoke(app, args))
    return dataset, results, outcomes


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_run_writes_records(ran):
    _, results, outcomes = ran
    assert [o.exit_code for o in outcomes] == [0, 0], [o.output for o in outcomes]
    assert len(list((results / "records").glob("*.json"))) == 2


def test_table_formats(ran):
    _, results, _ = ran
    rows = json.loads(invoke("table", "--include-collapsed", "--results-dir", str(results), "--format", "json").output)
    assert {r["defense"] for r in rows} == {"none", "ft"}
    for key in ("dataset", "model", "attack", "defense", "seed", "cacc", "asr"):
        assert all(key in r for r in rows)
    csv_output = invoke("table", "--include-collapsed", "--results-dir", str(results), "-f", "csv").output
    csv_rows = list(csv.DictReader(io.StringIO(csv_output)))
    assert len(csv_rows) == 1 and "none_cacc" in csv_rows[0] and "ft_asr" in csv_rows[0]
    markdown = invoke("table", "--include-collapsed", "--results-dir", str(results), "-f", "md").output
    assert markdown.count("|") > 6 and "ft" in markdown
    latex = invoke("table", "--include-collapsed", "--results-dir", str(results), "-f", "latex").output
    assert "\\begin{tabular}" in latex
    rich_view = invoke("table", "--include-collapsed", "--results-dir", str(results))
    assert rich_view.exit_code == 0 and "badnet" in rich_view.output


def test_table_writes_a_file(ran, tmp_path):
    _, results, _ = ran
    target = tmp_path / "t.md"
    written = invoke("table", "--include-collapsed", "--results-dir", str(results), "-f", "md", "-o", str(target))
    assert written.exit_code == 0
    assert "none" in target.read_text()


def test_ls_lists_everything():
    result = invoke("ls")
    assert result.exit_code == 0
    for name in ("badnet", "addsent", "synbkd", "stylebkd", "none", "ft", "sst2", "olid", "agnews", "minilm",
                 "tiny-bert"):
        assert name in result.output
    settings = invoke("ls", "badnet")
    assert settings.exit_code == 0 and "attack.poison_rate" in settings.output


@pytest.mark.parametrize("args, fragments", [
    (["run", "--attack", "badnett"], ["unknown attack 'badnett'", "Did you mean 'badnet'"]),
    (["run", "--attack", "badnet", "--defense", "fine-tune"], ["unknown defense", "Did you mean"]),
    (["run", "--attack", "badnet", "--dataset", "sst"], ["unknown dataset 'sst'", "sst2"]),
    (["run", "--attack", "badnet", "--model", "minilmm"],
     ["model 'minilmm'", "Did you mean the registered model 'minilm'"]),
    (["run", "--attack", "badnet", "--set", "attack.rate=0.2"],
     ["unknown setting 'attack.rate'", "attack.poison_rate"]),
    (["run", "--attack", "badnet", "--set", "nonsense"], ["--set expects key=value"]),
    (["run", "--attack", "badnet", "--set", "attack.poison_rate=abc"], ["expected a number"]),
    (["run", "--attack", "badnet", "--set", "attack.poison_rate=1.5"], ["out of range"]),
    (["run", "--attack", "badnet", "--train-size", "0"], ["--train-size"]),
    (["run", "--attack", "badnet", "--test-size", "0"], ["--test-size must be positive, got 0"]),
    (["run", "--attack", "badnet", "--data-dir", "/nonexistent/dir"], ["/nonexistent/dir"]),
    (["run", "--attack", "badnet", "--dataset", "/nonexistent/folder"], ["does not exist"]),
    (["ls", "badnett"], ["Did you mean 'badnet'"]),
    (["run", "--attack", "badnet", "--variant", "a b"], ["--variant 'a b'", "+DEFENSE_LABEL"]),
    (["run", "--attack", "badnet", "--variant", "+"], ["--variant '+'"]),
])
def test_bad_input_is_one_line_and_exit_2(args, fragments):
    assert_one_line_error(invoke(*args), 2, *fragments)


def test_test_size_reaches_the_cell(tmp_path, monkeypatch):
    specs = []
    monkeypatch.setattr("nlpbd.pipeline.run_cell", lambda spec, env: specs.append(spec) or {})
    result = invoke("run", "--attack", "badnet", "--test-size", "25", "--train-size", "300",
                    "--results-dir", str(tmp_path), "--quiet")
    assert result.exit_code == 0, result.output
    assert [(s.train_size, s.test_size) for s in specs] == [(300, 25)]


def test_a_variant_label_keeps_a_changed_setting_apart_in_the_table(ran, tmp_path):
    dataset, results, _ = ran
    base = ["run", "--attack", "badnet", "--defense", "ft", "--dataset", str(dataset), "--model", "tiny-bert",
            "--results-dir", str(tmp_path), "--cache-dir", str(results.parent / "cache"), "--quiet", *FAST]
    assert invoke(*base, "--set", "ft.epochs=1").exit_code == 0
    unlabelled = CliRunner().invoke(app, [*base, "--set", "ft.epochs=2", "--set", "ft.lr=1e-4"])
    assert unlabelled.exit_code == 0
    assert "warning:" in unlabelled.stderr and "nlpbd run --variant" in unlabelled.stderr  # said at once
    table = ["table", "--results-dir", str(tmp_path), "--include-collapsed"]  # one tiny epoch: may be collapsed
    assert_one_line_error(invoke(*table), 2, "different settings")
    for record in (tmp_path / "records").glob("*.json"):
        if json.loads(record.read_text())["cell"]["defense_params"]["epochs"] == 2:
            record.unlink()
    labelled = CliRunner().invoke(app, [*base, "--set", "ft.epochs=2", "--set", "ft.lr=1e-4",
                                                        "--variant", "+ep2"])
    assert labelled.exit_code == 0 and "different settings" not in labelled.stderr, labelled.stderr
    rendered = invoke(*table, "--format", "csv", "--metrics", "cacc")
    assert rendered.exit_code == 0, rendered.output
    header = next(csv.reader(io.StringIO(rendered.output)))
    assert {"ft_cacc", "ft[ep2]_cacc"} <= set(header), header


def test_test_size_too_small_for_the_dataset_is_one_line(tmp_path):
    dataset = write_toy_dataset(tmp_path / "toy")
    result = invoke("run", "--attack", "badnet", "--dataset", str(dataset), "--model", "tiny-bert",
                    "--test-size", "3", "--results-dir", str(tmp_path / "r"))
    assert_one_line_error(result, 2, "--test-size 3 is too small (need at least 4)")


def test_malformed_dataset_file_names_file_and_line(tmp_path):
    folder = write_toy_dataset(tmp_path / "bad")
    lines = (folder / "train.tsv").read_text().splitlines()
    lines[5] = lines[5].split("\t")[0] + "\tpositive"
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    result = invoke("run", "--attack", "badnet", "--dataset", str(folder), "--model", "tiny-bert")
    assert_one_line_error(result, 2, "train.tsv line 6", "not an integer")


def test_table_without_records_is_an_input_error(tmp_path):
    assert_one_line_error(invoke("table", "--results-dir", str(tmp_path)), 2, "run `nlpbd run` first")
    assert_one_line_error(invoke("table", "--results-dir", str(tmp_path / "missing")), 2)


def test_unknown_table_metric_suggests(ran):
    _, results, _ = ran
    assert_one_line_error(invoke("table", "--results-dir", str(results), "--metrics", "cac"), 2, "cacc")


def test_table_shows_only_the_named_defenses(ran):
    _, results, _ = ran
    csv_output = invoke("table", "--include-collapsed", "--results-dir", str(results), "-f", "csv",
                        "--defenses", "ft").output
    header = next(csv.reader(io.StringIO(csv_output)))
    assert "ft_asr" in header and not any(column.startswith("none_") for column in header)
    assert_one_line_error(invoke("table", "--results-dir", str(results), "--defenses", "ft,btu"), 2,
                          "unknown defense 'btu'")


def test_run_failure_exits_1(tmp_path, monkeypatch):
    dataset = write_toy_dataset(tmp_path / "toy")

    def explode(*_args, **_kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr("nlpbd.pipeline.train_classifier", explode)
    result = invoke("run", "--attack", "badnet", "--dataset", str(dataset), "--model", "tiny-bert",
                    "--results-dir", str(tmp_path / "r"), "--quiet", *FAST)
    assert result.exit_code == 1
    assert "simulated crash" in result.output and "Traceback" not in result.output
    record = json.loads(next((tmp_path / "r" / "records").glob("*.json")).read_text())
    assert record["status"] == "failed" and "simulated crash" in record["error"]


def test_version():
    assert invoke("--version").output.startswith("nlpbd ")
