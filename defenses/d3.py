"""D3: Distance-Driven Detoxification (defenses.md §5).

Paper: Shaokui Wei, Jiayin Liu, Hongyuan Zha, "Backdoor Mitigation by Distance-Driven
Detoxification", ICCV 2025 (arXiv:2411.09585). Reference code: shawkui/Distance_Driven_Detoxification,
``defense/d3.py`` (BackdoorBench-based). Paper and code are vision-only; this text adaptation is ours.

D3 pushes selected weights of the suspect model θ_bd as far as possible from their hand-over values
W^0 while a per-sample hinge keeps the clean loss under ε:

    L_clean = mean_i relu(CE_i − ε)            Dist = Σ_l ‖W_l − W_l^0‖_p
    loss    = λ·L_clean − Dist                 (λ ≤ 1)
    loss    = (λ·L_clean − Dist) / (λ + 1)     (λ > 1)

After every SGD step each selected weight is rescaled, as one tensor, back onto the sphere
‖W_l‖_p = ‖W_l^0‖_p. Biases are neither in the distance nor projected. All parameters train (SGD lr
0.01, momentum 0.9, weight decay 0, cosine schedule stepped per epoch, ``model.train()``), and the
last epoch is returned. D3 is granted D_c only: it never sees θ_pre.

Deviations from the reference code and the spec, all deliberate:

- Batch size 32 on text (the reference uses 256 images).
- Data: all of the shared clean budget D_c (``ctx.budget.rows``), not a fresh random 5% draw.
- Layer selection for text models (spec §5.3), resolved per architecture (``model_type``) through
  attribute paths: ``head`` (default), ``head+pooler`` and ``all_linear``; the reference selects the
  Linear/Conv modules under one named vision layer (the final FC ``linear``). ``all_linear`` takes
  every ``nn.Linear`` of the encoder, the pooler and the head (not the embeddings).
- The yaml keys ``wd`` (5e-4), ``amp`` and ``random_init`` are ignored, as ``d3.py`` ignores them.
- The hinge is per sample, then averaged, as coded (not a hinge on the mean loss).
- Random draws of the warm-up come from the named stream ``d3.warmup`` (drawn on CPU, then moved to
  the device), data order from ``d3.data`` and dropout from ``d3.dropout``; the reference draws from
  the global RNG.
- The forward pass may run under bf16 autocast on CUDA (project-wide); the loss, the distance and
  the projection are computed in fp32.
- Zero-norm guards: the distance of a layer at W = W^0 (``warmup=near``) uses the zero subgradient,
  and a weight whose norm is exactly 0 (``warmup=middle`` with a zero update) is left as it is
  instead of being divided by zero. The reference has neither guard.
- **The sign-flip escape is closed by freezing the tanh pooler** (``freeze=sign_symmetric``, spec §5.3).
  In BERT-style models the head reads ``tanh(W_p·h + b_p)``, an odd function of its pre-activation.
  With the pooler trainable, D3 met its distance term for free: the head walked to its antipode
  −W^0 (distance exactly 2‖W^0‖, the maximum on the sphere) while the pooler flipped its own sign,
  ``(−W)·tanh(−z) = W·tanh(z)``, so the function and the backdoor were unchanged (every first D3
  record ended at 2.000 × ‖W^0‖). The vision reference's last layer reads non-negative ReLU
  features, where no such flip exists. We therefore freeze every parameter of the Linear modules
  that feed a tanh between the encoder and the selected weights (``HeadLayout.sign_symmetric``),
  except selected weights themselves, whose biases are frozen instead: with ``select=head`` on
  BERT/MiniLM the pooler's weight and bias stay as handed over. Everything else still trains, as
  in the reference. Decoder classifiers (Llama/SmolLM2, Qwen2, Mistral, GPT-2) have no pooler: the
  ``score`` Linear (no bias) reads the final norm at the last non-padding token. That norm is not a
  tanh, but it is just as sign-symmetric: RMSNorm is ``g ⊙ x/rms(x)``, so negating the gain ``g``
  negates its output and ``(−W)·(−g ⊙ x̂) = W·(g ⊙ x̂)``; GPT-2's LayerNorm does the same with gain and
  bias negated together. ``freeze=sign_symmetric`` therefore freezes that final norm on decoders
  (``model.norm`` / ``transformer.ln_f``); a flip deeper down would have to negate the whole residual
  stream and every layer reading it, which no single tensor can do. ``freeze=none`` restores the old
  behaviour (the control that reproduces the escape). One sign-symmetric path stays open on the
  post-LN encoders: the LayerNorm the pooler reads (``HeadLayout.input_norm``) can negate its output
  with its gain negated and its bias re-fitted. It is left trainable, as in the reference, and
  watched instead: with 10–20 % of SST-2 as D_c, MiniLM's head reaches −W^0 with the pooler frozen
  and yet the ASR falls to ~0.2 (FT: 1.0), so the function did change there. The record reports, per
  selected layer, the cosine between W and W^0 and the distance as a fraction of its 2‖W^0‖ maximum,
  names the layers that ended antipodal (cosine ≤ −0.99), and gives the cosine of each
  sign-symmetric weight and of the input norm's gain to their handed-over values (≈ −1: flipped).
- ``distance=false`` drops the distance term and keeps everything else (warm-up, hinge, optimiser,
  projection): with ``warmup=near`` it is the D3-matched FT control of spec §1.
- ``optimizer=adamw`` is a fallback outside the reference (spec §5.4: AdamW, 2e-5 outside the head,
  1e-3 on the head modules of ``select=head``, weight decay 0, same cosine schedule); results that
  use it must be reported as a deviation.
- Non-finite losses and gradient norms are counted and logged, never clipped or skipped (the
  reference neither checks nor clips).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from nlpbd.config import option, to_dict
from nlpbd.errors import InputError
from nlpbd.methods import DefenseContext, DefenseOutcome, RepairDefense, register_defense
from nlpbd.progress import reporter
from nlpbd.seeding import seed_everything, torch_generator
from nlpbd.training import Encoded, autocast, collate, encode, length_grouped_batches, pad_id_of

log = logging.getLogger(__name__)

MOMENTUM = 0.9  # the reference's SGD momentum; weight decay is 0 (the yaml's wd is unused by d3.py)

SelectMode = Literal["head", "head+pooler", "all_linear"]
WarmupMethod = Literal["random", "far", "middle", "noise", "near"]


@dataclass
class D3Config:
    select: SelectMode = option("head", "layers pushed away from θ_bd: the classification head, head + "
                                "BERT pooler, or every nn.Linear of encoder, pooler and head (a decoder "
                                "classifier's head is its score layer; it has no pooler)")
    warmup: WarmupMethod = option("random", "re-initialisation of the selected weights: random (uniform, "
                                  "rescaled to ‖W^0‖), far (−W^0), middle (0), noise (W^0 + N·std), "
                                  "near (unchanged)")
    lam: float = option(0.5, "λ: weight of the clean hinge loss (λ > 1 also divides the loss by λ + 1)",
                        low=0.0)
    eps: float = option(0.1, "ε: per-sample bound on the clean cross-entropy (hinge threshold)", low=0.0)
    p: float = option(2.0, "order of the distance and sphere norm over the flattened weight "
                      "(2 = Frobenius)", low=1.0)
    epochs: int = option(100, "epochs over D_c, last epoch returned (the spec also reports 20)",
                         low=1, high=10000)
    batch_size: int = option(32, "batch size (the reference uses 256 images)", low=1)
    optimizer: Literal["sgd", "adamw"] = option("sgd", "sgd as in the reference; adamw is a fallback "
                                                "for a CAcc collapse (a reported deviation)")
    lr: float = option(0.01, "SGD learning rate (momentum 0.9, weight decay 0, cosine per epoch)", low=0.0)
    encoder_lr: float = option(2e-5, "optimizer=adamw only: learning rate outside the head", low=0.0)
    head_lr: float = option(1e-3, "optimizer=adamw only: learning rate of the head", low=0.0)
    distance: bool = option(True, "include the distance term; false with warmup=near is the D3-matched "
                            "FT control")
    freeze: Literal["sign_symmetric", "none"] = option(
        "sign_symmetric", "sign_symmetric: freeze the tanh pooler between encoder and selected weights (on a "
        "decoder classifier the final RMSNorm/LayerNorm gain the score layer reads), so the head cannot meet the "
        "distance by a sign flip (deviation, spec §5.3); none: the old behaviour")


# --- which layers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadLayout:
    """Attribute paths of one architecture's classification head, pooler and encoder (spec §5.3)."""

    head: tuple[str, ...]
    pooler: tuple[str, ...]  # empty where the head already contains the pooler (or there is none)
    encoder: str
    # Modules whose output goes through a tanh (odd) on the way to the logits, or is itself odd in its
    # parameters (a decoder's final norm): a sign flip of such a module can undo a sign flip of the weights
    # above it at no cost (spec §5.3).
    sign_symmetric: tuple[str, ...] = ()
    # The LayerNorm whose output the pooler or head reads (post-LN encoders: the last layer's output
    # norm). Negating its gain, with its bias re-fitted, negates the pooler's input, a flip one layer
    # further down; it stays trainable, and the record reports its gain's cosine to the handed-over one.
    input_norm: str = ""


