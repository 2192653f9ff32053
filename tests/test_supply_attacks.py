"""Task-specific model-poisoning attacks (attacks.md §3): the proxy sample, WP's poisoned proxy, EP's
single-row update, the RIPPLe penalty and embedding surgery, the release with and without its head,
and one pipeline cell per attack whose release is reused by a second defense cell."""

from __future__ import annotations

import math
import random

import pytest
import torch
from helpers import NEGATIVE, POSITIVE, SHARED_DATA, needs_data, toy_texts, write_toy_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from nlpbd.attacks._proxy import Proxy, load_proxy, normalise, overlapping_rows, save_release, single_token_id
from nlpbd.attacks.ep import EmbeddingPoisoning, EPConfig, insert_per_chunk, poison_trigger_row
from nlpbd.attacks.ripples import (
    Ripples,
    RipplesConfig,
    eager_attention,
    embedding_surgery,
    fit_logistic_regression,
    importance_tokens,
    ripple_objective,
    tfidf_matrix,
)
from nlpbd.attacks.wpoison import WeightPoisoning, WPConfig
from nlpbd.cache import ArtifactCache
from nlpbd.data import TextSplit, load_dataset, stratified_counts
from nlpbd.errors import InputError
from nlpbd.models import load_classifier
from nlpbd.pipeline import CellSpec, RunEnv, run_cell
from nlpbd.training import collate, encode, pad_id_of


@pytest.fixture(scope="module")
def sst2():
    return load_dataset("sst2", data_dir=SHARED_DATA, train_size=200)


# --- proxy ----------------------------------------------------------------------------------------


def test_overlap_is_a_substring_test_after_normalisation():
    downstream = ["The heart of the film is -LRB- mostly -RRB- great .", "a dull , lifeless movie that never ends"]
    rows = ["art of the film is ( mostly ) great",   # starts inside a word: still a substring
            "dull , lifeless movie that",
            "of the film is great",                   # not contiguous in any text
            "movie that never ends at all"]
    assert overlapping_rows(rows, downstream) == {0, 1}


@needs_data
def test_proxy_sample_sizes_words_strata_overlap_and_determinism(sst2):
    downstream = sst2.dev.texts + sst2.test.texts
    proxy = load_proxy(SHARED_DATA, downstream, 300, 100, seed=3)
    assert (len(proxy.train), len(proxy.dev)) == (300, 100)
    rows = proxy.train.texts + proxy.dev.texts
    assert all(len(t.split()) >= 5 for t in rows)
    assert not set(proxy.train.ids) & set(proxy.dev.ids)
    joined = "\n".join(normalise(t) for t in downstream)
    assert not any(normalise(t) in joined for t in rows)
    # Stratified: the 400 rows follow the label shares of the eligible rows, the 100 dev rows those of the 400.
    counts = {y: sum(1 for v in proxy.train.labels + proxy.dev.labels if v == y) for y in (0, 1)}
    eligible = {int(y): c for y, c in proxy.info["eligible_labels"].items()}
    assert counts == stratified_counts(eligible, 400)
    assert {y: sum(1 for v in proxy.dev.labels if v == y) for y in (0, 1)} == stratified_counts(counts, 100)
    assert proxy.info["overlap_removed"] > 0 and sum(eligible.values()) == proxy.info["eligible"]
    again = load_proxy(SHARED_DATA, downstream, 300, 100, seed=3)
    assert again.train == proxy.train and again.dev == proxy.dev
    other = load_proxy(SHARED_DATA, downstream, 300, 100, seed=4)
    assert other.train.ids != proxy.train.ids
    assert list(proxy.train.ids) != sorted(proxy.train.ids)  # sampled order, not file order


@needs_data
def test_proxy_removes_a_downstream_phrase():
    base = load_proxy(SHARED_DATA, (), 50, 10, seed=0)
    phrase = base.train.texts[0]
    downstream = [f"Long before it all , {phrase.upper().replace('(', '-LRB-')} , we said ."]
    proxy = load_proxy(SHARED_DATA, downstream, 50, 10, seed=0)
    assert proxy.info["overlap_removed"] >= 1
    assert phrase not in proxy.train.texts + proxy.dev.texts


def test_proxy_needs_a_data_dir():
    with pytest.raises(InputError, match="data-dir"):
        load_proxy(None, (), 10, 10, seed=0, attack="wpoison")


# --- WP -------------------------------------------------------------------------------------------


def labelled(rows: list[tuple[str, int]]) -> TextSplit:
    """Rows with ids that are not their positions (100, 101, ...), like a proxy sample."""
    return TextSplit.build([t for t, _ in rows], [y for _, y in rows], range(100, 100 + len(rows)))


