"""Datasets: registered benchmarks (local TSV or the HF hub) and users' own folders.

Local files follow the ``shared/data`` layout (MANIFEST.md): ``<folder>/{train,dev,test}.tsv`` with
``sentence`` and ``label`` columns, read with ``quoting=3, keep_default_na=False``. Splits are fixed
(split seed 0) and identical for every experiment seed (protocol.md §1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

if TYPE_CHECKING:  # pandas loads when a file is read, not when a name is checked
    import pandas as pd

from nlpbd.config import DataConfig
from nlpbd.errors import InputError
from nlpbd.registry import Registry
from nlpbd.seeding import numpy_rng

log = logging.getLogger(__name__)

SPLIT_SEED = 0
DATA_DIR_ENV = "NLPBD_DATA_DIR"
SPLITS = ("train", "dev", "test")
TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl")


@dataclass(frozen=True)
class TextSplit:
    """Texts with integer labels; ``ids`` are row numbers in the split's source file."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    ids: tuple[int, ...]

    @classmethod
    def build(cls, texts: Sequence[str], labels: Sequence[int], ids: Sequence[int] | None = None) -> TextSplit:
        ids = range(len(texts)) if ids is None else ids
        if not len(texts) == len(labels) == len(ids):
            raise ValueError("texts, labels and ids must have the same length")
        return cls(tuple(texts), tuple(int(y) for y in labels), tuple(int(i) for i in ids))

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, positions: Sequence[int]) -> TextSplit:
        return TextSplit(tuple(self.texts[p] for p in positions), tuple(self.labels[p] for p in positions),
                         tuple(self.ids[p] for p in positions))

    def relabel(self, label: int) -> TextSplit:
        return replace(self, labels=tuple(label for _ in self.labels))

    def digest(self) -> str:
        h = hashlib.sha256()
        for text, label, row in zip(self.texts, self.labels, self.ids):
            h.update(f"{row}\t{label}\t{text}\n".encode())
        return h.hexdigest()


@dataclass(frozen=True)
class Dataset:
    """One task with fixed train / dev (selection only) / test (CAcc, ASR source) splits."""

    name: str
    num_labels: int
    train: TextSplit
    dev: TextSplit
    test: TextSplit
    default_target: int
    source: str
    root: Path | None = None  # folder holding attack side files (syntactic/, style/, ...)
    recipe: dict = field(default_factory=dict)

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.name}|{self.num_labels}|{sorted(self.recipe.items())}".encode())
        for split in (self.train, self.dev, self.test):
            h.update(split.digest().encode())
        return h.hexdigest()


# --- sampling -------------------------------------------------------------------------------------


def stratified_counts(label_counts: dict[int, int], n: int) -> dict[int, int]:
    """Per-label sample sizes proportional to ``label_counts`` with largest-remainder rounding."""
    total = sum(label_counts.values())
    quotas = {y: n * c / total for y, c in label_counts.items()}
    counts = {y: int(np.floor(q)) for y, q in quotas.items()}
    by_remainder = sorted(label_counts, key=lambda y: (-(quotas[y] - counts[y]), y))
    for y in by_remainder[: n - sum(counts.values())]:
        counts[y] += 1
    return counts


def stratified_sample(labels: Sequence[int], n: int, rng: np.random.Generator,
                      eligible: Sequence[int] | None = None) -> list[int]:
    """Sorted positions of a stratified sample of size ``n`` drawn from ``eligible`` positions."""
    pool = list(range(len(labels))) if eligible is None else list(eligible)
    if n > len(pool):
        raise ValueError(f"cannot sample {n} of {len(pool)} rows")
    by_label: dict[int, list[int]] = {}
    for pos in pool:
        by_label.setdefault(labels[pos], []).append(pos)
    counts = stratified_counts({y: len(p) for y, p in sorted(by_label.items())}, n)
    chosen: list[int] = []
    for y in sorted(by_label):
        chosen.extend(rng.choice(by_label[y], size=counts[y], replace=False).tolist())
    return sorted(chosen)


def carve(split: TextSplit, n: int, name: str) -> tuple[TextSplit, TextSplit]:
    """Split off a stratified ``n``-row part (split seed 0): returns (rest, part)."""
    rng = numpy_rng(SPLIT_SEED, f"carve:{name}")
    part = set(stratified_sample(split.labels, n, rng))
    rest = [i for i in range(len(split)) if i not in part]
    return split.subset(rest), split.subset(sorted(part))


