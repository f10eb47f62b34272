"""The report from a tiny run: every section, every image present, renders non-blank in headless Chromium."""

from __future__ import annotations

import base64
import html as html_lib
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

from spikemax import params as P
from spikemax import report as R
from spikemax import selectivity as S
from spikemax.analysis import HEADLINE
from spikemax.data import Prepared
from tests.support.project import TINY_GENERATORS, TINY_PREPARE, TINY_SNN, run_cli, write_params

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
AM = {
    "checkpoints": [1, 2, -1],  # checkpoint indices: two inside the first epoch, and the last
    "generators": ["sngan", "vqvae"],
    "targets": ["class:0", "lif1:0", "fc_lif1:2"],
    "methods": ["tt", "random"],
    "seeds": [0, 1],  # two restarts per (checkpoint, neuron)
    "budget": 32,
    "batch": 16,
}
# 800 training images in batches of 64: 13 steps per epoch; checkpoints after 0, 3, 6, 13 and 26 steps.
SCHEDULE = {"steps": [3, 6]}
NAMES = [
    "step=000000-epoch=0.000.ckpt",
    "step=000003-epoch=0.231.ckpt",
    "step=000006-epoch=0.462.ckpt",
    "step=000013-epoch=1.000.ckpt",
    "step=000026-epoch=2.000.ckpt",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, project, generator_checkpoints) -> P.Paths:
    """A real tiny pipeline: an SNN trained with a checkpoint schedule, the fixtures' generators,
    `maximize` with restarts, then `analyze` and `report`."""
    from spikemax.stages.maximize import run as maximize
    from spikemax.stages.train_snn import run as train_snn

    prep, src = project
    root = tmp_path_factory.mktemp("report")
    paths = P.Paths(root)
    paths.prepared.parent.mkdir(parents=True)
    paths.prepared.symlink_to(src.prepared, target_is_directory=True)
    (root / "models").mkdir()
    (root / "models" / "generators").symlink_to(src.generators_dir, target_is_directory=True)
    path = write_params(
        root,
        {
            "prepare": TINY_PREPARE,
            "snn": {**TINY_SNN, "checkpoints": SCHEDULE},
            "generators": TINY_GENERATORS,
            "maximize": AM,
            "analyze": {"csi_threshold": 0.3, "grid_rows": 3, "early_epoch": 0.4, "concept_from_epoch": 0.2},
        },
    )
    with pytest.MonkeyPatch.context() as mp:
        # mlflow.set_tracking_uri (in-process training) exports the URI; this project uses its own store.
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        train_snn(*P.load(path, root=root))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        maximize(*P.load(path, root=root))
    for stage in ("analyze", "report"):
        proc = run_cli(stage, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return paths


def test_schedule_writes_exactly_the_named_checkpoints(tiny_run):
    from spikemax.snn import checkpoints, progress, schedule_steps

    assert schedule_steps(0, 1, [], 13, 2) == [0, 13, 26]  # no schedule: before training and every epoch end
    assert schedule_steps(5, 1, [3, 99], 13, 2) == [0, 3, 5, 10, 13, 26]  # steps past the end are dropped
    assert schedule_steps(0, 1, [2], 10, 7, every_epochs=3) == [0, 2, 30, 60, 70]  # every 3rd epoch, and the last
    ckpts = checkpoints(tiny_run)
    assert [p.name for p in ckpts.values()] == NAMES
    assert sorted(p.name for p in tiny_run.snn_dir.iterdir()) == NAMES
    assert [progress(p).step for p in ckpts.values()] == [0, 3, 6, 13, 26]
    rows = pd.read_csv(tiny_run.metrics / "snn_epochs.csv")
    assert rows["epoch"].tolist() == list(range(5)) and rows["step"].tolist() == [0, 3, 6, 13, 26]
    assert rows["progress"].tolist() == pytest.approx([0, 3 / 13, 6 / 13, 1, 2])
    assert rows["test_acc"].notna().all() and rows["val_acc"].notna().all()
    # the test accuracy recorded inside an epoch is that checkpoint's own
    from spikemax.snn import load_snn

    prepared = Prepared.load(tiny_run.prepared)
    x, y = prepared.tensors("test")
    with torch.no_grad():
        acc = (load_snn(ckpts[2]).spike_counts(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(rows["test_acc"][2], abs=1e-6)
    # maximize ran on the chosen indices and carries each checkpoint's progress
    summary = pd.read_csv(tiny_run.results / "am" / "summary.csv")
    got = summary.groupby("epoch")[["step", "progress"]].first()
    assert got.index.tolist() == [1, 2, 4] and got["step"].tolist() == [3, 6, 26]
    assert got["progress"].tolist() == pytest.approx([0.231, 0.462, 2.0])


def test_analysis_outputs_follow_contract(tiny_run):
    from spikemax.neurons import layer_rates
    from spikemax.snn import checkpoints, load_snn

    snn_checkpoints = checkpoints(tiny_run)
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
    assert list(csi.columns) == ["epoch", "progress", *layers] and csi["epoch"].tolist() == epochs
    assert pd.read_csv(out / "am_gain_by_epoch.csv")["epoch"].tolist() == [1, 2, 4]
    acc = pd.read_csv(out / "accuracy_by_epoch.csv")
    assert acc["test_acc"].notna().all() and acc["epoch"].tolist() == epochs
    assert (acc["mean_csi_lo"] <= acc["mean_csi"]).all() and (acc["mean_csi"] <= acc["mean_csi_hi"]).all()
    # every claim number has a point estimate and an interval field; correlations a p-value
    for claim in ("claim1_early_selectivity", "claim2_selectivity_and_accuracy", "claim3_concept_change"):
        for block in (a[claim], *a[claim]["per_layer"].values()):
            for k, v in block.items():
                if isinstance(v, dict) and k != "per_layer":
                    assert {"lo", "hi", "n"} <= set(v) and ("value" in v or {"rho", "p"} <= set(v)), (claim, k)
    c2, c3 = a["claim2_selectivity_and_accuracy"], a["claim3_concept_change"]
    assert c2["spearman_mean_csi_vs_test_acc"]["n"] == len(epochs)  # over every checkpoint
    assert c3["restarts"] == 2 and c3["mean_concept_changes_robust"]["n"] == c3["tracked_neurons"]
    # concept = the final net's class for the best stimulus
    runs = pd.read_csv(out / "runs.csv")
    with np.load(tiny_run.results / "am" / runs["run_dir"].iloc[0] / "best.npz") as z:
        probs = final.class_probs(torch.from_numpy(z["image"])[None]).numpy()[0]
    assert runs["concept"].iloc[0] == probs.argmax()
    assert runs["concept_prob"].iloc[0] == pytest.approx(probs.max(), rel=1e-5)
    stimuli = pd.read_csv(out / "stimuli.csv")
    assert len(stimuli) == 3 * len(AM["generators"]) * len(AM["targets"])  # best over methods and restarts
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
    assert client.get_experiment(run.info.experiment_id).name == "analysis"  # not among the AM runs
    assert set(run.data.metrics) <= set(HEADLINE) and "c1_early_selective" in run.data.metrics
    assert "analysis.json" in {a.path for a in client.list_artifacts(ids["run_id"])}
    assert ids["am_runs_missing"] == 0 and ids["am_runs_tagged"] > 0
    am_run_id = pd.read_csv(tiny_run.results / "am" / "summary.csv")["run_id"].iloc[0]
    tags = client.get_run(am_run_id).data.tags
    classes = json.loads((tiny_run.metrics / "analysis.json").read_text())["meta"]["classes"]
    assert tags["spikemax.analysis_run"] == ids["run_id"] and tags["spikemax.final_concept"] in classes


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
    # the store as the UI takes it from the project folder; no machine's checkout path anywhere
    assert "mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db" in page
    assert str(tiny_run.root.resolve()) not in page and str(tiny_run.root) not in page
    # two methods ran: they are compared
    assert "win rate" in page and "Only one method ran" not in page


def test_one_method_is_not_compared(tmp_path):
    """With a single method there is no comparison (a win rate of 1 says nothing): the page says so."""
    methods = pd.DataFrame(
        {"generator": ["sngan", "vqvae"], "method": ["auto", "auto"], "runs": [4, 4], "win_rate": [1.0, 1.0]}
    )
    methods.to_csv(tmp_path / "methods.csv", index=False)
    runs = pd.DataFrame({"generator": ["sngan", "vqvae"], "resolved_method": ["cma", "tt"]})
    html = R.section_methods(tmp_path / "figures", tmp_path, runs)
    assert "Only one method ran" in html and "sngan: cma" in html and "vqvae: tt" in html
    assert "win_rate" not in html and "win rate" not in html


def test_mlflow_links_follow_the_tracking_uri(tmp_path):
    """Links point at the UI that shows the store actually used: a server's own, or the local `mlflow ui`."""
    assert R.ui_base("http://mlflow.lab:8080/") == "http://mlflow.lab:8080"
    assert R.ui_base(f"sqlite:///{tmp_path}/mlruns/mlflow.db") == R.LOCAL_UI
    assert R.store_arg(f"sqlite:///{tmp_path}/mlruns/mlflow.db", tmp_path) == "sqlite:///mlruns/mlflow.db"
    assert R.store_arg("sqlite:////elsewhere/m.db", tmp_path) == "sqlite:////elsewhere/m.db"
    ids = {"run_id": "r1", "experiment_id": "7", "tracking_uri": "http://mlflow.lab:8080", "experiment": "am"}
    page = R.section_mlflow(ids, pd.DataFrame({"run_id": ["a1"], "epoch": [0]}), tmp_path)
    assert 'href="http://mlflow.lab:8080/#/experiments/7/runs/a1"' in page
    assert ":5000" not in page


def test_wide_tables_are_split_and_intervals_merged():
    """A frame wider than the column becomes several tables, each keyed by the first column."""
    wide = pd.DataFrame({"layer": ["lif1", "out"], **{f"number_{i}": [0.123456, 1.5] for i in range(40)}})
    html = R.table(wide)
    assert html.count("<table>") > 1 and html.count("<th>layer</th>") == html.count("<table>")
    assert all(f"<th>number_{i}</th>" in html for i in range(40))
    merged = R.with_intervals(pd.DataFrame({"x": [0.5], "x_lo": [0.4], "x_hi": [0.6], "x_p": [0.01]}))
    assert list(merged.columns) == ["x"] and merged["x"][0] == "0.5 [0.4, 0.6] (p = 0.01)"


# Injected into a copy of the page: once it has loaded, open every <details> and record every element
# whose scroll width exceeds the body's column, and every image shown smaller than its own pixels.
LAYOUT_JS = """<script>
window.addEventListener('load', () => {
  document.querySelectorAll('details').forEach(d => { d.open = true; });
  const b = document.body, cs = getComputedStyle(b);
  const col = b.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
  const wide = [], scaled = [];
  let n = 0;
  for (const el of b.querySelectorAll('*')) {
    if (el.tagName === 'SCRIPT') continue;
    n += 1;
    const name = el.tagName + (el.id ? '#' + el.id : '') + (el.alt ? '[' + el.alt + ']' : '');
    if (el.scrollWidth > col + 1) wide.push(name + ' ' + el.scrollWidth);
    if (el.tagName === 'IMG' && el.naturalWidth > el.clientWidth + 1) scaled.push(name + ' ' + el.naturalWidth);
  }
  b.setAttribute('data-layout', JSON.stringify({col, n, wide: wide.slice(0, 20), scaled}));
});
</script>"""


def layout_problems(page: Path, tmp: Path, width: int = 1400) -> dict:
    """Load a copy of the page in headless Chromium at `width` px and return what LAYOUT_JS found."""
    copy = tmp / "layout.html"
    copy.write_text(page.read_text().replace("</body>", LAYOUT_JS + "</body>"))
    proc = subprocess.run(
        [
            *chromium_flags(tmp),
            "--dump-dom",
            "--virtual-time-budget=20000",
            f"--window-size={width},3000",
            copy.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    found = re.search(r"data-layout=\"([^\"]*)\"", proc.stdout)
    assert found, proc.stderr[-2000:]
    return json.loads(html_lib.unescape(found[1]))


def chromium_flags(tmp: Path) -> list[str]:
    """Headless Chromium without network, sync or a shared profile."""
    assert CHROMIUM
    return [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / 'profile'}",
    ]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package `chromium`)")
def test_report_reads_at_one_to_one_in_chromium(tiny_run, tmp_path):
    """No element of the page (all <details> open) is wider than the column, and no figure is shown
    smaller than its own pixels (labels are drawn at >= 10 px: tests/unit/test_figures_layout.py)."""
    got = layout_problems(tiny_run.reports / "index.html", tmp_path)
    assert got["n"] > 100 and 1000 <= got["col"] <= 1200, got
    assert got["wide"] == [] and got["scaled"] == [], got


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package `chromium`)")
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    shot = tmp_path / "shot.png"
    cmd = [
        *chromium_flags(tmp_path),
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


def test_docs_collect_reads_a_finished_run(tiny_run):
    """docs/tables.py collect (the README's default-run table) reads the metrics a run writes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "doc_tables", Path(__file__).resolve().parents[2] / "docs" / "tables.py"
    )
    assert spec and spec.loader
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    got = tables.collect(tiny_run.root)
    snn = json.loads((tiny_run.metrics / "snn.json").read_text())
    am = json.loads((tiny_run.metrics / "am.json").read_text())
    assert got["snn"]["test_acc_final"] == snn["test_acc"] and got["snn"]["checkpoints"] == len(NAMES)
    assert got["am"]["runs"] == am["n_runs"] == len(pd.read_csv(tiny_run.results / "am" / "summary.csv"))
    assert set(got["am"]["last_checkpoint"]) == {f"{g}/{m}" for g in AM["generators"] for m in AM["methods"]}
    assert got["claims"]["claim2"]["n"] == len(NAMES)
    assert 0 < tables.outputs_gb(tiny_run.root) < 1
