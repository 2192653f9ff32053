"""D3 (defenses.md §5.8): sphere projection after every step, W^0 captured before the warm-up, biases
never rescaled, the ε = 1e9 isolation of the distance term, both λ branches, layer resolution, and
the grant boundary (D3 never sees θ_pre)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import make_context, toy_budget
from torch import nn
from transformers import (
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from nlpbd.defenses.d3 import (
    D3,
    D3Config,
    SelectedLayers,
    d3_loss,
    detoxify,
    distance,
    make_optimizer,
    project_to_sphere,
    resolve_selected_linears,
    warm_start,
)
from nlpbd.errors import InputError
from nlpbd.methods import AccessDenied
from nlpbd.seeding import torch_generator
from nlpbd.training import collate, encode, pad_id_of

FAST = D3Config(epochs=2, batch_size=8)


@pytest.fixture
def victim(tiny_model):
    """The tiny BERT with non-zero biases (BERT initialises them to 0, which would hide a rescale)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in tiny_model.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(torch.empty(parameter.shape).uniform_(-0.5, 0.5, generator=generator))
    return tiny_model


def budget_context(tokenizer, n: int = 40):
    """Granted D_c only, and no θ_pre object at all: any read of ctx.pretrained would raise."""
    return make_context(tokenizer, {"budget"}, budget=toy_budget(n))


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def norm(tensor: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(tensor)


def layers_of(model: nn.Module, mode: str = "head") -> SelectedLayers:
    return SelectedLayers.capture(resolve_selected_linears(model, mode), 2.0)


# --- §5.8 (1) and (2): the sphere after every step, W^0 before the re-init ------------------------


@pytest.mark.parametrize("mode", ["head+pooler", "all_linear"])
def test_selected_norms_equal_initial_norms_after_every_step(victim, tiny_tokenizer, mode):
    selected = dict(resolve_selected_linears(victim, mode))
    expected = {name: norm(m.weight.detach().clone()) for name, m in selected.items()}
    seen_steps: list[int] = []

    def observe(layers: SelectedLayers, step: int) -> None:
        seen_steps.append(step)
        for name, weight in zip(layers.names, layers.weights):
            torch.testing.assert_close(norm(weight.detach()), expected[name], rtol=1e-5, atol=0)

    info = detoxify(victim, budget_context(tiny_tokenizer), replace(FAST, select=mode), observe=observe)
    assert seen_steps == list(range(0, 11))  # warm-up + 2 epochs × 5 batches of 8
    assert info["steps"] == 10 and info["selected"] == list(selected)


def test_w0_captured_before_reinit(victim, tiny_tokenizer):
    original = {name: m.weight.detach().clone()
                for name, m in resolve_selected_linears(victim, "head+pooler")}
    checked = []

    def observe(layers: SelectedLayers, step: int) -> None:
        if step != 0:
            return
        for name, w0, weight in zip(layers.names, layers.initial, layers.weights):
            assert torch.equal(w0, original[name])  # W^0 is the handed-over weight, not the re-init
            assert not torch.equal(weight, original[name])
            torch.testing.assert_close(norm(weight.detach()), norm(original[name]), rtol=1e-5, atol=0)
        assert distance(layers, 2.0) > 0
        checked.append(step)

    detoxify(victim, budget_context(tiny_tokenizer), replace(FAST, select="head+pooler", epochs=1),
             observe=observe)
    assert checked == [0]


def test_warm_start_methods(victim):
    layers = layers_of(victim, "head+pooler")
    w0 = [w.clone() for w in layers.initial]
    for method, check in [("far", lambda w, o: torch.equal(w, -o)),
                          ("middle", lambda w, o: torch.count_nonzero(w) == 0),
                          ("near", lambda w, o: torch.equal(w, o))]:
        for weight, original in zip(layers.weights, w0):
            weight.data.copy_(original)
        warm_start(layers, method, 2.0, torch_generator(0, "d3.warmup"))
        assert all(check(w.detach(), o) for w, o in zip(layers.weights, w0)), method
    assert all(torch.equal(a, b) for a, b in zip(layers.initial, w0))  # W^0 is a copy, not a view
    warm_start(layers, "noise", 2.0, torch_generator(0, "d3.warmup"))
    draws = torch_generator(0, "d3.warmup")
    for weight, original in zip(layers.weights, w0):  # W^0 + N(0, 1)·std(W^0), one draw per layer in order
        expected = original + torch.randn(original.shape, generator=draws) * original.std()
        assert torch.equal(weight.detach(), expected)


def test_random_warm_start_is_seeded_and_on_sphere(victim):
    layers = layers_of(victim, "head+pooler")
    warm_start(layers, "random", 2.0, torch_generator(3, "d3.warmup"))
    first = [w.detach().clone() for w in layers.weights]
    warm_start(layers, "random", 2.0, torch_generator(3, "d3.warmup"))
    assert all(torch.equal(a, w) for a, w in zip(first, layers.weights))
    for weight, norm0, w0 in zip(layers.weights, layers.norms, layers.initial):
        torch.testing.assert_close(norm(weight.detach()), norm0, rtol=1e-5, atol=0)
        assert not torch.equal(weight, w0)
    warm_start(layers, "random", 2.0, torch_generator(4, "d3.warmup"))
    assert not torch.equal(first[0], layers.weights[0])  # another cell seed, another draw


# --- §5.8 (3): biases are never rescaled ---------------------------------------------------------


def test_biases_untouched_while_weights_projected(victim, tiny_tokenizer):
    """lr = 0: SGD changes nothing, so only the projection acts; noise leaves W off the sphere."""
    selected = dict(resolve_selected_linears(victim, "head+pooler"))
    biases = {name: m.bias.detach().clone() for name, m in selected.items()}
    w0_norms = {name: norm(m.weight.detach()) for name, m in selected.items()}
    noisy: dict[str, torch.Tensor] = {}
    after_first: dict[str, torch.Tensor] = {}

    def observe(layers: SelectedLayers, step: int) -> None:
        store = noisy if step == 0 else after_first if step == 1 else None
        if store is not None:
            store.update({n: w.detach().clone() for n, w in zip(layers.names, layers.weights)})

    config = replace(FAST, select="head+pooler", warmup="noise", lr=0.0, epochs=1)
    detoxify(victim, budget_context(tiny_tokenizer), config, observe=observe)
    for name, module in selected.items():
        assert torch.equal(module.bias, biases[name])
        w0_norm = w0_norms[name]
        torch.testing.assert_close(norm(module.weight.detach()), w0_norm, rtol=1e-5, atol=0)
        assert not torch.isclose(norm(noisy[name]), w0_norm, rtol=1e-3)  # the noise left it
        # whole-tensor rescale: one common factor, the ratio of the norms
        torch.testing.assert_close(after_first[name], noisy[name] * (w0_norm / norm(noisy[name])),
                                   rtol=1e-6, atol=1e-7)


def test_projection_rescales_whole_tensor_not_rows(victim):
    layers = layers_of(victim, "head+pooler")
    biases = [m.bias.detach().clone() for m in layers.modules]
    with torch.no_grad():
        for weight in layers.weights:
            weight[0].mul_(3.0)  # rows of different scale: a per-row rescale would differ
    before = [w.detach().clone() for w in layers.weights]
    project_to_sphere(layers, 2.0)
    for weight, old, norm0, bias, module in zip(layers.weights, before, layers.norms, biases, layers.modules):
        ratio = weight.detach() / old
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(norm0 / norm(old))), rtol=1e-5, atol=0)
        assert torch.equal(module.bias, bias)


