"""Per-query logging of AM runs: metrics into the MLflow store in bulk, and the query table."""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

QUERY_COLUMNS = ("query", "batch", "indices", "response", "elapsed_s")
_MAX_METRICS_PER_CALL = 1000  # MLflow's limit on metrics in one log_batch request
_STREAM = "queries.arrows"  # the live query table: one Arrow IPC record batch per AM batch


def _read_stream(path: Path, schema: Any = None) -> Any:
    """Every whole record batch of an Arrow IPC stream as a table; a kill can cut the last one short."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    batches = []
    try:
        with pa.OSFile(str(path)) as f:
            reader = ipc.open_stream(f)
            schema = reader.schema  # a population table's schema is in its stream
            for b in reader:
                batches.append(b)
    except (pa.ArrowInvalid, OSError):
        pass
    return pa.Table.from_batches(batches, schema=schema if schema is not None else _query_schema(pa))


def read_queries(run_dir: str | Path) -> pd.DataFrame:
    """The query table of a run dir or population dir: queries.parquet, or the flushed batches of
    an unfinished run (a population table has `owner` and a list column `responses`, see
    `PopulationTable`)."""
    import pandas as pd

    run_dir = Path(run_dir)
    table = run_dir / "queries.parquet"
    if table.is_file():
        return pd.read_parquet(table)
    return _read_stream(run_dir / _STREAM).to_pandas()


def neuron_queries(population: pd.DataFrame, j: int) -> pd.DataFrame:
    """Neuron j's view of a population table, in the per-run columns (QUERY_COLUMNS)."""
    out = population[["query", "batch", "indices"]].copy()
    out["response"] = [float(r[j]) for r in population["responses"]]
    out["elapsed_s"] = population["elapsed_s"]
    return out.reset_index(drop=True)


