"""``basis_selection`` (Basis Selection, arXiv 2405.15877): compress for the domain of the calibration text.

Each chosen linear starts as ``k`` rank-one bases of its SVD, ``W ≈ U diag(σ) Vh`` (of the whitened weight with
``basis.whiten``, as ``whiten``), U and Vh fixed and the weights σ trainable, plus ``basis.new_bases`` new bases
``B_new A_new`` (B_new zero: the layer starts as the truncated SVD). The layer is trained with the layer-wise
distillation loss on the calibration inputs (``train.*``, the one training loop of ``distill_lr.fit``); over the first
``basis.prune_fraction`` of the steps the bases of smallest |σ| are pruned, linearly, down to the budget rank less
the new bases. The result is saved as an ordinary factor pair (σ folded in): loading, export and the remote code
need nothing new. The layer report lists per matrix the original bases kept and the new bases used.

``basis.regime=end_to_end`` is the paper's setting, for models that fit: the layer loop writes each matrix's
starting bases untrained, and the end-to-end stage (``e2e.*``, ``e2e.loss=lm`` for the target text's own loss)
relearns σ and the new bases of the whole model at once and prunes them over its steps (``RelearnedBases``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
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
from distill_lr.report import LayerReport
from distill_lr.schema import CompressConfig
from distill_lr.stages.base import FinishedLayers
from distill_lr.stages.e2e import EndToEnd, Trainable
from distill_lr.stats import input_moments
from distill_lr.train import TrainResult, factor_modules, layer_fit, layer_objective

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

    @classmethod
    def from_low_rank(cls, module: LowRankLinear, new_bases: int, generator: torch.Generator) -> BasisLinear:
        """A factor pair that ``fold(balance=False)`` wrote, its rank-one terms ``b_i a_iᵀ`` as bases ``u_i a_iᵀ`` (``u_i``
        unit) with weights ``σ_i = ‖b_i‖``: the same product and the same σ, plus ``new_bases`` new bases at zero."""
        A, B = module.A.weight.detach().float(), module.B.weight.detach().float()
        b = B.norm(dim=0)
        return cls(B / b.clamp_min(1e-30), b, A, new_bases, module.B.bias, generator)

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


def fold(module: BasisLinear, balance: bool = True) -> tuple[Tensor, Tensor, dict[str, int]]:
    """The module as one factor pair ``(A, B)`` of rank kept + new, and what it kept: σ folded into the bases. Balanced
    (``balance_factors``) to be trained as factors; else ``B = U diag(σ)`` and ``A = Vh``, from which ``from_low_rank``
    takes the same bases and weights back (a whitened basis's σ is its output's RMS, a unit row of A would not be)."""
    kept = module.mask.nonzero().squeeze(1)
    A = torch.cat([module.Vh[kept], module.A_new.detach()])
    B = torch.cat([module.U[:, kept] * module.sigma.detach()[kept], module.B_new.detach()], dim=1)
    largest = float(module.sigma.detach()[kept].abs().max()) if len(kept) else 1.0
    used = int(((module.B_new.norm(dim=0) * module.A_new.norm(dim=1)) > USED * largest).sum())
    return *(balance_factors(A, B) if balance else (A, B)), {"kept": len(kept), "new": module.B_new.shape[1], "new_used": used}


def new_bases(rank: int, wanted: int) -> int:
    """The new bases a matrix of budget ``rank`` gets of the ``wanted`` (``basis.new_bases``): at least one original basis stays."""
    return min(wanted, rank - 1)


def prune_on_schedule(
    modules: dict[str, BasisLinear], budgets: dict[str, tuple[int, int]], fraction: float, s: FitState, total: int
) -> None:
    """After step ``s.step`` of ``total``: prune each module to its scheduled bases (``budgets``: start, end). A prune
    voids the best held-out state so far: only states at the final budgets may be kept."""
    pruned = [m.prune_(bases_at(s.step, total, *budgets[n], fraction)) for n, m in modules.items()]
    if any(pruned):
        s.best, s.bad = {k: math.inf if k == "loss" else math.nan for k in s.best}, 0


def prune_to_budget(modules: dict[str, BasisLinear], budgets: dict[str, tuple[int, int]]) -> bool:
    """Prune every module to its final budget (a fit stopped before its schedule's end); whether any changed."""
    return any([m.prune_(budgets[n][1]) for n, m in modules.items()])


@dataclass(frozen=True)
class SelectBases(LayerStep):
    """Start every chosen linear from its SVD bases, relearn their weights and new bases, prune to the budget, fold.
    With ``basis.regime=end_to_end`` the layer keeps all its starting bases untrained (the end-to-end stage selects)."""

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
        layerwise = cfg.basis.regime == "layerwise"
        names = list(work.ranks)
        moments = input_moments(layer, names, work.x_student, work.kwargs, cfg.batch_size) if cfg.basis.whiten else {}
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + work.index)
        modules, budgets = {}, {}
        dtype = layer.get_submodule(names[0]).weight.dtype if names else torch.float32
        for name in names:
            linear, rank = layer.get_submodule(name), work.ranks[name]
            new = new_bases(rank, cfg.basis.new_bases) if layerwise else 0
            k = min(min(linear.weight.shape), max(rank, math.ceil(rank * cfg.basis.initial_factor)))
            U, sigma, Vh = svd_bases(linear.weight, k, moments.get(name))
            modules[name] = BasisLinear(U, sigma, Vh, new, linear.bias, generator)
            budgets[name] = (k, rank - new)
            layer.set_submodule(name, modules[name])
        if layerwise:
            work.report.train = train_bases(layer, modules, budgets, work, generator).summary()
        work.report.bases = {}
        for name, module in modules.items():  # end to end: unbalanced, so that the stage gets σ back
            A, B, work.report.bases[name] = fold(module, balance=layerwise)
            bias = None if module.bias is None else module.bias.to(dtype)
            layer.set_submodule(name, LowRankLinear.from_factors(A.to(dtype), B.to(dtype), bias))


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
    prune = partial(prune_on_schedule, modules, budgets, work.cfg.basis.prune_fraction)
    scales = [scale for m in modules.values() for scale in m.lr_scales()]
    state = layer_fit(objective, factors, (hold, train), cfg, generator, factors.snapshot(), scales, prune)
    if math.isfinite(state.best["loss"]):
        factors.restore(state.best_factors)
    if prune_to_budget(modules, budgets) or not math.isfinite(state.best["loss"]):  # the held-out figures of what is kept
        state.best, state.best_step = objective.evaluate(hold), state.step
    layer.requires_grad_(False)
    return TrainResult.of(state)


