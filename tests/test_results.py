"""Record files, the long frame, seed aggregation and the table exports (all offline, in-memory data)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from nlpbd.errors import InputError
from nlpbd.results import (
    METRICS,
    RECORDS_SUBDIR,
    SCHEMA,
    arithmetic_mix,
    default_metrics,
    export_json,
    export_table,
    format_cell,
    load_records,
    metric_key,
    read_record,
    records_frame,
    render_rich,
    select_defenses,
    summary_table,
    write_record,
)


def make_record(
    defense: str = "none",
    seed: int = 0,
    cacc: float | None = 0.9,
    asr: float | None = 1.0,
    *,
    attack: str = "badnet",
    variant: str | None = None,
    finetune: str = "full",
    train_size: int | None = 2000,
    test_size: int | None = None,
    train_params: dict | None = None,
    status: str = "ok",
    extra_metrics: dict | None = None,
    defense_seconds: float | None = None,
) -> dict:
    """A minimal but schema-shaped record; the cell_id mimics the runner's naming."""
    suffix = f"{variant or 'base'}-{train_size}-{len(train_params or {})}" + (f"-t{test_size}" if test_size else "")
    cell_id = f"sst2__minilm__{finetune}__{attack}__{defense}__s{seed}__{suffix}".replace("=", "-")
    metrics = {"cacc": cacc, "asr": asr, "asr_floor": 0.1, "delta_cacc": 0.0, "delta_asr": 0.0}
    metrics.update(extra_metrics or {})
    timings: dict = {"total_seconds": 10.0}
    if defense_seconds is not None:
        timings["defense_fit"] = {"seconds": defense_seconds, "cached": False}
    record = {
        "schema": SCHEMA,
        "cell_id": cell_id,
        "status": status,
        "error": None if status == "ok" else "boom",
        "cell": {
            "dataset": "sst2",
            "model": "minilm",
            "finetune": finetune,
            "attack": attack,
            "defense": defense,
            "seed": seed,
            "train_size": train_size,
            "variant": variant,
            "attack_params": {},
            "defense_params": {},
            "train_params": train_params or {},
            "budget_params": {},
        },
        "metrics": metrics if status == "ok" else {},
        "flags": {"weak_attack": False, "degraded_victim": False},
        "attack_info": {},
        "defense_info": {},
        "budget": {"n_c": 100, "ids_sha256": "x"},
        "timings": timings,
        "memory": {"peak_rss_mb": 100.0, "peak_gpu_mb": {"victim": None}},
        "provenance": {"nlpbd": "0.1.0"},
    }
    if test_size is not None:  # like the runner: records on the whole test split have no test_size key
        record["cell"]["test_size"] = test_size
    return record


# ------------------------------------------------------------------ files


def test_write_record_is_atomic_and_rerun_replaces(tmp_path: Path) -> None:
    record = make_record()
    path = write_record(tmp_path, record)
    assert path == tmp_path / RECORDS_SUBDIR / f"{record['cell_id']}.json"
    assert json.loads(path.read_text()) == record
    assert path.read_text().startswith('{\n  "schema"')  # indent 2, insertion order kept

    record["metrics"]["cacc"] = 0.5
    assert write_record(tmp_path, record) == path
    assert json.loads(path.read_text())["metrics"]["cacc"] == 0.5
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left


def test_write_record_writes_nan_as_null(tmp_path: Path) -> None:
    path = write_record(tmp_path, make_record(asr=float("nan")))
    assert json.loads(path.read_text())["metrics"]["asr"] is None


def test_write_record_rejects_unsafe_cell_id(tmp_path: Path) -> None:
    record = make_record()
    record["cell_id"] = "../escape"
    with pytest.raises(InputError, match="cell_id"):
        write_record(tmp_path, record)


def test_load_skips_dotfiles_and_foreign_schema(tmp_path: Path) -> None:
    write_record(tmp_path, make_record(seed=1))
    write_record(tmp_path, make_record(seed=0))
    records_dir = tmp_path / RECORDS_SUBDIR
    (records_dir / ".sst2.tmp.json").write_text("{ half a reco")
    (records_dir / "other.json").write_text(json.dumps({"schema": "someone.else/1", "cell_id": "x"}))
    (records_dir / "notes.txt").write_text("not json")
    loaded = load_records(tmp_path)
    assert [r["cell"]["seed"] for r in loaded] == [0, 1]  # file-name order


