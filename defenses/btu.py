"""BTU: Backdoor Token Unlearning (defenses.md §2).

Paper: Jiang, Lyu, Li, Ma, "Backdoor Token Unlearning", AAAI 2025 (arXiv:2501.03272).
Reference code: XDJPH/Backdoor-Token-Unlearning (``BTU.py``, ``function.py``, ``config.json``).

The defender is the party that fine-tunes; it replaces plain fine-tuning by expose → train → unlearn:

1. **Exposure.** Three short runs from θ_pre that train (almost) only word embeddings; each ranks every
   vocabulary id by ``s_k = ‖E_after[k] − E_pre[k]‖₂`` (special ids excluded) and keeps the top ``k``:
   R1, a shallow proxy (the model's own embeddings module → unmasked mean over all padded positions →
   a new ``Linear(H, K)``), everything trainable; R2, a fresh R1 on inputs with every id of T1 removed;
   R3, the full classifier with only ``E`` trainable (activations recomputed in the backward pass: the
   same gradient in a fraction of the memory). ``S = T1 ∪ T2 ∪ T3``.
2. **Training.** The standard victim recipe; the cell's cached no-defense victim is reused.
3. **Unlearning.** ``c = ‖E_ft − E_pre‖_F / V``; for every row ``k`` in ``S`` each dimension with
   ``|E_ft[k,j] − E_pre[k,j]| ≥ c`` is set to the pretrained pad row ``E_pre[pad_id, j]``.
4. **Clean tune** (variant ``post_unlearn_tune=clean_subset`` only): 1 epoch on D_c.

Deviations from the reference code (defenses.md §2.3/§2.4), all deliberate:

- R2 removes the ids of T1 from ``input_ids`` (drops the positions, re-pads); the reference deletes
  ``tokenizer.decode([t])`` as a substring of the raw text, which breaks for pieces like ``a``/``##s``.
- Every special id of the tokenizer (``all_special_ids``, PAD included) is excluded from the ranking,
  plus ``extra_excluded_tokens``; the reference excludes only ``[CLS]``/``[SEP]`` (and ``@``/``user`` on
  OLID) and lets PAD waste a slot.
- ``c`` is computed once, before any edit; the reference recomputes it after every row edit.
- The replacement row is the pretrained row of ``tokenizer.pad_token_id``, not hard-coded row 0.
- Mask quirks: an entry with ``a_kj == 0`` keeps ``E_ft`` (the reference zeroes it) and ``a_kj == c``
  is replaced (the reference adds both the kept and the replaced value).
- Seeds come from the cell seed through named streams (``btu:r1:order``, ``btu:r1:head``,
  ``btu:r1:global`` for dropout and weight init, likewise r2/r3); the reference uses seed 1234. Each run
  forks the global RNG and restores it afterwards, so exposure shifts no other stream.
- R1/R2 pad to, and R3 truncates at, the victim's ``max_length`` (128 by default); the reference pads
  R1/R2 to 128 and truncates R3 at 512. R3 uses the project's length-grouped shuffled batches (dynamic
  padding) and keeps the last partial batch; the reference shuffles uniformly and drops it.
- The victim is the shared victim recipe (protocol.md §2), not the reference's 1-epoch AdamW run.
- The clean tune is off by default (the paper's no-clean-data claim). The reference tunes 1 epoch on
  ``tune.tsv``, which is the SST-2 *test* split, reusing its optimiser; the variant ``clean_subset``
  tunes 1 epoch on D_c with a fresh optimiser through the FT code path (``finetune_on_budget``):
  AdamW lr 2e-5, weight decay 0.01 (not on bias/LayerNorm), the victim's batch size, no warm-up and no
  clipping like the reference, but the shared loop's linear decay to 0 over that epoch.
- Decoder generators (no such model in the paper): R3 trains ``E`` as the input embedding only; an LM
  head tied to ``E`` gets a frozen copy for the run, or the answer's softmax moves every vocabulary row.
  The instruction template's and the answers' ids are excluded from the ranking like the special ids
  (they are in every R3 input: on SmolLM2 they filled T3), and listed in the record (``template_excluded``).
- Exposure runs in bf16 autocast on CUDA (like the victim recipe); parameters and optimiser stay fp32.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nlpbd.config import option
from nlpbd.data import TextSplit
from nlpbd.defenses.ft import FTConfig, finetune_on_budget
from nlpbd.errors import InputError
from nlpbd.generative import is_instruction_lm, transformers_model
from nlpbd.methods import DefenseContext, DefenseOutcome, TrainingDefense, register_defense
from nlpbd.models import ModelRef, load_classifier
from nlpbd.progress import reporter
from nlpbd.seeding import seed_for, torch_generator
from nlpbd.training import autocast, collate, encode, length_grouped_batches, pad_id_of

log = logging.getLogger(__name__)

RECORDED_RANKS = 100  # ids recorded per exposure run, so a trigger's rank can be read off the record


@dataclass
class BTUConfig:
    top_k: int = option(17, "suspicious ids kept per exposure run (reference: int(0.0005 * 35022))", low=1)
    post_unlearn_tune: Literal["none", "clean_subset"] = option(
        "none", "none: no clean data (paper); clean_subset: 1 epoch on D_c after unlearning (reference code)")
    extra_excluded_tokens: list[str] = option([], "tokens never suspicious besides the special ids "
                                              "(OLID reference: @, user)")
    exposure_lr: float = option(2e-5, "AdamW learning rate of the exposure runs", low=0.0, low_open=True)
    exposure_epochs: int = option(1, "epochs of each exposure run", low=1, high=100)
    shallow_batch_size: int = option(256, "batch size of the shallow-proxy runs R1/R2", low=1)
    embedding_batch_size: int = option(64, "batch size of R3 (64 SST-2-like, 32 OLID, 10 long text)", low=1)
    pool_mask: bool = option(False, "R1/R2 mean over real tokens only (reference: all padded positions)")


# --- ranking --------------------------------------------------------------------------------------


def excluded_ids(tokenizer: PreTrainedTokenizerBase, extra_tokens: Sequence[str] = ()) -> list[int]:
    """Ids that are never suspicious: all special ids of the tokenizer plus ``extra_tokens``."""
    ids = set(tokenizer.all_special_ids)
    for token in extra_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise InputError(f"btu.extra_excluded_tokens: '{token}' is not a token of this tokenizer")
        ids.add(int(token_id))
    return sorted(ids)


def template_ids(model: PreTrainedModel) -> list[int]:
    """A generator's instruction-template and answer ids (written by the defender around every review;
    R3 feeds every answer after every prompt): like the special ids, they are in every input and drift
    by Adam's per-step bound alone."""
    if not is_instruction_lm(model):
        return []
    return sorted({*model.ids.prefix, *model.ids.suffix, *(i for answer in model.ids.answers for i in answer)})


