"""Training throughput: nlpbd's loop against a stock ``transformers.Trainer`` and the peers' loop, same rows.

nlpbd tokenizes a split once and pads each batch only to its longest row, with batches grouped by
length (``nlpbd.training``). The plain approach tokenizes with ``padding="max_length"`` and trains
with a stock ``Trainer``. Both train a fresh copy of the same model (same seed, so the same
classification-head init) on the same rows with the same lr / epochs / batch size / weight decay /
warm-up ratio / gradient clipping, and each is timed with a wall clock around its train call.

What is inside each clock, and what differs beyond the padding (all recorded in the JSON):
- nlpbd's clock includes its tokenization (``train_classifier`` tokenizes inside); the Trainer's
  rows are tokenized before its clock starts (``trainer.tokenize_seconds``). Both models are moved
  to the device before their clocks start.
- The Trainer keeps its default optimizer (``adamw_torch_fused``) unless ``--trainer-optim`` is given;
  nlpbd uses ``torch.optim.AdamW`` with its default implementation (a per-parameter loop on CPU,
  ``foreach`` on CUDA).
- ``--warmup-steps N`` first runs N steps of each approach's own loop on a throwaway copy of its
  model, untimed, so one-off costs (allocator, kernel selection, thread pools) hit neither clock.
- The 1-minute load average before and after each timed run is recorded: on a shared machine it
  shows how much other work competed for the CPU.
- Peak RSS is cumulative for the process (``ru_maxrss``): the value after the nlpbd run covers
  only nlpbd; the final value covers both.

- The peers' habit (OpenBackdoor and most research code): dynamic padding, but batches in random
  order, with nlpbd's own optimizer, schedule and clipping (``peer``). nlpbd / peer isolates what
  length grouping buys; nlpbd / Trainer adds the cost of padding every row to ``max_length``.
- ``--compile`` adds nlpbd's loop with ``train.compile`` on (``torch.compile``, dynamic shapes); its
  warm-up steps, which include the compilation, run on the timed model itself and are timed apart.
- The ``nlpbd`` row is nlpbd's loop at its default arithmetic on this device (``train.precision=auto``:
  bf16 autocast on a GPU with bf16 or a CPU with AVX512-BF16 / AMX, fp32 elsewhere; the row records
  which). ``--approaches ...,fp32`` / ``...,bf16`` add the loop pinned to that arithmetic (a pinned row
  equal to the default is the default's measurement, not a second run). The peers' loop and the Trainer
  run fp32 on a CPU, as the peers do, so ``ratio_vs_peer`` (default vs the peers' habit) can include a
  precision change; ``fp32_vs_peer`` is the like-for-like gain of length grouping alone.
- ``--profile-steps N`` (default 20) times the parts of nlpbd's step (forward, backward, clipping,
  optimizer, zeroing) over N length-grouped batches, fp32 and bf16: it shows what the dense AdamW
  update of the word-embedding matrix can cost at most.
- Timings taken while other work runs are noise. The script refuses to start when the 1-minute
  load per usable core is above ``--max-load-per-core`` (0.5), samples the load every second while
  it runs, and marks the record ``busy`` (and says so) when the load rose above it during the run;
  ``--allow-busy`` measures anyway, for tests and for machines that are never quiet.

Run: ``.venv/bin/python benchmarks/perf/throughput.py --model minilm --rows 512 --epochs 1``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

from nlpbd.cache import atomic_write_text
from nlpbd.config import TrainConfig
from nlpbd.data import TextSplit, load_dataset
from nlpbd.models import load_classifier, load_tokenizer, resolve_model
from nlpbd.provenance import RECORD_HOST, package_versions, peak_rss_mb, provenance
from nlpbd.seeding import seed_everything, torch_generator
from nlpbd.training import (
    autocast,
    collate,
    encode,
    length_grouped_batches,
    make_adamw,
    optimizer_step,
    pad_id_of,
    train_classifier,
    training_precision,
    use_bf16,
)

SCHEMA = "nlpbd.perf/3"
TRAIN_STREAM = "train"  # train_classifier's default stream: its batch order draws from this generator
# A BERT-base-sized encoder (Devlin et al. 2019), randomly initialised: throughput does not depend
# on the weights, so GPU machines without hub access can still measure the papers' model size.
RANDOM_INIT_CONFIGS = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      max_position_embeddings=512),
}
RANDOM_INIT_TOKENIZER_MODEL = "minilm"
APPROACHES = {"nlpbd", "peer", "trainer", "fp32", "bf16"}


# --- arguments ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="minilm", help="registered model name, HF hub id or local path")
    parser.add_argument("--random-init-config", choices=sorted(RANDOM_INIT_CONFIGS), default=None,
                        help="ignore --model's weights: a randomly initialised model of this size "
                             f"(tokenizer of '{RANDOM_INIT_TOKENIZER_MODEL}')")
    parser.add_argument("--dataset", default="sst2", help="registered dataset name or dataset folder")
    parser.add_argument("--data-dir", default=None, help="benchmark data directory (default: automatic)")
    parser.add_argument("--rows", type=int, default=512, help="training rows (stratified subsample; 0: the whole "
                        "split, e.g. the 67k rows of sst2-glue for the GPU target)")
    parser.add_argument("--approaches", default="nlpbd,peer,trainer",
                        help="comma-separated subset of nlpbd,peer,trainer,fp32,bf16 to time (nlpbd is always timed)")
    parser.add_argument("--profile-steps", type=int, default=20,
                        help="steps of nlpbd's loop timed part by part (0: no breakdown)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, for the utilisation figure (default: known GPUs)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=2,
                        help="untimed training steps of each approach on a throwaway model copy before its "
                             "timed run (0: none); not the learning-rate warm-up")
    parser.add_argument("--trainer-optim", default=None,
                        help="TrainingArguments.optim for the Trainer (default: the stock default, fused AdamW); "
                             "'adamw_torch' matches nlpbd's unfused AdamW")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--machine", default=None, help="machine slug in the file name (default: derived)")
    parser.add_argument("--out", type=Path, default=Path("results/perf"), help="output directory")
    parser.add_argument("--compile", action="store_true", help="also time nlpbd's loop on a torch.compile'd model")
    parser.add_argument("--max-load-per-core", type=float, default=0.5,
                        help="refuse to start above this 1-minute load per usable core; mark the record busy "
                             "when the load rises above it during the run")
    parser.add_argument("--allow-busy", action="store_true", help="measure even on a busy machine (the record "
                        "says busy)")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.rows < 0:
        parser.error("--rows must be >= 0 (0: the whole split)")
    args.approaches = {"nlpbd", *(a.strip() for a in args.approaches.split(",") if a.strip())}
    if not args.approaches <= APPROACHES:
        parser.error(f"--approaches takes {', '.join(sorted(APPROACHES))}, got {','.join(sorted(args.approaches))}")
    if args.profile_steps < 0:
        parser.error("--profile-steps must be >= 0")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be >= 0")
    return args


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


# --- model and data -------------------------------------------------------------------------------


@dataclass
class ModelSource:
    """A tokenizer and a factory of fresh, identically initialised classifiers."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    build: Callable[[], PreTrainedModel]
    info: dict


