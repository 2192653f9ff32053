"""Import every module of a method package so that its classes register themselves.

Adding a method is one file: drop ``defenses/<name>.py`` in and it is found.
"""

from __future__ import annotations

import importlib
import pkgutil


def import_submodules(package_name: str) -> None:
    package = importlib.import_module(package_name)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")
