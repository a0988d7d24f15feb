import pytest
import torch
from torch import Tensor

from distill_lr.errors import UserInputError
from distill_lr.factorize import INITS, balance_factors, break_even_rank, factorize, pca_factors, svd_factors, whiten_factors
from distill_lr.moments import Moments


def correlated_inputs(tokens: int, features: int, seed: int, offset: float = 0.0) -> Tensor:
    """Anisotropic inputs (variances over three decades, rotated), like real activations."""
    g = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(features, features, generator=g))
    scales = torch.logspace(0, -3, features)
    return (torch.randn(tokens, features, generator=g) * scales) @ rotation.T + offset


def stats_of(x: Tensor) -> Moments:
    stats = Moments.empty(x.shape[-1])
    stats.update(x)
    return stats


def weight(out_features: int, in_features: int, seed: int = 0) -> Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def output_error(W: Tensor, x: Tensor, A: Tensor, B: Tensor, bias_shift: Tensor | None = None) -> float:
    """Σ‖W x − (B A x + bias_shift)‖² over the tokens (bias_shift = new bias − old bias)."""
    diff = x @ (W - B @ A).T
    if bias_shift is not None:
        diff = diff - bias_shift
    return diff.square().sum().item()


def test_full_rank_svd_is_exact() -> None:
    W = weight(12, 20)
    A, B = svd_factors(W, 12)
    assert A.shape == (12, 20) and B.shape == (12, 12)
    torch.testing.assert_close(B @ A, W, atol=1e-5, rtol=1e-5)


def test_truncated_svd_is_eckart_young_optimal_and_balanced() -> None:
    W = weight(16, 24)
    sigma = torch.linalg.svdvals(W)
    A, B = svd_factors(W, 5)
    error = (W - B @ A).square().sum()
    torch.testing.assert_close(error, sigma[5:].square().sum(), rtol=1e-4, atol=1e-4)
    # sqrt(σ) on both sides: row i of A and column i of B have the same norm.
    torch.testing.assert_close(A.norm(dim=1), B.norm(dim=0))
    torch.testing.assert_close(A.norm(dim=1), sigma[:5].sqrt())


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["eigh-route", "cholesky-route"])
def test_activation_aware_inits_beat_svd_on_outputs(shape: tuple[int, int]) -> None:
    W = weight(*shape)
    x = correlated_inputs(2000, shape[1], seed=1, offset=0.5)
    stats, rank = stats_of(x), 6
    svd_error = output_error(W, x, *svd_factors(W, rank))
    A, B, bias = pca_factors(W, rank, stats)
    assert bias is None
    pca_error = output_error(W, x, A, B)
    whiten_error = output_error(W, x, *whiten_factors(W, rank, stats))
    assert pca_error < 0.5 * svd_error
    assert whiten_error < 0.5 * svd_error
    # Both are output-optimal at this rank (uncentered PCA projects on the top left singular
    # vectors of W·S, exactly what whitening keeps), so they reach the same error.
    assert whiten_error == pytest.approx(pca_error, rel=1e-3)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["eigh-route", "cholesky-route"])
def test_pca_with_bias_keeps_output_mean_and_beats_svd(shape: tuple[int, int]) -> None:
    W, bias = weight(*shape), torch.randn(shape[0])
    x = correlated_inputs(2000, shape[1], seed=2, offset=3.0)
    stats, rank = stats_of(x), 6
    A, B, new_bias = pca_factors(W, rank, stats, bias=bias)
    assert new_bias is not None and new_bias.dtype == torch.float32
    y = x @ W.T + bias
    y_hat = x @ (B @ A).T + new_bias
    torch.testing.assert_close(y_hat.mean(dim=0), y.mean(dim=0), atol=1e-4, rtol=1e-4)
    assert output_error(W, x, A, B, new_bias - bias) < 0.5 * output_error(W, x, *svd_factors(W, rank))


def test_pca_routes_find_the_top_output_directions() -> None:
    """The Cholesky route (out > in) spans the top eigenvectors of the output moment W E[xxᵀ] Wᵀ."""
    W = weight(40, 24)
    x = correlated_inputs(2000, 24, seed=3)
    stats, rank = stats_of(x), 5
    _, B, _ = pca_factors(W, rank, stats)
    W64 = W.double()
    _, vectors = torch.linalg.eigh(W64 @ stats.second_moment() @ W64.T)
    top = vectors[:, -rank:].float()
    torch.testing.assert_close(B @ B.T, top @ top.T, atol=1e-4, rtol=1e-4)


def test_full_rank_whiten_reproduces_weight() -> None:
    W = weight(20, 12)
    A, B = whiten_factors(W, 12, stats_of(correlated_inputs(500, 12, seed=4)))
    torch.testing.assert_close(B @ A, W, atol=1e-4, rtol=1e-4)


def test_whiten_grows_damping_on_rank_deficient_inputs() -> None:
    x = correlated_inputs(20, 48, seed=5)  # fewer tokens than features
    x[:, :8] = 0  # dead channels
    W = weight(16, 48)
    # A tiny starting damping cannot hide the float32 rounding of the singular moment.
    with pytest.warns(UserWarning, match="damping raised"):
        A, B = whiten_factors(W, 8, stats_of(x), damping=1e-12)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert output_error(W, x, A, B) < output_error(W, x, *svd_factors(W, 8))


def test_non_finite_statistics_are_reported() -> None:
    x = correlated_inputs(10, 6, seed=6)
    x[3, 2] = float("inf")
    with pytest.raises(UserInputError, match="inf or NaN"):
        whiten_factors(weight(4, 6), 2, stats_of(x))


