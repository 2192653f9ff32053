"""Grid files: one YAML file → validated, expanded cells (the plan is :mod:`nlpbd.plan`).

The file format is documented in ``benchmarks/grids/README.md``. Reading keeps the line of every value,
so every error is an :class:`InputError` "FILE line N: message"; names get "did you mean" hints.
Parsing checks the file's own structure and types with light imports; validation then checks names
against the registries, every setting against its config, and loads each dataset once.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from nlpbd.checks import VARIANT_PART
from nlpbd.config import STAGE_SECTIONS, DataConfig, apply_overrides
from nlpbd.data import DATASETS, load_dataset
from nlpbd.errors import InputError
from nlpbd.finetune import FINETUNE
from nlpbd.methods import ATTACKS, DEFENSES
from nlpbd.models import MODELS, check_hub_model, resolve_model
from nlpbd.registry import did_you_mean, unknown_name_message
from nlpbd.specs import CellSpec

log = logging.getLogger(__name__)

TOP_KEYS = ("name", "description", "datasets", "models", "finetune", "attacks", "defenses", "seeds",
            "train_size", "test_size", "set", "exclude")
REQUIRED_KEYS = ("datasets", "attacks", "defenses")
ENTRY_KEYS = ("name", "variant", "set")
EXCLUDE_KEYS = ("dataset", "model", "finetune", "attack", "defense", "variant", "seed")
METHOD_SECTIONS = ("attack", "defense")
Where = tuple  # a path into the YAML document: ("attacks", 2, "set", "poison_rate")


# --- reading YAML with line numbers ---------------------------------------------------------------


@dataclass(frozen=True)
class SourceLines:
    """1-based lines of every value (and every mapping key) of a YAML document, by path."""

    file: Path
    values: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)

    def line(self, where: Where, key: bool = False) -> int | None:
        table = self.keys if key else self.values
        while where:
            if where in table:
                return table[where]
            where, table = where[:-1], self.values
        return self.values.get(())

    def error(self, where: Where, message: str, key: bool = False) -> InputError:
        line = self.line(where, key)
        return InputError(f"{self.file} line {line}: {message}" if line else f"{self.file}: {message}")


def _index_nodes(node: yaml.Node, where: Where, lines: SourceLines) -> None:
    lines.values[where] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if not isinstance(key_node, yaml.ScalarNode):
                raise InputError(f"{lines.file} line {key_node.start_mark.line + 1}: keys must be plain words")
            if key in seen:
                raise InputError(f"{lines.file} line {key_node.start_mark.line + 1}: duplicate key '{key}'")
            seen.add(key)
            lines.keys[where + (key,)] = key_node.start_mark.line + 1
            _index_nodes(value_node, where + (key,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_nodes(item, where + (i,), lines)


def _refuse_aliases(text: str, path: Path) -> None:
    """Grid files have no use for anchors and aliases, and nested aliases expand exponentially (a
    "billion laughs" file would take all memory), so the event stream is checked before any node is built."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise InputError(f"{path} line {event.start_mark.line + 1}: YAML anchors and aliases (&, *) are not "
                             "allowed in grid files; write each value out")


