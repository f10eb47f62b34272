"""Where a run's per-query metric series go: the one module that reaches into MLflow's internals.

A `MetricSink` is chosen once per run by `open_sink` from the client's store:

* `BulkSqlSink` (a SQLAlchemy store: sqlite, PostgreSQL, MySQL): the rows go in as one bulk INSERT
  through MLflow's own table model and latest-metric bookkeeping, several runs' rows in one
  transaction (`log_batch` builds an ORM object per row and commits per run, which made logging
  every query cost a quarter of the AM loop);
* `LogBatchSink` (any other store, e.g. an `mlflow server`): plain synchronous `log_batch` calls,
  several runs' requests sent concurrently;
* `MirroredSink` (an HTTP store whose rows are durable elsewhere first, e.g. in the run's query
  table): `write` queues the rows for the process's background sender (`HttpMirror`) and returns;
  `flush()` waits for the server's acknowledgement;
* `NoSink`: metrics go nowhere (no tracking client).

All of them read back identically through `get_metric_history`.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient

Series = dict[str, np.ndarray]
MAX_METRICS_PER_CALL = 1000  # MLflow's limit on metrics in one log_batch request
POOL_THREADS = 8  # concurrent log_batch requests to an HTTP store


class MetricSink:
    """One run's metric series: `write(series, first_step, ts)` logs series[key][i] at step first_step + i."""

    mirrored = False  # True: `write` returns before the store has the rows (`flush` waits for them)

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id

    def write(self, series: Series, first_step: int, timestamp_ms: int) -> None:
        """Log series[key][i] at step first_step + i for every key (NaN allowed)."""
        write_many([(self, series, first_step)], timestamp_ms)

    def flush(self) -> None:
        """Return once the store has every row written so far (raises if some did not reach it)."""

    def abandon(self, reason: str) -> None:
        """Send none of the rows still queued (the run is being failed)."""

    def raise_failed(self) -> None:
        """Raise the error of an earlier write that did not reach the store."""

    @property
    def pending(self) -> int:
        """Writes queued and not yet acknowledged by the store."""
        return 0


class NoSink(MetricSink):
    """Metrics go nowhere (a run without a tracking client)."""


class BulkSqlSink(MetricSink):
    """Rows straight into a SQLAlchemy tracking store, several runs' in one transaction."""

    def __init__(self, store: Any, run_id: str) -> None:
        super().__init__(run_id)
        self.store = store


class LogBatchSink(MetricSink):
    """Rows through the public `log_batch` API, synchronously."""

    run_id: str

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        super().__init__(run_id)
        self.client = client

    def send(self, writes: Sequence[tuple[Series, int, int]]) -> None:
        """Several (series, first_step, timestamp_ms) of this run in as few log_batch requests as allowed."""
        from mlflow.entities import Metric

        metrics = [
            Metric(key, float(v), int(ts), int(first_step) + i)
            for series, first_step, ts in writes
            for key, values in series.items()
            for i, v in enumerate(np.asarray(values).reshape(-1))
        ]
        for i in range(0, len(metrics), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + MAX_METRICS_PER_CALL], synchronous=True)


class MirroredSink(LogBatchSink):
    """`log_batch` from the background sender: `write` returns at once, `flush` waits for the answers.

    Only for rows durable elsewhere first (the run's query table). `write` and `flush` raise the
    error of an earlier write of this run that failed after the sender's retries.
    """

    mirrored = True

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        super().__init__(client, run_id)
        self._pending = 0  # writes not yet acknowledged by the store (guarded by the mirror's cv)
        self.error: BaseException | None = None  # a write that failed after its retries

    @property
    def pending(self) -> int:
        return self._pending

    def flush(self) -> None:
        http_mirror().wait(self)
        self.raise_failed()

    def abandon(self, reason: str) -> None:
        if self.error is None:
            self.error = RuntimeError(f"abandoned: {reason}")

    def raise_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError(
                f"metrics of run {self.run_id} did not reach the tracking store: {self.error}"
            ) from self.error


