"""One training step (forward + backward) of a layer's low-rank experts: grouped matmuls against the padded batch.

``LowRankExperts`` sorts the (token, expert) pairs by expert and runs one grouped matmul per factor where torch
has one for the device and dtype (no padding, static shapes, no host read); elsewhere it pads every expert's
tokens to the busiest expert's count for ``torch.bmm``, which costs a host read of that count and the padded
rows' work. This times both paths on the same module and routing, and checks that they agree::

    python benchmarks/bench_experts.py                                   # Mixtral-8x7B's experts, 512 tokens
    python benchmarks/bench_experts.py --skew 2 --tokens 2048 --device cuda --dtype bfloat16

``--skew`` tilts the router towards the first experts (0: random logits, about even), as trained routers are.
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch
from common import timed
from torch import nn

from distill_lr.analysis.tables import device_name, markdown_table
from distill_lr.modeling.lowrank import LowRankExperts


def experts_module(num_experts: int, hidden: int, inter: int, kept: float, device: str) -> LowRankExperts:
    """Random factors keeping about ``kept`` of each projection's parameters, at a rank that is a multiple of 64."""
    rank = max(64, int(kept * hidden * inter / (hidden + inter)) // 64 * 64)
    ranks = dict.fromkeys(("gate_proj", "up_proj", "down_proj"), rank)
    module = LowRankExperts(num_experts, hidden, inter, nn.SiLU(), ranks, device=device)
    for p in module.parameters():
        nn.init.normal_(p, std=(1 / p.shape[-1]) ** 0.5)
    return module


def step(module: LowRankExperts, forward: str, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    x, index, weights = inputs
    module.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = getattr(module, forward)(x, index, weights)
    out.float().square().mean().backward()
    return out.detach().float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype (bfloat16: autocast)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512])
    parser.add_argument("--skew", type=float, nargs="+", default=[0.0, 2.0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--kept", type=float, default=0.5, help="fraction of each projection's parameters the factors keep")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    module = experts_module(args.experts, args.hidden, args.intermediate, args.kept, args.device)
    if not module.grouped_fits(dtype):
        raise SystemExit("these widths are not whole 16-byte units: the grouped path does not apply")
    rows = []
    for tokens in args.tokens:
        for skew in args.skew:
            x = torch.randn(tokens, args.hidden, device=args.device)
            logits = torch.randn(tokens, args.experts, device=args.device) + skew * torch.linspace(1, 0, args.experts, device=args.device)
            weights, index = logits.softmax(-1).topk(2)
            counts = module.token_counts(index).float()
            inputs, seconds, outputs = (x, index, weights), {}, {}
            for forward in ("grouped_forward", "padded_forward"):
                run = partial(step, module, forward, inputs, dtype)
                seconds[forward] = statistics.median(timed(run, args.device)[0] for _ in range(args.repeats))
                outputs[forward] = run()
            gap = float((outputs["grouped_forward"] - outputs["padded_forward"]).abs().max() / outputs["padded_forward"].abs().max())
            padded = float(counts.max() * args.experts / counts.sum())
            grouped_s, padded_s = seconds["grouped_forward"], seconds["padded_forward"]
            rows.append([tokens, skew, f"{padded:.2f}", f"{grouped_s:.3f}", f"{padded_s:.3f}", f"{grouped_s / padded_s:.2f}", f"{gap:.1e}"])
    print(f"{device_name(args.device)}; {args.experts} experts {args.hidden} x {args.intermediate}, {args.kept:.0%} kept, {args.dtype}")
    print(f"rank {module.gate_proj.rank}; median of {args.repeats} forward + backward steps\n")
    header = ["tokens", "skew", "padded rows / real", "grouped s", "padded s", "grouped / padded", "max rel. difference"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