LAYOUTS: dict[str, HeadLayout] = {
    "bert": HeadLayout(("classifier",), ("bert.pooler.dense",), "bert.encoder",  # also MiniLM
                       ("bert.pooler.dense",), "bert.encoder.layer.-1.output.LayerNorm"),
    "roberta": HeadLayout(("classifier.dense", "classifier.out_proj"), (), "roberta.encoder",
                          ("classifier.dense",), "roberta.encoder.layer.-1.output.LayerNorm"),
    "distilbert": HeadLayout(("pre_classifier", "classifier"), (), "distilbert.transformer",  # ReLU
                             input_norm="distilbert.transformer.layer.-1.output_layer_norm"),
    "deberta-v2": HeadLayout(("pooler.dense", "classifier"), (), "deberta.encoder",  # GELU pooler
                             input_norm="deberta.encoder.layer.-1.output.LayerNorm"),
    # Decoder classifiers: the ``score`` Linear reads the final norm's output at the last token. RMSNorm,
    # g ⊙ x/rms(x), is odd in its gain g (and LayerNorm in its gain and bias together), so flipping that
    # one vector undoes a flipped head exactly as the tanh pooler does: it is frozen like the pooler.
    "llama": HeadLayout(("score",), (), "model.layers", ("model.norm",)),
    "qwen2": HeadLayout(("score",), (), "model.layers", ("model.norm",)),
    "mistral": HeadLayout(("score",), (), "model.layers", ("model.norm",)),
    "gpt2": HeadLayout(("score",), (), "transformer.h", ("transformer.ln_f",)),
}


