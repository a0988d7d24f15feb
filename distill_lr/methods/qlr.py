"""``qlr``: each weight quantized (``quant.*``), plus a low-rank correction of its error: ``W ≈ Q(W) + B A``
(LQER, CALDERA). The correction is the whitened SVD of the residual ``W − Q(W)`` over the layer's calibration inputs,
the output-optimal pair of its rank, and is trained layer-wise with ``quant.correction_train`` (the integers frozen).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from distill_lr import moe
from distill_lr.errors import check
from distill_lr.factorize import balance_factors, break_even_rank, svd_factors, whiten_factors
from distill_lr.methods.base import LayerStep, LayerWork, Method
from distill_lr.methods.distill import Distill
from distill_lr.methods.quantize import (
    check_group_size,
    dense_experts,
    dense_linears,
    quantize_experts_,
    quantize_linear,
    record,
)
from distill_lr.modeling.lowrank import CorrectedLinear
from distill_lr.moments import Moments
from distill_lr.ranks import rule_rank, rule_value
from distill_lr.schema import CompressConfig, QuantConfig
from distill_lr.stats import input_moments


@dataclass(frozen=True)
class Correct(LayerStep):
    """Quantize every chosen linear of the dense layer and give it the correction its rank rule asks for."""

    name: ClassVar[str] = "correct"

    def check(self, cfg: CompressConfig, layers: nn.ModuleList) -> None:
        check_group_size(cfg.quant, layers)
        oversized = []  # the ranks each correction will get, refused (correction_rank) or warned of now, once
        for i, layer in enumerate(layers):
            for name in dense_linears(layer, cfg.ranks.exclude, i):
                shape = tuple(layer.get_submodule(name).weight.shape)
                rank = correction_rank(cfg.quant, f"layers.{i}.{name}", shape)
                if rank is not None and rank >= break_even_rank(*shape):
                    oversized.append(f"layers.{i}.{name}")
        if oversized:
            warnings.warn(
                f"quant.correction_rank gives {len(oversized)} matrices (e.g. {oversized[0]}) a correction at or above their "
                "break-even rank m·n/(m+n): each of those modules takes more bytes than its dense weight; lower "
                "quant.correction_rank or give a fraction",
                stacklevel=2,
            )

    def run(self, work: LayerWork) -> None:
        cfg, layer = work.cfg, work.layer
        names = dense_linears(layer, cfg.ranks.exclude, work.index)
        moments = input_moments(layer, names, work.x_student, work.kwargs, cfg.batch_size)
        corrections, errors = {}, []
        for name in names:
            linear = layer.get_submodule(name)
            base, error = quantize_linear(linear, cfg.quant, moments[name], work.save_dtype)
            rank = correction_rank(cfg.quant, f"layers.{work.index}.{name}", tuple(linear.weight.shape))
            module = base
            if rank is not None:
                residual = linear.weight.detach().float() - base.dequantized(torch.float32)
                A, B = balance_factors(*whiten_factors(residual, rank, moments[name]))
                module = CorrectedLinear(base, rank)
                with torch.no_grad():
                    module.A.weight.copy_(A)
                    module.B.weight.copy_(B)
                corrections[name] = rank
            layer.set_submodule(name, module)
            errors.append(error)
        experts = dense_experts(layer)
        done = quantize_experts_(work, experts, moments=True, correction=partial(expert_correction, cfg.quant, work.index))
        corrections |= done.corrections
        modules = [f"{n}.base" if n in corrections else n for n in [*names, *experts]]
        record(work, modules, errors + done.errors, corrections, rounded_experts=done.rounded)


def expert_correction(
    cfg: QuantConfig, index: int, name: str, residual: torch.Tensor, moments: Moments | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One expert's correction of its quantization residual: the output-optimal pair of its projection's rank (whitened
    SVD over the tokens routed to it; the plain SVD for an expert without moments), or None where its rule says skip."""
    rank = correction_rank(cfg, f"layers.{index}.{name}", tuple(residual.shape))
    if rank is None:
        return None
    return balance_factors(*(svd_factors(residual, rank) if moments is None else whiten_factors(residual, rank, moments)))


def correction_rank(cfg: QuantConfig, short_name: str, shape: tuple[int, int]) -> int | None:
    """The rank of a weight's correction (last matching rule, else ``correction_rank``); None: no correction."""
    value = rule_value(cfg.correction_rules, short_name, default=cfg.correction_rank)
    fix = "lower quant.correction_rank (or the matching quant.correction_rules), or give a fraction"
    return None if value == "skip" else rule_rank(value, short_name, shape, ("correction rank", fix))


def correction_params(cfg: CompressConfig, layers: nn.ModuleList) -> int:
    """The parameters of every correction pair the run will make, every expert's included (the dense layers on meta)."""
    total = 0
    for i, layer in enumerate(layers):
        shapes = [(n, tuple(layer.get_submodule(n).weight.shape)) for n in dense_linears(layer, cfg.ranks.exclude, i)]
        shapes += [(moe.expert_group(n), shape) for n, shape in moe.expert_shapes(layer).items()]  # one pair per expert
        for name, shape in shapes:
            rank = correction_rank(cfg.quant, f"layers.{i}.{name}", shape)
            total += 0 if rank is None else rank * sum(shape)
    return total


def build(cfg: CompressConfig) -> Method:
    check(cfg.quant.bits is not None, "method=qlr needs quant.bits (2, 3, 4 or 8): the bits of its quantized weights")
    check(
        cfg.quant.targets != "factors",
        "method=qlr quantizes the dense weights: use quant.targets=dense (or both, to quantize the corrections too) or auto",
    )
    steps = (Correct(), Distill()) if cfg.quant.correction_train else (Correct(),)
    info = {"method": "qlr", "correction_train": cfg.quant.correction_train}
    return Method("qlr", steps, info, factorizes=False, quant_targets_auto="dense", quantizes_dense=True, added_params=correction_params)
