"""Per-query logging of AM runs: the run's metric series (`spikemax.metricsink`) and its query table
(`spikemax.querytable`), each batch in both before the next batch is asked."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spikemax.metricsink import MetricSink, open_sink, write_many
from spikemax.querytable import (
    POPULATION_COLUMNS,
    QUERY_COLUMNS,
    QueryTable,
    neuron_queries,
    population,
    read_queries,
)

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

__all__ = [
    "POPULATION_COLUMNS",
    "QUERY_COLUMNS",
    "PopulationTable",
    "QueryLogger",
    "log_batches",
    "neuron_queries",
    "read_queries",
]


class QueryLogger:
    """Writes every query of one AM run, batch by batch, before the next batch is asked.

    MLflow gets metrics `activation` and `best_activation` at step = query number (0-based), through
    the run's `MetricSink` (`writer`); `run_dir` (optional) gets the run's query table, turned into
    `queries.parquet` by `close()`. Either may be omitted (client=None or run_dir=None). A kill
    between batches loses nothing: both writes are complete before `log` returns (the store first, so
    it is never behind the table). Given the run's `artifact_uri`, artifacts go straight to its
    repository (`client.log_artifact` looks the run up every call).

    On a remote store (an `mlflow server`) with a `run_dir`, the table is the durable record: it is
    written before `log` returns and the metrics are mirrored to the server in the background,
    every one acknowledged before `close()` returns. A run is marked FINISHED only after `close()`,
    so a kill or a lost request leaves it unfinished and the stage redoes it; a FINISHED run on the
    server has every told query. `mirror_remote = False` sends synchronously instead (the store
    before the table, as on a local store).
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
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # Mirrored: only with a local table to be the durable record, and only where writes are slow.
        self.writer: MetricSink = open_sink(client, run_id, mirror=bool(self.mirror_remote and run_dir))
        self.n_queries = 0
        self.n_batches = 0
        self.best = float("nan")
        self.seconds = 0.0  # wall time spent writing (the logging overhead)
        # A rerun of an unfinished run starts its table afresh (its MLflow run is new too).
        self.table = QueryTable(self.run_dir) if self.run_dir is not None else None

    @property
    def mirrored(self) -> bool:
        """Whether the metrics reach the store in the background, after the table."""
        return self.writer.mirrored

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
        if self.table is not None:
            self.table.append(indices, responses)
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
        """Wait for the mirrored metrics, turn the table into queries.parquet (and log it as an
        artifact); returns the table."""
        if self.mirrored:
            t_start = time.perf_counter()
            self.writer.flush()
            self.seconds += time.perf_counter() - t_start
        if self.table is None:
            return None
        first = not self.table.path.is_file()
        t_start = time.perf_counter()
        df = self.table.close()
        if first:
            self.log_artifact(self.table.path)
        self.seconds += time.perf_counter() - t_start
        return df

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
        lg.writer.raise_failed()  # before the table grows: a failed run stops here
    idx = [np.asarray(i, dtype=np.int64) for i in indices]
    series = [lg._series(np.asarray(r, dtype=np.float64).reshape(-1)) for lg, r in zip(loggers, responses)]
    ts = int(time.time() * 1000)
    firsts = [lg.n_queries for lg in loggers]
    writes = [(lg.writer, s, first) for lg, s, first in zip(loggers, series, firsts)]
    write_many([w for w in writes if not w[0].mirrored], ts)  # the store before the table
    for lg, i, s in zip(loggers, idx, series):
        lg._append(i, s)
    write_many([w for w in writes if w[0].mirrored], ts)  # the table before the server
    share = (time.perf_counter() - t_start) / max(len(loggers), 1)
    for lg in loggers:
        lg.seconds += share


class PopulationTable(QueryTable):
    """The query table of one presentation set in population mode (`querytable.population(m)`
    columns: the proposer `owner` and all m responses, in the order of `meta["targets"]`), with
    `population.json` beside it naming the targets and their runs."""

    def __init__(self, pop_dir: str | Path, meta: dict[str, Any]) -> None:
        from spikemax.outputs import write_json

        self.m = len(meta["targets"])
        super().__init__(pop_dir, population(self.m))
        write_json(self.dir / "population.json", meta)

    def log(self, indices: np.ndarray, owner: np.ndarray, responses: np.ndarray) -> None:
        """Append one batch: indices (k, d), proposer (k,), responses (k, m)."""
        self.append(indices, responses=responses, owner=owner)
