"""The query table: one row per presented stimulus, the one format of AM runs, populations and the rig.

Every table has `query` (0-based presentation number), `batch` and `indices` (the stimulus's grid
indices); `Columns` adds the optional ones: `stimulus` (an id string), `owner` (the optimizer that
proposed it), `response` (one float), `responses` (a fixed-size list of floats, one per channel or
target), `reference` (a boolean: a reference stimulus of the drift correction, not a searched one) and
`elapsed_s` (seconds since the table was opened, per batch). NaN = a failed query.

One writer: `QueryTable` appends each batch to an Arrow IPC stream (`queries.arrows`: a kill loses
at most the batch being written) and `close()` turns it into `queries.parquet`; `write_queries`
writes a whole table at once (a snapshot of rows kept elsewhere, e.g. the rig's SQLite log) with
the same schema and the same atomic replace. One reader: `read_queries`, for a finished or an
interrupted table.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

STREAM = "queries.arrows"  # the live table: one Arrow IPC record batch per appended batch
TABLE = "queries.parquet"  # the closed table


@dataclass(frozen=True)
class Columns:
    """Which optional columns a query table has (`query`, `batch`, `indices` always, in this order)."""

    stimulus: bool = False  # an id string per presentation (the rig's stimulus ids)
    owner: bool = False  # which optimizer proposed it (population mode: a column of `responses`)
    response: bool = True  # one float per presentation
    channels: int = 0  # > 0: `responses`, a list of this many floats per presentation
    reference: bool = False  # `reference`: whether the row presented a reference stimulus (drift correction)
    elapsed: bool = True  # `elapsed_s`: seconds from opening the table to writing the row's batch

    def names(self) -> tuple[str, ...]:
        """The column names, in table order."""
        return tuple(name for name, _ in self._fields())

    def schema(self) -> pa.Schema:
        """The Arrow schema of such a table."""
        import pyarrow as pa

        return pa.schema(self._fields())

    def _fields(self) -> list[tuple[str, Any]]:
        import pyarrow as pa

        fields: list[tuple[str, Any]] = [("query", pa.int64()), ("batch", pa.int64())]
        if self.stimulus:
            fields.append(("stimulus", pa.string()))
        fields.append(("indices", pa.list_(pa.int64())))
        if self.owner:
            fields.append(("owner", pa.int64()))
        if self.response:
            fields.append(("response", pa.float64()))
        if self.channels:
            fields.append(("responses", pa.list_(pa.float64(), int(self.channels))))
        if self.reference:
            fields.append(("reference", pa.bool_()))
        if self.elapsed:
            fields.append(("elapsed_s", pa.float64()))
        return fields


RUN = Columns()  # one AM run: a response per query


def population(m: int) -> Columns:
    """The columns of a population's shared table: the proposer and all m targets' responses."""
    return Columns(owner=True, response=False, channels=m)


def rig(channels: int) -> Columns:
    """The columns of a rig session's table: stimulus ids, the target channel's response and every
    channel's, which rows were reference stimuli, no timing (the rig's own log has the times)."""
    return Columns(stimulus=True, channels=channels, reference=True, elapsed=False)


QUERY_COLUMNS = RUN.names()
POPULATION_COLUMNS = population(1).names()


def _record_batch(
    columns: Columns,
    first_query: int,
    batch: np.ndarray,
    indices: np.ndarray,
    response: np.ndarray | None,
    responses: np.ndarray | None,
    owner: np.ndarray | None,
    stimulus: list[str] | None,
    elapsed_s: np.ndarray | None,
    reference: np.ndarray | None = None,
) -> pa.RecordBatch:
    """Rows first_query, first_query + 1, ... as one record batch of `columns`' schema."""
    import pyarrow as pa

    idx = np.asarray(indices, dtype=np.int64)
    k = len(idx)
    arrays: list[Any] = [pa.array(np.arange(first_query, first_query + k), pa.int64()), pa.array(batch, pa.int64())]
    given = {
        "stimulus": stimulus,
        "owner": owner,
        "response": response,
        "responses": responses,
        "reference": reference,
        "elapsed_s": elapsed_s,
    }
    for name in columns.names()[2:]:
        if name != "indices" and given[name] is None:
            raise ValueError(f"a query table with a {name!r} column needs its values")
    if columns.stimulus:
        arrays.append(pa.array([str(s) for s in stimulus or []], pa.string()))
    arrays.append(pa.array(list(idx.reshape(k, -1)) if k else [], pa.list_(pa.int64())))
    if columns.owner:
        arrays.append(pa.array(np.asarray(owner, dtype=np.int64), pa.int64()))
    if columns.response:
        arrays.append(pa.array(np.asarray(response, dtype=np.float64).reshape(k), pa.float64()))
    if columns.channels:
        flat = np.asarray(responses, dtype=np.float64).reshape(k * columns.channels)
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float64()), int(columns.channels)))
    if columns.reference:
        arrays.append(pa.array(np.asarray(reference, dtype=bool).reshape(k), pa.bool_()))
    if columns.elapsed:
        arrays.append(pa.array(np.asarray(elapsed_s, dtype=np.float64).reshape(k), pa.float64()))
    return pa.record_batch(arrays, schema=columns.schema())


