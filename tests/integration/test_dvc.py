"""Real DVC in a temp git repo: the project's `prepare` stage runs, and a second repro is a no-op."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spikemax import params as P
from tests.support.project import REPO, write_params

DVC = str(Path(sys.executable).with_name("dvc"))


def sh(*args: str, cwd: Path, columns: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("MLFLOW_TRACKING_URI", None)
    if columns is not None:
        env["COLUMNS"] = str(columns)  # the terminal width rich lays the table out for
    res = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, env=env, timeout=2400
    )  # a loaded CI machine: the tiny pipeline took over 10 min at load 22 on 2 cores
    assert res.returncode == 0, f"{' '.join(args)} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture
def dvc_repo(tmp_path) -> Path:
    """A git + DVC repo holding the project's stage definitions and tiny params."""
    sh("git", "init", "-q", cwd=tmp_path)
    sh(DVC, "init", "-q", cwd=tmp_path)
    return tmp_path


def test_prepare_stage_repro_then_noop(dvc_repo):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (dvc_repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": stages["prepare"]}}))
    shutil.copytree(REPO / "src", dvc_repo / "src")
    write_params(dvc_repo, {"prepare": {"train_size": 200, "test_size": 100}})
    first = sh(DVC, "repro", cwd=dvc_repo)
    assert "Running stage 'prepare'" in first.stdout
    assert (dvc_repo / "data" / "prepared" / "meta.json").is_file()
    assert (dvc_repo / "dvc.lock").is_file()
    second = sh(DVC, "repro", cwd=dvc_repo)
    assert "Running stage" not in second.stdout
    assert "didn't change" in second.stdout or "up to date" in second.stdout
    # Changing the stage's params re-runs it.
    write_params(dvc_repo, {"prepare": {"train_size": 300, "test_size": 100}})
    third = sh(DVC, "repro", cwd=dvc_repo)
    assert "Running stage 'prepare'" in third.stdout


def test_a_new_tune_result_makes_maximize_changed(dvc_repo):
    """The maximize stage as dvc.yaml defines it, recorded by real DVC as run (`dvc commit`): a new
    best trial in metrics/tune.json (the tune stage's output) makes `dvc status` report it changed."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (dvc_repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"maximize": stages["maximize"]}}))
    shutil.copytree(REPO / "src", dvc_repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(dvc_repo, P.validate({"maximize": {"tuned": True}}).model_dump(mode="json"))
    files = {
        "data/prepared/meta.json": "{}",
        "models/snn/step=0-epoch=0.ckpt": "snn",
        "models/generators/sngan.ckpt": "sngan",
        "models/generators/vqvae.ckpt": "vqvae",
        "results/am/summary.csv": "run_key\n",
        "metrics/am.json": "{}",
    }
    for rel, text in files.items():
        (dvc_repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (dvc_repo / rel).write_text(text)
    settings = {"rank": 3, "lr": 0.05, "grid_n": 16}
    best = {"sngan": {"study": "sngan-e1-a", "adopted": True, "method": "tt", "settings": settings}}
    tune_json = dvc_repo / "metrics" / "tune.json"
    tune_json.write_text(json.dumps({"generators": best}))
    sh(DVC, "commit", "-f", "maximize", cwd=dvc_repo)
    assert json.loads(sh(DVC, "status", "--json", cwd=dvc_repo).stdout or "{}") == {}
    best["sngan"]["settings"]["rank"] = 5  # the study adopted another winner
    tune_json.write_text(json.dumps({"generators": best}))
    status = json.loads(sh(DVC, "status", "--json", cwd=dvc_repo).stdout or "{}")
    assert list(status) == ["maximize"]
    assert {"changed deps": {"metrics/tune.json": "modified"}} in status["maximize"]


def tiny_pipeline_params() -> dict:
    """Every stage of dvc.yaml at toy size: the whole pipeline in about a minute."""
    from tests.support.project import TINY_GENERATORS, TINY_SNN

    return {
        "prepare": {"train_size": 500, "test_size": 200, "val_fraction": 0.2},
        "snn": TINY_SNN,
        "generators": {**TINY_GENERATORS, "check_samples": 64},
        "maximize": {
            "checkpoints": [0, -1],
            "targets": ["class:1", "lif1:0"],
            "methods": ["tt", "random"],
            "budget": 32,
            "batch": 16,
        },
        # concept changes counted from the untrained net: the two AM'd checkpoints give claim 3 a value
        "analyze": {"grid_rows": 4, "concept_from_epoch": 0.0},
        "tune": {"n_trials": 2, "budget": 16, "batch": 8, "neurons": 1, "grid_n": [8]},
    }


def test_metrics_are_the_summary_and_each_plot_is_drawn_once():
    """dvc.yaml declares one metrics file (the headline numbers); the detailed JSON files are plain
    outputs; no data file is drawn by two plots; every top-level plot is titled and labelled."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    declared = [
        next(iter(m)) if isinstance(m, dict) else m
        for st in spec["stages"].values()
        for m in st.get("do", st).get("metrics", [])
    ]
    assert declared == ["metrics/summary.json"]
    drawn: list[str] = []
    for st in spec["stages"].values():
        drawn += [next(iter(m)) if isinstance(m, dict) else m for m in st.get("do", st).get("plots", [])]
    for plot in spec["plots"]:
        ((name, props),) = plot.items()
        drawn += list(props["y"])
        assert props["template"] == "series" and props["title"] and props["x_label"] and props["y_label"], name
        assert "(" in props["y_label"] or "fraction" in props["y_label"], f"{name}: y axis without a unit"
    assert len(drawn) == len(set(drawn)), drawn
    template = json.loads((REPO / ".dvc" / "plots" / "series.json").read_text())
    assert template["encoding"]["color"]["field"] == "field"  # colour tells series apart (a legend)
    assert template["encoding"]["strokeDash"]["field"] == "rev"  # dashes tell revisions apart
    ignored = subprocess.run(["git", "check-ignore", "-q", "metrics/summary.json"], cwd=REPO)
    assert ignored.returncode == 1, "metrics/summary.json must not be git-ignored (the baseline is committed)"


