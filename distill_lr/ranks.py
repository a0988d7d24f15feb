"""Rank allocation: turn the rules and the global target of a config into one rank per linear.

Module names are relative to the decoder stack, e.g. ``layers.3.mlp.down_proj``. The ratio this
module reports counts the weights of the decoder layers' linear projections only (no embeddings,
norms, head or biases), which is how the low-rank compression papers count it.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from torch import nn

from distill_lr import moe
from distill_lr.errors import UserInputError
from distill_lr.factorize import break_even_rank
from distill_lr.schema import RankConfig

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
        total = 0
        for name, (o, i) in self.shapes.items():
            r = self.ranks.get(name)
            total += o * i if r is None else r * (o + i)
        return total

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


def _rank_for_fraction(keep: float, out_f: int, in_f: int) -> int:
    return max(1, round(keep * break_even_rank(out_f, in_f)))


def plan_ranks(shapes: dict[str, tuple[int, int]], cfg: RankConfig, name_prefix: str = "") -> RankPlan:
    """Resolve rules (last match wins), spread ``target`` over the rest, drop unprofitable ranks.

    ``shapes`` maps full module names to (out, in); patterns are matched against the names with
    ``name_prefix`` (``model.``) removed, so rules read ``layers.3.mlp.down_proj``.
    """
    short = {n: n[len(name_prefix) :] if n.startswith(name_prefix) else n for n in shapes}
    for pattern in cfg.rules:
        if not any(matches(pattern, n) for n in short.values()):
            warnings.warn(f"rank rule '{pattern}' matches no linear of this model", stacklevel=2)
    candidates = {n: s for n, s in shapes.items() if not any(matches(p, short[n]) for p in cfg.exclude)}
    fixed: dict[str, int | None] = {}  # None: kept dense by a 'skip' rule
    for name, (out_f, in_f) in candidates.items():
        value = None
        for pattern, rule in cfg.rules.items():
            if matches(pattern, short[name]):
                value = rule
        if value is None:
            continue
        if value == "skip":
            fixed[name] = None
        elif isinstance(value, float):
            fixed[name] = _rank_for_fraction(value, out_f, in_f)
        else:
            if value > min(out_f, in_f):
                raise UserInputError(f"rank {value} for {name} is above min(out, in) = {min(out_f, in_f)}: lower the rule's rank")
            fixed[name] = value
    free = {n: s for n, s in candidates.items() if n not in fixed}
    ranks = {n: r for n, r in fixed.items() if r is not None}
    if cfg.target is not None and free:
        dense_total = sum(o * i for o, i in shapes.values())
        kept_fixed = sum(o * i if fixed[n] is None else fixed[n] * (o + i) for n, (o, i) in shapes.items() if n in fixed)
        kept_fixed += sum(o * i for n, (o, i) in shapes.items() if n not in candidates)
        free_total = sum(o * i for o, i in free.values())
        keep = ((1.0 - cfg.target) * dense_total - kept_fixed) / free_total
        if keep <= 0.0:
            raise UserInputError(
                f"ranks.target={cfg.target} cannot be reached: the rules and exclusions already keep "
                f"{kept_fixed / dense_total:.1%} of the parameters; lower the target or the rules' ranks"
            )
        for name, (out_f, in_f) in free.items():
            ranks[name] = _rank_for_fraction(min(keep, 1.0), out_f, in_f)
    kept_dense = []
    for name in list(ranks):
        out_f, in_f = shapes[name]
        r = ranks[name]
        if cfg.rank_multiple > 1 and r >= cfg.rank_multiple:
            r = r // cfg.rank_multiple * cfg.rank_multiple
        ranks[name] = r
        if r >= break_even_rank(out_f, in_f):
            kept_dense.append(name)
            del ranks[name]
    if kept_dense:
        warnings.warn(
            f"{len(kept_dense)} linear(s) stay dense because their rank is at or above the break-even rank "
            f"m*n/(m+n), where factors save nothing (e.g. {kept_dense[0]})",
            stacklevel=2,
        )
    return RankPlan(ranks=dict(sorted(ranks.items(), key=lambda kv: _natural_key(kv[0]))), shapes=shapes)


def _natural_key(name: str) -> list[object]:
    return [int(s) if s.isdigit() else s for s in name.split(".")]