class RelearnedBases(Trainable):
    """``basis.regime=end_to_end`` (the paper's setting): in the end-to-end stage, each factor pair the layer loop wrote
    (a matrix's starting bases at their SVD weights) becomes fixed rank-one bases with trainable weights σ, plus new
    bases; σ is pruned to each matrix's budget over ``basis.prune_fraction`` of the stage's steps, then folded."""

    def __init__(self, cfg: CompressConfig) -> None:
        super().__init__(cfg)
        self.modules: dict[str, BasisLinear] = {}
        self.budgets: dict[str, tuple[int, int]] = {}

    def install(self, run: FinishedLayers) -> tuple[dict[str, nn.Module], list[float] | None]:
        generator = torch.Generator().manual_seed(self.cfg.seed)
        for i, layer in enumerate(run.layers):
            for name, module in factor_modules(layer).items():
                rank = run.ranks[f"{run.prefix}{i}.{name}"]
                new = new_bases(rank, self.cfg.basis.new_bases)
                basis = BasisLinear.from_low_rank(module, new, generator)
                layer.set_submodule(name, basis)
                self.modules[f"{i}.{name}"], self.budgets[f"{i}.{name}"] = basis, (basis.sigma.numel(), rank - new)
        return dict(self.modules), [scale for m in self.modules.values() for scale in m.lr_scales()]

    def on_step(self, state: FitState, total: int) -> None:
        prune_on_schedule(self.modules, self.budgets, self.cfg.basis.prune_fraction, state, total)

    def state(self) -> dict[str, Any]:
        return {"masks": [m.mask.detach().cpu().clone() for m in self.modules.values()]}

    def load(self, saved: dict[str, Any]) -> None:
        for module, mask in zip(self.modules.values(), saved["masks"], strict=True):
            module.mask.copy_(mask)

    def finish(self, run: FinishedLayers) -> tuple[dict[str, Any], bool]:
        changed = prune_to_budget(self.modules, self.budgets)
        bases = {}
        for key, module in self.modules.items():
            i, name = key.split(".", 1)
            A, B, bases[key] = fold(module)
            run.layers[int(i)].set_submodule(name, LowRankLinear.from_factors(A, B, module.bias))
        return {"bases": bases}, changed

    def layer_record(self, index: int, record: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
        mine = {key.split(".", 1)[1]: v for key, v in added["bases"].items() if key.split(".", 1)[0] == str(index)}
        return {**record, "bases": mine}


@dataclass(frozen=True)
class BasisMethod(Method):
    """A saved layer's factor pairs have the rank its report records (the starting bases, before an end-to-end stage
    has selected them), not always the plan's."""

    def prepare_resumed(self, layer: nn.Module, ranks: dict[str, int], report: LayerReport) -> None:
        super().prepare_resumed(layer, {n: b["kept"] + b["new"] for n, b in (report.bases or {}).items()}, report)


def build(cfg: CompressConfig) -> Method:
    settings: dict[str, Any] = {"method": "basis_selection", "basis": dict(vars(cfg.basis))}
    if cfg.basis.regime == "layerwise":
        return BasisMethod("basis_selection", (SelectBases(),), settings)
    check(
        cfg.e2e.enabled,
        "basis.regime=end_to_end relearns and prunes the bases in the end-to-end stage: set e2e.enabled=true (e2e.loss=lm for "
        "the target text's own loss), or basis.regime=layerwise",
    )
    check(
        cfg.e2e.optimizer != "adafactor",
        "basis.regime=end_to_end trains new bases that start at zero, which Adafactor's steps (relative to a parameter's own "
        "size) cannot move: use e2e.optimizer=adamw",
    )
    return BasisMethod("basis_selection", (SelectBases(),), settings, stages=(EndToEnd(RelearnedBases),))
