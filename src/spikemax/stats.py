"""Statistics behind the claims: rank correlations with exact or permutation p-values."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, float | int | None]:
    """Spearman rho and p-value over the finite pairs; rho None with < 3 pairs or a constant side.

    Up to 8 pairs the two-sided p-value is exact (all pairings enumerated): scipy's asymptotic
    value is wrong there (it gives p = 0 for rho = 1 with 3 epochs, where the exact p is 1/3).
    """
    from scipy.stats import rankdata, spearmanr

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return {"rho": None, "p": None, "n": n}
    res = spearmanr(x[ok], y[ok])
    rho, p = float(res.statistic), float(res.pvalue)
    if n <= EXACT_SPEARMAN_MAX_N:
        p = exact_spearman_p(rankdata(x[ok]), rankdata(y[ok]), rho)
    return {"rho": rho, "p": p, "n": n}


EXACT_SPEARMAN_MAX_N = 8


def exact_spearman_p(rx: np.ndarray, ry: np.ndarray, rho: float) -> float:
    """Two-sided permutation p-value of Spearman's rho: share of pairings with |rho'| >= |rho|."""
    from itertools import permutations

    perms = np.array(list(permutations(ry)), dtype=np.float64)
    a = rx - rx.mean()
    b = perms - perms.mean(axis=1, keepdims=True)
    rhos = (b @ a) / (np.linalg.norm(b, axis=1) * np.linalg.norm(a))
    return float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))
