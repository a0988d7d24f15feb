"""distill_lr: compress Hugging Face causal LMs by layer-wise low-rank feature distillation.

The public names are imported on first use, so ``import distill_lr.modeling.lowrank`` stays light.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {
    "compress": "distill_lr.driver",
    "load_compressed": "distill_lr.checkpoint.compressed",
    "export_dense": "distill_lr.checkpoint.export",
    "export": "distill_lr.checkpoint.export",
    "load_config": "distill_lr.config",
    "CompressConfig": "distill_lr.schema",
    "UserInputError": "distill_lr.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'distill_lr' has no attribute {name!r}")
