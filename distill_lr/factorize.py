"""Training-free factorisations ``W ≈ B @ A`` of a weight ``W (out, in)``: A is (rank, in), B (out, rank),
and the low-rank modules built from a dense linear or from every expert's weight with them.

* ``svd``: truncated SVD of W, the best rank-r approximation of the weight itself.
* ``pca``: projects the layer's outputs on their top-r principal directions (Chen et al. 2021 DRONE;
  Yu & Wu 2023 "Compressing Transformers: Features Are Low-Rank, but Weights Are Not!").
* ``whiten``: SVD of W after whitening its inputs (Wang et al. 2024, SVD-LLM), the best rank-r
  approximation of the outputs ``W x`` over the calibration inputs.

The activation-aware inits need ``Moments`` of the layer's inputs (or outputs). The maths that involves those
statistics runs in float64 (they are often badly conditioned); every factor is returned in float32 on
W's device and callers cast it to the model's dtype.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill_lr.errors import UserInputError
from distill_lr.modeling.lowrank import ExpertLinears, LowRankLinear, replace_linears_, validate_rank
from distill_lr.moments import Moments

_DAMPING_TRIES = 8  # damping grows x10 per try: up to 1e7 times the requested one
FAST_SVD_MIN_SIZE = 2048  # smaller matrices take the exact SVD even on a GPU
RANDOMIZED_OVERSAMPLE = 32  # extra directions sampled beyond the rank
RANDOMIZED_POWER_ITERATIONS = 4


def break_even_rank(out_features: int, in_features: int) -> float:
    """Rank at which the factor pair holds as many parameters as the dense matrix: m·n/(m+n)."""
    return out_features * in_features / (out_features + in_features)


def truncated_svd(M: Tensor, rank: int, solver: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """The top-``rank`` singular triplets ``(U_r, S_r, Vh_r)`` of M.

    ``exact`` is the full LAPACK / cuSOLVER SVD in M's dtype; it is slow on a GPU for the 4096 x 14336
    matrices of 7B-class models. ``gram`` takes the eigen-decomposition of the smaller Gram matrix
    (``M Mᵀ`` or ``Mᵀ M``, at most 4096² there): the ranks kept for compression are a large
    share of the spectrum, where it is far cheaper than the full SVD and than subspace iteration.
    ``randomized`` is subspace iteration (Halko, Martinsson & Tropp 2011) in float32, the fastest for
    ranks well below the matrix size (LASER-style truncation). Both lose a fraction of a percent of the
    optimal rank-r error at most (tests/test_init.py checks them against the exact one). ``auto``
    picks on a GPU for matrices whose smaller side is at least 2048, and the exact SVD otherwise.
    """
    if solver == "auto":
        if not (M.is_cuda and min(M.shape) >= FAST_SVD_MIN_SIZE):
            solver = "exact"
        else:
            solver = "randomized" if rank + RANDOMIZED_OVERSAMPLE < min(M.shape) // 4 else "gram"
    if solver == "exact":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    if solver == "gram":
        return _gram_svd(M, rank)
    if solver != "randomized":
        raise ValueError(f"unknown SVD solver {solver!r}: use auto, exact, gram or randomized")
    q = min(rank + RANDOMIZED_OVERSAMPLE, *M.shape)
    U, S, V = torch.svd_lowrank(M.float(), q=q, niter=RANDOMIZED_POWER_ITERATIONS)
    return U[:, :rank].to(M.dtype), S[:rank].to(M.dtype), V[:, :rank].T.to(M.dtype)


def _gram_svd(M: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD from ``eigh`` of the smaller Gram matrix, in M's dtype.

    Squaring M squares its condition number: in float32, directions below ~1e-3 of the top singular
    value come out imprecise (measurably more error than the exact SVD on real attention weights), so
    the activation-aware inits, which pass float64, keep float64. The factors (``U_rᵀ M`` or ``M V_r``)
    are computed from M itself: the rank-r product is the exact projection on the subspace found.
    """
    wide = M.shape[0] <= M.shape[1]
    eigenvalues, vectors = torch.linalg.eigh(M @ M.T if wide else M.T @ M)
    vectors = vectors[:, -rank:].flip(-1)  # eigh sorts ascending
    S = eigenvalues[-rank:].flip(-1).clamp(min=0).sqrt()
    inverse = torch.where(S > S[0] * 1e-6, 1 / S, torch.zeros_like(S))  # a null direction gets zero factors
    if wide:
        return vectors, S, (vectors.T @ M) * inverse[:, None]
    return (M @ vectors) * inverse, S, vectors.T


