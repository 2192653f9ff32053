"""benchmarks/perf/throughput.py: one in-process run on tiny-bert writes a complete, consistent record."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
from helpers import toy_texts

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "perf" / "throughput.py"
ROWS = 64


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("perf_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def write_toy_dataset(folder: Path) -> Path:
    """A dataset folder in the tiny vocabulary (dev is carved from train by the loader)."""
    folder.mkdir(parents=True)
    for name, split in (("train", toy_texts(96, seed=1)), ("test", toy_texts(16, seed=2))):
        lines = ["sentence\tlabel", *(f"{t}\t{y}" for t, y in zip(split.texts, split.labels))]
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_throughput_script_writes_both_throughputs_and_machine_fields(tmp_path, monkeypatch):
    script = load_script(monkeypatch)
    data = write_toy_dataset(tmp_path / "toy")
    threads = torch.get_num_threads()
    argv = ["--model", "tiny-bert", "--dataset", str(data), "--rows", str(ROWS), "--epochs", "1",
            "--warmup-steps", "1", "--trainer-optim", "adamw_torch", "--device", "cpu", "--threads", "1",
            "--out", str(tmp_path / "out"), "--allow-busy"]
    try:
        path = script.main(argv)
    finally:
        torch.set_num_threads(threads)

    assert path.parent == tmp_path / "out"
    assert re.fullmatch(r"throughput-cpu-[a-z0-9.-]+-tiny-bert-\d{4}-\d{2}-\d{2}\.json", path.name)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    record = json.loads(path.read_text())
    nlpbd, trainer = record["nlpbd"], record["trainer"]
    assert nlpbd["samples_per_second"] > 0 and trainer["samples_per_second"] > 0
    assert trainer["metrics_samples_per_second"] > 0
    assert record["ratio"] == nlpbd["samples_per_second"] / trainer["samples_per_second"]
    assert nlpbd["samples_per_second"] == ROWS / nlpbd["seconds"]
    assert trainer["samples_per_second"] == ROWS / trainer["seconds"]
    assert trainer["optimizer"] == "adamw_torch"
    assert nlpbd["steps"] == trainer["steps"] == math.ceil(ROWS / 32)
    assert (record["model"], record["rows"], record["epochs"], record["batch_size"], record["max_length"]) == \
        ("tiny-bert", ROWS, 1, 32, 128)

    peer = record["peer"]
    assert peer["steps"] == nlpbd["steps"] and peer["samples_per_second"] == ROWS / peer["seconds"]
    assert record["ratio_vs_peer"] == nlpbd["samples_per_second"] / peer["samples_per_second"]
    assert record["compiled"] is None and record["compiled_vs_eager"] is None
    default = script.training_precision(torch.device("cpu"))
    other = {"fp32": "bf16", "bf16": "fp32"}[default]
    assert nlpbd["precision"] == default and record[default] == nlpbd  # the default's row, under its name too
    assert record[other] is None and record["bf16_vs_fp32"] is None  # the other arithmetic was not asked for
    breakdown = record["step_breakdown"]  # --profile-steps defaults to 20; 2 batches here, both untimed
    assert breakdown["steps"] == 0 and 0 < breakdown["embedding_fraction_of_parameters"] < 1
    use = record["utilisation"]
    assert use["peak_tflops"] is None and use["fraction_of_peak"] is None  # no peak known for a CPU
    assert use["model_tflops_per_second"] > 0
    load = record["load"]
    assert load["usable_cpus"] == len(os.sched_getaffinity(0)) and load["max_load_per_core"] == 0.5
    assert load["load_average_1min_max"] >= max(load["load_average_1min_before"], load["load_average_1min_after"])
    assert isinstance(load["busy"], bool)

    tokens = record["tokens"]
    assert tokens["real_tokens"] <= tokens["nlpbd_positions"] <= tokens["peer_positions"] <= ROWS * 128
    assert peer["positions"] == tokens["peer_positions"]
    assert trainer["positions"] == tokens["trainer_positions"] == ROWS * 128
    assert trainer["pad_fraction"] == 1 - tokens["real_tokens"] / (ROWS * 128)
    assert tokens["real_tokens"] <= nlpbd["positions"] <= trainer["positions"]
    assert nlpbd["positions"] <= ROWS * record["token_length"]["max"]
    assert record["token_length"]["mean"] == tokens["real_tokens"] / ROWS

    machine = record["machine"]
    assert machine["device"] == "cpu" and machine["torch_threads"] == 1
    assert machine["cpu_count"] == os.cpu_count()
    assert "hostname" not in machine  # opt-in (NLPBD_RECORD_HOST=1), as in result records
    assert machine["platform"] == platform.platform()
    assert record["provenance"]["torch"] == torch.__version__
    assert record["versions"]["transformers"] == record["provenance"]["transformers"]
    assert "--rows 64" in record["command"] and record["argv"] == argv


def test_throughput_script_refuses_a_busy_machine(tmp_path, monkeypatch):
    script = load_script(monkeypatch)
    data = write_toy_dataset(tmp_path / "toy")
    monkeypatch.setattr(script.os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    argv = ["--model", "tiny-bert", "--dataset", str(data), "--rows", "8", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="busy"):
        script.main(argv)
    assert not (tmp_path / "out").exists()


def test_load_monitor_marks_a_run_busy_when_the_load_rises(monkeypatch, tmp_path):
    script = load_script(monkeypatch)
    loads = iter([0.0] + [100.0] * 1000)
    monkeypatch.setattr(script.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    with script.LoadMonitor(interval=0.01) as monitor:
        import time
        time.sleep(0.05)
    summary = monitor.summary(0.5)
    assert summary["load_average_1min_before"] == 0.0 and summary["load_average_1min_max"] == 100.0
    assert summary["busy"] is True


def test_throughput_script_times_only_the_approaches_asked_for(tmp_path, monkeypatch):
    script = load_script(monkeypatch)
    data = write_toy_dataset(tmp_path / "toy")
    argv = ["--model", "tiny-bert", "--dataset", str(data), "--rows", "0", "--approaches", "nlpbd",
            "--warmup-steps", "0", "--device", "cpu", "--out", str(tmp_path / "out"), "--allow-busy",
            "--peak-tflops", "1.0"]
    record = json.loads(script.main(argv).read_text())
    assert record["rows"] == 86  # --rows 0: the whole split (96 rows less the 10% dev carve-out)
    assert record["peer"] is record["trainer"] is None and record["ratio"] is record["ratio_vs_peer"] is None
    assert record["fp32_vs_peer"] is record["bf16_vs_fp32"] is None  # only the default arithmetic was timed
    assert record["step_breakdown"]["steps"] == 1  # 3 batches, 2 untimed
    assert record["utilisation"]["fraction_of_peak"] == record["utilisation"]["model_tflops_per_second"]


@pytest.mark.slow
def test_compiled_row_is_timed_against_eager(tmp_path, monkeypatch):
    script = load_script(monkeypatch)
    data = write_toy_dataset(tmp_path / "toy")
    argv = ["--model", "tiny-bert", "--dataset", str(data), "--rows", "64", "--approaches", "nlpbd", "--compile",
            "--device", "cpu", "--out", str(tmp_path / "out"), "--allow-busy"]
    record = json.loads(script.main(argv).read_text())
    compiled = record["compiled"]
    assert compiled["steps"] == record["nlpbd"]["steps"] and compiled["warmup_and_compile_seconds"] > 0
    assert record["compiled_vs_eager"] == compiled["samples_per_second"] / record["nlpbd"]["samples_per_second"]


def test_bf16_row_and_step_breakdown_time_nlpbds_own_loop(tmp_path, monkeypatch):
    script = load_script(monkeypatch)
    data = write_toy_dataset(tmp_path / "toy")
    monkeypatch.setenv("NLPBD_RECORD_HOST", "1")
    argv = ["--model", "tiny-bert", "--dataset", str(data), "--rows", "0", "--approaches", "nlpbd,fp32,bf16",
            "--batch-size", "8", "--profile-steps", "3", "--warmup-steps", "0", "--device", "cpu",
            "--out", str(tmp_path / "out"), "--allow-busy"]
    record = json.loads(script.main(argv).read_text())
    fp32, bf16, nlpbd = record["fp32"], record["bf16"], record["nlpbd"]
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert record[nlpbd["precision"]] == nlpbd  # the default's pinned row is the default's own measurement
    assert bf16["steps"] == fp32["steps"] == nlpbd["steps"] == math.ceil(86 / 8)
    assert bf16["positions"] == fp32["positions"]  # the same batches, only the arithmetic differs
    assert record["bf16_vs_fp32"] == bf16["samples_per_second"] / fp32["samples_per_second"]
    assert record["bf16_vs_peer"] is None and record["fp32_vs_peer"] is None  # no peer row asked for
    breakdown = record["step_breakdown"]
    assert breakdown["steps"] == 3
    for precision in ("fp32", "bf16"):
        parts = breakdown[precision]
        assert set(parts["seconds_per_step"]) == set(script.STEP_PARTS)
        assert all(v > 0 for v in parts["seconds_per_step"].values())
        assert math.isclose(sum(parts["fractions"].values()), 1.0)
        assert math.isclose(parts["step_seconds"], sum(parts["seconds_per_step"].values()))
    assert record["machine"]["hostname"] == socket.gethostname()


def test_sft_step_script_times_both_losses_on_the_same_batches(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("perf_sft_step", SCRIPT.parent / "sft_step.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)
    spec.loader.exec_module(script)
    data = write_toy_dataset(tmp_path / "toy")
    threads = torch.get_num_threads()
    try:
        path = script.main(["--model", "tiny-llama", "--dataset", str(data), "--rows", "32", "--batch-size", "8",
                            "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "out"), "--allow-busy"])
    finally:
        torch.set_num_threads(threads)
    record = json.loads(path.read_text())
    assert record["steps"] == 4 and all(len(v) == 4 for v in record["step_seconds"].values())
    median = record["median_step_seconds"]
    assert record["ratio"] == median["full_vocab"] / median["nlpbd"] > 0
    losses = record["first_batch_loss"]  # the same loss, computed two ways
    assert losses["nlpbd"] == pytest.approx(losses["full_vocab"], rel=2e-2)
    assert "busy" in record and record["load_average_1min_before"] >= 0