def read_yaml(path: Path) -> tuple[Any, SourceLines]:
    """The document and the line of each of its parts; YAML syntax errors name their line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"grid file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise InputError(f"{path} line {line}: not UTF-8 text (byte {exc.object[exc.start]:#04x})") from None
    lines = SourceLines(path)
    try:
        _refuse_aliases(text, path)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise InputError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if node is None:
        raise InputError(f"{path}: the grid file is empty")
    _index_nodes(node, (), lines)
    return data, lines


# --- the grid -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodEntry:
    """One attack or defense of a grid: a name, an optional variant label and its settings."""

    kind: Literal["attack", "defense"]
    name: str
    variant: str | None
    settings: dict  # section-qualified: {"attack.poison_rate": 0.2}
    where: Where

    @property
    def label(self) -> str:
        return f"{self.name}[{self.variant}]" if self.variant else self.name


@dataclass(frozen=True)
class Grid:
    name: str
    description: str
    datasets: tuple[str, ...]
    models: tuple[str, ...]
    finetune: tuple[str, ...]
    attacks: tuple[MethodEntry, ...]
    defenses: tuple[MethodEntry, ...]
    seeds: tuple[int, ...]
    train_size: int | None
    test_size: int | None
    settings: dict  # the global `set`
    exclude: tuple[dict, ...]  # key -> tuple of accepted values
    lines: SourceLines

    @property
    def source(self) -> Path:
        return self.lines.file


@dataclass(frozen=True)
class GridCell:
    """An expanded cell and the grid entries it came from (for error lines and grouping)."""

    spec: CellSpec
    attack: MethodEntry
    defense: MethodEntry

    @property
    def label(self) -> str:
        s = self.spec
        finetune = "" if s.finetune == "full" else f" · {s.finetune}"
        return (f"{Path(s.dataset).name} · {Path(s.model).name}{finetune} · {self.attack.label} · "
                f"{self.defense.label} · s{s.seed}")


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false", int: "an integer",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def _text(value: Any, where: Where, lines: SourceLines, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value).strip() == "":
        raise lines.error(where, f"{what} must be a non-empty string, got {_type_name(value)}")
    return str(value)


def _items(data: dict, key: str, lines: SourceLines, default: list | None = None) -> list[tuple[Any, Where]]:
    """A list value with the path of each item; a single scalar counts as a one-element list."""
    if key not in data or data[key] is None:
        if default is None:
            raise lines.error((), f"'{key}' is required (a list)")
        return [(item, (key,)) for item in default]
    value = data[key]
    if isinstance(value, dict):
        raise lines.error((key,), f"'{key}' must be a list, got a mapping")
    if not isinstance(value, list):
        return [(value, (key,))]
    if not value:
        raise lines.error((key,), f"'{key}' must not be empty")
    return [(item, (key, i)) for i, item in enumerate(value)]


def _names(data: dict, key: str, lines: SourceLines, default: list | None = None) -> tuple[str, ...]:
    items = _items(data, key, lines, default)
    names = [_text(item, where, lines, f"{key} entry") for item, where in items]
    _no_duplicates(names, [where for _, where in items], key, lines)
    return tuple(names)


def _no_duplicates(values: list, wheres: list, key: str, lines: SourceLines) -> None:
    seen: set = set()
    for value, where in zip(values, wheres):
        if value in seen:
            raise lines.error(where, f"'{value}' appears twice in {key}")
        seen.add(value)


def _seeds(data: dict, lines: SourceLines) -> tuple[int, ...]:
    items = _items(data, "seeds", lines, [0])
    for seed, where in items:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise lines.error(where, f"seeds: expected an integer >= 0, got {seed!r}")
    _no_duplicates([s for s, _ in items], [w for _, w in items], "seeds", lines)
    return tuple(seed for seed, _ in items)


def _subsample_size(data: dict, key: str, lines: SourceLines) -> int | None:
    """``train_size`` or ``test_size``: absent, or a positive integer."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise lines.error((key,), f"{key}: expected a positive integer, got {value!r}")
    return value


def _unknown_key(key: str, valid: Iterable[str], where: Where, lines: SourceLines, what: str) -> InputError:
    valid = list(valid)
    return lines.error(where, f"unknown {what} '{key}'.{did_you_mean(key, valid)} Valid: {', '.join(valid)}",
                       key=True)


def _entry_settings(kind: str, raw: Any, where: Where, lines: SourceLines) -> dict:
    """An entry's `set`: own settings get the ``attack.``/``defense.`` prefix, stage keys stay."""
    if not isinstance(raw, dict) or not raw:
        raise lines.error(where, f"'set' must be a mapping of settings, got {_type_name(raw)}")
    settings = {}
    for key, value in raw.items():
        key = str(key)
        section, dot, name = key.partition(".")
        if not dot:
            settings[f"{kind}.{key}"] = value
        elif section in STAGE_SECTIONS and name:
            settings[key] = value
        else:
            raise lines.error(where + (key,), f"setting '{key}': an entry's settings are the {kind}'s own "
                              f"(e.g. poison_rate) or {'/'.join(STAGE_SECTIONS)} keys (e.g. budget.fraction)",
                              key=True)
    return settings


