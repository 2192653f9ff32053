"""Grids: one YAML file → validated cells → a plan that trains each victim once.

A grid file (``benchmarks/grids/*.yaml``) names the axes of a comparison::

    name: smoke                     # default: the file name
    description: what it is for
    datasets: [sst2]                # registered names or dataset folders (required)
    models: [minilm]                # registered names, hub ids or model folders (default [minilm])
    finetune: [full]                # default [full]
    attacks:                        # required; a name, or a labelled variant with its own settings
      - badnet
      - {name: badnet, variant: rate0.2, set: {poison_rate: 0.2}}
    defenses: [none, ft, btu]       # required; entries as for attacks
    seeds: [0, 1, 2]                # default [0]
    train_size: 600                 # optional stratified train subsample
    test_size: 1000                 # optional stratified test subsample (CAcc and triggered test sets)
    set:                            # settings for every cell: SECTION.NAME: value
      train.epochs: 2               #   SECTION: attack, defense, train, budget, eval, data, or the
      ft.epochs: 2                  #   name of one of the grid's methods (then only its cells)
    exclude:                        # partial cells to drop (a value may be a list: any of them)
      - {dataset: olid, attack: stylebkd}

Entry ``set`` keys are the method's own settings (``poison_rate`` → ``attack.poison_rate``) or
stage keys (``budget.fraction``); an entry with ``set`` needs a ``variant`` label. The cell's
``variant`` is the attack's label, ``+`` and the defense's label when the defense has one:
``rate0.2``, ``rate0.2+rho0.3``, ``+rho0.3``. ``exclude`` matches ``variant`` against either label
or the combined string. Relative paths are resolved against the current directory, like ``nlpbd run``.
Precedence of settings: ``set`` with ``attack.``/``defense.``/stage sections, then ``set`` with a
method's name, then the entry's own ``set``.

Every error is an :class:`InputError` "FILE line N: message"; names get "did you mean" hints.

Planning groups cells by the victim they train on, and counts what has to be trained: the cache keys
of the suspect release (model-supply attacks), the victim, the clean reference model, and for
pre-fine-tuning defenses the purified model and the victim fine-tuned from it, all computed from the
pipeline's own payload functions, so planning builds nothing. Post-training
and inference-time defenses and BTU-like training defenses only reuse their group's victim (BTU adds its
exposure runs); a purifying defense's cell also needs the standard victim (for the undefended
numbers), so it stays in that group and its two extra models are counted on their own.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml

from nlpbd.cache import canonical_json, content_key
from nlpbd.config import STAGE_SECTIONS, apply_overrides
from nlpbd.errors import InputError
from nlpbd.registry import closest, unknown_name_message
from nlpbd.results import RECORDS_SUBDIR
from nlpbd.specs import CellSpec, Stage

log = logging.getLogger(__name__)

TOP_KEYS = ("name", "description", "datasets", "models", "finetune", "attacks", "defenses", "seeds",
            "train_size", "test_size", "set", "exclude")
REQUIRED_KEYS = ("datasets", "attacks", "defenses")
ENTRY_KEYS = ("name", "variant", "set")
EXCLUDE_KEYS = ("dataset", "model", "finetune", "attack", "defense", "variant", "seed")
METHOD_SECTIONS = ("attack", "defense")
VARIANT_LABEL = re.compile(r"[A-Za-z0-9_.=-]+")
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
    hint = closest(key, valid)
    extra = f" Did you mean '{hint}'?" if hint else ""
    return lines.error(where, f"unknown {what} '{key}'.{extra} Valid: {', '.join(valid)}", key=True)


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
        if not VARIANT_LABEL.fullmatch(variant):
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
                hint = closest(str(item), choices)
                extra = f" Did you mean '{hint}'?" if hint else ""
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
    from nlpbd.data import DATASETS
    from nlpbd.models import MODELS

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


def unregistered_methods(grid: Grid) -> list[str]:
    """Attack and defense names of the grid that no registry knows (e.g. methods not implemented yet)."""
    from nlpbd.methods import ATTACKS, DEFENSES

    return [f"{e.kind} '{e.name}'" for e in grid.attacks + grid.defenses
            if e.name not in (ATTACKS if e.kind == "attack" else DEFENSES)]


def _check_names(grid: Grid) -> None:
    from nlpbd.data import DATASETS
    from nlpbd.methods import ATTACKS, DEFENSES
    from nlpbd.finetune import FINETUNE
    from nlpbd.models import MODELS, check_hub_model, resolve_model

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
    from nlpbd.methods import ATTACKS, DEFENSES

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
    from nlpbd.methods import ATTACKS, DEFENSES

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
    hint = closest(section, sections + ATTACKS.names() + DEFENSES.names())
    extra = f" Did you mean '{hint}'?" if hint else ""
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
    from nlpbd.config import DataConfig
    from nlpbd.data import load_dataset

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


# --- planning -------------------------------------------------------------------------------------

CellState = Literal["done", "failed", "pending"]
# A gated cell (a task-agnostic release below the sanity gate, pipeline._sanity_gate) is complete: it is
# reported, not defended, and a rerun would gate it again.
DONE_STATUSES = ("ok", "gated")


@dataclass(frozen=True)
class Builds:
    """The cached artifacts a cell needs, with the keys the pipeline gives them (None: not needed)."""

    suspect: str | None = None  # a model-supply attack's release
    victim: str | None = None  # the standard victim: it groups cells
    clean: str | None = None  # the clean reference model (eval.floor)
    purified: str | None = None  # a pretrained-stage defense's purified start ...
    defended: str | None = None  # ... and the victim fine-tuned from it (or from a filter's kept rows)
    filtered: str | None = None  # a training-data filter's kept rows (BKI, CUBE)
    exact: bool = True  # False: a key could not be computed up front (counts become upper bounds)


@dataclass
class PlannedCell:
    cell: GridCell
    cell_id: str
    group: str
    stage: str  # the defense's Stage name: PRETRAINED, TRAINING, POST, INFERENCE
    builds: Builds
    state: CellState = "pending"
    error: str | None = None

    @property
    def spec(self):
        return self.cell.spec

    @property
    def label(self) -> str:
        return self.cell.label


@dataclass
class VictimGroup:
    """Cells that share one victim; they run in order in one process, the first one training it."""

    key: str
    cells: list[PlannedCell]

    def todo(self, retry_failed: bool) -> list[PlannedCell]:
        return [c for c in self.cells if c.state == "pending" or (retry_failed and c.state == "failed")]


@dataclass(frozen=True)
class PlanSummary:
    cells: int
    done: int
    failed: int
    to_run: int
    groups: int
    groups_to_run: int
    suspects_to_build: int
    victims_to_train: int
    clean_models_to_train: int
    purified_models_to_build: int
    purified_victims_to_train: int
    training_defense_runs: int  # e.g. BTU's exposure runs (not cached: one per cell)
    exact: bool  # False: some keys were unknown before running; the counts are upper bounds
    filtered_sets_to_build: int = 0  # training-data filters' kept rows (BKI, CUBE) ...
    filtered_victims_to_train: int = 0  # ... and the victims trained on them

    @property
    def trainings(self) -> int:
        return (self.suspects_to_build + self.victims_to_train + self.clean_models_to_train
                + self.purified_models_to_build + self.purified_victims_to_train + self.training_defense_runs
                + self.filtered_sets_to_build + self.filtered_victims_to_train)

    def as_dict(self) -> dict:
        return {**self.__dict__, "trainings": self.trainings}


# Which cache kind each build lives under (clean and purified victims are victims).
BUILD_KINDS = {"suspect": "suspect", "victim": "victim", "clean": "victim", "purified": "purified",
               "defended": "victim", "filtered": "filtered"}


@dataclass
class Plan:
    grid: Grid
    cells: list[PlannedCell]
    groups: list[VictimGroup]
    retry_failed: bool = False

    def todo_groups(self) -> list[VictimGroup]:
        return [g for g in self.groups if g.todo(self.retry_failed)]

    def todo(self) -> list[PlannedCell]:
        return [c for g in self.groups for c in g.todo(self.retry_failed)]

    def work_units(self, cache) -> list[list[PlannedCell]]:
        """What executors hand out, in plan order, each unit's cells run in order in one process.

        A group whose victim (or clean reference model) is still to be trained is one unit, so it is
        trained once. Once both are cached the group's cells share nothing that needs training, so
        each is a unit of its own and they spread over the workers: a sweep of post-training
        defenses on one victim runs in parallel.
        """
        units: list[list[PlannedCell]] = []
        for group in self.todo_groups():
            todo = group.todo(self.retry_failed)
            if all(_shared_builds_cached(c, cache) for c in todo):
                units.extend([c] for c in todo)
            else:
                units.append(todo)
        return units

    def summary(self, cache) -> PlanSummary:
        todo = self.todo()

        def missing(build: str, stage: str | None = None) -> int:
            keys = {getattr(c.builds, build) if c.builds.exact else c.group for c in todo
                    if (stage is None or c.stage == stage)
                    and (getattr(c.builds, build) or (not c.builds.exact and build == "victim"))}
            return sum(1 for key in keys if cache.lookup(BUILD_KINDS[build], key) is None)

        return PlanSummary(
            cells=len(self.cells), done=sum(c.state == "done" for c in self.cells),
            failed=sum(c.state == "failed" for c in self.cells), to_run=len(todo), groups=len(self.groups),
            groups_to_run=len(self.todo_groups()), suspects_to_build=missing("suspect"),
            victims_to_train=missing("victim"), clean_models_to_train=missing("clean"),
            purified_models_to_build=missing("purified"), purified_victims_to_train=missing("defended", "PRETRAINED"),
            training_defense_runs=sum(c.stage == "TRAINING" for c in todo), exact=all(c.builds.exact for c in todo),
            filtered_sets_to_build=missing("filtered"), filtered_victims_to_train=missing("defended", "FILTER"))


def _shared_builds_cached(cell: PlannedCell, cache) -> bool:
    """Whether the models a cell shares with its group (its victim, the clean one) are cached."""
    builds = cell.builds
    return (builds.exact and builds.victim is not None
            and all(cache.lookup("victim", key) is not None for key in (builds.victim, builds.clean) if key))


def _suspect_key(cell, env, fingerprint: str, memo: dict) -> str | None:
    """The release's key (None for data attacks); its payload hashes proxy files: once per release."""
    from nlpbd.methods import ModelSupplyAttack
    from nlpbd.pipeline import suspect_payload, supply_context

    if not isinstance(cell.attack, ModelSupplyAttack):
        return None
    key = canonical_json([cell.model.identity, cell.attack.cache_payload(), cell.spec.seed, fingerprint,
                          str(env.device)])
    if key not in memo:
        memo[key] = content_key(suspect_payload(cell, supply_context(cell, env)))
    return memo[key]