def subsample_train(dataset: Dataset, n: int | None) -> Dataset:
    """The dataset with a stratified ``n``-row train subsample (fixed split seed; same for all seeds)."""
    return _subsample(dataset, "train", n)


def subsample_test(dataset: Dataset, n: int | None) -> Dataset:
    """The dataset with a stratified ``n``-row test subsample (fixed split seed; same for all seeds).

    CAcc and the ASR sets built from ``dataset.test`` (insertion attacks, task-agnostic trigger sets)
    are scored on it. Attacks with their own pre-generated test files (SynBkd's ``syntactic/test.tsv``,
    StyleBkd's ``style/*/test.tsv``) keep their whole ASR sets. The fingerprint covers the test split,
    so poisoned data and victims of a subsampled run are cached apart from those of the whole split.
    """
    return _subsample(dataset, "test", n)


def _subsample(dataset: Dataset, split: Literal["train", "test"], n: int | None) -> Dataset:
    rows: TextSplit = getattr(dataset, split)
    if n is None or n >= len(rows):
        return dataset
    if n < 2 * dataset.num_labels:
        raise InputError(f"--{split}-size {n} is too small (need at least {2 * dataset.num_labels})")
    # A named stream per split, so the test draw is not a replay of the train draw.
    positions = stratified_sample(rows.labels, n, numpy_rng(SPLIT_SEED, f"{split}_subsample"))
    recipe = {**dataset.recipe, f"{split}_size": n}
    return replace(dataset, **{split: rows.subset(positions)}, recipe=recipe)


# --- reading and validating files -----------------------------------------------------------------


def read_frame(path: Path) -> pd.DataFrame:
    """Read a TSV / CSV / JSONL file as strings, exactly as written (no NA conversion)."""
    import pandas as pd

    if not path.is_file():
        raise InputError(f"missing file {path}")
    try:
        if path.suffix == ".tsv":
            return pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False, dtype=str)
        if path.suffix == ".csv":
            return pd.read_csv(path, keep_default_na=False, dtype=str)
        if path.suffix == ".jsonl":
            return read_jsonl(path)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot parse file ({first})") from None
    raise InputError(f"{path}: unsupported file type (use .tsv, .csv or .jsonl)")


def read_jsonl(path: Path) -> pd.DataFrame:
    """One JSON object per line, parsed by hand so that errors name the line and ``null`` stays None."""
    import pandas as pd

    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records: list[dict] = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {number}: cannot parse JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path} line {number}: expected a JSON object, got {line.strip()[:40]!r}")
        records.append(record)
    columns = list(dict.fromkeys(key for record in records for key in record))
    return pd.DataFrame({c: pd.Series([r.get(c) for r in records], dtype=object) for c in columns})


def line_number(path: Path | str, row: int) -> int:
    """The file line of data row ``row``: the header is line 1 (JSONL has none, its first record is line 1)."""
    return row + (1 if str(path).endswith(".jsonl") else 2)


def _parse_label(value: object, path: Path, line: int) -> int:
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        raise InputError(f"{path} line {line}: label '{text}' is not an integer") from None
    if not number.is_integer():
        raise InputError(f"{path} line {line}: label '{text}' is not an integer")
    return int(number)


def read_split(path: Path, text_column: str = "sentence", label_column: str = "label",
               allow_empty: bool = False) -> TextSplit:
    """Read one split, failing on missing columns, non-integer labels or empty texts.

    Line numbers in errors count the header as line 1 (JSONL: the first record is line 1).
    """
    frame = read_frame(path)
    for column in (text_column, label_column):
        if column not in frame.columns:
            raise InputError(f"{path}: no column '{column}' (columns: {', '.join(map(str, frame.columns))})")
    texts = ["" if v is None else str(v) for v in frame[text_column].tolist()]
    labels = [_parse_label(v, path, line_number(path, i)) for i, v in enumerate(frame[label_column].tolist())]
    if not allow_empty:
        for i, text in enumerate(texts):
            if not text.strip():
                raise InputError(f"{path} line {line_number(path, i)}: empty text")
    if not texts:
        raise InputError(f"{path}: no rows")
    return TextSplit.build(texts, labels)


