"""Neuron targets and responders: parse `class:K` / `LAYER:UNIT`, read firing rates, add noise.

Activation of a unit = its firing rate: the fraction of the T time steps on which it spiked,
averaged over spatial positions for a conv channel (``lif1:3``), of the single neuron for a dense
unit (``fc_lif1:17``) or a class neuron (``class:3`` == ``out:3``). Every readout runs the fast
multi-step path from a zero membrane state, so no state leaks between calls and a batch's
responses do not depend on its order or on earlier calls.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spikemax import SpikemaxError

OUTPUT_LAYER = "out"
READ_BATCH = 256  # images per forward pass: bounds memory (T x B spike maps) at any k
_TARGET_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*([+-]?\d+)\s*$")


class TargetError(SpikemaxError):
    """A target string names no unit of the network."""


@dataclass(frozen=True)
class Target:
    """One unit of one spiking layer (``class:K`` is unit K of layer ``out``)."""

    layer: str
    unit: int

    @property
    def name(self) -> str:
        """Canonical target string: `class:K` for the output layer, else `LAYER:UNIT`."""
        return f"class:{self.unit}" if self.layer == OUTPUT_LAYER else f"{self.layer}:{self.unit}"

    def __str__(self) -> str:
        return self.name


def syntax(layers: dict[str, int]) -> str:
    """The valid target strings for these layers, e.g. `class:0..9, lif1:0..11, ...`."""
    parts = []
    for name, units in layers.items():
        parts.append(f"{'class' if name == OUTPUT_LAYER else name}:0..{units - 1}")
    return ", ".join(parts)


def parse_target(s: str | Target, layers: dict[str, int]) -> Target:
    """Parse `class:K` or `LAYER:UNIT` against the network's spiking layers (name -> unit count)."""
    if isinstance(s, Target):
        s = str(s)
    m = _TARGET_RE.match(str(s))
    if m is None:
        raise TargetError(f"bad target {s!r}: expected class:K or LAYER:UNIT; valid: {syntax(layers)}")
    name, unit = m.group(1), int(m.group(2))
    layer = OUTPUT_LAYER if name == "class" else name
    if layer not in layers:
        raise TargetError(f"bad target {s!r}: unknown layer {name!r}; valid: {syntax(layers)}")
    if not 0 <= unit < layers[layer]:
        raise TargetError(
            f"bad target {s!r}: unit {unit} out of range 0..{layers[layer] - 1} for "
            f"{'class' if layer == OUTPUT_LAYER else layer}; valid: {syntax(layers)}"
        )
    return Target(layer, unit)


def _targets(net, targets) -> tuple[list[Target], bool]:
    """Normalize one target or a sequence of them; also whether a single one was given."""
    layers = net.spiking_layers()
    single = isinstance(targets, (str, Target))
    items = [targets] if single else list(targets)
    if not items:
        raise TargetError(f"no targets given; valid: {syntax(layers)}")
    return [parse_target(t, layers) for t in items], single


def _rates(spikes: Tensor) -> Tensor:
    """Per-unit firing rate (B, units) from spikes (T, B, units[, H, W]): mean over time and space."""
    r = spikes.mean(0)
    return r.flatten(2).mean(2) if r.dim() > 2 else r


@torch.no_grad()
def layer_rates(
    net, images: Tensor, layers: Sequence[str] | None = None, batch_size: int = READ_BATCH
) -> dict[str, np.ndarray]:
    """Firing rates of all units of every (or the named) spiking layer: name -> (k, units)."""
    names = list(net.spiking_layers()) if layers is None else list(layers)
    order = list(net.spiking_layers())
    upto = max((order.index(n) for n in names), default=len(order) - 1)
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    device = next(net.parameters()).device  # images go to the net (decoded on it: no copy)
    images = torch.as_tensor(images, dtype=torch.float32)
    for i in range(0, len(images), batch_size):
        spikes = net.forward_spikes(images[i : i + batch_size].to(device), upto=order[upto])
        for n in names:
            chunks[n].append(_rates(spikes[n]).cpu().numpy())
    return {
        n: np.concatenate(c) if c else np.zeros((0, net.spiking_layers()[n]), dtype=np.float32)
        for n, c in chunks.items()
    }


