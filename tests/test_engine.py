"""The maximize stage on a real local Ray cluster equals the in-process engine; a lost group resumes."""

from __future__ import annotations

import pandas as pd
import pytest

from spikemax import params as P
from spikemax import tracking
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


pytestmark = pytest.mark.usefixtures("own_store")


def _tables(paths: P.Paths) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """summary.csv (sorted by run key, ids and timings dropped) and every run's query table."""
    df = pd.read_csv(paths.results / "am" / "summary.csv").sort_values("run_key").reset_index(drop=True)
    queries = {
        r.run_key: read_queries(paths.results / "am" / r.run_dir).drop(columns="elapsed_s") for r in df.itertuples()
    }
    return df.drop(columns="run_id"), queries


def assert_same_results(a: P.Paths, b: P.Paths) -> None:
    """Same summary rows (ids and timings aside) and the same query table for every run key."""
    df_a, q_a = _tables(a)
    df_b, q_b = _tables(b)
    pd.testing.assert_frame_equal(df_b, df_a)
    assert q_b.keys() == q_a.keys()
    for key, q in q_a.items():
        pd.testing.assert_frame_equal(q_b[key], q, obj=key)


@pytest.mark.slow
def test_ray_engine_equals_in_process(tmp_path, project, snn_checkpoints, generator_checkpoints, ray_local):
    local = _project_copy(tmp_path / "local", project, SMALL)
    remote = _project_copy(tmp_path / "ray", project, {**SMALL, "engine": "ray", "ray_address": ray_local})
    m_local = run_stage(*local)
    m_ray = run_stage(*remote)
    assert m_ray["n_runs"] == m_local["n_runs"] == 2 * 3 * 2 * 2 and m_ray["n_failed"] == 0
    assert m_ray["queries_run"] == m_local["queries_run"]
    assert_same_results(local[1], remote[1])
    # The tasks' runs are nested under the driver's parent run, each FINISHED once.
    nested = [r for r in _runs(remote[1].root) if "spikemax.run_key" in r.data.tags]
    parent = {r.info.run_id for r in _runs(remote[1].root) if tracking.is_scan(r)}
    assert len(nested) == m_ray["n_runs"] and {r.info.status for r in nested} == {"FINISHED"}
    assert {r.data.tags[tracking.SCAN_TAG] for r in nested} == parent
    # Rerun: nothing left to do, nothing redone.
    assert run_stage(*remote)["queries_run"] == 0


@pytest.mark.slow
def test_a_retried_group_keeps_finished_runs_and_redoes_the_lost_one(
    tmp_path, project, snn_checkpoints, generator_checkpoints
):
    from mlflow import MlflowClient

    from spikemax.am.plan import plan
    from spikemax.stages.maximize import remote_group, remote_stats

    params, paths = _project_copy(
        tmp_path / "p", project, {**SMALL, "epochs": [-1], "methods": ["random"], "seeds": [0]}
    )
    run_stage(params, paths)
    am = paths.results / "am"
    before = pd.read_csv(am / "summary.csv")
    lost = before.iloc[0]
    q_lost = read_queries(am / lost.run_dir)
    # A worker killed while finishing `lost`: its summary never written, its run left RUNNING.
    (am / lost.run_dir / "summary.json").unlink()
    uri = tracking.tracking_uri(paths.root)
    client = MlflowClient(uri)
    eid = tracking.experiment_id(tracking.AM_EXPERIMENT, paths.root)
    zombie = client.create_run(eid, tags={tracking.RUN_KEY_TAG: lost.run_key}).info.run_id
    parent = client.create_run(eid).info.run_id
    pl = plan(params, paths)
    stats = remote_stats(params, paths, pl, int(lost.epoch))
    res = remote_group(params, paths, pl, list(before.run_key), parent, stats, uri)  # Ray's retry of the group
    assert res["failed"] == [] and res["queries"] == SMALL["budget"]  # only the lost run ran again
    assert set(res["rows"]) == set(before.run_key)
    for row in before.itertuples():
        same = res["rows"][row.run_key]["run_id"] == row.run_id
        assert same == (row.run_key != lost.run_key)
    assert client.get_run(zombie).info.status == "FAILED"
    assert client.get_run(res["rows"][lost.run_key]["run_id"]).info.status == "FINISHED"
    pd.testing.assert_frame_equal(
        read_queries(am / lost.run_dir).drop(columns="elapsed_s"), q_lost.drop(columns="elapsed_s")
    )
