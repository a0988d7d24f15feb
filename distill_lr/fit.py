"""One training loop for low-rank factors, shared by the layer-wise distillation and the end-to-end stage.

AdamW (one group per factor, its learning rate relative to the factor's RMS) or Adafactor, linear warm-up then cosine
decay, gradient clipping; held-out evaluations keep the best factors and stop early after ``patience``
evaluations without improvement; a step whose loss is not finite or exceeds ``divergence_factor`` times the
first one stops the loop, and the caller installs the best held-out factors so far. The loop's state
(``FitState``) is what a resumable caller saves at each evaluation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from distill_lr.distributed import local
from distill_lr.schema import E2EConfig, TrainConfig

Settings = TrainConfig | E2EConfig  # the optimisation fields they share (schema.check_optimisation)


class Objective(Protocol):
    """What ``fit`` trains against. ``name`` labels the curve (``train_<name>``, ``holdout_<name>``)."""

    name: str

    def loss(self, idx: torch.Tensor, backward: bool) -> torch.Tensor:
        """Mean loss of the sequences ``idx``, a 0-dim tensor (left on the device); with ``backward`` their gradients accumulate."""
        ...

    def evaluate(self, idx: torch.Tensor) -> dict[str, float]:
        """Held-out metrics of the sequences ``idx``: ``loss`` picks the best factors, the others are recorded beside it."""
        ...


def lr_factor(step: int, total: int, warmup_fraction: float, min_lr_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
    warmup = int(total * warmup_fraction)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(params: list[nn.Parameter], lr: float, relative: bool, scales: list[float] | None = None) -> list[dict[str, Any]]:
    """One optimizer group per factor; ``relative``: its learning rate is ``lr`` times the factor's RMS at init (or
    ``scales``, one per parameter, for parameters that start at zero).

    Adam moves every entry by about lr per step whatever the gradient's scale, so an absolute lr that
    suits one model moves the factors of a model with 10x smaller weights by 10x more
    relative to their size. A relative lr makes one setting mean the same step for every model and module.
    """
    if not relative:
        return [{"params": params, "lr": lr}]
    if scales is None:
        scales = [float(p.detach().float().square().mean().sqrt()) for p in params]
    return [{"params": [p], "lr": lr * scale} for p, scale in zip(params, scales, strict=True)]


class FactorSlots:
    """The trainable factors of a layer, read and written by (owner, name) so that a parametrization in between is seen;
    a factor sharded over processes (FSDP) is read and written as this process's part of it."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.slots = [(owner, name) for m in modules.values() for owner in m.modules() for name, _ in owner.named_parameters(recurse=False)]
        self.params = [getattr(owner, name) for owner, name in self.slots]  # the same objects once preconditioned (F' in F = F' P)

    def snapshot(self, into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The factors copied to host memory (the GPU keeps room for training), into ``into`` when given.

        On a GPU the buffers are pinned and the copies asynchronous: they run in stream order, before the
        next optimizer step, and a best-so-far buffer is reused at every improvement instead of allocated.
        """
        if into is None:
            into = [torch.empty(local(p).shape, dtype=p.dtype, pin_memory=p.is_cuda) for p in self.params]
        for buffer, (owner, name) in zip(into, self.slots, strict=True):
            buffer.copy_(local(getattr(owner, name).detach()), non_blocking=True)  # through the parametrization, when preconditioned
        return into

    @torch.no_grad()
    def restore(self, state: list[torch.Tensor]) -> None:
        """Install a snapshot; outside the parametrizations, where the parameters hold the factors' own values."""
        for p, saved in zip(self.params, state, strict=True):
            local(p).copy_(saved, non_blocking=True)


def split_holdout(n: int, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out, training) sequence indices on the host: the caches may live on the host or on disk."""
    order = torch.randperm(n, generator=generator)
    n_hold = max(1, math.ceil(n * fraction))
    hold, train = order[:n_hold], order[n_hold:]
    return hold, train if len(train) else hold


def schedule(cfg: TrainConfig | E2EConfig, n_train: int) -> tuple[int, int, int]:
    """(steps per epoch, total steps, steps between held-out evaluations) for ``n_train`` training sequences."""
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    return steps_per_epoch, total, max(1, steps_per_epoch // cfg.evals_per_epoch)


def make_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig | E2EConfig, total: int, scales: list[float] | None = None, kind: str = "adamw"
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer over the factors with linear warm-up and cosine decay over ``total`` steps.

    ``adamw``: one group per factor (``scales``: see ``param_groups``); 12 bytes of state per parameter with its gradient.
    ``adafactor``: factored second moments and no first moment, 4 bytes per parameter (the gradient); its steps are
    already relative to each parameter's current RMS (Adafactor's parameter scaling), so it takes the plain ``lr``.
    """
    if kind == "adafactor":
        if scales is not None:  # a method's parameters that start at zero (methods refuse the pair in their config checks)
            raise ValueError("adafactor scales each step by the parameter's own RMS: it takes no per-parameter scales")
        optimizer: torch.optim.Optimizer = torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(param_groups(params, cfg.lr, cfg.relative_lr, scales), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.warmup_fraction, cfg.min_lr_ratio))


