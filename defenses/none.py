"""No defense: the victim as trained. Its record is the baseline every defense is paired with."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from nlpbd.methods import DefenseContext, DefenseOutcome, RepairDefense, register_defense


@dataclass
class NoDefenseConfig:
    """No settings."""


@register_defense
class NoDefense(RepairDefense):
    name = "none"
    unsupported_victims = {}
    description = "no defense: the victim as trained (baseline)"
    Config = NoDefenseConfig

    def repair(self, model: PreTrainedModel, ctx: DefenseContext) -> DefenseOutcome:
        return DefenseOutcome(model)
