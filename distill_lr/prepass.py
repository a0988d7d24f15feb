"""The loss-aware allocation's pre-pass: what ``allocation.loss_aware`` needs, measured on the dense model, streamed.

Up the stack, one dense layer at a time on a few calibration sequences: the whitened spectrum of each
free matrix (``factorize.whitened_spectrum``), and the layer's inputs, kept. Then down the stack, one
layer at a time again: from the loss gradient at the layer's outputs, the mean squared gradient at
each matrix's outputs (its weight in the damage estimate) and the gradient at the layer's inputs,
which the layer below needs. Memory: one layer's weights, plus one layer input per layer for the
``ranks.allocation_sequences`` sequences (logged), in host memory.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from distill_lr import distributed, moe
from distill_lr.checkpoint.reader import CheckpointReader, LayerLoader
from distill_lr.factorize import factorization_cost, whitened_spectrum
from distill_lr.layerwise import LayerKwargs, call_layer, capture_inputs, embed, head_loss_gradient, hooks_removed
from distill_lr.stats import collect_stats, reduce_stats_

log = logging.getLogger("distill_lr")


@dataclass(frozen=True)
class Sensitivity:
    """Per free matrix (full names): σ² of ``W S`` per calibration token, and the mean squared loss gradient at its outputs."""

    spectra: dict[str, torch.Tensor]
    weights: dict[str, float]
    sequences: int


def measure(
    model: nn.Module,
    reader: CheckpointReader,
    prefix: str,
    layers: nn.ModuleList,
    names: set[str],
    input_ids: torch.Tensor,
    compute: tuple[torch.device, torch.dtype],
    batch_size: int,
    overflow: Callable[[int, str], str],
) -> Sensitivity:
    """The pre-pass over the dense model (``model`` has its embeddings, final norm and head materialised).

    ``overflow(layer, "dense")`` is the message for a layer whose outputs are not finite. With several processes each
    takes its block of the sequences; the moments, token counts and squared gradients are summed over them.
    """
    device, dtype = compute
    g = distributed.group()
    ids = input_ids[g.shard(len(input_ids))].to(device)
    kwargs = capture_inputs(model, layers, ids[:1])[1]
    x = embed(model, layers, ids, batch_size)
    log.info(
        "allocation pre-pass: %d sequences, %.2f GiB of kept layer inputs", len(ids), x.numel() * x.element_size() * len(layers) / 2**30
    )
    tokens = int(g.sum_floats([float(ids.numel())])[0])
    inputs, spectra = [], {}
    loader = LayerLoader(reader, copy.deepcopy(layers), prefix)  # its own meta layers: unfusing experts leaves the run's as they are
    try:
        for i in tqdm(range(len(layers)), desc="allocation: spectra", unit="layer"):
            layer = loader.load(i, device, dtype)
            inputs.append(x.cpu())
            y = torch.empty_like(x)
            spectra |= _layer_spectra(layer, (f"{prefix}{i}.", names), (x, y, tokens), kwargs[i], batch_size, partial(overflow, i, "dense"))
            x = y
            layer.to("meta")
    finally:
        loader.close()
    predicted = ids.numel() - len(ids)  # next-token targets: the loss is their mean over every process's sequences
    grad = head_loss_gradient(model, layers, x, ids) * (predicted / (tokens - len(input_ids)))
    weights: dict[str, float] = {}
    loader = LayerLoader(reader, copy.deepcopy(layers), prefix, read_ahead=False)
    try:
        for i in tqdm(reversed(range(len(layers))), total=len(layers), desc="allocation: gradients", unit="layer"):
            layer = loader.load(i, device, dtype)
            layer_weights, grad = _layer_gradients(layer, (inputs.pop().to(device), tokens), grad, kwargs[i], batch_size)
            weights |= {n: layer_weights[_owner(n[len(f"{prefix}{i}.") :])] for n in names if n.startswith(f"{prefix}{i}.")}
            layer.to("meta")
    finally:
        loader.close()
    return Sensitivity(spectra, weights, len(input_ids))


def _owner(name: str) -> str:
    """The module whose output gradient weighs ``name``: itself, or for an expert's projection its experts module."""
    group = moe.expert_group(name)
    return name if group == name else group.rpartition(".")[0]


