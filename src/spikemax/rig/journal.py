"""The rig's durable event journal: typed events appended to one SQLite database, read back in order.

Every event is one transaction (WAL, synchronous=FULL: an fsync per commit) that has returned
before the service replies. A session's record is its config (the `sessions` table) and its events
in order: `Asked` (stimuli handed out: the optimizer's `k` plus re-asked failed ones) and `Told`
(queries: one per presentation). The tables are the same as before events were typed, so a
journal written by an earlier version reads unchanged.

The journal checks what a lab's machine can do to it: a damaged file is a `JournalDamaged` error
saying what is still readable, and a file deleted or replaced under a running service is an
`Unavailable` error before any write (writes would go to an unlinked file and be lost).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spikemax.rig.errors import JournalDamaged, Unavailable

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
TABLES = ("sessions", "events", "stimuli", "queries")


@dataclass(frozen=True)
class AskedStimulus:
    """One stimulus handed out: its id, its number in the session's asking order, its grid indices."""

    id: str
    n: int
    indices: np.ndarray
    retry_of: str | None = None  # the failed stimulus this one shows again (retry_failed)
    reference: int | None = None  # its id in the session's reference set (noise.references)


@dataclass(frozen=True)
class Query:
    """One presentation told: the stimulus (None off-policy), its indices and m responses (NaN = failed)."""

    stimulus: str | None
    indices: np.ndarray
    responses: np.ndarray
    counts: list[int | None] | None = None
    window: float | None = None
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class Asked:
    """Stimuli handed out in one ask: `k` new optimizer points, then any failed stimuli shown again."""

    k: int
    stimuli: tuple[AskedStimulus, ...]


@dataclass(frozen=True)
class Told:
    """The queries of one tell, applied together."""

    queries: tuple[Query, ...]


Event = Asked | Told


@dataclass
class SessionRecord:
    """A session's row: id, config (JSON object), MLflow run id and last recorded state."""

    id: str
    created: float
    config: dict[str, Any]
    run_id: str | None
    state: str
    events: list[Event] = field(default_factory=list)


def _json_responses(y: np.ndarray) -> str:
    return json.dumps([None if math.isnan(v) else v for v in np.asarray(y, dtype=np.float64).tolist()])


def describe_damage(path: Path, err: BaseException) -> str:
    """What is damaged in `path` and what a read-only look can still read of it (one paragraph)."""
    if path.exists() and not path.is_file():
        return f"{path} is not a file ({err}): move it aside to start an empty journal"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as os_err:
        return f"{path} cannot be read ({os_err.strerror or os_err}): nothing in it can be checked or recovered"
    what = f"{path} ({size} bytes) is damaged: {err}"
    if not head.startswith(b"SQLite format 3"):
        return (
            f"{what}; it is not an SQLite database (its header is gone), so nothing in it can be read. "
            f"Move it aside to start an empty journal; the sessions' MLflow runs keep what they logged."
        )
    readable, lost = [], []
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            for table in TABLES:
                try:
                    (n,) = con.execute(f"SELECT count(*) FROM {table}").fetchone()
                    con.execute(f"SELECT * FROM {table}").fetchall()
                    readable.append(f"{table} ({n} rows)")
                except sqlite3.DatabaseError:
                    lost.append(table)
        finally:
            con.close()
    except sqlite3.DatabaseError:
        lost = list(TABLES)
    can = f"readable: {', '.join(readable)}" if readable else "no table can be read"
    cannot = f"; unreadable: {', '.join(lost)}" if lost else ""
    return (
        f"{what}; {can}{cannot}. Salvage what is readable with `sqlite3 {path} .recover | sqlite3 recovered.db` "
        f"and serve with that file as rig.db, or move it aside to start an empty journal."
    )


