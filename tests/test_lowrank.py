import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.dynamic_module_utils import get_imports

from distill_lr.factorize import from_linear
from distill_lr.modeling.lowrank import LowRankLinear, replace_linears_
from distill_lr.moments import Moments


def linear(in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_svd_reproduces_linear(bias: bool) -> None:
    dense = linear(10, 6, bias=bias)
    low = from_linear(dense, rank=6)
    x = torch.randn(4, 3, 10)
    torch.testing.assert_close(low(x), dense(x), atol=1e-5, rtol=1e-5)
    back = low.to_dense()
    torch.testing.assert_close(back.weight, dense.weight, atol=1e-5, rtol=1e-5)
    assert (back.bias is None) == (not bias)
    if bias:
        torch.testing.assert_close(back.bias, dense.bias)


def test_to_dense_round_trip() -> None:
    """A rank-r module, multiplied out and factored again at rank r, computes the same function."""
    torch.manual_seed(1)
    low = LowRankLinear(12, 9, rank=3, bias=True)
    dense = low.to_dense()
    x = torch.randn(5, 12)
    torch.testing.assert_close(dense(x), low(x), atol=1e-5, rtol=1e-5)
    again = from_linear(dense, rank=3)
    torch.testing.assert_close(again(x), low(x), atol=1e-5, rtol=1e-5)


def test_from_linear_keeps_dtype_and_every_init_is_exact_at_full_rank() -> None:
    dense = linear(16, 8, dtype=torch.bfloat16)
    stats = Moments.empty(16)
    x = torch.randn(64, 16)
    stats.update(x)
    for init in ("svd", "pca", "whiten"):
        low = from_linear(dense, rank=4, init=init, stats=stats)
        assert low.A.weight.dtype == low.B.weight.dtype == low.B.bias.dtype == torch.bfloat16
        assert (low.in_features, low.out_features, low.rank) == (16, 8, 4)
        full = from_linear(dense, rank=8, init=init, stats=stats)  # rank min(out, in): the layer itself, to bf16 rounding
        torch.testing.assert_close(full(x.bfloat16()).float(), dense(x.bfloat16()).float(), atol=3e-2, rtol=3e-2)
        assert (low(x.bfloat16()) - dense(x.bfloat16())).float().norm() > 0.05 * dense(x.bfloat16()).float().norm()  # rank 4 < 8 loses
    assert "rank=4" in repr(low)


def test_from_factors_copies_and_checks_shapes() -> None:
    A, B, bias = torch.randn(2, 5, dtype=torch.float64), torch.randn(3, 2), torch.randn(3)
    low = LowRankLinear.from_factors(A, B, bias)
    assert low.B.weight.dtype == torch.float64
    bias.zero_()
    assert low.B.bias.abs().sum() > 0
    with pytest.raises(ValueError, match="factors must be"):
        LowRankLinear.from_factors(A, torch.randn(3, 4), None)
    with pytest.raises(ValueError, match="bias must have shape"):
        LowRankLinear.from_factors(A, B, torch.randn(4))


@pytest.mark.parametrize("rank", [0, 7, 2.5, True])
def test_invalid_rank_is_rejected(rank: int) -> None:
    with pytest.raises(ValueError, match="rank must be"):
        LowRankLinear(10, 6, rank, bias=False)
    with pytest.raises(ValueError, match="rank must be"):
        from_linear(linear(10, 6), rank)


def test_unknown_init_is_rejected() -> None:
    with pytest.raises(ValueError, match="use one of"):
        from_linear(linear(10, 6), 3, init="qr")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Linear(8, 8)
        self.mlp = nn.ModuleDict({"up": nn.Linear(8, 16, bias=False), "down": nn.Linear(16, 8)})
        self.done = LowRankLinear(8, 8, rank=2, bias=False)
        self.norm = nn.LayerNorm(8)


def test_replace_linears_swaps_matching_linears_only() -> None:
    model = nn.Sequential(Block(), Block()).to(torch.bfloat16)
    seen: list[str] = []

    def predicate(name: str, _: nn.Linear) -> bool:
        seen.append(name)
        return not name.endswith("down")

    def factory(name: str, module: nn.Linear) -> nn.Module | None:
        if name == "1.x":
            return None  # the factory may decline
        return from_linear(module.float(), rank=2)  # float32: must be cast back

    swapped = replace_linears_(model, factory, predicate)
    assert sorted(swapped) == ["0.mlp.up", "0.x", "1.mlp.up"]
    assert sorted(seen) == sorted(f"{i}.{n}" for i in "01" for n in ("x", "mlp.up", "mlp.down"))
    assert model[0].x is swapped["0.x"] and model[0].mlp["up"] is swapped["0.mlp.up"]
    assert isinstance(model[1].x, nn.Linear) and isinstance(model[0].mlp["down"], nn.Linear)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {"0.x.A.weight", "0.x.B.weight", "0.x.B.bias", "0.done.A.weight"} <= set(model.state_dict())
    assert "0.x.weight" not in model.state_dict()


def test_replace_linears_keeps_device() -> None:
    model = nn.Sequential(nn.Linear(4, 4, device="meta"))
    swapped = replace_linears_(model, lambda _, m: LowRankLinear(4, 4, 2, bias=True))
    assert swapped["0"].A.weight.device.type == "meta"


def test_lowrank_module_loads_without_distill_lr(monkeypatch: pytest.MonkeyPatch) -> None:
    """lowrank.py is shipped as remote code: it must import, and look to transformers' scan, like torch-only code."""
    path = Path(__file__).parents[1] / "distill_lr" / "modeling" / "lowrank.py"
    assert set(get_imports(path)) <= {"torch"} | sys.stdlib_module_names
    for name in [n for n in sys.modules if n == "distill_lr" or n.startswith("distill_lr.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "distill_lr", None)
    spec = importlib.util.spec_from_file_location("remote_lowrank", path)
    assert spec is not None and spec.loader is not None
    remote = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, remote)  # as an import does (transformers' loader imports remote code)
    spec.loader.exec_module(remote)
    low = remote.LowRankLinear(6, 4, rank=2, bias=True)
    assert low(torch.randn(3, 6)).shape == (3, 4)
