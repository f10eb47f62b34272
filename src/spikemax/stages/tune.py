"""Stage `tune`: one Optuna study per generator over the search method (TT, CMA-ES) and its settings,
scored on a training panel of neurons by the median AM gain (the maximize stage's measure), stopped
by the bootstrap rule, its winner confirmed against the untuned default on a validation panel;
trials to MLflow, each generator's decision to metrics/tune.json (see spikemax.tuning).

`n_trials` is each study's most trials over every worker: this invocation's `workers` processes and
any other machine's on the same RDB storage (see spikemax.tuning for how slots are shared).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from typing import Any, cast

import optuna

from spikemax import SpikemaxError
from spikemax.outputs import write_json
from spikemax.params import Params, Paths
from spikemax.snn import checkpoints
from spikemax.tuning import (
    SCORE,
    Bench,
    Duplicate,
    Surplus,
    TrialRuns,
    counts,
    enqueue_defaults,
    journal,
    make_objective,
    make_pruner,
    separation,
    settings_of,
    stop_reason,
    storage,
    study_name,
    trial_budget,
    validate_winner,
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
    """Run each generator's study until its stopping rule (or `tune.n_trials`) with `workers`
    processes (default `tune.workers`), validate its winner; write metrics/tune.json and
    results/tune/trials.csv, and print each generator's decision.

    With one worker per study and several cores, the generators' studies run side by side, one
    process each: a study's trials still run one after another, so what it finds is the same."""
    epoch = _epoch(params, paths)
    n_workers = workers or params.tune.workers
    side = side_by_side(len(params.tune.generators), n_workers)
    if side > 1:
        _studies_in_processes(params, paths, epoch, side)
    studies: dict[str, Any] = {}
    validations: dict[str, Any] = {}
    for g in params.tune.generators:
        # After side-by-side studies, each study has stopped and holds its validation: no Bench is built.
        studies[g], validations[g] = study_and_validation(params, paths, epoch, g, n_workers)
    summary = write_outputs(studies, paths, epoch, params, validations)
    for g, s in summary["generators"].items():
        print(decision_line(g, s), flush=True)
    return summary


def side_by_side(n_generators: int, workers: int) -> int:
    """How many generators' studies run at once: one process per core while each study has one worker
    (more workers per study share its trials by timing, so they stay one study at a time)."""
    if workers != 1 or n_generators < 2:
        return 1
    return max(1, min(n_generators, os.cpu_count() or 1))


class _LazyBench:
    """A `Bench` built on first use (building one evaluates the whole test set)."""

    def __init__(self, *args: Any) -> None:
        self._args = args
        self._bench: Bench | None = None

    def __getattr__(self, name: str) -> Any:
        if self._bench is None:
            self._bench = Bench(*self._args)
        return getattr(self._bench, name)


def _studies_in_processes(params: Params, paths: Paths, epoch: int, at_once: int) -> None:
    """Every generator's study and validation, `at_once` generators at a time in spawned processes
    sharing the cores."""
    if not params.tune.storage:
        journal(paths)  # the journal's folder, before any writer
    TrialRuns(paths.root, params)  # the store's schema and experiment, once, before the processes
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // at_once)
    todo = list(params.tune.generators)
    while todo:
        batch, todo = todo[:at_once], todo[at_once:]
        procs = {g: ctx.Process(target=tune_generator, args=(params, paths, epoch, g, threads)) for g in batch}
        for p in procs.values():
            p.start()
        for p in procs.values():
            p.join()
        failed = [g for g, p in procs.items() if p.exitcode != 0]
        if failed:
            codes = ", ".join(f"{g}: exit code {procs[g].exitcode}" for g in failed)
            raise SpikemaxError(f"tune: a study's process failed ({codes}); see the log above")


def tune_generator(params: Params, paths: Paths, epoch: int, generator: str, threads: int) -> None:
    """One generator's study and its winner's validation (stored on the study), in a spawned process."""
    from spikemax.devices import cpu_threads
    from spikemax.logs import quiet_third_party

    cpu_threads(threads)
    quiet_third_party()  # a spawned process's own log filters
    study_and_validation(params, paths, epoch, generator, 1)


