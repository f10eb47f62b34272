"""Optuna search over the maximize stage's method (TT or CMA-ES) and its settings (the `tune` stage).

One study per generator (`tune.generators`). A trial picks a method of `tune.methods` and its
settings: TT's rank, learning rate, elite size and (on SN-GAN's ordered grid) internal CMA-ES share,
CMA-ES's initial step size and population, SN-GAN's grid resolution, and the noise-aware options
when the maximize runs are noisy (`maximize.noise.model` not none). The untuned configurations of
both methods are the study's first trials, so the default is always measured.

Evidence that generalizes: the panels are live units of one SNN checkpoint (firing on some test
image), none of them a maximize target. A trial is scored on the training panel by the measure the
maximize stage reports, the median AM gain (`spikemax.selectivity.am_gain_summary`), at the
maximize stage's budget and batch (unless `tune.budget` / `tune.batch` are set). Its per-neuron
gains at `tune.rungs` intermediate budgets feed `PanelPruner`: a trial stops early only when it is
confidently behind the best trial at the same budget (paired bootstrap over neurons). The study
stops adding trials once, after `tune.min_trials`, the winner's advantage over the runner-up has a
bootstrap interval above 0, or after `tune.n_trials`. The winner is then run with the untuned
default (the per-grid table, `spikemax.am.policy.METHOD_AUTO`) on the disjoint validation panel and
adopted only when its advantage there is above 0 (its interval); otherwise the default is kept.
`resolve_auto` turns that result into what `maximize`'s `auto` runs.

Many workers share one study (processes of one `spikemax tune --workers N`, or the same command
on several machines with an RDB storage) and together run at most `tune.n_trials` trials:

- a worker starts a trial only while COMPLETE + PRUNED + RUNNING < n_trials; a trial that lost
  the race for the last slot (a smaller trial number took it) is failed unevaluated ("surplus");
- each worker's TPE sampler has its own seed and the constant liar, and a trial whose settings
  equal another live or finished trial's is failed unevaluated ("duplicate");
- on an RDB storage workers send heartbeats: a killed worker's trial is failed by the others
  (`fail_stale_trials`) and its slot is run again; on the journal file (one machine) one
  invocation holds a lock, so RUNNING trials it finds are stale and failed at start.

Every evaluated trial is exactly one run of the MLflow experiment `tuning`, named after its study,
opened when it starts (RUNNING; the pid of its worker tagged) and ended FINISHED (complete or
pruned: tag `spikemax.trial_state`) or FAILED, also when a worker was killed (by whichever worker
fails the stale trial).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spikemax import SpikemaxError
from spikemax.params import Params, Paths
from spikemax.tracking import TUNING_EXPERIMENT

SCORE = "median_am_gain"  # what a trial is scored by, as the maximize stage reports it per generator


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


def tuned_grid(grid: Any, grid_n: int | None) -> Any:
    """The grid a run (or a trial) searches: SN-GAN at a tuned resolution `grid_n` (None: `grid` itself)."""
    return grid if grid_n is None or grid_n == grid.n else with_resolution(grid, grid_n)


def trial_budget(params: Params) -> tuple[int, int]:
    """(queries per neuron, queries per ask) of a trial: tune's own, else the maximize stage's."""
    t, m = params.tune, params.maximize
    return t.budget or m.budget, t.batch or m.batch


def study_name(params: Params, epoch: int, generator: str) -> str:
    """`GENERATOR-eEPOCH-HASH`: a name that changes whenever what a trial measures changes (so old
    trials never mix in); trial runs are named after it."""
    t, m = params.tune, params.maximize
    key = json.dumps(
        {
            "tune": t.model_dump(exclude={"generators", "n_trials", "min_trials", "storage", "workers", "heartbeat"}),
            "generator": generator,
            "budget": trial_budget(params),
            "score": SCORE,
            "epoch": epoch,
            "snn": params.snn.model_dump(),
            "gen": params.generators.model_dump(),
            # the untuned defaults (the study's first trials) and what a trial does not vary
            "tt": m.tt.model_dump(),
            "noise": m.noise.model_dump(),
            "prior": [m.prior, m.prior_images] if generator in _prior_generators() else None,
            "max_images": m.max_images,
            # the panels avoid the maximize targets
            "targets": [m.targets, m.units_per_layer, m.units_from, m.target_seed],
        },
        sort_keys=True,
    )
    return f"{generator}-e{epoch}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _prior_generators() -> tuple[str, ...]:
    from spikemax.am.policy import PRIOR_GENERATORS

    return PRIOR_GENERATORS


# -- what maximize's `auto` runs ------------------------------------------------------------------


def resolve_auto(generator: str, tuned: dict[str, Any] | None) -> tuple[str, dict[str, Any], str]:
    """(method, settings, source) that `auto` runs on `generator`: the study's adopted winner
    (source "study"), or the per-grid table `METHOD_AUTO` with the configured settings ({}) when the
    study kept the default ("default") or there is no study result (`tuned` None: "fallback")."""
    from spikemax.am.policy import METHOD_AUTO
    from spikemax.generators import grid_ordered

    if tuned and tuned.get("adopted"):
        method, settings = tuned.get("method"), tuned.get("settings")
        if method not in ("tt", "cma") or not isinstance(settings, dict):
            raise SpikemaxError(f"tune result of {generator} names no method and settings: rerun `spikemax tune`")
        return str(method), dict(settings), "study"
    return METHOD_AUTO[grid_ordered(generator)], {}, "default" if tuned else "fallback"


def tuned_results(path: Path, generators: list[str]) -> dict[str, dict[str, Any]]:
    """Each generator's `resolve_auto` from the tune stage's metrics/tune.json as
    {generator: {"study", "method", "settings", "source"}}: every generator falls back to the table
    when the file is missing (no error); one-line error for a file of another version."""
    studies: dict[str, Any] = {}
    if path.is_file():  # missing: every run records method_source=fallback (a one-off maximize needs no tune)
        try:
            studies = json.loads(path.read_text())["generators"]
            ok = all(isinstance(s, dict) and "adopted" in s for s in studies.values())
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError):
            ok = False
        if not ok:
            raise SpikemaxError(f"{path} is not a tune stage result of this version: rerun `spikemax tune`")
    out: dict[str, dict[str, Any]] = {}
    for g in generators:
        method, settings, source = resolve_auto(g, studies.get(g))
        out[g] = {"study": (studies.get(g) or {}).get("study", "none"), "method": method, "settings": settings}
        out[g]["source"] = source
    return out


# -- panels and the search space --------------------------------------------------------------------


def pick_panel(
    layers: dict[str, int],
    dataset_rates: dict[str, np.ndarray],
    k: int,
    seed: int,
    exclude: set[tuple[str, int]] | frozenset = frozenset(),
) -> list[tuple[str, int]]:
    """k (layer, unit) pairs spread over the layers, each firing on some test image (gain defined),
    none in `exclude`; in the order drawn (round robin over layers), so any prefix is spread too."""
    rng = np.random.default_rng(seed)
    pools = {
        name: [
            int(u)
            for u in rng.permutation(units)
            if dataset_rates[name][:, u].max() > 0 and (name, int(u)) not in exclude
        ]
        for name, units in layers.items()
    }
    panel: list[tuple[str, int]] = []
    while len(panel) < k and any(pools.values()):
        for name in layers:
            if pools[name] and len(panel) < k:
                panel.append((name, pools[name].pop(0)))
    if not panel:
        raise SpikemaxError("no neuron of the tuning checkpoint fires on any test image (outside the maximize targets)")
    return panel


@dataclass(frozen=True)
class Space:
    """The search space of one generator's study (each list holds the untuned default too)."""

    methods: tuple[str, ...]
    ordered: bool
    ranks: tuple[int, ...]
    lr: tuple[float, float]
    elite: tuple[int, ...]
    cma_share: tuple[float, ...]
    sigma0: tuple[float, float]
    popsize: tuple[int, ...]
    grid_n: tuple[int, ...]
    noisy: bool
    retest: tuple[float, ...]
    estimators: tuple[str, ...]
    defaults: dict[str, dict[str, Any]]  # method -> its untuned settings (a point of this space)


