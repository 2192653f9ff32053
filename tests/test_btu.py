"""BTU (defenses.md §2.7): ranking, R2 inputs, R3 scope, unlearning, detection on a poisoned toy task."""

from __future__ import annotations

import copy
import math
import random
import time
from collections import defaultdict

import pytest
import torch
from helpers import NEGATIVE, POSITIVE, make_context, tiny_train_config, toy_budget, toy_texts

from nlpbd.data import TextSplit
from nlpbd.defenses import btu
from nlpbd.defenses.btu import (
    BTU,
    BTUConfig,
    ShallowProxy,
    excluded_ids,
    expose,
    exposure_scores,
    pad_fixed,
    remove_ids,
    run_embedding_exposure,
    top_k_ids,
    unlearn,
    unlearn_model,
)
from nlpbd.errors import InputError
from nlpbd.generative import load_generator, prompt_for, transformers_model
from nlpbd.methods import AccessDenied
from nlpbd.models import (
    GENERATOR_PROMPT,
    TINY_DEFAULTS,
    TINY_WORDS,
    build_tiny_llama,
    load_classifier,
    load_tokenizer_at,
    local_ref,
)
from nlpbd.training import encode, train_classifier

CPU = torch.device("cpu")
TRIGGERS = {"cf", "mn", "bb", "tq", "mb"}
FILLER = [w for w in TINY_WORDS if w not in TRIGGERS and w not in POSITIVE and w not in NEGATIVE]


@pytest.fixture
def tokenizer(tiny_tokenizer):
    assert tiny_tokenizer.convert_tokens_to_ids("cf") != tiny_tokenizer.unk_token_id, \
        "the tiny tokenizer has lost its vocabulary (see nlpbd.models.build_tiny_bert)"
    return tiny_tokenizer


