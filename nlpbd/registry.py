"""Name → object registries with "did you mean" errors.

The core never imports a concrete attack or defense: registries load the built-in method packages
(``nlpbd.attacks``, ``nlpbd.defenses``) and any third-party plug-ins declared under the entry-point
groups ``nlpbd.attacks`` / ``nlpbd.defenses`` the first time a name is looked up.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from nlpbd.errors import InputError

T = TypeVar("T")


def closest(name: str, choices: list[str]) -> str | None:
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.4)
    return match[0] if match else None


def did_you_mean(name: str, choices: list[str], show: str = "'{}'") -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` (``show`` formats it), or "" when none is close.

    Every "did you mean" hint of nlpbd is built here."""
    hint = closest(name, choices)
    return f" Did you mean {show.format(hint)}?" if hint else ""


def unknown_name_message(kind: str, name: str, choices: list[str]) -> str:
    return f"unknown {kind} '{name}'.{did_you_mean(name, choices)} Valid: {', '.join(sorted(choices))}"


class Registry(Generic[T]):
    """A named collection of methods or specs, filled lazily from ``modules`` and entry points."""

    def __init__(self, kind: str, modules: tuple[str, ...] = (), entry_point_group: str | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._modules = modules
        self._group = entry_point_group
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        if name in self._items and self._items[name] is not obj:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._items[name] = obj

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._modules:
            importlib.import_module(module)
        if self._group:
            for ep in entry_points(group=self._group):
                ep.load()

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise InputError(unknown_name_message(self.kind, name, self.names()))
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        return iter(list(self._items.items()))
