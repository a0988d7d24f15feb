"""Seconds per matrix of the truncated-SVD solvers behind the inits, and their error against the exact SVD.

Whitened SVD of every expert's projections is the bulk of the ``init`` column of ``bench_scale.py``
on Mixtral-8x7B (24 matrices of 4096 x 14336 a layer). This times ``truncated_svd`` on random
matrices of the given shapes with a decaying spectrum, at the rank that removes ``--removed`` of
the parameters, for each solver and dtype::

    python benchmarks/bench_init.py --device cuda                            # Mixtral-8x7B shapes
    python benchmarks/bench_init.py --device cpu --shapes 1024x3584 3584x1024 --dtypes float64

The error column is ``‖M − U S Vh‖_F`` divided by the exact SVD's (1.000 is optimal).

A second table times ``whiten_factors`` for the shapes with fewer outputs than inputs (Mixtral's
down projections) from the input moments (Cholesky + SVD of W S) and from the output moments
(``eigh`` of E[(Wx)(Wx)ᵀ] + λ W Wᵀ, what the driver records there), with the output error
``‖(W − B A) Xᵀ‖`` of each over the tokens X, relative to the input route's.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from common import timed

from distill_lr.analysis.tables import device_name
from distill_lr.factorize import break_even_rank, truncated_svd, whiten_factors
from distill_lr.moments import Moments

SOLVERS = ("exact", "gram", "randomized")


def decaying_matrix(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A random matrix whose singular values fall from 1 to 1e-4, like whitened weights."""
    g = torch.Generator(device="cpu").manual_seed(0)
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    return ((U * torch.logspace(0, -4, k)) @ V.T).to(device=device, dtype=dtype)


def parse(shape: str) -> tuple[int, int]:
    rows, cols = (int(v) for v in shape.lower().split("x"))
    return rows, cols


def whiten_routes(rows: int, cols: int, rank: int, device: torch.device, repeats: int) -> str:
    """One table row: seconds of whiten_factors from input and from output moments, and the output error ratio."""
    g = torch.Generator(device="cpu").manual_seed(1)
    W = (torch.randn(rows, cols, generator=g) / cols**0.5).to(device)
    X = (torch.randn(2 * cols, cols, generator=g) * torch.logspace(0, -3, cols)).to(device)  # anisotropic tokens
    inputs, outputs = Moments.empty(cols, device), Moments.empty(rows, device, of_outputs=True)
    inputs.update(X)
    outputs.update(X @ W.T)
    t_in, (A_in, B_in) = timed(partial(whiten_factors, W, rank, inputs), device, repeats)
    t_out, (A_out, B_out) = timed(partial(whiten_factors, W, rank, outputs), device, repeats)
    error = float(((W - B_out @ A_out) @ X.T).norm() / ((W - B_in @ A_in) @ X.T).norm())
    return f"| {rows}x{cols} | {rank} | {t_in:.3f} | {t_out:.3f} | {t_out / t_in:.3f} | {error:.4f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4096x14336", "14336x4096", "4096x4096", "1024x4096"], metavar="OUTxIN")
    parser.add_argument("--removed", type=float, default=0.2, help="share of each matrix's parameters removed")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device: {device_name(device)}; rank removes {args.removed:.0%} of each matrix's parameters\n")
    print("| shape | rank | dtype | solver | seconds | × exact time | error ÷ exact |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: |")
    for shape in args.shapes:
        rows, cols = parse(shape)
        rank = int((1 - args.removed) * break_even_rank(rows, cols))
        for dtype in args.dtypes:
            M = decaying_matrix(rows, cols, getattr(torch, dtype), device)
            seconds, errors = {}, {}
            for solver in args.solvers:
                seconds[solver], (U, S, Vh) = timed(partial(truncated_svd, M, rank, solver), device, args.repeats)
                errors[solver] = float((M - (U * S) @ Vh).norm())
            for solver in args.solvers:
                vs_time = f"{seconds[solver] / seconds['exact']:.3f}" if "exact" in seconds else "-"
                vs_err = f"{errors[solver] / errors['exact']:.4f}" if "exact" in errors else "-"
                print(f"| {shape} | {rank} | {dtype} | {solver} | {seconds[solver]:.3f} | {vs_time} | {vs_err} |", flush=True)
    wide = [(rows, cols) for rows, cols in (parse(shape) for shape in args.shapes) if rows < cols]
    if wide:
        print("\n| whiten, shape | rank | s from inputs | s from outputs | × input time | error ÷ input route |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for rows, cols in wide:
            print(whiten_routes(rows, cols, int((1 - args.removed) * break_even_rank(rows, cols)), device, args.repeats), flush=True)


if __name__ == "__main__":
    main()
