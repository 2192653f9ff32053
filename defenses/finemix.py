"""Fine-mixing: mix the suspect weights with the clean pretrained ones, then fine-tune (defenses.md §3).

Paper: Zhang, Lyu, Ma, Wang, Sun, "Fine-mixing: Mitigating Backdoors in Fine-tuned Language Models",
Findings of EMNLP 2022 (arXiv:2210.09545). No public reference code was located, so only the
abstract is verified: (i) mix the backdoored fine-tuned weights θ_bd with the clean pretrained
weights θ_pre, (ii) fine-tune the mixed weights on a small clean set D_c. Everything below that goes
beyond this is unverified; our default (spec §3):

- ``rho`` is the fraction of θ_bd's values kept, elementwise: ``m = torch.rand(shape, g) < rho`` with
  ``g`` seeded from (cell seed, ``"finemix-mask"``), ``θ_mix = torch.where(m, θ_bd, θ_pre)``.
  ``torch.where`` (not ``θ_pre + m·Δ``) makes rho = 1 return θ_bd bit-exactly, so FT is exactly
  Fine-mixing with rho = 1. The mask generator is separate from the training streams, so drawing it
  shifts nothing in the fine-tuning that follows.
- Every floating-point parameter with a pretrained value is mixed (embeddings, encoder, LayerNorms,
  pooler). Head parameters (the loader's missing keys) keep θ_bd (``head=reinit`` takes the freshly
  initialised head of θ_pre, drawn under a seed from (cell seed, ``"finemix-head"``)). Buffers are
  never touched. θ_pre's tensors are cast to θ_bd's dtype before mixing.
- ``mask_mode=magnitude`` keeps, per tensor, the ⌈rho·numel⌉ entries with the largest
  |θ_bd − θ_pre| (ties broken by position); the paper's "selective" variant is unverified.
- Base check: same ``model_type``, same parameter names, same shapes; only rows of vocabulary-sized
  tensors may differ (the attacker resized the vocabulary): the overlapping rows are mixed and the
  extra rows are kept from θ_bd. ``config._name_or_path`` is not compared (a cached victim's is its
  cache path). The median cosine between overlapping embedding rows of θ_bd and θ_pre is recorded
  and a warning is logged below 0.5: a wrong base that passes the shape checks (e.g. cased vs
  uncased BERT, whose vocabulary sizes differ like a resize) shows up there. It does not refuse.
- ``select_rho`` (ours): for rho in 0.1, 0.2, …, 0.9 (ascending), mix, fine-tune with the FT
  settings on the budget's fit rows, and measure accuracy on D_c^val. D_c^val must be rows the victim
  never trained on (spec §3.3): by default (``budget.val_source=dev``) it is a stratified sample of
  the clean dev split, disjoint from D_c, and the fit rows are all of D_c; with
  ``val_source=budget`` it is a held-out part of D_c (the victim's own training rows, so the
  baseline is a training accuracy: the first implementation's flaw, kept only as a control). The
  first (smallest) rho whose accuracy is ≥ acc(θ_bd on D_c^val, before any change) − tol is kept,
  where tol = max(``select_tolerance``, one standard error of that baseline accuracy,
  sqrt(a(1 − a)/n)), so a difference of one or two validation rows cannot decide. The kept model is
  the one trained at that point (as FT ``select=clean_val`` keeps its model; no refit). The sweep
  stops there, so larger rho are not trained; every trained point is recorded. If none qualifies, the
  point with the best D_c^val accuracy (ties: smaller rho) is
  kept and ``fallback`` is recorded. The masks of all points come from the same generator seed, so
  they are nested (the kept set at 0.3 contains the one at 0.2). ASR never enters the choice.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
from transformers import PreTrainedModel

from nlpbd.config import option
from nlpbd.defenses.ft import FTConfig, finetune_on_budget
from nlpbd.errors import InputError
from nlpbd.methods import CleanBudget, DefenseContext, DefenseOutcome, RepairDefense, register_defense
from nlpbd.models import ModelRef, head_parameter_names, load_classifier
from nlpbd.seeding import seed_for, torch_generator
from nlpbd.training import accuracy_of, encode, pad_id_of

log = logging.getLogger(__name__)

MASK_STREAM = "finemix-mask"
HEAD_STREAM = "finemix-head"
RHO_GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))
LOW_EMBEDDING_COSINE = 0.5  # below this median row cosine θ_bd hardly looks fine-tuned from θ_pre

AfterMix = Callable[[PreTrainedModel], None]


@dataclass
class FineMixConfig(FTConfig):
    """The FT settings (§1) for the fine-tuning stage, plus the mixing settings."""

    epochs: int = option(FTConfig.epochs, "epochs of the FT stage over D_c (0: the mixed model, not fine-tuned)",
                         low=0, high=1000)
    rho: float = option(0.5, "fraction of θ_bd's values kept (the rest from θ_pre); unverified; our default",
                        low=0.0, high=1.0)
    mask_mode: Literal["random", "magnitude"] = option(
        "random", "random: elementwise Bernoulli(rho) mask; magnitude: per tensor keep the ceil(rho·numel) "
        "largest |θ_bd − θ_pre| (unverified variant)")
    head: Literal["keep", "reinit"] = option("keep", "classification head: keep θ_bd's (unverified; our "
                                             "default) or re-initialise it")
    select_rho: bool = option(False, "sweep rho 0.1..0.9 and keep the smallest whose D_c^val accuracy after "
                              "fine-tuning on D_c minus D_c^val is within select_tolerance of θ_bd's (ours)")
    select_tolerance: float = option(0.02, "accuracy drop on D_c^val allowed by select_rho, widened to one "
                                     "standard error of θ_bd's D_c^val accuracy where that is larger (ours)",
                                     low=0.0, high=1.0)


# --- θ_pre and the base check ---------------------------------------------------------------------


def load_pretrained(ref: ModelRef, num_labels: int, seed: int) -> tuple[PreTrainedModel, set[str]]:
    """θ_pre as a classifier and its head parameter names, without touching the global RNG state.

    The new head is initialised under a seed from (cell seed, "finemix-head"), so ``head=reinit`` is
    reproducible and loading θ_pre shifts no other stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_for(seed, HEAD_STREAM))
        pretrained = load_classifier(ref, num_labels)
        heads = head_parameter_names(ref, num_labels)
    return pretrained, heads