def _resolve(model: nn.Module, path: str) -> object:
    """``attrgetter`` over a dotted path whose integer parts (``-1`` too) index module lists."""
    target: object = model
    for part in path.split("."):
        target = target[int(part)] if part.lstrip("-").isdigit() else attrgetter(part)(target)
    return target


def _module_at(model: nn.Module, path: str, model_type: str) -> nn.Module:
    try:
        module = _resolve(model, path)
    except (AttributeError, IndexError, TypeError):
        raise InputError(f"D3: a {model_type} model of class {type(model).__name__} has no '{path}' "
                         "(a sequence classifier with its pooler is required)") from None
    if not isinstance(module, nn.Module):
        raise InputError(f"D3: '{path}' of {type(model).__name__} is not a module")
    return module


def _linear_at(model: nn.Module, path: str, model_type: str) -> nn.Linear:
    module = _module_at(model, path, model_type)
    if not isinstance(module, nn.Linear):
        raise InputError(f"D3: '{path}' of {type(model).__name__} is a {type(module).__name__}, "
                         "not an nn.Linear")
    return module


def resolve_selected_linears(model: nn.Module, mode: SelectMode) -> list[tuple[str, nn.Linear]]:
    """The (name, module) pairs D3 acts on, in forward order; unknown architectures raise InputError."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise InputError(f"D3 has no layer layout for model type '{model_type}'; supported: "
                         f"{', '.join(LAYOUTS)}")
    layout = LAYOUTS[model_type]
    modules = [_linear_at(model, path, model_type) for path in layout.head]
    if mode in ("head+pooler", "all_linear"):
        modules = [_linear_at(model, path, model_type) for path in layout.pooler] + modules
    if mode == "all_linear":
        encoder = _module_at(model, layout.encoder, model_type)
        modules = [m for m in encoder.modules() if isinstance(m, nn.Linear)] + modules
    names = {id(module): name for name, module in model.named_modules()}
    unique = list({id(m): m for m in modules}.values())
    return [(names[id(m)], m) for m in unique]


def sign_symmetric_parameters(model: nn.Module, selected: list[tuple[str, nn.Linear]]) -> dict[str, nn.Parameter]:
    """The trainable parameters of the tanh-feeding Linear modules that D3 freezes (spec §5.3).

    A selected module keeps its weight (D3 moves it) and gives only its bias; an unselected one
    gives both.
    """
    model_type = model.config.model_type
    selected_ids = {id(m) for _, m in selected}
    found = {}
    for path in LAYOUTS[model_type].sign_symmetric:
        module = _module_at(model, path, model_type)
        for name, parameter in module.named_parameters():
            if parameter.requires_grad and not (name == "weight" and id(module) in selected_ids):
                found[f"{path}.{name}"] = parameter
    return found


@dataclass
class SelectedLayers:
    """The selected Linear modules, their weights W^0 as handed over and the radii ‖W^0‖_p."""

    names: list[str]
    modules: list[nn.Linear]
    initial: list[torch.Tensor]
    norms: list[torch.Tensor]

    @classmethod
    def capture(cls, selected: list[tuple[str, nn.Linear]], p: float) -> SelectedLayers:
        """Clone the weights only (no biases); call this BEFORE any re-initialisation."""
        initial = [m.weight.detach().clone() for _, m in selected]
        return cls([n for n, _ in selected], [m for _, m in selected], initial,
                   [torch.linalg.vector_norm(w, ord=p) for w in initial])

    @property
    def weights(self) -> list[nn.Parameter]:
        return [m.weight for m in self.modules]


# --- the pieces of the objective ------------------------------------------------------------------


@torch.no_grad()
def warm_start(layers: SelectedLayers, method: WarmupMethod, p: float, generator: torch.Generator) -> None:
    """Re-initialise the selected weights in place (spec §5.2 step 2); biases are left alone."""
    for weight, w0, norm0 in zip(layers.weights, layers.initial, layers.norms):
        if method == "random":
            draw = torch.empty(weight.shape).uniform_(-0.5, 0.5, generator=generator).to(weight)
            weight.copy_(draw * (norm0 / torch.linalg.vector_norm(draw, ord=p)))
        elif method == "far":  # a maximiser of ‖W − W^0‖ on the sphere
            weight.copy_(-w0)
        elif method == "middle":
            weight.zero_()
        elif method == "noise":
            noise = torch.randn(weight.shape, generator=generator).to(weight)
            weight.copy_(w0 + noise * w0.std())
        elif method != "near":
            raise InputError(f"unknown D3 warm-up '{method}'")


def _norm_with_zero_subgradient(diff: torch.Tensor, p: float) -> torch.Tensor:
    """‖diff‖_p whose gradient at diff = 0 is 0, not NaN (``warmup=near`` starts there).

    The double ``where`` keeps the zero case out of the norm's backward entirely, so the guard does
    not depend on how a torch version differentiates a norm at 0.
    """
    is_zero = (diff == 0).all()
    safe = torch.where(is_zero, torch.ones_like(diff), diff)
    return torch.where(is_zero, torch.zeros((), dtype=diff.dtype, device=diff.device),
                       torch.linalg.vector_norm(safe, ord=p))


def distance(layers: SelectedLayers, p: float) -> torch.Tensor:
    """Dist = Σ_l ‖W_l − W_l^0‖_p over the flattened weights (p = 2: Frobenius, never spectral)."""
    terms = [_norm_with_zero_subgradient(w - w0, p) for w, w0 in zip(layers.weights, layers.initial)]
    return torch.stack(terms).sum()


def d3_loss(logits: torch.Tensor, labels: torch.Tensor, dist: torch.Tensor, lam: float,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, L_clean): the per-sample hinge as coded, then both λ branches exactly."""
    per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
    clean = F.relu(per_sample - eps).mean()
    objective = lam * clean - dist
    loss = objective / (lam + 1) if lam > 1 else objective
    return loss, clean