@dataclass
class FitState:
    """Where a fit stands: its held-out metrics at the start and at their best, the best factors, the curve."""

    init_holdout: dict[str, float]
    best: dict[str, float]
    best_factors: list[torch.Tensor]  # host copies (``FactorSlots.snapshot``)
    step: int = 0  # optimizer steps taken
    best_step: int = 0
    bad: int = 0  # evaluations since the last improvement
    first_loss: float | None = None  # the divergence test's reference
    rolled_back: str | None = None
    stopped_early: bool = False
    curve: list[dict[str, float]] = field(default_factory=list)
    running: list[float] = field(default_factory=list)  # training losses since the last evaluation

    @classmethod
    def start(cls, objective: Objective, hold: torch.Tensor, factors: list[torch.Tensor]) -> FitState:
        """Before the first step: ``factors`` (a snapshot of the initial ones) are the best so far."""
        metrics = objective.evaluate(hold)
        return cls(init_holdout=metrics, best=metrics, best_factors=factors)


def fit(
    objective: Objective,
    factors: FactorSlots,
    data: tuple[torch.Tensor, torch.Tensor, Callable[[int], torch.Tensor]],
    cfg: Settings,
    optimizer: tuple[torch.optim.Optimizer, Any],
    state: FitState,
    on_eval: Callable[[FitState], None] | None = None,
    desc: str = "  train",
    on_step: Callable[[FitState, int], None] | None = None,
) -> FitState:
    """Train from ``state.step`` to the end of the schedule, an early stop or a divergence; ``state`` is updated in place.

    The losses stay on the device and are read on the host (a wait for a GPU) only every ``cfg.check_every`` steps,
    before each evaluation and at the first step: a loss that is not finite or diverges stops the loop at the next
    read, before that step's update.

    ``data``: the training and held-out sequence indices, and each epoch's order of the training ones (called at the
    start of every epoch, and at the first step of a resumed one). ``on_eval`` runs after each held-out evaluation,
    ``on_step(state, total)`` after each optimizer step (a schedule of the caller's, e.g. pruning).
    The best factors are in ``state.best_factors``: the caller installs them (``FactorSlots.restore``).
    """
    train, hold, order = data
    (opt, scheduler), params = optimizer, factors.params
    steps_per_epoch, total, eval_every = schedule(cfg, len(train))
    perm = torch.empty(0, dtype=torch.long)
    unread: list[torch.Tensor] = []  # losses of the steps since the last read
    bar = tqdm(range(state.step, total), desc=desc, unit="step", leave=False, initial=state.step, total=total)
    for step in bar:
        epoch, pos = divmod(step, steps_per_epoch)
        if pos == 0 or len(perm) == 0:
            perm = order(epoch)
        opt.zero_grad(set_to_none=True)
        unread.append(objective.loss(perm[pos * cfg.batch_size : (pos + 1) * cfg.batch_size], backward=True))
        evaluating = (step + 1) % eval_every == 0 or step + 1 == total
        if evaluating or state.first_loss is None or (step + 1) % cfg.check_every == 0:
            values, first_step, unread = torch.stack(unread).tolist(), step + 1 - len(unread), []
            if _diverged(state, values, (first_step, cfg.divergence_factor), desc):
                break
            state.running += values
            bar.set_postfix({objective.name: f"{values[-1]:.4f}"})
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        scheduler.step()
        state.step = step + 1
        if on_step is not None:
            on_step(state, total)
        if evaluating and _evaluate(objective, factors, hold, state, cfg.patience, on_eval):
            break
    bar.close()
    return state


def _diverged(state: FitState, values: list[float], where: tuple[int, float], desc: str) -> bool:
    """Whether one of the losses just read (of the steps from ``where[0]`` on) is not finite or exceeds ``where[1]`` times
    the first loss."""
    (first_step, factor), state.first_loss = where, values[0] if state.first_loss is None else state.first_loss
    for step, value in enumerate(values, first_step):
        if not math.isfinite(value) or value > factor * state.first_loss:
            state.rolled_back = f"loss {value:.4g} at step {step} (first {state.first_loss:.4g})"
            warnings.warn(f"{desc.strip()} diverged ({state.rolled_back}): the best held-out factors so far are kept", stacklevel=4)
            return True
    return False


def _evaluate(
    objective: Objective,
    factors: FactorSlots,
    hold: torch.Tensor,
    state: FitState,
    patience: int,
    on_eval: Callable[[FitState], None] | None,
) -> bool:
    """One held-out evaluation into ``state``: the curve, the best factors; True when patience has run out."""
    metrics = objective.evaluate(hold)
    point = {"step": state.step, f"train_{objective.name}": sum(state.running) / max(1, len(state.running))}
    point |= {f"holdout_{objective.name}": metrics["loss"], **{f"holdout_{k}": v for k, v in metrics.items() if k != "loss"}}
    state.curve.append(point)
    state.running = []
    if metrics["loss"] < state.best["loss"]:
        state.best, state.best_step, state.bad = metrics, state.step, 0
        state.best_factors = factors.snapshot(state.best_factors)
    else:
        state.bad += 1
        state.stopped_early = state.bad >= patience
    if on_eval is not None:
        on_eval(state)
    return state.stopped_early
