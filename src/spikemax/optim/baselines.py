"""Baseline grid maximizers with the same ask/tell API: random, CMA-ES, NGOpt, reference PROTES."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .base import Optimizer


class RandomSearch(Optimizer):
    """Uniform random points on the grid."""

    method = "random"

    def __init__(self, d: int, n: int | Sequence[int], seed: int = 0, batch: int = 100) -> None:
        super().__init__(d, n, seed, batch)
        self.rng = np.random.default_rng(self.seed)

    def _ask(self, k: int) -> np.ndarray:
        return self.rng.integers(0, self.n[None, :], size=(k, self.d))