def test_corrupt_record_names_the_file(tmp_path: Path) -> None:
    records_dir = tmp_path / RECORDS_SUBDIR
    records_dir.mkdir(parents=True)
    bad = records_dir / "broken.json"
    bad.write_text('{"schema": "nlpbd.record/1", ')
    with pytest.raises(InputError, match="broken.json"):
        load_records(tmp_path)
    (records_dir / "list.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="list.json"):
        read_record(records_dir / "list.json")


def test_missing_results_dir_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nlpbd run"):
        load_records(tmp_path / "nope")


def test_existing_dir_without_records_is_empty(tmp_path: Path) -> None:
    assert load_records(tmp_path) == []
    (tmp_path / RECORDS_SUBDIR).mkdir()
    assert load_records(tmp_path) == []


# ------------------------------------------------------------------ long frame


def test_records_frame_columns_and_values() -> None:
    records = [
        make_record("none", 0, extra_metrics={"n_clean": 10}),
        make_record("strip", 0, extra_metrics={"frr": 0.05, "far": 0.2}, defense_seconds=3.5),
    ]
    frame = records_frame(records)
    assert list(frame.columns) == [
        "dataset", "model", "finetune", "train_size", "test_size", "attack", "defense", "variant", "seed", "status",
        "cacc", "asr", "frr", "far", "delta_cacc", "delta_asr", "asr_floor", "n_clean",
        "defense_seconds", "defense_total_seconds", "cell_id", "settings", "collapsed",
    ]  # fmt: skip
    assert len(frame) == 2
    assert frame.loc[1, "frr"] == 0.05 and math.isnan(frame.loc[0, "frr"])
    assert math.isnan(frame.loc[0, "defense_seconds"]) and frame.loc[1, "defense_seconds"] == 3.5
    assert math.isnan(frame.loc[0, "defense_total_seconds"]) and frame.loc[1, "defense_total_seconds"] == 3.5
    assert frame.loc[1, "cell_id"] == records[1]["cell_id"]


def test_records_frame_empty_keeps_core_columns() -> None:
    frame = records_frame([])
    assert frame.empty
    assert {"dataset", "defense", "seed", "cacc", "asr", "defense_seconds", "cell_id"} <= set(frame.columns)


# ------------------------------------------------------------------ summary


def three_seed_frame() -> pd.DataFrame:
    records = [
        make_record("strip", 0, 0.80, 0.10),
        make_record("ft", 0, 0.85, 0.30),
        make_record("none", 0, 0.9, 1.0),
        make_record("none", 1, 0.8, 1.0),
        make_record("none", 2, 1.0, 1.0),
        make_record("ft", 1, 0.87, 0.50),
        make_record("ft", 2, 0.89, 0.40),
    ]
    return records_frame(records)


def test_summary_mean_std_n_over_seeds() -> None:
    table = summary_table(three_seed_frame())
    key = ("sst2", "minilm", "badnet")  # finetune level dropped: every row is "full"
    assert list(table.mean.index.names) == ["dataset", "model", "attack"]
    assert table.mean.at[key, ("none", "cacc")] == pytest.approx(0.9)
    assert table.std.at[key, ("none", "cacc")] == pytest.approx(0.1)  # ddof=1 over 0.8, 0.9, 1.0
    assert table.std.at[key, ("none", "asr")] == pytest.approx(0.0)
    assert table.mean.at[key, ("ft", "asr")] == pytest.approx(0.4)
    assert table.std.at[key, ("ft", "asr")] == pytest.approx(0.1)
    assert table.n.at[key, ("none", "cacc")] == 3
    assert table.n.at[key, ("strip", "cacc")] == 1
    assert math.isnan(table.std.at[key, ("strip", "cacc")])  # n=1 -> NaN, not 0


def test_summary_keeps_training_sizes_apart() -> None:
    records = [make_record("none", 0, 0.80, 1.0, train_size=1000), make_record("none", 0, 0.90, 0.5, train_size=None)]
    table = summary_table(records_frame(records))
    assert list(table.mean.index.names) == ["dataset", "model", "train_size", "attack"]
    assert table.mean.at[("sst2", "minilm", "1000", "badnet"), ("none", "cacc")] == pytest.approx(0.80)
    assert table.mean.at[("sst2", "minilm", "all", "badnet"), ("none", "asr")] == pytest.approx(0.5)
    assert table.n.at[("sst2", "minilm", "all", "badnet"), ("none", "cacc")] == 1


def test_summary_keeps_test_sizes_apart_and_reads_old_records_as_all() -> None:
    old = make_record("none", 0, 0.80, 1.0)  # a record from before test_size: no key in its cell
    assert "test_size" not in old["cell"]
    frame = records_frame([old, make_record("none", 0, 0.90, 0.5, test_size=500)])
    assert frame["test_size"].isna().tolist() == [True, False]
    table = summary_table(frame)
    assert list(table.mean.index.names) == ["dataset", "model", "test_size", "attack"]
    assert table.mean.at[("sst2", "minilm", "all", "badnet"), ("none", "cacc")] == pytest.approx(0.80)
    assert table.mean.at[("sst2", "minilm", "500", "badnet"), ("none", "asr")] == pytest.approx(0.5)
    assert table.n.at[("sst2", "minilm", "500", "badnet"), ("none", "cacc")] == 1


def test_summary_with_one_test_size_has_no_test_size_level() -> None:
    table = summary_table(records_frame([make_record("none", seed, test_size=500) for seed in (0, 1)]))
    assert list(table.mean.index.names) == ["dataset", "model", "attack"]
    assert table.n.at[("sst2", "minilm", "badnet"), ("none", "cacc")] == 2


def test_summary_refuses_to_average_different_settings_as_seeds() -> None:
    records = [make_record("ft", 0, 0.9, 0.3), make_record("ft", 1, 0.7, 0.9, train_params={"epochs": 1})]
    with pytest.raises(InputError, match="different settings would be averaged as seeds"):
        summary_table(records_frame(records))


def test_summary_defense_order_none_ft_then_appearance() -> None:
    table = summary_table(three_seed_frame(), metrics=["asr"])
    assert table.defenses == ["none", "ft", "strip"]
    assert list(table.mean.columns) == [("none", "asr"), ("ft", "asr"), ("strip", "asr")]
    assert table.metrics == ["asr"]


def test_summary_excludes_failed_unless_asked() -> None:
    records = [
        make_record("none", 0, 0.9, 1.0),
        make_record("none", 1, status="failed"),
        make_record("onion", 0, status="failed"),
    ]
    frame = records_frame(records)
    table = summary_table(frame)
    assert table.defenses == ["none"]
    assert table.n.iloc[0][("none", "cacc")] == 1
    with_failed = summary_table(frame, include_failed=True)
    assert with_failed.defenses == ["none", "onion"]
    assert with_failed.n.iloc[0][("onion", "cacc")] == 0
    assert math.isnan(with_failed.mean.iloc[0][("onion", "cacc")])


def test_summary_all_failed_is_input_error() -> None:
    with pytest.raises(InputError, match="no successful records"):
        summary_table(records_frame([make_record(status="failed")]))


def test_summary_keeps_finetune_and_variant_labels() -> None:
    records = [
        make_record("none", 0, 0.9, 1.0, finetune="lora"),
        make_record("none", 0, 0.8, 0.9, variant="rate=0.2"),
    ]
    table = summary_table(records_frame(records))
    assert list(table.mean.index) == [
        ("sst2", "minilm", "full", "badnet[rate=0.2]"),
        ("sst2", "minilm", "lora", "badnet"),
    ]
    assert table.mean.at[("sst2", "minilm", "full", "badnet[rate=0.2]"), ("none", "asr")] == pytest.approx(0.9)


def test_unknown_metric_suggests() -> None:
    with pytest.raises(InputError, match="Did you mean 'asr'") as err:
        summary_table(three_seed_frame(), metrics=["asrr"])
    assert "cacc" in str(err.value)


def test_known_but_absent_metric_is_blank() -> None:
    table = summary_table(three_seed_frame(), metrics=["auroc"])
    assert table.mean.isna().all().all()
    assert (table.n == 0).all().all()


# ------------------------------------------------------------------ formatting and export


def test_format_cell() -> None:
    assert format_cell(0.9123, 0.0101, 3, "cacc") == "0.912 ± 0.010"
    assert format_cell(0.9123, 0.0101, 1, "cacc") == "0.912"
    assert format_cell(0.9123, float("nan"), 3, "cacc") == "0.912"
    assert format_cell(float("nan"), float("nan"), 0, "asr") == "–"
    assert format_cell(None, None, 0, "asr") == "–"
    assert format_cell(12.345, 1.26, 2, "defense_seconds") == "12.3 ± 1.3"
    assert format_cell(-0.0001, 0.0, 1, "delta_cacc") == "0.000"
    assert format_cell(-0.02, 0.0, 1, "delta_asr") == "-0.020"
    assert format_cell(0.9123, 0.0101, 2, "cacc", most=3) == "0.912 ± 0.010 (n=2)"  # fewer seeds than the rest
    assert format_cell(0.9123, 0.0101, 3, "cacc", most=3) == "0.912 ± 0.010"


def test_export_markdown() -> None:
    md = export_table(summary_table(three_seed_frame()), "md")
    lines = md.strip().split("\n")
    assert lines[0] == (
        "| dataset | model | attack | none CAcc | none ASR | ft CAcc | ft ASR | strip CAcc | strip ASR |"
    )
    assert lines[1] == "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    assert lines[2] == (
        "| sst2 | minilm | badnet | 0.900 ± 0.100 | 1.000 ± 0.000 | 0.870 ± 0.020 | 0.400 ± 0.100 | 0.800 (n=1) "
        "| 0.100 (n=1) |"
    )
    assert len(lines) == 3


