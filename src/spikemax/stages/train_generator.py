"""Stage `train_generator NAME`: train SN-GAN or VQ-VAE on the prepared data; checkpoint, samples, metrics."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import mlflow

from spikemax import tracking
from spikemax.data import Prepared, PreparedDataModule
from spikemax.generators import build, check_name, checkpoint_path, vqvae_eval
from spikemax.generators.common import MlflowEpochLogger, make_trainer, save_grid
from spikemax.outputs import write_json
from spikemax.params import Params, Paths


def run(name: str, params: Params, paths: Paths, max_steps: int = -1) -> dict:
    """Train generator `name` on the prepared train split; checkpoint, MLflow run, metrics JSON."""
    check_name(name)
    sect = getattr(params.generators, name)
    prepared = Prepared.load(paths.prepared)
    L.seed_everything(sect.seed, workers=False, verbose=False)
    model = build(name, params, prepared.meta)
    # Dropping the ragged last batch keeps BatchNorm and GAN statistics stable.
    dm = PreparedDataModule(prepared, sect.batch_size, sect.seed, pixels=True, drop_last=True)

    client = mlflow.MlflowClient(tracking.configure(paths.root))
    exp = tracking.experiment_id(tracking.GENERATORS_EXPERIMENT, paths.root)
    tags = tracking.run_tags(paths.root, params, "train_generator", **{"spikemax.generator": name})
    run = client.create_run(exp, run_name=f"train-{name}", tags=tags)
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
        validate = name == "vqvae"  # SN-GAN has no validation step
        trainer = make_trainer(
            sect.epochs, [logger], max_steps=max_steps, validate=validate, device=params.device, name=name
        )
        t0 = time.perf_counter()
        if validate:
            trainer.fit(model, datamodule=dm)
        else:  # only the train split: handing Lightning a val loader it cannot use makes it warn
            dm.setup("fit")
            trainer.fit(model, train_dataloaders=dm.train_dataloader())
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
            metrics.update(vqvae_eval(model, prepared, "val"))
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