def firing_rates(net, images: Tensor, targets) -> np.ndarray:
    """Rates of one target (k,) or of m targets (k, m), from one forward pass per batch of images."""
    parsed, single = _targets(net, targets)
    needed = list(dict.fromkeys(t.layer for t in parsed))
    rates = layer_rates(net, images, needed)
    out = np.stack([rates[t.layer][:, t.unit] for t in parsed], axis=1).astype(np.float64)
    return out[:, 0] if single else out


def make_responder(
    net,
    targets,
    noise: float = 0.0,
    seed: int = 0,
    poisson: bool = False,
    *,
    model: str | None = None,
    sigma: float = 0.0,
    window: float | None = None,
    repeats: int = 1,
    drift: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Callable[[Tensor], np.ndarray]:
    """A responder: images (k, C, H, W) -> firing rates (k,) or (k, m), optionally noisy.

    ``model`` (see `noisy_rates`): "none", "poisson" (spike counts over ``window`` steps, default
    the SNN's T, reported as rates) or "multiplicative" (``r * max(0, 1 + sigma N(0, 1))``, Wang &
    Ponce 2022, sigma 0.2-0.5); each response is the mean of ``repeats`` draws. The older form
    still works: ``noise > 0`` = multiplicative with sigma ``noise``, ``poisson=True`` = Poisson.
    Draws come from one generator seeded with ``seed``, so a rerun with the same queries gives the
    same responses. ``drift`` (e.g. `spikemax.optim.drift.DriftingGain`) maps presentation counts
    (0, 1, ... over the responder's life) to a gain multiplying the clean rates before the noise:
    a neuron whose responsiveness changes over the session. A caller that serves several sessions
    at once (lock-step runs) passes each image's own count: ``respond(images, times=...)``.
    """
    if noise < 0:
        raise SpikemaxError(f"noise={noise}: must be >= 0")
    if model is None:
        model = "poisson" if poisson else ("multiplicative" if noise > 0 else "none")
        sigma = noise if model == "multiplicative" else sigma
    check_noise(model, sigma, window, repeats)
    parsed, single = _targets(net, targets)
    rng = np.random.default_rng(seed)
    steps = int(getattr(net, "num_steps", 1))
    # The older form allowed Poisson counts with multiplicative noise on top.
    extra = noise if (poisson and noise > 0) else 0.0
    shown = [0]  # presentations so far (the drift's clock)

    def respond(images: Tensor, times: np.ndarray | None = None) -> np.ndarray:
        r = firing_rates(net, images, parsed)
        if drift is not None:
            t = shown[0] + np.arange(r.shape[0]) if times is None else np.asarray(times, dtype=np.int64)
            r = r * np.asarray(drift(t), dtype=np.float64)[:, None]
        shown[0] += r.shape[0]
        r = noisy_rates(r, model, sigma, window, repeats, steps, rng)
        if extra > 0:
            r = r * np.maximum(0.0, 1.0 + extra * rng.standard_normal(r.shape))
        return r[:, 0] if single else r

    respond.targets = parsed  # type: ignore[attr-defined]
    respond.clocked = True  # type: ignore[attr-defined]  # takes `times` (run_am_group passes each run's own)
    return respond


def reference_points(grid: Any, test_images: Tensor, count: int, seed: int = 0) -> np.ndarray:
    """A fixed set of `count` reference stimuli as grid points (int (count, d)), for drift correction:
    test images through the generator's encoder on a codebook grid (natural images, as rig tools
    interleave), seeded random grid points (fixed latents) on an ordered grid."""
    d, n = int(grid.d), np.broadcast_to(np.asarray(grid.n), (int(grid.d),))
    if not grid.ordered and hasattr(grid, "encode"):
        pick = np.random.default_rng(seed).choice(len(test_images), size=min(count, len(test_images)), replace=False)
        with torch.no_grad():
            return grid.encode(test_images[torch.as_tensor(pick)]).numpy().astype(np.int64).reshape(-1, d)
    return np.random.default_rng([seed, 5]).integers(0, n[None, :], size=(count, d))


NOISE_MODELS = ("none", "poisson", "multiplicative")
"""Response noise of a responder: none (the deterministic net), poisson (spike counts over a window),
multiplicative (r * max(0, 1 + sigma N(0, 1)), Wang & Ponce 2022, sigma 0.2-0.5)."""


def check_noise(model: str, sigma: float = 0.0, window: float | None = None, repeats: int = 1) -> None:
    """Raise SpikemaxError (one line) for an unknown model, sigma < 0, window <= 0 or repeats < 1."""
    if model not in NOISE_MODELS:
        raise SpikemaxError(f"noise model must be one of {', '.join(NOISE_MODELS)}; got {model!r}")
    if not sigma >= 0:
        raise SpikemaxError(f"noise sigma must be >= 0, got {sigma}")
    if window is not None and not window > 0:
        raise SpikemaxError(f"noise window must be > 0 time steps, got {window}")
    if isinstance(repeats, bool) or int(repeats) != repeats or repeats < 1:
        raise SpikemaxError(f"noise repeats must be an integer >= 1, got {repeats}")


def noisy_rates(
    rates: np.ndarray,
    model: str = "none",
    sigma: float = 0.0,
    window: float | None = None,
    repeats: int = 1,
    steps: int = 1,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Noisy responses to clean firing rates: the mean of `repeats` draws of the noise `model`.

    poisson: a spike count ~ Poisson(rate x window) reported as a rate (count / window); `window`
    in time steps, None = `steps` (the SNN's T). multiplicative: rate x max(0, 1 + sigma N(0, 1)).
    """
    check_noise(model, sigma, window, repeats)
    rates = np.asarray(rates, dtype=np.float64)
    if model == "none":
        return rates.copy()
    rng = rng if rng is not None else np.random.default_rng()
    w = float(window) if window else float(steps)
    total = np.zeros_like(rates)
    for _ in range(int(repeats)):
        if model == "poisson":
            total += rng.poisson(np.maximum(rates, 0.0) * w) / w
        else:
            total += rates * np.maximum(0.0, 1.0 + sigma * rng.standard_normal(rates.shape))
    return total / int(repeats)


def describe(checkpoint_path: str | Path) -> str:
    """Human-readable listing of a checkpoint's spiking layers, unit counts and target syntax."""
    from spikemax.snn import load_snn

    net = load_snn(checkpoint_path)
    layers = net.spiking_layers()
    hp: Any = net.hparams
    lines = [
        f"{checkpoint_path}: ConvSNN, T={net.num_steps} steps, input {list(hp.in_shape)}, "
        f"beta={hp.beta}, threshold={hp.threshold}",
        f"{'layer':<10} {'units':>6}  kind            targets",
    ]
    for name, units in layers.items():
        if name == OUTPUT_LAYER:
            kind, spec = "output (class)", f"class:0..{units - 1}"
        elif name.startswith("fc_"):
            kind, spec = "dense", f"{name}:0..{units - 1}"
        else:
            kind, spec = "conv channel", f"{name}:0..{units - 1}"
        lines.append(f"{name:<10} {units:>6}  {kind:<15} {spec}")
    classes = ", ".join(f"{i}={c}" for i, c in enumerate(net.classes))
    lines.append(f"classes: {classes}")
    lines.append("target syntax: class:K (output neuron K) or LAYER:UNIT (conv: channel rate averaged over space)")
    return "\n".join(lines)
