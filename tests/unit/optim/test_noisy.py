"""Noise-aware optimization: statistics, racing re-presentations and the estimated best."""

from __future__ import annotations

import numpy as np
import pytest

from spikemax.optim import NoisyOptimizer, make_optimizer, maximize

D, N = 2, 8
STAR = np.array([5, 2])


def plateau(I: np.ndarray) -> np.ndarray:
    """A neuron whose best point (STAR, 1.0) stands 0.25 above a plateau of 63 others."""
    return np.where(np.all(I == STAR, axis=1), 1.0, 0.75)


def drive(opt, seed: int, budget: int = 960, sigma: float = 0.5, batch: int = 16):
    """Spend `budget` queries of multiplicative noise r * max(0, 1 + sigma N(0, 1)) on opt."""
    rng = np.random.default_rng(10_000 + seed)
    for _ in range(budget // batch):
        I = opt.ask(batch)
        opt.tell(I, plateau(I) * np.maximum(0.0, 1.0 + sigma * rng.standard_normal(batch)))
    return opt


@pytest.mark.parametrize(("method", "max_plain"), [("random", 8), ("tt", 12)])
def test_noise_aware_best_is_the_true_best_where_the_max_draw_is_not(method: str, max_plain: int) -> None:
    """Over 20 seeded runs the estimated-mean best finds STAR, the plain optimizer's max draw rarely."""
    aware = plain = 0
    for seed in range(20):
        opt = drive(make_optimizer(method, D, N, seed=seed, noise_aware=True, retest=0.3), seed)
        aware += bool(np.array_equal(opt.best[0], STAR))
        base = drive(make_optimizer(method, D, N, seed=seed), seed)
        plain += bool(np.array_equal(base.best[0], STAR))
    assert aware >= 15
    assert plain <= max_plain  # TT re-samples its elite, so its max draw is right more often


def test_statistics_match_the_draws() -> None:
    """Count, mean and variance of every point are those of the values told for it."""
    opt = make_optimizer("random", 3, 4, seed=0, noise_aware=True, estimator="mean")
    rng = np.random.default_rng(0)
    I = np.array([[0, 1, 2], [3, 3, 3], [0, 1, 2], [0, 1, 2], [1, 1, 1]])
    y = rng.standard_normal(5)
    opt.tell(I[:3], y[:3])
    opt.tell(I[3:], y[3:])
    s = opt.stats(I[0])[0]
    draws = y[[0, 2, 3]]
    assert s is not None and s.count == 3
    assert s.mean == pytest.approx(draws.mean())
    assert s.var == pytest.approx(draws.var(ddof=1))
    assert opt.stats(np.array([2, 2, 2]))[0] is None
    assert opt.n_told == 5


def test_failed_queries_are_counted_not_averaged() -> None:
    """NaN responses count in n_told / n_failed and never enter the statistics."""
    opt = make_optimizer("random", 2, 4, seed=0, noise_aware=True)
    opt.tell(np.array([[1, 1], [1, 1]]), np.array([0.5, np.nan]))
    assert opt.n_failed == 1 and opt.n_told == 2
    assert opt.stats(np.array([1, 1]))[0].count == 1


def test_retest_budget_and_points() -> None:
    """At most round(retest * k) of an ask are re-presentations, all of points already told."""
    opt = make_optimizer("tt", 4, 6, seed=1, noise_aware=True, retest=0.25)
    rng = np.random.default_rng(1)
    seen: set[bytes] = set()
    for _ in range(8):
        I = opt.ask(16)
        before = opt.n_retests
        assert I.shape == (16, 4)
        opt.tell(I, I.sum(1) * (1 + 0.3 * rng.standard_normal(16)))
        seen.update(r.tobytes() for r in I)
        assert opt.n_retests - before <= 4
    assert 0 < opt.n_retests <= 8 * 4
    assert opt.best_stats is not None and opt.best_stats.count >= 2
    assert opt.best[0].tobytes() in seen


def test_clean_responder_stops_retesting() -> None:
    """A deterministic responder shows no spread: after `probe` repeats no query is re-presented."""
    f = lambda I: -np.abs(I - 3).sum(1).astype(float)  # noqa: E731
    res = maximize(f, 4, 8, 512, method="tt", seed=0, noise_aware=True, probe=4)
    opt = make_optimizer("tt", 4, 8, seed=0, noise_aware=True, probe=4)
    for _ in range(32):
        I = opt.ask(16)
        opt.tell(I, f(I))
    assert opt.clean
    assert opt.n_retests <= 2 * 4  # the probe, at most two batches' worth
    assert res.n_queries == 512
    assert opt.best[1] == pytest.approx(f(opt.best[0][None])[0])


def test_repeats_that_all_answered_zero_do_not_prove_a_responder_noise_free() -> None:
    """A Poisson neuron that gave 0 spikes to every repeated stimulus shows no spread either, but
    its noise is unknown, not absent: it stays noisy until a repeat answers something."""
    opt = make_optimizer("random", 4, 8, seed=0, noise_aware=True, probe=4)
    for _ in range(8):
        I = opt.ask(16)
        opt.tell(I, np.zeros(16))
    assert opt.n_retests >= 4 and not opt.clean
    rng = np.random.default_rng(0)
    for _ in range(8):
        I = opt.ask(16)
        opt.tell(I, rng.poisson(3.0, 16) / 32.0)
    assert not opt.clean


def test_final_phase_races_the_elite_in_the_last_share_of_the_budget() -> None:
    """With budget and final set, asks before the last `final` share keep the `retest` quota; asks
    after it may be all re-presentations of told points (racing), and the estimated best ends with
    more repeats than under the constant schedule."""
    budget, batch = 480, 16
    sched = make_optimizer("tt", D, N, seed=2, noise_aware=True, retest=0.0, budget=budget, final=0.25)
    rng = np.random.default_rng(2)
    seen: set[bytes] = set()
    for _ in range(budget // batch):
        final = sched.in_final()
        assert final == (sched.n_told >= 0.75 * budget)
        before = sched.n_retests
        I = sched.ask(batch)
        if final:
            assert all(r.tobytes() in seen for r in I[batch - (sched.n_retests - before) :])
        else:
            assert sched.n_retests == before  # retest=0: no re-presentation during the search
        seen.update(r.tobytes() for r in I)
        sched.tell(I, plateau(I) * np.maximum(0.0, 1.0 + 0.5 * rng.standard_normal(batch)))
    assert sched.n_retests >= batch  # the final phase re-presented at least a batch's worth
    assert sched.best_stats is not None and sched.best_stats.count >= 4


def test_same_seed_same_queries() -> None:
    """Seeded runs of the noisy layer are reproducible."""
    a = drive(make_optimizer("tt", D, N, seed=3, noise_aware=True), 3, budget=96)
    b = drive(make_optimizer("tt", D, N, seed=3, noise_aware=True), 3, budget=96)
    assert np.array_equal(a.best[0], b.best[0]) and a.n_retests == b.n_retests


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"noise_aware": True, "retest": 1.0}, "retest must be in"),
        ({"noise_aware": True, "estimator": "max"}, "estimator must be one of"),
        ({"noise_aware": True, "tell": "both"}, "tell must be one of"),
        ({"retest": 0.2}, "need noise_aware=True"),
        ({"noise_aware": True, "kappa": 0}, "kappa must be a positive number"),
        ({"noise_aware": True, "final": 1.0}, "final must be in"),
        ({"noise_aware": True, "budget": 0}, "budget must be"),
    ],
)
def test_bad_options(options: dict, match: str) -> None:
    """Bad noise options fail at construction with a one-line message."""
    with pytest.raises(ValueError, match=match):
        make_optimizer("tt", 3, 4, **options)


