"""``--set`` parsing, type coercion, range checks and section routing (nlpbd/config.py)."""

from __future__ import annotations

import pytest

from nlpbd.attacks.addsent import AddSentConfig
from nlpbd.attacks.badnet import BadNetConfig
from nlpbd.config import (
    DataConfig,
    EvalConfig,
    TrainConfig,
    apply_overrides,
    check_fields,
    help_of,
    parse_set_options,
    split_overrides,
)
from nlpbd.errors import InputError


def test_parse_set_options_splits_on_the_first_equals():
    assert parse_set_options(["attack.poison_rate= 0.2 ", "defense.x=a=b", "train.lr="]) == {
        "attack.poison_rate": "0.2", "defense.x": "a=b", "train.lr": ""}


@pytest.mark.parametrize("item", ["novalue", "=x", " =1"])
def test_parse_set_options_rejects_items_without_key_or_value(item):
    with pytest.raises(InputError, match=f"--set expects key=value, got '{item}'"):
        parse_set_options([item])


def test_apply_overrides_coerces_each_type():
    config = apply_overrides(BadNetConfig(), {"poison_rate": "0.2", "num_insertions": "3", "triggers": "cf, mn",
                                              "target_label": "1", "label_mode": "mix"}, "attack")
    assert config == BadNetConfig(poison_rate=0.2, num_insertions=3, triggers=["cf", "mn"], target_label=1,
                                  label_mode="mix")
    assert type(config.poison_rate) is float and type(config.num_insertions) is int
    assert apply_overrides(BadNetConfig(poison_rate=1), {"poison_rate": "1"}, "attack").poison_rate == 1.0
    assert apply_overrides(EvalConfig(), {"floor": "false"}, "eval").floor is False
    assert apply_overrides(EvalConfig(floor=False), {"floor": "true"}, "eval").floor is True
    assert apply_overrides(BadNetConfig(target_label=1), {"target_label": "none"}, "attack").target_label is None
    assert apply_overrides(TrainConfig(lr=1e-3), {"lr": "null"}, "train").lr is None
    assert apply_overrides(BadNetConfig(), {"triggers": "[zz, 3]"}, "attack").triggers == ["zz", "3"]


def test_parsed_values_from_a_config_file_are_accepted():
    config = apply_overrides(TrainConfig(), {"epochs": 4, "lr": 3e-5, "select": "last"}, "train")
    assert (config.epochs, config.lr, config.select) == (4, 3e-5, "last")


def test_float_written_without_a_dot_is_a_number():
    # YAML 1.1 reads "2e-5" as a string; learning rates are written that way.
    assert apply_overrides(TrainConfig(), {"lr": "2e-5"}, "train").lr == 2e-5
    assert apply_overrides(TrainConfig(), {"lr": "1E-3"}, "train").lr == 1e-3


def test_text_settings_keep_the_string_as_written():
    # "no", "on" and "0123" are YAML booleans / numbers; a trigger word or column name is text.
    assert apply_overrides(BadNetConfig(), {"triggers": "no"}, "attack").triggers == ["no"]
    assert apply_overrides(BadNetConfig(), {"triggers": "on,off"}, "attack").triggers == ["on", "off"]
    assert apply_overrides(AddSentConfig(), {"trigger": "yes"}, "attack").trigger == "yes"
    assert apply_overrides(DataConfig(), {"text_column": "0123"}, "data").text_column == "0123"


def test_a_choice_named_none_is_a_value_not_a_missing_one():
    from nlpbd.defenses.btu import BTUConfig
    from nlpbd.defenses.d3 import D3Config

    assert apply_overrides(D3Config(), {"freeze": "none"}, "defense").freeze == "none"
    tuned = apply_overrides(BTUConfig(), {"post_unlearn_tune": "clean_subset"}, "defense")
    assert apply_overrides(tuned, {"post_unlearn_tune": "none"}, "defense").post_unlearn_tune == "none"


def test_unknown_key_lists_valid_keys_and_suggests_one():
    with pytest.raises(InputError) as info:
        apply_overrides(BadNetConfig(), {"poison_rat": "0.2"}, "attack")
    assert str(info.value) == ("unknown setting 'attack.poison_rat'. Did you mean 'attack.poison_rate'? Valid keys: "
                               "attack.poison_rate, attack.target_label, attack.label_mode, attack.triggers, "
                               "attack.num_insertions")


