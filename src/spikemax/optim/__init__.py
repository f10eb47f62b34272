"""Grid maximizers behind one ask/tell API: `make_optimizer`, `maximize`.

Every optimizer maximizes (larger is better) a black box on the grid prod_j {0..n_j-1}; NaN
responses are failed queries (counted in `n_told`, never elite).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .anchors import ANCHORS
from .base import MaximizeResult, Optimizer, OptionalDependencyError, run_maximize
from .baselines import RandomSearch
from .noisy import NoisyOptimizer, split_noisy_options
from .options import options_for
from .population import Population
from .tt import TTOptimizer, resolve_ordinal

METHODS = ("tt", "random", "cma", "ngopt", "protes", "auto")


def make_optimizer(method: str, d: int, n: int | Sequence[int], seed: int = 0, **options: Any) -> Optimizer:
    """Build the optimizer `method` ("tt", "random", "cma", "ngopt", "protes") for d dims of size n.

    `noise_aware=True` wraps it in a `NoisyOptimizer` (options retest, estimator, pool, kappa,
    probe): re-presented elite, per-point statistics and `best` by estimated mean.
    """
    layer, options = split_noisy_options(options)
    if layer is not None and "budget" in layer and method == "ngopt":
        options["budget"] = layer["budget"]  # the run's budget serves both: NGOpt picks its algorithm by it
    base = _make_base(method, d, n, seed, **options)
    return base if layer is None else NoisyOptimizer(base, **layer)


def _make_base(method: str, d: int, n: int | Sequence[int], seed: int, **options: Any) -> Optimizer:
    if method == "auto":  # the per-grid default: `options_for` sets `resolved` for the grid
        resolved = options.pop("resolved", None)
        if resolved == "cma":
            from .baselines import CMAOptimizer

            options.pop("prior", None)  # a codebook's data prior is TT's (and random's), not CMA-ES's
            return CMAOptimizer(d, n, seed=seed, **options)
        if resolved != "tt":
            raise ValueError(
                f"method 'auto' needs resolved='tt' or 'cma' (options_for resolves it per grid), got {resolved!r}"
            )
        method = "tt"
    if method == "tt":
        return TTOptimizer(d, n, seed=seed, **options)
    if method == "random":
        return RandomSearch(d, n, seed=seed, **options)
    if method == "cma":
        from .baselines import CMAOptimizer

        return CMAOptimizer(d, n, seed=seed, **options)
    if method == "ngopt":
        from .baselines import NGOptOptimizer

        return NGOptOptimizer(d, n, seed=seed, **options)
    if method == "protes":
        from .baselines import ProtesOptimizer

        return ProtesOptimizer(d, n, seed=seed, **options)
    if method in ANCHORS:  # the anchors' own noise handling (pycma NoiseHandler, nevergrad noisy)
        return ANCHORS[method](d, n, seed=seed, **options)
    raise ValueError(f"method must be one of {', '.join(METHODS + tuple(ANCHORS))}; got {method!r}")


def maximize(
    f: Callable[[np.ndarray], Any],
    d: int,
    n: int | Sequence[int],
    budget: int,
    method: str = "tt",
    seed: int = 0,
    **options: Any,
) -> MaximizeResult:
    """Maximize f (int array (k, d) -> floats (k,)) over the grid with exactly `budget` queries."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
    if method in ("ngopt", "ngopt-noisy"):
        options.setdefault("budget", int(budget))  # NGOpt chooses its algorithm from the budget
    opt = make_optimizer(method, d, n, seed=seed, **options)
    return run_maximize(opt, f, int(budget))


__all__ = [
    "METHODS",
    "MaximizeResult",
    "NoisyOptimizer",
    "Optimizer",
    "OptionalDependencyError",
    "Population",
    "RandomSearch",
    "TTOptimizer",
    "make_optimizer",
    "maximize",
    "options_for",
    "resolve_ordinal",
]
