"""The tune stage: a real Optuna JournalStorage study over method and settings, trials in MLflow,
its winner validated against the default, resumable."""

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


def tiny(n_trials: int, generators: tuple[str, ...] = ("sngan", "vqvae")) -> P.Params:
    return P.validate(
        {
            "tune": {
                "generators": list(generators),
                "n_trials": n_trials,
                "min_trials": 5,
                "neurons": 2,
                "validation": 2,
                "ranks": [2, 3],
                "grid_n": [4, 8],
            },
            "maximize": {"budget": 32, "batch": 16, "prior_images": 200},
        }
    )


@pytest.mark.slow
def test_study_runs_logs_and_resumes(tune_project, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = run_stage(tiny(3), tune_project)
    assert (summary["budget"], summary["batch"], summary["score"]) == (32, 16, "median_am_gain")  # maximize's
    sn, vq = summary["generators"]["sngan"], summary["generators"]["vqvae"]
    assert sn["n_trials"] == vq["n_trials"] == 3 and sn["study"] != vq["study"]
    assert sn["stopped"] == vq["stopped"] == "budget"  # 3 < min_trials: the stopping rule never applies
    assert sn["winner"]["method"] in ("tt", "cma") and sn["winner"]["settings"]["grid_n"] in (4, 8, 16)
    assert "grid_n" not in vq["winner"]["settings"]  # a codebook's size is the generator's
    for s in (sn, vq):
        assert s["winner"]["median_am_gain"] > 0 and s["validation"]["winner"]["n"] == 2
        assert s["validation"]["verdict"] in ("better", "tie", "worse", "same")
        assert s["adopted"] == (s["validation"]["verdict"] == "better")
        assert (s["method"], s["settings"]) == (
            (s["winner"]["method"], s["winner"]["settings"])
            if s["adopted"]
            else (s["validation"]["default_method"], {})
        )
    # The panels are disjoint and hold no maximize target.
    trials = [tr for tr in _study(tune_project, sn["study"]).trials if "targets" in tr.user_attrs]
    train, val = set(trials[0].user_attrs["targets"]), set(sn["validation"]["targets"])
    assert len(train) == 2 and not train & val
    assert not any(n.startswith("out:") for n in train | val)  # maximize targets class:* = every output unit
    assert json.loads((tune_project.metrics / "tune.json").read_text()) == summary
    assert (tune_project.root / "optuna" / "journal.log").is_file()
    client = mlflow.MlflowClient(tracking.configure(tune_project.root))
    eid = tracking.experiment_id("tuning", tune_project.root)
    runs = client.search_runs([eid], filter_string="tags.`spikemax.trial_state` != 'VALIDATION'")
    assert len(runs) == 6 and all("median_am_gain" in r.data.metrics for r in runs)
    assert {r.data.tags["spikemax.study"] for r in runs} == {sn["study"], vq["study"]}
    # Browsable: runs named after their study, pruned trials FINISHED with their state as a tag.
    assert all(
        r.info.run_name == f"{r.data.tags['spikemax.study']}-t{int(r.data.tags['spikemax.trial']):02d}" for r in runs
    )
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["spikemax.trial_state"] for r in runs} <= {"COMPLETE", "PRUNED"}
    assert {r.data.params["method"] for r in runs} <= {"tt", "cma"}
    assert len(client.search_runs([eid], filter_string="tags.`spikemax.trial_state` = 'VALIDATION'")) == 2
    # Every tuning run, trials and validations, names its stage and params hash, in the one tag vocabulary.
    for r in client.search_runs([eid]):
        assert r.data.tags[tracking.STAGE_TAG] == "tune" and tracking.PARAMS_HASH_TAG in r.data.tags
        assert all(k.startswith("mlflow.") or k in tracking.TAGS for k in r.data.tags), r.data.tags
    # Same params: the studies are complete, nothing re-runs (nor the validation); one more trial asked: one each.
    assert run_stage(tiny(3), tune_project)["generators"]["vqvae"]["n_trials"] == 3
    assert len(client.search_runs([eid])) == 8
    more = run_stage(tiny(4), tune_project)["generators"]
    assert more["sngan"]["n_trials"] == more["vqvae"]["n_trials"] == 4
    assert len(client.search_runs([eid], filter_string="tags.`spikemax.trial_state` != 'VALIDATION'")) == 8


def _study(paths: P.Paths, name: str):
    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(paths.root / "optuna" / "journal.log"))
    )
    return optuna.load_study(study_name=name, storage=storage)