def exposure_scores(E_pre: torch.Tensor, E_after: torch.Tensor, excluded: Sequence[int]) -> torch.Tensor:
    """``s_k = ‖E_after[k] − E_pre[k]‖₂`` per id, ``-inf`` for excluded ids."""
    scores = (E_after.detach().float().cpu() - E_pre.detach().float().cpu()).norm(dim=1)
    if len(excluded):
        scores[torch.as_tensor(list(excluded), dtype=torch.long)] = float("-inf")
    return scores


def top_k_ids(scores: torch.Tensor, k: int) -> list[int]:
    """The ``k`` highest-scoring ids, best first (stable on ties); excluded ids never appear."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[scores[order] != float("-inf")][:k].tolist()


# --- inputs of the shallow proxy ------------------------------------------------------------------


def remove_ids(sequences: Sequence[Sequence[int]], ids: Sequence[int]) -> list[list[int]]:
    """Each sequence with every position holding one of ``ids`` dropped (R2's input)."""
    removed = set(ids)
    return [[t for t in seq if t not in removed] for seq in sequences]


def pad_fixed(sequences: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, mask)`` of shape (n, length): every sequence right-padded to ``length``."""
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        seq = list(seq)[:length]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def shallow_inputs(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int,
                   removed: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """``padding="max_length"`` encodings, with the positions of ``removed`` ids dropped first."""
    sequences = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    if removed:
        sequences = remove_ids(sequences, removed)
    return pad_fixed(sequences, max_length, pad_id_of(tokenizer))


# --- exposure runs --------------------------------------------------------------------------------


@contextlib.contextmanager
def isolated_rng(seed: int, name: str, device: torch.device) -> Iterator[None]:
    """Seed the global RNG (weight init, dropout) from stream ``name``; restore it afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed_for(seed, name))
        yield


