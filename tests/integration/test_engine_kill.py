"""A real Ray worker SIGKILLed mid-group: Ray retries the group, nothing finished is redone, results
equal the in-process engine's; a group that keeps losing its worker ends the stage FAILED."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from spikemax import SpikemaxError, tracking
from spikemax.am import engine
from spikemax.am.engine import EngineSettings
from spikemax.am.plan import plan
from spikemax.stages.maximize import run as run_stage
from spikemax.tracking import RUN_KEY_TAG
from tests.support import ray_kill
from tests.support.maximize import ENGINE_SMALL as SMALL
from tests.support.maximize import am_runs, assert_same_results, project_copy

KILL = {**SMALL, "seeds": [0]}  # one restart: the killed group and its warm-started successor
ON_RAY = EngineSettings("ray")  # joins the fixture's cluster


pytestmark = pytest.mark.usefixtures("own_store")


@pytest.fixture(scope="module")
def ray_killer(tmp_path_factory) -> Iterator[Path]:
    """A local Ray cluster (2 worker CPUs) whose workers carry the kill hook; yields the plan file
    that arms it (unarmed while the file is absent)."""
    ray = pytest.importorskip("ray")
    plan_file = tmp_path_factory.mktemp("kill") / "plan.json"
    ray.cloudpickle.register_pickle_by_value(ray_kill)  # workers cannot import the tests package
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={
            "worker_process_setup_hook": ray_kill.install,
            "env_vars": {ray_kill.KILL_ENV: str(plan_file), "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        },
    )
    try:
        yield plan_file
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(ray_kill)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_finished_runs_are_kept(
    tmp_path, project, snn_checkpoints, generator_checkpoints, ray_killer
):
    local = project_copy(tmp_path / "local", project, KILL)
    remote = project_copy(tmp_path / "ray", project, KILL)
    # Epoch 0's TT group: its worker dies while finishing its second run; epoch -1's TT group waits for it.
    ray_kill.plan_kill(ray_killer, epoch=0, generator="sngan", method="tt", seed=0, after=1, once=True)
    m_ray = run_stage(*remote, ON_RAY)
    m_local = run_stage(*local)
    (death,) = ray_kill.deaths(ray_killer)
    assert not _alive(death["pid"])
    (kept_key,) = death["finished"]  # finished before the kill; `lost_key` was finishing when it came
    kept, lost_key = death["finished"][kept_key], death["dying"]

    assert m_ray["n_runs"] == m_local["n_runs"] == 2 * 3 * 2 and m_ray["n_failed"] == m_local["n_failed"] == 0
    assert m_ray["queries_run"] == m_local["queries_run"]  # the lost attempt's finished run counts once
    assert_same_results(local[1], remote[1])

    # The run finished before the kill is the one in the summary, its files untouched by the retry.
    summary = pd.read_csv(remote[1].results / "am" / "summary.csv").set_index("run_key")
    assert summary.loc[kept_key, "run_id"] == kept["run_id"]
    run_dir = remote[1].results / "am" / summary.loc[kept_key, "run_dir"]
    assert ray_kill.digests(run_dir) == kept["files"]

    # MLflow: nothing RUNNING; one FINISHED run per key (the summary's); only the killed attempt's
    # open runs of that group have a second, FAILED run.
    runs = am_runs(remote[1].root)
    assert "RUNNING" not in {r.info.status for r in runs}
    nested = [r for r in runs if RUN_KEY_TAG in r.data.tags]
    finished = {r.data.tags[RUN_KEY_TAG]: r.info.run_id for r in nested if r.info.status == "FINISHED"}
    assert len(finished) == sum(r.info.status == "FINISHED" for r in nested) == len(summary)
    assert finished == summary["run_id"].to_dict()
    failed = [r for r in nested if r.info.status == "FAILED"]
    group = {k for k in summary.index if summary.loc[k, "epoch"] == 0 and summary.loc[k, "method"] == "tt"}
    assert Counter(r.data.tags[RUN_KEY_TAG] for r in failed) == Counter(group - {kept_key})
    assert lost_key in group - {kept_key}
    assert {r.data.tags["spikemax.failure"] for r in failed} == {"interrupted (worker lost; group retried)"}
    (parent,) = [r for r in runs if tracking.is_scan(r)]
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_a_group_that_keeps_losing_its_worker_fails_the_stage(
    tmp_path, project, snn_checkpoints, generator_checkpoints, ray_killer, monkeypatch
):
    monkeypatch.setattr(engine, "MAX_RETRIES", 1)  # each attempt starts a worker: keep them few
    params, paths = project_copy(tmp_path / "p", project, {**KILL, "checkpoints": [-1], "methods": ["random"]})
    (e,) = plan(params, paths).epochs
    ray_kill.plan_kill(ray_killer, epoch=e, generator="sngan", method="random", seed=0, after=0, once=False)
    with pytest.raises(
        SpikemaxError, match=rf"group e{e} sngan random s0 lost its Ray worker and 1 retries did not finish it"
    ):
        run_stage(params, paths, ON_RAY)
    assert len(ray_kill.deaths(ray_killer)) == 2
    runs = am_runs(paths.root)
    (parent,) = [r for r in runs if tracking.is_scan(r)]
    assert parent.info.status == "FAILED"
    nested = [r for r in runs if RUN_KEY_TAG in r.data.tags]
    # Every attempt opened the group's 3 runs: the retry failed the first attempt's, the driver the last's.
    assert {r.info.status for r in nested} == {"FAILED"}
    assert Counter(r.data.tags["spikemax.failure"] for r in nested) == {
        "interrupted (worker lost; group retried)": 3,
        "interrupted (the group's Ray task failed or the stage stopped)": 3,
    }
    assert json.loads((paths.metrics / "am.json").read_text())["n_failed"] == 3

    ray_killer.unlink()  # the cluster heals: a rerun resumes and finishes the group
    assert run_stage(params, paths, ON_RAY)["n_runs"] == 3
