"""``dense``: no low rank; with ``quant.bits`` the run is quantization alone (every chosen linear, by GPTQ or rounding)."""

from distill_lr.errors import check
from distill_lr.methods.base import Method
from distill_lr.schema import CompressConfig


def build(cfg: CompressConfig) -> Method:
    check(cfg.quant.bits is not None, "method=dense needs quant.bits (2, 3, 4 or 8): without it the run changes nothing")
    return Method("dense", (), {"method": "dense"}, factorizes=False, quant_targets_auto="dense")