class ShallowProxy(nn.Module):
    """R1/R2: embeddings module → mean over positions → new ``Linear(H, K)`` (normal(0, std), bias 0)."""

    def __init__(self, embeddings: nn.Module, hidden: int, num_labels: int, init_std: float,
                 generator: torch.Generator, pool_mask: bool = False):
        super().__init__()
        self.embeddings = embeddings
        self.head = nn.Linear(hidden, num_labels)
        with torch.no_grad():
            self.head.weight.copy_(torch.empty_like(self.head.weight).normal_(0.0, init_std, generator=generator))
            self.head.bias.zero_()
        self.pool_mask = pool_mask
        parameters = inspect.signature(embeddings.forward).parameters
        self._token_types = "token_type_ids" in parameters

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embeddings, nn.Embedding):
            states = self.embeddings(input_ids)
        elif self._token_types:
            states = self.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        else:
            states = self.embeddings(input_ids=input_ids)
        if not self.pool_mask:  # the reference: every position, padding included
            return self.head(states.mean(dim=1))
        weights = mask.unsqueeze(-1).to(states.dtype)
        return self.head((states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0))


def embeddings_module(model: PreTrainedModel) -> nn.Module:
    """The model's embeddings block (word + position + type + LayerNorm + dropout), else the word lookup."""
    module = getattr(model.base_model, "embeddings", None)
    return module if isinstance(module, nn.Module) else model.get_input_embeddings()


def run_shallow_exposure(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: TextSplit,
                         num_labels: int, config: BTUConfig, seed: int, stream: str, device: torch.device,
                         max_length: int, removed: Sequence[int] = ()) -> torch.Tensor:
    """Train a shallow proxy built on ``model``'s embeddings in place; return the trained ``E`` (CPU)."""
    word = model.get_input_embeddings().weight
    init_std = getattr(model.config, "initializer_range", 0.02)
    proxy = ShallowProxy(embeddings_module(model), word.shape[1], num_labels, init_std,
                         torch_generator(seed, f"{stream}:head"), config.pool_mask).to(device)
    ids, mask = shallow_inputs(tokenizer, train.texts, max_length, removed)
    labels = torch.tensor(train.labels, dtype=torch.long)
    optimizer = torch.optim.AdamW(proxy.parameters(), lr=config.exposure_lr)  # torch defaults: wd 0.01
    generator = torch_generator(seed, f"{stream}:order")
    batch = config.shallow_batch_size
    steps = config.exposure_epochs * math.ceil(len(labels) / batch)
    proxy.train()
    with reporter().task(f"BTU exposure {stream.split(':')[-1].upper()}", steps) as advance:
        for _ in range(config.exposure_epochs):
            order = torch.randperm(len(labels), generator=generator)
            for start in range(0, len(order), batch):
                rows = order[start:start + batch]
                with autocast(device):
                    logits = proxy(ids[rows].to(device), mask[rows].to(device))
                loss = F.cross_entropy(logits.float(), labels[rows].to(device))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                advance(1)
    return model.get_input_embeddings().weight.detach().cpu().clone()