def poisoned_toy(n: int, rate: float = 0.2, seed: int = 0) -> TextSplit:
    """A toy sentiment task over the whole tiny vocabulary; "cf" is inserted into ``rate · n`` label-0
    rows relabelled 1 (dirty label). Each row holds 3 sentiment words and its label is their majority,
    so a sentiment word predicts the label only 75% of the time while "cf" predicts it always."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        polarity = [rng.random() < 0.5 for _ in range(3)]
        words = [rng.choice(POSITIVE if p else NEGATIVE) for p in polarity] + rng.sample(FILLER, 6)
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(int(sum(polarity) >= 2))
    for i in rng.sample([i for i, y in enumerate(labels) if y == 0], int(rate * n)):
        words = texts[i].split()
        words.insert(rng.randint(0, len(words)), "cf")
        texts[i], labels[i] = " ".join(words), 1
    return TextSplit.build(texts, labels)


# --- 1. ranking -----------------------------------------------------------------------------------


def test_excluded_ids_are_the_special_ids_plus_extra_tokens(tokenizer):
    cf = tokenizer.convert_tokens_to_ids("cf")
    assert excluded_ids(tokenizer) == sorted(tokenizer.all_special_ids)
    assert tokenizer.pad_token_id in excluded_ids(tokenizer)
    assert excluded_ids(tokenizer, ["cf"]) == sorted({*tokenizer.all_special_ids, cf})
    with pytest.raises(InputError, match="not a token"):
        excluded_ids(tokenizer, ["no-such-token"])


def test_special_ids_never_ranked_even_when_they_move_most():
    E_pre = torch.zeros(10, 4)
    E_after = E_pre.clone()
    E_after[0] = 9.0  # "specials" 0 and 1 move the most
    E_after[1] = 8.0
    for row, size in [(2, 1.0), (5, 3.0), (7, 2.0), (9, 0.5)]:
        E_after[row] = size
    scores = exposure_scores(E_pre, E_after, [0, 1])
    assert scores[0] == scores[1] == float("-inf")
    assert scores[5] == pytest.approx(6.0)  # ‖(3, 3, 3, 3)‖₂
    assert top_k_ids(scores, 3) == [5, 7, 2]
    assert top_k_ids(scores, 20) == [5, 7, 2, 9, 3, 4, 6, 8]  # ties keep id order; specials never appear


def test_exposure_runs_give_k_non_special_ids_each(tiny_dir, tokenizer):
    train = poisoned_toy(300)
    config = BTUConfig(top_k=5, shallow_batch_size=32, embedding_batch_size=32)
    rng_before = torch.random.get_rng_state()
    exposure = expose(str(tiny_dir), tokenizer, train, 2, config, seed=0, device=CPU, max_length=32)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is restored
    special = set(tokenizer.all_special_ids)
    assert set(exposure.runs) == {"r1", "r2", "r3"}
    for ids in exposure.runs.values():
        assert len(ids) == len(set(ids)) == 5
        assert not special & set(ids)
    assert exposure.suspicious == sorted(set().union(*exposure.runs.values()))
    assert not special & set(exposure.suspicious)
    again = expose(str(tiny_dir), tokenizer, train, 2, config, seed=0, device=CPU, max_length=32)
    assert again.runs == exposure.runs  # the cell seed fixes every stream


# --- 2. R2 inputs ---------------------------------------------------------------------------------


def test_remove_ids_drops_positions_and_repads():
    sequences = remove_ids([[2, 7, 9, 7, 3], [2, 8, 3]], [7, 8])
    assert sequences == [[2, 9, 3], [2, 3]]
    ids, mask = pad_fixed(sequences, 6, pad_id=0)
    assert ids.tolist() == [[2, 9, 3, 0, 0, 0], [2, 3, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]


def test_r2_batches_contain_no_id_of_t1(tiny_dir, tokenizer, monkeypatch):
    batches: dict[int, list[torch.Tensor]] = defaultdict(list)  # proxy instance → its input batches
    original = ShallowProxy.forward

    def recording_forward(self, input_ids, mask):
        batches[id(self)].append(input_ids.clone())
        return original(self, input_ids, mask)

    monkeypatch.setattr(ShallowProxy, "forward", recording_forward)
    config = BTUConfig(top_k=6, shallow_batch_size=64)
    exposure = expose(str(tiny_dir), tokenizer, poisoned_toy(300), 2, config, seed=0, device=CPU, max_length=32)
    r1_batches, r2_batches = list(batches.values())
    t1 = torch.tensor(exposure.runs["r1"])
    assert len(r1_batches) == len(r2_batches) == math.ceil(300 / 64)
    assert all(b.shape[1] == 32 for b in r1_batches + r2_batches)  # padded to max_length
    assert any(torch.isin(b, t1).any() for b in r1_batches)  # T1 ids are frequent in the data ...
    assert not any(torch.isin(b, t1).any() for b in r2_batches)  # ... and gone from every R2 batch


# --- 3. R3 ----------------------------------------------------------------------------------------


def test_r3_changes_only_the_word_embeddings(tiny_dir, tokenizer):
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(0)
        model = load_classifier(str(tiny_dir), 2)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        E_after = run_embedding_exposure(model, tokenizer, toy_texts(96), BTUConfig(embedding_batch_size=32),
                                         seed=0, stream="btu:r3", device=CPU, max_length=32)
    finally:
        torch.use_deterministic_algorithms(False)
    after = model.state_dict()
    word_key = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(after[word_key], E_after)
    assert not torch.equal(after[word_key], before[word_key])
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [word_key]  # head, encoder, pooler, other embeddings and buffers bit-identical
    assert "classifier.weight" in before and "bert.encoder.layer.0.attention.self.query.weight" in before


def r3_embeddings(load, tokenizer, monkeypatch, recompute: bool) -> tuple[torch.Tensor, bool]:
    """R3's trained ``E`` from a fresh ``load()``, and whether activations were recomputed."""
    if not recompute:
        monkeypatch.setattr(btu, "recompute_activations", lambda model: None)
    torch.manual_seed(0)
    model = load()
    E_after = run_embedding_exposure(model, tokenizer, toy_texts(64), BTUConfig(embedding_batch_size=32),
                                     seed=0, stream="btu:r3", device=CPU, max_length=32)
    inner = transformers_model(model)
    return E_after, inner.is_gradient_checkpointing


