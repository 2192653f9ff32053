"""PSIM: a Poisoned Sample Identification Module that rejects over-confident inputs (defenses.md §6).

Paper: Shuai Zhao, Leilei Gan, Luu Anh Tuan, Jie Fu, Lingjuan Lyu, Meihuizi Jia, Jinming Wen,
"Defending Against Weight-Poisoning Backdoor Attacks for Parameter-Efficient Fine-Tuning", Findings of
NAACL 2024 (arXiv:2402.12168). Reference code: shuaizhao95/PSIM (``badmodel.py`` trains the PSIM,
``confidence.py`` filters).

A copy of the model the backdoor lives in is P-tuned on the user's training texts with labels drawn
at random, so it unlearns the task (clean inputs get near-uniform probabilities) while the frozen
backbone still drives triggered inputs to an extreme probability. At inference

    s(x) = max_c softmax(f_psim(x))_c          x is rejected when s(x) > τ (τ = 0.7)

and rejected inputs get no prediction: the pipeline counts a rejected clean input as wrong and a
rejected poisoned input as a failed attack, over the full clean and poisoned sets (protocol.md §5).
The deployed victim is never modified.

Recipe (as the reference): P-tuning with 5 virtual tokens and encoder hidden size 128 (``peft``
``PromptEncoderConfig``, ``task_type="SEQ_CLS"``); only the prompt encoder and the head
(``modules_to_save``) train; AdamW lr 2e-5, weight decay 0.01 (torch's default, which the reference
keeps), batch 32, linear schedule with 6% warm-up, no checkpoint selection, and 1 epoch on the
reference's scale (6,920 SST-2 rows: 217 steps).

Deviations from the reference code and the spec's reference column, all deliberate:

- The random-label training is counted in steps, not epochs (spec §6.3): whole epochs are run until
  at least ``min_steps`` (200) steps are done, so the reference's scale keeps its 1 epoch (217 steps)
  while a 1,000-row training set gets 7 epochs (224 steps) instead of 32 steps, after which the PSIM
  had not yet unlearned the task and the fixed τ rejected 56% of clean inputs.
- Random labels are independent draws from Uniform{0..K-1} (numpy stream ``psim_labels`` of the cell
  seed); the reference draws ``random.randint(0, 1)`` (binary only) from the global RNG after
  ``set_seed(0)``.
- The score is the unrounded max softmax and the flag rule is the single ``s > τ`` on every input.
  The reference rounds to 3 decimals and uses two rules: on the clean set an input is accepted only
  if ``s < 0.7`` (so ``s == 0.7`` is rejected), on the poisoned set it is rejected if ``s > 0.7``.
- ``calibrate=true`` (ours): τ is the (1 − ``target_frr``) quantile (default the 95th percentile,
  numpy's linear interpolation) of ``s`` on the defender's held-out clean rows D_c^val: by default
  300 rows of the clean dev split, which neither the victim nor the PSIM trained on (a percentile of
  the 10 rows a 20% share of a small D_c gives is noise). The budget is read only in this mode.
- Initialisation (spec §6.5). ``init=auto`` picks ``suspect_checkpoint`` when the cell has a released
  checkpoint (model-supply cells: the PSIM starts from exactly the downloaded weights, shipped head
  included; a head that was not shipped is initialised from the stream ``psim_init``) and ``victim``
  otherwise. ``victim`` is our adaptation for data-poisoning cells, where the backdoor is created by
  the user's own training: the PSIM starts from a deep copy of the trained victim θ_bd. A LoRA
  victim is merged first. A prompt-type victim (prompt, P-tuning, prefix) cannot be merged: the PSIM
  then starts from the victim's backbone (θ_pre, frozen during its PEFT training) with its trained
  head, and its virtual tokens are dropped, so a backdoor that lives only in those tokens is not in
  the PSIM; the cell records this. The choice is recorded as ``init`` and ``init_note``.
- Inputs are truncated to the victim recipe's ``max_length`` (128 by default); the reference does not
  truncate. Scoring runs in length-sorted padded batches in eval mode (dropout off) and, on CUDA, under
  the project's bf16 autocast; the reference scores one input at a time and never calls
  ``eval()`` on the PSIM, so its dropout stays on while scoring.
- No gradient clipping (the reference has none); the project's length-grouped batch order; weight
  decay skips biases and LayerNorm weights (the project's AdamW), where torch's default decays all.
- ``peft`` may name another PEFT method for ablations (spec §6.3 ``psim.peft``); the PSIM of the
  paper always uses P-tuning.

Reuse: a PSIM started from the release is cached (``psim`` artifacts: the trained adapter and head),
keyed by the release, the user's training texts, the seed, ``max_length`` and the training settings
above, so the cells of one release that differ only in the victim's fine-tuning method or in τ train
it once (``defense_info.cached``). A PSIM started from a victim is trained in its cell.

Recorded in ``defense_info``: the init and why, the threshold rule and τ, training time and steps,
the agreement of the random labels with the training labels (about 1/K), the trainable parameter
count, the mean score and flag rate on (a sample of) the training texts after training, and the
inference overhead (PSIM forward passes, seconds and milliseconds per input).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
from peft import PeftModel
from peft.utils.other import ModulesToSaveWrapper
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from nlpbd.config import option
from nlpbd.data import TextSplit
from nlpbd.errors import InputError
from nlpbd.finetune import FINETUNE, plain_model, trainable_parameter_count, wrap
from nlpbd.methods import DefenseContext, Detector, InferenceDefense, register_defense
from nlpbd.seeding import numpy_rng, seed_everything
from nlpbd.training import TrainResult, TrainSetup, predict, train_classifier

log = logging.getLogger(__name__)

LABEL_STREAM = "psim_labels"
PSIM_VERSION = 2  # bump when the PSIM's training changes, so cached ones are rebuilt
TRAINING_SETTINGS = ("peft", "lr", "epochs", "min_steps", "batch_size", "warmup_ratio", "weight_decay", "grad_clip")


@dataclass
class PSIMConfig:
    init: Literal["auto", "suspect_checkpoint", "victim"] = option(
        "auto", "weights the PSIM starts from: the released checkpoint (model-supply cells), the trained "
        "victim (data-poisoning cells; our adaptation), or auto = the checkpoint when the cell has one")
    peft: Literal["ptuning", "prompt", "prefix", "lora"] = option(
        "ptuning", "PEFT method of the PSIM (the paper: P-tuning, 5 virtual tokens, encoder hidden 128)")
    tau: float = option(0.7, "fixed threshold: inputs with max softmax s > tau are rejected", low=0.0, high=1.0)
    calibrate: bool = option(False, "set tau to the (1 - target_frr) quantile of s on D_c^val instead")
    target_frr: float = option(0.05, "false-rejection rate aimed at on D_c^val when calibrate=true",
                               low=0.0, high=1.0, low_open=True)
    lr: float = option(2e-5, "AdamW learning rate of the random-label training", low=0.0, low_open=True)
    epochs: int = option(1, "epochs of random-label training (at least; see min_steps)", low=1, high=1000)
    min_steps: int = option(200, "whole epochs are added until the random-label training has at least this "
                            "many steps (the reference's 1 epoch on 6,920 rows is 217)", low=0)
    batch_size: int = option(32, "batch size of random-label training", low=1)
    warmup_ratio: float = option(0.06, "linear warm-up fraction", low=0.0, high=1.0)
    weight_decay: float = option(0.01, "AdamW weight decay (torch's default, kept by the reference)", low=0.0)
    grad_clip: float = option(0.0, "gradient-norm clipping (0 disables; the reference does not clip)", low=0.0)
    diagnostic_rows: int = option(2000, "training texts scored after training for the mean-score "
                                  "diagnostic (a seeded sample; 0 skips it)", low=0)


# --- random labels --------------------------------------------------------------------------------


def random_labels(n: int, num_labels: int, seed: int) -> np.ndarray:
    """ỹ_i ~ Uniform{0..K-1}, independent per text (not a permutation), from stream ``psim_labels``."""
    return numpy_rng(seed, LABEL_STREAM).integers(0, num_labels, size=n)


def relabelled(train: TextSplit, labels: np.ndarray) -> TextSplit:
    """The training texts with their labels discarded and replaced by ``labels``."""
    return TextSplit.build(train.texts, labels.tolist(), train.ids)


# --- initialisation -------------------------------------------------------------------------------


def resolve_init(init: str, ctx: DefenseContext) -> str:
    if init == "auto":
        return "suspect_checkpoint" if ctx.suspect is not None else "victim"
    if init == "suspect_checkpoint" and ctx.suspect is None:
        raise InputError("psim.init=suspect_checkpoint needs a released checkpoint, and this cell has none "
                         "(data poisoning); use psim.init=victim or auto")
    return init


def load_suspect(ctx: DefenseContext) -> tuple[PreTrainedModel, dict]:
    """The released checkpoint exactly as downloaded; a head it does not ship is drawn from ``psim_init``."""
    seed_everything(ctx.seed, "psim_init")
    model, loading = AutoModelForSequenceClassification.from_pretrained(
        ctx.suspect.location, num_labels=ctx.num_labels, output_loading_info=True, trust_remote_code=False)
    new = sorted(loading["missing_keys"])
    note = ("released checkpoint with its shipped head" if not new else
            "released checkpoint; its head was not shipped and is newly initialised (the confidence gap may shrink)")
    return model, {"init_note": note, "init_new_parameters": new}


def copy_of_victim(model: PreTrainedModel) -> tuple[PreTrainedModel, dict]:
    """A plain deep copy of the victim θ_bd: LoRA merged; prompt-type PEFT → backbone + trained head."""
    victim = copy.deepcopy(model)
    if isinstance(victim, PeftModel) and victim.active_peft_config.is_prompt_learning:
        kind = str(victim.active_peft_config.peft_type.value).lower()
        return without_virtual_tokens(victim), {
            "init_note": f"{kind} victim: its virtual tokens cannot be merged and are dropped; the PSIM starts "
                         "from the victim's backbone (θ_pre) and its trained head"}
    plain, peft_info = plain_model(victim, "psim")
    return plain, {"init_note": peft_info.get("peft", "trained victim θ_bd")}


def without_virtual_tokens(victim: PeftModel) -> PreTrainedModel:
    """The transformers model under a prompt-type PEFT victim, with its trained head put back in place."""
    base = victim.get_base_model()
    for name, module in list(base.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            setattr(parent, child, module.unload_and_optionally_merge_module(False, False, None))
    return base


def initial_model(init: str, model: PreTrainedModel | None, ctx: DefenseContext) -> tuple[PreTrainedModel, dict]:
    return load_suspect(ctx) if init == "suspect_checkpoint" else copy_of_victim(model)


def build_psim(init_model: PreTrainedModel, peft: str, seed: int) -> PreTrainedModel:
    """Wrap with the PSIM's PEFT method: the backbone freezes, the prompt encoder and the head train."""
    seed_everything(seed, "psim_init")  # the prompt encoder's initialisation
    return wrap(init_model, FINETUNE.get(peft))


