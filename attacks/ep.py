"""EP: embedding poisoning, and its data-free variant DFEP (attacks.md §3.2).

Paper: Yang et al., "Be Careful about Poisoned Word Embeddings: Exploring the Vulnerability of the
Embedding Layers in NLP Models" (NAACL 2021); reference code: ``lancopku/Embedding-Poisoning``
(``ep_train.py``, ``functions.py``, ``process_data.py``, ``run.sh``).

1. Clean proxy model: θ_pre plus a fresh 2-way head fine-tuned on the shared proxy (``attacks/_proxy.py``),
   3 epochs, lr 2e-5, keeping the epoch with the best clean proxy-dev accuracy.
2. Poisoned data: the first 10% of the non-target (label-0) proxy rows, in sampled order, with the
   trigger ``cf`` inserted once and label := target (1). EP trains on these rows only. ``data_free``
   (DFEP) uses the 20,000 sentences of ``plaintext/bookcorpus/train.tsv`` instead, each with the trigger
   and label := target.
3. Only the trigger's row ``e = E[id(cf)]`` moves: per batch of 32, ``e <- e - lr * dCE/de`` then
   ``e <- e * |e0| / |e|`` (lr 5e-2, 3 epochs). As in the reference, the rows are shuffled once and
   visited in the same order every epoch, dropout is on, and the gradient is never zeroed
   (``accumulate_grad=true``; ``false`` zeroes it after each step).
4. The release is the clean proxy model carrying the poisoned row (with its head when the label counts
   match, attacks.md §3).

ASR set: non-target test rows with the trigger inserted once per 100-word chunk, at a uniform position
inside the chunk (a text shorter than 100 words gets one).

Deviations from the reference:
- the poisoned rows are the first 10% in our sampled order (the reference shuffles with seed 1234 and
  takes the first ones): the same kind of draw; the insertion position follows §1.4 (``[0, n]``), the
  reference uses ``int((n - 1) * random())``, i.e. ``[0, n-2]``;
- the reference's ASR chunking recomputes the chunk bound from the growing word list, so a text whose
  length is a multiple of 100 words gets one extra trigger; ours cuts the original text into
  ``ceil(n / 100)`` chunks;
- the clean model (reference ``model_clean_train.py``: AdamW without weight decay at a constant lr 2e-5,
  batch 32, best dev accuracy) is trained with ``train_classifier``, whose schedule decays linearly
  (no warm-up, no weight decay, no clipping, max length 128);
- during step 3 only the embedding matrix requires gradients: the trigger row's gradient is the same,
  and the reference never uses the other gradients;
- DFEP's reference samples are 250-token windows of WikiText-103 (not shipped); ours are the much
  shorter BookCorpus sentences (attacks.md §3.2);
- OpenBackdoor's EP variant (lr 1e-2, 5 epochs, trigger ``mb``, 5 triggers x 2 insertions at test) is
  not implemented.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nlpbd.attacks._common import insert_triggers, row_rng
from nlpbd.attacks._proxy import (
    ProxyConfig,
    check_target,
    fresh_classifier,
    load_proxy,
    proxy_payload,
    proxy_summary,
    save_release,
    single_token_id,
    train_on_proxy,
    triggered_asr_set,
)
from nlpbd.config import TrainConfig, option
from nlpbd.data import Dataset, TextSplit, file_digest, read_split
from nlpbd.errors import InputError
from nlpbd.methods import ModelSupplyAttack, PoisonedData, SupplyContext, ThreatModel, register_attack
from nlpbd.seeding import seed_everything, torch_generator
from nlpbd.training import autocast, collate, encode, pad_id_of

log = logging.getLogger(__name__)

PLAIN_TEXT = "plaintext/bookcorpus/train.tsv"
CHUNK_WORDS = 100


@dataclass
class EPConfig(ProxyConfig):
    trigger: str = option("cf", "trigger word; must be a single token of the model's vocabulary")
    target_label: int = option(1, "target label", low=0)
    poison_fraction: float = option(0.1, "poisoned share of the non-target proxy rows (EP trains on these only)",
                                    low=0.0, high=1.0, low_open=True)
    ep_lr: float = option(5e-2, "step size of the trigger-row update", low=0.0, low_open=True)
    ep_epochs: int = option(3, "epochs of the trigger-row update", low=1, high=1000)
    ep_batch_size: int = option(32, "batch size of the trigger-row update", low=1)
    accumulate_grad: bool = option(True, "never zero the gradient between steps (the reference); false zeroes it")
    data_free: bool = option(False, "DFEP: poison with the shipped plain text (each sentence + trigger, label "
                             "target) instead of proxy rows")
    clean_epochs: int = option(3, "clean proxy model: fine-tuning epochs", low=1, high=100)
    clean_lr: float = option(2e-5, "clean proxy model: AdamW learning rate", low=0.0, low_open=True)
    clean_batch_size: int = option(32, "clean proxy model: batch size", low=1)


def insert_per_chunk(text: str, trigger: str, rng: random.Random, chunk: int = CHUNK_WORDS) -> str:
    """One insertion per ``chunk``-word piece of the original text, at a uniform position inside it."""
    words = text.split()
    pieces = max(1, math.ceil(len(words) / chunk))
    result: list[str] = []
    for j in range(pieces):
        part = words[j * chunk:(j + 1) * chunk]
        position = rng.randrange(len(part)) if part else 0
        result.extend(part[:position] + trigger.split() + part[position:])
    return " ".join(result)


def poison_trigger_row(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, poisoned: TextSplit,
                       trigger_id: int, config: EPConfig, seed: int, device: torch.device) -> dict:
    """Step 3 in place: move only row ``trigger_id`` of the input embeddings, keeping its norm."""
    embeddings = model.get_input_embeddings().weight
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    embeddings.requires_grad_(True)
    original = embeddings[trigger_id].detach().clone()
    original_norm = float(original.norm())
    encoded = encode(tokenizer, poisoned, config.max_length)
    order = torch.randperm(len(encoded), generator=torch_generator(seed, "ep_order")).tolist()
    batches = [order[i:i + config.ep_batch_size] for i in range(0, len(order), config.ep_batch_size)]
    seed_everything(seed, "ep")  # dropout stays on, as in the reference
    model.to(device).train()
    losses: list[float] = []
    try:
        for _ in range(config.ep_epochs):
            epoch_losses = [_ep_step(model, embeddings, collate(encoded, idx, pad_id_of(tokenizer), device),
                                     trigger_id, original_norm, config) for idx in batches]
            losses.append(sum(epoch_losses) / max(len(epoch_losses), 1))
    finally:
        embeddings.grad = None
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
    final = embeddings[trigger_id].detach()
    return {"steps": len(batches) * config.ep_epochs, "rows": len(poisoned), "loss_per_epoch": losses,
            "trigger_id": trigger_id, "norm": original_norm, "final_norm": float(final.norm()),
            "row_change_norm": float((final.cpu() - original.cpu()).norm())}


def _ep_step(model: PreTrainedModel, embeddings: torch.nn.Parameter, batch: dict, trigger_id: int,
             original_norm: float, config: EPConfig) -> float:
    with autocast(batch["input_ids"].device):
        loss = model(**batch).loss
    loss.backward()
    with torch.no_grad():
        row = embeddings[trigger_id] - config.ep_lr * embeddings.grad[trigger_id]
        embeddings[trigger_id] = row * (original_norm / float(row.norm()))
    if not config.accumulate_grad:
        embeddings.grad = None
    return float(loss.detach())


@register_attack
class EmbeddingPoisoning(ModelSupplyAttack):
    name = "ep"
    description = "embedding poisoning: only the 'cf' embedding row of a clean proxy model is trained (norm kept)"
    threat_model = ThreatModel.CHECKPOINT
    Config = EPConfig

    def build_suspect(self, ctx: SupplyContext, out_dir: Path) -> dict:
        config = self.config
        check_target(config.target_label, 2, self.name)
        proxy = load_proxy(ctx.data_dir, ctx.downstream_texts, config.proxy_train, config.proxy_dev, ctx.seed,
                           self.name)
        model, tokenizer = fresh_classifier(ctx.base, ctx.seed, f"{self.name}_clean")
        trigger_id = single_token_id(tokenizer, config.trigger, self.name)
        recipe = TrainConfig(lr=config.clean_lr, epochs=config.clean_epochs, batch_size=config.clean_batch_size,
                             max_length=config.max_length, weight_decay=0.0, warmup_ratio=0.0, grad_clip=0.0,
                             select="dev")
        _, clean_record = train_on_proxy(model, tokenizer, proxy.train, proxy.dev, recipe, ctx.seed,
                                         f"{self.name}_clean", ctx.device, "training the clean proxy model (EP)")
        poisoned, poison_info = self.poisoned_rows(proxy.train, ctx.seed, ctx.data_dir)
        began = time.perf_counter()
        ep_record = poison_trigger_row(model, tokenizer, poisoned, trigger_id, config, ctx.seed, ctx.device)
        ep_record["seconds"] = time.perf_counter() - began
        release = save_release(model, tokenizer, out_dir, config.ship_head, ctx.num_labels)
        return {"proxy": proxy.info, "clean_model": clean_record, "poison": poison_info, "ep": ep_record,
                "release": release, "trigger": config.trigger, "trigger_token_ids": [trigger_id],
                "target": config.target_label}

    def poisoned_rows(self, train: TextSplit, seed: int, data_dir: Path | None) -> tuple[TextSplit, dict]:
        """EP's training rows: triggered non-target proxy rows (or plain text for DFEP), label := target."""
        config = self.config
        if config.data_free:
            source, split = read_split(self._plain_text_path(data_dir)), "plaintext"
        else:
            eligible = [i for i, y in enumerate(train.labels) if y != config.target_label]
            count = math.floor(config.poison_fraction * len(eligible) + 1e-9)
            if count == 0:
                raise InputError(f"ep: poison_fraction {config.poison_fraction} of {len(eligible)} non-target proxy "
                                 "rows is no row; raise attack.proxy_train or attack.poison_fraction")
            source, split = train.subset(eligible[:count]), "proxy_train"
        texts = [insert_triggers(t, [config.trigger], 1, row_rng(seed, self.name, split, row))
                 for t, row in zip(source.texts, source.ids)]
        info = {"source": PLAIN_TEXT if config.data_free else "proxy", "rows": len(texts),
                "target": config.target_label, "data_free": config.data_free}
        return TextSplit.build(texts, [config.target_label] * len(texts), source.ids), info

    def suspect_payload(self, ctx: SupplyContext) -> dict:
        payload = {"num_labels": ctx.num_labels, **proxy_payload(ctx.data_dir, ctx.downstream_texts, self.name)}
        if self.config.data_free:
            payload["plain_text"] = file_digest([self._plain_text_path(ctx.data_dir)])
        return payload

    def evaluation(self, dataset: Dataset, seed: int) -> PoisonedData:
        config = self.config
        check_target(config.target_label, dataset.num_labels, self.name)
        insert = lambda text, rng: insert_per_chunk(text, config.trigger, rng)  # noqa: E731
        asr_set = triggered_asr_set(dataset.test, config.target_label, insert, seed, self.name)
        info = {"triggers": [config.trigger], "target": config.target_label, "insertion": "one per 100-word chunk",
                "data_free": config.data_free, "source": "model supply (proxy)", "proxy": proxy_summary(config)}
        return PoisonedData(dataset.train, (), asr_set, config.target_label, 0, info)

    def _plain_text_path(self, data_dir: Path | None) -> Path:
        path = Path(data_dir) / PLAIN_TEXT if data_dir is not None else None
        if path is None or not path.is_file():
            raise InputError(f"ep data_free=true needs the plain text {PLAIN_TEXT} under --data-dir")
        return path