def model_source(args: argparse.Namespace, num_labels: int) -> ModelSource:
    if args.random_init_config:
        return random_init_source(args.random_init_config, num_labels, args.seed)
    ref = resolve_model(args.model)

    def build() -> PreTrainedModel:
        torch.manual_seed(args.seed)  # the new classification head: same init for both approaches
        return load_classifier(ref, num_labels)

    return ModelSource(ref.name, load_tokenizer(ref), build,
                       {"location": ref.location, "identity": ref.identity, "random_init": None})


def random_init_source(size: str, num_labels: int, seed: int) -> ModelSource:
    tokenizer = load_tokenizer(resolve_model(RANDOM_INIT_TOKENIZER_MODEL))
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=num_labels,
                        **RANDOM_INIT_CONFIGS[size])

    def build() -> PreTrainedModel:
        torch.manual_seed(seed)
        return BertForSequenceClassification(config)

    return ModelSource(f"{size}-random", tokenizer, build,
                       {"random_init": size, "tokenizer": RANDOM_INIT_TOKENIZER_MODEL, **RANDOM_INIT_CONFIGS[size]})


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- padding statistics ---------------------------------------------------------------------------


def token_statistics(lengths: list[int], config: TrainConfig, seed: int) -> dict:
    """Positions each approach feeds the model (real tokens + padding), over all epochs.

    nlpbd's and the peer loop's batches are replayed from the generator their timed runs draw them
    from, so the counts are exact; the Trainer pads every row to ``max_length``.
    """
    generator = torch_generator(seed, TRAIN_STREAM)
    nlpbd_positions = 0
    for _ in range(config.epochs):
        for batch in length_grouped_batches(lengths, config.batch_size, generator):
            nlpbd_positions += len(batch) * max(lengths[i] for i in batch)
    generator = torch_generator(seed, TRAIN_STREAM)
    peer_positions = 0
    for _ in range(config.epochs):
        for batch in random_order_batches(len(lengths), config.batch_size, generator):
            peer_positions += len(batch) * max(lengths[i] for i in batch)
    real = sum(lengths) * config.epochs
    trainer_positions = len(lengths) * config.max_length * config.epochs
    return {
        "real_tokens": real,
        "nlpbd_positions": nlpbd_positions,
        "peer_positions": peer_positions,
        "trainer_positions": trainer_positions,
        "nlpbd_pad_fraction": 1 - real / nlpbd_positions,
        "peer_pad_fraction": 1 - real / peer_positions,
        "trainer_pad_fraction": 1 - real / trainer_positions,
        "positions_saved_fraction": 1 - nlpbd_positions / trainer_positions,
    }


