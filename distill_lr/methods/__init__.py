"""Compression methods as plug-ins: each is one module with ``build(cfg) -> Method``, registered here by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from distill_lr.errors import check
from distill_lr.methods import distill, pca, qlr, quantize, svd, whiten
from distill_lr.methods.base import Method
from distill_lr.methods.e2e import EndToEnd
from distill_lr.schema import CompressConfig

REGISTRY: dict[str, Callable[[CompressConfig], Method]] = {
    "svd": svd.build,
    "pca": pca.build,
    "whiten": whiten.build,
    "distill": distill.build,
    "qlr": qlr.build,
    "dense": lambda _cfg: Method("dense", (), {"method": "dense"}, factorizes=False),  # with quant.bits: quantization alone
}


def get_method(cfg: CompressConfig) -> Method:
    """The method ``cfg.method`` names, built for this config."""
    check(cfg.method in REGISTRY, f"method '{cfg.method}' is unknown: use one of {tuple(REGISTRY)}")
    method = REGISTRY[cfg.method](cfg)
    if cfg.e2e.enabled:  # any method's layers may be trained end to end afterwards
        method = replace(method, stages=(*method.stages, EndToEnd()), info={**method.info, "e2e": True})
    if cfg.quant.bits is not None:  # any method's layers may be quantized once built
        method = quantize.with_quantization(method, cfg)
    return method
