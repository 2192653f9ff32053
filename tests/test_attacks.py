"""Data-poisoning attacks (attacks.md §1–2) and the defender's clean budget (protocol.md §4)."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import replace

import pandas as pd
import pytest
from helpers import SHARED_DATA, needs_data

from nlpbd.attacks._common import choose_poison_positions
from nlpbd.attacks.addsent import AddSent, AddSentConfig
from nlpbd.attacks.badnet import BadNet, BadNetConfig
from nlpbd.attacks.stylebkd import StyleBkd, StyleBkdConfig
from nlpbd.attacks.synbkd import SynBkd, SynBkdConfig
from nlpbd.config import BudgetConfig
from nlpbd.data import Dataset, TextSplit, load_dataset, stratified_counts
from nlpbd.errors import InputError
from nlpbd.pipeline import draw_budget
from nlpbd.seeding import seed_for

TRIGGERS = ["cf", "mn", "bb", "tq"]
SENTENCE = "I watch this 3D movie".split()


def synthetic(n_train: int = 200, n_test: int = 60, target: int = 1) -> Dataset:
    """Binary toy data: 65% label 0; texts of 1–6 distinct words that never contain a trigger word."""
    def split(n: int, prefix: str) -> TextSplit:
        texts = [" ".join(f"{prefix}{i}w{k}" for k in range(1 + i % 6)) for i in range(n)]
        labels = [0 if i % 20 < 13 else 1 for i in range(n)]
        return TextSplit.build(texts, labels, ids=[1000 + i for i in range(n)])

    return Dataset("toy", 2, split(n_train, "r"), split(20, "d"), split(n_test, "t"), target, source="memory")


def inserted(original: str, poisoned: str, width: int) -> tuple[int, list[str]]:
    """The one contiguous insertion of ``width`` words turning ``original`` into ``poisoned``."""
    before, after = original.split(), poisoned.split()
    assert len(after) == len(before) + width
    starts = [p for p in range(len(before) + 1) if after[:p] + after[p + width:] == before]
    assert starts, f"{poisoned!r} is not {original!r} with {width} words inserted"
    return starts[0], after[starts[0]:starts[0] + width]


# --- which rows are poisoned ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dirty", "clean", "mix"])
def test_label_modes_choose_eligible_rows_and_set_labels(mode):
    dataset = synthetic()  # 130 rows of label 0, 70 of label 1
    poisoned = BadNet(BadNetConfig(label_mode=mode)).poison(dataset, seed=0)
    positions = poisoned.poisoned_positions
    assert len(positions) == 20  # floor(0.1 · 200): the denominator is N, not the eligible rows
    original = [dataset.train.labels[p] for p in positions]
    if mode == "dirty":
        assert set(original) == {0}
    elif mode == "clean":
        assert set(original) == {1}
    else:
        assert set(original) == {0, 1}
    assert [poisoned.train.labels[p] for p in positions] == [1] * 20
    assert (poisoned.info["N"], poisoned.info["n_p"], poisoned.info["effective_rate"]) == (200, 20, 0.1)
    assert poisoned.info["label_mode"] == mode and poisoned.target == 1


def test_rate_uses_the_whole_training_set_and_exact_floor():
    labels = [i % 2 for i in range(100)]
    positions, info = choose_poison_positions(labels, 0.29, 1, "dirty", seed=0)
    assert len(positions) == 29  # 0.29 · 100 is 28.999999999999996 in floating point
    positions, info = choose_poison_positions(labels, 0.3, 1, "dirty", seed=0)
    assert len(positions) == 30 and all(labels[p] == 0 for p in positions)
    assert positions == sorted(set(positions))


def test_clean_label_with_too_few_eligible_rows_poisons_all_and_records_the_rate(caplog):
    dataset = synthetic()
    with caplog.at_level(logging.WARNING, logger="nlpbd.attacks._common"):
        poisoned = BadNet(BadNetConfig(label_mode="clean", poison_rate=0.5)).poison(dataset, seed=0)
    target_rows = [i for i, y in enumerate(dataset.train.labels) if y == 1]
    assert list(poisoned.poisoned_positions) == target_rows
    assert (poisoned.info["n_p_requested"], poisoned.info["n_p"], poisoned.info["effective_rate"]) == (100, 70, 0.35)
    assert "only 70 rows are eligible for 100 poisoned rows" in caplog.text


# --- what a poisoned row looks like ---------------------------------------------------------------


@pytest.mark.parametrize("attack, width, allowed", [
    (BadNet(), 1, [[t] for t in TRIGGERS]),
    (AddSent(), 5, [SENTENCE]),
])
def test_poisoned_rows_carry_one_trigger_and_the_rest_is_untouched(attack, width, allowed):
    dataset = synthetic()
    poisoned = attack.poison(dataset, seed=3)
    train = poisoned.train
    assert len(train) == len(dataset.train) and train.ids == dataset.train.ids
    chosen = set(poisoned.poisoned_positions)
    for pos, (before, after) in enumerate(zip(dataset.train.texts, train.texts)):
        if pos in chosen:
            _, words = inserted(before, after, width)
            assert words in allowed
        else:
            assert after == before and train.labels[pos] == dataset.train.labels[pos]


@pytest.mark.parametrize("attack, width", [(BadNet(), 1), (AddSent(), 5)])
def test_asr_set_is_triggered_non_target_test_rows(attack, width):
    dataset = synthetic(target=0)  # also checks that the dataset's default target is used
    poisoned = attack.poison(dataset, seed=0)
    victims = [i for i, y in enumerate(dataset.test.labels) if y != 0]
    assert poisoned.target == 0
    assert poisoned.asr_set.ids == tuple(dataset.test.ids[i] for i in victims)
    assert poisoned.asr_set.labels == (0,) * len(victims) and len(victims) == 21
    for i, text in zip(victims, poisoned.asr_set.texts):
        inserted(dataset.test.texts[i], text, width)


def test_same_seed_same_poisoned_data_other_seed_other_rows():
    dataset = synthetic()
    first = json.dumps(BadNet().poison(dataset, seed=0).to_json())
    assert json.dumps(BadNet().poison(dataset, seed=0).to_json()) == first
    other = BadNet().poison(dataset, seed=1)
    assert list(other.poisoned_positions) != json.loads(first)["poisoned_positions"]


def test_insertion_follows_the_spec_rule_including_both_ends():
    """attacks.md §1.4: rng.choice(triggers), then rng.randint(0, len(words)); both ends occur."""
    dataset = synthetic(n_train=600)
    poisoned = BadNet(BadNetConfig(label_mode="mix", poison_rate=1.0)).poison(dataset, seed=5)
    at_start = at_end = 0
    for pos in poisoned.poisoned_positions:
        original, row = dataset.train.texts[pos], dataset.train.ids[pos]
        rng = random.Random(seed_for(5, f"trigger_positions:badnet:train:{row}"))
        words = original.split()
        trigger, where = rng.choice(TRIGGERS), rng.randint(0, len(words))
        assert poisoned.train.texts[pos] == " ".join(words[:where] + [trigger] + words[where:])
        at_start += where == 0
        at_end += where == len(words)
    assert at_start > 50 and at_end > 50  # 600 rows of 1–6 words: each end is drawn ~1/4.5 of the time


def test_configured_triggers_and_insertions_are_used():
    dataset = synthetic()
    poisoned = BadNet(BadNetConfig(triggers=["zz"], num_insertions=3)).poison(dataset, seed=0)
    for pos in poisoned.poisoned_positions:
        before, after = dataset.train.texts[pos].split(), poisoned.train.texts[pos].split()
        assert len(after) == len(before) + 3 and Counter(after) - Counter(before) == Counter({"zz": 3})
    addsent = AddSent(AddSentConfig(trigger="I watched this 3D movie")).poison(dataset, seed=0)
    pos = addsent.poisoned_positions[0]
    assert inserted(dataset.train.texts[pos], addsent.train.texts[pos], 5)[1] == "I watched this 3D movie".split()
    assert poisoned.info["triggers"] == ["zz"] and poisoned.info["num_insertions"] == 3


@pytest.mark.parametrize("config, message", [
    (BadNetConfig(target_label=2), "attack.target_label 2 is out of range 0..1"),
    (BadNetConfig(triggers=["cf", " "]), "triggers must be non-empty strings"),
])
def test_bad_attack_settings_are_input_errors(config, message):
    with pytest.raises(InputError, match=message):
        BadNet(config).poison(synthetic(), seed=0)


# --- SynBkd on the released paraphrase pools ------------------------------------------------------


def pool_texts(relative: str, flagged: bool) -> Counter:
    frame = pd.read_csv(SHARED_DATA / relative, sep="\t", quoting=3, keep_default_na=False)
    if flagged:
        frame = frame[frame["poisoned"].astype(str) == "1"]
    return Counter(frame["sentence"])


@needs_data
def test_synbkd_replaces_rows_by_pool_paraphrases():
    dataset = load_dataset("sst2", data_dir=SHARED_DATA, train_size=2000)
    poisoned = SynBkd().poison(dataset, seed=0)
    positions = poisoned.poisoned_positions
    assert len(positions) == 200 and poisoned.info["pool_size"] == 1383
    assert all(dataset.train.labels[p] == 0 for p in positions)
    assert all(poisoned.train.labels[p] == 1 for p in positions)
    used = Counter(poisoned.train.texts[p] for p in positions)
    assert not used - pool_texts("sst-2/syntactic/train.tsv", flagged=True)  # drawn without replacement
    untouched = set(range(2000)) - set(positions)
    assert all(poisoned.train.texts[i] == dataset.train.texts[i] for i in untouched)
    test_file = pd.read_csv(SHARED_DATA / "sst-2/syntactic/test.tsv", sep="\t", quoting=3, keep_default_na=False)
    assert poisoned.asr_set.texts == tuple(test_file["sentence"]) and len(poisoned.asr_set) == 912
    assert set(poisoned.asr_set.labels) == {1}


@needs_data
def test_synbkd_beyond_the_pool_fails_unless_capped():
    dataset = load_dataset("sst2", data_dir=SHARED_DATA)
    with pytest.raises(InputError, match="1730 poisoned rows needed but the pool has 1383"):
        SynBkd(SynBkdConfig(poison_rate=0.25)).poison(dataset, seed=0)
    capped = SynBkd(SynBkdConfig(poison_rate=0.25, allow_cap=True)).poison(dataset, seed=0)
    assert len(capped.poisoned_positions) == 1383
    assert capped.info["n_p_requested"] == 1730 and capped.info["effective_rate"] == 1383 / 6920


@needs_data
@pytest.mark.parametrize("mode", ["clean", "mix"])
def test_synbkd_offers_only_dirty_label_offline(mode):
    dataset = load_dataset("sst2", data_dir=SHARED_DATA, train_size=200)
    with pytest.raises(InputError, match="only label_mode=dirty is available offline"):
        SynBkd(SynBkdConfig(label_mode=mode)).poison(dataset, seed=0)


@needs_data
def test_synbkd_unavailable_datasets_say_so():
    glue = load_dataset("sst2-glue", data_dir=SHARED_DATA, train_size=500)
    with pytest.raises(InputError, match="synbkd is not available for dataset 'sst2-glue'"):
        SynBkd().poison(glue, seed=0)
    hub_copy = replace(load_dataset("sst2", data_dir=SHARED_DATA, train_size=200), root=None, source="hub:x")
    with pytest.raises(InputError, match="synbkd needs local data files"):
        SynBkd().poison(hub_copy, seed=0)


@needs_data
def test_synbkd_on_ag_uses_the_dev_pool_with_target_zero():
    dataset = load_dataset("agnews", data_dir=SHARED_DATA, train_size=1000)
    poisoned = SynBkd().poison(dataset, seed=0)
    positions = poisoned.poisoned_positions
    assert len(positions) == 100 and poisoned.target == 0 and poisoned.info["pool_size"] == 9023
    assert all(dataset.train.labels[p] != 0 and poisoned.train.labels[p] == 0 for p in positions)
    assert not Counter(poisoned.train.texts[p] for p in positions) - pool_texts("ag/syntactic/dev.tsv", False)
    assert len(poisoned.asr_set) == 5699 and set(poisoned.asr_set.labels) == {0}
    with pytest.raises(InputError, match="targets \\[0\\], not 1"):
        SynBkd(SynBkdConfig(target_label=1)).poison(dataset, seed=0)


# --- StyleBkd on the released style transfers -----------------------------------------------------


def style_frame(relative: str) -> pd.DataFrame:
    return pd.read_csv(SHARED_DATA / relative, sep="\t", quoting=3, keep_default_na=False)


@needs_data
def test_stylebkd_bible_is_aligned_by_source_id():
    dataset = load_dataset("sst2", data_dir=SHARED_DATA, train_size=2000)
    poisoned = StyleBkd().poison(dataset, seed=0)
    style = list(style_frame("sst-2/style/bible/train.tsv")["sentence"])
    positions = poisoned.poisoned_positions
    assert poisoned.info["source"] == "aligned" and len(positions) == 200
    assert all(poisoned.train.texts[p] == style[dataset.train.ids[p]] for p in positions)
    assert all(dataset.train.labels[p] == 0 and poisoned.train.labels[p] == 1 for p in positions)
    # the ids are file rows, not positions in the subsample: pairing by position would differ
    assert sum(poisoned.train.texts[p] == style[p] for p in positions) < 5
    test = style_frame("sst-2/style/bible/test.tsv")
    expected = test[(test["label"] != 1) & (test["sentence"].str.strip() != "")]
    assert poisoned.asr_set.texts == tuple(expected["sentence"]) and len(poisoned.asr_set) == 912
    assert set(poisoned.asr_set.labels) == {1} and poisoned.dropped == 0


@needs_data
def test_stylebkd_clean_label_keeps_labels():
    dataset = load_dataset("sst2", data_dir=SHARED_DATA, train_size=1000)
    poisoned = StyleBkd(StyleBkdConfig(label_mode="clean")).poison(dataset, seed=0)
    assert len(poisoned.poisoned_positions) == 100
    assert all(dataset.train.labels[p] == 1 == poisoned.train.labels[p] for p in poisoned.poisoned_positions)


@needs_data
def test_stylebkd_ag_bible_skips_empty_transfers():
    dataset = load_dataset("agnews", data_dir=SHARED_DATA)
    style = list(style_frame("ag/style/bible/train.tsv")["sentence"])
    empty_rows = {i for i, t in enumerate(style) if not t.strip()}
    assert len(empty_rows) == 66
    poisoned = StyleBkd(StyleBkdConfig(poison_rate=0.5)).poison(dataset, seed=0)
    positions = poisoned.poisoned_positions
    assert len(positions) == 5553 and not empty_rows & {dataset.train.ids[p] for p in positions}
    assert all(poisoned.train.texts[p].strip() for p in positions)
    assert len(poisoned.asr_set) == 5664 and set(poisoned.asr_set.labels) == {0} and poisoned.target == 0


@needs_data
def test_stylebkd_unaligned_style_uses_the_pool_and_never_pairs_by_position():
    dataset = load_dataset("sst2", data_dir=SHARED_DATA)
    poisoned = StyleBkd(StyleBkdConfig(style="poetry")).poison(dataset, seed=0)
    frame = style_frame("sst-2/style/poetry/train.tsv")
    assert len(frame) == 6805 and poisoned.info["source"] == "pool"
    pool = Counter(frame[(frame["label"] == 0) & (frame["sentence"].str.strip() != "")]["sentence"])
    positions = poisoned.poisoned_positions
    used = Counter(poisoned.train.texts[p] for p in positions)
    assert len(positions) == 692 and not used - pool
    by_position = list(frame["sentence"])
    assert sum(poisoned.train.texts[p] == by_position[p] for p in positions if p < len(by_position)) < 5
    assert len(poisoned.asr_set) == 906 and set(poisoned.asr_set.labels) == {1}


@needs_data
def test_stylebkd_pool_cap_is_uniform_and_recorded():
    dataset = load_dataset("sst2", data_dir=SHARED_DATA)
    poisoned = StyleBkd(StyleBkdConfig(style="poetry", poison_rate=0.5)).poison(dataset, seed=0)
    pool_size = poisoned.info["pool_size"]
    positions = poisoned.poisoned_positions
    assert len(positions) == pool_size < 3310 and poisoned.info["effective_rate"] == pool_size / 6920
    eligible = [i for i, y in enumerate(dataset.train.labels) if y == 0]
    assert list(positions) != eligible[:pool_size]  # not a prefix of the eligible rows


@needs_data
def test_stylebkd_without_style_files_is_an_input_error():
    with pytest.raises(InputError, match="stylebkd style 'bible' is not available for dataset 'olid'"):
        StyleBkd().poison(load_dataset("olid", data_dir=SHARED_DATA, train_size=200), seed=0)


# --- the defender's clean budget ------------------------------------------------------------------


@needs_data
def test_budget_is_stratified_disjoint_and_seeded():
    dataset = load_dataset("sst2", data_dir=SHARED_DATA)
    clean_train = dataset.train
    poisoned = BadNet().poison(dataset, seed=0)
    held_out = BudgetConfig(val_source="budget")
    budget = draw_budget(clean_train, dataset.dev, poisoned.poisoned_positions, 0, held_out)
    assert len(budget.rows) == 346  # ceil(0.05 · 6920)
    poisoned_ids = {clean_train.ids[p] for p in poisoned.poisoned_positions}
    assert poisoned_ids.isdisjoint(budget.rows.ids)
    assert all(clean_train.texts[i] == t for i, t in zip(budget.rows.ids, budget.rows.texts))
    assert (len(budget.val), len(budget.fit)) == (69, 277)  # round(0.2 · 346)
    assert sorted(budget.val.ids + budget.fit.ids) == sorted(budget.rows.ids)
    assert Counter(budget.val.labels) == stratified_counts(dict(Counter(budget.rows.labels)), 69)
    again = draw_budget(clean_train, dataset.dev, poisoned.poisoned_positions, 0, held_out)
    assert again == budget
    other = draw_budget(clean_train, dataset.dev, poisoned.poisoned_positions, 1, held_out)
    assert other.rows.ids != budget.rows.ids


@needs_data
def test_default_validation_rows_come_from_dev_and_were_never_trained_on():
    dataset = load_dataset("sst2", data_dir=SHARED_DATA)
    poisoned = BadNet().poison(dataset, seed=0)
    budget = draw_budget(dataset.train, dataset.dev, poisoned.poisoned_positions, 0, BudgetConfig())
    assert budget.val_source == "dev" and len(budget.val) == 300 and budget.fit == budget.rows
    dev_by_id = dict(zip(dataset.dev.ids, dataset.dev.texts))
    assert all(dev_by_id[i] == t for i, t in zip(budget.val.ids, budget.val.texts))
    assert not set(budget.val.texts) & set(poisoned.train.texts)  # no row the victim fits
    assert Counter(budget.val.labels) == stratified_counts(dict(Counter(dataset.dev.labels)), 300)
    assert budget.info()["val_source"] == "dev"
    same_rows = draw_budget(dataset.train, dataset.dev, poisoned.poisoned_positions, 0,
                            BudgetConfig(val_source="budget"))
    assert same_rows.rows == budget.rows  # the validation source does not change D_c


def test_budget_size_rounds_up():
    train = synthetic(n_train=101).train
    dev = synthetic().dev
    budget = draw_budget(train, dev, (), 0, BudgetConfig(val_source="budget"))
    assert (len(budget.rows), len(budget.val), len(budget.fit)) == (6, 1, 5)  # ceil(5.05), round(1.2)
    small = draw_budget(train, dev, (), 0, BudgetConfig(fraction=0.5, val_fraction=0.1, val_source="budget"))
    assert (len(small.rows), len(small.val)) == (51, 5)  # ceil(50.5), round(5.1)
    from_dev = draw_budget(train, dev, (), 0, BudgetConfig())
    assert (len(from_dev.rows), len(from_dev.val), len(from_dev.fit)) == (6, 20, 6)  # capped at the dev split


@needs_data
def test_budget_without_poisoned_rows_has_the_train_label_proportions():
    dataset = load_dataset("sst2", data_dir=SHARED_DATA)
    budget = draw_budget(dataset.train, dataset.dev, (), 0, BudgetConfig())
    assert Counter(budget.rows.labels) == {0: 166, 1: 180}  # 165.5 / 180.5: tie to the lower label


@needs_data
def test_budget_label_mix_does_not_depend_on_the_attack():
    dataset = load_dataset("sst2", data_dir=SHARED_DATA)
    poisoned = BadNet().poison(dataset, seed=0)
    budget = draw_budget(dataset.train, dataset.dev, poisoned.poisoned_positions, 0, BudgetConfig())
    assert Counter(budget.rows.labels) == {0: 166, 1: 180}
