"""STRIP: reject inputs whose prediction survives strong perturbation (text variant of OpenBackdoor).

Paper: Yansong Gao, Change Xu, Derui Wang, Shiping Chen, Damith C. Ranasinghe, Surya Nepal, "STRIP: A
Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019 (arXiv:1902.06531); its text form
(STRIP-ViTA, arXiv:1911.10312). Reference code: OpenBackdoor's ``STRIPDefender``.

Inference-time rejection. A trigger dominates the prediction, so a triggered input keeps its class
when much of its text is replaced, while a clean input's prediction wanders:

1. Fit TF-IDF (sklearn ``TfidfVectorizer``, idf with smoothing, no norm, English stop words) on the
   defender's clean held-out rows D_c^val.
2. Perturb an input of ``n`` words ``repeat`` times (5): each copy draws one D_c^val text and
   ``m = int(n · swap_ratio)`` word positions (with replacement; ``swap_ratio`` 0.5), and the ``j``-th
   drawn position gets that text's ``j``-th highest-TF-IDF word.
3. ``H(x) = mean over copies of −Σ_c p_c log2 p_c`` of the victim's predictions; low entropy → reject.
4. Threshold from a target FRR on D_c^val (OpenBackdoor: 1%): the entropy at index
   ``int(|D_c^val| · frr)`` of the sorted clean entropies; inputs with ``H(x)`` below it are rejected.

The detector's score is ``−H(x)`` (rejected when above ``−threshold``), so AUROC has poisoned = high.

Deviations from the reference code, all deliberate:

- The mean over the ``repeat`` copies is taken per input. OpenBackdoor lays the copies out input by
  input and then reshapes to ``(repeat, n)``, which averages entropies of different inputs.
- Perturbations draw from a generator seeded by the cell seed (stream ``strip``) and the input text,
  so an input gets the same copies whichever batch it is scored in; the reference draws from numpy's
  global RNG.
- ``p log p`` is taken as 0 where ``p = 0`` (the reference would give NaN).
- OpenBackdoor's ``use_oppsite_set`` (only non-target dev rows) needs the target label, which a
  defender does not have; it is not offered.
- Inputs are truncated to the victim's ``max_length``; scoring uses length-sorted batches.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedModel

from nlpbd.config import option
from nlpbd.errors import InputError
from nlpbd.methods import DefenseContext, Detector, InferenceDefense, register_defense
from nlpbd.seeding import seed_for
from nlpbd.training import predict

log = logging.getLogger(__name__)

Classify = Callable[[list[str]], np.ndarray]  # texts -> class probabilities (n, K)


@dataclass
class STRIPConfig:
    repeat: int = option(5, "perturbed copies per input (OpenBackdoor: 5)", low=1, high=1000)
    swap_ratio: float = option(0.5, "fraction of an input's words replaced in each copy (OpenBackdoor: 0.5)",
                               low=0.0, high=1.0)
    target_frr: float = option(0.01, "false-rejection rate aimed at on D_c^val (OpenBackdoor: 0.01)",
                               low=0.0, high=1.0)


class Perturber:
    """Replacement words from the TF-IDF ranking of clean held-out texts."""

    def __init__(self, clean_texts: Sequence[str], swap_ratio: float, seed: int):
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectorizer = TfidfVectorizer(use_idf=True, smooth_idf=True, norm=None, stop_words="english")
        tfidf = vectorizer.fit_transform(list(clean_texts)).toarray()
        self.words = vectorizer.get_feature_names_out()
        self.ranking = np.argsort(-tfidf, axis=-1, kind="stable")
        self.swap_ratio, self.seed = swap_ratio, seed

    def rng(self, text: str) -> np.random.Generator:
        digest = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        return np.random.default_rng([seed_for(self.seed, "strip"), digest])

    def copies(self, text: str, repeat: int) -> list[str]:
        rng = self.rng(text)
        return [self.perturb(text, rng) for _ in range(repeat)]

    def perturb(self, text: str, rng: np.random.Generator) -> str:
        words = text.split()
        m = int(len(words) * self.swap_ratio)
        piece = rng.integers(len(self.ranking))
        positions = rng.integers(0, len(words), m) if m else []
        for j, position in enumerate(positions):
            words[position] = str(self.words[self.ranking[piece][j % self.ranking.shape[1]]])
        return " ".join(words)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits per row, with 0 log 0 = 0."""
    logs = np.log2(np.where(probs > 0, probs, 1.0))
    return -(probs * logs).sum(axis=-1)


