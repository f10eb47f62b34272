"""Tensor-Train maximizer: a PROTES-style TT probability model over the grid, ask/tell.

The model is a non-negative TT tensor P with cores G_k = exp(theta_k) (shape r x n x r, rank-r
boundaries summed by all-ones vectors), sampled exactly left to right and trained by Adam steps
on the log-likelihood of the elite. The math is vectorized NumPy (no JAX, no autograd): the
gradient of log P(x) with respect to core k is l_k^T r_{k+1} / (l_k G_k[x_k] r_{k+1}) for the
left/right messages l, r, which is invariant to how the messages are scaled, so they can be
renormalized freely. Padding to the largest mode size (masked out) keeps every core one array.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import (
    Optimizer,
    check_positive_float,
    check_positive_int,
    cma_diagonal,
    cma_rng_options,
    grid_to_relaxed,
    relaxed_to_grid,
)

_THETA_CLIP = 30.0
# Rescale the float64 chain products every few factors only (each rescaling is a NumPy call):
# 8 factors of at most r e^30 cannot overflow float64.
_RENORM_EVERY = 8
# The model's float type: float32 halves the memory traffic of the dense passes over the cores
# (exp, Adam, cumulative sums), which dominate at d = 4,096; its 24-bit mantissa resolves the
# sampling probabilities and the Adam steps far below what a few hundred queries can tell apart.
MODEL_DTYPE = np.float32

# `ordinal` for "auto", by whether the grid is ordered (neighbouring indices = similar values):
# ordinal steps are local moves there, while on a codebook they are just a biased resampling.
ORDINAL_AUTO = {True: 1.0, False: 0.0}


def resolve_ordinal(ordinal: float | str, ordered: bool) -> float:
    """TT's `ordinal` for a grid: "auto" -> ORDINAL_AUTO[ordered], a number in [0, 1] as given."""
    if isinstance(ordinal, str) and ordinal == "auto":
        return ORDINAL_AUTO[bool(ordered)]
    if isinstance(ordinal, bool) or not isinstance(ordinal, (int, float)) or not 0.0 <= ordinal <= 1.0:
        raise ValueError(f"ordinal must be 'auto' or a number in [0, 1], got {ordinal!r}")
    return float(ordinal)


# `cma` for "auto", by whether the grid is ordered: CMA-ES proposals need a continuous relaxation
# (neighbouring indices = similar stimuli); on a codebook they are noise. Chosen on bench_am (SN-GAN)
# and bench_optimizers (batch 64, smooth functions, 256 queries); see the README's table.
CMA_AUTO = {True: 0.5, False: 0.0}


def resolve_cma(cma: float | str, ordered: bool) -> float:
    """TT's `cma` share for a grid: "auto" -> CMA_AUTO[ordered], a number in [0, 1] as given."""
    if isinstance(cma, str) and cma == "auto":
        return CMA_AUTO[bool(ordered)]
    if isinstance(cma, bool) or not isinstance(cma, (int, float)) or not 0.0 <= cma <= 1.0:
        raise ValueError(f"cma must be 'auto' or a number in [0, 1], got {cma!r}")
    return float(cma)


def qtt_sizes(n: np.ndarray) -> np.ndarray:
    """Number of binary modes q_j for each n_j = 2^q_j; ValueError if some n_j is not a power of 2."""
    q = np.round(np.log2(n)).astype(np.int64)
    if np.any(2**q != n):
        raise ValueError(f"qtt needs every n to be a power of two, got n={sorted(set(n.tolist()))}")
    return q


