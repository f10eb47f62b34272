"""Stage `maximize`: every (epoch, generator, target, method, seed) AM run, lock-stepped per group, resumable."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from spikemax import SpikemaxError, devices, snn
from spikemax.am.loop import run_am_group, run_am_population
from spikemax.am.plan import Combo, plan, population_key, runs_tt
from spikemax.am.runs import AMRuns, OpenRun, dataset_stats, metric_batch, param_batch, stimulus_stats
from spikemax.generators import LatentGrid, load_generator
from spikemax.neurons import Target, make_responder
from spikemax.params import Params, Paths
from spikemax.querylog import PopulationTable
from spikemax.tuning import tuned_grid


def run(params: Params, paths: Paths) -> dict:
    """Run every planned AM combination not finished yet; write summary, grids and metrics/am.json."""
    params, tuned_from = with_tuned_settings(params, paths)
    plan_ = plan(params, paths)  # every params error surfaces here, before any run starts
    st = AMRuns(params, paths, plan_)
    m = st.m
    todo = [c for c in plan_.combos if c.key not in st.done]
    t0 = time.perf_counter()
    parent = st.client.create_run(
        st.eid, run_name=f"maximize-{time.strftime('%Y%m%d-%H%M%S')}", tags={"spikemax.stage": "maximize"}
    )
    st.parent_id = parent.info.run_id
    st.client.log_batch(
        st.parent_id,
        params=param_batch(
            {
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
                "n_planned": len(plan_.combos),
                "n_skipped_finished": len(plan_.combos) - len(todo),
                "tuned_from": tuned_from or "none",
                # per generator, what `auto` ran: the study's adopted winner, the default kept, or the fallback table
                "method_source": ",".join(f"{g}={m.method_source(g, 'auto')}" for g in m.generators),
            }
        ),
    )
    n_run = 0
    status = "FINISHED"
    try:
        # Inside the try: a corrupt checkpoint must end the parent run FAILED, not leave it RUNNING.
        device = devices.resolve(params.device)  # decode and readout both on it; best images come back
        grids = {g: load_generator(g, p).to(device) for g, p in plan_.gen_ckpts.items()}
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        ) as progress:
            runs_task = progress.add_task("AM runs", total=len(todo))
            q_task = progress.add_task("queries", total=sum(c.budget for c in todo))
            if m.engine != "local":
                n_run = run_remote(params, st, todo, progress, q_task, runs_task)
                todo = []  # every group ran on the cluster
            for e in plan_.epochs:
                todo_e = [c for c in todo if c.epoch == e]
                if not todo_e:
                    continue
                net = snn.load_snn(plan_.snn_ckpts[e])
                net.eval().to(devices.resolve(params.device))
                stats = dataset_stats(net, st.prepared, plan_.targets, m.max_images)
                col = {t: i for i, t in enumerate(plan_.targets)}
                for g in m.generators:
                    for method in m.methods:
                        for seed in m.seeds:
                            group = [c for c in todo_e if (c.generator, c.method, c.seed) == (g, method, seed)]
                            if not group:
                                continue
                            if m.population:  # the whole presentation set, finished neurons included
                                group = [
                                    c
                                    for c in plan_.combos
                                    if (c.epoch, c.generator, c.method, c.seed) == (e, g, method, seed)
                                ]
                            progress.update(q_task, description=f"e{e} {g} {method} s{seed} ({len(group)} targets)")
                            n_run += run_group(
                                st,
                                group,
                                tuned_grid(grids[g], m, g, method),
                                net,
                                stats,
                                col,
                                plan_.snn_ckpts[e],
                                zlib.crc32(f"{e}/{g}/{method}/{seed}".encode()),
                                progress,
                                q_task,
                                runs_task,
                            )
                            st.write_summary()
    except BaseException:
        status = "FAILED"
        raise
    finally:
        df = st.write_summary()
        wall = time.perf_counter() - t0
        if status == "FINISHED":
            st.write_grids()
            st.prune()
        metrics = st.write_metrics(df, wall, n_run)
        st.client.log_batch(
            st.parent_id,
            metrics=metric_batch({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}),
        )
        if status == "FINISHED" and st.failed:
            status = "FAILED"
        st.client.set_terminated(st.parent_id, status)
    if st.failed:
        raise SpikemaxError(f"{len(st.failed)} AM run(s) failed (marked FAILED in MLflow); first: {st.failed[0]}")
    return metrics


def with_tuned_settings(params: Params, paths: Paths) -> tuple[Params, str]:
    """`maximize.tuned`: params carrying each generator's tune result (`tuning.resolve_auto`: the
    adopted method and settings, the default kept, or the fallback table when there is no result),
    and the names of the studies whose winners were adopted."""
    from spikemax.tuning import tuned_results

    if not params.maximize.tuned:
        return params, ""
    tuned = tuned_results(paths.metrics / "tune.json", list(params.maximize.generators))
    m = params.maximize.with_tuned(tuned)
    adopted = [s["study"] for s in tuned.values() if s["source"] == "study"]
    return params.model_copy(update={"maximize": m}), ",".join(adopted) or "none"


def run_group(
    st: AMRuns,
    group: list[Combo],
    grid: LatentGrid,
    net: snn.ConvSNN,
    stats: dict[str, np.ndarray],
    col: dict[Target, int],
    snn_ckpt: Path,
    noise_seed: int,
    progress: Any,
    q_task: Any,
    runs_task: Any,
) -> int:
    """Run the targets of one (epoch, generator, method, seed) in lock step, or as one population
    (`maximize.population`: `group` is then every target, finished ones only re-propose); returns
    queries run (presentations in population mode)."""
    m = st.m
    budget = group[0].budget or m.budget  # one checkpoint per group: one budget
    opens: list[OpenRun] = []
    try:
        opens = [st.open_run(c, grid, snn_ckpt) for c in group if c.key not in st.done]
        by_key = {op.combo.key: op for op in opens}
        optimizers = [st.make_optimizer(by_key.get(c.key, c), grid) for c in group]
        # Warm runs get a cold twin (run alongside, not logged) so `queries_saved` is measured.
        warm = [] if m.population else [i for i, c in enumerate(group) if c.key in by_key and by_key[c.key].warm_from]
        twins = [st.make_cold_twin(by_key[group[i].key], grid) for i in warm]
        # A twin spends the scan's `budget` (not budget_last): queries_saved compares the first `budget` queries.
        if twins and q_task is not None:  # the queries bar counts the twins' queries too: grow its total
            task = next(t for t in progress.tasks if t.id == q_task)
            progress.update(q_task, total=(task.total or 0) + len(twins) * m.budget)
        names = [c.target.name for c in group] + [group[i].target.name for i in warm]
        responder = make_responder(
            net,
            names,
            seed=noise_seed,
            model=m.noise.model,
            sigma=m.noise.sigma,
            window=m.noise.window,
            repeats=m.noise.repeats,
        )
        if m.population:
            pkey = population_key(group[0])
            meta = {
                "targets": [c.target.name for c in group],
                "run_keys": [c.key for c in group],
                "run_ids": [by_key[c.key].run_id if c.key in by_key else st.done[c.key]["run_id"] for c in group],
                "method": group[0].method,
                "rule": m.population_rule,
                "budget": budget,
                "batch": m.batch,
            }
            table = PopulationTable(st.am_dir / "populations" / pkey, meta)
            everything = run_am_population(
                optimizers,
                grid,
                responder,
                budget,
                m.batch,
                loggers=[by_key[c.key].logger if c.key in by_key else None for c in group],
                table=table,
                rule=m.population_rule,
                target_value=m.target_value,
                on_batch=lambda k: progress.advance(q_task, k * len(opens)),
                max_images=m.max_images,
            )
            table.close()
        else:
            everything = run_am_group(
                optimizers + twins,
                grid,
                responder,
                [budget] * len(optimizers) + [m.budget] * len(twins),
                m.batch,
                loggers=[op.logger for op in opens] + [None] * len(twins),
                target_value=m.target_value,
                on_batch=lambda k: progress.advance(q_task, k),
                max_images=m.max_images,
            )
        results = everything[: len(group)]
        cold = {group[i].key: r for i, r in zip(warm, everything[len(group) :])}
        mine = [(by_key[c.key], opt, res) for c, opt, res in zip(group, optimizers, results) if c.key in by_key]
        extras = stimulus_stats(net, st.prepared, [res for _, _, res in mine])
        for (op, opt, res), ex in zip(mine, extras):
            j = col[op.combo.target]
            ex = {**ex, "dataset_csi": float(stats["csi"][j]), "dataset_sparseness": float(stats["sparseness"][j])}
            st.finish_run(op, res, opt, float(stats["dataset_max"][j]), ex, cold=cold.get(op.combo.key))
            progress.advance(runs_task, 1)
        return results[0].n_queries if m.population else sum(r.n_queries for r in everything)
    except Exception as err:
        for op in opens:
            if op.combo.key not in st.done:
                st.fail_run(op, err)
        if len(opens) < len(group):  # failed while opening: the rest has no run to mark, but failed
            st.failed += [f"{c.key}: {type(err).__name__}: {err}"[:4000] for c in group[len(opens) :]]
        return 0
    except BaseException as err:  # interrupted: mark, then stop
        for op in opens:
            if op.combo.key not in st.done:
                st.fail_run(op, err)
        raise


def remote_stats(params: Params, paths: Paths, plan_: Any, epoch: int) -> dict[str, np.ndarray]:
    """dataset_stats of one epoch's checkpoint, on a worker."""
    from spikemax.data import Prepared

    net = snn.load_snn(plan_.snn_ckpts[epoch])
    net.eval().to(devices.resolve(params.device))
    return dataset_stats(net, Prepared.load(paths.prepared), plan_.targets, params.maximize.max_images)


