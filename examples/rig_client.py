"""A simulated rig over HTTP: neurons of a trained SNN checkpoint play the living neurons, with Poisson noise.

Start the service in a project (`spikemax serve`), then

    python examples/rig_client.py --url http://127.0.0.1:8765 --checkpoint models/snn/epoch=005.ckpt \
        --targets class:0,class:7 --budget 256

The rig sees only what a real one sees: PNG stimuli by id. It shows each PNG to the SNN (normalized
with data/prepared/meta.json), draws a Poisson spike count per channel over the SNN's T steps, and
tells the counts with their window. Channel 0 is maximized; every channel is recorded.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spikemax.neurons import make_responder
from spikemax.rig.client import RigClient
from spikemax.snn import load_snn


def pixels(png_b64: str) -> torch.Tensor:
    """A base64 PNG as a (C, H, W) float tensor in [0, 1]."""
    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))), dtype=np.float32) / 255.0
    return torch.from_numpy(a[None] if a.ndim == 2 else np.transpose(a, (2, 0, 1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8765")
    ap.add_argument("--token", default=os.environ.get("SPIKEMAX_TOKEN"))
    ap.add_argument("--checkpoint", type=Path, required=True, help="SNN checkpoint playing the neurons")
    ap.add_argument("--meta", type=Path, default=Path("data/prepared/meta.json"), help="normalization of the SNN input")
    ap.add_argument("--targets", default="class:0", help="comma-separated neurons, one per channel")
    ap.add_argument("--generator", default="sngan")
    ap.add_argument("--method", default="tt")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--k", type=int, default=32, help="stimuli per ask")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    targets = args.targets.split(",")
    meta = json.loads(args.meta.read_text())
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    net = load_snn(args.checkpoint)
    rates = make_responder(net, targets)  # clean firing rates (spikes per step)
    steps = int(net.hparams.num_steps) if hasattr(net, "hparams") else 16
    rng = np.random.default_rng(args.seed)
    with RigClient(args.url, args.token) as rig:
        s = rig.create(
            generator=args.generator, method=args.method, budget=args.budget, seed=args.seed, channels=len(targets)
        )
        print(
            f"session {s['id']} (MLflow run {s['run_id']}): {args.generator} x {args.method}, {len(targets)} channels"
        )
        while True:
            status = rig.status(s["id"])
            if status["asked"] >= status["budget"]:
                break
            stimuli = rig.ask(s["id"], args.k)
            images = (torch.stack([pixels(x["png"]) for x in stimuli]) - mean) / std
            r = np.asarray(rates(images), dtype=np.float64).reshape(len(stimuli), -1)
            counts = rng.poisson(np.clip(r, 0, None) * steps)  # a trial's spike count over the window
            status = rig.tell(
                s["id"],
                [{"id": x["id"], "counts": c.tolist(), "window": float(steps)} for x, c in zip(stimuli, counts)],
            )
            best = status["best"]
            print(f"{status['answered']:5d}/{status['budget']}  best {best['response'] if best else None}")
        best = status["best"]
        print(f"best stimulus {best['stimulus_id']}: rate {best['response']:.3f} at indices {best['indices']}")


if __name__ == "__main__":
    main()