def cell_builds(cell, env, fingerprint: str, memo: dict) -> Builds:
    """Every key a cell's stages will use, from the pipeline's own payload functions; nothing is built.

    A test checks all keys against real records.
    """
    from nlpbd.errors import NlpbdError
    from nlpbd.pipeline import (artifact_identity, clean_data_key, filter_payload, poison_payload,
                                purified_payload, victim_payload)

    def victim(start: str, data_key: str) -> str:
        return content_key(victim_payload(cell, start, data_key))

    try:
        suspect = _suspect_key(cell, env, fingerprint, memo)
    except (NlpbdError, OSError) as exc:  # e.g. a proxy file missing: the cell will fail and say so
        log.debug("no release key for %s: %s", cell.cell_id, exc)
        return Builds(exact=False)
    start = artifact_identity(suspect) if suspect else cell.model.identity
    poison = content_key(poison_payload(cell))
    clean = victim(cell.model.identity, clean_data_key(cell)) if cell.eval.floor else None
    purified = defended = filtered = None
    if cell.defense.stage is Stage.PRETRAINED:
        purified = content_key(purified_payload(cell, start))
        defended = victim(artifact_identity(purified), poison)
    standard = victim(start, poison)
    if cell.defense.stage is Stage.FILTER:
        filtered = content_key(filter_payload(cell, poison, standard))
        defended = victim(start, filtered)
    return Builds(suspect, standard, clean, purified, defended, filtered)


