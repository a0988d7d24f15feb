"""Group-wise integer quantization of a weight ``W (out, in)``: round-to-nearest and GPTQ, as pure functions.

The grid follows compressed-tensors (what llm-compressor writes and vLLM reads): symmetric, ``scale =
max|w| / ((2^b − 1) / 2)`` with codes ``round(w / scale)`` clamped to ``[−2^(b−1), 2^(b−1) − 1]``;
asymmetric, ``scale = (max − min) / (2^b − 1)`` over a range that includes 0, with an integer zero point.
Codes are stored unsigned (``code + 2^(b−1)`` when symmetric). The scales are rounded to their storage
dtype before any weight is rounded, so what is saved is exactly what was optimised.

GPTQ (Frantar et al. 2022) rounds one column at a time and spreads each column's rounding error over the
columns not yet rounded, through the inverse of the input second moment ``H = E[x xᵀ]``, so the output
error ``E‖(W − Ŵ) x‖²`` is far below round-to-nearest's. The grid (scales, zeros) is fixed from the
weight before the updates, and the columns go in order of decreasing ``H_ii`` (activation order), as
llm-compressor's static activation ordering does; the groups stay contiguous in the original columns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import Tensor

from distill_lr.modeling.lowrank import QuantExpertLinears, QuantLinear, group_columns, pack_codes

BITS = (2, 3, 4, 8)
M = TypeVar("M", bound=QuantLinear)
GPTQ_BLOCK = 128  # columns whose updates are applied together (the result does not depend on it)


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    def groups(self, in_features: int) -> int:
        return -(-in_features // self.group_size)

    def bytes(self, out_features: int, in_features: int, scale_bytes: int) -> int:
        """Storage of one quantized weight: packed codes, scales and (asymmetric) zero points."""
        per_group = scale_bytes + (0 if self.symmetric else 1)
        return out_features * (-(-in_features // 8) * self.bits + self.groups(in_features) * per_group)


@dataclass
class Quantized:
    """A quantized weight: unsigned codes ``(out, in)``, per-group scales and zero points ``(out, groups)``."""

    codes: Tensor  # uint8
    scale: Tensor  # float32, values representable in the storage dtype
    zero: Tensor  # float32 integers
    spec: QuantSpec

    def dequantized(self) -> Tensor:
        n = self.codes.shape[1]
        g = self.spec.group_size
        return (self.codes.float() - group_columns(self.zero, g, n)) * group_columns(self.scale, g, n)

    def to(self, device: torch.device) -> Quantized:
        return replace(self, codes=self.codes.to(device), scale=self.scale.to(device), zero=self.zero.to(device))

    @classmethod
    def stacked(cls, parts: list[Quantized]) -> Quantized:
        """Weights quantized one by one (each on its own grid) as one, their rows stacked: the experts of a projection."""
        return cls(*(torch.cat([getattr(q, f) for q in parts]) for f in ("codes", "scale", "zero")), parts[0].spec)

    def module(self, bias: Tensor | None, dtype: torch.dtype) -> QuantLinear:
        """A ``QuantLinear`` holding these integers, its scales and bias in ``dtype``."""
        out_features, in_features = self.codes.shape
        s = self.spec
        module = QuantLinear(in_features, out_features, s.bits, s.group_size, s.symmetric, bias is not None, self.codes.device, dtype)
        if bias is not None:
            module.bias.data.copy_(bias)
        return self.fill_(module)

    def expert_module(self, num_experts: int, dtype: torch.dtype) -> QuantExpertLinears:
        """A ``QuantExpertLinears`` holding these stacked integers (``stacked``) of ``num_experts`` experts, scales in ``dtype``."""
        rows, in_features = self.codes.shape
        s = self.spec
        module = QuantExpertLinears(
            num_experts, in_features, rows // num_experts, s.bits, s.group_size, s.symmetric, self.codes.device, dtype
        )
        return self.fill_(module)

    def fill_(self, module: M) -> M:
        """Copy the integers, scales and zeros into ``module`` (a ``QuantLinear`` of their shape)."""
        module.qweight.copy_(pack_codes(self.codes, self.spec.bits))
        module.scale.copy_(self.scale)
        if not self.spec.symmetric:
            module.zero.copy_(self.zero)
        return module


def grid(W: Tensor, spec: QuantSpec, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-group ``(scale, zero)`` of W, ``(out, groups)`` float32, the scales rounded to ``scale_dtype``."""
    out_features, in_features = W.shape
    g = min(spec.group_size, in_features)  # a group wider than the row is the row
    padded = torch.nn.functional.pad(W.float(), (0, -in_features % g)).view(out_features, -1, g)  # zeros change no range below
    top = (1 << spec.bits) - 1
    if spec.symmetric:
        scale = padded.abs().amax(-1) / (top / 2)
        zero = torch.full_like(scale, float(1 << (spec.bits - 1)))
    else:
        low, high = padded.amin(-1).clamp(max=0), padded.amax(-1).clamp(min=0)
        scale = (high - low) / top
    tiny = torch.finfo(scale_dtype).tiny if scale_dtype.is_floating_point else 1e-30
    scale = scale.clamp_min(max(tiny, 1e-12)).to(scale_dtype).float()
    if not spec.symmetric:
        zero = torch.round(-low / scale).clamp(0, top)
    return scale, zero


