"""Every stage's MLflow traffic through a real `mlflow server` on loopback reads back like the sqlite store's."""

from __future__ import annotations

import threading

import mlflow
import numpy as np
import pandas as pd
import pytest

from spikemax import metricsink, querylog, tracking
from spikemax.stages.maximize import run as run_stage
from tests.support.maximize import project_copy

SMALL = {
    "checkpoints": [-1],
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
    local = project_copy(tmp_path / "sqlite", project, SMALL)
    run_stage(*local)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    served = project_copy(tmp_path / "served", project, SMALL)
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


def _log_runs(client, eid: str, root, batches: list[list[np.ndarray]]) -> list[querylog.QueryLogger]:
    """One QueryLogger per run, fed `batches[b][r]` (responses of run r in batch b) through log_batches."""
    loggers = [
        querylog.QueryLogger(client, client.create_run(eid).info.run_id, root / f"run{r}")
        for r in range(len(batches[0]))
    ]
    rng = np.random.default_rng(0)
    for ys in batches:
        idx = [rng.integers(0, 8, size=(len(y), 3)) for y in ys]
        querylog.log_batches(loggers, idx, ys)
    return loggers


def _histories(client, loggers) -> list[dict[str, list]]:
    return [
        {
            # NaN (a failed query) as None: NaN != NaN would make equal histories compare unequal
            key: sorted(
                (m.step, None if np.isnan(m.value) else m.value) for m in client.get_metric_history(lg.run_id, key)
            )
            for key in ("activation", "best_activation")
        }
        for lg in loggers
    ]


def _batches(n_batches: int = 12, n_runs: int = 3, k: int = 40) -> list[list[np.ndarray]]:
    """Seeded responses with failed (NaN) queries, 12 x 40 = 480 queries per run (more than one request)."""
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n_batches):
        ys = [rng.normal(size=k) for _ in range(n_runs)]
        for y in ys:
            y[rng.random(k) < 0.1] = np.nan
        out.append(ys)
    return out


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(metricsink.HttpMirror, "retries", (0.01, 0.01, 0.01))
    monkeypatch.setattr(metricsink.HttpMirror, "linger_s", 0.05)


def test_mirrored_metrics_reach_the_server_after_the_table_and_read_back_like_sqlite(
    tmp_path, mlflow_server, monkeypatch, fast_retries
):
    from mlflow.store.tracking.rest_store import RestStore

    batches = _batches()
    local = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    want_loggers = _log_runs(local, local.create_experiment("x"), tmp_path / "sqlite", batches)
    assert not any(lg.mirrored for lg in want_loggers)  # the local store keeps its in-line bulk path
    for lg in want_loggers:
        lg.close()

    # Hold the sender: log_batches must return with every batch in the query table, none on the server yet.
    gate = threading.Event()
    send = RestStore.log_batch

    def held(self, *args, **kwargs):
        assert gate.wait(30)
        return send(self, *args, **kwargs)

    monkeypatch.setattr(RestStore, "log_batch", held)
    client = mlflow.MlflowClient(mlflow_server.uri)
    loggers = _log_runs(client, client.create_experiment("mirrored"), tmp_path / "served", batches)
    assert all(lg.mirrored for lg in loggers)
    for lg in loggers:
        assert len(querylog.read_queries(lg.run_dir)) == 12 * 40
    assert all(h["activation"] == [] for h in _histories(client, loggers))
    gate.set()
    for lg in loggers:
        lg.close()
        assert lg.writer.pending == 0
    got, want = _histories(client, loggers), _histories(local, want_loggers)
    assert got == want and len(got[0]["activation"]) == 12 * 40


def test_mirrored_writes_are_retried_and_a_lost_one_fails_the_run(tmp_path, mlflow_server, monkeypatch, fast_retries):
    from mlflow.store.tracking.rest_store import RestStore

    send = RestStore.log_batch
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] % 3 == 1:  # every third request fails before it reaches the server
            raise ConnectionError("simulated connection reset")
        return send(self, *args, **kwargs)

    monkeypatch.setattr(RestStore, "log_batch", flaky)
    client = mlflow.MlflowClient(mlflow_server.uri)
    eid = client.create_experiment("flaky")
    batches = _batches(n_runs=2)
    loggers = _log_runs(client, eid, tmp_path / "flaky", batches)
    for lg in loggers:
        lg.close()
    assert calls["n"] > 2
    for lg, h in zip(loggers, _histories(client, loggers)):
        table = querylog.read_queries(lg.run_dir)
        assert [s for s, _ in h["activation"]] == list(range(12 * 40)) == table["query"].tolist()

    def down(self, *args, **kwargs):
        raise ConnectionError("simulated server down")

    monkeypatch.setattr(RestStore, "log_batch", down)
    lost = _log_runs(client, eid, tmp_path / "down", batches[:1])
    with pytest.raises(RuntimeError, match="did not reach the tracking store: simulated server down"):
        lost[0].close()
    with pytest.raises(RuntimeError, match="did not reach the tracking store"):
        querylog.log_batches(lost[1:], [np.zeros((1, 3), np.int64)], [np.ones(1)])
