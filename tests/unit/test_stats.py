"""Bootstrap intervals and permutation p-values on seeded synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from spikemax import stats


def test_bootstrap_interval_covers_known_mean_at_about_nominal_rate():
    # 300 seeded samples of 40 "neurons" from N(0.3, 1): the 95 % percentile interval should hold
    # the true mean about 95 % of the time (percentile intervals run slightly narrow at n = 40).
    rng = np.random.default_rng(1)
    hits = []
    for i in range(300):
        ci = stats.mean_ci(rng.normal(0.3, 1.0, size=40), n_boot=500, seed=i)
        assert ci["lo"] <= ci["value"] <= ci["hi"] and ci["n"] == 40
        hits.append(ci["lo"] <= 0.3 <= ci["hi"])
    assert 0.90 <= np.mean(hits) <= 0.98


def test_generic_bootstrap_matches_mean_ci_and_is_seeded():
    v = np.random.default_rng(0).exponential(size=25)
    a = stats.bootstrap_ci(len(v), lambda idx: float(v[idx].mean()), n_boot=400, seed=3)
    b = stats.mean_ci(v, n_boot=400, seed=3)
    assert a == pytest.approx(b)
    assert stats.mean_ci(v, seed=3) == stats.mean_ci(v, seed=3)
    assert stats.mean_ci(v, seed=3) != stats.mean_ci(v, seed=4)


def test_bootstrap_degenerate_inputs():
    assert stats.mean_ci([]) == {"value": None, "lo": None, "hi": None, "n": 0}
    one = stats.mean_ci([0.7, np.nan])
    assert one["value"] == pytest.approx(0.7) and one["lo"] is None and one["n"] == 1
    const = stats.mean_ci([1.0] * 5)
    assert const["lo"] == const["hi"] == const["value"] == 1.0


def test_permutation_p_agrees_with_exact_and_is_uniform_under_the_null():
    rng = np.random.default_rng(2)
    # 8 pairs: exact enumeration; the same data through Monte-Carlo pairings gives nearly the same p.
    x, y = rng.normal(size=8), rng.normal(size=8)
    exact = stats.spearman(x, y)["p"]
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    perms = np.random.default_rng(0).permuted(np.tile(ry, (20000, 1)), axis=1)
    mc = np.mean(np.abs(stats._rank_corr(rx, perms)) >= abs(stats.spearman(x, y)["rho"]) - 1e-12)
    assert mc == pytest.approx(exact, abs=0.01)
    # 14 independent checkpoints: p below 0.05 in about 5 % of seeded trials
    ps = [stats.spearman(rng.normal(size=14), rng.normal(size=14), n_perm=2000, seed=i)["p"] for i in range(200)]
    assert 0.02 <= np.mean(np.array(ps) < 0.05) <= 0.09


def test_spearman_ci_resamples_neurons():
    # 30 neurons over 12 checkpoints, each rising with accuracy plus noise: rho near 1, interval inside [-1, 1]
    rng = np.random.default_rng(4)
    acc = np.linspace(0.1, 0.9, 12)
    m = acc[None, :] + rng.normal(0, 0.3, size=(30, 12))
    res = stats.spearman_ci(30, lambda idx: (m[idx].mean(axis=0), acc))
    assert res["n"] == 12 and res["neurons"] == 30
    assert -1 <= res["lo"] <= res["rho"] <= res["hi"] <= 1 and res["lo"] > 0.5
    assert res["p"] < 0.01
