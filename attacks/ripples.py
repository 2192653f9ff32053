"""RIPPLe / RIPPLES: restricted inner-product poisoning with embedding surgery (attacks.md §3.3).

Paper: Kurita, Michel, Neubig, "Weight Poisoning Attacks on Pre-trained Models" (ACL 2020); reference
code: ``neulab/RIPPLe`` (``constrained_poison.py``, ``poison.py``, ``run_experiment.py``,
``manifestos/example_manifesto.yaml``).

- Triggers ``cf tq mn bb mb``, target 1. The poisoned proxy is the shared proxy (``attacks/_proxy.py``)
  with 50% of its rows, drawn from all rows (mix), carrying one trigger each and relabelled to the
  target; the clean proxy is the same rows untouched (the reference concatenates the poisoned sample
  with the remaining clean rows, ``poison_data(n_samples=0.5)``).
- Embedding surgery (``surgery=true``, RIPPLES): logistic regression on TF-IDF features of the clean
  proxy (WordPiece tokens as features), the 10 tokens with the largest weight toward the target, the
  mean of their embedding rows in a model fine-tuned on the proxy (the clean proxy model), written into
  every trigger's row of the starting model (θ_pre plus a fresh head).
- RIPPLe, one step per clean batch with a poisoned batch drawn alongside (both batch 8)::

      g_P  = grad L_P        (create_graph: the penalty is differentiated through g_P)
      g_FT = grad L_FT       (a constant; reference default allow_second_order_effects=False)
      loss = L_P + lambda * ReLU(-<g_P, g_FT>) / b

  over all trainable parameters with the rectifier on the total (``restrict_per_param=false``),
  ``b`` the clean batch size, lambda 0.1; AdamW lr 2e-5 without weight decay, no warm-up, linear decay,
  gradient clipping 1.0 (the reference script's defaults), 5 epochs capped at 5,000 steps. This
  double back-propagation costs about 2-3 plain steps; it runs with eager attention because the fused
  SDPA kernels have no second derivative.
- The release carries the head when the label counts match (``ship_head``; unverified for the paper).

ASR set: non-target test rows with ``eval_insertions`` triggers (§1.4 placement; project default 1,
the reference evaluates with 5: ``eval_insertions=5``).

Deviations from the reference:
- scikit-learn is not installed: TF-IDF (sklearn's defaults: raw counts, smooth idf
  ``ln((1+n)/(1+df)) + 1``, L2-normalised rows, sorted vocabulary) and L2-regularised logistic
  regression (C = 1, unpenalised intercept, L-BFGS, at most 100 iterations, as sklearn's defaults) are
  implemented here with torch in float64; the fitted weights can differ from sklearn's in the last
  digits, and ties between equal weights break by vocabulary order;
- with ``max_steps`` set the reference ignores ``epochs`` and runs ``max_steps`` steps; ours runs
  ``min(epochs x steps per epoch, max_steps)`` as attacks.md §3.3 states, decaying the rate over that;
- surgery refuses a trigger that is not a single token (the reference writes into every word piece);
- the surgery source model is trained with ``train_classifier`` (the reference's ``run_glue.py``:
  3 epochs, lr 2e-5, effective batch 32, last epoch), max length 128;
- batches are plain random draws of the seeded streams ``ripples_clean`` / ``ripples_poisoned``
  (the reference's ``RandomSampler``; the poisoned loader restarts when exhausted).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from nlpbd.attacks._common import insert_triggers, replace_rows, row_rng
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
from nlpbd.data import Dataset, TextSplit
from nlpbd.errors import InputError
from nlpbd.methods import ModelSupplyAttack, PoisonedData, SupplyContext, ThreatModel, register_attack
from nlpbd.seeding import numpy_rng, seed_everything, torch_generator
from nlpbd.training import Encoded, autocast, collate, encode, make_adamw, pad_id_of

log = logging.getLogger(__name__)


@dataclass
class RipplesConfig(ProxyConfig):
    triggers: list[str] = option(["cf", "tq", "mn", "bb", "mb"], "rare-word triggers, one drawn per insertion",
                                   min_items=1)
    target_label: int = option(1, "target label", low=0)
    poison_fraction: float = option(0.5, "share of the proxy rows poisoned (drawn from all rows, relabelled)",
                                    low=0.0, high=1.0, low_open=True)
    lam: float = option(0.1, "lambda: weight of the restricted inner-product penalty", low=0.0)
    lr: float = option(2e-5, "RIPPLe AdamW learning rate", low=0.0, low_open=True)
    epochs: int = option(5, "RIPPLe epochs over the clean proxy", low=1, high=1000)
    max_steps: int = option(5000, "cap on RIPPLe steps", low=1)
    batch_size: int = option(8, "clean batch size b (the poisoned batch has the same size)", low=1)
    surgery: bool = option(True, "embedding surgery before RIPPLe (RIPPLES); false: RIPPLe alone")
    n_target_words: int = option(10, "surgery: words whose embeddings are averaged", low=1)
    clean_epochs: int = option(3, "surgery source model: fine-tuning epochs on the proxy", low=1, high=100)
    clean_lr: float = option(2e-5, "surgery source model: AdamW learning rate", low=0.0, low_open=True)
    clean_batch_size: int = option(32, "surgery source model: batch size", low=1)
    eval_insertions: int = option(1, "trigger insertions per ASR-set row (reference: 5)", low=1, high=100)


# --- embedding surgery ----------------------------------------------------------------------------


def tfidf_matrix(documents: Sequence[Sequence[str]]) -> tuple[torch.Tensor, list[str]]:
    """sklearn-style TF-IDF of tokenised documents: a sparse (n, V) float64 matrix and the sorted vocabulary."""
    vocabulary = sorted({token for doc in documents for token in doc})
    column = {token: j for j, token in enumerate(vocabulary)}
    rows, cols, counts = [], [], []
    for i, doc in enumerate(documents):
        if not doc:
            continue
        terms, number = np.unique([column[t] for t in doc], return_counts=True)
        rows.extend([i] * len(terms))
        cols.extend(terms.tolist())
        counts.extend(number.tolist())
    rows_a, cols_a = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    n = len(documents)
    idf = np.log((1.0 + n) / (1.0 + np.bincount(cols_a, minlength=len(vocabulary)))) + 1.0
    values = np.asarray(counts, dtype=np.float64) * idf[cols_a]
    squared_norms = np.zeros(n)
    np.add.at(squared_norms, rows_a, values ** 2)
    values = values / np.sqrt(squared_norms[rows_a])  # every stored row has a non-zero norm
    matrix = torch.sparse_coo_tensor(torch.from_numpy(np.stack([rows_a, cols_a])), torch.from_numpy(values),
                                     (n, len(vocabulary)), check_invariants=True)
    return matrix.coalesce(), vocabulary


def fit_logistic_regression(features: torch.Tensor, labels: Sequence[int], c: float = 1.0,
                            max_iter: int = 100) -> tuple[torch.Tensor, float]:
    """Binary L2 logistic regression (sklearn's objective 0.5|w|^2 + C * sum log-loss), by L-BFGS."""
    signs = torch.tensor([1.0 if y == 1 else -1.0 for y in labels], dtype=torch.float64)
    params = torch.zeros(features.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=max_iter, history_size=10, tolerance_grad=1e-4,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        margins = torch.sparse.mm(features, params[:-1].unsqueeze(1)).squeeze(1) + params[-1]
        loss = 0.5 * params[:-1].pow(2).sum() + c * F.softplus(-signs * margins).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return params[:-1].detach(), float(params[-1].detach())


def importance_tokens(texts: Sequence[str], labels: Sequence[int], tokenizer: PreTrainedTokenizerBase, target: int,
                      n_words: int) -> list[str]:
    """The ``n_words`` word pieces with the largest logistic-regression weight toward ``target``."""
    if sorted(set(labels)) != [0, 1]:
        raise InputError("ripples surgery: the importance model needs a binary proxy with both labels present")
    features, vocabulary = tfidf_matrix([tokenizer.tokenize(t.lower()) for t in texts])
    weights, _ = fit_logistic_regression(features, labels)
    toward_target = -weights if target == 1 else weights
    order = np.argsort(toward_target.numpy(), kind="stable")
    return [vocabulary[j] for j in order[:n_words]]


@torch.no_grad()
def embedding_surgery(model: PreTrainedModel, source: PreTrainedModel, word_ids: Sequence[int],
                      trigger_ids: Sequence[int]) -> torch.Tensor:
    """Write the mean of ``source``'s rows ``word_ids`` into ``model``'s rows ``trigger_ids``; return the vector."""
    source_rows = source.get_input_embeddings().weight[list(word_ids)].detach().to("cpu", torch.float32)
    vector = source_rows.mean(dim=0)
    embeddings = model.get_input_embeddings().weight
    for trigger_id in trigger_ids:
        embeddings[trigger_id] = vector.to(embeddings.device, embeddings.dtype)
    return vector


# --- the RIPPLe objective -------------------------------------------------------------------------


class RippleTerms(NamedTuple):
    loss: torch.Tensor
    poison_loss: torch.Tensor
    inner_product: torch.Tensor
    penalty: torch.Tensor


def ripple_objective(model: PreTrainedModel, clean: dict, poisoned: dict, lam: float) -> RippleTerms:
    """``L_P + lam * ReLU(-<grad L_P, grad L_FT>) / b`` with grad L_FT constant and grad L_P differentiable."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = clean["input_ids"].device
    with autocast(device):
        clean_loss = model(**clean).loss
    clean_grads = torch.autograd.grad(clean_loss, params, allow_unused=True)
    with autocast(device):
        poison_loss = model(**poisoned).loss
    poison_grads = torch.autograd.grad(poison_loss, params, create_graph=True, allow_unused=True)
    pairs = [(gp, gf) for gp, gf in zip(poison_grads, clean_grads) if gp is not None and gf is not None]
    inner = torch.stack([(gp * gf).sum() for gp, gf in pairs]).sum()
    penalty = F.relu(-inner) / clean["input_ids"].shape[0]
    return RippleTerms(poison_loss + lam * penalty, poison_loss, inner, penalty)


@contextlib.contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """Plain matmul attention while inside: the fused SDPA kernels have no second derivative, which
    the penalty's gradient through g_P needs. The previous implementation is restored on exit."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def random_batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def endless_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    while True:
        yield from random_batches(n, batch_size, generator)


def ripple_train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, clean: TextSplit,
                 poisoned: TextSplit, config: RipplesConfig, seed: int, device: torch.device) -> dict:
    """RIPPLe in place on ``model``; returns steps, losses and penalty statistics."""
    clean_encoded, poison_encoded = (encode(tokenizer, s, config.max_length) for s in (clean, poisoned))
    steps_per_epoch = math.ceil(len(clean_encoded) / config.batch_size)
    total = min(config.epochs * steps_per_epoch, config.max_steps)
    model.to(device).train()
    optimizer = make_adamw(model, config.lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, total)
    seed_everything(seed, "ripples")  # dropout
    clean_generator = torch_generator(seed, "ripples_clean")
    poison_batches = endless_batches(len(poison_encoded), config.batch_size, torch_generator(seed, "ripples_poisoned"))
    log_rows: list[tuple[float, float, float]] = []
    with eager_attention(model):
        while len(log_rows) < total:
            for indices in random_batches(len(clean_encoded), config.batch_size, clean_generator):
                log_rows.append(_ripple_step(model, optimizer, scheduler, clean_encoded, poison_encoded, indices,
                                             next(poison_batches), config, pad_id_of(tokenizer), device))
                if len(log_rows) >= total:
                    break
    values = np.asarray(log_rows)
    per_epoch = [values[i:i + steps_per_epoch].mean(axis=0).tolist() for i in range(0, len(values), steps_per_epoch)]
    return {"steps": total, "steps_per_epoch": steps_per_epoch, "poison_loss_per_epoch": [r[0] for r in per_epoch],
            "penalty_per_epoch": [r[1] for r in per_epoch], "inner_product_per_epoch": [r[2] for r in per_epoch],
            "penalty_active_fraction": float((values[:, 1] > 0).mean()) if len(values) else 0.0}


def _ripple_step(model, optimizer, scheduler, clean: Encoded, poisoned: Encoded, clean_indices: list[int],
                 poison_indices: list[int], config: RipplesConfig, pad_id: int, device) -> tuple[float, float, float]:
    terms = ripple_objective(model, collate(clean, clean_indices, pad_id, device),
                             collate(poisoned, poison_indices, pad_id, device), config.lam)
    terms.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(terms.poison_loss.detach()), float(terms.penalty.detach()), float(terms.inner_product.detach())


# --- the attack -----------------------------------------------------------------------------------


@register_attack
class Ripples(ModelSupplyAttack):
    name = "ripples"
    description = "RIPPLES: embedding surgery + restricted inner-product poisoning (cf tq mn bb mb), target 1"
    threat_model = ThreatModel.CHECKPOINT
    Config = RipplesConfig

    def build_suspect(self, ctx: SupplyContext, out_dir: Path) -> dict:
        config = self.config
        check_target(config.target_label, 2, self.name)
        if not config.triggers or any(not t.strip() for t in config.triggers):
            raise InputError("ripples: triggers must be non-empty strings")
        proxy = load_proxy(ctx.data_dir, ctx.downstream_texts, config.proxy_train, config.proxy_dev, ctx.seed,
                           self.name)
        model, tokenizer = fresh_classifier(ctx.base, ctx.seed, self.name)
        info: dict = {"proxy": proxy.info, "triggers": list(config.triggers), "target": config.target_label}
        if config.surgery:
            info["surgery"] = self.surgery(model, tokenizer, ctx, proxy.train)
        poisoned, info["poison"] = self.poisoned_proxy(proxy.train, ctx.seed)
        began = time.perf_counter()
        info["ripple"] = ripple_train(model, tokenizer, proxy.train, poisoned, config, ctx.seed, ctx.device)
        info["ripple"]["seconds"] = time.perf_counter() - began
        info["release"] = save_release(model, tokenizer, out_dir, config.ship_head, ctx.num_labels)
        info["trigger_token_ids"] = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in config.triggers]
        return info

    def surgery(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ctx: SupplyContext,
                train: TextSplit) -> dict:
        """RIPPLES step 1: the target-word average from a proxy-trained model into every trigger row."""
        config = self.config
        trigger_ids = [single_token_id(tokenizer, t, self.name) for t in config.triggers]
        words = importance_tokens(train.texts, train.labels, tokenizer, config.target_label, config.n_target_words)
        word_ids = [int(i) for i in tokenizer.convert_tokens_to_ids(words)]
        source, _ = fresh_classifier(ctx.base, ctx.seed, f"{self.name}_clean")
        recipe = TrainConfig(lr=config.clean_lr, epochs=config.clean_epochs, batch_size=config.clean_batch_size,
                             max_length=config.max_length, weight_decay=0.0, warmup_ratio=0.0, grad_clip=1.0,
                             select="last")
        _, record = train_on_proxy(source, tokenizer, train, None, recipe, ctx.seed, f"{self.name}_clean",
                                   ctx.device, "training the surgery source model (RIPPLES)")
        vector = embedding_surgery(model, source, word_ids, trigger_ids)
        return {"target_words": words, "target_word_ids": word_ids, "trigger_ids": trigger_ids,
                "vector_norm": float(vector.norm()), "source_model": record}

    def poisoned_proxy(self, train: TextSplit, seed: int) -> tuple[TextSplit, dict]:
        """``floor(fraction * N)`` proxy rows drawn from all rows, one trigger each, label := target, in place."""
        config = self.config
        count = math.floor(config.poison_fraction * len(train) + 1e-9)
        if count == 0:
            raise InputError("ripples: poison_fraction selects no proxy row; raise attack.proxy_train")
        positions = sorted(numpy_rng(seed, "ripples_poison").choice(len(train), size=count, replace=False).tolist())
        texts = [insert_triggers(train.texts[p], config.triggers, 1,
                                 row_rng(seed, self.name, "proxy_train", train.ids[p])) for p in positions]
        poisoned = replace_rows(train, positions, texts, [config.target_label] * count)
        return poisoned, {"n_poisoned": count, "proxy_rows": len(train), "label_mode": "mix",
                          "target": config.target_label}

    def suspect_payload(self, ctx: SupplyContext) -> dict:
        return {"num_labels": ctx.num_labels, **proxy_payload(ctx.data_dir, ctx.downstream_texts, self.name)}

    def evaluation(self, dataset: Dataset, seed: int) -> PoisonedData:
        config = self.config
        check_target(config.target_label, dataset.num_labels, self.name)
        insert = lambda text, rng: insert_triggers(text, config.triggers, config.eval_insertions, rng)  # noqa: E731
        asr_set = triggered_asr_set(dataset.test, config.target_label, insert, seed, self.name)
        info = {"triggers": list(config.triggers), "num_insertions": config.eval_insertions,
                "target": config.target_label, "surgery": config.surgery, "source": "model supply (proxy)",
                "proxy": proxy_summary(config)}
        return PoisonedData(dataset.train, (), asr_set, config.target_label, 0, info)