def test_trials_score_the_median_am_gain_maximize_reports(tune_project, monkeypatch):
    """A trial's value is am_gain_summary's median over the training panel, of the maximize stage's
    TT runs with the trial's settings."""
    import optuna

    from spikemax.am.loop import run_am_group
    from spikemax.am.measures import dataset_stats
    from spikemax.data import Prepared
    from spikemax.neurons import make_responder, parse_target
    from spikemax.optim import make_optimizer, options_for
    from spikemax.selectivity import am_gain_summary
    from spikemax.snn import checkpoints, load_snn
    from spikemax.tuning import make_objective

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = tiny(1, ("vqvae",))
    params = params.model_copy(update={"tune": params.tune.model_copy(update={"rungs": 1})})
    epoch = max(checkpoints(tune_project))
    objective, targets = make_objective(params, tune_project, epoch, "vqvae")
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"method": "tt", "rank": 3, "lr": 0.05, "elite": 8})
    study.optimize(objective, n_trials=1)
    # The same runs by hand: the maximize stage's TT options with rank 3, lr 0.05, elite 8, and its prior.
    net = load_snn(checkpoints(tune_project)[epoch])
    layers = dict(net.spiking_layers())
    prepared = Prepared.load(tune_project.prepared)
    dmax = dataset_stats(net, prepared, [parse_target(t, layers) for t in targets], 512)["dataset_max"]
    grid = load_generator("vqvae", tune_project.generators_dir / "vqvae.ckpt")
    tt = params.maximize.tt.model_copy(update={"rank": 3, "lr": 0.05, "elite": 8})
    opts = options_for("tt", params.maximize.model_copy(update={"tt": tt}), grid)
    with np.load(tune_project.results / "tune" / "prior_vqvae_r3.npz") as z:
        from spikemax.optim.prior import TTPrior

        opts["prior"] = TTPrior.from_dict(z)
    opt = [make_optimizer("tt", grid.d, grid.n, seed=j, **opts) for j in range(len(targets))]
    res = run_am_group(opt, grid, make_responder(net, targets), 32, 16)
    want = am_gain_summary(np.array([r.best_response for r in res]), dmax)
    assert study.trials[0].value == pytest.approx(want["median_am_gain"])
    assert study.trials[0].user_attrs["frac_above_dataset"] == pytest.approx(want["frac_above_dataset"])
    assert study.trials[0].user_attrs["gains@32"] == pytest.approx(study.trials[0].user_attrs["gains"])


def test_a_study_without_a_completed_trial_keeps_the_default():
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from spikemax.stages.tune import study_result

    study = optuna.create_study(study_name="vqvae-e2-x", direction="maximize")
    dists = {
        "method": CategoricalDistribution(["tt", "cma"]),
        "rank": CategoricalDistribution([2, 3]),
        "lr": FloatDistribution(0.01, 0.3, log=True),
    }
    for rank in (2, 3):
        study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState.PRUNED,
                params={"method": "tt", "rank": rank, "lr": 0.1},
                distributions=dists,
                intermediate_values={16: 0.5},
            )
        )
    got = study_result(study, tiny(2, ("vqvae",)), None)
    assert (got["n_trials"], got["n_pruned"], got["winner"], got["adopted"]) == (2, 2, None, False)
    assert (got["method"], got["settings"]) == ("tt", {})  # the per-grid default of a codebook
    assert got["decision"].startswith("no trial completed (2 pruned") and got["decision"].endswith("default kept")


def test_surplus_and_duplicate_trials_log_one_line():
    import logging

    import optuna

    from spikemax.stages.tune import _quiet_unrun
    from spikemax.tuning import Duplicate, Surplus

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logging.getLogger("optuna").addHandler(handler)
    try:
        _quiet_unrun()
        study = optuna.create_study(direction="maximize")

        def objective(trial):
            trial.suggest_int("x", 0, 3)
            raise (Surplus if trial.number == 0 else Duplicate)(f"trial {trial.number} repeats trial 0: x")

        study.optimize(objective, n_trials=2, catch=(Surplus, Duplicate))
        study.optimize(lambda trial: 1 / 0, n_trials=1, catch=(ZeroDivisionError,))  # others keep theirs
    finally:
        logging.getLogger("optuna").removeHandler(handler)
    warnings = [r for r in records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings[:2]] == [
        "tune: not run (surplus): trial 0 repeats trial 0: x",
        "tune: not run (duplicate): trial 1 repeats trial 0: x",
    ]
    assert all(r.exc_info is None for r in warnings[:2])
    assert warnings[2].exc_info is not None and "ZeroDivisionError" in warnings[2].getMessage()
    assert any("Trial 2 failed with value" in r.getMessage() for r in warnings[3:])  # only theirs


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


def test_panel_spreads_over_layers_and_skips_silent_units_and_targets():
    layers = {"a": 3, "b": 2}
    rates = {"a": np.array([[0.0, 0.5, 0.2]]), "b": np.array([[0.1, 0.0]])}
    panel = pick_panel(layers, rates, 3, seed=0)
    assert len(panel) == 3 and ("a", 0) not in panel and ("b", 1) not in panel
    assert {layer for layer, _ in panel} == {"a", "b"}
    assert pick_panel(layers, rates, 3, seed=0, exclude={("a", 1)}) == [("a", 2), ("b", 0)]
    with pytest.raises(SpikemaxError, match="no neuron"):
        pick_panel(layers, {"a": np.zeros((1, 3)), "b": np.zeros((1, 2))}, 2, seed=0)


