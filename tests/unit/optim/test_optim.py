"""Behaviour of spikemax.optim: determinism, ranges, budget, TT math, warm start, NaN, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import teneva

from spikemax.optim import make_optimizer, maximize, resolve_ordinal
from spikemax.optim.tt import (
    ind_qtt_to_tt,
    ind_tt_to_qtt,
    tt_cores,
    tt_grad_loglik,
    tt_interfaces_right,
    tt_sample,
)

FAST = ("tt", "random", "cma", "ngopt")


def separable(d: int, n: int, seed: int = 1):
    """A random separable function with its exact maximum."""
    W = np.random.default_rng(seed).random((d, n))
    return (lambda I: W[np.arange(d), I].sum(axis=1)), float(W.max(axis=1).sum()), W.argmax(axis=1)


def dense_tt(theta: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The full tensor P of small cores, by brute force."""
    G = tt_cores(theta, mask)
    d, r, N, _ = G.shape
    P = np.zeros([N] * d)
    for idx in itertools.product(range(N), repeat=d):
        v = np.ones(r)
        for k in range(d):
            v = v @ G[k, :, idx[k], :]
        P[idx] = v.sum()
    return P


@pytest.mark.parametrize("method", FAST)
def test_same_seed_same_asks_and_in_range(method):
    n = [3, 5, 2, 7, 4, 6]
    runs = []
    for _ in range(2):
        opt = make_optimizer(method, 6, n, seed=3)
        f, _, _ = separable(6, 7)
        asks = []
        for _ in range(3):
            I = opt.ask(12)
            asks.append(I)
            opt.tell(I, np.random.default_rng(0).random(12))
        runs.append(np.concatenate(asks))
    I = runs[0]
    assert I.dtype.kind == "i" and I.shape == (36, 6)
    assert np.all(I >= 0) and np.all(np.array(n)[None, :] > I)
    np.testing.assert_array_equal(runs[0], runs[1])
    other = make_optimizer(method, 6, n, seed=4).ask(12)
    assert not np.array_equal(other, runs[0][:12])


@pytest.mark.parametrize(("method", "opts"), [(m, {}) for m in FAST] + [("tt", {"cma": 0.5})])
def test_an_optimizer_asks_the_same_alone_or_in_lock_step_with_others(method, opts):
    """The maximize stage runs a group's optimizers interleaved in one process (and a resumed part
    of a group without its finished members): no optimizer may draw from a shared RNG."""
    f, _, _ = separable(6, 8)

    def asks(mates: list[int]) -> np.ndarray:
        opts_ = [make_optimizer(method, 6, 8, seed=s, **opts) for s in [3, *mates]]
        out = []
        for _ in range(4):
            for j, opt in enumerate(opts_):
                I = opt.ask(10)
                opt.tell(I, f(I))
                out += [I] if j == 0 else []
        return np.concatenate(out)

    np.testing.assert_array_equal(asks([]), asks([4, 5]))


@pytest.mark.parametrize("method", FAST)
def test_maximize_spends_exactly_the_budget(method):
    f, _, _ = separable(5, 4)
    calls = []
    res = maximize(lambda I: calls.append(len(I)) or f(I), 5, 4, 257, method=method, seed=0, batch=50)
    assert res.n_queries == 257 == sum(calls) == res.history.size
    assert res.y_best == pytest.approx(np.nanmax(res.history))
    assert f(res.i_best[None])[0] == pytest.approx(res.y_best)


