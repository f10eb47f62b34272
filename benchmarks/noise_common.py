"""Shared parts of bench_noise.py and bench_population.py: real neurons, cached clean rates, noise.

The clean (noise-free) rate of a grid point is deterministic, so every point is decoded and run
through the SNN once and cached for all neurons of the panel; noisy draws are made from the cached
rates with `spikemax.neurons.noisy_rates` (the responders' own noise models), one seeded generator
per run. A run's score at budget B is the clean rate of the point it reports as best after B
presentations over the best clean rate any run presented for that neuron.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch


def setup(params_path: str, generator: str, root: str | None = None) -> tuple[Any, Any, Any, int]:
    """(params, net, grid, epoch) of the last SNN checkpoint and one generator of a repro'd project.

    `root` is the project whose outputs (models/, data/prepared) are read; default the working directory.
    """
    from spikemax import params as P
    from spikemax import snn
    from spikemax.generators import checkpoint_path, load_generator

    params, paths = P.load(params_path, root)
    ckpts = snn.checkpoints(paths)
    if not ckpts:
        sys.exit(f"no SNN checkpoints under {paths.snn_dir}: run `dvc repro` first")
    epoch = max(ckpts)
    net = snn.load_snn(ckpts[epoch]).eval()
    grid = load_generator(generator, checkpoint_path(generator, paths))
    return params, net, grid, epoch


def prepared_data(params_path: str, root: str | None = None) -> Any:
    """The project's prepared data set (train/test tensors)."""
    from spikemax import params as P
    from spikemax.data import Prepared

    _, paths = P.load(params_path, root)
    return Prepared.load(paths.prepared)


def grid_prior(params: Any, grid: Any, prepared: Any, cache: str | None = None) -> Any:
    """The maximize stage's TT data prior of a codebook grid (None on an ordered grid or `prior: false`):
    fitted to the encoder's indices of `prior_images` train images, cached in `cache` (an .npz)."""
    from pathlib import Path

    from spikemax.optim.prior import TTPrior, fit_tt_prior

    m = params.maximize
    if grid.ordered or not m.prior:
        return None
    if cache and Path(cache).is_file():
        with np.load(cache) as z:
            return TTPrior.from_dict(z)
    x, _ = prepared.tensors("train")
    with torch.no_grad():
        idx = grid.encode(x[: m.prior_images]).numpy()
    prior = fit_tt_prior(idx, grid.n, rank=m.tt.rank, seed=0)
    if cache:
        np.savez(cache, **prior.to_dict())
    return prior


def reference_points(grid: Any, prepared: Any, count: int, seed: int = 0) -> np.ndarray:
    """The fixed reference set (`spikemax.neurons.reference_points`) from the prepared test images."""
    from spikemax.neurons import reference_points as points

    x, _ = prepared.tensors("test")
    return points(grid, x, count, seed)


def spread_neurons(net: Any, k: int, seed: int, layers: list[str] | None = None) -> list[str]:
    """k target strings spread round-robin over the (named) spiking layers, reproducible."""
    rng = np.random.default_rng(seed)
    all_layers = net.spiking_layers()
    names = layers or list(all_layers)
    per = {name: list(rng.permutation(all_layers[name])) for name in names}
    out: list[str] = []
    while len(out) < k and any(per.values()):
        for name in names:
            if per[name] and len(out) < k:
                u = int(per[name].pop(0))
                out.append(f"class:{u}" if name == "out" else f"{name}:{u}")
    return out


class CleanRates:
    """Noise-free rates of the panel's neurons at grid points, each point computed once."""

    def __init__(self, net: Any, grid: Any, targets: list[str], chunk: int = 512) -> None:
        from spikemax.neurons import parse_target

        self.net, self.grid, self.chunk = net, grid, chunk
        self.targets = [parse_target(t, net.spiking_layers()) for t in targets]
        self.layers = list(dict.fromkeys(t.layer for t in self.targets))
        self._cache: dict[bytes, np.ndarray] = {}
        self.forwards = 0

    def __call__(self, I: np.ndarray) -> np.ndarray:
        """Clean rates (k, m) of the m panel neurons at points I (k, d)."""
        from spikemax.neurons import layer_rates

        I = np.ascontiguousarray(I, dtype=np.int64)
        keys = [r.tobytes() for r in I]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        for s in range(0, len(todo), self.chunk):
            part = todo[s : s + self.chunk]
            P = np.stack([np.frombuffer(k, dtype=np.int64) for k in part])
            with torch.no_grad():
                imgs = self.grid.decode(torch.as_tensor(P, dtype=torch.long))
            rates = layer_rates(self.net, imgs, self.layers)
            Y = np.stack([rates[t.layer][:, t.unit] for t in self.targets], axis=1).astype(np.float64)
            self.forwards += len(part)
            for k, y in zip(part, Y):
                self._cache[k] = y
        return np.stack([self._cache[k] for k in keys])

    def best_seen(self) -> np.ndarray:
        """Per neuron, the highest clean rate of any point computed so far (m,)."""
        return np.max(np.stack(list(self._cache.values())), axis=0)


def draw(rates: np.ndarray, spec: dict, steps: int, rng: np.random.Generator) -> np.ndarray:
    """Noisy responses to clean rates under a noise spec (the responders' models)."""
    try:
        from spikemax.neurons import noisy_rates
    except ImportError:  # before the responders gained noise models: the same formulas here
        noisy_rates = None
    if noisy_rates is not None:
        return noisy_rates(rates, rng=rng, steps=steps, **spec)
    model = spec.get("model", "none")
    if model == "poisson":
        window = float(spec.get("window") or steps)
        return rng.poisson(rates * window) / window
    if model == "multiplicative":
        return rates * np.maximum(0.0, 1.0 + float(spec["sigma"]) * rng.standard_normal(rates.shape))
    return rates


NOISE_MODELS = {
    "clean": {"model": "none"},
    "poisson": {"model": "poisson"},  # window = the SNN's T steps
    "mult0.5": {"model": "multiplicative", "sigma": 0.5},
}
"""Noise specs; a name with the suffix `+drift` (e.g. poisson+drift) adds the drifting gain `DRIFT`."""

DRIFT = {"trend": -0.3, "walk": 0.05, "per": 100}
"""The issue's drift: gain -30 % linearly over the run's budget, random walk 5 % per 100 presentations."""


def noise_spec(name: str) -> tuple[dict, bool]:
    """(noise model spec, drifting?) of a noise name such as `poisson` or `poisson+drift`."""
    base, _, extra = name.partition("+")
    if base not in NOISE_MODELS or extra not in ("", "drift"):
        raise SystemExit(f"unknown noise {name!r}: one of {', '.join(NOISE_MODELS)}, optionally +drift")
    return NOISE_MODELS[base], extra == "drift"


def summarize(scores: dict, ok: np.ndarray) -> dict:
    """Median and mean over the neurons that fire (ok) of per-neuron score arrays."""
    out = {}
    for key, s in scores.items():
        v = np.asarray(s)[ok]
        out[key] = {"median": round(float(np.median(v)), 4), "mean": round(float(np.mean(v)), 4)} if v.size else None
    return out