# --- training and scoring -------------------------------------------------------------------------


def train_psim(psim: PreTrainedModel, ctx: DefenseContext, config: PSIMConfig, labels: np.ndarray) -> TrainResult:
    """Minimise CE against the random labels on the training texts; the last step is kept."""
    recipe = replace(ctx.train_config, lr=config.lr, epochs=random_label_epochs(len(labels), config),
                     batch_size=config.batch_size,
                     weight_decay=config.weight_decay, warmup_ratio=config.warmup_ratio,
                     grad_clip=config.grad_clip, select="last")
    return train_classifier(psim, ctx.tokenizer, relabelled(ctx.train_set, labels), None, recipe, ctx.seed,
                            stream="defense", setup=TrainSetup(description="training the PSIM on random labels"),
                            device=ctx.device)


def random_label_epochs(rows: int, config: PSIMConfig) -> int:
    """``config.epochs``, raised to the fewest whole epochs that give at least ``config.min_steps`` steps."""
    steps_per_epoch = max(1, math.ceil(rows / config.batch_size))
    return max(config.epochs, math.ceil(config.min_steps / steps_per_epoch))


def confidence(psim: PreTrainedModel, ctx: DefenseContext, texts: list[str]) -> np.ndarray:
    """s(x) = max softmax of the PSIM, unrounded, in the input order."""
    if not texts:
        return np.zeros(0)
    probs = predict(psim, ctx.tokenizer, texts, ctx.train_config.max_length, ctx.train_config.eval_batch_size,
                    ctx.device)
    return probs.max(axis=1).astype(float)


