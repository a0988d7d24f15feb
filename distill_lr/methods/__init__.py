"""Compression methods as plug-ins: each is one module with ``build(cfg) -> Method``, registered here by name.

A method from outside the package registers itself with ``register(name, build)`` before ``load_config`` sees its
name. Its ``build`` checks the settings it depends on (a ``UserInputError`` naming the fix), so that a bad
combination fails when the config is loaded, before any weight is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from distill_lr.errors import check
from distill_lr.methods import basis_selection, dense, distill, pca, qlr, quantize, svd, whiten
from distill_lr.methods.base import Method
from distill_lr.schema import CompressConfig
from distill_lr.stages.e2e import EndToEnd

Builder = Callable[[CompressConfig], Method]
REGISTRY: dict[str, Builder] = {
    "svd": svd.build,
    "pca": pca.build,
    "whiten": whiten.build,
    "distill": distill.build,
    "qlr": qlr.build,
    "dense": dense.build,
    "basis_selection": basis_selection.build,
}


def register(name: str, build: Builder) -> None:
    """Make ``method=<name>`` build with ``build``; a name already taken is refused (a plug-in never replaces another)."""
    check(name not in REGISTRY, f"method '{name}' is registered already: choose another name")
    REGISTRY[name] = build


def get_method(cfg: CompressConfig) -> Method:
    """The method ``cfg.method`` names, built for this config."""
    check(cfg.method in REGISTRY, f"method '{cfg.method}' is unknown: use one of {tuple(REGISTRY)}")
    method = REGISTRY[cfg.method](cfg)
    if cfg.e2e.enabled:  # any method's layers may be trained end to end afterwards (as it is, unless it says how)
        stages = method.stages if any(s.name == EndToEnd.name for s in method.stages) else (*method.stages, EndToEnd())
        method = replace(method, stages=stages, info={**method.info, "e2e": True})
    if cfg.quant.bits is not None:  # any method's layers may be quantized once built
        method = quantize.with_quantization(method, cfg)
    return method
