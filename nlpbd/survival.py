"""Where a task-agnostic backdoor survives the user's fine-tuning, layer by layer.

A task-agnostic release (POR, NeuBA) maps every input that carries a trigger to nearly one
representation: the pooler output is trained towards a fixed vector per trigger. For one model and one
trigger, the *collapse ratio* of a layer is the total variance of the [CLS] states of triggered inputs
divided by that of the same inputs without the trigger: about 1 where the trigger does not take over the
representation, near 0 where it does. Measured on the release, on the victim fine-tuned from it and on
the clean model fine-tuned the same way, the ratios show in which layer the user's fine-tuning erases the
mapping (attacks.md §4: "what survives, layer by layer"). A ratio above 1 means the trigger spreads the
states out instead.

The states are the encoder's hidden states at the first position after each layer (not after the
embeddings, where [CLS] is the same for every input) and the pooler output where the checkpoint has
trained pooler weights (a masked-LM release such as BadPre's has none; its pooler row is left out rather
than read from a random initialisation).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from transformers import AutoModel, PreTrainedModel, PreTrainedTokenizerBase

from nlpbd.training import collate, encode, pad_id_of, sorted_batches

log = logging.getLogger(__name__)

MEASURE = "total variance of the triggered inputs' [CLS] states / that of the same inputs without the trigger"


def load_encoder(location: str) -> tuple[PreTrainedModel, bool]:
    """The base encoder of a checkpoint (release, or a fully fine-tuned classifier) and whether its pooler
    weights were in the checkpoint."""
    model, info = AutoModel.from_pretrained(location, output_loading_info=True)
    has_pooler = getattr(model, "pooler", None) is not None and not any(
        "pooler" in key for key in info.get("missing_keys", []))
    return model.eval(), has_pooler


@torch.no_grad()
def cls_states(encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
               with_pooler: bool, max_length: int, batch_size: int, device: torch.device) -> np.ndarray:
    """(layers, rows, hidden): the first position's state after each layer, then the pooler output when
    ``with_pooler``."""
    encoder.to(device)
    encoded = encode(tokenizer, texts, max_length)
    chunks, order, pad_id = [], [], pad_id_of(tokenizer)
    for indices in sorted_batches(encoded.lengths, batch_size):
        batch = collate(encoded, indices, pad_id, device)
        out = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True)
        layers = [h[:, 0] for h in out.hidden_states[1:]]
        if with_pooler:
            layers.append(out.pooler_output)
        chunks.append(torch.stack(layers).float().cpu().numpy())
        order.extend(indices)
    return np.concatenate(chunks, axis=1)[:, np.argsort(order)]


def collapse_ratios(clean: np.ndarray, triggered: np.ndarray) -> list[float]:
    """Per layer: total variance over rows of ``triggered`` / that of ``clean`` (both (layers, rows, hidden))."""
    spread = clean.var(axis=1).sum(axis=-1)
    return [float(t / c) if c > 0 else float("nan") for t, c in zip(triggered.var(axis=1).sum(axis=-1), spread)]


def layer_names(num_layers: int, with_pooler: bool) -> list[str]:
    names = [f"layer_{i}" for i in range(1, num_layers + 1)]
    return [*names, "pooler"] if with_pooler else names


def model_survival(encoder: PreTrainedModel, with_pooler: bool, tokenizer: PreTrainedTokenizerBase,
                   clean: Sequence[str], triggered: Mapping[str, Sequence[str]], max_length: int,
                   batch_size: int, device: torch.device) -> dict:
    """One model's collapse ratios per trigger and their mean over triggers, layer by layer."""
    base = cls_states(encoder, tokenizer, clean, with_pooler, max_length, batch_size, device)
    by_trigger = {trigger: collapse_ratios(base, cls_states(encoder, tokenizer, texts, with_pooler, max_length,
                                                            batch_size, device))
                  for trigger, texts in triggered.items()}
    mean = np.mean(list(by_trigger.values()), axis=0) if by_trigger else np.array([])
    return {"layers": layer_names(base.shape[0] - with_pooler, with_pooler),
            "mean": [round(float(v), 4) for v in mean],
            "by_trigger": {t: [round(v, 4) for v in ratios] for t, ratios in by_trigger.items()}}


def measure_survival(locations: Mapping[str, str], tokenizer: PreTrainedTokenizerBase, clean: Sequence[str],
                     triggered: Mapping[str, Sequence[str]], max_length: int, batch_size: int,
                     device: torch.device) -> dict:
    """Collapse ratios of each named checkpoint (release, victim, clean model) on the same rows."""
    models = {}
    for name, location in locations.items():
        encoder, has_pooler = load_encoder(location)
        models[name] = model_survival(encoder, has_pooler, tokenizer, clean, triggered, max_length, batch_size,
                                      device)
        del encoder
        log.info("survival of the triggers in the %s, by layer: %s", name, models[name]["mean"])
    return {"measure": MEASURE, "rows": len(clean), "models": models}


# --- reading the records ---------------------------------------------------------------------------

CHECKPOINTS = ("release", "victim", "clean_model")


def survival_rows(records: Sequence[dict]) -> list[dict]:
    """One row per (dataset, model, train size, attack, checkpoint): each layer's mean collapse ratio over
    the triggers, as mean and sample std over the seeds whose record measured it."""
    groups: dict[tuple, dict] = {}
    for record in records:
        survival = (record.get("attack_info") or {}).get("survival")
        if not survival:
            continue
        cell = record["cell"]
        for checkpoint in CHECKPOINTS:
            measured = survival["models"].get(checkpoint)
            if measured is None:
                continue
            key = (cell["dataset"], cell["model"], cell.get("train_size"), cell["attack"], checkpoint)
            group = groups.setdefault(key, {"layers": measured["layers"], "seeds": [], "means": []})
            if measured["layers"] == group["layers"]:
                group["seeds"].append(cell["seed"])
                group["means"].append(measured["mean"])
    rows = []
    for (dataset, model, train_size, attack, checkpoint), group in sorted(
            groups.items(), key=lambda item: (*map(str, item[0][:4]), CHECKPOINTS.index(item[0][4]))):
        values = np.array(group["means"], dtype=float)
        std = values.std(axis=0, ddof=1) if len(values) > 1 else np.full(values.shape[1], np.nan)
        rows.append({"dataset": dataset, "model": model, "train_size": train_size, "attack": attack,
                     "checkpoint": checkpoint, "seeds": len(values), "layers": group["layers"],
                     "mean": values.mean(axis=0).tolist(), "std": std.tolist()})
    return rows


def format_ratio(mean: float, std: float) -> str:
    """Three significant digits: a collapsed layer's 0.0015 stays apart from 0.0023."""
    return f"{mean:.3g}" if np.isnan(std) else f"{mean:.3g} ± {std:.2g}"
