"""Noise-aware optimization: re-present the elite, keep per-point statistics, rank by estimated means.

A noisy neuron answers the same stimulus differently each time, so the single highest draw is
mostly luck (the winner's curse). `NoisyOptimizer` wraps any optimizer of this package behind
the same ask/tell API:

* each `ask` spends a `retest` fraction of its points re-presenting points already told, chosen
  greedily by an upper confidence bound among the best estimated points (racing: a point whose
  estimate is high but uncertain is measured again until it is either confirmed or falls back);
* every told draw updates that point's statistics (count, mean, variance; Welford);
* the mean of a point is estimated by `estimator` (see `ESTIMATORS`); the base optimizer is told
  the raw draws by default (`TELL_VALUES`: telling estimates made TT's elite churn, measured);
* `best` is the point with the best estimated mean, `best_stats` its estimate, mean and count.

The noise level is learned from the repeats themselves: a deterministic responder shows zero
spread on the first `probe` repeats, after which no more queries are spent on re-presentation
(clean responses then cost only those few queries).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Optimizer, check_positive_float, check_positive_int

ESTIMATORS = ("mean", "shrink", "lcb")
"""How a point's mean response is estimated for ranking and for `best`:

mean    the sample mean of its draws.
shrink  empirical-Bayes posterior mean: the sample mean pulled toward the mean of all points
        told, by the noise variance over its count (one lucky draw moves it little).
