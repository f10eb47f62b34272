"""Shared training pieces: MLflow epoch logging, sample grids, progress lines, the Trainer."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from torchvision.utils import save_image

from spikemax.generators.grid import LatentGrid
from spikemax.logs import line, quiet_third_party


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


class LineProgress(ProgressBar):
    """Progress as whole lines for a log file or a pipe: every `every_s` seconds of an epoch, and at
    its end with the epoch's scalar metrics (tqdm's bar would write carriage returns and cursor moves)."""

    def __init__(self, name: str, every_s: float = 30.0) -> None:
        super().__init__()
        self.name = name
        self.every_s = every_s
        self._enabled = True
        self._start = self._last = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _epoch(self, trainer: L.Trainer) -> str:
        return f"{self.name} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._enabled and now - self._last >= self.every_s:
            self._last = now
            total = trainer.num_training_batches
            line(f"{self._epoch(trainer)}: step {batch_idx + 1}/{total} ({now - self._start:.0f} s)")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2 runs the epoch's validation before this hook: its metrics are in too.
        if not self._enabled:
            return
        scalars = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(scalars.items()))
        line(f"{self._epoch(trainer)}: done in {time.perf_counter() - self._start:.1f} s; {shown}")


def make_trainer(
    epochs: int,
    callbacks: list[L.Callback],
    max_steps: int = -1,
    validate: bool = True,
    device: str = "cpu",
    name: str = "train",
) -> L.Trainer:
    """A Trainer on `device` (the `device` param) with progress (a rich bar on a terminal, whole lines
    otherwise, prefixed by `name`), no Lightning logger or checkpoints."""
    from lightning.pytorch.callbacks import RichProgressBar

    from spikemax.devices import lightning

    quiet_third_party()
    bar = RichProgressBar() if sys.stderr.isatty() else LineProgress(name)
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
