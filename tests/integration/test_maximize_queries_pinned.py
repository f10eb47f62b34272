"""The maximize stage asks exactly the queries it asked before the run-spec redesign (issue #20).

Why the pinned digests are stable on any machine: the trained tiny networks never reach a query.
`LatentGrid.decode` is replaced by an exact encoding of the grid indices into the image, the
responder by integer arithmetic on those indices (plus the group's noise seed, so the seed's
derivation is pinned too), and `LatentGrid.encode` (the VQ-VAE prior's data) by a seeded draw.
What remains is the stage's own logic (plan, keys' fields, budgets, options, prior, warm starts,
seeds, lock-step groups, population composition) and the optimizers' numpy arithmetic on exact
inputs. The digests were recorded with the code before the redesign (commit d3c9c07).
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
        "e0/sngan/class:0/tt/s0": "711c3dd5f2c046e4",
        "e0/sngan/class:0/tt/s1": "f15566e09d26f77c",
        "e0/sngan/lif1:0/auto/s0": "86b2fdf46a69d192",
        "e0/sngan/lif1:0/auto/s1": "505dee21cf448a2b",
        "e0/sngan/lif1:0/random/s0": "7d979c6f56c78df9",
        "e0/sngan/lif1:0/random/s1": "2df54c70a1a2b43b",
        "e0/sngan/lif1:0/tt/s0": "1d8d54f1822f526d",
        "e0/sngan/lif1:0/tt/s1": "94c50187176949c5",
        "e0/sngan/lif1:1/auto/s0": "fac188ed26f5cfe7",
        "e0/sngan/lif1:1/auto/s1": "693c26764b340e75",
        "e0/sngan/lif1:1/random/s0": "2ef2c515488933db",
        "e0/sngan/lif1:1/random/s1": "507017cd41d51e1c",
        "e0/sngan/lif1:1/tt/s0": "442c3a2bd102dbd2",
        "e0/sngan/lif1:1/tt/s1": "eec42ebe99a5b264",
        "e0/vqvae/class:0/auto/s0": "b1c883549e99cef4",
        "e0/vqvae/class:0/auto/s1": "a20168ab4c8fb1ee",
        "e0/vqvae/class:0/random/s0": "a9bcb5f001e99499",
        "e0/vqvae/class:0/random/s1": "6cd86e9cd12244cd",
        "e0/vqvae/class:0/tt/s0": "bf2a3ff6d5d8441f",
        "e0/vqvae/class:0/tt/s1": "6e3ef7d87a480421",
        "e0/vqvae/lif1:0/auto/s0": "76cb747deaa75891",
        "e0/vqvae/lif1:0/auto/s1": "35233210a9a848e2",
        "e0/vqvae/lif1:0/random/s0": "d17024b26402e8b5",
        "e0/vqvae/lif1:0/random/s1": "a7a35207c5df0429",
        "e0/vqvae/lif1:0/tt/s0": "a74da556543b7b6a",
        "e0/vqvae/lif1:0/tt/s1": "56de37ef11fff1f0",
        "e0/vqvae/lif1:1/auto/s0": "28ed911d6faf8d76",
        "e0/vqvae/lif1:1/auto/s1": "20c26a81aeb799b1",
        "e0/vqvae/lif1:1/random/s0": "e4f847999e39d22f",
        "e0/vqvae/lif1:1/random/s1": "2a6fbbd9c8b5314d",
        "e0/vqvae/lif1:1/tt/s0": "28ed911d6faf8d76",
        "e0/vqvae/lif1:1/tt/s1": "20c26a81aeb799b1",
        "e2/sngan/class:0/auto/s0": "ea2b699423079d37",
        "e2/sngan/class:0/auto/s1": "b0e316171a0fd0d5",
        "e2/sngan/class:0/random/s0": "d30c12d2ce849491",
        "e2/sngan/class:0/random/s1": "f4e64630fad98b3e",
        "e2/sngan/class:0/tt/s0": "542e40ed43cd533d",
        "e2/sngan/class:0/tt/s1": "ee3c9b36841dcf35",
        "e2/sngan/lif1:0/auto/s0": "1a814a03eadfabf6",
        "e2/sngan/lif1:0/auto/s1": "1b2b14b7e9941813",
        "e2/sngan/lif1:0/random/s0": "ac04f8cfeebc0d19",
        "e2/sngan/lif1:0/random/s1": "daa0457ec8a557f8",
        "e2/sngan/lif1:0/tt/s0": "4557ed0eee9c7e50",
        "e2/sngan/lif1:0/tt/s1": "ee978fbb9605a8be",
        "e2/sngan/lif1:1/auto/s0": "3f0e7c8cf886a7f7",
        "e2/sngan/lif1:1/auto/s1": "987f94e2d6cfc063",
        "e2/sngan/lif1:1/random/s0": "6da7ad6583761c80",
        "e2/sngan/lif1:1/random/s1": "eb40079ad395360d",
        "e2/sngan/lif1:1/tt/s0": "54078508e91af642",
        "e2/sngan/lif1:1/tt/s1": "316785698a98c422",
        "e2/vqvae/class:0/auto/s0": "4a883d74c38ed387",
        "e2/vqvae/class:0/auto/s1": "ddc40160e1bc3d5c",
        "e2/vqvae/class:0/random/s0": "762360bc21bbd431",
        "e2/vqvae/class:0/random/s1": "489bff8d8c891cad",
        "e2/vqvae/class:0/tt/s0": "db1d1575c1a4ccbf",
        "e2/vqvae/class:0/tt/s1": "e02ee742928d0068",
        "e2/vqvae/lif1:0/auto/s0": "5e30db45f934c60f",
        "e2/vqvae/lif1:0/auto/s1": "8fd0f1f0d04b61fd",
        "e2/vqvae/lif1:0/random/s0": "6e775ed7bc43a4ad",
        "e2/vqvae/lif1:0/random/s1": "7f286e332cdfe7c7",
        "e2/vqvae/lif1:0/tt/s0": "a939fa7355cf9ff0",
        "e2/vqvae/lif1:0/tt/s1": "c98ccbb16ce955b3",
        "e2/vqvae/lif1:1/auto/s0": "1556075cd5721ffc",
        "e2/vqvae/lif1:1/auto/s1": "6c992694592dbfbc",
        "e2/vqvae/lif1:1/random/s0": "2d640b1a06125f13",
        "e2/vqvae/lif1:1/random/s1": "fbbff777a82f8eca",
        "e2/vqvae/lif1:1/tt/s0": "1556075cd5721ffc",
        "e2/vqvae/lif1:1/tt/s1": "6c992694592dbfbc",
    },
    "population": {
        "e2/vqvae/class:0/tt/s0": "bcca06f277b05615",
        "e2/vqvae/lif1:0/tt/s0": "b94438fa648e85ce",
        "e2/vqvae/lif1:1/tt/s0": "b58e6ae1ba773cd3",
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
