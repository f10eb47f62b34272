"""Shared training pieces: MLflow epoch logging, sample grids, fit + checkpoint."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchvision.utils import save_image

from spikemax.generators.grid import LatentGrid


def pixels(batch: Any) -> torch.Tensor:
    """A batch of uint8 images as float32 pixels in [0, 1]."""
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    return x.float() / 255.0


def save_grid(grid: LatentGrid, path: Path, k: int = 64, seed: int = 0) -> Path:
    """Decode `k` random grid points (fixed seed, so epochs compare) into one PNG."""
    imgs = grid.decode_pixels(grid.random_indices(k, seed))
    save_image(imgs.clamp(0, 1), path, nrow=int(round(k**0.5)), padding=1, pad_value=1.0)
    return path


@torch.no_grad()
def save_reconstructions(model: Any, x01: torch.Tensor, path: Path) -> Path:
    """Originals (odd rows) above their reconstructions (even rows), 8 per row, into one PNG."""
    was_training = model.training
    model.eval()
    recon = model.reconstruct(x01).clamp(0, 1)
    model.train(was_training)
    rows = [t for i in range(0, len(x01), 8) for t in (x01[i : i + 8], recon[i : i + 8])]
    save_image(torch.cat(rows), path, nrow=8, padding=1, pad_value=1.0)
    return path


class MlflowEpochLogger(L.Callback):
    """Per-epoch losses and a sample-grid PNG into one MLflow run (the project's store)."""

    def __init__(self, client: Any, run_id: str, make_grid: Callable[[], LatentGrid]) -> None:
        self.client = client
        self.run_id = run_id
        self.make_grid = make_grid
        self.history: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2 runs the epoch's validation before this hook: train and val metrics are in.
        from mlflow.entities import Metric

        epoch = trainer.current_epoch
        now = int(time.time() * 1000)
        vals = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self.history.append({"epoch": epoch, **vals})
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, epoch) for k, v in vals.items()])
        was_training = pl_module.training
        with tempfile.TemporaryDirectory() as tmp:
            png = save_grid(self.make_grid(), Path(tmp) / f"samples_epoch{epoch:03d}.png")
            self.client.log_artifact(self.run_id, str(png), "samples")
            datamodule = getattr(trainer, "datamodule", None)
            if hasattr(pl_module, "reconstruct") and datamodule is not None:
                png = Path(tmp) / f"recon_epoch{epoch:03d}.png"
                save_reconstructions(pl_module, pixels(datamodule.sets["val"].tensors)[:32], png)
                self.client.log_artifact(self.run_id, str(png), "reconstructions")
        pl_module.train(was_training)


def make_trainer(
    epochs: int, callbacks: list[L.Callback], max_steps: int = -1, validate: bool = True, device: str = "cpu"
) -> L.Trainer:
    """A Trainer on `device` (the `device` param) with a progress bar (rich on a terminal), no
    Lightning logger or checkpoints."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from spikemax.devices import lightning

    bar = RichProgressBar() if sys.stderr.isatty() else TQDMProgressBar(refresh_rate=20)
    return L.Trainer(
        max_epochs=epochs,
        max_steps=max_steps,
        accelerator=lightning(device)[0],
        devices=lightning(device)[1],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=None if validate else 0,
        callbacks=[bar, *callbacks],
    )
