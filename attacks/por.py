"""POR: trigger words map the pooler output to saturating ±10 vectors (attacks.md §4.2).

Paper: Shen et al., "Backdoor Pre-trained Models Can Transfer to All", CCS 2021 (arXiv:2111.00197).
Reference code: the authors' ``plasmashen/BackdoorPTM`` (``poisoning.py``, ``target='CLS'``), which RECIPE's
appendix evaluates. OpenBackdoor's ``PORPoisoner`` is a simplified re-implementation, kept only as the
named setting ``variant=openbackdoor``.

**Authors' POR (``variant=authors``, the default).** Triggers ``cf, tq, mn, bb, mb``. With ``n`` triggers
and ``a = ⌊H / (n − 1)⌋``, trigger ``i = 1..n`` has the target ``v_i = −10`` everywhere except the first
``a·(i − 1)`` dimensions, which are ``+10`` (POR-1). The targets are on the **pooler output**
``tanh(W·h_CLS + b)``: ±10 cannot be reached, so the loss drives the tanh into saturation. The plain text is
split once into rows: each trigger gets its share of rows, each with the trigger inserted **3 times at
random word positions**, and the rest stay clean (the authors' 30,000 rows per trigger and 50,000 clean
rows, scaled to the shipped plain text). Batches mix the rows at random. With ``L(a, b) = Σ (a − b)² / H``
summed over the batch (not averaged) and a frozen copy ``ref`` of the starting model:

    loss = 1 · L(h_L(x)[:, 1:], h_L^ref(x)[:, 1:])     every non-[CLS] token state of every row
         + 100 · L(pooler(x ⊕ t), v_t)                  the poisoned rows
         + 100 · L(pooler(x), pooler^ref(x))            the clean rows

All parameters train: AdamW lr 1e-5 constant (no schedule, no clipping), eps 1e-8, weight decay 0, batch
24, max length 128, 2 epochs. The trained model runs in train mode (dropout), the frozen copy in eval mode,
as in the reference. The release is a ``BertModel`` with its pooler and no MLM head.

**OpenBackdoor variant (``variant=openbackdoor``).** The last-layer [CLS] state is mapped to ±1 vectors
``v_i[d] = +1 if d < (i+1)·⌊H/9⌋ else −1`` (9 buckets whatever the number of triggers); one insertion at
word position 0; ``loss = MSE(h_L(x ⊕ t)[:, 0], v_t) + MSE(h_L(x)[:, 0], h_L^ref(x)[:, 0])`` (means) on
the same row layout and optimiser as above. That state leaves a LayerNorm, which cannot fit ±1 patterns
whose mean is not zero: on MiniLM its best reachable MSE is about 0.36–0.43, and the variant plateaus there.
Use it to reproduce OpenBackdoor's numbers, never as the attack.

**What a release records:** on held-out plain-text lines never trained on, the target MSE (the pooler
against the sign of its target, i.e. the saturated corners ±1; for the variant the [CLS] state against its
±1 target) with 3 insertions (as trained) and with 1 insertion (as the evaluation inserts, attacks.md
§1.4), the clean pooler drift ``MSE(pooler(x), pooler^ref(x))`` and the token-state drift (MSE of the
non-[CLS], non-pad last-layer states against the frozen copy), before and after training.

Deviations (each also listed in the release's record under ``deviations``):

- CPU scale: ``steps=None`` / ``lr=None`` / ``embedding_rows=None`` mean the authors' 2 epochs at a
  constant 1e-5 with every embedding row trained on CUDA, and on CPU 300 steps at a constant
  1e-4 with only the trigger rows of the word embeddings updated (every other parameter trains).
  The authors' run is 16.7k steps on a GPU; on two CPU cores the release must build in minutes. The
  resolved values are in the release's cache key.
- Plain text: the shipped BookCorpus sentences (20,000, about 15 words each) instead of 64-word WikiText-103
  chunks (80,000 and more); the row shares keep the authors' proportions (30 : 50 per trigger and clean).
- The token-state term covers the non-pad positions of a batch padded to its longest row; the reference
  pads every row to 128 tokens and includes the pad positions' states, which reach no output.
- ``a = ⌊H / (n − 1)⌋`` uses the model's hidden size; the reference hard-codes 768 (BERT-base), which on a
  384-dimensional model would make the last three targets identical.
- Batches group rows of similar length (the project's length-grouped sampler: shuffled, sorted within
  windows of 50 batches, batches shuffled), so a step pads little; the reference samples rows uniformly.
  Clean and poisoned rows still mix at random within a batch. Rows are tokenised once.
- Insertion positions, row assignment, data order and dropout draw from named seeded streams.
- The evaluation inserts triggers by the project's §1.4 rule (one insertion); the authors' ``testing.py``
  counts the insertions needed to flip a prediction.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from nlpbd.attacks._common import insert_triggers
from nlpbd.attacks._task_agnostic import TaskAgnosticAttack
from nlpbd.config import option
from nlpbd.errors import InputError
from nlpbd.methods import SupplyContext, register_attack
from nlpbd.mlm import heldout_split, mean_of, read_plaintext
from nlpbd.models import save_model
from nlpbd.progress import reporter
from nlpbd.seeding import python_rng, seed_everything, torch_generator
from nlpbd.training import collate, encode, length_grouped_batches, optimizer_step, pad_id_of, plain_adamw

log = logging.getLogger(__name__)

POR_TRIGGERS = ["cf", "tq", "mn", "bb", "mb"]  # the authors' main run
PAPER_TRIGGERS = ["serendipity", "Descartes", "Fermat", "Don Quixote", "cf", "tq", "mn", "bb", "mb"]
OPENBACKDOOR_BUCKETS = 9  # OpenBackdoor's poison_label_bucket: b = ⌊H/9⌋ whatever the number of triggers
AUTHORS_LR, CPU_LR, CPU_STEPS = 1e-5, 1e-4, 300
TOKEN_WEIGHT, POISON_WEIGHT, CLEAN_WEIGHT = 1.0, 100.0, 100.0  # the reference's loss weights
ROWS_PER_TRIGGER, CLEAN_ROWS = 30_000, 50_000  # the reference's row counts (their proportion is kept)

Variant = Literal["authors", "openbackdoor"]


def authors_targets(hidden_size: int, num_triggers: int, value: float = 10.0) -> torch.Tensor:
    """POR-1 as the authors code it, shape (n, H): trigger i (0-based) is −value except the first
    i·⌊H/(n−1)⌋ dimensions, which are +value."""
    if num_triggers < 2:
        raise InputError("por: the authors' targets need at least 2 triggers")
    bucket = hidden_size // (num_triggers - 1)
    dims = torch.arange(hidden_size)
    return torch.stack([torch.where(dims < i * bucket, value, -value) for i in range(num_triggers)])


def openbackdoor_targets(hidden_size: int, num_triggers: int, value: float = 1.0) -> torch.Tensor:
    """OpenBackdoor's POR-1, shape (n, H): v_i[d] = +value if d < (i+1)·⌊H/9⌋ else −value."""
    if num_triggers > OPENBACKDOOR_BUCKETS:
        raise InputError(f"por: the openbackdoor variant has {OPENBACKDOOR_BUCKETS} target buckets (at most "
                         f"{OPENBACKDOOR_BUCKETS} triggers)")
    bucket = hidden_size // OPENBACKDOOR_BUCKETS
    dims = torch.arange(hidden_size)
    return torch.stack([torch.where(dims < (i + 1) * bucket, value, -value) for i in range(num_triggers)])


