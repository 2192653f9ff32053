"""AddSent: a fixed sentence trigger (attacks.md §2.2).

Paper: Dai, Chen, Li, "A Backdoor Attack Against LSTM-Based Text Classification Systems" (IEEE
Access 2019); reference code: OpenBackdoor ``addsent`` poisoner. The sentence ``"I watch this 3D
movie"`` (OpenBackdoor's default; Dai et al. is usually quoted as "I watched this 3D movie") is
inserted once, contiguously, at a uniform word position.

Deviations: the project default label setting is ``dirty`` (OpenBackdoor's config uses ``mix``).
The trigger string is inserted unchanged; with uncased models its case is irrelevant.
"""

from __future__ import annotations

from dataclasses import dataclass

from nlpbd.attacks._common import InsertionAttack, PoisonConfig
from nlpbd.config import option
from nlpbd.methods import register_attack


@dataclass
class AddSentConfig(PoisonConfig):
    trigger: str = option("I watch this 3D movie", "the trigger sentence, inserted contiguously")


@register_attack
class AddSent(InsertionAttack):
    name = "addsent"
    description = "sentence trigger 'I watch this 3D movie' inserted once into 10% of rows, dirty label"
    Config = AddSentConfig

    def triggers(self) -> list[str]:
        return [self.config.trigger]
