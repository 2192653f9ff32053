"""Shared fixtures: a tiny random BERT built in code and an isolated artifact cache per test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import SHARED_DATA, toy_budget
from transformers import AutoTokenizer

from nlpbd.methods import CleanBudget
from nlpbd.models import TINY_DEFAULTS, build_tiny_bert, load_classifier, local_ref


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_data") and not (SHARED_DATA / "sst-2" / "train.tsv").is_file():
        pytest.fail(f"benchmark data not found at {SHARED_DATA}: set $NLPBD_DATA_DIR to the data directory",
                    pytrace=False)


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Tiny models train many times faster on one thread than on oversubscribed cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own artifact cache; the tiny model is shared through NLPBD_CACHE's parent."""
    monkeypatch.setenv("NLPBD_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture
def tiny_model(tiny_dir):
    torch.manual_seed(0)
    return load_classifier(str(tiny_dir), 2)


@pytest.fixture(scope="session")
def tiny_ref(tiny_dir):
    return local_ref("tiny-bert", tiny_dir, TINY_DEFAULTS)


@pytest.fixture
def toy_budget_fixture() -> CleanBudget:
    return toy_budget()


@pytest.fixture
def deterministic():
    """Bit-exact comparisons need deterministic kernels."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)
