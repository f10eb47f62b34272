"""Optuna search over the TT maximizer's rank and step size, and SN-GAN's grid resolution (the `tune` stage).

One study per generator (`tune.generators`). A trial runs the TT the maximize stage runs on that
grid (its `maximize.tt` options, on VQ-VAE started from the data prior when `maximize.prior` is
true) on a fixed panel of neurons of one SNN checkpoint, and scores it by the measure the maximize
stage reports: the median AM gain (best activation / highest activation over the test images,
`spikemax.selectivity.am_gain_summary`) at the maximize stage's budget and batch (unless
`tune.budget` / `tune.batch` are set), reporting the score at `tune.rungs` intermediate budgets so
a median pruner can stop bad trials. `maximize.tuned: true` applies each study's best settings
(`read_tuned`) to the maximize runs of that generator whose method runs TT.

Many workers share one study (processes of one `spikemax tune --workers N`, or the same command
on several machines with an RDB storage) and together run `tune.n_trials` trials:

- a worker starts a trial only while COMPLETE + PRUNED + RUNNING < n_trials; a trial that lost
  the race for the last slot (a smaller trial number took it) is failed unevaluated ("surplus");
- each worker's TPE sampler has its own seed and the constant liar, and a trial whose settings
  equal another live or finished trial's is failed unevaluated ("duplicate");
- on an RDB storage workers send heartbeats: a killed worker's trial is failed by the others
  (`fail_stale_trials`) and its slot is run again; on the journal file (one machine) one
  invocation holds a lock, so RUNNING trials it finds are stale and failed at start.

Every evaluated trial is exactly one run of the MLflow experiment `tuning`, opened when it starts
(RUNNING; the pid of its worker tagged) and ended FINISHED, KILLED (pruned) or FAILED, also when a
worker was killed (by whichever worker fails the stale trial).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from spikemax import SpikemaxError
from spikemax.params import Params, Paths
from spikemax.tracking import TUNING_EXPERIMENT


def with_resolution(grid: Any, n: int) -> Any:
    """A copy of a continuous-latent grid placed at `n` N(0, 1) quantiles per dimension."""
    from spikemax.generators.grid import normal_quantiles

    if not hasattr(grid, "values"):
        raise SpikemaxError(
            f"tune.grid_n applies to continuous latents (sngan) only, not {grid.name!r}; "
            "set tune.grid_n to a single value equal to the codebook size or tune sngan"
        )
    out = copy.copy(grid)
    out.n = int(n)
    out.values = normal_quantiles(int(n)).to(grid.values.device)  # where the grid decodes
    return out


def trial_budget(params: Params) -> tuple[int, int]:
    """(queries per neuron, queries per ask) of a trial: tune's own, else the maximize stage's."""
    t, m = params.tune, params.maximize
    return t.budget or m.budget, t.batch or m.batch


def study_name(params: Params, epoch: int, generator: str) -> str:
    """A name that changes whenever what a trial measures changes (so old trials never mix in)."""
    t, m = params.tune, params.maximize
    key = json.dumps(
        {
            "tune": t.model_dump(exclude={"generators", "n_trials", "storage", "workers", "heartbeat"}),
            "generator": generator,
            "budget": trial_budget(params),
            "score": "median_am_gain",
            "epoch": epoch,
            "snn": params.snn.model_dump(),
            "gen": params.generators.model_dump(),
            # the TT the maximize stage runs (rank and lr are what the study varies)
            "tt": m.tt.model_dump(exclude={"rank", "lr"}),
            "prior": [m.prior, m.prior_images] if generator in _prior_generators() else None,
            "max_images": m.max_images,
        },
        sort_keys=True,
    )
    return f"tt-{generator}-e{epoch}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _prior_generators() -> tuple[str, ...]:
    from spikemax.am.policy import PRIOR_GENERATORS

    return PRIOR_GENERATORS


def read_tuned(path: Path, generators: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Each generator's best settings in the tune stage's metrics/tune.json: {generator: {"study",
    "rank", "lr"[, "grid_n"]}}; one-line error when the file is missing, from an older tune stage,
    or a wanted generator's study has no completed trial."""
    if not path.is_file():
        raise SpikemaxError(f"maximize.tuned is true but {path} is missing: run `spikemax tune` first")
    try:
        studies = json.loads(path.read_text())["generators"]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise SpikemaxError(f"{path} is not a tune stage result of this version: rerun `spikemax tune`") from None
    out: dict[str, dict[str, Any]] = {}
    for g, s in studies.items():
        if generators is not None and g not in generators:
            continue
        if s.get("best_rank") is None:
            raise SpikemaxError(f"maximize.tuned: study {s.get('study')} ({g}) has no best trial: {s.get('note')}")
        out[g] = {"study": s["study"], "rank": int(s["best_rank"]), "lr": float(s["best_lr"])}
        if s.get("best_grid_n") is not None:
            out[g]["grid_n"] = int(s["best_grid_n"])
    return out


