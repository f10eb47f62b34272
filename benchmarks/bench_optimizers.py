"""Query efficiency of the grid maximizers on discretized functions with known maxima.

Usage:
  python benchmarks/bench_optimizers.py            # --quick suite (a few minutes on 2 cores)
  python benchmarks/bench_optimizers.py --full     # d 10..768, n in {2,16,64}, budgets 1k/4k/10k, 5 seeds
  python benchmarks/bench_optimizers.py --methods tt,cma --budgets 1000,4000 --seeds 3 --out r.json
  python benchmarks/bench_optimizers.py --overhead # TT/PROTES ms per query at d=768, n=2, r=5, batch 100
  python benchmarks/bench_optimizers.py --scale --out scale.json   # ms per query (ask + tell) of every
      method over d in {16, 128, 512, 4096} x n in {16, 64, 512}, next to one SNN readout per image

Scale (--scale): optimizer time per query, ask + tell on a free linear response, batch 64 (the
maximize stage's), after one untimed warm-up step, wall and process CPU time (the steadier number
on a shared machine), and next to it one readout of the SNN per image measured in the same run:
the maximize stage's responder (all spiking layers' rates) on a batch of 64 random images, best of
--repeats, the net from --checkpoint or params.yaml's `snn` shape with untrained weights.

Normalized score of a run at budget B:
  (best found in the first B queries - random_ref) / (known_max - random_ref)
where random_ref is the mean of f over 1,000 uniform random grid points (the expected value of
one random query), so 1 = the known maximum and 0 = a typical random stimulus. Every method runs
once per (problem, seed) with the largest budget; the score at a smaller budget reads the prefix
of the same run (NGOpt is told the largest budget). Overhead = optimizer time (ask + tell, no
function evaluations) per query.

Families (each with its maximum planted at a random grid point, so it is known exactly):
  separable  random table W (d, n); f = sum_j W[j, i_j]
  ackley, rastrigin, alpine   -F(x(i) - x(i*)) on the grid x = linspace(-a, a, n), shifted optimum
  sphere, ellipsoid, rosenbrock   smooth continuous functions the same way: sum z^2; a randomly
             rotated ellipsoid (condition number 100); Rosenbrock with its minimum moved to x(i*)
  tt         log of a random rank-3 non-negative TT tensor with cores in [0, 1) and all-ones slices
             at i* (every product of such cores is <= the all-ones product, so i* is a maximum)
  qubo       sparse Mattis spin glass: sum_{(j,l)} |J_jl| s*_j s*_l s_j s_l with s = 2 x - 1,
             x = i / (n - 1); the maximum sum |J| is reached at i* (and its mirror for n = 2)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spikemax.optim import make_optimizer
from spikemax.optim.base import run_maximize

Func = Callable[[np.ndarray], np.ndarray]


@dataclass
class Problem:
    """A discretized function with its known maximum and random reference."""

    name: str
    family: str
    d: int
    n: int
    f: Func
    known_max: float
    random_ref: float


def grid_shift(d: int, n: int, a: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Grid values linspace(-a, a, n) and a random optimum index i*."""
    return np.linspace(-a, a, n), rng.integers(0, n, d)


def make_continuous(family: str, d: int, n: int, rng: np.random.Generator) -> tuple[Func, float]:
    """Ackley / Rastrigin / Alpine maximized at a random grid point (value 0)."""
    a = {"ackley": 32.768, "rastrigin": 5.12, "alpine": 10.0}[family]
    x, i_star = grid_shift(d, n, a, rng)
    x_star = x[i_star]

    def F(Z: np.ndarray) -> np.ndarray:
        if family == "ackley":
            return (
                -20 * np.exp(-0.2 * np.sqrt(np.mean(Z**2, axis=1)))
                - np.exp(np.mean(np.cos(2 * np.pi * Z), axis=1))
                + 20
                + np.e
            )
        if family == "rastrigin":
            return 10 * Z.shape[1] + np.sum(Z**2 - 10 * np.cos(2 * np.pi * Z), axis=1)
        return np.sum(np.abs(Z * np.sin(Z) + 0.1 * Z), axis=1)

    return (lambda I: -F(x[I] - x_star)), 0.0