class MetricWriter:
    """Writes long per-step metric series to one MLflow run.

    On a SQLAlchemy store (sqlite, PostgreSQL, MySQL) the rows go in as one bulk INSERT through
    MLflow's own table models and latest-metric bookkeeping, and `write_many` puts several runs'
    rows in one transaction: `log_batch` builds an ORM object per row and commits per run, which
    made logging every query cost a quarter of the AM loop. Other stores (HTTP) get plain
    `log_batch` calls, synchronous by default; `mirror()` sends them from a background thread
    instead (`_Mirror`), acknowledged by `flush()`. Both are read back identically by
    `get_metric_history`.
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self._store = None
        self._pending = 0  # mirrored writes not yet acknowledged by the store (guarded by _MIRROR.cv)
        self._error: BaseException | None = None  # a mirrored write that failed after its retries
        try:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = client._tracking_client.store
            if (
                isinstance(store, SqlAlchemyStore)
                and hasattr(store, "_update_latest_metrics_if_necessary")
                and "read_only" in inspect.signature(store.ManagedSessionMaker).parameters
            ):
                self._store = store
        except (ImportError, AttributeError):  # a future MLflow without these internals: public API
            self._store = None

    @property
    def bulk(self) -> bool:
        """Whether rows go in as one bulk INSERT (else through `log_batch`)."""
        return self._store is not None

    def write(self, series: dict[str, np.ndarray], first_step: int, timestamp_ms: int) -> None:
        """Log series[key][i] at step first_step + i for every key (NaN allowed)."""
        MetricWriter.write_many([(self, series, first_step)], timestamp_ms)

    def mirror(self, series: dict[str, np.ndarray], first_step: int, timestamp_ms: int) -> None:
        """`write` from the background sender: returns at once; `flush()` waits for the store's answer.

        Only for writes whose rows are durable elsewhere first (the run's query table), and only
        on a non-bulk store (bulk stores write in-line: a local INSERT is cheaper than a thread).
        Raises the error of an earlier mirrored write of this run that failed after its retries.
        """
        self.raise_failed()
        _MIRROR.put(self, series, int(first_step), int(timestamp_ms))

    def flush(self) -> None:
        """Wait until the store acknowledged every mirrored write of this run (raises if one failed)."""
        _MIRROR.wait(self)
        self.raise_failed()

    def abandon(self, reason: str) -> None:
        """Send none of this run's mirrored writes still queued (its run is being failed)."""
        if self._error is None:
            self._error = RuntimeError(f"abandoned: {reason}")

    def raise_failed(self) -> None:
        """Raise the error of a mirrored write that did not reach the store."""
        if self._error is not None:
            raise RuntimeError(
                f"metrics of run {self.run_id} did not reach the tracking store: {self._error}"
            ) from self._error

    @staticmethod
    def write_many(writes: Sequence[tuple[MetricWriter, dict[str, np.ndarray], int]], timestamp_ms: int) -> None:
        """`write` for several (writer, series, first_step): one transaction per store."""
        by_store: dict[int, list] = {}
        remote = []
        for w, series, first in writes:
            if w._store is None:
                remote.append((w, series, first))
            else:
                by_store.setdefault(id(w._store), []).append((w, series, first))
        if len(remote) == 1:
            w, series, first = remote[0]
            w._log_batch(series, first, timestamp_ms)
        elif remote:
            # An HTTP store takes one run per request: send the runs' requests concurrently and
            # return only when every one is acknowledged (a told query is never lost).
            futures = [_pool().submit(w._log_batch, series, first, timestamp_ms) for w, series, first in remote]
            for f in futures:
                f.result()
        for group in by_store.values():
            _bulk_insert(group[0][0]._store, [(w.run_id, series, first) for w, series, first in group], timestamp_ms)

    def _log_batch(self, series: dict[str, np.ndarray], first_step: int, timestamp_ms: int) -> None:
        self._send([(series, first_step, timestamp_ms)])

    def _send(self, writes: Sequence[tuple[dict[str, np.ndarray], int, int]]) -> None:
        """Several (series, first_step, timestamp_ms) of this run in as few log_batch requests as allowed."""
        from mlflow.entities import Metric

        metrics = [
            Metric(key, float(v), int(ts), int(first_step) + i)
            for series, first_step, ts in writes
            for key, values in series.items()
            for i, v in enumerate(np.asarray(values).reshape(-1))
        ]
        for i in range(0, len(metrics), _MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + _MAX_METRICS_PER_CALL], synchronous=True)


class _Mirror:
    """The process's background sender of mirrored metric writes (`MetricWriter.mirror`).

    One thread gathers what the AM loops queued for `linger_s` (or until a flush is asked), then
    sends each run's writes merged into requests of up to 1,000 metrics, runs concurrently over the
    thread pool but never two requests of one run at once; the next round starts when this one is
    answered, so a slow store gets fewer, larger requests. A failed request is retried with backoff
    (MLflow's primary key makes a retried insert of the same rows a no-op); after the last retry its
    error is kept on the writer and raised by its next `mirror` or `flush`.
    """

    linger_s = 0.5
    retries = (0.5, 2.0, 5.0)  # backoff before each retry, seconds

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self._items: list[tuple[MetricWriter, dict[str, np.ndarray], int, int]] = []
        self._flushing = 0
        self._thread: threading.Thread | None = None

    def put(self, writer: MetricWriter, series: dict[str, np.ndarray], first_step: int, timestamp_ms: int) -> None:
        """Queue one write (the series are copied: the caller may reuse its arrays)."""
        copied = {k: np.array(v, dtype=np.float64).reshape(-1) for k, v in series.items()}
        with self.cv:
            self._items.append((writer, copied, first_step, timestamp_ms))
            writer._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="spikemax-mirror", daemon=True)
                self._thread.start()
            self.cv.notify_all()

    def wait(self, writer: MetricWriter) -> None:
        """Block until every queued write of `writer` is answered (sent now, without lingering)."""
        with self.cv:
            self._flushing += 1
            self.cv.notify_all()
            try:
                while writer._pending:
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
            by_writer: dict[int, list] = {}
            for w, series, first, ts in items:
                by_writer.setdefault(id(w), [w]).append((series, first, ts))
            futures = [_pool().submit(self._deliver, g[0], g[1:]) for g in by_writer.values()]
            for f in futures:
                f.result()  # _deliver never raises
            with self.cv:
                for g in by_writer.values():
                    g[0]._pending -= len(g) - 1
                self.cv.notify_all()

    def _deliver(self, writer: MetricWriter, writes: list[tuple[dict[str, np.ndarray], int, int]]) -> None:
        """Send one run's writes, retrying; a final failure is kept on the writer."""
        if writer._error is not None:
            return  # the run is failed already: its later rows would be a gap-ridden history
        for delay in (*self.retries, None):
            try:
                writer._send(writes)
                return
            except Exception as err:
                if delay is None:
                    writer._error = err
                    return
                time.sleep(delay)