def test_export_latex() -> None:
    records = [make_record("none", s, c, 1.0, attack="add_sent") for s, c in [(0, 0.8), (1, 1.0)]]
    tex = export_table(summary_table(records_frame(records)), "latex")
    assert tex.startswith("\\begin{tabular}{lllrr}\n\\toprule\n")
    assert "\\multicolumn{2}{c}{none}" in tex
    assert "\\cmidrule(lr){4-5}" in tex
    assert "sst2 & minilm & add\\_sent & 0.900 $\\pm$ 0.141 & 1.000 $\\pm$ 0.000 \\\\" in tex
    assert tex.rstrip().endswith("\\bottomrule\n\\end{tabular}")


def test_export_csv() -> None:
    csv = export_table(summary_table(three_seed_frame()), "csv")
    flat = pd.read_csv(io.StringIO(csv))
    assert list(flat.columns) == [
        "dataset", "model", "attack",
        "none_cacc", "none_cacc_std", "none_asr", "none_asr_std", "none_n",
        "ft_cacc", "ft_cacc_std", "ft_asr", "ft_asr_std", "ft_n",
        "strip_cacc", "strip_cacc_std", "strip_asr", "strip_asr_std", "strip_n",
    ]  # fmt: skip
    row = flat.iloc[0]
    assert row["none_cacc"] == pytest.approx(0.9) and row["none_cacc_std"] == pytest.approx(0.1)
    assert row["ft_asr"] == pytest.approx(0.4)
    assert (row["none_n"], row["ft_n"], row["strip_n"]) == (3, 3, 1)
    assert math.isnan(row["strip_cacc_std"])
    assert csv.splitlines()[1] == "sst2,minilm,badnet,0.9,0.1,1,0,3,0.87,0.02,0.4,0.1,3,0.8,,0.1,,1"