CMA_SIGMA0 = 0.3  # CMAOptimizer's default initial step (the untuned CMA-ES)


def space_of(params: Params, generator: str) -> Space:
    """`generator`'s search space from `tune`, widened to hold the maximize stage's untuned settings."""
    from spikemax.generators import grid_ordered
    from spikemax.optim.options import noise_aware_on
    from spikemax.optim.tt import resolve_cma

    t, m = params.tune, params.maximize
    ordered = grid_ordered(generator)
    base_n = params.generators.sngan.grid_n if ordered else None
    tt = {"rank": m.tt.rank, "lr": m.tt.lr, "elite": m.tt.elite}
    if ordered:
        tt["cma_share"] = resolve_cma(m.tt.cma, True)
    cma: dict[str, Any] = {"sigma0": CMA_SIGMA0, "popsize": 0}
    common: dict[str, Any] = {"grid_n": base_n} if ordered else {}
    noisy = m.noise.model != "none"
    if noisy:
        common["aware"] = noise_aware_on(m.noise)  # "auto" (the default): on under a noise model
        if common["aware"]:
            common |= {"retest": m.noise.retest, "estimator": m.noise.estimator}

    def union(values: Any, default: Any) -> tuple:
        return tuple(sorted({*values, default}))

    return Space(
        methods=tuple(t.methods),
        ordered=ordered,
        ranks=union(t.ranks, m.tt.rank),
        lr=(min(t.lr[0], m.tt.lr), max(t.lr[1], m.tt.lr)),
        elite=union(t.elite, m.tt.elite),
        cma_share=union(t.cma_share, tt.get("cma_share", 0.0)),
        sigma0=(min(t.sigma0[0], CMA_SIGMA0), max(t.sigma0[1], CMA_SIGMA0)),
        popsize=union(t.popsize, 0),
        grid_n=union(t.grid_n, base_n) if ordered else (),
        noisy=noisy,
        retest=union(t.retest, m.noise.retest),
        estimators=tuple(dict.fromkeys([*t.estimators, m.noise.estimator])),
        defaults={"tt": {**tt, **common}, "cma": {**cma, **common}},
    )


