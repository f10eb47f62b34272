"""QueryLogger and the AM artifact helpers against a real sqlite MLflow store."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from spikemax import tracking


def _run(tmp_path):
    uri = tracking.configure(tmp_path)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(tracking.experiment_id(tracking.AM_EXPERIMENT, tmp_path))
    return client, run.info.run_id


def test_query_logger_running_best_skips_failed_queries(tmp_path):
    client, run_id = _run(tmp_path)
    lg = tracking.QueryLogger(client, run_id, tmp_path / "r")
    lg.log(np.array([[0, 1], [2, 3]]), np.array([np.nan, np.nan]))
    lg.log(np.array([[1, 1], [2, 2], [3, 3]]), np.array([0.5, np.nan, 0.2]))
    best = {m.step: m.value for m in client.get_metric_history(run_id, "best_activation")}
    assert np.isnan(best[0]) and np.isnan(best[1])
    assert [best[i] for i in range(2, 5)] == [0.5, 0.5, 0.5]
    act = {m.step: m.value for m in client.get_metric_history(run_id, "activation")}
    assert np.isnan(act[3]) and act[4] == 0.2
    assert lg.n_queries == 5 and lg.best == 0.5


def test_unclosed_logger_leaves_every_flushed_batch_readable(tmp_path):
    lg = tracking.QueryLogger(None, None, tmp_path / "r")
    for b in range(3):
        lg.log(np.full((4, 3), b), np.arange(4) + 10 * b)
    # No close(): as after a kill. The parts are the table.
    df = tracking.read_queries(tmp_path / "r")
    assert list(df.columns) == list(tracking.QUERY_COLUMNS)
    assert df["query"].tolist() == list(range(12)) and df["batch"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert df["indices"].iloc[5].tolist() == [1, 1, 1]
    # A restarted run starts its table afresh.
    tracking.QueryLogger(None, None, tmp_path / "r")
    assert len(tracking.read_queries(tmp_path / "r")) == 0


def test_close_merges_parts_into_queries_parquet(tmp_path):
    lg = tracking.QueryLogger(None, None, tmp_path / "r")
    lg.log(np.zeros((2, 2), int), np.array([1.0, 2.0]))
    df = lg.close()
    assert not (tmp_path / "r" / "queries.parts").exists()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "r" / "queries.parquet"), df)


def test_image_and_plot_helpers_write_pngs(tmp_path):
    img = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    p = tracking.save_image_png(img, tmp_path / "a.png", scale=4)
    assert Image.open(p).size == (32, 32)
    gray = tracking.save_image_png(img[:1], tmp_path / "g.png", scale=1)
    assert Image.open(gray).mode == "L"
    c = tracking.save_convergence_png(np.array([0.1, np.nan, 0.3, 0.2]), tmp_path / "c.png", title="t")
    g = tracking.save_image_grid_png([img, None, img[:1]], 2, 2, tmp_path / "grid.png",
                                     row_labels=["a", "b"], col_labels=["x", "y"])
    for path in (c, g):
        assert Image.open(path).size[0] > 100
