"""Generators with searchable latent grids (SN-GAN, VQ-VAE): train, load, check."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from spikemax import SpikemaxError
from spikemax.generators.grid import LatentGrid, normal_quantiles
from spikemax.params import Params, Paths

NAMES = ("sngan", "vqvae")

__all__ = ["NAMES", "LatentGrid", "check", "checkpoint_path", "load_generator", "normal_quantiles", "train"]


def check_name(name: str) -> str:
    if name not in NAMES:
        raise SpikemaxError(f"unknown generator {name!r}; allowed: {', '.join(NAMES)}")
    return name


def _module_class(name: str) -> type:
    if name == "sngan":
        from spikemax.generators.sngan import SNGAN

        return SNGAN
    from spikemax.generators.vqvae import VQVAE

    return VQVAE


def checkpoint_path(name: str, paths: Paths) -> Path:
    """Where `train-generator NAME` writes its checkpoint: models/generators/<name>.ckpt."""
    return paths.generators_dir / f"{check_name(name)}.ckpt"


def load_module(name: str, checkpoint: str | Path) -> Any:
    """The trained LightningModule (eval mode, CPU) of a generator checkpoint."""
    check_name(name)
    path = Path(checkpoint)
    if not path.is_file():
        raise SpikemaxError(
            f"generator checkpoint {path} not found: run `spikemax train-generator {name}` "
            f"(allowed names: {', '.join(NAMES)})"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        hp = dict(ckpt["hyper_parameters"])
        state = ckpt["state_dict"]
    except (
        OSError,
        RuntimeError,
        KeyError,
        TypeError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
        pickle.UnpicklingError,
    ) as err:
        raise SpikemaxError(f"generator checkpoint {path} is unreadable or corrupt ({type(err).__name__})") from None
    if hp.get("name") != name:
        raise SpikemaxError(f"{path} holds a {hp.get('name')!r} generator, not {name!r}; allowed: {', '.join(NAMES)}")
    model = _module_class(name)(**hp)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise SpikemaxError(f"generator checkpoint {path} does not match the {name} architecture") from None
    return model.eval()


def load_generator(name: str, checkpoint: str | Path) -> LatentGrid:
    """The LatentGrid of a trained generator checkpoint (normalization stored inside it)."""
    return load_module(name, checkpoint).grid()


def build(name: str, params: Params, meta: dict) -> Any:
    """A fresh, untrained LightningModule for generator `name` from params and prepared meta."""
    g = params.generators
    common = {"shape": list(meta["shape"]), "mean": list(meta["mean"]), "std": list(meta["std"]), "name": name}
    if check_name(name) == "sngan":
        s = g.sngan
        return _module_class(name)(
            latent_dim=s.latent_dim, grid_n=s.grid_n, width=s.width, lr=s.lr, ema=s.ema, **common
        )
    v = g.vqvae
    return _module_class(name)(
        codes=v.codes,
        code_dim=v.code_dim,
        width=v.width,
        downsample=v.downsample,
        commitment=v.commitment,
        decay=v.decay,
        lr=v.lr,
        **common,
    )


@torch.no_grad()
def vqvae_eval(model: Any, prepared: Any, split: str) -> dict[str, float]:
    """Pixel-space reconstruction MSE and codebook perplexity of a VQ-VAE on one split."""
    from spikemax.generators.vqvae import perplexity_of

    model.eval()
    x = prepared.raw(split)[0].float() / 255.0
    sq, idxs = 0.0, []
    for part in x.split(512):
        recon, idx, _, _ = model(part)
        sq += float(((recon - part) ** 2).sum())
        idxs.append(idx)
    return {
        f"{split}_recon_mse": sq / x.numel(),
        f"{split}_perplexity": perplexity_of(torch.cat(idxs), model.hparams["codes"]),
    }


def grid_ordered(name: str) -> bool:
    """Whether generator `name`'s grid is ordered (`LatentGrid.ordered`), without loading a checkpoint."""
    if check_name(name) == "sngan":
        from spikemax.generators.sngan import SNGANGrid

        return SNGANGrid.ordered
    from spikemax.generators.vqvae import VQVAEGrid

    return VQVAEGrid.ordered
