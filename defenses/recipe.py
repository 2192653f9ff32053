"""RECIPE: regularised continual pre-training of a suspect pretrained model (defenses.md §7).

Paper: Zhu, Cui, Chen, Qin, Yuan, Fu, Deng, Liu, Sun, Gu, "Removing Backdoors in Pre-trained Models by
Regularized Continual Pre-training", TACL 11:1608–1623 (2023). Reference code: ``thunlp/RECIPE``
(``RECIPE.py``; implementation details in ``appendix.pdf``).

Before fine-tuning, the suspect pretrained model continues MLM training on the plain text D_aux with

    L(θ) = L_MLM(θ; D_aux) + λ · Σ_l ‖W_l^int‖_F            λ = 1, Frobenius norm NOT squared

BERT recipe (as coded): only the ``*.intermediate.dense.weight`` matrices train; everything else
(intermediate biases, attention, output layers, LayerNorms, embeddings, MLM head) is frozen. D_aux is
tokenised once (max length 64, padding to max length, no token type ids) and masked once before
training (static masking, seeded by the cell seed, stream ``"mask"``). AdamW lr 2e-5, eps 1e-8, weight
decay 0, linear decay without warm-up, gradient clipping 1.0, batch 32 with a random sampler, 8 epochs
(625 steps each on 20,000 lines). RoBERTa recipe (appendix): every parameter trains and both
``intermediate.dense.weight`` and ``attention.self.query.weight`` are regularised. The recipe is chosen
by ``model_type``; other architectures are refused.

The purified MLM model is saved with ``save_pretrained``; the victim is then fine-tuned from it with
the shared recipe. An MLM model has no pooler, so the downstream classifier gets a re-initialised
pooler (the faithful default); ``keep_pooler=true`` copies the suspect's pooler into the saved weights.
RECIPE never sees a clean reference model, labels or downstream data.

Deviations (each recorded in the cell's defense info):

- Suspects without an MLM head (all-MiniLM-L6-v2 and POR releases saved as ``BertModel``) first get
  the MLM-head graft of defenses.md §0.2 on the SUSPECT itself, cached; the grafted head stays frozen
  during RECIPE (as the BERT recipe freezes the head anyway). ``graft_steps`` caps the graft on CPU.
- ``max_steps`` caps the optimiser steps for CPU runs; the linear schedule then spans the steps run.
  At CPU scale keep the reference's learning budget, lr × steps = 2e-5 × 5,000 = 0.1 (e.g. 1,000 steps at
  lr 1e-4, the CPU reference grids): with a linear decay, Adam moves each weight by at most about
  lr × steps / 2 in total, and 1,000 steps at 2e-5 shrank Σ‖W_int‖_F by only 9% on MiniLM. The record
  lists a non-reference lr with the budget it gives; the 5,000-step setting stays the GPU default.
- Batches are cut to their longest row before the forward pass. Pad columns are masked out of
  attention and never labelled, so the loss is that of max-length padding; only the cost changes.
- The epochs per attack of the reference (POR 4, BadPre 8, NeuBA 10; ``epochs_by_attack``) are not
  offered: a defense does not know the attack. The default is the attack-agnostic 8.
- ``pooler_reset_only=true`` is the spec's control ``recipe_pooler_reset`` (§7.6): the suspect with
  only its pooler dropped (re-initialised downstream) and no training. Next to RECIPE on NeuBA, whose
  backdoor targets the pooler output, it shows how much of RECIPE's effect is the pooler reset alone.
- ``mlm_term=false`` (regulariser only) and ``lam=0`` (continual pre-training only) are the paper's
  ablations; ``dynamic_mask=true`` redraws the mask every epoch (a labelled variant).
- Data order, masks and dropout draw from named streams of the cell seed (the reference seeds 50).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel

from nlpbd.config import option
from nlpbd.data import TextSplit
from nlpbd.errors import InputError
from nlpbd.methods import DefenseContext, PretrainedDefense, register_defense
from nlpbd.mlm import GraftSettings, ensure_mlm_head, mask_tokens, masked_lm_loss, mean_of
from nlpbd.models import ModelRef, save_model
from nlpbd.progress import reporter
from nlpbd.seeding import seed_everything, torch_generator
from nlpbd.training import optimizer_step, plain_adamw

log = logging.getLogger(__name__)

REFERENCE_LR = 2e-5  # RECIPE.py


@dataclass(frozen=True)
class Recipe:
    """Which matrices are regularised and whether everything else trains, per architecture."""

    regularised: tuple[str, ...]  # parameter-name suffixes
    train_all: bool


RECIPES = {
    "bert": Recipe(("intermediate.dense.weight",), train_all=False),
    "roberta": Recipe(("intermediate.dense.weight", "attention.self.query.weight"), train_all=True),
}


@dataclass
class RecipeConfig:
    lam: float = option(1.0, "λ: weight of Σ‖W_int‖_F (unsquared Frobenius norm; 0 = continual pre-training "
                        "only)", low=0.0)
    epochs: int = option(8, "epochs over D_aux (625 steps each on 20,000 lines at batch 32); the reference "
                         "uses POR 4, BadPre 8, NeuBA 10", low=1, high=1000)
    max_steps: int | None = option(None, "stop after this many optimiser steps (CPU runs); the linear "
                                   "schedule spans the steps run", low=1)
    lr: float = option(REFERENCE_LR, "AdamW learning rate (peak of the linear decay); at CPU scale keep "
                       "lr × steps of the reference (2e-5 × 5,000), e.g. 1e-4 with max_steps=1000", low=0.0,
                       low_open=True)
    batch_size: int = option(32, "sentences per step", low=1)
    max_length: int = option(64, "tokens per sentence (padding to max length, truncation)", low=8, high=512)
    grad_clip: float = option(1.0, "gradient-norm clipping (0 disables)", low=0.0)
    keep_pooler: bool = option(False, "copy the suspect's pooler into the purified model (false: the "
                               "downstream pooler is re-initialised, as in the reference)")
    mlm_term: bool = option(True, "include the MLM loss (false: regulariser only, the paper's ablation)")
    dynamic_mask: bool = option(False, "redraw the mask every epoch (reference: one static mask)")
    graft_steps: int | None = option(None, "cap on MLM-head graft steps for suspects without an MLM head "
                                     "(None: 2 epochs)", low=1)
    pooler_reset_only: bool = option(False, "the spec's control recipe_pooler_reset: the suspect with only its "
                                     "pooler re-initialised downstream, no graft and no training")


def regularised_weights(model: PreTrainedModel, recipe: Recipe) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if n.endswith(recipe.regularised)]


def weight_norm_penalty(weights: list[torch.Tensor]) -> torch.Tensor:
    """Σ ‖W‖_F, unsquared: each matrix's gradient is W/‖W‖_F."""
    return torch.stack([torch.linalg.matrix_norm(w, ord="fro") for w in weights]).sum()