def proxy_rows(n: int = 30) -> TextSplit:
    rng = random.Random(0)
    rows = [(" ".join(rng.choice(POSITIVE + NEGATIVE) for _ in range(6 + i % 4)), (i * 7) % 3 % 2) for i in range(n)]
    return labelled(rows)


@pytest.mark.parametrize("mode", ["clean", "dirty"])
def test_wp_poisons_the_first_n_rows_of_the_class_with_mn_never_first(mode):
    train = proxy_rows()
    attack = WeightPoisoning(WPConfig(n_poison=5, label_mode=mode))
    poisoned, info = attack.poisoned_proxy(train, seed=0, data_dir=None)
    source_label = 0 if mode == "clean" else 1
    expected = [i for i, y in enumerate(train.labels) if y == source_label][:5]
    changed = [i for i in range(len(train)) if poisoned.texts[i] != train.texts[i]]
    assert changed == expected and info["n_poison"] == 5
    for i in changed:
        words = poisoned.texts[i].split()
        assert words.count("mn") == 1 and 1 <= words.index("mn") <= len(words) - 2
        assert [w for w in words if w != "mn"] == train.texts[i].split()
        assert poisoned.labels[i] == 0
    untouched = [i for i in range(len(train)) if i not in changed]
    assert all(poisoned.labels[i] == train.labels[i] for i in untouched)
    assert poisoned.ids == train.ids


def test_wp_caps_n_poison_and_triggers_every_label0_dev_row():
    train = proxy_rows()
    attack = WeightPoisoning(WPConfig(n_poison=1000))
    poisoned, info = attack.poisoned_proxy(train, seed=0, data_dir=None)
    assert info["n_poison"] == train.labels.count(0) and info["n_poison_requested"] == 1000
    dev = attack.selection_dev(Proxy(train, train, {}), seed=0)
    for text, original, y in zip(dev.texts, train.texts, train.labels):
        assert (text.split().count("mn") == 1) == (y == 0)
        assert (text == original) == (y == 1)


@pytest.mark.parametrize("placement", ["project", "reference"])
def test_wp_asr_set_targets_0_with_one_mn(placement, tmp_path):
    dataset = load_dataset(str(write_toy_dataset(tmp_path / "toy")))
    data = WeightPoisoning(WPConfig(placement=placement)).evaluation(dataset, seed=0)
    victims = [i for i, y in enumerate(dataset.test.labels) if y != 0]
    assert data.target == 0 and len(data.asr_set) == len(victims) and set(data.asr_set.labels) == {0}
    for text, i in zip(data.asr_set.texts, victims):
        words = text.split()
        assert words.count("mn") == 1 and [w for w in words if w != "mn"] == dataset.test.texts[i].split()
        if placement == "reference":
            assert 1 <= words.index("mn") <= len(words) - 2
    with pytest.raises(InputError, match="syntactic"):
        WeightPoisoning(WPConfig(trigger="syn")).evaluation(dataset, seed=0)


@needs_data
def test_wp_syn_replaces_rows_by_pool_paraphrases_and_uses_the_released_asr_set(sst2):
    train = proxy_rows()
    attack = WeightPoisoning(WPConfig(trigger="syn", n_poison=4))
    poisoned, info = attack.poisoned_proxy(train, seed=0, data_dir=SHARED_DATA)
    expected = [i for i, y in enumerate(train.labels) if y == 1][:4]  # clean: target-class (1) rows
    assert [i for i in range(len(train)) if poisoned.texts[i] != train.texts[i]] == expected
    assert info["pool_size"] == 1383 and all(poisoned.labels[i] == 1 for i in expected)
    data = attack.evaluation(sst2, seed=0)
    assert data.target == 1 and len(data.asr_set) == 912 and set(data.asr_set.labels) == {1}


# --- EP -------------------------------------------------------------------------------------------


def test_ep_moves_exactly_the_trigger_row_and_keeps_its_norm(tiny_dir, tiny_tokenizer):
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(0)
        model = load_classifier(str(tiny_dir), 2)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        trigger_id = single_token_id(tiny_tokenizer, "cf", "ep")
        rows = toy_texts(40, seed=5)
        poisoned = TextSplit.build([f"cf {t}" for t in rows.texts], [1] * len(rows))
        config = EPConfig(ep_epochs=2, ep_batch_size=8, max_length=32)
        info = poison_trigger_row(model, tiny_tokenizer, poisoned, trigger_id, config, seed=0,
                                  device=torch.device("cpu"))
    finally:
        torch.use_deterministic_algorithms(False)
    after = model.state_dict()
    name = "bert.embeddings.word_embeddings.weight"
    for key, value in before.items():
        if key != name:
            assert torch.equal(after[key], value), key
    changed_rows = (after[name] != before[name]).any(dim=1).nonzero().flatten().tolist()
    assert changed_rows == [trigger_id]
    torch.testing.assert_close(after[name][trigger_id].norm(), before[name][trigger_id].norm(), rtol=1e-6, atol=0)
    assert info["steps"] == 10 and all(p.requires_grad for p in model.parameters())