_MIRROR = _Mirror()


_POOL: Any = None
_POOL_THREADS = 8  # concurrent log_batch requests to an HTTP store


def _pool() -> Any:
    """The process's thread pool for concurrent store requests (created on first use)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="spikemax-log")
    return _POOL


def _bulk_insert(store: Any, writes: list[tuple[str, dict[str, np.ndarray], int]], timestamp_ms: int) -> None:
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


class QueryLogger:
    """Writes every query of one AM run, batch by batch, before the next batch is asked.

    MLflow gets metrics `activation` and `best_activation` at step = query number (0-based) in one
    transaction per batch (`MetricWriter`); `run_dir` (optional) gets the batch appended to an Arrow
    IPC stream, turned into `queries.parquet` by `close()`. Either may be omitted (client=None or
    run_dir=None). A kill between batches loses nothing: both writes are complete before `log`
    returns (the store first, so it is never behind the table). Given the run's `artifact_uri`,
    artifacts go straight to its repository (`client.log_artifact` looks the run up every call).

    On a remote store (an `mlflow server`) with a `run_dir`, the table is the durable record: it is
    written before `log` returns and the metrics are mirrored to the server in the background
    (`MetricWriter.mirror`), every one acknowledged before `close()` returns. A run is marked
    FINISHED only after `close()`, so a kill or a lost request leaves it unfinished and the stage
    redoes it; a FINISHED run on the server has every told query. `mirror_remote = False` sends
    synchronously instead (the store before the table, as on a local store).
    """

    mirror_remote = True

    def __init__(
        self,
        client: MlflowClient | None = None,
        run_id: str | None = None,
        run_dir: str | Path | None = None,
        artifact_uri: str | None = None,
    ) -> None:
        self.client, self.run_id = client, run_id
        self._artifacts: Any = None
        if client is not None and artifact_uri:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            # The client's store, not MLflow's process-global URI (mlflow-artifacts: URIs resolve against it).
            self._artifacts = get_artifact_repository(artifact_uri, tracking_uri=client._tracking_client.tracking_uri)
        self.writer = MetricWriter(client, run_id) if client is not None and run_id is not None else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # Mirrored: only with a local table to be the durable record, and only where writes are slow.
        self.mirrored = bool(self.mirror_remote and self.writer is not None and not self.writer.bulk and run_dir)
        self.n_queries = 0
        self.n_batches = 0
        self.best = float("nan")
        self.seconds = 0.0  # wall time spent writing (the logging overhead)
        self.t0 = time.perf_counter()
        self._sink: Any = None
        self._stream: Any = None
        if self.run_dir is not None:
            import pyarrow as pa
            import pyarrow.ipc as ipc

            # A rerun of an unfinished combination starts its table afresh (its MLflow run is new too).
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "queries.parquet").unlink(missing_ok=True)
            self._sink = open(self.run_dir / _STREAM, "wb", buffering=0)  # noqa: SIM115 - open across batches, closed in close()
            self._schema = _query_schema(pa)
            self._stream = ipc.new_stream(self._sink, self._schema)

    def log(self, indices: np.ndarray, responses: np.ndarray) -> None:
        """Record one batch: indices (k, d) and responses (k,) (NaN = failed query)."""
        log_batches([self], [indices], [responses])

    def _series(self, responses: np.ndarray) -> dict[str, np.ndarray]:
        """This batch's metric series: the responses and the running best."""
        # Running best ignores failed (NaN) queries; NaN until the first success.
        prev = -np.inf if np.isnan(self.best) else self.best
        best = np.fmax.accumulate(np.concatenate([[prev], np.where(np.isnan(responses), -np.inf, responses)]))[1:]
        return {"activation": responses, "best_activation": np.where(np.isneginf(best), np.nan, best)}

    def _append(self, indices: np.ndarray, series: dict[str, np.ndarray]) -> None:
        """Append the batch to the query table and advance the counters."""
        responses = series["activation"]
        k = len(responses)
        if self._stream is not None:
            import pyarrow as pa

            elapsed = time.perf_counter() - self.t0
            self._stream.write_batch(
                pa.record_batch(
                    [
                        pa.array(np.arange(self.n_queries, self.n_queries + k), pa.int64()),
                        pa.array(np.full(k, self.n_batches), pa.int64()),
                        pa.array(list(indices), pa.list_(pa.int64())),
                        pa.array(responses, pa.float64()),
                        pa.array(np.full(k, elapsed), pa.float64()),
                    ],
                    schema=self._schema,
                )
            )
        self.n_queries += k
        self.n_batches += 1
        if k:
            self.best = float(series["best_activation"][-1])

    def log_stop(self, reason: str) -> None:
        """Record why the run stopped before its budget (tag `spikemax.stopped_early`)."""
        if self.client is not None and self.run_id is not None:
            self.client.set_tag(self.run_id, "spikemax.stopped_early", reason)
        if self.run_dir is not None:
            (self.run_dir / "STOPPED_EARLY").write_text(reason + "\n")

    def close(self) -> pd.DataFrame | None:
        """Wait for the mirrored metrics, turn the stream into queries.parquet (and log it as an
        artifact); returns the table."""
        if self.mirrored and self.writer is not None:
            t_start = time.perf_counter()
            self.writer.flush()
            self.seconds += time.perf_counter() - t_start
        if self.run_dir is None:
            return None
        if self._stream is None:  # closed already: the parquet is the table
            return read_queries(self.run_dir)
        import pyarrow.parquet as pq

        t_start = time.perf_counter()
        self._stream.close()
        self._sink.close()
        self._stream = self._sink = None
        table = _read_stream(self.run_dir / _STREAM)
        path = self.run_dir / "queries.parquet"
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        (self.run_dir / _STREAM).unlink(missing_ok=True)
        self.log_artifact(path)
        self.seconds += time.perf_counter() - t_start
        return table.to_pandas()

    def log_artifact(self, path: str | Path) -> None:
        """Copy one file into the run's artifacts (top level)."""
        if self._artifacts is not None:
            self._artifacts.log_artifact(str(path))
        elif self.client is not None:
            self.client.log_artifact(self.run_id, str(path))


