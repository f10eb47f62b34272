"""Executors of the maximize stage's groups, side by side: in this process, in plan order, or on a
Ray cluster (local or remote), one task per group.

Engine settings are not params (changing them must not rerun the stage): `spikemax maximize
--engine/--ray-address/--ray-workers` or SPIKEMAX_ENGINE / SPIKEMAX_RAY_ADDRESS /
SPIKEMAX_RAY_WORKERS; the old `maximize.engine`, `ray_address`, `ray_workers` params are still
read, with a one-line deprecation message. The Ray part runs a function over jobs with
dependencies (a warm-started TT group waits for its previous checkpoint's group), retries when a
worker dies, and hands results back as they complete.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from spikemax import SpikemaxError

if TYPE_CHECKING:
    from spikemax.am.group import Context, Progress
    from spikemax.params import MaximizeParams

log = logging.getLogger(__name__)
ENGINES = ("local", "ray")
ENV = {"engine": "SPIKEMAX_ENGINE", "ray_address": "SPIKEMAX_RAY_ADDRESS", "ray_workers": "SPIKEMAX_RAY_WORKERS"}
PROCESSES_ENV = "SPIKEMAX_PROCESSES"


@dataclass(frozen=True)
class EngineSettings:
    """Where the groups run: `engine` "local" or "ray"; Ray's `address` ("" starts a local cluster
    with `workers` CPUs, 0 = all; "auto" joins this machine's; "HOST:6379" / "ray://HOST:10001");
    local `processes`: 1 = this process, N = N worker processes, 0 = one per CPU core."""

    engine: str = "local"
    address: str = ""
    workers: int = 0
    processes: int = 1

    def local_processes(self) -> int:
        """Worker processes of the local engine (0 resolved to the machine's cores)."""
        return self.processes or (os.cpu_count() or 1)

    @classmethod
    def resolve(
        cls,
        m: MaximizeParams | None = None,
        engine: str | None = None,
        address: str | None = None,
        workers: int | None = None,
        processes: int | None = None,
    ) -> EngineSettings:
        """Settings from the CLI options, else the environment, else the deprecated params keys."""
        given = {"engine": engine, "ray_address": address, "ray_workers": workers}
        old = {k: getattr(m, k, None) for k in ENV} if m is not None else {}
        for k, v in old.items():
            if v is not None:
                log.warning(
                    "maximize.%s in params is deprecated (changing it reruns the stage): use `spikemax maximize "
                    "--%s` or %s",
                    k,
                    k.replace("_", "-"),
                    ENV[k],
                )
        values: dict[str, Any] = {}
        for k, env in ENV.items():
            v = given[k] if given[k] is not None else os.environ.get(env) or old.get(k)
            values[k] = v
        name = str(values["engine"] or "local")
        if name not in ENGINES:
            raise SpikemaxError(f"engine {name!r}: must be one of {', '.join(ENGINES)}")
        try:
            n = int(values["ray_workers"] or 0)
        except ValueError:
            raise SpikemaxError(f"ray workers {values['ray_workers']!r}: must be an integer >= 0") from None
        if n < 0:
            raise SpikemaxError(f"ray workers {n}: must be >= 0")
        raw = processes if processes is not None else os.environ.get(PROCESSES_ENV) or 1
        try:
            procs = int(raw)
        except ValueError:
            raise SpikemaxError(f"processes {raw!r}: must be an integer >= 0 (0 = one per core)") from None
        if procs < 0:
            raise SpikemaxError(f"processes {procs}: must be >= 0 (0 = one per core)")
        return cls(name, str(values["ray_address"] or ""), n, procs)


class Executor(Protocol):
    """Runs every group of the context's plan that has runs left; returns the queries run."""

    def run(self, ctx: Context, progress: Progress, on_group: Callable[[], None]) -> int: ...


class InProcess:
    """Every group in this process, in plan order (checkpoint by checkpoint: one network loaded)."""

    def __init__(self, grids: dict[str, Any], device: str) -> None:
        self.grids = grids  # generator -> its loaded grid (validated before the stage opened anything)
        self.device = device

    def run(self, ctx: Context, progress: Progress, on_group: Callable[[], None]) -> int:
        from spikemax.am.group import run_group
        from spikemax.am.measures import dataset_stats
        from spikemax.snn import load_snn
        from spikemax.tuning import tuned_grid

        n = 0
        loaded: tuple[int, Any, Any] | None = None  # (epoch, net, dataset stats)
        for group in ctx.plan.groups:
            runs = ctx.plan.group_runs(group, ctx.done)
            if not runs:
                continue
            if loaded is None or loaded[0] != group.epoch:
                net = load_snn(group.snn_ckpt).eval().to(self.device)
                stats = dataset_stats(net, ctx.files.prepared, ctx.plan.targets, ctx.m.max_images)
                loaded = (group.epoch, net, stats)
            grid = tuned_grid(self.grids[group.generator], group.grid_n)
            n += run_group(ctx, group, runs, grid, loaded[1], loaded[2], progress)
            on_group()
        return n


class OnRay:
    """One Ray task per group (the checkpoint's dataset stats a task too); each task logs to the
    shared store and writes its run dirs itself; results come back as groups complete."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings

    def run(self, ctx: Context, progress: Progress, on_group: Callable[[], None]) -> int:
        from spikemax.am.group import group_on_worker, stats_on_worker

        plan = ctx.plan
        connect(self.settings.address, self.settings.workers, worker_env(ctx.tracker.uri))
        jobs: list[Job] = []
        where: dict[tuple, int] = {}
        first: list[tuple] = []
        stats_of: dict[int, tuple] = {}
        for index, group in enumerate(plan.groups):
            if not plan.group_runs(group, ctx.done):
                continue
            if group.epoch not in stats_of:  # its groups start at once and read the stats at the end
                stats_of[group.epoch] = ("first", len(first))
                first.append((stats_on_worker, (ctx.params, ctx.paths, group.snn_ckpt, plan.targets)))
            prev = where.get(group.after) if group.after is not None else None
            where[group.ident] = len(jobs)
            args = (ctx.params, ctx.paths, plan, index, ctx.parent_id, stats_of[group.epoch], ctx.tracker.uri)
            jobs.append(Job(args, [prev] if prev is not None else [], name=f"maximize group {group.name}"))
        n_run = 0
        try:
            for _, res in run_jobs(group_on_worker, jobs, first=first):
                ctx.done.update(res["rows"])
                ctx.failed += res["failed"]
                ctx.logging_s += res["logging_s"]
                n_run += res["queries"]
                progress.queries(sum(int(r["n_queries"]) for r in res["rows"].values()))  # not twins
                progress.runs(len(res["rows"]))
                on_group()
        except BaseException:
            # A group whose worker died for the last time cannot fail its own open runs.
            reason = "interrupted (the group's Ray task failed or the stage stopped)"
            ctx.failed += ctx.tracker.fail_open_children(ctx.parent_id, reason)
            raise
        return n_run


class InProcesses:
    """The groups in local worker processes (spawned, the cores shared among them), each group as
    soon as the group it warm-starts from is done: the two generators' checkpoint chains run side
    by side. Each group runs as on a Ray worker (`group_on_worker`), so the runs and their results
    are those of `InProcess`; a checkpoint's dataset stats are computed by its first group and
    passed to the others."""

    POLL_S = 0.05

    def __init__(self, processes: int) -> None:
        self.processes = max(1, int(processes))

    def run(self, ctx: Context, progress: Progress, on_group: Callable[[], None]) -> int:
        import multiprocessing
        import time

        plan = ctx.plan
        todo = [i for i, g in enumerate(plan.groups) if plan.group_runs(g, ctx.done)]
        waits = {i: plan.groups[i].after for i in todo}
        open_idents = {plan.groups[i].ident for i in todo}
        stats: dict[int, Any] = {}  # checkpoint -> its dataset stats, once a group has computed them
        threads = max(1, (os.cpu_count() or 1) // self.processes)
        pool = multiprocessing.get_context("spawn").Pool(
            self.processes, initializer=_init_worker, initargs=(threads, worker_env(ctx.tracker.uri))
        )
        running: dict[int, Any] = {}
        n_run = 0
        try:
            while waits or running:
                for i in [i for i, after in waits.items() if after is None or after not in open_idents]:
                    del waits[i]
                    g = plan.groups[i]
                    args = (ctx.params, ctx.paths, plan, i, ctx.parent_id, stats.get(g.epoch), ctx.tracker.uri)
                    running[i] = pool.apply_async(group_in_process, args)
                finished = [i for i, res in running.items() if res.ready()]
                if not finished:
                    time.sleep(self.POLL_S)
                for i in finished:
                    res = running.pop(i).get()  # a worker's exception is raised here
                    g = plan.groups[i]
                    open_idents.discard(g.ident)
                    stats.setdefault(g.epoch, res["stats"])
                    ctx.done.update(res["rows"])
                    ctx.failed += res["failed"]
                    ctx.logging_s += res["logging_s"]
                    n_run += res["queries"]
                    progress.queries(sum(int(r["n_queries"]) for r in res["rows"].values()))
                    progress.runs(len(res["rows"]))
                    on_group()
            pool.close()
        except BaseException:
            pool.terminate()  # a worker killed mid-group leaves its runs RUNNING: failed here
            ctx.failed += ctx.tracker.fail_open_children(ctx.parent_id, "interrupted (the stage stopped)")
            raise
        finally:
            pool.join()
        return n_run


def _init_worker(threads: int, env: dict[str, str]) -> None:
    """A local worker: its share of the cores and the driver's store."""
    from spikemax.devices import cpu_threads

    os.environ.update(env)
    cpu_threads(threads)


def group_in_process(
    params: Any, paths: Any, plan: Any, index: int, parent_id: str, stats: Any, tracking_uri: str
) -> dict:
    """`group_on_worker` in a local worker process, the checkpoint's dataset stats computed first
    when the driver has none yet (they come back with the result)."""
    from spikemax.am.group import group_on_worker, stats_on_worker

    group = plan.groups[index]
    if stats is None:
        stats = stats_on_worker(params, paths, group.snn_ckpt, plan.targets)
    return {**group_on_worker(params, paths, plan, index, parent_id, stats, tracking_uri), "stats": stats}


def executor(settings: EngineSettings, grids: dict[str, Any], device: str) -> Executor:
    """The executor of these settings."""
    if settings.engine == "ray":
        return OnRay(settings)
    processes = settings.local_processes()
    return InProcesses(processes) if processes > 1 else InProcess(grids, device)


MAX_RETRIES = 3  # attempts after a worker (process or node) dies mid-group; finished runs are never redone
CANCEL_WAIT_S = 30.0  # how long a failed or interrupted stage waits for its cancelled tasks to stop


@dataclass
class Job:
    """One call `fn(*args)`; `after` lists indices of jobs whose results it waits for; `name` is
    what an error calls it."""

    args: tuple
    after: list[int] = field(default_factory=list)
    name: str = ""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SpikemaxError("engine 'ray' needs Ray: pip install 'spikemax[scale]'") from None
    return ray


def connect(address: str, num_cpus: int, env: dict[str, str]) -> Any:
    """Join the cluster at `address` ("auto": this machine's; "" starts a local one with `num_cpus`
    worker CPUs, 0 = all). `env` is set in every worker (the tracking URI, PYTHONPATH)."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": True,
        "configure_logging": False,
        "runtime_env": {"env_vars": env},
    }
    if address:
        kwargs["address"] = address
    elif num_cpus:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise SpikemaxError(f"ray address {address!r}: {str(err).splitlines()[0]}") from None
    return ray


def worker_env(tracking_uri: str) -> dict[str, str]:
    """What a worker must share with the driver: the MLflow store and where spikemax is imported from."""
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


class Later:
    """A task's result that another task fetches only when it first reads it (so it need not wait
    for it to start): `later[key]` is `result[key]`."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref
        self._value: Any = None

    def __getitem__(self, key: Any) -> Any:
        if self._value is None:
            self._value = _ray().get(self.ref)
        return self._value[key]