def study_and_validation(
    params: Params, paths: Paths, epoch: int, generator: str, workers: int
) -> tuple[Any, dict[str, Any] | None]:
    """`generator`'s study run to its stopping rule and its winner validated (both resumed where
    done: a finished study with a stored validation builds no Bench)."""
    bench = cast(Bench, _LazyBench(params, paths, epoch, generator))
    study = run_study(params, paths, epoch, generator, workers, bench)
    return study, validate_winner(study, params, bench, TrialRuns(paths.root, params))


def run_study(
    params: Params, paths: Paths, epoch: int, generator: str, workers: int | None = None, bench: Bench | None = None
) -> Any:
    """Run `generator`'s study until `tuning.stop_reason` says stop; returns the study."""
    t = params.tune
    n_workers = workers or t.workers
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_unrun()
    name = study_name(params, epoch, generator)
    lock: Any = None
    if not t.storage:
        from filelock import FileLock

        # One invocation at a time on a study in the journal (no heartbeats there): RUNNING trials
        # found under the lock were left by a killed invocation, so failing them is safe.
        lock = FileLock(str(paths.root / "optuna" / f"{name}.lock"))
        journal(paths)  # creates optuna/
        lock.acquire()
    try:
        study = optuna.create_study(
            study_name=name, storage=storage(params, paths), direction="maximize", load_if_exists=True
        )
        enqueue_defaults(study, params, generator)  # the untuned configurations are always measured
        runs = TrialRuns(paths.root, params)  # the store's schema and experiment, once, before workers start
        if lock is not None:
            _fail_running(study, runs)
        for _attempt in range(3):  # rerun workers while slots are missing (a killed worker's trial)
            if stop_reason(study, params) is not None:
                break
            if n_workers == 1:
                work(params, paths, epoch, generator, 0, bench=bench)
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
        if stop_reason(study, params) is None:
            finished = counts(study)[0]
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


def work(
    params: Params,
    paths: Paths,
    epoch: int,
    generator: str,
    index: int,
    threads: int | None = None,
    bench: Bench | None = None,
) -> int:
    """One worker of `generator`'s study: run trials until the study's stopping rule holds; returns
    trials it ran."""
    if threads is not None:  # a spawned worker: share the cores with its siblings
        from spikemax.devices import cpu_threads

        cpu_threads(threads)
    from optuna.storages import fail_stale_trials
    from optuna.storages._heartbeat import is_heartbeat_enabled

    t = params.tune
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_unrun()  # a spawned worker's own logger
    runs = TrialRuns(paths.root, params)
    study = optuna.load_study(study_name=study_name(params, epoch, generator), storage=storage(params, paths, runs))
    seed = worker_seed(t.seed, index, len(study.get_trials(deepcopy=False)))
    # TPE models the trials after the first min_trials (its default, 10 random ones, would leave a
    # study of a dozen trials mostly random)
    study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=t.min_trials)
    study.pruner = make_pruner(t.level, t.seed)
    heartbeat = is_heartbeat_enabled(study._storage)
    objective, _ = make_objective(params, paths, epoch, generator, runs, bench)
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
        if stop_reason(study, params) is not None:
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


def _point(study: Any, number: int) -> dict[str, Any]:
    """Trial `number`'s method, settings and training-panel score."""
    tr = study.trials[number]
    method, settings = settings_of(tr)
    return {"trial": number, "method": method, "settings": settings, SCORE: tr.value}


