"""The search loop's parts per query on each device: decode, SNN readout, optimizer ask + tell.

Runs the maximize stage's loop (ask -> decode -> responder -> tell) for a few steps on each
generator of a params file (default configs/paper-scale.yaml: SN-GAN 128 x 64, VQ-VAE 49 x 512), on
the CPU and, where one is visible, on CUDA, and writes the per-part times and the speed-up of CUDA
over the CPU. Weights are untrained (timing does not depend on training): the generators and the
SNN are built from the params file's shapes. The optimizers stay NumPy on the CPU (see
`optimizer_device` in the JSON): their steps are small sequential kernels, cheaper than launches.

    python benchmarks/bench_device.py --out results/device.json [--params configs/paper-scale.yaml]
        [--devices cpu,cuda] [--batch 64] [--steps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from spikemax import params as P
from spikemax.generators import NAMES, build
from spikemax.neurons import firing_rates
from spikemax.optim import make_optimizer, options_for
from spikemax.snn import ConvSNN, untrained

SHAPES = {"fashion-mnist": [1, 28, 28], "cifar10": [3, 32, 32]}
REPO = Path(__file__).resolve().parents[1]


def build_net(params: P.Params, device: str) -> ConvSNN:
    """The params file's ConvSNN with untrained weights (seed 0), in eval mode on `device`."""
    return untrained(params.snn, SHAPES[params.prepare.dataset]).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def loop_times(params: P.Params, name: str, device: str, batch: int, steps: int, method: str = "auto") -> dict:
    """ms per query of each part of `steps` loop steps (after one warm-up step) on `device`."""
    shape = SHAPES[params.prepare.dataset]
    torch.manual_seed(0)
    meta = {"shape": shape, "mean": [0.5] * shape[0], "std": [0.25] * shape[0]}
    grid = build(name, params, meta).grid().to(device)
    net = build_net(params, device)
    opt = make_optimizer(method, grid.d, grid.n, seed=0, **options_for(method, params, grid))
    parts = {"optimizer": 0.0, "decode": 0.0, "readout": 0.0}
    for step in range(steps + 1):
        t0 = time.perf_counter()
        I = opt.ask(batch)
        t1 = time.perf_counter()
        with torch.no_grad():
            x = grid.decode(I)
            _sync(device)
            t2 = time.perf_counter()
            y = firing_rates(net, x, "class:0")  # the responder's work: a forward pass, rates to the CPU
        t3 = time.perf_counter()
        opt.tell(I, y)
        t4 = time.perf_counter()
        if step:  # the first step includes one-off work (CUDA context and kernels, pycma's setup)
            parts["optimizer"] += (t1 - t0) + (t4 - t3)
            parts["decode"] += t2 - t1
            parts["readout"] += t3 - t2
    q = steps * batch
    out = {f"{k}_ms_per_query": 1e3 * v / q for k, v in parts.items()}
    out["total_ms_per_query"] = sum(out.values())
    out.update(generator=name, d=grid.d, n=grid.n, device=device, method=method, image_device=x.device.type)
    return out


def main(argv: list[str] | None = None) -> int:
    """Time the loop on each device, print a table, write JSON with the CUDA speed-ups."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "configs" / "paper-scale.yaml"))
    ap.add_argument("--devices", default=None, help="comma list (default: cpu, and cuda when visible)")
    ap.add_argument("--generators", default=",".join(NAMES))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default="results/device.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    params, _ = P.load(args.params)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [loop_times(params, g, dev, args.batch, args.steps) for dev in devices for g in args.generators.split(",")]
    speedup = {}
    for g in args.generators.split(","):
        cpu = next((r for r in rows if r["generator"] == g and r["device"] == "cpu"), None)
        for r in rows:
            if cpu is not None and r["generator"] == g and r["device"] != "cpu":
                speedup[f"{g}/{r['device']}"] = {
                    k.removesuffix("_ms_per_query"): cpu[k] / r[k] if r[k] > 0 else float("nan")
                    for k in cpu
                    if k.endswith("_ms_per_query")
                }
    print(
        f"{'generator':<10}{'device':<8}{'d x n':>10}{'optimizer':>11}{'decode':>9}{'readout':>9}{'total':>9}  ms/query"
    )
    for r in rows:
        print(
            f"{r['generator']:<10}{r['device']:<8}{str(r['d']) + ' x ' + str(r['n']):>10}"
            f"{r['optimizer_ms_per_query']:>11.3f}{r['decode_ms_per_query']:>9.3f}"
            f"{r['readout_ms_per_query']:>9.3f}{r['total_ms_per_query']:>9.3f}"
        )
    for key, s in speedup.items():
        print(f"speed-up {key} over cpu: " + ", ".join(f"{k} {v:.1f}x" for k, v in s.items()))
    meta = {
        "params": args.params,
        "batch": args.batch,
        "steps": args.steps,
        "threads": args.threads,
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "machine": platform.machine(),
        "optimizer_device": "cpu (numpy)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "speedup": speedup}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
