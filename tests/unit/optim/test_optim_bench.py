"""The benchmark's planted maxima are real maxima (else its normalized scores would lie)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location(
    "bench_optimizers", Path(__file__).resolve().parents[3] / "benchmarks" / "bench_optimizers.py"
)
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_optimizers"] = bench  # dataclasses look their module up
spec.loader.exec_module(bench)


@pytest.mark.parametrize("family", bench.FAMILIES)
@pytest.mark.parametrize("d,n", [(6, 2), (5, 4)])
def test_planted_maximum_is_the_maximum(family, d, n):
    p = bench.make_problem(family, d, n, seed=0)
    grid = np.stack(np.meshgrid(*[np.arange(n)] * d, indexing="ij"), axis=-1).reshape(-1, d)
    values = p.f(grid)
    assert values.max() == pytest.approx(p.known_max, abs=1e-9)
    assert p.random_ref < p.known_max


def test_scores_of_one_run_are_normalized():
    p = bench.make_problem("separable", 8, 4, seed=0)
    row = bench.run_one(p, "random", 0, [100, 300])
    assert 0.0 <= row["scores"]["100"] <= row["scores"]["300"] <= 1.0


def test_smooth_table_is_the_median_per_problem_and_per_family():
    rows = [
        {"problem": f"sphere-d{d}", "family": "sphere", "method": m, "scores": {"10": v}}
        for d, m, v in [(2, "tt", 0.2), (2, "tt", 0.4), (3, "tt", 1.0), (2, "cma", 0.5), (3, "cma", 0.5)]
    ] + [{"problem": "qubo-d2", "family": "qubo", "method": "tt", "scores": {"10": 0.0}}]
    t = bench.smooth_table(rows, ["tt", "cma"], [10])
    assert t["problem"]["sphere-d2"] == {"tt": {"10": pytest.approx(0.3)}, "cma": {"10": 0.5}}
    assert t["family"]["sphere"]["tt"]["10"] == pytest.approx(0.4)  # median of 0.2, 0.4, 1.0
    assert "qubo" not in t["family"] and "qubo-d2" not in t["problem"]  # smooth functions only


am_spec = importlib.util.spec_from_file_location(
    "bench_am", Path(__file__).resolve().parents[3] / "benchmarks" / "bench_am.py"
)
bench_am = importlib.util.module_from_spec(am_spec)
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))  # bench_am imports noise_common
try:
    am_spec.loader.exec_module(bench_am)
finally:
    sys.path.pop(0)


def _am_result(best: dict, targets=("a:0", "a:1", "a:2"), data_max=(1.0, 2.0, 0.0)) -> dict:
    r = bench_am.score(list(targets), list(data_max), [1, 2], best, {})
    return {"sngan": {"methods": r}}


def test_am_score_normalizes_by_the_best_any_method_found():
    best = {
        "x": {"1": [1.0, 1.0, None], "2": [2.0, 1.0, None]},
        "y": {"1": [0.5, 4.0, None], "2": [1.0, 4.0, None]},
    }
    r = bench_am.score(["a:0", "a:1", "a:2"], [1.0, 2.0, 0.0], [1, 2], best, {})
    assert r["n_scored"] == 2  # neuron 2 never fired for any method: no scale
    assert r["methods"]["x"]["2"]["mean"] == pytest.approx((2 / 2 + 1 / 4) / 2)
    assert r["methods"]["y"]["1"]["mean"] == pytest.approx((0.5 / 2 + 4 / 4) / 2)
    assert r["n_gain"] == 2 and r["methods"]["y"]["2"]["share_am_gain_gt_1"] == 0.5  # 4 / 2 > 1, 1 / 1 is not


def test_am_merge_scores_separate_runs_as_one(tmp_path):
    x = {"x": {"1": [1.0, 1.0, None], "2": [2.0, 1.0, None]}}
    y = {"y": {"1": [0.5, 4.0, None], "2": [1.0, 4.0, None]}}
    (tmp_path / "x.json").write_text(json.dumps(_am_result(x)))
    (tmp_path / "y.json").write_text(json.dumps(_am_result(y)))
    merged = bench_am.merge([str(tmp_path / "x.json"), str(tmp_path / "y.json")])
    together = bench_am.score(["a:0", "a:1", "a:2"], [1.0, 2.0, 0.0], [1, 2], {**x, **y}, {})
    assert merged["sngan"]["methods"] == together
    (tmp_path / "z.json").write_text(json.dumps(_am_result(y, targets=("b:0", "a:1", "a:2"))))
    with pytest.raises(SystemExit, match="other neurons"):
        bench_am.merge([str(tmp_path / "x.json"), str(tmp_path / "z.json")])


def test_scale_table_has_every_method_and_cell_next_to_the_readout(tmp_path):
    out = tmp_path / "scale.json"
    argv = ["--scale", "--dims", "16,40", "--sizes", "4", "--methods", "random,cma,tt:cma=0.5", "--steps", "1"]
    assert bench.main([*argv, "--batch", "32", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["readout"]["ms_per_image"] > 0 and result["readout"]["batch"] == 32
    cells = {(r["method"], r["d"], r["n"]) for r in result["rows"]}
    assert cells == {(m, d, 4) for m in ("random", "cma", "tt:cma=0.5") for d in (16, 40)}
    for r in result["rows"]:
        assert r["batch"] == 32 and r["ms_per_query"] > 0
        assert r["readout_ratio"] == pytest.approx(r["ms_per_query"] / result["readout"]["ms_per_image"])