def test_tt_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    d, r, N = 4, 3, 3
    theta = 0.3 * rng.standard_normal((d, r, N, r))
    mask = np.ones((d, N), dtype=bool)
    mask[1, 2] = False
    X = np.array([[0, 1, 2, 0], [1, 0, 1, 2]])
    w = np.array([0.3, 0.7])

    def loglik(th):
        P = dense_tt(th, mask)
        return sum(w[b] * np.log(P[tuple(X[b])] / P.sum()) for b in range(2))

    G = tt_cores(theta, mask)
    g = tt_grad_loglik(G, mask, X, w, tt_interfaces_right(G.sum(axis=2)))
    eps, gn = 1e-6, np.zeros_like(theta)
    for idx in np.ndindex(theta.shape):
        t = theta.copy()
        t[idx] += eps
        a = loglik(t)
        t[idx] -= 2 * eps
        gn[idx] = (a - loglik(t)) / (2 * eps)
    np.testing.assert_allclose(g, gn, atol=1e-7)


def test_tt_sampling_follows_the_tensor():
    rng = np.random.default_rng(1)
    d, r, N = 3, 2, 3
    theta = rng.standard_normal((d, r, N, r))
    mask = np.ones((d, N), dtype=bool)
    mask[2, 0] = False
    P = dense_tt(theta, mask)
    P /= P.sum()
    G = tt_cores(theta, mask)
    I = tt_sample(G, tt_interfaces_right(G.sum(axis=2)), rng.random((100_000, d)))
    emp = np.zeros_like(P)
    np.add.at(emp, tuple(I.T), 1.0)
    assert np.all(emp[:, :, 0] == 0)
    np.testing.assert_allclose(emp / len(I), P, atol=0.006)


def test_qtt_index_map_matches_teneva():
    rng = np.random.default_rng(0)
    I = rng.integers(0, 16, (50, 4))
    q = np.array([4, 4, 4, 4])
    Iq = ind_tt_to_qtt(I, q)
    np.testing.assert_array_equal(Iq, teneva.ind_tt_to_qtt(I, 16))
    np.testing.assert_array_equal(ind_qtt_to_tt(Iq, q), teneva.ind_qtt_to_tt(Iq, 4))
    # Mixed sizes: each dimension keeps its own number of bits.
    I2 = np.stack([rng.integers(0, 4, 20), rng.integers(0, 32, 20)], axis=1)
    np.testing.assert_array_equal(ind_qtt_to_tt(ind_tt_to_qtt(I2, np.array([2, 5])), np.array([2, 5])), I2)


def test_tt_nan_is_counted_and_never_elite():
    opt = make_optimizer("tt", 4, 5, seed=0, elite=3)
    I = opt.ask(10)
    y = np.arange(10.0)
    y[[9, 8]] = np.nan
    opt.tell(I, y)
    assert opt.n_told == 10 and opt.n_failed == 2
    assert opt.best[1] == 7.0
    np.testing.assert_array_equal(opt.best[0], I[7])
    assert set(map(tuple, opt.state_dict()["elite_I"])) == {tuple(I[j]) for j in (7, 6, 5)}
    opt.tell(I[:2], [np.nan, np.nan])
    assert opt.n_told == 12 and opt.best[1] == 7.0
    assert np.all(np.isfinite(opt.theta))


@pytest.mark.parametrize("method", FAST)
def test_nan_responses_do_not_break_baselines(method):
    f, _, _ = separable(4, 6)
    res = maximize(lambda I: np.where(I[:, 0] == 0, np.nan, f(I)), 4, 6, 300, method=method, seed=1)
    assert res.n_queries == 300 and np.isfinite(res.y_best) and res.i_best[0] != 0


def test_tt_accepts_off_policy_tells():
    f, fmax, imax = separable(6, 5)
    opt = make_optimizer("tt", 6, 5, seed=0)
    opt.tell(imax[None], f(imax[None]))  # a point the optimizer never proposed
    assert opt.best[1] == pytest.approx(fmax)
    assert opt.n_told == 1


