"""Stage `train_snn`: train the ConvSNN with Lightning, checkpoints on the `snn.checkpoints` schedule."""

from __future__ import annotations

import csv
import math
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import MLFlowLogger

from spikemax import tracking
from spikemax.data import Prepared, PreparedDataModule
from spikemax.devices import lightning
from spikemax.outputs import write_json
from spikemax.params import Params, Paths
from spikemax.snn import (
    CKPT_PATTERN,
    CSV_COLUMNS,
    LEGACY_PATTERN,
    ConvSNNLitModule,
    EpochRecorder,
    build,
    schedule_steps,
)


def run(params: Params, paths: Paths) -> None:
    """Train the ConvSNN: scheduled checkpoints (untrained first), metrics/snn.json and metrics/snn_epochs.csv."""
    threads = torch.get_num_threads()
    # Float sums (hence the trained weights) depend on the thread count: fix it for reproducibility.
    torch.set_num_threads(params.snn.threads)
    try:
        _train(params, paths)
    finally:
        torch.set_num_threads(threads)


def _train(params: Params, paths: Paths) -> None:
    """Body of `train` (runs with the configured thread count)."""
    s = params.snn
    prepared = Prepared.load(paths.prepared)
    L.seed_everything(s.seed, workers=True, verbose=False)
    model = ConvSNNLitModule(build(params, prepared.meta))
    dm = PreparedDataModule(prepared, batch_size=s.batch_size, seed=s.seed)
    dm.setup()
    eval_loaders = [dm.val_dataloader(), dm.test_dataloader()]
    train_loader = dm.train_dataloader()
    per_epoch = len(train_loader)
    c = s.checkpoints
    # Everything that can refuse the run (schedule, device, store) before a checkpoint is deleted.
    steps = schedule_steps(c.every_steps, c.early_epochs, list(c.steps), per_epoch, s.epochs, c.every_epochs)
    accelerator, devices = lightning(params.device)
    uri = tracking.configure(paths.root)
    tracking.experiment_id(tracking.SNN_EXPERIMENT, paths.root)

    out_dir = paths.snn_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for pattern in (CKPT_PATTERN, LEGACY_PATTERN):  # a previous run with more checkpoints must not leak in
        for stale in out_dir.glob(pattern):
            stale.unlink()

    logger = MLFlowLogger(
        experiment_name=tracking.SNN_EXPERIMENT,
        tracking_uri=uri,
        run_name=f"snn-{prepared.meta['dataset']}",
        tags=tracking.run_tags(paths.root, params, "train_snn"),
    )
    recorder = EpochRecorder(out_dir, steps, per_epoch, eval_loaders)
    trainer = L.Trainer(
        max_epochs=s.epochs,
        accelerator=accelerator,
        devices=devices,
        deterministic=True,
        logger=logger,
        callbacks=[RichProgressBar(leave=True), recorder],
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    try:
        trainer.validate(model, dataloaders=eval_loaders, verbose=False)
        recorder.record(trainer, 0)
        trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=eval_loaders)
        _write_outputs(paths, recorder.rows, s.epochs, s.num_steps, time.perf_counter() - start, logger)
    except BaseException:
        logger.finalize("failed")  # the MLflow run ends FAILED on every error path
        raise
    logger.finalize("success")


def _write_outputs(
    paths: Paths, rows: list[dict], epochs: int, num_steps: int, seconds: float, logger: MLFlowLogger
) -> None:
    """metrics/snn.json and the per-checkpoint CSV (a DVC plot), also logged to the MLflow run."""

    last = rows[-1]
    summary = {
        "test_acc": last["test_acc"],
        "val_acc": last["val_acc"],
        "test_acc_epoch0": rows[0]["test_acc"],
        "best_test_acc": max(r["test_acc"] for r in rows),
        "epochs": epochs,
        "checkpoints": len(rows),
        "num_steps": num_steps,
        "train_seconds": round(seconds, 1),
    }
    write_json(paths.metrics / "snn.json", summary)
    with open(paths.metrics / "snn_epochs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if isinstance(r[k], float) and math.isnan(r[k]) else r[k]) for k in CSV_COLUMNS})
    logger.log_metrics({"train_seconds": seconds}, step=int(last["step"]))
    logger.experiment.log_artifact(logger.run_id, str(paths.metrics / "snn_epochs.csv"))
