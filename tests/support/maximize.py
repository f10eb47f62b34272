"""Helpers of the maximize-stage tests: project copies, the AM experiment's runs, result comparison."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd

from spikemax import params as P
from spikemax import tracking
from spikemax.querylog import read_queries
from tests.support.project import write_params


def project_copy(root: Path, project, maximize: dict) -> tuple[P.Params, P.Paths]:
    """A fresh project dir sharing the fixture's prepared data and models, with its own outputs."""
    params, paths = project
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    for link, target in ((root / "data" / "prepared", paths.prepared), (root / "models", paths.root / "models")):
        if not link.exists():
            link.symlink_to(target)
    path = write_params(root, {"prepare": params.prepare.model_dump(), "maximize": maximize})
    return P.load(path, root=root)


def am_runs(root: Path) -> list:
    """Every run of the project's activation-maximization experiment."""
    uri = tracking.tracking_uri(root)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(tracking.AM_EXPERIMENT)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], max_results=10000)


# A small plan for the engine tests (in-process vs Ray).
ENGINE_SMALL = {
    "checkpoints": [0, -1],
    "generators": ["sngan"],
    "targets": ["class:0", "lif1:0", "lif2:1"],
    "units_per_layer": 0,
    "methods": ["tt", "random"],
    "seeds": [0, 1],
    "budget": 32,
    "batch": 16,
}


def result_tables(paths: P.Paths) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """summary.csv (sorted by run key, ids and timings dropped) and every run's query table."""
    df = pd.read_csv(paths.results / "am" / "summary.csv").sort_values("run_key").reset_index(drop=True)
    queries = {
        r.run_key: read_queries(paths.results / "am" / r.run_dir).drop(columns="elapsed_s") for r in df.itertuples()
    }
    return df.drop(columns="run_id"), queries


def assert_same_results(a: P.Paths, b: P.Paths) -> None:
    """Same summary rows (ids and timings aside) and the same query table for every run key."""
    df_a, q_a = result_tables(a)
    df_b, q_b = result_tables(b)
    pd.testing.assert_frame_equal(df_b, df_a)
    assert q_b.keys() == q_a.keys()
    for key, q in q_a.items():
        pd.testing.assert_frame_equal(q_b[key], q, obj=key)