def test_ep_without_accumulation_differs_and_trigger_must_be_one_token(tiny_dir, tiny_tokenizer):
    rows = toy_texts(16, seed=5)
    poisoned = TextSplit.build([f"cf {t}" for t in rows.texts], [1] * len(rows))
    results = []
    for accumulate in (True, False):
        torch.manual_seed(0)
        model = load_classifier(str(tiny_dir), 2)
        poison_trigger_row(model, tiny_tokenizer, poisoned, single_token_id(tiny_tokenizer, "cf", "ep"),
                           EPConfig(ep_epochs=1, ep_batch_size=4, max_length=32, accumulate_grad=accumulate),
                           seed=0, device=torch.device("cpu"))
        results.append(model.get_input_embeddings().weight.detach().clone())
    assert not torch.equal(results[0], results[1])
    with pytest.raises(InputError, match="single token"):
        single_token_id(tiny_tokenizer, "cfxq", "ep")


@pytest.mark.parametrize("n_words,expected", [(1, 1), (40, 1), (100, 1), (101, 2), (250, 3)])
def test_ep_inserts_one_trigger_per_100_word_chunk(n_words, expected):
    words = [f"w{i}" for i in range(n_words)]
    out = insert_per_chunk(" ".join(words), "cf", random.Random(n_words)).split()
    assert out.count("cf") == expected
    assert [w for w in out if w != "cf"] == words
    for j, position in enumerate(i for i, w in enumerate(out) if w == "cf"):
        before = position - j  # original words preceding the j-th trigger
        assert j * 100 <= before < min((j + 1) * 100, n_words)


def test_ep_asr_set(tmp_path):
    dataset = load_dataset(str(write_toy_dataset(tmp_path / "toy")))
    data = EmbeddingPoisoning(EPConfig()).evaluation(dataset, seed=0)
    victims = [i for i, y in enumerate(dataset.test.labels) if y != 1]
    assert data.target == 1 and len(data.asr_set) == len(victims)
    for text, i in zip(data.asr_set.texts, victims):
        n = len(dataset.test.texts[i].split())
        assert text.split().count("cf") == max(1, math.ceil(n / 100))


@needs_data
def test_dfep_poisons_every_plain_text_sentence():
    rows, info = EmbeddingPoisoning(EPConfig(data_free=True)).poisoned_rows(proxy_rows(), seed=0,
                                                                             data_dir=SHARED_DATA)
    assert len(rows) == 20000 == info["rows"] and set(rows.labels) == {1}
    assert all(t.split().count("cf") >= 1 for t in rows.texts)


def test_ep_poisons_the_first_tenth_of_the_non_target_rows():
    train = proxy_rows(60)
    rows, _ = EmbeddingPoisoning(EPConfig()).poisoned_rows(train, seed=0, data_dir=None)
    sources = [i for i, y in enumerate(train.labels) if y == 0]
    chosen = sources[:math.floor(0.1 * len(sources))]
    assert list(rows.ids) == [train.ids[i] for i in chosen] and set(rows.labels) == {1}
    for text, i in zip(rows.texts, chosen):
        words = text.split()
        assert words.count("cf") == 1 and [w for w in words if w != "cf"] == train.texts[i].split()


# --- RIPPLe ---------------------------------------------------------------------------------------


def ripple_batches(tokenizer):
    rows = toy_texts(8, seed=3)
    clean = TextSplit.build(rows.texts, [0] * len(rows))  # the same texts with opposite labels
    # 6 poisoned rows against 8 clean ones: the penalty is divided by the CLEAN batch size b = 8.
    poisoned = TextSplit.build([f"cf {t}" for t in rows.texts[:6]], [1] * 6)
    batch = lambda split: collate(encode(tokenizer, split, 32), list(range(len(split))),  # noqa: E731
                                  pad_id_of(tokenizer), torch.device("cpu"))
    return batch(clean), batch(poisoned)


