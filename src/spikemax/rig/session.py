"""Session logic without I/O: the next ask, a tell checked against the session, events applied.

A `Session` is its replayed `SessionState` plus the optimizer driver. The manager commits each
event this module makes to the journal before applying it here; on restart the same events are
applied again, each ask re-asked of the seeded optimizer and compared with what was handed out.
Every optimizer draws from its own seeded generator (pycma from its own RandomState), so sessions
step concurrently without a shared lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spikemax.rig.errors import Conflict, Invalid, NotFound, RigError
from spikemax.rig.journal import Asked, AskedStimulus, Event, Query, Told
from spikemax.rig.models import Best, NoiseOptions, SessionStatus, TellRequest
from spikemax.rig.replay import SessionConfig, SessionState, apply


class SingleChannel:
    """The optimizer driver of a session that maximizes one channel and records the others.

    With references (`optim.drift.DriftCorrected`) the optimizer marks which asked rows are
    references, and every tell names each row's reference id: a rig's tell need not be its last ask.
    """

    def __init__(self, optimizer: Any, channel: int) -> None:
        self.optimizer, self.channel = optimizer, channel
        self.optimizers = [optimizer]

    def ask(self, k: int) -> np.ndarray:
        return np.asarray(self.optimizer.ask(k), dtype=np.int64)

    def reference_ids(self, k: int) -> np.ndarray:
        """The reference id of each of the last ask's k rows (-1: a searched point)."""
        ids = getattr(self.optimizer, "reference_ids", None)
        return np.full(k, -1, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)

    def tell(self, I: np.ndarray, Y: np.ndarray, refs: np.ndarray | None = None) -> None:
        if hasattr(self.optimizer, "tell_marked"):
            marks = np.full(len(I), -1, dtype=np.int64) if refs is None else refs
            self.optimizer.tell_marked(I, Y[:, self.channel], marks)
        else:
            self.optimizer.tell(I, Y[:, self.channel])

    def gain(self) -> float | None:
        """The drift correction's current gain estimate (None without references)."""
        return getattr(self.optimizer, "gain", None)

    def estimated(self, channel: int) -> Any:
        """The optimizer of `channel` if it keeps per-point estimates (noise-aware), else None."""
        return self.optimizer if channel == self.channel and hasattr(self.optimizer, "best_stats") else None


class Channels:
    """Population mode: one optimizer per channel (`optim.Population`), each told its own column."""

    def __init__(self, population: Any) -> None:
        self.population = population
        self.optimizers = list(population.optimizers)

    def ask(self, k: int) -> np.ndarray:
        return np.asarray(self.population.ask(k), dtype=np.int64)

    def reference_ids(self, k: int) -> np.ndarray:
        """No references in population mode (the factory refuses them)."""
        return np.full(k, -1, dtype=np.int64)

    def tell(self, I: np.ndarray, Y: np.ndarray, refs: np.ndarray | None = None) -> None:
        self.population.tell(I, Y)

    def gain(self) -> float | None:
        return None

    def estimated(self, channel: int) -> Any:
        opt = self.optimizers[channel]
        return opt if hasattr(opt, "best_stats") else None