def _group_key(cell, builds: Builds) -> str:
    """The victim's key; without one, everything the victim depends on."""
    from nlpbd.config import to_dict

    return builds.victim or content_key({"dataset": cell.dataset.name, "model": cell.model.identity,
                                         "finetune": cell.spec.finetune, "attack": cell.attack.cache_payload(),
                                         "seed": cell.spec.seed, "train": to_dict(cell.train),
                                         "train_size": cell.spec.train_size, "test_size": cell.spec.test_size})


def record_state(results_dir: Path, cell_id: str) -> tuple[CellState, str | None]:
    """done / failed / pending from ``records/<cell_id>.json``; an unreadable file counts as pending."""
    path = Path(results_dir) / RECORDS_SUBDIR / f"{cell_id}.json"
    if not path.is_file():
        return "pending", None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("unreadable record %s (%s): the cell will run again", path, exc)
        return "pending", None
    if record.get("status") in DONE_STATUSES:
        return "done", None
    return "failed", record.get("error")


def prepare(grid_cell: GridCell, env, grid: Grid, load=None):
    """``prepare_cell`` with errors pointing at the attack entry's line."""
    from nlpbd.data import load_dataset
    from nlpbd.pipeline import prepare_cell

    try:
        return prepare_cell(grid_cell.spec, env, load or load_dataset)
    except InputError as exc:
        raise grid.lines.error(grid_cell.attack.where, f"cell {grid_cell.label}: {exc}") from None