class Journal:
    """The append-only event journal of every session of one state directory (`rig.db`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.is_file() and self.path.stat().st_size > 0
        self.con: sqlite3.Connection | None = None
        try:
            self.con = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self.con.execute("PRAGMA journal_mode=WAL")
            self.con.execute("PRAGMA synchronous=FULL")  # the commit is on disk before the reply
            if existed:
                (verdict,) = self.con.execute("PRAGMA quick_check").fetchone()
                if verdict != "ok":
                    raise sqlite3.DatabaseError(verdict)
            self.con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            if self.con is not None:
                self.con.close()
            raise JournalDamaged(describe_damage(self.path, err)) from None
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        self.lock = threading.Lock()
        self.lost = ""  # why writes are refused (the file was deleted or replaced); "" while healthy

    def check(self) -> None:
        """Raise Unavailable when rig.db is no longer the file this journal writes (deleted or replaced)."""
        if not self.lost:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) != self._identity:
                    self.lost = f"{self.path} was replaced by another file while the service was running"
            except FileNotFoundError:
                self.lost = f"{self.path} (or its state directory) was deleted while the service was running"
        if self.lost:
            raise Unavailable(
                f"{self.lost}; requests are refused so that nothing is written to a file no one can read. "
                f"Restore the state directory and restart `spikemax serve`: sessions resume from the journal."
            )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed (and fsynced) when the block ends, rolled back if it raises."""
        with self.lock:
            assert self.con is not None
            self.check()
            self.con.execute("BEGIN IMMEDIATE")
            try:
                yield self.con
            except BaseException:
                self.con.execute("ROLLBACK")
                raise
            self.con.execute("COMMIT")
        self.check()  # deleted during the commit: the caller must not count on it

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self.lock:
            assert self.con is not None
            return self.con.execute(sql, tuple(args)).fetchall()

    # -- writing -------------------------------------------------------------------------------
    def create(self, sid: str, created: float, config: dict[str, Any], run_id: str | None) -> None:
        """Record a new session (its config is fixed from here on)."""
        with self._tx() as con:
            con.execute(
                "INSERT INTO sessions (id, created, config, run_id, state) VALUES (?, ?, ?, ?, 'open')",
                (sid, created, json.dumps(config), run_id),
            )

    def append(self, sid: str, seq: int, event: Event) -> None:
        """Commit event number `seq` of session `sid` (all its rows, or nothing)."""
        with self._tx() as con:
            if isinstance(event, Asked):
                con.executemany(
                    "INSERT INTO stimuli (id, session, n, ask_event, indices) VALUES (?, ?, ?, ?, ?)",
                    [(x.id, sid, x.n, seq, json.dumps(np.asarray(x.indices).tolist())) for x in event.stimuli],
                )
                body: dict[str, Any] = {"k": event.k}
                retries = {x.id: x.retry_of for x in event.stimuli if x.retry_of is not None}
                if retries:
                    body["retries"] = retries
                refs = {x.id: x.reference for x in event.stimuli if x.reference is not None}
                if refs:
                    body["references"] = refs
                con.execute(
                    "INSERT INTO events (session, seq, kind, body) VALUES (?, ?, 'ask', ?)",
                    (sid, seq, json.dumps(body)),
                )
                return
            (q0,) = con.execute("SELECT count(*) FROM queries WHERE session=?", (sid,)).fetchone()
            con.executemany(
                "INSERT INTO queries (session, q, event, stimulus, indices, responses, counts, window, elapsed_s)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        sid,
                        q0 + j,
                        seq,
                        q.stimulus,
                        json.dumps(np.asarray(q.indices).tolist()),
                        _json_responses(q.responses),
                        None if q.counts is None else json.dumps(q.counts),
                        q.window,
                        q.elapsed_s,
                    )
                    for j, q in enumerate(event.queries)
                ],
            )
            con.executemany(
                "UPDATE stimuli SET tell_event=? WHERE id=?",
                [(seq, x) for x in dict.fromkeys(q.stimulus for q in event.queries if q.stimulus is not None)],
            )
            con.execute(
                "INSERT INTO events (session, seq, kind, body) VALUES (?, ?, 'tell', ?)",
                (sid, seq, json.dumps({"queries": len(event.queries)})),
            )

    def set_state(self, sid: str, state: str) -> None:
        """Record a session's state (open | finished) for readers of the table."""
        with self._tx() as con:
            con.execute("UPDATE sessions SET state=? WHERE id=?", (state, sid))

    # -- reading -------------------------------------------------------------------------------
    def sessions(self) -> list[SessionRecord]:
        """Every session with its events in order, oldest session first."""
        return [
            SessionRecord(sid, created, json.loads(config), run_id, state, self.read(sid))
            for sid, created, config, run_id, state in self._rows(
                "SELECT id, created, config, run_id, state FROM sessions ORDER BY created"
            )
        ]

    def read(self, sid: str) -> list[Event]:
        """The events of session `sid` in order."""
        stimuli: dict[int, list[tuple]] = {}
        for row in self._rows("SELECT id, n, ask_event, indices FROM stimuli WHERE session=? ORDER BY n", [sid]):
            stimuli.setdefault(row[2], []).append(row)
        queries: dict[int, list[tuple]] = {}
        for row in self._rows(
            "SELECT event, stimulus, indices, responses, counts, window, elapsed_s FROM queries"
            " WHERE session=? ORDER BY q",
            [sid],
        ):
            queries.setdefault(row[0], []).append(row)
        events: list[Event] = []
        for seq, kind, body in self._rows("SELECT seq, kind, body FROM events WHERE session=? ORDER BY seq", [sid]):
            b = json.loads(body)
            if kind == "ask":
                retries, refs = b.get("retries", {}), b.get("references", {})
                events.append(
                    Asked(
                        int(b["k"]),
                        tuple(
                            AskedStimulus(
                                x, n, np.asarray(json.loads(idx), dtype=np.int64), retries.get(x), refs.get(x)
                            )
                            for x, n, _, idx in stimuli.get(seq, [])
                        ),
                    )
                )
            elif kind == "tell":
                events.append(
                    Told(
                        tuple(
                            Query(
                                stim,
                                np.asarray(json.loads(idx), dtype=np.int64),
                                np.asarray([np.nan if v is None else v for v in json.loads(ys)], dtype=np.float64),
                                None if counts is None else json.loads(counts),
                                window,
                                elapsed,
                            )
                            for _, stim, idx, ys, counts, window, elapsed in queries.get(seq, [])
                        )
                    )
                )
            else:
                raise JournalDamaged(f"{self.path}: session {sid} event #{seq} has an unknown kind {kind!r}")
        return events

    def close(self) -> None:
        """Close the connection (the WAL is checkpointed)."""
        with self.lock:
            if self.con is not None:
                self.con.close()
                self.con = None