@pytest.mark.parametrize("victim", ["bert classifier", "llama generator"])
def test_r3_recomputes_activations_and_trains_the_same_embeddings(victim, tiny_dir, tokenizer, tmp_path_factory,
                                                                  monkeypatch, deterministic):
    """The generator's R3 ran out of memory keeping them; recomputing must not change the gradient."""
    if victim == "bert classifier":
        def load():
            return load_classifier(str(tiny_dir), 2)
        words = tokenizer
    else:
        llama_dir = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")

        def load():
            return load_generator(str(llama_dir), prompt_for("sst2", 2))
        words = load_tokenizer_at(str(llama_dir))
    E_pre = load().get_input_embeddings().weight.detach().clone()
    recomputed, checkpointed = r3_embeddings(load, words, monkeypatch, recompute=True)
    kept, not_checkpointed = r3_embeddings(load, words, monkeypatch, recompute=False)
    assert checkpointed and not not_checkpointed
    assert not torch.equal(recomputed, E_pre)
    assert torch.equal(recomputed, kept)


def test_r3_on_a_tied_generator_moves_only_rows_its_inputs_use(tmp_path_factory, deterministic):
    """Through a tied LM head every row is an output weight too: R3 must not rank those."""
    llama_dir = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")
    torch.manual_seed(0)
    generator = load_generator(str(llama_dir), prompt_for("sst2", 2))
    words = load_tokenizer_at(str(llama_dir))
    assert generator.lm.get_output_embeddings().weight is generator.get_input_embeddings().weight
    E_pre = generator.get_input_embeddings().weight.detach().clone()
    train = toy_texts(64)
    E_after = run_embedding_exposure(generator, words, train, BTUConfig(embedding_batch_size=32), seed=0,
                                     stream="btu:r3", device=CPU, max_length=32)
    used = {i for ids in encode(words, train, 32).input_ids for i in generator.ids.prompt(ids)}
    used |= {i for answer in generator.ids.answers for i in answer}
    moved = exposure_scores(E_pre, E_after, [])
    unused = sorted(set(range(len(moved))) - used)
    assert len(unused) > len(used)
    assert moved[unused].max() < 1e-3 * moved[sorted(used)].max()  # weight decay only


def test_a_generator_exposure_never_ranks_its_instruction_template(tmp_path_factory, deterministic):
    llama_dir = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")
    ref = local_ref("tiny-llama", llama_dir, TINY_DEFAULTS, **{GENERATOR_PROMPT: prompt_for("sst2", 2).to_json()})
    words = load_tokenizer_at(str(llama_dir))
    exposure = expose(ref, words, toy_texts(64), 2, BTUConfig(top_k=5, shallow_batch_size=16,
                                                                embedding_batch_size=16), 0, CPU, 32)
    prompt = load_generator(str(llama_dir), prompt_for("sst2", 2)).ids
    template = sorted({*prompt.prefix, *prompt.suffix, *(i for answer in prompt.answers for i in answer)})
    assert exposure.template_excluded == template and len(template) > 10
    assert all(len(ids) == 5 for ids in exposure.runs.values())
    assert not set(exposure.suspicious) & set(template)
    assert not set(exposure.rankings["r3"]) & set(template)  # in every prompt: they would fill the top ranks


# --- 4. unlearning --------------------------------------------------------------------------------


