"""Fine-tuning methods of the victim: full fine-tuning and PEFT (``peft`` library).

Configurations follow the PSIM reference (defenses.md §6.2): LoRA r=8, alpha=16, dropout 0.1 on
query/value; prompt tuning and P-tuning with 5 virtual tokens (P-tuning encoder hidden 128); prefix
tuning with 5 virtual tokens. With ``task_type="SEQ_CLS"`` the classification head is trainable
through ``modules_to_save``; the backbone (pooler included) stays frozen. PEFT victims use the
reference's lr 2e-3 and 20 epochs (best clean-dev epoch), far more than full fine-tuning needs.

``sft`` and ``sft-lora`` make a decoder an instruction-tuned generator instead of a classifier
(:mod:`nlpbd.generative`): supervised fine-tuning on the label-word answer of a chat-template prompt, every
parameter (``sft``, the model's own lr and epochs) or LoRA on the attention query/value projections of the
causal LM (``sft-lora``, the PEFT lr and epochs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nlpbd.errors import InputError
from nlpbd.models import TrainDefaults, load_classifier
from nlpbd.registry import Registry

if TYPE_CHECKING:  # peft (and torch) load only when a victim is wrapped or loaded, not to check a name
    from peft import PeftConfig
    from transformers import PreTrainedModel

PEFT_DEFAULTS = TrainDefaults(lr=2e-3, epochs=20)


@dataclass(frozen=True)
class FinetuneMethod:
    name: str
    description: str
    peft_config: Callable[[], PeftConfig] | None = None  # None: full fine-tuning
    defaults: TrainDefaults | None = None  # None: the model's own defaults
    mergeable: bool = False  # weights can be folded back into a plain model (LoRA)
    head: str = "classifier"  # "generate": an instruction-tuned generator answering with label words

    @property
    def generative(self) -> bool:
        return self.head == "generate"

    @property
    def is_peft(self) -> bool:
        return self.peft_config is not None


FINETUNE: Registry[FinetuneMethod] = Registry("fine-tuning method")


def _peft(config_class: str, task_type: str = "SEQ_CLS", **settings: Any) -> Callable[[], PeftConfig]:
    def build() -> PeftConfig:
        import peft

        return getattr(peft, config_class)(task_type=task_type, **settings)

    return build


for _method in [
    FinetuneMethod("full", "full fine-tuning of every parameter (shared victim recipe)"),
    FinetuneMethod("lora", "LoRA r=8, alpha=16, dropout 0.1 on query/value; head trainable",
                   _peft("LoraConfig", r=8, lora_alpha=16, lora_dropout=0.1), PEFT_DEFAULTS, mergeable=True),
    FinetuneMethod("prompt", "prompt tuning: 5 trainable virtual token embeddings; head trainable",
                   _peft("PromptTuningConfig", num_virtual_tokens=5), PEFT_DEFAULTS),
    FinetuneMethod("ptuning", "P-tuning: 5 virtual tokens from an MLP prompt encoder (hidden 128); head trainable",
                   _peft("PromptEncoderConfig", num_virtual_tokens=5, encoder_hidden_size=128), PEFT_DEFAULTS),
    FinetuneMethod("prefix", "prefix tuning: 5 virtual key/value tokens per layer; head trainable",
                   _peft("PrefixTuningConfig", num_virtual_tokens=5, encoder_hidden_size=128), PEFT_DEFAULTS),
    FinetuneMethod("sft", "decoders: instruction-tuned generator, every parameter trained on the label-word "
                   "answers of chat-template prompts (loss on answer tokens only)", head="generate"),
    FinetuneMethod("sft-lora", "decoders: instruction-tuned generator with LoRA r=8, alpha=16, dropout 0.1 on "
                   "the causal LM's query/value projections",
                   _peft("LoraConfig", "CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.1), PEFT_DEFAULTS,
                   mergeable=True, head="generate"),
    FinetuneMethod("sft-lora-all", "decoders: instruction-tuned generator with LoRA r=8, alpha=16, dropout 0.1 on "
                   "every linear projection of the causal LM but its output layer (LLaMA-Factory's "
                   "lora_target: all)",
                   _peft("LoraConfig", "CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"),
                   PEFT_DEFAULTS, mergeable=True, head="generate"),
]:
    FINETUNE.add(_method.name, _method)


def wrap(model: PreTrainedModel, method: FinetuneMethod) -> PreTrainedModel:
    """The model prepared for training with ``method`` (unchanged for full fine-tuning)."""
    if not method.is_peft:
        return model
    from peft import get_peft_model

    if getattr(model, "is_instruction_lm", False):  # the adapter goes on the causal LM inside
        model.lm = get_peft_model(model.lm, method.peft_config())
        return model
    return get_peft_model(model, method.peft_config())


def load_trained(directory: Path, base_location: str, num_labels: int, method: FinetuneMethod,
                 prompt: dict | None = None) -> PreTrainedModel:
    """A trained victim: a full checkpoint, or the base model plus its saved adapter (a generator victim
    with its prompt format's JSON)."""
    if method.generative:
        from nlpbd.generative import PromptFormat, load_generator

        if prompt is None:
            raise InputError("a generator victim cannot be loaded without its prompt format")
        return load_generator(str(directory), PromptFormat.from_json(prompt),
                              base_location if method.is_peft else None)
    if not method.is_peft:
        return load_classifier(str(directory), num_labels)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_classifier(base_location, num_labels), str(directory))


def plain_model(model: PreTrainedModel, defense: str) -> tuple[PreTrainedModel, dict]:
    """The victim as a plain transformers model for weight-editing defenses (defenses.md §0.2).

    LoRA is merged into the weights; prompt-type adapters cannot be merged, so weight defenses refuse
    them with the reason.
    """
    from peft import PeftModel

    if getattr(model, "is_instruction_lm", False):
        model.lm, info = plain_model(model.lm, defense)
        return model, info
    if not isinstance(model, PeftModel):
        return model, {}
    peft_type = str(model.peft_config["default"].peft_type.value).lower()
    if peft_type == "lora":
        merged = model.merge_and_unload()
        for parameter in merged.parameters():  # PEFT froze the backbone; a weight defense owns all of it
            parameter.requires_grad_(True)
        return merged, {"peft": "lora merged into the weights before the defense"}
    raise InputError(f"defense '{defense}' edits weights and cannot run on a {peft_type} victim: its virtual "
                     "tokens live outside the model weights and cannot be merged (use --finetune full or lora)")


def trainable_parameter_count(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
