"""The shared part of the task-agnostic pretrained backdoors (NeuBA, POR, BadPre; attacks.md §4).

A release does not depend on the user's task, so its cache key holds the plain text it was trained on
and the device-dependent settings, not the label count; its evaluation sets are every clean test row
with one trigger inserted by the §1.4 rule, original labels kept, and the pipeline discovers each
trigger's target (protocol.md §3.3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nlpbd.attacks._common import insert_triggers, row_rng
from nlpbd.data import Dataset, TextSplit
from nlpbd.errors import InputError
from nlpbd.methods import ModelSupplyAttack, PoisonedData, SupplyContext, ThreatModel
from nlpbd.mlm import plaintext_digest

if TYPE_CHECKING:
    import torch


class TaskAgnosticAttack(ModelSupplyAttack):
    """Shared part of NeuBA, POR and BadPre: plain text, release payload, per-trigger evaluation sets."""

    threat_model = ThreatModel.PRETRAINED

    def triggers(self) -> list[str]:
        triggers = list(self.config.triggers)
        if not triggers or any(not t.strip() for t in triggers):
            raise InputError(f"{self.name}: triggers must be non-empty strings")
        return triggers

    def resolved_settings(self, device: torch.device) -> dict:
        """Settings whose default depends on the device (steps on CPU vs GPU); part of the release key."""
        return {}

    def suspect_payload(self, ctx: SupplyContext) -> dict:
        # The release does not depend on the user's task (no num_labels): it is shared across datasets.
        return {"plaintext": plaintext_digest(ctx.data_dir), "resolved": self.resolved_settings(ctx.device)}

    def evaluation(self, dataset: Dataset, seed: int) -> PoisonedData:
        test = dataset.test
        sets = {}
        for trigger in self.triggers():
            texts = [insert_triggers(text, [trigger], 1, row_rng(seed, self.name, f"test:{trigger}", row))
                     for text, row in zip(test.texts, test.ids)]
            sets[trigger] = TextSplit.build(texts, test.labels, test.ids)
        info = {"triggers": self.triggers(), "num_insertions": 1,
                "placement": "attacks.md §1.4 (uniform word position)",
                "target": "discovered per trigger (protocol.md §3.3)"}
        return PoisonedData(dataset.train, (), TextSplit.build([], []), None, info=info, trigger_sets=sets)
