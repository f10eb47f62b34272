"""Engines that run the maximize stage's independent lock-step groups: Ray (a local or remote cluster).

The in-process engine is the stage's own loop; this module only knows how to run a function over
jobs on Ray, with dependencies (a warm-started TT group waits for its previous epoch's group),
retries when a worker dies, and results handed back as they complete. The function itself (the
stage's group runner) is passed in, so nothing here imports a stage.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from spikemax import SpikemaxError

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
        raise SpikemaxError("maximize.engine 'ray' needs Ray: pip install 'spikemax[scale]'") from None
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
        raise SpikemaxError(f"maximize.ray_address {address!r}: {str(err).splitlines()[0]}") from None
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
        import torch

        torch.set_num_threads(threads)

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
