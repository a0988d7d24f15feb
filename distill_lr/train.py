"""Feature distillation of one decoder layer: train its low-rank factors to reproduce the dense outputs.

The unit trained is the whole decoder layer (attention with softmax and rotary embeddings, MLP
with its activation, norms, MoE router); only the factors of its ``LowRankLinear`` modules and low-rank
expert projections move, each expert through the tokens the router really sends it. The target is
always Y = dense_layer(X_t); the student sees the teacher's input X_t, the compressed stack's
input X_s, or both (Lillama, Sy et al. 2025).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from distill_lr import distributed, moe
from distill_lr.fit import FactorSlots, FitState, fit, make_optimizer, schedule, split_holdout
from distill_lr.layerwise import LayerKwargs, call_layer, layer_device
from distill_lr.modeling.lowrank import ExpertLinears, LowRankLinear
from distill_lr.precondition import factor_grams, preconditioned
from distill_lr.schema import TrainConfig

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

    @classmethod
    def of(cls, state: FitState) -> TrainResult:
        first = math.nan if state.first_loss is None else state.first_loss
        last = state.curve[-1]["train_loss"] if state.curve else first
        final = sum(state.running) / len(state.running) if state.running else last
        best, init = state.best, state.init_holdout["loss"]
        kept = ("stopped_early", "rolled_back", "curve")
        return cls(first, final, init, best["loss"], best["cos"], state.step, state.best_step, **{k: getattr(state, k) for k in kept})

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def factor_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """The modules that hold trainable factors, by name: low-rank linears and low-rank expert projections."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, LowRankLinear) or (isinstance(m, ExpertLinears) and m.rank is not None)}