@dataclass
class BaseCheck:
    vocab_pre: int
    vocab_bd: int
    resized: list[str]  # vocabulary-sized tensors whose row count differs
    embedding_cosine_median: float


def _vocab_rows(model: PreTrainedModel) -> int:
    return model.get_input_embeddings().weight.shape[0]


def check_same_base(model: PreTrainedModel, pretrained: PreTrainedModel) -> BaseCheck:
    """Refuse θ_bd / θ_pre pairs that do not share an architecture (vocabulary resizes are allowed)."""
    if model.config.model_type != pretrained.config.model_type:
        raise InputError(f"θ_bd is a '{model.config.model_type}' model but θ_pre is a "
                         f"'{pretrained.config.model_type}' model: not the base it was fine-tuned from")
    bd, pre = dict(model.named_parameters()), dict(pretrained.named_parameters())
    if set(bd) != set(pre):
        only = sorted(set(bd) ^ set(pre))[:5]
        raise InputError(f"θ_bd and θ_pre have different parameters (e.g. {', '.join(only)}): not the base "
                         "the suspect model was fine-tuned from")
    vocab_bd, vocab_pre = _vocab_rows(model), _vocab_rows(pretrained)
    resized = []
    for name, tensor in bd.items():
        if tensor.shape == pre[name].shape:
            continue
        if not _is_vocab_resize(tensor.shape, pre[name].shape, vocab_bd, vocab_pre):
            raise InputError(f"θ_bd and θ_pre differ in the shape of '{name}' ({tuple(tensor.shape)} vs "
                             f"{tuple(pre[name].shape)}): not the base the suspect model was fine-tuned from")
        resized.append(name)
    check = BaseCheck(vocab_pre, vocab_bd, resized, _embedding_cosine_median(model, pretrained))
    if resized:
        log.info("θ_bd's vocabulary has %d rows, θ_pre's %d: mixing the overlapping rows only",
                 vocab_bd, vocab_pre)
    if check.embedding_cosine_median < LOW_EMBEDDING_COSINE:
        log.warning("median cosine between θ_bd's and θ_pre's embedding rows is %.3f: θ_pre may not be the "
                    "base θ_bd was fine-tuned from", check.embedding_cosine_median)
    return check


