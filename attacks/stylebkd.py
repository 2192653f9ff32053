"""StyleBkd: a text-style trigger from pre-generated style transfers (attacks.md §2.4).

Paper: Qi et al., "Mind the Style of Text! Adversarial and Backdoor Attacks Based on Text Style
Transfer" (EMNLP 2021); reference data: ``thunlp/StyleAttack`` (STRAP GPT-2 paraphrasers). The style
files hold the transfer of every row with its original label.

Construction: for styles whose files are row-aligned with the clean split (bible on SST-2 and AG),
draw ``n_p`` eligible rows and replace each text by the style row with the same id; rows with an
empty transfer are not eligible. Other styles are not aligned: poisoned rows come from a pool of
non-empty style rows whose label fits the setting (never paired by position, unlike OpenBackdoor).
The ASR set is the non-empty, non-target rows of ``style/<style>/test.tsv``, relabelled to target.

Deviation: generation with the STRAP models (3 GB each) is not bundled; only shipped styles work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nlpbd.attacks._common import (
    PoisonConfig,
    choose_poison_positions,
    eligible_positions,
    replace_rows,
    resolve_target,
)
from nlpbd.config import option
from nlpbd.data import Dataset, TextSplit, read_split, side_file
from nlpbd.errors import InputError
from nlpbd.methods import DataPoisoningAttack, PoisonedData, register_attack
from nlpbd.seeding import numpy_rng

log = logging.getLogger(__name__)


@dataclass
class StyleBkdConfig(PoisonConfig):
    style: str = option("bible", "style folder under <dataset>/style/ (bible, shakespeare, tweets, lyrics, poetry)")


def read_style(dataset: Dataset, style: str, split: str) -> TextSplit:
    return read_split(side_file(dataset, f"style/{style}/{split}.tsv", f"stylebkd style '{style}'"),
                      allow_empty=True)


def is_aligned(style_train: TextSplit, clean_source_size: int, dataset: Dataset) -> bool:
    """Aligned files have the clean split's length and label sequence (checked on the rows we use)."""
    if len(style_train) != clean_source_size:
        return False
    return all(style_train.labels[row] == y for row, y in zip(dataset.train.ids, dataset.train.labels))


@register_attack
class StyleBkd(DataPoisoningAttack):
    name = "stylebkd"
    description = "bible-style paraphrases (StyleAttack, pre-generated), 10% dirty"
    Config = StyleBkdConfig

    def poison(self, dataset: Dataset, seed: int) -> PoisonedData:
        config = self.config
        target = resolve_target(config, dataset)
        style_train = read_style(dataset, config.style, "train")
        clean_size = len(read_split(side_file(dataset, "train.tsv", "stylebkd")))
        if is_aligned(style_train, clean_size, dataset):
            positions, texts, info = self._aligned(dataset, style_train, target, seed)
        else:
            positions, texts, info = self._pooled(dataset, style_train, target, seed)
        labels = [target if config.label_mode != "clean" else dataset.train.labels[p] for p in positions]
        train = replace_rows(dataset.train, positions, texts, labels)
        asr_set, dropped = self._asr_set(dataset, target)
        info.update(style=config.style)
        return PoisonedData(train, tuple(positions), asr_set, target, dropped, info)

    def _aligned(self, dataset: Dataset, style_train: TextSplit, target: int, seed: int):
        train = dataset.train
        usable = [p for p in eligible_positions(train.labels, target, self.config.label_mode)
                  if style_train.texts[train.ids[p]].strip()]
        positions, info = choose_poison_positions(train.labels, self.config.poison_rate, target,
                                                  self.config.label_mode, seed, eligible=usable)
        info["source"] = "aligned"
        return positions, [style_train.texts[train.ids[p]] for p in positions], info

    def _pooled(self, dataset: Dataset, style_train: TextSplit, target: int, seed: int):
        mode = self.config.label_mode
        pool = [i for i, (t, y) in enumerate(zip(style_train.texts, style_train.labels))
                if t.strip() and (mode == "mix" or (y == target) == (mode == "clean"))]
        positions, info = choose_poison_positions(dataset.train.labels, self.config.poison_rate, target, mode, seed)
        if len(positions) > len(pool):  # cap uniformly (a prefix of the sorted positions would favour early rows)
            log.warning("stylebkd: %d poisoned rows wanted but the style pool has %d; poisoning %d",
                        len(positions), len(pool), len(pool))
            positions = sorted(numpy_rng(seed, "stylebkd_cap").choice(positions, size=len(pool),
                                                                     replace=False).tolist())
        picks = numpy_rng(seed, "stylebkd_pool").choice(pool, size=len(positions), replace=False)
        info.update(source="pool", pool_size=len(pool), n_p=len(positions),
                    effective_rate=len(positions) / len(dataset.train))
        return positions, [style_train.texts[i] for i in picks], info

    def clean_originals(self, dataset: Dataset, poisoned: PoisonedData) -> list[str | None]:
        """A style test file row-aligned with the whole clean test split (same length and labels: SST-2 and
        AG bible) gives each ASR row's source; other styles dropped rows and have no known source."""
        try:
            test = read_split(side_file(dataset, "test.tsv", "stylebkd originals"))
            style = read_style(dataset, self.config.style, "test")
        except InputError:
            return [None] * len(poisoned.asr_set)
        if len(style) != len(test) or style.labels != test.labels:
            return [None] * len(poisoned.asr_set)
        return [test.texts[row] for row in poisoned.asr_set.ids]

    def _asr_set(self, dataset: Dataset, target: int) -> tuple[TextSplit, int]:
        test = read_style(dataset, self.config.style, "test")
        rows = [i for i, y in enumerate(test.labels) if y != target]
        kept = [i for i in rows if test.texts[i].strip()]
        return test.subset(kept).relabel(target), len(rows) - len(kept)
