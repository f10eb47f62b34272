"""Stage `maximize`: every planned AM run (checkpoint, generator, target, method, seed) not finished
yet, group by group on an executor; then summary.csv, the stimulus grids and metrics/am.json."""

from __future__ import annotations

import json
import time

from spikemax import SpikemaxError, devices, tracking
from spikemax.am.engine import EngineSettings, executor
from spikemax.am.group import Context
from spikemax.am.plan import Plan, plan
from spikemax.am.runtime import StageProgress, project_lock, sigterm_interrupts
from spikemax.am.summary import write_metrics, write_summary
from spikemax.generators import load_generator
from spikemax.params import Params, Paths


def run(params: Params, paths: Paths, engine: EngineSettings | None = None) -> dict:
    """Run every planned AM run not finished yet; write summary, grids and metrics/am.json."""
    settings = engine or EngineSettings.resolve(params.maximize)
    # Everything is validated before anything is opened or written (a refused run changes nothing).
    plan_ = plan(params, paths, *tuned_settings(params, paths))
    device = devices.resolve(params.device)
    grids = {g: load_generator(g, p).to(device) for g, p in plan_.gen_ckpts.items()}
    with project_lock(paths, "maximize"), sigterm_interrupts():
        ctx = Context.create(params, paths, plan_)
        ctx.tracker.fail_stale()  # under the lock: a RUNNING run's process is dead, whatever its plan
        ctx.done = ctx.tracker.finished({r.key: r for r in plan_.runs}, ctx.files.read_row)
        ctx.files.am_dir.mkdir(parents=True, exist_ok=True)
        todo = [r for r in plan_.runs if r.key not in ctx.done]
        ctx.parent_id = ctx.tracker.open_parent(
            parent_params(params, plan_, len(todo)), tracking.run_tags(paths.root, params, "maximize")
        )
        t0 = time.perf_counter()
        n_run, status = 0, "FINISHED"
        try:
            with StageProgress(len(todo), sum(r.budget for r in todo)) as progress:
                write = lambda: write_summary(ctx.files.am_dir, plan_, ctx.done)  # noqa: E731
                n_run = executor(settings, grids, device).run(ctx, progress, write)
        except BaseException:
            status = "FAILED"
            raise
        finally:
            df = write_summary(ctx.files.am_dir, plan_, ctx.done)
            wall = time.perf_counter() - t0
            if status == "FINISHED":
                m = params.maximize
                ctx.files.write_grids(plan_, ctx.done, list(m.generators), list(m.methods), m.seeds[0])
                ctx.files.prune(plan_)
            n_failed, logging_s = len(ctx.failed), ctx.logging_s
            metrics = write_metrics(paths.metrics / "am.json", df, len(plan_.runs), n_failed, wall, n_run, logging_s)
            ctx.tracker.close_parent(ctx.parent_id, "FAILED" if ctx.failed else status, metrics)
    if ctx.failed:
        raise SpikemaxError(f"{len(ctx.failed)} AM run(s) failed (marked FAILED in MLflow); first: {ctx.failed[0]}")
    return metrics


def tuned_settings(params: Params, paths: Paths) -> tuple[dict, str]:
    """`maximize.tuned`: each generator's tune result (`tuning.resolve_auto`: the adopted method and
    settings, the default kept, or the fallback table without a result) and the names of the studies
    whose winners were adopted; ({}, "") when off."""
    from spikemax.tuning import tuned_results

    if not params.maximize.tuned:
        return {}, ""
    tuned = tuned_results(paths.metrics / "tune.json", list(params.maximize.generators))
    return tuned, ",".join(s["study"] for s in tuned.values() if s["source"] == "study") or "none"


def parent_params(params: Params, plan_: Plan, n_todo: int) -> dict:
    """The parent run's params: the scan's configuration."""
    m = params.maximize
    return {
        "epochs": ",".join(map(str, plan_.epochs)),
        "generators": ",".join(m.generators),
        "methods": ",".join(m.methods),
        "seeds": ",".join(map(str, m.seeds)),
        "n_targets": len(plan_.targets),
        "budget": m.budget,
        "budget_last": m.budget_last or m.budget,
        "batch": m.batch,
        "noise": json.dumps(m.noise.model_dump(), sort_keys=True),
        "population": m.population_rule if m.population else "none",
        "n_planned": len(plan_.runs),
        "n_skipped_finished": len(plan_.runs) - n_todo,
        "tuned_from": plan_.tuned_from or "none",
        # per generator, what `auto` ran: the study's adopted winner, the default kept, or the fallback table
        "method_source": ",".join(f"{g}={s}" for g, s in plan_.method_sources.items()),
    }
