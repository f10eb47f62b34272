"""The maximize stage on a real local Ray cluster equals the in-process engine; a lost group resumes."""

from __future__ import annotations

import pandas as pd
import pytest

from spikemax import params as P
from spikemax.querylog import read_queries
from spikemax.stages.maximize import run as run_stage

from .test_maximize import _project_copy, _runs

SMALL = {
    "epochs": [0, -1],
    "generators": ["sngan"],
    "targets": ["class:0", "lif1:0", "lif2:1"],
    "units_per_layer": 0,
    "methods": ["tt", "random"],
    "seeds": [0, 1],
    "budget": 32,
    "batch": 16,
}


@pytest.fixture(autouse=True)
def _own_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _tables(paths: P.Paths) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """summary.csv (sorted by run key, ids and timings dropped) and every run's query table."""
    df = pd.read_csv(paths.results / "am" / "summary.csv").sort_values("run_key").reset_index(drop=True)
    queries = {
        r.run_key: read_queries(paths.results / "am" / r.run_dir).drop(columns="elapsed_s") for r in df.itertuples()
    }
    return df.drop(columns="run_id"), queries


@pytest.mark.slow
def test_ray_engine_equals_in_process(tmp_path, project, snn_checkpoints, generator_checkpoints, ray_local):
    local = _project_copy(tmp_path / "local", project, SMALL)
    remote = _project_copy(tmp_path / "ray", project, {**SMALL, "engine": "ray", "ray_address": ray_local})
    m_local = run_stage(*local)
    m_ray = run_stage(*remote)
    assert m_ray["n_runs"] == m_local["n_runs"] == 2 * 3 * 2 * 2 and m_ray["n_failed"] == 0
    assert m_ray["queries_run"] == m_local["queries_run"]
    df_local, q_local = _tables(local[1])
    df_ray, q_ray = _tables(remote[1])
    pd.testing.assert_frame_equal(df_ray, df_local)
    assert q_ray.keys() == q_local.keys()
    for key, q in q_local.items():
        pd.testing.assert_frame_equal(q_ray[key], q, obj=key)
    # The tasks' runs are nested under the driver's parent run, each FINISHED once.
    nested = [r for r in _runs(remote[1].root) if "spikemax.run_key" in r.data.tags]
    parent = {r.info.run_id for r in _runs(remote[1].root) if "spikemax.run_key" not in r.data.tags}
    assert len(nested) == len(df_ray) and {r.info.status for r in nested} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in nested} == parent
    # Rerun: nothing left to do, nothing redone.
    assert run_stage(*remote)["queries_run"] == 0
