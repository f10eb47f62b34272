"""Parallel tuning on a real PostgreSQL: workers share n_trials, distinct points, a SIGKILLed worker's trial FAILs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from spikemax import tracking
from tests.support.project import TINY_PREPARE, write_params

N_TRIALS = 6


def _project(root: Path, shared: Path, tune: dict) -> Path:
    """A project dir sharing the session's prepared data and tiny models; returns its params.yaml."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "prepared").symlink_to(shared / "data" / "prepared")
    (root / "models").symlink_to(shared / "models")
    return write_params(root, {"prepare": TINY_PREPARE, "tune": tune})


def _kill_one_running(storage: str, proc: subprocess.Popen, timeout: float = 240) -> int:
    """SIGKILL the worker of the first trial seen RUNNING with its run open; returns its number."""
    # One storage (one connection pool) for the whole poll: a URL per call opened a new pool each
    # time, and at 20 polls a second they used up the server's connections.
    rdb = optuna.storages.RDBStorage(storage)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            for name in optuna.get_all_study_names(rdb):
                for tr in optuna.load_study(study_name=name, storage=rdb).get_trials(deepcopy=False):
                    if tr.state.name == "RUNNING" and "mlflow_run_id" in tr.user_attrs:
                        pid = int(tr.user_attrs["worker"].rsplit(":", 1)[1])
                        os.kill(pid, signal.SIGKILL)
                        return tr.number
            time.sleep(0.05)
        raise TimeoutError("no trial started")
    finally:
        rdb.engine.dispose()


@pytest.mark.slow
def test_four_workers_share_the_budget_and_survive_a_kill(
    postgres, project, snn_checkpoints, generator_checkpoints, tmp_path
):
    optuna_url = postgres.create_database("optuna_tune4")
    mlflow_url = postgres.create_database("mlflow_tune4")
    tune = {
        "generators": ["sngan"],  # one study
        "n_trials": N_TRIALS,
        "min_trials": N_TRIALS,  # no early stop: every slot is run
        "budget": 1024,
        "batch": 16,
        "neurons": 2,
        "validation": 2,
        "ranks": [2, 3],
        "grid_n": [4, 8],
        "storage": optuna_url,
        "heartbeat": 1,
        "rungs": 2,
    }
    params = _project(tmp_path, project[1].root, tune)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_url}
    cmd = [sys.executable, "-m", "spikemax.cli", "tune", "--workers", "4", "--params", str(params)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed = _kill_one_running(optuna_url, proc)
        _, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]

    (name,) = optuna.get_all_study_names(optuna_url)
    trials = optuna.load_study(study_name=name, storage=optuna_url).get_trials()
    by_state: dict[str, list] = {}
    for tr in trials:
        by_state.setdefault(tr.state.name, []).append(tr)
    finished = by_state.get("COMPLETE", []) + by_state.get("PRUNED", [])
    assert len(finished) == N_TRIALS and "RUNNING" not in by_state
    assert len({tuple(sorted(tr.params.items())) for tr in finished}) == N_TRIALS  # 0 duplicates
    assert trials[killed].state.name == "FAIL"
    # Every other FAIL was never evaluated (lost the race for a slot, or repeated a point): no run.
    evaluated = [tr for tr in trials if "mlflow_run_id" in tr.user_attrs]
    assert {tr.number for tr in evaluated} == {tr.number for tr in finished} | {killed}

    client = mlflow.MlflowClient(mlflow_url)
    exp = client.get_experiment_by_name(tracking.TUNING_EXPERIMENT)
    runs = client.search_runs(
        [exp.experiment_id], filter_string="tags.`spikemax.trial_state` != 'VALIDATION'", max_results=1000
    )
    assert sorted(int(r.data.tags["spikemax.trial"]) for r in runs) == sorted(tr.number for tr in evaluated)
    status = {r.info.run_id: (r.info.status, r.data.tags["spikemax.trial_state"]) for r in runs}
    for tr in evaluated:
        # A pruned trial ended as planned: FINISHED, told apart by its state tag (MLflow has no PRUNED).
        want = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}[tr.state.name]
        assert status[tr.user_attrs["mlflow_run_id"]] == (want, tr.state.name)
    complete = [r for r in runs if r.data.tags["spikemax.trial_state"] == "COMPLETE"]
    assert all("median_am_gain" in r.data.metrics for r in complete)
    assert len(complete) == len(by_state.get("COMPLETE", []))
