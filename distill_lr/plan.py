"""The rank plan of a run: from the rules alone, or from a loss-aware allocation over the streamed pre-pass's measurements."""

from __future__ import annotations

import logging
import warnings
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from distill_lr import prepass
from distill_lr.allocation import kept_fractions
from distill_lr.checkpoint.reader import CheckpointReader
from distill_lr.data import TokenSets
from distill_lr.methods.base import Method
from distill_lr.ranks import RankPlan, free_matrices, layer_index, linear_shapes, needs_prepass, plan_ranks
from distill_lr.report import describe_kept, describe_plan
from distill_lr.runtime import PhaseLog, overflow_message
from distill_lr.schema import CompressConfig

log = logging.getLogger("distill_lr")


def plan_layers(
    cfg: CompressConfig,
    method: Method,
    reader: CheckpointReader,
    model: PreTrainedModel,
    stack: tuple[str, nn.ModuleList],
    tokens: TokenSets,
    compute: tuple[torch.device, torch.dtype],
    saved: dict[str, int] | None,
) -> tuple[RankPlan, dict[str, Any]]:
    """The rank plan, after the loss-aware pre-pass when the allocation needs one (``saved``: the plan a resumed run recorded), and
    its record (``driver.RUN_FACTS`` only in report.json)."""
    (prefix, layers), name_prefix = stack, stack[0][: -len("layers.")]
    shapes = linear_shapes(layers, prefix)
    record: dict[str, Any] = {"allocation": cfg.ranks.allocation if cfg.ranks.target is not None else "rules"}
    if not method.factorizes:
        plan = RankPlan(ranks={}, shapes=shapes)
        record["allocation"] = f"none (method {method.name})"
    elif needs_prepass(cfg.ranks):
        ids = tokens.calibration[: cfg.ranks.allocation_sequences]
        record["prepass_sequences"] = len(ids)
        if saved is not None:
            plan = RankPlan(ranks=saved, shapes=shapes)
            record["reused"] = True
        else:
            phases = PhaseLog(compute[0])
            with phases("prepass"):
                plan = measured_plan(cfg, (model, reader, prefix, layers), shapes, ids, compute)
            record["prepass_seconds"], record["prepass_peak_gib"] = phases.seconds["prepass"], phases.peak_gib["prepass"]
    else:
        plan = plan_ranks(shapes, cfg.ranks, name_prefix)
    record["kept"] = kept_fractions(shapes, plan.ranks, {n: layer_index(n[len(name_prefix) :]) for n in shapes})
    log.info("%s\n%s", describe_plan(plan), describe_kept(record["kept"]))
    return plan, record


def measured_plan(
    cfg: CompressConfig,
    source: tuple[PreTrainedModel, CheckpointReader, str, nn.ModuleList],
    shapes: dict[str, tuple[int, int]],
    ids: torch.Tensor,
    compute: tuple[torch.device, torch.dtype],
) -> RankPlan:
    """The loss-aware plan from the pre-pass's measurements on ``ids``."""
    model, reader, prefix, layers = source
    if len(ids) < cfg.ranks.allocation_sequences:
        warnings.warn(
            f"ranks.allocation_sequences={cfg.ranks.allocation_sequences} is more than the {len(ids)} calibration sequences "
            f"(data.num_sequences): the pre-pass measures on all {len(ids)}",
            stacklevel=3,
        )
    name_prefix = prefix[: -len("layers.")]
    free = free_matrices(shapes, cfg.ranks, name_prefix)
    overflow = partial(overflow_message, compute[1])
    sensitivity = prepass.measure(model, reader, prefix, layers, free, ids, compute, cfg.batch_size, overflow)
    return plan_ranks(shapes, cfg.ranks, name_prefix, sensitivity)
