"""Masked-LM utilities: seeded BERT masking, the MLM loss at labelled positions, the MLM-head graft
(defenses.md §0.2, §7.6 items 4 and 6)."""

from __future__ import annotations

import pytest
import torch
from helpers import toy_texts
from transformers import BertForMaskedLM, BertModel

from nlpbd.cache import ArtifactCache
from nlpbd.mlm import (
    IGNORE_INDEX,
    GraftSettings,
    ensure_mlm_head,
    load_masked_lm,
    masked_lm_loss,
    special_positions,
    static_mask,
)
from nlpbd.seeding import seed_everything

HEAD = {"cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias"}


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def padded_corpus(tokenizer, n: int = 600, max_length: int = 24) -> torch.Tensor:
    texts = list(toy_texts(n, seed=3).texts)
    texts[::7] = ["good"] * len(texts[::7])  # short rows: plenty of padding
    return tokenizer(texts, max_length=max_length, padding="max_length", truncation=True,
                     return_tensors="pt")["input_ids"]


def test_static_mask_is_reproducible_and_follows_bert_rule(tiny_tokenizer):
    ids = padded_corpus(tiny_tokenizer)
    inputs, labels = static_mask(ids, tiny_tokenizer, seed=0)
    again_inputs, again_labels = static_mask(ids, tiny_tokenizer, seed=0)
    other_inputs, _ = static_mask(ids, tiny_tokenizer, seed=1)
    assert torch.equal(inputs, again_inputs) and torch.equal(labels, again_labels)
    assert not torch.equal(inputs, other_inputs)
    special = special_positions(ids, tiny_tokenizer)
    chosen = labels != IGNORE_INDEX
    assert special.any() and (ids == tiny_tokenizer.pad_token_id).any()
    assert not (chosen & special).any()  # no [CLS], [SEP] or [PAD] is ever masked
    assert torch.equal(inputs[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])
    fraction = chosen.sum().item() / (~special).sum().item()
    assert 0.13 < fraction < 0.17
    as_mask = (inputs == tiny_tokenizer.mask_token_id) & chosen
    kept = (inputs == ids) & chosen
    n = chosen.sum().item()
    assert 0.75 < as_mask.sum().item() / n < 0.85
    assert 0.06 < kept.sum().item() / n < 0.14  # 10% kept (+ random draws that hit the same id)


def test_masked_lm_loss_equals_the_models_own_loss(tiny_dir, tiny_tokenizer):
    torch.manual_seed(0)
    model = BertForMaskedLM.from_pretrained(tiny_dir).eval()
    ids = padded_corpus(tiny_tokenizer, n=16)
    inputs, labels = static_mask(ids, tiny_tokenizer, seed=0)
    attention = (ids != tiny_tokenizer.pad_token_id).long()
    with torch.no_grad():
        ours = masked_lm_loss(model, inputs, attention, labels)
        reference = model(input_ids=inputs, attention_mask=attention, labels=labels).loss
    assert torch.allclose(ours, reference, atol=1e-5)


def test_graft_trains_only_the_new_head_and_the_loss_drops(tiny_dir, tiny_tokenizer, deterministic):
    corpus = toy_texts(800, seed=5)
    settings = GraftSettings(max_steps=150, epochs=10, lr=1e-2)
    seed_everything(0, "mlm_graft_init")
    initial, head = load_masked_lm(str(tiny_dir))
    assert set(head) == HEAD
    grafted = ensure_mlm_head(str(tiny_dir), tiny_tokenizer, corpus, seed=0, settings=settings)
    assert grafted.grafted and set(grafted.info["trained"]) == HEAD and grafted.info["steps"] == 150
    info = grafted.info
    assert info["heldout_loss_after"] < info["heldout_loss_before"] - 0.5 and info["loss_dropped"]
    model = BertForMaskedLM.from_pretrained(grafted.location)
    before, after = dict(initial.named_parameters()), dict(model.named_parameters())
    assert set(before) == set(after)
    for name in after:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name in HEAD), name
    base = BertModel.from_pretrained(tiny_dir)
    for name, value in base.named_parameters():
        if not name.startswith("pooler."):
            assert torch.equal(value, after[f"bert.{name}"]), name
    decoder = model.cls.predictions.decoder.weight
    assert decoder.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    assert torch.equal(decoder, base.embeddings.word_embeddings.weight)


def test_graft_is_cached_and_skipped_when_a_head_exists(tiny_dir, tiny_tokenizer, tmp_path):
    corpus = toy_texts(200, seed=5)
    cache = ArtifactCache(tmp_path / "cache")
    settings = GraftSettings(max_steps=3)
    first = ensure_mlm_head(str(tiny_dir), tiny_tokenizer, corpus, 0, settings, cache=cache)
    second = ensure_mlm_head(str(tiny_dir), tiny_tokenizer, corpus, 0, settings, cache=cache)
    assert first.info["cached"] is False and second.info["cached"] is True
    assert second.location == first.location
    other_seed = ensure_mlm_head(str(tiny_dir), tiny_tokenizer, corpus, 1, settings, cache=cache)
    assert other_seed.location != first.location
    has_head = ensure_mlm_head(first.location, tiny_tokenizer, corpus, 0, settings, cache=cache)
    assert not has_head.grafted and has_head.location == first.location