def pick_panel(
    layers: dict[str, int], dataset_rates: dict[str, np.ndarray], k: int, seed: int
) -> list[tuple[str, int]]:
    """k (layer, unit) pairs spread over the layers, each firing on some test image (gain defined)."""
    rng = np.random.default_rng(seed)
    pools = {
        name: [u for u in rng.permutation(units) if dataset_rates[name][:, u].max() > 0]
        for name, units in layers.items()
    }
    panel: list[tuple[str, int]] = []
    while len(panel) < k and any(pools.values()):
        for name in layers:
            if pools[name] and len(panel) < k:
                panel.append((name, int(pools[name].pop(0))))
    if not panel:
        raise SpikemaxError("no neuron of the tuning checkpoint fires on any test image")
    return panel


FINISHED_STATES = ("COMPLETE", "PRUNED")  # a trial that used its slot (pruned trials were evaluated)
LIVE_STATES = (*FINISHED_STATES, "RUNNING")  # trials holding one of the n_trials slots


class Surplus(Exception):
    """The trial started after the study's n_trials slots were taken (failed unevaluated)."""


class Duplicate(Exception):
    """The trial's settings equal another live or finished trial's (failed unevaluated)."""


def worker_seed(seed: int, index: int, n_existing: int) -> int:
    """Sampler seed of worker `index` on this host joining a study of `n_existing` trials: distinct
    per worker, machine and invocation (a resumed study must not replay its first samples),
    reproducible for the same study state."""
    return zlib.crc32(f"{seed}/{socket.gethostname()}/{index}/{n_existing}".encode())


def _states(names: tuple[str, ...]) -> tuple:
    import optuna

    return tuple(optuna.trial.TrialState[n] for n in names)


def counts(study: Any) -> tuple[int, int]:
    """(finished, running) trials of the study."""
    trials = study.get_trials(deepcopy=False, states=_states(LIVE_STATES))
    running = sum(tr.state.name == "RUNNING" for tr in trials)
    return len(trials) - running, running


def claim_slot(trial: Any, n_trials: int) -> None:
    """Raise Surplus unless fewer than n_trials live trials have a smaller number (numbers are the
    storage's own order, so of two workers racing for the last slot exactly one keeps it)."""
    ahead = [
        tr for tr in trial.study.get_trials(deepcopy=False, states=_states(LIVE_STATES)) if tr.number < trial.number
    ]
    if len(ahead) >= n_trials:
        raise Surplus(f"trial {trial.number}: all {n_trials} slots taken")


def check_unique(trial: Any) -> None:
    """Raise Duplicate if another live or finished trial has exactly these settings."""
    for tr in trial.study.get_trials(deepcopy=False, states=_states(LIVE_STATES)):
        if tr.number != trial.number and tr.params == trial.params:
            raise Duplicate(f"trial {trial.number} repeats trial {tr.number}: {trial.params}")


