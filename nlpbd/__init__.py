"""nlpbd: a benchmark for textual backdoor attacks and defenses."""

__version__ = "0.1.0"