def sql_store(client: MlflowClient) -> Any:
    """The client's SQLAlchemy store when it has the internals a bulk insert needs, else None."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = client._tracking_client.store
        if (
            isinstance(store, SqlAlchemyStore)
            and hasattr(store, "_update_latest_metrics_if_necessary")
            and "read_only" in inspect.signature(store.ManagedSessionMaker).parameters
        ):
            return store
    except (ImportError, AttributeError):  # a future MLflow without these internals: the public API
        pass
    return None


def open_sink(client: MlflowClient | None, run_id: str | None, *, mirror: bool = False) -> MetricSink:
    """The sink of one run, chosen once: bulk SQL on a SQLAlchemy store, else `log_batch`, mirrored
    in the background when `mirror` (the caller keeps the rows durable first), none without a client."""
    if client is None or run_id is None:
        return NoSink(run_id)
    store = sql_store(client)
    if store is not None:
        return BulkSqlSink(store, run_id)
    return MirroredSink(client, run_id) if mirror else LogBatchSink(client, run_id)


def write_many(writes: Sequence[tuple[MetricSink, Series, int]], timestamp_ms: int) -> None:
    """`write` for several (sink, series, first_step): one transaction per SQL store, concurrent
    requests to HTTP stores, mirrored rows queued; returns when every non-mirrored row is stored."""
    by_store: dict[int, list[tuple[BulkSqlSink, Series, int]]] = {}
    remote: list[tuple[LogBatchSink, Series, int]] = []
    for sink, series, first in writes:
        if isinstance(sink, MirroredSink):
            sink.raise_failed()
            http_mirror().put(sink, series, int(first), int(timestamp_ms))
        elif isinstance(sink, LogBatchSink):
            remote.append((sink, series, first))
        elif isinstance(sink, BulkSqlSink):
            by_store.setdefault(id(sink.store), []).append((sink, series, first))
    if len(remote) == 1:
        sink, series, first = remote[0]
        sink.send([(series, first, timestamp_ms)])
    elif remote:
        # An HTTP store takes one run per request: send the runs' requests concurrently and
        # return only when every one is acknowledged (a told query is never lost).
        futures = [http_mirror().pool.submit(s.send, [(series, first, timestamp_ms)]) for s, series, first in remote]
        for f in futures:
            f.result()
    for group in by_store.values():
        _bulk_insert(group[0][0].store, [(s.run_id, series, first) for s, series, first in group], timestamp_ms)


def _bulk_insert(store: Any, writes: list[tuple[str | None, Series, int]], timestamp_ms: int) -> None:
    """Insert (run_id, series, first_step) metric rows into a SqlAlchemyStore in one transaction."""
    from mlflow.store.tracking.dbmodels.models import SqlMetric
    from sqlalchemy import insert

    big = np.finfo(np.float64).max
    rows, last = [], []
    for run_id, series, first_step in writes:
        for key, values in series.items():
            v = np.asarray(values, dtype=np.float64).reshape(-1)
            if not len(v):
                continue
            # As MLflow stores them: NaN as 0 with is_nan set, +-inf clipped to the largest float.
            is_nan = np.isnan(v)
            stored = np.where(is_nan, 0.0, np.clip(v, -big, big)).tolist()
            steps = range(int(first_step), int(first_step) + len(v))
            rows += [
                {"run_uuid": run_id, "key": key, "value": x, "timestamp": int(timestamp_ms), "step": s, "is_nan": n}
                for x, s, n in zip(stored, steps, is_nan.tolist())
            ]
            last.append(SqlMetric(**rows[-1]))
    if not rows:
        return
    # read_only=False: a routing store sends writes to the primary database.
    with store.ManagedSessionMaker(read_only=False) as session:
        session.execute(insert(SqlMetric.__table__), rows)
        for uuid in dict.fromkeys(m.run_uuid for m in last):  # MLflow's bookkeeping is per run
            store._update_latest_metrics_if_necessary([m for m in last if m.run_uuid == uuid], session)


class HttpMirror:
    """The process's background sender of mirrored writes, and its pool of HTTP request threads.

    One thread gathers what the AM loops queued for `linger_s` (or until a flush is asked), then
    sends each run's writes merged into requests of up to 1,000 metrics, runs concurrently over the
    pool but never two requests of one run at once; the next round starts when this one is
    answered, so a slow store gets fewer, larger requests. A failed request is retried with backoff
    (MLflow's primary key makes a retried insert of the same rows a no-op); after the last retry its
    error is kept on the sink and raised by its next `write` or `flush`.
    """

    linger_s = 0.5
    retries = (0.5, 2.0, 5.0)  # backoff before each retry, seconds

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool: ThreadPoolExecutor = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="spikemax-log")
        self.cv = threading.Condition()
        self._items: list[tuple[MirroredSink, Series, int, int]] = []
        self._flushing = 0
        self._thread: threading.Thread | None = None

    def put(self, sink: MirroredSink, series: Series, first_step: int, timestamp_ms: int) -> None:
        """Queue one write (the series are copied: the caller may reuse its arrays)."""
        copied = {k: np.array(v, dtype=np.float64).reshape(-1) for k, v in series.items()}
        with self.cv:
            self._items.append((sink, copied, first_step, timestamp_ms))
            sink._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="spikemax-mirror", daemon=True)
                self._thread.start()
            self.cv.notify_all()

    def wait(self, sink: MirroredSink) -> None:
        """Block until every queued write of `sink` is answered (sent now, without lingering)."""
        with self.cv:
            self._flushing += 1
            self.cv.notify_all()
            try:
                while sink._pending:
                    self.cv.wait()
            finally:
                self._flushing -= 1

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self._items:
                    self.cv.wait()
                deadline = time.monotonic() + self.linger_s
                while not self._flushing and (left := deadline - time.monotonic()) > 0:
                    self.cv.wait(left)
                items, self._items = self._items, []
            by_sink: dict[int, tuple[MirroredSink, list[tuple[Series, int, int]]]] = {}
            for sink, series, first, ts in items:
                by_sink.setdefault(id(sink), (sink, []))[1].append((series, first, ts))
            futures = [self.pool.submit(self._deliver, sink, writes) for sink, writes in by_sink.values()]
            for f in futures:
                f.result()  # _deliver never raises
            with self.cv:
                for sink, writes in by_sink.values():
                    sink._pending -= len(writes)
                self.cv.notify_all()

    def _deliver(self, sink: MirroredSink, writes: list[tuple[Series, int, int]]) -> None:
        """Send one run's writes, retrying; a final failure is kept on the sink."""
        if sink.error is not None:
            return  # the run is failed already: its later rows would be a gap-ridden history
        for delay in (*self.retries, None):
            try:
                sink.send(writes)
                return
            except Exception as err:
                if delay is None:
                    sink.error = err
                    return
                time.sleep(delay)


@functools.cache
def http_mirror() -> HttpMirror:
    """The process's one background sender (created on first use: a process that never talks to an
    HTTP store starts no thread)."""
    return HttpMirror()