def test_empty_statistics_are_rejected() -> None:
    with pytest.raises(ValueError, match="no inputs"):
        Moments.empty(6).mean()


def test_stats_over_batches_equal_stats_of_concatenation() -> None:
    x = correlated_inputs(300, 10, seed=7, offset=1.0).bfloat16().float()  # exact in bfloat16 too
    streamed = Moments.empty(10)
    for batch in (x[:50].reshape(5, 10, 10), x[50:170], x[170:].bfloat16()):
        streamed.update(batch)
    whole = stats_of(x)
    assert streamed.count == whole.count == 300
    torch.testing.assert_close(streamed.sum_xxT, whole.sum_xxT, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(streamed.sum_x, whole.sum_x, rtol=1e-5, atol=1e-4)
    x64 = x.double()
    torch.testing.assert_close(whole.mean(), x64.mean(dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole.covariance(), torch.cov(x64.T, correction=0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(whole.second_moment(), x64.T @ x64 / 300, rtol=1e-5, atol=1e-6)


def test_stats_reject_wrong_width() -> None:
    with pytest.raises(ValueError, match="features"):
        Moments.empty(6).update(torch.zeros(3, 7))


def test_factorize_dispatch() -> None:
    W, bias = weight(8, 10), torch.randn(8, dtype=torch.float64)
    A, B, new_bias = factorize(W, 3, "svd", bias=bias)
    assert new_bias is not None and new_bias.dtype == torch.float32
    torch.testing.assert_close(new_bias, bias.float())
    stats = stats_of(correlated_inputs(100, 10, seed=8))
    for init in INITS:
        A, B, _ = factorize(W, 3, init, stats=stats)
        assert A.shape == (3, 10) and B.shape == (8, 3) and A.dtype == B.dtype == torch.float32
    with pytest.raises(ValueError, match="svd', 'pca', 'whiten"):
        factorize(W, 3, "qr")
    for init in ("pca", "whiten"):
        with pytest.raises(ValueError, match="needs the activation statistics"):
            factorize(W, 3, init)


def test_balance_keeps_the_product_and_equalises_term_norms() -> None:
    A, B = weight(4, 10, seed=1) * 30.0, weight(6, 4, seed=2) * 0.1
    A[2] = 0.0  # a dead term stays as it is
    A2, B2 = balance_factors(A, B)
    torch.testing.assert_close(B2 @ A2, B @ A, atol=1e-5, rtol=1e-5)
    alive = [0, 1, 3]
    torch.testing.assert_close(A2.norm(dim=1)[alive], B2.norm(dim=0)[alive])
    torch.testing.assert_close(B2[:, 2], B[:, 2])
    stats = stats_of(correlated_inputs(200, 10, seed=3))
    for init in INITS:  # every init hands out balanced factors
        A, B, _ = factorize(weight(6, 10), 4, init, stats=stats)
        torch.testing.assert_close(A.norm(dim=1), B.norm(dim=0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rank", [0, 9, 2.0, True])
def test_invalid_rank_is_rejected(rank: int) -> None:
    with pytest.raises(ValueError, match="rank must be"):
        svd_factors(weight(8, 10), rank)


def test_break_even_rank() -> None:
    m, n = 1536, 576
    r = break_even_rank(m, n)
    assert r * (m + n) == pytest.approx(m * n)
    assert break_even_rank(n, m) == r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(512, 384), (384, 512)])
def test_fast_svd_solvers_are_close_to_exact(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """The GPU fast paths (Gram eigen-decomposition, subspace iteration) lose well under 1% against the optimal rank-r error."""
    from distill_lr.factorize import truncated_svd

    g = torch.Generator().manual_seed(0)
    spectrum = torch.logspace(0, -4, 256, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(shape[0], 256, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(shape[1], 256, generator=g, dtype=torch.float64))
    M = ((U * spectrum) @ V.T).to(dtype)
    rank = 96
    errors = {}
    for solver in ("exact", "gram", "randomized"):
        u, s, vh = truncated_svd(M, rank, solver)
        assert u.shape == (shape[0], rank) and s.shape == (rank,) and vh.shape == (rank, shape[1])
        assert u.dtype == s.dtype == vh.dtype == M.dtype
        errors[solver] = float((M - (u * s) @ vh).norm())
    assert errors["gram"] <= errors["exact"] * 1.01
    assert errors["randomized"] <= errors["exact"] * 1.01
    with pytest.raises(ValueError, match="unknown SVD solver"):
        truncated_svd(M, rank, "qr")


@pytest.mark.parametrize("init", ["pca", "whiten"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_output_moments_give_the_same_factors_as_input_moments(init: str, with_bias: bool) -> None:
    """For a matrix with fewer outputs than inputs, the moments of ``W x`` replace the larger ones of x."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(12, 40, generator=g)
    bias = torch.randn(12, generator=g) if with_bias else None
    x = correlated_inputs(400, 40, seed=4, offset=0.2)
    outputs = Moments.empty(12, of_outputs=True)
    outputs.update(x @ W.T)
    A_in, B_in, bias_in = factorize(W, 5, init, stats=stats_of(x), bias=bias)
    A_out, B_out, bias_out = factorize(W, 5, init, stats=outputs, bias=bias)
    assert torch.allclose(B_out @ A_out, B_in @ A_in, atol=1e-4)
    assert (bias_out is None) == (bias_in is None)
    if bias_in is not None:
        assert torch.allclose(bias_out, bias_in, atol=1e-4)