@pytest.mark.parametrize("config, section, overrides, message", [
    (BadNetConfig(), "attack", {"poison_rate": "abc"}, "attack.poison_rate: expected a number, got 'abc'"),
    (BadNetConfig(), "attack", {"poison_rate": "true"}, "attack.poison_rate: expected a number, got 'True'"),
    (BadNetConfig(), "attack", {"num_insertions": "2.5"}, "attack.num_insertions: expected an integer, got '2.5'"),
    (EvalConfig(), "eval", {"floor": "1"}, "eval.floor: expected true or false, got '1'"),
    (TrainConfig(), "train", {"batch_size": "none"}, "train.batch_size: a value is required"),
    (BadNetConfig(), "attack", {"poison_rate": "0"}, r"attack.poison_rate: 0.0 is out of range \(must be > 0.0\)"),
    (BadNetConfig(), "attack", {"poison_rate": "1.5"}, r"attack.poison_rate: 1.5 is out of range \(must be <= 1.0\)"),
    (TrainConfig(), "train", {"epochs": "-1"}, r"train.epochs: -1 is out of range \(must be >= 0\)"),
    (TrainConfig(), "train", {"lr": "0"}, r"train.lr: 0.0 is out of range \(must be > 0.0\)"),
    (TrainConfig(), "train", {"lr": "nan"}, "train.lr: expected a finite number, got 'nan'"),
    (TrainConfig(), "train", {"max_length": "4"}, r"train.max_length: 4 is out of range \(must be >= 8\)"),
    (TrainConfig(), "train", {"select": "lst"}, "train.select: 'lst' is not one of dev, last. Did you mean 'last'?"),
    (BadNetConfig(), "attack", {"label_mode": "drty"},
     "attack.label_mode: 'drty' is not one of dirty, clean, mix. Did you mean 'dirty'?"),
])
def test_type_range_and_choice_errors(config, section, overrides, message):
    with pytest.raises(InputError, match=message):
        apply_overrides(config, overrides, section)


def test_apply_overrides_returns_a_copy():
    original = BadNetConfig()
    changed = apply_overrides(original, {"triggers": "zz"}, "attack")
    assert original.triggers == ["cf", "mn", "bb", "tq"] and changed.triggers == ["zz"]
    assert BadNetConfig().triggers is not BadNetConfig().triggers  # list defaults are not shared


def test_check_fields_range_checks_configs_built_in_code():
    check_fields(TrainConfig(lr=2e-5, epochs=3), "train")
    with pytest.raises(InputError, match=r"train.batch_size: 0 is out of range \(must be >= 1\)"):
        check_fields(TrainConfig(batch_size=0), "train")


def test_help_text_is_attached_to_fields():
    assert help_of(BadNetConfig, "num_insertions") == "trigger insertions per poisoned text"
    with pytest.raises(KeyError):
        help_of(BadNetConfig, "nope")


SECTIONS = {"attack": ["badnet"], "defense": ["ft"], "train": [], "budget": [], "eval": [], "data": []}


def test_split_overrides_maps_aliases_to_their_section():
    grouped = split_overrides({"badnet.poison_rate": "0.2", "ft.epochs": "2", "train.lr": "1e-4"}, SECTIONS)
    assert grouped == {"attack": {"poison_rate": "0.2"}, "defense": {"epochs": "2"}, "train": {"lr": "1e-4"},
                       "budget": {}, "eval": {}, "data": {}}
    assert split_overrides({"attack.poison_rate": "0.2"}, SECTIONS)["attack"] == {"poison_rate": "0.2"}


@pytest.mark.parametrize("key, message", [
    ("atack.poison_rate", "unknown setting 'atack.poison_rate'.*Did you mean 'attack.poison_rate'\\?"),
    ("addsent.trigger", "unknown setting 'addsent.trigger': keys look like SECTION.NAME"),
    ("poison_rate", "unknown setting 'poison_rate': keys look like SECTION.NAME with SECTION one of attack, "
                    "badnet, budget, data, defense, eval, ft, train.$"),
])
def test_split_overrides_rejects_unknown_sections(key, message):
    with pytest.raises(InputError, match=message):
        split_overrides({key: "1"}, SECTIONS)