def suggest(trial: Any, space: Space) -> tuple[str, dict[str, Any]]:
    """The trial's method and settings (Optuna params: "method" and the settings' names)."""
    method = trial.suggest_categorical("method", list(space.methods))
    s: dict[str, Any] = {}
    if method == "tt":
        s["rank"] = trial.suggest_categorical("rank", list(space.ranks))
        s["lr"] = trial.suggest_float("lr", *space.lr, log=True)
        s["elite"] = trial.suggest_categorical("elite", list(space.elite))
        if space.ordered:  # CMA-ES proposals need an ordered grid's continuous relaxation
            s["cma_share"] = trial.suggest_categorical("cma_share", list(space.cma_share))
    else:
        s["sigma0"] = trial.suggest_float("sigma0", *space.sigma0, log=True)
        s["popsize"] = trial.suggest_categorical("popsize", list(space.popsize))
    if space.ordered:  # a codebook's size is the generator's
        s["grid_n"] = trial.suggest_categorical("grid_n", list(space.grid_n))
    if space.noisy:
        s["aware"] = trial.suggest_categorical("aware", [False, True])
        if s["aware"]:
            s["retest"] = trial.suggest_categorical("retest", list(space.retest))
            s["estimator"] = trial.suggest_categorical("estimator", list(space.estimators))
    return method, s


def settings_of(trial: Any) -> tuple[str, dict[str, Any]]:
    """(method, settings) of a finished trial."""
    return str(trial.params["method"]), {k: v for k, v in trial.params.items() if k != "method"}


def paired_difference(a: Any, b: Any, level: float, seed: int = 0) -> dict[str, float | int | None]:
    """median(a) - median(b) over the same neurons, with its bootstrap interval (neurons resampled
    in pairs): {"value", "lo", "hi", "n"}."""
    from spikemax.stats import bootstrap_ci

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired scores need the same neurons, got {x.shape} and {y.shape}")
    return bootstrap_ci(len(x), lambda i: float(np.median(x[i]) - np.median(y[i])), level=level, seed=seed)


