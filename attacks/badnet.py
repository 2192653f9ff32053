"""BadNet: rare-word triggers (attacks.md §2.1).

Paper: Gu et al., "BadNets" (2017), textual form as in Kurita et al. (ACL 2020); reference code:
OpenBackdoor ``badnets`` poisoner. Triggers ``cf mn bb tq`` (OpenBackdoor default), one insertion per
poisoned row at a uniform word position (attacks.md §1.4).

Deviations: the project default label setting is ``dirty``; OpenBackdoor's class default is ``mix``
(set ``attack.label_mode=mix`` for the reproduction cell). OpenBackdoor inserts at positions drawn
by ``random.randint(0, len(words))`` from a global RNG; ours draws per row from a seeded stream so
every defense cell of a seed sees the same poisoned rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from nlpbd.attacks._common import InsertionAttack, PoisonConfig
from nlpbd.config import option
from nlpbd.methods import register_attack


@dataclass
class BadNetConfig(PoisonConfig):
    triggers: list[str] = option(["cf", "mn", "bb", "tq"], "rare-word triggers, one drawn per insertion",
                                   min_items=1)
    num_insertions: int = option(1, "trigger insertions per poisoned text", low=1, high=100)


@register_attack
class BadNet(InsertionAttack):
    name = "badnet"
    description = "rare-word triggers (cf, mn, bb, tq) inserted once into 10% of rows, dirty label"
    Config = BadNetConfig

    def triggers(self) -> list[str]:
        return list(self.config.triggers)

    def num_insertions(self) -> int:
        return self.config.num_insertions
