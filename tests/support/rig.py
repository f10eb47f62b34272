"""Shared pieces of the rig tests: a temp project with tiny generators, a deterministic 'neuron'."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from spikemax import params as P

REPO = Path(__file__).resolve().parents[2]


def make_project(root: Path, checkpoints: dict[str, Path]) -> tuple[P.Params, P.Paths]:
    """A project dir with the repo's default params.yaml and the tiny test generators."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    gen = root / "models" / "generators"
    gen.mkdir(parents=True, exist_ok=True)
    for name, path in checkpoints.items():
        shutil.copy(path, gen / f"{name}.ckpt")
    return P.load(root / "params.yaml", root=root)


def neuron(indices: np.ndarray, channels: int = 1) -> np.ndarray:
    """A deterministic m-channel 'neuron' of grid points (k, d) -> (k, m): a peak per channel, some failures."""
    idx = np.asarray(indices, dtype=np.float64)
    peaks = (np.arange(channels)[:, None] * 3 + np.arange(idx.shape[1])[None, :]) % 7
    y = -((idx[:, None, :] - peaks[None]) ** 2).mean(axis=2)
    y[(idx.sum(axis=1) % 11) == 0, 0] = np.nan  # a failed presentation now and then
    return y


def as_results(ids: list[str], y: np.ndarray) -> list[dict]:
    """Tell results for ids and responses (k, m) (NaN -> null: a failed channel)."""
    return [{"id": i, "responses": [None if np.isnan(v) else float(v) for v in row]} for i, row in zip(ids, y)]
