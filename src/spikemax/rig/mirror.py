"""The MLflow mirror of rig sessions: a subscriber to committed journal events.

One run per session in the AM experiment. The journal is the truth: the mirror logs each committed
tell's queries, and on restart brings a run level with the journal by the run's logged query
count, so a crash between the two neither loses nor doubles a query in MLflow. Artifacts (best
stimulus, convergence plot, query table) are refreshed by a background thread, off the reply path.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from spikemax import tracking
from spikemax.rig.journal import Event, Told
from spikemax.rig.session import Session

log = logging.getLogger("spikemax.rig")

ARTIFACT_EVERY = 10  # tells between refreshes of convergence.png and queries.parquet
CLOSED_LOOP_TAG = tracking.CLOSED_LOOP_TAG
SESSION_TAG = "spikemax.rig_session"
STATE_TAG = "spikemax.rig_state"  # the state directory whose journal holds the session
OPEN_STATES = ("open", "paused")  # spikemax.session_state of a session a journal must hold


class MlflowMirror:
    """Keeps one MLflow run per session level with the journal (metrics, params, artifacts, status)."""

    def __init__(self, root: Path, state_dir: Path) -> None:
        import mlflow

        tracking.enable_fast_sqlite()
        self.client = mlflow.MlflowClient(tracking.configure(root))
        self.eid = tracking.experiment_id(tracking.AM_EXPERIMENT, root)
        self.state_dir = Path(state_dir)  # sessions/<id>/ under it holds each run's artifact files
        self.loggers: dict[str, Any] = {}
        self._cv = threading.Condition()
        self._todo: dict[str, tuple[Session, bool]] = {}  # session id -> (session, full refresh wanted)
        self._worker: threading.Thread | None = None
        self._closing = False

    # -- runs ------------------------------------------------------------------------------------
    def open(self, s: Session) -> str:
        """Open the session's run (tagged as a closed-loop session of this state directory) with its params."""
        from mlflow.entities import Param

        c = s.cfg
        run = self.client.create_run(
            self.eid,
            run_name=f"rig-{c.id}-{c.generator}-{c.method}",
            tags={
                CLOSED_LOOP_TAG: "true",
                SESSION_TAG: c.id,
                STATE_TAG: str(self.state_dir.resolve()),
                "spikemax.source": "rig",
                "spikemax.session_name": c.name,
                "spikemax.session_state": "open",
            },
        )
        values = {
            "method": c.method,
            "resolved_method": c.options.get("resolved", c.method),
            "generator": c.generator,
            "grid_n": s.grid.n,
            "grid_d": s.grid.d,
            "budget": c.budget,
            "batch": c.batch,
            "seed": c.seed,
            "channels": c.channels,
            "target_channel": c.target_channel,
            "options": json.dumps(c.options),
            "prior": c.prior,
            "retry_failed": c.retry_failed,
            "noise_aware": c.noise.get("aware", False),
            **{f"noise.{k}": v for k, v in c.noise.items() if k != "aware"},
        }
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in values.items()])
        s.run_id = run.info.run_id
        self._attach(s)
        return run.info.run_id

    def abandon(self, s: Session, why: str) -> None:
        """A run opened for a session the journal did not take: FAILED, with the reason."""
        if s.run_id is not None:
            self.client.set_tag(s.run_id, "spikemax.session_state", f"not created: {why}")
            self.client.set_terminated(s.run_id, "FAILED")

    def _attach(self, s: Session) -> None:
        from spikemax.querylog import QueryLogger

        if s.run_id is not None:
            uri = self.client.get_run(s.run_id).info.artifact_uri
            # metrics only: the journal holds the query table
            self.loggers[s.id] = QueryLogger(self.client, s.run_id, None, artifact_uri=uri)

    def restored(self, s: Session) -> None:
        """A session replayed from the journal: its run caught up and marked RUNNING while it is open."""
        if s.run_id is None:
            return
        self._attach(s)
        lg = self.loggers[s.id]
        logged = len(self.client.get_metric_history(s.run_id, "activation"))
        y = s.state.responses()[:logged, s.target]
        lg.n_queries = logged
        lg.n_batches = len(set(s.state.q_batch[:logged]))
        lg.best = float(np.nanmax(y)) if np.isfinite(y).any() else float("nan")
        self._sync(s)
        if s.phase == "open":
            self.client.update_run(s.run_id, status="RUNNING")
            self.client.set_tag(s.run_id, "spikemax.session_state", "open")

    def lost(self, known: set[str]) -> list[tuple[str, str]]:
        """(session id, run id) of open sessions MLflow records for this state directory that the journal lacks."""
        here = str(self.state_dir.resolve())  # compared here, not in the filter: a path may hold quotes
        out = []
        for run in self.client.search_runs([self.eid], f"tags.`{CLOSED_LOOP_TAG}` = 'true'", max_results=50000):
            tags = run.data.tags
            sid = tags.get(SESSION_TAG, "")
            if tags.get(STATE_TAG) == here and sid not in known and tags.get("spikemax.session_state") in OPEN_STATES:
                out.append((sid, run.info.run_id))
        return out

    def forget(self, lost: list[tuple[str, str]], why: str) -> None:
        """Mark runs of sessions no journal holds FAILED (their queries stay logged)."""
        for _, run_id in lost:
            self.client.set_tag(run_id, "spikemax.session_state", f"lost: {why}")
            self.client.set_terminated(run_id, "FAILED")

    # -- events ----------------------------------------------------------------------------------
    def committed(self, s: Session, ev: Event) -> None:
        """A committed, applied event: a tell's queries logged, artifacts refreshed, a finished run closed."""
        if not isinstance(ev, Told) or s.id not in self.loggers:
            return
        self._sync(s)
        gain = s.driver.gain() if s.cfg.references > 0 else None
        if gain is not None and s.run_id is not None:  # the drift correction's estimate, by queries told
            self.client.log_metric(s.run_id, "reference_gain", gain, step=len(s.q_y))
        if s.state.finished:
            self._artifacts(s, improved=True, full=True)
            self._finish(s)
        elif s.state.improved or s.state.n_tells % ARTIFACT_EVERY == 0:
            self._refresh(s, full=s.state.n_tells % ARTIFACT_EVERY == 0)

    def _sync(self, s: Session) -> None:
        """Log every journaled query the run has not got yet (the journal is the truth; retried on failure)."""
        from spikemax.querylog import log_batches

        lg = self.loggers[s.id]
        start = lg.n_queries
        if start >= len(s.q_y):
            return
        try:
            I = np.stack(s.q_idx[start:])
            y = s.state.responses()[start:, s.target]
            log_batches([lg], [I], [y])
            s.mlflow_error = ""
        except Exception as err:  # the journal has the queries: the next tell or a restart retries
            s.mlflow_error = f"{type(err).__name__}: {err}"
            log.warning("MLflow logging of session %s failed (will retry): %s", s.id, s.mlflow_error)

    def _finish(self, s: Session) -> None:
        """Every stimulus of the budget answered: the run is FINISHED with the session's best."""
        assert s.run_id is not None
        best = s.best_of(s.target)
        if best is not None:
            self.client.log_metric(s.run_id, "best_response", best.response)
            if best.estimate is not None:
                self.client.log_metric(s.run_id, "best_estimate", best.estimate)
                self.client.log_metric(s.run_id, "best_presentations", best.presentations)
        self.client.set_tag(s.run_id, "spikemax.session_state", "finished")
        self.client.set_terminated(s.run_id, "FINISHED")

    # -- artifacts -------------------------------------------------------------------------------
    def _refresh(self, s: Session, full: bool) -> None:
        """Queue an artifact refresh for the background worker (requests for one session coalesce)."""
        with self._cv:
            self._todo[s.id] = (s, self._todo.get(s.id, (s, False))[1] or full)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="rig-artifacts", daemon=True)
                self._worker.start()
            self._cv.notify()

    def _work(self) -> None:
        """The artifact worker: refresh what tells queued until `close`."""
        while True:
            with self._cv:
                while not self._todo and not self._closing:
                    self._cv.wait()
                if not self._todo:
                    return
                _, (s, full) = self._todo.popitem()
            with s.lock:
                self._artifacts(s, improved=True, full=full)

    def _artifacts(self, s: Session, improved: bool, full: bool) -> None:
        """Keep best_stimulus.png current (when the best changes) and the convergence plot and table (every few tells)."""
        from spikemax import images

        lg = self.loggers.get(s.id)
        if lg is None:
            return
        run_dir = self.state_dir / "sessions" / s.id
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            best = s.best_of(s.target)
            if improved and best is not None:
                pixels = s.grid.decode_pixels(np.asarray([best.indices]))[0]
                lg.log_artifact(images.save_png(pixels, run_dir / "best_stimulus.png"))
            if full:
                y = s.state.responses()[:, s.target]
                title = f"rig {s.id} {s.cfg.generator} {s.cfg.method} ch{s.target}"
                lg.log_artifact(images.save_convergence_png(y, run_dir / "convergence.png", title=title))
                lg.log_artifact(s.write_queries(run_dir))
        except Exception as err:  # artifacts are a view of the journal: the next refresh catches up
            log.warning("artifacts of session %s not updated: %s: %s", s.id, type(err).__name__, err)

    def close(self, sessions: list[Session]) -> None:
        """Stop: open sessions' runs are caught up and marked KILLED (tag session_state=paused) until resumed."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._worker is not None:
            self._worker.join(60)
        for s in sessions:
            if s.phase == "open" and s.id in self.loggers and s.run_id is not None:
                try:
                    self._sync(s)
                    self._artifacts(s, improved=False, full=True)
                    self.client.set_tag(s.run_id, "spikemax.session_state", "paused")
                    self.client.set_terminated(s.run_id, "KILLED")
                except Exception as err:
                    log.warning("run of session %s not closed: %s", s.id, err)
