"""Masked-LM utilities for the pretrained-model stage: masking, the MLM loss, plain text, the head graft.

Used by RECIPE (defenses.md §7) and by the task-agnostic attacks NeuBA and BadPre (attacks.md §4).

**Masking** (:func:`mask_tokens`) is BERT's rule as coded in ``DataCollatorForLanguageModeling
.torch_mask_tokens``: each non-special, non-pad position is chosen with probability 0.15; a chosen
position becomes ``[MASK]`` with probability 0.8, a uniformly random id of ``len(tokenizer)`` with
probability 0.1, and stays unchanged otherwise; labels are -100 everywhere else. Unlike the collator,
every draw comes from an explicit ``torch.Generator`` (protocol.md §7), and callers may protect extra
positions (BadPre's trigger). :func:`static_mask` draws one mask for a whole corpus from the named
stream of a cell seed, so the same seed gives the same masked corpus.

**MLM loss** (:func:`masked_lm_loss`) runs the encoder and applies the MLM head only at the labelled
positions. The loss equals the model's own ``labels=`` loss (cross-entropy averaged over labelled
positions) but avoids the ``tokens × vocabulary`` logits of unlabelled positions, which dominate the
cost of MLM training on CPU.

**MLM-head graft** (defenses.md §0.2), for checkpoints without an MLM head (all-MiniLM-L6-v2, POR
releases saved as ``BertModel``, sequence-classification checkpoints): load ``BertForMaskedLM`` (or
``BertForPreTraining`` when the pooler must be kept, for NeuBA), find the new head tensors from the
loader's missing keys (``cls.predictions.transform.dense.{weight,bias}``,
``cls.predictions.transform.LayerNorm.{weight,bias}``, ``cls.predictions.bias``), freeze everything
else (the decoder stays tied to the frozen input embeddings E), and train MLM on D_aux: max length 64,
batch 32, AdamW lr 1e-4, weight decay 0, 2 epochs, linear decay, no warm-up. The result is cached
(``mlm-graft`` artifacts in the run's cache, else the default one) keyed by the checkpoint's weight
identity, the D_aux digest, the settings, the seed and the model class. Checkpoints that already have an MLM head
(``bert-base-uncased``) are used as they are.

Deviations of the graft, all documented in its record:

- A held-out part of D_aux (``heldout_lines``, default 256 lines drawn by the seed) is kept out of
  training to measure the MLM loss before and after grafting, so 2 epochs on 20,000 lines are 1,234
  steps rather than 1,250. A loss that does not drop is logged as a warning and recorded
  (``loss_dropped: false``).
- The frozen backbone runs in eval mode (no dropout) and under ``no_grad``; only the head sees
  gradients. Its dropout would only add noise to a frozen feature extractor.
- The mask is drawn per batch from a seeded stream (dynamic masking, as the collator does); the
  spec leaves static vs dynamic open for the graft.
- ``max_steps`` caps the steps for CPU runs; the linear schedule spans the steps actually run.
- The NSP head of ``BertForPreTraining`` (``cls.seq_relationship``) keeps its random initialisation
  and is never trained or used.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForMaskedLM, BertForPreTraining, PreTrainedModel, PreTrainedTokenizerBase

from nlpbd.cache import ArtifactCache
from nlpbd.data import TextSplit, file_digest, read_split
from nlpbd.errors import InputError
from nlpbd.models import ModelRef, cached_weights_digest, save_model
from nlpbd.progress import reporter
from nlpbd.seeding import numpy_rng, seed_everything, torch_generator
from nlpbd.training import optimizer_step, plain_adamw

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
MLM_PROBABILITY = 0.15
MASK_FRACTION = 0.8  # of the chosen positions; half of the rest become random ids, half stay
PLAINTEXT = Path("plaintext") / "bookcorpus" / "train.tsv"
MLM_HEAD_PREFIXES = ("cls.predictions.", "lm_head.")
GRAFT_VERSION = "1"


# --- plain text (D_aux) ---------------------------------------------------------------------------


def plaintext_path(data_dir: Path | None) -> Path:
    """The shipped plain text ``plaintext/bookcorpus/train.tsv`` under the data directory."""
    if data_dir is None:
        raise InputError("this method needs the plain text plaintext/bookcorpus/train.tsv: point --data-dir "
                         "(or $NLPBD_DATA_DIR) at the benchmark data")
    path = Path(data_dir) / PLAINTEXT
    if not path.is_file():
        raise InputError(f"plain text not found: {path}")
    return path


def read_plaintext(data_dir: Path | None) -> TextSplit:
    return read_split(plaintext_path(data_dir))


def plaintext_digest(data_dir: Path | None) -> str:
    return file_digest([plaintext_path(data_dir)])


# --- masking --------------------------------------------------------------------------------------


def special_positions(input_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """True where the id is a special token (from the tokenizer, never constants) or padding."""
    special = set(tokenizer.all_special_ids)
    if tokenizer.pad_token_id is not None:
        special.add(tokenizer.pad_token_id)
    return torch.isin(input_ids, torch.tensor(sorted(special), dtype=input_ids.dtype))


def mask_tokens(input_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase, generator: torch.Generator,
                probability: float = MLM_PROBABILITY,
                protected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (15%; 80% [MASK], 10% random id, 10% kept) with every draw from ``generator``.

    Special and pad positions, and ``protected`` ones, are never chosen. Returns (inputs, labels);
    labels are -100 where nothing is to be predicted. ``input_ids`` must live on the CPU.
    """
    if tokenizer.mask_token_id is None:
        raise InputError("masked-LM training needs a tokenizer with a mask token")
    shape = input_ids.shape
    maskable = ~special_positions(input_ids, tokenizer)
    if protected is not None:
        maskable &= ~protected
    chosen = torch.bernoulli(torch.full(shape, probability), generator=generator).bool() & maskable
    labels = input_ids.clone()
    labels[~chosen] = IGNORE_INDEX
    inputs = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(shape, MASK_FRACTION), generator=generator).bool() & chosen
    inputs[to_mask] = tokenizer.mask_token_id
    to_random = torch.bernoulli(torch.full(shape, 0.5), generator=generator).bool() & chosen & ~to_mask
    random_ids = torch.randint(len(tokenizer), shape, dtype=input_ids.dtype, generator=generator)
    inputs[to_random] = random_ids[to_random]
    return inputs, labels


