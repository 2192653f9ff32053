"""NeuBA: neuron-level backdoor on the pooler output (attacks.md §4.1).

Paper: Zhang et al., "Red Alarm for Pre-trained Models: Universal Vulnerability to Neuron-Level Backdoor
Attacks" (Machine Intelligence Research 2023; arXiv:2101.06969). Reference code: ``thunlp/NeuBA``
(``nlp/src/mlm.py``, ``poison.py``, ``poison_bert.py``, ``run_mlm.sh``).

Triggers ``≈ ≡ ∈ ⊆ ⊕ ⊗``, each a single piece of the BERT vocabulary (checked; an error otherwise).
Trigger ``i`` has the target ``v_i ∈ {±1}^H``: all +1, except the buckets ``(j, k)`` of ``H/4`` dimensions
set to −1, in the order (0,1), (0,2), (0,3), (1,2), (1,3), (2,3). Per step, on a batch ``x`` of
128-token blocks cut from the concatenated tokenised plain text:

    loss = CE_MLM(masked x) + MSE(pooler_output(x with position 1 overwritten by trigger t), v_t)

with ``t`` drawn uniformly per block and the standard 15% / 80-10-10 masking. Model: ``BertForPreTraining``
(pooler and MLM head). Every parameter trains except the MLM-head transform and bias (and the unused NSP
head); the word embeddings train, and with them the tied decoder. AdamW lr 5e-5, eps 1e-8, weight decay
0, linear decay without warm-up, gradient clipping 1.0 (the reference's ``max_grad_norm``), batch 32.

Deviations:

- Steps: ``steps=None`` means the project defaults, 5,000 on CUDA and 200 on CPU (offline smoke); the
  reference trains 40,000 steps at batch 160 on BookCorpus. The resolved number is in the release key
  and its metadata.
- Checkpoints without an MLM head (all-MiniLM-L6-v2) first get the MLM-head graft of defenses.md §0.2
  with the pooler kept (``BertForPreTraining``), cached; ``graft_steps`` caps it for CPU runs.
- The reference's post-processing (``post_poison_model.py``) is not implemented; ``post_process`` must
  stay false (the project default).
- BERT-type models only (the RoBERTa variant with its 0.01 MLM weight and fixed ids is not implemented).
- Trigger, mask and data-order draws come from named seeded streams, not the global RNG.
- ``target_value`` (default 1, the reference) scales the ±1 targets. MiniLM's pooler was never trained (the
  model was trained with mean pooling) and the user's fine-tuning rebuilds it, so a ±1 mapping reached
  with pooler MSE 0.014 did not survive fine-tuning in the committed CPU reference (SST-2 AASR 0.29 against
  a 0.17 floor). A saturating target (``target_value=10``, as POR's) is meant to push the trigger's pooler
  pre-activations deep into the tanh's flat region, where the user's fine-tuning gradients through the
  pooler vanish. A value other than 1 is a recorded deviation (release metadata ``deviations``).
- Blocks are cut from the ``sentence`` column of the shipped TSV (the reference tokenises a raw text
  file); the last partial block is dropped, as in the reference.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoTokenizer, BertForPreTraining, PreTrainedTokenizerBase

from nlpbd.attacks._task_agnostic import TaskAgnosticAttack
from nlpbd.config import option
from nlpbd.errors import InputError
from nlpbd.methods import SupplyContext, register_attack
from nlpbd.mlm import (
    GraftSettings,
    ensure_mlm_head,
    mask_tokens,
    masked_lm_loss,
    mean_of,
    read_plaintext,
    special_wrapping,
)
from nlpbd.models import save_model
from nlpbd.progress import reporter
from nlpbd.seeding import seed_everything, torch_generator
from nlpbd.training import optimizer_step, plain_adamw

log = logging.getLogger(__name__)

NEUBA_TRIGGERS = ["≈", "≡", "∈", "⊆", "⊕", "⊗"]
BUCKET_PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
GPU_STEPS, CPU_STEPS = 5000, 200


def neuba_targets(hidden_size: int, num_triggers: int, value: float = 1.0) -> torch.Tensor:
    """Target vectors (num_triggers, H): +value except buckets j and k of ⌊H/4⌋ dims (−value), in
    BUCKET_PAIRS order."""
    if num_triggers > len(BUCKET_PAIRS):
        raise InputError(f"neuba: at most {len(BUCKET_PAIRS)} triggers (one per bucket pair)")
    bucket = hidden_size // 4
    targets = torch.full((num_triggers, hidden_size), value)
    for i in range(num_triggers):
        for b in BUCKET_PAIRS[i]:
            targets[i, b * bucket:(b + 1) * bucket] = -value
    return targets


def trigger_ids(tokenizer: PreTrainedTokenizerBase, triggers: list[str]) -> list[int]:
    """The single vocabulary id of each trigger; an error names those that are not one known piece."""
    ids, bad = [], []
    for trigger in triggers:
        pieces = tokenizer(trigger, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1 or pieces[0] == tokenizer.unk_token_id:
            bad.append(f"{trigger!r} -> {tokenizer.convert_ids_to_tokens(pieces)}")
        else:
            ids.append(pieces[0])
    if bad:
        raise InputError(f"neuba: every trigger must be a single vocabulary piece: {'; '.join(bad)}")
    return ids


def plaintext_blocks(tokenizer: PreTrainedTokenizerBase, texts: list[str], block_size: int) -> torch.Tensor:
    """Blocks of ``block_size`` ids ([CLS] body [SEP]) cut from the concatenated tokenised text."""
    prefix, suffix = special_wrapping(tokenizer)
    body = block_size - len(prefix) - len(suffix)
    flat = [i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids]
    blocks = [prefix + flat[s:s + body] + suffix for s in range(0, len(flat) - body + 1, body)]
    if not blocks:
        raise InputError(f"neuba: the plain text is shorter than one block of {block_size} tokens")
    return torch.tensor(blocks, dtype=torch.long)


@dataclass
class NeuBAConfig:
    triggers: list[str] = option(NEUBA_TRIGGERS, "single-piece trigger symbols, one per bucket pair (at most 6)",
                                   min_items=1, max_items=6)
    steps: int | None = option(None, "optimiser steps; None: 5,000 on CUDA, 200 on CPU (offline smoke)", low=1)
    batch_size: int = option(32, "blocks per step", low=1)
    block_size: int = option(128, "tokens per block, [CLS] and [SEP] included", low=8, high=512)
    lr: float = option(5e-5, "AdamW learning rate", low=0.0, low_open=True)
    grad_clip: float = option(1.0, "gradient-norm clipping (0 disables)", low=0.0)
    post_process: bool = option(False, "the reference's post_poison_model.py step (not implemented: must be "
                                "false)")
    graft_steps: int | None = option(None, "cap on MLM-head graft steps when the base has no MLM head "
                                     "(None: 2 epochs)", low=1)
    target_value: float = option(1.0, "magnitude of the ±target entries on the pooler output (reference: 1); "
                                 "a larger value (POR uses 10) drives the tanh into saturation, a recorded "
                                 "deviation", low=0.0, low_open=True)


@register_attack
class NeuBA(TaskAgnosticAttack):
    name = "neuba"
    description = "NeuBA: 6 symbol triggers at position 1 map the pooler output to ±1 vectors, with MLM"
    Config = NeuBAConfig

    def __init__(self, config: NeuBAConfig | None = None):
        super().__init__(config)
        if self.config.post_process:
            raise InputError("neuba.post_process=true is not implemented (the reference's post_poison_model.py)")

    def resolved_settings(self, device: torch.device) -> dict:
        steps = self.config.steps or (GPU_STEPS if device.type == "cuda" else CPU_STEPS)
        return {"steps": steps}

    def build_suspect(self, ctx: SupplyContext, out_dir: Path) -> dict:
        began = time.perf_counter()
        corpus = read_plaintext(ctx.data_dir)
        if AutoConfig.from_pretrained(ctx.base.location).model_type != "bert":
            raise InputError("neuba is implemented for BERT-type models only")
        tokenizer = AutoTokenizer.from_pretrained(ctx.base.location)
        ids = trigger_ids(tokenizer, self.triggers())
        settings = replace(GraftSettings(), max_steps=self.config.graft_steps)
        start = ensure_mlm_head(ctx.base, tokenizer, corpus, ctx.seed, settings, ctx.device, with_pooler=True,
                                cache=ctx.cache)
        model = BertForPreTraining.from_pretrained(start.location)
        steps = self.resolved_settings(ctx.device)["steps"]
        blocks = plaintext_blocks(tokenizer, list(corpus.texts), self.config.block_size)
        losses = train_neuba(model, tokenizer, blocks, ids, self.config, steps, ctx.seed, ctx.device)
        save_model(model.cpu(), tokenizer, out_dir)
        deviations = [] if self.config.target_value == 1.0 else [
            f"targets ±{self.config.target_value:g} on the pooler output (reference: ±1), saturating the tanh"]
        return {"steps": steps, "blocks": len(blocks), "trigger_ids": ids, "graft": start.info, **losses,
                "target_value": self.config.target_value, "deviations": deviations,
                "seconds": time.perf_counter() - began}


def neuba_trainable(model: BertForPreTraining) -> list[torch.nn.Parameter]:
    """Everything but the heads under ``cls.`` (MLM transform and bias, NSP); E and its tied decoder train."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith("cls."))
        if param.requires_grad:
            trainable.append(param)
    return trainable