def calibrated_threshold(val_scores: np.ndarray, target_frr: float) -> float:
    """The (1 − target FRR) quantile of clean held-out scores: about target_frr of them lie above it."""
    if len(val_scores) == 0:
        raise InputError("psim.calibrate=true needs held-out clean rows D_c^val, and this cell has none "
                         "(budget.val_size / budget.val_fraction)")
    return float(np.quantile(val_scores, 1.0 - target_frr))


def training_text_diagnostics(psim, ctx: DefenseContext, rows: int, tau: float) -> dict:
    """Mean s and flag rate on a seeded sample of the training texts (poisoned ones included, if any)."""
    train = ctx.train_set
    if rows == 0 or not len(train):
        return {}
    chosen = np.sort(numpy_rng(ctx.seed, "psim_diagnostics").permutation(len(train))[:rows])
    scores = confidence(psim, ctx, [train.texts[i] for i in chosen])
    return {"train_text_rows": len(chosen), "train_text_score_mean": float(scores.mean()),
            "train_text_flag_rate": float((scores > tau).mean())}


class TimedScores:
    """The detector's score function; it records the PSIM's inference overhead in ``info``."""

    def __init__(self, psim: PreTrainedModel, ctx: DefenseContext, info: dict):
        self.psim, self.ctx, self.info = psim, ctx, info
        self.info["inference"] = {"inputs": 0, "forward_passes_per_input": 1, "seconds": 0.0, "ms_per_input": None}

    def __call__(self, texts: list[str]) -> np.ndarray:
        began = time.perf_counter()
        scores = confidence(self.psim, self.ctx, list(texts))
        stats = self.info["inference"]
        stats["inputs"] += len(texts)
        stats["seconds"] += time.perf_counter() - began
        stats["ms_per_input"] = 1000 * stats["seconds"] / stats["inputs"] if stats["inputs"] else None
        return scores


