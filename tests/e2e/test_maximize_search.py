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


def _entry(study: str, method: str, settings: dict, adopted: bool = True) -> dict:
    """A generator's entry of metrics/tune.json as the tune stage writes it (the fields maximize reads)."""
    return {"study": study, "adopted": adopted, "winner": {"method": method, "settings": settings}} | (
        {"method": method, "settings": settings} if adopted else {"method": "cma", "settings": {}}
    )


def test_tuned_maximize_runs_carry_the_study_best_settings(tmp_path, project, snn_checkpoints, generator_checkpoints):
    """`maximize.tuned`: `auto` runs each generator's adopted method and settings (SN-GAN: TT with
    rank, lr and grid_n; VQ-VAE's study kept the default), an explicit method takes them when it is
    the adopted one; every run records what decided its method. Without tune.json: the fallback."""
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
    assert run_stage(params, paths)["n_failed"] == 0  # no tune.json: the per-grid table, no error
    nested_runs = [r for r in am_runs(paths.root) if tracking.RUN_KEY_TAG in r.data.tags]
    sources = {(r.data.params["generator"], r.data.params["method"]): r.data.params for r in nested_runs}
    assert sources[("sngan", "auto")]["method_source"] == "fallback"
    assert sources[("sngan", "auto")]["resolved_method"] == "cma"
    assert sources[("vqvae", "tt")]["method_source"] == "configured"
    settings = {"rank": 3, "lr": 0.037, "elite": 2, "cma_share": 0.25, "grid_n": 8}
    studies = {"sngan": _entry("sngan-e2-x", "tt", settings), "vqvae": _entry("vqvae-e2-y", "tt", {}, adopted=False)}
    (paths.metrics / "tune.json").write_text(json.dumps({"generators": studies}))
    assert run_stage(params, paths)["n_failed"] == 0
    runs = [r for r in am_runs(paths.root) if tracking.RUN_KEY_TAG in r.data.tags]
    parent = [r for r in am_runs(paths.root) if r.data.params.get("tuned_from") == "sngan-e2-x"]
    assert len(parent) == 1 and parent[0].data.params["method_source"] == "sngan=study,vqvae=default"
    nested = {
        (r.data.params["generator"], r.data.params["method"]): r.data.params
        for r in runs
        if r.data.tags.get(tracking.SCAN_TAG) == parent[0].info.run_id
    }
    assert set(nested) == {("sngan", "tt"), ("sngan", "auto")}  # VQ-VAE kept its default: its runs are reused
    for method in ("tt", "auto"):  # SN-GAN: both run the adopted TT with its settings
        p = nested[("sngan", method)]
        opts = json.loads(p["options"])
        assert (p["method_source"], p["tuned"], p["resolved_method"]) == ("study", "sngan-e2-x", "tt")
        assert (opts["rank"], opts["lr"], opts["elite"], opts["cma"], p["grid_n"]) == (3, 0.037, 2, 0.25, "8")
    assert sources[("vqvae", "auto")]["method_source"] == "fallback"  # run before tune.json existed
    assert sources[("vqvae", "tt")]["method_source"] == "configured"


def test_tuned_settings_change_only_the_keys_of_runs_they_apply_to(project, snn_checkpoints, generator_checkpoints):
    from spikemax.am.plan import plan

    params, paths = project
    base = P.validate(
        {
            **params.model_dump(),
            "maximize": {"checkpoints": [-1], "targets": ["class:0"], "methods": ["tt", "auto", "cma"]},
        }
    )
    tuned = {
        "sngan": {"study": "s", "method": "cma", "settings": {"sigma0": 0.2, "popsize": 8}, "source": "study"},
        "vqvae": {"study": "v", "method": "tt", "settings": {"rank": 2, "lr": 0.1}, "source": "study"},
    }
    before = {(r.generator, r.method): r.key for r in plan(base, paths).runs}
    after = {(r.generator, r.method): r.key for r in plan(base, paths, tuned).runs}
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {("sngan", "auto"), ("sngan", "cma"), ("vqvae", "tt"), ("vqvae", "auto")}


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
