"""Spectral metrics of weight matrices (pure functions): the numbers ``distill-lr spectra`` reports per matrix.

For singular values σ₁ ≥ … ≥ σ_r of an (m, n) matrix: condition number σ₁/σ_r, effective rank
exp(H(σ/Σσ)) (Roy & Vetterli 2007), stable rank Σσ²/σ₁², the energy Σ_{i≤k}σᵢ²/Σσ² kept at each rank
k, the nuclear-norm fraction Σ_{i≤k}σᵢ/Σσ (the LASER follow-up study's curve), the break-even rank
m·n/(m+n) and what a rank-k pair holding 90 / 99% of the energy would cost against the dense matrix.
The activation-aware spectrum is that of W·S with S Sᵀ = E[x xᵀ] over calibration inputs: the
singular values of the map as the data sees it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from distill_lr.factorize import break_even_rank, whitened_spectrum
from distill_lr.moments import Moments

ENERGY_LEVELS = (0.9, 0.99)
SUBSPACE_THRESHOLD = 0.06  # the LASER follow-up study's t for thresholding singular vectors


def singular_values(W: Tensor) -> Tensor:
    """σ of W in float64, descending."""
    return torch.linalg.svdvals(W.detach().double().cpu())


def activation_singular_values(W: Tensor, stats: Moments) -> Tensor:
    """σ of W·S, S Sᵀ = E[x xᵀ] (from output moments, the square roots of the eigenvalues of E[(Wx)(Wx)ᵀ]), descending."""
    return whitened_spectrum(W.detach().cpu(), stats).sqrt()[: min(W.shape)]


def metrics(sigma: Tensor, shape: tuple[int, int]) -> dict[str, Any]:
    """Every number of the module docstring for one spectrum (σ descending, float64)."""
    m, n = shape
    total, energy_total = float(sigma.sum()), float(sigma.square().sum())
    energy = (sigma.square().cumsum(0) / max(energy_total, 1e-300)).tolist()
    p = sigma / max(total, 1e-300)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    smallest = float(sigma[-1])
    out: dict[str, Any] = {
        "shape": [m, n],
        "singular_values": sigma.tolist(),
        "condition_number": float(sigma[0]) / smallest if smallest > 0 else math.inf,
        "effective_rank": math.exp(entropy),
        "stable_rank": energy_total / max(float(sigma[0]) ** 2, 1e-300),
        "energy": energy,
        "nuclear_fraction": (sigma.cumsum(0) / max(total, 1e-300)).tolist(),
        "break_even_rank": break_even_rank(m, n),
        "dense_params": m * n,
    }
    for level in ENERGY_LEVELS:
        k = next((i + 1 for i, e in enumerate(energy) if e >= level - 1e-12), len(energy))
        out[f"rank_for_{int(level * 100)}pct_energy"] = {"rank": k, "params": k * (m + n), "vs_dense": k * (m + n) / (m * n)}
    return out


def shared_subspace_ratio(V_prev: Tensor, V_next: Tensor, threshold: float = SUBSPACE_THRESHOLD) -> float:
    """rank([V_prev | V_next]) / min(rows, rank V_prev + rank V_next), entries below ``threshold`` zeroed first.

    V are right singular vectors as columns (n, r). 1: the two layers' subspaces share nothing; lower:
    more of one lies in the other's span (the LASER follow-up study's "% of full-rank subspace").
    """
    a = torch.where(V_prev.abs() < threshold, 0.0, V_prev.double())
    b = torch.where(V_next.abs() < threshold, 0.0, V_next.double())
    separate = int(torch.linalg.matrix_rank(a)) + int(torch.linalg.matrix_rank(b))
    joint = int(torch.linalg.matrix_rank(torch.cat([a, b], dim=1)))
    return joint / max(1, min(a.shape[0], separate))


def subspace_overlap(U: Tensor, U_other: Tensor, k: int) -> float:
    """‖U_kᵀ U'_k‖_F² / k for the top-k singular vectors (columns) of two matrices: 1 same subspace, ~k/n random."""
    k = min(k, U.shape[1], U_other.shape[1])
    return float((U[:, :k].double().T @ U_other[:, :k].double()).square().sum()) / k


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than three finite pairs or a constant side."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return math.nan
    rx, ry = _ranks([a for a, _ in pairs]), _ranks([b for _, b in pairs])
    cx, cy = rx - rx.mean(), ry - ry.mean()
    denominator = float(cx.norm() * cy.norm())
    return float(cx @ cy) / denominator if denominator > 0 else math.nan


def _ranks(values: list[float]) -> Tensor:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = torch.empty(len(values), dtype=torch.float64)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2
        i = j + 1
    return ranks