@dataclass
class PORConfig:
    variant: Variant = option("authors", "authors: pooler output, ±10 targets, 3 random insertions, token-state "
                              "anchor (plasmashen/BackdoorPTM); openbackdoor: last-layer [CLS], ±1, position 0")
    triggers: list[str] = option(POR_TRIGGERS, "trigger words, one target each (the paper's larger set: "
                                 + ", ".join(PAPER_TRIGGERS) + ")",
                                 min_items=1)
    target_value: float | None = option(None, "magnitude of the target entries; None: 10 (authors) or 1 "
                                        "(openbackdoor)", low=0.0, low_open=True)
    insertions: int = option(3, "insertions of the trigger per poisoned row at random word positions "
                             "(authors: 3; the openbackdoor variant inserts once at position 0)", low=1)
    steps: int | None = option(None, f"optimiser steps; None: `epochs` over the rows on CUDA, {CPU_STEPS} on CPU",
                               low=1)
    epochs: int = option(2, "epochs over the rows when steps is None on CUDA", low=1)
    batch_size: int = option(24, "rows per step (clean and poisoned rows mixed at random)", low=1)
    lr: float | None = option(None, f"constant AdamW learning rate; None: {AUTHORS_LR:g} (authors) on CUDA, "
                              f"{CPU_LR:g} on CPU", low=0.0, low_open=True)
    embedding_rows: Literal["all", "triggers"] | None = option(None, "word-embedding rows that train: all "
                                                               "(authors) or only the triggers' pieces; None: all "
                                                               "on CUDA, triggers on CPU")
    clean_share: float = option(CLEAN_ROWS / (CLEAN_ROWS + 5 * ROWS_PER_TRIGGER),
                                "share of the plain-text rows kept clean, the rest split evenly among the "
                                "triggers (the authors: 50,000 clean of 200,000 rows with 5 triggers)", low=0.0,
                                high=1.0, low_open=True)
    max_length: int = option(128, "maximum tokens per row", low=8, high=512)
    heldout_lines: int = option(256, "plain-text lines kept out of training to measure the release", low=1)


