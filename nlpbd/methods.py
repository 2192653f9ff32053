"""The attack and defense interfaces, their registries, and what each defense may see.

Attacks and defenses declare where in a model's life they act (DESIGN.md "A cell, stage by
stage"). A defense receives a :class:`DefenseContext` holding only what its threat model grants
(protocol.md §4): the object simply has no trigger, target or poisoned-row ids in it, asking for
something the defense did not declare in ``grants`` raises, and the only place on disk it points to is
the defense's own scratch area, where granted models are weights-only views (:mod:`nlpbd.scratch`).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from nlpbd.config import to_dict
from nlpbd.data import TextSplit
from nlpbd.errors import InputError
from nlpbd.registry import Registry
from nlpbd.specs import Stage, ThreatModel

if TYPE_CHECKING:  # annotations only: the interfaces import no torch or transformers
    import numpy as np
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from nlpbd.cache import ArtifactCache
    from nlpbd.config import TrainConfig
    from nlpbd.data import Dataset
    from nlpbd.models import ModelRef

log = logging.getLogger(__name__)


class _Method(ABC):
    """Shared shape of attacks and defenses: a name, a version in the cache key, a typed config."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, config: Any | None = None):
        self.config = config if config is not None else self.Config()

    def params(self) -> dict:
        return to_dict(self.config)

    def cache_payload(self) -> dict:
        return {"name": self.name, "version": self.version, "config": self.params()}


# --- attacks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoisonedData:
    """A poisoned training set and the triggered test set that ASR is measured on.

    ``poisoned_positions`` index ``train`` and are for metrics and the budget draw only; defenses
    never receive this object.
    """

    train: TextSplit
    poisoned_positions: tuple[int, ...]
    asr_set: TextSplit
    target: int | None
    dropped: int = 0
    info: dict = field(default_factory=dict)
    # Task-agnostic attacks: every clean test row with trigger t inserted, ORIGINAL labels kept;
    # the target of each trigger is discovered from ASR[t][c] (protocol.md §3.3).
    trigger_sets: dict[str, TextSplit] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"train": _split_json(self.train), "poisoned_positions": list(self.poisoned_positions),
                "asr_set": _split_json(self.asr_set), "target": self.target, "dropped": self.dropped,
                "info": self.info, "trigger_sets": {t: _split_json(s) for t, s in self.trigger_sets.items()}}

    @classmethod
    def from_json(cls, data: dict) -> PoisonedData:
        return cls(_split_from(data["train"]), tuple(data["poisoned_positions"]), _split_from(data["asr_set"]),
                   data["target"], data["dropped"], data["info"],
                   {t: _split_from(s) for t, s in data.get("trigger_sets", {}).items()})


def _split_json(split: TextSplit) -> dict:
    return {"texts": list(split.texts), "labels": list(split.labels), "ids": list(split.ids)}


def _split_from(data: dict) -> TextSplit:
    return TextSplit.build(data["texts"], data["labels"], data["ids"])


class Attack(_Method):
    threat_model: ClassVar[ThreatModel]


class DataPoisoningAttack(Attack):
    """Poisons a fraction of the training rows; the victim is trained on the result."""

    threat_model = ThreatModel.DATA

    @abstractmethod
    def poison(self, dataset: Dataset, seed: int) -> PoisonedData:
        """The poisoned training set (same size and order as ``dataset.train``) and the ASR set."""

    def check(self, dataset: Dataset) -> None:
        """Refuse, before any work, a target outside the label space or a training set of which
        ``floor(poison_rate · N)`` is no row at all (a run would train a clean model and report it)."""
        config = self.config
        rate, target = getattr(config, "poison_rate", None), getattr(config, "target_label", None)
        target = dataset.default_target if target is None else target
        if not 0 <= target < dataset.num_labels:
            raise InputError(f"attack.target_label {target} is out of range 0..{dataset.num_labels - 1}")
        if rate is None:
            return
        n = len(dataset.train)
        mode = getattr(config, "label_mode", "dirty")
        eligible = sum(1 for y in dataset.train.labels if (y != target) == (mode == "dirty") or mode == "mix")
        wanted = math.floor(rate * n + 1e-9)
        if wanted < 1 or eligible < 1:
            raise InputError(f"{self.name}: poison_rate {rate} of {n} training rows ({eligible} eligible for "
                             f"{mode}-label poisoning) poisons no row; use more rows or a higher attack.poison_rate")
        if mode == "dirty" and wanted > eligible / 2:
            # Imbalanced data with the majority class as target: the rate counts against all N rows, so
            # relabelling takes most of the minority rows and the victim learns to answer the majority.
            log.warning("%s: %d poisoned rows relabel %.0f%% of the %d non-target training rows; the victim may "
                        "collapse to the target class (lower attack.poison_rate, or target a minority class)",
                        self.name, min(wanted, eligible), 100 * min(wanted, eligible) / eligible, eligible)

    def clean_originals(self, dataset: Dataset, poisoned: PoisonedData) -> list[str | None]:
        """The clean test text each ASR row was made from (None where unknown), for the stealthiness
        measures; attacks that know their alignment override this."""
        return [None] * len(poisoned.asr_set)