def plan_grid(grid: Grid, env, retry_failed: bool = False) -> Plan:
    """Every cell prepared (ids, keys), its state read from the results directory, grouped by victim."""
    from nlpbd.data import loading_once

    planned, groups, fingerprints, suspects = [], {}, {}, {}
    cells = expand(grid)
    if not cells:
        log.warning("%s: the excludes remove every cell; the grid has nothing to run", grid.source)
    load = loading_once()  # identical datasets are read once for the whole grid
    for grid_cell in cells:
        cell = prepare(grid_cell, env, grid, load)
        if id(cell.dataset) not in fingerprints:  # a hash over every row: once per dataset
            fingerprints[id(cell.dataset)] = cell.dataset.fingerprint
        builds = cell_builds(cell, env, fingerprints[id(cell.dataset)], suspects)
        state, error = record_state(env.results_dir, cell.cell_id)
        item = PlannedCell(grid_cell, cell.cell_id, _group_key(cell, builds), cell.defense.stage.name, builds,
                           state, error)
        planned.append(item)
        groups.setdefault(item.group, []).append(item)
    _check_unique_ids(planned, grid)
    return Plan(grid, planned, [VictimGroup(k, v) for k, v in groups.items()], retry_failed)


def _check_unique_ids(planned: list[PlannedCell], grid: Grid) -> None:
    seen: dict[str, PlannedCell] = {}
    for item in planned:
        if item.cell_id in seen:
            raise grid.lines.error(item.cell.attack.where, f"cells {seen[item.cell_id].label} and {item.label} are "
                                   "the same cell (same resolved settings): remove one of the entries")
        seen[item.cell_id] = item


def with_state(plan: Plan, results_dir: Path) -> Plan:
    """The plan with every cell's state re-read from disk (after a run)."""
    cells = [replace(c, state=s, error=e) for c in plan.cells for s, e in [record_state(results_dir, c.cell_id)]]
    by_id = {c.cell_id: c for c in cells}
    groups = [VictimGroup(g.key, [by_id[c.cell_id] for c in g.cells]) for g in plan.groups]
    return Plan(plan.grid, cells, groups, plan.retry_failed)
