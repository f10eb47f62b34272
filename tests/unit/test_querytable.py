"""The one query table: its columns, the streaming writer, the whole-table writer and the reader."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spikemax import querylog
from spikemax.querytable import (
    POPULATION_COLUMNS,
    QUERY_COLUMNS,
    RUN,
    QueryTable,
    neuron_queries,
    population,
    read_queries,
    rig,
    write_queries,
)

RIG = rig(3)  # a rig session's layout: stimulus ids, the target channel, all three channels, reference rows


def test_columns_of_runs_populations_and_the_rig():
    assert QUERY_COLUMNS == RUN.names() == ("query", "batch", "indices", "response", "elapsed_s")
    assert (
        POPULATION_COLUMNS == population(4).names() == ("query", "batch", "indices", "owner", "responses", "elapsed_s")
    )
    assert RIG.names() == ("query", "batch", "stimulus", "indices", "response", "responses", "reference")
    assert querylog.QUERY_COLUMNS == QUERY_COLUMNS and querylog.POPULATION_COLUMNS == POPULATION_COLUMNS


def _rig_rows(rng: np.random.Generator, k: int) -> dict:
    y = rng.normal(size=(k, 3))
    y[0, 1] = np.nan  # a failed channel
    return {
        "indices": rng.integers(0, 9, size=(k, 4)),
        "response": y[:, 1],
        "responses": y,
        "stimulus": [f"s{rng.integers(1000)}" for _ in range(k)],
        "reference": rng.random(k) < 0.3,
    }


def test_streamed_and_whole_tables_are_the_same_table(tmp_path):
    """A table appended batch by batch and one written at once from the same rows read back equal."""
    rng = np.random.default_rng(0)
    batches = [_rig_rows(rng, k) for k in (3, 1, 5)]
    live = QueryTable(tmp_path / "live", RIG)
    for b in batches:
        live.append(
            b["indices"], b["response"], responses=b["responses"], stimulus=b["stimulus"], reference=b["reference"]
        )
    unclosed = read_queries(tmp_path / "live")  # as after a kill: the stream is the table
    closed = live.close()
    whole = {
        key: np.concatenate([b[key] for b in batches]) for key in ("indices", "response", "responses", "reference")
    }
    write_queries(
        tmp_path / "whole",
        RIG,
        batch=np.repeat([0, 1, 2], [3, 1, 5]),
        stimulus=[s for b in batches for s in b["stimulus"]],
        **whole,
    )
    snapshot = read_queries(tmp_path / "whole")
    assert list(closed.columns) == list(RIG.names())
    for df in (unclosed, snapshot, read_queries(tmp_path / "live")):
        pd.testing.assert_frame_equal(df, closed)
    assert closed["query"].tolist() == list(range(9)) and closed["batch"].tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2]
    np.testing.assert_array_equal(np.stack(closed["responses"]), whole["responses"])
    np.testing.assert_array_equal(np.stack(closed["indices"]), whole["indices"])
    np.testing.assert_array_equal(closed["reference"].to_numpy(), whole["reference"])
    assert not (tmp_path / "live" / "queries.arrows").exists()
    assert not (tmp_path / "whole" / "queries.parquet.tmp").exists()


def test_a_rewritten_snapshot_replaces_the_table(tmp_path):
    rng = np.random.default_rng(1)
    empty = {
        "indices": np.zeros((0,), int),
        "response": [],
        "responses": np.zeros((0, 3)),
        "stimulus": [],
        "reference": np.zeros(0, bool),
    }
    write_queries(tmp_path, RIG, batch=[], **empty)  # a session with nothing told yet
    assert list(read_queries(tmp_path).columns) == list(RIG.names()) and len(read_queries(tmp_path)) == 0
    for k in (4, 6):
        rows = _rig_rows(rng, k)
        write_queries(tmp_path, RIG, batch=np.zeros(k, int), **rows)
        assert len(read_queries(tmp_path)) == k


def test_population_table_and_a_targets_view(tmp_path):
    table = QueryTable(tmp_path, population(2))
    table.append(np.zeros((3, 2), int), responses=np.array([[1.0, 2.0], [3.0, 4.0], [5.0, np.nan]]), owner=[0, 1, 0])
    df = table.close()
    assert df["owner"].tolist() == [0, 1, 0]
    view = neuron_queries(df, 1)
    assert list(view.columns) == list(QUERY_COLUMNS)
    assert view["response"].tolist()[:2] == [2.0, 4.0] and np.isnan(view["response"].iloc[2])


def test_a_missing_column_is_refused_before_anything_is_written(tmp_path):
    table = QueryTable(tmp_path, population(2))
    with pytest.raises(ValueError, match="'owner' column"):
        table.append(np.zeros((1, 2), int), responses=np.ones((1, 2)))
    with pytest.raises(ValueError, match="'stimulus' column"):
        write_queries(
            tmp_path / "rig", RIG, batch=[0], indices=np.zeros((1, 2), int), response=[1.0], responses=[[1.0] * 3]
        )
    assert table.n_queries == 0 and len(table.close()) == 0


def test_opening_a_table_starts_it_afresh_and_a_closed_table_takes_no_rows(tmp_path):
    first = QueryTable(tmp_path)
    first.append(np.zeros((2, 2), int), np.ones(2))
    first.close()
    again = QueryTable(tmp_path)
    assert len(read_queries(tmp_path)) == 0
    again.close()
    with pytest.raises(RuntimeError, match="closed"):
        again.append(np.zeros((1, 2), int), np.ones(1))