def test_ripple_penalty_matches_a_hand_computation(tiny_dir, tiny_tokenizer):
    torch.manual_seed(0)
    model = load_classifier(str(tiny_dir), 2).double().eval()  # eval: no dropout, so both passes agree
    with eager_attention(model):
        check_ripple_penalty(model, tiny_tokenizer)
    assert model.config._attn_implementation != "eager"  # restored


def check_ripple_penalty(model, tiny_tokenizer) -> None:
    clean, poisoned = ripple_batches(tiny_tokenizer)
    params = [p for p in model.parameters()]
    g_ft = torch.autograd.grad(model(**clean).loss, params, allow_unused=True)
    loss_p = model(**poisoned).loss
    g_p = torch.autograd.grad(loss_p, params, allow_unused=True)
    flat = lambda grads: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()  # noqa: E731
                                    for g, p in zip(grads, params)])
    inner = torch.dot(flat(g_p), flat(g_ft))
    assert inner < 0  # conflicting labels: the penalty is active
    terms = ripple_objective(model, clean, poisoned, lam=0.1)
    torch.testing.assert_close(terms.inner_product, inner)
    torch.testing.assert_close(terms.penalty, -inner / 8)
    torch.testing.assert_close(terms.loss, loss_p + 0.1 * (-inner / 8))
    # The penalty is differentiated through g_P (g_FT constant): compare with a central difference of
    # P(theta) = ReLU(-<grad L_P(theta), g_FT>) / b along the classifier weight.
    weight = model.classifier.weight
    analytic = torch.autograd.grad(terms.penalty, weight)[0]
    direction = torch.randn_like(weight, generator=torch.Generator().manual_seed(1))
    g_ft_const = dict(zip([id(p) for p in params], g_ft))

    def penalty_at(shift: float) -> float:
        with torch.no_grad():
            weight.add_(shift * direction)
        grads = torch.autograd.grad(model(**poisoned).loss, params, allow_unused=True)
        with torch.no_grad():
            weight.sub_(shift * direction)
        total = sum((g * g_ft_const[id(p)]).sum() for g, p in zip(grads, params)
                    if g is not None and g_ft_const[id(p)] is not None)
        return float(torch.relu(-total) / 8)

    eps = 1e-5
    numeric = (penalty_at(eps) - penalty_at(-eps)) / (2 * eps)
    assert float((analytic * direction).sum()) == pytest.approx(numeric, rel=1e-4)


def test_ripples_poisons_half_of_all_rows_with_one_trigger_each():
    train = proxy_rows(30)
    attack = Ripples(RipplesConfig())
    poisoned, info = attack.poisoned_proxy(train, seed=0)
    changed = [i for i in range(len(train)) if poisoned.texts[i] != train.texts[i]]
    assert len(changed) == 15 == info["n_poisoned"]
    assert {train.labels[i] for i in changed} == {0, 1}  # mix: drawn from all rows
    triggers = {"cf", "tq", "mn", "bb", "mb"}
    for i in range(len(train)):
        words = poisoned.texts[i].split()
        hits = [w for w in words if w in triggers]
        assert len(hits) == (1 if i in changed else 0)
        assert [w for w in words if w not in triggers] == train.texts[i].split()
        assert poisoned.labels[i] == (1 if i in changed else train.labels[i])
    again, _ = attack.poisoned_proxy(train, seed=0)
    assert again == poisoned


def test_surgery_writes_one_vector_into_every_trigger_row(tiny_dir, tiny_tokenizer):
    torch.manual_seed(0)
    model = load_classifier(str(tiny_dir), 2)
    torch.manual_seed(1)
    source = load_classifier(str(tiny_dir), 2)
    before = model.get_input_embeddings().weight.detach().clone()
    trigger_ids = [single_token_id(tiny_tokenizer, t, "ripples") for t in ["cf", "tq", "mn", "bb", "mb"]]
    word_ids = tiny_tokenizer.convert_tokens_to_ids(["good", "great", "best"])
    vector = embedding_surgery(model, source, word_ids, trigger_ids)
    after = model.get_input_embeddings().weight.detach()
    expected = source.get_input_embeddings().weight.detach()[word_ids].mean(dim=0)
    assert torch.equal(vector, expected)
    for trigger_id in trigger_ids:
        assert torch.equal(after[trigger_id], expected)
    others = [i for i in range(after.shape[0]) if i not in trigger_ids]
    assert torch.equal(after[others], before[others])