def run_jobs(
    fn: Callable[..., Any], jobs: Sequence[Job], threads: int = 1, first: Sequence[tuple[Callable, tuple]] = ()
) -> Iterator[tuple[int, Any]]:
    """Run `fn` over `jobs` on the connected cluster (one CPU each); yield (job index, result) as
    each completes. A job waits for its `after` jobs; a dead worker's job is retried. `first`:
    calls (function, args) submitted before the jobs; an arg `("first", i)` of a job is replaced by
    `Later(result of first[i])`. On any exception here (Ctrl-C included) every job still pending is
    cancelled (and given CANCEL_WAIT_S to stop)."""
    ray = _ray()
    opts = {"num_cpus": 1, "max_retries": MAX_RETRIES}

    def set_threads() -> None:
        from spikemax.devices import cpu_threads

        cpu_threads(threads)

    def call(n_after: int, *args: Any) -> Any:
        set_threads()
        return fn(*args[: len(args) - n_after])

    def call_first(f: Callable, *args: Any) -> Any:
        set_threads()
        return f(*args)

    early = [ray.remote(**opts)(call_first).remote(f, *args) for f, args in first]
    remote = ray.remote(**opts)(call)
    refs: list[Any] = []
    for job in jobs:
        args = [Later(early[a[1]]) if isinstance(a, tuple) and a[:1] == ("first",) else a for a in job.args]
        # Results of `after` jobs as trailing args: Ray starts this one only once they exist.
        refs.append(remote.remote(len(job.after), *args, *[refs[k] for k in job.after]))
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            i = index[ready[0]]
            yield i, _get(ray, ready[0], jobs[i].name or f"job {i}")
    except BaseException:
        stop = pending + early
        for ref in stop:
            ray.cancel(ref)
        if stop:  # a running task gets KeyboardInterrupt and fails its open runs itself: give it that time
            ray.wait(stop, num_returns=len(stop), timeout=CANCEL_WAIT_S)
        raise


def _get(ray: Any, ref: Any, name: str) -> Any:
    """A job's result; a job that lost its worker more than MAX_RETRIES times is one SpikemaxError,
    and a SpikemaxError the job raised is raised as itself."""
    from ray import exceptions as rx

    try:
        return ray.get(ref)
    except rx.RayTaskError as err:
        if isinstance(err.cause, SpikemaxError):
            raise err.cause from None
        raise
    except (rx.WorkerCrashedError, rx.NodeDiedError, rx.OutOfMemoryError, rx.ObjectLostError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise SpikemaxError(
            f"{name} lost its Ray worker and {MAX_RETRIES} retries did not finish it ({type(err).__name__}: {first}); "
            "the runs it finished are kept: rerun to resume"
        ) from err