@torch.no_grad()
def project_to_sphere(layers: SelectedLayers, p: float) -> None:
    """W_l ← W_l · ‖W_l^0‖_p / ‖W_l‖_p, the whole tensor at once; biases are not touched."""
    for weight, norm0 in zip(layers.weights, layers.norms):
        current = torch.linalg.vector_norm(weight, ord=p)
        # An all-zero weight (warmup=middle before it moves) has no direction to rescale.
        weight.mul_(torch.where(current > 0, norm0 / current, torch.ones_like(current)))


# --- training -------------------------------------------------------------------------------------

Observer = Callable[[SelectedLayers, int], None]


def make_optimizer(model: nn.Module, config: D3Config) -> torch.optim.Optimizer:
    """SGD over all trainable parameters (the reference: all), or the AdamW fallback with a faster head."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=config.lr, momentum=MOMENTUM, weight_decay=0.0)
    head_ids = {id(p) for _, m in resolve_selected_linears(model, "head") for p in m.parameters()}
    head = [p for p in trainable if id(p) in head_ids]
    rest = [p for p in trainable if id(p) not in head_ids]
    return torch.optim.AdamW([{"params": rest, "lr": config.encoder_lr},
                              {"params": head, "lr": config.head_lr}], weight_decay=0.0, eps=1e-8)


@dataclass
class StepStats:
    """Per-step values kept on the device, so a step needs no host synchronisation."""

    loss: torch.Tensor
    clean: torch.Tensor
    dist: torch.Tensor
    grad_norm: torch.Tensor


def train_step(model: nn.Module, batch: dict, layers: SelectedLayers, optimizer: torch.optim.Optimizer,
               config: D3Config, device: torch.device) -> StepStats:
    """One D3 update: forward, loss, SGD step, then the projection (also after the first step)."""
    labels = batch.pop("labels")
    with autocast(device):
        logits = model(**batch).logits
    with torch.set_grad_enabled(config.distance):  # the FT control still logs Dist
        dist = distance(layers, config.p)
    loss, clean = d3_loss(logits, labels, dist if config.distance else torch.zeros_like(dist),
                          config.lam, config.eps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([q.grad for q in model.parameters() if q.grad is not None])
    optimizer.step()
    project_to_sphere(layers, config.p)
    return StepStats(loss.detach(), clean.detach(), dist.detach(), grad_norm)


@dataclass
class History:
    clean_loss: list[float]
    distance: list[float]
    non_finite_losses: int = 0
    non_finite_grads: int = 0
    steps: int = 0


def _compact(value: float) -> float:
    return float(f"{value:.6g}")


def train_epochs(model: nn.Module, encoded: Encoded, layers: SelectedLayers, config: D3Config,
                 ctx: DefenseContext, observe: Observer | None = None) -> History:
    """All epochs: cosine schedule stepped per epoch, one host sync per epoch for the statistics."""
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    generator, pad_id = torch_generator(ctx.seed, "d3.data"), pad_id_of(ctx.tokenizer)
    history = History([], [])
    total = config.epochs * math.ceil(len(encoded) / config.batch_size)
    with reporter().task("D3 detoxification on D_c", total) as advance:
        for _ in range(config.epochs):
            model.train()
            sums = torch.zeros(4, device=ctx.device)  # clean, dist, non-finite losses, non-finite grads
            batches = length_grouped_batches(encoded.lengths, config.batch_size, generator)
            for indices in batches:
                stats = train_step(model, collate(encoded, indices, pad_id, ctx.device), layers, optimizer,
                                   config, ctx.device)
                sums += torch.stack([stats.clean, stats.dist, (~torch.isfinite(stats.loss)).float(),
                                     (~torch.isfinite(stats.grad_norm)).float()])
                history.steps += 1
                if observe is not None:
                    observe(layers, history.steps)
                advance(1)
            scheduler.step()
            clean, dist, bad_losses, bad_grads = sums.tolist()
            history.clean_loss.append(_compact(clean / len(batches)))
            history.distance.append(_compact(dist / len(batches)))
            history.non_finite_losses += int(bad_losses)
            history.non_finite_grads += int(bad_grads)
            log.debug("D3 epoch %d: clean hinge %.4g, Dist %.4g", len(history.clean_loss),
                      history.clean_loss[-1], history.distance[-1])
    return history


ANTIPODAL_COSINE = -0.99  # a selected weight this close to −W^0 was most likely reached by a sign flip


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def sign_symmetric_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the layout's sign-symmetric weights and input-norm gain, to tell afterwards whether they flipped."""
    model_type = model.config.model_type
    layout = LAYOUTS[model_type]
    paths = layout.sign_symmetric + ((layout.input_norm,) if layout.input_norm else ())
    return {path: _module_at(model, path, model_type).weight.detach().clone() for path in paths}


