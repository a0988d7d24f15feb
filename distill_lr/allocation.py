"""Rank allocation under a global parameter budget: which rank each free linear gets.

Pure maths on shapes and, for ``loss-aware``, on a damage estimate per matrix (``distill_lr.prepass``
measures it): ``damage_m(r) = weight_m · Σ_{i>r} σ_{m,i}²``, where σ_{m,i} are the singular values of
``W_m S_m`` (``S Sᵀ = E[x xᵀ]``), so the tail sum is the output error ``E‖(W − W_r) x‖²`` of the
whitened truncation, and ``weight_m`` is the mean squared gradient of the model's loss per output
coordinate of that matrix: the first-order (empirical Fisher) price of an output error there.

* ``uniform``: every free matrix keeps the same fraction of its parameters (``ranks.plan_ranks``).
* ``bottom``: the Lillama paper's greedy baseline: start dense, lower the ranks of the lowest layer in
  steps down to a floor, then the next layer, until the budget is met.
* ``loss-aware``: greedy on damage removed per parameter kept. Each rank unit of a matrix costs
  ``out + in`` parameters and removes ``weight · σ_r²`` damage; since σ² decreases along a matrix the
  greedy order is optimal for the relaxed problem, and it stops within one rank unit of the budget.
  Reaching the break-even rank, a matrix turns dense for the small remaining cost and drops its tail.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from distill_lr.factorize import break_even_rank

ALLOCATIONS = ("uniform", "bottom", "loss-aware")


@dataclass(frozen=True)
class Budget:
    """The parameters the free matrices may keep together, and the allocation's granularity."""

    params: int
    floor: float  # every matrix keeps at least this fraction of its break-even rank
    step: int = 1  # ranks are multiples of this (ranks.rank_multiple)


def max_factor_rank(out_f: int, in_f: int) -> int:
    """The largest rank whose factor pair holds fewer parameters than the dense matrix."""
    return max(1, math.ceil(break_even_rank(out_f, in_f)) - 1)


def floor_rank(out_f: int, in_f: int, budget: Budget) -> int:
    r = max(budget.step, round(budget.floor * break_even_rank(out_f, in_f)) // budget.step * budget.step)
    return min(r, max_factor_rank(out_f, in_f))


def kept(shape: tuple[int, ...], rank: int | None) -> int:
    """Parameters a matrix keeps at ``rank`` (None: dense); a shape ``(out, in, copies)`` counts that many matrices of one rank."""
    out_f, in_f, *copies = shape
    return (out_f * in_f if rank is None else rank * (out_f + in_f)) * (copies[0] if copies else 1)


def loss_aware(
    shapes: dict[str, tuple[int, ...]], spectra: dict[str, torch.Tensor], weights: dict[str, float], budget: Budget
) -> dict[str, int | None]:
    """The ranks (None: dense) that greedily minimise ``Σ weight · tail(σ²)`` within ``budget.params``.

    ``spectra`` holds each matrix's σ² in decreasing order (for copies sharing a rank, their sum per
    index). Ties break by name, so the plan is deterministic.
    """
    ranks: dict[str, int | None] = {n: floor_rank(s[0], s[1], budget) for n, s in shapes.items()}
    used = sum(kept(shapes[n], r) for n, r in ranks.items())
    tails = {n: torch.flip(torch.cumsum(torch.flip(spectra[n].double(), [0]), 0), [0]).tolist() for n in shapes}
    heap: list[tuple[float, str, int | None, int]] = []  # (-damage removed per parameter, name, next rank, its cost)

    def push(name: str) -> None:
        """Queue the matrix's next rank unit: ``step`` more ranks, or dense once at the largest factor rank."""
        rank, shape = ranks[name], shapes[name]
        if rank is None:
            return
        tail, top = tails[name], max_factor_rank(*shape[:2])
        new = None if rank >= top else min(rank + budget.step, top)
        gain = _tail(tail, rank) - (0.0 if new is None else _tail(tail, new))  # dense: the whole remaining tail goes
        cost = kept(shape, new) - kept(shape, rank)
        heapq.heappush(heap, (-weights[name] * gain / max(cost, 1), name, new, cost))

    for name in sorted(shapes):
        push(name)
    while heap:
        _, name, new, cost = heapq.heappop(heap)
        if used + cost > budget.params:
            continue  # this matrix cannot grow any more; smaller units of others may still fit
        ranks[name], used = new, used + cost
        push(name)
    return ranks


def _tail(tail: list[float], rank: int) -> float:
    return tail[rank] if rank < len(tail) else 0.0


def bottom(shapes: dict[str, tuple[int, ...]], layer_of: dict[str, int], budget: Budget, step_fraction: float) -> dict[str, int | None]:
    """Lillama's baseline: all dense, then each layer from the bottom lowers its matrices' ranks in steps
    of ``step_fraction`` of the break-even rank down to the floor; the last step taken is partial, to meet the budget."""
    ranks: dict[str, int | None] = dict.fromkeys(shapes)
    used = sum(kept(s, None) for s in shapes.values())
    for layer in sorted(set(layer_of.values())):
        names = sorted(n for n in shapes if layer_of[n] == layer)
        fraction = 1.0
        while used > budget.params and fraction > budget.floor:
            fraction = max(budget.floor, fraction - step_fraction)
            for name in names:
                if used <= budget.params:
                    break
                out_f, in_f = shapes[name][:2]
                target = min(max_factor_rank(out_f, in_f), max(budget.step, round(fraction * break_even_rank(out_f, in_f))))
                old = kept(shapes[name], ranks[name])
                # the partial last cut: the largest rank that still meets the budget, if above the step's
                need = max(0, budget.params - (used - old))
                partial = need // kept(shapes[name], 1) // budget.step * budget.step
                rank = max(target, min(partial, max_factor_rank(out_f, in_f)))
                if ranks[name] is None or rank < ranks[name]:  # type: ignore[operator]
                    ranks[name] = rank
                    used += kept(shapes[name], rank) - old
        if used <= budget.params:
            break
    return ranks


def kept_fractions(
    shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None], layer_of: dict[str, int]
) -> dict[str, dict[str, float]]:
    """The plan as a person reads it: per layer, the kept fraction of each module's parameters (1.0: dense)."""
    table: dict[str, dict[str, float]] = {}
    for name, shape in shapes.items():
        module = name.split(f".{layer_of[name]}.", 1)[-1]
        table.setdefault(str(layer_of[name]), {})[module] = round(kept(shape, ranks.get(name)) / kept(shape, None), 4)
    return table
