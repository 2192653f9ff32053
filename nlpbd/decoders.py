"""Decoder-only victims: which models are decoders, and which defenses refuse which victim kind.

A victim is one of three kinds: an encoder classifier (BERT, MiniLM, RoBERTa), a decoder classifier
(a causal LM with a sequence-classification head on its last non-padding token: SmolLM2, GPT-2, Qwen,
Llama) or an instruction-tuned generator (a decoder fine-tuned with ``--finetune sft``/``sft-lora`` to answer
with label words, :mod:`nlpbd.generative`). A defense lists the kinds it cannot run on, with the one-line
reason, in ``Defense.unsupported_victims``; :func:`check_victim` refuses such a cell before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

from nlpbd.errors import InputError

ENCODER, DECODER, GENERATOR = "encoder", "decoder", "generate"
# Hub ids whose family is known without fetching a config (the registered hub models).
KNOWN_DECODER_IDS = ("gpt2", "gpt2-large", "Qwen/", "meta-llama/", "HuggingFaceTB/")


def is_decoder_type(model_type: str | None) -> bool:
    """A model type that transformers builds as a causal LM and never as a masked LM (GPT-2, Llama, Qwen2,
    Mistral, ...); BERT and RoBERTa have causal-LM classes too, but are masked-LM encoders."""
    if not model_type:
        return False
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def model_type_at(location: str) -> str | None:
    """The ``model_type`` in a local model folder's config.json (None for a hub id or an unreadable config)."""
    config = Path(location) / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def is_decoder_location(location: str) -> bool:
    model_type = model_type_at(location)
    if model_type is None:
        return location.startswith(KNOWN_DECODER_IDS)
    return is_decoder_type(model_type)


def victim_kind(location: str, generative: bool) -> str:
    if generative:
        return GENERATOR
    return DECODER if is_decoder_location(location) else ENCODER


def check_victim(defense_cls: type, location: str, generative: bool) -> str:
    """The victim's kind; raises InputError when the model cannot be this kind of victim or the defense
    refuses it (a generator victim is a decoder too)."""
    kind = victim_kind(location, generative)
    if generative and model_type_at(location) is not None and not is_decoder_location(location):
        raise InputError(f"--finetune sft/sft-lora makes an instruction-tuned generator and needs a decoder "
                         f"(causal LM); '{location}' is a '{model_type_at(location)}' model")
    refused = getattr(defense_cls, "unsupported_victims", {})
    for each in ([DECODER, GENERATOR] if kind == GENERATOR else [kind]):
        if each in refused:
            what = "an instruction-tuned generator" if each == GENERATOR else "a decoder"
            raise InputError(f"defense '{defense_cls.name}' does not run on {what} victim: {refused[each]}")
    return kind


def pool_from_attention_mask(model) -> None:
    """Make a decoder classifier pool its last real token when it is given embeddings, not ids.

    transformers finds the pooled token of a decoder classifier from ``input_ids`` (the rightmost
    non-pad id); given ``inputs_embeds`` — which prompt and P-tuning pass, with their virtual tokens in
    front — it takes the last position, a padding position for every shorter row of a right-padded batch.
    This hook on the decoder body moves each row's last attended state to the last position in that case
    (for either padding side), so the head reads the same token as with ids. With ids it does nothing.
    """
    import torch

    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if body is None or getattr(body, "_nlpbd_pools_from_mask", False):
        return

    def hook(module, args, kwargs, output):
        input_ids = args[0] if args else kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        states = getattr(output, "last_hidden_state", None)
        if input_ids is not None or mask is None or states is None or mask.dim() != 2:
            return output
        width = mask.shape[1]
        positions = torch.arange(width, device=mask.device)
        last = (positions * (mask != 0)).argmax(dim=-1)
        source = (positions.unsqueeze(0) - (width - 1 - last).unsqueeze(1)) % width
        output.last_hidden_state = states.gather(1, source.unsqueeze(-1).expand_as(states))
        return output

    body.register_forward_hook(hook, with_kwargs=True)
    body._nlpbd_pools_from_mask = True