@dataclass(frozen=True)
class SupplyContext:
    """What a model-supply attacker has: the clean public base model, the user's label space, plain
    text and proxy data under ``data_dir``, a seed and a device. It never sees the user's training rows."""

    base: ModelRef
    num_labels: int
    dataset_name: str
    data_dir: Path | None
    seed: int
    device: torch.device
    downstream_texts: tuple[str, ...] = ()  # dev/test texts, only to remove overlap from a proxy set
    cache: ArtifactCache | None = None  # the run's artifact cache, for intermediate builds (MLM-head grafts)


class ModelSupplyAttack(Attack):
    """Releases poisoned weights that the user then fine-tunes on clean data (attacks.md §3, §4).

    ``build_suspect`` writes a ``save_pretrained`` directory (weights as safetensors, tokenizer
    included): a sequence classifier with its head for task-specific attacks (when the label count
    matches), an encoder (or masked-LM / pre-training model) for task-agnostic ones. ``evaluation``
    builds the sets the backdoor is measured on from the user's clean test split.
    """

    @abstractmethod
    def build_suspect(self, ctx: SupplyContext, out_dir: Path) -> dict:
        """Write the released model to ``out_dir``; return what to record (steps, losses, proxy info)."""

    @abstractmethod
    def evaluation(self, dataset: Dataset, seed: int) -> PoisonedData:
        """Clean ``train`` (no poisoned rows) plus the ASR set or the per-trigger sets."""

    def suspect_payload(self, ctx: SupplyContext) -> dict:
        """What the released weights depend on besides the attack settings (override to add proxy data)."""
        return {"num_labels": ctx.num_labels}


# --- defenses -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CleanBudget:
    """The defender's clean labelled rows D_c and its held-out part D_c^val (protocol.md §4)."""

    rows: TextSplit
    val: TextSplit  # rows the victim never trained on when val_source is "dev"
    fit: TextSplit  # what selecting options train on: D_c, or D_c minus D_c^val when val is part of D_c
    val_source: str = "budget"  # "dev": a sample of the clean dev split; "budget": held out of D_c

    def info(self) -> dict:
        return {"n_c": len(self.rows), "n_val": len(self.val), "val_source": self.val_source,
                "ids_sha256": self.rows.digest(), "val_ids_sha256": self.val.digest()}


class AccessDenied(RuntimeError):
    """A defense asked for something its threat model does not grant it."""


GRANTABLE = ("budget", "pretrained", "train_set", "corpus", "victim_factory", "suspect")


@dataclass
class DefenseContext:
    """What a defense may use. Only the names in the defense's ``grants`` are readable."""

    seed: int
    num_labels: int
    tokenizer: PreTrainedTokenizerBase
    train_config: TrainConfig  # the victim recipe, resolved
    device: torch.device
    granted: frozenset[str]
    _objects: dict[str, Any] = field(default_factory=dict, repr=False)
    # The defense's own scratch cache (grafts, PSIMs), never the run's cache root: artifacts there record
    # the attack's settings in their metadata (nlpbd.scratch).
    cache: ArtifactCache | None = None

    def get(self, name: str) -> Any:
        if name not in GRANTABLE:
            raise KeyError(name)
        if name not in self.granted:
            raise AccessDenied(f"this defense did not declare '{name}' in its grants")
        return self._objects.get(name)

    @property
    def budget(self) -> CleanBudget:
        return self.get("budget")

    @property
    def pretrained(self) -> ModelRef:
        """θ_pre: the clean checkpoint the victim started from."""
        return self.get("pretrained")

    @property
    def train_set(self) -> TextSplit:
        """The training set the victim is trained on (poisoned in data-poisoning cells)."""
        return self.get("train_set")

    @property
    def suspect(self) -> ModelRef | None:
        """The released (suspect) checkpoint of a model-supply cell; None in data-poisoning cells."""
        return self.get("suspect")

    @property
    def corpus(self) -> TextSplit:
        """Unlabelled plain text D_aux."""
        return self.get("corpus")

    def victim(self) -> PreTrainedModel:
        """The standard victim (for training-time defenses whose step 2 is the victim recipe)."""
        return self.get("victim_factory")()


