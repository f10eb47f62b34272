"""Closed-loop sessions of the rig service: a durable event log, optimizer replay and MLflow logging.

Every ask (its stimulus ids and grid indices) and every accepted tell (its queries) is committed to
one SQLite database (WAL, synchronous=FULL: an fsync per commit) before the reply. Nothing else is
saved: on start each session's optimizer is rebuilt by replaying its seeded ask/tell sequence
(optimizers are deterministic given their seed and that sequence; pycma draws from numpy's global
generator, so every session keeps its own copy of that state). MLflow is written after the
database and reconciled from it (by the run's logged query count), so a crash between the two
neither loses nor doubles a query there either.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spikemax import SpikemaxError
from spikemax.rig.models import Best, Presentation, SessionCreate, SessionStatus, TellRequest

ARTIFACT_EVERY = 10  # tells between refreshes of convergence.png and queries.parquet
CLOSED_LOOP_TAG = "spikemax.closed_loop"
SESSION_TAG = "spikemax.rig_session"

# pycma samples from numpy's global generator: optimizer calls of all sessions take turns under
# this lock, each with its own copy of that generator's state (isolation, and exact replay).
_OPT_LOCK = threading.RLock()


class RigError(SpikemaxError):
    """A request the session cannot apply; `status` is its HTTP status code."""

    status = 400


class NotFound(RigError):
    """An unknown session or stimulus id."""

    status = 404


class Conflict(RigError):
    """A stimulus already answered, a spent budget, a finished or broken session."""

    status = 409


class Invalid(RigError):
    """A well-formed request that does not fit the session (channel count, grid range, ...)."""

    status = 422


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, created REAL NOT NULL, config TEXT NOT NULL, run_id TEXT, state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    session TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (session, seq)
);
CREATE TABLE IF NOT EXISTS stimuli (
    id TEXT PRIMARY KEY, session TEXT NOT NULL, n INTEGER NOT NULL, ask_event INTEGER NOT NULL,
    indices TEXT NOT NULL, tell_event INTEGER
);
CREATE TABLE IF NOT EXISTS queries (
    session TEXT NOT NULL, q INTEGER NOT NULL, event INTEGER NOT NULL, stimulus TEXT, indices TEXT NOT NULL,
    responses TEXT NOT NULL, counts TEXT, window REAL, elapsed_s REAL NOT NULL, PRIMARY KEY (session, q)
);
"""


class Store:
    """The durable session log: one SQLite database, every commit fsynced before it returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=FULL")  # the commit is on disk before the reply
        self.con.executescript(_SCHEMA)
        self.lock = threading.Lock()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed (and fsynced) when the block ends, rolled back if it raises."""
        with self.lock:
            self.con.execute("BEGIN IMMEDIATE")
            try:
                yield self.con
            except BaseException:
                self.con.execute("ROLLBACK")
                raise
            self.con.execute("COMMIT")

    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """Rows of a read query."""
        with self.lock:
            return self.con.execute(sql, tuple(args)).fetchall()

    def close(self) -> None:
        """Close the connection (the WAL is checkpointed)."""
        with self.lock:
            self.con.close()


@dataclass
class SessionConfig:
    """What a session was created with, defaults resolved; stored once, replayed from on restart."""

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
    checkpoint_sha256: str = ""


class SingleChannel:
    """The optimizer driver of a session that maximizes one channel and records the others."""

    def __init__(self, optimizer: Any, channel: int) -> None:
        self.optimizer, self.channel = optimizer, channel

    def ask(self, k: int) -> np.ndarray:
        return np.asarray(self.optimizer.ask(k), dtype=np.int64)

    def tell(self, I: np.ndarray, Y: np.ndarray) -> None:
        self.optimizer.tell(I, Y[:, self.channel])


def make_driver(cfg: SessionConfig, grid: Any) -> Any:
    """The session's optimizer(s) behind ask(k) / tell(I, Y (k, m)), built as the maximize stage builds them."""
    from spikemax.optim import make_optimizer
    from spikemax.optim.population import Population

    def one(seed: int) -> Any:
        try:
            return make_optimizer(cfg.method, grid.d, grid.n, seed=seed, batch=cfg.batch, **cfg.options)
        except ValueError as err:
            raise Invalid(f"method: {err}") from None

    if cfg.target_channel == "all":
        # Population mode: one optimizer per channel, batches composed from their proposals,
        # every optimizer told its own channel's column of every presentation.
        return Population([one(cfg.seed + j) for j in range(cfg.channels)])
    return SingleChannel(one(cfg.seed), int(cfg.target_channel))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class _Stim:
    n: int
    indices: np.ndarray
    event: int  # the ask that made it (a block of the file protocol)
    answered: bool = False


