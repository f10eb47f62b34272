"""Every stage's MLflow traffic through a real `mlflow server` on loopback reads back like the sqlite store's."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from spikemax import tracking
from spikemax.stages.maximize import run as run_stage

from .test_maximize import _project_copy

SMALL = {
    "epochs": [-1],
    "generators": ["sngan"],
    "targets": ["class:0", "lif1:0"],
    "units_per_layer": 0,
    "methods": ["tt", "random"],
    "seeds": [0],
    "budget": 32,
    "batch": 16,
}


def _read(uri: str) -> dict[str, dict]:
    """Per AM run key: status, params, final metrics, the `activation` history and artifact names."""
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(tracking.AM_EXPERIMENT)
    out = {}
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        key = r.data.tags.get(tracking.RUN_KEY_TAG)
        if key is None:
            continue
        history = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "activation"))
        metrics = {k: v for k, v in r.data.metrics.items() if k != "wall_s"}
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        out[key] = {
            "status": r.info.status,
            "params": r.data.params,
            "metrics": metrics,
            "history": history,
            "artifacts": artifacts,
        }
    return out


@pytest.mark.slow
def test_maximize_through_mlflow_server_reads_back_like_sqlite(
    tmp_path, project, snn_checkpoints, generator_checkpoints, mlflow_server, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = _project_copy(tmp_path / "sqlite", project, SMALL)
    run_stage(*local)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    served = _project_copy(tmp_path / "served", project, SMALL)
    metrics = run_stage(*served)
    assert metrics["n_failed"] == 0 and metrics["n_runs"] == 4, metrics
    want, got = _read(local_uri(local[1].root)), _read(mlflow_server.uri)
    assert got.keys() == want.keys() and len(got) == 4
    for key, run in want.items():
        assert got[key]["status"] == run["status"] == "FINISHED"
        assert got[key]["params"] == run["params"]
        assert got[key]["history"] == run["history"] and len(run["history"]) == 32
        assert got[key]["metrics"].keys() == run["metrics"].keys()
        assert got[key]["artifacts"] == run["artifacts"] >= {"queries.parquet", "best_stimulus.png"}
    # Artifacts went to the server's artifact root, none into the client's project.
    assert any(mlflow_server.artifacts.rglob("queries.parquet"))
    assert not (served[1].root / "mlruns").exists()
    drop = ["run_id"]
    a = pd.read_csv(local[1].results / "am" / "summary.csv").drop(columns=drop)
    b = pd.read_csv(served[1].results / "am" / "summary.csv").drop(columns=drop)
    pd.testing.assert_frame_equal(a, b)
    # A rerun through the server finds every run finished.
    assert run_stage(*served)["queries_run"] == 0


def local_uri(root) -> str:
    return f"sqlite:///{root.resolve() / 'mlruns' / 'mlflow.db'}"
