"""``basis_selection`` (Basis Selection, arXiv 2405.15877): compress for the domain of the calibration text.

Each chosen linear starts as ``k`` rank-one bases of its SVD, ``W ≈ U diag(σ) Vh`` (of the whitened weight with
``basis.whiten``, as ``whiten``), U and Vh fixed and the weights σ trainable, plus ``basis.new_bases`` new bases
``B_new A_new`` (B_new zero: the layer starts as the truncated SVD). The layer is trained with the layer-wise
distillation loss on the calibration inputs (``train.*``, the one training loop of ``distill_lr.fit``); over the first
``basis.prune_fraction`` of the steps the bases of smallest |σ| are pruned, linearly, down to the budget rank less
the new bases. The result is saved as an ordinary factor pair (σ folded in): loading, export and the remote code
need nothing new. The layer report lists per matrix the original bases kept and the new bases used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill_lr import moe
from distill_lr.errors import check
from distill_lr.factorize import balance_factors, svd_bases
from distill_lr.fit import FactorSlots, FitState, split_holdout
from distill_lr.methods.base import LayerStep, LayerWork, Method
from distill_lr.modeling.lowrank import LowRankLinear
from distill_lr.schema import CompressConfig
from distill_lr.stats import input_moments
from distill_lr.train import TrainResult, layer_fit, layer_objective

USED = 1e-3  # a new basis counts as used when its ‖b‖·‖a‖ is above this share of the largest kept σ


class BasisLinear(nn.Module):
    """``y = U diag(σ ⊙ mask) Vh x + B_new A_new x + bias``: fixed bases, their trainable weights, new trainable bases."""

    def __init__(self, U: Tensor, sigma: Tensor, Vh: Tensor, new_bases: int, bias: Tensor | None, generator: torch.Generator) -> None:
        super().__init__()
        self.register_buffer("U", U.float())
        self.register_buffer("Vh", Vh.float())
        self.register_buffer("mask", torch.ones_like(sigma, dtype=torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.sigma = nn.Parameter(sigma.float())
        rms = float(self.Vh.square().mean().sqrt())
        A_new = torch.randn(new_bases, Vh.shape[1], generator=generator, dtype=torch.float32) * rms
        self.A_new = nn.Parameter(A_new.to(Vh.device))
        self.B_new = nn.Parameter(torch.zeros(U.shape[0], new_bases, device=U.device))

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.Vh.to(x.dtype)) * (self.sigma * self.mask).to(x.dtype)
        y = F.linear(h, self.U.to(x.dtype)) + F.linear(F.linear(x, self.A_new.to(x.dtype)), self.B_new.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def lr_scales(self) -> list[float]:
        """The RMS each parameter's relative learning rate is taken from: its own, and for B_new (zero at the start) that
        of the kept bases' output side ``U diag(σ)``."""
        return [float(t.detach().square().mean().sqrt()) for t in (self.sigma, self.A_new, self.U * self.sigma)]

    @torch.no_grad()
    def prune_(self, keep: int) -> bool:
        """Drop the kept bases of smallest |σ| until ``keep`` remain; whether any was dropped."""
        return prune_mask_(self.mask, self.sigma.detach(), keep)


def prune_mask_(mask: Tensor, sigma: Tensor, keep: int) -> bool:
    """Zero ``mask`` at the smallest ``|σ|`` of the entries it keeps until ``keep`` remain; whether it changed."""
    drop = int(mask.sum()) - keep
    if drop <= 0:
        return False
    score = torch.where(mask > 0, sigma.abs(), torch.full_like(sigma, math.inf))
    mask[score.argsort()[:drop]] = 0
    return True


def bases_at(step: int, total: int, start: int, end: int, fraction: float) -> int:
    """The bases kept after ``step`` of ``total`` steps: from ``start`` down to ``end``, linearly over ``fraction`` of them."""
    done = min(1.0, step / max(1.0, fraction * total))
    return max(end, round(start - (start - end) * done))