# --- §5.8 (4): ε = 1e9 leaves only the distance term ---------------------------------------------


def test_no_clean_term_moves_only_selected_weights(victim, tiny_tokenizer, deterministic):
    before = state_of(victim)
    selected = [name for name, _ in resolve_selected_linears(victim, "head+pooler")]
    warmed: dict[str, torch.Tensor] = {}

    def observe(layers: SelectedLayers, step: int) -> None:
        if step == 0:
            warmed.update({n: w.detach().clone() for n, w in zip(layers.names, layers.weights)})

    config = replace(FAST, select="head+pooler", eps=1e9, epochs=1)
    info = detoxify(victim, budget_context(tiny_tokenizer, n=8), config, observe=observe)
    assert info["steps"] == 1
    after = state_of(victim)
    moved_weights = {f"{name}.weight" for name in selected}
    for name, value in after.items():
        if name in moved_weights:
            continue
        assert torch.equal(value, before[name]), name  # includes the selected layers' biases
    for name in selected:
        weight = after[f"{name}.weight"]
        assert not torch.equal(weight, warmed[name])
        torch.testing.assert_close(norm(weight), norm(before[f"{name}.weight"]), rtol=1e-5, atol=0)


def test_distance_off_is_the_matched_control(victim, tiny_tokenizer, deterministic):
    """distance=false with ε = 1e9: nothing pushes, so the warmed-up weights stay where they are."""
    warmed: dict[str, torch.Tensor] = {}

    def observe(layers: SelectedLayers, step: int) -> None:
        if step == 0:
            warmed.update({n: w.detach().clone() for n, w in zip(layers.names, layers.weights)})

    config = replace(FAST, eps=1e9, epochs=1, distance=False)
    detoxify(victim, budget_context(tiny_tokenizer, n=8), config, observe=observe)
    torch.testing.assert_close(victim.classifier.weight.detach(), warmed["classifier"], rtol=1e-6, atol=0)


