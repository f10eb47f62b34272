"""The report from a tiny run: every section, every image present, renders non-blank in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from spikemax import analysis as A
from spikemax import report as R
from spikemax import params as P
from spikemax.data import Prepared

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAYERS = {"lif1": 4, "out": 10}
EPOCHS = [0, 1, 2, 3]
AM_EPOCHS = [0, 1, 3]
TARGETS = [("lif1:0", "lif1", 0), ("lif1:1", "lif1", 1), ("class:2", "out", 2), ("class:5", "out", 5)]


class LinearProbs:
    """Stand-in for the final SNN's class_probs: softmax of a fixed random linear map."""

    def __init__(self, dim: int, classes: int) -> None:
        self.w = torch.from_numpy(np.random.default_rng(1).normal(size=(dim, classes))).float()

    def class_probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x.flatten(1) @ self.w / 10, dim=1)


def synthetic_am_tree(root: Path, prepared: Prepared, mlflow_ids: list[str]) -> pd.DataFrame:
    """results/am following the maximize contract: summary.csv + per-run queries.parquet and best.npz."""
    rng = np.random.default_rng(0)
    am = root / "results" / "am"
    x_test, _ = prepared.tensors("test")
    rows = []
    for epoch in AM_EPOCHS:
        for gen, d in (("sngan", 8), ("vqvae", 16)):
            for target, layer, unit in TARGETS:
                for method in ("tt", "random"):
                    key = f"e{epoch}-{gen}-{target.replace(':', '_')}-{method}-s0"
                    run_dir = am / key
                    run_dir.mkdir(parents=True)
                    resp = rng.gamma(2.0, 1.0 + epoch, size=64) * (1.2 if method == "tt" else 1.0)
                    pd.DataFrame({"query": np.arange(64), "batch": np.arange(64) // 16,
                                  "indices": [rng.integers(0, 16, d).tolist() for _ in range(64)],
                                  "response": resp, "elapsed_s": np.linspace(0.01, 1, 64)}).to_parquet(
                        run_dir / "queries.parquet")
                    image = x_test[rng.integers(len(x_test))].numpy() + rng.normal(0, 0.3, (1, 28, 28))
                    np.savez(run_dir / "best.npz", image=image.astype(np.float32),
                             indices=rng.integers(0, 16, d).astype(np.int64))
                    rows.append({"run_key": key, "run_id": mlflow_ids[len(rows)], "epoch": epoch, "generator": gen,
                                 "target": target, "layer": layer, "unit": unit, "method": method, "seed": 0,
                                 "budget": 64, "n_queries": 64, "best_activation": resp.max(),
                                 "queries_to_95": int(np.argmax(resp >= 0.95 * resp.max())) + 1,
                                 "dataset_max": 10.0, "am_gain": resp.max() / 10.0, "queries_saved": 0,
                                 "run_dir": key})
    summary = pd.DataFrame(rows)
    summary.to_csv(am / "summary.csv", index=False)
    return summary


def synthetic_units() -> pd.DataFrame:
    """Dataset selectivity of 2 layers over 4 epochs, CSI growing with training."""
    rng = np.random.default_rng(2)
    frames = []
    for e in EPOCHS:
        for layer, n in LAYERS.items():
            frames.append(pd.DataFrame({
                "epoch": e, "layer": layer, "unit": np.arange(n),
                "csi": np.clip(rng.uniform(0, 0.3, n) + 0.15 * e, 0, 1), "preferred_class": rng.integers(0, 10, n),
                "sparseness": rng.uniform(0, 1, n), "dataset_max": rng.uniform(5, 15, n), "mean_rate": 1.0}))
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, prepared) -> P.Paths:
    """A project with a synthetic AM tree, analysed (with MLflow) and reported."""
    import mlflow

    from spikemax import tracking

    root = tmp_path_factory.mktemp("report")
    params = P.Params.model_validate({"analyze": {"csi_threshold": 0.5, "grid_rows": 4}})
    paths = P.Paths(root)
    exp = tracking.experiment_id(A.EXPERIMENT, root)
    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    n_runs = len(AM_EPOCHS) * 2 * len(TARGETS) * 2
    ids = [client.create_run(exp, run_name=f"am-{i}").info.run_id for i in range(n_runs)]
    summary = synthetic_am_tree(root, prepared, ids)
    paths.metrics.mkdir(parents=True)
    pd.DataFrame({"epoch": EPOCHS, "train_loss": 1.0, "val_loss": 1.0, "val_acc": [0.1, 0.6, 0.7, 0.75],
                  "test_acc": [0.1, 0.62, 0.7, 0.74]}).to_csv(paths.metrics / "snn_epochs.csv", index=False)
    units = synthetic_units()
    best = [A.load_best(paths.results / "am", d) for d in summary["run_dir"]]
    images = np.stack([b[0] for b in best])
    runs = A.stimulus_stats(summary, images, LinearProbs(28 * 28, 10), prepared, units)
    pixels = prepared.denormalize(torch.from_numpy(images)).clamp(0, 1).numpy()
    A.write_outputs(params, paths, units, list(LAYERS), runs, dict(zip(runs["run_key"], pixels)),
                    {k: b[1] for k, b in zip(runs["run_key"], best)}, prepared.classes, EPOCHS)
    R.run_stage(params, paths)
    return paths


def test_analysis_outputs_follow_contract(tiny_run):
    a = json.loads((tiny_run.metrics / "analysis.json").read_text())
    assert set(a) >= {"claim1_early_selectivity", "claim2_selectivity_and_accuracy", "claim3_concept_change"}
    for claim in ("claim1_early_selectivity", "claim2_selectivity_and_accuracy", "claim3_concept_change"):
        assert set(a[claim]["per_layer"]) == set(LAYERS)
    # CSI rises every epoch with accuracy in the synthetic run
    assert a["claim2_selectivity_and_accuracy"]["spearman_mean_csi_vs_test_acc"]["rho"] == pytest.approx(1.0)
    csi = pd.read_csv(tiny_run.results / "analysis" / "csi_by_epoch.csv")
    assert list(csi.columns) == ["epoch", *LAYERS] and csi["epoch"].tolist() == EPOCHS
    gain = pd.read_csv(tiny_run.results / "analysis" / "am_gain_by_epoch.csv")
    assert gain["epoch"].tolist() == AM_EPOCHS
    stimuli = pd.read_csv(tiny_run.results / "analysis" / "stimuli.csv")
    assert len(stimuli) == len(AM_EPOCHS) * 2 * len(TARGETS)  # best over methods per (epoch, generator, target)


def test_mlflow_analysis_run_and_am_tags(tiny_run):
    import mlflow

    from spikemax import tracking

    ids = json.loads((tiny_run.results / "analysis" / "mlflow.json").read_text())
    client = mlflow.MlflowClient(tracking.tracking_uri(tiny_run.root))
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
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
           (tiny_run.reports / "index.html").resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape == (2000, 1280)
    # A blank page is one flat colour; text, tables and figures give many distinct dark pixels.
    assert img.std() > 10 and np.mean(img < 128) > 0.005