class _Quiet:
    """Progress sink of a remote group (the driver advances the bars when the group returns)."""

    def advance(self, task: Any, k: float) -> None:
        pass


def run_remote(params: Params, st: AMRuns, todo: list[Combo], progress: Any, q_task: Any, runs_task: Any) -> int:
    """Run every group of `todo` as one task on a Ray cluster (maximize.engine 'ray'); returns queries run.

    A warm-started TT group waits for its chain's previous epoch, as in the local loop, so results
    are the same; each task logs to the shared store and writes its run dirs itself.
    """
    from spikemax.am import engine

    m, plan_ = st.m, st.plan
    engine.connect(m.ray_address, m.ray_workers, engine.worker_env(st.uri))
    jobs: list[engine.Job] = []
    where: dict[tuple, int] = {}
    first: list[tuple] = []
    for i, e in enumerate(plan_.epochs):
        todo_e = [c for c in todo if c.epoch == e]
        if not todo_e:
            continue
        # The epoch's dataset stats are a task too; its groups start at once and read them at the end.
        stats = ("first", len(first))
        first.append((remote_stats, (params, st.paths, plan_, e)))
        for g in m.generators:
            for method in m.methods:
                for seed in m.seeds:
                    keys = [c.key for c in todo_e if (c.generator, c.method, c.seed) == (g, method, seed)]
                    if not keys:
                        continue
                    if m.population:  # the whole presentation set, finished neurons included
                        keys = [
                            c.key
                            for c in plan_.combos
                            if (c.epoch, c.generator, c.method, c.seed) == (e, g, method, seed)
                        ]
                    prev = where.get((plan_.epochs[i - 1], g, method, seed)) if i else None
                    after = [prev] if prev is not None and runs_tt(method, g, m) and m.warm_start else []
                    where[(e, g, method, seed)] = len(jobs)
                    args = (params, st.paths, plan_, keys, st.parent_id, stats, st.uri)
                    jobs.append(engine.Job(args, after, name=f"maximize group e{e} {g} {method} s{seed}"))
    n_run = 0
    try:
        for _, res in engine.run_jobs(remote_group, jobs, first=first):
            st.done.update(res["rows"])
            st.failed += res["failed"]
            st.logging_s += res["logging_s"]
            n_run += res["queries"]
            progress.advance(q_task, sum(int(r["n_queries"]) for r in res["rows"].values()))  # not twins
            progress.advance(runs_task, len(res["rows"]))
            st.write_summary()
    except BaseException:
        # A group whose worker died for the last time cannot fail its own open runs.
        st.fail_open_children("interrupted (the group's Ray task failed or the stage stopped)")
        raise
    return n_run