def _entry(kind: str, raw: Any, where: Where, lines: SourceLines) -> MethodEntry:
    if not isinstance(raw, dict):
        return MethodEntry(kind, _text(raw, where, lines, f"{kind} name"), None, {}, where)
    for key in raw:
        if str(key) not in ENTRY_KEYS:
            raise _unknown_key(str(key), ENTRY_KEYS, where + (str(key),), lines, f"{kind} entry key")
    if "name" not in raw:
        raise lines.error(where, f"{kind} entry needs a 'name'")
    name = _text(raw["name"], where + ("name",), lines, f"{kind} name")
    variant = raw.get("variant")
    if variant is not None:
        variant = _text(variant, where + ("variant",), lines, "variant")
        if not VARIANT_PART.fullmatch(variant):
            raise lines.error(where + ("variant",), f"variant '{variant}': use letters, digits and _ . = - only")
    settings = _entry_settings(kind, raw["set"], where + ("set",), lines) if raw.get("set") is not None else {}
    if settings and variant is None:
        raise lines.error(where, f"{kind} '{name}' has settings but no 'variant' label (the label names it "
                          "in results, e.g. variant: rate0.2)")
    return MethodEntry(kind, name, variant, settings, where)


def _entries(data: dict, key: str, lines: SourceLines) -> tuple[MethodEntry, ...]:
    entries = [_entry(key[:-1], item, where, lines) for item, where in _items(data, key, lines)]
    _no_duplicates([e.label for e in entries], [e.where for e in entries], key, lines)
    return tuple(entries)


def _global_settings(data: dict, lines: SourceLines) -> dict:
    raw = data.get("set")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise lines.error(("set",), f"'set' must be a mapping of SECTION.NAME: value, got {_type_name(raw)}")
    for key in raw:
        section, dot, name = str(key).partition(".")
        if not section or not dot or not name:
            raise lines.error(("set", str(key)), f"setting '{key}' must look like SECTION.NAME, SECTION one of "
                              f"{', '.join((*METHOD_SECTIONS, *STAGE_SECTIONS))} or a method of the grid", key=True)
    return {str(k): v for k, v in raw.items()}


def _exclude_values(rule: dict, where: Where, lines: SourceLines, axes: dict[str, list]) -> dict:
    parsed = {}
    for key, value in rule.items():
        key = str(key)
        if key not in EXCLUDE_KEYS:
            raise _unknown_key(key, EXCLUDE_KEYS, where + (key,), lines, "exclude key")
        values = value if isinstance(value, list) else [value]
        for j, item in enumerate(values):
            if item not in axes[key]:
                choices = [str(c) for c in axes[key]]
                extra = did_you_mean(str(item), choices)
                item_where = where + (key, j) if isinstance(value, list) else where + (key,)
                raise lines.error(item_where, f"exclude: {key} '{item}' is not in this grid.{extra} "
                                  f"Grid values: {', '.join(choices) or '(none)'}")
        parsed[key] = tuple(values)
    return parsed


def _exclude(data: dict, lines: SourceLines, axes: dict[str, list]) -> tuple[dict, ...]:
    raw = data.get("exclude")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise lines.error(("exclude",), "'exclude' must be a list of partial cells, e.g. "
                          "{dataset: olid, attack: stylebkd}")
    rules = []
    for i, rule in enumerate(raw):
        if not isinstance(rule, dict) or not rule:
            raise lines.error(("exclude", i), "an exclude entry is a mapping with keys among "
                              + ", ".join(EXCLUDE_KEYS))
        rules.append(_exclude_values(rule, ("exclude", i), lines, axes))
    return tuple(rules)


def _axes(datasets, models, finetune, attacks, defenses, seeds) -> dict[str, list]:
    """The values an exclude rule may name, per key."""
    labels = [e.variant for e in attacks + defenses if e.variant]
    combined = [cell_variant(a, d) for a in attacks for d in defenses if d.variant]
    return {"dataset": list(datasets), "model": list(models), "finetune": list(finetune), "seed": list(seeds),
            "attack": list(dict.fromkeys(e.name for e in attacks)),
            "defense": list(dict.fromkeys(e.name for e in defenses)),
            "variant": list(dict.fromkeys(labels + combined))}


