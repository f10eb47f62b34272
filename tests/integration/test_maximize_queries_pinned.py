"""The maximize stage asks exactly the queries it asked before the run-spec redesign (issue #20).

Why the pinned digests are stable on any machine: the trained tiny networks never reach a query.
`LatentGrid.decode` is replaced by an exact encoding of the grid indices into the image, the
responder by integer arithmetic on those indices (plus the group's noise seed, so the seed's
derivation is pinned too), and `LatentGrid.encode` (the VQ-VAE prior's data) by a seeded draw.
What remains is the stage's own logic (plan, keys' fields, budgets, options, prior, warm starts,
seeds, lock-step groups, population composition) and the optimizers' numpy arithmetic on exact
inputs. The digests were recorded with the code before the redesign (commit d3c9c07) and the redesign
asked exactly those. Since then one deliberate change re-pinned some: issue #24's vectorized TT
samples the same distribution from a different random stream (TT runs and the VQ-VAE prior's random
runs); every CMA-ES and uniform random run still asks the queries of d3c9c07. Issue #21's silent
channels re-pinned the population config: its SILENT target now proposes a quarter of a responsive
neuron's share (`Population(silent=0.25)`), so every batch is composed differently, and its TT
runs climb from their single best point (`elite` 1 in population mode).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spikemax import neurons
from spikemax import params as params_mod
from spikemax.generators import LatentGrid
from spikemax.querylog import read_queries
from tests.support.project import write_params

pytestmark = pytest.mark.usefixtures("own_store")

SILENT = "lif1:1"  # a target that never fires: its next checkpoint's TT runs start cold

CONFIGS = {
    "groups": {
        "checkpoints": [0, -1],
        "generators": ["sngan", "vqvae"],
        "targets": ["class:0", "lif1:0", SILENT],
        "units_per_layer": 0,
        "methods": ["tt", "random", "auto"],
        "seeds": [0, 1],
        "budget": 32,
        "budget_last": 48,
        "batch": 16,
    },
    "population": {
        "checkpoints": [-1],
        "generators": ["vqvae"],
        "targets": ["class:0", "lif1:0", SILENT],
        "units_per_layer": 0,
        "methods": ["tt"],
        "seeds": [0],
        "budget": 48,
        "batch": 16,
        "population": True,
    },
}


def _decode(self: LatentGrid, indices: torch.Tensor) -> torch.Tensor:
    """Images that carry their grid indices exactly (first d pixels)."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    out = torch.zeros((len(idx), *self.shape))
    out.view(len(idx), -1)[:, : idx.shape[1]] = idx.to(torch.float32)
    return out


def _encode(self: LatentGrid, images: torch.Tensor) -> torch.Tensor:
    """Seeded codes standing in for the encoder's (the prior's data)."""
    rng = np.random.default_rng(len(images))
    return torch.as_tensor(rng.integers(0, self.n, size=(len(images), self.d)))


def _make_responder(net, targets, *args, seed: int = 0, **kwargs):
    """Integer responses of the indices in each image: exact on every machine."""
    names = [targets] if isinstance(targets, str) else list(targets)

    def respond(images: torch.Tensor) -> np.ndarray:
        flat = images.reshape(len(images), -1).numpy()
        cols = []
        for j, name in enumerate(names):
            d = 16  # enough pixels for both tiny grids' d (the rest are zeros)
            idx = np.rint(flat[:, :d]).astype(np.int64)
            w = (np.arange(1, d + 1, dtype=np.int64) * (3 * j + 5) + seed % 17) % 23
            y = ((idx * w).sum(axis=1) % 101).astype(np.float64) / 10.0
            cols.append(np.zeros(len(images)) if name == SILENT else y)
        out = np.stack(cols, axis=1)
        return out[:, 0] if isinstance(targets, str) else out

    return respond


@pytest.fixture
def exact(monkeypatch):
    """Replace decode, encode and the responder wherever the stage may have bound them."""
    monkeypatch.setattr(LatentGrid, "decode", _decode)
    monkeypatch.setattr(LatentGrid, "encode", _encode)
    real = neurons.make_responder
    for name, module in list(sys.modules.items()):
        if name.startswith("spikemax") and getattr(module, "make_responder", None) is real:
            monkeypatch.setattr(module, "make_responder", _make_responder)


