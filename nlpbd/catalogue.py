"""A light index of the registered attacks and defenses: names, descriptions and typed settings.

The method modules import torch and transformers (5-10 s on a loaded CPU machine), so checking a name
or a ``--set`` value through the registries made every typo wait that long. ``catalogue.json`` holds
what the checks need, written from the registries by ``python -m nlpbd.catalogue``. It is used only
while it is current: it records a digest of the method sources and of the config code, and a changed
file (or an installed plug-in) sends every look-up to the registries, so it can be slow but never stale.
A test keeps the committed file current.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import types
import typing
from dataclasses import dataclass, fields
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from nlpbd.config import option

log = logging.getLogger(__name__)

CATALOGUE_FILE = Path(__file__).with_name("catalogue.json")
KINDS = ("attack", "defense")
PACKAGES = {"attack": "nlpbd.attacks", "defense": "nlpbd.defenses"}
# Core files whose content the catalogue depends on besides the method packages.
CORE_SOURCES = ("config.py", "methods.py", "catalogue.py")


@dataclass(frozen=True)
class MethodInfo:
    """What ``nlpbd ls`` shows and what a setting is checked against, for one attack or defense."""

    kind: str
    name: str
    label: str  # the attack's threat model or the defense's stage
    description: str
    Config: type


# --- types as text --------------------------------------------------------------------------------


def type_text(tp: Any) -> str:
    """An annotation as Python source that :func:`parse_type` reads back: ``list[str]``, ``int | None``."""
    if tp is type(None):
        return "None"
    origin = get_origin(tp)
    if origin is Literal:
        return f"Literal[{', '.join(repr(a) for a in get_args(tp))}]"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_text(a) for a in get_args(tp))}]"
    return tp.__name__


def parse_type(text: str) -> Any:
    namespace = {"Literal": Literal, "None": None, "int": int, "float": float, "str": str, "bool": bool,
                 "list": list, "dict": dict, "tuple": tuple}
    return eval(text, {"__builtins__": {}}, namespace)  # our own file, written by type_text


# --- building (heavy: imports every method) ------------------------------------------------------


def _settings(config_class: type) -> list[dict]:
    hints = typing.get_type_hints(config_class)
    rows = []
    for f in fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append({"name": f.name, "type": type_text(hints[f.name]), "default": default,
                     "help": f.metadata.get("help", ""), "low": f.metadata.get("low"),
                     "high": f.metadata.get("high"), "low_open": f.metadata.get("low_open", False),
                     "min_items": f.metadata.get("min_items"), "max_items": f.metadata.get("max_items")})
    return rows


def build() -> dict:
    """The catalogue from the registries (imports every method module)."""
    from nlpbd.methods import ATTACKS, DEFENSES

    entries: dict[str, dict] = {}
    for kind, registry in (("attack", ATTACKS), ("defense", DEFENSES)):
        entries[kind] = {name: {"label": (cls.threat_model if kind == "attack" else cls.stage).value,
                                "description": cls.description, "settings": _settings(cls.Config)}
                         for name, cls in registry.items()}
    return {"digest": source_digest(), **entries}


def write() -> Path:
    CATALOGUE_FILE.write_text(json.dumps(build(), indent=1, sort_keys=True) + "\n")
    return CATALOGUE_FILE


# --- reading (light) ------------------------------------------------------------------------------


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # imports nlpbd only, not the method package itself
    return Path(list(spec.submodule_search_locations)[0])


def source_digest() -> str:
    """sha256 over the method modules and the core code their settings depend on."""
    core = Path(__file__).parent
    files = [core / name for name in CORE_SOURCES]
    for package in PACKAGES.values():
        files.extend(sorted(_package_dir(package).glob("*.py")))
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.parent.name}/{path.name}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _has_plugins() -> bool:
    return any(entry_points(group=package) for package in PACKAGES.values())


@functools.lru_cache(maxsize=1)
def _current() -> dict | None:
    """The committed catalogue if it describes the installed code, else None (use the registries)."""
    try:
        data = json.loads(CATALOGUE_FILE.read_text())
    except (OSError, ValueError):
        return None
    if data.get("digest") != source_digest():
        log.debug("catalogue.json is out of date: method checks import the registries")
        return None
    if _has_plugins():
        return None
    return data


def _config_class(name: str, settings: list[dict]) -> type:
    specs = [(s["name"], parse_type(s["type"]),
              option(s["default"], s["help"], low=s["low"], high=s["high"], low_open=s["low_open"],
                     min_items=s["min_items"], max_items=s["max_items"]))
             for s in settings]
    return dataclasses.make_dataclass(f"{name}Config", specs)


def methods(kind: str) -> dict[str, MethodInfo]:
    """Every registered method of ``kind`` (``attack`` or ``defense``), light when the catalogue is current."""
    data = _current()
    if data is None:
        return _from_registry(kind)
    return {name: MethodInfo(kind, name, e["label"], e["description"], _config_class(name, e["settings"]))
            for name, e in data[kind].items()}


def _from_registry(kind: str) -> dict[str, MethodInfo]:
    from nlpbd.methods import ATTACKS, DEFENSES

    registry = ATTACKS if kind == "attack" else DEFENSES
    return {name: MethodInfo(kind, name, (cls.threat_model if kind == "attack" else cls.stage).value,
                             cls.description, cls.Config) for name, cls in registry.items()}


def method(kind: str, name: str) -> MethodInfo:
    """One method by name, or InputError with "did you mean"."""
    from nlpbd.errors import InputError
    from nlpbd.registry import unknown_name_message

    found = methods(kind)
    if name not in found:
        raise InputError(unknown_name_message(kind, name, list(found)))
    return found[name]


if __name__ == "__main__":
    print(f"wrote {write()}")
