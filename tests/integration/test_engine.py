"""The maximize stage on a real local Ray cluster equals the in-process engine; a lost group resumes."""

from __future__ import annotations

import pandas as pd
import pytest

from spikemax import tracking
from spikemax.am.engine import EngineSettings
from spikemax.querylog import read_queries
from spikemax.stages.maximize import run as run_stage
from tests.support.maximize import ENGINE_SMALL as SMALL
from tests.support.maximize import am_runs, assert_same_results, project_copy

pytestmark = pytest.mark.usefixtures("own_store")


@pytest.mark.slow
def test_ray_engine_equals_in_process(tmp_path, project, snn_checkpoints, generator_checkpoints, ray_local):
    local = project_copy(tmp_path / "local", project, SMALL)
    remote = project_copy(tmp_path / "ray", project, SMALL)
    on_ray = EngineSettings("ray", ray_local)  # engine settings are not params: no rerun when they change
    m_local = run_stage(*local)
    m_ray = run_stage(*remote, on_ray)
    assert m_ray["n_runs"] == m_local["n_runs"] == 2 * 3 * 2 * 2 and m_ray["n_failed"] == 0
    assert m_ray["queries_run"] == m_local["queries_run"]
    assert_same_results(local[1], remote[1])
    # The tasks' runs are nested under the driver's parent run, each FINISHED once.
    nested = [r for r in am_runs(remote[1].root) if "spikemax.run_key" in r.data.tags]
    parent = {r.info.run_id for r in am_runs(remote[1].root) if tracking.is_scan(r)}
    assert len(nested) == m_ray["n_runs"] and {r.info.status for r in nested} == {"FINISHED"}
    assert {r.data.tags[tracking.SCAN_TAG] for r in nested} == parent
    # Rerun: nothing left to do, nothing redone.
    assert run_stage(*remote, on_ray)["queries_run"] == 0


@pytest.mark.slow
def test_a_retried_group_keeps_finished_runs_and_redoes_the_lost_one(
    tmp_path, project, snn_checkpoints, generator_checkpoints
):
    from mlflow import MlflowClient

    from spikemax.am.group import group_on_worker, stats_on_worker
    from spikemax.am.plan import plan

    params, paths = project_copy(
        tmp_path / "p", project, {**SMALL, "checkpoints": [-1], "methods": ["random"], "seeds": [0]}
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
    (index,) = [i for i, g in enumerate(pl.groups) if lost.run_key in {r.key for r in g.runs}]
    assert {r.key for r in pl.groups[index].runs} == set(before.run_key)
    stats = stats_on_worker(params, paths, pl.groups[index].snn_ckpt, pl.targets)
    res = group_on_worker(params, paths, pl, index, parent, stats, uri)  # Ray's retry of the group
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


@pytest.mark.slow
def test_local_processes_equal_in_process(tmp_path, project, snn_checkpoints, generator_checkpoints):
    """Two local worker processes (two checkpoint chains side by side: tt and random) ask and record
    exactly what one process does; a rerun has nothing left to do."""
    small = {**SMALL, "seeds": [0]}
    local = project_copy(tmp_path / "local", project, small)
    procs = project_copy(tmp_path / "procs", project, small)
    two = EngineSettings(processes=2)
    m_local = run_stage(*local)
    m_procs = run_stage(*procs, two)
    assert (
        m_procs["n_runs"] == m_local["n_runs"] == 2 * 3 * 2 and m_procs["n_failed"] == 0
    )  # checkpoints x targets x methods
    assert m_procs["queries_run"] == m_local["queries_run"]
    assert_same_results(local[1], procs[1])
    nested = [r for r in am_runs(procs[1].root) if "spikemax.run_key" in r.data.tags]
    assert len(nested) == m_procs["n_runs"] and {r.info.status for r in nested} == {"FINISHED"}
    assert run_stage(*procs, two)["queries_run"] == 0


def test_processes_setting_from_the_cli_or_environment(monkeypatch):
    """`--processes` / SPIKEMAX_PROCESSES: 0 means one per core; a bad value is one line."""
    from spikemax import SpikemaxError

    monkeypatch.delenv("SPIKEMAX_PROCESSES", raising=False)
    assert EngineSettings.resolve().processes == 1
    assert EngineSettings.resolve(processes=0).local_processes() >= 1
    monkeypatch.setenv("SPIKEMAX_PROCESSES", "3")
    assert EngineSettings.resolve().processes == 3
    monkeypatch.setenv("SPIKEMAX_PROCESSES", "many")
    with pytest.raises(SpikemaxError, match="processes 'many'"):
        EngineSettings.resolve()
    with pytest.raises(SpikemaxError, match="processes -1"):
        EngineSettings.resolve(processes=-1)
