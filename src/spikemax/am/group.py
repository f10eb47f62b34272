"""One lock-step group of AM runs (or one population), the same on every executor: open the runs,
build their optimizers from their specs, run the loop, write and finish every run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from spikemax import tracking
from spikemax.am.lifecycle import OpenRun, RunTracker
from spikemax.am.loop import AMResult, run_am_group, run_am_population
from spikemax.am.measures import stimulus_stats
from spikemax.am.plan import Plan
from spikemax.am.prior import Priors
from spikemax.am.results import ResultFiles, has_state, load_state
from spikemax.am.spec import GroupSpec, RunSpec, build_optimizer
from spikemax.am.summary import queries_saved, run_metrics, run_row
from spikemax.neurons import make_responder
from spikemax.querylog import PopulationTable

if TYPE_CHECKING:
    from spikemax.generators import LatentGrid
    from spikemax.optim import Optimizer
    from spikemax.params import Params, Paths
    from spikemax.snn import ConvSNN


class Progress(Protocol):
    """Where a group reports its progress (the stage's bars; nothing on a Ray worker)."""

    def queries(self, k: int) -> None: ...
    def runs(self, k: int) -> None: ...
    def more_queries(self, k: int) -> None: ...
    def group(self, group: GroupSpec, n_runs: int) -> None: ...


class Quiet:
    """Progress of a remote group (the driver advances its bars when the group returns)."""

    def queries(self, k: int) -> None:
        pass

    def runs(self, k: int) -> None:
        pass

    def more_queries(self, k: int) -> None:
        pass

    def group(self, group: GroupSpec, n_runs: int) -> None:
        pass


@dataclass
class Context:
    """What every group of one stage invocation shares: its plan, store, files and finished runs."""

    params: Params
    paths: Paths
    plan: Plan
    tracker: RunTracker
    files: ResultFiles
    priors: Priors
    parent_id: str = ""
    done: dict[str, dict] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    logging_s: float = 0.0  # time inside the query loggers (the cost of logging every query)

    @classmethod
    def create(cls, params: Params, paths: Paths, plan: Plan) -> Context:
        """The context of `plan` (the prepared data loaded, the store configured; nothing opened)."""
        from spikemax.data import Prepared

        am_dir = paths.results / "am"
        prepared = Prepared.load(paths.prepared)
        m = params.maximize
        priors = Priors(am_dir, prepared, plan.gen_ckpts, m.tt.rank, m.prior_images)
        return cls(params, paths, plan, RunTracker(paths.root), ResultFiles(am_dir, prepared), priors)

    @property
    def m(self) -> Any:
        return self.params.maximize

    def warm_source(self, spec: RunSpec) -> str:
        """Key of the previous checkpoint's run `spec` warm-starts from ("" = cold start)."""
        prev = self.plan.previous(spec)
        if prev is None:
            return ""
        # Only from a search that made the neuron fire: a silent neuron's search (e.g. class units
        # of the untrained epoch 0) learned nothing about it, and starting from it cost queries
        # (benchmarks: SN-GAN e0 -> e2 warm starts were slower on 6 of 8 neurons).
        # The previous run's summary from memory or, on a Ray worker that did not run it, from disk.
        row = self.done.get(prev.key) or self.files.read_row(prev) or {}
        fired = float(row.get("best_activation", 0.0) or 0.0) > 0
        return prev.key if fired and has_state(self.files.run_dir(prev)) else ""

    def optimizer(self, spec: RunSpec, grid: LatentGrid, warm_from: str) -> Optimizer:
        """A run's optimizer: its spec, its prior, and the warm-start state of `warm_from`."""
        prior = self.priors.get(spec.generator, grid, spec.prior_rank)
        init = load_state(self.files.am_dir / "runs" / warm_from) if warm_from else None
        opt = build_optimizer(spec, grid.d, grid.n, prior=prior, init=init)
        noise = self.m.noise
        if noise.references > 0:  # a drifting neuron: references in every ask, values rescaled by their gain
            from spikemax.neurons import reference_points
            from spikemax.optim.drift import DriftCorrected

            refs = reference_points(grid, self.files.prepared.tensors("test")[0], noise.reference_set)
            opt = DriftCorrected(opt, refs, per_batch=noise.references)
        return opt


def _drift(noise: Any, budget: int, seed: int) -> Any:
    """The responder's drifting gain (`noise.drift_trend` / `drift_walk`), None for a steady neuron."""
    if not (noise.drift_trend or noise.drift_walk):
        return None
    from spikemax.optim.drift import DriftingGain

    return DriftingGain(noise.drift_trend, noise.drift_walk, horizon=budget, seed=seed)


def run_group(
    ctx: Context,
    group: GroupSpec,
    runs: list[RunSpec],
    grid: LatentGrid,
    net: ConvSNN,
    stats: dict[str, np.ndarray],
    progress: Progress,
) -> int:
    """Run `runs` of `group` in lock step, or as one population (then `runs` is every target,
    finished ones only re-propose); returns queries run (presentations in population mode)."""
    m = ctx.m
    population = bool(group.runs[0].population)
    budget = group.runs[0].budget  # one checkpoint per group: one budget
    opens: list[OpenRun] = []
    progress.group(group, len(runs))
    try:
        for spec in runs:
            if spec.key not in ctx.done:
                warm_from = ctx.warm_source(spec)
                run_dir = ctx.files.fresh_run_dir(spec)  # leftovers of an unfinished attempt go
                opens.append(ctx.tracker.open_run(spec, ctx.parent_id, warm_from, m, grid, group.snn_ckpt, run_dir))
        by_key = {op.spec.key: op for op in opens}
        optimizers = [
            ctx.optimizer(spec, grid, by_key[spec.key].warm_from if spec.key in by_key else ctx.warm_source(spec))
            for spec in runs
        ]
        # With measure_warm_start, warm runs get a cold twin (run alongside, not logged): queries_saved.
        measure = m.measure_warm_start and not population
        warm = [i for i, spec in enumerate(runs) if measure and spec.key in by_key and by_key[spec.key].warm_from]
        # A twin spends the scan's `budget` (not budget_last): queries_saved compares the first `budget` queries.
        twins = [runs[i].cold_twin(m.budget) for i in warm]
        if twins:
            progress.more_queries(len(twins) * m.budget)
        names = [spec.target.name for spec in runs] + [spec.target.name for spec in twins]
        responder = make_responder(
            net,
            names,
            seed=group.noise_seed,
            model=m.noise.model,
            sigma=m.noise.sigma,
            window=m.noise.window,
            repeats=m.noise.repeats,
            drift=_drift(m.noise, budget, group.noise_seed),
        )
        if population:
            everything = _population(ctx, group, runs, by_key, optimizers, grid, responder, budget, progress)
        else:
            everything = run_am_group(
                optimizers + [ctx.optimizer(t, grid, "") for t in twins],
                grid,
                responder,
                [budget] * len(optimizers) + [t.budget for t in twins],
                m.batch,
                loggers=[op.logger for op in opens] + [None] * len(twins),
                target_value=m.target_value,
                on_batch=progress.queries,
                max_images=m.max_images,
            )
        results = everything[: len(runs)]
        cold = {runs[i].key: r for i, r in zip(warm, everything[len(runs) :])}
        mine = [(by_key[s.key], opt, res) for s, opt, res in zip(runs, optimizers, results) if s.key in by_key]
        extras = stimulus_stats(net, ctx.files.prepared, [res for _, _, res in mine])
        col = {t: i for i, t in enumerate(ctx.plan.targets)}
        for (op, opt, res), ex in zip(mine, extras):
            j = col[op.spec.target]
            ex = {**ex, "dataset_csi": float(stats["csi"][j]), "dataset_sparseness": float(stats["sparseness"][j])}
            finish_run(ctx, op, res, opt, float(stats["dataset_max"][j]), ex, cold.get(op.spec.key))
            progress.runs(1)
        return results[0].n_queries if population else sum(r.n_queries for r in everything)
    except Exception as err:
        for op in opens:
            if op.spec.key not in ctx.done:
                ctx.failed.append(ctx.tracker.fail_run(op, err))
        opened = {op.spec.key for op in opens}
        # Failed while opening: the rest has no run to mark, but failed.
        ctx.failed += [
            f"{s.key}: {type(err).__name__}: {err}"[:4000] for s in runs if s.key not in opened | set(ctx.done)
        ]
        return 0
    except BaseException as err:  # interrupted: mark, then stop
        for op in opens:
            if op.spec.key not in ctx.done:
                ctx.failed.append(ctx.tracker.fail_run(op, err))
        raise


def _population(
    ctx: Context,
    group: GroupSpec,
    runs: list[RunSpec],
    by_key: dict[str, OpenRun],
    optimizers: list[Any],
    grid: LatentGrid,
    responder: Any,
    budget: int,
    progress: Progress,
) -> list[AMResult]:
    """The population of `group`: one shared presentation set, its table under populations/."""
    m = ctx.m
    meta = {
        "targets": [s.target.name for s in runs],
        "run_keys": [s.key for s in runs],
        "run_ids": [by_key[s.key].run_id if s.key in by_key else ctx.done[s.key]["run_id"] for s in runs],
        "method": group.method,
        "rule": m.population_rule,
        "budget": budget,
        "batch": m.batch,
    }
    table = PopulationTable(ctx.files.am_dir / "populations" / runs[0].population, meta)
    n_open = len(by_key)
    out = run_am_population(
        optimizers,
        grid,
        responder,
        budget,
        m.batch,
        loggers=[by_key[s.key].logger if s.key in by_key else None for s in runs],
        table=table,
        rule=m.population_rule,
        target_value=m.target_value,
        on_batch=lambda k: progress.queries(k * n_open),
        max_images=m.max_images,
    )
    table.close()
    return out


def finish_run(
    ctx: Context,
    op: OpenRun,
    res: AMResult,
    optimizer: Optimizer,
    dataset_max: float,
    extras: dict[str, float],
    cold: AMResult | None = None,
) -> dict:
    """Write a run's files and summary row, log them, and mark it FINISHED (last)."""
    spec = op.spec
    op.logger.close()
    ctx.logging_s += op.logger.seconds
    saved = queries_saved(res, cold) if op.warm_from else 0
    state = optimizer.state_dict() if spec.resolved == "tt" and hasattr(optimizer, "state_dict") else None
    pngs = ctx.files.write_run(spec, res, state)
    row = run_row(spec, op.run_id, op.warm_from, res, ctx.m.budget, dataset_max, saved, extras)
    ctx.tracker.log_results(op, run_metrics(row, res.wall_s), pngs, ctx.files.prepared.classes)
    ctx.files.write_row(spec, row)
    # FINISHED last: a kill before this line leaves the run to be redone, never half-counted.
    ctx.tracker.mark_finished(op)
    ctx.done[spec.key] = row
    return row


def group_on_worker(
    params: Params, paths: Paths, plan: Plan, index: int, parent_id: str, stats: Any, tracking_uri: str
) -> dict:
    """Group `index` of `plan` on a Ray worker: its finished runs (from an attempt before a worker
    died) are kept, runs that attempt left RUNNING are failed, the rest run as in the local loop."""
    import os

    from spikemax import devices
    from spikemax.generators import load_generator
    from spikemax.snn import load_snn

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # the driver's store, whatever the worker started with
    ctx = Context.create(params, paths, plan)
    ctx.parent_id = parent_id
    group = plan.groups[index]
    n = 0  # queries this stage invocation ran
    for spec in group.runs:
        row = ctx.files.read_row(spec)
        earlier = ctx.tracker.client.get_run(row["run_id"]) if row is not None else None
        if row is not None and earlier is not None and earlier.info.status == "FINISHED":
            ctx.done[spec.key] = row
            if earlier.data.tags.get(tracking.SCAN_TAG) == parent_id and not spec.population:
                n += int(row["n_queries"])  # run by a lost attempt of this task: counted as in-process
            continue
        ctx.tracker.fail_leftover(spec.key)
    runs = plan.group_runs(group, ctx.done)
    if runs:
        device = devices.resolve(params.device)
        net = load_snn(group.snn_ckpt).eval().to(device)
        from spikemax.tuning import tuned_grid

        grid = tuned_grid(load_generator(group.generator, group.gen_ckpt).to(device), group.grid_n)
        n += run_group(ctx, group, runs, grid, net, stats, Quiet())
    rows = {s.key: ctx.done[s.key] for s in group.runs if s.key in ctx.done}
    return {"rows": rows, "failed": ctx.failed, "queries": n, "logging_s": ctx.logging_s}


def stats_on_worker(params: Params, paths: Paths, snn_ckpt: Path, targets: list[Any]) -> dict[str, np.ndarray]:
    """dataset_stats of one checkpoint, on a worker."""
    from spikemax import devices
    from spikemax.am.measures import dataset_stats
    from spikemax.data import Prepared
    from spikemax.snn import load_snn

    net = load_snn(snn_ckpt).eval().to(devices.resolve(params.device))
    return dataset_stats(net, Prepared.load(paths.prepared), targets, params.maximize.max_images)
