"""Replay: a session's state as a pure fold of its journal's events (no I/O, no optimizer).

`replay(cfg, events)` and the live service reach the same `SessionState` by the same `apply`, so a
restarted session counts, answers and ranks exactly as one that never stopped.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from spikemax.rig.journal import Asked, Event, Told


@dataclass
class SessionConfig:
    """What a session was created with, defaults resolved; stored once, replayed from on restart.

    Fields added after the first journals default to what those sessions ran with (no noise layer,
    no retries, no prior), so an older journal replays unchanged.
    """

    id: str
    generator: str
    method: str
    budget: int
    seed: int
    batch: int
    channels: int
    target_channel: int | str
    options: dict[str, Any]
    name: str = ""
    created: float = 0.0
    checkpoint_sha256: str = ""  # content digest of the generator checkpoint (spikemax.digest.file_digest)
    noise: dict[str, Any] = field(default_factory=dict)  # aware, repeats, retest, final, estimator, references, ...
    retry_failed: bool = False
    prior: bool = False  # the optimizer starts from the stage's TT data prior (saved beside the session)
    # noise.references > 0: the fixed reference set (grid points, `neurons.reference_points`), stored so
    # that a replay rebuilds the same wrapper whatever happens to the prepared data meanwhile
    reference_points: list[list[int]] = field(default_factory=list)

    @property
    def target(self) -> int:
        """The channel whose best is the session's best (channel 0 in population mode)."""
        return 0 if self.target_channel == "all" else int(self.target_channel)

    @property
    def repeats(self) -> int:
        """Presentations of each asked stimulus the session asks the rig for."""
        return int(self.noise.get("repeats", 1))

    @property
    def references(self) -> int:
        """Reference stimuli in every ask (0: no drift correction)."""
        return int(self.noise.get("references", 0))


@dataclass
class StimulusState:
    """An asked stimulus: its number, indices, the ask that made it and whether it is answered."""

    n: int
    indices: np.ndarray
    event: int  # the ask event that made it (a block of the file protocol)
    answered: bool = False
    retry_of: str | None = None
    reference: int | None = None  # its id in the session's reference set (None: a searched stimulus)


@dataclass
class SessionState:
    """Everything the journal says about one session: stimuli, queries, per-channel best draw."""

    cfg: SessionConfig
    seq: int = 0  # events so far
    n_asked: int = 0  # stimuli handed out (re-asked failed ones included)
    n_new: int = 0  # of them the optimizer's (what the budget counts; a failed one shown again is extra)
    n_tells: int = 0
    stimuli: dict[str, StimulusState] = field(default_factory=dict)
    retry_queue: list[str] = field(default_factory=list)  # failed stimuli the next ask shows again
    q_sid: list[str | None] = field(default_factory=list)
    q_idx: list[np.ndarray] = field(default_factory=list)
    q_y: list[np.ndarray] = field(default_factory=list)
    q_batch: list[int] = field(default_factory=list)
    q_ref: list[int] = field(default_factory=list)  # reference id of each query (-1: searched or off-policy)
    best_y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    best_q: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    improved: bool = False  # whether the last event raised the target channel's best draw
    _stacked: np.ndarray | None = field(default=None, repr=False, compare=False)  # q_idx stacked (cache)

    @classmethod
    def new(cls, cfg: SessionConfig) -> SessionState:
        """The state of a session with no events."""
        return cls(cfg, best_y=np.full(cfg.channels, -np.inf), best_q=np.zeros(cfg.channels, dtype=np.int64))

    @property
    def pending(self) -> list[str]:
        """Ids of asked stimuli not answered yet, in asking order."""
        return [sid for sid, s in self.stimuli.items() if not s.answered]

    @property
    def n_answered(self) -> int:
        return sum(1 for s in self.stimuli.values() if s.answered)

    @property
    def finished(self) -> bool:
        """Every stimulus of the budget asked and answered, and no failed one waiting to be shown again."""
        return self.n_new >= self.cfg.budget and not self.pending and not self.retry_queue

    @property
    def left(self) -> int:
        """Stimuli still to ask: the budget's new ones plus failed ones waiting to be shown again."""
        return self.cfg.budget - self.n_new + len(self.retry_queue)

    def reference_of(self, stimulus: str | None) -> int:
        """The reference id of an asked stimulus (-1: a searched one, or an off-policy result)."""
        ref = None if stimulus is None else self.stimuli[stimulus].reference
        return -1 if ref is None else int(ref)

    def indices(self) -> np.ndarray:
        """Every query's grid indices, (q, d) (stacked once per new query count)."""
        if self._stacked is None or len(self._stacked) != len(self.q_idx):
            self._stacked = np.stack(self.q_idx) if self.q_idx else np.zeros((0, 0), dtype=np.int64)
        return self._stacked

    def responses(self) -> np.ndarray:
        """Every query's m responses, (q, m)."""
        return np.asarray(self.q_y, dtype=np.float64).reshape(len(self.q_y), self.cfg.channels)


def _asked(s: SessionState, ev: Asked) -> None:
    for x in ev.stimuli:
        s.stimuli[x.id] = StimulusState(
            x.n, np.asarray(x.indices, dtype=np.int64), s.seq, retry_of=x.retry_of, reference=x.reference
        )
        if x.retry_of is not None and x.retry_of in s.retry_queue:
            s.retry_queue.remove(x.retry_of)
    s.n_asked += len(ev.stimuli)
    s.n_new += ev.k
    s.improved = False


def _told(s: SessionState, ev: Told) -> None:
    t = s.cfg.target
    s.improved = False
    failed: dict[str, bool] = {}  # stimulus -> every presentation of it in this tell failed
    for q in ev.queries:
        y = np.asarray(q.responses, dtype=np.float64)
        ref = s.reference_of(q.stimulus)
        s.q_sid.append(q.stimulus)
        s.q_idx.append(np.asarray(q.indices, dtype=np.int64))
        s.q_y.append(y)
        s.q_batch.append(s.n_tells)
        s.q_ref.append(ref)
        # strict: the first of equal responses stays best; a reference presentation is never the best
        better = np.isfinite(y) & (y > s.best_y) & (ref < 0)
        s.best_y = np.where(better, y, s.best_y)
        s.best_q = np.where(better, len(s.q_y) - 1, s.best_q)
        s.improved |= bool(better[t])
        if q.stimulus is not None:
            s.stimuli[q.stimulus].answered = True
            failed[q.stimulus] = failed.get(q.stimulus, True) and bool(np.isnan(y).all())
    if s.cfg.retry_failed:
        # A failed presentation is shown once more (as XDream re-shows unanswered images); a failed
        # re-showing is not shown a third time.
        s.retry_queue += [x for x, f in failed.items() if f and s.stimuli[x].retry_of is None]
    s.n_tells += 1


def apply(s: SessionState, ev: Event) -> SessionState:
    """The state after one more event (updated in place and returned, for folding)."""
    if isinstance(ev, Asked):
        _asked(s, ev)
    else:
        _told(s, ev)
    s.seq += 1
    return s


def replay(cfg: SessionConfig, events: Iterable[Event]) -> SessionState:
    """A session's state from its config and events."""
    return functools.reduce(apply, events, SessionState.new(cfg))
