"""The instruction-tuned generator's training step: nlpbd's answer-position loss vs the full-vocabulary loss.

Both approaches compute the same loss (cross-entropy over the answer tokens only) on the same batches of
chat-template prompts, on one model, in one process, interleaved step by step:

- ``nlpbd``: ``InstructionLM.sft_loss`` — left-padded rows, ``logits_to_keep`` = longest answer + 1, so
  only the answer positions are projected onto the vocabulary;
- ``full_vocab``: the usual causal-LM call, right-padded rows with ``labels`` (prompt positions -100),
  which projects every position onto the vocabulary and lets transformers shift and mask.

Each step is forward + backward (no optimiser step: the adapter's update costs the same for both), in the
CPU's bf16 autocast where ``train.precision=auto`` would use it. The record gives the median seconds per
step of each approach, their ratio, the two losses of the first batch (they agree up to bf16 rounding) and
the load average during the run (``busy``: see ``throughput.py``).

    .venv/bin/python benchmarks/perf/sft_step.py --model smollm2 --rows 64 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import LoadMonitor, check_quiet, pick_device, synchronize  # noqa: E402

from nlpbd.cache import atomic_write_text  # noqa: E402
from nlpbd.data import load_dataset  # noqa: E402
from nlpbd.finetune import FINETUNE, wrap  # noqa: E402
from nlpbd.generative import InstructionLM, _mask, _pad, load_generator, prompt_for, sft_example  # noqa: E402
from nlpbd.models import resolve_model  # noqa: E402
from nlpbd.training import autocast  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="registered decoder name, HF hub id or local path")
    parser.add_argument("--dataset", default="sst2", help="registered dataset name or dataset folder")
    parser.add_argument("--data-dir", default=None, help="benchmark data directory (default: automatic)")
    parser.add_argument("--finetune", choices=["sft-lora", "sft-lora-all", "sft"],
                        default="sft-lora")
    parser.add_argument("--rows", type=int, default=64, help="training rows (stratified subsample)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128, help="review tokens kept (the prompt adds more)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps of each approach first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("results/perf"), help="output directory")
    parser.add_argument("--max-load-per-core", type=float, default=0.5,
                        help="refuse to start above this 1-minute load average per usable core")
    parser.add_argument("--allow-busy", action="store_true", help="measure even on a busy machine (the record "
                        "says busy)")
    return parser.parse_args(argv)


def full_vocab_loss(model: InstructionLM, prompts: list[list[int]], labels: list[int],
                    device: torch.device) -> torch.Tensor:
    """The plain causal-LM loss: right-padded rows, every position projected onto the vocabulary."""
    pairs = [sft_example(p, model.ids.answers[y]) for p, y in zip(prompts, labels)]
    rows = [ids for ids, _ in pairs]
    return model.lm(input_ids=_pad(rows, model.ids.pad_id, device), attention_mask=_mask(rows, device),
                    labels=_pad([lm for _, lm in pairs], -100, device)).loss


def nlpbd_loss(model: InstructionLM, prompts: list[list[int]], labels: list[int],
               device: torch.device) -> torch.Tensor:
    return model.sft_loss(prompts, labels, device)


APPROACHES = {"nlpbd": nlpbd_loss, "full_vocab": full_vocab_loss}


def timed_step(loss_fn, model: InstructionLM, batch: tuple[list[list[int]], list[int]],
               device: torch.device) -> tuple[float, float]:
    """Seconds of one forward + backward, and its loss."""
    model.zero_grad(set_to_none=True)
    synchronize(device)
    start = time.perf_counter()
    with autocast(device, "auto"):
        loss = loss_fn(model, *batch, device)
    loss.backward()
    synchronize(device)
    return time.perf_counter() - start, float(loss.detach())


def batches(model: InstructionLM, tokenizer, texts: list[str], labels: list[int], size: int,
            max_length: int) -> list[tuple[list[list[int]], list[int]]]:
    encoded = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"]
    prompts = [model.ids.prompt(ids) for ids in encoded]
    return [(prompts[i:i + size], labels[i:i + size]) for i in range(0, len(prompts), size)]


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    check_quiet(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dataset = load_dataset(args.dataset, args.data_dir, train_size=args.rows)  # stratified, seeded
    rows = dataset.train
    ref = resolve_model(args.model)
    torch.manual_seed(args.seed)
    model = wrap(load_generator(ref.location, prompt_for(dataset.name, dataset.num_labels)),
                 FINETUNE.get(args.finetune)).to(device).train()
    work = batches(model, model.tokenizer, list(rows.texts), list(rows.labels), args.batch_size, args.max_length)
    for loss_fn in APPROACHES.values():
        for batch in work[: args.warmup_steps]:
            timed_step(loss_fn, model, batch, device)
    seconds: dict[str, list[float]] = {name: [] for name in APPROACHES}
    first_loss: dict[str, float] = {}
    with LoadMonitor() as load:
        for batch in work:
            for name, loss_fn in APPROACHES.items():
                took, loss = timed_step(loss_fn, model, batch, device)
                seconds[name].append(took)
                first_loss.setdefault(name, loss)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    record = {
        "benchmark": "sft_step", "model": args.model, "finetune": args.finetune, "dataset": dataset.name,
        "rows": len(rows), "batch_size": args.batch_size, "steps": len(work), "device": str(device),
        "threads": torch.get_num_threads(), "machine": platform.machine(), "date": date.today().isoformat(),
        "median_step_seconds": median, "step_seconds": seconds, "ratio": median["full_vocab"] / median["nlpbd"],
        "first_batch_loss": first_loss, **load.summary(args.max_load_per_core),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sft-step-{device.type}-{Path(args.model).name}-{record['date']}.json"
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    print(f"nlpbd {median['nlpbd']:.3f} s/step, full-vocabulary {median['full_vocab']:.3f} s/step: "
          f"{record['ratio']:.2f}x{' (BUSY MACHINE)' if record['busy'] else ''} -> {path}")
    return path


if __name__ == "__main__":
    main()