def _is_vocab_resize(shape_bd: torch.Size, shape_pre: torch.Size, vocab_bd: int, vocab_pre: int) -> bool:
    return (len(shape_bd) == len(shape_pre) and shape_bd[1:] == shape_pre[1:]
            and shape_bd[0] == vocab_bd and shape_pre[0] == vocab_pre)


@torch.no_grad()
def _embedding_cosine_median(model: PreTrainedModel, pretrained: PreTrainedModel) -> float:
    rows = min(_vocab_rows(model), _vocab_rows(pretrained))
    bd = model.get_input_embeddings().weight[:rows].float().cpu()
    pre = pretrained.get_input_embeddings().weight[:rows].float().cpu()
    return float(torch.nn.functional.cosine_similarity(bd, pre, dim=1).median())


# --- mixing ---------------------------------------------------------------------------------------


@dataclass
class MixReport:
    rho: float
    mask_mode: str
    head: str
    mixed_tensors: int
    mixed_entries: int
    differing_entries: int  # mixed entries where θ_bd ≠ θ_pre
    kept_differing: int  # of those, how many kept θ_bd's value
    kept_fraction: float | None  # kept_differing / differing_entries: the realised rho
    extra_rows_kept: int  # rows of vocabulary-sized tensors beyond θ_pre's vocabulary
    head_tensors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def mix_weights(model: PreTrainedModel, pretrained: PreTrainedModel, rho: float, generator: torch.Generator,
                head_names: set[str], mask_mode: str = "random", reinit_head: bool = False) -> MixReport:
    """θ_mix = where(mask, θ_bd, θ_pre) in place on ``model`` (θ_bd), parameter by parameter.

    Masks are drawn in ``named_parameters`` order from ``generator`` (random mode), over the rows
    shared with θ_pre. Head parameters keep θ_bd unless ``reinit_head`` (then θ_pre's fresh head).
    """
    pre_params = dict(pretrained.named_parameters())
    report = MixReport(rho, mask_mode, "reinit" if reinit_head else "keep", 0, 0, 0, 0, None, 0)
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            continue
        pre = pre_params[name].to(param.device, param.dtype)
        if name in head_names:
            report.head_tensors.append(name)
            if reinit_head:
                param.copy_(pre)
            continue
        rows = min(param.shape[0], pre.shape[0]) if param.dim() else None
        bd_part = param[:rows] if rows is not None else param
        pre_part = pre[:rows] if rows is not None else pre
        mask = _draw_mask(bd_part, pre_part, rho, generator, mask_mode)
        differ = bd_part != pre_part
        report.mixed_tensors += 1
        report.mixed_entries += bd_part.numel()
        report.differing_entries += int(differ.sum())
        report.kept_differing += int((differ & mask).sum())
        report.extra_rows_kept += param.shape[0] - rows if rows is not None else 0
        bd_part.copy_(torch.where(mask, bd_part, pre_part))
    if report.differing_entries:
        report.kept_fraction = report.kept_differing / report.differing_entries
    return report


def _draw_mask(bd: torch.Tensor, pre: torch.Tensor, rho: float, generator: torch.Generator,
               mask_mode: str) -> torch.Tensor:
    if mask_mode == "magnitude":
        return _largest_changes(bd, pre, rho)
    # rand is in [0, 1): rho = 1 keeps every entry, rho = 0 none.
    return (torch.rand(bd.shape, generator=generator) < rho).to(bd.device)


def _largest_changes(bd: torch.Tensor, pre: torch.Tensor, rho: float) -> torch.Tensor:
    """The ⌈rho·numel⌉ entries with the largest |θ_bd − θ_pre|; a stable sort breaks ties by position."""
    keep = min(bd.numel(), math.ceil(rho * bd.numel() - 1e-9))  # 0.3 * 10 is 3.0000000000000004
    change = (bd.float() - pre.float()).abs().flatten()
    order = torch.sort(change, descending=True, stable=True).indices
    mask = torch.zeros(bd.numel(), dtype=torch.bool, device=bd.device)
    mask[order[:keep]] = True
    return mask.view(bd.shape)


# --- mix, then fine-tune --------------------------------------------------------------------------