def remote_group(
    params: Params,
    paths: Paths,
    plan_: Any,
    keys: list[str],
    parent_id: str,
    stats: Any,
    tracking_uri: str,
) -> dict:
    """One group on a worker: its finished runs (from an attempt before a worker died) are kept,
    runs that attempt left RUNNING are failed, the rest run as in the local loop."""
    import os

    from spikemax.am.plan import read_summary
    from spikemax.tracking import RUN_KEY_TAG

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # the driver's store, whatever the worker started with

    st = AMRuns(params, paths, plan_, scan=False)
    st.parent_id = parent_id
    group = [c for c in plan_.combos if c.key in set(keys)]
    n = 0  # queries this stage invocation ran
    for c in group:
        row = read_summary(st.am_dir, c)
        earlier = st.client.get_run(row["run_id"]) if row is not None else None
        if row is not None and earlier is not None and earlier.info.status == "FINISHED":
            st.done[c.key] = row
            if earlier.data.tags.get("mlflow.parentRunId") == parent_id and not params.maximize.population:
                n += int(row["n_queries"])  # run by a lost attempt of this task: counted as in-process
            continue
        for run in st.client.search_runs(
            [st.eid], filter_string=f"tags.`{RUN_KEY_TAG}` = '{c.key}' and status = 'RUNNING'", max_results=100
        ):
            st.client.set_tag(run.info.run_id, "spikemax.failure", "interrupted (worker lost; group retried)")
            st.client.set_terminated(run.info.run_id, "FAILED")
    todo = [c for c in group if c.key not in st.done]
    if todo:
        c0 = todo[0]
        net = snn.load_snn(plan_.snn_ckpts[c0.epoch])
        net.eval().to(devices.resolve(params.device))
        grid = load_generator(c0.generator, plan_.gen_ckpts[c0.generator]).to(devices.resolve(params.device))
        grid = tuned_grid(grid, st.m, c0.generator, c0.method)
        col = {t: i for i, t in enumerate(plan_.targets)}
        seed = zlib.crc32(f"{c0.epoch}/{c0.generator}/{c0.method}/{c0.seed}".encode())
        combos = group if params.maximize.population else todo  # population: finished neurons only re-propose
        n += run_group(st, combos, grid, net, stats, col, plan_.snn_ckpts[c0.epoch], seed, _Quiet(), None, None)
    rows = {c.key: st.done[c.key] for c in group if c.key in st.done}
    return {"rows": rows, "failed": st.failed, "queries": n, "logging_s": st.logging_s}