def parse_grid(path: Path) -> Grid:
    """Read a grid file and check its structure and types (no registry or data look-ups)."""
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise lines.error((), f"a grid file is a mapping with keys {', '.join(TOP_KEYS)}")
    for key in data:
        if str(key) not in TOP_KEYS:
            raise _unknown_key(str(key), TOP_KEYS, (str(key),), lines, "key")
    for key in REQUIRED_KEYS:
        if data.get(key) is None:
            raise lines.error((), f"'{key}' is required")
    name = _text(data.get("name", Path(path).stem), ("name",), lines, "name")
    description = str(data.get("description") or "")
    datasets, models = _names(data, "datasets", lines), _names(data, "models", lines, ["minilm"])
    finetune = _names(data, "finetune", lines, ["full"])
    attacks, defenses = _entries(data, "attacks", lines), _entries(data, "defenses", lines)
    seeds = _seeds(data, lines)
    axes = _axes(datasets, models, finetune, attacks, defenses, seeds)
    return Grid(name=name, description=description, datasets=datasets, models=models, finetune=finetune,
                attacks=attacks, defenses=defenses, seeds=seeds,
                train_size=_subsample_size(data, "train_size", lines),
                test_size=_subsample_size(data, "test_size", lines), settings=_global_settings(data, lines),
                exclude=_exclude(data, lines, axes), lines=lines)


# --- expansion ------------------------------------------------------------------------------------


def cell_variant(attack: MethodEntry, defense: MethodEntry) -> str | None:
    if defense.variant:
        return f"{attack.variant or ''}+{defense.variant}"
    return attack.variant


def cell_overrides(grid: Grid, attack: MethodEntry, defense: MethodEntry) -> dict:
    """The cell's settings, section-qualified, in precedence order (see the module docstring)."""
    merged = {}
    for key, value in grid.settings.items():
        if key.partition(".")[0] in (*METHOD_SECTIONS, *STAGE_SECTIONS):
            merged[key] = value
    for key, value in grid.settings.items():
        section, _, name = key.partition(".")
        if section == attack.name:
            merged[f"attack.{name}"] = value
        elif section == defense.name:
            merged[f"defense.{name}"] = value
    merged.update(attack.settings)
    merged.update(defense.settings)
    return dict(sorted(merged.items()))


def _excluded(grid: Grid, values: dict) -> bool:
    for rule in grid.exclude:
        if all(any(v in rule_values for v in values[key]) for key, rule_values in rule.items()):
            return True
    return False


def _absolute(name: str, registered: bool) -> str:
    """Paths become absolute (workers may run elsewhere); names stay names. Identity uses the folder name."""
    path = Path(name).expanduser()
    if not registered and path.is_dir():
        return str(path.resolve())
    return name


def _registered(kind: str, name: str) -> bool:
    return name in (DATASETS if kind == "dataset" else MODELS)


def expand(grid: Grid) -> list[GridCell]:
    """All cells in a fixed order: dataset, model, finetune, attack, seed, defense (victim groups contiguous)."""
    cells = []
    axes = itertools.product(grid.datasets, grid.models, grid.finetune, grid.attacks, grid.seeds, grid.defenses)
    for dataset, model, finetune, attack, seed, defense in axes:
        variant = cell_variant(attack, defense)
        values = {"dataset": [dataset], "model": [model], "finetune": [finetune], "attack": [attack.name],
                  "defense": [defense.name], "seed": [seed],
                  "variant": [v for v in (attack.variant, defense.variant, variant) if v]}
        if _excluded(grid, values):
            continue
        spec = CellSpec(attack=attack.name, defense=defense.name,
                        dataset=_absolute(dataset, _registered("dataset", dataset)),
                        model=_absolute(model, _registered("model", model)), finetune=finetune, seed=seed,
                        train_size=grid.train_size, test_size=grid.test_size,
                        overrides=cell_overrides(grid, attack, defense),
                        variant=variant)
        cells.append(GridCell(spec, attack, defense))
    return cells


# --- validation against registries and data -------------------------------------------------------


