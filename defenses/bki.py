"""BKI: Backdoor Keyword Identification, then training without the rows that hold the keywords.

Paper: Chuanshuai Chen, Jiazhu Dai, "Mitigating backdoor attacks in LSTM-based text classification
systems by Backdoor Keyword Identification", Neurocomputing 2021 (arXiv:2007.12070). Reference code:
OpenBackdoor's ``BKIDefender`` (the paper ships none).

Training-data filtering. The victim trained on the (poisoned) training set reads every training text
with each word removed in turn; a word whose removal moves the text's representation a lot matters
to the model, and a backdoor keyword matters in every poisoned row:

    h(x) = last-layer hidden state of the first token ([CLS]) of the victim's encoder (on a decoder
           classifier the last real token's, the one its head reads: nlpbd.representations)
    δ_i(x) = ‖h(x without w_i) − h(x)‖_∞
    each text contributes its top ``top_words`` (5) words by δ;
    word w: n_w = number of texts with w in their top 5, v_w = mean δ of those entries
    S(w) = log10(n_w) · v_w

The ``keywords`` (1) words of highest S are the backdoor keywords; every training row whose top 5
contains one is removed, and the usual victim recipe is trained on the rest (a new stage of the
pipeline, cached under the filter's key). Per-row score for the evaluator's AUROC: the highest S among
the row's top words. Which rows were poisoned is never seen here: the evaluator compares the removed
rows with the poison mask after the defense is done.

Deviations from the reference code, all deliberate:

- The model that reads the texts is the cell's victim (trained on the poisoned data with the shared
  recipe); OpenBackdoor trains a separate ``bert-base-uncased`` for 10 epochs on the poisoned data (the
  paper: the LSTM victim itself). Reusing the victim saves a training and is the paper's setting.
- Words are split on any whitespace (the reference: ``strip().split()``, the same) and the last word
  is removed like any other (the reference's special case gives the same text).
- Texts are truncated to the victim's ``max_length`` and scored in length-sorted batches.
- ``keywords`` may name more than the reference's single keyword (an ablation for multi-word triggers).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedModel

from nlpbd.config import option
from nlpbd.methods import DefenseContext, FilterDefense, FilterResult, register_defense
from nlpbd.progress import reporter
from nlpbd.representations import sentence_states

log = logging.getLogger(__name__)

CHUNK = 64  # texts per representation call (each becomes n + 1 sequences)
RECORDED_KEYWORDS = 20


@dataclass
class BKIConfig:
    top_words: int = option(5, "most important words kept per text (reference: 5)", low=1)
    keywords: int = option(1, "backdoor keywords taken from the top of S(w) (reference: 1)", low=1)
    batch_size: int = option(64, "texts per forward batch", low=1)


def without_each_word(words: list[str]) -> list[str]:
    return [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]


def word_importance(states: np.ndarray) -> np.ndarray:
    """``‖h(x without w_i) − h(x)‖_∞`` for rows 1..n of ``states`` against row 0."""
    return np.abs(states[1:] - states[0]).max(axis=1) if len(states) > 1 else np.zeros(0)


def top_words(words: list[str], importance: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The ``k`` most important (word, δ) of one text, most important first (stable on ties)."""
    order = np.argsort(-importance, kind="stable")[:k]
    return [(words[i], float(importance[i])) for i in order]


def text_top_words(model: PreTrainedModel, ctx: DefenseContext, texts: list[str], config: BKIConfig
                   ) -> list[list[tuple[str, float]]]:
    """Every text's top words by the victim's representation change when each word is removed."""
    out = []
    with reporter().task("BKI: reading the training texts", len(texts)) as advance:
        for start in range(0, len(texts), CHUNK):
            chunk = [t.split() for t in texts[start:start + CHUNK]]
            variants = [v for words in chunk for v in [" ".join(words), *without_each_word(words)]]
            states = sentence_states(model, ctx.tokenizer, variants, ctx.train_config.max_length,
                                     config.batch_size, ctx.device)
            offset = 0
            for words in chunk:
                importance = word_importance(states[offset: offset + 1 + len(words)])
                out.append(top_words(words, importance, config.top_words))
                offset += 1 + len(words)
            advance(len(chunk))
    return out


def keyword_scores(tops: list[list[tuple[str, float]]]) -> dict[str, float]:
    """``S(w) = log10(n_w) · mean δ`` over the texts that have ``w`` among their top words."""
    counts: dict[str, int] = defaultdict(int)
    sums: dict[str, float] = defaultdict(float)
    for entries in tops:
        for word, value in entries:
            counts[word] += 1
            sums[word] += value
    return {w: math.log10(counts[w]) * sums[w] / counts[w] for w in counts}


def select_keywords(scores: dict[str, float], k: int) -> list[str]:
    """The ``k`` highest-scoring words (ties broken by the word, for reproducibility)."""
    return [w for w, _ in sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:k]]


@register_defense
class BKI(FilterDefense):
    name = "bki"
    description = ("remove training rows holding the words whose removal moves the victim's [CLS] (decoder: "
                   "last-token) state most, retrain")
    Config = BKIConfig
    grants = frozenset({"train_set"})  # the training texts (labels unused); never which rows are poisoned

    def filter(self, model: PreTrainedModel, ctx: DefenseContext) -> FilterResult:
        config, texts = self.config, list(ctx.train_set.texts)
        tops = text_top_words(model, ctx, texts, config)
        scores = keyword_scores(tops)
        keywords = select_keywords(scores, config.keywords)
        chosen = set(keywords)
        keep = [i for i, entries in enumerate(tops) if not chosen & {w for w, _ in entries}]
        row_scores = np.array([max((scores[w] for w, _ in entries), default=-math.inf) for entries in tops])
        ranking = select_keywords(scores, RECORDED_KEYWORDS)
        log.info("BKI keywords %s: %d of %d rows removed", keywords, len(texts) - len(keep), len(texts))
        return FilterResult(keep, row_scores, {"keywords": keywords, "removed_rows": len(texts) - len(keep),
                                               "top_scores": {w: scores[w] for w in ranking}})
