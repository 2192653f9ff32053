"""Datasets: registered benchmarks (local files and the hub), users' folders, subsampling, validation errors."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from helpers import SHARED_DATA, needs_data

import nlpbd.data as data_module
from nlpbd.config import DataConfig
from nlpbd.data import DATASETS, Dataset, TextSplit, load_dataset, stratified_counts, stratified_sample, subsample_test
from nlpbd.errors import InputError
from nlpbd.seeding import numpy_rng, seed_everything


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False)


# --- registered datasets from the local directory -------------------------------------------------


@needs_data
@pytest.mark.parametrize("name, sizes, num_labels, target", [
    ("sst2", (6920, 872, 1821), 2, 1),
    ("olid", (11915, 1323, 859), 2, 1),
    ("agnews", (11106, 10000, 7600), 4, 0),
    ("sst2-glue", (67349 - 872, 872, 872), 2, 1),
])
def test_registered_datasets_have_manifest_sizes(name, sizes, num_labels, target):
    dataset = load_dataset(name, data_dir=SHARED_DATA)
    assert (len(dataset.train), len(dataset.dev), len(dataset.test)) == sizes
    assert dataset.num_labels == num_labels
    assert dataset.default_target == target
    for split in (dataset.train, dataset.dev, dataset.test):
        assert set(split.labels) == set(range(num_labels))
        assert all(text.strip() for text in split.texts)


@needs_data
def test_sst2_texts_and_labels_match_the_file_row_by_row():
    dataset = load_dataset("sst2", data_dir=SHARED_DATA)
    frame = read_tsv(SHARED_DATA / "sst-2" / "test.tsv")
    assert dataset.test.texts == tuple(frame["sentence"])
    assert dataset.test.labels == tuple(int(y) for y in frame["label"])
    assert dataset.test.ids == tuple(range(1821))
    assert dataset.root == SHARED_DATA.resolve() / "sst-2"


@needs_data
def test_sst2_glue_dev_is_a_stratified_carve_and_glue_dev_is_test():
    dataset = load_dataset("sst2-glue", data_dir=SHARED_DATA)
    frame = read_tsv(SHARED_DATA / "sst-2-glue" / "train.tsv")
    all_labels = Counter(int(y) for y in frame["label"])
    assert Counter(dataset.dev.labels) == stratified_counts(dict(all_labels), 872) == {0: 386, 1: 486}
    assert set(dataset.train.ids).isdisjoint(dataset.dev.ids)
    assert sorted(dataset.train.ids + dataset.dev.ids) == list(range(67349))
    assert dataset.dev.texts[:3] == tuple(frame["sentence"].iloc[list(dataset.dev.ids[:3])])
    glue_dev = read_tsv(SHARED_DATA / "sst-2-glue" / "dev.tsv")
    assert dataset.test.texts == tuple(glue_dev["sentence"])
    assert load_dataset("sst2-glue", data_dir=SHARED_DATA).dev.ids == dataset.dev.ids


@needs_data
def test_fingerprint_is_stable_and_changes_with_the_data():
    first = load_dataset("sst2", data_dir=SHARED_DATA).fingerprint
    assert load_dataset("sst2", data_dir=SHARED_DATA).fingerprint == first
    small = load_dataset("sst2", data_dir=SHARED_DATA, train_size=500).fingerprint
    assert small == load_dataset("sst2", data_dir=SHARED_DATA, train_size=500).fingerprint
    others = {small, load_dataset("sst2", data_dir=SHARED_DATA, train_size=600).fingerprint,
              load_dataset("olid", data_dir=SHARED_DATA).fingerprint}
    assert len(others | {first}) == 4
    # A train size at or above N is the full dataset, with the full dataset's fingerprint.
    assert load_dataset("sst2", data_dir=SHARED_DATA, train_size=6920).fingerprint == first


# --- train subsampling ----------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("name, n, expected", [
    ("sst2", 1000, {0: 478, 1: 522}),
    ("agnews", 1001, {0: 254, 1: 253, 2: 246, 3: 248}),
])
def test_train_size_subsample_is_stratified(name, n, expected):
    full = load_dataset(name, data_dir=SHARED_DATA)
    small = load_dataset(name, data_dir=SHARED_DATA, train_size=n)
    counts = Counter(small.train.labels)
    assert counts == expected == stratified_counts(dict(Counter(full.train.labels)), n)
    totals = Counter(full.train.labels)
    for label, count in counts.items():
        assert abs(count - n * totals[label] / len(full.train)) < 1
    assert list(small.train.ids) == sorted(set(small.train.ids))
    assert all(full.train.texts[i] == t for i, t in zip(small.train.ids, small.train.texts))
    assert (small.dev, small.test) == (full.dev, full.test)
    assert small.recipe["train_size"] == n


@needs_data
def test_train_size_subsample_is_deterministic_and_ignores_global_seeds():
    random.seed(1), np.random.seed(1), seed_everything(1, "init")
    first = load_dataset("sst2", data_dir=SHARED_DATA, train_size=300)
    random.seed(99), np.random.seed(99), seed_everything(7, "init")
    second = load_dataset("sst2", data_dir=SHARED_DATA, train_size=300)
    assert first.train == second.train
    expected = stratified_sample(load_dataset("sst2", data_dir=SHARED_DATA).train.labels, 300,
                                 numpy_rng(0, "train_subsample"))
    assert list(first.train.ids) == expected


@needs_data
def test_train_size_below_two_per_class_is_an_input_error():
    with pytest.raises(InputError, match="--train-size 7 is too small"):
        load_dataset("agnews", data_dir=SHARED_DATA, train_size=7)


# --- test subsampling -----------------------------------------------------------------------------


def skewed_dataset() -> Dataset:
    """Three classes, a shuffled 30/20/10 test split whose ids are file rows 100.. (not positions)."""
    labels = [y for y, count in enumerate((30, 20, 10)) for _ in range(count)]
    random.Random(0).shuffle(labels)
    test = TextSplit.build([f"test row {i}" for i in range(60)], labels, [100 + i for i in range(60)])
    train = TextSplit.build([f"train row {i}" for i in range(12)], [i % 3 for i in range(12)])
    return Dataset("skewed", 3, train, train, test, default_target=0, source="memory")


def test_test_size_subsample_is_stratified_and_keeps_ids():
    full = skewed_dataset()
    small = subsample_test(full, 12)
    assert Counter(small.test.labels) == {0: 6, 1: 4, 2: 2}
    assert list(small.test.ids) == sorted(set(small.test.ids)) and set(small.test.ids) < set(full.test.ids)
    by_id = {i: (t, y) for i, t, y in zip(full.test.ids, full.test.texts, full.test.labels)}
    assert all(by_id[i] == (t, y) for i, t, y in zip(small.test.ids, small.test.texts, small.test.labels))
    assert (small.train, small.dev) == (full.train, full.dev)
    assert small.recipe == {"test_size": 12} and small.fingerprint != full.fingerprint


def test_test_size_subsample_is_deterministic_and_has_its_own_stream():
    full = skewed_dataset()
    random.seed(1), np.random.seed(1), seed_everything(1, "init")
    first = subsample_test(full, 12)
    random.seed(99), np.random.seed(99), seed_everything(7, "init")
    assert subsample_test(full, 12).test == first.test
    positions = stratified_sample(full.test.labels, 12, numpy_rng(0, "test_subsample"))
    assert first.test == full.test.subset(positions)
    assert positions != stratified_sample(full.test.labels, 12, numpy_rng(0, "train_subsample"))


@pytest.mark.parametrize("n", [None, 60, 61])
def test_test_size_at_or_above_the_split_is_the_whole_dataset(n):
    full = skewed_dataset()
    assert subsample_test(full, n) is full


def test_test_size_below_two_per_class_is_an_input_error():
    with pytest.raises(InputError, match=r"--test-size 5 is too small \(need at least 6\)"):
        subsample_test(skewed_dataset(), 5)
    assert len(subsample_test(skewed_dataset(), 6).test) == 6


@needs_data
@pytest.mark.parametrize("name, n", [("sst2", 500), ("agnews", 1001)])
def test_test_size_of_a_registered_dataset_leaves_train_and_dev_alone(name, n):
    full = load_dataset(name, data_dir=SHARED_DATA)
    both = load_dataset(name, data_dir=SHARED_DATA, train_size=1000, test_size=n)
    assert Counter(both.test.labels) == stratified_counts(dict(Counter(full.test.labels)), n)
    assert all(full.test.texts[i] == t for i, t in zip(both.test.ids, both.test.texts))
    assert both.train == load_dataset(name, data_dir=SHARED_DATA, train_size=1000).train
    assert both.dev == full.dev
    assert (both.recipe["train_size"], both.recipe["test_size"]) == (1000, n)


@pytest.mark.parametrize("label_counts, n, expected", [
    ({0: 1, 1: 1, 2: 1}, 2, {0: 1, 1: 1, 2: 0}),            # equal remainders: lower label first
    ({0: 5, 1: 3, 2: 2}, 5, {0: 3, 1: 1, 2: 1}),            # 2.5 / 1.5 / 1.0
    ({0: 7, 1: 3}, 4, {0: 3, 1: 1}),                        # 2.8 / 1.2
    ({0: 3, 1: 3, 2: 3, 3: 1}, 5, {0: 2, 1: 2, 2: 1, 3: 0}),  # 1.5 ×3 / 0.5: two leftovers
    ({0: 1, 1: 2, 2: 97}, 10, {0: 0, 1: 0, 2: 10}),
    ({0: 10, 1: 10}, 0, {0: 0, 1: 0}),
])
def test_stratified_counts_largest_remainder(label_counts, n, expected):
    assert stratified_counts(label_counts, n) == expected


# --- the hub path ---------------------------------------------------------------------------------


def hub_dataset_dict(name: str) -> tuple[datasets.DatasetDict, dict[str, list[str]]]:
    """A fake hub copy of a registered dataset with the columns of its HubSource."""
    hub = DATASETS.get(name).hub
    num_labels = DATASETS.get(name).num_labels
    sizes = {"train": (hub.dev_size or 0) + 40, "validation": 12, "test": 16}
    parts, texts = {}, {}
    for ours, theirs in hub.splits.items():
        rows = [f"{theirs} text {i}" for i in range(sizes[theirs])]
        labels = [i % num_labels for i in range(len(rows))]
        parts[theirs] = datasets.Dataset.from_dict({hub.text_column: rows, "label": labels,
                                                    "idx": list(range(len(rows)))})
        texts[ours] = rows
    return datasets.DatasetDict(parts), texts


@pytest.fixture
def no_local_data(tmp_path, monkeypatch) -> Path:
    """An empty data directory, no $NLPBD_DATA_DIR, and a cwd where the default lookups find nothing."""
    monkeypatch.delenv("NLPBD_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


@pytest.mark.parametrize("name, sizes", [
    ("sst2", (40, 12, 16)),
    ("olid", (40, 12, 16)),
    ("agnews", (40, 10000, 16)),
    ("sst2-glue", (40, 872, 12)),
])
def test_hub_path_maps_splits_and_carves_dev(name, sizes, no_local_data, monkeypatch):
    raw, texts = hub_dataset_dict(name)
    calls = []
    monkeypatch.setattr(data_module, "load_hub_dataset", lambda hub: calls.append(hub) or raw)
    dataset = load_dataset(name, data_dir=no_local_data)
    spec = DATASETS.get(name)
    assert calls == [spec.hub]
    assert (len(dataset.train), len(dataset.dev), len(dataset.test)) == sizes
    assert dataset.source == f"hub:{spec.hub.path}" and dataset.root is None
    assert dataset.test.texts == tuple(texts["test"])
    if "dev" in texts:
        assert dataset.dev.texts == tuple(texts["dev"]) and dataset.train.texts == tuple(texts["train"])
    else:  # dev carved from the hub train split, stratified, disjoint from train
        train_labels = [i % spec.num_labels for i in range(len(texts["train"]))]
        assert Counter(dataset.dev.labels) == stratified_counts(dict(Counter(train_labels)), spec.hub.dev_size)
        assert sorted(dataset.train.ids + dataset.dev.ids) == list(range(len(texts["train"])))
        assert all(texts["train"][i] == t for i, t in zip(dataset.dev.ids, dataset.dev.texts))


def test_hub_failure_is_an_input_error_naming_the_dataset(no_local_data, monkeypatch):
    def offline(hub):
        raise ConnectionError("Couldn't reach the hub\nretry later")

    monkeypatch.setattr(data_module, "load_hub_dataset", offline)
    with pytest.raises(InputError) as info:
        load_dataset("olid", data_dir=no_local_data)
    message = str(info.value)
    assert "'olid'" in message and "cardiffnlp/tweet_eval" in message and "Couldn't reach the hub" in message
    assert str(no_local_data / "olid" / "train.tsv") in message


# --- data directory -------------------------------------------------------------------------------


def write_small_sst2(root: Path, n_train: int) -> Path:
    folder = root / "sst-2"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("dev", 4), ("test", 6)):
        lines = ["sentence\tlabel"] + [f"{split} sentence {i}\t{i % 2}" for i in range(n)]
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_data_dir_pointing_nowhere_is_an_input_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NLPBD_DATA_DIR", raising=False)
    with pytest.raises(InputError, match=r"--data-dir: data directory .*nowhere does not exist"):
        load_dataset("sst2", data_dir=tmp_path / "nowhere")
    monkeypatch.setenv("NLPBD_DATA_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(InputError, match=r"\$NLPBD_DATA_DIR: data directory .*elsewhere does not exist"):
        load_dataset("sst2")


def test_env_data_dir_is_honoured_and_data_dir_wins(tmp_path, monkeypatch):
    from_env = write_small_sst2(tmp_path / "env", 10)
    explicit = write_small_sst2(tmp_path / "explicit", 14)
    monkeypatch.setenv("NLPBD_DATA_DIR", str(from_env.parent))
    dataset = load_dataset("sst2")
    assert (len(dataset.train), len(dataset.dev), len(dataset.test)) == (10, 4, 6)
    assert dataset.source == f"local:{from_env.resolve()}"
    assert len(load_dataset("sst2", data_dir=explicit.parent).train) == 14


def test_unknown_dataset_name_suggests_a_registered_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="unknown dataset 'sst3'. Did you mean 'sst2'"):
        load_dataset("sst3")
    with pytest.raises(InputError, match="dataset folder .*missing does not exist"):
        load_dataset(str(tmp_path / "missing"))


# --- users' own folders ---------------------------------------------------------------------------

TEXTS = ['he said "hi"', "NA", "null", "a, b and c", "good film", "bad film", "naïve café", "ok"]


def write_split(path: Path, rows: list[tuple[object, object]], text_column: str = "sentence",
                label_column: str = "label", extra: bool = False) -> None:
    """Rows as (text, label); labels are written as given (so 'x' or 1.5 can be planted)."""
    if path.suffix == ".jsonl":
        records = [{text_column: t, label_column: y, **({"id": i} if extra else {})} for i, (t, y) in enumerate(rows)]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return
    frame = pd.DataFrame({text_column: [t for t, _ in rows], label_column: [y for _, y in rows]}, dtype=object)
    if extra:
        frame["id"] = range(len(rows))
    if path.suffix == ".tsv":
        lines = ["\t".join(frame.columns)] + ["\t".join(map(str, r)) for r in frame.itertuples(index=False)]
        path.write_text("\n".join(lines) + "\n")
    else:
        frame.to_csv(path, index=False)


def rows_of(n: int, offset: int = 0) -> list[tuple[object, object]]:
    return [(TEXTS[(i + offset) % len(TEXTS)] + f" {i}", i % 2) for i in range(n)]


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_user_folder_in_each_format_with_configured_columns(tmp_path, suffix):
    folder = tmp_path / "mine"
    folder.mkdir()
    splits = {"train": rows_of(20), "dev": rows_of(6, 3), "test": rows_of(8, 5)}
    for split, rows in splits.items():
        write_split(folder / f"{split}{suffix}", rows, "body", "y", extra=True)
    dataset = load_dataset(str(folder), config=DataConfig(text_column="body", label_column="y", target_label=0))
    assert (dataset.name, dataset.num_labels, dataset.default_target) == ("mine", 2, 0)
    for split, rows in splits.items():
        loaded = getattr(dataset, split)
        assert loaded.texts == tuple(t for t, _ in rows)  # quotes, "NA", "null", commas survive verbatim
        assert loaded.labels == tuple(y for _, y in rows)
    assert dataset.root == folder


def test_user_folder_carves_a_seeded_stratified_dev_when_absent(tmp_path):
    folder = tmp_path / "imbalanced"
    folder.mkdir()
    train = [(f"text {i}", int(i % 4 == 0)) for i in range(40)]  # 30 of label 0, 10 of label 1
    write_split(folder / "train.tsv", train)
    write_split(folder / "test.tsv", rows_of(6))
    dataset = load_dataset(str(folder))
    assert Counter(dataset.dev.labels) == {0: 3, 1: 1}  # round(0.1 · 40) = 4 rows, 3.0 / 1.0
    assert len(dataset.train) == 36 and set(dataset.train.ids).isdisjoint(dataset.dev.ids)
    assert sorted(dataset.train.ids + dataset.dev.ids) == list(range(40))
    assert all(train[i][0] == t for i, t in zip(dataset.dev.ids, dataset.dev.texts))
    labels = [y for _, y in train]
    assert list(dataset.dev.ids) == stratified_sample(labels, 4, numpy_rng(0, "carve:imbalanced"))
    assert load_dataset(str(folder)).dev == dataset.dev
    quarter = load_dataset(str(folder), config=DataConfig(dev_fraction=0.25))
    assert Counter(quarter.dev.labels) == {0: 8, 1: 2}  # 7.5 / 2.5: the tie goes to the lower label


def test_user_folder_with_two_train_files_is_an_input_error(tmp_path):
    write_split(tmp_path / "train.tsv", rows_of(10))
    write_split(tmp_path / "train.csv", rows_of(10))
    write_split(tmp_path / "test.tsv", rows_of(4))
    with pytest.raises(InputError, match="several train files"):
        load_dataset(str(tmp_path))


# Each case: (split to break, row to change, new (text, label)), expected message. Row 3 is line 5 of
# a TSV/CSV (header = line 1) and line 4 of a JSONL file.
BAD_ROWS = [
    ("train", 3, ("fine", "x"), "label 'x' is not an integer"),
    ("train", 3, ("fine", 1.5), "label '1.5' is not an integer"),
    ("train", 3, ("fine", -1), "label -1 is out of range"),
    ("test", 3, ("fine", 5), "label 5 is out of range 0..1"),
    ("dev", 3, ("", 0), "empty text"),
    ("train", 3, ("   ", 0), "empty text"),
]


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
@pytest.mark.parametrize("split, row, bad, message", BAD_ROWS)
def test_bad_rows_name_the_file_and_line(tmp_path, suffix, split, row, bad, message):
    splits = {"train": rows_of(12), "dev": rows_of(6), "test": rows_of(6)}
    splits[split][row] = bad
    for name, rows in splits.items():
        write_split(tmp_path / f"{name}{suffix}", rows)
    line = row + (1 if suffix == ".jsonl" else 2)
    with pytest.raises(InputError) as info:
        load_dataset(str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path / (split + suffix)} line {line}: {message}")


def test_json_null_text_is_empty_not_the_string_nan(tmp_path):
    rows = [{"sentence": f"t {i}", "label": i % 2} for i in range(8)]
    rows[2]["sentence"] = None
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_split(tmp_path / "test.jsonl", rows_of(4))
    with pytest.raises(InputError, match=r"train.jsonl line 3: empty text"):
        load_dataset(str(tmp_path))


@pytest.mark.parametrize("suffix, content, line", [
    (".tsv", "sentence\tlabel\na\t0\nb\t1\nc\textra\t0\nd\t1\n", 4),
    (".csv", 'sentence,label\na,0\n"b, c",1\nd,0,9\n', 4),
    (".jsonl", '{"sentence": "a", "label": 0}\n{"sentence": "b", "label": 1}\n{"sentence" "c"}\n', 3),
    (".jsonl", '{"sentence": "a", "label": 0}\n[1, 2]\n', 2),
])
def test_unparseable_file_names_the_file_and_line(tmp_path, suffix, content, line):
    (tmp_path / f"train{suffix}").write_text(content)
    write_split(tmp_path / "test.tsv", rows_of(4))
    with pytest.raises(InputError) as info:
        load_dataset(str(tmp_path))
    message = str(info.value)
    assert message.startswith(str(tmp_path / f"train{suffix}"))
    assert f"line {line}" in message


@pytest.mark.parametrize("missing", ["train", "test"])
def test_missing_split_file_is_named(tmp_path, missing):
    for split in {"train", "test"} - {missing}:
        write_split(tmp_path / f"{split}.csv", rows_of(6))
    with pytest.raises(InputError, match=f"missing file {tmp_path / missing}.tsv"):
        load_dataset(str(tmp_path))


def test_missing_column_names_the_file_and_the_columns(tmp_path):
    write_split(tmp_path / "train.csv", rows_of(6), text_column="text")
    write_split(tmp_path / "test.csv", rows_of(6), text_column="text")
    with pytest.raises(InputError) as info:
        load_dataset(str(tmp_path))
    assert str(info.value) == f"{tmp_path / 'train.csv'}: no column 'sentence' (columns: text, label)"
    assert len(load_dataset(str(tmp_path), config=DataConfig(text_column="text")).test) == 6


def test_a_class_missing_from_train_is_an_input_error(tmp_path):
    write_split(tmp_path / "train.tsv", [(f"t {i}", 2 * (i % 2)) for i in range(10)])  # labels 0 and 2
    write_split(tmp_path / "test.tsv", rows_of(4))
    with pytest.raises(InputError, match=r"train.tsv: labels must be 0..K-1 with every class present; missing 1$"):
        load_dataset(str(tmp_path))


def test_text_split_build_and_subset():
    split = TextSplit.build(["a", "b", "c"], [0, 1, 1], ids=[7, 8, 9])
    assert split.subset([2, 0]) == TextSplit(("c", "a"), (1, 0), (9, 7))
    assert split.relabel(0).labels == (0, 0, 0)
    with pytest.raises(ValueError):
        TextSplit.build(["a"], [0, 1])