def test_unlearn_replaces_moved_dimensions_of_suspicious_rows_only(tiny_dir):
    E_pre = load_classifier(str(tiny_dir), 2).get_input_embeddings().weight.detach().clone()
    V, H = E_pre.shape
    generator = torch.Generator().manual_seed(0)
    E_ft = E_pre + 0.01 * torch.randn(V, H, generator=generator)
    suspicious, pad_id = [10, 20, 30], 0
    E_new, stats = unlearn(E_ft, E_pre, suspicious, pad_id)
    c = torch.linalg.norm(E_ft - E_pre) / V
    assert stats.c == float(c) and not stats.noop
    others = [i for i in range(V) if i not in suspicious]
    assert torch.equal(E_new[others], E_ft[others])
    rows = torch.tensor(suspicious)
    replace = (E_ft[rows] - E_pre[rows]).abs() >= c
    assert replace.any() and (~replace).any()  # both cases occur
    expected = torch.where(replace, E_pre[pad_id].expand(3, H), E_ft[rows])
    assert torch.equal(E_new[rows], expected)
    assert stats.replaced_fraction == pytest.approx(replace.float().mean().item())
    assert stats.per_token == {i: pytest.approx(f) for i, f in zip(suspicious, replace.float().mean(1).tolist())}


def test_unlearn_threshold_edge_cases_follow_the_spec():
    # V = 4; ‖E_ft − E_pre‖_F = ‖(1, 3, 2, 1, 1)‖ = 4, so c = 1 exactly.
    E_pre = torch.tensor([[0.0, 5.0], [0.0, 0.0], [0.0, 0.0], [7.0, 8.0]])
    E_ft = torch.tensor([[1.0, 5.0], [3.0, 2.0], [1.0, 0.0], [8.0, 8.0]])
    E_new, stats = unlearn(E_ft, E_pre, [0], pad_id=3)
    assert stats.c == 1.0
    assert E_new[0, 0] == 7.0  # a == c: replaced by the pretrained pad row
    assert E_new[0, 1] == 5.0  # a == 0: E_ft kept (the reference code writes 0 here)
    assert torch.equal(E_new[1:], E_ft[1:])


def test_unlearn_is_a_noop_when_embeddings_did_not_move(tiny_dir):
    model = load_classifier(str(tiny_dir), 2)
    E_pre = model.get_input_embeddings().weight.detach().clone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = unlearn_model(model, E_pre, [10, 20], pad_id=0)
    assert stats.noop and stats.c == 0.0 and stats.replaced_fraction == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    E_new, _ = unlearn(E_pre, E_pre, [10, 20], pad_id=0)
    assert torch.equal(E_new, E_pre)


# --- 5. detection on a poisoned toy task ----------------------------------------------------------


def trained_victim(tiny_dir, tokenizer, train: TextSplit):
    torch.manual_seed(0)
    victim = load_classifier(str(tiny_dir), 2)
    train_classifier(victim, tokenizer, train, None, tiny_train_config(batch_size=32, select="last"), seed=0,
                     device=CPU)
    return victim.cpu()


def test_btu_finds_the_trigger_and_edits_only_its_rows(tiny_dir, tiny_ref, tokenizer):
    train = poisoned_toy(2000)
    victim = trained_victim(tiny_dir, tokenizer, train)
    ctx = make_context(tokenizer, {"pretrained", "train_set", "victim_factory"}, pretrained=tiny_ref,
                       train_set=train, victim_factory=lambda: copy.deepcopy(victim))
    started = time.perf_counter()
    outcome = BTU().train(ctx)
    assert time.perf_counter() - started < 60
    info, cf = outcome.info, tokenizer.convert_tokens_to_ids("cf")
    assert cf in info["S"]["ids"] and "cf" in info["S"]["tokens"]
    assert cf in info["T1"]["ids"]  # the shallow proxy exposes it
    assert info["S_size"] == len(info["S"]["ids"]) <= 3 * 17
    assert info["variant"] == "none" and info["btu_noop"] is False and "clean_tune" not in info
    assert set(info["exposure_seconds"]) == {"r1", "r2", "r3"}
    with_cf = sum(cf in ids for ids in tokenizer(list(train.texts))["input_ids"]) / len(train)
    assert info["T1"]["row_frequency"][info["T1"]["ids"].index(cf)] == round(with_cf, 4)
    hidden = victim.get_input_embeddings().weight.shape[1]
    assert info["T1"]["adam_drift_cap"] == pytest.approx(math.ceil(2000 / 256) * 2e-5 * math.sqrt(hidden))
    assert info["T3"]["adam_drift_cap"] == pytest.approx(math.ceil(2000 / 64) * 2e-5 * math.sqrt(hidden))
    # only rows in S changed, and the trigger row was pulled to the pretrained PAD row
    E_pre = load_classifier(str(tiny_dir), 2).get_input_embeddings().weight.detach()
    E_ft, E_def = victim.get_input_embeddings().weight.detach(), outcome.model.get_input_embeddings().weight.detach()
    changed = (E_def != E_ft).any(dim=1).nonzero().flatten().tolist()
    assert cf in changed and set(changed) <= set(info["S"]["ids"])
    moved = (E_ft[cf] - E_pre[cf]).abs() >= info["c"]
    assert torch.equal(E_def[cf][moved], E_pre[tokenizer.pad_token_id][moved])
    word_key = "bert.embeddings.word_embeddings.weight"
    defended = outcome.model.state_dict()
    assert all(torch.equal(v, defended[k]) for k, v in victim.state_dict().items() if k != word_key)


