"""The attacker's proxy data and the release helpers shared by the task-specific model-poisoning
attacks (attacks.md §3: WP, EP, RIPPLe).

No IMDB copy ships with the project, so the default proxy is a fixed sample of the GLUE SST-2 phrases
(``<data_dir>/sst-2-glue/train.tsv``): ``proxy_train`` + ``proxy_dev`` rows (default 4,000 + 1,000),
each with at least 5 words, stratified by label and drawn with the cell seed, after removing every
phrase that occurs in the downstream dev or test split. "Occurs in" means: the proxy phrase is a
substring of a downstream text once both are lower-cased and ``-lrb-``/``-rrb-`` are mapped to
brackets. The training rows come back in sampled (random) order, so "the first n label-0 rows"
(WP) is a random draw.

The same streams are used by every attack, so WP, EP and RIPPLe cells of one seed share one proxy.

Also here: training a classifier on the proxy (the attacker's recipe on ``train_classifier``), writing
a release with or without its head (``ship_head``; forced off when the downstream label count differs
from the proxy's), and the single-token check for rare-word triggers.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nlpbd.attacks._common import non_target, row_rng
from nlpbd.config import TrainConfig, option
from nlpbd.data import TextSplit, file_digest, read_split, stratified_sample
from nlpbd.errors import InputError
from nlpbd.models import ModelRef, load_classifier, load_tokenizer
from nlpbd.seeding import numpy_rng, seed_everything
from nlpbd.training import TrainResult, TrainSetup, classification_loss, train_classifier

log = logging.getLogger(__name__)

PROXY_FILE = "sst-2-glue/train.tsv"
PROXY_LABELS = 2  # GLUE SST-2: 0 negative, 1 positive
MIN_WORDS = 5


@dataclass
class ProxyConfig:
    """Settings every task-specific model-poisoning attack shares (attacks.md §3)."""

    proxy_train: int = option(4000, "attacker proxy training rows (GLUE SST-2 phrases, >= 5 words, "
                              "stratified; lower it for quick CPU runs)", low=2)
    proxy_dev: int = option(1000, "attacker proxy dev rows (attacker-side model selection)", low=2)
    ship_head: bool = option(True, "release the classification head with the encoder (forced off when the "
                             "downstream label count differs from the proxy's 2)")
    max_length: int = option(128, "maximum tokens per input in the attacker's training", low=8, high=4096)


@dataclass(frozen=True)
class Proxy:
    """The attacker's proxy splits; ``train`` is in sampled order."""

    train: TextSplit
    dev: TextSplit
    info: dict


# --- sampling -------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """The comparison form of attacks.md §3: lower-cased, PTB brackets mapped to ( and )."""
    return text.lower().replace("-lrb-", "(").replace("-rrb-", ")")


def overlapping_rows(texts: Sequence[str], downstream: Sequence[str]) -> set[int]:
    """Positions of ``texts`` that are substrings of some ``downstream`` text (both normalised).

    Every word of a phrase except its first and last is whitespace-bounded inside the phrase, so it
    is a whole word of any text containing the phrase: intersecting the word index over those
    interior words leaves few candidates for the exact substring test.
    """
    targets = [normalise(t) for t in downstream]
    index: dict[str, set[int]] = {}
    for i, text in enumerate(targets):
        for word in set(text.split()):
            index.setdefault(word, set()).add(i)
    joined = "\n".join(targets)
    found: set[int] = set()
    for position, raw in enumerate(texts):
        phrase = normalise(raw).strip()
        interior = phrase.split()[1:-1]
        if not interior:
            if phrase and phrase in joined:
                found.add(position)
            continue
        postings = sorted((index.get(w, set()) for w in set(interior)), key=len)
        candidates = set.intersection(*postings) if postings else set()
        if any(phrase in targets[i] for i in candidates):
            found.add(position)
    return found


def proxy_path(data_dir: Path | None, attack: str) -> Path:
    if data_dir is None:
        raise InputError(f"{attack} trains on a proxy dataset ({PROXY_FILE}) and needs the benchmark data; "
                         "point --data-dir (or $NLPBD_DATA_DIR) at a copy of shared/data")
    path = Path(data_dir) / PROXY_FILE
    if not path.is_file():
        raise InputError(f"{attack}: proxy data file {path} is missing")
    return path


def load_proxy(data_dir: Path | None, downstream_texts: Sequence[str], n_train: int, n_dev: int, seed: int,
               attack: str = "this attack") -> Proxy:
    """The stratified proxy sample (attacks.md §3), drawn from the streams ``proxy*`` of ``seed``."""
    path = proxy_path(data_dir, attack)
    source = read_split(path)
    long_enough = [i for i, t in enumerate(source.texts) if len(t.split()) >= MIN_WORDS]
    overlap = overlapping_rows([source.texts[i] for i in long_enough], downstream_texts)
    eligible = [p for k, p in enumerate(long_enough) if k not in overlap]
    if n_train + n_dev > len(eligible):
        raise InputError(f"{attack}: proxy_train + proxy_dev = {n_train + n_dev} exceeds the {len(eligible)} "
                         f"eligible rows of {path}")
    chosen = source.subset(stratified_sample(source.labels, n_train + n_dev, numpy_rng(seed, "proxy"), eligible))
    dev_positions = set(stratified_sample(chosen.labels, n_dev, numpy_rng(seed, "proxy_dev")))
    train_positions = [i for i in range(len(chosen)) if i not in dev_positions]
    order = numpy_rng(seed, "proxy_order").permutation(len(train_positions)).tolist()
    train = chosen.subset([train_positions[i] for i in order])
    dev = chosen.subset(sorted(dev_positions))
    info = {"source": PROXY_FILE, "source_rows": len(source), "short_removed": len(source) - len(long_enough),
            "overlap_removed": len(overlap), "eligible": len(eligible),
            "eligible_labels": label_counts(source.subset(eligible)), "train": len(train), "dev": len(dev),
            "train_labels": label_counts(train), "dev_labels": label_counts(dev), "min_words": MIN_WORDS}
    log.info("proxy: %d train / %d dev rows of %s (%d removed as downstream overlap)", len(train), len(dev),
             PROXY_FILE, len(overlap))
    return Proxy(train, dev, info)