def strip_entropy(texts: Sequence[str], classify: Classify, perturber: Perturber, repeat: int) -> np.ndarray:
    """Mean prediction entropy over each input's perturbed copies, in the input order."""
    if not texts:
        return np.zeros(0)
    copies = [c for text in texts for c in perturber.copies(text, repeat)]
    per_copy = entropy(classify(copies)).reshape(len(texts), repeat)
    return per_copy.mean(axis=1)


def entropy_threshold(clean_entropy: np.ndarray, frr: float) -> float:
    """The clean entropy at index ``int(n · frr)`` of the sorted values (OpenBackdoor's rule)."""
    if len(clean_entropy) == 0:
        raise InputError("strip needs held-out clean rows D_c^val (budget.val_size), and this cell has none")
    index = min(int(len(clean_entropy) * frr), len(clean_entropy) - 1)
    return float(np.sort(clean_entropy)[index])


def victim_classifier(model: PreTrainedModel, ctx: DefenseContext) -> Classify:
    def classify(texts: list[str]) -> np.ndarray:
        return predict(model, ctx.tokenizer, texts, ctx.train_config.max_length, ctx.train_config.eval_batch_size,
                       ctx.device)

    return classify


class TimedEntropy:
    """The detector's score ``−H(x)``; it records the inference overhead in ``info``."""

    def __init__(self, classify: Classify, perturber: Perturber, repeat: int, info: dict):
        self.classify, self.perturber, self.repeat, self.info = classify, perturber, repeat, info
        info["inference"] = {"inputs": 0, "forward_passes_per_input": repeat, "seconds": 0.0, "ms_per_input": None}

    def __call__(self, texts: list[str]) -> np.ndarray:
        began = time.perf_counter()
        scores = -strip_entropy(texts, self.classify, self.perturber, self.repeat)
        stats = self.info["inference"]
        stats["inputs"] += len(texts)
        stats["seconds"] += time.perf_counter() - began
        stats["ms_per_input"] = 1000 * stats["seconds"] / max(stats["inputs"], 1)
        return scores


@register_defense
class STRIP(InferenceDefense):
    name = "strip"
    description = "reject inputs whose prediction entropy stays low when half their words are replaced"
    Config = STRIPConfig
    grants = frozenset({"budget"})  # D_c^val: the TF-IDF words and the threshold

    def fit(self, model: PreTrainedModel, ctx: DefenseContext) -> Detector:
        config, val = self.config, ctx.budget.val
        if not len(val):
            raise InputError("strip needs held-out clean rows D_c^val (budget.val_size), and this cell has none")
        perturber = Perturber(val.texts, config.swap_ratio, ctx.seed)
        classify = victim_classifier(model, ctx)
        clean = strip_entropy(list(val.texts), classify, perturber, config.repeat)
        threshold = entropy_threshold(clean, config.target_frr)
        info = {"entropy_threshold": threshold, "val_entropy_mean": float(clean.mean()),
                "tau_rule": f"entropy at the {config.target_frr:g} quantile index of D_c^val (n={len(val)}, "
                            f"{ctx.budget.val_source}); reject when H(x) < it",
                "replacement_vocabulary": len(perturber.words)}
        log.info("STRIP: entropy threshold %.4f (D_c^val mean %.4f)", threshold, clean.mean())
        return Detector(scores=TimedEntropy(classify, perturber, config.repeat, info), threshold=-threshold,
                        info=info)