def test_export_json_rows() -> None:
    frame = three_seed_frame()
    rows = json.loads(export_json(frame))
    assert isinstance(rows, list) and len(rows) == 7
    required = {"dataset", "model", "attack", "defense", "seed", "cacc", "asr"}
    assert all(required <= set(row) for row in rows)
    assert rows[0]["defense"] == "strip" and rows[0]["seed"] == 0 and rows[0]["cacc"] == 0.8
    assert rows[0]["variant"] is None and rows[0]["defense_seconds"] is None  # NaN -> null


def test_unknown_format_suggests() -> None:
    with pytest.raises(InputError, match="Did you mean 'latex'"):
        export_table(summary_table(three_seed_frame()), "latx")


def test_render_rich_headers_and_cells() -> None:
    rich_table = render_rich(summary_table(three_seed_frame()), title="SST-2")
    headers = [str(col.header) for col in rich_table.columns]
    assert headers[:5] == ["dataset", "model", "attack", "none CAcc", "none ASR"]
    assert headers[-1] == "strip ASR"
    console = Console(file=io.StringIO(), width=200)
    console.print(rich_table)
    text = console.file.getvalue()
    assert "0.900 ± 0.100" in text and "SST-2" in text


def test_metric_labels() -> None:
    assert METRICS["delta_cacc"] == "ΔCAcc"
    assert METRICS["defense_seconds"] == "Time (s)"


