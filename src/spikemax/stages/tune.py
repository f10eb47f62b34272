"""Stage `tune`: an Optuna study over TT settings, scored on a panel of neurons; trials to MLflow."""

from __future__ import annotations

from typing import Any

import optuna

from spikemax import SpikemaxError
from spikemax.outputs import write_json
from spikemax.params import Params, Paths
from spikemax.snn import checkpoints
from spikemax.tuning import make_objective, mlflow_callback, storage, study_name


def run(params: Params, paths: Paths) -> dict:
    """Complete the study to `tune.n_trials` trials; write metrics/tune.json and results/tune/trials.csv."""
    t = params.tune
    ckpts = checkpoints(paths)
    if not ckpts:
        raise SpikemaxError(f"no SNN checkpoint under {paths.snn_dir}: run `spikemax train-snn` first")
    epoch = max(ckpts) if t.epoch == "last" else int(t.epoch)
    if epoch not in ckpts:
        raise SpikemaxError(f"tune.epoch={epoch} has no checkpoint; available: {sorted(ckpts)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name(params, epoch),
        storage=storage(paths),
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=t.seed),
    )
    done = [tr for tr in study.trials if tr.state == optuna.trial.TrialState.COMPLETE]
    todo = t.n_trials - len(done)
    if todo > 0:
        objective, _ = make_objective(params, paths, epoch)
        callback = mlflow_callback(paths)
        study.optimize(objective, n_trials=todo, callbacks=[callback], show_progress_bar=True)
    return write_outputs(study, paths, epoch)


def write_outputs(study: Any, paths: Paths, epoch: int) -> dict:
    """metrics/tune.json (best settings) and results/tune/trials.csv (one row per trial)."""
    df = study.trials_dataframe(attrs=("number", "value", "params", "state"))
    df.columns = [c.removeprefix("params_") for c in df.columns]
    out = paths.results / "tune"
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "trials.csv", index=False)
    best = study.best_trial
    summary = {
        "study": study.study_name,
        "epoch": epoch,
        "n_trials": len(df),
        "best_mean_am_gain": float(best.value),
        **{f"best_{k}": v for k, v in best.params.items()},
    }
    write_json(paths.metrics / "tune.json", summary)
    return summary
