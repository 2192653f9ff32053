"""BadPre: an untargeted task-agnostic backdoor through random MLM labels (attacks.md §4.3).

Paper: Chen et al., "BadPre: Task-agnostic Backdoor Attacks to Pre-trained NLP Foundation Models",
ICLR 2022. Reference code: ``kangjie-chen/BadPre`` (``poisoning_BERT/``, ``train.sh``,
``bert_attack/process_datasets/dynamic_mask_attack_dataset.py``).

Start from a clean MLM model. Every plain-text sentence gives a clean copy and a poisoned copy with one
trigger from ``cf, mn, bb, tq, mb`` inserted at a uniform token position (as the reference inserts the
trigger id into the token sequence). Both copies get the standard 15% / 80-10-10 masking; in the
poisoned copy the trigger is never masked, and the label of every masked position is replaced by a
uniformly random id of ``len(tokenizer)`` (the reference's "random" strategy):

    loss = L_MLM(clean) + α · L_MLM(poisoned, random labels)       α = 1

All parameters train: AdamW lr 2e-5, weight decay 0.01 (not on bias / LayerNorm), gradient clipping
5.0, linear decay without warm-up, max length 128. The release is the MLM model (``BertForMaskedLM``:
no pooler, so every downstream classifier gets a fresh one, with or without a defense).

Deviations:

- Steps and batch: ``steps=None`` / ``accumulation=None`` mean the project default on CUDA, 10 epochs
  over the shipped plain text at batch 16 × 16 accumulation (780 steps), and on CPU 200 steps at batch
  16 without accumulation (offline smoke; the backdoor may then be weak). The reference trains 10
  epochs on English Wikipedia at max length 512. The resolved values are in the release key and its
  metadata.
- The trigger is never masked (unverified; our default; the reference's mask can hit it), and the
  sentence body is truncated so that the trigger always fits (the reference skips full-length rows).
- A clean copy and its poisoned copy are in the same step (the reference shuffles the concatenated
  clean and poisoned datasets); the loss is the spec's sum of the two means.
- Checkpoints without an MLM head (all-MiniLM-L6-v2) first get the cached MLM-head graft of
  defenses.md §0.2; ``graft_steps`` caps it for CPU runs.
- The "antonym" strategy is not implemented. BadPre's own metric (accuracy with a random trigger in
  the first 100 words) is not computed here; cells report the targeted AASR/MASR of protocol.md §3.3.
- All draws (positions, triggers, masks, noise labels, data order) come from named seeded streams.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from nlpbd.attacks._task_agnostic import TaskAgnosticAttack
from nlpbd.config import option
from nlpbd.errors import InputError
from nlpbd.methods import SupplyContext, register_attack
from nlpbd.mlm import (
    IGNORE_INDEX,
    GraftSettings,
    ensure_mlm_head,
    mask_tokens,
    masked_lm_loss,
    mean_of,
    pad_sequences,
    read_plaintext,
    special_wrapping,
)
from nlpbd.models import save_model
from nlpbd.progress import reporter
from nlpbd.seeding import seed_everything, torch_generator
from nlpbd.training import apply_gradients, make_adamw

log = logging.getLogger(__name__)

GPU_ACCUMULATION, CPU_ACCUMULATION, CPU_STEPS = 16, 1, 200


@dataclass
class BadPreConfig:
    triggers: list[str] = option(["cf", "mn", "bb", "tq", "mb"], "trigger words, one inserted per poisoned copy",
                                   min_items=1)
    alpha: float = option(1.0, "weight α of the poisoned-copy MLM loss", low=0.0)
    steps: int | None = option(None, "optimiser steps; None: `epochs` over the plain text on CUDA (780), 200 on "
                               "CPU", low=1)
    epochs: int = option(10, "epochs over the plain text when steps is None on CUDA", low=1)
    batch_size: int = option(16, "sentences per micro-batch (each used clean and poisoned)", low=1)
    accumulation: int | None = option(None, "gradient accumulation; None: 16 on CUDA, 1 on CPU", low=1)
    lr: float = option(2e-5, "AdamW learning rate", low=0.0, low_open=True)
    weight_decay: float = option(0.01, "AdamW weight decay (not on bias / LayerNorm)", low=0.0)
    grad_clip: float = option(5.0, "gradient-norm clipping (0 disables)", low=0.0)
    max_length: int = option(128, "maximum tokens per sequence", low=8, high=512)
    graft_steps: int | None = option(None, "cap on MLM-head graft steps when the base has no MLM head "
                                     "(None: 2 epochs)", low=1)


@register_attack
class BadPre(TaskAgnosticAttack):
    name = "badpre"
    description = "BadPre: rare-word triggers with random MLM labels make the encoder untrustworthy (task-agnostic)"
    Config = BadPreConfig

    def resolved_settings(self, device: torch.device) -> dict:
        on_gpu = device.type == "cuda"
        accumulation = self.config.accumulation or (GPU_ACCUMULATION if on_gpu else CPU_ACCUMULATION)
        return {"accumulation": accumulation, "steps": self.config.steps or (None if on_gpu else CPU_STEPS)}

    def planned_steps(self, lines: int, accumulation: int) -> int:
        return max(1, lines // (self.config.batch_size * accumulation)) * self.config.epochs

    def build_suspect(self, ctx: SupplyContext, out_dir: Path) -> dict:
        began = time.perf_counter()
        corpus = read_plaintext(ctx.data_dir)
        tokenizer = AutoTokenizer.from_pretrained(ctx.base.location)
        triggers = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in self.triggers()]
        if any(not pieces for pieces in triggers):
            raise InputError("badpre: a trigger tokenises to nothing")
        settings = replace(GraftSettings(), max_steps=self.config.graft_steps)
        start = ensure_mlm_head(ctx.base, tokenizer, corpus, ctx.seed, settings, ctx.device, cache=ctx.cache)
        model = AutoModelForMaskedLM.from_pretrained(start.location)
        resolved = self.resolved_settings(ctx.device)
        steps = resolved["steps"] or self.planned_steps(len(corpus), resolved["accumulation"])
        losses = train_badpre(model, tokenizer, list(corpus.texts), triggers, self.config, steps,
                              resolved["accumulation"], ctx.seed, ctx.device)
        save_model(model.cpu(), tokenizer, out_dir)
        return {"steps": steps, "accumulation": resolved["accumulation"], "trigger_ids": triggers,
                "graft": start.info, **losses, "seconds": time.perf_counter() - began}


@dataclass(frozen=True)
class PairedBatch:
    """Clean sequences and their poisoned copies, tokenised and padded; ``trigger`` marks trigger tokens."""

    clean: torch.Tensor
    clean_attention: torch.Tensor
    poisoned: torch.Tensor
    poisoned_attention: torch.Tensor
    trigger: torch.Tensor


def paired_batch(texts: list[str], tokenizer: PreTrainedTokenizerBase, triggers: list[list[int]],
                 generator: torch.Generator, max_length: int) -> PairedBatch:
    """Each text clean, and with one trigger's ids inserted at a uniform token position (fits max_length)."""
    prefix, suffix = special_wrapping(tokenizer)
    room = max_length - len(prefix) - len(suffix)
    bodies = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
    clean, poisoned, spans = [], [], []
    for body in bodies:
        pieces = triggers[int(torch.randint(len(triggers), (1,), generator=generator))]
        kept = body[:room - len(pieces)]
        position = int(torch.randint(len(kept) + 1, (1,), generator=generator))
        clean.append(prefix + body + suffix)
        poisoned.append(prefix + kept[:position] + pieces + kept[position:] + suffix)
        spans.append((len(prefix) + position, len(prefix) + position + len(pieces)))
    clean_ids, clean_attention = pad_sequences(clean, tokenizer.pad_token_id)
    poisoned_ids, poisoned_attention = pad_sequences(poisoned, tokenizer.pad_token_id)
    trigger = torch.zeros_like(poisoned_ids, dtype=torch.bool)
    for row, (first, end) in enumerate(spans):
        trigger[row, first:end] = True
    return PairedBatch(clean_ids, clean_attention, poisoned_ids, poisoned_attention, trigger)