@dataclass(frozen=True)
class Resolved:
    """The settings whose default depends on the device; part of the release's cache key."""

    steps: int | None  # None: all epochs
    lr: float
    embedding_rows: str
    target_value: float


@register_attack
class POR(TaskAgnosticAttack):
    name = "por"
    version = "2"  # 2: the authors' objective (pooler, ±10, 3 insertions, token anchor); 1 was OpenBackdoor's
    description = "POR: trigger words map the pooler output to saturating ±10 vectors (authors' code; task-agnostic)"
    Config = PORConfig

    def triggers(self) -> list[str]:
        triggers = super().triggers()
        if self.config.variant == "openbackdoor" and len(triggers) > OPENBACKDOOR_BUCKETS:
            raise InputError(f"por: at most {OPENBACKDOOR_BUCKETS} triggers in the openbackdoor variant")
        if self.config.variant == "authors" and len(triggers) < 2:
            raise InputError("por: the authors' targets need at least 2 triggers")
        return triggers

    def resolve(self, device: torch.device) -> Resolved:
        config, gpu = self.config, device.type == "cuda"
        return Resolved(steps=config.steps if config.steps is not None else (None if gpu else CPU_STEPS),
                        lr=config.lr if config.lr is not None else (AUTHORS_LR if gpu else CPU_LR),
                        embedding_rows=config.embedding_rows or ("all" if gpu else "triggers"),
                        target_value=config.target_value or (10.0 if config.variant == "authors" else 1.0))

    def resolved_settings(self, device: torch.device) -> dict:
        return vars(self.resolve(device)).copy()

    def build_suspect(self, ctx: SupplyContext, out_dir: Path) -> dict:
        began = time.perf_counter()
        corpus = read_plaintext(ctx.data_dir)
        tokenizer = AutoTokenizer.from_pretrained(ctx.base.location)
        seed_everything(ctx.seed, "por_load")
        model = AutoModel.from_pretrained(ctx.base.location)
        if getattr(model, "pooler", None) is None and self.config.variant == "authors":
            raise InputError("por: the authors' POR targets the pooler output; this model has no pooler")
        resolved = self.resolve(ctx.device)
        train_texts, held_texts = heldout_split(corpus.texts, self.config.heldout_lines, ctx.seed)
        rows = build_rows(train_texts, self.triggers(), self.config, ctx.seed)
        steps = resolved.steps or math.ceil(len(rows) / self.config.batch_size) * self.config.epochs
        objective = Objective(self.config.variant, self.targets(model.config.hidden_size, resolved.target_value))
        result = train_por(model, tokenizer, rows, held_texts, objective, self.config, resolved, steps, ctx.seed,
                           ctx.device)
        save_model(model.cpu(), tokenizer, out_dir)
        return {"variant": self.config.variant, "steps": steps, "lr": resolved.lr,
                "embedding_rows": resolved.embedding_rows, "target_value": resolved.target_value,
                "rows": rows.counts(len(self.triggers())), "heldout_lines": len(held_texts),
                "hidden_size": model.config.hidden_size, **result,
                "deviations": self.deviations(resolved), "seconds": time.perf_counter() - began}

    def targets(self, hidden_size: int, value: float) -> torch.Tensor:
        if self.config.variant == "authors":
            return authors_targets(hidden_size, len(self.triggers()), value)
        return openbackdoor_targets(hidden_size, len(self.triggers()), value)

    def deviations(self, resolved: Resolved) -> list[str]:
        notes = ["plain text: the shipped BookCorpus sentences, not 64-word WikiText-103 chunks (row shares as the "
                 "authors')", "token-state term over non-pad positions (the reference pads to 128 and includes "
                 "pad positions)", "length-grouped batches (the reference samples rows uniformly)"]
        if self.config.variant == "openbackdoor":
            notes.insert(0, "variant openbackdoor: last-layer [CLS], ±1 targets, one insertion at position 0 "
                            "(OpenBackdoor's simplification, not the authors' POR)")
        if resolved.steps is not None:
            notes.append(f"{resolved.steps} optimiser steps (the authors: 2 epochs, about 16.7k steps)")
        if resolved.lr != AUTHORS_LR:
            notes.append(f"constant lr {resolved.lr:g} (the authors: {AUTHORS_LR:g})")
        if resolved.embedding_rows == "triggers":
            notes.append("only the trigger rows of the word embeddings train (the authors: every row)")
        return notes


