"""Rank allocation: turn the rules and the global target of a config into one rank per linear.

Module names are relative to the decoder stack, e.g. ``layers.3.mlp.down_proj``. The ratio this
module reports counts the weights of the decoder layers' linear projections only (no embeddings,
norms, head or biases), which is how the low-rank compression papers count it.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distill_lr import allocation, moe
from distill_lr.allocation import Budget, kept
from distill_lr.errors import UserInputError, check
from distill_lr.factorize import break_even_rank
from distill_lr.prepass import Sensitivity
from distill_lr.schema import RankConfig

BUDGET_TOLERANCE = 0.005  # the automatic allocations meet ranks.target within half a percentage point

_RANGE = re.compile(r"^(\d+)-(\d+)$")


def _segment_matches(pattern: str, segment: str) -> bool:
    found = _RANGE.match(pattern)
    if found:
        return segment.isdigit() and int(found[1]) <= int(segment) <= int(found[2])
    regex = "".join(".*" if ch == "*" else re.escape(ch) for ch in pattern)
    return re.fullmatch(regex, segment) is not None


def _match(patterns: list[str], segments: list[str]) -> bool:
    if not patterns:
        return not segments
    head, rest = patterns[0], patterns[1:]
    if head == "**":
        return any(_match(rest, segments[i:]) for i in range(len(segments) + 1))
    return bool(segments) and _segment_matches(head, segments[0]) and _match(rest, segments[1:])


def matches(pattern: str, name: str) -> bool:
    """Dotted glob: ``*`` within one segment, ``**`` any number of segments, ``a-b`` an integer range."""
    return _match(pattern.split("."), name.split("."))


@dataclass(frozen=True)
class RankPlan:
    """The rank of each compressed linear, and the parameter counts the plan leads to."""

    ranks: dict[str, int]
    shapes: dict[str, tuple[int, int]]  # every candidate linear: (out_features, in_features)

    @property
    def dense_params(self) -> int:
        return sum(o * i for o, i in self.shapes.values())

    @property
    def kept_params(self) -> int:
        return sum(kept(shape, self.ranks.get(name)) for name, shape in self.shapes.items())

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.kept_params / self.dense_params

    def for_layer(self, layer_prefix: str) -> dict[str, int]:
        """Ranks of one layer's linears, named relative to the layer (``self_attn.q_proj``)."""
        return layer_ranks(self.ranks, layer_prefix)