def check_labels(split: TextSplit, num_labels: int, path: Path | str) -> None:
    for i, y in enumerate(split.labels):
        if not 0 <= y < num_labels:
            raise InputError(f"{path} line {line_number(path, i)}: label {y} is out of range 0..{num_labels - 1}")


def file_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# --- data directory -------------------------------------------------------------------------------


def default_data_dirs() -> list[Path]:
    """Where the benchmark data is looked for when neither --data-dir nor $NLPBD_DATA_DIR is set."""
    repo_root = Path(__file__).resolve().parents[1]
    return [Path.cwd() / "data", Path.cwd() / "shared" / "data", Path.cwd().parent / "shared" / "data",
            repo_root.parent / "shared" / "data"]


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The local data directory, or None when there is none (registered datasets then use the hub)."""
    explicit = data_dir or os.environ.get(DATA_DIR_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            origin = "--data-dir" if data_dir else f"${DATA_DIR_ENV}"
            raise InputError(f"{origin}: data directory {path} does not exist")
        return path.resolve()
    for candidate in default_data_dirs():
        if candidate.is_dir():
            return candidate.resolve()
    return None


# --- registered datasets --------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSource:
    """Where a registered dataset lives on the HF hub, for users with network access."""

    path: str
    config: str | None
    text_column: str
    splits: dict[str, str]  # our split name → hub split name; a missing dev is carved from train
    dev_size: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str
    num_labels: int
    default_target: int
    description: str
    hub: HubSource
    glue_carve: int | None = None  # sst2-glue: dev carved from train, GLUE dev used as test

    def load(self, data_dir: Path | None) -> Dataset:
        folder = data_dir / self.folder if data_dir else None
        if folder is not None and (folder / "train.tsv").is_file():
            return self._load_local(folder)
        return self._load_hub(looked_in=folder)

    def _load_local(self, folder: Path) -> Dataset:
        # sst-2-glue ships only train and (GLUE) dev: the dev file becomes test, dev is carved below.
        names = ("train", "dev") if self.glue_carve else SPLITS
        paths = {s: folder / f"{s}.tsv" for s in names}
        splits = {s: read_split(p) for s, p in paths.items()}
        for s, p in paths.items():
            check_labels(splits[s], self.num_labels, p)
        recipe: dict = {"files": file_digest(list(paths.values()))}
        if self.glue_carve:
            train, dev = carve(splits["train"], self.glue_carve, self.name)
            splits = {"train": train, "dev": dev, "test": splits["dev"]}
            recipe["glue_carve"] = self.glue_carve
        return Dataset(self.name, self.num_labels, splits["train"], splits["dev"], splits["test"],
                       self.default_target, source=f"local:{folder}", root=folder, recipe=recipe)

    def _load_hub(self, looked_in: Path | None) -> Dataset:
        try:
            raw = load_hub_dataset(self.hub)
        except Exception as exc:  # network, auth or missing-package errors all mean "not available"
            where = f"{looked_in}/train.tsv" if looked_in else "no local data directory"
            raise InputError(f"dataset '{self.name}' not found locally ({where}) and the hub copy "
                             f"'{self.hub.path}' could not be loaded: {str(exc).splitlines()[0]}") from None
        return dataset_from_hub(self, raw)


def load_hub_dataset(hub: HubSource):  # pragma: no cover - replaced in tests, needs network
    import datasets

    return datasets.load_dataset(hub.path, hub.config)


def _hub_split(raw, hub_split: str, text_column: str) -> TextSplit:
    part = raw[hub_split]
    return TextSplit.build([str(t) for t in part[text_column]], [int(y) for y in part["label"]])


def dataset_from_hub(spec: DatasetSpec, raw) -> Dataset:
    """Map a ``datasets.DatasetDict`` onto train / dev / test, carving dev from train if needed."""
    hub = spec.hub
    splits = {ours: _hub_split(raw, theirs, hub.text_column) for ours, theirs in hub.splits.items()}
    if "dev" not in splits:
        splits["train"], splits["dev"] = carve(splits["train"], hub.dev_size or 1000, spec.name)
    for name, split in splits.items():
        check_labels(split, spec.num_labels, f"hub:{hub.path}/{name}")
    recipe = {"hub": hub.path, "config": hub.config, "dev_size": hub.dev_size}
    return Dataset(spec.name, spec.num_labels, splits["train"], splits["dev"], splits["test"],
                   spec.default_target, source=f"hub:{hub.path}", root=None, recipe=recipe)


DATASETS: Registry[DatasetSpec] = Registry("dataset")

for _spec in [
    DatasetSpec("sst2", "sst-2", 2, 1, "SST-2 sentence-level sentiment (6,920 / 872 / 1,821), target 1",
                HubSource("SetFit/sst2", None, "text", {"train": "train", "dev": "validation", "test": "test"})),
    DatasetSpec("sst2-glue", "sst-2-glue", 2, 1,
                "GLUE SST-2 phrases: train minus an 872-row dev carve-out; GLUE dev as test, target 1",
                HubSource("nyu-mll/glue", "sst2", "sentence", {"train": "train", "test": "validation"},
                          dev_size=872), glue_carve=872),
    DatasetSpec("olid", "olid", 2, 1, "OLID offensive-language tweets (11,915 / 1,323 / 859), target 1",
                HubSource("cardiffnlp/tweet_eval", "offensive", "text",
                          {"train": "train", "dev": "validation", "test": "test"})),
    DatasetSpec("agnews", "ag", 4, 0, "AG News topics, 4 classes (11,106 / 10,000 / 7,600), target 0",
                HubSource("fancyzhx/ag_news", None, "text", {"train": "train", "test": "test"},
                          dev_size=10000)),
]:
    DATASETS.add(_spec.name, _spec)


# --- users' own folders ---------------------------------------------------------------------------


def find_split_file(folder: Path, split: str) -> Path | None:
    found = [folder / f"{split}{suffix}" for suffix in TABLE_SUFFIXES if (folder / f"{split}{suffix}").is_file()]
    if len(found) > 1:
        raise InputError(f"{folder}: several {split} files ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def load_folder(folder: Path, config: DataConfig) -> Dataset:
    """A user's dataset folder with train / [dev] / test files (TSV, CSV or JSONL)."""
    paths = {s: find_split_file(folder, s) for s in SPLITS}
    for split in ("train", "test"):
        if paths[split] is None:
            raise InputError(f"missing file {folder}/{split}.tsv (or .csv / .jsonl)")
    splits = {s: read_split(p, config.text_column, config.label_column) for s, p in paths.items() if p}
    num_labels = _infer_num_labels(splits["train"], paths["train"])
    for s, split in splits.items():
        check_labels(split, num_labels, paths[s])
    _check_test_classes(splits["train"], splits["test"], paths["train"], paths["test"])
    recipe: dict = {"files": file_digest([p for p in paths.values() if p]),
                    "columns": [config.text_column, config.label_column]}
    if "dev" not in splits:
        n_dev = max(num_labels, int(round(config.dev_fraction * len(splits["train"]))))
        _check_rows_per_class(splits["train"], num_labels, paths["train"], n_dev)
        splits["train"], splits["dev"] = carve(splits["train"], n_dev, folder.name)
        recipe["dev_fraction"] = config.dev_fraction
    _check_rows_per_class(splits["train"], num_labels, paths["train"])
    if not 0 <= config.target_label < num_labels:
        raise InputError(f"data.target_label {config.target_label} is out of range 0..{num_labels - 1}")
    return Dataset(folder.name, num_labels, splits["train"], splits["dev"], splits["test"],
                   config.target_label, source=f"local:{folder}", root=folder, recipe=recipe)


