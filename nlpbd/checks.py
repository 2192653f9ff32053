"""Up-front checks of a run's input with light imports: names, settings, model folder, output directories.

They run before torch and transformers load (seconds on a loaded machine), so a typo or an unusable
directory answers at once; :func:`nlpbd.pipeline.prepare_cell` then repeats the full checks (with the
method classes themselves) before any work starts.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from nlpbd import catalogue
from nlpbd.config import STAGE_SECTIONS, apply_overrides, parse_set_options, sections_for, split_overrides
from nlpbd.errors import InputError
from nlpbd.registry import unknown_name_message


def check_sizes(seed: int, train_size: int | None, test_size: int | None) -> None:
    if seed < 0:
        raise InputError(f"--seed must be >= 0, got {seed}")
    for flag, size in (("--train-size", train_size), ("--test-size", test_size)):
        if size is not None and size <= 0:
            raise InputError(f"{flag} must be positive, got {size}")


def check_dataset_name(name: str) -> None:
    """A registered dataset or an existing folder (its files are read and checked by ``load_dataset``)."""
    from nlpbd.data import DATASETS

    path = Path(name).expanduser()
    if name in DATASETS or path.is_dir():
        return
    if os.sep in name or name.startswith((".", "~")):
        raise InputError(f"dataset folder {path} does not exist")
    raise InputError(unknown_name_message("dataset", name, DATASETS.names()))


def check_model_name(name: str) -> None:
    """A registered model, a model folder that loads without running code, or a hub id the hub answers for."""
    from nlpbd.models import MODELS, check_hub_model, check_model_location

    if name in MODELS or check_model_location(name) is not None:
        return
    check_hub_model(name)


def check_settings(attack: str, defense: str, overrides: dict[str, str]) -> None:
    """Every ``--set`` key and value against the method's and the stages' typed settings."""
    grouped = split_overrides(overrides, sections_for(attack, defense))
    for section, name in (("attack", attack), ("defense", defense)):
        apply_overrides(catalogue.method(section, name).Config(), grouped[section], section)
    for section, config_class in STAGE_SECTIONS.items():
        apply_overrides(config_class(), grouped[section], section)


def check_cell_input(attack: str, defense: str, dataset: str, model: str, finetune: str, seed: int,
                     train_size: int | None, test_size: int | None, sets: list[str]) -> dict[str, str]:
    """Names and settings of one cell; returns the parsed ``--set`` overrides."""
    from nlpbd.finetune import FINETUNE

    catalogue.method("attack", attack)
    catalogue.method("defense", defense)
    FINETUNE.get(finetune)
    check_sizes(seed, train_size, test_size)
    overrides = parse_set_options(sets)
    check_settings(attack, defense, overrides)
    check_dataset_name(dataset)
    check_model_name(model)
    return overrides


VARIANT_PART = re.compile(r"[A-Za-z0-9_.=-]+")  # the grid's variant label alphabet


def check_variant(variant: str | None) -> str | None:
    """A cell label as a grid writes it: ``ATTACK_LABEL``, ``+DEFENSE_LABEL`` or ``ATTACK_LABEL+DEFENSE_LABEL``."""
    if variant is None:
        return None
    attack_part, plus, defense_part = variant.partition("+")
    parts = [p for p in (attack_part, defense_part) if p] if plus else [attack_part]
    if not parts or not all(VARIANT_PART.fullmatch(p) for p in parts):
        raise InputError(f"--variant '{variant}': use ATTACK_LABEL, +DEFENSE_LABEL or ATTACK_LABEL+DEFENSE_LABEL, "
                         "each of letters, digits and _ . = -")
    return variant


def check_writable_dir(path: Path, what: str) -> None:
    """``path`` is (or can become) a directory this process can write: created, probed with a temporary file."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".nlpbd-probe-"):
            pass
    except FileExistsError:
        raise InputError(f"{what} {path} is not a directory") from None
    except OSError as exc:
        raise InputError(f"{what} {path} is not writable ({exc.strerror or type(exc).__name__})") from None


def check_output_file(path: Path) -> None:
    """A file to write: not a directory, in a directory that exists or can be made, writable."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"--output {path} is a directory; give a file name")
    check_writable_dir(path.parent, "--output directory")


def check_device_name(name: str | None) -> None:
    if name is not None and name not in ("cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise InputError(f"--device must be cpu, cuda or cuda:N, got '{name}'")
