"""Every MLflow run a stage opens ends FINISHED or FAILED, on error paths too (never RUNNING for ever)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from spikemax import SpikemaxError, tracking
from spikemax import params as P
from tests.support.project import TINY_GENERATORS, TINY_PREPARE, TINY_SNN


class Boom(RuntimeError):
    """The injected failure."""


def _boom(*args, **kwargs):
    raise Boom("injected failure")


def statuses(root: Path) -> list[str]:
    """Status of every run in the project's store."""
    client = mlflow.MlflowClient(tracking.configure(root))
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r.info.status for r in client.search_runs(exps, max_results=1000)]


@pytest.fixture
def root(tmp_path, project, monkeypatch) -> Path:
    """A fresh project (own MLflow store) sharing the session's prepared data."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").symlink_to(project[1].prepared, target_is_directory=True)
    return tmp_path


def _params(root: Path, **sections) -> tuple[P.Params, P.Paths]:
    params = P.validate({"prepare": TINY_PREPARE, "generators": TINY_GENERATORS, **sections})
    return params, P.Paths(root)


def test_train_snn_run_fails_on_error(root, monkeypatch):
    from spikemax.stages import train_snn

    monkeypatch.setattr(train_snn.EpochRecorder, "record", _boom)
    with pytest.raises(Boom, match="injected"):
        train_snn.run(*_params(root, snn=TINY_SNN))
    assert statuses(root) == ["FAILED"]


def test_train_generator_run_fails_on_error(root, monkeypatch):
    from spikemax.stages import train_generator

    monkeypatch.setattr(train_generator, "make_trainer", _boom)
    with pytest.raises(Boom, match="injected"):
        train_generator.run("vqvae", *_params(root))
    assert statuses(root) == ["FAILED"]


def test_check_generators_run_fails_on_error(root, project, snn_checkpoints, generator_checkpoints, monkeypatch):
    from spikemax.stages import check_generators

    (root / "models").symlink_to(project[1].root / "models", target_is_directory=True)
    monkeypatch.setattr(check_generators, "load_generator", _boom)
    with pytest.raises(Boom, match="injected"):
        check_generators.run(*_params(root))
    assert statuses(root) == ["FAILED"]


def test_maximize_refuses_a_corrupt_generator_before_opening_a_run(
    root, project, snn_checkpoints, generator_checkpoints
):
    from spikemax.stages import maximize

    models = root / "models"
    (models / "generators").mkdir(parents=True)
    (models / "snn").symlink_to(project[1].snn_dir, target_is_directory=True)
    (models / "generators" / "sngan.ckpt").write_bytes(b"not a checkpoint")
    am = {"checkpoints": [-1], "generators": ["sngan"], "targets": ["class:0"], "methods": ["random"], "budget": 8}
    with pytest.raises(SpikemaxError, match="sngan"):
        maximize.run(*_params(root, maximize=am))
    assert statuses(root) == []  # checked before the parent run opens: nothing to end FAILED


def test_analysis_run_fails_on_error(root, tmp_path):
    import pandas as pd

    from spikemax.analysis import log_mlflow

    out = tmp_path / "analysis"
    out.mkdir()
    with pytest.raises(Exception, match="analysis.json"):  # metrics/analysis.json was never written
        log_mlflow(P.Paths(root), P.validate({}), {"claim2": {"rho": 0.5}}, out, pd.DataFrame())
    assert statuses(root) == ["FAILED"]
