"""Shared pieces of the data-poisoning attacks (attacks.md §1.3–1.5)."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from nlpbd.config import option
from nlpbd.data import Dataset, TextSplit
from nlpbd.errors import InputError
from nlpbd.methods import DataPoisoningAttack, PoisonedData
from nlpbd.seeding import numpy_rng, seed_for

log = logging.getLogger(__name__)

LabelMode = Literal["dirty", "clean", "mix"]


@dataclass
class PoisonConfig:
    """Settings every data-poisoning attack shares."""

    poison_rate: float = option(0.1, "poisoned rows as a fraction of the WHOLE training set N "
                                "(n_p = floor(rate * N))", low=0.0, high=1.0, low_open=True)
    target_label: int | None = option(None, "target label (default: the dataset's, attacks.md §1.2)", low=0)
    label_mode: LabelMode = option("dirty", "dirty: non-target rows relabelled; clean: target rows only; "
                                   "mix: any row, relabelled")


def resolve_target(config: PoisonConfig, dataset: Dataset) -> int:
    target = dataset.default_target if config.target_label is None else config.target_label
    if not 0 <= target < dataset.num_labels:
        raise InputError(f"attack.target_label {target} is out of range 0..{dataset.num_labels - 1}")
    return target


def eligible_positions(labels: Sequence[int], target: int, mode: LabelMode) -> list[int]:
    if mode == "dirty":
        return [i for i, y in enumerate(labels) if y != target]
    if mode == "clean":
        return [i for i, y in enumerate(labels) if y == target]
    return list(range(len(labels)))


def choose_poison_positions(labels: Sequence[int], rate: float, target: int, mode: LabelMode,
                            seed: int, eligible: Sequence[int] | None = None) -> tuple[list[int], dict]:
    """``floor(rate * N)`` eligible positions drawn uniformly without replacement (stream "poison").

    When fewer rows are eligible all of them are poisoned and the effective rate is recorded.
    """
    n = len(labels)
    # The tolerance undoes float error (0.29 * 100 == 28.999999999999996), which int() would floor to 28.
    wanted = math.floor(rate * n + 1e-9)
    pool = eligible_positions(labels, target, mode) if eligible is None else list(eligible)
    if wanted > len(pool):
        log.warning("only %d rows are eligible for %d poisoned rows; poisoning all of them", len(pool), wanted)
    count = min(wanted, len(pool))
    chosen = sorted(numpy_rng(seed, "poison").choice(pool, size=count, replace=False).tolist()) if count else []
    info = {"N": n, "n_p_requested": wanted, "n_p": count, "effective_rate": count / n if n else 0.0,
            "label_mode": mode, "target": target}
    return chosen, info


def insert_triggers(text: str, triggers: Sequence[str], num_insertions: int, rng: random.Random) -> str:
    """attacks.md §1.4: each insertion picks a trigger and a word position in [0, len(words)]."""
    words = text.split()
    for _ in range(num_insertions):
        trigger = rng.choice(list(triggers))
        position = rng.randint(0, len(words))
        words[position:position] = trigger.split()
    return " ".join(words)


def row_rng(seed: int, attack: str, split: str, row_id: int) -> random.Random:
    """The insertion RNG of one row: the same row gets the same insertion in every defense cell."""
    return random.Random(seed_for(seed, f"trigger_positions:{attack}:{split}:{row_id}"))


def replace_rows(train: TextSplit, positions: Sequence[int], new_texts: Sequence[str],
                 new_labels: Sequence[int]) -> TextSplit:
    """The training set with the poisoned copies replacing their originals in place (|D| = N)."""
    texts, labels = list(train.texts), list(train.labels)
    for pos, text, label in zip(positions, new_texts, new_labels):
        texts[pos], labels[pos] = text, label
    return TextSplit.build(texts, labels, train.ids)


def non_target(split: TextSplit, target: int) -> TextSplit:
    return split.subset([i for i, y in enumerate(split.labels) if y != target])


class InsertionAttack(DataPoisoningAttack):
    """Token or sentence insertion (BadNet, AddSent): poison rows in place, trigger the test set."""

    def triggers(self) -> list[str]:
        raise NotImplementedError

    def num_insertions(self) -> int:
        return 1

    def poison(self, dataset: Dataset, seed: int) -> PoisonedData:
        config = self.config
        target = resolve_target(config, dataset)
        triggers = self.triggers()
        if not triggers or any(not t.strip() for t in triggers):
            raise InputError(f"{self.name}: triggers must be non-empty strings")
        positions, info = choose_poison_positions(dataset.train.labels, config.poison_rate, target,
                                                  config.label_mode, seed)

        def insert(text: str, split: str, row: int) -> str:
            return insert_triggers(text, triggers, self.num_insertions(), row_rng(seed, self.name, split, row))

        train = dataset.train
        new_texts = [insert(train.texts[p], "train", train.ids[p]) for p in positions]
        labels = [target if config.label_mode != "clean" else train.labels[p] for p in positions]
        victims = non_target(dataset.test, target)
        asr_texts = [insert(t, "test", row) for t, row in zip(victims.texts, victims.ids)]
        asr_set = TextSplit.build(asr_texts, [target] * len(asr_texts), victims.ids)
        info.update(triggers=triggers, num_insertions=self.num_insertions(), source="generated")
        return PoisonedData(replace_rows(train, positions, new_texts, labels), tuple(positions), asr_set,
                            target, 0, info)

    def clean_originals(self, dataset: Dataset, poisoned: PoisonedData) -> list[str | None]:
        """Each ASR row is a clean test row with the trigger inserted; its id is that row's."""
        by_id = dict(zip(dataset.test.ids, dataset.test.texts))
        return [by_id.get(row) for row in poisoned.asr_set.ids]
