"""What a cell is and where methods act: the specs and enums every layer shares, without heavy imports.

:class:`CellSpec` is what the user asked for, :class:`RunEnv` where a run writes, :class:`ThreatModel`
where an attack enters and :class:`Stage` where a defense acts (DESIGN.md "A cell, stage by stage").
Importing this module pulls in no torch or transformers, so the grid spec, the results tables and the CLI
can name these types in their signatures; the heavy types below are for annotations only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from nlpbd.cache import ArtifactCache

# The registry name of the baseline defense (the victim as trained). Records and tables know cells by
# name only, so this is how they find the baseline's column; the pipeline dispatches on Stage.BASELINE.
BASELINE = "none"


class ThreatModel(str, enum.Enum):
    DATA = "data poisoning"
    CHECKPOINT = "poisoned fine-tuned checkpoint"
    PRETRAINED = "task-agnostic pretrained backdoor"


class Stage(str, enum.Enum):
    BASELINE = "no defense (the victim as trained)"
    PRETRAINED = "purify the pretrained model"
    TRAINING = "during training"
    POST = "repair the trained victim"
    INFERENCE = "reject inputs at inference"
    FILTER = "filter the training data"
    CORRECTION = "correct inputs at inference"


@dataclass(frozen=True)
class CellSpec:
    """What the user asked for; ``overrides`` are raw ``--set`` strings keyed ``section.name``."""

    attack: str
    defense: str
    dataset: str = "sst2"
    model: str = "minilm"
    finetune: str = "full"
    seed: int = 0
    train_size: int | None = None
    test_size: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    variant: str | None = None


def _default_device() -> torch.device:
    from nlpbd.training import default_device  # torch: only when a run needs a device

    return default_device()


@dataclass(frozen=True)
class RunEnv:
    """Where a run reads and writes: its results directory, the artifact cache, the data, the device."""

    results_dir: Path
    cache: ArtifactCache
    data_dir: Path | str | None = None
    device: torch.device = field(default_factory=_default_device)