def static_mask(input_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase, seed: int,
                stream: str = "mask") -> tuple[torch.Tensor, torch.Tensor]:
    """One mask for a whole (padded) corpus, drawn once from the named stream of ``seed``."""
    return mask_tokens(input_ids, tokenizer, torch_generator(seed, stream))


def special_wrapping(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a single sequence ([CLS] / [SEP], <s> / </s>).

    Derived by tokenising a probe word with and without special tokens (transformers 5 tokenizers no
    longer offer ``build_inputs_with_special_tokens``).
    """
    body = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = next(i for i in range(len(full)) if full[i:i + len(body)] == body)
    return full[:start], full[start + len(body):]


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        attention[row, :len(seq)] = 1
    return ids, attention


# --- MLM loss -------------------------------------------------------------------------------------


def mlm_head(model: PreTrainedModel) -> nn.Module:
    """The module mapping hidden states to vocabulary logits (BERT ``cls.predictions``, RoBERTa ``lm_head``)."""
    heads = getattr(model, "cls", None)
    if heads is not None and hasattr(heads, "predictions"):
        return heads.predictions
    if hasattr(model, "lm_head"):
        return model.lm_head
    raise InputError(f"{type(model).__name__} has no masked-LM head this code knows")


def mlm_loss_from_hidden(model: PreTrainedModel, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the MLM head at the labelled positions only (mean over them)."""
    selected = labels != IGNORE_INDEX
    if not bool(selected.any()):
        return hidden.sum() * 0.0  # nothing to predict in this batch; keeps the graph valid
    logits = mlm_head(model)(hidden[selected])
    return F.cross_entropy(logits.float(), labels[selected])


def masked_lm_loss(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return mlm_loss_from_hidden(model, hidden, labels)


@torch.no_grad()
def evaluate_mlm_loss(model: PreTrainedModel, inputs: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor,
                      device: torch.device, batch_size: int = 64) -> float:
    """Mean cross-entropy over every labelled position of a fixed masked set (eval mode)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(inputs), batch_size):
        part = slice(start, start + batch_size)
        n = int((labels[part] != IGNORE_INDEX).sum())
        if n:
            loss = masked_lm_loss(model, inputs[part].to(device), attention[part].to(device), labels[part].to(device))
            total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / count if count else float("nan")


# --- the MLM-head graft ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GraftSettings:
    """defenses.md §0.2 step 3 (our defaults)."""

    max_length: int = 64
    batch_size: int = 32
    lr: float = 1e-4
    epochs: int = 2
    max_steps: int | None = None  # cap for CPU runs; None = all epochs
    heldout_lines: int = 256


@dataclass(frozen=True)
class MlmCheckpoint:
    """A checkpoint with an MLM head: the original location, or the cached graft of it."""

    location: str
    grafted: bool
    info: dict = field(default_factory=dict)


def checkpoint_identity(checkpoint: ModelRef | str | Path) -> str:
    if isinstance(checkpoint, ModelRef):
        return checkpoint.identity
    path = Path(checkpoint)
    return f"sha256:{cached_weights_digest(path)}" if path.is_dir() else f"hub:{checkpoint}"


def load_masked_lm(location: str, with_pooler: bool = False) -> tuple[PreTrainedModel, list[str]]:
    """The checkpoint as an MLM model, and the names of MLM-head parameters it did not contain.

    ``with_pooler`` loads ``BertForPreTraining`` (keeps the pooler; BERT only).
    """
    if with_pooler:
        model, info = BertForPreTraining.from_pretrained(location, output_loading_info=True)
    else:
        model, info = AutoModelForMaskedLM.from_pretrained(location, output_loading_info=True)
    missing = set(info["missing_keys"])
    # named_parameters() lists each tied tensor once (the decoder weight under the embeddings' name,
    # the decoder bias as cls.predictions.bias), so these are exactly the new, untied head tensors.
    head = [n for n, _ in model.named_parameters() if n in missing and n.startswith(MLM_HEAD_PREFIXES)]
    return model, head


def ensure_mlm_head(checkpoint: ModelRef | str | Path, tokenizer: PreTrainedTokenizerBase, corpus: TextSplit,
                    seed: int, settings: GraftSettings = GraftSettings(), device: torch.device | None = None,
                    with_pooler: bool = False, cache: ArtifactCache | None = None) -> MlmCheckpoint:
    """``checkpoint`` itself when it has an MLM head, else its (cached) graft (defenses.md §0.2)."""
    location = checkpoint.location if isinstance(checkpoint, ModelRef) else str(checkpoint)
    seed_everything(seed, "mlm_graft_init")  # the new head's initialisation
    model, head = load_masked_lm(location, with_pooler)
    if not head:
        return MlmCheckpoint(location, False, {"grafted": False})
    payload = {"checkpoint": checkpoint_identity(checkpoint), "corpus": corpus.digest(), "settings": asdict(settings),
               "seed": seed, "model_class": type(model).__name__, "version": GRAFT_VERSION}

    def build(tmp: Path) -> dict:
        info = train_mlm_head(model, head, tokenizer, corpus, seed, settings, device or torch.device("cpu"))
        save_model(model.cpu(), tokenizer, tmp)
        return {"info": info}

    artifact = (cache or ArtifactCache()).get_or_build("mlm-graft", payload, build)
    info = {**artifact.meta["info"], "cached": artifact.cached, "key": artifact.meta["key"]}
    return MlmCheckpoint(str(artifact.path), True, info)


def heldout_split(texts: Sequence[str], heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """(training lines, held-out lines); the held-out ones drawn by the seed, at most a tenth of the text."""
    count = min(heldout, len(texts) // 10)
    order = numpy_rng(seed, "mlm_graft_heldout").permutation(len(texts))
    held = set(order[:count].tolist())
    return [t for i, t in enumerate(texts) if i not in held], [texts[i] for i in sorted(held)]


def train_mlm_head(model: PreTrainedModel, head: Sequence[str], tokenizer: PreTrainedTokenizerBase,
                   corpus: TextSplit, seed: int, settings: GraftSettings, device: torch.device) -> dict:
    """Train only the ``head`` parameters with MLM on ``corpus`` (in place); record the held-out loss."""
    began = time.perf_counter()
    trainable = [p for n, p in model.named_parameters() if n in set(head)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    model.to(device).eval()  # frozen backbone: no dropout (the head has none)
    train_texts, held_texts = heldout_split(corpus.texts, settings.heldout_lines, seed)
    encoded = tokenizer(train_texts, truncation=True, max_length=settings.max_length)["input_ids"]
    held_ids, held_attention = pad_sequences(tokenizer(held_texts, truncation=True,
                                                       max_length=settings.max_length)["input_ids"],
                                             tokenizer.pad_token_id)
    held_inputs, held_labels = static_mask(held_ids, tokenizer, seed, "mlm_graft_heldout_mask")
    before = evaluate_mlm_loss(model, held_inputs, held_attention, held_labels, device)
    steps_per_epoch = math.ceil(len(encoded) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    total = min(total, settings.max_steps) if settings.max_steps else total
    optimizer, scheduler = plain_adamw(trainable, settings.lr, max(total, 1))
    losses = _graft_loop(model, encoded, tokenizer, seed, settings.batch_size, total, optimizer, scheduler, device)
    after = evaluate_mlm_loss(model, held_inputs, held_attention, held_labels, device)
    if not after < before:
        log.warning("MLM-head graft: held-out MLM loss did not drop (%.4f -> %.4f)", before, after)
    log.info("MLM-head graft: %d steps, held-out MLM loss %.4f -> %.4f", total, before, after)
    return {"grafted": True, "trained": sorted(head), "steps": total,
            "planned_steps": steps_per_epoch * settings.epochs,
            "train_lines": len(train_texts), "heldout_lines": len(held_texts), "heldout_loss_before": before,
            "heldout_loss_after": after, "loss_dropped": bool(after < before),
            "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
            "settings": asdict(settings), "seconds": time.perf_counter() - began}


def _graft_loop(model: PreTrainedModel, encoded: list[list[int]], tokenizer: PreTrainedTokenizerBase, seed: int,
                batch_size: int, total: int, optimizer, scheduler, device: torch.device) -> list[float]:
    order_gen, mask_gen = torch_generator(seed, "mlm_graft_data"), torch_generator(seed, "mlm_graft_mask")
    losses: list[float] = []
    with reporter().task("grafting an MLM head", total) as advance:
        while len(losses) < total:
            order = torch.randperm(len(encoded), generator=order_gen).tolist()
            for start in range(0, len(order), batch_size):
                if len(losses) >= total:
                    break
                ids, attention = pad_sequences([encoded[i] for i in order[start:start + batch_size]],
                                               tokenizer.pad_token_id)
                inputs, labels = mask_tokens(ids, tokenizer, mask_gen)
                with torch.no_grad():
                    hidden = model.base_model(input_ids=inputs.to(device),
                                              attention_mask=attention.to(device)).last_hidden_state
                loss = mlm_loss_from_hidden(model, hidden, labels.to(device))
                optimizer_step(loss, [], 0.0, optimizer, scheduler)  # no clipping
                losses.append(loss.item())
                advance(1)
    return losses


def mean_of(values: Sequence[float], count: int = 10) -> float | None:
    """Mean of the first ``count`` values (pass a reversed list for the last ones); None when empty."""
    return float(np.mean(values[:count])) if len(values) else None