def make_smooth(family: str, d: int, n: int, rng: np.random.Generator) -> tuple[Func, float]:
    """Sphere / rotated ellipsoid / Rosenbrock maximized at a random grid point (value 0)."""
    a = {"sphere": 5.0, "ellipsoid": 5.0, "rosenbrock": 2.048}[family]
    x, i_star = grid_shift(d, n, a, rng)
    x_star = x[i_star]
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scale = 10.0 ** (np.arange(d) / max(d - 1, 1))  # axis lengths 1..10: condition number 100

    def F(Z: np.ndarray) -> np.ndarray:
        if family == "sphere":
            return np.sum(Z**2, axis=1)
        if family == "ellipsoid":
            return np.sum((Z @ Q * scale) ** 2, axis=1)
        X = Z + 1.0  # Rosenbrock's minimum is at 1
        return np.sum(100.0 * (X[:, 1:] - X[:, :-1] ** 2) ** 2 + (1.0 - X[:, :-1]) ** 2, axis=1)

    return (lambda I: -F(x[I] - x_star)), 0.0


def make_separable(d: int, n: int, rng: np.random.Generator) -> tuple[Func, float]:
    """f = sum_j W[j, i_j] for a random table W."""
    W = rng.random((d, n))
    return (lambda I: W[np.arange(d), I].sum(axis=1)), float(W.max(axis=1).sum())


def make_tt(d: int, n: int, rng: np.random.Generator, r: int = 3) -> tuple[Func, float]:
    """log of a non-negative rank-r TT with all-ones slices at a planted i*."""
    G = rng.random((d, r, n, r))
    i_star = rng.integers(0, n, d)
    G[np.arange(d), :, i_star, :] = 1.0

    def f(I: np.ndarray) -> np.ndarray:
        v = np.ones((I.shape[0], r))
        logs = np.zeros(I.shape[0])
        for k in range(d):
            v = np.einsum("br,brq->bq", v, G[k][:, I[:, k], :].transpose(1, 0, 2))
            s = v.sum(axis=1)
            logs += np.log(s)
            v /= s[:, None]
        return logs

    return f, float(f(i_star[None])[0])