def test_bad_arguments_raise_value_error_naming_them():
    with pytest.raises(ValueError, match="d"):
        make_optimizer("tt", 0, 4)
    with pytest.raises(ValueError, match="n"):
        make_optimizer("tt", 3, 1)
    with pytest.raises(ValueError, match="n"):
        make_optimizer("random", 3, [4, 1, 4])
    with pytest.raises(ValueError, match="n"):
        make_optimizer("tt", 3, [4, 4])
    with pytest.raises(ValueError, match="budget"):
        maximize(lambda I: I.sum(1), 3, 4, 0)
    with pytest.raises(ValueError, match="qtt"):
        make_optimizer("tt", 3, 6, qtt=True)
    with pytest.raises(ValueError, match="method"):
        make_optimizer("nope", 3, 4)
    opt = make_optimizer("tt", 3, 4)
    with pytest.raises(ValueError, match="k"):
        opt.ask(0)
    with pytest.raises(ValueError, match="I"):
        opt.tell(np.zeros((2, 4), dtype=int), [1.0, 2.0])
    with pytest.raises(ValueError, match="y"):
        opt.tell(np.zeros((2, 3), dtype=int), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="I"):
        opt.tell(np.full((1, 3), 4), [1.0])
    with pytest.raises(ValueError, match="rank"):
        make_optimizer("tt", 3, 4, rank=0)
    with pytest.raises(ValueError, match="init"):
        make_optimizer("tt", 3, 4, init=np.zeros((2, 5), dtype=int))
    assert opt.n_told == 0


def test_protes_missing_package_gives_a_clear_error(monkeypatch):
    import sys

    from spikemax.optim import OptionalDependencyError

    monkeypatch.setitem(sys.modules, "protes", None)
    with pytest.raises(OptionalDependencyError, match="bench"):
        make_optimizer("protes", 5, 4)
    with pytest.raises(ImportError):
        maximize(lambda I: I.sum(1), 5, 4, 10, method="protes")


def test_protes_runs_when_installed():
    pytest.importorskip("protes")
    pytest.importorskip("jax")
    f, fmax, _ = separable(6, 4)
    res = maximize(f, 6, 4, 200, method="protes", seed=0, batch=50)
    assert res.n_queries == 200 and res.y_best <= fmax + 1e-12
    assert res.y_best > np.median(res.history[:50])
    assert np.mean(res.history[-50:]) > np.mean(res.history[:50])  # it learns


def test_protes_wrapper_asks_exactly_what_the_reference_loop_asks():
    """Ask/tell PROTES is the reference `protes.protes` loop: same seed, same queries (tie-free f)."""
    pytest.importorskip("jax")
    reference = pytest.importorskip("protes").protes
    d, n, k, m = 6, 5, 20, 200
    W = np.random.default_rng(0).random((d, n))  # continuous values: no ties in the elite sort

    def f(I):
        return W[np.arange(d), np.asarray(I)].sum(axis=1)

    asked = []
    reference(lambda I: (asked.append(np.asarray(I)), f(I))[1], d, n, m=m, k=k, seed=3, is_max=True)
    opt = make_optimizer("protes", d, n, seed=3, batch=k)
    for expected in asked:
        I = opt.ask()
        np.testing.assert_array_equal(I, expected)
        opt.tell(I, f(I))
    assert len(asked) == m // k


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tt_finds_exact_maximum_of_separable_problem(seed):
    f, fmax, imax = separable(8, 8, seed=10 + seed)
    res = maximize(f, 8, 8, 2000, method="tt", seed=seed)
    assert res.y_best == pytest.approx(fmax)
    np.testing.assert_array_equal(res.i_best, imax)


def test_qtt_and_plain_tt_agree_for_n16():
    f, fmax, imax = separable(6, 16, seed=5)
    plain = maximize(f, 6, 16, 2000, method="tt", seed=0)
    qtt = maximize(f, 6, 16, 2000, method="tt", seed=0, qtt=True)
    np.testing.assert_array_equal(plain.i_best, imax)
    np.testing.assert_array_equal(qtt.i_best, imax)
    # The model works on 6 * 4 binary modes.
    opt = make_optimizer("tt", 6, 16, qtt=True)
    assert opt.theta.shape[0] == 24 and opt.theta.shape[2] == 2