def _digests(root: Path) -> dict[str, str]:
    """(epoch, generator, target, method, seed) -> sha256 of the run's query table and warm-start flag."""
    am = root / "results" / "am"
    df = pd.read_csv(am / "summary.csv")
    out = {}
    for _, row in df.iterrows():
        q = read_queries(am / row["run_dir"])
        h = hashlib.sha256()
        h.update(np.stack(q["indices"].to_numpy()).astype(np.int64).tobytes())
        h.update(q["response"].to_numpy(np.float64).tobytes())
        h.update(q["batch"].to_numpy(np.int64).tobytes())
        name = f"e{row['epoch']}/{row['generator']}/{row['target']}/{row['method']}/s{row['seed']}"
        out[name] = h.hexdigest()[:16]
    return out


PINNED: dict[str, dict[str, str]] = {
    "groups": {
        "e0/sngan/class:0/auto/s0": "20d0724c014f7704",
        "e0/sngan/class:0/auto/s1": "5c0b476478f4ba9e",
        "e0/sngan/class:0/random/s0": "c9c07534142e914e",
        "e0/sngan/class:0/random/s1": "ff1b0ccca387b6e2",
        "e0/sngan/class:0/tt/s0": "4e0dd6b1ec0366bb",
        "e0/sngan/class:0/tt/s1": "f23c3a20fb496727",
        "e0/sngan/lif1:0/auto/s0": "86b2fdf46a69d192",
        "e0/sngan/lif1:0/auto/s1": "505dee21cf448a2b",
        "e0/sngan/lif1:0/random/s0": "7d979c6f56c78df9",
        "e0/sngan/lif1:0/random/s1": "2df54c70a1a2b43b",
        "e0/sngan/lif1:0/tt/s0": "2e474dab31a8de13",
        "e0/sngan/lif1:0/tt/s1": "dff6d1c2c873d090",
        "e0/sngan/lif1:1/auto/s0": "fac188ed26f5cfe7",
        "e0/sngan/lif1:1/auto/s1": "693c26764b340e75",
        "e0/sngan/lif1:1/random/s0": "2ef2c515488933db",
        "e0/sngan/lif1:1/random/s1": "507017cd41d51e1c",
        "e0/sngan/lif1:1/tt/s0": "83cd24e518d67c1c",
        "e0/sngan/lif1:1/tt/s1": "71059eff391a4f0a",
        "e0/vqvae/class:0/auto/s0": "af02703209937e00",
        "e0/vqvae/class:0/auto/s1": "20dca7f0176340f8",
        "e0/vqvae/class:0/random/s0": "b32c2f06ab720065",
        "e0/vqvae/class:0/random/s1": "f768eb955eb16563",
        "e0/vqvae/class:0/tt/s0": "34a6edc4bf7fafb4",
        "e0/vqvae/class:0/tt/s1": "cdd1201cdcd42da8",
        "e0/vqvae/lif1:0/auto/s0": "f4c2e19e728e5447",
        "e0/vqvae/lif1:0/auto/s1": "01f4a538ccd9edd7",
        "e0/vqvae/lif1:0/random/s0": "cabac865433ef1ab",
        "e0/vqvae/lif1:0/random/s1": "764ef4839895aa8e",
        "e0/vqvae/lif1:0/tt/s0": "330065a2bf02d97e",
        "e0/vqvae/lif1:0/tt/s1": "f83fa7924b72983a",
        "e0/vqvae/lif1:1/auto/s0": "8c3db8cd09decf79",
        "e0/vqvae/lif1:1/auto/s1": "0154f2c207897b10",
        "e0/vqvae/lif1:1/random/s0": "2fbd6a778bf0eae2",
        "e0/vqvae/lif1:1/random/s1": "fc4cfc651b968db9",
        "e0/vqvae/lif1:1/tt/s0": "8c3db8cd09decf79",
        "e0/vqvae/lif1:1/tt/s1": "0154f2c207897b10",
        "e2/sngan/class:0/auto/s0": "ea2b699423079d37",
        "e2/sngan/class:0/auto/s1": "b0e316171a0fd0d5",
        "e2/sngan/class:0/random/s0": "d30c12d2ce849491",
        "e2/sngan/class:0/random/s1": "f4e64630fad98b3e",
        "e2/sngan/class:0/tt/s0": "8c5abe1e71e3fd5f",
        "e2/sngan/class:0/tt/s1": "b3da24e715874bd5",
        "e2/sngan/lif1:0/auto/s0": "1a814a03eadfabf6",
        "e2/sngan/lif1:0/auto/s1": "1b2b14b7e9941813",
        "e2/sngan/lif1:0/random/s0": "ac04f8cfeebc0d19",
        "e2/sngan/lif1:0/random/s1": "daa0457ec8a557f8",
        "e2/sngan/lif1:0/tt/s0": "437324dc6e2fa3c5",
        "e2/sngan/lif1:0/tt/s1": "65da18ea6ab32419",
        "e2/sngan/lif1:1/auto/s0": "3f0e7c8cf886a7f7",
        "e2/sngan/lif1:1/auto/s1": "987f94e2d6cfc063",
        "e2/sngan/lif1:1/random/s0": "6da7ad6583761c80",
        "e2/sngan/lif1:1/random/s1": "eb40079ad395360d",
        "e2/sngan/lif1:1/tt/s0": "17a857d968d06ecf",
        "e2/sngan/lif1:1/tt/s1": "2fcd2140052db662",
        "e2/vqvae/class:0/auto/s0": "c446671ea59b350e",
        "e2/vqvae/class:0/auto/s1": "f4de22c5ba1ee036",
        "e2/vqvae/class:0/random/s0": "7b34a1e51734c076",
        "e2/vqvae/class:0/random/s1": "4847fcaaf71975fb",
        "e2/vqvae/class:0/tt/s0": "ecb6cb510411dbba",
        "e2/vqvae/class:0/tt/s1": "1ab7ff7185799699",
        "e2/vqvae/lif1:0/auto/s0": "d9ba6e88309d6eff",
        "e2/vqvae/lif1:0/auto/s1": "7eb2f219f324929e",
        "e2/vqvae/lif1:0/random/s0": "431a302e1848f2db",
        "e2/vqvae/lif1:0/random/s1": "aed8d01bf8aaa960",
        "e2/vqvae/lif1:0/tt/s0": "7419129d797631f6",
        "e2/vqvae/lif1:0/tt/s1": "5ab36d114181e1fb",
        "e2/vqvae/lif1:1/auto/s0": "b9316294124ab3cf",
        "e2/vqvae/lif1:1/auto/s1": "41c8b31e3b410ba1",
        "e2/vqvae/lif1:1/random/s0": "528bbd72ce4a5653",
        "e2/vqvae/lif1:1/random/s1": "0a977db5c37a33ae",
        "e2/vqvae/lif1:1/tt/s0": "b9316294124ab3cf",
        "e2/vqvae/lif1:1/tt/s1": "41c8b31e3b410ba1",
    },
    "population": {
        "e2/vqvae/class:0/tt/s0": "b1a001acd5763e30",
        "e2/vqvae/lif1:0/tt/s0": "e5c890c8a927be8a",
        "e2/vqvae/lif1:1/tt/s0": "289e45de41dc4759",
    },
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_the_stage_asks_the_pinned_queries(tmp_path, project, snn_checkpoints, generator_checkpoints, exact, config):
    from spikemax.stages.maximize import run as run_stage

    params, paths = project
    root = tmp_path / "p"
    (root / "data").mkdir(parents=True)
    (root / "data" / "prepared").symlink_to(paths.prepared)
    (root / "models").symlink_to(paths.root / "models")
    path = write_params(root, {"prepare": params.prepare.model_dump(), "maximize": CONFIGS[config]})
    run_stage(*params_mod.load(path, root=root))
    got = _digests(root)
    assert got == PINNED[config]
