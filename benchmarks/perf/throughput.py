"""Training throughput: nlpbd's loop against a stock ``transformers.Trainer``, same rows, same model.

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

Run: ``.venv/bin/python benchmarks/perf/throughput.py --model minilm --rows 512 --epochs 1``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import re
import shlex
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import (BertConfig, BertForSequenceClassification, PreTrainedModel,
                          PreTrainedTokenizerBase, Trainer, TrainingArguments)

from nlpbd.cache import atomic_write_text
from nlpbd.config import TrainConfig
from nlpbd.data import TextSplit, load_dataset
from nlpbd.models import load_classifier, load_tokenizer, resolve_model
from nlpbd.provenance import package_versions, peak_rss_mb, provenance
from nlpbd.seeding import torch_generator
from nlpbd.training import encode, length_grouped_batches, train_classifier, use_bf16

SCHEMA = "nlpbd.perf/1"
TRAIN_STREAM = "train"  # train_classifier's default stream: its batch order draws from this generator
# A BERT-base-sized encoder (Devlin et al. 2019), randomly initialised: throughput does not depend
# on the weights, so GPU machines without hub access can still measure the papers' model size.
RANDOM_INIT_CONFIGS = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      max_position_embeddings=512),
}
RANDOM_INIT_TOKENIZER_MODEL = "minilm"


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
    parser.add_argument("--rows", type=int, default=512, help="training rows (stratified subsample)")
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
    args = parser.parse_args(argv)
    for name in ("rows", "epochs", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
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

    nlpbd's batches are replayed from the same generator ``train_classifier`` draws them from, so
    the counts are exactly those of the timed run; the Trainer pads every row to ``max_length``.
    """
    generator = torch_generator(seed, TRAIN_STREAM)
    nlpbd_positions = 0
    for _ in range(config.epochs):
        for batch in length_grouped_batches(lengths, config.batch_size, generator):
            nlpbd_positions += len(batch) * max(lengths[i] for i in batch)
    real = sum(lengths) * config.epochs
    trainer_positions = len(lengths) * config.max_length * config.epochs
    return {
        "real_tokens": real,
        "nlpbd_positions": nlpbd_positions,
        "trainer_positions": trainer_positions,
        "nlpbd_pad_fraction": 1 - real / nlpbd_positions,
        "trainer_pad_fraction": 1 - real / trainer_positions,
        "positions_saved_fraction": 1 - nlpbd_positions / trainer_positions,
    }


def length_summary(lengths: list[int], max_length: int) -> dict:
    return {"mean": sum(lengths) / len(lengths), "max": max(lengths), "min": min(lengths),
            "rows_at_max_length": sum(n >= max_length for n in lengths)}


# --- the two approaches ---------------------------------------------------------------------------


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
            "internal_samples_per_second": result.samples_per_second, "optimizer": "torch.optim.AdamW",
            "parameters": parameter_count(model), "peak_gpu_mb": gpu_peak_mb(device),
            "peak_rss_mb_after": peak_rss_mb()}


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
            "torch_threads": torch.get_num_threads(), "hostname": socket.gethostname(),
            "platform": platform.platform()}


def command_line(argv: Sequence[str] | None) -> str:
    if argv is None:
        return shlex.join(sys.orig_argv)
    return shlex.join([sys.executable, __file__, *argv])  # main() called in-process


def build_record(args, source: ModelSource, dataset_name: str, rows: TextSplit, lengths: list[int],
                 config: TrainConfig, nlpbd: dict, trainer: dict, device: torch.device, argv) -> dict:
    tokens = token_statistics(lengths, config, args.seed)
    nlpbd.update(positions=tokens["nlpbd_positions"], pad_fraction=tokens["nlpbd_pad_fraction"])
    trainer.update(positions=tokens["trainer_positions"], pad_fraction=tokens["trainer_pad_fraction"])
    return {
        "schema": SCHEMA, "model": source.name, "model_info": source.info, "dataset": dataset_name,
        "parameters": nlpbd.pop("parameters"), "rows": len(rows), "epochs": config.epochs,
        "batch_size": config.batch_size, "max_length": config.max_length,
        "lr": config.lr, "seed": args.seed, "warmup_steps": args.warmup_steps,
        "recipe": {"weight_decay": config.weight_decay, "warmup_ratio": config.warmup_ratio,
                   "grad_clip": config.grad_clip, "bf16": use_bf16(device)},
        "token_length": length_summary(lengths, config.max_length), "tokens": tokens,
        "nlpbd": nlpbd, "trainer": trainer,
        "ratio": nlpbd["samples_per_second"] / trainer["samples_per_second"],
        "ratio_vs_trainer_metrics": nlpbd["samples_per_second"] / trainer["metrics_samples_per_second"],
        "peak_rss_mb": peak_rss_mb(), "machine": {"slug": args.machine or machine_slug(device),
                                                  **machine_info(device)},
        "provenance": provenance(device), "versions": package_versions(),
        "command": command_line(argv), "argv": list(sys.argv[1:] if argv is None else argv),
    }


def result_path(out: Path, record: dict) -> Path:
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    return out / f"throughput-{slug(record['machine']['slug'])}-{slug(record['model'])}-{date}.json"


def summary_line(record: dict, path: Path) -> str:
    return (f"{record['model']} on {record['machine']['slug']} ({record['machine']['device_name']}, "
            f"{record['machine']['torch_threads']} threads), {record['rows']} rows x {record['epochs']} epoch(s): "
            f"nlpbd {record['nlpbd']['samples_per_second']:.1f} samples/s, "
            f"Trainer {record['trainer']['samples_per_second']:.1f} samples/s, ratio {record['ratio']:.2f}x; "
            f"positions saved {record['tokens']['positions_saved_fraction']:.1%} -> {path}")


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dataset = load_dataset(args.dataset, data_dir=args.data_dir, train_size=args.rows)
    rows = dataset.train
    source = model_source(args, dataset.num_labels)
    config = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                         select="last")
    lengths = encode(source.tokenizer, rows, config.max_length).lengths
    nlpbd = run_nlpbd(source, rows, config, args.seed, args.warmup_steps, device)
    trainer = run_trainer(source, rows, config, args.seed, args.warmup_steps, device, args.trainer_optim)
    record = build_record(args, source, dataset.name, rows, lengths, config, nlpbd, trainer, device, argv)
    path = result_path(args.out, record)
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False) + "\n")
    print(summary_line(record, path))
    return path


if __name__ == "__main__":
    main()
