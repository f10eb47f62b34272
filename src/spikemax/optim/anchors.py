"""The anchors' own noise handling behind the package's ask/tell API (baselines for noisy responses).

cma-nh      pycma CMA-ES with its `NoiseHandler` (Hansen et al. 2009, UH-CMA-ES): a few points of
            every generation are re-evaluated, the rank changes measure the noise, and the number
            of draws aggregated per point (median) and the step size grow with it. Recommends the
            distribution mean (rounded to the grid), pycma's advice under noise.
ngopt-noisy nevergrad NGOpt told that the function is not deterministic
            (`parametrization.function.deterministic = False`: it picks noise-robust algorithms),
            recommending nevergrad's pessimistic best (`recommend()`).

Both keep per-point statistics of what they were told so `best` reports a value for the point they
recommend (NaN while that point was never presented).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import Optimizer, cma_rng_options, relaxed_to_grid


class _Draws:
    """Every value told per grid point (mean of the finite ones on demand)."""

    def __init__(self) -> None:
        self.values: dict[bytes, list[float]] = {}

    def add(self, I: np.ndarray, y: np.ndarray) -> None:
        for row, v in zip(np.ascontiguousarray(I, dtype=np.int64), y):
            if np.isfinite(v):
                self.values.setdefault(row.tobytes(), []).append(float(v))

    def mean(self, i: np.ndarray) -> float:
        v = self.values.get(np.ascontiguousarray(i, dtype=np.int64).tobytes())
        return float(np.mean(v)) if v else float("nan")


class CMANoiseOptimizer(Optimizer):
    """pycma CMA-ES with `cma.NoiseHandler` on the relaxation x in [0, 1]^d (point = floor(x n)).

    A stage is the NoiseHandler's re-evaluations of a few points of the last generation followed
    by a new generation (pycma's popsize, or more points to fill the ask, as `CMAOptimizer` does),
    every point drawn `evaluations` times; once all are told CMA is updated with the median per
    point, the rank changes of the re-evaluated points measure the noise, and the handler's
    factor multiplies the step size (one generation late: it may not change between ask and
    tell). An ask longer than what the stage still needs gets extra draws of the generation's
    points (they join their point's median), so any k works.

    Options: sigma0=0.3, popsize (pycma's default 4 + 3 ln d), maxevals=(1, 1, 8): the handler's
    min, start and max draws per point.
    """

    method = "cma-nh"

    def __init__(
        self,
        d: int,
        n: int | Sequence[int],
        seed: int = 0,
        batch: int | None = None,
        sigma0: float = 0.3,
        popsize: int | None = None,
        maxevals: Sequence[int] = (1, 1, 8),
    ) -> None:
        import cma

        super().__init__(d, n, seed, 1)
        dim = max(self.d, 2)
        opts: dict[str, Any] = {**cma_rng_options(self.seed + 1), "verbose": -9, "CMA_diagonal": False}
        if popsize is not None:
            opts["popsize"] = int(popsize)
        self.es = cma.CMAEvolutionStrategy(np.full(dim, 0.5), float(sigma0), opts)
        self.batch = int(batch) if batch is not None else int(self.es.popsize)
        lo, start, hi = (list(maxevals) + [1, 1, 1])[:3]
        self.nh = cma.NoiseHandler(dim, maxevals=[int(lo), int(start), int(hi)], reevals=2 + int(self.es.popsize) // 20)
        self.draws = _Draws()
        self._stage: dict | None = None  # the open stage: rows to serve and the values told per row
        self._X: np.ndarray | None = None  # the open generation (relaxed points)
        self._prev: dict | None = None  # the last generation told: X, losses, rows to re-evaluate

    def _grid(self, X: np.ndarray) -> np.ndarray:
        return relaxed_to_grid(X, self.n)

    def _new_stage(self, k: int) -> None:
        """The next stage: the handler's re-evaluations of the last generation, then a new generation
        (at least the ask's k draws; more points than popsize as `CMAOptimizer` does), each point
        `evaluations` times."""
        evals = max(int(self.nh.evaluations), 1)
        re = np.zeros(0, dtype=np.int64) if self._prev is None else np.tile(self._prev["idx"], evals)
        number = max(int(self.es.popsize), -(-max(k - re.size, 1) // evals))
        self._X = np.asarray(self.es.ask(number=number), dtype=np.float64)
        gen = np.tile(np.arange(number), evals)
        # Rows < 0 are re-evaluations of the previous generation's row -r - 1.
        self._stage = {"order": np.concatenate([-re - 1, gen]), "served": 0, "asked": [], "vals": {}}

    def _points(self, rows: np.ndarray) -> np.ndarray:
        assert self._X is not None
        X = np.empty((rows.size, self._X.shape[1]))
        re = rows < 0
        if re.any():
            X[re] = self._prev["X"][-rows[re] - 1]  # type: ignore[index]
        X[~re] = self._X[rows[~re]]
        return self._grid(X)

    def _ask(self, k: int) -> np.ndarray:
        if self._stage is None:
            self._new_stage(k)
        st = self._stage
        assert st is not None
        left = st["order"][st["served"] :]
        if left.size < k:  # pad with more draws of the new generation's points (aggregated with the rest)
            gen = st["order"][st["order"] >= 0]
            left = np.concatenate([left, np.resize(gen, k - left.size)])
        rows = left[:k]
        st["served"] += k
        st["asked"].extend(int(r) for r in rows)
        return self._points(rows)

    def _tell(self, I: np.ndarray, y: np.ndarray) -> None:
        self.draws.add(I, y)
        st = self._stage
        if st is None or self._X is None:
            return
        n = min(len(st["asked"]), I.shape[0])
        for r, v in zip(st["asked"][:n], y[:n]):
            st["vals"].setdefault(r, []).append(float(v) if np.isfinite(v) else np.nan)
        st["asked"] = st["asked"][n:]
        if st["served"] < st["order"].size or st["asked"]:
            return
        agg = {r: _median_loss(v) for r, v in st["vals"].items()}
        factor = 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self._prev is not None:  # the noise measure of the previous generation
                fitre = self._prev["fit"].copy()
                for r in self._prev["idx"]:
                    fitre[r] = agg.get(-int(r) - 1, fitre[r])
                self.nh.fit, self.nh.fitre = list(self._prev["fit"]), _finite_losses(fitre).tolist()
                self.nh.idx = self._prev["idx"]
                self.nh.update_measure()
                factor = self.nh.treat()
            fit = _finite_losses(np.array([agg[r] for r in range(self._X.shape[0])]))
            self.es.tell(list(self._X), fit.tolist())
            self.es.sigma *= factor  # one generation late: the step may not change between ask and tell
        idx = np.asarray(self.nh.indices(list(fit)), dtype=np.int64)
        self._prev = {"X": self._X, "fit": fit, "idx": idx}
        self._stage, self._X = None, None

    @property
    def best(self) -> tuple[np.ndarray | None, float]:
        """(grid point of the CMA distribution mean, mean of its draws or NaN); (None, nan) before any tell."""
        if self.n_told == 0:
            return None, float("nan")
        i = self._grid(np.asarray(self.es.mean, dtype=np.float64)[None])[0]
        return i, self.draws.mean(i)


def _median_loss(values: list[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(-np.median(v)) if v.size else np.nan


def _finite_losses(loss: np.ndarray) -> np.ndarray:
    """Failed points rank worst (a loss above every finite one)."""
    loss = np.asarray(loss, dtype=np.float64).copy()
    bad = ~np.isfinite(loss)
    if bad.any():
        loss[bad] = (loss[~bad].max() + 1.0) if (~bad).any() else 0.0
    return loss


class NGOptNoisyOptimizer(Optimizer):
    """nevergrad NGOpt on the integer-cast box, told the function is noisy; best = its pessimistic recommendation.

    Options: batch=100 (also num_workers), budget=10000 (NGOpt picks its algorithm from it).
    """

    method = "ngopt-noisy"

    def __init__(self, d: int, n: int | Sequence[int], seed: int = 0, batch: int = 100, budget: int = 10_000) -> None:
        import nevergrad as ng

        super().__init__(d, n, seed, batch)
        param = ng.p.Array(shape=(self.d,), lower=-0.5, upper=self.n - 0.5).set_integer_casting()
        param.random_state = np.random.RandomState(self.seed)
        param.function.deterministic = False
        self.opt = ng.optimizers.NGOpt(parametrization=param, budget=int(budget), num_workers=self.batch)
        self._asked: dict[bytes, list[Any]] = {}
        self._worst = 0.0
        self.draws = _Draws()

    def _grid(self, value: Any) -> np.ndarray:
        return np.clip(np.rint(np.asarray(value, dtype=np.float64)), 0, self.n - 1).astype(np.int64)

    def _ask(self, k: int) -> np.ndarray:
        cands = [self.opt.ask() for _ in range(k)]
        I = np.stack([self._grid(c.value) for c in cands])
        for row, c in zip(I, cands):
            self._asked.setdefault(row.tobytes(), []).append(c)
        return I

    def _tell(self, I: np.ndarray, y: np.ndarray) -> None:
        self.draws.add(I, y)
        finite = y[np.isfinite(y)]
        if finite.size:
            self._worst = max(self._worst, float(-finite.min()))
        for row, v in zip(I, y):
            loss = -float(v) if np.isfinite(v) else self._worst + 1.0
            key = row.tobytes()
            cands = self._asked.get(key)
            if cands:
                cand = cands.pop(0)
                if not cands:
                    del self._asked[key]
            else:
                cand = self.opt.parametrization.spawn_child(new_value=row.astype(np.float64))
            with contextlib.suppress(Exception):  # NGOpt rejects some told candidates; keep the run going
                self.opt.tell(cand, loss)

    @property
    def best(self) -> tuple[np.ndarray | None, float]:
        """(nevergrad's pessimistic recommendation on the grid, mean of its draws); (None, nan) before any tell."""
        if self.n_told == self.n_failed:
            return None, float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            i = self._grid(self.opt.recommend().value)
        return i, self.draws.mean(i)


ANCHORS = {"cma-nh": CMANoiseOptimizer, "ngopt-noisy": NGOptNoisyOptimizer}
