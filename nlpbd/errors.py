"""Error types that the CLI maps to exit codes and one-line messages."""

from __future__ import annotations


class NlpbdError(Exception):
    """Base class of nlpbd's own errors."""


class InputError(NlpbdError):
    """Bad user input: unknown name, malformed file or config, out-of-range value (exit code 2)."""


class RunError(NlpbdError):
    """A cell failed while running (exit code 1)."""
