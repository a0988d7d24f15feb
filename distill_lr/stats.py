"""What the activation-aware factorisations need of a layer's data: the moments of its linears and the MoE routing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distill_lr import moe
from distill_lr.distributed import group
from distill_lr.errors import check
from distill_lr.layerwise import LayerKwargs, SharedInputs, hooks_removed, layer_device, run_layer
from distill_lr.modeling.lowrank import LowRankExperts
from distill_lr.moments import Moments, records_outputs


def collect_stats(
    layer: nn.Module,
    names: list[str],
    inputs: torch.Tensor,
    kwargs: LayerKwargs,
    batch_size: int,
    out: torch.Tensor | None = None,
    overflow: Callable[[], str] | None = None,
) -> tuple[dict[str, Any], moe.Routing]:
    """Moments of the named modules over the calibration inputs (for ``pca`` and ``whiten``), and the MoE routing.

    A linear gets one ``Moments`` of its inputs (one object for linears that read the same tensor, as
    q/k/v do), or of its outputs when it has fewer (``moments.records_outputs``: the smaller moment holds
    all pca/whiten need); an expert projection one per expert, over the tokens routed to it.
    The layer runs only when there is something to record, or when its outputs are wanted in ``out``
    (checked by ``overflow`` as in ``run_layer``).
    """
    modules = dict(layer.named_modules())
    device = layer_device(layer)  # the statistics live where the layer computes, wherever the caches are
    linears = [n for n in names if isinstance(modules[n], nn.Linear)]
    stats: dict[str, Any] = {}
    shared = SharedInputs(layer)

    def record(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        module = modules[name]
        if records_outputs(module.out_features, module.in_features):
            product = y if module.bias is None else y - module.bias  # the moments of W x
            stats.setdefault(name, Moments.empty(module.out_features, device, of_outputs=True)).update(product)
            return
        first = shared.first_reader(name, x)
        if first is not None:  # q/k/v (gate/up) read one tensor: one set of moments, computed once
            stats[name] = stats[first]
            return
        stats.setdefault(name, Moments.empty(module.in_features, device)).update(x)

    hooks = [modules[n].register_forward_hook(lambda _m, args, out, n=n: record(n, args[0], out)) for n in linears]
    experts = [n for n in names if n not in linears]
    with hooks_removed([*hooks, shared.hook]), moe.record_routing(layer, experts, device, batches(inputs, batch_size)) as routing:
        if names or out is not None or any(isinstance(m, LowRankExperts) for m in modules.values()):
            run_layer(layer, inputs, kwargs, batch_size, out=out, overflow=overflow)
    return stats | routing.stats, routing


def input_moments(layer: nn.Module, names: list[str], inputs: torch.Tensor, kwargs: LayerKwargs, batch_size: int) -> dict[str, Moments]:
    """``E[x xᵀ]`` of the inputs of each named linear over the calibration inputs: GPTQ's Hessian, and the whitening
    of a quantization residual. Linears that read one tensor (q/k/v; the A factors of q/k/v) share one ``Moments``."""
    modules = dict(layer.named_modules())
    device = layer_device(layer)
    stats: dict[str, Moments] = {}
    shared = SharedInputs(layer)

    def record(name: str, x: torch.Tensor) -> None:
        first = shared.first_reader(name, x)
        if first is not None:
            stats[name] = stats[first]
            return
        stats.setdefault(name, Moments.empty(modules[name].in_features, device)).update(x)

    hooks = [modules[n].register_forward_pre_hook(lambda _m, args, n=n: record(n, args[0])) for n in names]
    with hooks_removed([*hooks, shared.hook]):
        if names:
            run_layer(layer, inputs, kwargs, batch_size)
    return stats


def expert_input_moments(
    layer: nn.Module, names: list[str], inputs: torch.Tensor, kwargs: LayerKwargs, batch_size: int, experts: list[int] | None = None
) -> moe.Routing:
    """Per expert (of ``experts``, default all), ``E[x xᵀ]`` of the tokens routed to each named expert projection (of a
    ``LowRankExperts``), and the token counts: GPTQ's Hessians of the experts."""
    with moe.record_routing(layer, names, layer_device(layer), batches(inputs, batch_size), inputs=True, experts=experts) as routing:
        run_layer(layer, inputs, kwargs, batch_size)
    return routing


def batches(inputs: torch.Tensor, batch_size: int) -> int:
    """The forwards ``run_layer`` takes for the inputs."""
    return -(-len(inputs) // batch_size)


def reduce_stats_(stats: dict[str, Any], routing: moe.Routing | None = None) -> None:
    """Sum over the processes what each measured on its own sequences (``collect_stats``): the whole calibration set's
    moments and token counts, the same in every process; the experts' moments are whole in their owners already
    (``moe.ToOwners``). Linears that share one ``Moments`` are summed once; the order is the names' (a dict's order may
    differ between processes that built it from a set)."""
    g = group()
    if g.world == 1:
        return
    spread = set(routing.stats) if routing is not None and routing.spread else set()  # whole in their owners already
    names = sorted(set(stats) - spread)
    layout = [(name, [m is None for m in stats[name]] if isinstance(stats[name], list) else None) for name in names]
    tokens = {} if routing is None else routing.tokens
    layout.append(("routing", sorted(tokens)))
    check(
        g.broadcast_object(layout) == layout,
        f"process {g.rank} saw other modules run than process 0 (a linear that runs only for some tokens, as a per-expert "
        "nn.Linear does): this model's layers do not run spread over processes yet; launch one process",
    )
    entries = [m for name in names for m in (stats[name] if isinstance(stats[name], list) else [stats[name]]) if m is not None]
    moments = list({id(m): m for m in entries}.values())
    g.sum_([t for m in moments for t in (m.sum_xxT, m.sum_x)] + [tokens[name] for name in sorted(tokens)])
    for m, count in zip(moments, g.sum_floats([float(m.count) for m in moments]), strict=True):
        m.count = int(count)
