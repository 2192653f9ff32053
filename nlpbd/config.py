"""Typed configuration dataclasses and ``--set key=value`` overrides.

Every method and stage has one dataclass whose fields carry the paper's default and help text
(``option(default, help, ...)``). Overrides are parsed as YAML scalars, type-checked against the
field's annotation and range-checked, so a typo or an out-of-range value fails before any work
starts, with the list of valid keys.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_origin

import yaml

from nlpbd.errors import InputError
from nlpbd.registry import did_you_mean

_MISSING = dataclasses.MISSING


def option(default: Any, help: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, min_items: int | None = None, max_items: int | None = None,
           keyed_when_set: bool = False) -> Any:
    """A dataclass field with help text and an optional numeric range ``[low, high]``.

    ``low_open`` makes the lower bound exclusive (e.g. a poison rate must be > 0); ``min_items`` and
    ``max_items`` bound the length of a list setting (an attack needs at least one trigger).
    ``keyed_when_set`` marks a field added after artifacts were cached: it joins cache keys, cell ids
    and records only when it differs from its default, so existing artifacts keep their keys.
    """
    metadata = {"help": help, "low": low, "high": high, "low_open": low_open, "min_items": min_items,
                "max_items": max_items, "keyed_when_set": keyed_when_set}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def help_of(cls: type, name: str) -> str:
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (used in cache keys and result records); a
    ``keyed_when_set`` field at its default is left out."""
    values = dataclasses.asdict(config)
    for f in fields(config):
        if f.metadata.get("keyed_when_set") and values[f.name] == _default_of(f):
            del values[f.name]
    return values


def _default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not _MISSING else f.default


# --- parsing --------------------------------------------------------------------------------------