def _write_parquet(table: pa.Table, directory: Path) -> Path:
    """`table` as directory/queries.parquet, replaced atomically (a reader never sees half a file)."""
    import pyarrow.parquet as pq

    path = directory / TABLE
    tmp = directory / (TABLE + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def _read_stream(path: Path, schema: pa.Schema | None = None) -> pa.Table:
    """Every whole record batch of an Arrow IPC stream as a table; a kill can cut the last one short."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    batches = []
    try:
        with pa.OSFile(str(path)) as f:
            reader = ipc.open_stream(f)
            schema = reader.schema  # the stream knows its own columns
            for b in reader:
                batches.append(b)
    except (pa.ArrowInvalid, OSError):
        pass
    return pa.Table.from_batches(batches, schema=schema if schema is not None else RUN.schema())


def read_queries(directory: str | Path) -> pd.DataFrame:
    """The query table in `directory`: queries.parquet, or the whole batches of an unclosed one."""
    import pandas as pd

    directory = Path(directory)
    table = directory / TABLE
    if table.is_file():
        return pd.read_parquet(table)
    return _read_stream(directory / STREAM).to_pandas()


def neuron_queries(population: pd.DataFrame, j: int) -> pd.DataFrame:
    """Target j's view of a population table, in a run's columns (QUERY_COLUMNS)."""
    out = population[["query", "batch", "indices"]].copy()
    out["response"] = [float(r[j]) for r in population["responses"]]
    out["elapsed_s"] = population["elapsed_s"]
    return out.reset_index(drop=True)


def write_queries(
    directory: str | Path,
    columns: Columns,
    *,
    batch: np.ndarray,
    indices: np.ndarray,
    response: np.ndarray | None = None,
    responses: np.ndarray | None = None,
    owner: np.ndarray | None = None,
    stimulus: list[str] | None = None,
    elapsed_s: np.ndarray | None = None,
    reference: np.ndarray | None = None,
) -> Path:
    """Write a whole query table (rows 0..k-1) as directory/queries.parquet at once; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rb = _record_batch(
        columns,
        0,
        np.asarray(batch, dtype=np.int64),
        indices,
        response,
        responses,
        owner,
        stimulus,
        elapsed_s,
        reference,
    )
    import pyarrow as pa

    return _write_parquet(pa.Table.from_batches([rb], schema=columns.schema()), directory)


class QueryTable:
    """A query table written batch by batch: each `append` is on disk when it returns.

    Opening one starts the table in `directory` afresh (a rerun of an unfinished run is a new run).
    `close()` turns the stream into queries.parquet and returns the table; closing twice reads it.
    """

    def __init__(self, directory: str | Path, columns: Columns = RUN) -> None:
        import pyarrow.ipc as ipc

        self.dir = Path(directory)
        self.columns = columns
        self.n_queries = 0
        self.n_batches = 0
        self.seconds = 0.0  # wall time spent writing
        self.t0 = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / TABLE).unlink(missing_ok=True)
        self._schema = columns.schema()
        self._sink: Any = open(self.dir / STREAM, "wb", buffering=0)  # noqa: SIM115 - open across batches, closed in close()
        self._stream: Any = ipc.new_stream(self._sink, self._schema)

    def append(
        self,
        indices: np.ndarray,
        response: np.ndarray | None = None,
        *,
        responses: np.ndarray | None = None,
        owner: np.ndarray | None = None,
        stimulus: list[str] | None = None,
        reference: np.ndarray | None = None,
    ) -> None:
        """Append one batch: indices (k, d) and the columns this table has ((k,) each, responses (k, m))."""
        t_start = time.perf_counter()
        if self._stream is None:
            raise RuntimeError(f"query table {self.dir} is closed")
        k = len(indices)
        elapsed = np.full(k, t_start - self.t0)
        rb = _record_batch(
            self.columns,
            self.n_queries,
            np.full(k, self.n_batches),
            indices,
            response,
            responses,
            owner,
            stimulus,
            elapsed,
            reference,
        )
        self._stream.write_batch(rb)
        self.n_queries += k
        self.n_batches += 1
        self.seconds += time.perf_counter() - t_start

    @property
    def path(self) -> Path:
        """Where the closed table is (queries.parquet)."""
        return self.dir / TABLE

    def close(self) -> pd.DataFrame:
        """Turn the stream into queries.parquet; returns the table."""
        if self._stream is None:  # closed already: the parquet is the table
            return read_queries(self.dir)
        t_start = time.perf_counter()
        self._stream.close()
        self._sink.close()
        self._stream = self._sink = None
        table = _read_stream(self.dir / STREAM, self._schema)
        _write_parquet(table, self.dir)
        (self.dir / STREAM).unlink(missing_ok=True)
        self.seconds += time.perf_counter() - t_start
        return table.to_pandas()
