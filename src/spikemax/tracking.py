"""MLflow set-up shared by every stage: a sqlite store under mlruns/, artifacts beside it."""

from __future__ import annotations

import os
from pathlib import Path

EXPERIMENTS = ("snn", "generators", "activation-maximization", "tuning")


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
    """Point MLflow at the project store, creating the database once; returns the tracking URI."""
    import mlflow

    uri = tracking_uri(root)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    # Creating the schema here, once, keeps later parallel writers from racing on migrations.
    mlflow.MlflowClient(uri).search_experiments(max_results=1)
    return uri


def experiment_id(name: str, root: str | Path) -> str:
    """Id of experiment `name` in the project store, created with artifacts under mlruns/."""
    import mlflow

    uri = configure(root)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=f"{artifact_root(root)}/{name}")
