"""The data prior of a codebook grid: a TT distribution fitted to the encoder's indices of the
prepared train images, cached on disk by content digest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from spikemax.digest import digest_bytes, file_digest


def fit_grid_prior(grid: Any, prepared: Any, ckpt: Path, rank: int, n_images: int, cache: Path) -> Any:
    """TT prior of the grid's encoder indices of the first `n_images` prepared train images; reused
    from `cache` when the generator checkpoint, the train images and the settings are the same."""
    from spikemax.optim.prior import TTPrior, fit_tt_prior

    x, _ = prepared.tensors("train")
    x = x[:n_images]
    key = digest_bytes(file_digest(ckpt), x.numpy().tobytes(), f"{rank}/{n_images}")
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return TTPrior.from_dict(z)
    idx = grid.encode(x).numpy()
    prior = fit_tt_prior(idx, grid.n, rank=rank, seed=0)
    np.savez(cache, key=np.array(key), **prior.to_dict())
    return prior


class Priors:
    """The priors of one stage invocation, fitted once per (generator, rank)."""

    def __init__(self, am_dir: Path, prepared: Any, gen_ckpts: dict[str, Path], base_rank: int, n_images: int) -> None:
        self.am_dir = am_dir
        self.prepared = prepared
        self.gen_ckpts = gen_ckpts
        self.base_rank = base_rank
        self.n_images = n_images
        self._fitted: dict[tuple[str, int], Any] = {}

    def get(self, generator: str, grid: Any, rank: int | None) -> Any:
        """The prior of `generator`'s grid at `rank` (None: no prior)."""
        if rank is None:
            return None
        if (generator, rank) not in self._fitted:
            name = f"prior_{generator}.npz" if rank == self.base_rank else f"prior_{generator}_r{rank}.npz"
            self._fitted[generator, rank] = fit_grid_prior(
                grid, self.prepared, self.gen_ckpts[generator], rank, self.n_images, self.am_dir / name
            )
        return self._fitted[generator, rank]
