"""The tune study's decision on synthetic panels: the real Optuna study, pruner, stopping rule,
validation and `resolve_auto`, with a bench whose per-neuron gains are known (no network)."""

from __future__ import annotations

import json
import zlib
from typing import Any

import numpy as np
import pytest

from spikemax import SpikemaxError
from spikemax import params as P
from spikemax.am.policy import METHOD_AUTO, method_source, run_options, settings_options, tuned_for
from spikemax.optim import make_optimizer
from spikemax.stages.tune import run_study, study_result
from spikemax.tuning import (
    SCORE,
    make_pruner,
    paired_difference,
    resolve_auto,
    space_of,
    stop_reason,
    tuned_results,
    validate_winner,
)

NEURONS = 10


class SyntheticBench:
    """A panel whose gains are set per method: neuron j's gain is `base[j] + shift[method]` plus
    seeded run noise of `sigma` (another draw per settings and panel), reached linearly over the
    rungs; `base` (how far each neuron can be driven) differs between neurons far more than that."""

    def __init__(self, shift: dict[str, Any], sigma: float, budget: int = 64, batch: int = 16) -> None:
        self.generator = "sngan"
        self.shift, self.sigma = shift, sigma
        self.budget, self.batch = budget, batch
        self.cuts = [32, 64]
        rng = np.random.default_rng(0)
        self.base = {p: rng.uniform(0.6, 1.4, NEURONS) for p in ("train", "validation")}
        self.targets = {p: [f"lif1:{j}" for j in range(NEURONS)] for p in ("train", "validation")}
        self.dataset_max = {p: np.ones(NEURONS) for p in ("train", "validation")}
        self.calls: list[tuple[str, str]] = []

    def run(self, method: str, settings: dict[str, Any], panel: str, on_rung: Any = None) -> np.ndarray:
        self.calls.append((method, panel))
        seed = zlib.crc32(json.dumps([method, settings, panel], sort_keys=True, default=str).encode())
        noise = np.random.default_rng(seed).normal(0.0, self.sigma, NEURONS)
        shift = self.shift[method]
        final = self.base[panel] + (shift(settings) if callable(shift) else shift) + noise
        for cut in self.cuts:
            gains = final * cut / self.budget
            if on_rung is not None:
                on_rung(cut, gains)
        return final


def tune_params(**tune: Any) -> P.Params:
    return P.validate(
        {
            "tune": {"generators": ["sngan"], "n_trials": 8, "min_trials": 4, "neurons": NEURONS, **tune},
            "maximize": {"budget": 64, "batch": 16},
        }
    )


def study_of(tmp_path, params: P.Params, bench: SyntheticBench) -> Any:
    paths = P.Paths(tmp_path)
    return run_study(params, paths, 3, "sngan", bench=bench), paths  # type: ignore[arg-type]


def test_the_study_picks_the_better_method_and_auto_resolves_to_it(tmp_path, own_store):
    params = tune_params()
    bench = SyntheticBench({"tt": 0.5, "cma": 0.0}, sigma=0.02)  # TT better by far more than the noise
    study, paths = study_of(tmp_path, params, bench)
    # The untuned configurations of both methods were measured first.
    space = space_of(params, "sngan")
    assert [t.params for t in study.trials[:2]] == [{"method": m, **space.defaults[m]} for m in ("tt", "cma")]
    val = validate_winner(study, params, bench)  # type: ignore[arg-type]
    result = study_result(study, params, val)
    assert result["winner"]["method"] == "tt" and result["validation"]["verdict"] == "better"
    assert result["adopted"] and (result["method"], result["settings"]) == ("tt", result["winner"]["settings"])
    assert result["validation"]["default_method"] == METHOD_AUTO[True] == "cma"
    assert result["validation"]["difference"]["lo"] > 0
    assert bench.calls.count(("tt", "validation")) == 1 and bench.calls.count(("cma", "validation")) == 1
    assert "adopted" in result["decision"]
    method, settings, source = resolve_auto("sngan", result)
    assert (method, source) == ("tt", "study") and settings == result["winner"]["settings"]
    # What maximize's `auto` then runs on SN-GAN: TT with the winner's settings.
    tuned = {"sngan": {"study": result["study"], "method": method, "settings": settings, "source": source}}
    opts = run_options(params.maximize, tuned, "auto", "sngan", True)
    assert opts["resolved"] == "tt" and (opts["rank"], opts["lr"]) == (settings["rank"], settings["lr"])
    assert method_source(tuned, "auto", "sngan") == "study" and method_source(tuned, "auto", "vqvae") == "fallback"
    # A rerun with the same winner does not measure the validation panel again.
    validate_winner(study, params, bench)  # type: ignore[arg-type]
    assert sum(panel == "validation" for _, panel in bench.calls) == 2


