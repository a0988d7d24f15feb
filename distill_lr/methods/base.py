"""The method interface: how a layer's student is built and trained, as a sequence of per-layer steps.

A method is a name, the steps it runs on each fresh decoder layer (in order, each timed under its
own name), what ``config.json`` records of it, and how a saved layer is set up again to receive its
factors. A step reads and changes a ``LayerWork``: the layer, its ranks, the calibration streams and
the layer's report. The steps every current method is made of live here; a new method is one file
with a ``build(cfg) -> Method`` and one entry in ``distill_lr.methods.REGISTRY``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from distill_lr import distributed, moe
from distill_lr.factorize import INITS, factorization_cost, factorize_layer_
from distill_lr.layerwise import LayerKwargs
from distill_lr.modeling.hf_modeling import apply_compressed_
from distill_lr.modeling.lowrank import ExpertLinears
from distill_lr.report import LayerReport
from distill_lr.schema import CompressConfig
from distill_lr.stages.base import RunStage
from distill_lr.stats import collect_stats, reduce_stats_


@dataclass
class LayerWork:
    """One decoder layer being compressed, as a method's steps see it."""

    index: int
    layer: nn.Module  # dense on entry, the student once the steps are done
    ranks: dict[str, int]  # module name (relative to the layer) -> rank
    x_teacher: torch.Tensor  # the dense layers' inputs
    x_student: torch.Tensor  # the compressed layers' inputs
    y: torch.Tensor  # the dense layer's outputs on x_teacher: the target
    kwargs: LayerKwargs
    cfg: CompressConfig
    report: LayerReport
    save_dtype: torch.dtype  # of the layer's file: quantization scales are rounded to it before use


class LayerStep(ABC):
    """One step of a method on one decoder layer."""

    name: ClassVar[str]  # its key in the layer's timings
    data_parallel: ClassVar[bool] = False  # runs with the sequences spread over processes (``distill_lr.distributed``)

    def check(self, cfg: CompressConfig, layers: nn.ModuleList) -> None:  # noqa: B027 (optional hook)
        """Before anything is written (``layers`` dense, on meta): refuse what the step could not do, warn of what it would waste."""

    @abstractmethod
    def run(self, work: LayerWork) -> None:
        """Change ``work.layer`` (and record in ``work.report``) in place."""


@dataclass(frozen=True)
class Factorize(LayerStep):
    """Swap the chosen linears and expert projections for factor pairs from a training-free factorisation."""

    init: str  # one of distill_lr.factorize.INITS
    name: ClassVar[str] = "init"
    data_parallel: ClassVar[bool] = True

    def run(self, work: LayerWork) -> None:
        cfg, layer, ranks = work.cfg, work.layer, work.ranks
        moe.unfuse_experts_(layer, ranks)
        names = list(ranks) if INITS[self.init].needs_moments else []
        stats, routing = collect_stats(layer, names, work.x_student, work.kwargs, cfg.batch_size)
        reduce_stats_(stats, routing)
        if routing.tokens:
            held = {path: max(distributed.group().gather_ints(routing.moment_bytes(path))) for path in sorted(routing.tokens)}
            work.report.experts = moe.drop_starved_(routing, cfg.ranks.min_expert_tokens, where=f"layer {work.index}")
            for path, entry in work.report.experts.items():
                entry["moment_bytes_per_process"] = held[path]  # the most any process held: a share under expert parallelism
        factorize_spread_(layer, ranks, self.init, stats)


def factorize_spread_(layer: nn.Module, ranks: dict[str, int], init: str, stats: dict[str, Any]) -> None:
    """``factorize_layer_`` with each matrix's factorisation done by one process and broadcast: an expert's by the owner of
    its moments (``distributed.block_owners``), a linear's bin-packed by its cost onto the least loaded process."""
    g = distributed.group()
    if g.world == 1:
        factorize_layer_(layer, ranks, init, stats)
        return
    modules = dict(layer.named_modules())
    costs, fixed = {}, {}
    for name in ranks:
        module = modules[name]
        experts = range(module.num_experts) if isinstance(module, ExpertLinears) else []
        for e, r in zip(experts, distributed.block_owners(len(experts), g.world), strict=True):
            costs[f"{name}:{e}"], fixed[f"{name}:{e}"] = factorization_cost(module), r
        if not experts:
            costs[name] = factorization_cost(module)
    owner = distributed.owners(costs, g.world, fixed)
    factorize_layer_(layer, ranks, init, stats, mine=lambda job: owner[job] == g.rank)
    modules = dict(layer.named_modules())
    for name in sorted(ranks):
        module = modules[name]
        if not isinstance(module, ExpertLinears):
            g.broadcast_(list(module.state_dict().values()), owner[name])
            continue
        for r, block in enumerate(distributed.blocks(module.num_experts, g.world)):  # each owner's experts, in one message
            if block.stop > block.start:
                g.broadcast_([module.A.detach()[block], module.B.detach()[block]], r)


@dataclass(frozen=True)
class Method:
    """A named sequence of per-layer steps, then stages after the loop; ``info`` is what ``config.json`` records of it."""

    name: str
    steps: tuple[LayerStep, ...]
    info: dict[str, Any] = field(default_factory=dict)
    stages: tuple[RunStage, ...] = ()
    factorizes: bool = True  # False: the method replaces no linear by a factor pair of ranks.* (no rank plan is made)
    quant_targets_auto: str = "both"  # what quant.targets=auto quantizes after the steps: "both" (factors and dense linears), "dense"
    quantizes_dense: bool = False  # the steps quantize the dense linears themselves (quant.*): the quantization step leaves them
    # float parameters the steps add outside the rank plan (qlr's corrections), from the config and the dense layers:
    # the end-to-end stage trains them, and its memory estimate counts them
    added_params: Callable[[CompressConfig, nn.ModuleList], int] | None = None

    def prepare_resumed(self, layer: nn.Module, ranks: dict[str, int], report: LayerReport) -> None:
        """Give a dense layer the modules its saved state fills (the same as loading the checkpoint does)."""
        apply_compressed_(layer, ranks, report.quant)


def training_free(init: str) -> Callable[[CompressConfig], Method]:
    """The builder of the method that only factorises, with the factorisation of the same name."""
    return lambda _cfg: Method(init, (Factorize(init),), {"method": init, "init": init})