def training_autocast(device: torch.device, mode: str) -> torch.autocast:
    """bfloat16 autocast for the training steps on a GPU (``auto``) or wherever asked (``bfloat16``); float32 with ``float32``."""
    enabled = mode == "bfloat16" or (mode == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@dataclass
class LayerObjective:
    """The distillation loss of one layer's student on calibration sequences, against the dense outputs Y."""

    layer: nn.Module
    sources: list[torch.Tensor]  # the inputs the student sees (X_t, X_s or both): their losses add up
    y: torch.Tensor
    kwargs: LayerKwargs
    autocast: torch.autocast
    micro_batch: int
    eval_batch: int  # sequences per held-out batch
    name: str = "loss"

    def loss(self, idx: torch.Tensor, backward: bool) -> torch.Tensor:
        return self.batch(idx, backward)[0]

    def batch(self, idx: torch.Tensor, backward: bool, total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss over the input sources and mean cosine of the sequences ``idx``, on the device (no host wait).

        With ``backward`` the gradients are accumulated one micro-batch and one source at a time,
        so only one forward graph is alive at once (the same gradients as one big backward). ``total``: the
        sequences of the whole batch when ``idx`` is one process's part of it (the means are then its share).
        """
        device = layer_device(self.layer)
        loss = cos = torch.zeros((), device=device)
        for start in range(0, len(idx), self.micro_batch):
            part = idx[start : start + self.micro_batch]
            weight = len(part) / (total or len(idx))
            target = self.y[part].to(device, non_blocking=True)
            for x in self.sources:
                with self.autocast:
                    pred = call_layer(self.layer, x[part].to(device, non_blocking=True), self.kwargs)
                part_loss = distill_loss(target, pred) * weight
                if backward:
                    part_loss.backward()
                loss = loss + part_loss.detach()
                cos = cos + mean_cosine(target, pred.detach()) * weight / len(self.sources)
        return loss, cos

    def evaluate(self, idx: torch.Tensor) -> dict[str, float]:
        """Mean loss and cosine over ``idx`` (the held-out evaluation)."""
        return means(self.sums(idx))

    @torch.no_grad()
    def sums(self, idx: torch.Tensor) -> list[float]:
        """Summed loss and cosine over ``idx``, ``eval_batch`` sequences at a time, and the number of sequences."""
        loss_sum = cos_sum = 0.0
        with parametrize.cached():  # each factor's F' P once per evaluation, not once per batch
            for start in range(0, len(idx), self.eval_batch):
                part = idx[start : start + self.eval_batch]
                loss, cos = self.batch(part, backward=False)
                loss_sum += float(loss) * len(part)
                cos_sum += float(cos) * len(part)
        return [loss_sum, cos_sum, float(len(idx))]


def means(sums: list[float]) -> dict[str, float]:
    """``LayerObjective.sums`` as the held-out metrics."""
    loss_sum, cos_sum, count = sums
    return {"loss": loss_sum / count, "cos": cos_sum / count}


@dataclass
class ShardedObjective:
    """A layer's objective when the sequences are spread over processes (``distill_lr.distributed``).

    Every process is given the same global indices and computes the loss of the ones in its block, as its share of
    the batch's mean; the losses and the gradients are then summed over the processes in one message. So every
    process holds the gradient of the whole batch's mean loss, steps the same optimizer state to the same factors,
    and reads the same held-out metrics: every decision (best factors, early stop, divergence) is the same everywhere.
    """

    inner: LayerObjective
    block: tuple[int, int]  # this process's sequences, [start, end) of the global indices
    params: list[nn.Parameter]
    group: distributed.Group
    name: str = "loss"

    def local(self, idx: torch.Tensor) -> torch.Tensor:
        """The positions, in this process's caches, of the indices it owns."""
        return distributed.in_block(idx, self.block)

    def loss(self, idx: torch.Tensor, backward: bool) -> torch.Tensor:
        loss = self.inner.batch(self.local(idx), backward, total=len(idx))[0].float()
        grads = []
        if backward:
            for p in self.params:
                if p.grad is None:  # none of this process's sequences in the batch
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        self.group.sum_([*grads, loss], tag="step")  # counted apart: the bytes of one training step
        return loss

    def evaluate(self, idx: torch.Tensor) -> dict[str, float]:
        return means(self.group.sum_floats(self.inner.sums(self.local(idx))))


def layer_objective(
    layer: nn.Module, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], kwargs: LayerKwargs, cfg: TrainConfig
) -> LayerObjective:
    """The distillation objective of a layer from its ``(x_teacher, x_student, y)`` and the ``train.*`` settings."""
    x_teacher, x_student, y = data
    autocast = training_autocast(layer_device(layer), cfg.autocast)
    micro = cfg.micro_batch_size or cfg.batch_size
    return LayerObjective(layer, train_sources(cfg.inputs, x_teacher, x_student), y, kwargs, autocast, micro, cfg.batch_size)


def layer_fit(
    objective: LayerObjective | ShardedObjective,
    factors: FactorSlots,
    split: tuple[torch.Tensor, torch.Tensor],
    cfg: TrainConfig,
    generator: torch.Generator,
    init: list[torch.Tensor],
    scales: list[float] | None = None,
    on_step: Callable[[FitState, int], None] | None = None,
    bounds: list[int] | None = None,
) -> FitState:
    """``fit`` on one layer: the held-out ``split`` (hold, train), each epoch's order drawn from ``generator``, ``init``
    (a snapshot of the factors) the best so far; ``scales`` and ``on_step`` as ``fit.make_optimizer`` and ``fit.fit`` take them.
    ``bounds``: where each process's block of sequences starts (``sequence_bounds``): each batch takes an even share of each."""
    hold, train = split
    state = FitState.start(objective, hold, init)
    optimizer = make_optimizer(factors.params, cfg, schedule(cfg, len(train))[1], scales)

    def order(_epoch: int) -> torch.Tensor:
        drawn = train[torch.randperm(len(train), generator=generator)]
        return drawn if bounds is None else distributed.interleaved(drawn, bounds, cfg.batch_size)

    return fit(objective, factors, (train, hold, order), cfg, optimizer, state, on_step=on_step)


def sequence_bounds(local: int) -> list[int]:
    """Where each process's block of sequences starts in the global indices, and the total at the end (from each one's count)."""
    counts = distributed.group().gather_ints(local)
    return [sum(counts[:r]) for r in range(len(counts) + 1)]


def sharded(objective: LayerObjective, bounds: list[int], params: list[nn.Parameter]) -> LayerObjective | ShardedObjective:
    """The objective over every process's sequences (itself in a single process)."""
    g = distributed.group()
    return objective if g.world == 1 else ShardedObjective(objective, (bounds[g.rank], bounds[g.rank + 1]), params, g)


def train_sources(inputs: str, x_teacher: torch.Tensor, x_student: torch.Tensor) -> list[torch.Tensor]:
    """The inputs the student trains on (``train.inputs``); one when the two streams are the same (layer 0)."""
    if inputs == "teacher" or x_student is x_teacher:
        return [x_teacher]
    return [x_student] if inputs == "student" else [x_teacher, x_student]


def training_grams(
    layer: nn.Module, modules: dict[str, nn.Module], objective: LayerObjective | ShardedObjective, train: torch.Tensor, max_features: int
) -> dict[str, torch.Tensor]:
    """The preconditioner's Gram matrices over the training sequences, summed over the processes that hold them."""
    local, inner = (objective.local(train), objective.inner) if isinstance(objective, ShardedObjective) else (train, objective)
    none = len(local) == 0  # a process whose sequences are all held out: one of them shapes the matrices, zeroed below
    local = torch.zeros(1, dtype=torch.long) if none else local
    micro = inner.micro_batch
    batches = (x[local[i : i + micro]] for x in inner.sources for i in range(0, len(local), micro))
    grams = factor_grams(layer, modules, batches, inner.kwargs, inner.autocast, max_features)
    unique = list({id(g): g for g in grams.values()}.values())  # q/k/v share one matrix: summed once
    for gram in unique if none else []:
        gram.zero_()
    distributed.group().sum_(unique)
    return grams


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
    bounds = sequence_bounds(len(y))  # [0, len(y)] in a single process
    objective = sharded(layer_objective(layer, (x_teacher, x_student, y), kwargs, cfg), bounds, factors.params)
    hold, train = split_holdout(bounds[-1], cfg.holdout_fraction, generator)

    init_state = factors.snapshot()
    grams: dict[str, torch.Tensor] = {}
    if cfg.precondition:  # over the training sequences, as the steps will see them
        grams = training_grams(layer, modules, objective, train, cfg.precondition_max_features)
    with preconditioned(modules, grams, cfg.precondition_damping, frozen_experts or {}):
        del grams  # only the whitening matrices are needed from here on
        state = layer_fit(objective, factors, (hold, train), cfg, generator, init_state, bounds=bounds)
    factors.restore(state.best_factors)  # plain again: the snapshots hold the factors' own values
    for hook in freeze_hooks:
        hook.remove()
    for module in modules.values():
        module.to(work_dtype).requires_grad_(False)
    return TrainResult.of(state)
