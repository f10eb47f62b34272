"""The session factory: a request resolved as the maximize stage resolves a run, and its optimizer built.

`auto` and the TT options come from `options_for` (called here, the rig's one call site), the VQ-VAE
data prior from the stage's own `fit_grid_prior`, and the noise layer from the request's noise
options over the `maximize.noise` params (noise-aware unless the request says `noise_aware: false`).
With `noise.references > 0` the optimizer is wrapped in `optim.drift.DriftCorrected` as the stage
wraps it, over the stage's reference set (`neurons.reference_points`), stored in the session config.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from spikemax.digest import file_digest
from spikemax.rig.errors import Invalid, RigError
from spikemax.rig.models import SessionCreate
from spikemax.rig.replay import SessionConfig
from spikemax.rig.session import Channels, SingleChannel

PRIOR_FILE = "prior.npz"  # the session's data prior, beside its artifacts (replay loads it, never refits)
# the `maximize.noise` params a request's `noise` may set (the rest is the in-silico responder's)
NOISE_OPTIONS = {"repeats", "retest", "final", "estimator", "references", "reference_set"}


def takes_prior(method: str, generator: str) -> bool:
    """Whether a run of `method` on `generator` starts from a data prior in the maximize stage."""
    from spikemax.am.policy import prior_applies

    return prior_applies(method, generator)


def resolve(req: SessionCreate, params: Any, paths: Any, grid: Any) -> SessionConfig:
    """A request's config: every field left out takes the maximize stage's default (params.yaml)."""
    from spikemax.generators import checkpoint_path
    from spikemax.optim import options_for

    mp = params.maximize
    generator = req.generator or mp.generators[0]
    method = req.method or mp.methods[0]
    budget = req.budget if req.budget is not None else mp.budget
    asked = req.noise.model_dump(exclude_none=True) if req.noise is not None else {}
    noise = {**mp.noise.model_dump(include=NOISE_OPTIONS), **asked}
    if noise["references"] > 0 and req.target_channel == "all":
        raise Invalid(
            "noise.references: reference stimuli are not available in population mode (target_channel 'all'); "
            "give a target channel or references 0"
        )
    noise["aware"] = req.noise_aware
    # The run's params as the stage sees them: its budget (NGOpt and the noise layer's schedule use it)
    # and the session's noise options in `maximize.noise`.
    # A session of every channel is the stage's population mode (its optimizers' population options).
    population = req.target_channel == "all"
    m = mp.model_copy(update={"budget": budget, "noise": mp.noise.model_copy(update=noise), "population": population})
    options = options_for(method, m, grid)
    if not req.noise_aware:
        options.pop("noise_aware", None)
    prior = bool(mp.prior if req.prior is None else req.prior) and takes_prior(method, generator)
    refs = reference_points(generator, int(noise["reference_set"]), paths, grid) if noise["references"] > 0 else None
    return SessionConfig(
        id=uuid.uuid4().hex[:12],
        generator=generator,
        method=method,
        budget=budget,
        seed=req.seed if req.seed is not None else mp.seeds[0],
        batch=req.batch if req.batch is not None else mp.batch,
        channels=req.channels,
        target_channel=req.target_channel,
        options=options,
        name=req.name,
        created=time.time(),
        checkpoint_sha256=file_digest(checkpoint_path(generator, paths)),
        noise=noise,
        retry_failed=req.retry_failed,
        prior=prior,
        reference_points=[] if refs is None else refs.tolist(),
    )


def reference_points(generator: str, count: int, paths: Any, grid: Any) -> np.ndarray:
    """The stage's fixed reference set of the grid (`neurons.reference_points`, as `am.group` calls it):
    on VQ-VAE test images through the encoder (the prepared data is needed), fixed latents on SN-GAN."""
    import torch

    from spikemax.data import Prepared
    from spikemax.neurons import reference_points as points

    images = torch.zeros(0)
    if not grid.ordered and hasattr(grid, "encode"):  # the codebook grid encodes natural images
        if not (paths.prepared / "meta.json").is_file():
            raise Invalid(
                f"noise.references: the {generator} reference stimuli are prepared test images through its "
                f"encoder, and {paths.prepared} has none (run `spikemax prepare`), or create the session with "
                f'"noise": {{"references": 0}}'
            )
        images = Prepared.load(paths.prepared).tensors("test")[0]
    return np.asarray(points(grid, images, count), dtype=np.int64)


def fit_prior(cfg: SessionConfig, params: Any, paths: Any, grid: Any, cache_dir: Path) -> Any:
    """The stage's TT data prior of the session's grid (fitted by `am.prior.fit_grid_prior`, cached by content)."""
    from spikemax.am.prior import fit_grid_prior
    from spikemax.data import Prepared
    from spikemax.generators import checkpoint_path

    mp = params.maximize
    if not (paths.prepared / "meta.json").is_file():
        raise Invalid(
            f"prior: the {cfg.generator} data prior is fitted to the prepared train images, and "
            f'{paths.prepared} has none (run `spikemax prepare`), or create the session with "prior": false'
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    return fit_grid_prior(
        grid,
        Prepared.load(paths.prepared),
        checkpoint_path(cfg.generator, paths),
        int(mp.tt.rank),
        int(mp.prior_images),
        cache_dir / f"prior_{cfg.generator}.npz",
    )


def save_prior(prior: Any, path: Path) -> None:
    """Write a session's prior (arrays only: nothing in it can execute) whole, before the session is journaled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **prior.to_dict())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_prior(path: Path) -> Any:
    """A session's saved prior (RigError if it is gone: the session cannot be replayed without it)."""
    from spikemax.optim.prior import TTPrior

    if not path.is_file():
        raise RigError(f"its data prior {path} is missing")
    with np.load(path) as z:
        return TTPrior.from_dict(z)


def make_driver(cfg: SessionConfig, grid: Any, prior: Any = None) -> Any:
    """The session's optimizer(s) behind ask(k) / tell(I, Y (k, m)), built as the maximize stage builds them."""
    from spikemax.optim import make_optimizer
    from spikemax.optim.population import Population

    opts = dict(cfg.options)
    if prior is not None:
        opts["prior"] = prior

    def one(seed: int) -> Any:
        try:
            opt = make_optimizer(cfg.method, grid.d, grid.n, seed=seed, batch=cfg.batch, **opts)
        except ValueError as err:
            raise Invalid(f"method: {err}") from None
        if cfg.references > 0:  # a drifting neuron: references in every ask, values rescaled by their gain
            from spikemax.optim.drift import DriftCorrected

            opt = DriftCorrected(opt, np.asarray(cfg.reference_points, dtype=np.int64), per_batch=cfg.references)
        return opt

    if cfg.target_channel == "all":
        # Population mode: one optimizer per channel, batches composed from their proposals,
        # every optimizer told its own channel's column of every presentation.
        return Channels(Population([one(cfg.seed + j) for j in range(cfg.channels)]))
    return SingleChannel(one(cfg.seed), int(cfg.target_channel))