def score_ci(gains: Any, level: float, seed: int = 0) -> dict[str, float | int | None]:
    """The median gain over a panel with its bootstrap interval over the neurons."""
    from spikemax.stats import bootstrap_ci

    g = np.asarray(gains, dtype=np.float64)
    return bootstrap_ci(len(g), lambda i: float(np.median(g[i])), level=level, seed=seed)


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
    """One MLflow run per evaluated trial in the experiment `tuning`, named `STUDY-tNN`.

    A pruned trial ends FINISHED with the tag `spikemax.trial_state` PRUNED: MLflow has no pruned
    status and its KILLED reads as "the process was killed" in the UI, while a pruned trial ended as
    planned with valid intermediate scores; the tag filters them (`tags.spikemax.trial_state = 'PRUNED'`).
    """

    def __init__(self, root: Any, params: Params) -> None:
        import mlflow

        from spikemax import tracking

        self.client = mlflow.MlflowClient(tracking.configure(root))
        self.eid = tracking.experiment_id(TUNING_EXPERIMENT, root)
        self.tags = tracking.run_tags(root, params, "tune")  # commit and params hash, as every stage's runs

    def open(self, trial: Any, method: str) -> str:
        """Create the trial's run (RUNNING) and record its id on the trial."""
        from mlflow.entities import Param

        study = trial.study.study_name
        run = self.client.create_run(
            self.eid,
            run_name=f"{study}-t{trial.number:02d}",
            tags={
                **self.tags,
                "spikemax.study": study,
                "spikemax.trial": str(trial.number),
                "spikemax.method": method,
                "spikemax.trial_state": "RUNNING",
                "spikemax.worker": f"{socket.gethostname()}:{os.getpid()}",
            },
        )
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in trial.params.items()])
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        return run.info.run_id

    def score(self, run_id: str, value: float, step: int) -> None:
        """An intermediate (or the final) median AM gain over the training panel at `step` queries."""
        self.client.log_metric(run_id, SCORE, float(value), step=step)

    def close(
        self,
        run_id: str,
        state: str,
        targets: list[str],
        gains: list[float] | None = None,
        frac_above: float | None = None,
    ) -> None:
        """End the run: FINISHED (complete or pruned, told apart by `spikemax.trial_state`) or
        FAILED, with the per-neuron gains of a complete trial."""
        from mlflow.entities import Metric, RunTag

        metrics = [Metric(f"gain_{t.replace(':', '_')}", float(g), 0, 0) for t, g in zip(targets, gains or [])]
        if frac_above is not None:
            metrics.append(Metric("frac_above_dataset", float(frac_above), 0, 0))
        self.client.log_batch(run_id, metrics=metrics, tags=[RunTag("spikemax.trial_state", state)])
        self.client.set_terminated(run_id, "FINISHED" if state in FINISHED_STATES else "FAILED")

    def fail_stale(self, run_id: str) -> None:
        """The run of a trial whose worker died (no heartbeat): FAILED."""
        from mlflow.entities import RunTag

        self.client.log_batch(
            run_id,
            tags=[RunTag("spikemax.trial_state", "FAIL"), RunTag("spikemax.failure", "worker lost (no heartbeat)")],
        )
        self.client.set_terminated(run_id, "FAILED")

    def validation(self, study: str, result: dict[str, Any]) -> None:
        """The validation of a study's winner against the untuned default: one FINISHED run `STUDY-validation`."""
        from mlflow.entities import Metric, Param, RunTag

        run = self.client.create_run(
            self.eid,
            run_name=f"{study}-validation",
            tags={**self.tags, "spikemax.study": study, "spikemax.trial_state": "VALIDATION"},
        )
        metrics = []
        for who in ("winner", "default", "difference"):
            for k in ("value", "lo", "hi"):
                v = result[who][k]
                if v is not None:
                    metrics.append(Metric(f"{who}_{SCORE}" + ("" if k == "value" else f"_{k}"), float(v), 0, 0))
        params = [
            Param("winner_trial", str(result["winner_trial"])),
            Param("winner_method", result["winner_method"]),
            Param("default_method", result["default_method"]),
            Param("neurons", str(result["winner"]["n"])),
        ]
        tags = [
            RunTag("spikemax.verdict", result["verdict"]),
            RunTag("spikemax.adopted", str(result["adopted"]).lower()),
        ]
        self.client.log_batch(run.info.run_id, metrics=metrics, params=params, tags=tags)
        self.client.set_terminated(run.info.run_id, "FINISHED")


