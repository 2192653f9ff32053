"""RAP: Robustness-Aware Perturbations for detecting poisoned inputs at inference.

Paper: Wenkai Yang, Yankai Lin, Peng Li, Jie Zhou, Xu Sun, "RAP: Robustness-Aware Perturbations for
Defending against Backdoor Attacks on NLP Models", EMNLP 2021 (arXiv:2110.07831). Reference code:
``lancopku/RAP`` (``rap_defense.py``, ``evaluate_rap_performance.py``); also OpenBackdoor's ``RAPDefender``.

Inference-time rejection. A rare word (the RAP word) is inserted at the start of every input, and its
word-embedding row (the only trained parameter) is learned on clean rows of the protected label so
that inserting it lowers the protected-label probability by between 0.1 and 0.3:

    Δ(x) = p_c(x ⊕ rap) − p_c(x)
    L = λ · mean(max(Δ − (−0.1), 0)) + mean(max(−0.3 − Δ, 0))          (λ = scale = 1)
    row ← row − lr · ∇_row L;  row ← row · ‖row_0‖ / ‖row‖                (lr 1e-2, 5 epochs, batch 32)

A triggered input is far more robust: its probability barely drops. With ``d(x) = p_c(x) − p_c(x ⊕ rap)``
an input predicted as ``c`` is rejected when ``d(x)`` is below the ``frr`` percentile (1%) of ``d`` on the
clean rows RAP was built on (those predicted as ``c``). Inputs not predicted as the protected label
are never rejected (a backdoor that does not reach the label has nothing to protect against).

The defender knows the label it protects, not the trigger. ``protected_label`` names it (the
paper's setting; e.g. 1 for positive SST-2 reviews); left unset (our default, since the defender is
not told the attack's target), every label is protected: one RAP row is learned per label (each from
the victim's original row, on that label's clean rows), and each input is scored with the row of the
label the victim predicts for it, against that label's threshold.

Deviations from the reference code, all deliberate:

- The RAP word defaults to ``mb``, not the paper's ``cf``: ``cf`` is one of this benchmark's BadNet
  triggers, and a RAP word that is the backdoor trigger would measure nothing. It must be a single
  token of the victim's tokenizer.
- The clean rows are D_c^val (300 rows of the clean dev split by default, the victim never trained on
  them); the reference uses a held-out part of the dev set. As the reference, the threshold is
  calibrated on the same rows RAP was built on, restricted to those the victim predicts as the label
  (the reference: ``p_c > 0.5``, binary tasks; we use the argmax, the same for K = 2).
- As the reference, the gradient of the embedding matrix is never zeroed between steps (it
  accumulates; the reference says it follows Embedding Poisoning for faster convergence), the model is
  in eval mode (dropout off) while RAP is built, and the batches keep a fixed order (the reference
  shuffles the file once with seed 1234; we keep D_c^val's order). ``zero_grad=true`` zeroes it.
- ``protected_label`` unset → every label protected (see above); the scores are ``threshold_c − d(x)``
  so one threshold (0) serves all labels, and ``-inf`` for inputs not predicted as a protected label.
- The RAP row is learned on a copy of the victim; the deployed victim's predictions are unchanged
  (the reference deploys the copy, which differs only on inputs containing the RAP word).
- Inputs are truncated to the victim's ``max_length``; the reference does not truncate explicitly.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nlpbd.config import option
from nlpbd.data import TextSplit
from nlpbd.errors import InputError
from nlpbd.methods import DefenseContext, Detector, InferenceDefense, register_defense
from nlpbd.training import autocast, collate, encode, pad_id_of, predict

log = logging.getLogger(__name__)


@dataclass
class RAPConfig:
    word: str = option("mb", "the RAP word, inserted first; one token of the victim's vocabulary "
                       "(the paper's cf is a BadNet trigger here)")
    protected_label: int | None = option(None, "the label the defender protects (paper); unset: every label, "
                                         "one RAP row each, inputs scored with their predicted label's", low=0)
    epochs: int = option(5, "passes over the clean rows (reference: 5)", low=1, high=1000)
    batch_size: int = option(32, "batch size (reference: 32)", low=1)
    lr: float = option(1e-2, "step size on the RAP row (reference: 1e-2)", low=0.0, low_open=True)
    prob_range: list[float] = option([-0.1, -0.3], "target range of the probability change [upper, lower] "
                                     "(reference: -0.1 -0.3)")
    scale: float = option(1.0, "weight λ of the upper-bound term (reference: 1)", low=0.0)
    target_frr: float = option(0.01, "false-rejection rate aimed at on the clean rows (reference: 1%)",
                               low=0.0, high=1.0)
    zero_grad: bool = option(False, "zero the embedding gradient after every step (the reference lets it accumulate)")


# --- the RAP row ----------------------------------------------------------------------------------


def rap_token_id(tokenizer: PreTrainedTokenizerBase, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] in tokenizer.all_special_ids:
        raise InputError(f"rap.word '{word}' is not a single ordinary token of the victim's tokenizer "
                         f"({len(ids)} pieces); choose a rare word that is")
    return int(ids[0])


def with_rap_word(texts: list[str], word: str) -> list[str]:
    """The RAP word inserted at the first position (the reference's ``rap_poison``)."""
    return [f"{word} {text}".strip() for text in texts]


def embedding_only(model: PreTrainedModel) -> torch.nn.Parameter:
    """Freeze everything except the word-embedding matrix (of which only the RAP row is ever written)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    weight = model.get_input_embeddings().weight
    weight.requires_grad_(True)
    return weight


def label_probability(model, batch: dict, label: int, device: torch.device) -> torch.Tensor:
    with autocast(device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.softmax(logits.float(), dim=-1)[:, label]


def rap_loss(diff: torch.Tensor, upper: float, lower: float, scale: float) -> torch.Tensor:
    """λ · mean(relu(Δ − upper)) + mean(relu(lower − Δ)): Δ pushed into [lower, upper]."""
    return scale * torch.mean((diff > upper) * (diff - upper)) + torch.mean((diff < lower) * (lower - diff))


def train_rap_row(model: PreTrainedModel, ctx: DefenseContext, rows: TextSplit, label: int, token: int,
                  config: RAPConfig) -> dict:
    """Learn the RAP row in place on ``rows`` (clean rows of ``label``); returns the epoch losses."""
    weight = embedding_only(model)
    norm = weight.data[token].norm().item()
    upper, lower = config.prob_range
    model.to(ctx.device).eval()
    tok, max_length, pad = ctx.tokenizer, ctx.train_config.max_length, pad_id_of(ctx.tokenizer)
    clean = encode(tok, list(rows.texts), max_length)
    perturbed = encode(tok, with_rap_word(list(rows.texts), config.word), max_length)
    losses, in_range = [], []
    for _ in range(config.epochs):
        total, hits = 0.0, 0
        for start in range(0, len(rows), config.batch_size):
            indices = list(range(start, min(start + config.batch_size, len(rows))))
            p = label_probability(model, collate(clean, indices, pad, ctx.device), label, ctx.device)
            p_rap = label_probability(model, collate(perturbed, indices, pad, ctx.device), label, ctx.device)
            diff = p_rap - p
            loss = rap_loss(diff, upper, lower, config.scale)
            loss.backward()
            with torch.no_grad():
                weight.data[token] -= config.lr * weight.grad[token]
                weight.data[token] *= norm / weight.data[token].norm()
            if config.zero_grad:
                weight.grad = None
            total += loss.item() * len(indices)
            hits += int(((diff < upper) & (diff > lower)).sum())
        losses.append(total / max(len(rows), 1))
        in_range.append(hits / max(len(rows), 1))
    weight.grad = None
    weight.requires_grad_(False)
    return {"epoch_loss": losses, "epoch_in_range": in_range, "row_norm": norm}


# --- scoring --------------------------------------------------------------------------------------


def probability_drop(model: PreTrainedModel, ctx: DefenseContext, texts: list[str], word: str) -> np.ndarray:
    """``p(x) − p(x ⊕ rap)`` for every class: shape (n, K)."""
    length, batch = ctx.train_config.max_length, ctx.train_config.eval_batch_size
    before = predict(model, ctx.tokenizer, texts, length, batch, ctx.device)
    after = predict(model, ctx.tokenizer, with_rap_word(texts, word), length, batch, ctx.device)
    return before - after, before


@dataclass
class ProtectedLabel:
    label: int
    row: torch.Tensor  # the learned RAP embedding row
    threshold: float  # d(x) below it → rejected
    info: dict


class RAPScores:
    """Scores ``threshold_c − d(x)`` with ``c`` the victim's prediction (−inf when ``c`` is unprotected)."""

    def __init__(self, model: PreTrainedModel, ctx: DefenseContext, word: str, token: int,
                 protected: dict[int, ProtectedLabel], info: dict):
        self.model, self.ctx, self.word, self.token = model, ctx, word, token
        self.protected, self.info = protected, info
        info["inference"] = {"inputs": 0, "forward_passes_per_input": 2 * len(protected), "seconds": 0.0,
                             "ms_per_input": None}

    def __call__(self, texts: list[str]) -> np.ndarray:
        began = time.perf_counter()
        scores = np.full(len(texts), -np.inf)
        for label, entry in self.protected.items():
            drop, before = self.drops(texts, entry)
            chosen = before.argmax(axis=1) == label
            scores[chosen] = entry.threshold - drop[chosen, label]
        stats = self.info["inference"]
        stats["inputs"] += len(texts)
        stats["seconds"] += time.perf_counter() - began
        stats["ms_per_input"] = 1000 * stats["seconds"] / max(stats["inputs"], 1)
        return scores

    def drops(self, texts: list[str], entry: ProtectedLabel) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            self.model.get_input_embeddings().weight.data[self.token] = entry.row
        return probability_drop(self.model, self.ctx, texts, self.word)


def build_protection(model: PreTrainedModel, ctx: DefenseContext, label: int, token: int, original: torch.Tensor,
                     config: RAPConfig) -> ProtectedLabel:
    """Learn the RAP row for ``label`` from the original row and calibrate its threshold."""
    rows = ctx.budget.val.subset([i for i, y in enumerate(ctx.budget.val.labels) if y == label])
    if not len(rows):
        raise InputError(f"rap: D_c^val has no clean rows of label {label} to build the perturbation on")
    with torch.no_grad():
        model.get_input_embeddings().weight.data[token] = original
    training = train_rap_row(model, ctx, rows, label, token, config)
    drop, before = probability_drop(model, ctx, list(rows.texts), config.word)
    predicted = before.argmax(axis=1) == label
    drops = drop[predicted, label]
    threshold = float(np.nanpercentile(drops, 100 * config.target_frr)) if len(drops) else float("-inf")
    info = {"rows": len(rows), "calibration_rows": int(predicted.sum()), "threshold": threshold,
            "clean_drop_mean": float(drops.mean()) if len(drops) else None, **training}
    row = model.get_input_embeddings().weight.data[token].detach().clone()
    return ProtectedLabel(label, row, threshold, info)


@register_defense
class RAP(InferenceDefense):
    name = "rap"
    description = "reject inputs whose protected-label probability barely drops when a learned rare word is added"
    Config = RAPConfig
    grants = frozenset({"budget"})  # D_c^val: the clean rows RAP is built and calibrated on

    def fit(self, model: PreTrainedModel, ctx: DefenseContext) -> Detector:
        config = self.config
        if len(config.prob_range) != 2 or not config.prob_range[1] < config.prob_range[0] <= 0:
            raise InputError("rap.prob_range must be two numbers upper,lower with lower < upper <= 0 (e.g. -0.1,-0.3)")
        if config.protected_label is not None and config.protected_label >= ctx.num_labels:
            raise InputError(f"rap.protected_label {config.protected_label} is out of range 0..{ctx.num_labels - 1}")
        rap_model = copy.deepcopy(model)
        token = rap_token_id(ctx.tokenizer, config.word)
        original = rap_model.get_input_embeddings().weight.data[token].detach().clone()
        labels = [config.protected_label] if config.protected_label is not None else list(range(ctx.num_labels))
        began = time.perf_counter()
        protected = {c: build_protection(rap_model, ctx, c, token, original, config) for c in labels}
        info = {"word": config.word, "token_id": token, "protected_labels": labels,
                "protect_rule": "paper: one protected label" if config.protected_label is not None
                else "every label (ours): inputs scored with their predicted label's RAP row",
                "per_label": {str(c): p.info for c, p in protected.items()},
                "train_seconds": time.perf_counter() - began,
                "tau_rule": f"{100 * config.target_frr:g}th percentile of d on the clean rows of D_c^val predicted "
                            f"as the label (n={len(ctx.budget.val)}, {ctx.budget.val_source}); "
                            "reject when d(x) is below"}
        return Detector(scores=RAPScores(rap_model, ctx, config.word, token, protected, info), threshold=0.0,
                        info=info)
