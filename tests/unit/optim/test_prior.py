"""TT data prior (fit, likelihood, sampling, use by TT and random), the TT/CMA hybrid and warm starts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from spikemax.optim import make_optimizer, maximize
from spikemax.optim.base import run_maximize
from spikemax.optim.prior import TTPrior, fit_tt_prior


def structured_codes(m: int, d: int, n: int, seed: int) -> np.ndarray:
    """Synthetic 'encoded images': a few templates, each code kept or moved to a neighbouring code."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, n, (3, d))
    X = templates[rng.integers(0, 3, m)]
    noise = rng.random((m, d)) < 0.1
    return np.where(noise, (X + rng.integers(1, 3, (m, d))) % n, X)


@pytest.fixture(scope="module")
def fitted() -> tuple[TTPrior, np.ndarray]:
    data = structured_codes(600, 12, 8, seed=0)
    return fit_tt_prior(data[:400], 8, rank=3, steps=150, lr=0.1, batch=128, seed=0), data


def test_prior_gives_encoded_indices_higher_likelihood_than_uniform_codes(fitted):
    prior, data = fitted
    uniform = np.random.default_rng(1).integers(0, 8, (200, 12))
    assert prior.log_prob(data[:400]).mean() > prior.log_prob(uniform).mean() + 5.0
    # held-out codes of the same source are likely too: the fit generalizes, it is not a lookup
    assert prior.log_prob(data[400:]).mean() > -12 * np.log(8) + 5.0


def test_prior_is_a_normalized_distribution():
    data = structured_codes(100, 4, 3, seed=2)
    prior = fit_tt_prior(data, 3, rank=2, steps=20, seed=0)
    grid = np.array(list(itertools.product(range(3), repeat=4)))
    assert np.exp(prior.log_prob(grid)).sum() == pytest.approx(1.0, rel=1e-9)
    again = TTPrior.from_dict(prior.to_dict())
    np.testing.assert_allclose(again.log_prob(grid), prior.log_prob(grid))


def test_prior_samples_look_like_the_data(fitted):
    prior, _ = fitted
    S = prior.sample(300, np.random.default_rng(0))
    uniform = np.random.default_rng(1).integers(0, 8, (300, 12))
    assert S.shape == (300, 12) and S.min() >= 0 and S.max() < 8
    assert prior.log_prob(S).mean() > prior.log_prob(uniform).mean() + 5.0


def test_random_and_tt_sample_from_the_prior(fitted):
    prior, _ = fitted
    uniform = make_optimizer("random", 12, 8, seed=0).ask(200)
    base = prior.log_prob(uniform).mean()
    from_random = make_optimizer("random", 12, 8, seed=0, prior=prior).ask(200)
    from_tt = make_optimizer("tt", 12, 8, seed=0, rank=3, prior=prior).ask(200)  # no elite yet: model samples
    assert prior.log_prob(from_random).mean() > base + 5.0
    assert prior.log_prob(from_tt).mean() > base + 5.0


def test_prior_must_fit_the_model(fitted):
    prior, _ = fitted
    with pytest.raises(ValueError, match="same n and rank"):
        make_optimizer("tt", 12, 8, seed=0, rank=5, prior=prior)
    with pytest.raises(ValueError, match="same n"):
        make_optimizer("random", 12, 4, seed=0, prior=prior)
    with pytest.raises(ValueError, match="integer grid indices within n"):
        fit_tt_prior(np.full((3, 2), 9), 8)


def test_cma_share_is_shown_the_better_points_of_other_sources():
    opt = make_optimizer("tt", 6, 16, seed=0, cma=0.5, batch=8)
    pop = opt._cma.size
    I = opt.ask(8)
    assert I.shape == (8, 6)
    # Tell a generation of CMA's points poor values and a non-CMA point the best value.
    star = np.full(6, 3)
    while opt._cma.served < pop:
        opt.ask(8)
    gen = opt._cma.grid(opt._cma.X)
    opt.tell(np.vstack([gen, star]), np.r_[np.zeros(len(gen)), 10.0])
    nxt = opt._cma.ask(pop)
    assert any((row == star).all() for row in nxt)  # the injected incumbent is in CMA's next generation


@pytest.mark.parametrize("cma", [0.0, 0.5, 1.0])
def test_hybrid_spends_the_budget_and_is_reproducible(cma):
    f = lambda I: -np.abs(I - 5).sum(axis=1).astype(float)  # noqa: E731
    a = maximize(f, 5, 16, 100, method="tt", seed=3, cma=cma)
    b = maximize(f, 5, 16, 100, method="tt", seed=3, cma=cma)
    assert a.n_queries == 100 and np.array_equal(a.history, b.history)


def queries_to(history: np.ndarray, level: float) -> int:
    """Queries until the first response >= level (budget + 1 if never)."""
    hit = np.flatnonzero(history >= level)
    return int(hit[0]) + 1 if hit.size else history.size + 1


def test_warm_start_from_a_solved_neighbour_reaches_its_best_sooner():
    d, n, budget = 24, 8, 2000
    rng = np.random.default_rng(0)
    W = rng.random((d, n))  # separable codebook-like table: no order to exploit
    W2 = W.copy()
    W2[:3] = rng.random((3, n))  # the neighbour: three positions changed
    f1 = lambda I: W[np.arange(d), I].sum(axis=1)  # noqa: E731
    f2 = lambda I: W2[np.arange(d), I].sum(axis=1)  # noqa: E731
    # "Its best": 98 % of the way from a random point's mean value to the known maximum.
    level = W2.mean(axis=1).sum() + 0.98 * (W2.max(axis=1) - W2.mean(axis=1)).sum()
    saved = []
    for seed in range(3):
        solved = make_optimizer("tt", d, n, seed=seed, ordinal=0.0)
        run_maximize(solved, f1, budget)
        cold = run_maximize(make_optimizer("tt", d, n, seed=seed, ordinal=0.0), f2, budget)
        warm = run_maximize(make_optimizer("tt", d, n, seed=seed, ordinal=0.0, init=solved.state_dict()), f2, budget)
        assert warm.y_best >= level
        saved.append(queries_to(cold.history, level) - queries_to(warm.history, level))
    assert min(saved) > 0, saved


def test_auto_cma_share_is_on_for_ordered_grids_and_off_for_codebooks():
    from spikemax.optim.tt import CMA_AUTO, resolve_cma

    assert resolve_cma("auto", True) == CMA_AUTO[True] > 0
    assert resolve_cma("auto", False) == CMA_AUTO[False] == 0
    assert resolve_cma(0.25, False) == 0.25
    with pytest.raises(ValueError, match="cma must be 'auto' or a number"):
        resolve_cma(1.5, True)
    with pytest.raises(ValueError, match="cma must be in"):
        make_optimizer("tt", 4, 8, cma=-0.1)
