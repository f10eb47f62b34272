"""Statistics behind the claims: rank correlations with exact or permutation p-values, and seeded
percentile-bootstrap confidence intervals over neurons."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

EXACT_SPEARMAN_MAX_N = 8  # up to this many pairs every pairing is enumerated (8! = 40,320)
N_PERMUTATIONS = 20000  # Monte-Carlo pairings beyond that
N_BOOT = 1000  # bootstrap resamples of the neurons
LEVEL = 0.95


def spearman(x: ArrayLike, y: ArrayLike, n_perm: int = N_PERMUTATIONS, seed: int = 0) -> dict[str, float | int | None]:
    """Spearman rho and a two-sided permutation p-value over the finite pairs; rho None with < 3 pairs
    or a constant side.

    Up to 8 pairs the p-value is exact (all pairings enumerated): scipy's asymptotic value is wrong
    there (it gives p = 0 for rho = 1 with 3 epochs, where the exact p is 1/3). Beyond, `n_perm`
    seeded random pairings give p = (1 + hits) / (1 + n_perm), never 0.
    """
    from scipy.stats import rankdata

    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(xs) & np.isfinite(ys)
    n = int(ok.sum())
    if n < 3 or np.ptp(xs[ok]) == 0 or np.ptp(ys[ok]) == 0:
        return {"rho": None, "p": None, "n": n}
    rx, ry = rankdata(xs[ok]), rankdata(ys[ok])
    rho = _rank_corr(rx, ry[None, :])[0]
    if n <= EXACT_SPEARMAN_MAX_N:
        p = exact_spearman_p(rx, ry, rho)
    else:
        perms = np.random.default_rng(seed).permuted(np.tile(ry, (n_perm, 1)), axis=1)
        hits = int(np.sum(np.abs(_rank_corr(rx, perms)) >= abs(rho) - 1e-12))
        p = (1 + hits) / (1 + n_perm)
    return {"rho": float(rho), "p": float(p), "n": n}


def _rank_corr(rx: np.ndarray, rys: np.ndarray) -> np.ndarray:
    """Pearson correlation of ranks rx with each row of rys (= Spearman's rho, ties as average ranks)."""
    a = rx - rx.mean()
    b = rys - rys.mean(axis=1, keepdims=True)
    return (b @ a) / (np.linalg.norm(b, axis=1) * np.linalg.norm(a))


def exact_spearman_p(rx: np.ndarray, ry: np.ndarray, rho: float) -> float:
    """Two-sided permutation p-value of Spearman's rho: share of pairings with |rho'| >= |rho|."""
    from itertools import permutations

    perms = np.array(list(permutations(ry)), dtype=np.float64)
    return float(np.mean(np.abs(_rank_corr(rx, perms)) >= abs(rho) - 1e-12))


def resamples(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """(n_boot, n) row indices drawn with replacement: the bootstrap's resamples of n neurons."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n)) if n else np.zeros((n_boot, 0), int)


def _interval(point: float | None, boots: np.ndarray, n: int, level: float) -> dict[str, float | int | None]:
    """{"value", "lo", "hi", "n"}: the point estimate and the percentile interval of the finite resamples."""
    boots = boots[np.isfinite(boots)]
    if point is None or not np.isfinite(point) or n < 2 or boots.size == 0:
        return {"value": _finite(point), "lo": None, "hi": None, "n": n}
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(boots, [tail, 100 - tail])
    return {"value": float(point), "lo": float(lo), "hi": float(hi), "n": n}


def _finite(v: float | None) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def mean_ci(
    values: Sequence[float] | np.ndarray, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0
) -> dict[str, float | int | None]:
    """Mean of the finite values and its percentile-bootstrap interval (resampling the values)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    boots = v[resamples(v.size, n_boot, seed)].mean(axis=1)
    return _interval(float(v.mean()), boots, int(v.size), level)


def bootstrap_ci(
    n: int,
    statistic: Callable[[np.ndarray], float | None],
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, float | int | None]:
    """Point estimate `statistic(arange(n))` and the percentile interval of `statistic(idx)` over
    seeded resamples `idx` of the n neurons (undefined resamples, None or NaN, are left out)."""
    if n == 0:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    point = statistic(np.arange(n))
    boots = np.array([_nan(statistic(idx)) for idx in resamples(n, n_boot, seed)], dtype=np.float64)
    return _interval(None if point is None else float(point), boots, n, level)


def _nan(v: float | None) -> float:
    return np.nan if v is None else float(v)


def spearman_ci(
    n: int,
    series: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, float | int | None]:
    """Spearman rho of `series(idx)` = (x, y) over checkpoints, with its permutation p-value (over the
    checkpoints) and a bootstrap interval for rho from resampling the n neurons that x averages.

    "n" is the number of checkpoint pairs and "neurons" the number resampled.
    """
    x, y = series(np.arange(n))
    res: dict[str, float | int | None] = dict(spearman(x, y))
    res["neurons"] = n
    if res["rho"] is None or n < 2:
        return {**res, "lo": None, "hi": None}

    def rho_of(idx: np.ndarray) -> float | None:
        bx, by = series(idx)
        return spearman_rho(bx, by)

    ci = bootstrap_ci(n, rho_of, n_boot, level, seed)
    return {**res, "lo": ci["lo"], "hi": ci["hi"]}


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman rho alone (no p-value), None when undefined."""
    from scipy.stats import rankdata

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return None
    return float(_rank_corr(rankdata(x[ok]), rankdata(y[ok])[None, :])[0])