def log_batches(loggers: Sequence[QueryLogger], indices: Sequence[np.ndarray], responses: Sequence[np.ndarray]) -> None:
    """Record one batch for each of several runs, their metrics in one store transaction.

    Returns once every batch is in its query table and in the store (mirrored runs: queued for
    the server, acknowledged by `close()`), so a kill afterwards loses nothing, and a local
    store is never behind a table.
    """
    t_start = time.perf_counter()
    for lg in loggers:
        if lg.mirrored and lg.writer is not None:
            lg.writer.raise_failed()  # before the table grows: a failed run stops here
    idx = [np.asarray(i, dtype=np.int64) for i in indices]
    series = [lg._series(np.asarray(r, dtype=np.float64).reshape(-1)) for lg, r in zip(loggers, responses)]
    ts = int(time.time() * 1000)
    firsts = [lg.n_queries for lg in loggers]
    MetricWriter.write_many(
        [(lg.writer, s, first) for lg, s, first in zip(loggers, series, firsts) if lg.writer and not lg.mirrored], ts
    )
    for lg, i, s in zip(loggers, idx, series):
        lg._append(i, s)
    for lg, s, first in zip(loggers, series, firsts):
        if lg.mirrored and lg.writer is not None:
            lg.writer.mirror(s, first, ts)
    share = (time.perf_counter() - t_start) / max(len(loggers), 1)
    for lg in loggers:
        lg.seconds += share