def test_equal_methods_are_a_tie_and_the_default_is_kept(tmp_path, own_store):
    params = tune_params(n_trials=6)
    bench = SyntheticBench({"tt": 0.0, "cma": 0.0}, sigma=0.02)  # equal: only run noise tells trials apart
    study, _ = study_of(tmp_path, params, bench)
    result = study_result(study, params, validate_winner(study, params, bench))  # type: ignore[arg-type]
    d = result["validation"]["difference"]
    assert result["validation"]["verdict"] in ("tie", "same") and d["lo"] <= 0 <= d["hi"]
    assert not result["adopted"] and (result["method"], result["settings"]) == ("cma", {})
    assert result["decision"].startswith("default kept")
    assert resolve_auto("sngan", result) == ("cma", {}, "default")


def test_the_study_stops_once_the_winner_is_separated(tmp_path, own_store):
    """Separated after min_trials: fewer than n_trials run, and the interval it stopped on is above 0."""
    params = tune_params(n_trials=30, min_trials=3, methods=["tt", "cma"])
    # Every TT setting scores differently (by its learning rate): the best one stands out.
    bench = SyntheticBench({"tt": lambda s: 3 * s["lr"], "cma": 0.0}, sigma=0.01)
    study, _ = study_of(tmp_path, params, bench)
    result = study_result(study, params, validate_winner(study, params, bench))  # type: ignore[arg-type]
    assert stop_reason(study, params) == "separated" and result["stopped"] == "separated"
    assert 3 <= result["n_trials"] < 30 and result["separation"]["lo"] > 0
    assert result["separation"]["value"] == pytest.approx(result["winner"][SCORE] - result["runner_up"][SCORE])


def test_the_pruner_stops_a_trial_confidently_behind_and_keeps_one_behind_by_chance():
    import optuna

    pruner = make_pruner(level=0.9)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    base = np.linspace(0.5, 1.5, NEURONS)
    best = optuna.trial.create_trial(
        value=float(np.median(base)),
        params={},
        distributions={},
        user_attrs={"gains@32": list(base), "gains": list(base)},
        intermediate_values={32: float(np.median(base))},
    )
    study.add_trial(best)
    rng = np.random.default_rng(1)

    def pruned(gains: np.ndarray) -> bool:
        trial = study.ask()
        trial.set_user_attr("gains@32", [float(g) for g in gains])
        trial.report(float(np.median(gains)), 32)
        out = trial.should_prune()
        study.tell(trial, state=optuna.trial.TrialState.PRUNED if out else optuna.trial.TrialState.FAIL)
        return out

    assert pruned(base - 0.3 + rng.normal(0, 0.01, NEURONS))  # behind on every neuron
    # Behind in median on a few neurons only (the others ahead): not confidently worse.
    mixed = base + np.where(np.arange(NEURONS) % 2 == 0, -0.2, 0.15)
    assert not pruned(mixed)


def test_paired_difference_is_the_median_difference_with_an_interval():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 1.0, 1.5, 2.0])
    d = paired_difference(a, b, level=0.9)
    assert d["value"] == pytest.approx(np.median(a) - np.median(b)) and d["n"] == 4
    assert d["lo"] <= d["value"] <= d["hi"]
    with pytest.raises(ValueError, match="same neurons"):
        paired_difference(a, b[:3], level=0.9)


def test_tuned_without_a_study_result_uses_and_records_the_fallback(tmp_path):
    got = tuned_results(tmp_path / "tune.json", ["sngan", "vqvae"])
    assert {g: (s["method"], s["source"]) for g, s in got.items()} == {
        "sngan": (METHOD_AUTO[True], "fallback"),
        "vqvae": (METHOD_AUTO[False], "fallback"),
    }
    m = P.validate({}).maximize
    assert m.tuned  # the default
    for g, ordered in (("sngan", True), ("vqvae", False)):
        assert run_options(m, got, "auto", g, ordered)["resolved"] == METHOD_AUTO[ordered]
        assert run_options(m, got, "auto", g, None)["resolved"] == "auto"  # the hash: the grid decides
        assert method_source(got, "auto", g) == "fallback" and method_source(got, "tt", g) == "configured"
    (tmp_path / "tune.json").write_text(json.dumps({"generators": {"sngan": {"study": "x", "best_rank": 3}}}))
    with pytest.raises(SpikemaxError, match="not a tune stage result of this version"):
        tuned_results(tmp_path / "tune.json", ["sngan"])


