"""The `device` param: auto resolves to CUDA only where it exists; the readout follows the net's device."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from spikemax import SpikemaxError, devices
from spikemax import params as P
from spikemax.neurons import firing_rates
from spikemax.snn import load_snn


def test_auto_is_cuda_exactly_when_available():
    assert devices.resolve("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert devices.resolve("cpu") == "cpu" and devices.lightning("cpu") == ("cpu", 1)
    assert P.validate({}).device == "auto"
    with pytest.raises(P.ParamsError, match="device"):
        P.validate({"device": "tpu"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_without_a_device_is_a_one_line_error():
    with pytest.raises(SpikemaxError, match="no CUDA device"):
        devices.resolve("cuda:0")


@pytest.mark.gpu
def test_readout_on_cuda_equals_cpu(snn_checkpoints, prepared):
    net = load_snn(snn_checkpoints[max(snn_checkpoints)])
    x, _ = prepared.tensors("test")
    targets = ["class:0", "lif1:0"]
    cpu = firing_rates(net, x[:64], targets)
    gpu = firing_rates(net.to("cuda"), x[:64].to("cuda"), targets)
    assert gpu.dtype == np.float64 and np.allclose(gpu, cpu, atol=1 / net.num_steps)
    assert net.class_probs(x[:8]).device.type == "cuda"


@pytest.mark.parametrize("name", ["sngan", "vqvae"])
def test_grid_to_device_keeps_decode_and_moves_everything_it_reads(generator_checkpoints, name):
    from spikemax.generators import load_generator

    grid = load_generator(name, generator_checkpoints[name])
    idx = grid.random_indices(6, seed=1)
    before = grid.decode(idx)
    assert grid.to("cpu") is grid and grid.device.type == "cpu"
    assert torch.equal(grid.decode(idx), before)
    assert grid.decode(idx[:0]).shape == (0, *grid.shape)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sngan", "vqvae"])
def test_decode_on_cuda_equals_cpu(generator_checkpoints, name):
    from spikemax.generators import load_generator

    grid = load_generator(name, generator_checkpoints[name])
    idx = grid.random_indices(6, seed=1)
    cpu = grid.decode(idx)
    gpu = grid.to("cuda").decode(idx)  # CPU indices in, images on the device out
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-4)


_FAULTS = """
import resource, torch
from spikemax.devices import keep_freed_memory
applied = keep_freed_memory()
def batch():  # tensors under glibc's 32 MiB bound, written and freed, as a forward pass does per batch
    a, b, c = torch.ones(6 * 2**20), torch.ones(6 * 2**20), torch.ones(3 * 2**20)
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    batch()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_freed_memory_is_reused_without_page_faults():
    def faults(keep: str) -> tuple[str, int]:
        env = {**os.environ, "SPIKEMAX_KEEP_FREED": keep}
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
        applied, count = out.stdout.split()
        return applied, int(count)

    on, off = faults("1"), faults("0")
    if on[0] != "True":
        pytest.skip("no glibc mallopt here (not glibc)")
    assert off[0] == "False"  # the switch for A/B measurements
    # 20 x 60 MiB = 307,200 pages written; kept blocks are reused, so few are faulted in afresh
    # (by default glibc hands them back at its own varying pace: 27,000-300,000 faults here)
    assert on[1] < 307_200 / 4
