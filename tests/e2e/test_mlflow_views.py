"""The MLflow UI as a place to compare: a tiny project's default run logged to a real `mlflow server`,
each comparison view the analysis links opened in headless Chromium, its columns shown with values."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import pytest

from spikemax import params as P
from spikemax import tracking
from tests.support.project import TINY_GENERATORS, TINY_PREPARE, write_params

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
# The default run at toy size: default methods (auto) and restarts, two checkpoints, two neurons.
AM = {
    "epochs": [0, -1],
    "targets": ["class:1", "lif1:0"],
    "units_per_layer": 0,
    "budget": 32,
    "budget_last": 48,
    "batch": 16,
}


class GridCells(HTMLParser):
    """The runs table's cells as (column id, text) in document order (ag-grid's `gridcell` divs)."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[str, str]] = []
        self._cur: list[str] | None = None
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in VOID:
            return
        a = dict(attrs)
        if self._cur is not None:
            self._depth += 1
        elif a.get("role") == "gridcell" and "col-id" in a:
            self._cur, self._depth = [a["col-id"], ""], 1

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID or self._cur is None:
            return
        self._depth -= 1
        if self._depth == 0:
            self.cells.append((self._cur[0], self._cur[1].strip()))
            self._cur = None

    def handle_data(self, data: str) -> None:
        if self._cur is not None:
            self._cur[1] += data


def rendered_columns(url: str, tmp: Path) -> dict[str, list[str]]:
    """Column id -> cell texts of the runs table Chromium renders at `url` (the UI renders client-side:
    the DOM is dumped after a virtual-time budget that lets its fetches finish). The window is wide:
    the table renders only the columns in view."""
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=4000,1600",
        f"--user-data-dir={tmp}", "--virtual-time-budget=30000", "--dump-dom", url,
    ]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout
    parser = GridCells()
    parser.feed(dom)
    columns: dict[str, list[str]] = {}
    for col, text in parser.cells:
        columns.setdefault(col, []).append(text)
    return columns


@pytest.fixture(scope="module")
def served(tmp_path_factory, project, snn_checkpoints, generator_checkpoints, mlflow_server) -> dict:
    """maximize + analyze of a tiny project logging to the server; returns analysis's mlflow.json."""
    from spikemax.stages.analyze import run as analyze
    from spikemax.stages.maximize import run as maximize

    _, src = project
    root = tmp_path_factory.mktemp("served")
    for rel in ("data/prepared", "models/snn", "models/generators", "metrics/snn_epochs.csv"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(src.root / rel)
    path = write_params(root, {"prepare": TINY_PREPARE, "generators": TINY_GENERATORS, "maximize": AM})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        maximize(*P.load(path, root=root))
        analyze(*P.load(path, root=root))
    return json.loads((root / "results" / "analysis" / "mlflow.json").read_text())


@pytest.mark.slow
def test_views_are_linked_from_the_tracking_uri_used(served, mlflow_server):
    assert served["tracking_uri"] == mlflow_server.uri
    assert {v["experiment"] for v in served["views"]} == {tracking.AM_EXPERIMENT, tracking.ANALYSIS_EXPERIMENT}
    for view in served["views"]:
        assert view["url"].startswith(f"{mlflow_server.uri}/#/experiments/")
    client = mlflow.MlflowClient(mlflow_server.uri)
    # The analysis has its own experiment; the AM experiment's metrics are the AM runs' few.
    am = client.get_experiment_by_name(tracking.AM_EXPERIMENT)
    runs = client.search_runs([am.experiment_id], max_results=1000)
    metrics = {k for r in runs for k in r.data.metrics}
    assert len(metrics) <= 40 and not any(k.startswith("claim") for k in metrics) and "concept" not in metrics
    # One tag vocabulary, MLflow's own tags aside; every run names its commit's params hash.
    for r in runs:
        assert all(k.startswith("mlflow.") or k in tracking.TAGS for k in r.data.tags), r.data.tags
        assert tracking.PARAMS_HASH_TAG in r.data.tags
    # Parents: one scan, one group per (generator, checkpoint) under it, AM runs under their group.
    scans = [r for r in runs if tracking.is_scan(r)]
    groups = {r.info.run_id: r for r in runs if tracking.GROUP_TAG in r.data.tags}
    am_runs = [r for r in runs if tracking.RUN_KEY_TAG in r.data.tags]
    assert len(scans) == 1 and len(groups) == 2 * 2
    assert {g.data.tags["mlflow.parentRunId"] for g in groups.values()} == {scans[0].info.run_id}
    for r in am_runs:
        group = groups[r.data.tags["mlflow.parentRunId"]]
        assert group.data.tags[tracking.GROUP_TAG] == f"{r.data.params['generator']}/e{r.data.params['epoch']}"


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package `chromium`)")
def test_each_linked_view_shows_its_columns_with_values(served, tmp_path):
    for view in served["views"]:
        wanted = [
            tracking._column_key(c)
            for c in (
                tracking.AM_COLUMNS if view["experiment"] == tracking.AM_EXPERIMENT else ("metrics.c1_early_selective",)
            )
        ]
        columns = rendered_columns(view["url"], tmp_path / view["key"])
        rows = len(columns.get("attributes.`Run Name`", []))
        assert rows > 0, f"{view['key']}: no runs rendered at {view['url']}"
        for col in wanted:
            values = columns.get(col, [])
            assert len(values) == rows and all(v not in ("", "-") for v in values), f"{view['key']}: {col} = {values}"
        if view["key"] == "spikemax-trained-by-gain":
            gains = [float(v) for v in columns["metrics.`am_gain`"]]
            assert gains == sorted(gains, reverse=True)  # sorted as the view says
