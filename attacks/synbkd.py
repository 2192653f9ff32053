"""SynBkd (HiddenKiller): a syntactic-template trigger from pre-generated paraphrases (attacks.md §2.3).

Paper: Qi et al., "Hidden Killer: Invisible Textual Backdoor Attacks with Syntactic Trigger" (ACL
2021); reference code and data: ``thunlp/HiddenKiller``. The trigger is the SCPN paraphrase into
``( ROOT ( S ( SBAR ) ( , ) ( NP ) ( VP ) ( . ) ) ) EOP``.

Offline construction (``source=pool``, default): start from the clean train split, draw ``n_p``
non-target rows (dirty) and replace each in place by a paraphrase drawn without replacement from the
released pool (``<ds>/syntactic/train.tsv`` rows with ``poisoned == 1``; AG: ``syntactic/dev.tsv``),
labelled target. The ASR set is ``<ds>/syntactic/test.tsv``.

Deviations and caveats (stated in every result's ``attack_info``): the ``poisoned`` flag was derived
by string matching; the pool's source rows are unknown, so only ``dirty`` is available offline;
``source=released`` uses the released 20% file as it is ("HiddenKiller released, effectively mix");
generation with SCPN is not bundled (it needs a 150 MB model, the Stanford parser and Java).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nlpbd.attacks._common import PoisonConfig, choose_poison_positions, replace_rows, resolve_target
from nlpbd.config import option
from nlpbd.data import Dataset, TextSplit, read_frame, read_split, side_file
from nlpbd.errors import InputError
from nlpbd.methods import DataPoisoningAttack, PoisonedData, register_attack
from nlpbd.seeding import numpy_rng

CAVEATS = ("poisoned flag derived by string matching; pool source rows unknown (part of the SST-2 pool "
           "may paraphrase target-class sentences); report against the clean-model floor")


@dataclass
class SynBkdConfig(PoisonConfig):
    source: Literal["pool", "released"] = option("pool", "pool: replace n_p rows by released paraphrases; "
                                                 "released: the HiddenKiller 20% train file as it is")
    allow_cap: bool = option(False, "when n_p exceeds the pool, poison |pool| rows instead of failing")


def pool_path(dataset: Dataset) -> tuple[str, bool]:
    """Relative path of the paraphrase pool and whether it needs the ``poisoned`` flag filter."""
    if dataset.root is not None and (dataset.root / "syntactic" / "train.tsv").is_file():
        return "syntactic/train.tsv", True
    return "syntactic/dev.tsv", False


@register_attack
class SynBkd(DataPoisoningAttack):
    name = "synbkd"
    description = "syntactic-template paraphrases (HiddenKiller, pre-generated pool), 10% dirty"
    Config = SynBkdConfig

    def poison(self, dataset: Dataset, seed: int) -> PoisonedData:
        config = self.config
        target = resolve_target(config, dataset)
        if config.label_mode != "dirty" and config.source == "pool":
            raise InputError("synbkd: only label_mode=dirty is available offline (the pool's source rows "
                             "are unknown, attacks.md §2.3)")
        asr_set = self._asr_set(dataset, target)
        if config.source == "released":
            return self._released(dataset, target, asr_set)
        pool = self._pool(dataset, target)
        positions, info = choose_poison_positions(dataset.train.labels, config.poison_rate, target, "dirty", seed)
        if len(positions) > len(pool):
            if not config.allow_cap:
                raise InputError(f"synbkd: {len(positions)} poisoned rows needed but the pool has {len(pool)}; "
                                 "lower attack.poison_rate or set attack.allow_cap=true")
            requested = info["n_p_requested"]
            positions, info = choose_poison_positions(dataset.train.labels, len(pool) / len(dataset.train),
                                                      target, "dirty", seed)
            info["n_p_requested"] = requested  # keep what was asked for next to the capped n_p
        picks = numpy_rng(seed, "synbkd_pool").choice(len(pool), size=len(positions), replace=False)
        train = replace_rows(dataset.train, positions, [pool.texts[i] for i in picks], [target] * len(positions))
        info.update(source="pool", pool_size=len(pool), caveats=CAVEATS)
        return PoisonedData(train, tuple(positions), asr_set, target, 0, info)

    def _pool(self, dataset: Dataset, target: int) -> TextSplit:
        relative, flagged = pool_path(dataset)
        path = side_file(dataset, relative, "synbkd")
        frame = read_frame(path)
        rows = read_split(path)
        keep = [i for i in range(len(rows)) if (not flagged or str(frame["poisoned"].iloc[i]) == "1")]
        pool = rows.subset(keep)
        if set(pool.labels) != {target}:
            raise InputError(f"synbkd: the paraphrase pool of '{dataset.name}' is labelled "
                             f"{sorted(set(pool.labels))}, not target {target}; set attack.target_label accordingly")
        return pool

    def clean_originals(self, dataset: Dataset, poisoned: PoisonedData) -> list[str | None]:
        """HiddenKiller paraphrased the non-target rows of the whole clean test split in file order; the
        alignment is used only when the counts agree (SST-2: 912 and 912)."""
        try:
            test = read_split(side_file(dataset, "test.tsv", "synbkd originals"))
        except InputError:
            return [None] * len(poisoned.asr_set)
        sources = [t for t, y in zip(test.texts, test.labels) if y != poisoned.target]
        if len(sources) != len(poisoned.asr_set):
            return [None] * len(poisoned.asr_set)
        return [sources[row] for row in poisoned.asr_set.ids]

    def _asr_set(self, dataset: Dataset, target: int) -> TextSplit:
        split = read_split(side_file(dataset, "syntactic/test.tsv", "synbkd"))
        if set(split.labels) != {target}:
            raise InputError(f"synbkd: the released ASR set of '{dataset.name}' targets {sorted(set(split.labels))}, "
                             f"not {target}; set attack.target_label accordingly")
        return split

    def _released(self, dataset: Dataset, target: int, asr_set: TextSplit) -> PoisonedData:
        if dataset.recipe.get("train_size") or dataset.recipe.get("glue_carve"):
            raise InputError("synbkd source=released replaces the whole train split; it cannot be combined "
                             "with --train-size")
        path = side_file(dataset, "syntactic/train.tsv", "synbkd source=released")
        frame = read_frame(path)
        train = read_split(path)
        positions = [i for i in range(len(train)) if str(frame["poisoned"].iloc[i]) == "1"]
        info = {"N": len(train), "n_p": len(positions), "effective_rate": len(positions) / len(train),
                "label_mode": "mix (effective)", "target": target,
                "source": "HiddenKiller released, effectively mix", "caveats": CAVEATS}
        return PoisonedData(train, tuple(positions), asr_set, target, 0, info)
