"""The preconditioner of the layer-wise training: each factor trained in coordinates where its input is white.

``factor_grams`` measures the Gram matrix of every low-rank module's input over the training batches;
``preconditioned`` trains each input-side factor through ``Whitened`` while inside, and leaves plain
factors on exit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from distill_lr import distributed
from distill_lr.layerwise import LayerKwargs, SharedInputs, call_layer, hooks_removed, layer_device
from distill_lr.modeling.lowrank import ExpertLinears, LowRankLinear, expert_blocks, grouping


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

    def record(name: str, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        if x.shape[-1] > max_features:
            return
        first = shared.first_reader(name, x)
        if first is not None:
            grams[name] = grams[first]
            return
        experts = isinstance(modules[name], ExpertLinears)
        offsets = grouping(args) if experts else None
        with torch.autocast(x.device.type, enabled=False):  # a float32 sum, not bf16, under the training's autocast
            if offsets is not None:  # rows sorted by expert: one Gram matrix per expert's block
                gram = torch.stack([b.float().mT @ b.float() for b in expert_blocks(x, offsets)])
            else:  # a linear's tokens, or experts' zero-padded (E, capacity, in) batch
                t = x.float() if experts else x.reshape(-1, x.shape[-1]).float()
                gram = t.mT @ t
        grams[name] = grams[name] + gram if name in grams else gram

    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: record(n, args)) for n, m in modules.items()]
    with hooks_removed([*hooks, shared.hook]):
        for batch in batches:
            with autocast:
                call_layer(layer, batch.to(device, non_blocking=True), kwargs)
    return grams


def whitening_matrices(grams: dict[str, torch.Tensor], damping: float) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``inverse_sqrt`` of each distinct Gram matrix (by identity: q/k/v share one), each one computed by one process
    (bin-packed by its eigendecomposition's cost) and broadcast to the others."""
    unique: dict[int, tuple[str, torch.Tensor]] = {}
    for name, gram in grams.items():  # a matrix's first reader names it alike in every process
        unique.setdefault(id(gram), (name, gram))
    g = distributed.group()
    owner = distributed.owners({n: t.shape[-1] ** 3 * (t.shape[0] if t.ndim == 3 else 1) for n, t in unique.values()}, g.world)
    out = {  # every process computes its own first, then all are broadcast
        key: inverse_sqrt(gram, damping) if owner[name] == g.rank else tuple(torch.empty(gram.shape, device=gram.device) for _ in range(2))
        for key, (name, gram) in unique.items()
    }
    for key, (name, _) in unique.items():
        g.broadcast_(list(out[key]), owner[name])
    return out


@contextmanager
def preconditioned(
    modules: dict[str, nn.Module], grams: dict[str, torch.Tensor], damping: float, frozen: dict[str, list[int]]
) -> Iterator[None]:
    """Train each factor through ``Whitened`` while inside; on exit the factors hold their values in plain form.

    Frozen experts get the identity, so their factors stay bit-for-bit equal to their initialisation.
    """
    registered: list[tuple[nn.Module, str]] = []
    whitening = whitening_matrices(grams, damping)
    try:
        for name, gram in grams.items():
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