def listing(values: Sequence[object], limit: int = 10) -> str:
    """``1, 2, 3`` or ``1, 2, ... (1,000 in all)``: error messages stay one short line."""
    shown = ", ".join(str(v) for v in list(values)[:limit])
    return shown if len(values) <= limit else f"{shown}, ... ({len(values):,} in all)"


def _infer_num_labels(train: TextSplit, path: Path | None) -> int:
    present = sorted(set(train.labels))
    for bad in (present[0], present[-1]):
        # Every class needs a row, so a label >= the row count is a typo; checking it first keeps
        # the missing-class listing below small whatever the file says.
        if not 0 <= bad < len(train):
            row = train.labels.index(bad)
            raise InputError(f"{path} line {line_number(path, row)}: label {bad} is out of range "
                             f"(labels must be 0..K-1 with every class present, and there are {len(train)} rows)")
    missing = sorted(set(range(present[-1] + 1)) - set(present))
    if missing:
        raise InputError(f"{path}: labels must be 0..K-1 with every class present; missing {listing(missing)}")
    if len(present) < 2:
        raise InputError(f"{path}: need at least two classes, found only label {present[0]}")
    return present[-1] + 1


MIN_TRAIN_ROWS_PER_CLASS = 2


def _check_rows_per_class(train: TextSplit, num_labels: int, path: Path | None, carved: int = 0) -> None:
    """Enough rows of every class to train on (after a dev carve-out of ``carved`` rows, stratified)."""
    counts = np.bincount(np.asarray(train.labels, dtype=int), minlength=num_labels)
    after = counts - np.asarray(list(stratified_counts(dict(enumerate(counts.tolist())), carved).values())) \
        if carved else counts
    short = [c for c in range(num_labels) if after[c] < MIN_TRAIN_ROWS_PER_CLASS]
    if short:
        where = f" after the {carved}-row dev carve-out" if carved else ""
        raise InputError(f"{path}: too few training rows: class {short[0]} keeps {int(after[short[0]])}{where}; "
                         f"each class needs at least {MIN_TRAIN_ROWS_PER_CLASS} (add rows or a dev file)")


