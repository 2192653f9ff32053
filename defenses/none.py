"""No defense: the victim as trained. Its record is the baseline every defense is paired with."""

from __future__ import annotations

from dataclasses import dataclass

from nlpbd.methods import BaselineDefense, register_defense
from nlpbd.specs import BASELINE


@dataclass
class NoDefenseConfig:
    """No settings."""


@register_defense
class NoDefense(BaselineDefense):
    name = BASELINE
    unsupported_victims = {}
    description = "no defense: the victim as trained (baseline)"
    Config = NoDefenseConfig
