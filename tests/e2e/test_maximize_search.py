"""The maximize stage's search settings: TT's per-grid `cma: auto` and the VQ-VAE data prior."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from spikemax import params as P
from spikemax import tracking
from spikemax.optim import options_for
from spikemax.optim.tt import CMA_AUTO
from spikemax.stages.maximize import run as run_stage
from tests.support.maximize import am_runs, project_copy

pytestmark = pytest.mark.usefixtures("own_store")


def test_options_for_resolves_cma_per_grid():
    m = P.validate({}).maximize
    assert m.tt.cma == "auto" and options_for("tt", m)["cma"] == "auto"
    assert options_for("tt", m, True)["cma"] == CMA_AUTO[True] > 0
    assert options_for("tt", m, False)["cma"] == 0.0
    with pytest.raises(Exception, match="Input should be 'auto' or a number in"):
        P.validate({"maximize": {"tt": {"cma": 2}}})


@pytest.mark.parametrize("prior", [True, False])
def test_stage_records_resolved_cma_and_the_prior_in_mlflow(
    tmp_path, project, snn_checkpoints, generator_checkpoints, prior
):
    small = {
        "checkpoints": [-1],
        "generators": ["sngan", "vqvae"],
        "targets": ["class:0"],
        "units_per_layer": 0,
        "methods": ["tt", "random"],
        "budget": 32,
        "batch": 16,
        "prior": prior,
        "prior_images": 200,
    }
    params, paths = project_copy(tmp_path / "p", project, small)
    assert run_stage(params, paths)["n_failed"] == 0
    runs = [r for r in am_runs(paths.root) if tracking.RUN_KEY_TAG in r.data.tags]
    assert len(runs) == 4
    for r in runs:
        g, method = r.data.params["generator"], r.data.params["method"]
        if method == "tt":
            assert json.loads(r.data.params["options"])["cma"] == CMA_AUTO[g == "sngan"]
        assert r.data.params["prior"] == str(prior and g == "vqvae")
    cache = paths.results / "am" / "prior_vqvae.npz"
    assert cache.is_file() == prior
    if prior:
        with np.load(cache) as z:
            assert z["theta"].shape[:2] == (z["n"].size, params.maximize.tt.rank)


def test_queries_to_level_uses_the_better_best_of_both_runs():
    from spikemax.am.summary import queries_to_level

    warm, cold = np.array([0.0, 9.6, 10.0]), np.array([1.0, 2.0, 5.0, 9.0])
    assert queries_to_level(warm, cold) == 2  # 9.6 >= 0.95 * 10
    assert queries_to_level(cold, warm) == 4  # never reaches 9.5: its whole budget
    assert queries_to_level(np.array([np.nan, 3.0]), np.array([np.nan])) == 2


def test_runs_tt_follows_method_auto_per_grid():
    from spikemax.am.policy import runs_tt

    assert runs_tt("tt", "sngan") and runs_tt("tt", "vqvae")
    assert runs_tt("auto", "vqvae") and not runs_tt("auto", "sngan")  # auto: TT on codebooks, CMA-ES on quantiles
    assert not runs_tt("cma", "vqvae")


@pytest.mark.parametrize("method", ["tt", "auto"])  # auto runs TT on VQ-VAE: warm starts and twins too
def test_queries_saved_is_measured_against_a_cold_run_of_the_same_neuron(
    tmp_path, project, snn_checkpoints, generator_checkpoints, method
):
    from spikemax.am.summary import queries_to_level

    small = {
        "checkpoints": [0, -1],
        "generators": ["vqvae"],
        "targets": ["class:0", "lif1:0"],
        "units_per_layer": 0,
        "methods": [method],
        "budget": 48,
        "batch": 16,
        "prior_images": 200,
    }
    out = {}
    for warm in (True, False):
        params, paths = project_copy(
            tmp_path / f"w{warm}", project, {**small, "warm_start": warm, "measure_warm_start": True}
        )
        run_stage(params, paths)
        df = pd.read_csv(paths.results / "am" / "summary.csv")
        out[warm] = (paths.results / "am", df[df.epoch == df.epoch.max()].set_index("target"))
    (am_w, w), (am_c, c) = out[True], out[False]
    n_warm = 0
    for target in w.index:
        if not json.loads((am_w / w.loc[target, "run_dir"] / "summary.json").read_text())["warm_start_from"]:
            assert w.loc[target, "queries_saved"] == 0  # started cold: its previous search never fired
            continue
        n_warm += 1
        yw = pd.read_parquet(am_w / w.loc[target, "run_dir"] / "queries.parquet")["response"].to_numpy()
        yc = pd.read_parquet(am_c / c.loc[target, "run_dir"] / "queries.parquet")["response"].to_numpy()
        # The cold twin is the same run as the warm_start: false stage's run of that neuron.
        assert w.loc[target, "queries_saved"] == queries_to_level(yc, yw) - queries_to_level(yw, yc)
    assert n_warm >= 1  # lif1:0 fires at epoch 0 in the tiny net


def test_tuned_maximize_runs_carry_the_study_best_settings(tmp_path, project, snn_checkpoints, generator_checkpoints):
    """`maximize.tuned`: each generator's TT runs (tt; auto on VQ-VAE) run and record their study's
    best rank, lr and (SN-GAN) grid_n; CMA-ES (auto on SN-GAN) runs as configured."""
    small = {
        "checkpoints": [-1],
        "generators": ["sngan", "vqvae"],
        "targets": ["class:0"],
        "units_per_layer": 0,
        "methods": ["tt", "auto"],
        "budget": 16,
        "batch": 16,
        "prior_images": 200,
        "tuned": True,
    }
    params, paths = project_copy(tmp_path / "p", project, small)
    with pytest.raises(Exception, match="tune.json is missing: run `spikemax tune` first"):
        run_stage(params, paths)
    studies = {
        "sngan": {"study": "tt-sngan-e2-x", "best_rank": 3, "best_lr": 0.037, "best_grid_n": 8},
        "vqvae": {"study": "tt-vqvae-e2-y", "best_rank": 2, "best_lr": 0.11},
    }
    paths.metrics.mkdir(parents=True, exist_ok=True)
    (paths.metrics / "tune.json").write_text(json.dumps({"generators": studies}))
    assert run_stage(params, paths)["n_failed"] == 0
    runs = am_runs(paths.root)
    nested = {
        (r.data.params["generator"], r.data.params["method"]): r.data.params
        for r in runs
        if tracking.RUN_KEY_TAG in r.data.tags
    }
    parent = [r for r in runs if r.data.params.get("tuned_from") == "tt-sngan-e2-x,tt-vqvae-e2-y"]
    assert len(nested) == 4 and len(parent) == 1
    for (g, method), p in nested.items():
        opts = json.loads(p["options"])
        if (g, method) == ("sngan", "auto"):  # CMA-ES: tuning leaves it as configured
            assert (p["tuned"], p["rank"], p["grid_n"]) == ("none", "none", str(params.generators.sngan.grid_n))
            continue
        best = studies[g]
        assert p["tuned"] == best["study"]
        assert (opts["rank"], opts["lr"], p["rank"]) == (best["best_rank"], best["best_lr"], str(best["best_rank"]))
        assert p["grid_n"] == str(best.get("best_grid_n", params.generators.vqvae.codes))
    # The VQ-VAE TT runs started from a prior of their tuned rank.
    with np.load(paths.results / "am" / "prior_vqvae_r2.npz") as z:
        assert z["theta"].shape[1] == 2


def test_tuned_settings_change_only_the_keys_of_runs_that_run_tt(project, snn_checkpoints, generator_checkpoints):
    from spikemax.am.plan import plan

    params, paths = project
    base = P.validate(
        {
            **params.model_dump(),
            "maximize": {"checkpoints": [-1], "targets": ["class:0"], "methods": ["tt", "auto", "cma"]},
        }
    )
    tuned = {"sngan": {"study": "s", "rank": 3, "lr": 0.05, "grid_n": 8}, "vqvae": {"study": "v", "rank": 2, "lr": 0.1}}
    before = {(r.generator, r.method): r.key for r in plan(base, paths).runs}
    after = {(r.generator, r.method): r.key for r in plan(base, paths, tuned).runs}
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {("sngan", "tt"), ("vqvae", "tt"), ("vqvae", "auto")}


def test_method_auto_resolves_per_grid():
    from spikemax.am.policy import METHOD_AUTO
    from spikemax.optim import make_optimizer

    m = P.validate({"maximize": {"methods": ["auto"]}}).maximize
    assert options_for("auto", m, True) == {"resolved": METHOD_AUTO[True]}
    codebook = options_for("auto", m, False)
    assert codebook["resolved"] == METHOD_AUTO[False] == "tt" and codebook["cma"] == 0.0
    assert options_for("auto", m)["resolved"] == "auto"  # no grid: the configuration hash keeps "auto"
    assert make_optimizer("auto", 4, 8, **options_for("auto", m, True)).method == METHOD_AUTO[True]
    assert make_optimizer("auto", 4, 8, **codebook).method == "tt"
    with pytest.raises(ValueError, match="method 'auto' needs resolved"):
        make_optimizer("auto", 4, 8)


def test_stage_records_the_method_auto_resolved_per_generator(
    tmp_path, project, snn_checkpoints, generator_checkpoints
):
    from spikemax.am.policy import METHOD_AUTO

    small = {
        "checkpoints": [-1],
        "generators": ["sngan", "vqvae"],
        "targets": ["class:0"],
        "units_per_layer": 0,
        "methods": ["auto"],
        "budget": 16,
        "batch": 16,
        "prior_images": 200,
    }
    params, paths = project_copy(tmp_path / "p", project, small)
    assert run_stage(params, paths)["n_failed"] == 0
    runs = [r for r in am_runs(paths.root) if tracking.RUN_KEY_TAG in r.data.tags]
    got = {r.data.params["generator"]: r.data.params["resolved_method"] for r in runs}
    assert got == {"sngan": METHOD_AUTO[True], "vqvae": METHOD_AUTO[False]}
    for r in runs:
        assert json.loads(r.data.params["options"])["resolved"] == got[r.data.params["generator"]]
        assert r.data.params["method"] == "auto"