def parse_set_options(items: list[str]) -> dict[str, str]:
    """``["a.b=1", "c=x"]`` → ``{"a.b": "1", "c": "x"}``; malformed items raise InputError."""
    parsed: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--set expects key=value, got '{item}'")
        parsed[key] = value.strip()
    return parsed


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    original = value
    if get_origin(tp) is Literal:
        choices = list(get_args(tp))
        if value not in choices:
            text = str(value)
            extra = did_you_mean(text, [str(c) for c in choices])
            raise InputError(f"{key}: '{text}' is not one of {', '.join(map(str, choices))}.{extra}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise InputError(f"{key}: expected true or false, got '{value}'")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{key}: expected an integer, got '{value}'")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-5" (no dot) as a string
            value = _float_or_none(value.strip())
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{key}: expected a number, got '{original}'")
        if not math.isfinite(value):  # .nan passes every range check; .inf trains to non-finite weights
            raise InputError(f"{key}: expected a finite number, got '{original}'")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise InputError(f"{key}: expected a string, got '{value}'")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{key}: expected a string, got '{value}'")
        return str(value)
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML-parsed value to the annotated type ``tp`` or raise InputError."""
    optional, inner = _is_optional(tp)
    if get_origin(inner) is Literal and value in get_args(inner):  # a choice named "none" is a value
        return value
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise InputError(f"{key}: a value is required")
    if get_origin(inner) is list:
        (item_tp,) = get_args(inner)
        if isinstance(value, str):
            value = [yaml.safe_load(v.strip()) if item_tp is not str else v.strip()
                     for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            value = [value]
        items = [coerce(v, item_tp, key) for v in value]
        if item_tp is str and any(not item.strip() for item in items):
            raise InputError(f"{key}: list items must be non-empty strings, got {value!r}")
        return items
    if inner is str and not isinstance(value, str):
        value = str(value)
    return _coerce_scalar(value, inner, key)


def _check_length(f: dataclasses.Field, value: Any, key: str) -> None:
    fewest, most = f.metadata.get("min_items"), f.metadata.get("max_items")
    if not isinstance(value, list):
        return
    if fewest is not None and len(value) < fewest:
        raise InputError(f"{key}: needs at least {fewest} item{'s' if fewest > 1 else ''}, got {len(value)}")
    if most is not None and len(value) > most:
        raise InputError(f"{key}: takes at most {most} items, got {len(value)}")


def _check_range(f: dataclasses.Field, value: Any, key: str) -> None:
    _check_length(f, value, key)
    low, high = f.metadata.get("low"), f.metadata.get("high")
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if low is not None and (value < low or (f.metadata.get("low_open") and value == low)):
        bound = f"> {low}" if f.metadata.get("low_open") else f">= {low}"
        raise InputError(f"{key}: {value} is out of range (must be {bound})")
    if high is not None and value > high:
        raise InputError(f"{key}: {value} is out of range (must be <= {high})")


def _wants_text(tp: Any) -> bool:
    _, inner = _is_optional(tp)
    return inner is str or (get_origin(inner) is list and get_args(inner) == (str,))


def parse_value(raw: str, tp: Any = None) -> Any:
    """A ``--set`` string as YAML, except for text settings, where 'no' or '0123' stay as written."""
    if _wants_text(tp) and not raw.startswith("["):
        return raw
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def apply_overrides(config: Any, overrides: dict[str, Any], section: str) -> Any:
    """A copy of ``config`` with ``overrides`` (raw strings or parsed values) applied and checked."""
    hints = typing.get_type_hints(type(config))
    by_name = {f.name: f for f in fields(config)}
    changes: dict[str, Any] = {}
    for name, raw in overrides.items():
        key = f"{section}.{name}"
        if name not in by_name:
            raise InputError(unknown_key_message(key, section, list(by_name)))
        value = parse_value(raw, hints[name]) if isinstance(raw, str) else raw
        value = coerce(value, hints[name], key)
        _check_range(by_name[name], value, key)
        changes[name] = value
    updated = dataclasses.replace(config, **changes)
    validate = getattr(updated, "validate", None)
    if callable(validate):
        validate()
    return updated


def unknown_key_message(key: str, section: str, names: list[str]) -> str:
    valid = [f"{section}.{n}" for n in names]
    extra = did_you_mean(key, valid)
    listing = ", ".join(valid) if valid else "(this section takes no settings)"
    return f"unknown setting '{key}'.{extra} Valid keys: {listing}"


def check_fields(config: Any, section: str) -> None:
    """Range-check every field of a config built in code (defaults included)."""
    for f in fields(config):
        _check_range(f, getattr(config, f.name), f"{section}.{f.name}")


# --- shared stage configs -------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """The shared victim recipe (protocol.md §2). ``None`` means: the model's documented default."""

    lr: float | None = option(None, "AdamW learning rate (default per model: see nlpbd ls models)",
                              low=0.0, low_open=True)
    epochs: int | None = option(None, "training epochs (default per model)", low=0)
    batch_size: int = option(32, "training batch size", low=1)
    max_length: int = option(128, "maximum tokens per input (truncation)", low=8, high=4096)
    weight_decay: float = option(0.01, "AdamW weight decay (not on bias / LayerNorm)", low=0.0)
    warmup_ratio: float = option(0.06, "linear warm-up as a fraction of all steps", low=0.0, high=1.0)
    grad_clip: float = option(1.0, "gradient-norm clipping (0 disables)", low=0.0)
    select: Literal["dev", "last"] = option("dev", "checkpoint: best clean dev accuracy or last epoch")
    eval_batch_size: int = option(128, "batch size for inference", low=1)
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "arithmetic of the shared training loop: auto = bf16 autocast where the device computes bf16 "
        "natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX; on such a CPU 1.7x faster steps, victims within "
        "the seed spread of fp32), fp32 elsewhere; bf16 = bf16 autocast on any device; fp32 = never autocast. "
        "Inference stays fp32 on the CPU", keyed_when_set=True)
    compile: bool = option(False, "train through torch.compile (dynamic shapes; CPU inductor or CUDA); "
                           "opt-in: on a 2-core CPU it measured no faster than eager", keyed_when_set=True)


