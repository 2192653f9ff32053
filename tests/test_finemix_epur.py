"""Fine-mixing, E-PUR and Fine-mixing + E-PUR on the tiny BERT (defenses.md §1 tests, §3.5, §4.6)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import make_context, tiny_train_config, toy_budget, toy_texts
from transformers import BertConfig, BertModel

from nlpbd.defenses.epur import (
    EPUR,
    EPURConfig,
    EPURSettings,
    FineMixEPUR,
    FineMixEPURConfig,
    epur_scores,
    epur_select,
    token_frequencies,
)
from nlpbd.defenses.finemix import FineMix, FineMixConfig, load_pretrained
from nlpbd.defenses.ft import FT, FTConfig
from nlpbd.errors import InputError
from nlpbd.methods import CleanBudget
from nlpbd.models import head_parameter_names, load_classifier, local_ref
from nlpbd.training import accuracy_of, encode, train_classifier

HEAD = {"classifier.weight", "classifier.bias"}
EMBEDDINGS = "bert.embeddings.word_embeddings.weight"


@pytest.fixture
def ctx(tiny_tokenizer, tiny_ref):
    return make_context(tiny_tokenizer, {"budget", "pretrained"}, budget=toy_budget(), pretrained=tiny_ref)


@pytest.fixture
def epur_ctx(tiny_tokenizer, tiny_ref):
    """A larger D_c, so that some tokens pass the frequency floor f_min = 20."""
    return make_context(tiny_tokenizer, {"budget", "pretrained"}, budget=toy_budget(200), pretrained=tiny_ref)


@pytest.fixture
def pre(tiny_ref):
    return load_classifier(tiny_ref, 2)


def perturbed(model, scale: float = 0.01, seed: int = 123):
    """θ_bd: a copy of ``model`` with Gaussian noise on every parameter (so every entry differs)."""
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in out.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return out


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def finemix(bd, ctx, **changes):
    outcome = FineMix(FineMixConfig(epochs=0, **changes)).repair(copy.deepcopy(bd), ctx)
    return outcome.model, outcome.info


# --- Fine-mixing ----------------------------------------------------------------------------------


def test_rho_one_returns_theta_bd_bit_exactly(tiny_model, ctx):
    bd = perturbed(tiny_model)
    mixed, info = finemix(bd, ctx, rho=1.0)
    expected = bd.state_dict()
    for name, tensor in mixed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert info["mix"]["kept_fraction"] == 1.0 and info["train"] is None


def test_rho_zero_gives_pretrained_encoder_and_keeps_the_head(tiny_model, pre, ctx, tiny_ref):
    bd = perturbed(tiny_model)
    mixed, info = finemix(bd, ctx, rho=0.0)
    assert head_parameter_names(tiny_ref, 2) == HEAD
    bd_params, pre_params = params(bd), params(pre)
    for name, tensor in mixed.named_parameters():
        expected = bd_params[name] if name in HEAD else pre_params[name]
        assert torch.equal(tensor, expected), name
    assert info["mix"]["kept_differing"] == 0
    assert info["mix"]["mixed_tensors"] == len(bd_params) - len(HEAD)
    assert sorted(info["mix"]["head_tensors"]) == sorted(HEAD)


def test_rho_03_picks_each_entry_from_one_side_and_keeps_about_rho(tiny_model, pre, ctx):
    bd = perturbed(tiny_model)
    mixed, info = finemix(bd, ctx, rho=0.3)
    bd_params, pre_params = params(bd), params(pre)
    kept = differing = 0
    for name, tensor in mixed.named_parameters():
        if name in HEAD:
            assert torch.equal(tensor, bd_params[name])
            continue
        from_bd, from_pre = tensor == bd_params[name], tensor == pre_params[name]
        assert bool((from_bd | from_pre).all()), name
        differ = bd_params[name] != pre_params[name]
        kept += int((from_bd & differ).sum())
        differing += int(differ.sum())
    assert differing > 30_000
    assert abs(kept / differing - 0.3) <= 0.01
    assert info["mix"]["kept_differing"] == kept and info["mix"]["differing_entries"] == differing


def test_buffers_are_not_mixed(tiny_model, ctx):
    bd = perturbed(tiny_model)
    with torch.no_grad():
        bd.bert.embeddings.token_type_ids.fill_(1)  # differs from θ_pre's zeros: a mixed buffer would show
    mixed, _ = finemix(bd, ctx, rho=0.3)
    expected = dict(bd.named_buffers())
    buffers = dict(mixed.named_buffers())
    assert set(buffers) == set(expected) and buffers
    for name, tensor in buffers.items():
        assert torch.equal(tensor, expected[name]), name


def test_same_seed_same_mask_other_seed_other_mask(tiny_model, tiny_tokenizer, tiny_ref):
    bd = perturbed(tiny_model)

    def mixed_embeddings(seed: int) -> torch.Tensor:
        ctx = make_context(tiny_tokenizer, {"budget", "pretrained"}, seed=seed, budget=toy_budget(),
                           pretrained=tiny_ref)
        return finemix(bd, ctx, rho=0.5)[0].get_input_embeddings().weight

    first, again, other = mixed_embeddings(0), mixed_embeddings(0), mixed_embeddings(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_ft_equals_finemix_with_rho_one_after_training(tiny_model, tiny_tokenizer, ctx, deterministic):
    bd = copy.deepcopy(tiny_model)
    train_classifier(bd, tiny_tokenizer, toy_texts(32, seed=5), None, tiny_train_config(select="last"), seed=3,
                     device=torch.device("cpu"))
    settings = dict(epochs=2, lr=1e-3, batch_size=8)
    ft = FT(FTConfig(**settings)).repair(copy.deepcopy(bd), ctx).model
    mixed = FineMix(FineMixConfig(rho=1.0, **settings)).repair(copy.deepcopy(bd), ctx).model
    bd_state = bd.state_dict()
    assert not torch.equal(ft.state_dict()[EMBEDDINGS], bd_state[EMBEDDINGS])  # training really happened
    for name, tensor in ft.state_dict().items():
        assert torch.equal(tensor, mixed.state_dict()[name]), name


def test_a_different_architecture_is_refused(tiny_model, tiny_tokenizer, tmp_path):
    other_dir = tmp_path / "other"
    config = BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    BertModel(config).save_pretrained(other_dir)
    ctx = make_context(tiny_tokenizer, {"budget", "pretrained"}, budget=toy_budget(),
                       pretrained=local_ref("other", other_dir))
    with pytest.raises(InputError, match="not the base"):
        FineMix(FineMixConfig(epochs=0)).repair(copy.deepcopy(tiny_model), ctx)
    with pytest.raises(InputError, match="not the base"):
        EPUR(EPURConfig(finetune=False)).repair(copy.deepcopy(tiny_model), ctx)


def test_a_resized_vocabulary_mixes_the_shared_rows_and_keeps_the_new_ones(tiny_model, pre, ctx):
    bd = perturbed(tiny_model)
    rows = bd.get_input_embeddings().weight.shape[0]
    bd.resize_token_embeddings(rows + 3)
    mixed, info = finemix(bd, ctx, rho=0.0)
    weight = mixed.get_input_embeddings().weight
    assert torch.equal(weight[:rows], pre.get_input_embeddings().weight)
    assert torch.equal(weight[rows:], bd.get_input_embeddings().weight[rows:])
    assert info["mix"]["extra_rows_kept"] == 3 and info["base"]["resized"] == [EMBEDDINGS]


def test_head_reinit_takes_the_seeded_fresh_head(tiny_model, ctx, tiny_ref):
    bd = perturbed(tiny_model)
    mixed, info = finemix(bd, ctx, rho=0.5, head="reinit")
    fresh, _ = load_pretrained(tiny_ref, 2, ctx.seed)
    fresh_params, bd_params = params(fresh), params(bd)
    for name in HEAD:
        assert torch.equal(params(mixed)[name], fresh_params[name])
        assert not torch.equal(params(mixed)[name], bd_params[name])
    assert info["mix"]["head"] == "reinit"


def test_magnitude_mode_keeps_the_largest_changes_per_tensor(tiny_model, pre, ctx):
    bd = perturbed(tiny_model)
    mixed, _ = finemix(bd, ctx, rho=0.3, mask_mode="magnitude")
    bd_params, pre_params = params(bd), params(pre)
    for name, tensor in mixed.named_parameters():
        if name in HEAD:
            continue
        change = (bd_params[name] - pre_params[name]).abs()
        kept = (tensor == bd_params[name]) & (bd_params[name] != pre_params[name])
        assert bool(((tensor == bd_params[name]) | (tensor == pre_params[name])).all())
        assert int(kept.sum()) == math.ceil(0.3 * tensor.numel() - 1e-9), name
        assert change[kept].min() >= change[~kept].max(), name


def test_select_rho_keeps_the_smallest_rho_within_tolerance(tiny_model, tiny_tokenizer, ctx):
    bd = copy.deepcopy(tiny_model)
    train_classifier(bd, tiny_tokenizer, toy_texts(200, seed=5), None,
                     tiny_train_config(epochs=10, select="last"), seed=3, device=torch.device("cpu"))
    outcome = FineMix(FineMixConfig(select_rho=True, epochs=1, lr=1e-3, batch_size=8)).repair(
        copy.deepcopy(bd), ctx)
    sweep = outcome.info["select_rho"]
    val = encode(tiny_tokenizer, ctx.budget.val, 32)
    assert sweep["val_accuracy_bd"] == accuracy_of(bd, val, 0, 64, torch.device("cpu"))
    points = sweep["points"]
    assert [p["rho"] for p in points] == sweep["grid"][: len(points)]
    passing = [p["rho"] for p in points if p["val_accuracy"] >= sweep["threshold"]]
    if passing:
        assert sweep["selected_rho"] == passing[0] == points[-1]["rho"] and not sweep["fallback"]
    else:
        assert len(points) == 9 and sweep["fallback"]
    selected = next(p for p in points if p["rho"] == sweep["selected_rho"])
    assert accuracy_of(outcome.model, val, 0, 64, torch.device("cpu")) == selected["val_accuracy"]
    assert outcome.info["rho"] == sweep["selected_rho"]
    assert outcome.info["train"]["steps"] == math.ceil(len(ctx.budget.fit) / 8)  # trained on D_c minus val


@pytest.mark.parametrize("accuracies, selected, fallback", [
    ([0.9, 0.5, 0.87, 0.88, 0.95], 0.3, False),  # θ_bd, then rho 0.1, 0.2, 0.3: stops at the first ≥ 0.88
    ([0.9, 0.5, 0.87, 0.6, 0.87, 0.1, 0.2, 0.3, 0.4, 0.5], 0.2, True),  # none ≥ 0.88: best, ties → smaller rho
])
def test_select_rho_rule(tiny_model, tiny_tokenizer, tiny_ref, monkeypatch, accuracies, selected, fallback):
    # 250 validation rows: one standard error at 0.9 is 0.019, so the 0.02 tolerance stands.
    ctx = make_context(tiny_tokenizer, {"budget", "pretrained"}, budget=toy_budget(1250), pretrained=tiny_ref)
    measured = iter(accuracies)
    monkeypatch.setattr("nlpbd.defenses.finemix._val_accuracy", lambda model, ctx: next(measured))
    outcome = FineMix(FineMixConfig(select_rho=True, epochs=0)).repair(perturbed(tiny_model), ctx)
    sweep = outcome.info["select_rho"]
    assert sweep["selected_rho"] == selected and sweep["fallback"] is fallback
    assert sweep["n_val"] == 250 and sweep["tolerance"] == 0.02
    assert sweep["threshold"] == pytest.approx(0.88)
    assert [p["val_accuracy"] for p in sweep["points"]] == accuracies[1:len(sweep["points"]) + 1]
    assert len(sweep["points"]) == (3 if not fallback else 9)
    assert outcome.info["mix"]["rho"] == selected


def test_select_rho_tolerance_widens_to_one_standard_error(tiny_model, ctx, monkeypatch):
    """On 8 validation rows one row is 12.5 points: a 2-point tolerance would let noise decide."""
    measured = iter([0.875, 0.5, 0.77])
    monkeypatch.setattr("nlpbd.defenses.finemix._val_accuracy", lambda model, ctx: next(measured))
    sweep = FineMix(FineMixConfig(select_rho=True, epochs=0)).repair(perturbed(tiny_model), ctx).info["select_rho"]
    error = math.sqrt(0.875 * 0.125 / 8)
    assert sweep["n_val"] == 8 and sweep["standard_error"] == pytest.approx(error)
    assert sweep["tolerance"] == pytest.approx(error) and sweep["threshold"] == pytest.approx(0.875 - error)
    assert sweep["selected_rho"] == 0.2  # 0.77 ≥ 0.875 − 0.117; the 2-point rule would have gone on


def test_select_rho_trains_on_all_of_d_c_when_validation_comes_from_dev(tiny_model, tiny_tokenizer, tiny_ref):
    rows, dev = toy_texts(40, seed=1), toy_texts(30, seed=9)
    budget = CleanBudget(rows=rows, val=dev, fit=rows, val_source="dev")
    ctx = make_context(tiny_tokenizer, {"budget", "pretrained"}, budget=budget, pretrained=tiny_ref)
    outcome = FineMix(FineMixConfig(select_rho=True, epochs=1, batch_size=8, select_tolerance=1.0)).repair(
        perturbed(tiny_model), ctx)
    sweep = outcome.info["select_rho"]
    assert (sweep["val_source"], sweep["trained_on"], sweep["n_val"]) == ("dev", "D_c", 30)
    assert outcome.info["train"]["steps"] == 5  # all 40 rows of D_c, batches of 8


# --- E-PUR ----------------------------------------------------------------------------------------


def test_token_frequencies_count_ids_and_zero_specials(tiny_tokenizer):
    counts = token_frequencies(tiny_tokenizer, ["cf cf good [CLS]", "good movie"], len(tiny_tokenizer))
    ids = tiny_tokenizer.convert_tokens_to_ids(["cf", "good", "movie", "[CLS]"])
    assert [int(counts[i]) for i in ids] == [2, 2, 1, 0]
    assert int(counts.sum()) == 5


def test_epur_scores_follow_the_formula():
    pre = torch.zeros(3, 2)
    bd = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    scores, deltas = epur_scores(bd, pre, torch.tensor([0, 100, 20]), f_min=20)
    assert deltas.tolist() == [5.0, 2.0, 1.0]
    assert torch.allclose(scores, torch.tensor([5 / math.log(20), 2 / math.log(100), 1 / math.log(20)],
                                               dtype=torch.float64))


def planted_theta_bd(model, tokenizer, budget, seed: int = 7):
    """E_bd = E_pre + noise with norm ∝ ln(max(f, 20)), a large vector on "cf" (f = 0) and on the specials."""
    bd = copy.deepcopy(model)
    weight = bd.get_input_embeddings().weight
    frequencies = token_frequencies(tokenizer, budget.rows.texts, weight.shape[0])
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(weight.shape, generator=generator), dim=1)
    norms = 1e-3 * torch.log(frequencies.clamp(min=20).float())
    cf = tokenizer.convert_tokens_to_ids("cf")
    with torch.no_grad():
        weight.add_(directions * norms[:, None])
        weight[cf] += 1.0 * directions[(cf + 1) % weight.shape[0]]
        for special in tokenizer.all_special_ids:  # would outrank cf if specials were not excluded
            weight[special] += 5.0 * directions[special]
    return bd, frequencies, cf


def test_epur_resets_the_planted_row_and_exactly_n_rows(tiny_model, tiny_tokenizer, pre, epur_ctx):
    bd, frequencies, cf = planted_theta_bd(tiny_model, tiny_tokenizer, epur_ctx.budget)
    assert frequencies[cf] == 0 and int((frequencies > 20).sum()) > 0
    outcome = EPUR(EPURConfig(top_n=10, finetune=False)).repair(copy.deepcopy(bd), epur_ctx)
    selected = outcome.info["epur"]["ids"]
    after, before = outcome.model.get_input_embeddings().weight, bd.get_input_embeddings().weight
    assert cf in selected and selected[0] == cf and len(set(selected)) == 10
    assert not set(selected) & set(tiny_tokenizer.all_special_ids)
    assert torch.equal(after[cf], pre.get_input_embeddings().weight[cf])
    assert torch.equal(after[selected], pre.get_input_embeddings().weight[selected])
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(selected)
    bd_params = params(bd)
    for name, tensor in outcome.model.named_parameters():
        if name != EMBEDDINGS:
            assert torch.equal(tensor, bd_params[name]), name
    assert outcome.info["epur"]["top"][0]["token"] == "cf" and outcome.info["train"] is None


def test_epur_selects_no_unmoved_row(tiny_model, tiny_tokenizer, pre, epur_ctx):
    """Embeddings that never trained (a LoRA victim) give an empty S, recorded as a no-op; rows that did
    not move are never listed, however few rows moved."""
    outcome = EPUR(EPURConfig(top_n=10, finetune=False)).repair(copy.deepcopy(pre), epur_ctx)
    assert outcome.info["epur"]["ids"] == [] and outcome.info["epur"]["epur_noop"]
    assert torch.equal(outcome.model.get_input_embeddings().weight, pre.get_input_embeddings().weight)
    bd = copy.deepcopy(pre)
    with torch.no_grad():
        bd.get_input_embeddings().weight[[40, 41, 42]] += 0.1
    selection = epur_select(bd.get_input_embeddings().weight, pre.get_input_embeddings().weight,
                            torch.zeros(bd.get_input_embeddings().weight.shape[0], dtype=torch.long),
                            tiny_tokenizer.all_special_ids, EPURSettings(top_n=10))
    assert sorted(selection.ids) == [40, 41, 42]


def test_epur_zscore_rule_flags_only_the_outlier(tiny_model, tiny_tokenizer, pre, epur_ctx):
    bd, frequencies, cf = planted_theta_bd(tiny_model, tiny_tokenizer, epur_ctx.budget)
    settings = EPURSettings(rule="zscore")
    selection = epur_select(bd.get_input_embeddings().weight, pre.get_input_embeddings().weight, frequencies,
                            tiny_tokenizer.all_special_ids, settings)
    assert selection.ids == [cf]


def test_finemix_epur_resets_rows_scored_on_theta_bd_after_mixing(tiny_model, tiny_tokenizer, pre, epur_ctx):
    bd, frequencies, cf = planted_theta_bd(perturbed(tiny_model, scale=0.001), tiny_tokenizer, epur_ctx.budget)
    config = FineMixEPURConfig(rho=0.5, epochs=0, top_n=10)
    outcome = FineMixEPUR(config).repair(copy.deepcopy(bd), epur_ctx)
    selected = outcome.info["epur"]["ids"]
    expected = epur_select(bd.get_input_embeddings().weight, pre.get_input_embeddings().weight, frequencies,
                           tiny_tokenizer.all_special_ids, config)
    assert selected == expected.ids and cf in selected
    embeddings_pre = pre.get_input_embeddings().weight
    after = outcome.model.get_input_embeddings().weight
    assert torch.equal(after[selected], embeddings_pre[selected])
    # Outside S the model is exactly Fine-mixing's θ_mix (same mask stream).
    mixed, _ = finemix(bd, epur_ctx, rho=0.5)
    on_mixed = epur_select(mixed.get_input_embeddings().weight, embeddings_pre, frequencies,
                           tiny_tokenizer.all_special_ids, config)
    assert on_mixed.ids != selected  # so the equality above really says "scored on θ_bd"
    others = [i for i in range(after.shape[0]) if i not in selected]
    assert torch.equal(after[others], mixed.get_input_embeddings().weight[others])
    assert not torch.equal(mixed.get_input_embeddings().weight[selected], embeddings_pre[selected])
    mixed_params = params(mixed)
    for name, tensor in outcome.model.named_parameters():
        if name != EMBEDDINGS:
            assert torch.equal(tensor, mixed_params[name]), name
