"""Ask/tell optimizer base on a finite grid, input checks and the `maximize` driver."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spikemax import SpikemaxError


class OptionalDependencyError(SpikemaxError, ImportError):
    """A method needs a package that is not installed (e.g. `protes` without the bench extra)."""


def grid_sizes(d: int, n: int | Sequence[int]) -> np.ndarray:
    """Validate `d` and `n` and return the mode sizes as an int array (d,)."""
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"d must be an integer >= 1, got {d!r}")
    if isinstance(n, (int, np.integer)) and not isinstance(n, bool):
        sizes = np.full(int(d), int(n), dtype=np.int64)
    else:
        try:
            sizes = np.asarray(list(n), dtype=np.int64)  # type: ignore[arg-type]  # a bool n fails here: reported below
        except (TypeError, ValueError) as err:
            raise ValueError(f"n must be an int or a sequence of d ints, got {n!r}") from err
        if sizes.shape != (int(d),):
            raise ValueError(f"n must be an int or a sequence of d={d} ints, got length {sizes.size}")
    if np.any(sizes < 2):
        raise ValueError(f"n must be >= 2 in every dimension, got min {int(sizes.min())}")
    return sizes


def cma_rng_options(seed: int) -> dict[str, Any]:
    """pycma options that draw from this instance's own RandomState(seed). pycma's `seed` option
    reseeds the global np.random, which every instance in the process then shares: optimizers run in
    lock step changed each other's proposals, so a group's result depended on its other members (and a
    resumed part of a group differed from the whole). A lone instance draws the same numbers as before."""
    return {"seed": np.nan, "randn": np.random.RandomState(seed).randn}


# CMA-ES learns a full d x d covariance: every sample and update costs O(d^2) (about 1 s per
# generation of 64 at d = 4,096 on 2 cores, 580 MB). Above this many dimensions "auto" runs the
# separable CMA-ES (diagonal covariance, O(d) per sample; Ros & Hansen 2008), pycma's CMA_diagonal.
CMA_DIAGONAL_FROM = 1024


def cma_diagonal(d: int, diagonal: bool | str) -> bool:
    """pycma's CMA_diagonal for d dimensions: "auto" -> d > CMA_DIAGONAL_FROM, a bool as given."""
    if isinstance(diagonal, bool):
        return diagonal
    if diagonal == "auto":
        return int(d) > CMA_DIAGONAL_FROM
    raise ValueError(f"diagonal must be 'auto', true or false, got {diagonal!r}")


def relaxed_to_grid(X: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Grid points of CMA-ES's relaxation X in [0, 1]^dim (point j = floor(x_j n_j), clipped; extra
    columns of a padded 1-d search ignored)."""
    return np.clip(np.floor(X[:, : n.size] * n[None, :]), 0, n[None, :] - 1).astype(np.int64)


def grid_to_relaxed(i: np.ndarray, n: np.ndarray, dim: int) -> np.ndarray:
    """A grid point's cell centre in CMA-ES's relaxation ((i + 0.5) / n, padded with 0.5 to `dim`)."""
    x = np.full(dim, 0.5)
    x[: n.size] = (np.asarray(i) + 0.5) / n
    return x


def check_k(k: Any) -> int:
    """Validate a batch size `k` (>= 1)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Validate an integer option `name` >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive_float(name: str, value: Any) -> float:
    """Validate a float option `name` > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a positive number, got {value!r}") from err
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return v


def check_told(I: Any, y: Any, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a `tell` batch: I int (k, d) within the grid, y float (k,)."""
    d = n.size
    I_arr = np.asarray(I)
    if I_arr.ndim == 1 and I_arr.size == d:
        I_arr = I_arr.reshape(1, d)
    if I_arr.ndim != 2 or I_arr.shape[1] != d:
        raise ValueError(f"I must have shape (k, {d}), got {I_arr.shape}")
    if I_arr.size and not np.issubdtype(I_arr.dtype, np.integer):
        if not np.all(np.isfinite(I_arr)) or not np.all(I_arr == np.round(I_arr)):
            raise ValueError("I must hold integer grid indices")
    I_arr = I_arr.astype(np.int64)
    if np.any(I_arr < 0) or np.any(I_arr >= n[None, :]):
        raise ValueError("I has indices outside the grid (0 <= I[:, j] < n[j])")
    y_arr = np.asarray(y, dtype=np.float64).reshape(-1) if np.ndim(y) <= 1 else np.asarray(y)
    if y_arr.shape != (I_arr.shape[0],):
        raise ValueError(f"y must have shape ({I_arr.shape[0]},) to match I, got {np.shape(y)}")
    return I_arr, y_arr