def length_summary(lengths: list[int], max_length: int) -> dict:
    return {"mean": sum(lengths) / len(lengths), "max": max(lengths), "min": min(lengths),
            "rows_at_max_length": sum(n >= max_length for n in lengths)}


# --- utilisation ----------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched by name.
BF16_PEAK_TFLOPS = {"h200": 989.4, "h100 sxm": 989.4, "h100": 756.0, "a100": 312.0, "l40s": 362.0, "a10g": 70.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def utilisation(non_embedding_parameters: int, positions: int, seconds: float, peak: float | None) -> dict:
    """Model FLOPs of the positions computed, 6 · (non-embedding parameters) per position (Kaplan et al.
    2020; attention's sequence-length term is left out, small at SST-2 lengths), against the peak."""
    achieved = 6 * non_embedding_parameters * positions / seconds / 1e12
    return {"model_tflops_per_second": achieved, "peak_tflops": peak,
            "fraction_of_peak": achieved / peak if peak else None}


# --- the machine's load ---------------------------------------------------------------------------


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def load_per_core() -> float:
    return os.getloadavg()[0] / usable_cpus()


class LoadMonitor:
    """Samples the 1-minute load average once a second in a daemon thread while the runs go on."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.samples = interval, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self, threshold_per_core: float) -> dict:
        peak = max(self.samples)
        # The load average includes this process's own threads: allow for them before calling it busy.
        own = torch.get_num_threads()
        return {"load_average_1min_before": self.samples[0], "load_average_1min_max": peak,
                "load_average_1min_after": self.samples[-1], "usable_cpus": usable_cpus(),
                "own_threads": own, "max_load_per_core": threshold_per_core,
                "busy": (peak - own) / usable_cpus() > threshold_per_core}


def check_quiet(args: argparse.Namespace) -> None:
    load = load_per_core()
    if load > args.max_load_per_core and not args.allow_busy:
        raise SystemExit(f"the machine is busy (1-minute load {os.getloadavg()[0]:.2f} on {usable_cpus()} cores, "
                         f"{load:.2f} per core > {args.max_load_per_core}): timings would be noise; wait for a quiet "
                         "machine, or pass --allow-busy to measure anyway (the record will say busy)")


# --- the approaches -------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def run_nlpbd(source: ModelSource, rows: TextSplit, config: TrainConfig, seed: int, warmup_steps: int,
              device: torch.device) -> dict:
    model = source.build().to(device)
    if warmup_steps:
        warm_rows = rows.subset(range(min(len(rows), warmup_steps * config.batch_size)))
        train_classifier(copy.deepcopy(model), source.tokenizer, warm_rows, None, replace(config, epochs=1), seed,
                         device=device)
    reset_gpu_peak(device)
    synchronize(device)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    result = train_classifier(model, source.tokenizer, rows, None, config, seed, device=device)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"samples_per_second": len(rows) * config.epochs / seconds, "seconds": seconds, "steps": result.steps,
            "load_average_1min": [load_before, os.getloadavg()[0]],
            "internal_samples_per_second": result.samples_per_second, "optimizer": "torch.optim.AdamW (fused)",
            "parameters": parameter_count(model),
            "non_embedding_parameters": parameter_count(model) - model.get_input_embeddings().weight.numel(),
            "peak_gpu_mb": gpu_peak_mb(device), "peak_rss_mb_after": peak_rss_mb()}


def random_order_batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """The peers' batches: a fresh random order each epoch, cut into consecutive batches."""
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def train_peer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: TextSplit, config: TrainConfig,
               seed: int, device: torch.device) -> int:
    """Dynamic padding in random order with nlpbd's optimizer, schedule and clipping; returns the steps."""
    model.to(device)
    seed_everything(seed, TRAIN_STREAM)
    generator = torch_generator(seed, TRAIN_STREAM)
    encoded = encode(tokenizer, rows, config.max_length)
    total = config.epochs * math.ceil(len(encoded) / config.batch_size)
    optimizer = make_adamw(model, config.lr, config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total), max(total, 1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    steps = 0
    for _ in range(config.epochs):
        for indices in random_order_batches(len(encoded), config.batch_size, generator):
            batch = collate(encoded, indices, pad_id_of(tokenizer), device)
            with autocast(device):
                loss = model(**batch).loss
            optimizer_step(loss, trainable, config.grad_clip, optimizer, scheduler)
            steps += 1
    return steps


def timed(device: torch.device, run: Callable[[], object]) -> tuple[object, float]:
    reset_gpu_peak(device)
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return result, time.perf_counter() - start


def run_peer(source: ModelSource, rows: TextSplit, config: TrainConfig, seed: int, warmup_steps: int,
             device: torch.device) -> dict:
    model = source.build().to(device)
    if warmup_steps:
        warm_rows = rows.subset(range(min(len(rows), warmup_steps * config.batch_size)))
        train_peer(copy.deepcopy(model), source.tokenizer, warm_rows, replace(config, epochs=1), seed, device)
    steps, seconds = timed(device, lambda: train_peer(model, source.tokenizer, rows, config, seed, device))
    return {"samples_per_second": len(rows) * config.epochs / seconds, "seconds": seconds, "steps": steps,
            "optimizer": "torch.optim.AdamW (fused), as nlpbd", "batches": "random order, dynamic padding",
            "peak_gpu_mb": gpu_peak_mb(device), "peak_rss_mb_after": peak_rss_mb()}


def run_compiled(source: ModelSource, rows: TextSplit, config: TrainConfig, seed: int, warmup_steps: int,
                 device: torch.device) -> dict:
    """nlpbd's loop with ``train.compile`` on; the warm-up (the compilation) is timed apart."""
    model = source.build().to(device)
    config = replace(config, compile=True)
    warm_rows = rows.subset(range(min(len(rows), max(warmup_steps, 1) * config.batch_size)))
    _, compile_seconds = timed(device, lambda: train_classifier(model, source.tokenizer, warm_rows, None,
                                                                replace(config, epochs=1), seed, device=device))
    result, seconds = timed(device, lambda: train_classifier(model, source.tokenizer, rows, None, config, seed,
                                                             device=device))
    return {"samples_per_second": len(rows) * config.epochs / seconds, "seconds": seconds, "steps": result.steps,
            "warmup_and_compile_seconds": compile_seconds, "compile": "torch.compile(dynamic=True), default backend",
            "peak_gpu_mb": gpu_peak_mb(device), "peak_rss_mb_after": peak_rss_mb()}


def run_precisions(source: ModelSource, rows: TextSplit, config: TrainConfig, seed: int, warmup_steps: int,
                   device: torch.device, approaches: set[str]) -> dict[str, dict]:
    """nlpbd's loop at its default arithmetic (``nlpbd``, also filed under that arithmetic's name) and pinned
    to each asked-for other one."""
    default = training_precision(device, config.precision)
    runs = {"nlpbd": {**run_nlpbd(source, rows, replace(config, precision=default), seed, warmup_steps, device),
                      "precision": default}}
    runs[default] = runs["nlpbd"]
    for precision in ("fp32", "bf16"):
        if precision in approaches and precision != default:
            runs[precision] = {
                **run_nlpbd(source, rows, replace(config, precision=precision), seed, warmup_steps, device),
                "precision": precision}
    return runs


STEP_PARTS = ("forward", "backward", "clip", "optimizer", "zero_grad")


def step_breakdown(source: ModelSource, rows: TextSplit, config: TrainConfig, seed: int, steps: int,
                   device: torch.device) -> dict:
    """Seconds per step of each part of nlpbd's step (after two untimed steps), fp32 then bf16 autocast.

    The optimizer part is a fused AdamW over every parameter, the word embeddings included (a batch
    touches a few hundred of their rows): its share bounds what a row-sparse update could save.
    """
    model = source.build().to(device)
    encoded = encode(source.tokenizer, rows, config.max_length)
    batches = length_grouped_batches(encoded.lengths, config.batch_size, torch_generator(seed, TRAIN_STREAM))
    optimizer = make_adamw(model, config.lr, config.weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    out = {"steps": min(steps, max(len(batches) - 2, 0)),
           "embedding_fraction_of_parameters": model.get_input_embeddings().weight.numel() / parameter_count(model)}
    for precision in ("fp32", "bf16"):
        totals = dict.fromkeys(STEP_PARTS, 0.0)
        for n, indices in enumerate(batches[:out["steps"] + 2]):
            timed_parts = _timed_step(model, collate(encoded, indices, pad_id_of(source.tokenizer), device),
                                      trainable, config.grad_clip, optimizer, device, precision)
            if n >= 2:
                totals = {k: totals[k] + timed_parts[k] for k in STEP_PARTS}
        per_step = {k: v / max(out["steps"], 1) for k, v in totals.items()}
        step = sum(per_step.values())
        out[precision] = {"seconds_per_step": per_step, "step_seconds": step,
                          "fractions": {k: v / step if step else None for k, v in per_step.items()}}
    return out


def _timed_step(model, batch: dict, trainable: list, grad_clip: float, optimizer, device: torch.device,
                precision: str) -> dict:
    marks = [time.perf_counter()]

    def mark() -> None:
        synchronize(device)
        marks.append(time.perf_counter())

    with autocast(device, precision):
        loss = model(**batch).loss
    mark()
    loss.backward()
    mark()
    torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    mark()
    optimizer.step()
    mark()
    optimizer.zero_grad(set_to_none=True)
    mark()
    return {part: marks[i + 1] - marks[i] for i, part in enumerate(STEP_PARTS)}


def trainer_arguments(config: TrainConfig, seed: int, device: torch.device, output_dir: str,
                      optim: str | None, max_steps: int = -1) -> TrainingArguments:
    stock = {} if optim is None else {"optim": optim}
    return TrainingArguments(
        **stock,
        output_dir=output_dir, num_train_epochs=config.epochs, max_steps=max_steps,
        per_device_train_batch_size=config.batch_size, learning_rate=config.lr,
        weight_decay=config.weight_decay, warmup_steps=config.warmup_ratio, max_grad_norm=config.grad_clip,
        lr_scheduler_type="linear", seed=seed, data_seed=seed, eval_strategy="no", save_strategy="no",
        logging_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        use_cpu=device.type == "cpu", bf16=use_bf16(device))


def max_length_dataset(tokenizer: PreTrainedTokenizerBase, rows: TextSplit, max_length: int):
    """The plain approach: every row tokenized and padded to ``max_length``."""
    from datasets import Dataset

    columns = dict(tokenizer(list(rows.texts), padding="max_length", max_length=max_length, truncation=True))
    return Dataset.from_dict({**columns, "labels": list(rows.labels)})


def run_trainer(source: ModelSource, rows: TextSplit, config: TrainConfig, seed: int, warmup_steps: int,
                device: torch.device, optim: str | None) -> dict:
    start = time.perf_counter()
    dataset = max_length_dataset(source.tokenizer, rows, config.max_length)
    tokenize_seconds = time.perf_counter() - start
    model = source.build()
    with tempfile.TemporaryDirectory(prefix="nlpbd-perf-") as tmp:
        if warmup_steps:
            warm_args = trainer_arguments(config, seed, device, tmp, optim, max_steps=warmup_steps)
            Trainer(model=copy.deepcopy(model), args=warm_args, train_dataset=dataset).train()
        trainer = Trainer(model=model, args=trainer_arguments(config, seed, device, tmp, optim),
                          train_dataset=dataset)
        reset_gpu_peak(device)
        synchronize(device)
        load_before, start = os.getloadavg()[0], time.perf_counter()
        output = trainer.train()
        synchronize(device)
        seconds = time.perf_counter() - start
    return {"samples_per_second": len(rows) * config.epochs / seconds, "seconds": seconds,
            "load_average_1min": [load_before, os.getloadavg()[0]],
            "steps": output.global_step, "metrics_samples_per_second": output.metrics["train_samples_per_second"],
            "metrics": output.metrics, "tokenize_seconds": tokenize_seconds,
            "optimizer": getattr(trainer.args.optim, "value", str(trainer.args.optim)),
            "peak_gpu_mb": gpu_peak_mb(device), "peak_rss_mb_after": peak_rss_mb()}


# --- output ---------------------------------------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "unknown"


def machine_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return slug(f"cpu-{platform.machine()}-{os.cpu_count()}c")


def machine_info(device: torch.device) -> dict:
    return {"device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), **host_name(), "platform": platform.platform()}


def host_name() -> dict:
    """Opt-in, as in result records: committed files should not carry the machine's name."""
    return {"hostname": socket.gethostname()} if os.environ.get(RECORD_HOST) == "1" else {}


def command_line(argv: Sequence[str] | None) -> str:
    if argv is None:
        return shlex.join(sys.orig_argv)
    return shlex.join([sys.executable, __file__, *argv])  # main() called in-process


def build_record(args, source: ModelSource, dataset_name: str, rows: TextSplit, lengths: list[int],
                 config: TrainConfig, runs: dict[str, dict], load: dict, device: torch.device, argv) -> dict:
    nlpbd, trainer, peer, compiled = runs["nlpbd"], runs.get("trainer"), runs.get("peer"), runs.get("compiled")
    fp32, bf16 = runs.get("fp32"), runs.get("bf16")
    tokens = token_statistics(lengths, config, args.seed)
    for name, run in runs.items():
        if name == "breakdown":
            continue
        key = "nlpbd" if name in ("compiled", "fp32", "bf16") else name
        run.update(positions=tokens[f"{key}_positions"], pad_fraction=tokens[f"{key}_pad_fraction"])

    def speed(run: dict | None) -> float | None:
        return run["samples_per_second"] if run else None

    def ratio(a: dict | None, b: dict | None) -> float | None:
        return speed(a) / speed(b) if a and b else None

    return {
        "schema": SCHEMA, "model": source.name, "model_info": source.info, "dataset": dataset_name,
        "parameters": nlpbd.pop("parameters"), "rows": len(rows), "epochs": config.epochs,
        "utilisation": utilisation(nlpbd.pop("non_embedding_parameters"), tokens["nlpbd_positions"],
                                   nlpbd["seconds"], peak_tflops(device, args.peak_tflops)),
        "batch_size": config.batch_size, "max_length": config.max_length,
        "lr": config.lr, "seed": args.seed, "warmup_steps": args.warmup_steps,
        "recipe": {"weight_decay": config.weight_decay, "warmup_ratio": config.warmup_ratio,
                   "grad_clip": config.grad_clip, "bf16": use_bf16(device)},
        "token_length": length_summary(lengths, config.max_length), "tokens": tokens,
        "nlpbd": nlpbd, "trainer": trainer, "peer": peer, "compiled": compiled, "fp32": fp32, "bf16": bf16,
        "step_breakdown": runs.get("breakdown"), "load": load,
        "ratio": ratio(nlpbd, trainer),
        "ratio_vs_trainer_metrics": speed(nlpbd) / trainer["metrics_samples_per_second"] if trainer else None,
        "ratio_vs_peer": ratio(nlpbd, peer),
        "compiled_vs_eager": ratio(compiled, nlpbd),
        "fp32_vs_peer": ratio(fp32, peer), "bf16_vs_fp32": ratio(bf16, fp32), "bf16_vs_peer": ratio(bf16, peer),
        "peak_rss_mb": peak_rss_mb(), "machine": {"slug": args.machine or machine_slug(device),
                                                  **machine_info(device)},
        "provenance": provenance(device), "versions": package_versions(),
        "command": command_line(argv), "argv": list(sys.argv[1:] if argv is None else argv),
    }


def result_path(out: Path, record: dict) -> Path:
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    return out / f"throughput-{slug(record['machine']['slug'])}-{slug(record['model'])}-{date}.json"


def summary_line(record: dict, path: Path) -> str:
    line = (f"{record['model']} on {record['machine']['slug']} ({record['machine']['device_name']}, "
            f"{record['machine']['torch_threads']} threads), {record['rows']} rows x {record['epochs']} epoch(s): "
            f"nlpbd ({record['nlpbd']['precision']}) {record['nlpbd']['samples_per_second']:.1f} samples/s in "
            f"{record['nlpbd']['seconds']:.1f} s")
    for name, label, key in (("peer", "peer loop", "ratio_vs_peer"), ("trainer", "Trainer", "ratio"),
                             ("compiled", "compiled", "compiled_vs_eager"), ("fp32", "fp32 vs peer", "fp32_vs_peer"),
                             ("bf16", "bf16 vs fp32", "bf16_vs_fp32")):
        if record[name] and record[key] is not None:
            line += f", {label} {record[name]['samples_per_second']:.1f} ({record[key]:.2f}x)"
    if record["utilisation"]["fraction_of_peak"] is not None:
        line += f", {record['utilisation']['fraction_of_peak']:.1%} of the bf16 peak"
    load = record["load"]
    line += f"; load {load['load_average_1min_before']:.2f} -> max {load['load_average_1min_max']:.2f} -> {path}"
    if load["busy"]:
        line = "BUSY MACHINE, the timings are noise: " + line
    return line


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dataset = load_dataset(args.dataset, data_dir=args.data_dir, train_size=args.rows or None)
    rows = dataset.train
    source = model_source(args, dataset.num_labels)
    config = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                         select="last")
    lengths = encode(source.tokenizer, rows, config.max_length).lengths
    check_quiet(args)
    with LoadMonitor() as monitor:
        runs = run_precisions(source, rows, config, args.seed, args.warmup_steps, device, args.approaches)
        if "peer" in args.approaches:
            runs["peer"] = run_peer(source, rows, config, args.seed, args.warmup_steps, device)
        if "trainer" in args.approaches:
            runs["trainer"] = run_trainer(source, rows, config, args.seed, args.warmup_steps, device,
                                          args.trainer_optim)
        if args.compile:
            runs["compiled"] = run_compiled(source, rows, config, args.seed, args.warmup_steps, device)
        if args.profile_steps:
            runs["breakdown"] = step_breakdown(source, rows, config, args.seed, args.profile_steps, device)
    record = build_record(args, source, dataset.name, rows, lengths, config, runs,
                          monitor.summary(args.max_load_per_core), device, argv)
    path = result_path(args.out, record)
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False) + "\n")
    print(summary_line(record, path))
    return path


if __name__ == "__main__":
    main()