def test_generator_rates_are_table_metrics() -> None:
    generator = make_record("none", finetune="sft-lora",
                            extra_metrics={"neither_rate": 0.02, "false_trigger_rate": 0.164})
    table = summary_table(records_frame([generator, make_record("none")]),
                          metrics=[metric_key("Neither"), metric_key("false_trigger_rate")])
    row = ("sst2", "minilm", "sft-lora", "badnet")
    assert table.mean.at[row, ("none", "false_trigger_rate")] == pytest.approx(0.164)
    assert table.mean.at[row, ("none", "neither_rate")] == pytest.approx(0.02)
    assert pd.isna(table.mean.at[("sst2", "minilm", "full", "badnet"), ("none", "neither_rate")])


def test_select_defenses_by_name_or_column_label() -> None:
    frame = records_frame([make_record("none"), make_record("btu"), make_record("btu", variant="+tune"),
                           make_record("psim")])
    assert sorted(select_defenses(frame, ["btu"])["variant"].fillna("-")) == ["+tune", "-"]
    only_tune = summary_table(select_defenses(frame, ["none", "btu[tune]"]))
    assert list(dict.fromkeys(only_tune.mean.columns.get_level_values("defense"))) == ["none", "btu[tune]"]
    with pytest.raises(InputError, match="Did you mean 'psim'"):
        select_defenses(frame, ["psimm"])
    with pytest.raises(InputError, match="no defenses"):
        select_defenses(frame, [])


def test_default_metrics_follow_what_the_records_measured():
    data_poisoning = records_frame([make_record("none"), make_record("ft")])
    assert default_metrics(data_poisoning) == ["cacc", "asr"]
    task_agnostic = make_record("none", attack="por", asr=None, extra_metrics={"aasr": 0.6, "masr": 0.9})
    assert default_metrics(records_frame([task_agnostic])) == ["cacc", "aasr", "masr"]
    assert default_metrics(records_frame([task_agnostic, make_record("none")])) == ["cacc", "asr", "aasr", "masr"]
    assert default_metrics(records_frame([make_record("none", cacc=None, asr=None)])) == ["cacc", "asr"]


def test_the_table_says_when_records_come_from_several_devices_or_arithmetics(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from nlpbd.cli import app

    gpu = {"device": "cuda", "device_name": "NVIDIA H200", "training_precision": "bf16"}
    for seed, prov in ((0, gpu), (1, gpu), (2, {"device": "cpu", "device_name": "x86_64", "bf16": False})):
        write_record(tmp_path, {**make_record("none", seed=seed), "provenance": prov})
    write_record(tmp_path, {**make_record("ft", status="failed"), "provenance": {"device": "tpu"}})  # not counted
    assert arithmetic_mix(load_records(tmp_path)) == {"NVIDIA H200 · bf16": 2, "x86_64 · fp32": 1}
    result = CliRunner().invoke(app, ["table", "--results-dir", str(tmp_path), "-f", "md"])
    assert result.exit_code == 0
    assert "records from 2 devices or training arithmetics: NVIDIA H200 · bf16 (2), x86_64 · fp32 (1)" in result.output
    write_record(tmp_path, {**make_record("none", seed=2), "provenance": gpu})  # the CPU seed rerun on the GPU
    assert "devices or training arithmetics" not in CliRunner().invoke(
        app, ["table", "--results-dir", str(tmp_path), "-f", "md"]).output