@dataclass
class Session:
    """One closed loop in memory: its grid, optimizer driver, stimuli and queries (mirrors the store)."""

    cfg: SessionConfig
    grid: Any
    driver: Any
    run_id: str | None
    state: str = "open"  # open | finished | broken
    problem: str = ""
    rng_state: Any = None
    seq: int = 0  # events so far
    n_asked: int = 0
    n_tells: int = 0
    stimuli: dict[str, _Stim] = field(default_factory=dict)
    q_sid: list[str | None] = field(default_factory=list)
    q_idx: list[np.ndarray] = field(default_factory=list)
    q_y: list[np.ndarray] = field(default_factory=list)
    q_batch: list[int] = field(default_factory=list)
    best_y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    best_q: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    logger: Any = None
    mlflow_error: str = ""
    run_dir: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def id(self) -> str:
        return self.cfg.id

    @property
    def target(self) -> int:
        """The channel whose best is the session's best (channel 0 in population mode)."""
        return 0 if self.cfg.target_channel == "all" else int(self.cfg.target_channel)

    @property
    def n_answered(self) -> int:
        return sum(1 for s in self.stimuli.values() if s.answered)

    @property
    def pending(self) -> list[str]:
        """Ids of asked stimuli not answered yet, in asking order."""
        return [sid for sid, s in self.stimuli.items() if not s.answered]

    @contextmanager
    def own_rng(self) -> Iterator[None]:
        """Run optimizer code with this session's copy of numpy's global generator."""
        with _OPT_LOCK:
            saved = np.random.get_state()
            np.random.set_state(self.rng_state)
            try:
                yield
            finally:
                self.rng_state = np.random.get_state()
                np.random.set_state(saved)

    def _record(self, sid: str | None, idx: np.ndarray, y: np.ndarray, batch: int) -> bool:
        """Append one query in memory and update every channel's best; whether the target's best changed."""
        q = len(self.q_y)
        self.q_sid.append(sid)
        self.q_idx.append(idx)
        self.q_y.append(y)
        self.q_batch.append(batch)
        better = np.isfinite(y) & (y > self.best_y)  # strict: the first of equal responses stays best
        self.best_y = np.where(better, y, self.best_y)
        self.best_q = np.where(better, q, self.best_q)
        return bool(better[self.target])

    def best_of(self, channel: int) -> Best | None:
        """The best presentation so far on `channel` (None before any finite response)."""
        if not np.isfinite(self.best_y[channel]):
            return None
        q = int(self.best_q[channel])
        return Best(
            indices=self.q_idx[q].tolist(),
            response=float(self.best_y[channel]),
            channel=channel,
            stimulus_id=self.q_sid[q],
            query=q,
        )

    def status(self) -> SessionStatus:
        """The session's status (the body of GET /sessions/{id} and of a tell's reply)."""
        c = self.cfg
        y = np.asarray(self.q_y, dtype=np.float64).reshape(len(self.q_y), c.channels)
        failed = int(np.isnan(y[:, self.target]).sum()) if len(y) else 0
        n_answered = self.n_answered
        return SessionStatus(
            id=c.id,
            name=c.name,
            generator=c.generator,
            method=c.method,
            budget=c.budget,
            seed=c.seed,
            batch=c.batch,
            channels=c.channels,
            target_channel=c.target_channel,
            options=c.options,
            d=int(self.grid.d),
            n=int(self.grid.n),
            asked=self.n_asked,
            answered=n_answered,
            pending=self.n_asked - n_answered,
            pending_ids=self.pending,
            queries=len(self.q_y),
            failed=failed,
            state=self.state if not self.problem else f"{self.state}: {self.problem}",
            best=self.best_of(self.target),
            best_per_channel=[self.best_of(j) for j in range(c.channels)],
            run_id=self.run_id,
            created=c.created,
        )

    def queries_frame(self) -> Any:
        """The session's query table (one row per presentation, every channel)."""
        import pandas as pd

        y = np.asarray(self.q_y, dtype=np.float64).reshape(len(self.q_y), self.cfg.channels)
        return pd.DataFrame(
            {
                "query": np.arange(len(y), dtype=np.int64),
                "batch": np.asarray(self.q_batch, dtype=np.int64),
                "stimulus": self.q_sid,
                "indices": [i.tolist() for i in self.q_idx],
                "response": y[:, self.target] if len(y) else np.zeros(0),
                "responses": [row.tolist() for row in y],
            }
        )


