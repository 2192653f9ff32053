"""E-PUR: reset the word embeddings that drifted most for their frequency (defenses.md §4).

Paper: Zhang, Lyu, Ma, Wang, Sun, "Fine-mixing: Mitigating Backdoors in Fine-tuned Language Models",
Findings of EMNLP 2022 (arXiv:2210.09545), which proposes E-PUR (Embedding Purification) alongside
Fine-mixing. No public reference code was located. Verified (the abstract): E-PUR flags suspicious
word embeddings from word frequency and embedding change, and combines with other mitigations.
The formula and constants are unverified; our defaults (spec §4.2):

    δ_k     = ‖E_bd[k] − E_pre[k]‖₂
    f_k     = count of id k in tokenizer(D_c texts, add_special_tokens=False), special ids set to 0
    score_k = δ_k / ln(max(f_k, f_min))                    f_min = 20
    S       = top-N ids by score among non-special ids     N = 200 (clamped to the candidates)
    E[S]    ← E_pre[S]                                     whole rows, exact copy

- Frequencies are counted on token ids of the model's tokenizer over all D_c texts, untruncated.
- Ties in the score are broken by the smaller id (stable sort), so S is deterministic.
- Rows that did not move (δ_k = 0) are never selected: resetting them changes nothing, and listing them
  would make S an arbitrary run of low ids. A victim whose embeddings never trained (LoRA and other
  PEFT victims) gets an empty S, recorded as ``epur_noop``, so E-PUR reduces to its FT stage, as BTU
  records ``btu_noop`` for the same victims.
- ``rule=zscore`` (ours): S = {k : score_k > mean + z·std} over non-special ids, std with ddof = 0.
- Rows beyond θ_pre's vocabulary (an attacker-resized vocabulary) have no pretrained row and are never
  candidates.
- ``epur``: reset on θ_bd, then the FT stage (§1) on D_c; ``finetune=false`` is reset-only and uses
  no labels (the same as ``epochs=0``).
- ``finemix-epur``: S is scored on θ_bd vs θ_pre (never θ_mix, so the mask cannot hide a trigger
  row), then Fine-mixing's mix, then rows S of θ_mix ← E_pre, then the FT stage. With
  ``select_rho`` the same S is reset at every swept rho.
- In a model with a decoder tied to E, resetting E also resets the decoder rows (expected).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nlpbd.config import option
from nlpbd.defenses.finemix import FineMixConfig, check_same_base, load_pretrained, mix_and_finetune
from nlpbd.defenses.ft import FTConfig, finetune_on_budget
from nlpbd.methods import DefenseContext, DefenseOutcome, RepairDefense, register_defense

log = logging.getLogger(__name__)

TOP_RECORDED = 20  # selected tokens recorded with their scores; the full id list is always recorded


@dataclass
class EPURSettings:
    """How E-PUR picks the rows to reset."""

    top_n: int = option(200, "N: number of embedding rows reset (rule topn); unverified; our default", low=1)
    f_min: int = option(20, "frequency floor in score = δ / ln(max(f, f_min)); unverified; our default", low=2)
    rule: Literal["topn", "zscore"] = option("topn", "topn: the N highest scores; zscore: every score above "
                                             "mean + z·std over non-special ids (ours)")
    z: float = option(3.0, "z for rule zscore (ours)", low=0.0)


@dataclass
class EPURConfig(FTConfig, EPURSettings):
    """E-PUR on θ_bd, then the FT settings (§1) for the fine-tuning stage."""

    epochs: int = option(FTConfig.epochs, "epochs of the FT stage over D_c (0: the reset model, not fine-tuned)",
                         low=0, high=1000)
    finetune: bool = option(True, "fine-tune on D_c after the reset (false: reset only, no labels used)")


@dataclass
class FineMixEPURConfig(FineMixConfig, EPURSettings):
    """Fine-mixing's settings (with the FT settings) plus E-PUR's."""


# --- selection ------------------------------------------------------------------------------------


def token_frequencies(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], size: int) -> torch.Tensor:
    """Counts of each id < ``size`` in the tokenized texts (no special tokens added; specials zeroed)."""
    ids = [i for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"] for i in row]
    counts = torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=size)[:size]
    specials = [i for i in tokenizer.all_special_ids if i < size]
    counts[specials] = 0  # an unknown word still yields [UNK] without add_special_tokens
    return counts


@dataclass
class EPURSelection:
    ids: list[int]  # selected ids, highest score first
    scores: torch.Tensor  # per id of the shared rows (float64); -inf where not a candidate
    deltas: torch.Tensor  # ‖E_bd[k] − E_pre[k]‖₂ per shared row
    frequencies: torch.Tensor
    candidates: int


def epur_scores(embeddings_bd: torch.Tensor, embeddings_pre: torch.Tensor, frequencies: torch.Tensor,
                f_min: int) -> tuple[torch.Tensor, torch.Tensor]:
    """score_k = δ_k / ln(max(f_k, f_min)) and δ_k over the rows both matrices have."""
    rows = min(embeddings_bd.shape[0], embeddings_pre.shape[0])
    drift = embeddings_bd[:rows].detach().float().cpu() - embeddings_pre[:rows].detach().float().cpu()
    deltas = torch.linalg.vector_norm(drift, dim=1).double()
    floor = torch.log(frequencies[:rows].clamp(min=f_min).double())
    return deltas / floor, deltas


def epur_select(embeddings_bd: torch.Tensor, embeddings_pre: torch.Tensor, frequencies: torch.Tensor,
                special_ids: Sequence[int], settings: EPURSettings) -> EPURSelection:
    """The ids E-PUR resets: top-N (or z-score outliers) by score among non-special shared rows."""
    scores, deltas = epur_scores(embeddings_bd, embeddings_pre, frequencies, settings.f_min)
    candidate = torch.ones(scores.shape[0], dtype=torch.bool)
    candidate[[i for i in special_ids if i < scores.shape[0]]] = False
    scores = torch.where(candidate, scores, torch.tensor(float("-inf"), dtype=scores.dtype))
    movable = candidate & (deltas > 0)  # an unmoved row carries nothing to reset
    order = torch.sort(scores, descending=True, stable=True).indices[: int(movable.sum())]
    if settings.rule == "topn":
        chosen = order[: settings.top_n]
    else:
        pool = scores[candidate]
        cutoff = pool.mean() + settings.z * pool.std(correction=0)
        chosen = order[scores[order] > cutoff]
    return EPURSelection(chosen.tolist(), scores, deltas, frequencies[: scores.shape[0]], int(candidate.sum()))


@torch.no_grad()
def epur_reset(model: PreTrainedModel, embeddings_pre: torch.Tensor, ids: Sequence[int]) -> None:
    """E[ids] ← E_pre[ids] in place: whole rows, exact copies."""
    if not ids:
        return
    weight = model.get_input_embeddings().weight
    index = torch.tensor(list(ids), dtype=torch.long, device=weight.device)
    rows = embeddings_pre.detach().index_select(0, index.to(embeddings_pre.device))
    weight.index_copy_(0, index, rows.to(weight.device, weight.dtype))


def select_for(model: PreTrainedModel, pretrained: PreTrainedModel, ctx: DefenseContext,
               settings: EPURSettings) -> EPURSelection:
    """E-PUR's selection for θ_bd = ``model`` against θ_pre, with frequencies from the D_c texts."""
    embeddings_bd = model.get_input_embeddings().weight
    embeddings_pre = pretrained.get_input_embeddings().weight
    frequencies = token_frequencies(ctx.tokenizer, ctx.budget.rows.texts, embeddings_bd.shape[0])
    selection = epur_select(embeddings_bd, embeddings_pre, frequencies, ctx.tokenizer.all_special_ids, settings)
    log.info("E-PUR selected %d of %d candidate rows", len(selection.ids), selection.candidates)
    return selection