class TrialRuns:
    """One MLflow run per evaluated trial in the experiment `tuning`."""

    def __init__(self, root: Any) -> None:
        import mlflow

        from spikemax import tracking

        self.client = mlflow.MlflowClient(tracking.configure(root))
        self.eid = tracking.experiment_id(TUNING_EXPERIMENT, root)

    def open(self, trial: Any) -> str:
        """Create the trial's run (RUNNING) and record its id on the trial."""
        from mlflow.entities import Param

        run = self.client.create_run(
            self.eid,
            run_name=f"trial-{trial.number}",
            tags={
                "spikemax.study": trial.study.study_name,
                "spikemax.trial": str(trial.number),
                "spikemax.worker": f"{socket.gethostname()}:{os.getpid()}",
            },
        )
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in trial.params.items()])
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        return run.info.run_id

    def score(self, run_id: str, value: float, step: int) -> None:
        """An intermediate (or the final) median AM gain at `step` queries."""
        self.client.log_metric(run_id, "median_am_gain", float(value), step=step)

    def close(
        self,
        run_id: str,
        state: str,
        targets: list[str],
        gains: list[float] | None = None,
        frac_above: float | None = None,
    ) -> None:
        """End the run: FINISHED (complete), KILLED (pruned) or FAILED, with per-neuron gains."""
        from mlflow.entities import Metric, RunTag

        metrics = [Metric(f"gain_{t.replace(':', '_')}", float(g), 0, 0) for t, g in zip(targets, gains or [])]
        if frac_above is not None:
            metrics.append(Metric("frac_above_dataset", float(frac_above), 0, 0))
        self.client.log_batch(run_id, metrics=metrics, tags=[RunTag("state", state)])
        status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED")
        self.client.set_terminated(run_id, status)

    def fail_stale(self, run_id: str) -> None:
        """The run of a trial whose worker died (no heartbeat): FAILED."""
        from mlflow.entities import RunTag

        self.client.log_batch(
            run_id, tags=[RunTag("state", "FAIL"), RunTag("spikemax.failure", "worker lost (no heartbeat)")]
        )
        self.client.set_terminated(run_id, "FAILED")


