"""Progress reporting that library code can call without printing anything itself.

The CLI installs a rich-backed reporter; everywhere else the default reporter does nothing.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Protocol

Advance = Callable[[int], None]


class Reporter(Protocol):
    def task(self, description: str, total: int | None) -> contextlib.AbstractContextManager[Advance]:
        ...


class NullReporter:
    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        yield lambda n=1: None


_current: Reporter = NullReporter()


def reporter() -> Reporter:
    return _current


@contextlib.contextmanager
def using(new: Reporter) -> Iterator[None]:
    """Install ``new`` as the reporter for the duration of the block."""
    global _current
    previous, _current = _current, new
    try:
        yield
    finally:
        _current = previous
