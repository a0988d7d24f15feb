"""Mixture-of-experts layers: each expert's projections as rank-plan candidates, routed statistics, starved experts.

transformers 5 keeps all experts of a layer in one fused module (``gate_up_proj (E, 2I, H)``,
``down_proj (E, H, I)``). The planner sees every expert's projection as a matrix of its own, named like
a linear (``model.layers.0.mlp.experts.3.gate_proj``), so rank rules address experts with the usual
patterns (``layers.*.mlp.experts.*.down_proj``). The compressed model holds one ``LowRankExperts`` per
fused module with one rank per projection for all its experts (one batched matmul per factor); the
saved rank format names that projection without an expert index (``model.layers.0.mlp.experts.down_proj``).

pca and whiten factor each expert with the statistics of the tokens the router sends to it. An expert
that receives fewer than ``ranks.min_expert_tokens`` calibration tokens gets the plain SVD instead and is
not trained: too few tokens describe neither its inputs nor its outputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distill_lr.distributed import block_owners, group
from distill_lr.errors import UserInputError
from distill_lr.layerwise import hooks_removed
from distill_lr.modeling.lowrank import (
    EXPERT_PROJECTIONS,
    ExpertLinears,
    LowRankExperts,
    expert_blocks,
    grouping,
    is_fused_experts,
    replace_experts_,
)
from distill_lr.moments import Moments, records_outputs


def fused_experts(module: nn.Module) -> dict[str, nn.Module]:
    """The fused experts modules under ``module`` that can be compressed, by name."""
    found = {}
    for name, m in module.named_modules():
        if is_fused_experts(m):
            found[name] = m
        elif isinstance(getattr(m, "gate_up_proj", None), nn.Parameter):
            warnings.warn(f"experts module {name} ({type(m).__name__}) has a layout distill_lr cannot factor: it stays dense", stacklevel=2)
    return found


def expert_shapes(layer: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every expert's gate/up/down projection, named ``<experts>.<index>.<projection>``."""
    shapes = {}
    for path, experts in fused_experts(layer).items():
        num_experts, double_inter, hidden = experts.gate_up_proj.shape
        sizes = {"gate_proj": (double_inter // 2, hidden), "up_proj": (double_inter // 2, hidden), "down_proj": (hidden, double_inter // 2)}
        shapes.update({f"{path}.{e}.{proj}": sizes[proj] for e in range(num_experts) for proj in EXPERT_PROJECTIONS})
    return shapes


def expert_group(name: str) -> str:
    """``<experts>.<projection>`` for an expert's projection (``...experts.3.down_proj``), else the name itself."""
    head, _, projection = name.rpartition(".")
    path, _, index = head.rpartition(".")
    return f"{path}.{projection}" if projection in EXPERT_PROJECTIONS and index.isdigit() else name


def module_ranks(ranks: dict[str, int], experts: dict[str, nn.Module]) -> dict[str, int]:
    """The plan's per-expert ranks as the modules hold them: one rank per projection of each experts module.

    Raises UserInputError when the rules give the experts of one module different ranks for a projection.
    """
    out: dict[str, int] = {}
    grouped: dict[str, dict[int, int]] = {}
    for name, rank in ranks.items():
        head, _, projection = name.rpartition(".")
        path, _, index = head.rpartition(".")
        if path in experts and index.isdigit() and projection in EXPERT_PROJECTIONS:
            grouped.setdefault(f"{path}.{projection}", {})[int(index)] = rank
            out.setdefault(f"{path}.{projection}", rank)
        else:
            out[name] = rank
    for name, per_expert in grouped.items():
        path, _, projection = name.rpartition(".")
        num_experts = experts[path].gate_up_proj.shape[0]
        values = [per_expert.get(e) for e in range(num_experts)]
        if len(set(values)) > 1:
            odd = next(e for e, v in enumerate(values) if v != values[0])
            raise UserInputError(
                f"the rank rules give the experts of {path} different {projection} ranks (expert 0: {values[0] or 'dense'}, "
                f"expert {odd}: {values[odd] or 'dense'}): all experts of one layer share a rank per projection; make the rules agree"
            )
    return out


def unfuse_experts_(layer: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Swap each fused experts module with a projection in ``names`` for a dense ``LowRankExperts`` computing the same."""
    wanted = {name.rpartition(".")[0] for name in names}
    return replace_experts_(layer, lambda _, experts: LowRankExperts.from_experts(experts), lambda name, _: name in wanted)


@dataclass
class Routing:
    """What ``record_routing`` saw: tokens per expert of each ``LowRankExperts``, and per-expert moments.

    With several processes (``spread``) an expert's moments are whole in its owner (``distributed.block_owners``), over every
    process's tokens, and None in the others; the token counts are each process's own until ``stats.reduce_stats_``."""

    tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # experts module -> (E,) token counts
    stats: dict[str, list[Moments | None]] = field(default_factory=dict)  # projection -> per expert; None: starved or not ours
    spread: bool = False

    def moment_bytes(self, path: str) -> int:
        """The bytes of the experts module's moments this process holds."""
        held = {id(m): m for name, ms in self.stats.items() if name.rpartition(".")[0] == path for m in ms if m is not None}
        return sum(m.sum_xxT.nbytes + m.sum_x.nbytes for m in held.values())


class ToOwners:
    """Expert parallelism for the statistics: each batch's rows routed to an expert go to the process that owns it, in one
    exchange per experts module and batch, and update the expert's moments there in process order. Only the owner holds
    them: a process keeps the moments of its own experts, not of all."""

    def __init__(self, routing: Routing, widths: dict[str, int], kept: dict[str, set[int]], paths: list[str], batches: int) -> None:
        self.g, self.routing, self.widths, self.kept = group(), routing, widths, kept
        self.paths = paths  # the experts modules in the layer's order (that of its forward)
        self.outbox: dict[tuple[str, int], torch.Tensor] = {}
        self.flushes = 0
        self.most = max(self.g.gather_ints(batches)) if widths else 0  # the exchanges every process takes part in

    def post(self, name: str, expert: int, rows: torch.Tensor) -> None:
        if expert in self.kept[name]:
            self.outbox[name, expert] = rows

    def flush(self, path: str, dtype: torch.dtype, device: torch.device) -> None:
        """Exchange one batch's rows of the experts module ``path`` (every process calls it, in the same order)."""
        names = sorted(name for name in self.widths if name.rpartition(".")[0] == path)  # one order in every process
        owner = block_owners(len(self.routing.stats[names[0]]), self.g.world)
        to = [[(n, e) for n in names for e in sorted(self.kept[n]) if owner[e] == r] for r in range(self.g.world)]
        rows = {key: self.outbox.pop(key, None) for keys in to for key in keys}
        counts = [torch.tensor([0 if rows[key] is None else len(rows[key]) for key in keys], dtype=torch.int64) for keys in to]
        mine = to[self.g.rank]
        got = [c.tolist() for c in self.g.all_to_all(counts, [len(mine)] * self.g.world)]
        none = torch.empty(0, dtype=dtype, device=device)
        data = [torch.cat([none] + [rows[key].reshape(-1).to(dtype) for key in keys if rows[key] is not None]) for keys in to]
        sizes = [[n * self.widths[name] for n, (name, _) in zip(c, mine, strict=True)] for c in got]
        for part, split in zip(self.g.all_to_all(data, [sum(s) for s in sizes]), sizes, strict=True):
            for (name, e), block in zip(mine, part.split(split), strict=True):
                stats = self.routing.stats[name][e]
                if block.numel() and stats is not None:
                    stats.update(block.view(-1, self.widths[name]))
        self.flushes += 1

    def pad(self, dtype: torch.dtype, device: torch.device) -> None:
        """Empty exchanges for the batches this process did not have: the blocks of sequences differ by one at most, the
        number of batches may too, and every process takes part in every exchange."""
        for _ in range(self.most - self.flushes // max(1, len(self.paths))):  # each batch flushes every experts module
            for path in self.paths:
                self.flush(path, dtype, device)


def _moment_slots(
    modules: dict[str, nn.Module], names: list[str], routing: Routing, device: torch.device, inputs: bool, experts: list[int] | None
) -> tuple[dict[str, int], dict[str, set[int]], set[str]]:
    """Give ``routing`` the empty moments of each named projection's kept experts (``experts``, default all) that this
    process owns; gate and up share one set where they record the same input. Returns, per projection to hook, the width
    of what it records and its kept experts, and which projections record their outputs. ``names`` in one order
    everywhere."""
    g = group()
    widths: dict[str, int] = {}
    kept: dict[str, set[int]] = {}
    of_outputs: set[str] = set()
    for name in names:
        parent, _, projection = name.rpartition(".")
        twin = f"{parent}.{'up_proj' if projection == 'gate_proj' else 'gate_proj'}"
        module = modules[name]
        outputs = not inputs and records_outputs(module.out_features, module.in_features)
        if projection != "down_proj" and not outputs and twin in routing.stats:
            routing.stats[name] = routing.stats[twin]  # gate and up see the same tokens: one set of input moments
            continue
        widths[name] = module.out_features if outputs else module.in_features
        of_outputs |= {name} if outputs else set()
        kept[name] = set(range(module.num_experts) if experts is None else experts)
        owner = block_owners(module.num_experts, g.world)
        routing.stats[name] = [
            Moments.empty(widths[name], device, of_outputs=outputs) if e in kept[name] and owner[e] == g.rank else None
            for e in range(module.num_experts)
        ]
    return widths, kept, of_outputs


@contextmanager
def record_routing(
    layer: nn.Module, names: list[str], device: torch.device, batches: int, inputs: bool = False, experts: list[int] | None = None
) -> Iterator[Routing]:
    """While active, count the tokens routed to each expert and collect the named projections' per-expert moments.

    A projection sees the tokens grouped per expert (sorted, or zero-padded to a common length: ``expert_blocks``);
    the experts module's own routing (``top_k_index``) says how many rows of each expert are real. A projection with fewer
    outputs than inputs (Mixtral's down) records the moments of its outputs (``moments.records_outputs``),
    unless ``inputs`` asks for input moments everywhere (GPTQ's Hessians). With ``experts``, only those experts' moments
    are kept (the others' are None): the memory of a few experts' moments, not of all. With several processes each
    expert's moments are recorded by its owner alone (``ToOwners``), over the ``batches`` forwards of the layer each
    process runs while active.
    """
    modules = dict(layer.named_modules())
    routing = Routing(spread=group().world > 1)
    widths, kept, of_outputs = _moment_slots(modules, sorted(names), routing, device, inputs, experts)
    paths = [path for path in modules if any(name.rpartition(".")[0] == path for name in widths)]
    mail, dtype = ToOwners(routing, widths, kept, paths, batches) if routing.spread else None, next(layer.parameters()).dtype
    current: dict[str, list[int]] = {}

    def count(path: str, module: LowRankExperts, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        counts = module.token_counts(args[1] if len(args) > 1 else kwargs["top_k_index"])
        current[path] = counts.tolist()
        routing.tokens[path] = routing.tokens.get(path, 0) + counts.cpu()

    def collect(name: str, grouped: torch.Tensor, offsets: torch.Tensor | None) -> None:
        for e, rows in enumerate(expert_blocks(grouped, offsets, current[name.rpartition(".")[0]])):
            if mail is not None and len(rows):
                mail.post(name, e, rows)
            elif len(rows) and routing.stats[name][e] is not None:
                routing.stats[name][e].update(rows)

    hooks = [
        m.register_forward_pre_hook(lambda mod, args, kwargs, path=path: count(path, mod, args, kwargs), with_kwargs=True)
        for path, m in modules.items()
        if isinstance(m, LowRankExperts)
    ]
    hooks += [
        modules[n].register_forward_hook(lambda _m, args, out, n=n: collect(n, out if n in of_outputs else args[0], grouping(args)))
        for n in widths
    ]
    if mail is not None:
        hooks += [modules[path].register_forward_hook(lambda *_, path=path: mail.flush(path, dtype, device)) for path in paths]
    with hooks_removed(hooks):
        yield routing
        if mail is not None:
            mail.pad(dtype, device)


def drop_starved_(routing: Routing, min_tokens: int, where: str) -> dict[str, dict[str, Any]]:
    """Forget the statistics of experts with fewer than ``min_tokens`` tokens (they get the SVD); the per-layer report."""
    report = {}
    for path, counts in routing.tokens.items():
        tokens = [int(n) for n in counts]
        starved = [e for e, n in enumerate(tokens) if n < min_tokens]
        for name, per_expert in routing.stats.items():
            if name.rpartition(".")[0] == path:
                for e in starved:
                    per_expert[e] = None
        if starved:
            warnings.warn(
                f"{where} {path}: experts {starved} received fewer than {min_tokens} calibration tokens "
                f"({', '.join(str(tokens[e]) for e in starved)}): they keep the SVD initialisation and are not trained; "
                "use more calibration data or lower ranks.min_expert_tokens",
                stacklevel=2,
            )
        report[path] = {"tokens": tokens, "starved": starved}
    return report


def freeze_experts(modules: dict[str, nn.Module], frozen: dict[str, list[int]]) -> list[torch.utils.hooks.RemovableHandle]:
    """Zero the gradients of the listed experts' factors (``{experts module: [expert, ...]}``), so they keep their init."""
    hooks = []
    for name, module in modules.items():
        experts = frozen.get(name.rpartition(".")[0])
        if isinstance(module, ExpertLinears) and experts:
            mask = torch.ones(module.num_experts, 1, 1, device=module.A.device)
            mask[experts] = 0.0
            hooks += [p.register_hook(lambda grad, mask=mask: grad * mask) for p in (module.A, module.B)]
    return hooks
