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
            "--out", str(tmp_path / "out")]
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

    tokens = record["tokens"]
    assert trainer["positions"] == tokens["trainer_positions"] == ROWS * 128
    assert trainer["pad_fraction"] == 1 - tokens["real_tokens"] / (ROWS * 128)
    assert tokens["real_tokens"] <= nlpbd["positions"] <= trainer["positions"]
    assert nlpbd["positions"] <= ROWS * record["token_length"]["max"]
    assert record["token_length"]["mean"] == tokens["real_tokens"] / ROWS

    machine = record["machine"]
    assert machine["device"] == "cpu" and machine["torch_threads"] == 1
    assert machine["cpu_count"] == os.cpu_count()
    assert machine["hostname"] == socket.gethostname()
    assert machine["platform"] == platform.platform()
    assert record["provenance"]["torch"] == torch.__version__
    assert record["versions"]["transformers"] == record["provenance"]["transformers"]
    assert "--rows 64" in record["command"] and record["argv"] == argv