def _check_test_classes(train: TextSplit, test: TextSplit, train_path: Path | None, test_path: Path | None) -> None:
    """A class only the training file has is almost always a stray label (a 2 in a binary task): refused,
    since it would silently make the task one class larger."""
    only_train = sorted(set(train.labels) - set(test.labels))
    if only_train:
        label = only_train[0]
        rows = [i for i, y in enumerate(train.labels) if y == label]
        raise InputError(f"{train_path} line {line_number(train_path, rows[0])}: label {label} ({len(rows)} "
                         f"row{'s' if len(rows) > 1 else ''}) never occurs in {test_path}; a class must be in both "
                         "(a stray label would add a class to the task)")


class DatasetLoader(Protocol):
    def __call__(self, name_or_path: str, data_dir: str | Path | None = None, config: DataConfig | None = None,
                 train_size: int | None = None, test_size: int | None = None) -> Dataset: ...


def load_dataset(name_or_path: str, data_dir: str | Path | None = None,
                 config: DataConfig | None = None, train_size: int | None = None,
                 test_size: int | None = None) -> Dataset:
    """A registered dataset by name, or a user's folder by path, optionally train- and test-subsampled."""
    config = config or DataConfig()
    path = Path(name_or_path).expanduser()
    if name_or_path not in DATASETS and (path.is_dir() or os.sep in name_or_path):
        if not path.is_dir():
            raise InputError(f"dataset folder {path} does not exist")
        dataset = load_folder(path, config)
    else:
        dataset = DATASETS.get(name_or_path).load(resolve_data_dir(data_dir))
    return subsample_test(subsample_train(dataset, train_size), test_size)


def side_file(dataset: Dataset, relative: str, what: str) -> Path:
    """A file next to a dataset's splits (e.g. ``syntactic/train.tsv``), or a clear error."""
    if dataset.root is None:
        raise InputError(f"{what} needs local data files; dataset '{dataset.name}' was loaded from "
                         f"{dataset.source}. Point --data-dir at a copy of the benchmark data.")
    path = dataset.root / relative
    if not path.is_file():
        raise InputError(f"{what} is not available for dataset '{dataset.name}': missing file {path}")
    return path


def loading_once(load: DatasetLoader = load_dataset) -> DatasetLoader:
    """``load`` that returns the first result for identical arguments.

    Planning prepares every cell of a grid, and reading the dataset files for each (0.1-0.2 s for AG
    News) made the 231-cell data-poisoning grid take half a minute. Datasets are immutable values of
    (name, data directory, data settings, train and test size), so sharing them is safe.
    """
    memo: dict[tuple, Dataset] = {}

    def load_once(name_or_path: str, data_dir: str | Path | None = None, config: DataConfig | None = None,
                  train_size: int | None = None, test_size: int | None = None) -> Dataset:
        key = (name_or_path, str(data_dir), repr(config), train_size, test_size)
        if key not in memo:
            memo[key] = load(name_or_path, data_dir, config, train_size, test_size)
        return memo[key]

    return load_once