def label_counts(split: TextSplit) -> dict[str, int]:
    values, counts = np.unique(np.asarray(split.labels, dtype=int), return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


def proxy_summary(config: ProxyConfig) -> dict:
    """The proxy as configured, for the records of the evaluation sets (the sample's own statistics
    are in the release's build info)."""
    return {"source": PROXY_FILE, "train": config.proxy_train, "dev": config.proxy_dev, "min_words": MIN_WORDS,
            "stratified": True, "removed": "phrases occurring in the downstream dev/test texts",
            "ship_head": config.ship_head}


def texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode())
        h.update(b"\n")
    return h.hexdigest()


def proxy_payload(data_dir: Path | None, downstream_texts: Sequence[str], attack: str) -> dict:
    """What the proxy sample depends on besides the config and seed: the source file and the overlap set."""
    return {"proxy_file": file_digest([proxy_path(data_dir, attack)]),
            "downstream_texts": texts_digest(downstream_texts)}


# --- training and release -------------------------------------------------------------------------


class LossLog:
    """A ``TrainSetup.loss_fn`` that keeps every step's loss, for the record."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        loss = classification_loss(model, batch)
        self.values.append(float(loss.detach()))
        return loss


def epoch_means(values: Sequence[float], steps_per_epoch: int) -> list[float]:
    """Mean of ``values`` over consecutive chunks of ``steps_per_epoch`` steps."""
    size = max(steps_per_epoch, 1)
    return [float(np.mean(values[i:i + size])) for i in range(0, len(values), size)]


def fresh_classifier(base: ModelRef, seed: int, stream: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """θ_pre with a new 2-way head, initialised from the named stream."""
    seed_everything(seed, f"{stream}:init")
    return load_classifier(base, PROXY_LABELS), load_tokenizer(base)


def train_on_proxy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train: TextSplit,
                   dev: TextSplit | None, recipe: TrainConfig, seed: int, stream: str,
                   device: torch.device, description: str) -> tuple[TrainResult, dict]:
    """``train_classifier`` with the attacker's recipe; returns the result and a record with losses."""
    losses = LossLog()
    result = train_classifier(model, tokenizer, train, dev, recipe, seed, stream=stream,
                              setup=TrainSetup(loss_fn=losses, description=description), device=device)
    steps_per_epoch = -(-len(train) // recipe.batch_size)
    record = {**result.as_dict(), "rows": len(train), "lr": recipe.lr, "batch_size": recipe.batch_size,
              "loss_per_epoch": epoch_means(losses.values, steps_per_epoch)}
    return result, record


def save_release(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, ship_head: bool,
                 downstream_labels: int) -> dict:
    """Write the release; without its head when asked or when the label counts differ (attacks.md §3)."""
    proxy_labels = model.config.num_labels
    forced = ship_head and proxy_labels != downstream_labels
    model = model.cpu()
    if ship_head and not forced:
        model.save_pretrained(out_dir, safe_serialization=True)
    else:
        # The encoder alone (with its pooler): the user's loader then initialises a fresh K-way head.
        model.base_model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    shipped: bool | str = "false (forced)" if forced else ship_head
    if forced:
        log.warning("the proxy has %d labels and the downstream task %d: releasing the encoder without its head",
                    proxy_labels, downstream_labels)
    return {"ship_head": shipped, "proxy_labels": proxy_labels, "downstream_labels": downstream_labels}


def triggered_asr_set(test: TextSplit, target: int, insert: Callable[[str, random.Random], str], seed: int,
                      attack: str) -> TextSplit:
    """attacks.md §1.5: the non-target test rows, triggered by ``insert`` with the per-row stream, labelled target."""
    victims = non_target(test, target)
    texts = [insert(text, row_rng(seed, attack, "test", row)) for text, row in zip(victims.texts, victims.ids)]
    return TextSplit.build(texts, [target] * len(texts), victims.ids)


def check_target(target: int, num_labels: int, attack: str) -> None:
    if not 0 <= target < num_labels:
        raise InputError(f"{attack}: target label {target} is out of range 0..{num_labels - 1} for this dataset")


def single_token_id(tokenizer: PreTrainedTokenizerBase, word: str, attack: str) -> int:
    """The vocabulary id of ``word``, which must be exactly one token (EP, RIPPLe surgery)."""
    pieces = tokenizer.tokenize(word)
    if len(pieces) != 1 or tokenizer.convert_tokens_to_ids(pieces[0]) == tokenizer.unk_token_id:
        raise InputError(f"{attack}: trigger '{word}' is not a single token of this tokenizer "
                         f"(it splits into {pieces}); choose a word in the vocabulary")
    return int(tokenizer.convert_tokens_to_ids(pieces[0]))