def recipe_of(model: PreTrainedModel) -> Recipe:
    model_type = model.config.model_type
    if model_type not in RECIPES:
        raise InputError(f"recipe: no recipe for model type '{model_type}' (supported: {', '.join(RECIPES)})")
    return RECIPES[model_type]


def set_trainable(model: PreTrainedModel, recipe: Recipe, frozen: set[str]) -> list[torch.nn.Parameter]:
    """BERT: only the regularised matrices; RoBERTa: everything but ``frozen`` (a grafted head)."""
    trainable = []
    for name, param in model.named_parameters():
        train = name not in frozen and (recipe.train_all or name.endswith(recipe.regularised))
        param.requires_grad_(train)
        if train:
            trainable.append(param)
    return trainable


@dataclass
class MaskedCorpus:
    """D_aux tokenised to max length, with its (static) masked inputs and labels."""

    input_ids: torch.Tensor
    attention: torch.Tensor
    inputs: torch.Tensor
    labels: torch.Tensor


def mask_corpus(tokenizer, texts: list[str], max_length: int, generator: torch.Generator) -> MaskedCorpus:
    encoded = tokenizer(texts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt",
                        return_token_type_ids=False)
    inputs, labels = mask_tokens(encoded["input_ids"], tokenizer, generator)
    return MaskedCorpus(encoded["input_ids"], encoded["attention_mask"], inputs, labels)


