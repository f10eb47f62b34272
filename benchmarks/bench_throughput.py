"""Readout throughput of the ConvSNN: snntorch step loop vs the fast multi-step path.

Images/s at batch 64 and 256 and T = 16 and 32 (best of several repeats, wall time, no grad),
the speedup, a spike-for-spike equality check of the two paths, and the peak resident memory
added by one readout (`firing_rates`-style forward of a batch). Prints a table, writes JSON.

    .venv/bin/python benchmarks/bench_throughput.py [--checkpoint models/snn/epoch=005.ckpt]
        [--threads 2] [--repeats 3] [--out results/bench_throughput.json]

Without a checkpoint the architecture comes from params.yaml's `snn` section with random weights
(throughput does not depend on training, only on spike density, which the table reports).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from spikemax.snn import ConvSNN, load_snn


def _status_kib(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status in KiB (0 where /proc is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_memory_mib(fn) -> float:
    """Peak resident memory added while fn() runs, in MiB (resets the kernel's high-water mark)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS
    except OSError:
        return float("nan")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def best_time(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up (the least disturbed by other load)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def build(checkpoint: str | None, params_file: str, num_steps: int) -> ConvSNN:
    """The benchmarked net: a checkpoint, or params.yaml's architecture with random weights."""
    if checkpoint:
        net = load_snn(checkpoint)
    else:
        from spikemax import params as P

        s = P.load(params_file)[0].snn if Path(params_file).is_file() else P.SNNParams()
        torch.manual_seed(0)
        net = ConvSNN(channels=s.channels, kernel=s.kernel, hidden=s.hidden, beta=s.beta,
                      threshold=s.threshold, slope=s.slope, num_steps=num_steps).eval()
    net.num_steps = num_steps
    return net


def main() -> None:
    """Run the grid of (batch, T), print the table and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--out", default="results/bench_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for T in args.steps:
        net = build(args.checkpoint, args.params, T)
        shape = tuple(net.hparams.in_shape)
        for B in args.batches:
            x = torch.randn(B, *shape, generator=torch.Generator().manual_seed(B))
            with torch.no_grad():
                fast = net.forward_spikes(x)
                ref = net.forward_spikes_steps(x)
                identical = all(torch.equal(fast[k], ref[k]) for k in ref)
                density = {k: round(float(v.mean()), 4) for k, v in ref.items()}
                del fast, ref
                t_step = best_time(lambda: net.forward_spikes_steps(x), args.repeats)
                t_fast = best_time(lambda: net.forward_spikes(x), args.repeats)
                mem_step = peak_memory_mib(lambda: net.forward_spikes_steps(x))
                mem_fast = peak_memory_mib(lambda: net.forward_spikes(x))
            rows.append({
                "batch": B, "num_steps": T,
                "step_loop_img_s": B / t_step, "fast_img_s": B / t_fast, "speedup": t_step / t_fast,
                "identical": identical, "peak_mib_step_loop": mem_step, "peak_mib_fast": mem_fast,
                "spike_density": density,
            })

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ConvSNN readout throughput ({args.threads} threads, best of {args.repeats})")
    for col in ["batch", "T", "step loop img/s", "fast img/s", "speedup", "identical", "peak MiB (step / fast)"]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["batch"]), str(r["num_steps"]), f"{r['step_loop_img_s']:.0f}", f"{r['fast_img_s']:.0f}",
            f"{r['speedup']:.2f}x", "yes" if r["identical"] else "NO",
            f"{r['peak_mib_step_loop']:.0f} / {r['peak_mib_fast']:.0f}",
        )
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "repeats": args.repeats, "checkpoint": args.checkpoint,
            "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