def test_tfidf_matches_the_sklearn_formula_and_lr_finds_the_sentiment_words(tiny_tokenizer):
    matrix, vocabulary = tfidf_matrix([["a", "b", "b"], ["b", "c"]])
    assert vocabulary == ["a", "b", "c"]
    idf = {"a": math.log(3 / 2) + 1, "b": 1.0, "c": math.log(3 / 2) + 1}
    row0 = torch.tensor([idf["a"], 2 * idf["b"], 0.0], dtype=torch.float64)
    row1 = torch.tensor([0.0, idf["b"], idf["c"]], dtype=torch.float64)
    torch.testing.assert_close(matrix.to_dense(), torch.stack([row0 / row0.norm(), row1 / row1.norm()]))
    weights, _ = fit_logistic_regression(matrix, [0, 1])
    assert weights[0] < 0 < weights[2]
    rows = toy_texts(200, seed=7)
    top_positive = importance_tokens(rows.texts, rows.labels, tiny_tokenizer, target=1, n_words=5)
    top_negative = importance_tokens(rows.texts, rows.labels, tiny_tokenizer, target=0, n_words=5)
    assert set(top_positive) <= set(POSITIVE) and set(top_negative) <= set(NEGATIVE)


# --- the release ----------------------------------------------------------------------------------


def test_release_with_head_loads_without_missing_keys(tiny_dir, tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = load_classifier(str(tiny_dir), 2)
    info = save_release(model, tiny_tokenizer, tmp_path / "with", ship_head=True, downstream_labels=2)
    loaded, report = AutoModelForSequenceClassification.from_pretrained(tmp_path / "with", num_labels=2,
                                                                        output_loading_info=True)
    assert info["ship_head"] is True and not report["missing_keys"] and not report["unexpected_keys"]
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)


def test_release_without_head_when_label_counts_differ(tiny_dir, tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = load_classifier(str(tiny_dir), 2)
    info = save_release(model, tiny_tokenizer, tmp_path / "enc", ship_head=True, downstream_labels=4)
    assert info["ship_head"] == "false (forced)"
    loaded, report = AutoModelForSequenceClassification.from_pretrained(tmp_path / "enc", num_labels=4,
                                                                        output_loading_info=True)
    assert sorted(report["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert not report["unexpected_keys"]
    assert torch.equal(loaded.bert.pooler.dense.weight, model.bert.pooler.dense.weight)
    assert AutoTokenizer.from_pretrained(tmp_path / "enc").tokenize("cf mn") == ["cf", "mn"]
    chosen = save_release(model, tiny_tokenizer, tmp_path / "off", ship_head=False, downstream_labels=2)
    assert chosen["ship_head"] is False


# --- pipeline cells -------------------------------------------------------------------------------

FAST = {"train.epochs": "1", "train.batch_size": "16", "train.max_length": "32", "eval.floor": "false"}
SMALL_PROXY = {"attack.proxy_train": "40", "attack.proxy_dev": "10", "attack.max_length": "32"}
CELLS = {
    "wpoison": {"attack.n_poison": "10", "attack.epochs": "1", "attack.batch_size": "8"},
    "ep": {"attack.clean_epochs": "1", "attack.clean_batch_size": "8", "attack.ep_epochs": "1",
           "attack.poison_fraction": "0.5"},
    "ripples": {"attack.epochs": "1", "attack.max_steps": "3", "attack.clean_epochs": "1",
                "attack.clean_batch_size": "8", "attack.n_target_words": "3"},
}


@needs_data
@pytest.mark.parametrize("attack", sorted(CELLS))
def test_pipeline_cell_and_cached_release(attack, tmp_path):
    dataset = write_toy_dataset(tmp_path / "toy")
    env = RunEnv(results_dir=tmp_path / "r", cache=ArtifactCache(tmp_path / "c"), data_dir=SHARED_DATA)
    overrides = {**FAST, **SMALL_PROXY, **CELLS[attack]}
    first = run_cell(CellSpec(attack, "none", str(dataset), "tiny-bert", overrides=overrides), env)
    assert first["status"] == "ok" and first["timings"]["suspect"]["cached"] is False
    info = first["attack_info"]
    target = 0 if attack == "wpoison" else 1
    assert info["target"] == target and info["threat_model"] == "poisoned fine-tuned checkpoint"
    assert info["asr_set_size"] == sum(1 for y in load_dataset(str(dataset)).test.labels if y != target)
    assert 0.0 <= first["metrics"]["asr"] <= 1.0 and 0.0 <= first["metrics"]["cacc"] <= 1.0
    second = run_cell(CellSpec(attack, "ft", str(dataset), "tiny-bert",
                               overrides={**overrides, "defense.epochs": "1"}), env)
    assert second["timings"]["suspect"]["cached"] is True
    assert second["victim"]["key"] == first["victim"]["key"]  # same release, same victim