def _check_names(grid: Grid) -> None:
    lines = grid.lines
    for i, dataset in enumerate(grid.datasets):
        path = Path(dataset).expanduser()
        if dataset not in DATASETS and not (path.is_dir() or os.sep in dataset):
            raise lines.error(("datasets", i), unknown_name_message("dataset", dataset, DATASETS.names()))
        if dataset not in DATASETS and not path.is_dir():
            raise lines.error(("datasets", i), f"dataset folder {path} does not exist")
    for i, model in enumerate(grid.models):
        try:
            if resolve_model(model).identity.startswith("hub:") and model not in MODELS:
                check_hub_model(model)
        except InputError as exc:
            raise lines.error(("models", i), str(exc)) from None
    for i, finetune in enumerate(grid.finetune):
        if finetune not in FINETUNE:
            raise lines.error(("finetune", i), unknown_name_message("fine-tuning method", finetune, FINETUNE.names()))
    for entry in grid.attacks + grid.defenses:
        registry = ATTACKS if entry.kind == "attack" else DEFENSES
        if entry.name not in registry:
            raise lines.error(entry.where, unknown_name_message(entry.kind, entry.name, registry.names()))


def _config_of(section: str, name: str | None = None):

    if section in STAGE_SECTIONS:
        return STAGE_SECTIONS[section]()
    return (ATTACKS if section == "attack" else DEFENSES).get(name).Config()


def _check_setting(section: str, method: str | None, key: str, value: Any, where: Where, lines: SourceLines) -> None:
    try:
        apply_overrides(_config_of(section, method), {key: value}, section)
    except InputError as exc:
        raise lines.error(where, str(exc)) from None


def _check_global_setting(grid: Grid, full_key: str, value: Any) -> None:
    """A global setting against every config it reaches; a method section must name a grid method."""
    section, _, key = full_key.partition(".")
    where, lines = ("set", full_key), grid.lines
    if section in STAGE_SECTIONS:
        _check_setting(section, None, key, value, where, lines)
    reached = [e for e in grid.attacks + grid.defenses if section in (e.kind, e.name)]
    for entry in reached:
        _check_setting(entry.kind, entry.name, key, value, where, lines)
    if reached or section in (*STAGE_SECTIONS, *METHOD_SECTIONS):
        return
    if section in ATTACKS or section in DEFENSES:
        log.warning("%s line %s: setting '%s' reaches no cell: '%s' is not in this grid", lines.file,
                    lines.line(where, key=True), full_key, section)
        return
    sections = [*METHOD_SECTIONS, *STAGE_SECTIONS, *dict.fromkeys(e.name for e in grid.attacks + grid.defenses)]
    extra = did_you_mean(section, sections + ATTACKS.names() + DEFENSES.names())
    raise lines.error(where, f"unknown section '{section}' in setting '{full_key}'.{extra} "
                      f"Valid: {', '.join(sections)}", key=True)


def _check_settings(grid: Grid) -> None:
    """Each setting alone against the configs it reaches, so an error points at its own line."""
    for full_key, value in grid.settings.items():
        _check_global_setting(grid, full_key, value)
    for entry in grid.attacks + grid.defenses:
        for full_key, value in entry.settings.items():
            section, _, key = full_key.partition(".")
            raw_key = key if section == entry.kind else full_key
            _check_setting(section, entry.name if section in METHOD_SECTIONS else None, key, value,
                           entry.where + ("set", raw_key), grid.lines)


def _check_datasets(grid: Grid, data_dir: Path | str | None) -> None:
    """Load each dataset once (with the grid's global data settings), so data errors name its line."""
    data_settings = {k.partition(".")[2]: v for k, v in grid.settings.items() if k.startswith("data.")}
    config = apply_overrides(DataConfig(), data_settings, "data")
    for i, dataset in enumerate(grid.datasets):
        try:
            load_dataset(dataset, data_dir, config, grid.train_size, grid.test_size)
        except InputError as exc:
            raise grid.lines.error(("datasets", i), str(exc)) from None


def validate_grid(grid: Grid, data_dir: Path | str | None = None) -> None:
    """Names (with suggestions), every setting (types, ranges) and the data of a parsed grid; nothing runs."""
    _check_names(grid)
    _check_settings(grid)
    _check_datasets(grid, data_dir)


def load_grid(path: Path, data_dir: Path | str | None = None) -> Grid:
    grid = parse_grid(path)
    validate_grid(grid, data_dir)
    return grid
