"""Quantization as a step of any method (``quant.bits``): each finished layer's factors and/or dense linears become
group-wise integers (``distill_lr.quant``), by GPTQ from the layer's calibration inputs or by rounding.

GPTQ's Hessian of a factor is the second moment of what it reads: ``E[x xᵀ]`` for A, ``E[(A x)(A x)ᵀ]`` for B,
recorded on the finished student over the compressed stack's inputs, as every other statistic of the run.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from distill_lr import quant
from distill_lr.methods.base import LayerStep, LayerWork, Method
from distill_lr.modeling.lowrank import ExpertLinears, LowRankLinear, QuantLinear, is_fused_experts
from distill_lr.moments import Moments
from distill_lr.ranks import matches
from distill_lr.schema import CompressConfig, QuantConfig
from distill_lr.stats import input_moments

log = logging.getLogger("distill_lr")


def spec(cfg: QuantConfig) -> quant.QuantSpec:
    assert cfg.bits is not None
    return quant.QuantSpec(cfg.bits, cfg.group_size, cfg.symmetric)


def dense_linears(layer: nn.Module, exclude: list[str], index: int) -> list[str]:
    """The layer's plain linears outside any low-rank module, but for the excluded ones (MoE routers)."""
    inside = [n for n, m in layer.named_modules() if isinstance(m, LowRankLinear)]
    return [
        n
        for n, m in layer.named_modules()
        if type(m) is nn.Linear
        and not any(n.startswith(f"{p}.") for p in inside)
        and not any(matches(p, f"layers.{index}.{n}") for p in exclude)
    ]


def factor_linears(layer: nn.Module) -> list[str]:
    """The A and B of every low-rank module (and correction) of the layer."""
    return [f"{n}.{f}" for n, m in layer.named_modules() if isinstance(m, LowRankLinear) for f in ("A", "B")]


def quantize_linear(
    linear: nn.Linear, cfg: QuantConfig, moments: Moments | None, scale_dtype: torch.dtype
) -> tuple[QuantLinear, float | None]:
    """The linear as a ``QuantLinear`` (same device and dtype), and its relative output error when the moments are known."""
    W = linear.weight.detach().float()
    H = None if moments is None else moments.second_moment().float().to(W.device)
    if cfg.method == "gptq":
        if H is None:
            raise ValueError("quant.method=gptq needs the second moment of the linear's inputs")
        q = quant.gptq(W, H, spec(cfg), scale_dtype, cfg.damping, cfg.act_order)
    else:
        q = quant.rtn(W, spec(cfg), scale_dtype)
    error = None if H is None else quant.output_error(W, q.dequantized(), H)
    bias = None if linear.bias is None else linear.bias.detach()
    return q.module(bias, linear.weight.dtype), error


def quantize_named_(work: LayerWork, names: list[str], moments: dict[str, Moments]) -> list[float]:
    """Swap the named linears of ``work.layer`` for quantized ones; their output errors."""
    errors = []
    for name in names:
        module, error = quantize_linear(work.layer.get_submodule(name), work.cfg.quant, moments.get(name), work.save_dtype)
        work.layer.set_submodule(name, module)
        if error is not None:
            errors.append(error)
    return errors


def record(work: LayerWork, names: list[str], errors: list[float], corrections: dict[str, int] | None = None) -> None:
    """Add to the layer report what was quantized (``modules``, ``corrections``) and its mean output error."""
    q = work.cfg.quant
    entry: dict[str, Any] = work.report.quant or {"bits": q.bits, "group_size": q.group_size, "symmetric": q.symmetric, "method": q.method}
    entry["modules"] = sorted([*entry.get("modules", []), *names])
    experts = [n for n, m in work.layer.named_modules() if isinstance(m, ExpertLinears) or is_fused_experts(m)]
    if experts and "experts_not_quantized" not in entry:  # not built: the expert projections keep the save dtype
        log.warning("layer %d: %d MoE expert projection(s) stay unquantized (e.g. %s)", work.index, len(experts), experts[0])
        entry["experts_not_quantized"] = experts
    if corrections:
        entry["corrections"] = corrections
    if errors:
        entry.setdefault("errors", []).extend(errors)
        entry["mean_error"] = round(sum(entry["errors"]) / len(entry["errors"]), 6)
    work.report.quant = entry


@dataclass(frozen=True)
class Quantize(LayerStep):
    """Quantize the factors and/or the dense linears of the finished student."""

    factors: bool
    dense: bool
    name: ClassVar[str] = "quant"

    def check(self, cfg: CompressConfig, layers: nn.ModuleList) -> None:
        check_group_size(cfg.quant, layers)

    def run(self, work: LayerWork) -> None:
        cfg = work.cfg
        names = (factor_linears(work.layer) if self.factors else []) + (
            dense_linears(work.layer, cfg.ranks.exclude, work.index) if self.dense else []
        )
        needs = cfg.quant.method == "gptq"
        moments = input_moments(work.layer, names, work.x_student, work.kwargs, cfg.batch_size) if needs else {}
        record(work, names, quantize_named_(work, names, moments))


def check_group_size(cfg: QuantConfig, layers: nn.ModuleList) -> None:
    """Warn of a group size no row reaches: every row is one group (per-channel scales), surely not what was meant."""
    widest = max(m.in_features for layer in layers for m in layer.modules() if isinstance(m, nn.Linear))
    if cfg.group_size > widest:
        warnings.warn(
            f"quant.group_size={cfg.group_size} is wider than every linear's input (at most {widest} columns): each row "
            f"is one group (per-channel scales); give a group size below {widest} for finer ones",
            stacklevel=3,
        )


def with_quantization(method: Method, cfg: CompressConfig) -> Method:
    """``method`` followed by the quantization of what ``quant.targets`` names (``auto``: what the method says), but for the
    dense linears of a method whose steps quantize them."""
    chosen = method.quant_targets_auto if cfg.quant.targets == "auto" else cfg.quant.targets
    factors, dense = chosen in ("factors", "both"), chosen in ("dense", "both") and not method.quantizes_dense
    steps = (*method.steps, Quantize(factors, dense)) if factors or dense else method.steps
    settings = {k: getattr(cfg.quant, k) for k in ("bits", "group_size", "symmetric", "method", "targets")}
    return replace(method, steps=steps, info={**method.info, "quant": settings})