POPULATION_COLUMNS = ("query", "batch", "indices", "owner", "responses", "elapsed_s")


class PopulationTable:
    """The query table of one presentation set in population mode: one row per presentation with
    the proposing neuron (`owner`, a column of `responses`) and all m responses (list column,
    in the order of `targets`). `population.json` beside it names the targets and their runs.

    Written like a run's table (Arrow IPC stream per batch, `queries.parquet` on `close()`), so
    `read_queries` reads a finished or an interrupted one.
    """

    def __init__(self, pop_dir: str | Path, meta: dict[str, Any]) -> None:
        import pyarrow as pa
        import pyarrow.ipc as ipc

        from spikemax.outputs import write_json

        self.dir = Path(pop_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "queries.parquet").unlink(missing_ok=True)  # a rerun starts its table afresh
        self.m = len(meta["targets"])
        write_json(self.dir / "population.json", meta)
        self.n_queries = self.n_batches = 0
        self.seconds = 0.0
        self.t0 = time.perf_counter()
        self._schema = pa.schema(
            [
                ("query", pa.int64()),
                ("batch", pa.int64()),
                ("indices", pa.list_(pa.int64())),
                ("owner", pa.int64()),
                ("responses", pa.list_(pa.float64(), self.m)),
                ("elapsed_s", pa.float64()),
            ]
        )
        self._sink: Any = open(self.dir / _STREAM, "wb", buffering=0)  # noqa: SIM115 - closed in close()
        self._stream: Any = ipc.new_stream(self._sink, self._schema)

    def log(self, indices: np.ndarray, owner: np.ndarray, responses: np.ndarray) -> None:
        """Append one batch: indices (k, d), proposer (k,), responses (k, m)."""
        import pyarrow as pa

        t_start = time.perf_counter()
        Y = np.asarray(responses, dtype=np.float64).reshape(len(indices), self.m)
        k = len(Y)
        self._stream.write_batch(
            pa.record_batch(
                [
                    pa.array(np.arange(self.n_queries, self.n_queries + k), pa.int64()),
                    pa.array(np.full(k, self.n_batches), pa.int64()),
                    pa.array(list(np.asarray(indices, dtype=np.int64)), pa.list_(pa.int64())),
                    pa.array(np.asarray(owner, dtype=np.int64), pa.int64()),
                    pa.FixedSizeListArray.from_arrays(pa.array(Y.reshape(-1), pa.float64()), self.m),
                    pa.array(np.full(k, time.perf_counter() - self.t0), pa.float64()),
                ],
                schema=self._schema,
            )
        )
        self.n_queries += k
        self.n_batches += 1
        self.seconds += time.perf_counter() - t_start

    def close(self) -> pd.DataFrame:
        """Turn the stream into queries.parquet; returns the table."""
        import pyarrow.parquet as pq

        if self._stream is not None:
            self._stream.close()
            self._sink.close()
            self._stream = self._sink = None
            table = _read_stream(self.dir / _STREAM, self._schema)
            tmp = self.dir / "queries.parquet.tmp"
            pq.write_table(table, tmp)
            os.replace(tmp, self.dir / "queries.parquet")
            (self.dir / _STREAM).unlink(missing_ok=True)
        return read_queries(self.dir)


def _query_schema(pa: Any) -> Any:
    """Arrow schema of the query table (QUERY_COLUMNS)."""
    return pa.schema(
        [
            ("query", pa.int64()),
            ("batch", pa.int64()),
            ("indices", pa.list_(pa.int64())),
            ("response", pa.float64()),
            ("elapsed_s", pa.float64()),
        ]
    )