# --- §5.8 (5): the loss branches ----------------------------------------------------------------


def fixed_batch(model, tokenizer):
    budget = toy_budget(8)
    batch = collate(encode(tokenizer, budget.rows, 32), list(range(8)), pad_id_of(tokenizer), torch.device("cpu"))
    labels = batch.pop("labels")
    model.eval()
    return model(**batch).logits, labels


@pytest.mark.parametrize("lam", [10.0, 1.0, 0.5])
def test_loss_branches(victim, tiny_tokenizer, lam):
    layers = layers_of(victim, "head+pooler")
    warm_start(layers, "random", 2.0, torch_generator(0, "d3.warmup"))
    logits, labels = fixed_batch(victim, tiny_tokenizer)
    dist = distance(layers, 2.0)
    loss, clean = d3_loss(logits, labels, dist, lam, 0.1)

    expected_clean = F.relu(F.cross_entropy(logits, labels, reduction="none") - 0.1).mean()
    expected_dist = sum(norm(w - w0) for w, w0 in zip(layers.weights, layers.initial))
    expected = (lam * expected_clean - expected_dist) / (lam + 1) if lam > 1 else lam * expected_clean - expected_dist
    assert clean > 0 and dist > 0
    torch.testing.assert_close(clean, expected_clean, rtol=1e-6, atol=0)
    torch.testing.assert_close(dist, expected_dist, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    if lam == 10.0:
        torch.testing.assert_close(loss, (10 * expected_clean - expected_dist) / 11, rtol=1e-6, atol=0)


def test_hinge_is_per_sample():
    logits = torch.tensor([[5.0, -5.0], [0.0, 0.0]])  # CE ≈ 4.5e-5 (below ε) and ln 2 (above)
    labels = torch.tensor([0, 0])
    _, clean = d3_loss(logits, labels, torch.tensor(0.0), 0.5, 0.1)
    ce = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(clean, (ce[1] - 0.1) / 2)
    assert not torch.isclose(clean, F.relu(ce.mean() - 0.1))


# --- zero subgradient at W = W^0 ------------------------------------------------------------------


def test_distance_has_zero_gradient_at_w0(victim):
    layers = layers_of(victim, "head+pooler")
    dist = distance(layers, 2.0)
    dist.backward()
    assert dist.item() == 0.0
    assert all(torch.count_nonzero(w.grad) == 0 for w in layers.weights)


def test_near_warmup_first_step_is_finite(victim, tiny_tokenizer):
    finite = []

    def observe(layers: SelectedLayers, step: int) -> None:
        finite.append([torch.isfinite(w).all().item() for w in layers.weights])

    info = detoxify(victim, budget_context(tiny_tokenizer, n=8), replace(FAST, warmup="near", epochs=1),
                    observe=observe)
    assert info["non_finite_losses"] == 0 and info["non_finite_grads"] == 0
    assert finite == [[True], [True]]  # after the warm-up and after the first step
    assert all(torch.isfinite(p).all() for p in victim.parameters())


# --- layer resolution -----------------------------------------------------------------------------


def test_bert_layer_selection(victim):
    names = lambda mode: [n for n, _ in resolve_selected_linears(victim, mode)]  # noqa: E731
    assert names("head") == ["classifier"]
    assert names("head+pooler") == ["bert.pooler.dense", "classifier"]
    every_linear = [n for n, m in victim.named_modules() if isinstance(m, nn.Linear)]
    assert names("all_linear") == every_linear
    assert len(every_linear) == 2 * 6 + 2  # q, k, v, attention output, intermediate, output; pooler; head


def test_other_architectures_and_unknown_ones():
    small = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=64)
    roberta = RobertaForSequenceClassification(RobertaConfig(**small, pad_token_id=1))
    assert [n for n, _ in resolve_selected_linears(roberta, "head")] == ["classifier.dense", "classifier.out_proj"]
    assert resolve_selected_linears(roberta, "head+pooler") == resolve_selected_linears(roberta, "head")
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2,
                                                                  hidden_dim=32, max_position_embeddings=64))
    assert [n for n, _ in resolve_selected_linears(distil, "head")] == ["pre_classifier", "classifier"]
    assert len(resolve_selected_linears(distil, "all_linear")) == 6 + 2
    deberta = DebertaV2ForSequenceClassification(DebertaV2Config(**small))
    assert [n for n, _ in resolve_selected_linears(deberta, "head+pooler")] == ["pooler.dense", "classifier"]
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    assert [n for n, _ in resolve_selected_linears(gpt2, "head")] == ["score"]
    gpt2.config.model_type = "mystery"
    with pytest.raises(InputError, match="model type 'mystery'"):
        resolve_selected_linears(gpt2, "head")