def selection_info(selection: EPURSelection, tokenizer: PreTrainedTokenizerBase, settings: EPURSettings) -> dict:
    top = selection.ids[:TOP_RECORDED]
    tokens = tokenizer.convert_ids_to_tokens(top)
    return {
        "rule": settings.rule, "top_n": settings.top_n, "f_min": settings.f_min, "z": settings.z,
        "size": len(selection.ids), "candidates": selection.candidates,
        "ids": selection.ids, "tokens": tokenizer.convert_ids_to_tokens(selection.ids),
        "top": [{"id": i, "token": t, "score": float(selection.scores[i]), "delta": float(selection.deltas[i]),
                 "frequency": int(selection.frequencies[i])} for i, t in zip(top, tokens)],
        "below_floor": int((selection.frequencies < settings.f_min).sum()),
        "epur_noop": not selection.ids,
    }


# --- the defenses ---------------------------------------------------------------------------------


@register_defense
class EPUR(RepairDefense):
    name = "epur"
    description = "E-PUR: reset the N embedding rows with the most drift for their D_c frequency, then fine-tune"
    Config = EPURConfig
    grants = frozenset({"budget", "pretrained"})
    unsupported_victims = {}  # embedding rows of any tokenizer, θ_pre the clean pretrained model

    def repair(self, model: PreTrainedModel, ctx: DefenseContext) -> DefenseOutcome:
        pretrained, _ = load_pretrained(ctx.pretrained, ctx.num_labels, ctx.seed)
        base = check_same_base(model, pretrained)
        selection = select_for(model, pretrained, ctx, self.config)
        epur_reset(model, pretrained.get_input_embeddings().weight, selection.ids)
        result = finetune_on_budget(model, ctx, self.config) if self.config.finetune else None
        return DefenseOutcome(model, {"epur": selection_info(selection, ctx.tokenizer, self.config),
                                      "base": asdict(base), "train": result.as_dict() if result else None})


@register_defense
class FineMixEPUR(RepairDefense):
    name = "finemix-epur"
    description = "Fine-mixing with E-PUR: mix θ_bd with θ_pre, reset E-PUR's rows to θ_pre, then fine-tune"
    Config = FineMixEPURConfig
    grants = frozenset({"budget", "pretrained"})
    unsupported_victims = {}  # embedding rows of any tokenizer, θ_pre the clean pretrained model

    def repair(self, model: PreTrainedModel, ctx: DefenseContext) -> DefenseOutcome:
        pretrained, heads = load_pretrained(ctx.pretrained, ctx.num_labels, ctx.seed)
        base = check_same_base(model, pretrained)
        selection = select_for(model, pretrained, ctx, self.config)  # on θ_bd, before mixing
        embeddings_pre = pretrained.get_input_embeddings().weight

        def reset(mixed: PreTrainedModel) -> None:
            epur_reset(mixed, embeddings_pre, selection.ids)

        model, info = mix_and_finetune(model, pretrained, heads, ctx, self.config, after_mix=reset)
        return DefenseOutcome(model, {**info, "mask_mode": self.config.mask_mode, "base": asdict(base),
                                      "epur": selection_info(selection, ctx.tokenizer, self.config)})
