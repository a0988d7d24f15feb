"""The low-rank modules of a compressed model and the helpers that swap them into a model.

This file is copied verbatim beside every compressed checkpoint and loaded as remote code
(``trust_remote_code=True``) on machines without distill_lr, so it imports only torch and the
standard library: transformers scans remote code for import statements and refuses a checkpoint
whose code names a missing package. The modules are built from factors; building them from a
dense weight (the factorisations) is ``distill_lr.factorize``'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
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


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Unsigned ``bits``-bit codes ``(rows, n)`` packed along each row: 8 codes per ``bits`` bytes, little-endian.

    A row is padded with zero codes to a multiple of 8; 8-bit codes are stored as they are.
    """
    rows, n = codes.shape
    padded = nn.functional.pad(codes, (0, -n % 8)).view(rows, -1, 8)
    if bits == 8:
        return padded.reshape(rows, -1).to(torch.uint8)
    word = (padded.long() << (torch.arange(8, device=codes.device) * bits)).sum(-1)  # at most 32 bits used
    return ((word[..., None] >> (torch.arange(bits, device=codes.device) * 8)) & 255).to(torch.uint8).reshape(rows, -1)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """``pack_codes`` undone: the ``(rows, n)`` codes as uint8."""
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :n]
    if bits == 4:  # two codes a byte, lowest first (one pass per nibble: faster than a broadcast shift)
        return torch.stack((packed & 15, packed >> 4), -1).view(rows, -1)[:, :n]
    if bits == 2:  # four codes a byte, lowest first
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).reshape(rows, -1)[:, :n]
    parts = packed.view(rows, -1, bits).int() << (torch.arange(bits, device=packed.device, dtype=torch.int32) * 8)
    word = parts.sum(-1, dtype=torch.int32)  # 3 bits: 24 of the 32
    codes = (word[..., None] >> (torch.arange(8, device=packed.device, dtype=torch.int32) * bits)) & ((1 << bits) - 1)
    return codes.reshape(rows, -1)[:, :n].to(torch.uint8)


def group_columns(per_group: Tensor, group_size: int, n: int) -> Tensor:
    """Per-group values ``(rows, groups)`` repeated over their columns ``(rows, n)``; the last group may be shorter.

    A group wider than the row is the row (never padded out to ``group_size`` columns)."""
    return per_group.repeat_interleave(min(group_size, n), dim=1)[:, :n]


