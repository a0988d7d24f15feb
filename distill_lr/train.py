"""Feature distillation of one decoder layer: train its low-rank factors to reproduce the dense outputs.

The unit trained is the whole decoder layer (attention with softmax and rotary embeddings, MLP
with its activation, norms, MoE router); only the factors of its ``LowRankLinear`` modules and low-rank
expert projections move, each expert through the tokens the router really sends it. The target is
always Y = dense_layer(X_t); the student sees the teacher's input X_t, the compressed stack's
input X_s, or both (Lillama, Sy et al. 2025).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from distill_lr import moe
from distill_lr.layerwise import LayerKwargs, SharedInputs, call_layer, hooks_removed, layer_device
from distill_lr.modeling.lowrank import ExpertLinears, LowRankLinear
from distill_lr.schema import E2EConfig, TrainConfig

MIN_LOSS = -math.log(1 / (1 + math.exp(-1.0)))  # -log sigmoid(1): the loss of a perfect student


def distill_loss(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of ``(1/D)·‖y − ŷ‖₁ − log σ(cos(y, ŷ))``; ``mask`` (1 = real token) drops padding.

    The L1 term alone was unstable in the Lillama experiments; the cosine term keeps the direction.
    """
    target, pred = target.float(), pred.float()
    per_token = (target - pred).abs().mean(-1) - F.logsigmoid(F.cosine_similarity(target, pred, dim=-1, eps=1e-8))
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def mean_cosine(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(target.float(), pred.float(), dim=-1, eps=1e-8).mean()


def lr_factor(step: int, total: int, warmup_fraction: float, min_lr_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
    warmup = int(total * warmup_fraction)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    """What happened while training one layer; ``summary()`` goes into the report."""

    init_loss: float
    final_loss: float
    init_holdout: float
    best_holdout: float
    holdout_cos: float
    steps: int
    best_step: int
    stopped_early: bool = False
    rolled_back: str | None = None
    curve: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def factor_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """The modules that hold trainable factors, by name: low-rank linears and low-rank expert projections."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, LowRankLinear) or (isinstance(m, ExpertLinears) and m.rank is not None)}


def param_groups(params: list[nn.Parameter], lr: float, relative: bool) -> list[dict[str, Any]]:
    """One optimizer group per factor; ``relative``: its learning rate is ``lr`` times the factor's RMS at init.

    Adam moves every entry by about lr per step whatever the gradient's scale, so an absolute lr that
    suits one model moves the factors of a model with 10x smaller weights by 10x more
    relative to their size. A relative lr makes one setting mean the same step for every model and module.
    """
    if not relative:
        return [{"params": params, "lr": lr}]
    return [{"params": [p], "lr": lr * float(p.detach().float().square().mean().sqrt())} for p in params]


def inverse_sqrt(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``P = (G + δI)^(-1/2)`` and ``P⁻¹`` of a Gram matrix ``(..., n, n)``, with ``δ = damping ×`` its mean eigenvalue.

    The damping is relative, so P depends on G's direction only: with the relative learning rate the
    overall scale of a factor's coordinates does not matter. An all-zero G gives the identity.
    """
    gram = gram.double()
    delta = damping * gram.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues = torch.where(delta > 0, eigenvalues.clamp_min(0) + delta, torch.ones_like(eigenvalues))
    P = (vectors * eigenvalues.rsqrt().unsqueeze(-2)) @ vectors.mT
    P_inv = (vectors * eigenvalues.sqrt().unsqueeze(-2)) @ vectors.mT
    return P.float(), P_inv.float()


class Whitened(nn.Module):
    """Parametrization ``F = F' P`` of a factor F whose input has Gram matrix G, with ``P = inverse_sqrt(G)``.

    The optimizer moves F', the factor in coordinates where its input is white. Adam normalises each
    coordinate's step, which cannot undo correlations between input features; in white coordinates
    there are none, so every direction of the input is fitted at the same pace (a Gauss–Newton-like
    preconditioner for the input side, fixed for the layer's training). Only the input side: doing the
    same for B (on ``A x``) measured no better (docs/measurements.md).
    ``preconditioned`` sets ``F' = F P⁻¹`` once, so only P is kept while training. Under bfloat16
    autocast the product is taken in bf16 like the layer's matmuls, which cast F to bf16 anyway: it
    costs r·n² per factor and step.
    """

    def __init__(self, P: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("P", P)

    def forward(self, factor: torch.Tensor) -> torch.Tensor:
        return factor @ self.P


def training_autocast(device: torch.device, mode: str) -> torch.autocast:
    """bfloat16 autocast for the training steps on a GPU (``auto``) or wherever asked (``bfloat16``); float32 with ``float32``."""
    enabled = mode == "bfloat16" or (mode == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _input_factor(module: nn.Module) -> tuple[nn.Module, str]:
    """(owner, tensor name) of the factor that reads the input: A of a low-rank linear or expert projection."""
    return (module.A, "weight") if isinstance(module, LowRankLinear) else (module, "A")


@torch.no_grad()
def factor_grams(
    layer: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[torch.Tensor],
    kwargs: LayerKwargs,
    autocast: Any,
    max_features: int,
) -> dict[str, torch.Tensor]:
    """``{module: Gram matrix}`` of each low-rank module's input over ``batches``: ``(n, n)``, or ``(E, n, n)`` per expert.

    Linears that read the same tensor (q/k/v) share one matrix, computed once; an input wider than
    ``max_features`` gets none (its Gram matrix and eigendecomposition would cost more than they save).
    Padding rows of grouped expert tokens are zero and add nothing.
    """
    device = layer_device(layer)
    grams: dict[str, torch.Tensor] = {}
    shared = SharedInputs(layer)

    def record(name: str, x: torch.Tensor) -> None:
        if x.shape[-1] > max_features:
            return
        first = shared.first_reader(name, x)
        if first is not None:
            grams[name] = grams[first]
            return
        t = x.float() if isinstance(modules[name], ExpertLinears) else x.reshape(-1, x.shape[-1]).float()
        with torch.autocast(t.device.type, enabled=False):  # a float32 sum, not bf16, under the training's autocast
            gram = t.mT @ t
        grams[name] = grams[name] + gram if name in grams else gram

    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: record(n, args[0])) for n, m in modules.items()]
    with hooks_removed([*hooks, shared.hook]):
        for batch in batches:
            with autocast:
                call_layer(layer, batch.to(device, non_blocking=True), kwargs)
    return grams


@contextmanager
def preconditioned(
    modules: dict[str, nn.Module], grams: dict[str, torch.Tensor], damping: float, frozen: dict[str, list[int]]
) -> Iterator[None]:
    """Train each factor through ``Whitened`` while inside; on exit the factors hold their values in plain form.

    Frozen experts get the identity, so their factors stay bit-for-bit equal to their initialisation.
    """
    registered: list[tuple[nn.Module, str]] = []
    whitening: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one eigendecomposition per shared Gram matrix
    try:
        for name, gram in grams.items():
            if id(gram) not in whitening:
                whitening[id(gram)] = inverse_sqrt(gram, damping)
            P, P_inv = whitening[id(gram)]
            experts = frozen.get(name.rpartition(".")[0])
            if isinstance(modules[name], ExpertLinears) and experts:
                eye = torch.eye(P.shape[-1], device=P.device)
                P, P_inv = P.clone(), P_inv.clone()
                P[experts], P_inv[experts] = eye, eye
            owner, tensor_name = _input_factor(modules[name])
            factor = getattr(owner, tensor_name).detach()
            parametrize.register_parametrization(owner, tensor_name, Whitened(P))
            registered.append((owner, tensor_name))
            with torch.no_grad():
                owner.parametrizations[tensor_name].original.copy_(factor @ P_inv)  # F' = F P⁻¹; P⁻¹ is then dropped
        del grams, whitening  # the caller drops its reference too: only the parametrizations keep P
        yield
    finally:
        for owner, tensor_name in registered:
            parametrize.remove_parametrizations(owner, tensor_name, leave_parametrized=True)


@dataclass
class LayerObjective:
    """The distillation loss of one layer's student on calibration sequences, against the dense outputs Y."""

    layer: nn.Module
    sources: list[torch.Tensor]  # the inputs the student sees (X_t, X_s or both): their losses add up
    y: torch.Tensor
    kwargs: LayerKwargs
    autocast: torch.autocast
    micro_batch: int

    def batch(self, idx: torch.Tensor, backward: bool) -> tuple[float, float]:
        """Summed loss over the input sources and mean cosine of the sequences ``idx``.

        With ``backward`` the gradients are accumulated one micro-batch and one source at a time,
        so only one forward graph is alive at once (the same gradients as one big backward).
        """
        device = layer_device(self.layer)
        loss, cos = 0.0, 0.0
        for start in range(0, len(idx), self.micro_batch):
            part = idx[start : start + self.micro_batch]
            weight = len(part) / len(idx)
            target = self.y[part].to(device, non_blocking=True)
            for x in self.sources:
                with self.autocast:
                    pred = call_layer(self.layer, x[part].to(device, non_blocking=True), self.kwargs)
                part_loss = distill_loss(target, pred) * weight
                if backward:
                    part_loss.backward()
                loss += float(part_loss.detach())
                cos += float(mean_cosine(target, pred.detach())) * weight / len(self.sources)
        return loss, cos

    @torch.no_grad()
    def mean(self, idx: torch.Tensor, batch_size: int) -> tuple[float, float]:
        """Mean loss and cosine over ``idx``, ``batch_size`` sequences at a time (the held-out evaluation)."""
        losses, coses = [], []
        with parametrize.cached():  # each factor's F' P once per evaluation, not once per batch
            for start in range(0, len(idx), batch_size):
                loss, cos = self.batch(idx[start : start + batch_size], backward=False)
                losses.append(loss)
                coses.append(cos)
        return sum(losses) / len(losses), sum(coses) / len(coses)


class FactorSlots:
    """The trainable factors of a layer, read and written by (owner, name) so that a parametrization in between is seen."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.slots = [(owner, name) for m in modules.values() for owner in m.modules() for name, _ in owner.named_parameters(recurse=False)]
        self.params = [getattr(owner, name) for owner, name in self.slots]  # the same objects once preconditioned (F' in F = F' P)

    def snapshot(self, into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The factors copied to host memory (the GPU keeps room for training), into ``into`` when given.

        On a GPU the buffers are pinned and the copies asynchronous: they run in stream order, before the
        next optimizer step, and a best-so-far buffer is reused at every improvement instead of allocated.
        """
        if into is None:
            into = [torch.empty(p.shape, dtype=p.dtype, pin_memory=p.is_cuda) for p in self.params]
        for buffer, (owner, name) in zip(into, self.slots, strict=True):
            buffer.copy_(getattr(owner, name).detach(), non_blocking=True)  # through the parametrization, when preconditioned
        return into

    @torch.no_grad()
    def restore(self, state: list[torch.Tensor]) -> None:
        """Install a snapshot; outside the parametrizations, where the parameters hold the factors' own values."""
        for p, saved in zip(self.params, state, strict=True):
            p.copy_(saved, non_blocking=True)


def split_holdout(n: int, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out, training) sequence indices on the host: the caches may live on the host or on disk."""
    order = torch.randperm(n, generator=generator)
    n_hold = max(1, math.ceil(n * fraction))
    hold, train = order[:n_hold], order[n_hold:]
    return hold, train if len(train) else hold


def distill_layer(
    layer: nn.Module,
    x_teacher: torch.Tensor,
    x_student: torch.Tensor,
    y: torch.Tensor,
    kwargs: LayerKwargs,
    cfg: TrainConfig,
    seed: int,
    frozen_experts: dict[str, list[int]] | None = None,
) -> TrainResult:
    """Train the factors in place and leave the ones with the best held-out loss installed.

    ``frozen_experts`` names, per experts module, experts whose factors keep their initialisation
    (with weight decay 0 they do not move at all).
    """
    generator = torch.Generator().manual_seed(seed)
    modules = factor_modules(layer)
    work_dtype = next(p.dtype for m in modules.values() for p in m.parameters())
    layer.requires_grad_(False)
    for module in modules.values():
        module.float().requires_grad_(True)  # float32 master weights; bf16 compute under train.autocast
    factors = FactorSlots(modules)
    freeze_hooks = moe.freeze_experts(modules, frozen_experts or {})
    if cfg.inputs == "teacher" or x_student is x_teacher:
        sources = [x_teacher]
    else:
        sources = [x_student] if cfg.inputs == "student" else [x_teacher, x_student]
    autocast = training_autocast(layer_device(layer), cfg.autocast)
    objective = LayerObjective(layer, sources, y, kwargs, autocast, cfg.micro_batch_size or cfg.batch_size)
    hold, train = split_holdout(len(y), cfg.holdout_fraction, generator)

    init_state = factors.snapshot()
    grams: dict[str, torch.Tensor] = {}
    if cfg.precondition:  # over the training sequences, as the steps will see them
        micro = objective.micro_batch
        batches = (x[train[i : i + micro]] for x in sources for i in range(0, len(train), micro))
        grams = factor_grams(layer, modules, batches, kwargs, autocast, cfg.precondition_max_features)
    with preconditioned(modules, grams, cfg.precondition_damping, frozen_experts or {}):
        del grams  # only the whitening matrices are needed from here on
        result, best_state = _optimise(objective, factors, init_state, hold, train, cfg, generator)
    factors.restore(best_state)  # plain again: the snapshots hold the factors' own values
    for hook in freeze_hooks:
        hook.remove()
    for module in modules.values():
        module.to(work_dtype).requires_grad_(False)
    return result


def schedule(cfg: TrainConfig | E2EConfig, n_train: int) -> tuple[int, int, int]:
    """(steps per epoch, total steps, steps between held-out evaluations) for ``n_train`` training sequences."""
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    return steps_per_epoch, total, max(1, steps_per_epoch // cfg.evals_per_epoch)


def adamw(
    params: list[nn.Parameter], cfg: TrainConfig | E2EConfig, total: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the factors with linear warm-up and cosine decay over ``total`` steps."""
    optimizer = torch.optim.AdamW(param_groups(params, cfg.lr, cfg.relative_lr), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.warmup_fraction, cfg.min_lr_ratio))


def _optimise(
    objective: LayerObjective,
    factors: FactorSlots,
    init_state: list[torch.Tensor],
    hold: torch.Tensor,
    train: torch.Tensor,
    cfg: TrainConfig,
    generator: torch.Generator,
) -> tuple[TrainResult, list[torch.Tensor]]:
    """AdamW with warm-up and cosine decay; held-out evaluations pick the best factors and stop early.

    Returns what happened and the best snapshot (``init_state`` itself when nothing beat it or the loss diverged).
    """
    steps_per_epoch, total, eval_every = schedule(cfg, len(train))
    best_state = init_state
    init_holdout, init_cos = objective.mean(hold, cfg.batch_size)
    best, best_cos, best_step, bad = init_holdout, init_cos, 0, 0
    params = factors.params
    optimizer, scheduler = adamw(params, cfg, total)
    nan = float("nan")
    result = TrainResult(nan, nan, init_holdout=init_holdout, best_holdout=best, holdout_cos=best_cos, steps=0, best_step=0)
    running: list[float] = []
    perm = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(total), desc="  train", unit="step", leave=False)
    for step in bar:
        pos = step % steps_per_epoch
        if pos == 0:
            perm = train[torch.randperm(len(train), generator=generator)]
        optimizer.zero_grad(set_to_none=True)
        value, _ = objective.batch(perm[pos * cfg.batch_size : (pos + 1) * cfg.batch_size], backward=True)
        if step == 0:
            result.init_loss = value
        if not math.isfinite(value) or value > cfg.divergence_factor * result.init_loss:
            result.rolled_back = f"loss {value:.4g} at step {step} (initial {result.init_loss:.4g})"
            best_state, best, best_cos, best_step = init_state, init_holdout, init_cos, 0
            warnings.warn(f"training diverged ({result.rolled_back}); the layer keeps its initialisation", stacklevel=3)
            break
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        running.append(value)
        result.steps = step + 1
        bar.set_postfix(loss=f"{value:.4f}")
        if (step + 1) % eval_every == 0 or step + 1 == total:
            held, cos = objective.mean(hold, cfg.batch_size)
            result.curve.append({"step": step + 1, "train_loss": sum(running) / len(running), "holdout_loss": held, "holdout_cos": cos})
            running = []
            if held < best:
                best, best_cos, best_step, bad = held, cos, step + 1, 0
                best_state = factors.snapshot(None if best_state is init_state else best_state)
            else:
                bad += 1
                if bad >= cfg.patience:
                    result.stopped_early = True
                    break
    bar.close()
    result.final_loss = sum(running) / len(running) if running else (result.curve[-1]["train_loss"] if result.curve else result.init_loss)
    result.best_holdout, result.holdout_cos, result.best_step = best, best_cos, best_step
    return result, best_state