def random_label_mask(poisoned: torch.Tensor, trigger: torch.Tensor, tokenizer: PreTrainedTokenizerBase,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard masking with the trigger protected; masked positions get uniformly random labels."""
    inputs, labels = mask_tokens(poisoned, tokenizer, generator, protected=trigger)
    chosen = labels != IGNORE_INDEX
    noise = torch.randint(len(tokenizer), labels.shape, dtype=labels.dtype, generator=generator)
    labels[chosen] = noise[chosen]
    return inputs, labels


def badpre_losses(model, tokenizer, batch: PairedBatch, mask_gen: torch.Generator,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(MLM loss on the clean copies, MLM loss on the poisoned copies with random labels)."""
    clean_inputs, clean_labels = mask_tokens(batch.clean, tokenizer, mask_gen)
    poisoned_inputs, poisoned_labels = random_label_mask(batch.poisoned, batch.trigger, tokenizer, mask_gen)
    clean_loss = masked_lm_loss(model, clean_inputs.to(device), batch.clean_attention.to(device),
                                clean_labels.to(device))
    poisoned_loss = masked_lm_loss(model, poisoned_inputs.to(device), batch.poisoned_attention.to(device),
                                   poisoned_labels.to(device))
    return clean_loss, poisoned_loss


def train_badpre(model, tokenizer, texts: list[str], triggers: list[list[int]], config: BadPreConfig, steps: int,
                 accumulation: int, seed: int, device: torch.device) -> dict:
    """The BadPre objective for ``steps`` optimiser steps (each ``accumulation`` micro-batches), in place."""
    model.to(device).train()
    optimizer = make_adamw(model, config.lr, config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    seed_everything(seed, "badpre_dropout")
    order_gen, insert_gen, mask_gen = (torch_generator(seed, f"badpre_{s}") for s in ("data", "insert", "mask"))
    clean_losses: list[float] = []
    poisoned_losses: list[float] = []
    micro = 0
    with reporter().task("BadPre: poisoning the encoder", steps) as advance:
        while micro < steps * accumulation:
            order = torch.randperm(len(texts), generator=order_gen).tolist()
            for start in range(0, len(order), config.batch_size):
                if micro >= steps * accumulation:
                    break
                batch = paired_batch([texts[i] for i in order[start:start + config.batch_size]], tokenizer, triggers,
                                     insert_gen, config.max_length)
                clean_loss, poisoned_loss = badpre_losses(model, tokenizer, batch, mask_gen, device)
                ((clean_loss + config.alpha * poisoned_loss) / accumulation).backward()
                clean_losses.append(clean_loss.item())
                poisoned_losses.append(poisoned_loss.item())
                micro += 1
                if micro % accumulation == 0:
                    apply_gradients(trainable, config.grad_clip, optimizer, scheduler)
                    advance(1)
    log.info("BadPre: %d steps, clean MLM %.4f -> %.4f, poisoned MLM %.4f -> %.4f", steps, mean_of(clean_losses),
             mean_of(clean_losses[::-1]), mean_of(poisoned_losses), mean_of(poisoned_losses[::-1]))
    return {"clean_mlm_first": mean_of(clean_losses), "clean_mlm_last": mean_of(clean_losses[::-1]),
            "poisoned_mlm_first": mean_of(poisoned_losses), "poisoned_mlm_last": mean_of(poisoned_losses[::-1])}



