"""Training the ConvSNN with Lightning: the LightningModule around the network, its loss, evaluation,
and the callback that saves the scheduled checkpoints with their metrics."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from spikemax.params import Params, SNNParams
from spikemax.snn.checkpoints import CSV_COLUMNS, checkpoint_name
from spikemax.snn.network import ConvSNN


def spike_count_loss(out_spikes: Tensor, y: Tensor, loss: str, num_steps: int) -> Tensor:
    """The training loss of output spikes (T, B, classes): `ce_count` or `mse_count`."""
    counts = out_spikes.sum(0)
    if loss == "mse_count":
        # snntorch's mse_count_loss: correct class fires on 80 %, others on 20 % of the steps.
        target = torch.full_like(counts, 0.2 * num_steps)
        target[torch.arange(len(y)), y] = 0.8 * num_steps
        return F.mse_loss(counts, target)
    return F.cross_entropy(counts, y)


class ConvSNNLitModule(L.LightningModule):
    """Lightning's view of a ConvSNN: steps, metrics and optimizer; checkpoints hold the bare network.

    A checkpoint's `state_dict` is the network's own (no `net.` prefix) and its `hyper_parameters`
    are the network's constructor arguments, so `spikemax.snn.checkpoints.load_snn` rebuilds the
    ConvSNN without Lightning (the format checkpoints had when the network was the LightningModule).
    """

    def __init__(self, net: ConvSNN) -> None:
        super().__init__()
        self.save_hyperparameters(dict(net.hparams))
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        """Output spikes (T, B, num_classes) of the network's fast path."""
        return self.net(x)

    def loss(self, out_spikes: Tensor, y: Tensor) -> Tensor:
        """This network's training loss (params `snn.loss`)."""
        return spike_count_loss(out_spikes, y, self.hparams["loss"], self.net.num_steps)

    def _step(self, batch: tuple[Tensor, Tensor], prefix: str) -> Tensor:
        x, y = batch
        out = self(x)
        loss = self.loss(out, y)
        acc = (out.sum(0).argmax(1) == y).float().mean()
        opts: dict[str, Any] = dict(on_epoch=True, on_step=False, batch_size=len(y), logger=False)
        self.log(f"{prefix}_loss", loss, prog_bar=True, add_dataloader_idx=False, **opts)
        self.log(f"{prefix}_acc", acc, prog_bar=prefix != "train", add_dataloader_idx=False, **opts)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        # Loader 0 is the validation split, loader 1 the test split: test accuracy per epoch is
        # what the analysis correlates with selectivity.
        self._step(batch, "val" if dataloader_idx == 0 else "test")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        name, lr = self.hparams["optimizer"], self.hparams["lr"]
        opt: torch.optim.Optimizer
        if name == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=lr)
        elif name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=lr)
        if self.hparams.get("schedule", "constant") != "cosine" or self._trainer is None:
            return opt
        # Cosine decay over the run steadies the last epochs (accuracy keeps rising to the end).
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs or 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the bare network's weights (see the class docstring)."""
        checkpoint["state_dict"] = self.net.state_dict()


@torch.no_grad()
def evaluate(model: ConvSNNLitModule, loader: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """Mean loss and accuracy of `model` over a loader (eval mode for the call, the mode restored after)."""
    was_training = model.training
    model.eval()
    loss = correct = n = 0.0
    for x, y in loader:
        out = model(x)
        loss += float(model.loss(out, y)) * len(y)
        correct += float((out.sum(0).argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    return (loss / n, correct / n) if n else (math.nan, math.nan)


class EpochRecorder(L.Callback):
    """Saves `step=SSSSSS-epoch=E.EEE.ckpt` at scheduled optimizer steps and keeps one metrics row per
    checkpoint (MLflow step = optimizer step). Epoch ends use the epoch's validation metrics; a checkpoint
    inside an epoch evaluates the `eval_loaders` (validation, test) itself."""

    def __init__(
        self,
        out_dir: Path,
        steps: Iterable[int] = (),
        steps_per_epoch: int = 1,
        eval_loaders: Sequence[Iterable[tuple[Tensor, Tensor]]] = (),
    ) -> None:
        self.out_dir = out_dir
        self.steps = set(steps)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.eval_loaders = list(eval_loaders)
        self.rows: list[dict[str, float]] = []

    def record(self, trainer: L.Trainer, step: int, metrics: dict[str, float] | None = None) -> None:
        """Checkpoint the current weights as taken after `step` optimizer steps and log its metrics."""
        progress = step / self.steps_per_epoch
        trainer.save_checkpoint(self.out_dir / checkpoint_name(step, progress), weights_only=True)
        got = metrics if metrics is not None else {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {"epoch": len(self.rows), "step": step, "progress": progress}
        row.update({k: got.get(k, math.nan) for k in CSV_COLUMNS[3:]})
        if step == 0:
            row["train_loss"] = math.nan  # no training has happened yet
        self.rows.append(row)
        if trainer.logger is not None:
            logged = {k: v for k, v in row.items() if k not in ("epoch", "step") and not math.isnan(v)}
            logged.update({k: got[k] for k in ("train_acc", "test_loss") if k in got and step > 0})
            trainer.logger.log_metrics(logged, step=step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if step in self.steps and step % self.steps_per_epoch and isinstance(pl_module, ConvSNNLitModule):
            # inside an epoch Lightning has no validation metrics yet: evaluate here
            val_loss, val_acc = evaluate(pl_module, self.eval_loaders[0]) if self.eval_loaders else (math.nan,) * 2
            test_loss, test_acc = (
                evaluate(pl_module, self.eval_loaders[1]) if len(self.eval_loaders) > 1 else (math.nan,) * 2
            )
            got = {"val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc}
            self.record(trainer, step, got)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2 runs this hook after the epoch's validation, so val/test metrics are current.
        if trainer.global_step in self.steps:
            self.record(trainer, trainer.global_step)


def architecture(s: SNNParams) -> dict[str, Any]:
    """ConvSNN's architecture and training arguments from params.snn (one place for build and untrained)."""
    return {
        "channels": list(s.channels),
        "kernel": s.kernel,
        "hidden": list(s.hidden),
        "beta": s.beta,
        "threshold": s.threshold,
        "slope": s.slope,
        "num_steps": s.num_steps,
        "loss": s.loss,
        "optimizer": s.optimizer,
        "lr": s.lr,
        "schedule": s.schedule,
    }


def build(params: Params, meta: dict) -> ConvSNN:
    """A fresh ConvSNN for the prepared dataset, sized by params.snn."""
    return ConvSNN(
        in_shape=list(meta["shape"]),
        num_classes=int(meta["num_classes"]),
        classes=list(meta["classes"]),
        **architecture(params.snn),
    )


def untrained(s: SNNParams, in_shape: Sequence[int] = (1, 28, 28), seed: int = 0) -> ConvSNN:
    """A ConvSNN of `s`'s architecture with seeded random weights, in eval mode (benchmarks time it)."""
    torch.manual_seed(seed)
    return ConvSNN(in_shape=list(in_shape), **architecture(s)).eval()
