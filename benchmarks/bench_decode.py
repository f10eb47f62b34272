"""Decode time of 256 grid points vs the final SNN's readout of the same batch (target: < 50 %).

Run in a project after `dvc repro` (needs models/generators/*.ckpt and models/snn/):
    python benchmarks/bench_decode.py --out benchmarks/results/decode.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from spikemax import params as P
from spikemax import snn
from spikemax.generators import NAMES, checkpoint_path, load_generator


def best_time(fn, repeats: int) -> float:
    """Best-of-`repeats` wall seconds of fn() (least disturbed by other processes)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params, paths = P.load(args.params)
    ckpts = snn.checkpoints(paths)
    net = snn.load_snn(ckpts[max(ckpts)])
    rows = []
    for name in NAMES:
        grid = load_generator(name, checkpoint_path(name, paths))
        idx = grid.random_indices(args.batch, seed=0)
        x = grid.decode(idx)
        t_dec = best_time(lambda: grid.decode(idx), args.repeats)
        with torch.no_grad():
            t_snn = best_time(lambda: net.class_probs(x), args.repeats)
        rows.append(
            {
                "generator": name,
                "batch": args.batch,
                "decode_s": t_dec,
                "snn_readout_s": t_snn,
                "ratio": t_dec / t_snn,
                "threads": torch.get_num_threads(),
            }
        )
    print(f"{'generator':<10}{'decode ms':>12}{'SNN ms':>10}{'ratio':>8}")
    for r in rows:
        print(f"{r['generator']:<10}{1e3 * r['decode_s']:>12.1f}{1e3 * r['snn_readout_s']:>10.1f}{r['ratio']:>8.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
