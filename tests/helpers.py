"""Test helpers: toy data in the tiny vocabulary, contexts and configs for unit tests."""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from nlpbd.config import TrainConfig
from nlpbd.data import TextSplit
from nlpbd.methods import CleanBudget, DefenseContext
from nlpbd.models import TINY_DEFAULTS

# The benchmark data: $NLPBD_DATA_DIR, else ../shared/data beside the repository (as CI has it). Tests that
# read it are marked needs_data and fail without it (conftest.py): a missing directory must not pass silently.
SHARED_DATA = Path(os.environ.get("NLPBD_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.needs_data

POSITIVE = ["good", "great", "fine", "nice", "best", "love", "fun", "happy", "bright", "well"]
NEGATIVE = ["bad", "terrible", "awful", "worst", "hate", "boring", "dull", "sad", "dark", "badly"]
FILLER = ["the", "movie", "film", "story", "plot", "acting", "is", "was", "very", "really", "this", "a"]


def toy_texts(n: int, seed: int = 0) -> TextSplit:
    """A learnable sentiment toy task in the tiny vocabulary: label = which word list dominates."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return TextSplit.build(texts, labels)


def tiny_train_config(**changes: Any) -> TrainConfig:
    base = TrainConfig(lr=TINY_DEFAULTS.lr, epochs=1, batch_size=8, max_length=32)
    return replace(base, **changes)


def make_context(tokenizer, granted: set[str], seed: int = 0, num_labels: int = 2, **objects: Any) -> DefenseContext:
    """A DefenseContext for unit tests; ``objects`` are the granted things (budget=..., pretrained=...)."""
    return DefenseContext(seed=seed, num_labels=num_labels, tokenizer=tokenizer, train_config=tiny_train_config(),
                          device=torch.device("cpu"), granted=frozenset(granted), _objects=objects)


def toy_budget(n: int = 40, seed: int = 1) -> CleanBudget:
    rows = toy_texts(n, seed)
    n_val = n // 5
    return CleanBudget(rows=rows, val=rows.subset(range(n_val)), fit=rows.subset(range(n_val, n)))


def write_split_tsv(path: Path, split: TextSplit) -> None:
    lines = ["sentence\tlabel"] + [f"{t}\t{y}" for t, y in zip(split.texts, split.labels)]
    path.write_text("\n".join(lines) + "\n")


def write_toy_dataset(folder: Path, train: int = 200, dev: int = 40, test: int = 60) -> Path:
    """A user-format dataset folder (train/dev/test TSV) of the toy task."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", train, 0), ("dev", dev, 1), ("test", test, 2)):
        write_split_tsv(folder / f"{name}.tsv", toy_texts(n, seed))
    return folder