def ind_tt_to_qtt(I: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Indices (k, d) to binary QTT indices (k, sum q), bits least significant first (Fortran order)."""
    I = np.asarray(I, dtype=np.int64)
    cols = [(I[:, j : j + 1] >> np.arange(q[j])) & 1 for j in range(len(q))]
    return np.concatenate(cols, axis=1)


def ind_qtt_to_tt(Iq: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Binary QTT indices (k, sum q) back to indices (k, d); the inverse of `ind_tt_to_qtt`."""
    Iq = np.asarray(Iq, dtype=np.int64)
    weights = np.concatenate([2 ** np.arange(qj) for qj in q])
    owner = np.repeat(np.arange(len(q)), q)
    I = np.zeros((Iq.shape[0], len(q)), dtype=np.int64)
    np.add.at(I.T, owner, (Iq * weights).T)
    return I


def tt_cores(theta: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Non-negative cores G = exp(theta), zero on padded (masked-out) grid values."""
    G = np.exp(theta)
    if not mask.all():  # one n for every mode (the usual grid): nothing padded, no pass
        G *= mask[:, None, :, None]
    return G


def value_major(theta: Any) -> np.ndarray:
    """theta (D, r, N, r) as MODEL_DTYPE stored value-major, i.e. as (D, N, r, r) in memory: a grid
    point's slices G_k[:, x_k, :] are then contiguous r x r blocks, which the gradient gathers and
    adds to; elementwise passes (exp, Adam) keep the layout."""
    a = np.asarray(theta, dtype=MODEL_DTYPE).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(a).transpose(0, 2, 1, 3)


def _block(d: int) -> int:
    """Block length of the two-level chains: about sqrt(d) / 4 steps inside the blocks, and a log-depth
    scan over the about 4 sqrt(d) blocks (~30 NumPy steps at d = 4,096 instead of 4,096)."""
    return max(1, int(np.ceil(np.sqrt(d) / 4)))


def _scan_products(Q: np.ndarray) -> np.ndarray:
    """Inclusive prefix products Q_0 ... Q_j of matrices Q (..., nb, r, r), rescaled (Hillis-Steele)."""
    nb, s = Q.shape[-3], 1
    while s < nb:
        Q[..., s:, :, :] = Q[..., :-s, :, :] @ Q[..., s:, :, :]
        Q /= Q.sum(axis=(-2, -1), keepdims=True)
        s *= 2
    return Q


def chain_left(M: np.ndarray) -> np.ndarray:
    """Messages V[..., k, :] proportional to 1^T M_0 ... M_{k-1} (k = 0..d) of matrices M (..., d, r, r).

    Every message is rescaled to sum 1 (what uses them is invariant to their scale). Computed in
    blocks: prefix products inside all blocks at once, a log-depth scan over the block products, then
    every message from the one entering its block; ~30 Python steps at d = 4,096 instead of d.
    In float64, rescaled every few steps: entries are at most r e^30 per factor (theta is clipped).
    """
    *lead, d, r, _ = M.shape
    M = np.asarray(M, dtype=np.float64)
    B = _block(d)
    nb = -(-d // B)
    if nb * B > d:  # pad with identities (they leave the products unchanged)
        eye = np.broadcast_to(np.eye(r), (*lead, nb * B - d, r, r))
        M = np.concatenate([M, eye], axis=-3)
    Mb = np.moveaxis(M.reshape(*lead, nb, B, r, r), -3, 0)  # (B, ..., nb, r, r)
    P = np.empty(Mb.shape)  # P[i, ..., j] = Mb[0, ..., j] ... Mb[i, ..., j], rescaled now and then
    P[0] = Mb[0]
    for i in range(1, B):
        np.matmul(P[i - 1], Mb[i], out=P[i])
        if i % _RENORM_EVERY == 0:
            P[i] /= P[i].sum(axis=(-2, -1), keepdims=True)
    Q = _scan_products(P[B - 1] / P[B - 1].sum(axis=(-2, -1), keepdims=True))  # blocks 0..j
    C = np.empty((*lead, nb, r))  # the message entering block j: 1^T Q_{j-1}
    C[..., 0, :] = 1.0
    C[..., 1:, :] = Q[..., :-1, :, :].sum(axis=-2)
    V = np.moveaxis((C[..., None, :] @ P)[..., 0, :], 0, -2)  # (..., nb, B, r)
    V = V.reshape(*lead, nb * B, r)[..., :d, :]
    V = V / V.sum(axis=-1, keepdims=True)
    first = np.full((*lead, 1, r), 1.0 / r)
    return np.concatenate([first, V], axis=-2)


def chain_right(M: np.ndarray) -> np.ndarray:
    """Messages V[..., k, :] proportional to M_k ... M_{d-1} 1 (k = 0..d), rescaled to sum 1."""
    return np.flip(chain_left(np.flip(M, axis=-3).swapaxes(-1, -2)), axis=-2)


def tt_interfaces_right(S: np.ndarray) -> np.ndarray:
    """Right interfaces z_k = S_k z_{k+1} (rescaled) of summed cores S (d, r, r); z_d = 1."""
    return chain_right(S)


def tt_interfaces_left(S: np.ndarray) -> np.ndarray:
    """Left interfaces l_{k+1} = l_k S_k (rescaled) of summed cores; l_0 = 1."""
    return chain_left(S)


def chain_states(F: np.ndarray, a0: np.ndarray) -> np.ndarray:
    """States a (b, d+1) of the maps a_{k+1} = F[:, k, a_k] (F int (b, d, r)) from a_0 = a0 (b,).

    Compositions of the maps inside blocks at once, a log-depth scan over the blocks' compositions,
    then every state from the one entering its block: ~30 vectorized steps at d = 4,096 instead of d.
    """
    b, d, r = F.shape
    a0 = np.asarray(a0)
    B = _block(d)
    nb = -(-d // B)
    if nb * B > d:  # pad with identity maps
        F = np.concatenate([F, np.broadcast_to(np.arange(r), (b, nb * B - d, r))], axis=1)
    Fi = np.ascontiguousarray(np.moveaxis(F.reshape(b, nb, B, r), 2, 0)).reshape(B, b * nb, r)
    base = (np.arange(b * nb) * r)[:, None]
    C = np.empty_like(Fi)  # C[i] = Fi[i] o ... o Fi[0], per (sample, block)
    C[0] = Fi[0]
    for i in range(1, B):
        np.take(Fi[i], base + C[i - 1], out=C[i])
    Q, s = C[B - 1].reshape(b, nb, r).copy(), 1  # Q[:, j] = block j's map o ... o block 0's
    while s < nb:
        Q[:, s:] = np.take_along_axis(Q[:, s:], Q[:, :-s], axis=-1)
        s *= 2
    entry = np.empty((b, nb), dtype=F.dtype)
    entry[:, 0] = a0
    entry[:, 1:] = np.take_along_axis(Q[:, :-1], a0[:, None, None], axis=-1)[..., 0]
    A = np.take_along_axis(C, entry.reshape(1, b * nb, 1), axis=-1)[..., 0]  # (B, b * nb)
    A = np.moveaxis(A.reshape(B, b, nb), 0, 2).reshape(b, nb * B)[:, :d]
    return np.concatenate([a0[:, None], A], axis=1)


def tt_sample(G: np.ndarray, Z: np.ndarray, u: np.ndarray, S: np.ndarray | None = None) -> np.ndarray:
    """Exact samples from P ∝ TT(G) on uniforms u (b, d), one uniform per dimension.

    A non-negative TT is a hidden Markov chain over its bond indices a_0..a_d: the chain has the
    transitions T_k[a, a'] ∝ S_k[a, a'] z_{k+1}[a'] (S = cores summed over the grid value, z the right
    interfaces), and given it the values are independent, x_k ∝ G_k[a_k, :, a_{k+1}]. So the chain
    is drawn first (inverse CDF per step, the steps composed in blocks: `chain_states`), then every
    x_k at once by bisection in its cumulative row; the uniform of step k is reused for x_k (its position
    inside the chosen chain interval is again uniform). The same distribution as drawing x_k given
    x_<k left to right (d sequential steps), with O(sqrt d) Python steps. S: `core_sums(G)` if known.
    """
    d, r, N, _ = G.shape
    b = u.shape[0]
    u = np.asarray(u, dtype=np.float64)
    S = core_sums(G) if S is None else S
    T = S * Z[1:, None, :]
    T[0] = T[0].sum(axis=0)  # the all-ones left boundary sums core 0's left bond: one start row
    cT = np.cumsum(T, axis=2, dtype=np.float64)  # (d, r, r)
    t = u[:, :, None] * cT[None, :, :, -1]  # (b, d, r): the threshold for each previous state
    F = np.zeros((b, d, r), dtype=np.int64)
    for j in range(r - 1):  # next state = number of cumulative weights <= the threshold
        F += cT[None, :, :, j] <= t
    A = chain_states(F, np.zeros(b, dtype=np.int64))
    ks = np.arange(d)[None, :]
    a, a1 = A[:, :-1], A[:, 1:]
    lower = np.where(a1 > 0, cT[ks, a, np.maximum(a1 - 1, 0)], 0.0)
    width = cT[ks, a, a1] - lower
    v = np.divide(t[np.arange(b)[:, None], ks, a] - lower, width, out=np.zeros_like(width), where=width > 0)
    v = np.clip(v, 0.0, 1.0 - 2.0**-40)
    # x_k by bisection in the cumulative cores over the value, laid out (d, N, r, r) (contiguous r x r
    # blocks when G is value-major); core 0 summed over its left bond (x_0 depends on a_1 alone).
    cG = np.array(G.transpose(0, 2, 1, 3))  # (d, N, r, r) C-ordered
    for x in range(1, N):  # slice adds: numpy's cumsum over a middle axis loops per (k, a, a') element
        cG[:, x] += cG[:, x - 1]
    cG[0, :, 0, :] = cG[0].sum(axis=1)  # the chain starts in state a_0 = 0
    flat = cG.reshape(-1)
    base = ks * (N * r * r) + a * r + a1
    thr = v * flat[base + (N - 1) * r * r]
    lo = np.zeros((b, d), dtype=np.int64)
    hi = np.full((b, d), N, dtype=np.int64)
    for _ in range(int(np.ceil(np.log2(N + 1)))):  # the first value whose cumulative weight exceeds thr
        active = lo < hi
        mid = np.minimum((lo + hi) // 2, N - 1)
        right = active & (flat[base + mid * (r * r)] <= thr)
        lo = np.where(right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)
    return np.minimum(lo, N - 1)


def core_sums(G: np.ndarray) -> np.ndarray:
    """Cores summed over the grid value: S (d, r, r)."""
    return np.einsum("krnq->krq", G)


def tt_messages(Gx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right messages (m, d+1, r) along the selected slices Gx (m, d, r, r)."""
    return chain_left(Gx), chain_right(Gx)


def tt_grad_loglik(
    G: np.ndarray, mask: np.ndarray, X: np.ndarray, w: np.ndarray, Z: np.ndarray, S: np.ndarray | None = None
) -> np.ndarray:
    """Gradient w.r.t. theta (G = exp theta) of sum_b w_b log p(X_b), p = P / sum(P).

    Z holds the right interfaces of the summed cores (as `tt_interfaces_right` returns). The
    normalizer's term is one dense pass over the cores; each point's term touches only its own
    slices G_k[:, x_k, :] (added point by point: a point's slices are distinct, so no scatter-add).
    The left and right messages of the points and the left interfaces run as one chain.
    S: `core_sums(G)` if known.
    """
    d = G.shape[0]
    m = X.shape[0]
    ks = np.arange(d)
    Gx = G[ks[None, :], :, X, :]  # (m, d, r, r)
    S = core_sums(G) if S is None else S
    V = chain_left(np.concatenate([Gx, np.flip(Gx, axis=1).swapaxes(-1, -2), S[None]], dtype=np.float64))
    L, R, LZ = V[:m], np.flip(V[m : 2 * m], axis=1), V[2 * m]
    den = np.einsum("bkr,bkrq,bkq->bk", L[:, :d], Gx, R[:, 1:])
    Lw = L[:, :d] * (np.asarray(w, dtype=G.dtype)[:, None] / den)[:, :, None]
    denZ = np.einsum("kr,krq,kq->k", LZ[:d], S, Z[1:])
    grad_z = (LZ[:d, :, None] * Z[1:, None, :]) / denZ[:, None, None]
    grad = G * (-float(np.sum(w)) * grad_z)[:, :, None, :].astype(G.dtype)  # mask: G is 0 there
    point = Lw[:, :, :, None] * R[:, 1:, None, :] * Gx  # (m, d, r, r): d log p(X_b) / d theta at X_b's slices
    for j in range(m):
        grad[ks, :, X[j], :] += point[j]
    return grad


def elite_rows(X: np.ndarray, v: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k largest v among distinct points of X (a repeated point would collapse the model)."""
    seen: set[bytes] = set()
    keep = []
    for j in np.argsort(-v, kind="stable"):
        key = X[j].tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(j)
            if len(keep) == k:
                break
    return np.asarray(keep, dtype=np.int64)


class Adam:
    """Adam ascent on one array (bias-corrected), state kept for warm starts; updates in place."""

    def __init__(
        self,
        shape: tuple[int, ...],
        lr: float,
        b1: float = 0.9,
        b2: float = 0.999,
        dtype: Any = np.float64,
        like: np.ndarray | None = None,
    ) -> None:
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, 1e-8
        # `like`: moments with that array's dtype and memory layout (elementwise passes stay in order)
        self.m = np.zeros(shape, dtype=dtype) if like is None else np.zeros_like(like)
        self.v = np.zeros_like(self.m)
        self.t = 0

    def step(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        """Return x moved up the gradient g (neither is changed).

        The moments are kept as m / (1 - b1) and v / (1 - b2) (sums with decay), and the constants
        folded into two scalars: 10 passes over the array instead of 12 (they dominate at d = 4,096).
        """
        self.t += 1
        self.m *= self.b1
        self.m += g  # m' = b1 m' + g
        tmp = np.multiply(g, g)
        self.v *= self.b2
        self.v += tmp  # v' = b2 v' + g^2
        # lr m_hat / (sqrt(v_hat) + eps) with m_hat = (1 - b1) m' / c1, v_hat = (1 - b2) v' / c2
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        root = np.sqrt((1 - self.b2) / c2)
        np.sqrt(self.v, out=tmp)
        tmp += self.eps / root
        np.divide(self.m, tmp, out=tmp)
        tmp *= self.lr * (1 - self.b1) / (c1 * root)
        tmp += x
        return tmp


class CMAProposals:
    """CMA-ES (pycma) as one proposal source of the TT maximizer on ordered grids.

    Works on the relaxation x in [0, 1]^d (point j = floor(x_j n_j)), serves whole generations
    through a queue and is updated once every point of a generation is told; a better point found
    by another source is injected (at its cell centre) into the next generation, so CMA learns from
    every query, not only its own.
    """

    def __init__(self, n: np.ndarray, seed: int, size: int, sigma0: float = 0.3) -> None:
        import cma

        self.n = n
        dim = max(n.size, 2)  # pycma needs at least 2 dimensions
        opts: dict[str, Any] = {**cma_rng_options(seed + 1), "verbose": -9, "CMA_diagonal": cma_diagonal(dim, "auto")}
        self.es = cma.CMAEvolutionStrategy(np.full(dim, 0.5), sigma0, opts)
        # A generation may be larger than pycma's popsize (its weights stay those of popsize:
        # strong selection, which wins at budgets of a few generations).
        self.size = max(int(size), int(self.es.popsize))
        self.X = np.zeros((0, dim))  # the open generation
        self.keys: dict[bytes, list[int]] = {}
        self.y = np.zeros(0)
        self.served = 0
        self.best = -np.inf  # best response of any source already shown to CMA

    def grid(self, X: np.ndarray) -> np.ndarray:
        """Grid points of relaxed points X."""
        return relaxed_to_grid(X, self.n)

    def ask(self, k: int) -> np.ndarray:
        """Up to k points of the open generation (a new one once the last is told); may be fewer."""
        if self.served == self.X.shape[0] and not np.isnan(self.y).any():
            self.X = np.asarray(self.es.ask(number=self.size), dtype=np.float64)
            self.y = np.full(self.X.shape[0], np.nan)
            self.served = 0
            self.keys = {}
            for row, I in enumerate(self.grid(self.X)):
                self.keys.setdefault(I.tobytes(), []).append(row)
        rows = np.arange(self.served, min(self.served + k, self.X.shape[0]))
        self.served += rows.size
        return self.grid(self.X[rows])

    def tell(self, I: np.ndarray, y: np.ndarray, i_best: np.ndarray | None, y_best: float) -> None:
        """Record responses of generation points; update CMA once the generation is complete."""
        for key, v in zip((row.tobytes() for row in I), y):
            rows = self.keys.get(key)
            if rows:
                r = rows.pop(0)
                self.y[r] = v if np.isfinite(v) else -np.inf
        if self.served < self.X.shape[0] or np.isnan(self.y).any() or self.X.shape[0] == 0:
            return
        loss = -self.y
        bad = ~np.isfinite(loss)
        if bad.any():
            loss[bad] = (loss[~bad].max() + 1.0) if (~bad).any() else 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es.tell(list(self.X), loss.tolist())
            gen_best = float(np.max(self.y))
            self.best = max(self.best, gen_best)
            if i_best is not None and y_best > self.best:  # another source found better: show CMA
                self.es.inject([grid_to_relaxed(i_best, self.n, self.X.shape[1])], force=True)
                self.best = y_best
        self.X = np.zeros((0, self.X.shape[1]))
        self.y = np.zeros(0)
        self.served = 0


class TTOptimizer(Optimizer):
    """PROTES-style TT maximizer with an elite archive and local moves around the elite.

    Each ask draws a `local` fraction as mutations of the elite (heavy-tailed number of changed
    coordinates, log-uniform ordinal steps or uniform resampling) and the rest from the TT model;
    each tell raises the model's likelihood of the best distinct points told so far (a tie goes to
    the newer point). Defaults were
    chosen on benchmarks/bench_optimizers.py (small batches, a sharp lr and mostly local moves beat
    the PROTES defaults k=100, k_top=10, lr=0.05 at 1k-4k queries).

    Options (defaults):
      rank=5     TT rank r of the probability model.
      batch=16   points per `ask()` when k is not given.
      elite=4    number of best points whose likelihood each step raises.
      lr=0.2     Adam learning rate on the log-cores.
      steps=1    Adam steps per `tell`.
      qtt=False  for n = 2^q, model d*q binary modes (index mapping as teneva.ind_qtt_to_tt).
      archive=True  elite = best points told so far (False: best of the last told batch, as PROTES).
      local=0.8  fraction of each ask drawn as mutations of elite points instead of TT samples.
      ordinal=0.5  probability that a mutated coordinate takes an ordinal step (else uniform value);
                   the AM stage's "auto" picks it per grid (`resolve_ordinal`).
      init=None  a `state_dict()` of an earlier run, or an int array (m, d) of good points.
      init_values=None  responses of the `init` points (used for the elite, not for `best`).
      init_steps=20     Adam steps fitting the model to `init` points.
      cma=0.0    share of each ask proposed by an internal CMA-ES (ordered grids), which is shown the
                 better points the other sources find; 0 = off.
      prior=None a `TTPrior` (`spikemax.optim.prior.fit_tt_prior`) the model starts from, so first
                 samples look like data; same n and rank, no qtt.
    """

    method = "tt"

    def __init__(
        self,
        d: int,
        n: int | Sequence[int],
        seed: int = 0,
        rank: int = 5,
        batch: int = 16,
        elite: int = 4,
        lr: float = 0.2,
        steps: int = 1,
        qtt: bool = False,
        archive: bool = True,
        local: float = 0.8,
        ordinal: float = 0.5,
        init: Any = None,
        init_values: Any = None,
        init_steps: int = 20,
        cma: float = 0.0,
        prior: Any = None,
    ) -> None:
        super().__init__(d, n, seed, batch)
        self.rank = check_positive_int("rank", rank)
        self.elite = check_positive_int("elite", elite)
        self.lr = check_positive_float("lr", lr)
        self.steps = check_positive_int("steps", steps)
        self.init_steps = check_positive_int("init_steps", init_steps, minimum=0)
        if not 0.0 <= float(local) <= 1.0:
            raise ValueError(f"local must be in [0, 1], got {local!r}")
        self.local = float(local)
        if not 0.0 <= float(ordinal) <= 1.0:
            raise ValueError(f"ordinal must be in [0, 1], got {ordinal!r}")
        self.ordinal = float(ordinal)
        self.archive = bool(archive)
        if not 0.0 <= float(cma) <= 1.0:
            raise ValueError(f"cma must be in [0, 1], got {cma!r}")
        self.cma = float(cma)
        # One CMA generation per ask: its share of the batch (at least pycma's popsize).
        self._cma = CMAProposals(self.n, self.seed, round(self.cma * self.batch)) if self.cma > 0 else None
        self.qtt = bool(qtt)
        self.q = qtt_sizes(self.n) if self.qtt else None
        self.n_model = np.full(int(self.q.sum()), 2) if self.q is not None else self.n.copy()
        self.rng = np.random.default_rng(self.seed)
        D, N, r = self.n_model.size, int(self.n_model.max()), self.rank
        self.mask = np.arange(N)[None, :] < self.n_model[:, None]
        self.theta = value_major(0.1 * self.rng.standard_normal((D, r, N, r)))
        if prior is not None:
            self._use_prior(prior)
        self.adam = Adam(self.theta.shape, self.lr, like=self.theta)
        self._elite_I = np.zeros((0, D), dtype=np.int64)  # model indices
        self._elite_y = np.zeros(0)
        self._queue = np.zeros((0, self.d), dtype=np.int64)  # points to ask first (warm start)
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if init is not None:
            self._warm_start(init, init_values)

    def _use_prior(self, prior: Any) -> None:
        theta = np.asarray(getattr(prior, "theta", None), dtype=np.float64)
        n = np.asarray(getattr(prior, "n", None))
        if self.qtt or theta.shape != self.theta.shape or n.tolist() != self.n.tolist():
            raise ValueError(
                f"prior (theta {theta.shape}) does not fit this TT model (theta {self.theta.shape}, qtt={self.qtt}):"
                " fit it with the same n and rank"
            )
        self.theta = value_major(theta)
        self._cache = None

    # -- index maps between the user's grid and the model's modes --------------------------
    def _to_model(self, I: np.ndarray) -> np.ndarray:
        return ind_tt_to_qtt(I, self.q) if self.q is not None else I

    def _from_model(self, X: np.ndarray) -> np.ndarray:
        return ind_qtt_to_tt(X, self.q) if self.q is not None else X

    # -- model -----------------------------------------------------------------------------
    def _model(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cores, their sums over the value and right interfaces of the current model (cached until the next update)."""
        if self._cache is None:
            G = tt_cores(self.theta, self.mask)
            S = core_sums(G)
            self._cache = (G, S, tt_interfaces_right(S))
        return self._cache

    def _fit(self, X: np.ndarray, w: np.ndarray, steps: int) -> None:
        """Adam steps raising the weighted mean log-likelihood of model indices X."""
        w = w / w.sum()
        for _ in range(steps):
            G, S, Z = self._model()
            g = tt_grad_loglik(G, self.mask, X, w, Z, S)
            self.theta = np.clip(self.adam.step(self.theta, g), -_THETA_CLIP, _THETA_CLIP, out=g)
            self._cache = None

    def sample(self, k: int) -> np.ndarray:
        """k points drawn from the TT model (grid indices (k, d))."""
        G, S, Z = self._model()
        u = self.rng.random((k, G.shape[0]))
        return self._from_model(tt_sample(G, Z, u, S))

    def _mutate(self, k: int) -> np.ndarray:
        """k mutations of elite points: heavy-tailed number of changed coordinates, each moved
        by a log-uniform ordinal step (neighbouring grid values are similar stimuli) or resampled.

        Only the changed coordinates draw their moves (a few per point): at d = 4,096 drawing
        them for every coordinate was most of the ask's time."""
        parents = self._from_model(self._elite_I)
        # Rank-biased parents: the incumbent is mutated most often.
        pick = np.floor(parents.shape[0] * self.rng.random(k) ** 2).astype(np.int64)
        P = parents[pick].copy()
        d = self.d
        # Power-law count of changed coordinates: mostly 1-2, occasionally many (escapes).
        m = np.minimum(np.floor(self.rng.pareto(1.0, k) + 1), d)
        change = self.rng.random((k, d), dtype=np.float32) < ((m - 1) / d).astype(np.float32)[:, None]
        change[np.arange(k), self.rng.integers(0, d, k)] = True  # m - 1 by chance, one surely
        rows, cols = np.nonzero(change)
        n, p = self.n[cols], P[rows, cols]
        span = np.log(np.maximum(n // 2, 1))
        step = np.maximum(np.floor(np.exp(self.rng.random(rows.size) * span)), 1).astype(np.int64)
        step *= self.rng.choice(np.array([-1, 1]), rows.size)
        moved = np.clip(p + step, 0, n - 1)
        moved = np.where(moved == p, np.clip(p - step, 0, n - 1), moved)
        uniform = self.rng.integers(0, n)
        P[rows, cols] = np.where(self.rng.random(rows.size) < self.ordinal, moved, uniform)
        return P

    def _ask(self, k: int) -> np.ndarray:
        out = []
        if self._queue.shape[0]:
            out.append(self._queue[:k])
            self._queue = self._queue[k:]
        left = k - sum(x.shape[0] for x in out)
        if self._cma is not None and left:
            C = self._cma.ask(round(self.cma * left))
            if C.shape[0]:
                out.append(C)
                left -= C.shape[0]
        n_local = round(self.local * left) if self._elite_I.shape[0] else 0
        if n_local:
            out.append(self._mutate(n_local))
        if left - n_local > 0:
            out.append(self.sample(left - n_local))
        return np.concatenate(out, axis=0)

    def _tell(self, I: np.ndarray, y: np.ndarray) -> None:
        if self._cma is not None:
            self._cma.tell(I, y, *self.best)
        ok = np.isfinite(y)
        if not ok.any():
            return
        X, v = self._to_model(I[ok]), y[ok]
        if self.archive:
            # New points first, so a tie goes to the newer point: spike counts are integers, so
            # plateaus are common, and keeping the old elite there would stall the local moves
            # (accepting equal offspring lets the elite drift across a plateau, as in a (1+1)-EA).
            X = np.concatenate([X, self._elite_I])
            v = np.concatenate([v, self._elite_y])
        top = elite_rows(X, v, self.elite)
        self._elite_I, self._elite_y = X[top], v[top]
        self._fit(self._elite_I, np.ones(top.size), self.steps)

    # -- warm start ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to warm-start a new optimizer: `make_optimizer('tt', ..., init=state)`."""
        i_best, y_best = self.best
        return {
            "method": "tt",
            "d": self.d,
            "n": self.n.tolist(),
            "qtt": self.qtt,
            "rank": self.rank,
            "theta": self.theta.copy(),
            "elite_I": self._from_model(self._elite_I).copy(),
            "elite_y": self._elite_y.copy(),
            "i_best": None if i_best is None else i_best.copy(),
            "y_best": y_best,
        }

    def _warm_start(self, init: Any, init_values: Any) -> None:
        if isinstance(init, dict):
            self._load_state(init)
            return
        try:
            P = np.asarray(init)
        except Exception as err:
            raise ValueError("init must be a state_dict() or an int array (m, d)") from err
        if P.ndim != 2 or P.shape[1] != self.d or P.shape[0] < 1:
            raise ValueError(f"init must be a state_dict() or an int array (m, {self.d}), got shape {P.shape}")
        if not np.issubdtype(P.dtype, np.integer) or np.any(P < 0) or np.any(self.n[None, :] <= P):
            raise ValueError("init points must be integer grid indices within n")
        P = P.astype(np.int64)
        if init_values is not None:
            v = np.asarray(init_values, dtype=np.float64).reshape(-1)
            if v.shape != (P.shape[0],):
                raise ValueError(f"init_values must have shape ({P.shape[0]},), got {np.shape(init_values)}")
            ok = np.isfinite(v)
            order = np.argsort(-v[ok], kind="stable")[: self.elite]
            self._elite_I = self._to_model(P[ok][order])
            self._elite_y = v[ok][order]
            P = P[ok][order]
        self._queue = P[: self.elite]
        if self.init_steps and P.shape[0]:
            self._fit(self._to_model(P), np.ones(P.shape[0]), self.init_steps)
            self.adam = Adam(self.theta.shape, self.lr, like=self.theta)

    def _load_state(self, state: dict) -> None:
        if state.get("method") != "tt" or "theta" not in state:
            raise ValueError("init dict must be a state_dict() of a 'tt' optimizer")
        theta = np.asarray(state["theta"], dtype=np.float64)
        if theta.shape != self.theta.shape or list(state.get("n", [])) != self.n.tolist():
            raise ValueError(
                f"init state is for d={state.get('d')}, n, rank={state.get('rank')}, qtt={state.get('qtt')};"
                f" it does not fit d={self.d}, rank={self.rank}, qtt={self.qtt}"
            )
        self.theta = value_major(theta)
        self._cache = None
        # Old responses may be stale (the neuron changed): re-measure the old elite first.
        elite = np.asarray(state.get("elite_I", np.zeros((0, self.d))), dtype=np.int64).reshape(-1, self.d)
        self._queue = elite[: self.elite]
