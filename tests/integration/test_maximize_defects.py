"""The maximize stage's defects of issue #20, each pinned: no executable state, a refused run changes
nothing, one process per project, SIGTERM and dead processes end runs FAILED, engine settings are
not params, cold twins only when asked."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from spikemax import SpikemaxError, tracking
from spikemax import params as params_mod
from spikemax.am.engine import EngineSettings
from spikemax.am.results import STATE_ARRAYS, STATE_FIELDS, load_state
from spikemax.am.runtime import project_lock
from spikemax.stages.maximize import run as run_stage
from tests.support.maximize import am_runs
from tests.support.project import run_cli, write_params

pytestmark = pytest.mark.usefixtures("own_store")

TINY = {
    "checkpoints": [0, -1],
    "generators": ["vqvae"],
    "targets": ["class:0", "lif1:0"],
    "units_per_layer": 0,
    "methods": ["tt"],
    "seeds": [0],
    "budget": 32,
    "batch": 16,
    "prior_images": 200,
}


def _copy(root: Path, project, maximize: dict, **top) -> tuple[params_mod.Params, params_mod.Paths]:
    """A project sharing the fixture's prepared data and SNN checkpoints, with its own generator files."""
    params, paths = project
    (root / "data").mkdir(parents=True)
    (root / "data" / "prepared").symlink_to(paths.prepared)
    (root / "models").mkdir()
    (root / "models" / "snn").symlink_to(paths.snn_dir)
    shutil.copytree(paths.generators_dir, root / "models" / "generators")
    path = write_params(root, {"prepare": params.prepare.model_dump(), "maximize": maximize, **top})
    return params_mod.load(path, root=root)


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under results/ and metrics/ with its content."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for d in ("results", "metrics")
        for p in sorted((root / d).rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def models(project, snn_checkpoints, generator_checkpoints):
    return project


def test_optimizer_state_is_arrays_and_json_and_a_planted_pickle_is_never_loaded(tmp_path, models):
    params, paths = _copy(tmp_path / "p", models, TINY)
    metrics = run_stage(params, paths)
    am = paths.results / "am"
    df = pd.read_csv(am / "summary.csv")
    first = df[df.epoch == df.epoch.min()]
    for run_dir in first.run_dir:
        assert (am / run_dir / STATE_ARRAYS).is_file() and (am / run_dir / STATE_FIELDS).is_file()
        assert not list((am / run_dir).glob("*.pkl"))
        state = load_state(am / run_dir)
        assert state["method"] == "tt" and isinstance(state["theta"], np.ndarray)
    # measure_warm_start is off by default: no cold twin ran, nothing was measured.
    assert metrics["queries_run"] == int(df.n_queries.sum()) and (df.queries_saved == 0).all()

    # A planted pickle where the old code loaded one: the rerun of the last checkpoint never runs it.
    marker = tmp_path / "pwned"
    for run_dir in first.run_dir:
        for name in (STATE_ARRAYS, STATE_FIELDS):
            (am / run_dir / name).unlink()
        (am / run_dir / "tt_state.pkl").write_bytes(pickle.dumps(_Planted(str(marker))))
    for run_dir in df[df.epoch == df.epoch.max()].run_dir:
        (am / run_dir / "summary.json").unlink()  # those runs are redone
    run_stage(params, paths)
    assert not marker.exists()
    again = pd.read_csv(am / "summary.csv")
    for run_dir in again[again.epoch == again.epoch.max()].run_dir:
        assert json.loads((am / run_dir / "summary.json").read_text())["warm_start_from"] == ""


class _Planted:
    """Unpickling it would write the marker file (code execution)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "ran"))


def test_a_state_archive_holding_a_pickle_is_refused(tmp_path):
    np.savez(tmp_path / STATE_ARRAYS, theta=np.array([{"x": 1}], dtype=object))
    (tmp_path / STATE_FIELDS).write_text(json.dumps({"fields": {"method": "tt"}, "arrays": ["theta"]}))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_state(tmp_path)


@pytest.mark.parametrize("fault", ["corrupt generator", "missing GPU"])
def test_a_refused_run_changes_no_output_and_opens_no_run(tmp_path, models, fault):
    small = {**TINY, "checkpoints": [-1], "methods": ["random"]}
    params, paths = _copy(tmp_path / "p", models, small)
    run_stage(params, paths)
    before, n_runs = _snapshot(paths.root), len(am_runs(paths.root))
    if fault == "corrupt generator":
        (paths.generators_dir / "vqvae.ckpt").write_bytes(b"not a checkpoint")
        bad = params.model_copy(update={"maximize": params.maximize.model_copy(update={"seeds": [1]})})
        needle = "vqvae"
    else:
        if torch.cuda.device_count() > 9:
            pytest.skip("this machine has a cuda:9")
        bad = params.model_copy(update={"device": "cuda:9"})
        needle = "cuda:9"
    with pytest.raises(SpikemaxError, match=needle):
        run_stage(bad, paths)
    assert _snapshot(paths.root) == before
    assert len(am_runs(paths.root)) == n_runs


def test_a_second_process_exits_naming_the_lock_holder(tmp_path, models):
    params, paths = _copy(tmp_path / "p", models, {**TINY, "checkpoints": [-1]})
    with project_lock(paths, "maximize"):
        res = run_cli("maximize", cwd=paths.root)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert f"pid {os.getpid()}" in lines[0] and socket.gethostname() in lines[0]
    assert not (paths.results / "am").exists() and am_runs(paths.root) == []


def test_sigterm_ends_the_open_runs_failed(tmp_path, models):
    cfg = {**TINY, "checkpoints": [-1], "methods": ["random"], "budget": 100000, "batch": 8}
    params, paths = _copy(tmp_path / "p", models, cfg)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "spikemax.cli", "maximize"], cwd=paths.root, env=env, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if len(list((paths.results / "am").glob("runs/*/queries.arrows"))) == 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()[-2000:] if proc.stderr else ""
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # The scan and its AM runs end FAILED (group runs only hold runs: FINISHED when created).
    runs = [r for r in am_runs(paths.root) if tracking.GROUP_TAG not in r.data.tags]
    assert runs and {r.info.status for r in runs} == {"FAILED"}
    nested = [r for r in runs if tracking.RUN_KEY_TAG in r.data.tags]
    assert len(nested) == 2 and all("KeyboardInterrupt" in r.data.tags["spikemax.failure"] for r in nested)


def test_a_run_left_running_by_a_dead_process_is_failed_whatever_its_plan(tmp_path, models):
    params, paths = _copy(tmp_path / "p", models, {**TINY, "checkpoints": [-1], "methods": ["random"]})
    client = mlflow.MlflowClient(tracking.configure(paths.root))
    eid = tracking.experiment_id(tracking.AM_EXPERIMENT, paths.root)
    orphan = client.create_run(eid, tags={tracking.RUN_KEY_TAG: "e000-0.000_sngan_class-9_cma_s7_deadbeef"})
    run_stage(params, paths)
    run = client.get_run(orphan.info.run_id)
    assert run.info.status == "FAILED" and "interrupted" in run.data.tags["spikemax.failure"]


def test_engine_settings_come_from_options_then_environment_then_old_params(monkeypatch, caplog):
    for name in ("SPIKEMAX_ENGINE", "SPIKEMAX_RAY_ADDRESS", "SPIKEMAX_RAY_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    m = params_mod.validate({"maximize": {}}).maximize
    assert EngineSettings.resolve(m) == EngineSettings("local", "", 0)
    monkeypatch.setenv("SPIKEMAX_ENGINE", "ray")
    monkeypatch.setenv("SPIKEMAX_RAY_WORKERS", "3")
    assert EngineSettings.resolve(m) == EngineSettings("ray", "", 3)
    assert EngineSettings.resolve(m, engine="local", workers=1) == EngineSettings("local", "", 1)
    monkeypatch.delenv("SPIKEMAX_ENGINE")
    monkeypatch.delenv("SPIKEMAX_RAY_WORKERS")
    old = params_mod.validate({"maximize": {"engine": "ray", "ray_address": "auto"}}).maximize
    with caplog.at_level(logging.WARNING):
        assert EngineSettings.resolve(old) == EngineSettings("ray", "auto", 0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("deprecated" in line and "\n" not in line for line in lines)
    with pytest.raises(SpikemaxError, match="engine 'spark'"):
        EngineSettings.resolve(m, engine="spark")


def test_the_old_name_epochs_is_read_as_checkpoints_with_one_line(caplog):
    with caplog.at_level(logging.WARNING):
        m = params_mod.validate({"maximize": {"epochs": [0, -1]}}).maximize
    assert m.checkpoints == [0, -1]
    (line,) = [r.getMessage() for r in caplog.records]
    assert "maximize.epochs is deprecated" in line and "checkpoints" in line
    with pytest.raises(params_mod.ParamsError, match="checkpoints"):
        params_mod.validate({"maximize": {"epochs": [0], "checkpoints": [1]}})
