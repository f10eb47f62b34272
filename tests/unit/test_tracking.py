"""The MLflow helper: a real sqlite store in a temp dir, runs readable back."""

from __future__ import annotations

import mlflow

from spikemax import tracking


def test_store_is_sqlite_under_mlruns_and_run_reads_back(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking.configure(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    exp = tracking.experiment_id("snn", tmp_path)
    assert tracking.experiment_id("snn", tmp_path) == exp
    client = mlflow.MlflowClient(uri)
    assert client.get_experiment(exp).artifact_location.startswith((tmp_path / "mlruns").resolve().as_uri())
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "acc", 0.5, step=3)
    client.log_text(run.info.run_id, "hello", "note.txt")
    client.set_terminated(run.info.run_id)
    back = client.get_run(run.info.run_id)
    assert back.data.metrics["acc"] == 0.5
    local = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "dl"))
    assert open(local).read() == "hello"
    assert str((tmp_path / "mlruns").resolve()) in back.info.artifact_uri


def test_env_var_overrides_store(tmp_path, monkeypatch):
    other = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert tracking.tracking_uri(tmp_path) == other


def test_two_stores_in_one_process_stay_apart(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = tracking.configure(tmp_path / "a")
    second = tracking.configure(tmp_path / "b")
    assert first != second and "/b/mlruns/" in second
    import os

    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_parallel_first_writers_share_one_new_store(tmp_path):
    """Several processes opening a fresh store at once all succeed (schema created once)."""
    import subprocess
    import sys

    code = "import sys; from spikemax import tracking; tracking.experiment_id('snn', sys.argv[1]); print('ok')"
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-800:] for o in outs]
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri(tmp_path))
    assert [e.name for e in client.search_experiments() if e.name == "snn"] == ["snn"]


def test_terminated_marks_finished_or_failed(tmp_path, monkeypatch):
    import pytest

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = mlflow.MlflowClient(tracking.configure(tmp_path))
    exp = tracking.experiment_id("snn", tmp_path)
    ok, bad = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    with tracking.terminated(client, ok):
        pass
    with pytest.raises(KeyError), tracking.terminated(client, bad):
        raise KeyError("boom")
    assert client.get_run(ok).info.status == "FINISHED"
    assert client.get_run(bad).info.status == "FAILED"