def balanced(U: Tensor, S: Tensor, Vh: Tensor, kept: int | slice) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of ``U diag(S) Vh`` truncated to its first ``kept`` components (or to the slice ``kept``), each factor
    holding sqrt(S): equal scales train better."""
    index = slice(0, kept) if isinstance(kept, int) else kept
    root = S[index].sqrt()
    return root[:, None] * Vh[index], U[:, index] * root


def _damped_cholesky(M: Tensor, damping: float) -> Tensor:
    """Lower Cholesky factor of ``M + λI``, λ = damping · mean(diag M), grown x10 until M + λI is PD.

    Moments of real activations are often singular (dead channels, fewer tokens than features).
    """
    if damping <= 0:
        raise ValueError(f"damping must be > 0, got {damping}")
    scale = M.diagonal().mean().item()
    lam = damping * (scale if scale > 0 else 1.0)  # all-zero inputs: any positive λ whitens nothing
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    for attempt in range(_DAMPING_TRIES):
        L, info = torch.linalg.cholesky_ex(M + lam * eye)
        if info.item() == 0:
            if attempt:
                warnings.warn(
                    f"whiten: the input second moment is not positive definite; damping raised from "
                    f"{damping:g} to {damping * 10**attempt:g} of its mean diagonal (λ = {lam:.3g})",
                    stacklevel=3,
                )
            return L
        lam *= 10
    raise UserInputError(
        f"whiten: the input second moment stays singular even with damping {damping * 10 ** (_DAMPING_TRIES - 1):g}; "
        "use more calibration tokens or init=svd"
    )


def svd_factors(W: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Truncated SVD: the Frobenius-optimal rank-r approximation of W (Eckart–Young). Returns (A, B)."""
    validate_rank(rank, *W.shape)
    U, S, Vh = truncated_svd(W.detach().float(), rank)
    return balanced(U, S, Vh, rank)


def _top_eigenvectors(M: Tensor, rank: int) -> Tensor:
    """The eigenvectors of the symmetric M for its ``rank`` largest eigenvalues, largest first."""
    return torch.linalg.eigh(M)[1][:, -rank:].flip(-1)  # eigh sorts ascending