def _round(w: Tensor, scale: Tensor, zero: Tensor, top: int) -> Tensor:
    return torch.round(w / scale + zero).clamp(0, top)


def rtn(W: Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float32) -> Quantized:
    """Round to nearest on the group-wise grid."""
    scale, zero = grid(W, spec, scale_dtype)
    n = W.shape[1]
    codes = _round(W.float(), group_columns(scale, spec.group_size, n), group_columns(zero, spec.group_size, n), (1 << spec.bits) - 1)
    return Quantized(codes.to(torch.uint8), scale, zero, spec)


def _inverse_cholesky(H: Tensor, damping: float) -> Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, λ = damping · mean(diag H): GPTQ's update directions."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    lam = damping * H.diagonal().mean().clamp_min(1e-12)
    L = torch.linalg.cholesky(H + lam * eye)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def gptq(
    W: Tensor, H: Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float32, damping: float = 0.01, act_order: bool = True
) -> Quantized:
    """GPTQ on the group-wise grid of W, with ``H`` the second moment ``E[x xᵀ]`` of its inputs (any positive scale).

    Inputs that never fire (``H_ii = 0``) get a unit diagonal: their columns are rounded, nothing is propagated.
    """
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"H must be ({W.shape[1]}, {W.shape[1]}) for a {tuple(W.shape)} weight, got {tuple(H.shape)}")
    n, top = W.shape[1], (1 << spec.bits) - 1
    scale, zero = grid(W, spec, scale_dtype)
    H = H.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(n, device=W.device)
    U = _inverse_cholesky(H[order][:, order], damping).float()
    work = W.float()[:, order].clone()
    col_scale = group_columns(scale, spec.group_size, n)[:, order]
    col_zero = group_columns(zero, spec.group_size, n)[:, order]
    codes = torch.empty_like(work)
    for i1 in range(0, n, GPTQ_BLOCK):
        i2 = min(i1 + GPTQ_BLOCK, n)
        block, errors = work[:, i1:i2], torch.empty_like(work[:, i1:i2])
        for j in range(i2 - i1):
            c = i1 + j
            q = _round(block[:, j], col_scale[:, c], col_zero[:, c], top)
            codes[:, c] = q
            err = (block[:, j] - (q - col_zero[:, c]) * col_scale[:, c]) / U[c, c]
            block[:, j + 1 :] -= err[:, None] * U[c, c + 1 : i2][None]
            errors[:, j] = err
        work[:, i2:] -= errors @ U[i1:i2, i2:]
    return Quantized(codes[:, torch.argsort(order)].to(torch.uint8), scale, zero, spec)


def output_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """Relative output error ``E‖(W − Ŵ) x‖² / E‖W x‖²`` over inputs of second moment H."""
    W64, D = W.double(), (W.double() - W_hat.double())
    H = H.double()
    return float(((D @ H) * D).sum() / ((W64 @ H) * W64).sum().clamp_min(1e-300))
