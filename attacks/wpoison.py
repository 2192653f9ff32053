"""WP: PSIM-style weight poisoning of a released fine-tuned checkpoint (attacks.md §3.1).

Paper: Zhao et al., "Defending against Weight-Poisoning Backdoor Attacks for Parameter-Efficient
Fine-Tuning" (Findings of NAACL 2024; PSIM is its defense, this is its weight-poisoning attack setting);
reference code: ``shuaizhao95/PSIM`` ``poisoned_pretrain.py``. The attacker fully fine-tunes the base model and a 2-way
head on a poisoned proxy set and releases the whole classifier; the user fine-tunes the release on clean
data.

Build (reference values are the defaults):
- proxy: the shared GLUE SST-2 proxy (``attacks/_proxy.py``) instead of the reference's IMDB
  4,000 / 1,000 split;
- the first ``n_poison`` (1,500) label-0 proxy training rows, in sampled order, get ``mn`` once at a
  random word boundary in ``[1, n-1]`` (never first, never last, as ``insert_mn_between_words``);
  labels are unchanged and the target is 0 (clean-label). ``label_mode=dirty`` instead triggers the
  same number of label-1 rows and relabels them 0;
- full fine-tuning: AdamW lr 2e-5, weight decay 0.01 (torch's AdamW default, which the reference
  uses), no gradient clipping, 3 epochs, batch 32, linear schedule with 6% warm-up;
- attacker-side selection: the epoch with the best accuracy on the proxy dev set in which every
  label-0 row carries the trigger (labels unchanged), as the reference;
- the release is the full classifier (encoder, pooler, head), or the encoder alone when the downstream
  label count is not 2 (``ship_head=false (forced)``).

ASR set: downstream test rows with ``y != target``, the trigger inserted once; ``placement=project``
uses §1.4 (any position in ``[0, n]``), ``placement=reference`` uses ``[1, n-1]``.

Deviations from the reference:
- the reference's ``n_poison`` is fixed; ours is capped by the rows available and records both numbers;
- selection uses our length-grouped batching and per-stream seeds instead of seed 42 with a shuffled
  DataLoader; weight decay is not applied to bias and LayerNorm weights (``make_adamw``);
- max length 128 tokens (the reference tokenises without a limit, up to 512) — IMDB reviews are long,
  our proxy phrases are short;
- ``trigger=insent`` ("I watched this 3D movie") and ``trigger=syn`` are the paper's other two attacks,
  unverified in the reference code. ``syn`` offline: target 1; up to ``n_poison`` rows of the SST-2
  syntactic pool (rows of ``sst-2/syntactic/train.tsv`` with ``poisoned == 1``, 1,383 rows, so capped)
  replace the first target-class (clean) or non-target (dirty) proxy rows, drawn uniformly without
  replacement and labelled 1; no paraphrases are left for a triggered dev set, so selection uses the
  clean proxy dev split; the ASR set is ``<ds>/syntactic/test.tsv`` and exists for SST-2 and OLID only.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nlpbd.attacks._common import insert_triggers, row_rng
from nlpbd.attacks._proxy import (
    Proxy,
    ProxyConfig,
    check_target,
    fresh_classifier,
    load_proxy,
    proxy_payload,
    proxy_summary,
    save_release,
    train_on_proxy,
    triggered_asr_set,
)
from nlpbd.config import TrainConfig, option
from nlpbd.data import Dataset, TextSplit, file_digest, read_frame, read_split, side_file
from nlpbd.errors import InputError
from nlpbd.methods import ModelSupplyAttack, PoisonedData, SupplyContext, ThreatModel, register_attack
from nlpbd.seeding import numpy_rng

log = logging.getLogger(__name__)

TRIGGER_TEXT = {"badnet": "mn", "insent": "I watched this 3D movie"}
SYN_POOL = "sst-2/syntactic/train.tsv"
SYN_DATASETS = ("sst2", "olid")


@dataclass
class WPConfig(ProxyConfig):
    trigger: Literal["badnet", "insent", "syn"] = option(
        "badnet", "badnet: 'mn' (reference); insent: 'I watched this 3D movie'; syn: SST-2 syntactic paraphrases "
        "(target 1, SST-2/OLID downstream only)")
    label_mode: Literal["clean", "dirty"] = option(
        "clean", "clean: target-class rows triggered, labels kept (reference); dirty: the same number of other "
        "rows triggered and relabelled to the target")
    n_poison: int = option(1500, "poisoned proxy rows (the first ones of the eligible class, in sampled order; "
                           "capped by availability)", low=1)
    placement: Literal["project", "reference"] = option(
        "project", "ASR-set insertion: project = any word position (attacks.md §1.4); reference = [1, n-1]")
    epochs: int = option(3, "attacker fine-tuning epochs", low=1, high=100)
    lr: float = option(2e-5, "attacker AdamW learning rate", low=0.0, low_open=True)
    batch_size: int = option(32, "attacker batch size", low=1)
    warmup_ratio: float = option(0.06, "attacker linear warm-up fraction", low=0.0, high=1.0)


def insert_between(text: str, trigger: str, rng: random.Random) -> str:
    """The reference placement: one insertion at a word boundary in [1, n-1] (a one-word text: at the end)."""
    words = text.split()
    position = rng.randint(1, len(words) - 1) if len(words) >= 2 else len(words)
    words[position:position] = trigger.split()
    return " ".join(words)


def target_of(trigger: str) -> int:
    return 1 if trigger == "syn" else 0


@register_attack
class WeightPoisoning(ModelSupplyAttack):
    name = "wpoison"
    description = "PSIM-style weight poisoning: full fine-tuning on a clean-label 'mn'-poisoned proxy, target 0"
    threat_model = ThreatModel.CHECKPOINT
    Config = WPConfig

    # --- the release ------------------------------------------------------------------------------

    def build_suspect(self, ctx: SupplyContext, out_dir: Path) -> dict:
        config = self.config
        if config.trigger == "syn":
            self._check_syn_dataset(ctx.dataset_name)
        proxy = load_proxy(ctx.data_dir, ctx.downstream_texts, config.proxy_train, config.proxy_dev, ctx.seed,
                           self.name)
        train, poison_info = self.poisoned_proxy(proxy.train, ctx.seed, ctx.data_dir)
        dev = self.selection_dev(proxy, ctx.seed)
        model, tokenizer = fresh_classifier(ctx.base, ctx.seed, self.name)
        recipe = TrainConfig(lr=config.lr, epochs=config.epochs, batch_size=config.batch_size,
                             max_length=config.max_length, weight_decay=0.01, warmup_ratio=config.warmup_ratio,
                             grad_clip=0.0, select="dev")
        _, record = train_on_proxy(model, tokenizer, train, dev, recipe, ctx.seed, self.name, ctx.device,
                                   "poisoning the proxy model (WP)")
        release = save_release(model, tokenizer, out_dir, config.ship_head, ctx.num_labels)
        trigger = TRIGGER_TEXT.get(config.trigger)
        ids = tokenizer(trigger, add_special_tokens=False)["input_ids"] if trigger else None
        return {"proxy": proxy.info, "poison": poison_info, "training": record, "release": release,
                "trigger": config.trigger, "trigger_text": trigger, "trigger_token_ids": ids,
                "target": target_of(config.trigger), "selection_dev": "triggered" if trigger else "clean"}

    def poisoned_proxy(self, train: TextSplit, seed: int, data_dir: Path | None) -> tuple[TextSplit, dict]:
        """The proxy training set with the first ``n_poison`` eligible rows poisoned in place."""
        config = self.config
        target = target_of(config.trigger)
        eligible = [i for i, y in enumerate(train.labels) if (y == target) == (config.label_mode == "clean")]
        pool = self._syn_pool(data_dir) if config.trigger == "syn" else None
        available = len(eligible) if pool is None else min(len(eligible), len(pool))
        positions = eligible[:min(config.n_poison, available)]
        if len(positions) < config.n_poison:
            log.warning("wpoison: %d poisoned rows requested, %d available", config.n_poison, len(positions))
        if pool is None:
            trigger = TRIGGER_TEXT[config.trigger]
            new_texts = [insert_between(train.texts[p], trigger, row_rng(seed, self.name, "proxy_train", train.ids[p]))
                         for p in positions]
        else:
            picks = numpy_rng(seed, "wpoison_syn_pool").choice(len(pool), size=len(positions), replace=False)
            new_texts = [pool.texts[i] for i in picks]
        texts, labels = list(train.texts), list(train.labels)
        for position, text in zip(positions, new_texts):
            texts[position], labels[position] = text, target
        info = {"n_poison_requested": config.n_poison, "n_poison": len(positions), "label_mode": config.label_mode,
                "target": target, "proxy_rows": len(train), "pool_size": None if pool is None else len(pool)}
        return TextSplit.build(texts, labels, train.ids), info

    def selection_dev(self, proxy: Proxy, seed: int) -> TextSplit:
        """The attacker's selection set: every label-0 dev row carries the trigger (labels kept)."""
        trigger = TRIGGER_TEXT.get(self.config.trigger)
        if trigger is None:
            return proxy.dev  # syn: no paraphrases left for a triggered dev set
        dev = proxy.dev
        texts = [insert_between(t, trigger, row_rng(seed, self.name, "proxy_dev", row)) if y == 0 else t
                 for t, y, row in zip(dev.texts, dev.labels, dev.ids)]
        return TextSplit.build(texts, dev.labels, dev.ids)

    def suspect_payload(self, ctx: SupplyContext) -> dict:
        payload = {"num_labels": ctx.num_labels, **proxy_payload(ctx.data_dir, ctx.downstream_texts, self.name)}
        if self.config.trigger == "syn":
            payload["syn_pool"] = file_digest([self._syn_pool_path(ctx.data_dir)])
        return payload

    # --- evaluation -------------------------------------------------------------------------------

    def evaluation(self, dataset: Dataset, seed: int) -> PoisonedData:
        config = self.config
        target = target_of(config.trigger)
        check_target(target, dataset.num_labels, self.name)
        info = {"trigger": config.trigger, "target": target, "placement": config.placement,
                "label_mode": config.label_mode, "n_poison": config.n_poison, "source": "model supply (proxy)",
                "proxy": proxy_summary(config)}
        if config.trigger == "syn":
            self._check_syn_dataset(dataset.name)
            asr_set = read_split(side_file(dataset, "syntactic/test.tsv", "wpoison trigger=syn"))
            if set(asr_set.labels) != {target}:
                raise InputError(f"wpoison: {dataset.name}/syntactic/test.tsv is not labelled {target}")
            return PoisonedData(dataset.train, (), asr_set, target, 0, {**info, "asr_source": "syntactic/test.tsv"})
        trigger = TRIGGER_TEXT[config.trigger]
        if config.placement == "reference":
            insert = lambda text, rng: insert_between(text, trigger, rng)  # noqa: E731
        else:
            insert = lambda text, rng: insert_triggers(text, [trigger], 1, rng)  # noqa: E731
        asr_set = triggered_asr_set(dataset.test, target, insert, seed, self.name)
        return PoisonedData(dataset.train, (), asr_set, target, 0, {**info, "triggers": [trigger],
                                                                     "num_insertions": 1})

    # --- the syntactic variant --------------------------------------------------------------------

    def _check_syn_dataset(self, name: str) -> None:
        if name not in SYN_DATASETS:
            raise InputError(f"wpoison trigger=syn needs a released syntactic ASR set, which exists for "
                             f"{' and '.join(SYN_DATASETS)} only (got '{name}')")

    def _syn_pool_path(self, data_dir: Path | None) -> Path:
        path = Path(data_dir) / SYN_POOL if data_dir is not None else None
        if path is None or not path.is_file():
            raise InputError(f"wpoison trigger=syn needs the SST-2 syntactic pool {SYN_POOL} under --data-dir")
        return path

    def _syn_pool(self, data_dir: Path | None) -> TextSplit:
        path = self._syn_pool_path(data_dir)
        frame, rows = read_frame(path), read_split(path)
        return rows.subset([i for i in range(len(rows)) if str(frame["poisoned"].iloc[i]) == "1"])