def test_adopted_settings_apply_to_auto_and_to_the_adopted_method_only():
    entry = {"study": "s", "method": "cma", "settings": {"sigma0": 0.2, "popsize": 16, "grid_n": 32}, "source": "study"}
    tuned = {"sngan": entry}
    m = P.validate({}).maximize
    assert tuned_for(tuned, "auto", "sngan") == tuned_for(tuned, "cma", "sngan") == entry["settings"]
    assert tuned_for(tuned, "tt", "sngan") == {} and method_source(tuned, "tt", "sngan") == "configured"
    assert tuned_for(tuned, "auto", "vqvae") == {}  # another generator's result
    opts = run_options(m, tuned, "auto", "sngan", True)
    assert opts == {"sigma0": 0.2, "popsize": 16, "resolved": "cma"}
    assert run_options(m, tuned, "auto", "sngan", None)["resolved"] == "cma"  # the hash records the adopted method
    assert run_options(m, tuned, "cma", "sngan", True) == {"sigma0": 0.2, "popsize": 16}
    assert run_options(m, tuned, "tt", "sngan", True)["rank"] == m.tt.rank  # as configured
    # `auto` resolved to CMA-ES builds it with those options and without a codebook's data prior.
    opt = make_optimizer("auto", 4, 8, seed=0, prior=object(), **opts)
    assert opt.method == "cma" and opt.es.popsize == 16  # type: ignore[attr-defined]


def test_the_space_holds_the_defaults_and_the_noise_aware_options_only_when_noisy():
    import optuna

    from spikemax.tuning import suggest

    quiet = P.validate({}).tune
    assert "aware" not in space_of(P.validate({}), "sngan").defaults["tt"]
    noisy = P.validate({"maximize": {"noise": {"model": "poisson", "aware": True, "retest": 0.07}}})
    space = space_of(noisy, "vqvae")
    assert space.defaults["cma"] == {"sigma0": 0.3, "popsize": 0, "aware": True, "retest": 0.07, "estimator": "shrink"}
    assert 0.07 in space.retest and set(quiet.retest) <= set(space.retest)  # widened to hold the default
    assert "grid_n" not in space.defaults["tt"] and "cma_share" not in space.defaults["tt"]  # a codebook
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        method, settings = suggest(study.ask(), space)
        seen.add(settings["aware"])
        opts = settings_options(noisy.maximize, method, settings, False)
        assert opts.get("noise_aware", False) == settings["aware"]
        if settings["aware"]:
            assert (opts["retest"], opts["estimator"]) == (settings["retest"], settings["estimator"])
    assert seen == {False, True}


def test_adopted_values_win_over_the_noise_aware_default_base_settings():
    """Under a noise model (`aware: auto` turns the layer on) the untuned TT and CMA-ES take the
    noise default's base settings, a run of the adopted method the values its study measured."""
    from spikemax.optim.noisy import UNDER_NOISE

    m = P.validate({"maximize": {"noise": {"model": "poisson"}}}).maximize
    assert space_of(P.validate({"maximize": {"noise": {"model": "poisson"}}}), "vqvae").defaults["tt"]["aware"] is True
    untuned = run_options(m, {}, "tt", "vqvae", False)
    assert untuned["noise_aware"] and untuned["elite"] == UNDER_NOISE["tt"]["elite"]
    tuned = {"vqvae": {"study": "v", "method": "tt", "settings": {"rank": 2, "elite": 4}, "source": "study"}}
    opts = run_options(m, tuned, "auto", "vqvae", False)
    assert (opts["resolved"], opts["rank"], opts["elite"], opts["noise_aware"]) == ("tt", 2, 4, True)
    cma = {"sngan": {"study": "s", "method": "cma", "settings": {"popsize": 8}, "source": "study"}}
    assert run_options(m, cma, "cma", "sngan", True)["popsize"] == 8
    assert run_options(m, {}, "cma", "sngan", True)["popsize"] == UNDER_NOISE["cma"]["popsize"]
