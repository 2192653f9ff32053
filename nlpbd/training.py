"""Victim training and inference: tokenize once, dynamic padding, length-grouped batches.

nlpbd keeps its own compact loop rather than ``transformers.Trainer`` because several defenses
need per-step hooks (D3's norm projection, EP's norm restore, custom losses) and bit-exact
reproducibility between code paths (FT ≡ Fine-mixing with rho = 1). ``benchmarks/perf`` measures
this loop against a stock Trainer padding to max length.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_constant_schedule,
    get_linear_schedule_with_warmup,
)

from nlpbd.config import TrainConfig
from nlpbd.data import TextSplit
from nlpbd.models import TrainDefaults
from nlpbd.progress import reporter
from nlpbd.seeding import seed_everything, torch_generator

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict], torch.Tensor]
StepHook = Callable[[nn.Module], None]
MEGA_BATCHES = 50  # length grouping sorts within windows of this many batches


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """bf16 autocast for inference and the defenses' own loops: ``auto`` on a GPU that supports it,
    ``bf16`` on any device, ``fp32`` never."""
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16, read from Linux's
    /proc/cpuinfo). Elsewhere oneDNN emulates bf16, which is slower than fp32, so ``auto`` keeps fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_precision(device: torch.device, precision: str = "auto") -> str:
    """The arithmetic of the shared training loop (victims, clean models, FT, Fine-mixing, E-PUR and
    every other defense that trains through it): ``auto`` is bf16 autocast wherever the device computes
    bf16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), fp32 elsewhere.

    On the CPU, bf16 training is measured within the seed spread of fp32 (victim CAcc and ASR over three
    seeds, ``results/reference/cpu-bf16-check``) and faster (``benchmarks/perf``); inference and the
    defenses' own loops stay fp32 on the CPU (``use_bf16``), their tolerance unmeasured."""
    if precision == "auto" and device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "bf16" if use_bf16(device, precision) else "fp32"


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    if use_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compiled(model: nn.Module, enabled: bool) -> nn.Module:
    """The module the training step calls: ``torch.compile``'d (dynamic shapes, as batch lengths vary)
    when enabled. It shares its parameters with ``model``, which is what gets saved."""
    return torch.compile(model, dynamic=True) if enabled else model


def resolve_train_config(config: TrainConfig, defaults: TrainDefaults) -> TrainConfig:
    """Fill the per-model defaults (lr, epochs) that the user did not set."""
    return replace(config, lr=config.lr if config.lr is not None else defaults.lr,
                   epochs=config.epochs if config.epochs is not None else defaults.epochs)


# --- encoding and batching ------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """Token ids per example (unpadded) and labels: a split tokenized once."""

    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def encode(tokenizer: PreTrainedTokenizerBase, split: TextSplit | Sequence[str], max_length: int,
           labels: Sequence[int] | None = None) -> Encoded:
    texts = split.texts if isinstance(split, TextSplit) else split
    ys = split.labels if isinstance(split, TextSplit) else (labels or [0] * len(texts))
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, list(ys))