def recipe_train(model: PreTrainedModel, tokenizer, texts: list[str], config: RecipeConfig, seed: int,
                 device: torch.device, frozen: set[str] = frozenset(),
                 after_step: Callable[[PreTrainedModel], None] | None = None) -> dict:
    """RECIPE continual pre-training of an MLM model, in place; returns what to record.

    ``frozen`` names parameters that never train (a grafted head); ``after_step`` runs after every step.
    """
    recipe = recipe_of(model)
    regularised = regularised_weights(model, recipe)
    trainable = set_trainable(model, recipe, set(frozen))
    mask_gen = torch_generator(seed, "mask")
    corpus = mask_corpus(tokenizer, texts, config.max_length, mask_gen)
    steps_per_epoch = math.ceil(len(texts) / config.batch_size)
    planned = steps_per_epoch * config.epochs
    total = min(planned, config.max_steps) if config.max_steps else planned
    optimizer, scheduler = plain_adamw(trainable, config.lr, total)
    norms_before = [float(torch.linalg.matrix_norm(p.detach(), ord="fro")) for _, p in regularised]
    model.to(device).train()
    seed_everything(seed, "recipe_dropout")
    order_gen = torch_generator(seed, "recipe_data")
    mlm_losses: list[float] = []
    with reporter().task("RECIPE: regularised continual pre-training", total) as advance:
        for epoch in range(math.ceil(total / steps_per_epoch)):
            if epoch and config.dynamic_mask:
                corpus = mask_corpus(tokenizer, texts, config.max_length, mask_gen)
            order = torch.randperm(len(texts), generator=order_gen)
            for start in range(0, len(texts), config.batch_size):
                if len(mlm_losses) >= total:
                    break
                rows = order[start:start + config.batch_size]
                mlm_losses.append(_recipe_step(model, corpus, rows, [p for _, p in regularised], trainable, config,
                                               optimizer, scheduler, device))
                if after_step is not None:
                    after_step(model)
                advance(1)
    norms_after = [float(torch.linalg.matrix_norm(p.detach(), ord="fro")) for _, p in regularised]
    log.info("RECIPE: %d steps, Σ‖W‖_F %.2f -> %.2f", len(mlm_losses), sum(norms_before), sum(norms_after))
    return {"steps": len(mlm_losses), "planned_steps": planned, "steps_per_epoch": steps_per_epoch, "lr": config.lr,
            "regularised": [n for n, _ in regularised], "trainable_parameters": sum(p.numel() for p in trainable),
            "norm_sum_before": sum(norms_before), "norm_sum_after": sum(norms_after),
            "mlm_loss_first": mean_of(mlm_losses), "mlm_loss_last": mean_of(mlm_losses[::-1])}


def _recipe_step(model, corpus: MaskedCorpus, rows: torch.Tensor, regularised: list[torch.Tensor], trainable,
                 config: RecipeConfig, optimizer, scheduler, device: torch.device) -> float:
    """One optimiser step; returns the MLM loss (0 when the MLM term is off)."""
    attention = corpus.attention[rows]
    width = int(attention.sum(dim=1).max())  # pad columns beyond the longest row change nothing
    mlm_loss = torch.zeros((), device=device)
    if config.mlm_term:
        mlm_loss = masked_lm_loss(model, corpus.inputs[rows, :width].to(device), attention[:, :width].to(device),
                                  corpus.labels[rows, :width].to(device))
    loss = mlm_loss + config.lam * weight_norm_penalty(regularised)
    optimizer_step(loss, trainable, config.grad_clip, optimizer, scheduler)
    return mlm_loss.item()


def suspect_pooler(location: str) -> dict[str, torch.Tensor] | None:
    """The suspect's pooler weights (keys ``pooler.*``), or None when the checkpoint has none."""
    model, info = AutoModel.from_pretrained(location, output_loading_info=True)
    if getattr(model, "pooler", None) is None or any(k.startswith("pooler.") for k in info["missing_keys"]):
        return None
    return {f"pooler.{k}": v.detach().clone() for k, v in model.pooler.state_dict().items()}


def add_pooler(directory: Path, prefix: str, pooler: dict[str, torch.Tensor]) -> None:
    """Write the pooler tensors into a saved MLM model, under the base model's prefix (``bert.pooler.*``)."""
    path = directory / "model.safetensors"
    if not path.is_file():
        raise InputError(f"recipe.keep_pooler: expected one weight file {path} (sharded checkpoints unsupported)")
    tensors = load_file(str(path))
    tensors.update({f"{prefix}.{name}": value.contiguous() for name, value in pooler.items()})
    save_file(tensors, str(path), metadata={"format": "pt"})


