"""Drift of a living neuron's responsiveness: a drifting gain, reference stimuli and the correction.

A neuron's gain changes over a session (adaptation, electrode movement), so a response measured
late is not comparable with one measured early. Rig tools interleave a fixed set of reference
stimuli in every block to watch it; here their responses also correct the search:

* `DriftingGain`: the model of the drift, a multiplicative gain g(t) over presentations t: a slow
  linear trend times the exponential of a Gaussian random walk (`neurons.make_responder` uses it).
* `GainTracker`: estimates the gain of each batch from the reference responses (pure NumPy, for the
  rig too): each reference's level is its mean over the session in gain units, a batch's gain is
  the ratio of its reference responses to those levels, smoothed causally over recent batches.
* `DriftCorrected`: wraps any optimizer of this package behind the same ask/tell API, adds
  `per_batch` reference presentations to every ask (they count against the budget), and tells the
  wrapped optimizer every other response divided by its batch's gain estimate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Optimizer, check_positive_int


class DriftingGain:
    """Gain g(t) = max(0, 1 + trend * t / horizon) * exp(W_t): W a random walk with standard
    deviation `walk` per `per` presentations (W_0 = 0); t counts presentations from 0.

    `trend=-0.3, walk=0.05, per=100` is a gain falling by 30 % over `horizon` presentations with
    random steps of about 5 % per 100 presentations. Seeded: the same seed gives the same path.
    """

    def __init__(self, trend: float = 0.0, walk: float = 0.0, horizon: int = 1024, per: int = 100, seed: int = 0):
        if not np.isfinite(trend) or not np.isfinite(walk) or walk < 0:
            raise ValueError(f"drift needs a finite trend and walk >= 0, got trend={trend!r}, walk={walk!r}")
        self.trend, self.walk = float(trend), float(walk)
        self.horizon = check_positive_int("horizon", horizon)
        self.per = check_positive_int("per", per)
        self.rng = np.random.default_rng(seed)
        self._w = np.zeros(1)  # W_0 .. W_{len-1}

    def __call__(self, t: Any) -> np.ndarray:
        """Gains at presentation counts t (int array)."""
        t = np.asarray(t, dtype=np.int64)
        top = int(t.max(initial=0)) + 1
        if top > self._w.size:  # extend the walk (the path does not depend on how it was queried)
            steps = self.rng.standard_normal(top - self._w.size) * self.walk / np.sqrt(self.per)
            self._w = np.concatenate([self._w, self._w[-1] + np.cumsum(steps)])
        return np.maximum(0.0, 1.0 + self.trend * t / self.horizon) * np.exp(self._w[t])


class GainTracker:
    """Gain per batch from the responses to a fixed set of reference stimuli.

    Reference j has an unknown level f_j (its response at gain 1); the responses of batch b to the
    references it showed are g_b f_j + noise. A batch's raw gain is the sum of its reference
    responses over the sum of their levels; the levels are the references' mean responses each
    divided by the gain of its batch, re-estimated (a few alternations) whenever a batch is added,
    normalized so that the first batch's gain is 1. `gain(b)` is a line fitted to the raw gains of
    batches b - window + 1 .. b (weighted by their reference levels) read at b: causal (a batch's
    correction uses only what was measured up to it) and without the lag a mean has on a trend. A
    batch without reference signal keeps the last gain.
    """

    def __init__(self, n_refs: int, window: int = 32) -> None:
        self.n_refs = check_positive_int("n_refs", n_refs)
        self.window = check_positive_int("window", window)
        self.batches: list[tuple[np.ndarray, np.ndarray]] = []  # (reference ids, responses) per batch
        self.gains: list[float] = []  # causal estimate of each batch, fixed once made

    def add(self, refs: Any, y: Any) -> float:
        """Record one batch's reference responses (ids in 0..n_refs-1, NaN = failed); its gain estimate."""
        refs = np.asarray(refs, dtype=np.int64).reshape(-1)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if refs.shape != y.shape or np.any(refs < 0) or np.any(refs >= self.n_refs):
            raise ValueError("refs must be reference ids in 0..n_refs-1, one per response")
        ok = np.isfinite(y)
        self.batches.append((refs[ok], y[ok]))
        g = self._estimate()
        self.gains.append(g)
        return g

    def levels(self, raw: np.ndarray) -> np.ndarray:
        """Reference levels f_j given per-batch gains (NaN for a reference never shown)."""
        num = np.zeros(self.n_refs)
        cnt = np.zeros(self.n_refs)
        for (r, y), g in zip(self.batches, raw):
            if g > 0:
                np.add.at(num, r, y / g)
                np.add.at(cnt, r, 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(cnt > 0, num / cnt, np.nan)

    def raw_gains(self, iterations: int = 5) -> np.ndarray:
        """Per-batch gains fitted to all reference responses so far (first batch with signal = 1)."""
        B = len(self.batches)
        g = np.ones(B)
        for _ in range(iterations):
            f = self.levels(g)
            for b, (r, y) in enumerate(self.batches):
                expect = np.nansum(f[r]) if r.size else 0.0
                g[b] = y.sum() / expect if expect > 0 else np.nan
            g = _fill(g)
            first = g[np.isfinite(g) & (g > 0)]
            if first.size:
                g = g / first[0]
        return g

    def _estimate(self) -> float:
        g = self.raw_gains()
        f = self.levels(g)
        lo = max(0, len(g) - self.window)
        w = self._weights(f)[lo:]
        v = g[lo:]
        ok = np.isfinite(v) & (w > 0)
        if not ok.any():
            return self.gains[-1] if self.gains else 1.0
        x = np.arange(v.size, dtype=np.float64)[ok]
        if ok.sum() >= 3:  # a weighted line through the window, read at its last batch (no lag on a trend)
            slope, icpt = np.polyfit(x, v[ok], 1, w=np.sqrt(w[ok]))
            return float(max(icpt + slope * (v.size - 1), 1e-3))
        return float(np.sum(w[ok] * v[ok]) / np.sum(w[ok]))

    def _weights(self, f: np.ndarray) -> np.ndarray:
        """Each batch's reference signal: the sum of the levels of the references it showed."""
        return np.array([np.nansum(f[r]) if r.size else 0.0 for r, _ in self.batches])

    def gain(self, b: int = -1) -> float:
        """The causal gain estimate of batch b (default the last)."""
        return self.gains[b]

    def scale_error(self) -> float:
        """Relative standard error of one batch's raw gain, from the spread of the raw gains about a
        weighted line through all batches (NaN with fewer than 3 batches of reference signal).

        Corrected responses are in gain units of the first batch, whose own raw gain carries this
        error: every corrected value shares it, so an interval of a corrected mean must include it.
        """
        g = self.raw_gains()
        w = self._weights(self.levels(g))
        ok = np.isfinite(g) & (w > 0)
        if ok.sum() < 3:
            return float("nan")
        x = np.arange(g.size, dtype=np.float64)[ok]
        coef = np.polyfit(x, g[ok], 1, w=np.sqrt(w[ok]))
        resid = g[ok] - np.polyval(coef, x)
        # weighted residual variance with 2 fitted parameters; a batch's error scales as 1/sqrt(weight)
        var = float(np.sum(w[ok] * resid**2) / (ok.sum() - 2))
        return float(np.sqrt(var / w[ok][0]))


def _fill(g: np.ndarray) -> np.ndarray:
    """Carry the last finite gain forward (the first ones backward) over batches without signal."""
    g = g.copy()
    ok = np.isfinite(g) & (g > 0)
    if not ok.any():
        return np.ones_like(g)
    idx = np.where(ok, np.arange(g.size), 0)
    np.maximum.accumulate(idx, out=idx)
    g = g[idx]
    g[: int(np.argmax(ok))] = g[int(np.argmax(ok))]
    return g


class DriftCorrected(Optimizer):
    """Any optimizer with reference stimuli interleaved in every ask and drift-corrected tells.

    `references` is a fixed int array (R, d) of grid points (test images through the generator's
    encoder on a codebook grid, fixed latents on an ordered one); `per_batch` of them are presented
    in every ask, cycling through the set, and count against the budget. The wrapped optimizer is
    told the other responses divided by the batch's gain (`GainTracker`); `best`, `best_stats` and
    `recommend()` are the wrapped optimizer's (in gain units of the session's first batch).
    `is_reference` marks the rows of the last ask that were references.
    """

    def __init__(self, base: Optimizer, references: Any, per_batch: int = 4, window: int = 32) -> None:
        super().__init__(base.d, base.n.tolist(), base.seed, 1)
        self.base = base
        self.method = base.method
        R = np.asarray(references, dtype=np.int64)
        if R.ndim != 2 or R.shape[1] != self.d or R.shape[0] < 1:
            raise ValueError(f"references must be grid points of shape (R, {self.d}), got {R.shape}")
        if np.any(R < 0) or np.any(self.n[None, :] <= R):
            raise ValueError("references must lie on the grid")
        self.references = R
        self.per_batch = check_positive_int("per_batch", per_batch, minimum=0)
        self.tracker = GainTracker(R.shape[0], window)
        self._next = 0
        self._ref_rows: np.ndarray = np.zeros(0, dtype=np.int64)  # reference id of each ref row of the last ask
        self.is_reference = np.zeros(0, dtype=bool)
        self._marks: np.ndarray | None = None  # reference id per told row, given by `tell_marked`

    @property
    def batch(self) -> int:
        """The wrapped optimizer's batch plus the reference presentations."""
        return int(self.base.batch) + self.per_batch

    @batch.setter
    def batch(self, value: int) -> None:
        pass

    def _ask(self, k: int) -> np.ndarray:
        m = min(self.per_batch, k - 1) if k > 1 else 0
        ids = (self._next + np.arange(m)) % self.references.shape[0]
        self._next = int((self._next + m) % self.references.shape[0])
        I = np.asarray(self.base.ask(k - m), dtype=np.int64).reshape(k - m, self.d)
        # References first in the batch (a rig shows them interleaved; order does not matter here).
        self._ref_rows = ids
        self.is_reference = np.concatenate([np.ones(m, dtype=bool), np.zeros(k - m, dtype=bool)])
        return np.concatenate([self.references[ids], I])

    @property
    def reference_ids(self) -> np.ndarray:
        """The reference id of each row of the last ask (-1: a searched point)."""
        ids = np.full(self.is_reference.size, -1, dtype=np.int64)
        ids[self.is_reference] = self._ref_rows
        return ids

    def tell_marked(self, I: Any, y: Any, refs: Any) -> None:
        """Tell responses with each row's reference id given (-1: searched), for a caller whose tells
        need not be its last ask in order (the rig: any subset of pending stimuli, repeats, off-policy)."""
        marks = np.asarray(refs, dtype=np.int64).reshape(-1)
        rows = np.asarray(y).reshape(-1).size
        if marks.shape != (rows,):  # checked before anything is counted
            raise ValueError(f"refs must hold one reference id per told row ({rows}), got {marks.size}")
        self._marks = marks
        try:
            self.tell(I, y)
        finally:
            self._marks = None

    def _tell(self, I: np.ndarray, y: np.ndarray) -> None:
        if self._marks is not None:
            refs = self._marks
        else:  # the last ask told back in order: its first rows were the references
            m = int(self.is_reference.sum()) if self.is_reference.size == I.shape[0] else 0
            refs = np.concatenate([self._ref_rows[:m], np.full(I.shape[0] - m, -1, dtype=np.int64)])
        is_ref = refs >= 0
        g = (
            self.tracker.add(refs[is_ref], y[is_ref])
            if is_ref.any()
            else (self.tracker.gains[-1] if self.tracker.gains else 1.0)
        )
        rest = ~is_ref
        self.base.tell(I[rest], y[rest] / g if g > 0 else y[rest])

    @property
    def gain(self) -> float | None:
        """The latest gain estimate (None before any reference response was told)."""
        return self.tracker.gains[-1] if self.tracker.gains else None

    @property
    def best(self) -> tuple[np.ndarray | None, float]:
        """The wrapped optimizer's best (references excluded)."""
        return self.base.best

    @property
    def best_stats(self) -> Any:
        """The wrapped optimizer's `best_stats` (None if it has none)."""
        return getattr(self.base, "best_stats", None)

    def recommend(self) -> Any:
        """The wrapped optimizer's `recommend()` (None if it has none), its interval widened by the
        uncertainty of the gain scale (`GainTracker.scale_error`), in quadrature; unbounded while
        fewer than 3 batches of references say how large that is."""
        rec_fn = getattr(self.base, "recommend", None)
        rec = rec_fn() if callable(rec_fn) else None
        if rec is None or not np.isfinite(rec.estimate) or not self.tracker.batches:
            return rec
        from scipy import stats as sps

        err = self.tracker.scale_error()
        if not np.isfinite(err):
            rec.low, rec.high = -np.inf, np.inf
            return rec
        z = float(sps.norm.ppf(0.5 + rec.level / 2))
        extra = z * abs(rec.estimate) * err
        rec.low = rec.estimate - float(np.hypot(rec.estimate - rec.low, extra))
        rec.high = rec.estimate + float(np.hypot(rec.high - rec.estimate, extra))
        return rec

    def state_dict(self) -> dict:
        """The wrapped optimizer's warm-start state."""
        return self.base.state_dict()  # type: ignore[attr-defined]
