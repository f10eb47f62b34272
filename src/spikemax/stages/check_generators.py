"""Stage `check_generators`: score the trained generators' random grid points with the final SNN."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from spikemax import SpikemaxError, snn, tracking
from spikemax.data import Prepared
from spikemax.generators import checkpoint_path, load_generator, load_module, vqvae_eval
from spikemax.generators.common import save_grid
from spikemax.logs import line
from spikemax.outputs import write_json
from spikemax.params import Params, Paths


def run(params: Params, paths: Paths) -> dict:
    """Score each trained generator with the final-epoch SNN: class entropy, top-class probability, recon MSE."""
    g = params.generators
    ckpts = snn.checkpoints(paths)
    if not ckpts:
        raise SpikemaxError(f"no SNN checkpoints under {paths.snn_dir}: run `spikemax train-snn` first")
    final_epoch = max(ckpts)
    net = snn.load_snn(ckpts[final_epoch])
    prepared = Prepared.load(paths.prepared)
    classes = prepared.classes
    client = mlflow.MlflowClient(tracking.configure(paths.root))
    exp = tracking.experiment_id(tracking.GENERATORS_EXPERIMENT, paths.root)
    tags = tracking.run_tags(paths.root, params, "check_generators")
    run_id = client.create_run(exp, run_name="check", tags=tags).info.run_id
    out: dict[str, Any] = {"snn_epoch": final_epoch, "samples": g.check_samples}
    with tracking.terminated(client, run_id):
        for name in g.names:
            t0 = time.perf_counter()
            line(
                f"check_generators: {name}: scoring {g.check_samples} random grid points with the SNN of checkpoint {final_epoch}"
            )
            grid = load_generator(name, checkpoint_path(name, paths))
            idx = grid.random_indices(g.check_samples, seed=0)
            probs = torch.cat([_class_probs(net, grid.decode(part)) for part in idx.split(256)])
            res = _class_stats(probs, classes)
            if name == "vqvae":
                line(f"check_generators: {name}: reconstructing the test split")
                res.update(vqvae_eval(load_module(name, checkpoint_path(name, paths)), prepared, "test"))
            out[name] = res
            line(
                f"check_generators: {name}: {res['classes_covered']}/{len(classes)} classes, entropy "
                f"{res['class_entropy']:.3f} of {res['max_entropy']:.3f} nats ({time.perf_counter() - t0:.1f} s)"
            )
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
