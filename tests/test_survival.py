"""Layer-by-layer survival of a task-agnostic trigger (nlpbd.survival): the collapse ratio, which layers are
read, and that a release trained to map triggered inputs to one pooler vector shows it at the pooler."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import toy_texts
from transformers import AutoConfig, BertForMaskedLM
from typer.testing import CliRunner

from nlpbd.attacks._common import insert_triggers
from nlpbd.cli import app
from nlpbd.results import SCHEMA, write_record
from nlpbd.survival import (
    cls_states,
    collapse_ratios,
    layer_names,
    load_encoder,
    measure_survival,
    model_survival,
    survival_rows,
)

CPU = torch.device("cpu")


def test_collapse_ratio_is_zero_for_one_point_and_one_for_the_same_states():
    clean = np.random.default_rng(0).normal(size=(3, 50, 8))
    collapsed = np.broadcast_to(clean[:, :1], clean.shape)  # every triggered row lands on one state
    assert collapse_ratios(clean, collapsed) == pytest.approx([0.0, 0.0, 0.0])
    assert collapse_ratios(clean, clean) == pytest.approx([1.0, 1.0, 1.0])
    assert collapse_ratios(clean, 2 * clean) == pytest.approx([4.0, 4.0, 4.0])  # spread out: above 1


def test_states_come_back_in_input_order_whatever_the_batching(tiny_dir, tiny_tokenizer):
    encoder, _ = load_encoder(str(tiny_dir))
    texts = [f"{'word ' * n}end" for n in (1, 9, 3, 12, 2)]  # lengths differ, so batches are re-sorted
    batched = cls_states(encoder, tiny_tokenizer, texts, True, 32, 2, CPU)
    alone = np.concatenate([cls_states(encoder, tiny_tokenizer, [t], True, 32, 1, CPU) for t in texts], axis=1)
    assert batched.shape == (3, 5, encoder.config.hidden_size)
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_a_trigger_the_model_ignores_leaves_every_layer_at_one(tiny_dir, tiny_tokenizer):
    encoder, has_pooler = load_encoder(str(tiny_dir))
    texts = list(toy_texts(24, seed=3).texts)
    report = model_survival(encoder, has_pooler, tiny_tokenizer, texts, {"same": texts}, 32, 8, CPU)
    assert report["layers"] == ["layer_1", "layer_2", "pooler"]
    assert report["by_trigger"]["same"] == pytest.approx([1.0] * 3) and report["mean"] == pytest.approx([1.0] * 3)


def test_a_checkpoint_without_trained_pooler_weights_is_read_without_its_pooler(tiny_dir, tmp_path):
    """A masked-LM release (BadPre's) has no pooler: AutoModel would initialise one at random."""
    BertForMaskedLM(AutoConfig.from_pretrained(tiny_dir)).save_pretrained(tmp_path)
    _, has_pooler = load_encoder(str(tmp_path))
    assert not has_pooler and layer_names(2, has_pooler) == ["layer_1", "layer_2"]
    assert load_encoder(str(tiny_dir))[1]


def test_measure_survival_names_each_checkpoint_and_the_rows(tiny_dir, tiny_tokenizer):
    texts = list(toy_texts(16, seed=4).texts)
    rng = random.Random(0)
    triggered = {"cf": [insert_triggers(t, ["cf"], 1, rng) for t in texts]}
    out = measure_survival({"release": str(tiny_dir), "victim": str(tiny_dir)}, tiny_tokenizer, texts, triggered,
                           32, 8, CPU)
    assert out["rows"] == 16 and set(out["models"]) == {"release", "victim"}
    assert out["models"]["release"] == out["models"]["victim"]  # the same weights read the same way
    assert all(np.isfinite(out["models"]["release"]["by_trigger"]["cf"]))


def survival_record(seed: int, pooler: float, attack: str = "por") -> dict:
    layers = ["layer_1", "layer_2", "pooler"]
    models = {"release": {"layers": layers, "mean": [1.0, 0.5, 0.001], "by_trigger": {}},
              "victim": {"layers": layers, "mean": [1.0, 0.6, pooler], "by_trigger": {}}}
    return {"schema": SCHEMA, "cell_id": f"sst2__minilm__full__{attack}__none__s{seed}__0000000{seed}", "status": "ok",
            "cell": {"dataset": "sst2", "model": "minilm", "train_size": 2000, "attack": attack, "seed": seed},
            "attack_info": {"survival": {"rows": 8, "models": models}}}


def test_survival_rows_average_the_seeds_per_checkpoint():
    rows = survival_rows([survival_record(0, 0.002), survival_record(1, 0.004),
                          {**survival_record(2, 0.5), "attack_info": {}}])  # a record that did not measure it
    assert [row["checkpoint"] for row in rows] == ["release", "victim"]
    victim = rows[1]
    assert victim["seeds"] == 2 and victim["mean"] == pytest.approx([1.0, 0.6, 0.003])
    assert victim["std"][2] == pytest.approx(np.std([0.002, 0.004], ddof=1))
    assert np.isnan(survival_rows([survival_record(0, 0.002)])[0]["std"][0])  # one seed: no spread


def test_survival_command_prints_a_table_and_refuses_a_directory_without_measures(tmp_path):
    for seed, pooler in ((0, 0.002), (1, 0.004)):
        write_record(tmp_path, survival_record(seed, pooler))
    result = CliRunner().invoke(app, ["survival", "--results-dir", str(tmp_path), "--format", "md"])
    assert result.exit_code == 0, result.output
    assert "| sst2 | minilm | 2000 | por | victim | 2 | 1 ± 0 | 0.6 ± 0 | 0.003 ± 0.0014 |" in result.output
    empty = tmp_path / "empty"
    (empty / "records").mkdir(parents=True)
    result = CliRunner().invoke(app, ["survival", "--results-dir", str(empty)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "measured survival" in result.output