def test_bert_without_pooler_rejects_head_plus_pooler(victim):
    victim.bert.pooler = None
    assert [n for n, _ in resolve_selected_linears(victim, "head")] == ["classifier"]
    with pytest.raises(InputError, match="bert.pooler.dense"):
        resolve_selected_linears(victim, "head+pooler")


def test_optimizers(victim):
    sgd = make_optimizer(victim, D3Config())
    (group,) = sgd.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 0.0)
    assert len(group["params"]) == len(list(victim.parameters()))  # all parameters, as in the reference
    adamw = make_optimizer(victim, D3Config(optimizer="adamw"))
    encoder, head = adamw.param_groups
    assert (encoder["lr"], head["lr"], head["weight_decay"]) == (2e-5, 1e-3, 0.0)
    assert {id(p) for p in head["params"]} == {id(victim.classifier.weight), id(victim.classifier.bias)}
    assert len(encoder["params"]) + 2 == len(list(victim.parameters()))


# --- the defense as the pipeline calls it ---------------------------------------------------------


def test_repair_uses_budget_only_and_is_reproducible(tiny_dir, tiny_tokenizer, deterministic):
    from nlpbd.models import load_classifier

    assert D3.grants == frozenset({"budget"})
    ctx = budget_context(tiny_tokenizer)
    with pytest.raises(AccessDenied):
        _ = ctx.pretrained
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = load_classifier(str(tiny_dir), 2)
        outcome = D3(replace(FAST, epochs=1)).repair(model, ctx)
        runs.append((state_of(outcome.model), outcome.info))
    (first, info), (second, _) = runs
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert info["selected"] == ["classifier"] and len(info["epoch_clean_loss"]) == 1
    assert info["final_distance"] > 0 and info["settings"]["lam"] == 0.5


# --- §5.3: the sign-flip escape through the tanh pooler -------------------------------------------


@pytest.fixture(scope="module")
def trained_victim(tiny_dir, tiny_tokenizer):
    """The tiny BERT fitted to the toy task, so the clean hinge has something to keep."""
    from helpers import tiny_train_config, toy_texts

    from nlpbd.models import load_classifier
    from nlpbd.training import train_classifier

    torch.manual_seed(0)
    model = load_classifier(str(tiny_dir), 2)
    train_classifier(model, tiny_tokenizer, toy_texts(400), None, tiny_train_config(epochs=10, select="last"), 0)
    return model


def escape_run(model, tokenizer, freeze: str) -> dict:
    config = D3Config(epochs=60, batch_size=8, lr=0.05, freeze=freeze)
    return detoxify(copy.deepcopy(model), budget_context(tokenizer), config)


