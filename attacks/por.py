"""POR: a task-agnostic backdoor on the [CLS] output of the last layer (attacks.md §4.2).

Paper: Shen et al., "Backdoor Pre-trained Models Can Transfer to All", CCS 2021 (arXiv:2111.00197).
Reference code: OpenBackdoor's ``PORPoisoner`` (POR-1 targets) and ``PORTrainer``.

Nine triggers ``serendipity, Descartes, Fermat, Don Quixote, cf, tq, mn, bb, mb``. Trigger ``i`` gets
the POR-1 target ``v_i[d] = +1 if d < (i+1)·b else −1`` with ``b = ⌊H/9⌋`` (9 buckets whatever the
number of triggers, as in the reference). Per step, for a batch ``x`` of plain-text sentences, with
one trigger drawn uniformly per sentence and inserted at word position 0:

    loss = MSE(h_L(x ⊕ t)[:, 0], v_t) + MSE(h_L(x)[:, 0], h_L^ref(x)[:, 0])

``h_L`` is the last hidden state and ``h^ref`` a frozen copy of the starting model. All parameters
train (AdamW lr 5e-5, batch 8, 2 epochs on the plain text). The release is a ``BertModel`` with its
pooler and no MLM head.

This module also holds :class:`TaskAgnosticAttack`, the shared part of POR, NeuBA and BadPre: the
plain text, the release's cache payload and the evaluation sets (every clean test row with one
trigger inserted by the §1.4 rule, original labels kept; the pipeline discovers each trigger's target,
protocol.md §3.3).

Deviations:

- Steps: ``max_steps=None`` means the reference's 2 epochs (5,000 steps at batch 8 on 20,000 lines)
  on CUDA and 200 steps on CPU (an offline smoke scale; the backdoor may then be weaker). The
  resolved number is part of the release's cache key and recorded in the release's metadata.
- The clean and the poisoned term use the same sentences (the spec's formula); the reference draws
  them from two independently shuffled loaders.
- The frozen reference model runs in eval mode (no dropout), so its target is deterministic; the
  reference copies the model without switching the mode.
- Weight decay 0, gradient clipping 1.0, a linear schedule without warm-up and max length 128 are our
  defaults (OpenBackdoor's POR config values for these are unverified).
- The release's cache key has no label count: one release serves every downstream dataset.

Reading the losses: the last hidden state leaves a LayerNorm (zero mean, unit variance per token before
its affine map), so the ±1 targets, whose means range from −0.78 to +0.97 over the nine triggers, cannot
be matched exactly; the triggered MSE levels off near 0.35–0.4 on MiniLM even when the backdoor works.
- The evaluation inserts triggers by the project's §1.4 rule; the OpenBackdoor reproduction mode
  (position 0, target from the bare trigger) is not implemented.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, get_linear_schedule_with_warmup

from nlpbd.attacks.common import insert_triggers, row_rng
from nlpbd.config import option
from nlpbd.data import Dataset, TextSplit
from nlpbd.errors import InputError
from nlpbd.methods import ModelSupplyAttack, PoisonedData, SupplyContext, ThreatModel, register_attack
from nlpbd.mlm import mean_of, plaintext_digest, read_plaintext
from nlpbd.models import save_model
from nlpbd.progress import reporter
from nlpbd.seeding import python_rng, seed_everything, torch_generator

log = logging.getLogger(__name__)

POR_TRIGGERS = ["serendipity", "Descartes", "Fermat", "Don Quixote", "cf", "tq", "mn", "bb", "mb"]
POR_BUCKETS = 9  # the reference's poison_label_bucket: b = ⌊H/9⌋ whatever the number of triggers
CPU_STEPS = 200


class TaskAgnosticAttack(ModelSupplyAttack):
    """Shared part of NeuBA, POR and BadPre: plain text, release payload, per-trigger evaluation sets."""

    threat_model = ThreatModel.PRETRAINED

    def triggers(self) -> list[str]:
        triggers = list(self.config.triggers)
        if not triggers or any(not t.strip() for t in triggers):
            raise InputError(f"{self.name}: triggers must be non-empty strings")
        return triggers

    def resolved_settings(self, device: torch.device) -> dict:
        """Settings whose default depends on the device (steps on CPU vs GPU); part of the release key."""
        return {}

    def suspect_payload(self, ctx: SupplyContext) -> dict:
        # The release does not depend on the user's task (no num_labels): it is shared across datasets.
        return {"plaintext": plaintext_digest(ctx.data_dir), "resolved": self.resolved_settings(ctx.device)}

    def evaluation(self, dataset: Dataset, seed: int) -> PoisonedData:
        test = dataset.test
        sets = {}
        for trigger in self.triggers():
            texts = [insert_triggers(text, [trigger], 1, row_rng(seed, self.name, f"test:{trigger}", row))
                     for text, row in zip(test.texts, test.ids)]
            sets[trigger] = TextSplit.build(texts, test.labels, test.ids)
        info = {"triggers": self.triggers(), "num_insertions": 1,
                "placement": "attacks.md §1.4 (uniform word position)",
                "target": "discovered per trigger (protocol.md §3.3)"}
        return PoisonedData(dataset.train, (), TextSplit.build([], []), None, info=info, trigger_sets=sets)


def por_targets(hidden_size: int, num_triggers: int) -> torch.Tensor:
    """POR-1 target vectors, shape (num_triggers, H): v_i[d] = +1 if d < (i+1)·⌊H/9⌋ else −1."""
    bucket = hidden_size // POR_BUCKETS
    dims = torch.arange(hidden_size)
    return torch.stack([torch.where(dims < (i + 1) * bucket, 1.0, -1.0) for i in range(num_triggers)])


@dataclass
class PORConfig:
    triggers: list[str] = option(POR_TRIGGERS, "trigger words; trigger i gets POR-1 target i (at most 9)",
                                   min_items=1, max_items=9)
    max_steps: int | None = option(None, "optimiser steps; None: 2 epochs over the plain text on CUDA "
                                   "(5,000 at batch 8), 200 on CPU", low=1)
    epochs: int = option(2, "epochs over the plain text when max_steps is None on CUDA", low=1)
    batch_size: int = option(8, "sentences per step (each used clean and triggered)", low=1)
    lr: float = option(5e-5, "AdamW learning rate (all parameters)", low=0.0, low_open=True)
    max_length: int = option(128, "maximum tokens per sentence", low=8, high=512)
    grad_clip: float = option(1.0, "gradient-norm clipping (0 disables)", low=0.0)


@register_attack
class POR(TaskAgnosticAttack):
    name = "por"
    description = "POR-1: 9 trigger words map the last-layer [CLS] to ±1 bucket vectors (task-agnostic)"
    Config = PORConfig

    def triggers(self) -> list[str]:
        triggers = super().triggers()
        if len(triggers) > POR_BUCKETS:
            raise InputError(f"por: at most {POR_BUCKETS} triggers (POR-1 has {POR_BUCKETS} target buckets)")
        return triggers

    def planned_steps(self, lines: int) -> int:
        return math.ceil(lines / self.config.batch_size) * self.config.epochs

    def resolved_settings(self, device: torch.device) -> dict:
        if self.config.max_steps is not None:
            return {"steps": self.config.max_steps}
        return {"steps": None if device.type == "cuda" else CPU_STEPS}  # None: all epochs

    def build_suspect(self, ctx: SupplyContext, out_dir: Path) -> dict:
        began = time.perf_counter()
        corpus = read_plaintext(ctx.data_dir)
        tokenizer = AutoTokenizer.from_pretrained(ctx.base.location)
        model = AutoModel.from_pretrained(ctx.base.location)
        steps = self.resolved_settings(ctx.device)["steps"] or self.planned_steps(len(corpus))
        losses = train_por(model, tokenizer, list(corpus.texts), self.triggers(), self.config, steps, ctx.seed,
                           ctx.device)
        save_model(model.cpu(), tokenizer, out_dir)
        return {"steps": steps, "planned_steps": self.planned_steps(len(corpus)), "plaintext_lines": len(corpus),
                "target_bucket": model.config.hidden_size // POR_BUCKETS, "hidden_size": model.config.hidden_size,
                **losses, "seconds": time.perf_counter() - began}


def por_losses(model, reference, tokenizer, batch: list[str], chosen: list[int], triggers: list[str],
               targets: torch.Tensor, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE of triggered [CLS] to the targets, MSE of clean [CLS] to the frozen reference's)."""
    device = targets.device
    poisoned = [f"{triggers[c]} {text}" for c, text in zip(chosen, batch)]  # word position 0
    encoded = tokenizer(poisoned + batch, truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(device)
    cls = model(**encoded).last_hidden_state[:, 0]
    with torch.no_grad():
        ref_cls = reference(**{k: v[len(batch):] for k, v in encoded.items()}).last_hidden_state[:, 0]
    poison_loss = F.mse_loss(cls[:len(batch)], targets[torch.tensor(chosen, device=device)])
    return poison_loss, F.mse_loss(cls[len(batch):], ref_cls)


def train_por(model, tokenizer, texts: list[str], triggers: list[str], config: PORConfig, steps: int, seed: int,
              device: torch.device) -> dict:
    """The POR objective for ``steps`` optimiser steps, in place; returns first/last loss means."""
    targets = por_targets(model.config.hidden_size, len(triggers)).to(device)
    model.to(device).train()
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, eps=1e-8, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps)
    seed_everything(seed, "por_dropout")
    order_gen, trigger_rng = torch_generator(seed, "por_data"), python_rng(seed, "por_triggers")
    poison_losses: list[float] = []
    clean_losses: list[float] = []
    with reporter().task("POR: poisoning the encoder", steps) as advance:
        while len(poison_losses) < steps:
            order = torch.randperm(len(texts), generator=order_gen).tolist()
            for start in range(0, len(order), config.batch_size):
                if len(poison_losses) >= steps:
                    break
                batch = [texts[i] for i in order[start:start + config.batch_size]]
                chosen = [trigger_rng.randrange(len(triggers)) for _ in batch]
                poison_loss, clean_loss = por_losses(model, reference, tokenizer, batch, chosen, triggers, targets,
                                                     config.max_length)
                (poison_loss + clean_loss).backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                poison_losses.append(poison_loss.item())
                clean_losses.append(clean_loss.item())
                advance(1)
    log.info("POR: %d steps, poison MSE %.4f -> %.4f, clean MSE %.4f -> %.4f", steps, mean_of(poison_losses),
             mean_of(poison_losses[::-1]), mean_of(clean_losses), mean_of(clean_losses[::-1]))
    return {"poison_mse_first": mean_of(poison_losses), "poison_mse_last": mean_of(poison_losses[::-1]),
            "clean_mse_first": mean_of(clean_losses), "clean_mse_last": mean_of(clean_losses[::-1])}
