"""Attack stealthiness: how far a data-poisoning attack's triggered test rows are from their clean originals.

As OpenBackdoor's ``Evaluator`` reports it, over the pairs (poisoned test row, the clean row it was made from):

- ``delta_ppl``: mean of ``PPL(poisoned) − PPL(original)`` under a causal LM (OpenBackdoor: GPT-2 large;
  offline here: SmolLM2-135M-Instruct, ``eval.stealth_lm``), perplexity as in :mod:`nlpbd.lm`;
- ``sim``: mean cosine similarity of sentence embeddings. OpenBackdoor calls it "USE" but computes it
  with sentence-transformers' ``paraphrase-distilroberta-base-v1``; neither is available offline, so the
  offline all-MiniLM-L6-v2 (mean pooling over real tokens, L2-normalised, as that model is meant to be
  used) stands in for both. Numbers are therefore comparable between our attacks, not with the papers'.

Grammar errors (OpenBackdoor's ΔGE, LanguageTool through ``language_tool_python``) are left out: that
package downloads the LanguageTool server (Java) from the web at first use, and Debian ships no
LanguageTool package; the offline checkers there (Lightproof, link-grammar) count different things.

Rows whose clean original is unknown (the attack cannot align them) or empty are skipped; the counts
are recorded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from nlpbd.lm import CausalLM
from nlpbd.models import resolve_model
from nlpbd.training import sorted_batches

STEALTH_VERSION = "1"  # bump when a measure changes
SIM_MODEL = "minilm"


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings of an encoder (all-MiniLM-L6-v2 by default)."""

    def __init__(self, name: str, device: torch.device, max_length: int = 128, batch_size: int = 64):
        ref = resolve_model(name)
        self.identity = ref.identity
        self.tokenizer = AutoTokenizer.from_pretrained(ref.location)
        self.model = AutoModel.from_pretrained(ref.location).to(device).eval()
        self.device, self.max_length, self.batch_size = device, max_length, batch_size

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        out = np.zeros((len(ids), self.model.config.hidden_size), dtype=np.float32)
        pad = self.tokenizer.pad_token_id or 0
        for batch in sorted_batches([len(s) for s in ids], self.batch_size):
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            hidden = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device))[0]
            weights = mask.to(self.device).unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            out[batch] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return out


def aligned_pairs(poisoned: Sequence[str], originals: Sequence[str | None]) -> tuple[list[str], list[str]]:
    """The (poisoned, original) pairs whose original is known and both texts are non-empty."""
    pairs = [(p, o) for p, o in zip(poisoned, originals) if o is not None and p.strip() and o.strip()]
    return [p for p, _ in pairs], [o for _, o in pairs]


def stealth_metrics(poisoned: Sequence[str], originals: Sequence[str | None], lm: CausalLM,
                    encoder: SentenceEncoder) -> dict:
    """ΔPPL and embedding similarity over the aligned pairs, with the counts behind them."""
    triggered, clean = aligned_pairs(poisoned, originals)
    base = {"stealth_rows": len(triggered), "stealth_unaligned": len(poisoned) - len(triggered)}
    if not triggered:
        return {**base, "delta_ppl": None, "sim": None}
    ppl_poisoned, ppl_clean = lm.perplexities(triggered), lm.perplexities(clean)
    similarity = (encoder.encode(triggered) * encoder.encode(clean)).sum(axis=1)
    return {**base, "delta_ppl": float(np.mean(ppl_poisoned - ppl_clean)),
            "ppl_poisoned": float(np.mean(ppl_poisoned)), "ppl_clean": float(np.mean(ppl_clean)),
            "ppl_poisoned_median": float(np.median(ppl_poisoned)), "ppl_clean_median": float(np.median(ppl_clean)),
            "sim": float(np.mean(similarity))}