def study_result(study: Any, params: Params, validation: dict[str, Any] | None = None) -> dict:
    """One generator's entry of metrics/tune.json: the trials run, why the study stopped, the winner
    and runner-up with the interval of their difference (training panel), the validation against
    the untuned default, and what maximize's `auto` runs: the winner where `adopted`, else the default."""
    from spikemax.am.policy import METHOD_AUTO
    from spikemax.generators import grid_ordered

    trials = study.get_trials(deepcopy=False)
    by_state = {st: sum(tr.state.name == st for tr in trials) for st in ("COMPLETE", "PRUNED")}
    finished = by_state["COMPLETE"] + by_state["PRUNED"]
    generator = study.study_name.split("-", 1)[0]
    out: dict[str, Any] = {
        "study": study.study_name,
        "n_trials": finished,
        "n_pruned": by_state["PRUNED"],
        "n_failed": len(trials) - finished,  # killed workers' trials, and unevaluated surplus/duplicates
        "stopped": stop_reason(study, params),
    }
    default = METHOD_AUTO[grid_ordered(generator)]
    if validation is None:
        note = f"no trial completed ({by_state['PRUNED']} pruned, {out['n_failed']} failed): default kept"
        return {**out, "winner": None, "adopted": False, "method": default, "settings": {}, "decision": note}
    sep = separation(study, params.tune.level, params.tune.seed)
    winner = _point(study, validation["winner_trial"])
    adopted = bool(validation["adopted"])
    val = {k: validation[k] for k in ("winner", "default", "difference", "verdict", "default_method", "targets")}
    return {
        **out,
        "winner": winner,
        "runner_up": _point(study, sep["runner_up"]) if sep else None,
        "separation": sep["difference"] if sep else None,  # winner - runner-up, training panel
        "validation": val,
        "adopted": adopted,
        "method": winner["method"] if adopted else default,
        "settings": winner["settings"] if adopted else {},
        "decision": _decision(validation),
    }


def _ci(d: dict[str, Any]) -> str:
    """`value [lo, hi]` of an interval dict."""
    if d.get("lo") is None:
        return f"{d['value']:.3f} [no interval: n={d['n']}]" if d.get("value") is not None else "n/a"
    return f"{d['value']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def _decision(v: dict[str, Any]) -> str:
    """One phrase: adopted, or why the default was kept, with the validation numbers."""
    nums = f"validation median AM gain {_ci(v['winner'])} vs default {_ci(v['default'])}, difference {_ci(v['difference'])}"
    if v["adopted"]:
        return f"adopted: the winner beats the default ({nums})"
    why = {"same": "the winner is the untuned default", "tie": "a tie", "worse": "the winner is worse"}[v["verdict"]]
    return f"default kept: {why} ({nums})"


def decision_line(generator: str, s: dict[str, Any]) -> str:
    """The stage's report line for one generator: method, settings and decision."""
    if s.get("winner") is None:
        return f"tune {generator}: {s['decision']}"
    w = s["winner"]
    settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in w["settings"].items())
    return (
        f"tune {generator}: winner {w['method']} ({settings}) of {s['n_trials']} trials "
        f"(stopped: {s['stopped']}); {s['decision']}; maximize auto runs {s['method']}"
    )


def write_outputs(
    studies: dict[str, Any], paths: Paths, epoch: int, params: Params, validations: dict[str, Any] | None = None
) -> dict:
    """metrics/tune.json (each generator's decision) and results/tune/trials.csv (one row per trial
    of every study)."""
    import pandas as pd

    validations = validations or {}
    frames = []
    for g, study in studies.items():
        df = study.trials_dataframe(attrs=("number", "value", "params", "state"))
        df.columns = [c.removeprefix("params_") for c in df.columns]
        frames.append(df.assign(generator=g, study=study.study_name))
    out = paths.results / "tune"
    out.mkdir(parents=True, exist_ok=True)
    trials = pd.concat(frames, ignore_index=True)
    for col in ("rank", "grid_n", "elite", "popsize"):  # integers, blank where a trial has no such setting
        if col in trials:
            trials[col] = trials[col].astype("Int64")
    trials.to_csv(out / "trials.csv", index=False)
    budget, batch = trial_budget(params)
    t = params.tune
    summary = {
        "epoch": epoch,
        "score": SCORE,  # over a panel, as the maximize stage reports it per generator
        "budget": budget,
        "batch": batch,
        "neurons": t.neurons,
        "validation_neurons": t.validation,
        "level": t.level,
        "generators": {g: study_result(study, params, validations.get(g)) for g, study in studies.items()},
    }
    write_json(paths.metrics / "tune.json", summary)
    return summary
