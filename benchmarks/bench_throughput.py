"""Readout throughput of the ConvSNN: snntorch step loop vs the fast multi-step path.

Images/s at batch 64 and 256 and T = 16 and 32 (best of several repeats, no grad), the speedup in
wall time and in process CPU time (the steadier number on a shared machine), a spike-for-spike
equality check of the two paths, and the peak resident memory one readout of a batch adds (measured
in a fresh process). Prints a table, writes JSON.

    .venv/bin/python benchmarks/bench_throughput.py [--checkpoint models/snn/epoch=005.ckpt]
        [--threads 2] [--repeats 3] [--out results/bench_throughput.json]

Without a checkpoint the architecture comes from params.yaml's `snn` section with random weights
(throughput does not depend on training, only on spike density, which the table reports).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from spikemax.snn import ConvSNN, load_snn, untrained


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


def best_time(fn, repeats: int) -> tuple[float, float]:
    """Best wall and best CPU time of `repeats` calls after one warm-up (least disturbed by other load)."""
    fn()
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def child_peak_mib(args: argparse.Namespace, mode: str, batch: int, steps: int) -> float:
    """Peak memory one readout adds in a fresh process (no allocator cache from earlier runs)."""
    cmd = [
        sys.executable,
        __file__,
        "--memory-child",
        mode,
        str(batch),
        str(steps),
        "--threads",
        str(args.threads),
        "--params",
        args.params,
    ] + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def memory_child(args: argparse.Namespace) -> None:
    """Run one readout of --memory-child MODE BATCH T and print the peak MiB it added."""
    mode, batch, steps = args.memory_child[0], int(args.memory_child[1]), int(args.memory_child[2])
    net = build(args.checkpoint, args.params, steps)
    x = torch.randn(batch, *tuple(net.hparams.in_shape))
    fn = net.forward_spikes if mode == "fast" else net.forward_spikes_steps
    with torch.no_grad():
        print(peak_memory_mib(lambda: fn(x)))


def build(checkpoint: str | None, params_file: str, num_steps: int) -> ConvSNN:
    """The benchmarked net: a checkpoint, or params.yaml's architecture with random weights."""
    if checkpoint:
        net = load_snn(checkpoint)
    else:
        from spikemax import params as P

        s = P.load(params_file)[0].snn if Path(params_file).is_file() else P.SNNParams()
        net = untrained(s.model_copy(update={"num_steps": num_steps}))
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
    ap.add_argument("--memory-child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return

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
                t_step, c_step = best_time(lambda: net.forward_spikes_steps(x), args.repeats)
                t_fast, c_fast = best_time(lambda: net.forward_spikes(x), args.repeats)
            mem_step = child_peak_mib(args, "step", B, T)
            mem_fast = child_peak_mib(args, "fast", B, T)
            rows.append(
                {
                    "batch": B,
                    "num_steps": T,
                    "step_loop_img_s": B / t_step,
                    "fast_img_s": B / t_fast,
                    "speedup": t_step / t_fast,
                    "step_loop_img_cpu_s": B / c_step,
                    "fast_img_cpu_s": B / c_fast,
                    "speedup_cpu": c_step / c_fast,
                    "identical": identical,
                    "peak_mib_step_loop": mem_step,
                    "peak_mib_fast": mem_fast,
                    "spike_density": density,
                }
            )

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ConvSNN readout throughput ({args.threads} threads, best of {args.repeats})")
    for col in [
        "batch",
        "T",
        "step img/s",
        "fast img/s",
        "speedup",
        "speedup (CPU time)",
        "identical",
        "peak MiB step / fast",
    ]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["batch"]),
            str(r["num_steps"]),
            f"{r['step_loop_img_s']:.0f}",
            f"{r['fast_img_s']:.0f}",
            f"{r['speedup']:.2f}x",
            f"{r['speedup_cpu']:.2f}x",
            "yes" if r["identical"] else "NO",
            f"{r['peak_mib_step_loop']:.0f} / {r['peak_mib_fast']:.0f}",
        )
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "threads": args.threads,
        "repeats": args.repeats,
        "checkpoint": args.checkpoint,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