def make_objective(
    params: Params, paths: Paths, epoch: int, generator: str, runs: TrialRuns | None = None
) -> tuple[Callable, list]:
    """The Optuna objective of `generator`'s study: the median AM gain over the neuron panel of the
    maximize stage's TT with the trial's rank and lr (and grid_n on SN-GAN)."""
    import optuna
    import torch

    from spikemax.am.loop import run_am_group
    from spikemax.am.measures import dataset_stats
    from spikemax.am.policy import PRIOR_GENERATORS
    from spikemax.am.prior import fit_grid_prior
    from spikemax.data import Prepared
    from spikemax.devices import resolve
    from spikemax.generators import checkpoint_path, load_generator
    from spikemax.neurons import layer_rates, make_responder, parse_target
    from spikemax.optim import make_optimizer, options_for
    from spikemax.selectivity import am_gain_summary
    from spikemax.snn import checkpoints, load_snn

    t, m = params.tune, params.maximize
    budget, batch = trial_budget(params)
    device = resolve(params.device)
    net = load_snn(checkpoints(paths)[epoch]).eval().to(device)
    prepared = Prepared.load(paths.prepared)
    x_test, _ = prepared.tensors("test")
    with torch.no_grad():
        rates = layer_rates(net, x_test)
    layers = dict(net.spiking_layers())
    panel = pick_panel(layers, rates, t.neurons, t.seed)
    targets = [f"{layer}:{unit}" for layer, unit in panel]
    # The dataset max the maximize stage divides by (same function, same chunks).
    dataset_max = dataset_stats(net, prepared, [parse_target(n, layers) for n in targets], m.max_images)["dataset_max"]
    responder = make_responder(net, targets)
    ckpt = checkpoint_path(generator, paths)
    base_grid = load_generator(generator, ckpt).to(device)
    ordered = bool(base_grid.ordered)
    priors: dict[int, Any] = {}  # by rank: a TT run's prior has the TT's rank

    def prior(rank: int) -> Any:
        if not (m.prior and generator in PRIOR_GENERATORS):
            return None
        if rank not in priors:
            cache = paths.results / "tune" / f"prior_{generator}_r{rank}.npz"
            cache.parent.mkdir(parents=True, exist_ok=True)
            priors[rank] = fit_grid_prior(base_grid, prepared, ckpt, rank, m.prior_images, cache)
        return priors[rank]

    # Rung budgets are whole batches, so a trial cut into rungs asks exactly what one run would.
    n_batches = -(-budget // batch)
    cuts = sorted({min(budget, batch * round(n_batches * (i + 1) / t.rungs)) for i in range(t.rungs)} - {0})

    def objective(trial: Any) -> float:
        claim_slot(trial, t.n_trials)
        rank = trial.suggest_categorical("rank", t.ranks)
        # grid_n re-grids SN-GAN's quantiles; a codebook's size is the generator's
        grid_n = trial.suggest_categorical("grid_n", t.grid_n) if ordered else base_grid.n
        lr = trial.suggest_float("lr", t.lr[0], t.lr[1], log=True)
        check_unique(trial)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("targets", targets)
        run_id = runs.open(trial) if runs is not None else None
        state, gains, above = "FAIL", None, None
        try:
            grid = base_grid if grid_n == base_grid.n else with_resolution(base_grid, grid_n)
            tt = m.tt.model_copy(update={"rank": rank, "lr": lr})
            opts = options_for("tt", m.model_copy(update={"tt": tt}), grid)
            if prior(rank) is not None:
                opts["prior"] = prior(rank)
            opts_ = [make_optimizer("tt", grid.d, grid.n, seed=t.seed + j, **opts) for j in range(len(targets))]
            best = np.full(len(targets), -np.inf)
            done = 0
            for cut in cuts:
                results = run_am_group(opts_, grid, responder, cut - done, batch, max_images=m.max_images)
                best = np.fmax(best, [r.best_response for r in results])
                done = cut
                summary = am_gain_summary(best, dataset_max)
                score = float(summary["median_am_gain"] or 0.0)
                if run_id is not None:
                    runs.score(run_id, score, done)  # type: ignore[union-attr]
                if cut < budget:
                    trial.report(score, done)
                    if trial.should_prune():
                        state = "PRUNED"
                        raise optuna.TrialPruned(f"median AM gain {score:.3f} after {done} queries")
            gains = [float(g) for g in best / dataset_max]
            above = summary["frac_above_dataset"]
            trial.set_user_attr("gains", gains)
            trial.set_user_attr("frac_above_dataset", above)
            state = "COMPLETE"
            return score
        finally:
            if run_id is not None:
                runs.close(run_id, state, targets, gains, above)  # type: ignore[union-attr]

    return objective, targets


def journal(paths: Paths) -> Any:
    """Optuna JournalStorage in optuna/ (one machine; never a DVC out)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    folder = paths.root / "optuna"
    folder.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(folder / "journal.log")))


def storage(params: Params, paths: Paths, runs: TrialRuns | None = None) -> Any:
    """The study's storage: `tune.storage` (an RDB URL, with heartbeats) or the journal file."""
    t = params.tune
    if not t.storage:
        return journal(paths)
    import optuna

    def failed(study: Any, trial: Any) -> None:
        # Called in whichever worker finds the stale trial: its MLflow run must not stay RUNNING.
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and runs is not None:
            runs.fail_stale(run_id)

    try:
        return optuna.storages.RDBStorage(
            t.storage,
            heartbeat_interval=t.heartbeat,
            grace_period=2 * t.heartbeat,
            failed_trial_callback=failed,
            engine_kwargs={"pool_pre_ping": True},
        )
    except Exception as err:  # unreachable server, missing driver, bad URL: one line
        raise SpikemaxError(f"tune.storage {t.storage!r}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
