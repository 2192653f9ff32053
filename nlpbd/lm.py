"""Sentence perplexity under a causal language model (ONION's suspicion scores, attack stealthiness).

``PPL(x) = exp(mean_t −log p(x_t | x_<t))`` over the tokens of ``x``. Each text is prefixed with a
document-start token, so every token of the text, the first included, is predicted, and an empty text
has no perplexity (``inf``). Padding is masked out of the mean. The start token is ``<|endoftext|>``
where the vocabulary has it (GPT-2 and SmolLM2 separate pretraining documents with it; SmolLM2's
declared BOS is the chat token ``<|im_start|>``, after which plain text is 4x less likely), else the
tokenizer's BOS, else its eos.

Deviations from the reference code (ONION's ``gptlm.py``, OpenBackdoor's ``GPT2LM``): they feed the
text without a start token, so the first token is never scored and a one-token text has no loss;
OpenBackdoor pads a batch with eos and leaves the padding inside each sentence's loss, so a sentence's
perplexity depends on the longest sentence of its batch. Both truncate at 96 tokens, as we do by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nlpbd.training import autocast, sorted_batches

DOCUMENT_START = "<|endoftext|>"


@dataclass
class CausalLM:
    """A causal LM with its tokenizer, scoring texts in length-sorted padded batches."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    max_length: int = 96
    batch_size: int = 32
    calls: int = 0  # texts scored so far (the cost of a method that uses the LM)

    def start_id(self) -> int:
        tok = self.tokenizer
        document = tok.convert_tokens_to_ids(DOCUMENT_START)
        if isinstance(document, int) and document != tok.unk_token_id or tok.unk_token == DOCUMENT_START:
            return document
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        ids = self.tokenizer(list(texts), add_special_tokens=False, truncation=True,
                             max_length=self.max_length)["input_ids"]
        return [[self.start_id(), *seq] for seq in ids]

    @torch.no_grad()
    def perplexities(self, texts: Sequence[str]) -> np.ndarray:
        """PPL of every text, in the input order (``inf`` for a text with no tokens)."""
        encoded = self.encode(texts)
        out = np.full(len(encoded), np.inf)
        self.model.to(self.device).eval()
        for indices in sorted_batches([len(s) for s in encoded], self.batch_size):
            scored = [i for i in indices if len(encoded[i]) > 1]
            if scored:
                out[scored] = self._batch_ppl([encoded[i] for i in scored])
        self.calls += len(encoded)
        return out

    def _batch_ppl(self, sequences: list[list[int]]) -> np.ndarray:
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        with autocast(self.device):
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        nll = token_nll(logits.float(), ids, mask)
        return torch.exp(nll).cpu().numpy()


def token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood per row over its real (unpadded) predicted tokens."""
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = ids[:, 1:]
    picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    weight = mask[:, 1:].to(picked.dtype)
    return -(picked * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)


def load_lm(name: str, device: torch.device, max_length: int = 96, batch_size: int = 32) -> tuple[CausalLM, dict]:
    """A registered causal LM (``smollm2``), a local directory or a hub id, with what to record."""
    from nlpbd.models import load_causal_lm, resolve_model

    ref = resolve_model(name)
    model, tokenizer = load_causal_lm(ref)
    return CausalLM(model, tokenizer, device, max_length, batch_size), {
        "lm": ref.name, "lm_identity": ref.identity, "lm_source": ref.info.get("source", ref.location)}
