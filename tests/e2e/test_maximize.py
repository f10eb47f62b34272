"""The `maximize` stage on real tiny checkpoints: outputs, MLflow layout, resume, SIGKILL, bad params."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from spikemax import params as P
from spikemax import querylog, snn, tracking
from spikemax.am import SUMMARY_COLUMNS
from spikemax.am.plan import plan, resolve_targets
from spikemax.data import Prepared
from spikemax.neurons import layer_rates
from spikemax.stages.maximize import run as run_stage
from tests.support.maximize import am_runs, project_copy

pytestmark = pytest.mark.usefixtures("own_store")


@pytest.fixture(scope="module")
def models(project, snn_checkpoints, generator_checkpoints):
    """Both tiny generators and the tiny SNN's checkpoints (epochs 0..2) in `project`."""
    return project


SMALL = {
    "checkpoints": [0, -1],
    "generators": ["sngan", "vqvae"],
    "targets": ["class:0", "lif1:0"],
    "units_per_layer": 0,
    "methods": ["tt", "random"],
    "seeds": [0],
    "budget": 48,
    "batch": 16,
}


@pytest.mark.slow
def test_stage_outputs_mlflow_layout_and_rerun_skips(tmp_path, models):
    params, paths = project_copy(tmp_path / "p", models, SMALL)
    pl = plan(params, paths)
    n_targets = len(pl.targets)
    assert pl.epochs == [0, 2] and n_targets == 2
    metrics = run_stage(params, paths)
    n = 2 * 2 * n_targets * 2
    assert metrics["n_runs"] == n and metrics["n_failed"] == 0

    am = paths.results / "am"
    df = pd.read_csv(am / "summary.csv")
    assert list(df.columns) == SUMMARY_COLUMNS and len(df) == n and df["run_key"].is_unique
    assert (df["n_queries"] == 48).all() and (df["budget"] == 48).all()
    assert set(df["layer"]) == {"out", "lif1"}
    for _, row in df.iterrows():
        d = am / row["run_dir"]
        q = pd.read_parquet(d / "queries.parquet")
        assert list(q.columns) == ["query", "batch", "indices", "response", "elapsed_s"]
        assert q["query"].tolist() == list(range(48)) and q["batch"].max() == 2
        assert row["best_activation"] == pytest.approx(q["response"].max())
        with np.load(d / "best.npz") as z:
            assert z["image"].dtype == np.float32 and z["image"].shape == (1, 28, 28)
            assert z["indices"].dtype == np.int64
        assert (d / "best_stimulus.png").is_file() and (d / "convergence.png").is_file()
        assert row["dataset_max"] >= 0 and 1 <= row["queries_to_95"] <= 48
    for g in ("sngan", "vqvae"):
        for m in ("tt", "random"):
            assert (am / f"stimuli_{g}_{m}.png").is_file()
    assert json.loads((paths.metrics / "am.json").read_text())["n_runs"] == n
    # Warm start: an epoch-2 TT run starts from its epoch-0 state exactly when that search made the
    # neuron fire; the others start cold.
    tt = df[df.method == "tt"].set_index("run_key")
    for _, row in tt[tt.epoch == 2].iterrows():
        src = json.loads((am / row["run_dir"] / "summary.json").read_text())["warm_start_from"]
        prev = tt[(tt.epoch == 0) & (tt.generator == row["generator"]) & (tt.target == row["target"])].iloc[0]
        assert (src == prev.name) == (prev["best_activation"] > 0) and src in ("", prev.name)
    assert (df[(df.method != "tt") | (df.epoch == 0)]["queries_saved"] == 0).all()

    runs = am_runs(paths.root)
    parents = [r for r in runs if tracking.is_scan(r)]
    nested = [r for r in runs if tracking.RUN_KEY_TAG in r.data.tags]
    assert len(parents) == 1 and len(nested) == n
    client = mlflow.MlflowClient(tracking.tracking_uri(paths.root))
    r = next(r for r in nested if r.info.run_id == df.iloc[0]["run_id"])
    assert r.info.status == "FINISHED" and r.data.tags[tracking.SCAN_TAG] == parents[0].info.run_id
    group = client.get_run(r.data.tags["mlflow.parentRunId"])  # nested via its (generator, checkpoint) group
    assert group.data.tags[tracking.GROUP_TAG] == tracking.group_name(
        r.data.params["generator"], int(r.data.params["epoch"])
    )
    for k in ("method", "rank", "grid_n", "budget", "batch", "epoch", "target", "generator", "seed"):
        assert k in r.data.params
    for k in ("best_activation", "queries_to_95", "dataset_max", "am_gain"):
        assert k in r.data.metrics
    for key in ("activation", "best_activation"):
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, key))[-1] == 47
        assert len(client.get_metric_history(r.info.run_id, key)) == 48
    assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {
        "queries.parquet",
        "best_stimulus.png",
        "convergence.png",
    }

    # A rerun finds every combination finished (by run tag) and runs nothing.
    again = run_stage(params, paths)
    assert again["queries_run"] == 0 and again["n_runs"] == n
    assert len([r for r in am_runs(paths.root) if tracking.RUN_KEY_TAG in r.data.tags]) == n
    pd.testing.assert_frame_equal(pd.read_csv(am / "summary.csv"), df)


