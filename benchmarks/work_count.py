"""Counted work per phase of a run: FLOPs and bytes of every tensor operation, attributed to the driver's phases.

``PhaseWork`` is a ``TorchDispatchMode`` that listens to ``distill_lr.runtime.PHASE_LISTENERS``: every aten
operation that runs on the calling thread is charged to the phase in progress (``other`` outside one).
FLOPs of matrix products and attention come from torch's own FLOP counter formulas (``flop_counter``),
extended here to grouped matmuls and the CPU attention kernels it does not know; FLOPs of the linear
algebra solvers are textbook counts (Golub & Van Loan, *Matrix Computations*), since no library counts
those: ``eigh`` 9n³ with vectors and 4n³/3 without, SVD 6mn² + 20n³ with vectors and 4mn² − 4n³/3
without (m ≥ n), Cholesky n³/3, a triangular solve n²k, an inverse from Cholesky 2n³/3, QR 2mn² − 2n³/3.
Bytes are each non-view operation's tensor inputs plus outputs: the traffic of an unfused execution,
an upper bound on what the memory has to move. Causal attention is counted in full (L × S scores).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distill_lr.runtime import PHASE_LISTENERS

aten = torch.ops.aten
Shape = tuple[int, ...]


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, *_args: Any, out: torch.Tensor, **_kwargs: Any) -> int:
    """2·(output elements)·(summed dimension): rows split by expert (2d × 3d) or the summed dimension split (2d × 2d)."""
    return 2 * out.numel() * a.shape[-1]


def _cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_args: Any, **_kwargs: Any) -> int:
    """Scores and weighted values, 4·B·H·L·S·D (key/value heads shared by query groups still cost per query head)."""
    batch, heads, length, dim = q.shape
    return 4 * batch * heads * length * k.shape[-2] * dim


def _cpu_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_args: Any, **_kwargs: Any) -> int:
    """Recomputed scores and the three input gradients: 2.5 times the forward (torch's count for SDPA backward)."""
    return 5 * _cpu_attention(q, k, v) // 2


def _eigh(m: torch.Tensor, *args: Any, compute_v: bool = True, **_kwargs: Any) -> int:
    n = m.shape[-1]
    batch = m.numel() // (n * n)
    with_vectors = args[1] if len(args) > 1 else compute_v
    return batch * (9 * n**3 if with_vectors else 4 * n**3 // 3)


def _svd(m: torch.Tensor, *args: Any, compute_uv: bool = True, **_kwargs: Any) -> int:
    rows, cols = max(m.shape[-2:]), min(m.shape[-2:])
    batch = m.numel() // (rows * cols)
    with_vectors = args[1] if len(args) > 1 else compute_uv
    return batch * (6 * rows * cols**2 + 20 * cols**3 if with_vectors else 4 * rows * cols**2 - 4 * cols**3 // 3)


def _cholesky(m: torch.Tensor, *_args: Any, **_kwargs: Any) -> int:
    n = m.shape[-1]
    return (m.numel() // (n * n)) * n**3 // 3


def _triangular(a: torch.Tensor, b: torch.Tensor, *_args: Any, **_kwargs: Any) -> int:
    return (a.numel() // a.shape[-1] ** 2) * a.shape[-1] ** 2 * b.shape[-1]


def _cholesky_inverse(m: torch.Tensor, *_args: Any, **_kwargs: Any) -> int:
    return 2 * m.shape[-1] ** 3 // 3


def _qr(m: torch.Tensor, *_args: Any, **_kwargs: Any) -> int:
    rows, cols = max(m.shape[-2:]), min(m.shape[-2:])
    return (m.numel() // (rows * cols)) * (2 * rows * cols**2 - 2 * cols**3 // 3)


LINALG: dict[Any, Callable[..., int]] = {
    aten._linalg_eigh: _eigh,
    aten._linalg_svd: _svd,
    aten.linalg_cholesky_ex: _cholesky,
    aten.linalg_solve_triangular: _triangular,
    aten.cholesky_inverse: _cholesky_inverse,
    aten.linalg_qr: _qr,
}
EXTRA: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}
if hasattr(aten, "_grouped_mm"):
    EXTRA[aten._grouped_mm] = _grouped_mm


def _tensor_bytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


class PhaseWork(TorchDispatchMode):
    """While active (``with PhaseWork() as work:``): FLOPs (``matmul``: products and attention; ``linalg``: solvers) and
    bytes of each phase, in ``work.totals["<phase>:<n>"]`` for its n-th occurrence (the n-th layer's ``train:n``);
    ``work.ops`` counts the operations the same way."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "other"
        self.totals: dict[str, dict[str, int]] = defaultdict(lambda: {"matmul": 0, "linalg": 0, "bytes": 0})
        self.ops: dict[str, int] = defaultdict(int)
        self._seen: dict[str, int] = defaultdict(int)

    def listen(self, phase: str, starting: bool) -> None:
        if starting:
            self.phase = f"{phase}:{self._seen[phase]}"
            self._seen[phase] += 1
        else:
            self.phase = "other"

    def __enter__(self) -> PhaseWork:
        PHASE_LISTENERS.append(self.listen)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        PHASE_LISTENERS.remove(self.listen)
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet, total = func._overloadpacket, self.totals[self.phase]
        if packet in flop_counter.flop_registry:
            total["matmul"] += flop_counter.flop_registry[packet](*args, **kwargs, out_val=out)
        elif packet in EXTRA:
            total["matmul"] += EXTRA[packet](*args, **kwargs, out=out)
        elif packet in LINALG:
            total["linalg"] += LINALG[packet](*args, **kwargs)
        if not func.is_view:
            total["bytes"] += _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
        self.ops[self.phase] += 1
        return out
