"""One battery for every registered attack, at tiny scale (as timm parametrises over ``list_models()``).

Each attack keeps the training split's size and row ids (a data attack changes texts and labels in
place; a model-supply attack leaves the user's rows alone), puts only non-target test rows in its ASR
set, documents every setting, and a model-supply attack's release loads as a classifier. ``TINY_ATTACK``
gives each attack the settings that make it run in seconds on the tiny model; a new attack fails here
until it has an entry, instead of running at paper scale.
"""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from helpers import SHARED_DATA, needs_data

from nlpbd.cache import ArtifactCache
from nlpbd.config import apply_overrides
from nlpbd.data import load_dataset
from nlpbd.methods import ATTACKS, DataPoisoningAttack, ModelSupplyAttack, SupplyContext
from nlpbd.models import load_classifier

TINY_TRIGGERS = ["cf", "mn", "bb", "tq", "mb"]  # single pieces of the tiny vocabulary
SMALL_PROXY = {"proxy_train": 40, "proxy_dev": 10, "max_length": 32}
TINY_ATTACK: dict[str, dict] = {
    # data attacks edit rows: their defaults are already cheap
    "badnet": {}, "addsent": {}, "synbkd": {}, "stylebkd": {},
    "wpoison": {"n_poison": 10, "epochs": 1, "batch_size": 8, **SMALL_PROXY},
    "ep": {"clean_epochs": 1, "clean_batch_size": 8, "ep_epochs": 1, "poison_fraction": 0.5, **SMALL_PROXY},
    "ripples": {"epochs": 1, "max_steps": 3, "clean_epochs": 1, "clean_batch_size": 8, "n_target_words": 3,
                **SMALL_PROXY},
    "por": {"triggers": TINY_TRIGGERS, "steps": 3, "heldout_lines": 8},
    "neuba": {"triggers": TINY_TRIGGERS, "steps": 3, "batch_size": 4, "block_size": 32, "graft_steps": 3},
    "badpre": {"steps": 3, "batch_size": 4, "accumulation": 2, "max_length": 32, "graft_steps": 3},
}
NAMES = sorted(ATTACKS.names())


def tiny_attack(name: str):
    cls = ATTACKS.get(name)
    return cls(apply_overrides(cls.Config(), TINY_ATTACK[name], "attack"))


@pytest.fixture(scope="module")
def sst2():
    return load_dataset("sst2", SHARED_DATA, train_size=200)


def test_every_attack_has_a_tiny_configuration():
    assert sorted(TINY_ATTACK) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_attack_setting_has_help_text(name):
    cls = ATTACKS.get(name)
    assert cls.description, f"{name}: no description"
    for f in fields(cls.Config):
        assert f.metadata.get("help", "").strip(), f"{name}: setting '{f.name}' has no help text"


@needs_data
@pytest.mark.parametrize("name", NAMES)
def test_train_split_keeps_its_rows_and_the_asr_set_holds_non_target_rows(name, sst2):
    attack = tiny_attack(name)
    if isinstance(attack, DataPoisoningAttack):
        attack.check(sst2)
        poisoned = attack.poison(sst2, seed=0)
    else:
        poisoned = attack.evaluation(sst2, seed=0)
        assert poisoned.train == sst2.train and not poisoned.poisoned_positions
    assert len(poisoned.train) == len(sst2.train) and poisoned.train.ids == sst2.train.ids
    assert set(poisoned.poisoned_positions) <= set(range(len(sst2.train)))
    test_labels = dict(zip(sst2.test.ids, sst2.test.labels))
    if poisoned.trigger_sets:  # task-agnostic: every test row per trigger, original labels, no target
        assert poisoned.target is None and not len(poisoned.asr_set)
        assert all(s.ids == sst2.test.ids and s.labels == sst2.test.labels for s in poisoned.trigger_sets.values())
        return
    assert len(poisoned.asr_set) and set(poisoned.asr_set.labels) == {poisoned.target}
    if isinstance(attack, DataPoisoningAttack):  # ids may index a released file: ask for the clean originals
        non_target = {t for t, y in zip(sst2.test.texts, sst2.test.labels) if y != poisoned.target}
        originals = [text for text in attack.clean_originals(sst2, poisoned) if text is not None]
        assert originals and set(originals) <= non_target
    else:
        assert all(test_labels[i] != poisoned.target for i in poisoned.asr_set.ids)


@needs_data
@pytest.mark.parametrize("name", [n for n in NAMES if issubclass(ATTACKS.get(n), ModelSupplyAttack)])
def test_every_release_loads_as_a_classifier(name, sst2, tiny_ref, tmp_path):
    attack = tiny_attack(name)
    ctx = SupplyContext(base=tiny_ref, num_labels=sst2.num_labels, dataset_name=sst2.name, data_dir=SHARED_DATA,
                        seed=0, device=torch.device("cpu"), downstream_texts=sst2.dev.texts + sst2.test.texts,
                        cache=ArtifactCache(tmp_path / "cache"))
    attack.suspect_payload(ctx)  # what the release's cache key hashes: the attack's inputs exist
    out = tmp_path / "release"
    out.mkdir()
    attack.build_suspect(ctx, out)
    model = load_classifier(str(out), sst2.num_labels)
    assert model.config.num_labels == sst2.num_labels