class SessionManager:
    """Every session of one state directory: create, ask, tell, restore; MLflow kept in step."""

    def __init__(self, params: Any, paths: Any, state_dir: str | Path, mlflow: bool = True) -> None:
        self.params, self.paths = params, paths
        self.state_dir = Path(state_dir)
        self.store = Store(self.state_dir / "rig.db")
        self.sessions: dict[str, Session] = {}
        self.grids: dict[str, Any] = {}
        self.lock = threading.RLock()  # guards the sessions dict
        self._cv = threading.Condition()
        self._todo: dict[str, bool] = {}  # session id -> full refresh wanted (artifact worker queue)
        self._worker: threading.Thread | None = None
        self._closing = False
        self.client: Any = None
        self.eid: str | None = None
        if mlflow:
            import mlflow as mlf

            from spikemax import tracking

            tracking.enable_fast_sqlite()
            self.client = mlf.MlflowClient(tracking.configure(paths.root))
            self.eid = tracking.experiment_id(tracking.AM_EXPERIMENT, paths.root)
        for (sid,) in self.store.rows("SELECT id FROM sessions ORDER BY created"):
            self.sessions[sid] = self._restore(sid)

    # -- building blocks -------------------------------------------------------------------------
    def grid(self, name: str) -> Any:
        """The generator's LatentGrid (loaded once per process)."""
        from spikemax.generators import checkpoint_path, load_generator

        if name not in self.grids:
            self.grids[name] = load_generator(name, checkpoint_path(name, self.paths))
        return self.grids[name]

    def _new_session(self, cfg: SessionConfig, run_id: str | None, state: str) -> Session:
        grid = self.grid(cfg.generator)
        s = Session(cfg=cfg, grid=grid, driver=None, run_id=run_id, state=state)
        s.rng_state = np.random.RandomState(cfg.seed).get_state()
        with s.own_rng():
            s.driver = make_driver(cfg, grid)
        s.best_y = np.full(cfg.channels, -np.inf)
        s.best_q = np.zeros(cfg.channels, dtype=np.int64)
        s.run_dir = self.state_dir / "sessions" / cfg.id
        s.run_dir.mkdir(parents=True, exist_ok=True)
        s.logger = self._logger(run_id)
        return s

    def _logger(self, run_id: str | None) -> Any:
        """The QueryLogger of a session's MLflow run (metrics only: the store holds the query table)."""
        if self.client is None or run_id is None:
            return None
        from spikemax.querylog import QueryLogger

        return QueryLogger(self.client, run_id, None, artifact_uri=self.client.get_run(run_id).info.artifact_uri)

    def create(self, req: SessionCreate) -> Session:
        """A new session: fields left out take the maximize stage's defaults; its MLflow run opened."""
        from spikemax.generators import checkpoint_path
        from spikemax.optim import options_for

        mp = self.params.maximize
        generator = req.generator or mp.generators[0]
        method = req.method or mp.methods[0]
        budget = req.budget if req.budget is not None else mp.budget
        try:
            grid = self.grid(generator)
        except SpikemaxError as err:
            raise Invalid(f"generator: {err}") from None
        cfg = SessionConfig(
            id=uuid.uuid4().hex[:12],
            generator=generator,
            method=method,
            budget=budget,
            seed=req.seed if req.seed is not None else mp.seeds[0],
            batch=req.batch if req.batch is not None else mp.batch,
            channels=req.channels,
            target_channel=req.target_channel,
            # Exactly the stage's options for this grid (NGOpt picks its algorithm from this budget).
            options=options_for(method, mp.model_copy(update={"budget": budget}), grid),
            name=req.name,
            created=time.time(),
            checkpoint_sha256=_sha256(checkpoint_path(generator, self.paths)),
        )
        s = self._new_session(cfg, None, "open")  # a bad method/option combination fails before any write
        s.run_id = self._open_run(cfg, grid)
        s.logger = self._logger(s.run_id)
        with self.store.tx() as con:
            con.execute(
                "INSERT INTO sessions (id, created, config, run_id, state) VALUES (?, ?, ?, ?, 'open')",
                (cfg.id, cfg.created, json.dumps(asdict(cfg)), s.run_id),
            )
        with self.lock:
            self.sessions[cfg.id] = s
        return s

    def _open_run(self, cfg: SessionConfig, grid: Any) -> str | None:
        """The session's MLflow run in the AM experiment, tagged as a closed-loop session."""
        if self.client is None:
            return None
        from mlflow.entities import Param

        run = self.client.create_run(
            self.eid,
            run_name=f"rig-{cfg.id}-{cfg.generator}-{cfg.method}",
            tags={
                CLOSED_LOOP_TAG: "true",
                SESSION_TAG: cfg.id,
                "spikemax.source": "rig",
                "spikemax.session_name": cfg.name,
            },
        )
        values = {
            "method": cfg.method,
            "generator": cfg.generator,
            "grid_n": grid.n,
            "grid_d": grid.d,
            "budget": cfg.budget,
            "batch": cfg.batch,
            "seed": cfg.seed,
            "channels": cfg.channels,
            "target_channel": cfg.target_channel,
            "options": json.dumps(cfg.options),
        }
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in values.items()])
        return run.info.run_id

    def _restore(self, sid: str) -> Session:
        """Rebuild a session from the store by replaying its asks and tells in order."""
        from spikemax.generators import checkpoint_path

        (config, run_id, state) = self.store.rows("SELECT config, run_id, state FROM sessions WHERE id=?", [sid])[0]
        cfg = SessionConfig(**json.loads(config))
        s = self._new_session(cfg, run_id, state)
        try:
            if _sha256(checkpoint_path(cfg.generator, self.paths)) != cfg.checkpoint_sha256:
                raise RigError(f"generator checkpoint {cfg.generator} changed since the session started")
            stim_rows = self.store.rows(
                "SELECT id, n, ask_event, indices, tell_event FROM stimuli WHERE session=? ORDER BY n", [sid]
            )
            by_event: dict[int, list[tuple]] = {}
            for row in stim_rows:
                by_event.setdefault(row[2], []).append(row)
            q_rows = self.store.rows(
                "SELECT event, stimulus, indices, responses FROM queries WHERE session=? ORDER BY q", [sid]
            )
            q_by_event: dict[int, list[tuple]] = {}
            for row in q_rows:
                q_by_event.setdefault(row[0], []).append(row)
            for seq, kind, body in self.store.rows(
                "SELECT seq, kind, body FROM events WHERE session=? ORDER BY seq", [sid]
            ):
                if kind == "ask":
                    k = json.loads(body)["k"]
                    with s.own_rng():
                        got = s.driver.ask(k)
                    rows = by_event.get(seq, [])
                    want = np.asarray([json.loads(r[3]) for r in rows], dtype=np.int64).reshape(-1, cfg_d(s))
                    if got.shape != want.shape or not np.array_equal(got, want):
                        raise RigError(f"replaying ask #{seq} gave other stimuli than were asked")
                    for r, idx in zip(rows, want):
                        s.stimuli[r[0]] = _Stim(r[1], idx, seq, answered=r[4] is not None)
                    s.n_asked += k
                else:
                    rows = q_by_event.get(seq, [])
                    I = np.asarray([json.loads(r[2]) for r in rows], dtype=np.int64).reshape(-1, cfg_d(s))
                    Y = np.asarray([json.loads(r[3]) for r in rows], dtype=np.float64).reshape(-1, cfg.channels)
                    with s.own_rng():
                        s.driver.tell(I, Y)
                    for r, i, y in zip(rows, I, Y):
                        s._record(r[1], i, y, s.n_tells)
                    s.n_tells += 1
                s.seq = seq + 1
        except RigError as err:
            s.state, s.problem = "broken", str(err)
            print(f"warning: rig session {sid} cannot be resumed: {err}", file=sys.stderr)
            return s
        if s.logger is not None:
            self._reconcile(s)
            if s.state == "open":
                self.client.update_run(s.run_id, status="RUNNING")
                self.client.set_tag(s.run_id, "spikemax.session_state", "open")
        return s

    def _reconcile(self, s: Session) -> None:
        """Bring the MLflow run level with the store: log the queries it is missing, never one twice."""
        logged = len(self.client.get_metric_history(s.run_id, "activation"))
        t = s.target
        y = np.asarray([v[t] for v in s.q_y[:logged]], dtype=np.float64)
        s.logger.n_queries = logged
        s.logger.n_batches = len(set(s.q_batch[:logged]))
        s.logger.best = float(np.nanmax(y)) if np.isfinite(y).any() else float("nan")
        self._sync_mlflow(s)

    def _sync_mlflow(self, s: Session) -> None:
        """Log every stored query MLflow has not got yet (the store is the truth; retried on failure)."""
        from spikemax.querylog import log_batches

        if s.logger is None:
            return
        start = s.logger.n_queries
        if start >= len(s.q_y):
            return
        try:
            I = np.stack(s.q_idx[start:])
            y = np.asarray([v[s.target] for v in s.q_y[start:]], dtype=np.float64)
            log_batches([s.logger], [I], [y])
            s.mlflow_error = ""
        except Exception as err:  # the store has the queries: the next tell or a restart retries
            s.mlflow_error = f"{type(err).__name__}: {err}"
            print(f"warning: MLflow logging of session {s.id} failed (will retry): {s.mlflow_error}", file=sys.stderr)

    # -- the API ----------------------------------------------------------------------------------
    def get(self, sid: str) -> Session:
        """The session `sid` (404 if unknown)."""
        with self.lock:
            s = self.sessions.get(sid)
        if s is None:
            raise NotFound(f"session {sid!r} not found")
        return s

    def all(self) -> list[Session]:
        """Every session, oldest first."""
        with self.lock:
            return list(self.sessions.values())

    def _usable(self, s: Session) -> None:
        if s.state == "broken":
            raise Conflict(f"session {s.id} is broken: {s.problem}")
        if s.state == "finished":
            raise Conflict(f"session {s.id} is finished: all {s.cfg.budget} stimuli were answered")

    def ask(self, sid: str, k: int | None) -> list[tuple[str, np.ndarray]]:
        """Up to k new stimuli (fewer when the budget is nearly spent), each on disk before it is returned."""
        s = self.get(sid)
        with s.lock:
            self._usable(s)
            left = s.cfg.budget - s.n_asked
            if left <= 0:
                raise Conflict(f"budget of {s.cfg.budget} stimuli is spent ({len(s.pending)} pending)")
            k = min(k if k is not None else s.cfg.batch, left)
            with s.own_rng():
                I = s.driver.ask(k)
            sids = [f"{s.id}-{s.n_asked + j}" for j in range(k)]
            seq = s.seq
            try:
                with self.store.tx() as con:
                    con.executemany(
                        "INSERT INTO stimuli (id, session, n, ask_event, indices) VALUES (?, ?, ?, ?, ?)",
                        [(x, s.id, s.n_asked + j, seq, json.dumps(I[j].tolist())) for j, x in enumerate(sids)],
                    )
                    con.execute(
                        "INSERT INTO events (session, seq, kind, body) VALUES (?, ?, 'ask', ?)",
                        (s.id, seq, json.dumps({"k": k})),
                    )
            except BaseException as err:
                # The optimizer moved on but the log did not: replay would diverge from here.
                s.state, s.problem = "broken", f"ask could not be stored ({type(err).__name__})"
                raise
            s.seq += 1
            for j, x in enumerate(sids):
                s.stimuli[x] = _Stim(s.n_asked + j, I[j].copy(), seq)
            s.n_asked += k
            return list(zip(sids, I))

    def tell(self, sid: str, req: TellRequest) -> SessionStatus:
        """Apply a tell all together or not at all: validated, on disk, told, logged, then replied."""
        s = self.get(sid)
        with s.lock:
            self._usable(s)
            rows = self._check(s, req)
            seq = s.seq
            now = time.time() - s.cfg.created
            q0 = len(s.q_y)
            with self.store.tx() as con:
                con.executemany(
                    "INSERT INTO queries (session, q, event, stimulus, indices, responses, counts, window, elapsed_s)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            s.id,
                            q0 + j,
                            seq,
                            x,
                            json.dumps(i.tolist()),
                            json.dumps([None if math.isnan(v) else v for v in y.tolist()]),
                            None if p.counts is None else json.dumps(p.counts),
                            p.window,
                            now,
                        )
                        for j, (x, i, y, p) in enumerate(rows)
                    ],
                )
                con.executemany(
                    "UPDATE stimuli SET tell_event=? WHERE id=?",
                    [(seq, x) for x in dict.fromkeys(r[0] for r in rows if r[0] is not None)],
                )
                con.execute(
                    "INSERT INTO events (session, seq, kind, body) VALUES (?, ?, 'tell', ?)",
                    (s.id, seq, json.dumps({"queries": len(rows)})),
                )
            s.seq += 1
            I = np.stack([r[1] for r in rows])
            Y = np.stack([r[2] for r in rows])
            with s.own_rng():
                s.driver.tell(I, Y)
            improved = False
            for x, i, y, _ in rows:
                if x is not None:
                    s.stimuli[x].answered = True
                improved |= s._record(x, i, y, s.n_tells)
            s.n_tells += 1
            self._sync_mlflow(s)
            finished = s.n_asked >= s.cfg.budget and not s.pending
            if finished:
                self._artifacts(s, improved=True, full=True)
            elif improved or s.n_tells % ARTIFACT_EVERY == 0:
                self._refresh(s, full=s.n_tells % ARTIFACT_EVERY == 0)  # off the reply path
            if finished and s.state == "open":
                self._finish(s)
            return s.status()

    def _check(self, s: Session, req: TellRequest) -> list[tuple[str | None, np.ndarray, np.ndarray, Presentation]]:
        """Every result resolved to query rows (id, indices, m responses); raises before any change."""
        m, d, n = s.cfg.channels, s.grid.d, s.grid.n
        seen: dict[str, int] = {}
        rows = []
        for i, res in enumerate(req.results):
            where = f"results[{i}]"
            if res.id is not None:
                stim = s.stimuli.get(res.id)
                if stim is None:
                    raise NotFound(f"{where}.id: unknown stimulus {res.id!r} in session {s.id}")
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
                rows.append((res.id, idx, y, p))
        return rows

    def _refresh(self, s: Session, full: bool) -> None:
        """Queue an artifact refresh for the background worker (requests for one session coalesce)."""
        with self._cv:
            self._todo[s.id] = self._todo.get(s.id, False) or full
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
                sid, full = self._todo.popitem()
            s = self.sessions.get(sid)
            if s is not None:
                with s.lock:
                    self._artifacts(s, improved=True, full=full)

    def _artifacts(self, s: Session, improved: bool, full: bool) -> None:
        """Keep best_stimulus.png current (when the best changes) and the convergence plot and table (every few tells)."""
        if s.logger is None or s.run_dir is None:
            return
        from spikemax import images

        try:
            best = s.best_of(s.target)
            if improved and best is not None:
                pixels = s.grid.decode_pixels(np.asarray([best.indices]))[0]
                s.logger.log_artifact(images.save_png(pixels, s.run_dir / "best_stimulus.png"))
            if full:
                y = np.asarray([v[s.target] for v in s.q_y], dtype=np.float64)
                title = f"rig {s.id} {s.cfg.generator} {s.cfg.method} ch{s.target}"
                s.logger.log_artifact(images.save_convergence_png(y, s.run_dir / "convergence.png", title=title))
                path = s.run_dir / "queries.parquet"
                s.queries_frame().to_parquet(path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)
                s.logger.log_artifact(path)
        except Exception as err:  # artifacts are a view of the store: the next refresh catches up
            print(f"warning: artifacts of session {s.id} not updated: {type(err).__name__}: {err}", file=sys.stderr)

    def _finish(self, s: Session) -> None:
        """Every stimulus of the budget answered: the session and its MLflow run are FINISHED."""
        with self.store.tx() as con:
            con.execute("UPDATE sessions SET state='finished' WHERE id=?", (s.id,))
        s.state = "finished"
        if self.client is not None and s.run_id is not None:
            best = s.best_of(s.target)
            if best is not None:
                self.client.log_metric(s.run_id, "best_response", best.response)
            self.client.set_tag(s.run_id, "spikemax.session_state", "finished")
            self.client.set_terminated(s.run_id, "FINISHED")

    def close(self) -> None:
        """Stop serving: open sessions' runs are marked KILLED (tag session_state=paused) until resumed."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._worker is not None:
            self._worker.join(60)
        if self.client is not None:
            for s in self.all():
                if s.state == "open" and s.run_id is not None:
                    try:
                        self._sync_mlflow(s)
                        self._artifacts(s, improved=False, full=True)
                        self.client.set_tag(s.run_id, "spikemax.session_state", "paused")
                        self.client.set_terminated(s.run_id, "KILLED")
                    except Exception as err:
                        print(f"warning: run of session {s.id} not closed: {err}", file=sys.stderr)
        self.store.close()


def cfg_d(s: Session) -> int:
    """The grid dimension of a session."""
    return int(s.grid.d)