def recompute_activations(model: PreTrainedModel) -> None:
    """Make ``model`` recompute each layer's activations in the backward pass instead of keeping them.

    The gradient is the same (the recomputation replays the saved RNG state) for about a third more
    compute. R3 needs it on decoder generators: its two answer passes over a batch of 64 chat prompts
    through SmolLM2's 30 layers took 5 GB per 16 rows (more than 20 GB per batch), 2 GB recomputed.
    """
    inner = transformers_model(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        return
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.23 (the old name is deprecated)
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    inner.config.use_cache = False  # a KV cache is useless here and incompatible with recomputation


def untie_output_embeddings(model: PreTrainedModel) -> None:
    """Give a decoder whose LM head is tied to ``E`` a frozen copy of it as its head.

    R3 ranks the rows that the label pulls on as *inputs*. Through a tied head every vocabulary row is
    also an output weight, moved by the answer's softmax: on SmolLM2's generator the rows of likely
    answer openers ("Here", "Please", "Yes") outranked the triggers.
    """
    inner = transformers_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is not None and head.weight is inner.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)


def run_embedding_exposure(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: TextSplit,
                           config: BTUConfig, seed: int, stream: str, device: torch.device,
                           max_length: int) -> torch.Tensor:
    """R3: train only ``E`` of the full classifier in place (head and encoder frozen); return ``E`` (CPU)."""
    untie_output_embeddings(model)
    word = model.get_input_embeddings().weight
    for parameter in model.parameters():
        parameter.requires_grad_(parameter is word)
    model.to(device)
    recompute_activations(model)
    optimizer = torch.optim.AdamW([word], lr=config.exposure_lr)  # torch defaults: wd 0.01, no schedule
    encoded = encode(tokenizer, train, max_length)
    generator = torch_generator(seed, f"{stream}:order")
    pad_id = pad_id_of(tokenizer)
    steps = config.exposure_epochs * math.ceil(len(encoded) / config.embedding_batch_size)
    model.train()
    with reporter().task("BTU exposure R3", steps) as advance:
        for _ in range(config.exposure_epochs):
            for indices in length_grouped_batches(encoded.lengths, config.embedding_batch_size, generator):
                batch = collate(encoded, indices, pad_id, device)
                with autocast(device):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                F.cross_entropy(logits.float(), batch["labels"]).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                advance(1)
    return word.detach().cpu().clone()


@dataclass
class Exposure:
    """Step 1's result: the suspicious ids of each run, their union ``S`` and what it cost."""

    pretrained_embeddings: torch.Tensor  # E_pre (CPU)
    runs: dict[str, list[int]]  # "r1"/"r2"/"r3" → T_i, best first
    rankings: dict[str, list[int]] = field(default_factory=dict)  # top RECORDED_RANKS per run
    scores: dict[str, list[float]] = field(default_factory=dict)  # s_k of T_i
    seconds: dict[str, float] = field(default_factory=dict)
    template_excluded: list[int] = field(default_factory=list)  # a generator's template ids (not ranked)

    @property
    def suspicious(self) -> list[int]:
        return sorted(set().union(*self.runs.values()))


def _rank(exposure: Exposure, run: str, E_after: torch.Tensor, excluded: Sequence[int], k: int) -> None:
    scores = exposure_scores(exposure.pretrained_embeddings, E_after, excluded)
    ranking = top_k_ids(scores, max(k, RECORDED_RANKS))
    exposure.runs[run] = ranking[:k]
    exposure.rankings[run] = ranking[:RECORDED_RANKS]
    exposure.scores[run] = [float(scores[i]) for i in ranking[:k]]