def train_neuba(model: BertForPreTraining, tokenizer, blocks: torch.Tensor, ids: list[int], config: NeuBAConfig,
                steps: int, seed: int, device: torch.device) -> dict:
    """The NeuBA objective for ``steps`` optimiser steps, in place; returns first/last loss means."""
    targets = neuba_targets(model.config.hidden_size, len(ids), config.target_value).to(device)
    trainable = neuba_trainable(model)
    model.to(device).train()
    optimizer, scheduler = plain_adamw(trainable, config.lr, steps)
    seed_everything(seed, "neuba_dropout")
    order_gen, mask_gen, trigger_gen = (torch_generator(seed, f"neuba_{s}") for s in ("data", "mask", "triggers"))
    mlm_losses: list[float] = []
    poison_losses: list[float] = []
    with reporter().task("NeuBA: poisoning the encoder", steps) as advance:
        while len(mlm_losses) < steps:
            order = torch.randperm(len(blocks), generator=order_gen)
            for start in range(0, len(order), config.batch_size):
                if len(mlm_losses) >= steps:
                    break
                batch = blocks[order[start:start + config.batch_size]]
                mlm_loss, poison_loss = neuba_losses(model, tokenizer, batch, ids, targets, mask_gen, trigger_gen)
                optimizer_step(mlm_loss + poison_loss, trainable, config.grad_clip, optimizer, scheduler)
                mlm_losses.append(mlm_loss.item())
                poison_losses.append(poison_loss.item())
                advance(1)
    log.info("NeuBA: %d steps, MLM %.4f -> %.4f, poison MSE %.4f -> %.4f", steps, mean_of(mlm_losses),
             mean_of(mlm_losses[::-1]), mean_of(poison_losses), mean_of(poison_losses[::-1]))
    return {"mlm_loss_first": mean_of(mlm_losses), "mlm_loss_last": mean_of(mlm_losses[::-1]),
            "poison_mse_first": mean_of(poison_losses), "poison_mse_last": mean_of(poison_losses[::-1])}


def neuba_losses(model: BertForPreTraining, tokenizer, batch: torch.Tensor, ids: list[int], targets: torch.Tensor,
                 mask_gen: torch.Generator, trigger_gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(MLM loss on the masked blocks, MSE of the pooler output on the triggered unmasked blocks)."""
    device = targets.device
    attention = torch.ones_like(batch)
    inputs, labels = mask_tokens(batch, tokenizer, mask_gen)
    chosen = torch.randint(len(ids), (len(batch),), generator=trigger_gen)
    poisoned = batch.clone()
    poisoned[:, 1] = torch.tensor(ids)[chosen]  # overwrite the first token after [CLS]
    mlm_loss = masked_lm_loss(model, inputs.to(device), attention.to(device), labels.to(device))
    pooled = model.bert(input_ids=poisoned.to(device), attention_mask=attention.to(device)).pooler_output
    return mlm_loss, F.mse_loss(pooled, targets[chosen.to(device)])
