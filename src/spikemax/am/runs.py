"""Where the public `fit_grid_prior` and `dataset_stats` used to live (kept importable from here)."""

from spikemax.am.measures import dataset_stats
from spikemax.am.prior import fit_grid_prior

__all__ = ["dataset_stats", "fit_grid_prior"]
