"""Generators with searchable latent grids (SN-GAN, VQ-VAE): train, load, check."""

from __future__ import annotations

import pickle
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spikemax import SpikemaxError
from spikemax.generators.grid import LatentGrid, normal_quantiles
from spikemax.params import Params, Paths

NAMES = ("sngan", "vqvae")

__all__ = ["NAMES", "LatentGrid", "check", "checkpoint_path", "load_generator", "normal_quantiles", "train"]


def _check_name(name: str) -> str:
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
    return paths.generators_dir / f"{_check_name(name)}.ckpt"


def load_module(name: str, checkpoint: str | Path) -> Any:
    """The trained LightningModule (eval mode, CPU) of a generator checkpoint."""
    _check_name(name)
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
    if _check_name(name) == "sngan":
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


def train(name: str, params: Params, paths: Paths, max_steps: int = -1) -> dict:
    """Train generator `name` on the prepared train split; checkpoint, MLflow run, metrics JSON."""
    import lightning as L
    import mlflow

    from spikemax import tracking
    from spikemax.data import Prepared, PreparedDataModule
    from spikemax.generators.common import MlflowEpochLogger, make_trainer, save_grid, write_json

    _check_name(name)
    sect = getattr(params.generators, name)
    prepared = Prepared.load(paths.prepared)
    L.seed_everything(sect.seed, workers=False, verbose=False)
    model = build(name, params, prepared.meta)
    # Dropping the ragged last batch keeps BatchNorm and GAN statistics stable.
    dm = PreparedDataModule(prepared, sect.batch_size, sect.seed, pixels=True, drop_last=True)

    client = mlflow.MlflowClient(tracking.configure(paths.root))
    exp = tracking.experiment_id("generators", paths.root)
    run = client.create_run(exp, run_name=f"train-{name}", tags={"generator": name, "stage": "train_generator"})
    run_id = run.info.run_id
    with tracking.terminated(client, run_id):
        client.log_batch(
            run_id,
            params=[
                mlflow.entities.Param(k, str(v))
                for k, v in {**sect.model_dump(), "dataset": prepared.meta["dataset"]}.items()
            ],
        )
        logger = MlflowEpochLogger(client, run_id, model.grid)
        trainer = make_trainer(sect.epochs, [logger], max_steps=max_steps, validate=name == "vqvae")
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        seconds = time.perf_counter() - t0
        if name == "sngan":
            model.recalibrate()
        model.eval()
        ckpt = checkpoint_path(name, paths)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(ckpt, weights_only=True)

        grid = model.grid()
        metrics: dict[str, Any] = {
            "train_seconds": round(seconds, 2),
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "d": grid.d,
            "n": grid.n,
        }
        last = logger.history[-1] if logger.history else {}
        metrics.update({k: v for k, v in last.items() if k != "epoch"})
        if name == "vqvae":
            metrics.update(_vqvae_eval(model, prepared, "val"))
        client.log_batch(
            run_id,
            metrics=[
                mlflow.entities.Metric(f"final_{k}", float(v), int(time.time() * 1000), 0)
                for k, v in metrics.items()
                if isinstance(v, (int, float))
            ],
        )
        samples = paths.metrics / f"generator_{name}_samples.png"
        samples.parent.mkdir(parents=True, exist_ok=True)
        save_grid(grid, samples)
        client.log_artifact(run_id, str(samples))
        write_json(paths.metrics / f"generator_{name}.json", metrics)
    return metrics


@torch.no_grad()
def _vqvae_eval(model: Any, prepared: Any, split: str) -> dict[str, float]:
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
        f"{split}_perplexity": perplexity_of(torch.cat(idxs), model.hparams.codes),
    }


def check(params: Params, paths: Paths) -> dict:
    """Score each trained generator with the final-epoch SNN: class entropy, top-class probability, recon MSE."""
    import mlflow

    from spikemax import snn, tracking
    from spikemax.data import Prepared
    from spikemax.generators.common import save_grid, write_json

    g = params.generators
    ckpts = snn.checkpoints(paths)
    if not ckpts:
        raise SpikemaxError(f"no SNN checkpoints under {paths.snn_dir}: run `spikemax train-snn` first")
    final_epoch = max(ckpts)
    net = snn.load_snn(ckpts[final_epoch])
    prepared = Prepared.load(paths.prepared)
    classes = prepared.classes
    client = mlflow.MlflowClient(tracking.configure(paths.root))
    exp = tracking.experiment_id("generators", paths.root)
    run_id = client.create_run(exp, run_name="check", tags={"stage": "check_generators"}).info.run_id
    out: dict[str, Any] = {"snn_epoch": final_epoch, "samples": g.check_samples}
    with tracking.terminated(client, run_id):
        for name in g.names:
            grid = load_generator(name, checkpoint_path(name, paths))
            idx = grid.random_indices(g.check_samples, seed=0)
            probs = torch.cat([_class_probs(net, grid.decode(part)) for part in idx.split(256)])
            res = _class_stats(probs, classes)
            if name == "vqvae":
                res.update(_vqvae_eval(load_module(name, checkpoint_path(name, paths)), prepared, "test"))
            out[name] = res
            with tempfile.TemporaryDirectory() as tmp:
                png = save_grid(grid, Path(tmp) / f"{name}_check_samples.png")
                client.log_artifact(run_id, str(png), "check")
            client.log_batch(
                run_id,
                metrics=[
                    mlflow.entities.Metric(f"{name}_{k}", float(v), int(time.time() * 1000), 0)
                    for k, v in res.items()
                    if isinstance(v, (int, float))
                ],
            )
        write_json(paths.metrics / "generators.json", out)
        client.log_artifact(run_id, str(paths.metrics / "generators.json"))
    return out


@torch.no_grad()
def _class_probs(net: Any, x: torch.Tensor) -> torch.Tensor:
    return net.class_probs(x).float()


def _class_stats(probs: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Predicted-class histogram, its entropy (nats; diversity) and the mean top-class probability."""
    top, pred = probs.max(1)
    hist = torch.bincount(pred, minlength=probs.shape[1]).double()
    p = hist / hist.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {
        "class_entropy": entropy,
        "max_entropy": float(np.log(probs.shape[1])),
        "classes_covered": int((hist > 0).sum()),
        "mean_top_prob": float(top.mean()),
        "histogram": {c: int(h) for c, h in zip(classes, hist.tolist())},
    }
