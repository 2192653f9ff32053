"""One cell, stage by stage: data → poison → (purify) → victim → defense → evaluate → record.

Every expensive artifact (poisoned data, victims, clean reference models, purified models) is
content-addressed in the cache, so post-training and inference-time defenses of the same
(dataset, model, attack, seed) reuse one victim. Names and ``--set`` overrides are validated in
:func:`prepare_cell` before any work starts.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from nlpbd.cache import Artifact, ArtifactCache, content_key
from nlpbd.checks import check_sizes
from nlpbd.config import (
    BudgetConfig,
    DataConfig,
    EvalConfig,
    TrainConfig,
    apply_overrides,
    check_fields,
    parse_set_options,
    sections_for,
    split_overrides,
    to_dict,
)
from nlpbd.data import (
    Dataset,
    DatasetLoader,
    TextSplit,
    load_dataset,
    read_split,
    resolve_data_dir,
    stratified_counts,
    stratified_sample,
)
from nlpbd.decoders import check_victim
from nlpbd.errors import InputError, NlpbdError, RunError
from nlpbd.evaluation import (
    Predictions,
    cell_metrics,
    evaluate_with_corrector,
    evaluate_with_detector,
    filter_metrics,
    inserted_word_removal,
    predict_cell,
)
from nlpbd.finetune import FINETUNE, FinetuneMethod, load_trained, plain_model, trainable_parameter_count, wrap
from nlpbd.generative import answer_metrics, is_instruction_lm, predict_generator, prompt_for
from nlpbd.methods import (
    ATTACKS,
    DEFENSES,
    Attack,
    BaselineDefense,
    CleanBudget,
    CorrectionDefense,
    DataPoisoningAttack,
    Defense,
    DefenseContext,
    FilterDefense,
    InferenceDefense,
    ModelSupplyAttack,
    PoisonedData,
    PretrainedDefense,
    RepairDefense,
    SupplyContext,
    ThreatModel,
    TrainingDefense,
)
from nlpbd.models import (
    GENERATOR_PROMPT,
    ModelRef,
    check_pickled_weights,
    load_classifier,
    load_tokenizer,
    resolve_model,
    save_model,
)
from nlpbd.provenance import StageClock, provenance
from nlpbd.results import SCHEMA, write_record
from nlpbd.scratch import DefenseScratch
from nlpbd.seeding import numpy_rng, seed_everything
from nlpbd.specs import CellSpec, RunEnv
from nlpbd.survival import measure_survival
from nlpbd.training import TrainSetup, resolve_train_config, train_classifier

log = logging.getLogger(__name__)

VICTIM_TRAINER_VERSION = "2"  # bumped when the training loop's numerics change


@dataclass
class Cell:
    """A validated cell: every name resolved, every setting type- and range-checked."""

    spec: CellSpec
    dataset: Dataset
    model: ModelRef
    finetune: FinetuneMethod
    attack: Attack
    defense: Defense
    train: TrainConfig
    budget: BudgetConfig
    eval: EvalConfig

    @property
    def identity(self) -> dict:
        identity = {"dataset": self.dataset.name, "model": self.model.name, "finetune": self.spec.finetune,
                    "attack": self.attack.name, "defense": self.defense.name, "seed": self.spec.seed,
                    "train_size": self.spec.train_size, "variant": self.spec.variant,
                    "attack_params": self.attack.params(), "defense_params": self.defense.params(),
                    "train_params": to_dict(self.train), "budget_params": to_dict(self.budget)}
        # Only when set: cells on the whole test split keep the ids (record file names) they always had.
        if self.spec.test_size is not None:
            identity["test_size"] = self.spec.test_size
        return identity

    @property
    def cell_id(self) -> str:
        parts = [self.dataset.name, self.model.name, self.spec.finetune, self.attack.name, self.defense.name,
                 f"s{self.spec.seed}"]
        slug = "__".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", p) for p in parts)
        return f"{slug}__{content_key(self.identity)[:8]}"


def prepare_cell(spec: CellSpec, env: RunEnv, load: DatasetLoader = load_dataset) -> Cell:
    """Resolve names and settings; raises InputError before any expensive work.

    ``load`` reads the dataset; a planner preparing many cells passes a memoising one
    (:func:`nlpbd.data.loading_once`)."""
    attack_cls, defense_cls = ATTACKS.get(spec.attack), DEFENSES.get(spec.defense)
    finetune = FINETUNE.get(spec.finetune)
    check_sizes(spec.seed, spec.train_size, spec.test_size)
    if finetune.is_peft and not finetune.mergeable and defense_cls.edits_weights:
        raise InputError(f"defense '{spec.defense}' edits the victim's weights and cannot run on a {finetune.name} "
                         "victim: its virtual tokens live outside the weights and cannot be merged "
                         "(use --finetune full or lora)")
    raw = spec.overrides if isinstance(spec.overrides, dict) else parse_set_options(list(spec.overrides))
    grouped = split_overrides(raw, sections_for(spec.attack, spec.defense))
    attack = attack_cls(apply_overrides(attack_cls.Config(), grouped["attack"], "attack"))
    defense = defense_cls(apply_overrides(defense_cls.Config(), grouped["defense"], "defense"))
    data_config = apply_overrides(DataConfig(), grouped["data"], "data")
    model = resolve_model(spec.model)
    check_victim(defense_cls, model.location, finetune.generative)
    train = resolve_train_config(apply_overrides(TrainConfig(), grouped["train"], "train"),
                                 finetune.defaults or model.defaults)
    check_fields(train, "train")
    dataset = load(spec.dataset, env.data_dir, data_config, spec.train_size, spec.test_size)
    if isinstance(attack, DataPoisoningAttack):
        attack.check(dataset)
    if not model.identity.startswith(("hub:", "artifact:")):
        check_pickled_weights(Path(model.location))
    return Cell(spec, dataset, model, finetune, attack, defense, train,
                apply_overrides(BudgetConfig(), grouped["budget"], "budget"),
                apply_overrides(EvalConfig(), grouped["eval"], "eval"))


# --- stages ---------------------------------------------------------------------------------------
# Each cached artifact's payload (its key is ``content_key(payload)``) comes from a pure function below,
# which the stage and the grid planner both call: the planner computes every key without building.


def poison_payload(cell: Cell) -> dict:
    """What the poisoned data (or a release's evaluation sets) depends on."""
    return {"dataset": cell.dataset.fingerprint, "attack": cell.attack.cache_payload(), "seed": cell.spec.seed}


def clean_data_key(cell: Cell) -> str:
    """The data key of the clean reference model: the dataset, no attack."""
    return content_key({"dataset": cell.dataset.fingerprint, "attack": None})


def poison_stage(cell: Cell, cache: ArtifactCache) -> tuple[PoisonedData, Artifact]:
    """The poisoned training set (data attacks) or the evaluation sets (model-supply attacks)."""
    attack = cell.attack
    payload = poison_payload(cell)

    def build(tmp: Path) -> dict:
        start = time.perf_counter()
        if isinstance(attack, DataPoisoningAttack):
            poisoned = attack.poison(cell.dataset, cell.spec.seed)
        else:
            poisoned = attack.evaluation(cell.dataset, cell.spec.seed)
        (tmp / "poisoned.json").write_text(_json(poisoned.to_json()))
        return {"seconds": time.perf_counter() - start, "info": poisoned.info}

    artifact = cache.get_or_build("poison", payload, build)
    return PoisonedData.from_json(_load_json(artifact.path / "poisoned.json")), artifact


def supply_context(cell: Cell, env: RunEnv) -> SupplyContext:
    """What a model-supply attacker has (never the user's training rows)."""
    dataset = cell.dataset
    return SupplyContext(base=cell.model, num_labels=dataset.num_labels, dataset_name=dataset.name,
                         data_dir=resolve_data_dir(env.data_dir), seed=cell.spec.seed, device=env.device,
                         downstream_texts=dataset.dev.texts + dataset.test.texts, cache=env.cache)


def suspect_payload(cell: Cell, ctx: SupplyContext) -> dict:
    """What a model-supply attack's release depends on (proxy files are hashed: not free)."""
    return {"base": cell.model.identity, "attack": cell.attack.cache_payload(), "seed": cell.spec.seed,
            **cell.attack.suspect_payload(ctx)}


def suspect_stage(cell: Cell, env: RunEnv) -> Artifact | None:
    """The released (suspect) model of a model-supply attack, built once and cached."""
    attack = cell.attack
    if not isinstance(attack, ModelSupplyAttack):
        return None
    ctx = supply_context(cell, env)
    payload = suspect_payload(cell, ctx)

    def build(tmp: Path) -> dict:
        began = time.perf_counter()
        info = attack.build_suspect(ctx, tmp)
        return {"seconds": time.perf_counter() - began, "info": info}

    return env.cache.get_or_build("suspect", payload, build)


def artifact_identity(key: str) -> str:
    """The identity of a cached model used as a start checkpoint: its cache key."""
    return f"artifact:{key}"


def artifact_ref(name: str, artifact: Artifact, like: ModelRef) -> ModelRef:
    """A cached model directory as a start checkpoint; its cache key is its identity."""
    return ModelRef(name, str(artifact.path), artifact_identity(artifact.meta["key"]), like.defaults,
                    {"artifact": artifact.meta["kind"]})


def draw_budget(clean_train: TextSplit, dev: TextSplit, poisoned_positions: tuple[int, ...], seed: int,
                config: BudgetConfig) -> CleanBudget:
    """D_c: ceil(fraction · N) stratified clean rows, disjoint from the poisoned ones (stream "budget"),
    and its validation part D_c^val (stream "budget_val"; protocol.md §4)."""
    n_c = math.ceil(config.fraction * len(clean_train))
    # Label proportions follow the clean split, not the attack: dirty-label poisoning removes
    # non-target rows from the pool, which must not tilt the defender's data towards the target.
    counts = stratified_counts(dict(Counter(clean_train.labels)), n_c)
    excluded = set(poisoned_positions)
    rng = numpy_rng(seed, "budget")
    chosen: list[int] = []
    for label in sorted(counts):
        pool = [i for i, y in enumerate(clean_train.labels) if y == label and i not in excluded]
        chosen.extend(rng.choice(pool, size=min(counts[label], len(pool)), replace=False).tolist())
    rows = clean_train.subset(sorted(chosen))
    if config.val_source == "dev":
        # Selection must compare against rows the victim never fit: its own training rows give a
        # training accuracy that only a barely changed model can match (defenses.md §3.3).
        n_val = min(config.val_size, len(dev))
        return CleanBudget(rows, dev.subset(stratified_sample(dev.labels, n_val, numpy_rng(seed, "budget_val"))),
                           rows, "dev")
    n_val = int(round(config.val_fraction * len(rows)))
    val_positions = stratified_sample(rows.labels, n_val, numpy_rng(seed, "budget_val")) if n_val else []
    fit_positions = [i for i in range(len(rows)) if i not in set(val_positions)]
    return CleanBudget(rows, rows.subset(val_positions), rows.subset(fit_positions), "budget")


def victim_payload(cell: Cell, start_identity: str, data_key: str) -> dict:
    """What a victim depends on: its training data's key, the identity of what it starts from, the recipe."""
    payload = {"data": data_key, "model": start_identity, "finetune": cell.spec.finetune,
               "train": to_dict(cell.train), "seed": cell.spec.seed, "trainer": VICTIM_TRAINER_VERSION,
               "num_labels": cell.dataset.num_labels}
    if cell.finetune.generative:  # only then: classifier victims keep their keys
        payload["prompt"] = generator_prompt(cell)
    return payload


def generator_prompt(cell: Cell) -> dict | None:
    """The prompt format of a generator victim (``--finetune sft``/``sft-lora``), None for a classifier."""
    if not cell.finetune.generative:
        return None
    return prompt_for(cell.dataset.name, cell.dataset.num_labels).to_json()


def as_victim_start(cell: Cell, ref: ModelRef) -> ModelRef:
    """``ref`` marked to load as the cell's kind of victim (a generator keeps its prompt format in the mark)."""
    if not cell.finetune.generative:
        return ref
    return replace(ref, info={**ref.info, GENERATOR_PROMPT: generator_prompt(cell)})


def train_victim(cell: Cell, cache: ArtifactCache, start: ModelRef, train: TextSplit, data_key: str,
                 device: torch.device, description: str) -> Artifact:
    """The shared victim recipe (protocol.md §2) on ``train`` from ``start``; cached."""

    def build(tmp: Path) -> dict:
        began = time.perf_counter()
        seed_everything(cell.spec.seed, "init")  # the new head's (and adapter's) initialisation
        model = wrap(load_classifier(as_victim_start(cell, start), cell.dataset.num_labels), cell.finetune)
        tokenizer = load_tokenizer(start)
        result = train_classifier(model, tokenizer, train, cell.dataset.dev, cell.train, cell.spec.seed,
                                  device=device, setup=TrainSetup(description=description))
        save_model(model.cpu(), tokenizer, tmp)  # a PEFT victim saves its adapter only
        return {"seconds": time.perf_counter() - began, "train": result.as_dict(), "base": start.location,
                "finetune": cell.finetune.name, "trainable_parameters": trainable_parameter_count(model),
                **({"prompt": generator_prompt(cell)} if cell.finetune.generative else {})}

    return cache.get_or_build("victim", victim_payload(cell, start.identity, data_key), build)


def load_victim(artifact: Artifact, num_labels: int) -> PreTrainedModel:
    method = FINETUNE.get(artifact.meta.get("finetune", "full"))
    return load_trained(artifact.path, artifact.meta.get("base", ""), num_labels, method, artifact.meta.get("prompt"))


# --- the cell -------------------------------------------------------------------------------------


@dataclass
class CellState:
    """What the stages of one cell produce, for the record."""

    clock: StageClock
    start: ModelRef | None = None  # what the victim is fine-tuned from: θ_pre or the suspect release
    suspect: Artifact | None = None
    poisoned: PoisonedData | None = None
    poison_key: str = ""
    budget: CleanBudget | None = None
    victim: Artifact | None = None
    clean_model: Artifact | None = None
    survival: dict | None = None  # task-agnostic releases: nlpbd.survival's layer-by-layer collapse ratios
    metrics: dict = field(default_factory=dict)
    defense_info: dict = field(default_factory=dict)
    stealth_info: dict = field(default_factory=dict)  # the LM and encoder behind delta_ppl and sim


def run_cell(spec: CellSpec, env: RunEnv) -> dict:
    """Run one cell and write its record; returns the record. A failure is recorded, then raised."""
    cell = prepare_cell(spec, env)
    state = CellState(StageClock(env.device))
    try:
        record = _execute(cell, env, state)
    except NlpbdError as exc:
        _write(env.results_dir, _record(cell, env, state, status="failed", error=str(exc)))
        raise
    except Exception as exc:  # a crash inside a method: record it with its type, keep the traceback in the log
        log.debug("cell failed:\n%s", traceback.format_exc())
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _write(env.results_dir, _record(cell, env, state, status="failed", error=message))
        raise RunError(message) from exc
    _write(env.results_dir, record)
    return record


def _write(results_dir: Path, record: dict) -> None:
    """Write a record; a results directory that went away or filled up during the run is one line, and the
    trained models stay cached, so a rerun with a writable directory writes the record in seconds."""
    try:
        write_record(results_dir, record)
    except OSError as exc:
        raise RunError(f"cannot write the record to {results_dir}: {exc.strerror or type(exc).__name__}; the "
                       "trained models are cached, so a rerun with a writable --results-dir takes seconds") from None


DELTA_METRICS = ("cacc", "asr", "aasr", "masr")
COLLAPSE_METRICS = ("balanced_accuracy", "macro_f1", "predicted_classes")
# A model no better than always answering the majority class (within this margin) has collapsed.
COLLAPSE_MARGIN = 1e-9


def _execute(cell: Cell, env: RunEnv, state: CellState) -> dict:
    with state.clock.stage("suspect") as stage:
        state.suspect = suspect_stage(cell, env)
        if state.suspect is not None:
            stage.cached(state.suspect)
    state.start = (artifact_ref(f"{cell.attack.name}-release", state.suspect, cell.model) if state.suspect
                   else cell.model)
    with state.clock.stage("poison") as stage:
        state.poisoned, artifact = poison_stage(cell, env.cache)
        stage.cached(artifact)
        state.poison_key = artifact.meta["key"]
    if not len(state.poisoned.asr_set) and not state.poisoned.trigger_sets:
        log.warning("the test split has no row outside the target class: ASR cannot be measured (flag "
                    "empty_asr_set in the record)")
    state.budget = draw_budget(cell.dataset.train, cell.dataset.dev, state.poisoned.poisoned_positions,
                               cell.spec.seed, cell.budget)
    with state.clock.stage("victim") as stage:
        state.victim = train_victim(cell, env.cache, state.start, state.poisoned.train, state.poison_key,
                                    env.device, "training the victim")
        stage.cached(state.victim)
    tokenizer = load_tokenizer(cell.model)
    victim_preds = _artifact_predictions(cell, env, state, state.victim, tokenizer)
    victim_metrics = _score(cell, state, victim_preds)
    floor = _floor(cell, env, state, tokenizer) if cell.eval.floor else {}
    if _measures_survival(cell):
        state.survival = _survival(cell, env, state, tokenizer)
    gate = _sanity_gate(cell, victim_metrics, floor)
    if gate is not None and gate["passed"] is False:
        state.metrics = {**{f"victim_{k}": victim_metrics[k] for k in DELTA_METRICS if k in victim_metrics}, **floor}
        state.defense_info = {"gate": gate}
        return _record(cell, env, state, status="gated", error=gate["reason"])
    metrics = _defend(cell, env, state, tokenizer, victim_preds)
    metrics["dropped"] = state.poisoned.dropped
    for name in COLLAPSE_METRICS:
        if victim_metrics.get(name) is not None:
            metrics[f"victim_{name}"] = victim_metrics[name]
    for name in DELTA_METRICS:
        if victim_metrics.get(name) is not None:
            metrics[f"victim_{name}"] = victim_metrics[name]
            metrics[f"delta_{name}"] = _delta(victim_metrics[name], metrics.get(name))
    metrics.update(floor)
    if gate is not None:
        state.defense_info["gate"] = gate
    if cell.eval.stealth:
        metrics.update(_stealth(cell, env, state))
    state.metrics = metrics
    return _record(cell, env, state, status="ok")


def _predict(cell: Cell, env: RunEnv, model: PreTrainedModel, tokenizer, state: CellState) -> Predictions:
    with state.clock.stage("evaluate", accumulate=True):
        if is_instruction_lm(model):  # greedy answers scored by the label word they name
            return predict_generator(model, tokenizer, cell.dataset.test, state.poisoned.asr_set,
                                     cell.train.max_length, cell.train.eval_batch_size, cell.eval.max_new_tokens,
                                     env.device, state.poisoned.trigger_sets)
        return predict_cell(model, tokenizer, cell.dataset.test, state.poisoned.asr_set, cell.train.max_length,
                            cell.train.eval_batch_size, env.device, state.poisoned.trigger_sets)


def _score(cell: Cell, state: CellState, preds: Predictions) -> dict:
    metrics = cell_metrics(preds, cell.dataset.test, state.poisoned.asr_set, cell.dataset.num_labels)
    if cell.finetune.generative:
        metrics.update(answer_metrics(preds.clean, cell.dataset.test.labels, preds.poisoned, state.poisoned.target))
    return metrics


def _artifact_predictions(cell: Cell, env: RunEnv, state: CellState, artifact: Artifact, tokenizer) -> Predictions:
    """Predictions of a cached model on the test and ASR sets, cached too: every defense cell of a
    victim needs the undefended numbers, and every cell of a dataset the clean model's."""
    payload = {"model": artifact.meta["key"], "test": cell.dataset.test.digest(),
               "asr_set": state.poisoned.asr_set.digest(), "max_length": cell.train.max_length,
               "trigger_sets": {t: s.digest() for t, s in state.poisoned.trigger_sets.items()}}
    if cell.finetune.generative:
        payload["max_new_tokens"] = cell.eval.max_new_tokens

    def build(tmp: Path) -> dict:
        preds = _predict(cell, env, load_victim(artifact, cell.dataset.num_labels), tokenizer, state)
        (tmp / "predictions.json").write_text(_json(preds.to_json()))
        return {}

    found = env.cache.get_or_build("predictions", payload, build)
    return Predictions.from_json(_load_json(found.path / "predictions.json"))


def _context(cell: Cell, env: RunEnv, state: CellState, scratch: DefenseScratch) -> DefenseContext:
    """Only what the defense's threat model grants; the poisoned data object itself is never passed, and
    nothing on disk but the defense's scratch area: models as weights-only views in it, its own cache."""
    granted = frozenset(cell.defense.grants)
    objects: dict[str, Any] = {"budget": state.budget, "train_set": state.poisoned.train}
    if "pretrained" in granted:
        objects["pretrained"] = as_victim_start(cell, scratch.model_ref(cell.model, "pretrained"))
    if "suspect" in granted:
        objects["suspect"] = scratch.model_ref(state.start, "suspect") if state.suspect is not None else None
    if "corpus" in granted:
        objects["corpus"] = _corpus(env)
    if "victim_factory" in granted:
        victim = _victim_view(state.victim, scratch)  # built now: the defense then reads only its scratch area
        objects["victim_factory"] = lambda: plain_model(_load_view(victim, cell.dataset.num_labels),
                                                        cell.defense.name)[0]
    tokenizer = load_tokenizer(replace(cell.model, location=scratch.view(cell.model.location, weights=False)))
    return DefenseContext(seed=cell.spec.seed, num_labels=cell.dataset.num_labels, tokenizer=tokenizer,
                          train_config=cell.train, device=env.device, granted=granted,
                          _objects={k: v for k, v in objects.items() if k in granted}, cache=scratch.cache)


@dataclass(frozen=True)
class VictimView:
    """A trained victim as the defense sees it: its view, and for a PEFT victim the view of its base."""

    location: str
    base: str
    finetune: str
    prompt: dict | None = None  # a generator victim's prompt format


def _victim_view(artifact: Artifact, scratch: DefenseScratch) -> VictimView:
    base = artifact.meta.get("base", "")
    return VictimView(scratch.view(str(artifact.path)), scratch.view(base) if base else base,
                      artifact.meta.get("finetune", "full"), artifact.meta.get("prompt"))


def _load_view(view: VictimView, num_labels: int) -> PreTrainedModel:
    return load_trained(Path(view.location), view.base, num_labels, FINETUNE.get(view.finetune), view.prompt)


def _corpus(env: RunEnv) -> TextSplit:
    """D_aux: the shipped plain text (defenses.md §0.1), for defenses granted ``corpus``."""
    data_dir = resolve_data_dir(env.data_dir)
    if data_dir is None:
        raise InputError("this defense needs the plain-text corpus plaintext/bookcorpus/train.tsv; "
                         "point --data-dir at the benchmark data")
    return read_split(data_dir / "plaintext" / "bookcorpus" / "train.tsv")


def _defend(cell: Cell, env: RunEnv, state: CellState, tokenizer, victim_preds: Predictions) -> dict:
    defense = cell.defense
    if isinstance(defense, BaselineDefense):
        return _score(cell, state, victim_preds)
    scratch = DefenseScratch.of(env.cache.root, defense.name)
    ctx = _context(cell, env, state, scratch)
    test, asr_set = cell.dataset.test, state.poisoned.asr_set
    if isinstance(defense, PretrainedDefense):
        return _purify_then_train(cell, env, state, tokenizer, ctx, scratch)
    if isinstance(defense, InferenceDefense):
        model = _load_view(_victim_view(state.victim, scratch), cell.dataset.num_labels)
        with state.clock.stage("defense_fit"):
            detector = defense.fit(model, ctx)
        with state.clock.stage("defense_inference"):
            metrics = evaluate_with_detector(victim_preds, detector, test, asr_set, state.poisoned.trigger_sets,
                                             cell.dataset.num_labels)
        state.defense_info = {**detector.info, "scores": metrics.pop("scores")}
        return metrics
    if isinstance(defense, CorrectionDefense):
        return _correct_inputs(cell, env, state, tokenizer, ctx)
    if isinstance(defense, FilterDefense):
        return _filter_then_train(cell, env, state, tokenizer, ctx)
    peft_info: dict = {}
    with state.clock.stage("defense_fit"):
        if isinstance(defense, RepairDefense):
            model, peft_info = plain_model(_load_view(_victim_view(state.victim, scratch), cell.dataset.num_labels),
                                           defense.name)
            outcome = defense.repair(model, ctx)
        elif isinstance(defense, TrainingDefense):
            outcome = defense.train(ctx)
        else:
            raise InputError(f"defense '{defense.name}' ({defense.stage.value}) is not supported by this "
                             "version of the pipeline")
    state.defense_info = {**outcome.info, **peft_info}
    return _score(cell, state, _predict(cell, env, outcome.model, tokenizer, state))


def purified_payload(cell: Cell, start_identity: str) -> dict:
    """What a pre-fine-tuning defense's purified model depends on: what it purifies, the defense, the seed."""
    return {"start": start_identity, "defense": cell.defense.cache_payload(), "seed": cell.spec.seed}


def _purify_then_train(cell: Cell, env: RunEnv, state: CellState, tokenizer, ctx: DefenseContext,
                       scratch: DefenseScratch) -> dict:
    """Pre-fine-tuning defenses: purify what the victim starts from, then the usual victim recipe.

    The defense reads a view of the start and writes into its scratch area; the pipeline moves the result
    into the cache."""
    defense = cell.defense
    payload = purified_payload(cell, state.start.identity)

    def build(tmp: Path) -> dict:
        began = time.perf_counter()
        out = scratch.output_dir()
        try:
            info = defense.purify(scratch.model_ref(state.start, "start"), ctx, out)
            for path in out.iterdir():
                shutil.move(str(path), tmp / path.name)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return {"seconds": time.perf_counter() - began, "info": info}

    with state.clock.stage("defense_fit") as stage:
        purified = env.cache.get_or_build("purified", payload, build)
        stage.cached(purified)
    with state.clock.stage("defended_victim") as stage:
        victim = train_victim(cell, env.cache, artifact_ref(f"{defense.name}-purified", purified, cell.model),
                              state.poisoned.train, state.poison_key, env.device, "training on the purified model")
        stage.cached(victim)
    state.defense_info = {**purified.meta.get("info", {}), "purified_key": purified.meta["key"],
                          "defended_victim_key": victim.meta["key"]}
    return _score(cell, state, _artifact_predictions(cell, env, state, victim, tokenizer))


def _correct_inputs(cell: Cell, env: RunEnv, state: CellState, tokenizer, ctx: DefenseContext) -> dict:
    """Input correction (ONION): the victim classifies every corrected input; nothing is rejected."""
    model = load_victim(state.victim, cell.dataset.num_labels)
    with state.clock.stage("defense_fit"):
        corrector = cell.defense.fit(model, ctx)
    with state.clock.stage("defense_inference"):
        metrics, fixed_asr = evaluate_with_corrector(
            model, tokenizer, corrector, cell.dataset.test, state.poisoned.asr_set, cell.train.max_length,
            cell.train.eval_batch_size, env.device, state.poisoned.trigger_sets, cell.dataset.num_labels)
    # The defense is done: only now may the evaluator look at what the attack inserted.
    if isinstance(cell.attack, DataPoisoningAttack):
        originals = cell.attack.clean_originals(cell.dataset, state.poisoned)
        metrics.update(inserted_word_removal(originals, state.poisoned.asr_set, fixed_asr))
    state.defense_info = {**corrector.info, "scores": metrics.pop("scores", None)}
    return metrics


def filter_payload(cell: Cell, poison_key: str, victim_key: str) -> dict:
    """What a training-data filter's kept rows depend on: the poisoned data, the victim it reads, itself."""
    return {"poison": poison_key, "victim": victim_key, "defense": cell.defense.cache_payload(),
            "seed": cell.spec.seed}


def _filter_then_train(cell: Cell, env: RunEnv, state: CellState, tokenizer, ctx: DefenseContext) -> dict:
    """Training-data filtering (BKI, CUBE): the filter reads the victim trained on the poisoned data and
    keeps rows (cached), then the usual victim recipe runs on the kept rows (cached, keyed by the filter)."""
    defense, train = cell.defense, state.poisoned.train

    def build(tmp: Path) -> dict:
        began = time.perf_counter()
        result = defense.filter(load_victim(state.victim, cell.dataset.num_labels), ctx)
        (tmp / "filtered.json").write_text(_json({"keep": sorted(result.keep),
                                                  "scores": [float(x) for x in result.scores]}))
        return {"seconds": time.perf_counter() - began, "info": result.info}

    with state.clock.stage("defense_fit") as stage:
        filtered = env.cache.get_or_build("filtered", filter_payload(cell, state.poison_key, state.victim.meta["key"]),
                                          build)
        stage.cached(filtered)
    kept = _load_json(filtered.path / "filtered.json")
    with state.clock.stage("defended_victim") as stage:
        victim = train_victim(cell, env.cache, state.start, train.subset(kept["keep"]), filtered.meta["key"],
                              env.device, "training on the filtered data")
        stage.cached(victim)
    metrics = _score(cell, state, _artifact_predictions(cell, env, state, victim, tokenizer))
    # The defense is done: only now does the evaluator compare its removals with the poison mask.
    scores = np.asarray(kept["scores"], dtype=float)
    metrics.update(filter_metrics(kept["keep"], scores, state.poisoned.poisoned_positions, len(train)))
    state.defense_info = {**filtered.meta.get("info", {}), "filtered_key": filtered.meta["key"],
                          "defended_victim_key": victim.meta["key"], "scores": {"train": kept["scores"]}}
    return metrics


def _stealth(cell: Cell, env: RunEnv, state: CellState) -> dict:
    """ΔPPL and similarity of a data-poisoning attack's triggered test rows to their clean originals (cached)."""
    if not isinstance(cell.attack, DataPoisoningAttack):
        return {}
    from nlpbd.lm import load_lm
    from nlpbd.models import resolve_model
    from nlpbd.stealth import SIM_MODEL, STEALTH_VERSION, SentenceEncoder, stealth_metrics

    payload = {"poison": state.poison_key, "lm": resolve_model(cell.eval.stealth_lm).identity,
               "sim": resolve_model(SIM_MODEL).identity, "version": STEALTH_VERSION}

    def build(tmp: Path) -> dict:
        began = time.perf_counter()
        lm, lm_info = load_lm(cell.eval.stealth_lm, env.device)
        originals = cell.attack.clean_originals(cell.dataset, state.poisoned)
        measured = stealth_metrics(list(state.poisoned.asr_set.texts), originals, lm,
                                   SentenceEncoder(SIM_MODEL, env.device))
        (tmp / "stealth.json").write_text(_json({**measured, **lm_info, "sim_model": SIM_MODEL}))
        return {"seconds": time.perf_counter() - began}

    with state.clock.stage("stealth") as stage:
        artifact = env.cache.get_or_build("stealth", payload, build)
        stage.cached(artifact)
    measured = _load_json(artifact.path / "stealth.json")
    state.stealth_info = {k: v for k, v in measured.items() if isinstance(v, str)}
    return {k: v for k, v in measured.items() if not isinstance(v, str)}


def _floor(cell: Cell, env: RunEnv, state: CellState, tokenizer) -> dict:
    """ASR of a clean model (same recipe, clean train split, same seed) on this cell's ASR set."""
    clean_key = clean_data_key(cell)
    with state.clock.stage("clean_model") as stage:
        artifact = train_victim(cell, env.cache, cell.model, cell.dataset.train, clean_key, env.device,
                                "training the clean reference model")
        stage.cached(artifact)
    state.clean_model = artifact
    clean = _score(cell, state, _artifact_predictions(cell, env, state, artifact, tokenizer))
    floor = {"asr_floor": clean["asr"], "floor_hits": clean["poison_hits"], "clean_model_cacc": clean["cacc"],
             **{f"clean_model_{name}": clean.get(name) for name in COLLAPSE_METRICS}}
    for name in ("aasr", "masr"):
        if clean.get(name) is not None:
            floor[f"{name}_floor"] = clean[name]
    return floor


def _measures_survival(cell: Cell) -> bool:
    """The undefended cell of a task-agnostic release on a fully fine-tuned encoder (the layers compared are
    the encoder's; a PEFT victim's adapter is not a checkpoint the release's layers can be read against)."""
    method = FINETUNE.get(cell.spec.finetune)
    return (cell.eval.survival_rows > 0 and isinstance(cell.defense, BaselineDefense)
            and cell.attack.threat_model is ThreatModel.PRETRAINED and not method.is_peft and not method.generative)


def _survival(cell: Cell, env: RunEnv, state: CellState, tokenizer) -> dict:
    """How much of each trigger's collapse of the [CLS] states survives, layer by layer, in the release, the
    victim and the clean model, on a seeded subset of the clean test rows and their triggered copies."""
    test = cell.dataset.test
    rows = min(cell.eval.survival_rows, len(test))
    positions = sorted(numpy_rng(cell.spec.seed, "survival").choice(len(test), size=rows, replace=False).tolist())
    locations = {"release": state.suspect.path, "victim": state.victim.path}
    if state.clean_model is not None:
        locations["clean_model"] = state.clean_model.path
    triggered = {t: [split.texts[p] for p in positions] for t, split in state.poisoned.trigger_sets.items()}
    with state.clock.stage("survival"):
        return measure_survival({k: str(v) for k, v in locations.items()}, tokenizer,
                                [test.texts[p] for p in positions], triggered, cell.train.max_length,
                                cell.train.eval_batch_size, env.device)


def _sanity_gate(cell: Cell, victim_metrics: dict, floor: dict) -> dict | None:
    """attacks.md §4: a task-agnostic release is defended only when its undefended victim's AASR clears
    the clean floor by ``weak_attack_margin``; a release that does not is reported, not defended.

    None when the gate does not apply (no defense, another threat model, or ``eval.gate=false``). Without
    the floor (``eval.floor=false``) there is nothing to gate on: the defense runs and the record says so.
    """
    if (not cell.eval.gate or isinstance(cell.defense, BaselineDefense)
            or cell.attack.threat_model is not ThreatModel.PRETRAINED):
        return None
    if not cell.eval.floor:
        return {"passed": None, "reason": "not checked: eval.floor=false gives no floor to gate on"}
    aasr, aasr_floor, margin = victim_metrics.get("aasr"), floor.get("aasr_floor"), cell.eval.weak_attack_margin
    passed = aasr is not None and aasr_floor is not None and aasr - aasr_floor >= margin
    reason = None if passed else (f"sanity gate: the release's no-defense AASR {aasr:.3f} is less than {margin:g} "
                                  f"above the clean floor {aasr_floor:.3f}; reported, not defended")
    return {"passed": passed, "aasr": aasr, "aasr_floor": aasr_floor, "margin": margin, "reason": reason}


def _flags(cell: Cell, metrics: dict) -> dict:
    kind = "aasr" if metrics.get("victim_aasr") is not None else "asr"  # task-agnostic cells gate on AASR
    floor, clean_cacc = metrics.get(f"{kind}_floor"), metrics.get("clean_model_cacc")
    victim_asr, victim_cacc = metrics.get(f"victim_{kind}"), metrics.get("victim_cacc")
    weak = None if floor is None or victim_asr is None else victim_asr - floor < cell.eval.weak_attack_margin
    degraded = (None if clean_cacc is None or victim_cacc is None
                else clean_cacc - victim_cacc > cell.eval.degraded_points)
    majority = metrics.get("majority_rate")
    return {"weak_attack": weak, "degraded_victim": degraded,
            "collapsed_victim": _collapsed(victim_cacc, metrics.get("victim_predicted_classes"), majority),
            "collapsed_clean_model": _collapsed(clean_cacc, metrics.get("clean_model_predicted_classes"), majority),
            "empty_asr_set": None if metrics.get("n_poison") is None or metrics.get("aasr") is not None
            else metrics["n_poison"] == 0}


def _collapsed(cacc: float | None, predicted_classes: int | None, majority: float | None) -> bool | None:
    """A model that predicts one class, or scores no better than always answering the majority class: its
    CAcc is the class balance and its ASR says nothing (the target may be the class it always answers)."""
    if cacc is None or majority is None:
        return None
    return predicted_classes is not None and predicted_classes <= 1 or cacc <= majority + COLLAPSE_MARGIN


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else before - after


def _record(cell: Cell, env: RunEnv, state: CellState, status: str, error: str | None = None) -> dict:
    poisoned = state.poisoned
    return {
        "schema": SCHEMA,
        "cell_id": cell.cell_id,
        "status": status,
        "error": error,
        "cell": cell.identity,
        "metrics": state.metrics,
        "flags": _flags(cell, state.metrics),
        "attack_info": {**(poisoned.info if poisoned else {}), "threat_model": cell.attack.threat_model.value,
                        "poison_key": state.poison_key,
                        **({"stealth": state.stealth_info} if state.stealth_info else {}),
                        **({"survival": state.survival} if state.survival else {}),
                        "asr_set_size": len(poisoned.asr_set) if poisoned else None},
        "defense_info": {**state.defense_info, "stage": cell.defense.stage.value,
                         "grants": sorted(cell.defense.grants), "version": cell.defense.version},
        "budget": state.budget.info() if state.budget else None,
        "victim": {"key": state.victim.meta["key"], "train": state.victim.meta.get("train")} if state.victim else None,
        "suspect": ({"key": state.suspect.meta["key"], "info": state.suspect.meta.get("info")} if state.suspect
                    else None),
        "dataset_info": {"source": cell.dataset.source, "fingerprint": cell.dataset.fingerprint,
                         "sizes": {s: len(getattr(cell.dataset, s)) for s in ("train", "dev", "test")}},
        "model_info": {"identity": cell.model.identity, "location": cell.model.location, **cell.model.info},
        "timings": state.clock.timings(),
        "memory": state.clock.memory(),
        "provenance": provenance(env.device),
    }


def _json(payload: Any) -> str:
    return json.dumps(payload)


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text())