def _layer_spectra(
    layer: nn.Module,
    free: tuple[str, set[str]],
    streams: tuple[torch.Tensor, torch.Tensor, int],
    kwargs: LayerKwargs,
    batch_size: int,
    overflow: Callable[[], str],
) -> dict[str, torch.Tensor]:
    """σ² of each free matrix (``free``: the layer's prefix, the free names) of one layer (an expert's scaled by the share
    of the tokens routed to it), from one forward of the inputs ``streams[0]`` that also writes the layer's outputs into
    ``streams[1]``; ``streams[2]``: the tokens of every process."""
    (prefix, names), (x, y, tokens) = free, streams
    mine = {n[len(prefix) :]: 1 for n in names if n.startswith(prefix)}
    per_module = moe.module_ranks(mine, moe.fused_experts(layer))
    moe.unfuse_experts_(layer, per_module)
    stats, routing = collect_stats(layer, list(per_module), x, kwargs, batch_size, out=y, overflow=overflow)
    reduce_stats_(stats, routing)
    modules, g = dict(layer.named_modules()), distributed.group()
    # each spectrum is one process's eigen-decomposition, broadcast from it: an expert's by the owner of its moments, the
    # others bin-packed by cost
    fixed = {}
    for name in mine:
        if _owner(name) != name:
            module, expert = _matrix_module(modules, name), int(name.split(".")[-2])
            fixed[name] = distributed.block_owners(module.num_experts, g.world)[expert]
    owner = distributed.owners({name: factorization_cost(_matrix_module(modules, name)) for name in mine}, g.world, fixed)
    ours = {name: _spectrum(modules, stats, name, tokens) for name in mine if owner[name] == g.rank}  # all, then broadcast
    return {prefix + name: g.broadcast_object(ours.get(name), owner[name]) for name in sorted(mine)}  # one order everywhere


def _matrix_module(modules: dict[str, nn.Module], name: str) -> nn.Module:
    """The module holding a free matrix: itself, or for an expert's projection the experts' module of that projection."""
    owner = _owner(name)
    return modules[name] if owner == name else modules[f"{owner}.{name.split('.')[-1]}"]


def _spectrum(modules: dict[str, nn.Module], stats: dict[str, Any], name: str, tokens: int) -> torch.Tensor:
    """σ² of one free matrix; an expert's scaled by the share of the tokens routed to it (none routed: no measured damage)."""
    module = _matrix_module(modules, name)
    if _owner(name) == name:
        return whitened_spectrum(module.weight, stats[name]).cpu()
    expert, projection = int(name.split(".")[-2]), name.split(".")[-1]
    moments = stats[f"{_owner(name)}.{projection}"][expert]
    if moments is None or moments.count == 0:
        return torch.zeros(min(module.in_features, module.out_features), dtype=torch.float64)
    return (whitened_spectrum(module.weight[expert], moments) * moments.count / tokens).cpu()


def _layer_gradients(
    layer: nn.Module, inputs: tuple[torch.Tensor, int], grad_out: torch.Tensor, kwargs: LayerKwargs, batch_size: int
) -> tuple[dict[str, float], torch.Tensor]:
    """Mean squared loss gradient per output coordinate of every linear and experts module over the tokens of every process
    (``inputs``: this process's layer inputs, the tokens of all), and ∂L/∂x of this process's sequences."""
    x, tokens = inputs
    for p in layer.parameters():
        p.requires_grad_(False)
    experts = moe.fused_experts(layer)
    hooked = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) or n in experts}
    energy: dict[str, float] = dict.fromkeys(hooked, 0.0)
    widths: dict[str, int] = {}

    def watch(name: str, output: Any) -> None:
        output = output[0] if isinstance(output, tuple) else output
        widths[name] = output.shape[-1]
        output.register_hook(lambda g: energy.__setitem__(name, energy[name] + float(g.double().pow(2).sum())))

    hooks = [m.register_forward_hook(lambda _m, _a, out, n=n: watch(n, out)) for n, m in hooked.items()]
    grad_in = torch.empty_like(grad_out)
    with hooks_removed(hooks), torch.enable_grad():
        for s in range(0, len(x), batch_size):
            batch = x[s : s + batch_size].detach().requires_grad_()
            (grad_in[s : s + batch_size],) = torch.autograd.grad(call_layer(layer, batch, kwargs), batch, grad_out[s : s + batch_size])
    names = list(hooked)  # the same list in every process; a module that ran in none of them (an expert routed nothing) is left out
    values = distributed.group().sum_floats([v for n in names for v in (energy[n], float(widths.get(n, 0)), float(n in widths))])
    summed = {n: values[3 * k : 3 * k + 3] for k, n in enumerate(names)}
    return {n: e / (tokens * w / ran) for n, (e, w, ran) in summed.items() if ran}, grad_in