def mix_and_finetune(model: PreTrainedModel, pretrained: PreTrainedModel, head_names: set[str],
                     ctx: DefenseContext, config: FineMixConfig,
                     after_mix: AfterMix | None = None) -> tuple[PreTrainedModel, dict]:
    """Mixing (fixed rho or the ``select_rho`` sweep), ``after_mix`` (E-PUR), then the FT stage."""
    if config.select_rho:
        return select_rho(model, pretrained, head_names, ctx, config, after_mix)
    report = mix_weights(model, pretrained, config.rho, torch_generator(ctx.seed, MASK_STREAM), head_names,
                         config.mask_mode, config.head == "reinit")
    if after_mix is not None:
        after_mix(model)
    result = finetune_on_budget(model, ctx, config)
    return model, {"rho": config.rho, "mix": report.as_dict(), "train": result.as_dict() if result else None}


def select_rho(model: PreTrainedModel, pretrained: PreTrainedModel, head_names: set[str],
               ctx: DefenseContext, config: FineMixConfig,
               after_mix: AfterMix | None = None) -> tuple[PreTrainedModel, dict]:
    """The smallest rho of RHO_GRID whose D_c^val accuracy is within the tolerance of θ_bd's (module doc)."""
    budget = ctx.budget
    if len(budget.val) == 0 or len(budget.fit) == 0:
        raise InputError("finemix.select_rho needs a non-empty D_c^val and fit rows "
                         "(budget.val_size / budget.val_fraction)")
    fit_ctx = _fit_only(ctx)
    baseline = _val_accuracy(model, ctx)
    error = standard_error(baseline, len(budget.val))
    tolerance = max(config.select_tolerance, error)
    threshold = baseline - tolerance
    points, best = [], None
    for rho in RHO_GRID:
        candidate = copy.deepcopy(model)
        point_config = replace(config, rho=rho, select_rho=False)
        candidate, info = mix_and_finetune(candidate, pretrained, head_names, fit_ctx, point_config, after_mix)
        accuracy = _val_accuracy(candidate, ctx)
        points.append({"rho": rho, "val_accuracy": accuracy})
        log.info("finemix select_rho: rho %.1f → D_c^val accuracy %.4f (threshold %.4f)", rho, accuracy, threshold)
        passes = accuracy >= threshold
        if best is None or accuracy > best[0] or passes:  # strict >: ties keep the smaller rho
            best = (accuracy, rho, candidate, info)
        if passes:
            break
    accuracy, rho, chosen, info = best
    sweep = {"grid": list(RHO_GRID), "points": points, "val_accuracy_bd": baseline, "n_val": len(budget.val),
             "val_source": budget.val_source, "standard_error": error, "tolerance": tolerance,
             "threshold": threshold, "selected_rho": rho, "fallback": accuracy < threshold,
             "trained_on": "D_c" if budget.val_source == "dev" else "D_c minus D_c^val"}
    return chosen, {**info, "select_rho": sweep}


def standard_error(accuracy: float, n: int) -> float:
    """The binomial standard error of an accuracy measured on ``n`` rows."""
    return math.sqrt(accuracy * (1.0 - accuracy) / n) if n else float("inf")


def _fit_only(ctx: DefenseContext) -> DefenseContext:
    """The same context with D_c replaced by its fit rows (the sweep must never train on D_c^val)."""
    budget = ctx.budget
    fit_budget = CleanBudget(rows=budget.fit, val=budget.val, fit=budget.fit, val_source=budget.val_source)
    return replace(ctx, _objects={**ctx._objects, "budget": fit_budget})


def _val_accuracy(model: PreTrainedModel, ctx: DefenseContext) -> float:
    encoded = encode(ctx.tokenizer, ctx.budget.val, ctx.train_config.max_length)
    return accuracy_of(model, encoded, pad_id_of(ctx.tokenizer), ctx.train_config.eval_batch_size, ctx.device)


@register_defense
class FineMix(RepairDefense):
    name = "finemix"
    description = "Fine-mixing: keep a random rho of θ_bd's weights (rest from θ_pre), then fine-tune on D_c"
    Config = FineMixConfig
    grants = frozenset({"budget", "pretrained"})
    unsupported_victims = {}  # θ_pre is the clean pretrained decoder for decoder victims of either kind

    def repair(self, model: PreTrainedModel, ctx: DefenseContext) -> DefenseOutcome:
        pretrained, heads = load_pretrained(ctx.pretrained, ctx.num_labels, ctx.seed)
        base = check_same_base(model, pretrained)
        model, info = mix_and_finetune(model, pretrained, heads, ctx, self.config)
        return DefenseOutcome(model, {**info, "mask_mode": self.config.mask_mode, "base": asdict(base)})
