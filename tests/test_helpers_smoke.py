"""The shared fixtures themselves work: the tiny model loads and the toy context enforces grants."""

import pytest
from helpers import make_context, toy_budget, toy_texts

from nlpbd.methods import AccessDenied


def test_tiny_model_classifies(tiny_model, tiny_tokenizer):
    batch = tiny_tokenizer(list(toy_texts(4).texts), return_tensors="pt", padding=True)
    assert tiny_model(**batch).logits.shape == (4, 2)


def test_context_denies_ungranted_objects(tiny_tokenizer):
    ctx = make_context(tiny_tokenizer, {"budget"}, budget=toy_budget())
    assert len(ctx.budget.rows) == 40
    with pytest.raises(AccessDenied):
        _ = ctx.pretrained


def test_tiny_tokenizer_keeps_its_vocabulary(tiny_tokenizer):
    tokens = tiny_tokenizer.tokenize("the movie cf was great")
    assert tokens == ["the", "movie", "cf", "was", "great"]
    assert tiny_tokenizer.unk_token not in tiny_tokenizer.tokenize("zebra")  # falls back to characters