def test_budget_last_searches_the_last_checkpoint_longer(tmp_path, models):
    params, paths = project_copy(
        tmp_path / "p",
        models,
        {
            **SMALL,
            "generators": ["vqvae"],
            "targets": ["class:1"],
            "methods": ["ngopt"],
            "budget": 32,
            "budget_last": 64,
        },
    )
    run_stage(params, paths)
    df = pd.read_csv(paths.results / "am" / "summary.csv").set_index("epoch")
    assert df.loc[0, "budget"] == df.loc[0, "n_queries"] == 32
    assert df.loc[2, "budget"] == df.loc[2, "n_queries"] == 64
    for _, row in df.iterrows():
        q = pd.read_parquet(paths.results / "am" / row["run_dir"] / "queries.parquet")
        assert len(q) == row["budget"]
        # Comparable across checkpoints: the best within the first `budget` queries.
        assert row["scan_best_activation"] == pytest.approx(q["response"][:32].max())
        assert row["best_activation"] == pytest.approx(q["response"].max())
        run = mlflow.MlflowClient(tracking.tracking_uri(paths.root)).get_run(row["run_id"])
        assert run.data.params["budget"] == str(row["budget"])
        assert json.loads(run.data.params["options"])["budget"] == row["budget"]  # NGOpt is told its budget
    last = json.loads((paths.metrics / "am.json").read_text())["last_checkpoint"]
    assert set(last) == {"vqvae/ngopt"} and last["vqvae/ngopt"]["n_runs"] == 1


def test_targets_class_star_sampled_units_and_dedup():
    layers = {"lif1": 4, "lif2": 8, "fc_lif1": 32, "out": 10}
    m = P.MaximizeParams(targets=["class:*", "out:3", "lif2:5"], units_per_layer=3, target_seed=1)
    ts = resolve_targets(m, layers)
    names = [t.name for t in ts]
    assert names[:10] == [f"class:{k}" for k in range(10)] and names[10] == "lif2:5"
    assert len(names) == len(set(names))  # out:3 is class:3; a sampled lif2:5 is not repeated
    for layer in ("lif1", "lif2", "fc_lif1"):
        assert 3 <= sum(t.layer == layer for t in ts) <= 4
    assert [t.name for t in resolve_targets(m, layers)] == names  # the seed fixes the sample
    other = resolve_targets(m.model_copy(update={"target_seed": 2}), layers)
    assert [t.name for t in other] != names
    with pytest.raises(P.ParamsError, match="lif3"):
        resolve_targets(P.MaximizeParams(targets=["lif3:0"]), layers)


def test_sampled_units_are_live_units_of_the_trained_network(tmp_path, models):
    layers = {"lif1": 4, "lif2": 8, "fc_lif1": 32, "out": 10}
    live = {name: np.arange(n) % 3 == 0 for name, n in layers.items()}  # lif1: units 0 and 3 only
    m = P.MaximizeParams(targets=[], units_per_layer=3, target_seed=1)
    ts = resolve_targets(m, layers, live)
    assert all(live[t.layer][t.unit] for t in ts)
    assert sorted(t.unit for t in ts if t.layer == "lif1") == [0, 3]  # fewer live than asked: all of them
    assert sum(t.layer == "fc_lif1" for t in ts) == 3

    # The stage's default draws from units that fire on some prepared test image at the last checkpoint.
    params, paths = project_copy(tmp_path / "p", models, {**SMALL, "targets": [], "units_per_layer": 2})
    assert params.maximize.units_from == "live"
    pl = plan(params, paths)
    net = snn.load_snn(pl.snn_ckpts[max(pl.epochs)])
    x, _ = Prepared.load(paths.prepared).tensors("test")
    with torch.no_grad():
        rates = layer_rates(net.eval(), x)
    assert pl.targets and all(rates[t.layer][:, t.unit].max() > 0 for t in pl.targets)
    every = plan(
        *project_copy(tmp_path / "q", models, {**SMALL, "targets": [], "units_per_layer": 2, "units_from": "all"})
    )
    assert len(every.targets) == 2 * len(layers_of(net))


def layers_of(net) -> dict[str, int]:
    return dict(net.spiking_layers())