def linear_shapes(layers: nn.ModuleList, prefix: str) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear and every MoE expert's projection of every decoder layer, read on the meta device."""
    shapes = {}
    for i, layer in enumerate(layers):
        linears = {name: (m.out_features, m.in_features) for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        shapes.update({f"{prefix}{i}.{name}": shape for name, shape in (linears | moe.expert_shapes(layer)).items()})
    return shapes


def layer_ranks(ranks: dict[str, int], layer_prefix: str) -> dict[str, int]:
    """The ranks of the modules under ``layer_prefix``, named relative to it."""
    return {n[len(layer_prefix) :]: r for n, r in ranks.items() if n.startswith(layer_prefix)}


def rank_for_fraction(keep: float, out_f: int, in_f: int) -> int:
    """The rank whose factor pair holds ``keep`` of the matrix's parameters (at least 1)."""
    return max(1, round(keep * break_even_rank(out_f, in_f)))


def plan_ranks(
    shapes: dict[str, tuple[int, int]], cfg: RankConfig, name_prefix: str = "", sensitivity: Sensitivity | None = None
) -> RankPlan:
    """Resolve rules (last match wins), spread ``target`` over the rest by ``cfg.allocation``, drop unprofitable ranks.

    ``shapes`` maps full module names to (out, in); patterns are matched against the names with
    ``name_prefix`` (``model.``) removed, so rules read ``layers.3.mlp.down_proj``. The loss-aware
    allocation needs the pre-pass's ``sensitivity`` of the free matrices (``needs_prepass``).
    """
    short = _short_names(shapes, name_prefix)
    fixed = _fixed_by_rules(shapes, cfg, short)
    free_names = free_matrices(shapes, cfg, name_prefix)
    free = {n: s for n, s in shapes.items() if n in free_names}
    ranks = {n: r for n, r in fixed.items() if r is not None}
    if cfg.target is not None and free:
        dense_total = sum(o * i for o, i in shapes.values())
        kept_elsewhere = sum(kept(s, fixed.get(n)) for n, s in shapes.items() if n not in free)
        budget = (1.0 - cfg.target) * dense_total - kept_elsewhere
        if budget <= 0.0:
            raise UserInputError(
                f"ranks.target={cfg.target} cannot be reached: the rules and exclusions already keep "
                f"{kept_elsewhere / dense_total:.1%} of the parameters; lower the target or the rules' ranks"
            )
        if cfg.allocation == "uniform":
            keep = min(budget / sum(o * i for o, i in free.values()), 1.0)
            ranks |= {name: rank_for_fraction(keep, out_f, in_f) for name, (out_f, in_f) in free.items()}
        else:
            ranks |= _allocate(free, cfg, Budget(int(budget), cfg.floor, cfg.rank_multiple), short, sensitivity)
            removed = 1.0 - (kept_elsewhere + sum(kept(s, ranks.get(n)) for n, s in free.items())) / dense_total
            short_of = removed < cfg.target  # the floor keeps too much; the other way, rank steps overshoot
            advice = "lower ranks.floor or ranks.target (the fraction removed)" if short_of else "lower ranks.rank_multiple"
            check(
                abs(removed - cfg.target) <= BUDGET_TOLERANCE,
                f"ranks.allocation={cfg.allocation} removes {removed:.1%}, not ranks.target={cfg.target:.1%}: "
                f"every matrix keeps ranks.floor={cfg.floor} of its parameters; {advice}",
            )
    return RankPlan(
        ranks=dict(sorted(_profitable(ranks, shapes, cfg.rank_multiple).items(), key=lambda kv: _natural_key(kv[0]))), shapes=shapes
    )


def needs_prepass(cfg: RankConfig) -> bool:
    """Whether the plan needs ``prepass.measure`` first (the loss-aware allocation of a target)."""
    return cfg.target is not None and cfg.allocation == "loss-aware"


def free_matrices(shapes: dict[str, tuple[int, int]], cfg: RankConfig, name_prefix: str = "") -> set[str]:
    """The matrices the target is spread over: neither excluded nor set by a rule (what the pre-pass measures)."""
    short = _short_names(shapes, name_prefix)
    excluded = {n for n in shapes if any(matches(p, short[n]) for p in cfg.exclude)}
    return {n for n in shapes if n not in excluded and not any(matches(p, short[n]) for p in cfg.rules)}


def _short_names(shapes: dict[str, tuple[int, int]], name_prefix: str) -> dict[str, str]:
    """Full module names -> the names the patterns match (``name_prefix`` removed)."""
    return {n: n[len(name_prefix) :] if n.startswith(name_prefix) else n for n in shapes}


def _fixed_by_rules(shapes: dict[str, tuple[int, int]], cfg: RankConfig, short: dict[str, str]) -> dict[str, int | None]:
    """The modules a rule sets: their rank, or None when a 'skip' rule keeps them dense."""
    for pattern in cfg.rules:
        if not any(matches(pattern, n) for n in short.values()):
            warnings.warn(f"rank rule '{pattern}' matches no linear of this model", stacklevel=3)
    fixed: dict[str, int | None] = {}
    for name, shape in shapes.items():
        if any(matches(p, short[name]) for p in cfg.exclude):
            continue
        value = rule_value(cfg.rules, short[name])
        if value is not None:
            fixed[name] = None if value == "skip" else rule_rank(value, name, shape, ("rank", "lower the rule's rank"))
    return fixed


def rule_value(rules: dict[str, Any], name: str, default: Any = None) -> Any:
    """The value of the last rule whose pattern matches ``name``, ``default`` when none does."""
    value = default
    for pattern, rule in rules.items():
        if matches(pattern, name):
            value = rule
    return value


def rule_rank(value: int | float, name: str, shape: tuple[int, int], wording: tuple[str, str]) -> int:
    """A rule's rank: an int as given, a float as the fraction of the matrix's parameters the pair keeps. An int above
    min(out, in) is refused, ``wording`` = (what it is, how to fix it)."""
    out_f, in_f = shape
    if isinstance(value, float):
        return rank_for_fraction(value, out_f, in_f)
    if value > min(out_f, in_f):
        raise UserInputError(f"{wording[0]} {value} for {name} is above min(out, in) = {min(out_f, in_f)}: {wording[1]}")
    return value


def _allocate(
    free: dict[str, tuple[int, int]], cfg: RankConfig, budget: Budget, short: dict[str, str], sensitivity: Sensitivity | None
) -> dict[str, int]:
    """The bottom or loss-aware ranks of the free matrices (dense ones left out).

    The experts of one MoE layer share a rank per projection (``moe.module_ranks``): each such group is
    allocated as one unit of ``(out, in, copies)``, its spectrum the sum of its experts'.
    """
    groups: dict[str, list[str]] = {}
    for name in sorted(free):
        groups.setdefault(moe.expert_group(name), []).append(name)
    shapes = {g: (*free[members[0]], len(members)) for g, members in groups.items()}
    if cfg.allocation == "bottom":
        chosen = allocation.bottom(shapes, {g: layer_index(short[m[0]]) for g, m in groups.items()}, budget, cfg.bottom_step)
    else:
        if sensitivity is None:
            raise ValueError("the loss-aware allocation needs the pre-pass's measurements (prepass.measure)")
        spectra = {g: torch.stack([sensitivity.spectra[n] for n in members]).sum(0) for g, members in groups.items()}
        chosen = allocation.loss_aware(shapes, spectra, {g: sensitivity.weights[m[0]] for g, m in groups.items()}, budget)
    return {n: chosen[g] for g, members in groups.items() for n in members if chosen[g] is not None}


def layer_index(short_name: str) -> int:
    """The decoder layer of a module name relative to the stack (``layers.3.mlp.down_proj`` -> 3)."""
    return next(int(s) for s in short_name.split(".") if s.isdigit())


def _profitable(ranks: dict[str, int], shapes: dict[str, tuple[int, int]], multiple: int) -> dict[str, int]:
    """Ranks rounded down to ``multiple``; those at or above the break-even rank dropped (the matrix stays dense), with a warning."""
    kept_dense, out = [], {}
    for name, r in ranks.items():
        if multiple > 1 and r >= multiple:
            r = r // multiple * multiple
        if r >= break_even_rank(*shapes[name]):
            kept_dense.append(name)
        else:
            out[name] = r
    if kept_dense:
        warnings.warn(
            f"{len(kept_dense)} linear(s) stay dense because their rank is at or above the break-even rank "
            f"m*n/(m+n), where factors save nothing (e.g. {kept_dense[0]})",
            stacklevel=3,
        )
    return out


def _natural_key(name: str) -> list[object]:
    return [int(s) if s.isdigit() else s for s in name.split(".")]