@dataclass
class DefenseOutcome:
    """A defended model plus what the defense wants recorded (suspicious tokens, fractions, ...)."""

    model: PreTrainedModel
    info: dict = field(default_factory=dict)
    train_seconds: float | None = None


@dataclass
class Detector:
    """An inference-time filter: ``scores`` per input and the threshold above which inputs are rejected."""

    scores: Callable[[list[str]], np.ndarray]
    threshold: float
    info: dict = field(default_factory=dict)


class Defense(_Method):
    stage: ClassVar[Stage]
    grants: ClassVar[frozenset[str]] = frozenset()
    # Whether the defense changes the victim's weights (it cannot then run on a victim whose trained
    # parameters live outside the weights, e.g. prompt-tuning's virtual tokens).
    edits_weights: ClassVar[bool] = False
    # Victim kinds (nlpbd.decoders: "decoder", "generate") the defense cannot run on, each with the one-line
    # reason the CLI gives; a defense that runs on an instruction-tuned generator says so by leaving it out.
    unsupported_victims: ClassVar[dict[str, str]] = {
        "generate": "it is defined for classifier victims only (no label-word version)"}


class BaselineDefense(Defense):
    """No defense: the cell is scored on the victim as trained. Its record is the baseline the other
    defenses are paired with, and the pipeline runs no defense stage for it."""

    stage = Stage.BASELINE


class RepairDefense(Defense):
    """Post-training: receives the trained victim θ_bd and returns a repaired model."""

    stage = Stage.POST
    edits_weights = True

    @abstractmethod
    def repair(self, model: PreTrainedModel, ctx: DefenseContext) -> DefenseOutcome:
        ...


class TrainingDefense(Defense):
    """During training: replaces plain fine-tuning of θ_pre on the (poisoned) training set."""

    stage = Stage.TRAINING
    edits_weights = True

    @abstractmethod
    def train(self, ctx: DefenseContext) -> DefenseOutcome:
        ...


class InferenceDefense(Defense):
    """Inference-time: leaves the victim alone and rejects suspicious inputs."""

    stage = Stage.INFERENCE

    @abstractmethod
    def fit(self, model: PreTrainedModel, ctx: DefenseContext) -> Detector:
        ...


@dataclass
class Corrector:
    """An inference-time input correction: ``correct`` maps inputs to the texts the victim then sees.

    ``scores`` (optional) gives each input's suspicion; an input counts as flagged (corrected) when
    ``flagged(score)``. Neither changes the denominators: every input is still classified.
    """

    correct: Callable[[list[str]], list[str]]
    info: dict = field(default_factory=dict)
    scores: Callable[[list[str]], np.ndarray] | None = None


class CorrectionDefense(Defense):
    """Inference-time: leaves the victim alone and rewrites every input before it is classified."""

    stage = Stage.CORRECTION

    @abstractmethod
    def fit(self, model: PreTrainedModel, ctx: DefenseContext) -> Corrector:
        ...


@dataclass
class FilterResult:
    """Which rows of the training set a filter keeps (positions into ``ctx.train_set``), a suspicion
    score per row (higher = more suspicious; for AUROC against the poison mask, computed after the
    defense is done), and what to record."""

    keep: list[int]
    scores: np.ndarray
    info: dict = field(default_factory=dict)


class FilterDefense(Defense):
    """Before the final training: inspects the (poisoned) training set with the victim trained on it,
    removes suspicious rows, and the usual victim recipe is run again on the rows it keeps."""

    stage = Stage.FILTER

    @abstractmethod
    def filter(self, model: PreTrainedModel, ctx: DefenseContext) -> FilterResult:
        ...


class PretrainedDefense(Defense):
    """Before fine-tuning: purifies a (suspect) pretrained model and returns its directory."""

    stage = Stage.PRETRAINED

    @abstractmethod
    def purify(self, model: ModelRef, ctx: DefenseContext, out_dir: Path) -> dict:
        """Write the purified model to ``out_dir``; return info to record."""


ATTACKS: Registry[type[Attack]] = Registry("attack", ("nlpbd.attacks",), "nlpbd.attacks")
DEFENSES: Registry[type[Defense]] = Registry("defense", ("nlpbd.defenses",), "nlpbd.defenses")


def register_attack(cls: type[Attack]) -> type[Attack]:
    ATTACKS.add(cls.name, cls)
    return cls


def register_defense(cls: type[Defense]) -> type[Defense]:
    DEFENSES.add(cls.name, cls)
    return cls