def test_tt_pure_model_sampling_concentrates_on_good_points():
    f, fmax, _ = separable(10, 4, seed=7)
    res = maximize(f, 10, 4, 2000, method="tt", seed=0, local=0.0, batch=50, elite=5, lr=0.1)
    late = res.history[-200:]
    assert np.median(late) > np.quantile(res.history[:50], 0.9)
    assert res.y_best > fmax - 0.5


def test_warm_start_from_state_and_from_points_reaches_the_old_best_fast():
    f, fmax, imax = separable(12, 8, seed=3)
    first = make_optimizer("tt", 12, 8, seed=0)
    res = run_to(first, f, 3000)
    assert res == pytest.approx(fmax)
    state = first.state_dict()
    for init in (state, state["elite_I"]):
        warm = make_optimizer("tt", 12, 8, seed=1, init=init)
        assert run_to(warm, f, 150) == pytest.approx(fmax)  # 5 % of the first run's budget
    cold = make_optimizer("tt", 12, 8, seed=1)
    assert run_to(cold, f, 150) < fmax - 1e-9
    with pytest.raises(ValueError, match="init"):
        make_optimizer("tt", 12, 4, init=state)


def test_init_values_seed_the_elite_but_not_best():
    f, fmax, imax = separable(5, 6, seed=2)
    pts = np.random.default_rng(0).integers(0, 6, (8, 5))
    opt = make_optimizer("tt", 5, 6, init=pts, init_values=f(pts))
    i_best, y_best = opt.best
    assert i_best is None and np.isnan(y_best) and opt.n_told == 0
    first = opt.ask(4)
    best4 = pts[np.argsort(-f(pts))[:4]]
    np.testing.assert_array_equal(first, best4)


def run_to(opt, f, budget: int) -> float:
    """Ask/tell until `budget` queries; return the best response."""
    from spikemax.optim.base import run_maximize

    return run_maximize(opt, f, budget).y_best


def test_auto_ordinal_steps_on_ordered_grids_and_resamples_on_codebooks():
    assert resolve_ordinal("auto", ordered=True) == 1.0
    assert resolve_ordinal("auto", ordered=False) == 0.0
    for value in (0.0, 0.3, 1):
        assert resolve_ordinal(value, True) == resolve_ordinal(value, False) == float(value)
    for bad in ("high", "Auto", 1.5, -0.1, None, True):
        with pytest.raises(ValueError, match="ordinal must be 'auto' or a number in \\[0, 1\\]"):
            resolve_ordinal(bad, True)


@pytest.mark.parametrize("ordinal", [1.0, 0.0])
def test_ordinal_controls_how_far_a_mutation_moves(ordinal):
    opt = make_optimizer("tt", 1, 32, seed=0, ordinal=ordinal, local=1.0, batch=400)
    opt.tell(np.array([[16]]), [1.0])
    moved = np.abs(opt.ask(400)[:, 0] - 16)
    if ordinal == 1.0:  # log-uniform steps of 1..n/2 - 1: mostly small, never to the far end
        assert moved.min() >= 1 and moved.max() <= 15
        assert (moved <= 2).mean() > 0.3
    else:  # uniform resampling: about 5 of 32 values lie within 2 of the parent
        assert moved.max() == 16
        assert (moved <= 2).mean() < 0.25


def test_tt_elite_moves_to_an_equally_good_new_point():
    # Integer spike counts make plateaus: the elite must drift along them, not stall on the first point.
    opt = make_optimizer("tt", 2, 8, seed=0, elite=1)
    opt.tell(np.array([[1, 1]]), [3.0])
    opt.tell(np.array([[5, 6], [2, 2]]), [3.0, 2.0])
    assert opt.state_dict()["elite_I"].tolist() == [[5, 6]]
    opt.tell(np.array([[0, 0]]), [2.5])
    assert opt.state_dict()["elite_I"].tolist() == [[5, 6]]
    assert opt.best[1] == 3.0 and opt.best[0].tolist() == [1, 1]  # the reported best stays the first
