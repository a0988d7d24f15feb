"""Quantization as a step of any method (``quant.bits``): each finished layer's factors and/or dense linears become
group-wise integers (``distill_lr.quant``), by GPTQ from the layer's calibration inputs or by rounding.

GPTQ's Hessian of a factor is the second moment of what it reads: ``E[x xᵀ]`` for A, ``E[(A x)(A x)ᵀ]`` for B,
recorded on the finished student over the compressed stack's inputs, as every other statistic of the run.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from distill_lr import distributed, moe, quant
from distill_lr.methods.base import LayerStep, LayerWork, Method
from distill_lr.modeling.lowrank import EXPERT_PROJECTIONS, CorrectedExperts, ExpertLinears, LowRankLinear, QuantLinear, is_fused_experts
from distill_lr.moments import Moments
from distill_lr.ranks import matches
from distill_lr.schema import CompressConfig, QuantConfig
from distill_lr.stats import expert_input_moments, input_moments, reduce_stats_

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


def quantize_weight(
    W: torch.Tensor, cfg: QuantConfig, moments: Moments | None, scale_dtype: torch.dtype
) -> tuple[quant.Quantized, float | None]:
    """``W`` by GPTQ from its inputs' moments (``quant.method=gptq`` and moments known) or by rounding; the relative
    output error when the moments are known."""
    W = W.detach().float()
    H = None if moments is None else moments.second_moment().float().to(W.device)
    if cfg.method == "gptq" and H is not None:
        q = quant.gptq(W, H, spec(cfg), scale_dtype, cfg.damping, cfg.act_order)
    else:
        q = quant.rtn(W, spec(cfg), scale_dtype)
    return q, None if H is None else quant.output_error(W, q.dequantized(), H)


def quantize_spread(
    jobs: dict[str, tuple[torch.Tensor, Moments | None]], cfg: QuantConfig, scale_dtype: torch.dtype, fixed: dict[str, int] | None = None
) -> dict[str, tuple[quant.Quantized, float | None]]:
    """``quantize_weight`` of each (weight, moments): with several processes each weight by one of them (bin-packed by
    GPTQ's cost, rows·columns², but for the ``fixed`` ones: an expert's by the owner of its moments) and broadcast from it,
    as llm-compressor spreads GPTQ; the same results everywhere."""
    g = distributed.group()
    if g.world == 1:
        return {key: quantize_weight(W, cfg, m, scale_dtype) for key, (W, m) in jobs.items()}
    owner = distributed.owners({key: W.shape[0] * W.shape[1] ** 2 for key, (W, _) in jobs.items()}, g.world, fixed)
    # every process runs all of its jobs before the first broadcast: the processes work at once, not in turns
    mine = {key: host(quantize_weight(W, cfg, m, scale_dtype)) for key, (W, m) in jobs.items() if owner[key] == g.rank}
    done = {}
    for key in sorted(jobs):  # the same order in every process
        q, error = g.broadcast_object(mine.pop(key, None), owner[key])
        done[key] = (q.to(jobs[key][0].device), error)
    return done


def host(result: tuple[quant.Quantized, float | None]) -> tuple[quant.Quantized, float | None]:
    """A result on the host, for the broadcast (a process unpickles a GPU tensor on the sender's GPU)."""
    return result[0].to(torch.device("cpu")), result[1]


def quantize_linear(
    linear: nn.Linear,
    cfg: QuantConfig,
    moments: Moments | None,
    scale_dtype: torch.dtype,
    done: tuple[quant.Quantized, float | None] | None = None,
) -> tuple[QuantLinear, float | None]:
    """The linear as a ``QuantLinear`` (same device and dtype), and its relative output error when the moments are known
    (``done``: its weight already quantized, by ``quantize_spread``)."""
    if cfg.method == "gptq" and moments is None:
        raise ValueError("quant.method=gptq needs the second moment of the linear's inputs")
    q, error = done or quantize_weight(linear.weight, cfg, moments, scale_dtype)
    bias = None if linear.bias is None else linear.bias.detach()
    return q.module(bias, linear.weight.dtype), error


def dense_experts(layer: nn.Module) -> list[str]:
    """Every dense expert projection of the layer, ``<experts>.<projection>``: of fused experts modules, and the
    projections a ``LowRankExperts`` keeps dense (its factor pairs are not these)."""
    names = [f"{n}.{p}" for n, m in layer.named_modules() if is_fused_experts(m) for p in EXPERT_PROJECTIONS]
    return names + [n for n, m in layer.named_modules() if isinstance(m, ExpertLinears) and m.rank is None]


# A correction of one expert's quantization residual: (projection, residual, its routed moments) -> (A, B), or None.
Correction = Callable[[str, torch.Tensor, Moments | None], tuple[torch.Tensor, torch.Tensor] | None]


@dataclass
class ExpertsDone:
    """What ``quantize_experts_`` did: the output errors, the experts rounded for want of tokens (per experts module), and
    the rank of each corrected projection."""

    errors: list[float] = field(default_factory=list)
    rounded: dict[str, list[int]] = field(default_factory=dict)
    corrections: dict[str, int] = field(default_factory=dict)


def input_groups(names: list[str]) -> list[list[str]]:
    """The projections that read one input, together (an experts module's gate and up; its down alone): one pass each."""
    groups: dict[tuple[str, bool], list[str]] = {}
    for name in names:
        path, _, projection = name.rpartition(".")
        groups.setdefault((path, projection == "down_proj"), []).append(name)
    return list(groups.values())


def expert_chunks(dense: ExpertLinears, world: int = 1) -> list[list[int]]:
    """Experts whose routed input moments are recorded in one pass: as many per process as keep those float64 moments
    within the projection's own weight bytes (Mixtral's down projections: one at a time; all eight would hold 13 GB).
    Each process records its own experts' (``distributed.block_owners``): with N processes a pass covers N times as many."""
    per_expert = dense.in_features**2 * 8
    size = max(1, dense.weight.numel() * dense.weight.element_size() // per_expert)
    own = [list(range(dense.num_experts))[block] for block in distributed.blocks(dense.num_experts, world)]
    passes = max(-(-len(experts) // size) for experts in own)
    return [sorted(e for experts in own for e in experts[k * size : (k + 1) * size]) for k in range(passes)]


def quantize_experts_(work: LayerWork, names: list[str], moments: bool, correction: Correction | None = None) -> ExpertsDone:
    """Unfuse the layer's experts and swap the named dense expert projections for ``QuantExpertLinears`` (``CorrectedExperts``
    where ``correction`` gives pairs): each expert by GPTQ from the moments of the tokens routed to it (recorded when
    ``moments``, a few experts per pass over the layer, ``expert_chunks``, on the dense layer), or rounded when it received
    fewer than ``ranks.min_expert_tokens`` (named in the log)."""
    layer, cfg, done = work.layer, work.cfg, ExpertsDone()
    moe.unfuse_experts_(layer, names)
    dense: dict[str, ExpertLinears] = {name: layer.get_submodule(name) for name in names}
    results: dict[tuple[str, int], ExpertResult] = {}
    for group in input_groups(names):
        for chunk in expert_chunks(dense[group[0]], distributed.group().world):
            results |= _quantize_chunk(work, {name: dense[name] for name in group}, chunk, moments, correction)
    rounded: dict[str, set[int]] = {}  # per experts module: gate, up and down name the same starved experts
    for name in names:  # in the experts' order, whatever order the passes took them in
        per_expert = [results[name, e] for e in range(dense[name].num_experts)]
        module = quant.Quantized.stacked([r.q for r in per_expert]).expert_module(dense[name].num_experts, dense[name].weight.dtype)
        pairs = [r.pair for r in per_expert if r.pair is not None]
        if pairs:
            module = CorrectedExperts.around(module, torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs]))
            done.corrections[name] = module.rank
        layer.set_submodule(name, module)
        done.errors += [r.error for r in per_expert if r.error is not None]
        rounded.setdefault(name.rpartition(".")[0], set()).update(e for e, r in enumerate(per_expert) if r.rounded)
    done.rounded = {path: sorted(experts) for path, experts in rounded.items() if experts}
    for path, experts in done.rounded.items():
        log.warning(
            "layer %d %s: experts %s received fewer than %d calibration tokens: rounded to nearest instead of GPTQ",
            work.index,
            path,
            experts,
            cfg.ranks.min_expert_tokens,
        )
    return done


@dataclass
class ExpertResult:
    """One expert's projection quantized: its integers, its correction pair, its output error, whether it was rounded for
    want of tokens."""

    q: quant.Quantized
    pair: tuple[torch.Tensor, torch.Tensor] | None
    error: float | None
    rounded: bool


def _quantize_chunk(
    work: LayerWork, dense: dict[str, ExpertLinears], chunk: list[int], moments: bool, correction: Correction | None
) -> dict[tuple[str, int], ExpertResult]:
    """One pass over the layer for the ``chunk`` of experts of the projections that read one input (``dense``), then each
    expert's GPTQ by the owner of its moments (``quantize_spread``)."""
    cfg, names = work.cfg, list(dense)
    routing = expert_input_moments(work.layer, names, work.x_student, work.kwargs, cfg.batch_size, chunk) if moments else None
    if routing is not None:
        reduce_stats_(routing.stats, routing)  # the tokens every process routed to these experts
    per_expert = {name: routed_moments(routing, name, cfg.ranks.min_expert_tokens) for name in names}
    jobs = {f"{n}:{e}": (dense[n].weight[e], None if per_expert[n] is None else per_expert[n][e]) for n in names for e in chunk}
    owner = distributed.block_owners(dense[names[0]].num_experts, distributed.group().world)
    quantized = quantize_spread(jobs, cfg.quant, work.save_dtype, fixed={f"{n}:{e}": owner[e] for n in names for e in chunk})
    out = {}
    for name in names:
        for e in chunk:
            m, (q, error) = jobs[f"{name}:{e}"][1], quantized[f"{name}:{e}"]
            pair = None if correction is None else correction(name, dense[name].weight[e].detach().float() - q.dequantized(), m)
            rounded = cfg.quant.method == "gptq" and routing is not None and starved(routing, name, e, cfg.ranks.min_expert_tokens)
            out[name, e] = ExpertResult(q, pair, error, rounded)
    return out


def starved(routing: moe.Routing, name: str, expert: int, min_tokens: int) -> bool:
    """Whether the expert received fewer than ``min_tokens`` tokens (over every process's sequences)."""
    return int(routing.tokens[name.rpartition(".")[0]][expert]) < min_tokens


def routed_moments(routing: moe.Routing | None, name: str, min_tokens: int) -> list[Moments | None] | None:
    """Each expert's input moments of the projection, None for an expert that received fewer than ``min_tokens`` tokens
    (or whose moments were not recorded)."""
    if routing is None:
        return None
    return [None if starved(routing, name, e, min_tokens) else m for e, m in enumerate(routing.stats[name])]


def quantize_named_(work: LayerWork, names: list[str], moments: dict[str, Moments]) -> list[float]:
    """Swap the named linears of ``work.layer`` for quantized ones (``quantize_spread``); their output errors."""
    linears = {name: work.layer.get_submodule(name) for name in names}
    quantized = quantize_spread({name: (linears[name].weight, moments.get(name)) for name in names}, work.cfg.quant, work.save_dtype)
    errors = []
    for name in names:
        module, error = quantize_linear(linears[name], work.cfg.quant, moments.get(name), work.save_dtype, quantized[name])
        work.layer.set_submodule(name, module)
        if error is not None:
            errors.append(error)
    return errors


def record(
    work: LayerWork,
    names: list[str],
    errors: list[float],
    corrections: dict[str, int] | None = None,
    rounded_experts: dict[str, list[int]] | None = None,
) -> None:
    """Add to the layer report what was quantized (``modules``, ``corrections``, experts rounded for want of tokens) and its
    mean output error."""
    q = work.cfg.quant
    entry: dict[str, Any] = work.report.quant or {"bits": q.bits, "group_size": q.group_size, "symmetric": q.symmetric, "method": q.method}
    entry["modules"] = sorted([*entry.get("modules", []), *names])
    experts = [n for n, m in work.layer.named_modules() if type(m) is ExpertLinears or is_fused_experts(m)]
    if experts and "experts_not_quantized" not in entry:  # experts' factor pairs: not built
        log.warning("layer %d: %d MoE expert module(s) stay unquantized (e.g. %s)", work.index, len(experts), experts[0])
        entry["experts_not_quantized"] = experts
    if corrections:
        entry["corrections"] = corrections
    if rounded_experts:
        entry["rounded_experts"] = rounded_experts
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
    data_parallel: ClassVar[bool] = True

    def check(self, cfg: CompressConfig, layers: nn.ModuleList) -> None:
        check_group_size(cfg.quant, layers)

    def run(self, work: LayerWork) -> None:
        cfg = work.cfg
        names = (factor_linears(work.layer) if self.factors else []) + (
            dense_linears(work.layer, cfg.ranks.exclude, work.index) if self.dense else []
        )
        needs = cfg.quant.method == "gptq"
        moments = input_moments(work.layer, names, work.x_student, work.kwargs, cfg.batch_size) if needs else {}
        reduce_stats_(moments)  # GPTQ's Hessians over every process's sequences
        errors = quantize_named_(work, names, moments)
        experts = dense_experts(work.layer) if self.dense else []
        done = quantize_experts_(work, experts, moments=needs) if experts else ExpertsDone()
        record(work, names + experts, errors + done.errors, rounded_experts=done.rounded)


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
