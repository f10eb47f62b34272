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


@dataclass
class Job:
    """One call `fn(*args)`; `after` lists indices of jobs whose results it waits for."""

    args: tuple
    after: list[int] = field(default_factory=list)


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


def run_jobs(fn: Callable[..., Any], jobs: Sequence[Job], threads: int = 1) -> Iterator[tuple[int, Any]]:
    """Run `fn` over `jobs` on the connected cluster (one CPU each); yield (job index, result) as
    each completes. A job waits for its `after` jobs; a dead worker's job is retried. On any
    exception here (Ctrl-C included) every job still pending is cancelled."""
    ray = _ray()

    def call(*args: Any) -> Any:
        import torch

        torch.set_num_threads(threads)
        n = len(args) - n_deps[args[0]] - 1
        return fn(*args[1 : 1 + n])

    n_deps = {i: len(j.after) for i, j in enumerate(jobs)}
    remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(call)
    refs: list[Any] = []
    for i, job in enumerate(jobs):
        # Results of `after` jobs as trailing args: Ray starts this one only once they exist.
        refs.append(remote.remote(i, *job.args, *[refs[k] for k in job.after]))
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield index[ready[0]], ray.get(ready[0])
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
