"""Baseline grid maximizers with the same ask/tell API: random, CMA-ES, NGOpt, reference PROTES."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import (
    CMA_DIAGONAL_FROM,
    Optimizer,
    OptionalDependencyError,
    cma_diagonal,
    cma_rng_options,
    grid_to_relaxed,
    relaxed_to_grid,
)

__all__ = ["CMA_DIAGONAL_FROM", "CMAOptimizer", "NGOptOptimizer", "ProtesOptimizer", "RandomSearch"]


class RandomSearch(Optimizer):
    """Uniform random points on the grid, or samples of a `prior` (a `TTPrior` of the same grid)."""

    method = "random"

    def __init__(self, d: int, n: int | Sequence[int], seed: int = 0, batch: int = 100, prior: Any = None) -> None:
        super().__init__(d, n, seed, batch)
        self.rng = np.random.default_rng(self.seed)
        if prior is not None and np.asarray(getattr(prior, "n", [])).tolist() != self.n.tolist():
            raise ValueError("prior does not fit this grid: fit it with the same n")
        self.prior = prior

    def _ask(self, k: int) -> np.ndarray:
        if self.prior is not None:
            return np.asarray(self.prior.sample(k, self.rng), dtype=np.int64)
        return self.rng.integers(0, self.n[None, :], size=(k, self.d))


def row_keys(I: np.ndarray) -> list[bytes]:
    """Hashable keys of grid points, to match told points with asked ones."""
    I = np.ascontiguousarray(I, dtype=np.int64)
    return [row.tobytes() for row in I]


class CMAOptimizer(Optimizer):
    """pycma CMA-ES on the relaxation x in [0, 1]^d, point j rounded to floor(x_j n_j) (clipped).

    Options: batch (default: CMA's population size), sigma0=0.3 (initial step on [0, 1]),
    popsize (default pycma's 4 + 3 ln d), diagonal="auto" (separable CMA-ES above
    CMA_DIAGONAL_FROM dimensions), adopt=False. A generation has max(popsize, first ask) points and
    is updated once all its points are told; NaN responses rank worst. Told points CMA never
    proposed only update `best`, unless `adopt`: then the best of them, where it beats every point
    CMA proposed, is injected (at its cell centre) into the next generation, so CMA also learns from
    points other sources chose (population mode: the other neurons' proposals).
    """

    method = "cma"

    def __init__(
        self,
        d: int,
        n: int | Sequence[int],
        seed: int = 0,
        batch: int | None = None,
        sigma0: float = 0.3,
        popsize: int | None = None,
        diagonal: bool | str = "auto",
        adopt: bool = False,
    ) -> None:
        import cma

        super().__init__(d, n, seed, 1)
        dim = max(self.d, 2)  # pycma needs at least 2 dimensions
        opts: dict[str, Any] = {
            **cma_rng_options(self.seed + 1),
            "verbose": -9,
            "CMA_diagonal": cma_diagonal(self.d, diagonal),
        }
        if popsize is not None:
            opts["popsize"] = int(popsize)
        self.es = cma.CMAEvolutionStrategy(np.full(dim, 0.5), float(sigma0), opts)
        self.batch = int(batch) if batch is not None else int(self.es.popsize)
        self._gen: dict | None = None  # the open generation: X, I, y, told, served
        self._where: dict[bytes, list[int]] = {}
        self.adopt = bool(adopt)
        self._popsize: int | None = None  # a generation size asked for, applied when the next generation opens
        self._own_best = -np.inf  # best response to a point CMA proposed
        self._foreign: tuple[np.ndarray, float] | None = None  # best told point CMA did not propose

    def _to_grid(self, X: np.ndarray) -> np.ndarray:
        return relaxed_to_grid(X, self.n)

    @property
    def popsize(self) -> int:
        """Points pycma recombines per generation (its weights); settable while running."""
        return int(self._popsize or self.es.popsize)

    @popsize.setter
    def popsize(self, value: int | None) -> None:
        # None: pycma's default for d (its own formula, evaluated by pycma). Applied when the next
        # generation opens (see _resize).
        if value is None:
            import cma

            value = cma.CMAOptions({"popsize": cma.CMAOptions.defaults()["popsize"]}).eval(
                "popsize", loc={"N": self.es.N}
            )
        self._popsize = int(value)

    def _resize(self, popsize: int) -> None:
        """Continue with generations of `popsize`: pycma's recombination weights, learning rates and
        step-size damping recomputed for it (as pycma itself resets them), its mean, step size,
        covariance and evolution paths kept."""
        from cma import options_parameters

        es = self.es
        es.opts["popsize"] = int(popsize)
        es.sp = options_parameters.CMAParameters(es.N, es.opts, verbose=False)
        settings = getattr(es.adapt_sigma, "initialize_settings", None)
        if callable(settings):  # CSA's cs and damps depend on the weights
            settings(es, reset=True)

    def _ask(self, k: int) -> np.ndarray:
        # pycma allows one tell per iteration: points asked before the tell join this generation.
        # A generation opens with one `ask` of max(popsize, k) points: from 300 dimensions on pycma
        # adapts sigma by TPA, which delivers its mirrored mean-shift pair as the first two samples
        # of an iteration's first `ask(number > 1)` only (a second such call raised "Mean shift samples
        # are expected but missing"). pycma weights the best popsize of a larger generation.
        if self._gen is None:
            if self._popsize is not None and self._popsize != int(self.es.popsize):
                self._resize(self._popsize)
            self._adopt_foreign()
            X = np.asarray(self.es.ask(number=max(int(self.es.popsize), k)), dtype=np.float64)
            self._gen = {
                "X": X,
                "I": self._to_grid(X),
                "y": np.full(len(X), np.nan),
                "told": np.zeros(len(X), dtype=bool),
                "served": 0,
            }
        gen = self._gen
        short = gen["served"] + k - len(gen["X"])
        if short > 0:  # more asks before the tell: pycma's way is ask(1), which leaves the TPA pair alone
            X = np.asarray([self.es.ask(1)[0] for _ in range(short)], dtype=np.float64)
            gen["X"] = np.concatenate([gen["X"], X])
            gen["I"] = np.concatenate([gen["I"], self._to_grid(X)])
            gen["y"] = np.concatenate([gen["y"], np.full(short, np.nan)])
            gen["told"] = np.concatenate([gen["told"], np.zeros(short, dtype=bool)])
        rows = np.arange(gen["served"], gen["served"] + k)
        for row, key in zip(rows, row_keys(gen["I"][rows])):
            self._where.setdefault(key, []).append(int(row))
        gen["served"] += k
        return gen["I"][rows]

    def _tell(self, I: np.ndarray, y: np.ndarray) -> None:
        gen = self._gen
        for key, point, v in zip(row_keys(I), I, y):
            slots = self._where.get(key) if gen is not None else None
            if slots and gen is not None:
                row = slots.pop(0)
                if not slots:
                    del self._where[key]
                gen["y"][row], gen["told"][row] = v, True
                if np.isfinite(v):
                    self._own_best = max(self._own_best, float(v))
            elif self.adopt and np.isfinite(v) and (self._foreign is None or v > self._foreign[1]):
                self._foreign = (point.copy(), float(v))
        if gen is not None and gen["served"] == len(gen["X"]) and gen["told"].all():
            loss = -gen["y"]
            bad = ~np.isfinite(loss)
            if bad.any():
                loss[bad] = (loss[~bad].max() + 1.0) if (~bad).any() else 0.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.es.tell(list(gen["X"]), loss.tolist())
            self._gen, self._where = None, {}

    def _adopt_foreign(self) -> None:
        """Inject the best foreign point told since the last generation opened into the one opening
        now, where it beats every point CMA proposed."""
        if self._foreign is not None and self._foreign[1] > self._own_best:
            self.es.inject([grid_to_relaxed(self._foreign[0], self.n, self.es.N)], force=True)
        self._foreign = None


class NGOptOptimizer(Optimizer):
    """nevergrad NGOpt on an integer-cast box [-0.5, n - 0.5]^d, batched ask/tell.

    Options: batch=100 (also NGOpt's num_workers), budget=10000 (NGOpt picks its algorithm from
    it; `maximize` passes its own budget). NaN responses are told as the worst loss seen.
    """

    method = "ngopt"

    def __init__(
        self,
        d: int,
        n: int | Sequence[int],
        seed: int = 0,
        batch: int = 100,
        budget: int = 10_000,
    ) -> None:
        import nevergrad as ng

        super().__init__(d, n, seed, batch)
        param = ng.p.Array(shape=(self.d,), lower=-0.5, upper=self.n - 0.5).set_integer_casting()
        param.random_state = np.random.RandomState(self.seed)
        self.opt = ng.optimizers.NGOpt(parametrization=param, budget=int(budget), num_workers=self.batch)
        self._asked: dict[bytes, list[Any]] = {}
        self._worst = 0.0

    def _grid(self, cand: Any) -> np.ndarray:
        return np.clip(np.rint(np.asarray(cand.value, dtype=np.float64)), 0, self.n - 1).astype(np.int64)

    def _ask(self, k: int) -> np.ndarray:
        cands = [self.opt.ask() for _ in range(k)]
        I = np.stack([self._grid(c) for c in cands])
        for key, c in zip(row_keys(I), cands):
            self._asked.setdefault(key, []).append(c)
        return I

    def _tell(self, I: np.ndarray, y: np.ndarray) -> None:
        finite = y[np.isfinite(y)]
        if finite.size:
            self._worst = max(self._worst, float(-finite.min()))
        for key, row, v in zip(row_keys(I), I, y):
            loss = -float(v) if np.isfinite(v) else self._worst + 1.0
            cands = self._asked.get(key)
            if cands:
                cand = cands.pop(0)
                if not cands:
                    del self._asked[key]
            else:
                cand = self.opt.parametrization.spawn_child(new_value=row.astype(np.float64))
            with contextlib.suppress(Exception):  # NGOpt rejects some told candidates; keep the run going
                self.opt.tell(cand, loss)


PROTES_HINT = (
    "method 'protes' needs the reference `protes` package and JAX: install the bench extra "
    "(pip install -e '.[bench]' && pip install --no-deps protes)"
)


def import_protes() -> Any:
    """Import the reference protes module, or raise OptionalDependencyError with the fix."""
    try:
        import importlib

        import jax  # noqa: F401
        import optax  # noqa: F401

        return importlib.import_module("protes.protes")  # the module, not the function
    except ImportError as err:
        raise OptionalDependencyError(PROTES_HINT) from err


@functools.cache
def _protes_functions(lr: float) -> tuple[Any, Any, Any, Any]:
    """The reference loop's jitted interface, sampler and Adam step for one lr, built once per process.

    Built per optimizer, the closures were new functions to `jax.jit`, so each of a group of runs
    compiled its own copies (about 4 s each on 2 cores); shared, they compile once per shape.
    """
    import jax
    import jax.numpy as jnp
    import optax

    pm = import_protes()
    optim = optax.adam(lr)
    interface = jax.jit(pm._interface_matrices)
    sample = jax.jit(jax.vmap(pm._sample, (None, None, None, None, 0)))
    likelihood = jax.jit(jax.vmap(pm._likelihood, (None, None, None, None, 0)))

    def loss(P_cur, I_cur):
        Pl, Pm, Pr = P_cur
        return jnp.mean(-likelihood(Pl, Pm, Pr, interface(Pm, Pr), I_cur))

    grad = jax.grad(loss)

    @jax.jit
    def step(state, P_cur, I_cur):
        updates, state = optim.update(grad(P_cur, I_cur), state)
        return state, jax.tree_util.tree_map(lambda p, u: p + u, P_cur, updates)

    return interface, sample, step, optim.init


class ProtesOptimizer(Optimizer):
    """The reference PROTES (Batsheva et al. 2023, JAX) driven step by step as ask/tell.

    Options (the package's defaults): batch=100 (k), k_top=10, k_gd=1, lr=0.05, r=5. Each `tell`
    takes the k_top best finite responses of that batch and makes k_gd Adam steps, exactly as
    `protes.protes` does. Needs one n for every dimension and d >= 3.
    """

    method = "protes"

    def __init__(
        self,
        d: int,
        n: int | Sequence[int],
        seed: int = 0,
        batch: int = 100,
        k_top: int = 10,
        k_gd: int = 1,
        lr: float = 0.05,
        r: int = 5,
    ) -> None:
        pm = import_protes()
        import jax
        import jax.numpy as jnp

        super().__init__(d, n, seed, batch)
        if np.any(self.n != self.n[0]) or self.d < 3:
            raise ValueError("n must be the same in every dimension (and d >= 3) for method 'protes'")
        self.k_top, self.k_gd = int(k_top), int(k_gd)
        self._jnp, self._jax = jnp, jax
        self.rng = jax.random.PRNGKey(self.seed)
        self.rng, key = jax.random.split(self.rng)
        self.P = pm._generate_initial(self.d, int(self.n[0]), int(r), key)
        self._interface, self._sample, self._step, init = _protes_functions(float(lr))
        self.state = init(self.P)

    def _ask(self, k: int) -> np.ndarray:
        Pl, Pm, Pr = self.P
        self.rng, key = self._jax.random.split(self.rng)
        I = self._sample(Pl, Pm, Pr, self._interface(Pm, Pr), self._jax.random.split(key, k))
        return np.asarray(I, dtype=np.int64)

    def _tell(self, I: np.ndarray, y: np.ndarray) -> None:
        ok = np.flatnonzero(np.isfinite(y))
        if ok.size == 0:
            return
        top = ok[np.argsort(-y[ok], kind="stable")[: self.k_top]]
        I_top = self._jnp.asarray(I[top])
        for _ in range(self.k_gd):
            self.state, self.P = self._step(self.state, self.P, I_top)