def expose(pretrained: ModelRef | str, tokenizer: PreTrainedTokenizerBase, train: TextSplit, num_labels: int,
           config: BTUConfig, seed: int, device: torch.device, max_length: int) -> Exposure:
    """Step 1: R1, R2 (without T1) and R3 from θ_pre; ``S = T1 ∪ T2 ∪ T3``."""
    excluded = excluded_ids(tokenizer, config.extra_excluded_tokens)
    exposure: Exposure | None = None
    for run in ("r1", "r2", "r3"):
        stream = f"btu:{run}"
        began = time.perf_counter()
        with isolated_rng(seed, f"{stream}:global", device):
            model = load_classifier(pretrained, num_labels)
            if exposure is None:
                exposure = Exposure(model.get_input_embeddings().weight.detach().cpu().clone(), {},
                                    template_excluded=template_ids(model))
                excluded = sorted({*excluded, *exposure.template_excluded})
            if run == "r3":
                E_after = run_embedding_exposure(model, tokenizer, train, config, seed, stream, device, max_length)
            else:
                removed = exposure.runs["r1"] if run == "r2" else ()
                E_after = run_shallow_exposure(model, tokenizer, train, num_labels, config, seed, stream, device,
                                               max_length, removed)
        del model
        _rank(exposure, run, E_after, excluded, config.top_k)
        exposure.seconds[run] = time.perf_counter() - began
        log.info("BTU %s: %s (%.1fs)", run.upper(), tokenizer.convert_ids_to_tokens(exposure.runs[run]),
                 exposure.seconds[run])
    return exposure


# --- unlearning -----------------------------------------------------------------------------------


@dataclass
class UnlearnStats:
    c: float
    noop: bool
    replaced_fraction: float  # over all |S| · H entries
    per_token: dict[int, float]  # id → replaced fraction of its H dimensions


def unlearn(E_ft: torch.Tensor, E_pre: torch.Tensor, suspicious: Sequence[int],
            pad_id: int) -> tuple[torch.Tensor, UnlearnStats]:
    """Step 3: a copy of ``E_ft`` whose rows in ``suspicious`` have every dimension that moved by at
    least ``c = ‖E_ft − E_pre‖_F / V`` set to the pretrained pad row; ``c`` is computed once."""
    E_pre = E_pre.to(device=E_ft.device, dtype=E_ft.dtype)
    difference = E_ft - E_pre
    c = torch.linalg.norm(difference) / E_ft.shape[0]
    E_new = E_ft.detach().clone()
    rows = sorted(set(int(i) for i in suspicious))
    if float(c) == 0.0 or not rows:  # frozen embeddings (e.g. a LoRA victim): nothing was learned there
        return E_new, UnlearnStats(float(c), float(c) == 0.0, 0.0, {i: 0.0 for i in rows})
    index = torch.tensor(rows, dtype=torch.long, device=E_ft.device)
    replace = difference[index].abs() >= c
    E_new[index] = torch.where(replace, E_pre[pad_id].expand(len(rows), -1), E_ft[index])
    per_token = replace.float().mean(dim=1).tolist()
    return E_new, UnlearnStats(float(c), False, float(replace.float().mean()), dict(zip(rows, per_token)))


def unlearn_model(model: PreTrainedModel, E_pre: torch.Tensor, suspicious: Sequence[int],
                  pad_id: int) -> UnlearnStats:
    """Apply :func:`unlearn` to ``model``'s input embeddings in place; nothing else changes."""
    weight = model.get_input_embeddings().weight
    E_new, stats = unlearn(weight.detach(), E_pre, suspicious, pad_id)
    if not stats.noop:
        with torch.no_grad():
            weight.copy_(E_new)
    return stats


# --- the defense ----------------------------------------------------------------------------------


