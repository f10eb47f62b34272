"""QueryLogger and the AM artifact helpers against a real sqlite MLflow store."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

from spikemax import images, metricsink, querylog, tracking


def _run(tmp_path):
    uri = tracking.configure(tmp_path)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(tracking.experiment_id(tracking.AM_EXPERIMENT, tmp_path))
    return client, run.info.run_id


def test_query_logger_running_best_skips_failed_queries(tmp_path):
    client, run_id = _run(tmp_path)
    lg = querylog.QueryLogger(client, run_id, tmp_path / "r")
    lg.log(np.array([[0, 1], [2, 3]]), np.array([np.nan, np.nan]))
    lg.log(np.array([[1, 1], [2, 2], [3, 3]]), np.array([0.5, np.nan, 0.2]))
    best = {m.step: m.value for m in client.get_metric_history(run_id, "best_activation")}
    assert np.isnan(best[0]) and np.isnan(best[1])
    assert [best[i] for i in range(2, 5)] == [0.5, 0.5, 0.5]
    act = {m.step: m.value for m in client.get_metric_history(run_id, "activation")}
    assert np.isnan(act[3]) and act[4] == 0.2
    assert lg.n_queries == 5 and lg.best == 0.5


def test_unclosed_logger_leaves_every_flushed_batch_readable(tmp_path):
    lg = querylog.QueryLogger(None, None, tmp_path / "r")
    for b in range(3):
        lg.log(np.full((4, 3), b), np.arange(4) + 10 * b)
    # No close(): as after a kill. The stream is the table.
    df = querylog.read_queries(tmp_path / "r")
    assert list(df.columns) == list(querylog.QUERY_COLUMNS)
    assert df["query"].tolist() == list(range(12)) and df["batch"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert df["indices"].iloc[5].tolist() == [1, 1, 1]
    # A restarted run starts its table afresh.
    querylog.QueryLogger(None, None, tmp_path / "r")
    assert len(querylog.read_queries(tmp_path / "r")) == 0


def test_a_batch_cut_short_by_a_kill_is_dropped_whole(tmp_path):
    lg = querylog.QueryLogger(None, None, tmp_path / "r")
    for b in range(3):
        lg.log(np.full((5, 2), b), np.arange(5.0))
    stream = tmp_path / "r" / "queries.arrows"
    data = stream.read_bytes()
    stream.write_bytes(data[:-40])  # the last batch's write was interrupted
    df = querylog.read_queries(tmp_path / "r")
    assert df["query"].tolist() == list(range(10)) and df["batch"].max() == 1
    stream.write_bytes(data[:3])  # killed while writing the schema
    assert len(querylog.read_queries(tmp_path / "r")) == 0


def test_close_turns_the_stream_into_queries_parquet(tmp_path):
    lg = querylog.QueryLogger(None, None, tmp_path / "r")
    lg.log(np.zeros((2, 2), int), np.array([1.0, 2.0]))
    df = lg.close()
    assert not (tmp_path / "r" / "queries.arrows").exists()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "r" / "queries.parquet"), df)
    assert df["response"].tolist() == [1.0, 2.0]
    pd.testing.assert_frame_equal(lg.close(), df)  # a second close changes nothing


def test_artifacts_go_to_the_runs_repository(tmp_path):
    client, run_id = _run(tmp_path)
    run = client.get_run(run_id)
    lg = querylog.QueryLogger(client, run_id, tmp_path / "r", artifact_uri=run.info.artifact_uri)
    lg.log(np.zeros((3, 2), int), np.array([1.0, 2.0, 0.5]))
    png = tmp_path / "best_stimulus.png"
    images.save_png(np.zeros((1, 4, 4)), png)
    lg.log_artifact(png)
    lg.close()
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["best_stimulus.png", "queries.parquet"]
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="queries.parquet", tracking_uri=client.tracking_uri, dst_path=str(tmp_path / "dl")
    )
    assert pd.read_parquet(local)["response"].tolist() == [1.0, 2.0, 0.5]


def _history(client, run_id, key):
    return [
        (m.step, m.value, m.timestamp) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    ]


def test_bulk_metric_writes_read_back_like_log_batch(tmp_path):
    client, bulk_run = _run(tmp_path)
    plain_run = client.create_run(tracking.experiment_id(tracking.AM_EXPERIMENT, tmp_path)).info.run_id
    bulk = metricsink.open_sink(client, bulk_run)
    plain = metricsink.LogBatchSink(client, plain_run)  # the public log_batch path, as on an HTTP store
    assert isinstance(bulk, metricsink.BulkSqlSink) and not bulk.mirrored and not plain.mirrored
    series = [
        {"a": np.array([0.5, np.nan, np.inf]), "b": np.array([-np.inf, 2.0, 1.0])},
        {"a": np.array([3.0]), "b": np.array([np.nan])},
    ]
    for w in (bulk, plain):
        w.write(series[0], 0, 1000)
        w.write(series[1], 3, 2000)
    for key in ("a", "b"):
        got, want = _history(client, bulk_run, key), _history(client, plain_run, key)
        assert [s for s, _, _ in got] == [0, 1, 2, 3]
        np.testing.assert_array_equal([v for _, v, _ in got], [v for _, v, _ in want])
        assert [t for _, _, t in got] == [t for _, _, t in want] == [1000, 1000, 1000, 2000]
    # Latest values (the runs table, search_runs) are the last step's, as log_batch leaves them.
    for run_id in (bulk_run, plain_run):
        m = client.get_run(run_id).data.metrics
        assert m["a"] == 3.0 and np.isnan(m["b"])
    assert np.isclose(_history(client, bulk_run, "a")[2][1], np.finfo(np.float64).max)


def test_log_batches_writes_each_runs_own_series(tmp_path):
    client, r1 = _run(tmp_path)
    r2 = client.create_run(tracking.experiment_id(tracking.AM_EXPERIMENT, tmp_path)).info.run_id
    loggers = [querylog.QueryLogger(client, r, tmp_path / r) for r in (r1, r2)]
    querylog.log_batches(
        loggers, [np.zeros((2, 3), int), np.ones((3, 3), int)], [np.array([1.0, 0.5]), np.array([np.nan, 2.0, 3.0])]
    )
    querylog.log_batches(loggers[1:], [np.ones((1, 3), int)], [np.array([0.1])])
    assert [m.value for m in sorted(client.get_metric_history(r1, "best_activation"), key=lambda m: m.step)] == [
        1.0,
        1.0,
    ]
    act = {m.step: m.value for m in client.get_metric_history(r2, "activation")}
    assert sorted(act) == [0, 1, 2, 3] and np.isnan(act[0]) and act[3] == 0.1
    assert client.get_run(r2).data.metrics["best_activation"] == 3.0
    assert [lg.n_queries for lg in loggers] == [2, 4] and [lg.n_batches for lg in loggers] == [1, 2]
    assert querylog.read_queries(tmp_path / r2)["batch"].tolist() == [0, 0, 0, 1]
