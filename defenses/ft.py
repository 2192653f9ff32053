"""FT: fine-tune the suspect model on the defender's clean budget (defenses.md §1).

The natural control for Fine-mixing, E-PUR and D3: the same clean rows, no backdoor-specific
mechanism. All parameters of θ_bd are fine-tuned on D_c with cross-entropy, keeping θ_bd's head and
using a fresh optimiser; the last epoch is returned (``select=clean_val`` trains on D_c minus D_c^val
and keeps the epoch with the best D_c^val accuracy).

``finetune_on_budget`` is the one code path that Fine-mixing and E-PUR reuse, so FT is exactly
Fine-mixing with rho = 1 and no E-PUR.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from transformers import PreTrainedModel

from nlpbd.config import option
from nlpbd.methods import DefenseContext, DefenseOutcome, RepairDefense, register_defense
from nlpbd.training import TrainResult, TrainSetup, train_classifier


@dataclass
class FTConfig:
    epochs: int = option(10, "epochs over D_c (0 returns θ_bd unchanged)", low=0, high=1000)
    lr: float = option(2e-5, "AdamW learning rate", low=0.0, low_open=True)
    batch_size: int = option(32, "batch size", low=1)
    weight_decay: float = option(0.01, "AdamW weight decay (not on bias / LayerNorm)", low=0.0)
    warmup_ratio: float = option(0.06, "linear warm-up fraction", low=0.0, high=1.0)
    grad_clip: float = option(1.0, "gradient-norm clipping (0 disables)", low=0.0)
    select: Literal["last", "clean_val"] = option("last", "last epoch, or best D_c^val accuracy "
                                                  "(training on D_c minus D_c^val)")


def finetune_on_budget(model: PreTrainedModel, ctx: DefenseContext, config: FTConfig,
                       stream: str = "defense") -> TrainResult | None:
    """The FT recipe on D_c, in place. ``epochs=0`` leaves the model untouched."""
    if config.epochs == 0:
        return None
    budget = ctx.budget
    train_config = replace(ctx.train_config, lr=config.lr, epochs=config.epochs, batch_size=config.batch_size,
                           weight_decay=config.weight_decay, warmup_ratio=config.warmup_ratio,
                           grad_clip=config.grad_clip, select="dev" if config.select == "clean_val" else "last")
    rows, val = (budget.fit, budget.val) if config.select == "clean_val" else (budget.rows, None)
    return train_classifier(model, ctx.tokenizer, rows, val, train_config, ctx.seed, stream=stream,
                            setup=TrainSetup(description="fine-tuning on D_c"), device=ctx.device)


@register_defense
class FT(RepairDefense):
    name = "ft"
    description = "fine-tune the victim on the clean budget D_c (10 epochs, lr 2e-5)"
    Config = FTConfig
    grants = frozenset({"budget"})
    unsupported_victims = {}  # fine-tunes any victim with its own loss (label-word SFT for a generator)

    def repair(self, model: PreTrainedModel, ctx: DefenseContext) -> DefenseOutcome:
        result = finetune_on_budget(model, ctx, self.config)
        info = {"train": result.as_dict()} if result else {"train": None}
        return DefenseOutcome(model, info)