def _token_list(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> dict:
    return {"ids": list(ids), "tokens": tokenizer.convert_ids_to_tokens(list(ids))}


def row_frequency(tokenizer: PreTrainedTokenizerBase, train: TextSplit, ids: Sequence[int],
                  max_length: int) -> list[float]:
    """The fraction of training rows that contain each id (a diagnostic for what the ranking rewards)."""
    rows = [set(sequence) for sequence in encode(tokenizer, train, max_length).input_ids]
    return [round(sum(i in row for row in rows) / max(len(rows), 1), 4) for i in ids]


def adam_drift_cap(config: BTUConfig, rows: int, batch_size: int, hidden: int) -> float:
    """steps · lr · √H: how far a row drifts when AdamW moves each of its coordinates by about lr per step.

    AdamW normalises each coordinate's update, so a row that gets a gradient of steady sign in every
    step drifts by about this much whatever the gradient's size: scores near the cap rank rows by how
    often a batch touches them, not by how strongly the label pulls on them.
    """
    steps = config.exposure_epochs * math.ceil(rows / batch_size)
    return steps * config.exposure_lr * math.sqrt(hidden)


def exposure_info(tokenizer: PreTrainedTokenizerBase, exposure: Exposure, train: TextSplit, config: BTUConfig,
                  max_length: int) -> dict:
    hidden = exposure.pretrained_embeddings.shape[1]
    batches = {"r1": config.shallow_batch_size, "r2": config.shallow_batch_size, "r3": config.embedding_batch_size}
    info = {f"T{i}": {**_token_list(tokenizer, exposure.runs[run]), "scores": exposure.scores[run],
                      "top_ranked_ids": exposure.rankings[run],
                      "row_frequency": row_frequency(tokenizer, train, exposure.runs[run], max_length),
                      "adam_drift_cap": adam_drift_cap(config, len(train), batches[run], hidden)}
            for i, run in enumerate(("r1", "r2", "r3"), start=1)}
    info["S"] = _token_list(tokenizer, exposure.suspicious)
    info["S_size"] = len(exposure.suspicious)
    if exposure.template_excluded:
        info["template_excluded"] = _token_list(tokenizer, exposure.template_excluded)
    info["exposure_seconds"] = dict(exposure.seconds)
    return info


def unlearn_info(tokenizer: PreTrainedTokenizerBase, stats: UnlearnStats) -> dict:
    tokens = tokenizer.convert_ids_to_tokens(list(stats.per_token))
    return {"c": stats.c, "btu_noop": stats.noop, "replaced_fraction": stats.replaced_fraction,
            "replaced_per_token": [{"id": i, "token": t, "fraction": f}
                                   for (i, f), t in zip(stats.per_token.items(), tokens)]}


@register_defense
class BTU(TrainingDefense):
    name = "btu"
    description = "Backdoor Token Unlearning: expose fast-moving embedding rows, reset them in the victim"
    Config = BTUConfig
    # "budget" is read only by the clean_subset variant.
    grants = frozenset({"pretrained", "train_set", "victim_factory", "budget"})
    unsupported_victims = {}  # embedding rows of any tokenizer; R3 trains E with the victim's own loss

    def train(self, ctx: DefenseContext) -> DefenseOutcome:
        config = self.config
        began = time.perf_counter()
        exposure = expose(ctx.pretrained, ctx.tokenizer, ctx.train_set, ctx.num_labels, config, ctx.seed,
                          ctx.device, ctx.train_config.max_length)
        model = ctx.victim()  # step 2: the cell's standard victim, already trained and cached
        unlearn_began = time.perf_counter()
        stats = unlearn_model(model, exposure.pretrained_embeddings, exposure.suspicious, pad_id_of(ctx.tokenizer))
        info = {"variant": config.post_unlearn_tune, "top_k": config.top_k,
                **exposure_info(ctx.tokenizer, exposure, ctx.train_set, config, ctx.train_config.max_length),
                **unlearn_info(ctx.tokenizer, stats), "unlearn_seconds": time.perf_counter() - unlearn_began}
        log.info("BTU: |S| = %d, c = %.3g, replaced %.1f%% of their dimensions%s", len(exposure.suspicious),
                 stats.c, 100 * stats.replaced_fraction, " (no-op: embeddings unchanged)" if stats.noop else "")
        if config.post_unlearn_tune == "clean_subset":
            result = finetune_on_budget(model, ctx, self.clean_tune_config(ctx), stream="btu:clean_tune")
            info["clean_tune"] = result.as_dict() if result else None
        return DefenseOutcome(model, info, train_seconds=time.perf_counter() - began)

    @staticmethod
    def clean_tune_config(ctx: DefenseContext) -> FTConfig:
        """1 epoch on D_c, fresh AdamW lr 2e-5, the victim's batch size; no warm-up or clipping (reference)."""
        return FTConfig(epochs=1, lr=2e-5, batch_size=ctx.train_config.batch_size, weight_decay=0.01,
                        warmup_ratio=0.0, grad_clip=0.0, select="last")
