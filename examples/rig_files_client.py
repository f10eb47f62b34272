"""A simulated rig through the file protocol (as a MATLAB or LabVIEW rig would do it), Poisson noise.

In a project, start spikemax on a folder and this rig on the same folder:

    spikemax rig-files rigdir --budget 256 --channels 2 &
    python examples/rig_files_client.py rigdir --checkpoint models/snn/step=000425-epoch=5.000.ckpt --targets class:0,class:7

For each block the rig reads manifest.json, shows the PNGs to the SNN, and writes responses.json
(spike counts with their window) by atomic rename; it stops when finished.json appears.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spikemax.neurons import make_responder
from spikemax.snn import load_snn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--meta", type=Path, default=Path("data/prepared/meta.json"))
    ap.add_argument("--targets", default="class:0")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    meta = json.loads(args.meta.read_text())
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    net = load_snn(args.checkpoint)
    rates = make_responder(net, args.targets.split(","))
    steps = int(net.hparams.num_steps) if hasattr(net, "hparams") else 16
    rng = np.random.default_rng(args.seed)
    while not (args.folder / "finished.json").exists():
        nxt = args.folder / "next.json"
        block = args.folder / json.loads(nxt.read_text())["block"] if nxt.exists() else None
        if block is None or (block / "told.json").exists() or (block / "responses.json").exists():
            time.sleep(0.05)
            continue
        man = json.loads((block / "manifest.json").read_text())
        px = [np.asarray(Image.open(block / s["file"]), dtype=np.float32) / 255.0 for s in man["stimuli"]]
        images = (torch.from_numpy(np.stack(px))[:, None] - mean) / std
        r = np.asarray(rates(images), dtype=np.float64).reshape(len(px), -1)
        counts = rng.poisson(np.clip(r, 0, None) * steps)
        body = {
            "results": [
                {"id": s["id"], "counts": c.tolist(), "window": float(steps)} for s, c in zip(man["stimuli"], counts)
            ]
        }
        tmp = block / ".responses.json.tmp"
        tmp.write_text(json.dumps(body))
        os.replace(tmp, block / "responses.json")  # atomic: spikemax never sees half a file
        print(f"{block.name}: {len(counts)} stimuli answered")
    print(json.loads((args.folder / "finished.json").read_text())["best"])


if __name__ == "__main__":
    main()