lcb     the shrunk mean minus `kappa` standard errors (prefers points measured often).
"""

TELL_VALUES = ("raw", "estimate", "repeated")
"""What the base optimizer is told: each draw as measured ("raw": its elite stays the points that
drew high, a stable search anchor; identifying the truly best point is this layer's job), or the
point's current estimate with its elite archive re-valued after every tell ("estimate"), or the
estimate only for points measured more than once, raw draws otherwise ("repeated")."""

UNDER_NOISE: dict[str, dict[str, Any]] = {
    # TT: the elite is the best of the last batch (PROTES' selection) instead of an archive of the
    # best draws ever, which under noise fills with lucky draws the local moves then circle around.
    "tt": {"archive": False, "elite": 16},
    # CMA-ES: recombine the best 8 of each generation (pycma weights of popsize 16) instead of the
    # best 6 (popsize 12): averaging over more points, fewer lucky ones steer the mean. Popsize 64
    # (the best 32) averaged more but updated 4x less often: bench_noise SN-GAN, seeds 0-3, 16 vs
    # 64 at 256 / 1,024: Poisson 0.660 / 0.809 vs 0.683 / 0.784, x0.5 0.663 / 0.776 vs 0.603 / 0.768,
    # clean 0.826 / 0.942 vs 0.789 / 0.934 (pycma's own 12: 0.817 / 0.950).
    "cma": {"popsize": 16},
}
"""Base optimizer settings the noise-aware default uses (`maximize.noise.search: auto`), chosen on
benchmarks/bench_noise.py (VQ-VAE: TT; SN-GAN: CMA-ES; Poisson and multiplicative noise)."""

SELECTIONS = ("lucb", "halving")
"""How the final phase (`final` > 0) spends its budget: lucb races the leader against the
challenger with the highest upper bound among the `pool` best (stops when separated); halving
screens the `screen` best estimated points and halves them round by round (sequential halving)."""

CLEAN_SWITCHABLE = ("archive", "elite", "popsize")
"""`UNDER_NOISE` settings a base optimizer can switch back while running (TT's attributes, CMA-ES's
generation size): the layer restores the given `clean_base` values once its probe finds the
responses noise-free."""

# Relative spread below which repeats count as identical (float round-off of a deterministic net).
_CLEAN_RTOL = 1e-9


@dataclass
class Recommendation:
    """The reported best: its grid point, the estimate of its true mean response and an interval.

    `low`/`high` bound the point's true mean response at confidence `level` (a t interval around
    the estimate with the noise variance of the best estimated points, over its `count` draws);
    zero width on a responder found noise-free.
    """

    index: np.ndarray
    estimate: float
    low: float
    high: float
    count: int
    level: float = 0.95

    def as_dict(self, prefix: str = "best_") -> dict[str, float]:
        """Flat metrics, e.g. best_estimate, best_low, best_high, best_count."""
        return {
            f"{prefix}estimate": self.estimate,
            f"{prefix}low": self.low,
            f"{prefix}high": self.high,
            f"{prefix}count": float(self.count),
        }


@dataclass
class PointStats:
    """Statistics of one grid point over its repeats."""

    index: np.ndarray
    count: int
    mean: float
    var: float  # sample variance of the draws (0 for one draw)
    estimate: float


class NoisyOptimizer(Optimizer):
    """Wrap an optimizer to handle noisy responses (re-presentation, statistics, estimated best).

    Options (defaults):
      retest=0.2        fraction of each ask spent re-presenting told points (0 disables it).
      estimator="shrink"  one of `ESTIMATORS`: ranking and `best`.
      pool=8            best estimated points among which re-presentations are raced.
      kappa=1.0         confidence multiplier of the racing bound (and of `lcb`).
      probe=6           repeats after which zero spread marks the responder as noise-free.
      tell="raw"        one of `TELL_VALUES`: what the base optimizer is told.
      candidates=False  also race the base model's own recommendation (`model_candidates`: the
                        CMA-ES distribution mean, the TT model's mode), a denoised guess.
      level=0.95        confidence level of `recommend()`'s interval.
      selection="lucb"  one of `SELECTIONS`: how the final phase races the best estimated points.
      screen=32         points entering the final phase's sequential halving.
      clean_base=None   base settings restored once the probe finds the responses noise-free.
    """

    def __init__(
        self,
        base: Optimizer,
        retest: float = 0.2,
        estimator: str = "shrink",
        pool: int = 8,
        kappa: float = 1.0,
        probe: int = 6,
        tell: str = "raw",
        budget: int | None = None,
        final: float = 0.0,
        candidates: bool = False,
        level: float = 0.95,
        selection: str = "lucb",
        screen: int = 32,
        clean_base: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(base.d, base.n.tolist(), base.seed, base.batch)
        self.base = base
        self.method = base.method
        if not 0.0 <= float(retest) < 1.0:
            raise ValueError(f"retest must be in [0, 1), got {retest!r}")
        self.retest = float(retest)
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")
        self.estimator = estimator
        self.pool = check_positive_int("pool", pool)
        self.kappa = check_positive_float("kappa", kappa)
        self.probe = check_positive_int("probe", probe)
        if tell not in TELL_VALUES:
            raise ValueError(f"tell must be one of {', '.join(TELL_VALUES)}; got {tell!r}")
        self.tell_values = tell
        # Budget-aware schedule: `retest` during the search, then the last `final` share of the
        # budget goes to racing the elite (a final selection phase).
        self.budget = None if budget is None else check_positive_int("budget", budget)
        if not 0.0 <= float(final) < 1.0:
            raise ValueError(f"final must be in [0, 1), got {final!r}")
        self.final = float(final)
        self.candidates = bool(candidates)
        if not 0.0 < float(level) < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        self.level = float(level)
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}; got {selection!r}")
        self.selection = selection
        self.screen = check_positive_int("screen", screen, minimum=2)
        self._sh: dict | None = None  # sequential-halving state of the final phase
        self.clean_base = dict(clean_base or {})
        self.n_retests = 0  # re-presentations asked so far
        self.clean = False  # set once `probe` repeats showed no spread at all
        self._key: dict[bytes, int] = {}
        self._I = np.zeros((0, self.d), dtype=np.int64)
        self._count = np.zeros(0, dtype=np.int64)
        self._mean = np.zeros(0)
        self._m2 = np.zeros(0)  # sum of squared deviations (Welford)
        self._est: np.ndarray | None = None  # cached estimates, None when stale
        self._extra: set[int] = set()  # rows of model candidates kept in the race

    @property
    def batch(self) -> int:
        """Points per `ask()` when k is not given: the base optimizer's."""
        return int(self.base.batch)

    @batch.setter
    def batch(self, value: int) -> None:
        # Optimizer.__init__ assigns it; the base optimizer keeps the real value.
        pass

    # -- statistics ------------------------------------------------------------------------
    def _slots(self, I: np.ndarray) -> np.ndarray:
        """Row of each point in the statistics arrays, adding unseen points."""
        rows = np.empty(I.shape[0], dtype=np.int64)
        new: list[np.ndarray] = []
        for j, row in enumerate(np.ascontiguousarray(I, dtype=np.int64)):
            key = row.tobytes()
            slot = self._key.get(key)
            if slot is None:
                slot = self._I.shape[0] + len(new)
                self._key[key] = slot
                new.append(row)
            rows[j] = slot
        if new:
            k = len(new)
            self._I = np.concatenate([self._I, np.stack(new)])
            self._count = np.concatenate([self._count, np.zeros(k, dtype=np.int64)])
            self._mean = np.concatenate([self._mean, np.zeros(k)])
            self._m2 = np.concatenate([self._m2, np.zeros(k)])
        return rows

    def _update(self, rows: np.ndarray, y: np.ndarray) -> None:
        """Welford updates, one draw at a time (a point may repeat within a batch)."""
        for s, v in zip(rows, y):
            self._count[s] += 1
            delta = v - self._mean[s]
            self._mean[s] += delta / self._count[s]
            self._m2[s] += delta * (v - self._mean[s])
        self._est = None

    def noise_var(self) -> float:
        """Pooled within-point variance of the repeated points (nan before any repeat)."""
        dof = np.maximum(self._count - 1, 0)
        if dof.sum() == 0:
            return float("nan")
        return float(self._m2.sum() / dof.sum())

    def _prior(self, s2: float) -> tuple[float, float]:
        """Mean and variance of the true means of the points told (the shrinkage target): the
        optimizer's own proposals, so the prior tightens as its search concentrates."""
        m0 = float(self._mean.mean())
        tau2 = float(self._mean.var()) - s2 * float(np.mean(1.0 / self._count))
        # A floor keeps the prior proper when the means are within noise of each other.
        return m0, max(tau2, 0.05 * s2, 1e-12)

    def estimates(self) -> np.ndarray:
        """Estimated mean response of every point told so far (order of first telling)."""
        if self._est is not None:
            return self._est
        s2 = self.noise_var()
        if self.estimator == "mean" or self._I.shape[0] < 2 or not s2 > 0:
            est = self._mean.copy()
        else:
            m0, tau2 = self._prior(s2)
            w = tau2 / (tau2 + s2 / self._count)
            est = m0 + w * (self._mean - m0)
            if self.estimator == "lcb":
                est = est - self.kappa * np.sqrt(w * s2 / self._count)
        self._est = est
        return est

    def stats(self, I: Any) -> list[PointStats | None]:
        """Statistics of the given points (None for a point never told)."""
        est = self.estimates()
        out: list[PointStats | None] = []
        for row in np.asarray(I, dtype=np.int64).reshape(-1, self.d):
            s = self._key.get(np.ascontiguousarray(row).tobytes())
            if s is None:
                out.append(None)
                continue
            c = int(self._count[s])
            var = float(self._m2[s] / (c - 1)) if c > 1 else 0.0
            out.append(PointStats(self._I[s].copy(), c, float(self._mean[s]), var, float(est[s])))
        return out

    # -- ask / tell ------------------------------------------------------------------------
    def in_final(self) -> bool:
        """Whether the next ask falls in the final selection phase (needs `budget` and `final`).

        Progress is counted in responses told, so in population mode (told every presentation)
        the phase starts with the shared set's last presentations."""
        return self.budget is not None and self.final > 0 and self.n_told >= (1.0 - self.final) * self.budget

    def _n_retest(self, k: int) -> int:
        if self.clean or self._I.shape[0] == 0:
            return 0
        if self.in_final():
            return k  # racing stops by itself once the leader is separated; the rest goes to search
        if self.retest == 0.0:
            return 0
        return min(round(self.retest * k), k - 1) if k > 1 else int(self.n_retests == 0)

    def _halving(self, k: int) -> np.ndarray:
        """k re-presentations of the final phase by sequential halving (Karnin et al. 2013, best-arm
        identification with a fixed budget): the `screen` best estimated points share the phase's
        budget in ceil(log2 screen) equal rounds, each round spread evenly over the survivors, the
        better half (by estimate, all draws so far) surviving each round, down to two."""
        est = self.estimates()
        sh = self._sh
        if sh is None:
            left = int(self.budget - self.n_told) if self.budget is not None else k
            m = min(self.screen, self._I.shape[0])
            while m > 2 and left // int(np.ceil(np.log2(m))) < m:  # each round draws every survivor once
                m //= 2
            rounds = max(int(np.ceil(np.log2(max(m, 2)))), 1)
            sh = self._sh = {"alive": np.argsort(-est, kind="stable")[:m], "queue": [], "round": 0}
            sh["per_round"], sh["rounds"] = max(left // rounds, 1), rounds
        picks: list[int] = []
        while len(picks) < k:
            if not sh["queue"]:
                alive = sh["alive"]
                if sh["round"] > 0 and alive.size > 2:  # keep the better half
                    alive = alive[np.argsort(-est[alive], kind="stable")][: max(alive.size // 2, 2)]
                    sh["alive"] = alive
                each = max(sh["per_round"] // alive.size, 1)
                sh["queue"] = list(np.tile(alive, each))
                sh["round"] += 1
            picks.append(int(sh["queue"].pop(0)))
        return self._I[np.asarray(picks, dtype=np.int64)]

    def _pick_retests(self, k: int) -> np.ndarray:
        """Up to k re-presentations raced among the best estimated points (LUCB): the leader and
        the challenger with the highest upper bound are measured, the more uncertain of the two
        first, each pick counted as a virtual draw, until the leader's lower bound clears every
        challenger's upper bound (then the rest of the batch goes back to the base optimizer)."""
        lead: list[np.ndarray] = []
        if self.candidates:  # the model's guess joins the race; a new one is measured first
            for cand in model_candidates(self.base):
                s = self._key.get(np.ascontiguousarray(cand, dtype=np.int64).tobytes())
                if s is None and len(lead) < k:
                    lead.append(cand)
                elif s is not None:
                    self._extra.add(int(s))
        k -= len(lead)
        est = self.estimates()
        top = np.argsort(-est, kind="stable")[: self.pool]
        extra = np.array(sorted(self._extra - set(top.tolist())), dtype=np.int64)
        pool = np.concatenate([top, extra]) if extra.size else top
        s2 = self.noise_var()
        if not s2 > 0:  # no repeat yet: assume the spread of the pool as noise
            s2 = float(np.var(self._mean[pool])) if pool.size > 1 else 1.0
            s2 = s2 if s2 > 0 else 1.0
        n = self._count[pool].astype(np.float64)
        e = est[pool]
        picks: list[int] = []
        for _ in range(max(k, 0)):
            half = self.kappa * np.sqrt(s2 / n)
            h = int(np.argmax(e))
            if pool.size == 1:
                b = h
            else:
                ucb = np.where(np.arange(pool.size) == h, -np.inf, e + half)
                c = int(np.argmax(ucb))
                if ucb[c] <= e[h] - half[h]:
                    break
                b = h if n[h] <= n[c] else c
            picks.append(int(pool[b]))
            n[b] += 1
        out = self._I[np.asarray(picks, dtype=np.int64)]
        return np.concatenate([np.asarray(lead, dtype=np.int64).reshape(-1, self.d), out]) if lead else out

    def _ask(self, k: int) -> np.ndarray:
        n_re = self._n_retest(k)
        if n_re and self.selection == "halving" and self.in_final():
            re = self._halving(n_re)
        else:
            re = self._pick_retests(n_re) if n_re else np.zeros((0, self.d), np.int64)
        self.n_retests += re.shape[0]
        r = re.shape[0]
        parts = [np.asarray(self.base.ask(k - r), dtype=np.int64).reshape(k - r, self.d)] if k > r else []
        return np.concatenate(parts + [re], axis=0)

    def _tell(self, I: np.ndarray, y: np.ndarray) -> None:
        ok = np.isfinite(y)
        rows = self._slots(I[ok])
        self._update(rows, y[ok])
        dof = int(np.maximum(self._count - 1, 0).sum())
        if not self.clean and dof >= self.probe:
            spread = float(self._m2.sum())
            scale = float(np.sum(self._mean**2 * np.maximum(self._count - 1, 0)))
            # Repeats that all answered 0 (a near-silent Poisson neuron) prove nothing: not clean yet.
            self.clean = scale > 0 and spread <= _CLEAN_RTOL**2 * scale
            if self.clean:  # noise-free after all: the base's own settings back (see CLEAN_SWITCHABLE)
                for key, value in self.clean_base.items():
                    if key in CLEAN_SWITCHABLE and hasattr(self.base, key):
                        setattr(self.base, key, value)
        if self.tell_values == "raw":
            self.base.tell(I, y)
            return
        told = y.copy()
        est = self.estimates()[rows]
        told[ok] = est if self.tell_values == "estimate" else np.where(self._count[rows] > 1, est, y[ok])
        self.base.tell(I, told)
        _revalue_elite(self.base, self)

    # -- results ---------------------------------------------------------------------------
    @property
    def best(self) -> tuple[np.ndarray | None, float]:
        """(point with the best estimated mean, that estimate); (None, nan) before any response."""
        if self._I.shape[0] == 0:
            return None, float("nan")
        est = self.estimates()
        s = int(np.argmax(est))
        return self._I[s].copy(), float(est[s])

    @property
    def best_stats(self) -> PointStats | None:
        """Statistics of `best`: estimate, sample mean, variance and number of repeats."""
        i, _ = self.best
        return None if i is None else self.stats(i)[0]

    def recommend(self) -> Recommendation | None:
        """The reported best (`best`) with its estimate and a `level` confidence interval of its true
        mean response; None before any response.

        The interval is a t interval around the point's sample mean, simultaneous over the points
        raced for the best (Bonferroni over the repeated points among the `pool` best estimates):
        the best is picked as the largest of those estimates, so an interval for a fixed point would
        undercover it (the winner's curse), while one that holds for all of them at once holds for
        the one picked. The noise variance is pooled over those points (the noise of a rate depends
        on the rate: Poisson counts, multiplicative gain), else over every repeated point; without
        any repeat the interval is infinite; a responder found noise-free gets zero width.
        """
        from scipy import stats as sps

        i, est = self.best
        if i is None:
            return None
        s = self._key[np.ascontiguousarray(i, dtype=np.int64).tobytes()]
        c = int(self._count[s])
        if self.clean:
            return Recommendation(i, est, est, est, c, self.level)
        top = np.argsort(-self.estimates(), kind="stable")[: self.pool]
        dof_top = np.maximum(self._count[top] - 1, 0)
        if dof_top.sum() >= 2:
            s2, dof = float(self._m2[top].sum() / dof_top.sum()), int(dof_top.sum())
        else:
            s2, dof = self.noise_var(), int(np.maximum(self._count - 1, 0).sum())
        if not np.isfinite(s2) or dof == 0:
            return Recommendation(i, est, -np.inf, np.inf, c, self.level)
        raced = max(int(np.sum(self._count[top] > 1)), 1)
        alpha = (1.0 - self.level) / raced
        half = float(sps.t.ppf(1.0 - alpha / 2, dof)) * np.sqrt(s2 / c)
        mean = float(self._mean[s])
        low, high = mean - half, mean + half
        return Recommendation(i, float(np.clip(est, low, high)), low, high, c, self.level)

    @property
    def max_draw(self) -> tuple[np.ndarray | None, float]:
        """The single highest draw and its point (what a noise-unaware optimizer reports)."""
        return super().best

    def state_dict(self) -> dict:
        """The base optimizer's warm-start state (raises AttributeError if it has none)."""
        return self.base.state_dict()  # type: ignore[attr-defined]


def _revalue_elite(base: Optimizer, noisy: NoisyOptimizer) -> None:
    """Replace the values of a base optimizer's elite archive by current estimates.

    TT keeps its best points with the values they were told; a point told once with a lucky draw
    would stay elite after repeats showed it is ordinary. An optimizer may offer
    `revalue(fn)` (fn: points (m, d) -> values (m,)); TT's archive is updated directly otherwise.
    """
    hook = getattr(base, "revalue", None)
    if callable(hook):
        hook(lambda P: np.array([s.estimate if s else np.nan for s in noisy.stats(P)]))
        return
    if not (hasattr(base, "_elite_I") and hasattr(base, "_elite_y") and hasattr(base, "_from_model")):
        return
    E = base._from_model(base._elite_I)
    if E.shape[0] == 0:
        return
    vals = np.asarray(base._elite_y, dtype=np.float64).copy()
    for j, s in enumerate(noisy.stats(E)):
        if s is not None:
            vals[j] = s.estimate
    base._elite_y = vals


def model_candidates(base: Optimizer) -> list[np.ndarray]:
    """The base model's own guesses of the best point (grid indices): the CMA-ES distribution mean
    (pycma's recommendation under noise; also of TT's internal CMA on ordered grids) and the mode of
    a TT probability model (teneva's `optima_tt` on its cores); [] for other optimizers."""
    out: list[np.ndarray] = []
    for es_owner in (base, getattr(base, "_cma", None)):
        es = getattr(es_owner, "es", None)
        if es is not None and hasattr(es, "mean"):
            x = np.asarray(es.mean, dtype=np.float64)[: base.d]
            out.append(np.clip(np.floor(x * base.n), 0, base.n - 1).astype(np.int64))
    if hasattr(base, "theta") and hasattr(base, "_model") and getattr(base, "q", None) is None:
        out.append(tt_mode(base._model()[0], base.n))
    return out


def tt_mode(G: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The (approximate) most probable point of a non-negative TT model with cores G (d, r, N, r)
    whose rank boundaries are summed by all-ones vectors, by teneva's beam search `optima_tt_beam`
    (`optima_tt`'s maxvol search took minutes at d = 49, n = 32, r = 5; the beam, milliseconds)."""
    import teneva

    d = G.shape[0]
    cores = [G[k][:, : int(n[k]), :] for k in range(d)]
    cores[0] = cores[0].sum(axis=0, keepdims=True)
    cores[-1] = cores[-1].sum(axis=2, keepdims=True)
    # Scale each core to unit max: the mode is unchanged and products of 49 cores stay finite.
    cores = [c / max(float(np.abs(c).max()), 1e-300) for c in cores]
    return np.asarray(teneva.optima_tt_beam(cores, k=10), dtype=np.int64)


NOISY_OPTIONS = (
    "retest",
    "estimator",
    "pool",
    "kappa",
    "probe",
    "tell",
    "budget",
    "final",
    "candidates",
    "level",
    "selection",
    "screen",
    "clean_base",
)


def split_noisy_options(options: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Split make_optimizer options into the noise layer's (None if `noise_aware` is off) and the base's."""
    opts = dict(options)
    aware = bool(opts.pop("noise_aware", False))
    if not aware:
        # `budget` is the run's budget, also an option of NGOpt: without the layer it stays the base's.
        extra = [k for k in NOISY_OPTIONS if k in opts and k != "budget"]
        if extra:
            raise ValueError(f"options {', '.join(sorted(extra))} need noise_aware=True")
        return None, opts
    return {k: opts.pop(k) for k in NOISY_OPTIONS if k in opts}, opts
