"""A simulated rig over HTTP: neurons of a trained SNN checkpoint play the living neurons, with Poisson noise.

Start the service in a project (`spikemax serve`), then, in the same project,

    python examples/rig_client.py --url http://127.0.0.1:8765 --targets class:0,class:7 --budget 1024

The rig sees only what a real one sees: PNG stimuli by id. It shows each PNG to the SNN (the last
checkpoint under models/snn unless --checkpoint says otherwise; normalized with
data/prepared/meta.json), draws a Poisson spike count per channel over the SNN's T steps, and
tells the counts with their window. Channel 0 is maximized; every channel is recorded. Fields
left out of the session (generator, method, batch, noise options) take the service's defaults.

At the end it scores the session as a lab would want it scored, on the noise-free rates it knows
and the service does not: the true rate of the stimulus the session reports as best over the best
true rate of any stimulus it presented (1.0 = it found and recognized its best), and the same for
the single highest draw (what a noise-unaware session reports).
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


def last_checkpoint(root: Path) -> Path:
    """The project's last SNN checkpoint (the trained network)."""
    from spikemax import params as P
    from spikemax.snn import checkpoints

    _, paths = P.load(root / "params.yaml", root=root)
    found = checkpoints(paths)
    if not found:
        raise SystemExit(f"no SNN checkpoint under {paths.snn_dir}: run `spikemax train-snn` or pass --checkpoint")
    return found[max(found)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8765")
    ap.add_argument("--token", default=os.environ.get("SPIKEMAX_TOKEN"))
    ap.add_argument("--project", type=Path, default=Path("."), help="project root (params.yaml, models/, data/)")
    ap.add_argument("--checkpoint", type=Path, help="SNN checkpoint playing the neurons (default: the last)")
    ap.add_argument("--targets", default="class:0", help="comma-separated neurons, one per channel")
    ap.add_argument("--generator", help="sngan | vqvae (default: the service's)")
    ap.add_argument("--method", help="auto | tt | random | cma | ngopt | protes (default: the service's)")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--k", type=int, help="stimuli per ask (default: the session's batch)")
    ap.add_argument("--seed", type=int, default=0, help="the session's seed and the Poisson draws'")
    ap.add_argument("--no-noise-aware", action="store_true", help="report the best single draw instead")
    ap.add_argument(
        "--references", type=int, help="reference stimuli per ask to correct for drift (default: the service's)"
    )
    ap.add_argument("--out", type=Path, help="write the score as JSON here")
    args = ap.parse_args()

    targets = args.targets.split(",")
    meta = json.loads((args.project / "data" / "prepared" / "meta.json").read_text())
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    checkpoint = args.checkpoint or last_checkpoint(args.project.resolve())
    net = load_snn(checkpoint)
    rates = make_responder(net, targets)  # clean firing rates (spikes per step)
    steps = int(net.hparams.num_steps) if hasattr(net, "hparams") else 16
    rng = np.random.default_rng(args.seed)
    true_rate: dict[str, float] = {}  # stimulus id -> noise-free rate of channel 0 (known to the rig only)
    fields = {"generator": args.generator, "method": args.method}
    # a long timeout: the service's first VQ-VAE session fits the data prior (a minute or so; cached after)
    with RigClient(args.url, args.token, timeout=900) as rig:
        s = rig.create(
            **{k: v for k, v in fields.items() if v is not None},
            budget=args.budget,
            seed=args.seed,
            channels=len(targets),
            noise_aware=not args.no_noise_aware,
            **({"noise": {"references": args.references}} if args.references is not None else {}),
        )
        print(
            f"session {s['id']} (MLflow run {s['run_id']}): {s['generator']} x {s['method']} "
            f"({s['resolved_method']}), noise-aware {s['noise_aware']}, {len(targets)} channels, {checkpoint.name}"
        )
        status = s
        while status["left"] > 0:
            stimuli = rig.ask(s["id"], args.k)
            images = (torch.stack([pixels(x["png"]) for x in stimuli]) - mean) / std
            r = np.asarray(rates(images), dtype=np.float64).reshape(len(stimuli), -1)
            # reference stimuli are shown and told like any other; the score ranks the searched ones
            true_rate.update({x["id"]: float(v) for x, v in zip(stimuli, r[:, 0]) if not x.get("reference")})
            counts = rng.poisson(np.clip(r, 0, None) * steps)  # a trial's spike count over the window
            status = rig.tell(
                s["id"],
                [{"id": x["id"], "counts": c.tolist(), "window": float(steps)} for x, c in zip(stimuli, counts)],
            )
            best = status["best"]
            gain = f"  gain {status['gain']:.2f}" if status.get("gain") is not None else ""
            print(f"{status['answered']:5d}/{status['budget']}  best {best['response'] if best else None}{gain}")
        best, draw = status["best"], status["best_draw"]
        top = max(true_rate.values())
        score = {
            "session": s["id"],
            "generator": s["generator"],
            "method": s["resolved_method"],
            "noise_aware": s["noise_aware"],
            "presentations": status["queries"],
            "best_presented_true_rate": top,
            "reported_best_true_rate": true_rate[best["stimulus_id"]],
            "reported_best_measured": best["response"],
            "reported_best_presentations": best["presentations"],
            "score": true_rate[best["stimulus_id"]] / top if top > 0 else float("nan"),
            "best_draw_true_rate": true_rate[draw["stimulus_id"]],
            "best_draw_score": true_rate[draw["stimulus_id"]] / top if top > 0 else float("nan"),
        }
        print(
            f"best stimulus {best['stimulus_id']}: measured {best['response']:.3f} over {best['presentations']} "
            f"presentations, true rate {score['reported_best_true_rate']:.3f} = {score['score']:.2f} of the best "
            f"presented ({top:.3f}); the highest single draw's: {score['best_draw_score']:.2f}"
        )
        if args.out:
            args.out.write_text(json.dumps(score, indent=1))


if __name__ == "__main__":
    main()