def test_wraps_every_method_and_keeps_its_batch() -> None:
    """The layer reports the base method and batch; `best` is None before any response."""
    opt = make_optimizer("cma", 5, 6, seed=0, noise_aware=True)
    assert isinstance(opt, NoisyOptimizer) and opt.method == "cma"
    assert opt.batch == opt.base.batch
    assert opt.best[0] is None and np.isnan(opt.best[1])
    assert opt.ask().shape == (opt.base.batch, 5)


def test_tell_repeated_gives_the_base_estimates_only_for_repeated_points() -> None:
    """tell="repeated": a point told once reaches the base as drawn, a repeated one as its estimate."""
    opt = make_optimizer("random", 2, 4, seed=0, noise_aware=True, tell="repeated", estimator="mean")
    seen: list[np.ndarray] = []
    inner = opt.base.tell
    opt.base.tell = lambda I, y: (seen.append(np.array(y)), inner(I, y))  # type: ignore[method-assign]
    opt.tell(np.array([[0, 0], [1, 1]]), np.array([1.0, 3.0]))
    opt.tell(np.array([[0, 0], [2, 2]]), np.array([2.0, 5.0]))
    np.testing.assert_allclose(seen[0], [1.0, 3.0])
    np.testing.assert_allclose(seen[1], [1.5, 5.0])  # [0, 0]: mean of 1 and 2; [2, 2]: its one draw


def test_the_run_budget_reaches_ngopt_with_or_without_the_noise_layer():
    from spikemax.optim import make_optimizer

    plain = make_optimizer("ngopt", 4, 5, seed=0, budget=300)
    wrapped = make_optimizer("ngopt", 4, 5, seed=0, noise_aware=True, final=0.2, budget=300)
    assert plain.opt.budget == 300 and wrapped.base.opt.budget == 300
    with pytest.raises(ValueError, match="need noise_aware=True"):
        make_optimizer("tt", 4, 5, retest=0.1)
