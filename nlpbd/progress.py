"""Progress reporting that library code can call without printing anything itself.

The CLI installs a rich-backed reporter on a terminal and a :class:`LineReporter` elsewhere (a log file,
a pipe, CI, a Ray worker); everywhere else the default reporter does nothing. A step may report what
it saw: ``advance(1, loss=0.41, samples=32)``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import IO, Any, Protocol


class Advance(Protocol):
    def __call__(self, n: int = 1, **stats: Any) -> None:
        ...


class Reporter(Protocol):
    def task(self, description: str, total: int | None) -> contextlib.AbstractContextManager[Advance]:
        ...


class NullReporter:
    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        yield lambda n=1, **_: None


_current: Reporter = NullReporter()


def reporter() -> Reporter:
    return _current


def stage(name: str) -> None:
    """Tell the reporter that a stage of a cell begins (only the line reporter shows it)."""
    announce = getattr(_current, "stage", None)
    if announce is not None:
        announce(name)


@contextlib.contextmanager
def using(new: Reporter) -> Iterator[None]:
    """Install ``new`` as the reporter for the duration of the block."""
    global _current
    previous, _current = _current, new
    try:
        yield
    finally:
        _current = previous


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m{seconds:02d}s" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


class LineReporter:
    """Plain, timestamped lines: one per stage, and for each long step one every ``every`` percent of it
    (with the mean loss since the last line, samples per second and elapsed time, as the HF Trainer logs)."""

    def __init__(self, stream: IO[str], every: float = 5.0):
        self.stream, self.every = stream, every

    def _line(self, text: str) -> None:
        self.stream.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
        self.stream.flush()

    def stage(self, name: str) -> None:
        self._line(f"stage {name}")

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        began, done, samples, losses = time.monotonic(), 0, 0, []
        step = max(1, round((total or 0) * self.every / 100)) if total else None
        self._line(f"{description}: started" + (f" ({total} steps)" if total else ""))

        def advance(n: int = 1, **stats: Any) -> None:
            nonlocal done, samples
            done += n
            samples += int(stats.get("samples") or 0)
            if stats.get("loss") is not None:
                losses.append(float(stats["loss"]))
            if step and (done % step == 0 or done == total):
                self._line(self._progress(description, done, total, samples, losses, began))
                losses.clear()

        yield advance
        self._line(f"{description}: done in {_clock(time.monotonic() - began)}")

    @staticmethod
    def _progress(description: str, done: int, total: int | None, samples: int, losses: list[float],
                  began: float) -> str:
        elapsed = time.monotonic() - began
        parts = [f"{description}: step {done}/{total} ({100 * done / total:.0f}%)"]
        if losses:
            parts.append(f"loss {sum(losses) / len(losses):.4f}")
        if samples:
            parts.append(f"{samples / max(elapsed, 1e-9):.1f} samples/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        return ", ".join(parts)
