"""The metric sink is chosen once per run from the client's store (the write paths themselves are
tested against real stores in test_tracking_am.py and test_tracking_server.py)."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from spikemax import metricsink, querylog


def test_the_sink_follows_the_store(tmp_path):
    local = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = local.create_run(local.create_experiment("x")).info.run_id
    served = mlflow.MlflowClient("http://127.0.0.1:9")  # never contacted: choosing a sink sends nothing
    assert isinstance(metricsink.open_sink(None, None), metricsink.NoSink)
    assert isinstance(metricsink.open_sink(local, run_id, mirror=True), metricsink.BulkSqlSink)  # local: in line
    assert type(metricsink.open_sink(served, "r")) is metricsink.LogBatchSink
    mirrored = metricsink.open_sink(served, "r", mirror=True)
    assert isinstance(mirrored, metricsink.MirroredSink) and mirrored.mirrored and mirrored.pending == 0


def test_query_logger_mirrors_only_with_a_table_to_fall_back_on(tmp_path):
    served = mlflow.MlflowClient("http://127.0.0.1:9")
    assert querylog.QueryLogger(served, "r", tmp_path / "run").mirrored
    assert not querylog.QueryLogger(served, "r", None).mirrored  # the rig: metrics only, sent in line
    querylog.QueryLogger.mirror_remote = False
    try:
        assert not querylog.QueryLogger(served, "r", tmp_path / "run2").mirrored
    finally:
        querylog.QueryLogger.mirror_remote = True


def test_an_abandoned_mirrored_run_takes_no_more_writes():
    sink = metricsink.MirroredSink(mlflow.MlflowClient("http://127.0.0.1:9"), "r")
    sink.abandon("the run failed")
    with pytest.raises(RuntimeError, match="did not reach the tracking store: abandoned: the run failed"):
        sink.write({"activation": np.ones(2)}, 0, 0)
    assert sink.pending == 0


def test_no_sink_logs_nothing_and_a_logger_without_client_still_counts(tmp_path):
    lg = querylog.QueryLogger(None, None, tmp_path / "r")
    assert isinstance(lg.writer, metricsink.NoSink)
    lg.log(np.zeros((2, 2), int), np.array([0.5, 1.5]))
    assert (lg.n_queries, lg.best) == (2, 1.5)
    assert lg.close()["response"].tolist() == [0.5, 1.5]
