"""Named random streams derived from one cell seed (protocol.md §7).

Each component draws from its own stream, so adding a component never shifts another one.
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads with the first model, not with the data or the CLI's name checks
    import torch


def seed_for(seed: int, name: str) -> int:
    """The 32-bit seed of stream ``name`` for cell seed ``seed``."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)


def python_rng(seed: int, name: str) -> random.Random:
    return random.Random(seed_for(seed, name))


def numpy_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(seed_for(seed, name))


def torch_generator(seed: int, name: str) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(seed_for(seed, name))


def seed_everything(seed: int, name: str) -> None:
    """Seed the global RNGs that library code (weight init, dropout) draws from."""
    import torch

    value = seed_for(seed, name)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