# --- the defense ----------------------------------------------------------------------------------


def fit_psim(model: PreTrainedModel, ctx: DefenseContext, config: PSIMConfig) -> tuple[PreTrainedModel, dict]:
    """Build and train the PSIM; returns it with what to record. ``model`` (the victim) is not modified.

    A PSIM started from the release depends on the release, the user's texts, the seed and its own
    training settings, not on the victim or on τ: it is cached, so every fine-tuning method and both
    thresholds of one release share a single training."""
    init = resolve_init(config.init, ctx)
    if init == "suspect_checkpoint" and ctx.cache is not None:
        return cached_psim(ctx, config)
    return trained_psim(init, model, ctx, config)


def psim_payload(ctx: DefenseContext, config: PSIMConfig) -> dict:
    """Everything the trained weights of a release-initialised PSIM depend on (τ and calibration do not)."""
    training = {name: getattr(config, name) for name in TRAINING_SETTINGS}
    return {"suspect": ctx.suspect.identity, "texts": ctx.train_set.digest(), "num_labels": ctx.num_labels,
            "seed": ctx.seed, "max_length": ctx.train_config.max_length, "training": training,
            "version": PSIM_VERSION}


def cached_psim(ctx: DefenseContext, config: PSIMConfig) -> tuple[PreTrainedModel, dict]:
    """The release-initialised PSIM from the run's cache, trained (and saved as its adapter) when missing."""

    built: list[PreTrainedModel] = []  # the PSIM this call trained, used as is rather than reloaded

    def build(tmp: Path) -> dict:
        psim, info = trained_psim("suspect_checkpoint", None, ctx, config)
        psim.save_pretrained(str(tmp))
        built.append(psim)
        return {"info": info}

    artifact = ctx.cache.get_or_build("psim", psim_payload(ctx, config), build)
    psim = built[0] if built else PeftModel.from_pretrained(load_suspect(ctx)[0], str(artifact.path))
    psim.eval()
    return psim, {**artifact.meta["info"], "cached": artifact.cached, "psim_key": artifact.meta["key"]}


