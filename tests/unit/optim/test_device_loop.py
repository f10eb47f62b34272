"""benchmarks/bench_device.py: the search loop at paper-scale sizes on the CPU, and on CUDA where one is visible."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spikemax import params as P

REPO = Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("bench_device", REPO / "benchmarks" / "bench_device.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_device"] = bench
spec.loader.exec_module(bench)
PARAMS = REPO / "configs" / "paper-scale.yaml"


def test_loop_on_cpu_times_every_part_and_writes_json(tmp_path):
    out = tmp_path / "device.json"
    assert (
        bench.main(["--params", str(PARAMS), "--devices", "cpu", "--batch", "8", "--steps", "1", "--out", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    rows = {r["generator"]: r for r in result["rows"]}
    assert (rows["sngan"]["d"], rows["sngan"]["n"]) == (128, 64) and (rows["vqvae"]["d"], rows["vqvae"]["n"]) == (
        49,
        512,
    )
    for r in rows.values():
        assert r["image_device"] == "cpu"
        parts = [r[f"{k}_ms_per_query"] for k in ("optimizer", "decode", "readout")]
        assert min(parts) > 0 and r["total_ms_per_query"] == pytest.approx(sum(parts))
    assert result["speedup"] == {}  # no second device asked for


@pytest.mark.gpu
def test_loop_on_cuda_decodes_and_reads_out_on_the_device_with_the_cpus_results():
    params, _ = P.load(PARAMS)
    row = bench.loop_times(params, "vqvae", "cuda", batch=16, steps=1)
    assert row["image_device"] == "cuda"
    meta = {"shape": [1, 28, 28], "mean": [0.5], "std": [0.25]}
    from spikemax.generators import build
    from spikemax.neurons import firing_rates

    for name in ("sngan", "vqvae"):
        torch.manual_seed(0)
        grid = build(name, params, meta).grid()
        idx = grid.random_indices(16, seed=1)
        net = bench.build_net(params, "cpu")
        with torch.no_grad():
            x_cpu = grid.decode(idx)
            r_cpu = firing_rates(net, x_cpu, ["class:0", "lif1:0"])
            x_gpu = grid.to("cuda").decode(idx)
            r_gpu = firing_rates(net.to("cuda"), x_gpu, ["class:0", "lif1:0"])
        assert x_gpu.device.type == "cuda" and torch.allclose(x_gpu.cpu(), x_cpu, atol=1e-4)
        assert np.allclose(r_gpu, r_cpu, atol=1 / net.num_steps)
