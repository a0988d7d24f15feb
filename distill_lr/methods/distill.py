"""``distill``: factors from ``init``, then trained so that the decoder layer reproduces the dense layer's outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from distill_lr.methods.base import Factorize, LayerStep, LayerWork, Method
from distill_lr.schema import CompressConfig
from distill_lr.train import distill_layer, factor_modules


@dataclass(frozen=True)
class Distill(LayerStep):
    """Feature distillation of the whole layer on ``X_t -> Y`` and ``X_s -> Y`` (``distill_lr.train``)."""

    name: ClassVar[str] = "train"
    data_parallel: ClassVar[bool] = True

    def run(self, work: LayerWork) -> None:
        if not factor_modules(work.layer):
            return
        cfg = work.cfg
        frozen = {path: r["starved"] for path, r in (work.report.experts or {}).items()}
        seed = cfg.seed * 100_003 + work.index
        result = distill_layer(work.layer, work.x_teacher, work.x_student, work.y, work.kwargs, cfg.train, seed=seed, frozen_experts=frozen)
        work.report.train = result.summary()


def build(cfg: CompressConfig) -> Method:
    return Method("distill", (Factorize(cfg.init), Distill()), {"method": "distill", "init": cfg.init})
