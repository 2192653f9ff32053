"""Sentence representations of a sequence classifier, for defenses that inspect the victim (BKI, CUBE)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nlpbd.decoders import is_decoder_type
from nlpbd.errors import InputError
from nlpbd.training import autocast, collate, encode, pad_id_of, sorted_batches


def first_token_state(model: PreTrainedModel, batch: dict, pooled: bool) -> torch.Tensor:
    """The last layer's first-token ([CLS]) hidden state, or its pooler output where the encoder has a pooler.

    A decoder's first token has seen nothing after it: its sentence state is the last non-padding token's,
    the one its classification head reads (batches are right-padded)."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    state = outputs.hidden_states[-1]
    if is_decoder_type(getattr(model.config, "model_type", None)):
        last = batch["attention_mask"].sum(dim=1) - 1
        return state[torch.arange(state.shape[0], device=state.device), last]
    pooler = getattr(model.base_model, "pooler", None) if pooled else None
    return pooler(state) if pooler is not None else state[:, 0]


@torch.no_grad()
def sentence_states(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                    max_length: int, batch_size: int, device: torch.device, pooled: bool = False) -> np.ndarray:
    """One vector per text (eval mode, length-sorted batches), in the input order."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        raise InputError("this defense reads the victim's first-token state, which a prompt-type victim's virtual "
                         "tokens displace; use --finetune full or lora")
    encoded = encode(tokenizer, list(texts), max_length)
    model.to(device).eval()
    out: list[np.ndarray | None] = [None] * len(encoded)
    for indices in sorted_batches(encoded.lengths, batch_size):
        batch = collate(encoded, indices, pad_id_of(tokenizer), device)
        with autocast(device):
            states = first_token_state(model, batch, pooled).float().cpu().numpy()
        for i, row in zip(indices, states):
            out[i] = row
    return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)