@dataclass
class Session:
    """One closed loop in memory: its grid, optimizer driver and replayed state."""

    state: SessionState
    grid: Any
    driver: Any
    run_id: str | None
    problem: str = ""  # why the session is broken ("" = it is not)
    mlflow_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def cfg(self) -> SessionConfig:
        return self.state.cfg

    @property
    def id(self) -> str:
        return self.cfg.id

    @property
    def target(self) -> int:
        return self.cfg.target

    @property
    def stimuli(self) -> dict:
        return self.state.stimuli

    @property
    def pending(self) -> list[str]:
        return self.state.pending

    @property
    def n_asked(self) -> int:
        return self.state.n_asked

    @property
    def q_idx(self) -> list[np.ndarray]:
        return self.state.q_idx

    @property
    def q_y(self) -> list[np.ndarray]:
        return self.state.q_y

    @property
    def q_sid(self) -> list[str | None]:
        return self.state.q_sid

    @property
    def phase(self) -> str:
        """open | finished | broken."""
        return "broken" if self.problem else ("finished" if self.state.finished else "open")

    def usable(self) -> None:
        """Raise Conflict unless the session takes asks and tells."""
        if self.problem:
            raise Conflict(f"session {self.id} is broken: {self.problem}")
        if self.state.finished:
            raise Conflict(f"session {self.id} is finished: all {self.cfg.budget} stimuli were answered")

    # -- making events ---------------------------------------------------------------------------
    def next_ask(self, k: int | None) -> Asked:
        """The next ask's event: failed stimuli shown again first, then new optimizer points (the optimizer moves on)."""
        s = self.state
        if s.left <= 0:
            raise Conflict(f"budget of {self.cfg.budget} stimuli is spent ({len(s.pending)} pending)")
        k = min(k if k is not None else self.cfg.batch, s.left)
        again = s.retry_queue[:k]
        k_new = min(k - len(again), self.cfg.budget - s.n_new)
        I, refs = self._driver_ask(k_new)
        made = [
            AskedStimulus(f"{self.id}-{s.n_asked + j}", s.n_asked + j, I[j].copy(), reference=_ref(refs[j]))
            for j in range(k_new)
        ]
        n = s.n_asked + k_new
        made += [  # a reference shown again is still that reference
            AskedStimulus(
                f"{self.id}-{n + j}", n + j, s.stimuli[x].indices.copy(), retry_of=x, reference=s.stimuli[x].reference
            )
            for j, x in enumerate(again)
        ]
        return Asked(k_new, tuple(made))

    def _driver_ask(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k new optimizer points and the reference id of each (-1: searched)."""
        if k <= 0:
            return np.zeros((0, self.grid.d), dtype=np.int64), np.zeros(0, dtype=np.int64)
        return self.driver.ask(k), self.driver.reference_ids(k)

    def replay_ask(self, ev: Asked) -> None:
        """Re-ask the optimizer a journaled ask; it must propose exactly what was handed out (references too)."""
        got, refs = self._driver_ask(ev.k)
        new = [x for x in ev.stimuli if x.retry_of is None]
        want = np.asarray([x.indices for x in new], dtype=np.int64)
        want_refs = [x.reference for x in new]
        if (
            got.shape != want.reshape(-1, self.grid.d).shape
            or not np.array_equal(got, want.reshape(got.shape))
            or [_ref(r) for r in refs] != want_refs
        ):
            raise RigError(f"replaying ask #{self.state.seq} gave other stimuli than were asked")

    def check_tell(self, req: TellRequest, elapsed_s: float) -> Told:
        """The tell's event, every result resolved to queries; raises (naming the field) before any change."""
        m, d, n = self.cfg.channels, self.grid.d, self.grid.n
        seen: dict[str, int] = {}
        queries = []
        for i, res in enumerate(req.results):
            where = f"results[{i}]"
            if res.id is not None:
                stim = self.state.stimuli.get(res.id)
                if stim is None:
                    raise NotFound(f"{where}.id: unknown stimulus {res.id!r} in session {self.id}")
                if stim.answered:
                    raise Conflict(f"{where}.id: stimulus {res.id!r} was already answered")
                if res.id in seen:
                    raise Invalid(f"{where}.id: stimulus {res.id!r} appears twice (also results[{seen[res.id]}])")
                seen[res.id] = i
                idx = stim.indices
            else:
                assert res.indices is not None
                if len(res.indices) != d:
                    raise Invalid(f"{where}.indices: expected {d} grid indices, got {len(res.indices)}")
                for j, v in enumerate(res.indices):
                    if not 0 <= v < n:
                        raise Invalid(f"{where}.indices[{j}]: {v} is outside the grid (0..{n - 1})")
                idx = np.asarray(res.indices, dtype=np.int64)
            reps = res.presentations()
            if res.id is not None and len(reps) < self.cfg.repeats:
                raise Invalid(
                    f"{where}.repeats: the session asks for {self.cfg.repeats} presentations of each stimulus "
                    f"(noise.repeats), got {len(reps)}"
                )
            for r, p in enumerate(reps):
                at = f"{where}.repeats[{r}]" if res.repeats is not None else where
                rates = p.rates()
                if rates is None:
                    y = np.full(m, np.nan)
                else:
                    if len(rates) != m:
                        key = "counts" if p.counts is not None else "responses"
                        raise Invalid(f"{at}.{key}: expected {m} values (one per channel), got {len(rates)}")
                    y = np.asarray([np.nan if v is None else v for v in rates], dtype=np.float64)
                queries.append(Query(res.id, idx, y, p.counts, p.window, elapsed_s))
        return Told(tuple(queries))

    # -- applying events -------------------------------------------------------------------------
    def apply(self, ev: Event) -> None:
        """Apply a committed event: the state folds it in; a tell's queries are told to the optimizer."""
        if isinstance(ev, Told):
            I = np.stack([q.indices for q in ev.queries])
            Y = np.stack([q.responses for q in ev.queries])
            refs = np.asarray([self.state.reference_of(q.stimulus) for q in ev.queries], dtype=np.int64)
            self.driver.tell(I, Y, refs)
        apply(self.state, ev)

    # -- reading ---------------------------------------------------------------------------------
    def best_draw(self, channel: int) -> Best | None:
        """The single highest response so far on `channel` (None before any finite response)."""
        s = self.state
        if not np.isfinite(s.best_y[channel]):
            return None
        q = int(s.best_q[channel])
        return Best(
            indices=s.q_idx[q].tolist(),
            response=float(s.best_y[channel]),
            channel=channel,
            stimulus_id=s.q_sid[q],
            query=q,
            presentations=self._presentations(s.q_idx[q], channel),
        )

    def _presentations(self, idx: np.ndarray, channel: int) -> int:
        """How often the point `idx` was presented with a finite response on `channel`."""
        if not self.state.q_idx:
            return 0
        same = (self.state.indices() == idx).all(axis=1)
        return int((same & np.isfinite(self.state.responses()[:, channel])).sum())

    def best_of(self, channel: int) -> Best | None:
        """The session's best on `channel`: the noise-aware optimizer's best estimated point, else the best draw."""
        opt = None if self.driver is None else self.driver.estimated(channel)  # None: broken before replay
        st = None if opt is None else opt.best_stats
        if st is None:
            return self.best_draw(channel)
        s = self.state
        same = (s.indices() == st.index).all(axis=1)
        searched = same & (np.asarray(s.q_ref) < 0)  # the point as searched, if it was also shown as a reference
        q = int(np.flatnonzero(searched if searched.any() else same)[0])
        return Best(
            indices=st.index.tolist(),
            response=float(st.mean),
            channel=channel,
            stimulus_id=s.q_sid[q],
            query=q,
            estimate=float(st.estimate),
            presentations=int(st.count),
            **_interval(opt, st.index),
        )

    def status(self) -> SessionStatus:
        """The session's status (the body of GET /sessions/{id} and of a tell's reply)."""
        c, s = self.cfg, self.state
        y = s.responses()
        n_answered = s.n_answered
        return SessionStatus(
            id=c.id,
            name=c.name,
            generator=c.generator,
            method=c.method,
            resolved_method=str(c.options.get("resolved", c.method)),
            budget=c.budget,
            seed=c.seed,
            batch=c.batch,
            channels=c.channels,
            target_channel=c.target_channel,
            options=c.options,
            noise_aware=bool(c.noise.get("aware", False)),
            noise=NoiseOptions.model_validate({k: v for k, v in c.noise.items() if k != "aware"}) if c.noise else None,
            retry_failed=c.retry_failed,
            prior=c.prior,
            d=int(self.grid.d),
            n=int(self.grid.n),
            asked=s.n_asked,
            answered=n_answered,
            pending=s.n_asked - n_answered,
            pending_ids=s.pending,
            retries_waiting=len(s.retry_queue),
            retried=sum(1 for x in s.stimuli.values() if x.retry_of is not None),
            left=s.left,
            queries=len(s.q_y),
            failed=int(np.isnan(y[:, self.target]).sum()) if len(y) else 0,
            state=self.phase if not self.problem else f"broken: {self.problem}",
            best=self.best_of(self.target),
            best_draw=self.best_draw(self.target),
            best_per_channel=[self.best_of(j) for j in range(c.channels)],
            gain=None if self.driver is None else self.driver.gain(),
            run_id=self.run_id,
            created=c.created,
        )

    def write_queries(self, directory: Path) -> Path:
        """The session's query table (one row per presentation, every channel) as directory/queries.parquet,
        through the one query-table writer the AM runs and populations use."""
        from spikemax.querytable import rig, write_queries

        s = self.state
        y = s.responses().reshape(len(s.q_y), self.cfg.channels)
        return write_queries(
            directory,
            rig(self.cfg.channels),
            batch=np.asarray(s.q_batch, dtype=np.int64),
            stimulus=[sid or "" for sid in s.q_sid],
            indices=np.asarray(s.q_idx, dtype=np.int64),
            response=y[:, self.target],
            responses=y,
            reference=np.asarray(s.q_ref, dtype=np.int64) >= 0,
        )


def _ref(value: Any) -> int | None:
    """A reference id from the driver's marks (None: a searched point)."""
    return None if value is None or int(value) < 0 else int(value)


def _interval(opt: Any, index: np.ndarray) -> dict[str, float | None]:
    """The noise-aware optimizer's interval of the true response at `index` (`recommend()`), if it reports one."""
    rec = opt.recommend() if hasattr(opt, "recommend") else None
    if rec is None or not np.array_equal(np.asarray(rec.index), np.asarray(index)):
        return {}
    bound = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731 - JSON has no infinity
    return {"low": bound(rec.low), "high": bound(rec.high)}
