"""CAcc, ASR and detection metrics with the counts behind every rate (protocol.md §3, §5)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nlpbd.data import TextSplit
from nlpbd.methods import Corrector, Detector
from nlpbd.progress import reporter
from nlpbd.training import encode, pad_id_of, predict_encoded


@dataclass(frozen=True)
class Predictions:
    """Predicted labels on the clean test split and on the ASR set (triggered, labelled target)."""

    clean: np.ndarray
    poisoned: np.ndarray
    triggered: dict[str, np.ndarray] = field(default_factory=dict)  # task-agnostic: per trigger

    def to_json(self) -> dict:
        return {"clean": self.clean.tolist(), "poisoned": self.poisoned.tolist(),
                "triggered": {t: p.tolist() for t, p in self.triggered.items()}}

    @classmethod
    def from_json(cls, data: dict) -> Predictions:
        return cls(np.asarray(data["clean"], dtype=int), np.asarray(data["poisoned"], dtype=int),
                   {t: np.asarray(p, dtype=int) for t, p in data.get("triggered", {}).items()})


def predict_split(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, split: TextSplit,
                  max_length: int, batch_size: int, device: torch.device) -> np.ndarray:
    encoded = encode(tokenizer, split, max_length)
    return predict_encoded(model, encoded, pad_id_of(tokenizer), batch_size, device)


def predict_cell(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, test: TextSplit,
                 asr_set: TextSplit, max_length: int, batch_size: int, device: torch.device,
                 trigger_sets: dict[str, TextSplit] | None = None) -> Predictions:
    trigger_sets = trigger_sets or {}

    def labels_of(split: TextSplit) -> np.ndarray:
        if not len(split):
            return np.zeros(0, dtype=int)
        return predict_split(model, tokenizer, split, max_length, batch_size, device).argmax(axis=1)

    with reporter().task("evaluating", 2 + len(trigger_sets)) as advance:
        clean = labels_of(test)
        advance(1)
        poisoned = labels_of(asr_set)
        advance(1)
        triggered = {}
        for trigger, split in trigger_sets.items():
            triggered[trigger] = labels_of(split)
            advance(1)
    return Predictions(clean, poisoned, triggered)


def attack_metrics(preds: Predictions, test: TextSplit, asr_set: TextSplit,
                   clean_flags: np.ndarray | None = None, poison_flags: np.ndarray | None = None) -> dict:
    """CAcc over the full clean test split and ASR over the full ASR set.

    With a detector, a rejected clean input counts as wrong and a rejected poisoned input as a failed
    attack; the denominators stay the full sets (protocol.md §5).
    """
    clean_ok = preds.clean == np.asarray(test.labels)
    hits = preds.poisoned == np.asarray(asr_set.labels)
    if clean_flags is not None:
        clean_ok = clean_ok & ~clean_flags
        hits = hits & ~poison_flags
    predicted = np.where(clean_flags, -1, preds.clean) if clean_flags is not None else preds.clean
    return {"cacc": rate(clean_ok.sum(), len(test)), "asr": rate(hits.sum(), len(asr_set)),
            "n_clean": len(test), "clean_correct": int(clean_ok.sum()),
            "n_poison": len(asr_set), "poison_hits": int(hits.sum()), **class_balance(predicted, test)}


def class_balance(predicted: np.ndarray, test: TextSplit) -> dict:
    """What CAcc hides on an imbalanced test set: balanced accuracy (mean per-class recall), macro-F1, the
    majority class's share (what always answering it scores) and how many classes the model predicts.
    A rejected input is predicted -1: wrong for every class."""
    labels = np.asarray(test.labels)
    if not len(labels):
        return {}
    classes = np.unique(labels)
    recalls, f1s = [], []
    for c in classes:
        tp = int(((predicted == c) & (labels == c)).sum())
        recall, precision = tp / int((labels == c).sum()), rate(tp, int((predicted == c).sum()))
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision and recall else 0.0)
    return {"balanced_accuracy": float(np.mean(recalls)), "macro_f1": float(np.mean(f1s)),
            "majority_rate": float(np.bincount(labels).max() / len(labels)),
            "predicted_classes": int(len(np.unique(predicted[predicted >= 0])))}


def task_agnostic_metrics(triggered: dict[str, np.ndarray], test: TextSplit, num_labels: int) -> dict:
    """ASR[t][c] over clean test rows with y != c, the discovered target argmax_c, AASR and MASR
    (protocol.md §3.3, targets discovered on test)."""
    labels = np.asarray(test.labels)
    matrix: dict[str, list[float | None]] = {}
    for trigger, preds in triggered.items():
        matrix[trigger] = [rate(((preds == c) & (labels != c)).sum(), int((labels != c).sum()))
                           for c in range(num_labels)]
    best = {t: max(v for v in row if v is not None) for t, row in matrix.items()}
    accuracy = {t: rate(int((preds == labels).sum()), len(labels)) for t, preds in triggered.items()}
    return {"aasr": float(np.mean(list(best.values()))) if best else None,
            "masr": max(best.values()) if best else None,
            "asr_by_trigger": best, "asr_matrix": matrix,
            "discovered_targets": {t: int(np.nanargmax(np.array(row, dtype=float))) for t, row in matrix.items()},
            "triggered_acc_by_trigger": accuracy,
            "triggered_acc": float(np.mean(list(accuracy.values()))) if accuracy and len(labels) else None}


def accuracy_drop(metrics: dict) -> float | None:
    """BadPre's own, untargeted metric: clean accuracy minus the mean accuracy with one trigger inserted
    (every clean test row, original labels; a rejected input counts as wrong on both sides)."""
    cacc, triggered = metrics.get("cacc"), metrics.get("triggered_acc")
    return None if cacc is None or triggered is None else cacc - triggered


def cell_metrics(preds: Predictions, test: TextSplit, asr_set: TextSplit, num_labels: int) -> dict:
    """CAcc and ASR (fixed target) or AASR / MASR (task-agnostic), with their counts."""
    metrics = attack_metrics(preds, test, asr_set)
    if preds.triggered:
        metrics.update(task_agnostic_metrics(preds.triggered, test, num_labels))
        metrics["acc_drop"] = accuracy_drop(metrics)
    return metrics


def rate(count: int | np.integer, total: int) -> float | None:
    return float(count) / total if total else None


def detection_metrics(clean_scores: np.ndarray, poison_scores: np.ndarray, threshold: float) -> dict:
    """FRR, FAR, precision, recall, F1 and AUROC with poisoned = positive and flag = score > τ."""
    return {"threshold": threshold, **flag_metrics(clean_scores > threshold, poison_scores > threshold),
            "auroc": auroc(clean_scores, poison_scores)}


def flag_metrics(clean_flags: np.ndarray, poison_flags: np.ndarray) -> dict:
    """FRR, FAR, precision, recall and F1 of given flags, poisoned = positive."""
    tp, fp = int(np.sum(poison_flags)), int(np.sum(clean_flags))
    fn = len(poison_flags) - tp
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / len(poison_flags) if len(poison_flags) else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
    return {"frr": rate(fp, len(clean_flags)), "far": rate(fn, len(poison_flags)), "precision": precision,
            "recall": recall, "f1": f1, "clean_flagged": fp, "poison_flagged": tp}


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half)."""
    if len(negatives) == 0 or len(positives) == 0:
        return None
    scores = np.concatenate([negatives, positives])
    ranks = _average_ranks(scores)
    positive_ranks = ranks[len(negatives):].sum()
    n_pos, n_neg = len(positives), len(negatives)
    return float((positive_ranks - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def over_inputs(description: str, apply: Callable, test, asr_set, trigger_sets: dict) -> tuple:
    """``apply`` to the clean test split, the ASR set and each trigger's set, with one progress task."""
    with reporter().task(description, 2 + len(trigger_sets)) as advance:
        clean = apply(test)
        advance(1)
        poison = apply(asr_set)
        advance(1)
        per_trigger = {}
        for trigger, split in trigger_sets.items():
            per_trigger[trigger] = apply(split)
            advance(1)
    return clean, poison, per_trigger


def evaluate_with_detector(preds: Predictions, detector: Detector, test: TextSplit, asr_set: TextSplit,
                           trigger_sets: dict[str, TextSplit] | None = None, num_labels: int = 2) -> dict:
    """Metrics with rejection accounting plus detection metrics; per-input scores are kept.

    Task-agnostic cells: a rejected triggered input can never count as a hit for any target, so
    rejected rows get the impossible label -1 before ASR[t][c] is computed; FAR and AUROC pool every
    trigger's inputs as the positives.
    """
    trigger_sets = trigger_sets or {}
    clean_scores, poison_scores, trigger_scores = over_inputs(
        "scoring inputs with the detector", lambda split: _scores(detector, split), test, asr_set, trigger_sets)
    metrics = attack_metrics(preds, test, asr_set, clean_scores > detector.threshold,
                             poison_scores > detector.threshold)
    if trigger_sets:
        kept = {t: np.where(trigger_scores[t] > detector.threshold, -1, preds.triggered[t]) for t in trigger_sets}
        metrics.update(task_agnostic_metrics(kept, test, num_labels))
        metrics["acc_drop"] = accuracy_drop(metrics)
        poison_scores = np.concatenate([poison_scores, *trigger_scores.values()])
    metrics.update(detection_metrics(clean_scores, poison_scores, detector.threshold))
    metrics["scores"] = {"clean": clean_scores.round(6).tolist(), "poison": poison_scores.round(6).tolist()}
    return metrics


def _scores(detector: Detector, split: TextSplit) -> np.ndarray:
    if not len(split):
        return np.zeros(0, dtype=float)
    return np.asarray(detector.scores(list(split.texts)), dtype=float)


# --- input correction (ONION) ---------------------------------------------------------------------


def corrected(corrector: Corrector, split: TextSplit) -> TextSplit:
    """The split with every text replaced by its correction; labels, ids and the row count unchanged."""
    if not len(split):
        return split
    texts = corrector.correct(list(split.texts))
    if len(texts) != len(split):
        raise RuntimeError(f"the corrector returned {len(texts)} texts for {len(split)} inputs")
    return TextSplit.build(texts, split.labels, split.ids)


def evaluate_with_corrector(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, corrector: Corrector,
                            test: TextSplit, asr_set: TextSplit, max_length: int, batch_size: int,
                            device: torch.device, trigger_sets: dict[str, TextSplit] | None = None,
                            num_labels: int = 2) -> tuple[dict, TextSplit]:
    """CAcc / ASR of the victim on corrected inputs (full denominators), how many inputs the correction
    changed, and, with the correction counted as the flag, FRR / FAR (and AUROC of its scores).

    Returns the metrics and the corrected ASR set (for trigger-removal counts against the originals).
    """
    trigger_sets = trigger_sets or {}
    fixed_test, fixed_asr, fixed_triggers = over_inputs(
        "correcting inputs", lambda split: corrected(corrector, split), test, asr_set, trigger_sets)
    preds = predict_cell(model, tokenizer, fixed_test, fixed_asr, max_length, batch_size, device, fixed_triggers)
    metrics = cell_metrics(preds, fixed_test, fixed_asr, num_labels)
    clean_changed = _changed(test, fixed_test)
    poison_changed = np.concatenate([_changed(asr_set, fixed_asr),
                                     *(_changed(trigger_sets[t], fixed_triggers[t]) for t in trigger_sets)])
    metrics.update({"clean_modified": int(clean_changed.sum()), "poison_modified": int(poison_changed.sum()),
                    **flag_metrics(clean_changed, poison_changed)})
    if corrector.scores is not None:
        clean_scores = _scores_of(corrector.scores, test)
        poison_scores = np.concatenate([_scores_of(corrector.scores, asr_set),
                                        *(_scores_of(corrector.scores, trigger_sets[t]) for t in trigger_sets)])
        metrics["auroc"] = auroc_of_ranks(clean_scores, poison_scores)
        metrics["scores"] = {"clean": clean_scores.round(6).tolist(), "poison": poison_scores.round(6).tolist()}
    return metrics, fixed_asr


def _changed(before: TextSplit, after: TextSplit) -> np.ndarray:
    return np.array([a.split() != b.split() for a, b in zip(before.texts, after.texts)], dtype=bool)


def _scores_of(scores, split: TextSplit) -> np.ndarray:
    if not len(split):
        return np.zeros(0, dtype=float)
    return np.asarray(scores(list(split.texts)), dtype=float)


def auroc_of_ranks(negatives: np.ndarray, positives: np.ndarray) -> float | None:
    """AUROC where scores may be ±inf (NaN counts as -inf): infinities are replaced, over both sets at
    once, by finite values of the same rank."""
    values = np.concatenate([negatives, positives]).astype(float)
    values = np.where(np.isnan(values), -np.inf, values)
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if len(finite) else (0.0, 0.0)
    values = np.where(values == np.inf, high + 1.0, np.where(values == -np.inf, low - 1.0, values))
    return auroc(values[:len(negatives)], values[len(negatives):])


def inserted_word_removal(originals: list[str | None], poisoned: TextSplit, fixed: TextSplit) -> dict:
    """Of the words an insertion attack added to each clean original, how many the correction removed.

    Computed by the evaluator after the defense is done, from the multiset difference between the
    triggered row and its clean original (protocol.md §5: "the fraction of inserted trigger tokens removed").
    """
    inserted_total = removed_total = 0
    for original, before, after in zip(originals, poisoned.texts, fixed.texts):
        if original is None:
            continue
        inserted = Counter(before.split()) - Counter(original.split())
        kept = Counter(after.split())
        inserted_total += sum(inserted.values())
        removed_total += sum(min(n, max(0, Counter(before.split())[w] - kept[w])) for w, n in inserted.items())
    return {"inserted_words": inserted_total, "inserted_words_removed": removed_total,
            "inserted_removed_fraction": rate(removed_total, inserted_total)}


# --- training-data filtering (BKI, CUBE) ----------------------------------------------------------


def filter_metrics(keep: list[int], scores: np.ndarray, poisoned_positions: tuple[int, ...], n_rows: int) -> dict:
    """How well a filter's removed rows match the poison mask; computed after the defense is done.

    Removed = flagged: precision / recall of the removed rows, FRR (clean rows removed / clean rows),
    FAR (poisoned rows kept / poisoned rows), and AUROC of the per-row suspicion scores.
    """
    poisoned = np.zeros(n_rows, dtype=bool)
    poisoned[list(poisoned_positions)] = True
    removed = np.ones(n_rows, dtype=bool)
    removed[list(keep)] = False
    flags = flag_metrics(removed[~poisoned], removed[poisoned])
    return {"removed": int(removed.sum()), "kept": len(keep), "removed_poison": flags["poison_flagged"],
            "removal_precision": flags["precision"], "removal_recall": flags["recall"], "frr": flags["frr"],
            "far": flags["far"], "f1": flags["f1"],
            "auroc": auroc_of_ranks(scores[~poisoned], scores[poisoned]) if len(scores) == n_rows else None}
