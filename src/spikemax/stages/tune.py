"""Stage `tune`: an Optuna study over TT settings, scored on a panel of neurons; trials to MLflow.

`n_trials` is the study's total over every worker: this invocation's `workers` processes and any
other machine's on the same RDB storage (see spikemax.tuning for how slots are shared).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

import optuna

from spikemax import SpikemaxError
from spikemax.outputs import write_json
from spikemax.params import Params, Paths
from spikemax.snn import checkpoints
from spikemax.tuning import (
    FINISHED_STATES,
    Duplicate,
    Surplus,
    TrialRuns,
    counts,
    journal,
    make_objective,
    storage,
    study_name,
    worker_seed,
)

MAX_DUPLICATES = 50  # consecutive duplicate settings before a worker gives up (search space exhausted)


def _epoch(params: Params, paths: Paths) -> int:
    t = params.tune
    ckpts = checkpoints(paths)
    if not ckpts:
        raise SpikemaxError(f"no SNN checkpoint under {paths.snn_dir}: run `spikemax train-snn` first")
    epoch = max(ckpts) if t.epoch == "last" else int(t.epoch)
    if epoch not in ckpts:
        raise SpikemaxError(f"tune.epoch={epoch} has no checkpoint; available: {sorted(ckpts)}")
    return epoch


def run(params: Params, paths: Paths, workers: int | None = None) -> dict:
    """Complete the study to `tune.n_trials` finished trials with `workers` processes (default
    `tune.workers`); write metrics/tune.json and results/tune/trials.csv."""
    t = params.tune
    n_workers = workers or t.workers
    epoch = _epoch(params, paths)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = study_name(params, epoch)
    lock: Any = None
    if not t.storage:
        from filelock import FileLock

        # One invocation at a time on the journal (no heartbeats there): RUNNING trials found under
        # the lock were left by a killed invocation, so failing them is safe.
        lock = FileLock(str(paths.root / "optuna" / "tune.lock"))
        journal(paths)  # creates optuna/
        lock.acquire()
    try:
        study = optuna.create_study(
            study_name=name, storage=storage(params, paths), direction="maximize", load_if_exists=True
        )
        runs = TrialRuns(paths.root)  # the store's schema and experiment, once, before workers start
        if lock is not None:
            _fail_running(study, runs)
        for _attempt in range(3):  # rerun workers while slots are missing (a killed worker's trial)
            if counts(study)[0] >= t.n_trials:
                break
            if n_workers == 1:
                work(params, paths, epoch, 0)
            else:
                ctx = multiprocessing.get_context("spawn")
                threads = max(1, (os.cpu_count() or 1) // n_workers)
                procs = [ctx.Process(target=work, args=(params, paths, epoch, i, threads)) for i in range(n_workers)]
                for p in procs:
                    p.start()
                for p in procs:
                    p.join()
            if lock is not None:
                _fail_running(study, runs)  # every worker of ours has ended
        finished = counts(study)[0]
        if finished < t.n_trials:
            raise SpikemaxError(f"study {name}: {finished} of {t.n_trials} trials finished (workers failed; see logs)")
        return write_outputs(study, paths, epoch)
    finally:
        if lock is not None:
            lock.release()


def _fail_running(study: Any, runs: TrialRuns) -> None:
    """Fail the study's RUNNING trials (only called when no worker can be running them)."""
    for tr in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(tr._trial_id, optuna.trial.TrialState.FAIL)
        run_id = tr.user_attrs.get("mlflow_run_id")
        if run_id:
            runs.fail_stale(run_id)


def work(params: Params, paths: Paths, epoch: int, index: int, threads: int | None = None) -> int:
    """One worker: run trials until the study has n_trials finished ones; returns trials it ran."""
    if threads is not None:  # a spawned worker: share the cores with its siblings
        import torch

        torch.set_num_threads(threads)
    from optuna.storages import fail_stale_trials
    from optuna.storages._heartbeat import is_heartbeat_enabled

    t = params.tune
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = TrialRuns(paths.root)
    study = optuna.load_study(study_name=study_name(params, epoch), storage=storage(params, paths, runs))
    seed = worker_seed(t.seed, index, len(study.get_trials(deepcopy=False)))
    study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=max(2, t.n_trials // 4), n_warmup_steps=0)
    heartbeat = is_heartbeat_enabled(study._storage)
    objective, _ = make_objective(params, paths, epoch, runs)
    ran = dups = 0

    def counted(trial: Any) -> float:
        nonlocal dups
        try:
            value = objective(trial)
        except Duplicate:
            dups += 1
            raise
        except Surplus:
            raise
        except BaseException:
            dups = 0
            raise
        dups = 0
        return value

    while True:
        if heartbeat:
            fail_stale_trials(study)
        finished, running = counts(study)
        if finished >= t.n_trials:
            return ran
        if finished + running >= t.n_trials:
            if not heartbeat:
                return ran  # journal: the others' trials are this invocation's; it reruns if one died
            time.sleep(t.heartbeat)  # a RUNNING trial may yet fail (its worker dead): then run its slot
            continue
        if dups >= MAX_DUPLICATES:
            raise SpikemaxError(f"tune: {dups} duplicate settings in a row; widen tune.ranks, grid_n or lr")
        study.optimize(counted, n_trials=1, catch=(Surplus, Duplicate))
        ran += 1


def write_outputs(study: Any, paths: Paths, epoch: int) -> dict:
    """metrics/tune.json (best settings) and results/tune/trials.csv (one row per trial)."""
    df = study.trials_dataframe(attrs=("number", "value", "params", "state"))
    df.columns = [c.removeprefix("params_") for c in df.columns]
    out = paths.results / "tune"
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "trials.csv", index=False)
    best = study.best_trial
    finished = int(df["state"].isin(FINISHED_STATES).sum())
    summary = {
        "study": study.study_name,
        "epoch": epoch,
        "n_trials": finished,
        "n_failed": len(df) - finished,  # killed workers' trials, and unevaluated surplus/duplicates
        "best_mean_am_gain": float(best.value),
        **{f"best_{k}": v for k, v in best.params.items()},
    }
    write_json(paths.metrics / "tune.json", summary)
    return summary