class Bench:
    """Where one generator's study measures: the tuning checkpoint's network, the training and
    validation panels (live units, no maximize target), their dataset maxima and the generator grid.

    `run(method, settings, panel)` runs the search on every neuron of a panel in lock step (neuron j
    with seed `tune.seed + j`) and returns the per-neuron AM gains; `on_rung(queries, gains)` is
    called at every rung budget (it may raise to stop the trial)."""

    def __init__(self, params: Params, paths: Paths, epoch: int, generator: str) -> None:
        import torch

        from spikemax.am.measures import dataset_stats
        from spikemax.am.plan import live_units, resolve_targets
        from spikemax.am.policy import PRIOR_GENERATORS
        from spikemax.data import Prepared
        from spikemax.devices import resolve
        from spikemax.generators import checkpoint_path, load_generator
        from spikemax.neurons import layer_rates, parse_target
        from spikemax.snn import checkpoints, load_snn

        self.params, self.paths, self.generator = params, paths, generator
        t, m = params.tune, params.maximize
        device = resolve(params.device)
        ckpts = checkpoints(paths)
        self.net = load_snn(ckpts[epoch]).eval().to(device)
        self.prepared = Prepared.load(paths.prepared)
        x_test, _ = self.prepared.tensors("test")
        with torch.no_grad():
            rates = layer_rates(self.net, x_test)
        layers = dict(self.net.spiking_layers())
        # The maximize targets (drawn from the last checkpoint's live units) stay out of both panels.
        last = self.net if epoch == max(ckpts) else load_snn(ckpts[max(ckpts)])
        taken = {(tg.layer, tg.unit) for tg in resolve_targets(m, layers, live_units(last, paths, m))}
        panel = pick_panel(layers, rates, t.neurons + t.validation, t.seed, exclude=taken)
        if len(panel) < t.neurons + 1:
            raise SpikemaxError(
                f"tune: {len(panel)} live units outside the maximize targets; need tune.neurons + 1 ({t.neurons + 1})"
            )
        names = [f"{layer}:{unit}" for layer, unit in panel]
        self.targets = {"train": names[: t.neurons], "validation": names[t.neurons :]}
        stats = dataset_stats(self.net, self.prepared, [parse_target(n, layers) for n in names], m.max_images)
        self.dataset_max = {"train": stats["dataset_max"][: t.neurons], "validation": stats["dataset_max"][t.neurons :]}
        self.ckpt = checkpoint_path(generator, paths)
        self.grid = load_generator(generator, self.ckpt).to(device)
        self.use_prior = bool(m.prior and generator in PRIOR_GENERATORS)
        self._priors: dict[int, Any] = {}
        self.budget, self.batch = trial_budget(params)
        # Rung budgets are whole batches, so a trial cut into rungs asks exactly what one run would.
        n_batches = -(-self.budget // self.batch)
        self.cuts = sorted(
            {min(self.budget, self.batch * round(n_batches * (i + 1) / t.rungs)) for i in range(t.rungs)} - {0}
        )

    def prior(self, rank: int) -> Any:
        """The codebook's TT data prior at `rank` (None where the maximize stage uses none)."""
        from spikemax.am.prior import fit_grid_prior

        if not self.use_prior:
            return None
        if rank not in self._priors:
            cache = self.paths.results / "tune" / f"prior_{self.generator}_r{rank}.npz"
            cache.parent.mkdir(parents=True, exist_ok=True)
            self._priors[rank] = fit_grid_prior(
                self.grid, self.prepared, self.ckpt, rank, self.params.maximize.prior_images, cache
            )
        return self._priors[rank]

    def run(
        self,
        method: str,
        settings: dict[str, Any],
        panel: str,
        on_rung: Callable[[int, np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """Per-neuron AM gains (best / dataset max) of `method` with `settings` on `panel`; under
        noise the best stimulus (by its measured response) is scored by its noiseless response."""
        from spikemax.am.loop import run_am_group
        from spikemax.am.policy import settings_options, with_settings
        from spikemax.neurons import make_responder
        from spikemax.optim import make_optimizer

        t = self.params.tune
        m = with_settings(self.params.maximize, method, settings)
        grid = tuned_grid(self.grid, settings.get("grid_n"))
        opts = settings_options(self.params.maximize, method, settings, bool(grid.ordered))
        if method == "tt" and self.prior(m.tt.rank) is not None:
            opts["prior"] = self.prior(m.tt.rank)
        targets, dmax = self.targets[panel], self.dataset_max[panel]
        optimizers = [make_optimizer(method, grid.d, grid.n, seed=t.seed + j, **opts) for j in range(len(targets))]
        noisy = m.noise.model != "none"
        responder = make_responder(
            self.net,
            targets,
            seed=t.seed,
            model=m.noise.model,
            sigma=m.noise.sigma,
            window=m.noise.window,
            repeats=m.noise.repeats,
        )
        exact = make_responder(self.net, targets) if noisy else None
        best = np.full(len(targets), -np.inf)
        images: list[Any] = [None] * len(targets)
        done = 0
        gains = np.zeros(len(targets))
        for cut in self.cuts:
            results = run_am_group(
                optimizers, grid, responder, cut - done, self.batch, max_images=self.params.maximize.max_images
            )
            done = cut
            for j, r in enumerate(results):
                if r.best_response > best[j]:
                    best[j], images[j] = r.best_response, r.best_image
            if exact is not None and all(im is not None for im in images):
                import torch

                with torch.no_grad():
                    true = np.diag(exact(torch.stack([im.to(self.grid_device) for im in images])))
            else:
                true = best
            gains = np.asarray(true, dtype=np.float64) / dmax
            if on_rung is not None:
                on_rung(done, gains)
        return gains

    @property
    def grid_device(self) -> Any:
        return next(iter(self.net.parameters())).device


def _rung_key(step: int) -> str:
    return f"gains@{step}"


def make_pruner(level: float, seed: int = 0) -> Any:
    """`PanelPruner` (an Optuna pruner): see its docstring."""
    import optuna

    class PanelPruner(optuna.pruners.BasePruner):
        """Prune a trial only when, at its last rung, the paired bootstrap interval over the panel's
        neurons of (its median gain - the best complete trial's median gain at the same budget) lies
        below 0: a bad trial stops early, a good one behind by chance on a few neurons does not."""

        def prune(self, study: Any, trial: Any) -> bool:
            step = trial.last_step
            mine = trial.user_attrs.get(_rung_key(step)) if step is not None else None
            complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if mine is None or not complete:
                return False
            theirs = max(complete, key=lambda tr: tr.value).user_attrs.get(_rung_key(step))
            if theirs is None or len(theirs) != len(mine):
                return False
            hi = paired_difference(mine, theirs, level, seed)["hi"]
            return hi is not None and hi < 0

    return PanelPruner()


def make_objective(
    params: Params, paths: Paths, epoch: int, generator: str, runs: TrialRuns | None = None, bench: Bench | None = None
) -> tuple[Callable, list]:
    """The Optuna objective of `generator`'s study: the median AM gain over the training panel of the
    trial's method and settings; returns it and the training panel's targets."""
    import optuna

    from spikemax.selectivity import am_gain_summary

    t = params.tune
    bench = bench or Bench(params, paths, epoch, generator)
    space = space_of(params, generator)
    targets = bench.targets["train"]
    dmax = bench.dataset_max["train"]

    def objective(trial: Any) -> float:
        claim_slot(trial, t.n_trials)
        method, settings = suggest(trial, space)
        check_unique(trial)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("targets", targets)
        run_id = runs.open(trial, method) if runs is not None else None
        state, gains, above = "FAIL", None, None
        summary: dict[str, Any] = {}

        def on_rung(done: int, g: np.ndarray) -> None:
            nonlocal state, summary
            summary = am_gain_summary(g * dmax, dmax)
            score = float(summary[SCORE] or 0.0)
            trial.set_user_attr(_rung_key(done), [float(x) for x in g])
            if run_id is not None:
                runs.score(run_id, score, done)  # type: ignore[union-attr]
            if done < bench.budget:
                trial.report(score, done)
                if trial.should_prune():
                    state = "PRUNED"
                    raise optuna.TrialPruned(f"{SCORE} {score:.3f} after {done} queries: behind the best trial")

        try:
            final = bench.run(method, settings, "train", on_rung)
            gains = [float(x) for x in final]
            above = summary["frac_above_dataset"]
            trial.set_user_attr("gains", gains)
            trial.set_user_attr("frac_above_dataset", above)
            state = "COMPLETE"
            return float(summary[SCORE] or 0.0)
        finally:
            if run_id is not None:
                runs.close(run_id, state, targets, gains, above)  # type: ignore[union-attr]
            print(f"tune {generator}: trial {trial.number} {method} {settings} -> {state.lower()}", flush=True)

    return objective, targets


def enqueue_defaults(study: Any, params: Params, generator: str) -> None:
    """Make the untuned configuration of each searched method the study's first trials (once)."""
    if study.get_trials(deepcopy=False):
        return
    space = space_of(params, generator)
    for method in space.methods:
        study.enqueue_trial({"method": method, **space.defaults[method]})


def separation(study: Any, level: float, seed: int = 0) -> dict[str, Any] | None:
    """The winner (best complete trial) against the runner-up on the training panel: their trial
    numbers and the paired bootstrap interval of the difference of their median gains (None with
    fewer than two complete trials)."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return None
    top = sorted(complete, key=lambda tr: (-tr.value, tr.number))[:2]
    diff = paired_difference(top[0].user_attrs["gains"], top[1].user_attrs["gains"], level, seed)
    return {"winner": top[0].number, "runner_up": top[1].number, "difference": diff}


def stop_reason(study: Any, params: Params) -> str | None:
    """Why the study adds no more trials: "budget" (`n_trials` finished), "separated" (after
    `min_trials`, the winner's advantage over the runner-up has an interval above 0), else None."""
    t = params.tune
    finished = counts(study)[0]
    if finished >= t.n_trials:
        return "budget"
    if finished >= t.min_trials:
        sep = separation(study, t.level, t.seed)
        lo = sep["difference"]["lo"] if sep is not None else None
        if lo is not None and lo > 0:
            return "separated"
    return None


def validate_winner(study: Any, params: Params, bench: Bench, runs: TrialRuns | None = None) -> dict[str, Any] | None:
    """The study's winner against the untuned default (the per-grid table's method as configured) on
    the validation panel: each one's median gain with its interval, the paired difference, the
    verdict ("better": interval above 0, "worse": below, else "tie") and whether it is adopted (only
    "better"). Stored on the study, so a rerun with the same winner does not measure again; None
    when no trial completed."""
    import optuna

    from spikemax.am.policy import METHOD_AUTO
    from spikemax.generators import grid_ordered

    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        return None
    t = params.tune
    winner = study.best_trial
    cached = study.user_attrs.get("validation")
    if cached and cached.get("winner_trial") == winner.number:
        return dict(cached)
    w_method, w_settings = settings_of(winner)
    d_method = METHOD_AUTO[grid_ordered(bench.generator)]
    d_settings = space_of(params, bench.generator).defaults[d_method]
    same = (w_method, w_settings) == (d_method, d_settings)
    g_w = bench.run(w_method, w_settings, "validation")
    g_d = g_w if same else bench.run(d_method, d_settings, "validation")
    diff = paired_difference(g_w, g_d, t.level, t.seed)
    lo, hi = diff["lo"], diff["hi"]
    verdict = (
        "same" if same else "better" if lo is not None and lo > 0 else "worse" if hi is not None and hi < 0 else "tie"
    )
    result = {
        "winner_trial": winner.number,
        "winner_method": w_method,
        "default_method": d_method,
        "targets": bench.targets["validation"],
        "winner": score_ci(g_w, t.level, t.seed),
        "default": score_ci(g_d, t.level, t.seed),
        "difference": diff,
        "winner_gains": [float(x) for x in g_w],
        "default_gains": [float(x) for x in g_d],
        "verdict": verdict,
        "adopted": verdict == "better",
    }
    study.set_user_attr("validation", result)
    if runs is not None:
        runs.validation(study.study_name, result)
    return result


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