@pytest.mark.slow
def test_two_workers_on_the_journal_share_n_trials(tune_project, monkeypatch):
    import optuna

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = run_stage(tiny(4, ("sngan",)), tune_project, workers=2)["generators"]["sngan"]
    assert summary["n_trials"] == 4 and summary["stopped"] == "budget"
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tune_project.root / "optuna" / "journal.log"))
    )
    trials = optuna.load_study(study_name=summary["study"], storage=storage).get_trials()
    finished = [tr for tr in trials if tr.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4 and len({tuple(sorted(tr.params.items())) for tr in finished}) == 4
    assert len({tr.user_attrs["worker"] for tr in finished}) <= 2
    client = mlflow.MlflowClient(tracking.configure(tune_project.root))
    runs = client.search_runs(
        [tracking.experiment_id("tuning", tune_project.root)],
        filter_string="tags.`spikemax.trial_state` != 'VALIDATION'",
    )
    assert sorted(int(r.data.tags["spikemax.trial"]) for r in runs) == sorted(
        tr.number for tr in trials if "mlflow_run_id" in tr.user_attrs
    )


@pytest.mark.slow
def test_studies_side_by_side_find_what_one_at_a_time_finds(
    project, snn_checkpoints, generator_checkpoints, tmp_path, monkeypatch
):
    import os

    from spikemax.stages import tune as stage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, shared = project
    results = {}
    for cores in (1, 2):
        root = tmp_path / f"cores{cores}"
        root.mkdir()
        (root / "data").symlink_to(shared.root / "data")
        (root / "models").symlink_to(shared.root / "models")
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert stage.side_by_side(2, 1) == cores and stage.side_by_side(2, 2) == stage.side_by_side(1, 1) == 1
        summary = run_stage(tiny(2), P.Paths(root))
        trials = {
            g: [(tr.params, tr.value, tr.state.name) for tr in _study(P.Paths(root), s["study"]).trials]
            for g, s in summary["generators"].items()
        }
        results[cores] = (summary, trials)
    assert results[1] == results[2]  # the same trials, scores, validation and decision


def test_am_gain_summary_is_the_median_gain_and_share_above_the_dataset():
    from spikemax.selectivity import am_gain_summary

    # gains 2, 1, 0.5 and undefined (a unit silent on every test image)
    got = am_gain_summary(np.array([2.0, 1.0, 0.5, 3.0]), np.array([1.0, 1.0, 1.0, 0.0]))
    assert got == {"median_am_gain": 1.0, "frac_above_dataset": 0.5}
    assert am_gain_summary(np.array([1.0]), np.array([0.0]))["median_am_gain"] is None


def test_tune_params_name_generators_once_and_read_the_older_single_generator():
    assert P.validate({"tune": {"generator": "vqvae"}}).tune.generators == ["vqvae"]
    assert P.validate({}).tune.generators == ["sngan", "vqvae"]
    with pytest.raises(P.ParamsError, match="each generator once"):
        P.validate({"tune": {"generators": ["sngan", "sngan"]}})
    params = P.validate({"maximize": {"budget": 96, "batch": 32}})
    from spikemax.tuning import study_name, trial_budget

    assert trial_budget(params) == (96, 32)  # the maximize stage's unless tune sets its own
    own = P.validate({"maximize": {"budget": 96, "batch": 32}, "tune": {"budget": 64}})
    assert trial_budget(own) == (64, 32)
    assert study_name(params, 3, "sngan") != study_name(own, 3, "sngan")  # another measure: another study
    assert study_name(params, 3, "sngan").startswith("sngan-e3-")


def test_under_noise_a_trial_scores_the_noiseless_response_of_its_best_stimulus(tune_project):
    """Measured responses carry multiplicative noise; the gains a trial is scored by are the SNN's own
    rates of the best stimuli (spike counts / T) over the dataset max."""
    from spikemax.snn import checkpoints, load_snn
    from spikemax.tuning import Bench, space_of

    params = P.validate(
        {
            **tiny(1, ("sngan",)).model_dump(),
            "maximize": {"budget": 32, "batch": 16, "noise": {"model": "multiplicative", "sigma": 0.5}},
        }
    )
    epoch = max(checkpoints(tune_project))
    bench = Bench(params, tune_project, epoch, "sngan")
    seen: list[np.ndarray] = []
    defaults = space_of(params, "sngan").defaults["cma"]
    gains = bench.run("cma", defaults, "train", lambda step, g: seen.append(g))
    # A noiseless rate is spikes / (T x the unit's positions): an integer count on that lattice.
    net = load_snn(checkpoints(tune_project)[epoch])
    spikes = net.forward_spikes(bench.prepared.tensors("test")[0][:1])
    cells = [net.num_steps * int(np.prod(spikes[t.split(":")[0]].shape[3:])) for t in bench.targets["train"]]
    counts = gains * bench.dataset_max["train"] * np.array(cells)
    assert len(seen) == len(bench.cuts) and np.array_equal(seen[-1], gains)
    assert np.allclose(counts, np.round(counts), atol=1e-4) and (gains > 0).any()
