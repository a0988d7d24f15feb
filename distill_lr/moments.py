"""Running moments of a linear's inputs (or outputs): all the activation-aware factorisations need of the data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distill_lr.errors import UserInputError


def records_outputs(out_features: int, in_features: int) -> bool:
    """Whether pca/whiten need only the moments of a linear's outputs ``W x`` rather than of its inputs.

    Both inits project W's outputs on the top eigenvectors of ``W E[x xᵀ] Wᵀ`` (whiten: plus a damping
    term), which is ``E[(W x)(W x)ᵀ]``: for a matrix with fewer outputs than inputs that (out, out)
    moment is smaller than the (in, in) one, e.g. 4096² instead of 14336² for each Mixtral expert's
    down projection (1.1 GB instead of 13 GB of float64 per layer), and an eigh replaces a large SVD.
    """
    return out_features < in_features


@dataclass
class Moments:
    """Running first and second moments of a linear's inputs x, or (``of_outputs``) of ``W x`` (what pca/whiten need).

    Each batch's ``x.T @ x`` is a float32 matmul (fast on any accelerator) that is added to float64
    running sums, so rounding does not build up over millions of calibration tokens. Output moments
    exclude the bias: they describe the product ``W x`` that the factors approximate.
    """

    sum_xxT: Tensor  # (features, features) float64
    sum_x: Tensor  # (features,) float64
    count: int  # tokens seen
    of_outputs: bool = False

    @classmethod
    def empty(cls, features: int, device: torch.device | str | None = None, of_outputs: bool = False) -> Moments:
        return cls(
            sum_xxT=torch.zeros(features, features, dtype=torch.float64, device=device),
            sum_x=torch.zeros(features, dtype=torch.float64, device=device),
            count=0,
            of_outputs=of_outputs,
        )

    def update(self, x: Tensor) -> None:
        """Add a batch ``x (..., features)``; every leading dimension counts as tokens."""
        features = self.sum_x.shape[0]
        if x.shape[-1] != features:
            raise ValueError(f"inputs have {x.shape[-1]} features, these statistics expect {features}")
        tokens = x.detach().reshape(-1, features).to(device=self.sum_x.device, dtype=torch.float32)
        self.sum_xxT += (tokens.T @ tokens).double()
        self.sum_x += tokens.sum(dim=0).double()
        self.count += tokens.shape[0]

    def mean(self) -> Tensor:
        """E[x], float64."""
        return self._per_token(self.sum_x)

    def second_moment(self) -> Tensor:
        """E[x xᵀ], float64."""
        return self._per_token(self.sum_xxT)

    def covariance(self) -> Tensor:
        """E[x xᵀ] − E[x] E[x]ᵀ, float64."""
        mean = self.mean()
        return self.second_moment() - torch.outer(mean, mean)

    def _per_token(self, total: Tensor) -> Tensor:
        if self.count == 0:
            raise ValueError("no inputs were recorded: call Moments.update before using the statistics")
        if not torch.isfinite(total).all():
            raise UserInputError(
                "the calibration activations recorded for a factorisation contain inf or NaN: "
                "check the checkpoint's weights, or run with dtype=float32 if it runs in a 16-bit dtype"
            )
        return total / self.count
