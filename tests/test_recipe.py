"""RECIPE (defenses.md §7.6): only the intermediate dense weights train (BERT recipe), the regulariser
and its gradient are exact, the regulariser alone shrinks every norm at every step, the pooler option
is honoured, and suspects without an MLM head are grafted first."""

from __future__ import annotations

import pytest
import torch
from helpers import make_context, toy_texts
from transformers import BertForMaskedLM, BertModel

from nlpbd.cache import ArtifactCache
from nlpbd.defenses.recipe import RECIPE, RECIPES, RecipeConfig, recipe_train, regularised_weights, weight_norm_penalty
from nlpbd.methods import DEFENSES, Stage
from nlpbd.models import load_classifier, local_ref
from nlpbd.seeding import seed_everything

INTERMEDIATE = "intermediate.dense.weight"


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def tiny_mlm(tiny_dir) -> BertForMaskedLM:
    seed_everything(0, "test_head")
    return BertForMaskedLM.from_pretrained(tiny_dir)


def test_bert_recipe_changes_only_intermediate_dense_weights(tiny_dir, tiny_tokenizer, deterministic):
    model = tiny_mlm(tiny_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    info = recipe_train(model, tiny_tokenizer, list(toy_texts(64).texts), RecipeConfig(max_steps=3, batch_size=16),
                        seed=0, device=torch.device("cpu"))
    assert info["steps"] == 3 and info["norm_sum_after"] < info["norm_sum_before"]
    assert len(info["regularised"]) == 2  # one per layer of the tiny model
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == name.endswith(INTERMEDIATE), name
    for name, buffer in model.named_buffers():
        assert torch.equal(buffers[name], buffer), name


def test_regulariser_is_the_unsquared_frobenius_sum_with_unit_gradients(tiny_dir):
    model = tiny_mlm(tiny_dir)
    weights = [p for _, p in regularised_weights(model, RECIPES["bert"])]
    penalty = weight_norm_penalty(weights)
    expected = sum(torch.linalg.matrix_norm(w, "fro") for w in weights)
    assert torch.allclose(penalty, expected, rtol=0, atol=1e-6)
    assert torch.allclose(penalty, sum(w.pow(2).sum().sqrt() for w in weights), atol=1e-5)
    penalty.backward()
    for w in weights:
        assert torch.allclose(w.grad, w.detach() / torch.linalg.matrix_norm(w.detach(), "fro"), atol=1e-7)


def test_regulariser_alone_shrinks_every_norm_at_every_step(tiny_dir, tiny_tokenizer):
    model = tiny_mlm(tiny_dir)
    weights = [p for _, p in regularised_weights(model, RECIPES["bert"])]
    history = [[torch.linalg.matrix_norm(w.detach(), "fro").item() for w in weights]]

    def record(_model) -> None:
        history.append([torch.linalg.matrix_norm(w.detach(), "fro").item() for w in weights])

    config = RecipeConfig(max_steps=8, batch_size=16, mlm_term=False, lr=1e-3)
    recipe_train(model, tiny_tokenizer, list(toy_texts(64).texts), config, 0, torch.device("cpu"), after_step=record)
    assert len(history) == 9
    for previous, current in zip(history, history[1:]):
        assert all(c < p for p, c in zip(previous, current)), (previous, current)


def test_recipe_is_reproducible_by_seed(tiny_dir, tiny_tokenizer):
    texts = list(toy_texts(64).texts)
    config = RecipeConfig(max_steps=2, batch_size=16)
    first, second, other = tiny_mlm(tiny_dir), tiny_mlm(tiny_dir), tiny_mlm(tiny_dir)
    for model, seed in ((first, 0), (second, 0), (other, 1)):
        recipe_train(model, tiny_tokenizer, texts, config, seed, torch.device("cpu"))
    name = f"bert.encoder.layer.0.{INTERMEDIATE}"
    weights = [dict(m.named_parameters())[name] for m in (first, second, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_purify_grafts_the_suspect_and_honours_keep_pooler(tiny_dir, tiny_tokenizer, tmp_path):
    suspect = local_ref("suspect", tiny_dir)  # a BertModel with a pooler and no MLM head
    corpus = toy_texts(120, seed=4)
    ctx = make_context(tiny_tokenizer, {"corpus"}, corpus=corpus)
    suspect_pooler = BertModel.from_pretrained(tiny_dir).pooler.dense.weight
    outcomes = {}
    for keep in (False, True):
        out = tmp_path / f"keep-{keep}"
        out.mkdir()
        defense = RECIPE(RecipeConfig(max_steps=2, graft_steps=3, keep_pooler=keep))
        outcomes[keep] = defense.purify(suspect, ctx, out)
        torch.manual_seed(123)
        classifier = load_classifier(str(out), 2)
        assert torch.equal(classifier.bert.pooler.dense.weight, suspect_pooler) == keep
        purified = BertForMaskedLM.from_pretrained(out)
        grafted = BertForMaskedLM.from_pretrained(ArtifactCache().path("mlm-graft", outcomes[keep]["graft"]["key"]))
        assert torch.equal(purified.cls.predictions.transform.dense.weight,
                           grafted.cls.predictions.transform.dense.weight)  # the grafted head stays frozen
    assert outcomes[False]["graft"]["grafted"] and outcomes[True]["graft"]["cached"]  # one graft, reused
    assert outcomes[True]["pooler"] == "copied from the suspect"
    assert outcomes[False]["steps"] == 2 and outcomes[False]["corpus_rows"] == 120
    notes = outcomes[False]["deviations"]
    assert notes[0].startswith("MLM head grafted on the suspect") and "stopped after 2 of" in notes[1]


def test_recipe_is_registered_as_a_pretrained_defense_granted_only_the_corpus():
    cls = DEFENSES.get("recipe")
    assert cls is RECIPE and cls.stage is Stage.PRETRAINED and cls.grants == frozenset({"corpus"})


def test_pooler_reset_control_keeps_the_encoder_and_drops_only_the_pooler(tiny_dir, tiny_tokenizer, tmp_path):
    suspect = local_ref("suspect", tiny_dir)
    ctx = make_context(tiny_tokenizer, {"corpus"}, corpus=toy_texts(40, seed=2))
    info = RECIPE(RecipeConfig(pooler_reset_only=True)).purify(suspect, ctx, tmp_path)
    original = BertModel.from_pretrained(tiny_dir)
    torch.manual_seed(123)
    classifier = load_classifier(str(tmp_path), 2)
    assert info["control"] == "pooler_reset" and info["steps"] == 0
    assert not torch.equal(classifier.bert.pooler.dense.weight, original.pooler.dense.weight)
    encoder = dict(original.named_parameters())
    for name, param in classifier.bert.named_parameters():
        if not name.startswith("pooler."):
            assert torch.equal(param, encoder[name]), name


def test_a_cpu_learning_budget_is_recorded_with_the_budget_it_keeps():
    """1,000 steps at 1e-4 keep the reference's lr × steps (5,000 × 2e-5 = 0.1); the record says so."""
    from nlpbd.defenses.recipe import deviations

    notes = deviations({"steps": 1000, "planned_steps": 5000, "lr": 1e-4}, {"grafted": False})
    assert any("lr × steps = 0.1 (the reference's 5,000 steps: 0.1)" in n for n in notes), notes
    assert any("stopped after 1000 of 5000" in n for n in notes)
    assert deviations({"steps": 5000, "planned_steps": 5000, "lr": 2e-5}, {"grafted": False}) == []