def dequantize(
    qweight: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int, in_features: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The weight ``(out, in)`` of packed group-wise codes, ``(codes − zero) · scale`` in ``dtype``; no ``zero``: symmetric.

    Codes minus zero are integers below 2⁸, exact in every float dtype, so computing in ``dtype`` rounds once, as
    a float32 product cast to ``dtype`` would (for scales that ``dtype`` holds exactly: the saved ones).
    """
    rows, groups = scale.shape
    group_size = min(group_size, in_features)  # one group per row: no padding out to a wider group
    codes = unpack_codes(qweight, bits, in_features).to(dtype)
    if groups * group_size != in_features:  # a shorter last group
        codes = nn.functional.pad(codes, (0, groups * group_size - in_features))
    offset = float(1 << (bits - 1)) if zero is None else zero.to(dtype)[..., None]
    weight = (codes.view(rows, groups, group_size) - offset) * scale.to(dtype)[..., None]
    return weight.view(rows, -1)[:, :in_features]


# The integer kernels are matrix-vector kernels: their time grows with the rows, and from about this many rows
# (int8; about 100 for int4) dequantising once for a dense matmul is faster (`bench_infer.py --rows`, docs/infer.md).
KERNEL_ROWS = 32
INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes torch's CPU int4 kernel takes
Kernel = Callable[[Tensor], Tensor]  # x (rows, in) -> x Ŵᵀ (rows, out)


def int4_kernel(qweight: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, in_features: int) -> Kernel | None:
    """``torch._weight_int4pack_mm_for_cpu`` over these integers, or None where it does not apply.

    The kernel computes ``x ((q − 8) s + z)ᵀ`` per group of 32–256 columns with a float offset ``z``, so our
    integer zero ``zp`` becomes ``z = (8 − zp) s``. Its groups must tile ours, so it takes the largest size
    that divides our group (any size when one group spans the row); columns are padded to a whole number of
    its groups, with zero inputs there. The output rows must be a multiple of 16.
    """
    rows = qweight.shape[0]
    group = min(group_size, in_features)
    sizes = [k for k in INT4_KERNEL_GROUPS if group % k == 0 or group == in_features]
    if rows % 16 or not sizes or qweight.device.type != "cpu":
        return None
    kgroup = min(sizes, key=lambda k: (-(-in_features // k) * k, -k))  # least padding, then the widest group
    padded = -(-in_features // kgroup) * kgroup
    codes = nn.functional.pad(unpack_codes(qweight, 4, in_features), (0, padded - in_features), value=8).int()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    ours = (torch.arange(0, padded, kgroup) // group).clamp(max=scale.shape[1] - 1)  # our group of each kernel group
    s = scale.float()[:, ours]
    offset = torch.zeros_like(s) if zero is None else (8 - zero.float()[:, ours]) * s
    scales_and_zeros = torch.stack([s, offset], -1).transpose(0, 1).contiguous().to(torch.bfloat16)

    def matmul(x: Tensor) -> Tensor:
        x = nn.functional.pad(x, (0, padded - in_features))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, kgroup, scales_and_zeros)

    return matmul


def int8_kernel(qweight: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, in_features: int) -> Kernel | None:
    """``torch._weight_int8pack_mm`` (int8 weights, one scale per output row) once per group of columns, or None off the CPU.

    Codes are stored unsigned; the kernel's int8 weight is ``code − 128``, and an asymmetric zero adds
    ``(128 − zp) s · Σ x`` over the group's columns. The kernel reads columns 16 at a time (on torch 2.13 it
    returns wrong sums or crashes otherwise), so each group is padded with zero columns to a multiple of 16.
    """
    if qweight.device.type != "cpu":
        return None
    rows, group = qweight.shape[0], min(group_size, in_features)
    weight = (unpack_codes(qweight, 8, in_features).to(torch.int16) - 128).to(torch.int8)
    parts = []
    for g, start in enumerate(range(0, in_features, group)):
        cols = slice(start, min(start + group, in_features))
        pad = -(cols.stop - cols.start) % 16
        shift = None if zero is None else (128 - zero[:, g].float()) * scale[:, g].float()
        w = nn.functional.pad(weight[:, cols], (0, pad))
        parts.append((cols, pad, w, scale[:, g].to(torch.bfloat16).contiguous(), shift))

    def matmul(x: Tensor) -> Tensor:
        y = x.new_zeros(x.shape[0], rows, dtype=torch.float32)  # the groups' sums added in float32
        for cols, pad, w, s, shift in parts:
            xg = nn.functional.pad(x[:, cols], (0, pad))
            y += torch.ops.aten._weight_int8pack_mm(xg, w, s)
            if shift is not None:
                y += xg.sum(-1, keepdim=True).float() * shift
        return y.to(x.dtype)

    return matmul


@dataclass
class QuantRecord:
    """What ``config.json`` records of a checkpoint's quantization (``distill_lr["quant"]``): the grid, the quantized
    linears and the corrected weights with their ranks, by module name. The loader, the dense export and the report read it."""

    bits: int
    group_size: int
    symmetric: bool
    method: str  # how the integers were chosen: gptq or rtn
    modules: list[str] = field(default_factory=list)  # ``QuantLinear`` modules
    corrections: dict[str, int] = field(default_factory=dict)  # ``CorrectedLinear`` modules: the rank of each correction

    @classmethod
    def of(cls, data: Mapping[str, Any] | None) -> QuantRecord | None:
        """From its JSON form (a layer report's entry may hold more keys: they are not the record's)."""
        return None if not data else cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class QuantLinear(nn.Module):
    """``y = x Ŵᵀ + bias`` with the weight stored as group-wise integers: ``Ŵ = (codes − zero) · scale``.

    Each row's columns fall in groups of ``group_size`` (the last one may be shorter) with one ``scale``
    (and, asymmetric, one integer ``zero``) per group; symmetric grids have the fixed zero ``2^(bits−1)``.
    The codes are packed (``pack_codes``), so an int4 weight takes half a byte per entry plus the scales.
    ``qshape`` (out, in) makes the saved tensors self-describing (a dense export dequantises them file by file).

    The forward pass runs one of PyTorch's own integer kernels where it applies (``int_kernel``: bfloat16 input
    on the CPU, at most ``KERNEL_ROWS`` rows, 4 or 8 bits); elsewhere it dequantises the whole weight to the
    input's dtype for one dense matmul, and the dense copy lives only for that matmul. The kernels' layout
    of the integers is built on first use and kept beside the saved form (rebuilt if the integers change).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        bias: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if bits not in (2, 3, 4, 8) or group_size < 1:
            raise ValueError(f"bits must be 2, 3, 4 or 8 and group_size >= 1, got {bits} and {group_size}")
        self.in_features, self.out_features, self.bits, self.group_size, self.symmetric = (
            in_features,
            out_features,
            bits,
            group_size,
            symmetric,
        )
        groups = -(-in_features // group_size)
        self.register_buffer("qshape", torch.tensor([out_features, in_features], device=device))
        self.register_buffer("qweight", torch.zeros(out_features, -(-in_features // 8) * bits, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        if not symmetric:
            self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool) -> QuantLinear:
        """Empty, shaped after ``linear`` and on its device and dtype."""
        w = linear.weight
        return cls(linear.in_features, linear.out_features, bits, group_size, symmetric, linear.bias is not None, w.device, w.dtype)

    def dequantized(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight ``(out, in)`` the integers stand for, in ``dtype`` (default: the scales')."""
        zero = None if self.symmetric else self.zero
        return dequantize(self.qweight, self.scale, zero, self.bits, self.group_size, self.in_features, dtype or self.scale.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() <= KERNEL_ROWS * self.in_features:
            kernel = self.int_kernel()
            if kernel is not None:
                y = kernel(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
                return y if self.bias is None else y + self.bias
        return nn.functional.linear(x, self.dequantized(x.dtype), self.bias)

    def int_kernel(self) -> Kernel | None:
        """``x (rows, in) -> x Ŵᵀ`` through an integer kernel for this weight's grid, or None where none applies."""
        tensors = [self.qweight, self.scale] + ([] if self.symmetric else [self.zero])
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        if getattr(self, "_kernel_key", None) != key:
            zero = None if self.symmetric else self.zero
            build = {4: int4_kernel, 8: int8_kernel}.get(self.bits)
            self._kernel = build and build(self.qweight, self.scale, zero, self.group_size, self.in_features)
            self._kernel_key = key
        return self._kernel

    def extra_repr(self) -> str:
        grid = "symmetric" if self.symmetric else "asymmetric"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}, {grid}"


class QuantExpertLinears(QuantLinear):
    """One projection of every expert as group-wise integers: ``(E, tokens, in) -> (E, tokens, out)``, a quantized
    stand-in for a dense ``ExpertLinears``. The experts' rows are stacked (``qweight (E·out, ·)``, ``scale (E·out,
    groups)``), each expert on its own grid; ``qshape`` is ``(E, out, in)``. The forward pass dequantises all experts
    for one batched matmul (no integer kernel: the tokens come grouped per expert)."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        symmetric: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, num_experts * out_features, bits, group_size, symmetric, False, device, dtype)
        self.num_experts, self.expert_out_features = num_experts, out_features
        self.qshape = torch.tensor([num_experts, out_features, in_features], device=device)

    @classmethod
    def like(cls, experts: ExpertLinears, bits: int, group_size: int, symmetric: bool) -> QuantExpertLinears:  # type: ignore[override]
        """Empty, shaped after a dense ``ExpertLinears`` and on its device and dtype."""
        w = experts.weight
        return cls(experts.num_experts, experts.in_features, experts.out_features, bits, group_size, symmetric, w.device, w.dtype)

    def forward(self, x: Tensor, offsets: Tensor | None = None) -> Tensor:
        weight = self.dequantized(x.dtype).view(self.num_experts, self.expert_out_features, self.in_features)
        return expert_matmul(x, weight.transpose(1, 2), offsets)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, " + super().extra_repr().replace(
            f"out_features={self.out_features}", f"out_features={self.expert_out_features}"
        )


class CorrectedLinear(LowRankLinear):
    """``y = base(x) + B(A x)``: a quantized weight plus a low-rank correction of its error (LQER, CALDERA).

    The factors are a ``LowRankLinear``'s (so the layer-wise training finds and trains them); the bias,
    if any, stays on ``base``.
    """

    def __init__(self, base: nn.Module, rank: int) -> None:
        weight = next(t for t in base.state_dict().values() if t.is_floating_point())
        super().__init__(base.in_features, base.out_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
        self.base = base

    def to_dense(self) -> nn.Linear:
        raise TypeError("a CorrectedLinear stands for a quantized weight plus factors: it has no dense form to export")

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.B(self.A(x))


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


def multiply_out_(module: nn.Module, above: float) -> list[str]:
    """Replace, in place, each factor pair (``LowRankLinear``, not a correction) that keeps at least ``above`` of its dense
    weight's parameters by that dense weight: two matmuls near the break-even rank cost more time than they save
    (``benchmarks/bench_infer.py --forms``), for at most ``1 / above`` of the pair's memory. Returns the names replaced."""
    found = [
        (name, m)
        for name, m in module.named_modules()
        if type(m) is LowRankLinear and m.rank * (m.in_features + m.out_features) >= above * m.in_features * m.out_features
    ]
    for name, m in found:
        module.set_submodule(name, m.to_dense())
    return [name for name, _ in found]


EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_UNSUPPORTED: set[tuple[str, torch.dtype]] = set()  # (device type, dtype) where grouped mm raised: padded bmm there


def expert_matmul(x: Tensor, weight_t: Tensor, offsets: Tensor | None) -> Tensor:
    """Every expert's tokens times its matrix (``weight_t (E, in, out)``).

    ``offsets`` None: tokens padded per expert, ``x (E, capacity, in)``, one ``torch.bmm``. Otherwise rows sorted
    by expert, ``x (pairs, in)``, expert e's rows ending at ``offsets[e]`` (int32): one grouped matmul, no
    padding and no host synchronisation. Autocast does not cover grouped mm: it computes in autocast's dtype here.
    """
    if offsets is None:
        return torch.bmm(x, weight_t)
    dtype = compute_dtype(x)
    return _GROUPED_MM(x.to(dtype), weight_t.to(dtype), offs=offsets)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` computes in: autocast's where it is on for ``x``'s device, else ``x``'s own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def grouping(args: tuple[Any, ...]) -> Tensor | None:
    """The ``offsets`` of an ``ExpertLinears`` call from its positional arguments (what a forward hook receives)."""
    return args[1] if len(args) > 1 else None


def expert_blocks(x: Tensor, offsets: Tensor | None, counts: list[int] | None = None) -> list[Tensor]:
    """The rows of each expert in an ``ExpertLinears`` input or output: sorted by expert (split at ``offsets``), or
    padded per expert (the first ``counts[e]`` rows of expert e are real; without ``counts``, all rows, padding too)."""
    if offsets is not None:
        ends = offsets.tolist()
        return [x[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    return [x[e, :n] for e, n in enumerate(counts)] if counts is not None else list(x)


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module that ``LowRankExperts`` can stand in for.

    Those hold every expert in ``gate_up_proj (E, 2I, H)`` (gate rows first) and ``down_proj (E, H, I)``
    and compute ``down(act(gate x) * up x)``; transformers' ``use_experts_implementation`` marks their
    layout with flags. Transposed storage, biases, interleaved gate/up and custom gates are not handled.
    """
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.ndim == down.ndim == 3):
        return False
    flags = [getattr(module, f, None) for f in ("is_transposed", "has_bias", "has_gate", "is_concatenated", "has_post_expert_norm")]
    gate = getattr(getattr(type(module), "_apply_gate", None), "__name__", "_default_apply_gate")
    experts, double_inter, hidden = gate_up.shape
    return (
        flags[:4] == [False, False, True, True]
        and not flags[4]  # None in transformers releases without the flag
        and gate == "_default_apply_gate"
        and hasattr(module, "act_fn")
        and tuple(down.shape) == (experts, hidden, double_inter // 2)
    )


class ExpertLinears(nn.Module):
    """One projection of every expert, on tokens grouped per expert: ``(E, tokens, in) -> (E, tokens, out)``.

    Dense, it holds ``weight (E, out, in)``; low-rank, ``A (E, rank, in)`` and ``B (E, out, rank)``. All
    experts share the rank so that each factor is applied to all of them in one ``torch.bmm``.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        rank: int | None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.in_features, self.out_features, self.rank = num_experts, in_features, out_features, rank
        if rank is None:
            self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, device=device, dtype=dtype))
        else:
            validate_rank(rank, out_features, in_features)
            self.A = nn.Parameter(torch.empty(num_experts, rank, in_features, device=device, dtype=dtype))
            self.B = nn.Parameter(torch.empty(num_experts, out_features, rank, device=device, dtype=dtype))

    def forward(self, x: Tensor, offsets: Tensor | None = None) -> Tensor:
        """``x`` padded per expert ``(E, capacity, in)``, or sorted by expert ``(pairs, in)`` with ``offsets`` (``expert_matmul``)."""
        if self.rank is None:
            return expert_matmul(x, self.weight.transpose(1, 2), offsets)
        return expert_matmul(expert_matmul(x, self.A.transpose(1, 2), offsets), self.B.transpose(1, 2), offsets)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class CorrectedExperts(ExpertLinears):
    """``y = base(x) + B(A x)`` for every expert: quantized expert weights plus a low-rank correction of each one's error.

    The factors are a low-rank ``ExpertLinears``'s (``A (E, rank, in)``, ``B (E, out, rank)``: the layer-wise training
    finds and trains them); ``base`` is the ``QuantExpertLinears``.
    """

    def __init__(self, base: QuantExpertLinears, rank: int) -> None:
        out_features = base.expert_out_features
        super().__init__(base.num_experts, base.in_features, out_features, rank, device=base.scale.device, dtype=base.scale.dtype)
        self.base = base

    @classmethod
    def around(cls, base: QuantExpertLinears, A: Tensor, B: Tensor) -> CorrectedExperts:
        """``base`` corrected by the factors ``A (E, rank, in)``, ``B (E, out, rank)``."""
        module = cls(base, A.shape[1])
        with torch.no_grad():
            module.A.copy_(A)
            module.B.copy_(B)
        return module

    def forward(self, x: Tensor, offsets: Tensor | None = None) -> Tensor:
        return self.base(x, offsets) + super().forward(x, offsets)


class LowRankExperts(nn.Module):
    """Drop-in for a fused experts module (see ``is_fused_experts``): same ``forward(hidden_states, top_k_index, top_k_weights)``.

    Its ``gate_proj``, ``up_proj`` and ``down_proj`` are ``ExpertLinears``, each dense or low-rank. Every
    projection of every expert is one call instead of a Python loop over experts: where torch has a grouped
    matmul for the device and dtype and the widths suit it (``grouped_fits``), on the (token, expert) pairs
    sorted by expert (static shapes, no host synchronisation); elsewhere a batched matmul on a zero-padded
    ``(E, capacity, hidden)`` batch, whose padding rows stay zero through the experts (no biases, ``act(0) * 0 = 0``)
    and are never read back. An index equal to ``num_experts`` (transformers' expert-parallel placeholder) is skipped.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        act_fn: nn.Module,
        ranks: Mapping[str, int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        ranks = ranks or {}
        unknown = sorted(set(ranks) - set(EXPERT_PROJECTIONS))
        if unknown:
            raise ValueError(f"experts have no projection {unknown[0]!r}: use {EXPERT_PROJECTIONS}")
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        inputs = {"gate_proj": hidden_dim, "up_proj": hidden_dim, "down_proj": intermediate_dim}
        for name, in_features in inputs.items():
            out_features = hidden_dim + intermediate_dim - in_features
            setattr(self, name, ExpertLinears(num_experts, in_features, out_features, ranks.get(name), device=device, dtype=dtype))
        self.act_fn = act_fn

    @classmethod
    def like(cls, experts: nn.Module, ranks: Mapping[str, int] | None = None) -> LowRankExperts:
        """Uninitialised, shaped after a fused experts module and on its device and dtype, keeping its activation."""
        num_experts, double_inter, hidden = experts.gate_up_proj.shape
        weight = experts.gate_up_proj
        return cls(num_experts, hidden, double_inter // 2, experts.act_fn, ranks, device=weight.device, dtype=weight.dtype)

    @classmethod
    def from_experts(cls, experts: nn.Module) -> LowRankExperts:
        """The same function as a fused experts module, with every projection dense (ready to be factored one by one)."""
        module = cls.like(experts)
        gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)
        with torch.no_grad():
            for name, weight in (("gate_proj", gate), ("up_proj", up), ("down_proj", experts.down_proj.detach())):
                getattr(module, name).weight.copy_(weight)
        return module

    @staticmethod
    def fused_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """This module's state dict turned into the fused module's (``gate_up_proj``, ``down_proj``), products in float32."""
        dense = {}
        for name in EXPERT_PROJECTIONS:
            if f"{name}.weight" in state:
                dense[name] = state[f"{name}.weight"]
            else:
                a, b = state[f"{name}.A"], state[f"{name}.B"]
                dense[name] = torch.bmm(b.float(), a.float()).to(b.dtype)
        return {"gate_up_proj": torch.cat([dense["gate_proj"], dense["up_proj"]], dim=1), "down_proj": dense["down_proj"]}

    def token_counts(self, top_k_index: Tensor) -> Tensor:
        """How many tokens each expert receives, ``(E,)`` (placeholder indices not counted); no host synchronisation."""
        index = top_k_index.reshape(-1)
        return index.new_zeros(self.num_experts + 1).index_add_(0, index, torch.ones_like(index))[: self.num_experts]

    def grouped_fits(self, dtype: torch.dtype) -> bool:
        """Whether every width the grouped matmuls see is a whole number of 16-byte units in ``dtype`` (torch requires it)."""
        unit = 16 // dtype.itemsize
        widths = [self.hidden_dim, self.intermediate_dim] + [getattr(getattr(self, n), "rank", None) or 0 for n in EXPERT_PROJECTIONS]
        return all(w % unit == 0 for w in widths)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        key = (hidden_states.device.type, compute_dtype(hidden_states))
        if _GROUPED_MM is not None and key not in _GROUPED_UNSUPPORTED and self.grouped_fits(key[1]):
            try:
                return self.grouped_forward(hidden_states, top_k_index, top_k_weights)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:  # this torch has no grouped mm kernel for the device and dtype
                _GROUPED_UNSUPPORTED.add(key)
        return self.padded_forward(hidden_states, top_k_index, top_k_weights)

    def grouped_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """The pairs sorted by expert (placeholders last, their outputs zeroed), one grouped matmul per factor."""
        tokens, top_k = top_k_index.shape
        experts = top_k_index.reshape(-1)
        order = torch.argsort(experts, stable=True)
        offsets = self.token_counts(top_k_index).cumsum(0).to(torch.int32)
        real = (experts[order] < self.num_experts)[:, None]  # placeholder rows lie past the last offset: left unset, both ways
        x = torch.where(real, hidden_states[order // top_k], 0.0)
        out = self.down_proj(self.act_fn(self.gate_proj(x, offsets)) * self.up_proj(x, offsets), offsets)
        pairs = torch.where(real, out * top_k_weights.reshape(-1)[order, None].to(out.dtype), 0.0)
        per_pair = pairs[torch.argsort(order)]
        return per_pair.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def padded_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """The pairs gathered into a zero-padded ``(E, capacity, hidden)`` batch: one batched matmul per factor."""
        tokens, top_k = top_k_index.shape
        experts = top_k_index.reshape(-1)
        counts = self.token_counts(top_k_index)
        total, capacity = torch.stack([counts.sum(), counts.max()]).tolist()
        order = torch.argsort(experts, stable=True)[:total]  # pairs grouped by expert, placeholders dropped
        expert = experts[order]
        slot = torch.arange(total, device=order.device) - (counts.cumsum(0) - counts)[expert]
        index = torch.full((self.num_experts, capacity), tokens, dtype=torch.long, device=order.device)
        index[expert, slot] = order // top_k
        padded = torch.cat([hidden_states, hidden_states.new_zeros(1, hidden_states.shape[-1])])  # row `tokens` is zero
        grouped = padded[index]
        out = self.down_proj(self.act_fn(self.gate_proj(grouped)) * self.up_proj(grouped))
        pairs = out[expert, slot] * top_k_weights.reshape(-1)[order, None]
        per_pair = pairs.new_zeros(tokens * top_k, pairs.shape[-1]).index_copy(0, order, pairs)
        return per_pair.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def replace_experts_(
    module: nn.Module,
    factory: Callable[[str, nn.Module], nn.Module | None],
    predicate: Callable[[str, nn.Module], bool] | None = None,
) -> dict[str, nn.Module]:
    """``replace_linears_`` for fused experts modules (``is_fused_experts``): swap each for ``factory(name, experts)``."""
    found = [(n, m) for n, m in module.named_modules() if is_fused_experts(m) and (predicate is None or predicate(n, m))]
    replaced: dict[str, nn.Module] = {}
    for name, experts in found:
        new = factory(name, experts)
        if new is not None:
            module.set_submodule(name, new)
            replaced[name] = new
    return replaced