def make_qubo(d: int, n: int, rng: np.random.Generator, degree: int = 4) -> tuple[Func, float]:
    """Sparse Mattis spin glass with a planted ground state."""
    m = max(d * degree // 2, 1)
    j, l = rng.integers(0, d, m), rng.integers(0, d, m)
    keep = j != l
    j, l = j[keep], l[keep]
    w = rng.random(j.size) + 0.1
    s_star = rng.choice([-1.0, 1.0], d)
    i_star = np.where(s_star > 0, n - 1, 0)
    J = w * s_star[j] * s_star[l]

    def f(I: np.ndarray) -> np.ndarray:
        s = 2.0 * I / (n - 1) - 1.0
        return (s[:, j] * s[:, l]) @ J

    return f, float(f(i_star[None])[0])


FAMILIES = ("separable", "ackley", "rastrigin", "alpine", "tt", "qubo", "sphere", "ellipsoid", "rosenbrock")
SMOOTH = ("sphere", "ellipsoid", "rosenbrock")


def make_problem(family: str, d: int, n: int, seed: int) -> Problem:
    """Build one problem instance (the instance depends on the seed too)."""
    rng = np.random.default_rng([seed, d, n, FAMILIES.index(family)])
    if family == "separable":
        f, fmax = make_separable(d, n, rng)
    elif family == "tt":
        f, fmax = make_tt(d, n, rng)
    elif family == "qubo":
        f, fmax = make_qubo(d, n, rng)
    elif family in SMOOTH:
        f, fmax = make_smooth(family, d, n, rng)
    else:
        f, fmax = make_continuous(family, d, n, rng)
    R = np.random.default_rng(12345).integers(0, n, (1000, d))
    return Problem(f"{family}-d{d}-n{n}", family, d, n, f, fmax, float(np.mean(f(R))))


def parse_variant(spec: str) -> tuple[str, dict]:
    """`method` or `method:key=value:...` (a variant with options, e.g. tt:cma=0.5:rank=3)."""
    method, *pairs = spec.split(":")
    opts: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        opts[key] = json.loads(value) if value[:1] in "-0123456789tfn[{" else value
    return method, opts


def method_options(method: str, d: int, n: int, budget: int) -> dict:
    """Per-method options for the benchmark (package defaults unless stated)."""
    method, opts = parse_variant(method)
    if method == "ngopt":
        return {"budget": budget, **opts}
    return opts


def run_one(problem: Problem, method: str, seed: int, budgets: list[int], batch: int | None = None) -> dict:
    """One run with the largest budget; scores at every budget from its prefix."""
    B = max(budgets)
    opts = method_options(method, problem.d, problem.n, B)
    if batch is not None:
        opts["batch"] = batch
    opt = make_optimizer(parse_variant(method)[0], problem.d, problem.n, seed=seed, **opts)
    t0 = time.perf_counter()
    res = run_maximize(opt, problem.f, B)
    wall = time.perf_counter() - t0
    best = np.maximum.accumulate(np.where(np.isfinite(res.history), res.history, -np.inf))
    span = problem.known_max - problem.random_ref
    scores = {str(b): float((best[b - 1] - problem.random_ref) / span) for b in budgets}
    return {
        "problem": problem.name,
        "family": problem.family,
        "d": problem.d,
        "n": problem.n,
        "method": method,
        "seed": seed,
        "scores": scores,
        "y_best": float(res.y_best),
        "known_max": problem.known_max,
        "random_ref": problem.random_ref,
        "ms_per_query": 1e3 * res.seconds_optimizer / B,
        "wall_s": wall,
    }


SUITES = {
    "quick": {
        "configs": [(10, 16), (32, 2), (32, 64), (100, 2)],
        "budgets": [1000, 4000],
        "seeds": 2,
    },
    "full": {
        "configs": [(10, 2), (10, 16), (10, 64), (64, 2), (64, 16), (64, 64), (256, 2), (256, 16), (768, 2)],
        "budgets": [1000, 4000, 10000],
        "seeds": 5,
    },
}


def available_methods() -> list[str]:
    """Every method; protes only when the reference package imports."""
    methods = ["tt", "cma", "ngopt", "random"]
    try:
        from spikemax.optim.baselines import import_protes

        import_protes()
        methods.insert(3, "protes")
    except ImportError:
        print("note: protes not installed, skipping it", file=sys.stderr)
    return methods


def summarize(rows: list[dict], methods: list[str], budgets: list[int]) -> dict:
    """Median normalized score per method x budget and median overhead per method."""
    out = {}
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        out[m] = {
            "median_score": {str(b): float(np.median([r["scores"][str(b)] for r in rs])) for b in budgets},
            "mean_score": {str(b): float(np.mean([r["scores"][str(b)] for r in rs])) for b in budgets},
            "ms_per_query": float(np.median([r["ms_per_query"] for r in rs])),
            "runs": len(rs),
        }
    return out


def smooth_table(rows: list[dict], methods: list[str], budgets: list[int]) -> dict:
    """Median score over seeds per smooth problem and over problems x seeds per smooth family, per method.

    The issue's check: TT >= CMA-ES on each smooth continuous function at every budget.
    """
    out: dict = {"problem": {}, "family": {}}
    for level, key in (("problem", "problem"), ("family", "family")):
        groups = dict.fromkeys(r[key] for r in rows if r["family"] in SMOOTH)
        for g in groups:
            out[level][g] = {
                m: {
                    str(b): float(np.median([r["scores"][str(b)] for r in rows if r[key] == g and r["method"] == m]))
                    for b in budgets
                }
                for m in methods
                if any(r[key] == g and r["method"] == m for r in rows)
            }
    return out


def print_smooth(table: dict, budgets: list[int]) -> None:
    """Per smooth family and problem: each method's median score per budget."""
    for level in ("family", "problem"):
        for g, per in table[level].items():
            cells = "  ".join(f"{m} " + "/".join(f"{v[str(b)]:.3f}" for b in budgets) for m, v in per.items())
            print(f"{g:<22} {cells}")


def print_table(summary: dict, budgets: list[int]) -> None:
    """Median (mean) normalized score per method and budget, and overhead."""
    head = f"{'method':<16}" + "".join(f"{'B=' + str(b):>18}" for b in budgets) + f"{'ms/query':>11}"
    print(head)
    for m, s in summary.items():
        cells = "".join(f"{s['median_score'][str(b)]:>10.3f} ({s['mean_score'][str(b)]:.3f})" for b in budgets)
        print(f"{m:<16}{cells}{s['ms_per_query']:>11.3f}")
    print("cells: median (mean) normalized score over problems x seeds")


def overhead(methods: list[str], reps: int = 100) -> dict:
    """Optimizer time per query at d=768, n=2, rank 5, batch 100 (f is free)."""
    out = {}
    for m in methods:
        opts = {"tt": {"rank": 5, "batch": 100}, "protes": {"r": 5, "batch": 100}}.get(m)
        if opts is None:
            continue
        opt = make_optimizer(m, 768, 2, seed=0, **opts)
        f = lambda I: I.sum(axis=1).astype(float)  # noqa: E731
        t0 = time.perf_counter()
        for _ in range(reps):  # includes PROTES compilation, as in the issue
            I = opt.ask()
            opt.tell(I, f(I))
        out[m] = 1e3 * (time.perf_counter() - t0) / (reps * 100)
        print(f"overhead {m}: {out[m]:.3f} ms/query (d=768, n=2, r=5, batch 100, {reps} steps incl. warm-up)")
    return out


SCALE_DIMS = (16, 128, 512, 4096)
SCALE_SIZES = (16, 64, 512)
SCALE_METHODS = ("random", "cma", "ngopt", "tt", "tt:cma=0.5")


def time_optimizer(spec: str, d: int, n: int, batch: int, steps: int, seed: int = 0) -> dict:
    """ms per query of ask + tell (wall and CPU) after one untimed warm-up step; f is a free linear response."""
    method, opts = parse_variant(spec)
    if method == "ngopt":
        opts.setdefault("budget", batch * (steps + 1))
    w = np.random.default_rng(seed).standard_normal(d)
    t0 = time.perf_counter()
    opt = make_optimizer(method, d, n, seed=seed, **opts)
    init_s = time.perf_counter() - t0
    wall = cpu = 0.0
    for step in range(steps + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        I = opt.ask(batch)
        w1, c1 = time.perf_counter(), time.process_time()
        y = (I / (n - 1)) @ w
        w2, c2 = time.perf_counter(), time.process_time()
        opt.tell(I, y)
        w3, c3 = time.perf_counter(), time.process_time()
        if step:  # the first step includes one-off work (pycma's first eigendecomposition, caches)
            wall += (w1 - w0) + (w3 - w2)
            cpu += (c1 - c0) + (c3 - c2)
    q = steps * batch
    return {
        "method": spec,
        "d": d,
        "n": n,
        "batch": batch,
        "steps": steps,
        "init_s": init_s,
        "ms_per_query": 1e3 * wall / q,
        "cpu_ms_per_query": 1e3 * cpu / q,
    }


def readout_ms_per_image(checkpoint: str | None, params_file: str, batch: int, repeats: int) -> dict:
    """One readout of the SNN per image: the maximize stage's responder (all spiking layers) on `batch` images."""
    import torch

    from spikemax import params as P
    from spikemax.neurons import layer_rates
    from spikemax.snn import load_snn, untrained

    if checkpoint:
        net, source = load_snn(checkpoint), checkpoint
    else:
        s = P.load(params_file)[0].snn if Path(params_file).is_file() else P.SNNParams()
        net = untrained(s)
        source = f"{params_file} snn shape, untrained"
    net.eval()
    x = torch.rand(batch, *tuple(net.hparams.in_shape), generator=torch.Generator().manual_seed(0))
    layer_rates(net, x)  # warm-up
    wall = cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        layer_rates(net, x)
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return {
        "source": source,
        "num_steps": int(net.num_steps),
        "batch": batch,
        "threads": torch.get_num_threads(),
        "ms_per_image": 1e3 * wall / batch,
        "cpu_ms_per_image": 1e3 * cpu / batch,
    }


def scale(args: argparse.Namespace, methods: list[str]) -> dict:
    """The --scale table: every method over d x n, and the SNN readout per image."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    dims = [int(v) for v in args.dims.split(",")]
    sizes = [int(v) for v in args.sizes.split(",")]
    readout = readout_ms_per_image(args.checkpoint, args.params, args.batch or 64, args.repeats)
    print(
        f"SNN readout: {readout['ms_per_image']:.3f} ms/image wall, {readout['cpu_ms_per_image']:.3f} CPU"
        f" ({readout['source']}, T = {readout['num_steps']}, batch {readout['batch']}, {args.threads} thread(s))",
        flush=True,
    )
    rows = []
    with threadpool_limits(args.threads):
        for d in dims:
            for n in sizes:
                for m in methods:
                    row = time_optimizer(m, d, n, args.batch or 64, args.steps)
                    row["readout_ratio"] = row["ms_per_query"] / readout["ms_per_image"]
                    row["readout_ratio_cpu"] = row["cpu_ms_per_query"] / readout["cpu_ms_per_image"]
                    rows.append(row)
                    print(
                        f"d={d:<5} n={n:<4} {m:<12} {row['ms_per_query']:>8.3f} ms/q  {row['cpu_ms_per_query']:>8.3f}"
                        f" CPU ms/q  {row['readout_ratio_cpu']:>6.2f} x readout (CPU)  init {row['init_s']:.2f} s",
                        flush=True,
                    )
    print_scale(rows, methods, dims, sizes)
    return {"readout": readout, "rows": rows, "threads": args.threads, "steps": args.steps}


def print_scale(rows: list[dict], methods: list[str], dims: list[int], sizes: list[int]) -> None:
    """CPU ms per query: one line per (d, n), one column per method."""
    print(f"{'d':>6}{'n':>6}" + "".join(f"{m:>14}" for m in methods) + "   (CPU ms per query)")
    for d in dims:
        for n in sizes:
            cells = {r["method"]: r["cpu_ms_per_query"] for r in rows if r["d"] == d and r["n"] == n}
            print(f"{d:>6}{n:>6}" + "".join(f"{cells.get(m, float('nan')):>14.3f}" for m in methods))


def main(argv: list[str] | None = None) -> int:
    """Run a suite, print the table, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the issue's complete suite")
    ap.add_argument("--quick", action="store_true", help="the default short suite")
    ap.add_argument("--methods", default=None, help="comma list (default: all available)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--configs", default=None, help="e.g. 10x16,32x2 (d x n)")
    ap.add_argument("--budgets", default=None, help="e.g. 1000,4000")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="points per ask for every method (default: each its own)")
    ap.add_argument("--overhead", action="store_true", help="only the d=768 overhead measurement")
    ap.add_argument("--scale", action="store_true", help="ms per query over d x n, next to one SNN readout")
    ap.add_argument("--dims", default=",".join(map(str, SCALE_DIMS)), help="--scale: d values")
    ap.add_argument("--sizes", default=",".join(map(str, SCALE_SIZES)), help="--scale: n values")
    ap.add_argument("--steps", type=int, default=4, help="--scale: timed ask + tell steps per cell")
    ap.add_argument("--threads", type=int, default=1, help="--scale: torch and BLAS threads")
    ap.add_argument("--repeats", type=int, default=5, help="--scale: readout repeats (best of)")
    ap.add_argument("--checkpoint", default=None, help="--scale: SNN checkpoint (default: params.yaml's shape)")
    ap.add_argument("--params", default="params.yaml", help="--scale: params file with the `snn` shape")
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/optimizers-<suite>.json)")
    args = ap.parse_args(argv)

    suite_name = "full" if args.full else ("scale" if args.scale else "quick")
    suite = dict(SUITES.get(suite_name, SUITES["quick"]))
    if args.scale:
        methods = args.methods.split(",") if args.methods else list(SCALE_METHODS)
    else:
        methods = args.methods.split(",") if args.methods else available_methods()
    if args.scale:
        result = scale(args, methods)
    elif args.overhead:
        result = {"overhead_ms_per_query": overhead(methods)}
    else:
        if args.configs:
            suite["configs"] = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
        if args.budgets:
            suite["budgets"] = [int(b) for b in args.budgets.split(",")]
        if args.seeds:
            suite["seeds"] = args.seeds
        budgets = suite["budgets"]
        rows = []
        for d, n in suite["configs"]:
            for family in args.families.split(","):
                for seed in range(suite["seeds"]):
                    problem = make_problem(family, d, n, seed)
                    for m in methods:
                        row = run_one(problem, m, seed, budgets, args.batch)
                        rows.append(row)
                        sc = " ".join(f"{row['scores'][str(b)]:.3f}" for b in budgets)
                        print(f"{problem.name:<22} s{seed} {m:<12} {sc}  {row['ms_per_query']:.3f} ms/q", flush=True)
        summary = summarize(rows, methods, budgets)
        print_table(summary, budgets)
        smooth = smooth_table(rows, methods, budgets)
        print_smooth(smooth, budgets)
        result = {
            "suite": suite_name,
            "config": {**suite, "methods": methods},
            "summary": summary,
            "smooth": smooth,
            "runs": rows,
        }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"optimizers-{suite_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