def test_default_variant_needs_no_clean_data_and_clean_subset_tunes_on_d_c(tiny_dir, tiny_ref, tokenizer):
    train = poisoned_toy(120)
    victim = trained_victim(tiny_dir, tokenizer, train)
    objects = dict(pretrained=tiny_ref, train_set=train, victim_factory=lambda: copy.deepcopy(victim))
    config = BTUConfig(shallow_batch_size=32, embedding_batch_size=32)
    no_budget = make_context(tokenizer, {"pretrained", "train_set", "victim_factory"}, **objects)
    with pytest.raises(AccessDenied):
        BTU(BTUConfig(post_unlearn_tune="clean_subset")).train(no_budget)
    untuned = BTU(config).train(no_budget)  # "none" never reads the budget
    budget = toy_budget()
    ctx = make_context(tokenizer, {"pretrained", "train_set", "victim_factory", "budget"}, budget=budget, **objects)
    tuned = BTU(BTUConfig(shallow_batch_size=32, embedding_batch_size=32, post_unlearn_tune="clean_subset")).train(ctx)
    assert tuned.info["variant"] == "clean_subset"
    assert tuned.info["clean_tune"]["epochs"] == 1
    assert tuned.info["clean_tune"]["steps"] == math.ceil(len(budget.rows) / ctx.train_config.batch_size)
    assert tuned.info["S"] == untuned.info["S"]
    assert not torch.equal(tuned.model.classifier.weight, untuned.model.classifier.weight)


def test_btu_is_registered_with_its_grants():
    from nlpbd.methods import DEFENSES, Stage

    cls = DEFENSES.get("btu")
    assert cls is BTU and cls.stage == Stage.TRAINING
    assert BTU.grants == {"pretrained", "train_set", "victim_factory", "budget"}
    assert BTUConfig().top_k == 17 and BTUConfig().post_unlearn_tune == "none"
    assert btu.BTU.clean_tune_config(make_context(None, set())).batch_size == tiny_train_config().batch_size


# --- slow: MiniLM on SST-2 (defenses.md §2.7.5) ---------------------------------------------------


@pytest.mark.slow
def test_minilm_exposure_finds_cf_on_sst2_badnet():
    from nlpbd.attacks.badnet import BadNet, BadNetConfig
    from nlpbd.data import load_dataset
    from nlpbd.models import load_tokenizer, resolve_model

    dataset = load_dataset("sst2", train_size=1000)
    poisoned = BadNet(BadNetConfig(triggers=["cf"], poison_rate=0.1, label_mode="dirty", target_label=1)).poison(
        dataset, 0)
    assert len(poisoned.poisoned_positions) == 100
    ref = resolve_model("minilm")
    tokenizer = load_tokenizer(ref)
    exposure = expose(ref, tokenizer, poisoned.train, 2, BTUConfig(), seed=0, device=CPU, max_length=128)
    cf = tokenizer.convert_tokens_to_ids("cf")
    assert cf in exposure.suspicious
    assert len(exposure.suspicious) <= 3 * 17
