"""Optuna search over the TT maximizer's rank, grid resolution and step size (used by the `tune` stage).

A trial runs TT on a fixed panel of neurons of one SNN checkpoint and scores it by the mean AM
gain (best activation / highest activation over the test images) at a fixed query budget. Trials
go to a JournalStorage file (safe for parallel workers) and, through optuna-integration's
a callback, to the MLflow experiment `tuning` (one run per trial: its settings, score and
per-neuron gains; optuna-integration's MLflowCallback is deprecated since Optuna 4.9).
"""

from __future__ import annotations

import copy
import hashlib
import json
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
    out.values = normal_quantiles(int(n))
    return out


def study_name(params: Params, epoch: int) -> str:
    """A name that changes whenever what a trial measures changes (so old trials never mix in)."""
    t = params.tune
    key = json.dumps(
        {
            "tune": t.model_dump(exclude={"n_trials"}),
            "epoch": epoch,
            "snn": params.snn.model_dump(),
            "gen": params.generators.model_dump(),
            "ordinal": params.maximize.tt.ordinal,
        },
        sort_keys=True,
    )
    return f"tt-{t.generator}-e{epoch}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


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


def make_objective(params: Params, paths: Paths, epoch: int):
    """The Optuna objective: mean AM gain of TT over the neuron panel for the trial's settings."""
    import torch

    from spikemax.am.loop import run_am_group
    from spikemax.data import Prepared
    from spikemax.generators import load_generator
    from spikemax.neurons import layer_rates, make_responder
    from spikemax.optim import make_optimizer, resolve_ordinal
    from spikemax.snn import checkpoints, load_snn

    t = params.tune
    net = load_snn(checkpoints(paths)[epoch])
    x_test, _ = Prepared.load(paths.prepared).tensors("test")
    with torch.no_grad():
        rates = layer_rates(net, x_test)
    panel = pick_panel(net.spiking_layers(), rates, t.neurons, t.seed)
    targets = [f"{layer}:{unit}" for layer, unit in panel]
    dataset_max = np.array([rates[layer][:, unit].max() for layer, unit in panel])
    responder = make_responder(net, targets)
    base_grid = load_generator(t.generator, paths.generators_dir / f"{t.generator}.ckpt")
    # Trials search with the ordinal the maximize stage would use on this grid.
    ordinal = resolve_ordinal(params.maximize.tt.ordinal, base_grid.ordered)

    def objective(trial) -> float:
        rank = trial.suggest_categorical("rank", t.ranks)
        grid_n = trial.suggest_categorical("grid_n", t.grid_n)
        lr = trial.suggest_float("lr", t.lr[0], t.lr[1], log=True)
        grid = base_grid if grid_n == base_grid.n else with_resolution(base_grid, grid_n)
        opts = [
            make_optimizer("tt", grid.d, grid.n, seed=t.seed + j, rank=rank, lr=lr, batch=t.batch, ordinal=ordinal)
            for j in range(len(targets))
        ]
        results = run_am_group(opts, grid, responder, t.budget, t.batch)
        gains = np.array([r.best_response for r in results]) / dataset_max
        trial.set_user_attr("targets", targets)
        trial.set_user_attr("gains", [float(g) for g in gains])
        return float(np.mean(gains))

    return objective, targets


def storage(paths: Paths):
    """Optuna JournalStorage in optuna/ (a file that parallel workers can share; never a DVC out)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    folder = paths.root / "optuna"
    folder.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(folder / "journal.log")))


def mlflow_callback(paths: Paths):
    """An Optuna callback logging each finished trial as one run of the MLflow experiment `tuning`."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    from spikemax import tracking

    client = mlflow.MlflowClient(tracking.configure(paths.root))
    exp = tracking.experiment_id(TUNING_EXPERIMENT, paths.root)

    def callback(study, trial) -> None:
        run = client.create_run(
            exp,
            run_name=f"trial-{trial.number}",
            tags={"spikemax.study": study.study_name, "spikemax.trial": str(trial.number)},
        )
        ts = int(trial.datetime_complete.timestamp() * 1000) if trial.datetime_complete else 0
        metrics = [Metric("mean_am_gain", float(trial.value), ts, 0)] if trial.value is not None else []
        metrics += [
            Metric(f"gain_{t.replace(':', '_')}", float(g), ts, 0)
            for t, g in zip(trial.user_attrs.get("targets", []), trial.user_attrs.get("gains", []))
        ]
        client.log_batch(
            run.info.run_id,
            metrics=metrics,
            params=[Param(k, str(v)) for k, v in trial.params.items()],
            tags=[RunTag("state", trial.state.name)],
        )
        client.set_terminated(run.info.run_id, "FINISHED" if trial.value is not None else "FAILED")

    return callback