@torch.no_grad()
def escape_report(model: nn.Module, layers: SelectedLayers, before: dict[str, torch.Tensor],
                  p: float) -> dict:
    """How each selected weight ended relative to W^0, and whether the tanh layers flipped sign."""
    cosines = [_cosine(w, w0) for w, w0 in zip(layers.weights, layers.initial)]
    fractions = [float(torch.linalg.vector_norm(w - w0, ord=p) / (2 * n))
                 for w, w0, n in zip(layers.weights, layers.initial, layers.norms)]
    after = sign_symmetric_weights(model)
    flips = {path: _compact(_cosine(after[path], w)) for path, w in before.items()}
    input_norm = LAYOUTS[model.config.model_type].input_norm
    antipodal = [name for name, c in zip(layers.names, cosines) if c <= ANTIPODAL_COSINE]
    if antipodal:
        log.warning("D3: %s ended antipodal to W^0 (cosine ≤ %.2f): a sign flip below it (cosines %s) would "
                    "leave the function, and the backdoor, unchanged; compare the ASR with FT's",
                    antipodal, ANTIPODAL_COSINE, flips)
    return {"cosine_to_initial": [_compact(c) for c in cosines],
            "distance_fraction_of_max": [_compact(f) for f in fractions],
            "antipodal_layers": antipodal,
            "sign_symmetric_cosine": {path: c for path, c in flips.items() if path != input_norm},
            **({"input_norm_gain_cosine": {input_norm: flips[input_norm]}} if input_norm else {})}


