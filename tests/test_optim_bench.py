"""The benchmark's planted maxima are real maxima (else its normalized scores would lie)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location(
    "bench_optimizers", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_optimizers.py"
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
