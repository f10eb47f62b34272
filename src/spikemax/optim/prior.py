"""A TT probability model of grid points fitted to data (e.g. a VQ-VAE's codebook indices of images).

The prior is the same non-negative TT tensor the TT maximizer searches with (cores exp(theta)),
fitted by maximum likelihood with the same gradient (`tt_grad_loglik`) and Adam, on minibatches.
It can initialize the TT search (`make_optimizer("tt", ..., prior=prior)`) and be sampled by
`random` (`make_optimizer("random", ..., prior=prior)`), so first samples look like data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from .base import check_positive_float, check_positive_int, grid_sizes
from .tt import _THETA_CLIP, Adam, tt_cores, tt_grad_loglik, tt_interfaces_right, tt_sample


def tt_log_prob(G: np.ndarray, X: np.ndarray) -> np.ndarray:
    """log p(X_b) for the normalized distribution p = P / sum(P) of the TT tensor with cores G."""
    d = G.shape[0]
    m = X.shape[0]
    Gx = G[np.arange(d)[None, :], :, X, :]  # (m, d, r, r)
    v = np.ones((m, G.shape[1]))
    logs = np.zeros(m)
    S = G.sum(axis=2)
    z = np.ones(G.shape[1])
    log_z = 0.0
    for k in range(d):
        v = np.einsum("br,brq->bq", v, Gx[:, k])
        s = v.sum(axis=1)
        logs += np.log(s)
        v = v / s[:, None]
        z = z @ S[k]
        t = z.sum()
        log_z += np.log(t)
        z = z / t
    return logs - log_z


@dataclass
class TTPrior:
    """A fitted TT distribution over the grid prod_j {0..n_j-1}: log-cores `theta` (d, r, N, r)."""

    theta: np.ndarray
    n: np.ndarray

    @property
    def d(self) -> int:
        """Number of grid dimensions."""
        return int(self.n.size)

    @property
    def rank(self) -> int:
        """TT rank of the model."""
        return int(self.theta.shape[1])

    def _cores(self) -> np.ndarray:
        mask = np.arange(self.theta.shape[2])[None, :] < self.n[:, None]
        return tt_cores(self.theta, mask)

    def log_prob(self, I: Any) -> np.ndarray:
        """Log-likelihood of grid points I (k, d) under the prior."""
        X = np.asarray(I, dtype=np.int64).reshape(-1, self.d)
        return tt_log_prob(self._cores(), X)

    def sample(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """k exact samples (k, d) from the prior."""
        G = self._cores()
        return tt_sample(G, tt_interfaces_right(G.sum(axis=2)), rng.random((k, self.d)))

    def to_dict(self) -> dict:
        """Plain arrays for np.savez / a cache file."""
        return {"theta": self.theta, "n": self.n}

    @classmethod
    def from_dict(cls, data: Any) -> TTPrior:
        """Inverse of `to_dict` (also accepts an `np.load` archive)."""
        return cls(np.asarray(data["theta"], dtype=np.float64), np.asarray(data["n"], dtype=np.int64))


def fit_tt_prior(
    I: Any,
    n: int | Sequence[int],
    rank: int = 5,
    steps: int = 300,
    lr: float = 0.05,
    batch: int = 512,
    seed: int = 0,
) -> TTPrior:
    """Maximum-likelihood TT distribution of the grid points I (m, d): Adam on minibatches."""
    X = np.asarray(I)
    if X.ndim != 2 or X.shape[0] < 1:
        raise ValueError(f"I must be an int array (m, d) with m >= 1, got shape {X.shape}")
    sizes = grid_sizes(X.shape[1], n)
    if not np.issubdtype(X.dtype, np.integer) or np.any(X < 0) or np.any(sizes[None, :] <= X):
        raise ValueError("I must hold integer grid indices within n")
    X = X.astype(np.int64)
    rank = check_positive_int("rank", rank)
    steps = check_positive_int("steps", steps)
    batch = check_positive_int("batch", batch)
    lr = check_positive_float("lr", lr)
    rng = np.random.default_rng(seed)
    d, N = X.shape[1], int(sizes.max())
    mask = np.arange(N)[None, :] < sizes[:, None]
    theta = 0.1 * rng.standard_normal((d, rank, N, rank))
    adam = Adam(theta.shape, lr)
    # rank x rank products: BLAS threads only spin (6x the CPU at rank 8 on a loaded 2-core machine).
    with threadpool_limits(1):
        for _ in range(steps):
            B = X[rng.integers(0, X.shape[0], min(batch, X.shape[0]))]
            G = tt_cores(theta, mask)
            g = tt_grad_loglik(G, mask, B, np.full(B.shape[0], 1.0 / B.shape[0]), tt_interfaces_right(G.sum(axis=2)))
            theta = np.clip(adam.step(theta, g), -_THETA_CLIP, _THETA_CLIP)
    return TTPrior(theta, sizes)