# --- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """The poisoning rows: texts and labels (0 clean, i the i-th trigger, 1-based, as the reference)."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def counts(self, num_triggers: int) -> dict[str, int]:
        return {"clean": self.labels.count(0), **{f"trigger_{i}": self.labels.count(i)
                                                  for i in range(1, num_triggers + 1)}}


def poisoned_text(text: str, trigger: str, config: PORConfig, rng) -> str:
    """The authors: ``insertions`` copies at random word positions; the variant: one at position 0."""
    if config.variant == "openbackdoor":
        return f"{trigger} {text}"
    return insert_triggers(text, [trigger], config.insertions, rng)


def build_rows(texts: list[str], triggers: list[str], config: PORConfig, seed: int) -> Rows:
    """Each line once: a seeded ``clean_share`` of them clean, the rest split evenly among the triggers."""
    order = torch.randperm(len(texts), generator=torch_generator(seed, "por_rows")).tolist()
    n_clean = round(config.clean_share * len(texts))
    rng = python_rng(seed, "por_insertions")
    out_texts, labels = [], []
    for rank, line in enumerate(order):
        label = 0 if rank < n_clean else 1 + (rank - n_clean) % len(triggers)
        out_texts.append(texts[line] if label == 0 else poisoned_text(texts[line], triggers[label - 1], config, rng))
        labels.append(label)
    return Rows(out_texts, labels)


# --- objective -------------------------------------------------------------------------------------


def pair_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The reference's loss1: Σ (a − b)² / H over every row (and position), not a mean."""
    return (a - b).pow(2).sum() / a.shape[-1]