def test_bad_params_fail_before_any_run(tmp_path, models):
    base = {**SMALL, "checkpoints": [0]}
    cases = {
        "unknown target": ({"targets": ["lif9:0"]}, "lif9"),
        "unit out of range": ({"targets": ["class:99"]}, "class:99"),
        "checkpoint that does not exist": ({"checkpoints": [0, 7]}, "checkpoint 7"),
        "budget_last below budget": ({"budget_last": 8}, "budget_last >= budget"),
    }
    for i, (case, (change, needle)) in enumerate(cases.items()):
        params, paths = project_copy(tmp_path / f"p{i}", models, {**base, **change})
        with pytest.raises(P.ParamsError, match=re.escape(needle)) as err:
            run_stage(params, paths)
        msg = str(err.value)
        assert needle in msg and "\n" not in msg, case
        assert not paths.mlruns.exists() and not paths.results.exists(), case
    for change, needle in (
        ({"methods": ["tt", "hillclimb"]}, "methods"),
        ({"generators": ["biggan"]}, "generators"),
        ({"budget": 0}, "budget"),
    ):
        with pytest.raises(P.ParamsError, match=needle):
            P.validate({"maximize": {**base, **change}})


def test_bad_params_via_cli_is_one_line(tmp_path, models):
    from tests.support.project import run_cli

    project_copy(tmp_path / "p", models, {**SMALL, "targets": ["nope:1"]})
    res = run_cli("maximize", cwd=tmp_path / "p")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0]
    assert not (tmp_path / "p" / "mlruns").exists()


@pytest.mark.slow
def test_sigkill_loses_no_flushed_query_and_rerun_completes(tmp_path, models):
    budget, batch = 320, 8
    cfg = {
        "checkpoints": [-1],
        "generators": ["vqvae"],
        "targets": ["class:1", "lif2:0"],
        "methods": ["random", "tt"],
        "seeds": [0],
        "budget": budget,
        "batch": batch,
    }
    params, paths = project_copy(tmp_path / "p", models, cfg)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "spikemax.cli", "maximize"],
        cwd=paths.root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    am = paths.results / "am"
    deadline = time.time() + 240
    try:
        # Kill once the first group (random) has finished and the second (tt) has flushed a few batches.
        while time.time() < deadline and proc.poll() is None:
            finished = list(am.glob("runs/*/summary.json"))
            tables = [querylog.read_queries(d) for d in am.glob("runs/*_tt_*")] if len(finished) >= 2 else []
            if len(tables) == 2 and min(len(t) for t in tables) >= 3 * batch:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"stage ended before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()

    client = mlflow.MlflowClient(tracking.tracking_uri(paths.root))
    runs = [r for r in am_runs(paths.root) if tracking.RUN_KEY_TAG in r.data.tags]
    finished_before = {r.data.tags[tracking.RUN_KEY_TAG]: r.info.run_id for r in runs if r.info.status == "FINISHED"}
    killed = [r for r in runs if r.info.status == "RUNNING"]
    assert len(finished_before) == 2 and killed
    n_checked = 0
    for r in killed:
        table = querylog.read_queries(am / "runs" / r.data.tags[tracking.RUN_KEY_TAG])
        stored = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "activation")}
        # Every query in the table is in the store with the same value; the store may be one batch
        # ahead (killed between its write and the table's), never behind.
        assert set(table["query"]) <= set(stored)
        assert len(stored) - len(table) in (0, batch)
        assert len(stored) < budget
        np.testing.assert_allclose([stored[q] for q in table["query"]], table["response"])
        n_checked += len(table)
    assert n_checked >= 2 * 2 * batch

    metrics = run_stage(params, paths)  # resume
    assert metrics["n_runs"] == 4 and metrics["n_failed"] == 0
    runs = [r for r in am_runs(paths.root) if tracking.RUN_KEY_TAG in r.data.tags]
    done = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.data.tags[tracking.RUN_KEY_TAG] for r in done) == sorted(
        pd.read_csv(am / "summary.csv")["run_key"]
    )  # one FINISHED run per combination
    assert {
        r.data.tags[tracking.RUN_KEY_TAG]: r.info.run_id
        for r in done
        if r.data.tags[tracking.RUN_KEY_TAG] in finished_before
    } == finished_before  # not rerun
    for r in killed:
        assert client.get_run(r.info.run_id).info.status == "FAILED"
    parents = [r for r in am_runs(paths.root) if r.data.tags.get("spikemax.stage") == "maximize"]
    assert sorted(r.info.status for r in parents) == ["FAILED", "FINISHED"]  # the killed one, the resume
    df = pd.read_csv(am / "summary.csv")
    assert len(df) == 4 and (df["n_queries"] == budget).all()