class Optimizer:
    """Base of every grid maximizer: validation, query counting and the incumbent."""

    method = "base"

    def __init__(self, d: int, n: int | Sequence[int], seed: int = 0, batch: int = 100) -> None:
        self.n = grid_sizes(d, n)
        self.d = int(d)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = int(seed)
        self.batch = check_positive_int("batch", batch)
        self.n_told = 0
        self.n_failed = 0
        self._i_best: np.ndarray | None = None
        self._y_best = -np.inf

    def ask(self, k: int | None = None) -> np.ndarray:
        """Return k grid points to query next (int array (k, d)); k defaults to `batch`."""
        k = self.batch if k is None else check_k(k)
        I = np.asarray(self._ask(k), dtype=np.int64)
        return I

    def tell(self, I: Any, y: Any) -> None:
        """Report responses y (larger is better; NaN = failed query) for points I."""
        I, y = check_told(I, y, self.n)
        if I.shape[0] == 0:
            return
        self.n_told += I.shape[0]
        ok = np.isfinite(y)
        self.n_failed += int((~ok).sum())
        if ok.any():
            j = int(np.flatnonzero(ok)[np.argmax(y[ok])])
            if y[j] > self._y_best:
                self._y_best, self._i_best = float(y[j]), I[j].copy()
        self._tell(I, y)

    @property
    def best(self) -> tuple[np.ndarray | None, float]:
        """(i_best, y_best) over every finite response told so far; (None, nan) before any."""
        if self._i_best is None:
            return None, float("nan")
        return self._i_best.copy(), self._y_best

    def _ask(self, k: int) -> np.ndarray:
        raise NotImplementedError

    def _tell(self, I: np.ndarray, y: np.ndarray) -> None:
        """Update the model (subclasses); y may hold NaN."""


@dataclass
class MaximizeResult:
    """Outcome of `maximize`: incumbent, number of queries and every response in order."""

    i_best: np.ndarray | None
    y_best: float
    n_queries: int
    history: np.ndarray
    method: str = ""
    seconds_optimizer: float = 0.0
    extra: dict = field(default_factory=dict)


def run_maximize(opt: Optimizer, f: Callable[[np.ndarray], Any], budget: int) -> MaximizeResult:
    """Drive an optimizer on f for exactly `budget` queries."""
    import time

    budget = check_positive_int("budget", budget)
    history = np.empty(budget, dtype=np.float64)
    spent, t_opt = 0, 0.0
    while spent < budget:
        k = min(opt.batch, budget - spent)
        t0 = time.perf_counter()
        I = opt.ask(k)
        t_opt += time.perf_counter() - t0
        y = np.asarray(f(I), dtype=np.float64).reshape(-1)
        if y.shape != (k,):
            raise ValueError(f"f must return {k} values for {k} points, got shape {y.shape}")
        t0 = time.perf_counter()
        opt.tell(I, y)
        t_opt += time.perf_counter() - t0
        history[spent : spent + k] = y
        spent += k
    i_best, y_best = opt.best
    return MaximizeResult(i_best, y_best, spent, history, opt.method, t_opt)
