"""configs/paper-scale.yaml: it validates, and builds generators and optimizers of the paper's sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spikemax import params as P
from spikemax.optim import make_optimizer, options_for

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
PAPER_SCALE = CONFIGS / "paper-scale.yaml"
FASHION_META = {"shape": [1, 28, 28], "mean": [0.286], "std": [0.353]}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    params, _ = P.load(path)
    assert params.maximize.budget >= 1


def test_paper_scale_states_the_papers_budget_on_fashion_mnist():
    params, _ = P.load(PAPER_SCALE)
    assert params.prepare.dataset == "fashion-mnist"
    assert (params.prepare.train_size, params.prepare.test_size) == (60_000, 10_000)
    m = params.maximize
    assert m.budget_last == 10_000 and len(m.seeds) == 3 and m.checkpoints == "all"
    assert (params.generators.sngan.latent_dim, params.generators.sngan.grid_n) == (128, 64)
    assert params.generators.vqvae.codes == 512


@pytest.mark.parametrize(("name", "d", "n"), [("sngan", 128, 64), ("vqvae", 49, 512)])
def test_paper_scale_builds_grids_and_optimizers_of_the_stated_sizes(name, d, n):
    from spikemax.generators import build

    params, _ = P.load(PAPER_SCALE)
    grid = build(name, params, FASHION_META).grid()
    assert (grid.d, grid.n) == (d, n)
    idx = grid.random_indices(3, seed=0)
    assert tuple(idx.shape) == (3, d) and int(idx.max()) < n
    assert tuple(grid.decode(idx).shape) == (3, 1, 28, 28)
    for method in params.maximize.methods:
        opt = make_optimizer(method, grid.d, grid.n, seed=0, **options_for(method, params, grid))
        for _ in range(2):
            I = opt.ask(params.maximize.batch)
            assert I.shape == (params.maximize.batch, d) and I.min() >= 0 and I.max() < n
            opt.tell(I, np.random.default_rng(0).random(len(I)))
        assert opt.n_told == 2 * params.maximize.batch
