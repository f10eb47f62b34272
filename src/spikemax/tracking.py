"""MLflow set-up shared by every stage: a sqlite store under mlruns/, artifacts beside it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

if TYPE_CHECKING:
    from mlflow import MlflowClient

    pass

# The project's MLflow experiments, named once (the public MLflow layout).
SNN_EXPERIMENT = "snn"
GENERATORS_EXPERIMENT = "generators"
AM_EXPERIMENT = "activation-maximization"
TUNING_EXPERIMENT = "tuning"
EXPERIMENTS = (SNN_EXPERIMENT, GENERATORS_EXPERIMENT, AM_EXPERIMENT, TUNING_EXPERIMENT)
RUN_KEY_TAG = "spikemax.run_key"  # an AM run's key: (epoch, generator, target, method, seed, config)


def tracking_uri(root: str | Path) -> str:
    """The project's store: `MLFLOW_TRACKING_URI` if set, else sqlite:///<root>/mlruns/mlflow.db."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = Path(root).resolve() / "mlruns" / "mlflow.db"
    return f"sqlite:///{db}"


def artifact_root(root: str | Path) -> str:
    """Absolute artifact location for new experiments (under mlruns/, beside the database)."""
    return (Path(root).resolve() / "mlruns" / "artifacts").as_uri()


def configure(root: str | Path) -> str:
    """Create the project store once and return its tracking URI (pass it to every client).

    MLflow's global `set_tracking_uri` is left alone: it exports MLFLOW_TRACKING_URI, which would
    pin every later store of the same process (and its subprocesses) to this one.
    """
    import mlflow

    uri = tracking_uri(root)
    if not uri.startswith("sqlite:///"):
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
        return uri
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    # Two processes creating the schema at once crash one of them: the first creates, the rest wait.
    with FileLock(str(db) + ".lock"):
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    return uri


@contextmanager
def terminated(client: MlflowClient, run_id: str) -> Iterator[str]:
    """Mark an MLflow run FINISHED when the block ends and FAILED when it raises (then re-raise)."""
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def experiment_id(name: str, root: str | Path) -> str:
    """Id of experiment `name` in the project store, created with artifacts under mlruns/."""
    import mlflow

    uri = configure(root)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # A tracking server keeps artifacts where it was told to (--artifacts-destination), not here.
    local = not uri.startswith(("http://", "https://"))
    try:
        return client.create_experiment(name, artifact_location=f"{artifact_root(root)}/{name}" if local else None)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our look-up and our create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


_FAST_SQLITE = False


def enable_fast_sqlite() -> None:
    """Open this process's sqlite connections in WAL mode with synchronous=NORMAL.

    Every commit still survives a crash or SIGKILL of the process (only a power loss could drop the
    last ones) but no longer waits for an fsync, which makes per-batch metric writes several times
    cheaper. Call before the first connection to the store (pooled connections keep their mode).
    """
    global _FAST_SQLITE
    if _FAST_SQLITE:
        return
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "connect")
    def _pragmas(dbapi_con, _record):
        if isinstance(dbapi_con, sqlite3.Connection):
            dbapi_con.execute("PRAGMA journal_mode=WAL")  # persistent; a no-op once set
            dbapi_con.execute("PRAGMA synchronous=NORMAL")

    _FAST_SQLITE = True