@dataclass
class BudgetConfig:
    """The defender's clean labelled budget D_c (protocol.md §4)."""

    fraction: float = option(0.05, "size of D_c as a fraction of the clean train split",
                             low=0.0, high=1.0, low_open=True)
    val_source: Literal["dev", "budget"] = option(
        "dev", "where D_c^val (used only by selecting options) comes from: dev = a stratified sample of the clean "
        "dev split, rows the victim never trained on; budget = a held-out val_fraction of D_c, rows the victim "
        "may have trained on (selection then compares against a training accuracy)")
    val_size: int = option(300, "rows of D_c^val drawn from the dev split (val_source=dev; at most the split)",
                           low=1)
    val_fraction: float = option(0.2, "held-out part of D_c used as D_c^val when val_source=budget",
                                 low=0.0, high=0.9)


@dataclass
class EvalConfig:
    """Evaluation options (protocol.md §3)."""

    floor: bool = option(True, "train a clean model (cached) to report the ASR floor and the gates")
    weak_attack_margin: float = option(0.5, "ASR − floor below this marks weak_attack", low=0.0, high=1.0)
    degraded_points: float = option(0.05, "victim CAcc this far below the clean model marks "
                                    "degraded_victim", low=0.0, high=1.0)
    gate: bool = option(True, "task-agnostic releases: run the defense only when the no-defense AASR − floor "
                        "reaches weak_attack_margin (attacks.md §4); otherwise the cell is recorded as 'gated'")
    stealth: bool = option(False, "data-poisoning attacks: measure the triggered test rows against their clean "
                           "originals (delta_ppl under stealth_lm, sim of MiniLM sentence embeddings; cached)")
    stealth_lm: str = option("smollm2", "causal LM of the delta_ppl measure (registered name, directory or hub id)")
    max_new_tokens: int = option(8, "generator victims (--finetune sft/sft-lora): greedy answer length in tokens; "
                                 "the answer is scored by the label word it names", low=1, high=512)
    survival_rows: int = option(512, "task-agnostic releases, full fine-tuning, no defense: test rows on which the "
                                "record measures, layer by layer, how much of each trigger's collapse of the [CLS] "
                                "states survives in the release, the victim and the clean model; 0 skips it",
                                low=0)


@dataclass
class DataConfig:
    """How a user's own dataset folder (``--dataset PATH``) is read."""

    text_column: str = option("sentence", "text column of a user's dataset files")
    label_column: str = option("label", "label column of a user's dataset files")
    dev_fraction: float = option(0.1, "dev carved from train (stratified) when no dev file exists",
                                 low=0.0, high=0.5, low_open=True)
    target_label: int = option(1, "default target label of a user's dataset", low=0)


STAGE_SECTIONS: dict[str, type] = {
    "train": TrainConfig,
    "budget": BudgetConfig,
    "eval": EvalConfig,
    "data": DataConfig,
}


def sections_for(attack: str, defense: str) -> dict[str, list[str]]:
    """The sections of a cell's settings; the attack's and the defense's names are aliases of theirs."""
    return {"attack": [attack], "defense": [defense], **{name: [] for name in STAGE_SECTIONS}}


def split_overrides(overrides: dict[str, str], sections: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """Group ``section.key`` overrides by section.

    ``sections`` maps each canonical section to its aliases (e.g. ``attack`` ← ``badnet``), so that
    ``badnet.poison_rate`` and ``attack.poison_rate`` mean the same thing.
    """
    alias_to_section = {alias: name for name, aliases in sections.items() for alias in [name, *aliases]}
    grouped: dict[str, dict[str, str]] = {name: {} for name in sections}
    for key, value in overrides.items():
        prefix, dot, rest = key.partition(".")
        if not dot or prefix not in alias_to_section:
            valid = sorted(alias_to_section)
            shown = "'{}." + rest.replace("{", "{{").replace("}", "}}") + "'"
            extra = did_you_mean(prefix, valid, shown) if dot else ""
            raise InputError(f"unknown setting '{key}': keys look like SECTION.NAME with SECTION one of "
                             f"{', '.join(valid)}.{extra}")
        grouped[alias_to_section[prefix]][rest] = value
    return grouped