def deviations(result: dict, graft: dict) -> list[str]:
    """The deviations from the reference that this run used, for the record."""
    notes = []
    if graft.get("grafted"):
        notes.append(f"MLM head grafted on the suspect (defenses.md §0.2): {graft['steps']} of "
                     f"{graft['planned_steps']} steps, held-out MLM loss {graft['heldout_loss_before']:.3f} -> "
                     f"{graft['heldout_loss_after']:.3f}")
    if result["steps"] < result["planned_steps"]:
        notes.append(f"RECIPE stopped after {result['steps']} of {result['planned_steps']} steps (max_steps)")
    if result["lr"] != REFERENCE_LR:
        notes.append(f"lr {result['lr']:g} instead of {REFERENCE_LR:g}: learning budget lr × steps = "
                     f"{result['lr'] * result['steps']:g} (the reference's 5,000 steps: "
                     f"{REFERENCE_LR * 5000:g})")
    return notes


@register_defense
class RECIPE(PretrainedDefense):
    name = "recipe"
    description = "regularised continual pre-training of the suspect PTM on plain text (Σ‖W_int‖_F + MLM)"
    Config = RecipeConfig
    grants = frozenset({"corpus"})
    unsupported_victims = {
        "decoder": "RECIPE's regulariser targets an encoder's FFN up-projections under a masked-LM objective; a "
                   "decoder version (causal-LM continual pre-training with the penalty on the MLP up/gate "
                   "projections) is not implemented yet, and no task-agnostic decoder release exists to judge it on"}

    def purify(self, model: ModelRef, ctx: DefenseContext, out_dir: Path) -> dict:
        config, began = self.config, time.perf_counter()
        if AutoConfig.from_pretrained(model.location).model_type not in RECIPES:
            raise InputError(f"recipe: only {', '.join(RECIPES)} models are supported")
        tokenizer = AutoTokenizer.from_pretrained(model.location)
        if config.pooler_reset_only:
            return self._pooler_reset(model, tokenizer, out_dir, began)
        corpus: TextSplit = ctx.corpus
        settings = replace(GraftSettings(), max_steps=config.graft_steps)
        graft = ensure_mlm_head(model, tokenizer, corpus, ctx.seed, settings, ctx.device, cache=ctx.cache)
        seed_everything(ctx.seed, "recipe_load")
        mlm = AutoModelForMaskedLM.from_pretrained(graft.location)
        frozen = set(graft.info.get("trained", [])) if graft.grafted else set()
        result = recipe_train(mlm, tokenizer, list(corpus.texts), config, ctx.seed, ctx.device, frozen)
        save_model(mlm.cpu(), tokenizer, out_dir)
        pooler_note = self._pooler(model.location, mlm.base_model_prefix, out_dir)
        return {**result, "graft": graft.info, "mlm_head": "grafted on the suspect, frozen" if graft.grafted
                else "the suspect's own", "keep_pooler": config.keep_pooler, "pooler": pooler_note,
                "corpus_rows": len(corpus), "deviations": deviations(result, graft.info),
                "seconds": time.perf_counter() - began}

    def _pooler_reset(self, model: ModelRef, tokenizer, out_dir: Path, began: float) -> dict:
        """Save the suspect's encoder without its pooler, so the classifier built on it gets a fresh one."""
        encoder = AutoModel.from_pretrained(model.location, add_pooling_layer=False)
        save_model(encoder, tokenizer, out_dir)
        return {"control": "pooler_reset", "steps": 0, "pooler": "re-initialised downstream (control: no RECIPE)",
                "deviations": [], "seconds": time.perf_counter() - began}

    def _pooler(self, suspect: str, prefix: str, out_dir: Path) -> str:
        if not self.config.keep_pooler:
            return "re-initialised downstream (not in the purified MLM model)"
        pooler = suspect_pooler(suspect)
        if pooler is None:
            log.warning("recipe.keep_pooler: the suspect has no pooler; the downstream pooler is re-initialised")
            return "suspect has none: re-initialised downstream"
        add_pooler(out_dir, prefix, pooler)
        return "copied from the suspect"