def pca_factors(W: Tensor, rank: int, stats: Moments, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Project the outputs ``y = W x`` on their top-r principal directions U_r: B = U_r, A = U_rᵀ W.

    This minimises E‖y − ŷ‖² over the calibration inputs. A layer with a bias can reproduce the output
    mean exactly by folding ``(I − U_r U_rᵀ) W E[x]`` into its bias, so U_r spends its rank on the
    centered covariance only. A layer without a bias gets no new parameters; there the mean must go
    through U_r as well, so the uncentered second moment E[y yᵀ] is the optimal one. Returns
    (A, B, bias): the folded bias, or None when the layer had none.

    U_r comes from ``eigh`` of the output moment: recorded as such (``stats.of_outputs``), or
    ``W M Wᵀ`` (out × out) from the input moment M when out <= in, otherwise from the SVD of ``W L``
    (out × in) with ``M = L Lᵀ``, which has the same left singular vectors without forming the larger
    matrix. L is the eigen-decomposition square root rather than a Cholesky factor: moments of real
    activations are often singular, and this root is exact for them without any damping.
    """
    validate_rank(rank, *W.shape)
    W64 = W.detach().double()
    moment = (stats.covariance() if bias is not None else stats.second_moment()).to(W64.device)
    out_features, in_features = W.shape
    if stats.of_outputs:
        U = _top_eigenvectors(moment, rank)
    elif out_features <= in_features:
        U = _top_eigenvectors(W64 @ moment @ W64.T, rank)
    else:
        U = truncated_svd(W64 @ moment_root(moment), rank)[0]
    A = U.T @ W64
    if bias is None:
        return A.float(), U.float(), None
    mean = stats.mean().to(W64.device)
    mean_out = mean if stats.of_outputs else W64 @ mean
    folded = bias.detach().double() + mean_out - U @ (U.T @ mean_out)
    return A.float(), U.float(), folded.float()


def whiten_factors(W: Tensor, rank: int, stats: Moments, damping: float = 1e-6) -> tuple[Tensor, Tensor]:
    """SVD-LLM: truncate the SVD of ``W S`` where ``S Sᵀ = E[x xᵀ] + λI``, then undo the whitening.

    ``E‖(W − B A) x‖² = ‖(W − B A) S‖_F²`` over the calibration inputs, so truncating the SVD of W S
    gives the output-optimal rank-r pair. The uncentered moment is used because the layers
    are compressed without adding a bias. Returns (A, B) with A = sqrt(Σ_r) V_rᵀ S⁻¹, B = U_r sqrt(Σ_r).

    From output moments (``stats.of_outputs``) the same product ``U_r U_rᵀ W`` comes out of ``eigh`` of
    ``W S Sᵀ Wᵀ = E[(W x)(W x)ᵀ] + λ W Wᵀ``: no input moment and no SVD of W S at all. There λ, a share
    ``damping`` of the mean input energy, is estimated as ``tr(W M Wᵀ) / tr(W Wᵀ)`` (exact for isotropic inputs).
    """
    validate_rank(rank, *W.shape)
    W64 = W.detach().double()
    if stats.of_outputs:
        moment, gram = stats.second_moment().to(W64.device), W64 @ W64.T
        lam = damping * moment.trace() / gram.trace().clamp_min(torch.finfo(torch.float64).tiny)
        U = _top_eigenvectors(moment + lam * gram, rank)
        return (U.T @ W64).float(), U.float()
    S = _damped_cholesky(stats.second_moment().to(W64.device), damping)
    U, sigma, Vh = truncated_svd(W64 @ S, rank)
    A_white, B = balanced(U, sigma, Vh, rank)
    A = torch.linalg.solve_triangular(S, A_white, upper=False, left=False)  # A_white @ S⁻¹
    return A.float(), B.float()


def svd_bases(W: Tensor, k: int, stats: Moments | None = None, damping: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """The top-``k`` rank-one bases of W, ``W ≈ U diag(σ) Vh`` (float64): of W itself, or with ``stats`` (input moments)
    of the whitened ``W S`` with the whitening undone (``Vh = Vh_white S⁻¹``), so that truncating the bases is
    output-optimal over the calibration inputs, as ``whiten`` is."""
    validate_rank(k, *W.shape)
    W64 = W.detach().double()
    if stats is None:
        return truncated_svd(W64, k)
    S = _damped_cholesky(stats.second_moment().to(W64.device), damping)
    U, sigma, Vh = truncated_svd(W64 @ S, k)
    return U, sigma, torch.linalg.solve_triangular(S, Vh, upper=False, left=False)


def whitened_spectrum(W: Tensor, stats: Moments) -> Tensor:
    """σ² of ``W S`` (``S Sᵀ = E[x xᵀ]``), largest first, float64: ``Σ_{i>r} σ_i²`` is the output error
    ``E‖(W − W_r) x‖²`` of the best rank-r pair over the calibration inputs (what ``whiten`` truncates).

    No damping is needed: the eigenvalues of ``W M Wᵀ`` (out ≤ in) or of ``Lᵀ Wᵀ W L`` (``M = L Lᵀ``) are these σ².
    """
    W64 = W.detach().double()
    moment = stats.second_moment().to(W64.device)
    if stats.of_outputs:
        values = torch.linalg.eigvalsh(moment)
    elif W64.shape[0] <= W64.shape[1]:
        values = torch.linalg.eigvalsh(W64 @ moment @ W64.T)
    else:
        WL = W64 @ moment_root(moment)
        values = torch.linalg.eigvalsh(WL.T @ WL)
    return values.flip(0).clamp(min=0)


def moment_root(M: Tensor) -> Tensor:
    """``L`` with ``L Lᵀ = M`` from the eigen-decomposition: exact for the singular moments of real activations, where a
    Cholesky factor needs damping (rounding can leave tiny negative eigenvalues: clamped to zero)."""
    eigenvalues, Q = torch.linalg.eigh(M)
    return Q * eigenvalues.clamp(min=0).sqrt()


def balance_factors(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale each rank-one term ``b_i a_iᵀ`` of ``B @ A`` so that ``‖a_i‖ = ‖b_i‖``; the product is unchanged.

    Whitening and PCA leave the scale of the inputs in A (its rows far larger than B's columns on a
    real model), so one optimizer step moves B relatively much more than A. Balanced factors, as the
    plain SVD already gives, train well from every init with one learning rate.
    """
    a, b = A.norm(dim=1), B.norm(dim=0)
    scale = torch.where((a > 0) & (b > 0), (a / b.clamp_min(1e-30)).sqrt(), torch.ones_like(a))
    return A / scale[:, None], B * scale


@dataclass(frozen=True)
class Init:
    """A training-free factorisation: ``factors(W, rank, stats, bias) -> (A, B, bias)``, the bias possibly changed (pca).
    ``needs_moments``: it reads the moments of the linear's calibration inputs (``stats``)."""

    factors: Callable[[Tensor, int, Moments | None, Tensor | None], tuple[Tensor, Tensor, Tensor | None]]
    needs_moments: bool


def _keeps_bias(factors: Callable[..., tuple[Tensor, Tensor]], with_stats: bool) -> Callable[..., tuple[Tensor, Tensor, Tensor | None]]:
    """An init whose factors leave the linear's bias as it is."""

    def init(W: Tensor, rank: int, stats: Moments | None, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        A, B = factors(W, rank, stats) if with_stats else factors(W, rank)
        return A, B, None if bias is None else bias.detach().float()

    return init


INITS: dict[str, Init] = {  # a new init is its function and one entry here
    "svd": Init(_keeps_bias(svd_factors, with_stats=False), needs_moments=False),
    "pca": Init(pca_factors, needs_moments=True),
    "whiten": Init(_keeps_bias(whiten_factors, with_stats=True), needs_moments=True),
}
FALLBACK_INIT = "svd"  # for an MoE expert routed too few calibration tokens to have moments


def factorize(
    W: Tensor, rank: int, init: str, stats: Moments | None = None, bias: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Factor W with the named init. Returns balanced (A, B) and the bias in float32, possibly updated (pca)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: use one of {tuple(INITS)}")
    if INITS[init].needs_moments and stats is None:
        raise ValueError(f"init {init!r} needs the activation statistics (stats=Moments) of the layer")
    A, B, new_bias = INITS[init].factors(W, rank, stats, bias)
    return *balance_factors(A, B), new_bias


def from_linear(linear: nn.Linear, rank: int, init: str = "svd", stats: Moments | None = None) -> LowRankLinear:
    """``linear`` factored at ``rank`` with one of ``INITS``, on its device and dtype (``stats``: for the inits that need moments)."""
    bias = None if linear.bias is None else linear.bias.detach()
    A, B, new_bias = factorize(linear.weight.detach(), rank, init, stats=stats, bias=bias)
    dtype = linear.weight.dtype
    return LowRankLinear.from_factors(A.to(dtype), B.to(dtype), None if new_bias is None else new_bias.to(dtype))


@torch.no_grad()
def experts_from_weights(
    weight: Tensor,
    rank: int,
    init: str = "svd",
    stats: Sequence[Moments | None] | None = None,
    mine: Callable[[int], bool] = lambda _: True,
) -> ExpertLinears:
    """Each expert's ``weight[e] (out, in)`` factored at ``rank``; ``stats[e]`` are the moments of the tokens routed to it.

    An expert whose entry is None (it saw too few tokens) gets ``FALLBACK_INIT`` when the init needs moments. An expert
    ``mine`` rejects keeps uninitialised factors: another process computes them.
    """
    num_experts, out_features, in_features = weight.shape
    module = ExpertLinears(num_experts, in_features, out_features, rank, device=weight.device, dtype=weight.dtype)
    for e in filter(mine, range(num_experts)):
        expert_stats = stats[e] if stats is not None else None
        fallback = expert_stats is None and INITS[init].needs_moments
        A, B, _ = factorize(weight[e].detach(), rank, FALLBACK_INIT if fallback else init, stats=expert_stats)
        module.A[e].copy_(A)
        module.B[e].copy_(B)
    return module


def factorize_layer_(
    layer: nn.Module, ranks: dict[str, int], init: str, stats: dict[str, Any], mine: Callable[[str], bool] = lambda _: True
) -> None:
    """Swap the layer's chosen linears and expert projections (unfused by ``moe.unfuse_experts_``) for factors initialised by ``init``.

    A linear ``mine`` rejects (or an expert's projection, named ``<projection>:<expert>``) gets factors of the right shape
    left uninitialised: another process computes them.
    """

    def factored(name: str, linear: nn.Linear) -> LowRankLinear:
        if mine(name):
            return from_linear(linear, ranks[name], init, stats.get(name))
        w, bias = linear.weight, linear.bias is not None
        return nn.utils.skip_init(LowRankLinear, w.shape[1], w.shape[0], ranks[name], bias, device=w.device, dtype=w.dtype)

    replace_linears_(layer, factored, lambda name, _: name in ranks)
    for name, module in list(layer.named_modules()):
        if isinstance(module, ExpertLinears) and name in ranks:
            factors = experts_from_weights(module.weight, ranks[name], init, stats.get(name), lambda e, n=name: mine(f"{n}:{e}"))
            layer.set_submodule(name, factors)


def factorization_cost(module: nn.Module) -> float:
    """The flops of factoring a linear or one expert of a projection, up to a constant: what owners are balanced by."""
    out_features, in_features = module.out_features, module.in_features
    return out_features * in_features * min(out_features, in_features)
