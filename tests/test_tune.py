"""The tune stage: a real Optuna JournalStorage study, trials in MLflow, resumable to n_trials."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

from spikemax import SpikemaxError, tracking
from spikemax import params as P
from spikemax.generators import load_generator
from spikemax.stages.tune import run as run_stage
from spikemax.tuning import pick_panel, with_resolution


@pytest.fixture
def tune_project(project, snn_checkpoints, generator_checkpoints, tmp_path):
    """A fresh project root sharing the session's prepared data and trained models."""
    _, shared = project
    (tmp_path / "data").symlink_to(shared.root / "data")
    (tmp_path / "models").symlink_to(shared.root / "models")
    return P.Paths(tmp_path)


def tiny(n_trials: int) -> P.Params:
    return P.validate(
        {"tune": {"n_trials": n_trials, "budget": 32, "batch": 16, "neurons": 2, "ranks": [2, 3], "grid_n": [4, 8]}}
    )


@pytest.mark.slow
def test_study_runs_logs_and_resumes(tune_project, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = run_stage(tiny(3), tune_project)
    assert summary["n_trials"] == 3
    assert summary["best_rank"] in (2, 3) and summary["best_grid_n"] in (4, 8)
    assert 0.01 <= summary["best_lr"] <= 0.3 and summary["best_mean_am_gain"] > 0
    assert json.loads((tune_project.metrics / "tune.json").read_text()) == summary
    assert (tune_project.root / "optuna" / "journal.log").is_file()
    client = mlflow.MlflowClient(tracking.configure(tune_project.root))
    runs = client.search_runs([tracking.experiment_id("tuning", tune_project.root)])
    assert len(runs) == 3 and all("mean_am_gain" in r.data.metrics for r in runs)
    assert {r.data.params["rank"] for r in runs} <= {"2", "3"}
    # Same params: the study is complete, nothing re-runs; one more trial asked: exactly one runs.
    assert run_stage(tiny(3), tune_project)["n_trials"] == 3
    assert run_stage(tiny(4), tune_project)["n_trials"] == 4
    assert len(client.search_runs([tracking.experiment_id("tuning", tune_project.root)])) == 4


def test_resolution_applies_to_continuous_latents_only(generator_checkpoints):
    sngan = load_generator("sngan", generator_checkpoints["sngan"])
    before = (sngan.n, sngan.values.clone())
    fine = with_resolution(sngan, 32)
    assert fine.n == 32 and sngan.n == before[0] and sngan.values.equal(before[1])
    assert len(fine.values) == 32 and float(fine.values.sum()) == pytest.approx(0.0, abs=1e-5)
    assert fine.decode(np.full((1, fine.d), 31)).shape[0] == 1
    vq = load_generator("vqvae", generator_checkpoints["vqvae"])
    with pytest.raises(SpikemaxError, match="continuous latents"):
        with_resolution(vq, 8)


def test_panel_spreads_over_layers_and_skips_silent_units():
    layers = {"a": 3, "b": 2}
    rates = {"a": np.array([[0.0, 0.5, 0.2]]), "b": np.array([[0.1, 0.0]])}
    panel = pick_panel(layers, rates, 3, seed=0)
    assert len(panel) == 3 and ("a", 0) not in panel and ("b", 1) not in panel
    assert {layer for layer, _ in panel} == {"a", "b"}
    with pytest.raises(SpikemaxError, match="no neuron"):
        pick_panel(layers, {"a": np.zeros((1, 3)), "b": np.zeros((1, 2))}, 2, seed=0)


@pytest.mark.slow
def test_two_workers_on_the_journal_share_n_trials(tune_project, monkeypatch):
    import optuna

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = run_stage(tiny(4), tune_project, workers=2)
    assert summary["n_trials"] == 4
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tune_project.root / "optuna" / "journal.log"))
    )
    trials = optuna.load_study(study_name=summary["study"], storage=storage).get_trials()
    finished = [tr for tr in trials if tr.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4 and len({tuple(sorted(tr.params.items())) for tr in finished}) == 4
    assert len({tr.user_attrs["worker"] for tr in finished}) <= 2
    client = mlflow.MlflowClient(tracking.configure(tune_project.root))
    runs = client.search_runs([tracking.experiment_id("tuning", tune_project.root)])
    assert sorted(int(r.data.tags["spikemax.trial"]) for r in runs) == sorted(
        tr.number for tr in trials if "mlflow_run_id" in tr.user_attrs
    )
