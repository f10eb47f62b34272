"""Stage `tune`: one Optuna study over TT settings per generator, scored on a panel of neurons by the
median AM gain (the maximize stage's measure); trials to MLflow, best settings to metrics/tune.json.

`n_trials` is each study's total over every worker: this invocation's `workers` processes and any
other machine's on the same RDB storage (see spikemax.tuning for how slots are shared).
"""

from __future__ import annotations

import logging
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
    Duplicate,
    Surplus,
    TrialRuns,
    counts,
    journal,
    make_objective,
    storage,
    study_name,
    trial_budget,
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


class _OneLineUnrun(logging.Filter):
    """Optuna logs a trial failed by an exception it was told to catch as a warning with the whole
    traceback, and a second line with its value. For a surplus or duplicate trial (failed on
    purpose, never evaluated) one line says what happened."""

    def __init__(self) -> None:
        super().__init__()
        self.quiet: set[str] = set()  # "Trial N " prefixes whose follow-up line is dropped

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        msg = record.getMessage()
        if isinstance(err, (Surplus, Duplicate)):
            kind = "surplus" if isinstance(err, Surplus) else "duplicate"
            self.quiet.add(msg.split(" failed", 1)[0] + " ")  # "Trial N "
            record.msg, record.args, record.exc_info, record.exc_text = f"tune: not run ({kind}): {err}", (), None, None
            return True
        prefix = msg.split(" failed with value", 1)[0] + " "
        if "failed with value" in msg and prefix in self.quiet:
            self.quiet.discard(prefix)  # dropped once: a later trial of that number (another study) logs
            return False
        return True


_FILTER = _OneLineUnrun()


def _quiet_unrun() -> None:
    """Install the one-line filter on Optuna's optimize logger (once per process)."""
    logger = logging.getLogger("optuna.study._optimize")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


def run(params: Params, paths: Paths, workers: int | None = None) -> dict:
    """Complete each generator's study to `tune.n_trials` finished trials with `workers` processes
    (default `tune.workers`); write metrics/tune.json and results/tune/trials.csv."""
    epoch = _epoch(params, paths)
    studies: dict[str, Any] = {g: run_study(params, paths, epoch, g, workers) for g in params.tune.generators}
    return write_outputs(studies, paths, epoch, params)


def run_study(params: Params, paths: Paths, epoch: int, generator: str, workers: int | None = None) -> Any:
    """Complete `generator`'s study to `tune.n_trials` finished trials; returns the study."""
    t = params.tune
    n_workers = workers or t.workers
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_unrun()
    name = study_name(params, epoch, generator)
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
                work(params, paths, epoch, generator, 0)
            else:
                ctx = multiprocessing.get_context("spawn")
                threads = max(1, (os.cpu_count() or 1) // n_workers)
                procs = [
                    ctx.Process(target=work, args=(params, paths, epoch, generator, i, threads))
                    for i in range(n_workers)
                ]
                for p in procs:
                    p.start()
                for p in procs:
                    p.join()
            if lock is not None:
                _fail_running(study, runs)  # every worker of ours has ended
        finished = counts(study)[0]
        if finished < t.n_trials:
            raise SpikemaxError(f"study {name}: {finished} of {t.n_trials} trials finished (workers failed; see logs)")
        return study
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


def work(params: Params, paths: Paths, epoch: int, generator: str, index: int, threads: int | None = None) -> int:
    """One worker of `generator`'s study: run trials until it has n_trials finished ones; returns
    trials it ran."""
    if threads is not None:  # a spawned worker: share the cores with its siblings
        import torch

        torch.set_num_threads(threads)
    from optuna.storages import fail_stale_trials
    from optuna.storages._heartbeat import is_heartbeat_enabled

    t = params.tune
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_unrun()  # a spawned worker's own logger
    runs = TrialRuns(paths.root)
    study = optuna.load_study(study_name=study_name(params, epoch, generator), storage=storage(params, paths, runs))
    seed = worker_seed(t.seed, index, len(study.get_trials(deepcopy=False)))
    study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=max(2, t.n_trials // 4), n_warmup_steps=0)
    heartbeat = is_heartbeat_enabled(study._storage)
    objective, _ = make_objective(params, paths, epoch, generator, runs)
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


def study_result(study: Any) -> dict:
    """One study's entry of metrics/tune.json: its best trial's settings and score, or, when no
    trial completed (every one pruned or failed), null settings and a note saying so."""
    trials = study.get_trials(deepcopy=False)
    by_state = {st: sum(tr.state.name == st for tr in trials) for st in ("COMPLETE", "PRUNED")}
    finished = by_state["COMPLETE"] + by_state["PRUNED"]
    out: dict[str, Any] = {
        "study": study.study_name,
        "n_trials": finished,
        "n_pruned": by_state["PRUNED"],
        "n_failed": len(trials) - finished,  # killed workers' trials, and unevaluated surplus/duplicates
    }
    if not by_state["COMPLETE"]:
        names = sorted({k for tr in trials for k in tr.distributions})
        note = f"no trial completed ({by_state['PRUNED']} pruned, {out['n_failed']} failed): no best settings"
        return (
            {**out, "best_median_am_gain": None, "best_frac_above_dataset": None}
            | {f"best_{k}": None for k in names}
            | {"note": note}
        )
    best = study.best_trial
    return {
        **out,
        "best_median_am_gain": float(best.value),
        "best_frac_above_dataset": best.user_attrs.get("frac_above_dataset"),
        **{f"best_{k}": v for k, v in best.params.items()},
    }


def write_outputs(studies: dict[str, Any], paths: Paths, epoch: int, params: Params) -> dict:
    """metrics/tune.json (each generator's best settings) and results/tune/trials.csv (one row per
    trial of every study)."""
    import pandas as pd

    frames = []
    for g, study in studies.items():
        df = study.trials_dataframe(attrs=("number", "value", "params", "state"))
        df.columns = [c.removeprefix("params_") for c in df.columns]
        frames.append(df.assign(generator=g, study=study.study_name))
    out = paths.results / "tune"
    out.mkdir(parents=True, exist_ok=True)
    trials = pd.concat(frames, ignore_index=True)
    for col in ("rank", "grid_n"):  # integers, blank where a study has no such setting (VQ-VAE's grid_n)
        if col in trials:
            trials[col] = trials[col].astype("Int64")
    trials.to_csv(out / "trials.csv", index=False)
    budget, batch = trial_budget(params)
    summary = {
        "epoch": epoch,
        "score": "median_am_gain",  # over the panel, as the maximize stage reports it per generator
        "budget": budget,
        "batch": batch,
        "neurons": params.tune.neurons,
        "generators": {g: study_result(study) for g, study in studies.items()},
    }
    write_json(paths.metrics / "tune.json", summary)
    return summary
