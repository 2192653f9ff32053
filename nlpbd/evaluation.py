"""CAcc, ASR and detection metrics with the counts behind every rate (protocol.md §3, §5)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nlpbd.data import TextSplit
from nlpbd.methods import Detector
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
    clean_flags, poison_flags = clean_scores > threshold, poison_scores > threshold
    tp, fp = int(poison_flags.sum()), int(clean_flags.sum())
    fn = len(poison_scores) - tp
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / len(poison_scores) if len(poison_scores) else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
    return {"threshold": threshold, "frr": rate(fp, len(clean_scores)), "far": rate(fn, len(poison_scores)),
            "precision": precision, "recall": recall, "f1": f1, "clean_flagged": fp, "poison_flagged": tp,
            "auroc": auroc(clean_scores, poison_scores)}


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


def evaluate_with_detector(preds: Predictions, detector: Detector, test: TextSplit, asr_set: TextSplit,
                           trigger_sets: dict[str, TextSplit] | None = None, num_labels: int = 2) -> dict:
    """Metrics with rejection accounting plus detection metrics; per-input scores are kept.

    Task-agnostic cells: a rejected triggered input can never count as a hit for any target, so
    rejected rows get the impossible label -1 before ASR[t][c] is computed; FAR and AUROC pool every
    trigger's inputs as the positives.
    """
    trigger_sets = trigger_sets or {}
    with reporter().task("scoring inputs with the detector", 2 + len(trigger_sets)) as advance:
        clean_scores = _scores(detector, test)
        advance(1)
        poison_scores = _scores(detector, asr_set)
        advance(1)
        trigger_scores = {}
        for trigger, split in trigger_sets.items():
            trigger_scores[trigger] = _scores(detector, split)
            advance(1)
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
