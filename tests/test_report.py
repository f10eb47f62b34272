"""The report from a tiny run: every section, every image present, renders non-blank in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from spikemax import params as P
from spikemax import report as R
from spikemax import selectivity as S
from spikemax.data import Prepared

from .conftest import TINY_GENERATORS, TINY_PREPARE, run_cli, write_params

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
AM = {
    "epochs": "all",
    "generators": ["sngan", "vqvae"],
    "targets": ["class:0", "class:3", "lif1:0", "fc_lif1:2"],
    "methods": ["tt", "random"],
    "seeds": [0],
    "budget": 48,
    "batch": 16,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, project, snn_checkpoints, generator_checkpoints) -> P.Paths:
    """A real tiny pipeline: the fixtures' SNN checkpoints and generators, `maximize`, then `analyze` and `report`."""
    from spikemax.stages.maximize import run as maximize

    prep, src = project
    root = tmp_path_factory.mktemp("report")
    paths = P.Paths(root)
    paths.prepared.parent.mkdir(parents=True)
    paths.prepared.symlink_to(src.prepared, target_is_directory=True)
    (root / "models").symlink_to(src.root / "models", target_is_directory=True)
    paths.metrics.mkdir()
    shutil.copy(src.metrics / "snn_epochs.csv", paths.metrics / "snn_epochs.csv")
    path = write_params(
        root,
        {
            "prepare": TINY_PREPARE,
            "generators": TINY_GENERATORS,
            "maximize": AM,
            "analyze": {"csi_threshold": 0.3, "grid_rows": 4},
        },
    )
    with pytest.MonkeyPatch.context() as mp:
        # mlflow.set_tracking_uri (in-process training) exports the URI; this project uses its own store.
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        maximize(*P.load(path, root=root))
    for stage in ("analyze", "report"):
        proc = run_cli(stage, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return paths


def test_analysis_outputs_follow_contract(tiny_run, snn_checkpoints):
    from spikemax.neurons import layer_rates
    from spikemax.snn import load_snn

    epochs = sorted(snn_checkpoints)
    final = load_snn(snn_checkpoints[epochs[-1]])
    layers = list(final.spiking_layers())
    a = json.loads((tiny_run.metrics / "analysis.json").read_text())
    assert a["meta"]["layers"] == layers and a["meta"]["epochs"] == epochs
    for claim in ("claim1_early_selectivity", "claim2_selectivity_and_accuracy", "claim3_concept_change"):
        assert list(a[claim]["per_layer"]) == layers
    out = tiny_run.results / "analysis"
    # CSI for every unit at every checkpoint epoch, not only the AM'd ones
    units = pd.read_csv(out / "units.csv")
    assert len(units) == len(epochs) * sum(final.spiking_layers().values())
    assert units["csi"].between(0, 1).all()
    # ... and equal to CSI recomputed here from the final net's rates on the test set
    prepared = Prepared.load(tiny_run.prepared)
    x, y = prepared.tensors("test")
    rates = layer_rates(final, x)["lif2"]
    raw = S.csi(S.class_means(rates, y.numpy(), len(prepared.classes)))
    # The definition: CSI over the test set, 0 for a unit whose mean rate is below analyze.min_rate.
    min_rate = P.validate({}).analyze.min_rate
    want = np.where(rates.mean(axis=0) >= min_rate, raw, 0.0)
    got = units[(units["epoch"] == epochs[-1]) & (units["layer"] == "lif2")].sort_values("unit")
    np.testing.assert_allclose(got["csi_raw"], raw, atol=1e-6)
    # Near the threshold the readout's float sums decide the side: compare those units by their raw value only.
    clear = np.abs(rates.mean(axis=0) - min_rate) > 1e-6
    np.testing.assert_allclose(got["csi"].to_numpy()[clear], want[clear], atol=1e-6)
    csi = pd.read_csv(out / "csi_by_epoch.csv")
    assert list(csi.columns) == ["epoch", *layers] and csi["epoch"].tolist() == epochs
    assert pd.read_csv(out / "am_gain_by_epoch.csv")["epoch"].tolist() == epochs
    acc = pd.read_csv(out / "accuracy_by_epoch.csv")
    assert acc["test_acc"].notna().all() and acc["epoch"].tolist() == epochs
    # concept = the final net's class for the best stimulus
    runs = pd.read_csv(out / "runs.csv")
    with np.load(tiny_run.results / "am" / runs["run_dir"].iloc[0] / "best.npz") as z:
        probs = final.class_probs(torch.from_numpy(z["image"])[None]).numpy()[0]
    assert runs["concept"].iloc[0] == probs.argmax()
    assert runs["concept_prob"].iloc[0] == pytest.approx(probs.max(), rel=1e-5)
    stimuli = pd.read_csv(out / "stimuli.csv")
    assert len(stimuli) == len(epochs) * len(AM["generators"]) * len(AM["targets"])  # best over methods
    best = runs.groupby(["epoch", "generator", "target"])["best_activation"].max()
    np.testing.assert_allclose(
        stimuli.set_index(["epoch", "generator", "target"])["best_activation"],
        best.loc[stimuli.set_index(["epoch", "generator", "target"]).index],
    )


def test_analyze_without_am_results_is_one_line_error(project, snn_checkpoints, tmp_path):
    _, src = project
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").symlink_to(src.prepared, target_is_directory=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "snn").symlink_to(src.snn_dir, target_is_directory=True)
    write_params(tmp_path, {"prepare": TINY_PREPARE})
    proc = run_cli("analyze", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "summary.csv" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("report", cwd=tmp_path)
    assert proc.returncode == 2 and "spikemax analyze" in proc.stderr


def test_mlflow_analysis_run_and_am_tags(tiny_run):
    import mlflow

    ids = json.loads((tiny_run.results / "analysis" / "mlflow.json").read_text())
    assert ids["tracking_uri"] == f"sqlite:///{(tiny_run.root / 'mlruns' / 'mlflow.db').resolve()}"
    client = mlflow.MlflowClient(ids["tracking_uri"])
    run = client.get_run(ids["run_id"])
    assert "claim1_early_selectivity.frac_selective_by_early_epoch" in run.data.metrics
    assert ids["am_runs_missing"] == 0 and ids["am_runs_tagged"] > 0
    am_run_id = pd.read_csv(tiny_run.results / "am" / "summary.csv")["run_id"].iloc[0]
    tags = client.get_run(am_run_id).data.tags
    assert tags["analysis_run_id"] == ids["run_id"] and "selectivity.csi" in tags


def test_report_has_every_section_and_image(tiny_run):
    page = (tiny_run.reports / "index.html").read_text()
    for sid in R.SECTIONS:
        assert f'<section id="{sid}">' in page
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    figures = sorted((tiny_run.results / "analysis" / "figures").glob("*.png"))
    assert len(srcs) == len(figures) >= 8
    for src in srcs:
        if src.startswith("data:image/png;base64,"):
            Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
        else:
            assert (tiny_run.reports / src).is_file(), src
    assert "not produced" not in page
    ids = json.loads((tiny_run.results / "analysis" / "mlflow.json").read_text())
    assert f"#/experiments/{ids['experiment_id']}/runs/{ids['run_id']}" in page
    assert "mlflow ui --backend-store-uri sqlite:///" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package `chromium`)")
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        (tiny_run.reports / "index.html").resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape == (2000, 1280)
    # A blank page is one flat colour; text, tables and figures give many distinct dark pixels.
    assert img.std() > 10 and np.mean(img < 128) > 0.005