@pytest.mark.slow
def test_whole_pipeline_repro_on_a_fresh_repo(dvc_repo):
    shutil.copy(REPO / "dvc.yaml", dvc_repo / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", dvc_repo / ".gitignore")
    shutil.copytree(REPO / ".dvc" / "plots", dvc_repo / ".dvc" / "plots")
    shutil.copytree(REPO / "src", dvc_repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    # DVC wants every tracked param key spelled out in params.yaml: write the defaults too.
    write_params(dvc_repo, P.validate(tiny_pipeline_params()).model_dump(mode="json"))
    sh("git", "add", "-A", cwd=dvc_repo)
    sh("git", "commit", "-qm", "tiny pipeline", cwd=dvc_repo)
    first = sh(DVC, "repro", cwd=dvc_repo)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in stages:
        assert f"Running stage '{stage}" in first.stdout, stage
    html = (dvc_repo / "reports" / "index.html").read_text()
    assert "<html" in html.lower()
    for name in ("snn.json", "generators.json", "am.json", "analysis.json", "tune.json"):
        assert (dvc_repo / "metrics" / name).is_file(), name
    assert (dvc_repo / "mlruns" / "mlflow.db").is_file()
    second = sh(DVC, "repro", cwd=dvc_repo)
    assert "Running stage" not in second.stdout
    # DVC's metrics are the headline numbers: at most 12, every one filled.
    summary = json.loads((dvc_repo / "metrics" / "summary.json").read_text())
    assert 0 < len(summary) <= 12 and all(isinstance(v, (int, float)) for v in summary.values()), json.dumps(summary)
    shown = json.loads(sh(DVC, "metrics", "show", "--json", cwd=dvc_repo).stdout)
    ((_, workspace),) = shown.items()  # keyed by the revision ("" for the workspace in DVC 3.6x)
    assert list(workspace["data"]) == ["metrics/summary.json"]
    plots = json.loads(sh(DVC, "plots", "show", "--json", cwd=dvc_repo).stdout)["data"]
    assert all(len(entries) <= 1 for entries in plots.values()), plots.keys()  # each plot drawn once
    # (a plot whose layers the tiny run did not AM has no data here: the default run AMs every layer)
    assert plots["snn_accuracy"] and plots["accuracy_selectivity"]
    for name, entries in plots.items():
        if not entries or entries[0]["type"] != "vega":
            continue
        enc = entries[0]["content"]["encoding"]
        vega = entries[0]
        assert vega["content"]["title"]["text"] and enc["x"]["title"] and enc["y"]["title"], name
        assert enc["color"]["field"] == "field", name  # one colour per series, told apart in the legend
        assert len({d["field"] for d in vega["content"]["data"]["values"]}) >= 2, name
    # A new result of the tune study makes maximize (which reads it with `maximize.tuned`) changed.
    tune_json = dvc_repo / "metrics" / "tune.json"
    original_tune = tune_json.read_bytes()
    new_best = json.loads(original_tune)
    new_best["generators"]["sngan"]["settings"] = {"rank": 7}
    tune_json.write_text(json.dumps(new_best))
    try:
        status = json.loads(sh(DVC, "status", "--json", cwd=dvc_repo).stdout or "{}")
    finally:
        tune_json.write_bytes(original_tune)
    assert "maximize" in {name.split("@")[0] for name in status}
    # Changing a module makes `dvc status` report exactly the stages that import it as changed: one
    # module per distinct set of importing stages (each dependency pattern once; `test_layout` checks
    # every module's deps in dvc.yaml without running DVC).
    from tests.support.layout import STAGE_MODULES, closure

    users: dict[Path, set[str]] = {}
    for stage, module in STAGE_MODULES.items():
        for path in closure(module):
            users.setdefault(path.relative_to(REPO), set()).add(stage)
    patterns: dict[frozenset[str], Path] = {}
    for rel in sorted(p.relative_to(REPO) for p in (REPO / "src" / "spikemax").rglob("*.py")):
        patterns.setdefault(frozenset(users.get(rel, set())), rel)
    assert len(patterns) >= 5, patterns  # stages share some modules and not others
    for rel in patterns.values():
        target = dvc_repo / rel
        original = target.read_bytes()
        target.write_bytes(original + b"\n# touched by the test\n")
        try:
            status = json.loads(sh(DVC, "status", "--json", cwd=dvc_repo).stdout or "{}")
        finally:
            target.write_bytes(original)
        changed = {name.split("@")[0] for name in status}
        assert changed == users.get(rel, set()), f"{rel}: dvc status reports {sorted(changed)}"
    # Commit the run as example-get-started does (dvc.lock and the headline metrics), change one
    # param in an experiment: `dvc exp show` has the baseline filled, `dvc metrics diff` works.
    sh("git", "add", "-A", cwd=dvc_repo)
    sh("git", "commit", "-qm", "the default run", cwd=dvc_repo)
    tracked = sh("git", "ls-files", "metrics", "dvc.lock", cwd=dvc_repo).stdout.split()
    assert tracked == ["dvc.lock", "metrics/summary.json"]
    sh(DVC, "exp", "run", "-S", "analyze.csi_threshold=0.3", cwd=dvc_repo)
    rows = list(csv.DictReader(io.StringIO(sh(DVC, "exp", "show", "--no-pager", "--csv", cwd=dvc_repo).stdout)))
    (base,) = [r for r in rows if r["typ"] == "baseline" and r["rev"] != "workspace"]  # the committed run
    exps = [r for r in rows if r["typ"].startswith("branch")]
    assert len(exps) == 1 and exps[0]["analyze.csi_threshold"] == "0.3"
    for key in summary:
        assert base[key] not in ("", "-", "!") and exps[0][key] not in ("", "-", "!"), (key, base[key])
    sh(DVC, "metrics", "diff", cwd=dvc_repo)
    # The documented table fits 160 columns: only what changed, nothing cut to an ellipsis.
    table = sh(DVC, "exp", "show", "--no-pager", "--only-changed", cwd=dvc_repo, columns=160).stdout
    assert "…" not in table and max(map(len, table.splitlines())) <= 160, table


def test_plots_page_renders_offline(dvc_repo):
    """`dvc plots show` with the project's .dvc config and templates writes a page that loads nothing
    from the network (vega inlined) and, where Chromium is installed, draws the plot."""
    shutil.copytree(REPO / ".dvc" / "plots", dvc_repo / ".dvc" / "plots")
    shutil.copy(REPO / ".dvc" / "config", dvc_repo / ".dvc" / "config")
    (dvc_repo / "m.csv").write_text("progress,val_acc,test_acc\n0,0.1,0.12\n1,0.5,0.55\n2,0.7,0.72\n")
    spec = {"plots": [{"acc": {"template": "series", "x": "progress", "y": {"m.csv": ["val_acc", "test_acc"]}}}]}
    (dvc_repo / "dvc.yaml").write_text(yaml.safe_dump(spec))
    sh(DVC, "plots", "show", "-o", "page", cwd=dvc_repo)
    page = (dvc_repo / "page" / "index.html").read_text()
    assert not re.findall(r"<script[^>]+src=", page) and "vega-embed" in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed: the page was checked for network loads only")
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={dvc_repo / 'chrome'}",
         "--virtual-time-budget=10000", "--dump-dom", (dvc_repo / "page" / "index.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert 'role="graphics-document"' in dom  # vega-embed drew the chart