def detoxify(model: PreTrainedModel, ctx: DefenseContext, config: D3Config,
             observe: Observer | None = None) -> dict:
    """Run D3 on ``model`` in place and return what to record.

    ``observe(layers, step)`` is called after the warm-up (step 0) and after every projected step.
    """
    rows = ctx.budget.rows
    if len(rows) == 0:
        raise InputError("D3 needs a non-empty clean budget D_c")
    start = time.perf_counter()
    model.to(ctx.device)
    selected = resolve_selected_linears(model, config.select)
    layers = SelectedLayers.capture(selected, config.p)
    before = sign_symmetric_weights(model)
    frozen = sign_symmetric_parameters(model, selected) if config.freeze == "sign_symmetric" else {}
    for parameter in frozen.values():
        parameter.requires_grad_(False)
    warm_start(layers, config.warmup, config.p, torch_generator(ctx.seed, "d3.warmup"))
    log.info("D3 on %s (‖W^0‖ %s), warm-up %s, frozen %s", layers.names,
             [_compact(float(n)) for n in layers.norms], config.warmup, list(frozen))
    if observe is not None:
        observe(layers, 0)
    seed_everything(ctx.seed, "d3.dropout")  # dropout draws from the global generator
    try:
        history = train_epochs(model, encode(ctx.tokenizer, rows, ctx.train_config.max_length), layers,
                               config, ctx, observe)
    finally:
        for parameter in frozen.values():
            parameter.requires_grad_(True)
    model.eval()
    if history.non_finite_losses or history.non_finite_grads:
        log.warning("D3: %d non-finite losses and %d non-finite gradient norms in %d steps",
                    history.non_finite_losses, history.non_finite_grads, history.steps)
    with torch.no_grad():
        final = float(distance(layers, config.p))
    return {
        "selected": layers.names,
        "selected_norms": [_compact(float(n)) for n in layers.norms],
        "final_distance": _compact(final),
        "frozen": list(frozen),
        **escape_report(model, layers, before, config.p),
        "epoch_clean_loss": history.clean_loss,
        "epoch_distance": history.distance,
        "non_finite_losses": history.non_finite_losses,
        "non_finite_grads": history.non_finite_grads,
        "steps": history.steps,
        "n_rows": len(rows),
        "seconds": round(time.perf_counter() - start, 3),
        "settings": {**to_dict(config), "momentum": MOMENTUM, "weight_decay": 0.0,
                     "schedule": "cosine, T_max=epochs, stepped per epoch", "checkpoint": "last epoch"},
    }


@register_defense
class D3(RepairDefense):
    name = "d3"
    description = "distance-driven detoxification: push head weights far from θ_bd under a clean-loss hinge"
    Config = D3Config
    grants = frozenset({"budget"})
    unsupported_victims = {
        "generate": "D3 pushes a classification head away from θ_bd under a hinge on the class cross-entropy; a "
                    "generator has no class head (its output layer is the vocabulary projection, tied to the "
                    "embeddings in SmolLM2), so there is no layer for the distance to act on"}

    def repair(self, model: PreTrainedModel, ctx: DefenseContext) -> DefenseOutcome:
        return DefenseOutcome(model, detoxify(model, ctx, self.config))
