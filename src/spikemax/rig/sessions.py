"""The session manager: every session of one state directory, each event journaled before it is applied.

The layers, in the shape of Optuna's journal storage: `journal` (typed events in SQLite, durable
before the reply), `replay` (session state as a pure fold of events), `session` (ask/tell logic,
no I/O), `factory` (a request resolved as the maximize stage resolves a run), `mirror` (MLflow, a
subscriber to committed events). This module wires them: check, make the event, commit it, apply
it, tell the subscribers. On start each session is rebuilt by replaying its events through a freshly
seeded optimizer (optimizers are deterministic given their seed and that sequence).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from spikemax import SpikemaxError
from spikemax.digest import file_digest
from spikemax.rig import factory
from spikemax.rig.errors import Conflict, Invalid, JournalDamaged, NotFound, RigError, Unavailable
from spikemax.rig.journal import Asked, Event, Journal, SessionRecord, Told
from spikemax.rig.mirror import CLOSED_LOOP_TAG, SESSION_TAG, MlflowMirror
from spikemax.rig.models import SessionCreate, SessionStatus, TellRequest
from spikemax.rig.replay import SessionConfig, SessionState
from spikemax.rig.session import Session

__all__ = [
    "CLOSED_LOOP_TAG",
    "SESSION_TAG",
    "Conflict",
    "Invalid",
    "JournalDamaged",
    "NotFound",
    "RigError",
    "Session",
    "SessionConfig",
    "SessionManager",
    "Unavailable",
]

log = logging.getLogger("spikemax.rig")


class SessionManager:
    """Every session of one state directory: create, ask, tell, restore; subscribers kept in step.

    `forget_lost=True` starts even when MLflow has open sessions of this state directory that the
    journal lacks (it was deleted or emptied): their runs are marked FAILED. Without it that is a
    `JournalDamaged` error naming them.
    """

    def __init__(
        self, params: Any, paths: Any, state_dir: str | Path, mlflow: bool = True, forget_lost: bool = False
    ) -> None:
        self.params, self.paths = params, paths
        self.state_dir = Path(state_dir)
        self.journal = Journal(self.state_dir / "rig.db")
        self.store = self.journal  # the name earlier callers used
        self.sessions: dict[str, Session] = {}
        self.grids: dict[str, Any] = {}
        self.priors: dict[str, Any] = {}
        self.lock = threading.RLock()  # guards the sessions dict
        self.mirror: MlflowMirror | None = None
        try:
            if mlflow:
                self.mirror = MlflowMirror(paths.root, self.state_dir)
            for rec in self.journal.sessions():
                self.sessions[rec.id] = self._restore(rec)
            self._check_lost(forget_lost)
        except BaseException:
            self.journal.close()
            raise

    @property
    def client(self) -> Any:
        """The MLflow client of the mirror (None without MLflow)."""
        return None if self.mirror is None else self.mirror.client

    def _check_lost(self, forget: bool) -> None:
        """MLflow's open sessions of this state directory must all be in the journal (else it was lost)."""
        if self.mirror is None:
            return
        lost = self.mirror.lost(set(self.sessions))
        if not lost:
            return
        ids = ", ".join(sid for sid, _ in lost[:5]) + (" ..." if len(lost) > 5 else "")
        what = (
            f"{self.journal.path} holds {len(self.sessions)} sessions, but MLflow has {len(lost)} open sessions "
            f"of this state directory that it lacks ({ids}): the journal was deleted, emptied or replaced"
        )
        if not forget:
            raise JournalDamaged(
                f"{what}. Restore rig.db from a backup to resume them, or start with --forget-lost to mark "
                f"their MLflow runs FAILED (the queries they logged stay there)."
            )
        self.mirror.forget(lost, "the journal (rig.db) no longer holds this session")
        log.warning("%s; their MLflow runs are marked FAILED (--forget-lost)", what)

    # -- building blocks -------------------------------------------------------------------------
    def grid(self, name: str) -> Any:
        """The generator's LatentGrid (loaded once per process)."""
        from spikemax.generators import checkpoint_path, load_generator

        if name not in self.grids:
            self.grids[name] = load_generator(name, checkpoint_path(name, self.paths))
        return self.grids[name]

    def session_dir(self, sid: str) -> Path:
        """Where a session's prior and artifacts live."""
        return self.state_dir / "sessions" / sid

    def _prior(self, cfg: SessionConfig, grid: Any) -> Any:
        """The stage's data prior of the session's grid (fitted once per process and generator)."""
        if cfg.generator not in self.priors:
            self.priors[cfg.generator] = factory.fit_prior(
                cfg, self.params, self.paths, grid, self.state_dir / "priors"
            )
        return self.priors[cfg.generator]

    def create(self, req: SessionCreate) -> Session:
        """A new session: fields left out take the maximize stage's defaults; its MLflow run opened."""
        generator = req.generator or self.params.maximize.generators[0]
        try:
            grid = self.grid(generator)
        except SpikemaxError as err:
            raise Invalid(f"generator: {err}") from None
        self.journal.check()
        cfg = factory.resolve(req, self.params, self.paths, grid)
        prior = self._prior(cfg, grid) if cfg.prior else None
        # the driver first: a bad method/option combination fails before anything is written
        s = Session(SessionState.new(cfg), grid, factory.make_driver(cfg, grid, prior), None)
        prior_file = self.session_dir(cfg.id) / factory.PRIOR_FILE
        try:
            if prior is not None:
                factory.save_prior(prior, prior_file)
            if self.mirror is not None:
                self.mirror.open(s)
            self.journal.create(cfg.id, cfg.created, asdict(cfg), s.run_id)
        except BaseException as err:
            prior_file.unlink(missing_ok=True)
            if self.mirror is not None and s.run_id is not None:
                self.mirror.abandon(s, type(err).__name__)
            raise
        with self.lock:
            self.sessions[cfg.id] = s
        return s

    def _restore(self, rec: SessionRecord) -> Session:
        """Rebuild a session from the journal by replaying its events in order."""
        from spikemax.generators import checkpoint_path

        known = set(SessionConfig.__dataclass_fields__)
        cfg = SessionConfig(**{k: v for k, v in rec.config.items() if k in known})
        s = Session(SessionState.new(cfg), self.grid(cfg.generator), None, rec.run_id)
        try:
            if file_digest(checkpoint_path(cfg.generator, self.paths)) != cfg.checkpoint_sha256:
                raise RigError(f"generator checkpoint {cfg.generator} changed since the session started")
            prior = factory.load_prior(self.session_dir(cfg.id) / factory.PRIOR_FILE) if cfg.prior else None
            s.driver = factory.make_driver(cfg, s.grid, prior)
            for ev in rec.events:
                if isinstance(ev, Asked):
                    s.replay_ask(ev)
                s.apply(ev)
        except RigError as err:
            s.problem = str(err)
            log.warning("rig session %s cannot be resumed: %s", rec.id, err)
            return s
        if self.mirror is not None:
            self.mirror.restored(s)
        return s

    def _commit(self, s: Session, ev: Event) -> None:
        """Journal the event, apply it, then tell the subscribers (which never fail the request)."""
        self.journal.append(s.id, s.state.seq, ev)
        s.apply(ev)
        if isinstance(ev, Told) and s.state.finished:
            self.journal.set_state(s.id, "finished")
        if self.mirror is not None:
            try:
                self.mirror.committed(s, ev)
            except Exception as err:  # the journal has it; the mirror catches up on restart
                log.warning("MLflow mirror of session %s failed: %s: %s", s.id, type(err).__name__, err)

    # -- the API ---------------------------------------------------------------------------------
    def get(self, sid: str) -> Session:
        """The session `sid` (NotFound if unknown)."""
        with self.lock:
            s = self.sessions.get(sid)
        if s is None:
            raise NotFound(f"session {sid!r} not found")
        return s

    def all(self) -> list[Session]:
        """Every session, oldest first."""
        with self.lock:
            return list(self.sessions.values())

    def ask(self, sid: str, k: int | None) -> list[tuple[str, np.ndarray]]:
        """Up to k stimuli (fewer when the budget is nearly spent), each journaled before it is returned."""
        s = self.get(sid)
        with s.lock:
            s.usable()
            self.journal.check()  # before the optimizer moves on
            ev = s.next_ask(k)
            try:
                self._commit(s, ev)
            except BaseException as err:
                # The optimizer moved on but the journal did not: replay would diverge from here.
                s.problem = f"ask could not be stored ({type(err).__name__})"
                raise
            return [(x.id, x.indices) for x in ev.stimuli]

    def tell(self, sid: str, req: TellRequest) -> SessionStatus:
        """Apply a tell all together or not at all: validated, journaled, told, mirrored, then replied."""
        s = self.get(sid)
        with s.lock:
            s.usable()
            ev = s.check_tell(req, time.time() - s.cfg.created)
            self._commit(s, ev)
            return s.status()

    def close(self) -> None:
        """Stop serving: open sessions' runs are marked KILLED (tag session_state=paused) until resumed."""
        if self.mirror is not None:
            self.mirror.close(self.all())
        self.journal.close()