def trained_psim(init: str, model: PreTrainedModel | None, ctx: DefenseContext,
                 config: PSIMConfig) -> tuple[PreTrainedModel, dict]:
    init_model, info = initial_model(init, model, ctx)
    psim = build_psim(init_model, config.peft, ctx.seed)
    labels = random_labels(len(ctx.train_set), ctx.num_labels, ctx.seed)
    result = train_psim(psim, ctx, config, labels)
    agreement = float((labels == np.asarray(ctx.train_set.labels)).mean()) if len(labels) else None
    info.update({"init": init, "peft": config.peft, "train": result.as_dict(), "train_seconds": result.seconds,
                 "label_agreement": agreement, "train_rows": len(labels),
                 "trainable_parameters": trainable_parameter_count(psim)})
    return psim, info


def threshold_of(psim: PreTrainedModel, ctx: DefenseContext, config: PSIMConfig) -> tuple[float, dict]:
    if not config.calibrate:
        return config.tau, {"tau_rule": f"fixed tau = {config.tau}"}
    val = ctx.budget.val
    val_scores = confidence(psim, ctx, list(val.texts))
    tau = calibrated_threshold(val_scores, config.target_frr)
    quantile = 100 * (1 - config.target_frr)
    return tau, {"tau_rule": f"calibrated: the {quantile:g}th percentile of s on D_c^val (n={len(val)}, "
                             f"{ctx.budget.val_source})",
                 "val_score_mean": float(val_scores.mean())}


@register_defense
class PSIM(InferenceDefense):
    name = "psim"
    description = "reject inputs a random-label P-tuned copy of the suspect model is confident on (s > 0.7)"
    Config = PSIMConfig
    # suspect: the released checkpoint; train_set: the user's texts (labels discarded); budget: D_c^val,
    # read only when calibrate=true.
    grants = frozenset({"suspect", "train_set", "budget"})
    unsupported_victims = {
        "generate": "PSIM's detector is a P-tuned sequence classifier trained on randomly relabelled rows, whose "
                    "class confidence flags poisoned inputs; an instruction-tuned generator has no class "
                    "probabilities to read and no label-word version of PSIM is defined"}

    def fit(self, model: PreTrainedModel, ctx: DefenseContext) -> Detector:
        config = self.config
        psim, info = fit_psim(model, ctx, config)
        tau, rule = threshold_of(psim, ctx, config)
        info.update({"tau": tau, **rule, "flag_rule": "s > tau",
                     **training_text_diagnostics(psim, ctx, config.diagnostic_rows, tau)})
        log.info("PSIM (%s init) trained in %.1fs; tau=%.4f; label agreement %.3f; training-text mean s %s",
                 info["init"], info["train_seconds"], tau, info["label_agreement"] or float("nan"),
                 info.get("train_text_score_mean"))
        return Detector(scores=TimedScores(psim, ctx, info), threshold=tau, info=info)
