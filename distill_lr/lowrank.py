"""The low-rank replacement for ``nn.Linear`` and the helper that swaps it into a model.

This file is copied verbatim beside every compressed checkpoint and loaded as remote code
(``trust_remote_code=True``) on machines without distill_lr, so it imports only torch and the
standard library. transformers scans remote code for import statements (lazy ones and those under
``TYPE_CHECKING`` included) and refuses to load a Hub checkpoint whose code names a missing package,
so ``from_linear`` reaches the factorisation maths in ``distill_lr.init`` through ``importlib`` by name.
Loading a checkpoint never calls it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def validate_rank(rank: int, out_features: int, in_features: int) -> None:
    """Reject ranks that cannot factor an (out, in) matrix, before any tensor is allocated."""
    limit = min(out_features, in_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(
            f"rank must be an integer between 1 and min(out_features, in_features) = {limit} "
            f"for a {out_features}x{in_features} weight, got {rank!r}"
        )


class LowRankLinear(nn.Module):
    """``y = B(A x) + bias`` with ``A: Linear(in, rank, bias=False)`` and ``B: Linear(rank, out)``.

    The factors are real ``nn.Linear`` children so that tools which look for linears (optimisers'
    weight-decay filters, quantisers, PEFT) still find them, and the state-dict keys are the
    predictable ``<name>.A.weight``, ``<name>.B.weight`` and ``<name>.B.bias``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        validate_rank(rank, out_features, in_features)
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def in_features(self) -> int:
        return self.A.in_features

    @property
    def out_features(self) -> int:
        return self.B.out_features

    @property
    def rank(self) -> int:
        return self.A.out_features

    @classmethod
    def from_factors(cls, A: Tensor, B: Tensor, bias: Tensor | None) -> LowRankLinear:
        """Wrap factors ``A (rank, in)`` and ``B (out, rank)`` in a module on A's device and dtype.

        The tensors are copied, so the module never aliases the caller's (e.g. the old linear's bias).
        """
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"factors must be A (rank, in) and B (out, rank), got {tuple(A.shape)} and {tuple(B.shape)}")
        if bias is not None and bias.shape != (B.shape[0],):
            raise ValueError(f"bias must have shape ({B.shape[0]},), got {tuple(bias.shape)}")
        module = nn.utils.skip_init(cls, A.shape[1], B.shape[0], A.shape[0], bias=bias is not None, device=A.device, dtype=A.dtype)
        with torch.no_grad():
            module.A.weight.copy_(A)
            module.B.weight.copy_(B)
            if bias is not None:
                module.B.bias.copy_(bias)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, init: str = "svd", stats: Any = None) -> LowRankLinear:
        """Factor ``linear`` with one of ``distill_lr.init.INITS``, on the linear's device and dtype.

        ``stats`` is the ``distill_lr.init.InputStats`` of the linear's inputs (typed ``Any`` since this
        file cannot import it), needed by the activation-aware inits "pca" and "whiten". Unlike the rest
        of this file, this needs distill_lr installed.
        """
        factorize = importlib.import_module("distill_lr.init").factorize  # see the module docstring

        bias = None if linear.bias is None else linear.bias.detach()
        A, B, new_bias = factorize(linear.weight.detach(), rank, init, stats=stats, bias=bias)
        dtype = linear.weight.dtype
        return cls.from_factors(A.to(dtype), B.to(dtype), None if new_bias is None else new_bias.to(dtype))

    def to_dense(self) -> nn.Linear:
        """The equivalent dense linear (product taken in float32), for export or comparison."""
        weight = self.A.weight
        linear = nn.utils.skip_init(
            nn.Linear,
            self.in_features,
            self.out_features,
            bias=self.B.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.B.weight.float() @ weight.float())
            if self.B.bias is not None:
                linear.bias.copy_(self.B.bias)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        return self.B(self.A(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def replace_linears_(
    module: nn.Module,
    factory: Callable[[str, nn.Linear], nn.Module | None],
    predicate: Callable[[str, nn.Linear], bool] | None = None,
) -> dict[str, nn.Module]:
    """Swap, in place, each ``nn.Linear`` under ``module`` for ``factory(name, linear)``.

    Names are relative to ``module``. Linears are skipped when ``predicate`` rejects them, when the
    factory returns None, and inside ``LowRankLinear`` (its own A/B factors are never re-factored).
    A replacement is moved to the replaced linear's device and dtype. Returns ``{name: new module}``.
    """
    found: list[tuple[nn.Module, str, str, nn.Linear]] = []
    for parent_name, parent in module.named_modules():
        if isinstance(parent, LowRankLinear):
            continue
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and (predicate is None or predicate(name, child)):
                found.append((parent, child_name, name, child))
    # Swap only after the walk: mutating the tree while named_modules iterates over it is unsafe.
    replaced: dict[str, nn.Module] = {}
    for parent, child_name, name, linear in found:
        device, dtype = linear.weight.device, linear.weight.dtype  # before the factory can move it
        new = factory(name, linear)
        if new is None:
            continue
        new.to(device=device, dtype=dtype)
        setattr(parent, child_name, new)
        replaced[name] = new
    return replaced
