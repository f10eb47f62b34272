"""Every method at generator sizes (d = 512, a batch larger than CMA-ES's population) and the
vectorized TT math (blocked chains, hidden-chain sampler) against plain sequential references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from spikemax.optim import make_optimizer
from spikemax.optim.tt import (
    chain_left,
    chain_right,
    chain_states,
    tt_cores,
    tt_grad_loglik,
    tt_interfaces_right,
    tt_sample,
)

D, N, BATCH = 512, 16, 64  # pycma's population at d = 512 is 4 + 3 ln 512 = 22 < 64

METHODS = {
    "random": ("random", {}),
    "cma": ("cma", {}),
    "ngopt": ("ngopt", {"budget": 4 * BATCH}),
    "tt": ("tt", {}),
    "tt+cma": ("tt", {"cma": 0.5}),
    "noisy-tt": ("tt", {"noise_aware": True}),
    "noisy-cma": ("cma", {"noise_aware": True}),
}


def linear(d: int, n: int, seed: int = 0):
    """A linear response on the grid, larger toward a random corner."""
    w = np.random.default_rng(seed).standard_normal(d)
    return lambda I: (np.asarray(I) / (n - 1)) @ w


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_at_d512_with_a_batch_above_cmas_population(name):
    method, opts = METHODS[name]
    opt = make_optimizer(method, D, N, seed=0, **opts)
    f = linear(D, N)
    for _ in range(4):  # from the third generation on pycma's TPA expects its mirrored pair
        I = opt.ask(BATCH)
        assert I.shape == (BATCH, D) and I.dtype.kind == "i"
        assert I.min() >= 0 and I.max() < N
        opt.tell(I, f(I))
    assert opt.n_told == 4 * BATCH
    assert np.isfinite(opt.best[1])


def _mirrored_pair(opt) -> bool:
    """The first two points of the open CMA generation are mirrored about the mean (TPA's pair)."""
    X, m = opt._gen["X"], opt.es.mean
    return bool(np.allclose(X[0] - m, -(X[1] - m), rtol=1e-6, atol=1e-9))


def test_cma_keeps_tpa_step_size_adaptation_for_any_batch():
    import cma

    opt = make_optimizer("cma", D, N, seed=0)
    assert isinstance(opt.es.adapt_sigma, cma.sigma_adaptation.CMAAdaptSigmaTPA)
    assert opt.es.popsize < BATCH
    f = linear(D, N)
    sigmas = []
    for gen in range(5):
        # a generation of a full batch, asked in pieces of different sizes (below and above popsize)
        parts = [opt.ask(10), opt.ask(BATCH)] if gen % 2 else [opt.ask(BATCH + 7)]
        if gen >= 2:  # TPA's pair (prepared by the previous tell) leads every generation
            assert _mirrored_pair(opt)
        for I in parts:
            opt.tell(I, f(I))
        assert opt._gen is None  # the whole generation was told: pycma updated
        sigmas.append(opt.es.sigma)
    assert len(set(sigmas)) == len(sigmas)  # sigma adapts every generation


def test_tt_internal_cma_generations_keep_the_tpa_pair():
    opt = make_optimizer("tt", D, N, seed=0, cma=0.5, batch=BATCH)
    f = linear(D, N)
    for _ in range(4):
        I = opt.ask()
        opt.tell(I, f(I))
    es = opt._cma.es
    assert es.countiter >= 3
    X = opt._cma.X if opt._cma.X.shape[0] else np.asarray(es.ask(number=es.popsize))
    assert np.allclose(X[0] - es.mean, -(X[1] - es.mean), rtol=1e-6, atol=1e-9)


def test_cma_is_separable_above_the_diagonal_threshold():
    from spikemax.optim.baselines import CMA_DIAGONAL_FROM

    big = make_optimizer("cma", CMA_DIAGONAL_FROM + 1, 4, seed=0)
    small = make_optimizer("cma", 64, 4, seed=0)
    assert big.es.opts["CMA_diagonal"] is True and small.es.opts["CMA_diagonal"] is False
    full = make_optimizer("cma", CMA_DIAGONAL_FROM + 1, 4, seed=0, diagonal=False)
    assert full.es.opts["CMA_diagonal"] is False
    with pytest.raises(ValueError, match="diagonal"):
        make_optimizer("cma", 8, 4, diagonal="sometimes")


# -- the vectorized TT math against sequential references -----------------------------------


def sequential_left(M: np.ndarray) -> np.ndarray:
    """1^T M_0 ... M_{k-1} for k = 0..d, one product at a time (float64), each rescaled to sum 1."""
    out = [np.ones(M.shape[-1]) / M.shape[-1]]
    for k in range(M.shape[0]):
        v = out[-1] @ M[k]
        out.append(v / v.sum())
    return np.array(out)


@pytest.mark.parametrize("d", [1, 2, 7, 50, 65])
def test_blocked_chains_equal_sequential_products(d):
    M = np.random.default_rng(d).random((d, 4, 4)) + 0.05
    np.testing.assert_allclose(chain_left(M), sequential_left(M), rtol=1e-10)
    flipped = sequential_left(np.flip(M, 0).swapaxes(1, 2))[::-1]
    np.testing.assert_allclose(chain_right(M), flipped, rtol=1e-10)
    batch = np.stack([M, M[::-1]])  # leading dimensions are independent chains
    np.testing.assert_allclose(chain_left(batch)[1], sequential_left(M[::-1]), rtol=1e-10)


def test_chain_states_follow_the_maps_one_step_at_a_time():
    rng = np.random.default_rng(0)
    b, d, r = 5, 37, 4
    F = rng.integers(0, r, (b, d, r))
    a0 = rng.integers(0, r, b)
    A = chain_states(F, a0)
    for j in range(b):
        a = [a0[j]]
        for k in range(d):
            a.append(F[j, k, a[-1]])
        np.testing.assert_array_equal(A[j], a)


def dense(theta: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The full normalized tensor P of small cores, by brute force."""
    G = tt_cores(theta, mask)
    d, r, n, _ = G.shape
    P = np.zeros([n] * d)
    for idx in itertools.product(range(n), repeat=d):
        v = np.ones(r)
        for k in range(d):
            v = v @ G[k, :, idx[k], :]
        P[idx] = v.sum()
    return P / P.sum()


def test_hidden_chain_sampler_draws_the_tensor_over_several_blocks():
    rng = np.random.default_rng(3)
    d, r, n = 7, 3, 2  # blocks of 3 steps: two full, one padded
    theta = 0.8 * rng.standard_normal((d, r, n, r))
    mask = np.ones((d, n), dtype=bool)
    P = dense(theta, mask)
    G = tt_cores(theta, mask)
    I = tt_sample(G, tt_interfaces_right(G.sum(axis=2)), rng.random((200_000, d)))
    emp = np.zeros_like(P)
    np.add.at(emp, tuple(I.T), 1.0)
    np.testing.assert_allclose(emp / len(I), P, atol=0.004)


def test_sampler_marginals_at_d64_match_the_exact_ones():
    rng = np.random.default_rng(4)
    d, r, n = 64, 4, 5
    theta = rng.standard_normal((d, r, n, r))
    mask = np.arange(n)[None, :] < rng.integers(2, n + 1, d)[:, None]  # mixed mode sizes
    G = tt_cores(theta, mask)
    # exact marginals: p(x_k = v) ∝ l_k G_k[v] z_{k+1}, messages by sequential products
    S = G.sum(axis=2)
    L = sequential_left(S)
    Zr = sequential_left(np.flip(S, 0).swapaxes(1, 2))[::-1]
    exact = np.einsum("kr,krvq,kq->kv", L[:d], G, Zr[1:])
    exact /= exact.sum(axis=1, keepdims=True)
    I = tt_sample(G, tt_interfaces_right(S), rng.random((40_000, d)))
    assert np.all(mask[np.arange(d)[None, :], I])  # never a padded value
    emp = np.stack([np.bincount(I[:, k], minlength=n) for k in range(d)]) / len(I)
    np.testing.assert_allclose(emp, exact, atol=0.012)


def test_gradient_at_d40_matches_finite_differences_of_the_log_likelihood():
    rng = np.random.default_rng(5)
    d, r, n = 40, 3, 4
    theta = 0.5 * rng.standard_normal((d, r, n, r))
    mask = np.ones((d, n), dtype=bool)
    X = rng.integers(0, n, (3, d))
    w = np.array([0.2, 0.5, 0.3])

    def loglik(th: np.ndarray) -> float:
        G = tt_cores(th, mask)
        S = G.sum(axis=2)
        z = sequential_left(np.flip(S, 0).swapaxes(1, 2))[::-1]
        logz = 0.0  # log of sum(P): products rescaled, their logs kept
        v = np.ones(r)
        for k in range(d):
            v = v @ S[k]
            logz += np.log(v.sum())
            v /= v.sum()
        out = 0.0
        for b in range(len(X)):
            v, lp = np.ones(r), 0.0
            for k in range(d):
                v = v @ G[k, :, X[b, k], :]
                lp += np.log(v.sum())
                v /= v.sum()
            out += w[b] * (lp - logz)
        assert z.shape == (d + 1, r)
        return out

    G = tt_cores(theta, mask)
    g = tt_grad_loglik(G, mask, X, w, tt_interfaces_right(G.sum(axis=2)))
    eps = 1e-6
    for idx in [(0, 0, X[0, 0], 1), (17, 2, X[1, 17], 0), (39, 1, 3, 2), (20, 0, 1, 0), (5, 1, X[2, 5], 1)]:
        t = theta.copy()
        t[idx] += eps
        up = loglik(t)
        t[idx] -= 2 * eps
        assert g[idx] == pytest.approx((up - loglik(t)) / (2 * eps), abs=1e-6)


def test_adam_in_place_equals_the_textbook_update():
    from spikemax.optim.tt import Adam

    rng = np.random.default_rng(0)
    x = rng.standard_normal(500)
    ref, m, v = x.copy(), np.zeros(500), np.zeros(500)
    adam = Adam(x.shape, 0.2)
    for t in range(1, 40):
        g = rng.standard_normal(500)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        ref = ref + 0.2 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        before = x.copy()
        x = adam.step(x, g)
        assert not np.shares_memory(x, before)
    np.testing.assert_allclose(x, ref, rtol=1e-12, atol=1e-12)