def test_trainable_pooler_lets_the_head_reach_its_antipode_for_free(trained_victim, tiny_tokenizer):
    """The old setting: the head goes (almost) to −W^0 while the pooler re-fits and the clean loss stays low."""
    info = escape_run(trained_victim, tiny_tokenizer, "none")
    assert info["frozen"] == []
    assert info["distance_fraction_of_max"][0] > 0.9 and info["cosine_to_initial"][0] < -0.7
    assert info["epoch_clean_loss"][-1] < 0.05  # the distance was met at (almost) no clean cost
    assert info["sign_symmetric_cosine"]["bert.pooler.dense"] < 0.9  # the pooler moved to compensate


def test_frozen_pooler_closes_the_escape(trained_victim, tiny_tokenizer):
    model = copy.deepcopy(trained_victim)
    pooler = {n: p.detach().clone() for n, p in model.bert.pooler.named_parameters()}
    info = detoxify(model, budget_context(tiny_tokenizer), D3Config(epochs=60, batch_size=8, lr=0.05))
    assert info["frozen"] == ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
    assert all(torch.equal(p, pooler[n]) for n, p in model.bert.pooler.named_parameters())
    assert info["sign_symmetric_cosine"] == {"bert.pooler.dense": 1.0}
    assert info["distance_fraction_of_max"][0] < 0.8 and info["cosine_to_initial"][0] > -0.5
    assert info["antipodal_layers"] == []
    assert all(p.requires_grad for p in model.parameters())  # the freeze is undone afterwards


def test_selected_pooler_keeps_its_weight_trainable_and_its_bias_frozen(victim):
    from nlpbd.defenses.d3 import sign_symmetric_parameters

    frozen = sign_symmetric_parameters(victim, resolve_selected_linears(victim, "head+pooler"))
    assert list(frozen) == ["bert.pooler.dense.bias"]
    assert list(sign_symmetric_parameters(victim, resolve_selected_linears(victim, "head"))) == [
        "bert.pooler.dense.weight", "bert.pooler.dense.bias"]


def test_roberta_head_tanh_bias_is_frozen():
    from nlpbd.defenses.d3 import sign_symmetric_parameters

    model = RobertaForSequenceClassification(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=32))
    frozen = sign_symmetric_parameters(model, resolve_selected_linears(model, "head"))
    assert list(frozen) == ["classifier.dense.bias"]  # the dense layer feeding the tanh is selected


def test_input_norm_gain_is_watched_not_frozen(trained_victim, tiny_tokenizer):
    """The LayerNorm the pooler reads could negate the pooler's input; the record says whether it flipped."""
    model = copy.deepcopy(trained_victim)
    norm_module = model.bert.encoder.layer[-1].output.LayerNorm
    info = detoxify(model, budget_context(tiny_tokenizer), D3Config(epochs=2, batch_size=8))
    path = "bert.encoder.layer.-1.output.LayerNorm"
    assert list(info["input_norm_gain_cosine"]) == [path]
    assert 0.9 < info["input_norm_gain_cosine"][path] <= 1.0  # two epochs: moved a little, not flipped
    assert path not in info["sign_symmetric_cosine"] and not any(n.startswith(path) for n in info["frozen"])
    with torch.no_grad():
        norm_module.weight.neg_()
    from nlpbd.defenses.d3 import sign_symmetric_weights

    assert torch.equal(sign_symmetric_weights(model)[path], norm_module.weight)


def test_layout_paths_index_the_last_layer_of_every_encoder():
    from transformers import BertConfig, BertForSequenceClassification

    from nlpbd.defenses.d3 import LAYOUTS, _module_at

    small = {"vocab_size": 50, "num_attention_heads": 2}
    bert = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=2, intermediate_size=32, **small))
    assert _module_at(bert, LAYOUTS["bert"].input_norm, "bert") is bert.bert.encoder.layer[1].output.LayerNorm
    distil = DistilBertForSequenceClassification(DistilBertConfig(dim=16, n_layers=2, hidden_dim=32, n_heads=2,
                                                                  vocab_size=50))
    assert (_module_at(distil, LAYOUTS["distilbert"].input_norm, "distilbert")
            is distil.distilbert.transformer.layer[1].output_layer_norm)
    with pytest.raises(InputError, match="has no 'bert.encoder.layer.7"):
        _module_at(bert, "bert.encoder.layer.7.output.LayerNorm", "bert")