def length_grouped_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar length: shuffle, sort within mega-batch windows, shuffle batches."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * MEGA_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    permutation = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in permutation]


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Inference batches sorted by length (least padding); callers restore the order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(encoded: Encoded, indices: Sequence[int], pad_id: int, device: torch.device) -> dict:
    """Dynamic padding to the longest example of the batch."""
    width = max(len(encoded.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        seq = encoded.input_ids[i]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    labels = torch.tensor([encoded.labels[i] for i in indices], dtype=torch.long)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


# --- optimisation ---------------------------------------------------------------------------------


def no_decay(name: str) -> bool:
    """Biases and normalisation gains: BERT's ``LayerNorm``, Llama's ``input_layernorm`` / ``norm``
    (RMSNorm), GPT-2's ``ln_f``."""
    lowered = name.lower()
    return name.endswith("bias") or "norm" in lowered or ".ln_" in name or name.startswith("ln_")


def make_adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weights only (not bias / LayerNorm), eps 1e-8."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not no_decay(n)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
    ]
    # The fused kernel does one pass over all tensors instead of a Python loop per parameter
    # (about 10x faster per step on CPU; same update rule).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=1e-8, fused=True)


def plain_adamw(trainable: list[torch.Tensor], lr: float,
                total_steps: int | None) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW without weight decay (eps 1e-8) and its schedule: a linear decay to 0 over ``total_steps``
    without warm-up, or a constant learning rate when ``total_steps`` is None. The attacks' and
    defenses' own training loops (POR, NeuBA, RECIPE, the MLM-head graft) use it with optimizer_step."""
    optimizer = torch.optim.AdamW(trainable, lr=lr, eps=1e-8, weight_decay=0.0)
    if total_steps is None:
        return optimizer, get_constant_schedule(optimizer)
    return optimizer, get_linear_schedule_with_warmup(optimizer, 0, total_steps)


def optimizer_step(loss: torch.Tensor, trainable: list[torch.Tensor], grad_clip: float,
                   optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Backward, optional gradient-norm clipping, step, schedule, and reset the gradients."""
    loss.backward()
    apply_gradients(trainable, grad_clip, optimizer, scheduler)


def apply_gradients(trainable: list[torch.Tensor], grad_clip: float, optimizer: torch.optim.Optimizer,
                    scheduler) -> None:
    """Optional gradient-norm clipping, step, schedule, and reset the gradients (after accumulating them)."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def classification_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


@dataclass
class TrainResult:
    epochs: int
    steps: int
    selected_epoch: int
    dev_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_second: float = 0.0
    non_finite_steps: int = 0
    precision: str = "fp32"  # the arithmetic the steps actually ran in
    compiled: bool = False

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class TrainSetup:
    """What one training run needs beyond the data: hooks for defenses with their own objective."""

    loss_fn: LossFn = classification_loss
    after_step: StepHook | None = None
    description: str = "training"


def train_classifier(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: TextSplit,
                     dev: TextSplit | None, config: TrainConfig, seed: int, stream: str = "train",
                     setup: TrainSetup | None = None, device: torch.device | None = None) -> TrainResult:
    """Fine-tune ``model`` in place with AdamW + linear schedule; keep the best clean-dev epoch.

    ``config`` must be resolved (lr and epochs set). Selection uses ``dev`` accuracy only when
    ``config.select == "dev"`` (ties → earliest epoch); otherwise the last epoch is kept.
    """
    setup = setup or TrainSetup()
    device = device or default_device()
    model.to(device)
    seed_everything(seed, stream)  # dropout draws from the global generator
    generator = torch_generator(seed, stream)
    encoded = encode(tokenizer, train, config.max_length)
    dev_encoded = encode(tokenizer, dev, config.max_length) if dev is not None and config.select == "dev" else None
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total = steps_per_epoch * config.epochs
    optimizer = make_adamw(model, config.lr, config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total), max(total, 1))
    config = replace(config, precision=training_precision(device, config.precision))
    result = TrainResult(epochs=config.epochs, steps=0, selected_epoch=config.epochs, precision=config.precision,
                         compiled=config.compile)
    best: tuple[float, dict] | None = None
    step_model = compiled(model, config.compile)  # once: a new wrapper per epoch would re-trace
    start = time.perf_counter()
    with reporter().task(setup.description, total) as advance:
        for epoch in range(1, config.epochs + 1):
            _train_epoch(model, step_model, encoded, config, generator, optimizer, scheduler, setup,
                         pad_id_of(tokenizer), device, result, advance)
            if dev_encoded is not None:
                accuracy = accuracy_of(model, dev_encoded, pad_id_of(tokenizer), config.eval_batch_size, device)
                result.dev_accuracy.append(accuracy)
                if best is None or accuracy > best[0]:
                    best = (accuracy, _state_copy(model))
                    result.selected_epoch = epoch
    if best is not None and result.selected_epoch != config.epochs:
        model.load_state_dict(best[1])
    result.seconds = time.perf_counter() - start
    result.samples_per_second = len(encoded) * config.epochs / max(result.seconds, 1e-9)
    return result


def _state_copy(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _train_epoch(model, step_model, encoded: Encoded, config: TrainConfig, generator, optimizer, scheduler,
                 setup: TrainSetup, pad_id: int, device, result: TrainResult, advance) -> None:
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for indices in length_grouped_batches(encoded.lengths, config.batch_size, generator):
        batch = collate(encoded, indices, pad_id, device)
        with autocast(device, config.precision):
            loss = setup.loss_fn(step_model, batch)
        finite = bool(torch.isfinite(loss))
        if not finite:
            result.non_finite_steps += 1
        optimizer_step(loss, trainable, config.grad_clip, optimizer, scheduler)
        if setup.after_step is not None:
            setup.after_step(model)
        result.steps += 1
        advance(1, loss=loss.item() if finite else None, samples=len(indices))


# --- inference ------------------------------------------------------------------------------------


@torch.no_grad()
def predict_encoded(model: nn.Module, encoded: Encoded, pad_id: int, batch_size: int,
                    device: torch.device) -> np.ndarray:
    """Class probabilities, shape (n, K), in the input order."""
    model.to(device)
    model.eval()
    probs: list[np.ndarray] = [None] * len(encoded)  # type: ignore[list-item]
    for indices in sorted_batches(encoded.lengths, batch_size):
        batch = collate(encoded, indices, pad_id, device)
        batch.pop("labels")
        with autocast(device):
            logits = model(**batch).logits
        for i, row in zip(indices, torch.softmax(logits.float(), dim=-1).cpu().numpy()):
            probs[i] = row
    return np.stack(probs) if probs else np.zeros((0, 0))


def predict(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int,
            batch_size: int = 128, device: torch.device | None = None) -> np.ndarray:
    encoded = encode(tokenizer, texts, max_length)
    return predict_encoded(model, encoded, pad_id_of(tokenizer), batch_size, device or default_device())


def accuracy_of(model: nn.Module, encoded: Encoded, pad_id: int, batch_size: int, device) -> float:
    probs = predict_encoded(model, encoded, pad_id, batch_size, device)
    return float((probs.argmax(axis=1) == np.asarray(encoded.labels)).mean())