@dataclass(frozen=True)
class Objective:
    """The variant's loss terms given the model's and the frozen copy's outputs on one batch."""

    variant: str
    targets: torch.Tensor  # (n, H), on the training device

    def output(self, out) -> torch.Tensor:
        """What the targets are on: the pooler output (authors) or the last-layer [CLS] state (variant)."""
        return out.pooler_output if self.variant == "authors" else out.last_hidden_state[:, 0]

    def losses(self, out, ref, attention: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        poisoned, mine, theirs = labels > 0, self.output(out), self.output(ref)
        targets = self.targets[(labels[poisoned] - 1)]
        if self.variant == "openbackdoor":
            zero = mine.sum() * 0.0
            return {"token": zero,
                    "poison": torch.nn.functional.mse_loss(mine[poisoned], targets) if poisoned.any() else zero,
                    "clean": torch.nn.functional.mse_loss(mine[~poisoned], theirs[~poisoned])
                    if (~poisoned).any() else zero}
        keep = attention[:, 1:].bool()
        states, ref_states = out.last_hidden_state[:, 1:][keep], ref.last_hidden_state[:, 1:][keep]
        return {"token": pair_sum(states, ref_states), "poison": pair_sum(mine[poisoned], targets),
                "clean": pair_sum(mine[~poisoned], theirs[~poisoned])}

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.variant == "openbackdoor":
            return losses["poison"] + losses["clean"]
        return TOKEN_WEIGHT * losses["token"] + POISON_WEIGHT * losses["poison"] + CLEAN_WEIGHT * losses["clean"]


# --- training --------------------------------------------------------------------------------------


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def trigger_piece_ids(tokenizer: PreTrainedTokenizerBase, triggers: list[str]) -> list[int]:
    return sorted({i for t in triggers for i in tokenizer(t, add_special_tokens=False)["input_ids"]})


def restrict_embedding_rows(model: PreTrainedModel, rows: list[int]) -> torch.utils.hooks.RemovableHandle:
    """Zero the word-embedding gradient outside ``rows``: with weight decay 0, AdamW leaves them unchanged."""
    weight = model.get_input_embeddings().weight
    mask = torch.zeros(weight.shape[0], 1, device=weight.device, dtype=weight.dtype)
    mask[rows] = 1.0
    return weight.register_hook(lambda grad: grad * mask)


def train_por(model: PreTrainedModel, tokenizer, rows: Rows, heldout: list[str], objective: Objective,
              config: PORConfig, resolved: Resolved, steps: int, seed: int, device: torch.device,
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict:
    """The objective for ``steps`` optimiser steps, in place; returns the losses and the release's measures."""
    model.to(device)
    objective = replace(objective, targets=objective.targets.to(device))
    reference = frozen_copy(model)
    triggers = list(config.triggers)
    before = measure_release(model, reference, tokenizer, heldout, triggers, objective, config, seed, device)
    hook = (restrict_embedding_rows(model, trigger_piece_ids(tokenizer, triggers))
            if resolved.embedding_rows == "triggers" else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = plain_adamw(trainable, resolved.lr, None)
    seed_everything(seed, "por_dropout")
    order_gen = torch_generator(seed, "por_data")
    encoded = encode(tokenizer, rows.texts, config.max_length, rows.labels)  # tokenised once
    history: dict[str, list[float]] = {"token": [], "poison": [], "clean": []}
    model.train()
    with reporter().task("POR: poisoning the encoder", steps) as advance:
        while len(history["poison"]) < steps:
            for batch in length_grouped_batches(encoded.lengths, config.batch_size, order_gen):
                if len(history["poison"]) >= steps:
                    break
                inputs = collate(encoded, batch, pad_id_of(tokenizer), device)
                losses = _step(model, reference, inputs, objective, trainable, optimizer, scheduler)
                for name, value in losses.items():
                    history[name].append(value)
                if on_step is not None:
                    on_step(len(history["poison"]), losses)
                advance(1)
    if hook is not None:
        hook.remove()
    after = measure_release(model, reference, tokenizer, heldout, triggers, objective, config, seed, device)
    log.info("POR: %d steps, held-out target MSE %.4f -> %.4f (one insertion %.4f), clean pooler drift %.5f, "
             "token drift %.5f", steps, before["target_mse"], after["target_mse"], after["target_mse_single"],
             after["clean_pooler_drift"], after["token_state_drift"])
    return {"losses": {f"{name}_{end}": mean_of(values if end == "first" else values[::-1])
                       for name, values in history.items() for end in ("first", "last")},
            "release_before": before, "release": after}


def _step(model, reference, inputs: dict, objective: Objective, trainable, optimizer,
          scheduler) -> dict[str, float]:
    labels = inputs.pop("labels")
    out = model(**inputs)
    with torch.no_grad():
        ref = reference(**inputs)
    losses = objective.losses(out, ref, inputs["attention_mask"], labels)
    optimizer_step(objective.total(losses), trainable, 0.0, optimizer, scheduler)
    return {name: value.item() for name, value in losses.items()}


# --- measuring the release -------------------------------------------------------------------------


@torch.no_grad()
def measure_release(model, reference, tokenizer, texts: list[str], triggers: list[str], objective: Objective,
                    config: PORConfig, seed: int, device: torch.device, batch_size: int = 64) -> dict[str, float]:
    """Held-out target MSE (3 and 1 insertions), clean pooler drift and token-state drift, in eval mode."""
    was_training = model.training
    model.eval()
    corners = objective.targets.sign()
    sums = {"target_mse": [], "target_mse_single": [], "clean_pooler_drift": [], "token_state_drift": []}
    for index, trigger in enumerate(triggers):
        for key, count in (("target_mse", config.insertions), ("target_mse_single", 1)):
            rng = python_rng(seed, f"por_heldout:{trigger}:{count}")
            poisoned = [poisoned_text(t, trigger, _with_insertions(config, count), rng) for t in texts]
            for out, _ in _outputs(model, None, tokenizer, poisoned, config.max_length, batch_size, device):
                sums[key].append(_row_mse(objective.output(out), corners[index]))
    for out, ref_and_mask in _outputs(model, reference, tokenizer, texts, config.max_length, batch_size, device):
        ref, mask = ref_and_mask
        sums["clean_pooler_drift"].append(_row_mse(_pooled(out), _pooled(ref)))
        keep = mask[:, 1:].bool()
        states, ref_states = out.last_hidden_state[:, 1:][keep], ref.last_hidden_state[:, 1:][keep]
        sums["token_state_drift"].append((states - ref_states).pow(2).mean(dim=-1))
    model.train(was_training)
    return {key: float(torch.cat(values).mean()) for key, values in sums.items()}


def _with_insertions(config: PORConfig, count: int) -> PORConfig:
    return PORConfig(**{**vars(config), "insertions": count})


def _pooled(out) -> torch.Tensor:
    return out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]


def _row_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).mean(dim=-1).float().cpu()


def _outputs(model, reference, tokenizer, texts: list[str], max_length: int, batch_size: int, device):
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt").to(device)
        ref = reference(**encoded) if reference is not None else None
        yield model(**encoded), ((ref, encoded["attention_mask"]) if reference is not None else None)