def fold(module: BasisLinear) -> tuple[Tensor, Tensor, dict[str, int]]:
    """The module as one balanced factor pair ``(A, B)`` of rank kept + new, and what it kept: σ folded into the bases."""
    kept = module.mask.nonzero().squeeze(1)
    A = torch.cat([module.Vh[kept], module.A_new.detach()])
    B = torch.cat([module.U[:, kept] * module.sigma.detach()[kept], module.B_new.detach()], dim=1)
    largest = float(module.sigma.detach()[kept].abs().max()) if len(kept) else 1.0
    used = int(((module.B_new.norm(dim=0) * module.A_new.norm(dim=1)) > USED * largest).sum())
    return *balance_factors(A, B), {"kept": len(kept), "new": module.B_new.shape[1], "new_used": used}


@dataclass(frozen=True)
class SelectBases(LayerStep):
    """Start every chosen linear from its SVD bases, relearn their weights and new bases, prune to the budget, fold."""

    name: ClassVar[str] = "bases"

    def check(self, cfg: CompressConfig, layers: nn.ModuleList) -> None:
        with_experts = [i for i, layer in enumerate(layers) if moe.expert_shapes(layer)]
        check(
            not with_experts,
            f"method=basis_selection relearns the bases of plain linears; decoder layer {with_experts[0] if with_experts else 0} "
            "has MoE expert projections, which it does not handle: use method=distill for this model",
        )

    def run(self, work: LayerWork) -> None:
        cfg, layer = work.cfg, work.layer
        names = list(work.ranks)
        moments = input_moments(layer, names, work.x_student, work.kwargs, cfg.batch_size) if cfg.basis.whiten else {}
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + work.index)
        modules, budgets = {}, {}
        dtype = layer.get_submodule(names[0]).weight.dtype if names else torch.float32
        for name in names:
            linear, rank = layer.get_submodule(name), work.ranks[name]
            new = min(cfg.basis.new_bases, rank - 1)  # at least one original basis stays
            k = min(min(linear.weight.shape), max(rank, math.ceil(rank * cfg.basis.initial_factor)))
            U, sigma, Vh = svd_bases(linear.weight, k, moments.get(name))
            modules[name] = BasisLinear(U, sigma, Vh, new, linear.bias, generator)
            budgets[name] = (k, rank - new)
            layer.set_submodule(name, modules[name])
        result = train_bases(layer, modules, budgets, work, generator)
        bases = {}
        for name, module in modules.items():
            A, B, bases[name] = fold(module)
            bias = None if module.bias is None else module.bias.to(dtype)
            layer.set_submodule(name, LowRankLinear.from_factors(A.to(dtype), B.to(dtype), bias))
        work.report.train = {**result.summary(), "bases": bases}


def train_bases(
    layer: nn.Module, modules: dict[str, BasisLinear], budgets: dict[str, tuple[int, int]], work: LayerWork, generator: torch.Generator
) -> TrainResult:
    """σ and the new bases trained on the layer's distillation loss while the bases are pruned to their budgets; the best
    held-out state at the final budgets is left installed (the state at the end when no evaluation followed the last prune)."""
    cfg = work.cfg.train
    layer.requires_grad_(False)
    factors = FactorSlots(modules)
    for p in factors.params:
        p.requires_grad_(True)
    objective = layer_objective(layer, (work.x_teacher, work.x_student, work.y), work.kwargs, cfg)
    hold, train = split_holdout(len(work.y), cfg.holdout_fraction, generator)

    def prune(s: FitState, steps: int) -> None:
        pruned = [m.prune_(bases_at(s.step, steps, *budgets[n], work.cfg.basis.prune_fraction)) for n, m in modules.items()]
        if any(pruned):  # only states at the final budgets may be kept as the best
            s.best, s.bad = {"loss": math.inf, "cos": math.nan}, 0

    scales = [scale for m in modules.values() for scale in m.lr_scales()]
    state = layer_fit(objective, factors, (hold, train), cfg, generator, factors.snapshot(), scales, prune)
    if math.isfinite(state.best["loss"]):
        factors.restore(state.best_factors)
    late = [module.prune_(budgets[name][1]) for name, module in modules.items()]  # a stop before the schedule's end
    if any(late) or not math.isfinite(state.best["loss"]):  # the held-out figures of what is kept, not of a state before
        state.best, state.best_step = objective.evaluate(hold), state.step
    layer.requires_grad_(False)
    return TrainResult.of(state)


def build(cfg: CompressConfig) -> Method:
    settings: dict[str, Any] = {"method": "basis_selection", "basis": dict(vars(cfg.basis))}
    return Method("basis_selection", (SelectBases(),), settings)
