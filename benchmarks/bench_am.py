"""The activation-maximization loop on real checkpoints: logging overhead and method comparison.

Run from a project root that has run `dvc repro` up to train_generator (models/snn, models/generators):
  python benchmarks/bench_am.py --out benchmarks/results/am.json
  python benchmarks/bench_am.py --quick            # smaller budgets, fewer neurons (smoke run)
  python benchmarks/bench_am.py --root /tmp/repro --seed 1 --methods auto:prior=1,ngopt --prior --out a.json
  python benchmarks/bench_am.py --merge a.json,b.json --out ab.json   # runs of other methods, same neurons
  python benchmarks/bench_am.py --methods auto,auto:tuned=1 --prior   # untuned vs tuned default (metrics/tune.json)

1. Overhead: the same lock-step AM loop (same seeds, so the same queries) with every query logged
   (MLflow `log_batch` to a fresh sqlite store + the parquet query table) and with logging off;
   overhead % = (t_logged - t_off) / t_logged, best of `--repeats` alternated runs each. On a
   shared machine that difference is noise-prone, so the time spent inside the loggers as a share
   of the logged loop's wall time is reported too (logging_share_pct).
2. Methods: `--neurons` units sampled over all spiking layers of the default (last) checkpoint, one
   run per (method, neuron) with budget max(--budgets). Normalized best activation of a run at B
   queries = best in its first B queries / best over every method's full run for that neuron
   (Wang & Ponce 2022), so 1 = the best any method found. Medians per method and budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from noise_common import setup


def _setup(params_path: str, generator: str, root: str | None = None):
    """noise_common.setup (last checkpoint, one generator) plus the prepared data, for AM gain."""
    from spikemax import params as P
    from spikemax.data import Prepared

    params, net, grid, epoch = setup(params_path, generator, root)
    return params, net, grid, epoch, Prepared.load(P.load(params_path, root)[1].prepared)


def _neurons(net, k: int, seed: int) -> list[str]:
    """k targets spread over every spiking layer (round-robin), reproducible."""
    rng = np.random.default_rng(seed)
    layers = net.spiking_layers()
    per = {name: list(rng.permutation(units)) for name, units in layers.items()}
    out, names = [], list(layers)
    while len(out) < k and any(per.values()):
        for name in names:
            if per[name] and len(out) < k:
                u = int(per[name].pop(0))
                out.append(f"class:{u}" if name == "out" else f"{name}:{u}")
    return out


def bench_overhead(net, grid, targets, budget, batch, repeats, root: Path) -> dict:
    """Wall time of the loop with and without per-query logging (same queries either way)."""
    import mlflow

    from spikemax import tracking
    from spikemax.am.loop import run_am_group
    from spikemax.neurons import make_responder
    from spikemax.optim import make_optimizer
    from spikemax.querylog import QueryLogger

    tracking.enable_fast_sqlite()  # as the maximize stage does
    uri = tracking.configure(root)
    client = mlflow.MlflowClient(uri)
    eid = tracking.experiment_id(tracking.AM_EXPERIMENT, root)
    responder = make_responder(net, targets)

    spent = []

    def once(logged: bool) -> float:
        opts = [make_optimizer("tt", grid.d, grid.n, seed=i) for i in range(len(targets))]
        loggers = None
        if logged:
            loggers = [
                QueryLogger(client, client.create_run(eid).info.run_id, root / f"r{i}_{time.time_ns()}")
                for i in range(len(targets))
            ]
        t = time.perf_counter()
        run_am_group(opts, grid, responder, budget, batch, loggers=loggers)
        if loggers:
            for lg in loggers:
                lg.close()
            spent.append((sum(lg.seconds for lg in loggers), time.perf_counter() - t))
        return time.perf_counter() - t

    once(False)  # warm-up (allocator, lazy imports of both paths)
    once(True)
    spent.clear()
    on, off = [], []
    for _ in range(repeats):
        off.append(once(False))
        on.append(once(True))
    t_on, t_off = min(on), min(off)
    n = budget * len(targets)
    # Robust to a shared machine's changing load: the logged runs' own time inside the logger.
    frac = [s / w for s, w in spent]
    return {
        "targets": len(targets),
        "budget": budget,
        "batch": batch,
        "queries": n,
        "logging_share_pct": round(100 * float(np.median(frac)), 2),
        "logging_ms_per_query_measured": round(1000 * float(np.median([s for s, _ in spent])) / n, 4),
        "wall_logged_s": round(t_on, 3),
        "wall_off_s": round(t_off, 3),
        "queries_per_s_logged": round(n / t_on, 1),
        "queries_per_s_off": round(n / t_off, 1),
        "overhead_pct": round(100 * (t_on - t_off) / t_on, 2),
        "logging_ms_per_query": round(1000 * (t_on - t_off) / n, 4),
    }


def parse_variant(spec: str) -> tuple[str, dict]:
    """`method` or `method:key=value:...` (e.g. tt:cma=0.9, random:prior=1)."""
    method, *pairs = spec.split(":")
    opts: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        opts[key] = json.loads(value) if value[:1] in "-0123456789tfn[{" else value
    return method, opts


def fit_prior(grid, prepared, rank: int, seed: int, max_images: int = 4000):
    """TT prior of the codebook indices of (up to max_images) encoded train images."""
    from spikemax.optim.prior import fit_tt_prior

    x, _ = prepared.tensors("train")
    idx = grid.encode(x[:max_images]).numpy()
    t = time.perf_counter()
    prior = fit_tt_prior(idx, grid.n, rank=rank, seed=seed)
    print(f"  prior: {len(idx)} encoded train images, fit in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return prior, idx


def prior_entropy(net, grid, prior, classes: list[str], seed: int, k: int = 1000) -> dict:
    """Predicted-class entropy (nats) of k prior samples and of k uniform codes under the SNN."""

    rng = np.random.default_rng(seed)
    out = {}
    for name, idx in (("prior", prior.sample(k, rng)), ("uniform", rng.integers(0, grid.n, (k, grid.d)))):
        parts = torch.as_tensor(idx).split(250)
        probs = torch.cat([net.class_probs(grid.decode(part)).float() for part in parts])
        hist = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).double()
        p = hist[hist > 0] / hist.sum()
        out[name] = round(float(-(p * p.log()).sum()), 4)  # entropy of the predicted classes (nats)
    return out


def bench_methods(
    net, grid, targets, methods, budgets, batch, seed, m, prepared, prior=None, tuned=None, generator=""
) -> dict:
    """Normalized best activation and AM gain per method at each budget (prefixes of one run per neuron).

    Each method gets the maximize stage's options from params `m` (TT: `maximize.tt`, resolved for this
    grid as the stage resolves it), updated by the variant's own options (`tt:cma=0.9`); `prior=1`
    passes the fitted data prior; `tuned=1` runs what the stage runs with `maximize.tuned` (the tune
    stage's adopted method, settings and SN-GAN grid resolution for `generator`, from `tuned`).
    AM gain = best AM activation / best activation over the test images.
    """
    from spikemax.am.loop import run_am_group
    from spikemax.am.policy import run_options, tuned_for
    from spikemax.neurons import firing_rates, make_responder
    from spikemax.optim import make_optimizer, options_for
    from spikemax.tuning import tuned_grid

    top = max(budgets)
    responder = make_responder(net, targets)
    x, _ = prepared.tensors("test")
    with torch.no_grad():
        data_max = np.concatenate([firing_rates(net, x[i : i + 500], targets) for i in range(0, len(x), 500)]).max(0)
    curves: dict[str, np.ndarray] = {}
    walls, options = {}, {}
    for spec in methods:
        method, extra = parse_variant(spec)
        on = grid
        if extra.pop("tuned", 0):  # as the stage runs it with maximize.tuned
            on = tuned_grid(grid, tuned_for(tuned, method, generator).get("grid_n"))
            opts = run_options(m, tuned, method, generator, bool(grid.ordered))
        else:
            opts = options_for(method, m, grid)
        opts.update(extra)
        if opts.pop("prior", 0):
            if prior is None:
                raise SystemExit(f"{spec}: prior=1 needs the vqvae grid")
            opts["prior"] = prior
        if method == "ngopt":
            opts["budget"] = top
        options[spec] = {k: v for k, v in opts.items() if k != "prior"} | ({"prior": True} if "prior" in opts else {})
        optimizers = [make_optimizer(method, on.d, on.n, seed=seed, **opts) for _ in targets]
        t = time.perf_counter()
        results = run_am_group(optimizers, on, responder, top, batch)
        walls[spec] = round(time.perf_counter() - t, 2)
        curves[spec] = np.stack([np.fmax.accumulate(np.nan_to_num(r.responses, nan=-np.inf)) for r in results])
        print(f"  {spec}: {walls[spec]} s", file=sys.stderr)
    # Per-neuron bests at each budget (None: no finite response), so runs of other methods on the same
    # neurons and seed can be merged and renormalized later (`--merge`).
    best = {
        spec: {str(b): [float(v) if np.isfinite(v) else None for v in c[:, b - 1]] for b in budgets}
        for spec, c in curves.items()
    }
    meta = {spec: {"wall_s": walls[spec], "options": options[spec]} for spec in curves}
    return score(targets, [float(v) for v in data_max], budgets, best, meta)


def score(targets: list[str], data_max: list[float], budgets: list[int], best: dict, meta: dict) -> dict:
    """Median normalized best and AM gain per method and budget from per-neuron bests `best[spec][B]`.

    Normalized best of a run at B = its best in the first B queries / the best any method found for that
    neuron (at the largest budget); neurons no method made fire have no scale and are left out.
    """
    top = str(max(budgets))
    arr = {
        spec: {b: np.array([-np.inf if v is None else v for v in vals], dtype=np.float64) for b, vals in per.items()}
        for spec, per in best.items()
    }
    ref = np.max(np.stack([a[top] for a in arr.values()]), axis=0)  # per neuron
    ok = ref > 0
    dmax = np.asarray(data_max, dtype=np.float64)
    fires = dmax > 0
    out = {}
    for spec, a in arr.items():
        out[spec] = {**meta.get(spec, {}), "best": best[spec]}
        for b in map(str, budgets):
            norm = a[b][ok] / ref[ok]
            gain = a[b][fires] / dmax[fires]
            out[spec][b] = {
                "median": round(float(np.median(norm)), 4) if ok.any() else None,
                "mean": round(float(np.mean(norm)), 4) if ok.any() else None,
                "median_am_gain": round(float(np.median(gain)), 4) if fires.any() else None,
                "share_am_gain_gt_1": round(float(np.mean(gain > 1)), 4) if fires.any() else None,
            }
    return {
        "targets": targets,
        "data_max": list(data_max),
        "n_scored": int(ok.sum()),
        "n_gain": int(fires.sum()),
        "budgets": budgets,
        "methods": out,
    }


def merge(paths: list[str]) -> dict:
    """Results of several bench_am JSONs on the same neurons (same --seed, --neurons, checkpoint) as one,
    renormalized over every method of every file (a later file's method of the same name wins)."""
    merged: dict = {}
    for path in paths:
        for generator, result in json.loads(Path(path).read_text()).items():
            r = result.get("methods")
            if r is None or "best" not in next(iter(r["methods"].values()), {}):
                raise SystemExit(f"{path}: {generator} has no per-neuron bests (rerun it with this bench_am)")
            if generator not in merged:
                merged[generator] = {**result, "merged_from": [path]}
                continue
            into = merged[generator]
            m = into["methods"]
            if r["targets"] != m["targets"] or r["budgets"] != m["budgets"] or r["data_max"] != m["data_max"]:
                raise SystemExit(
                    f"{path}: {generator} ran other neurons, budgets or checkpoint than {into['merged_from']}"
                )
            m["methods"].update(r["methods"])
            into["merged_from"].append(path)
    for result in merged.values():
        m = result["methods"]
        best = {spec: row["best"] for spec, row in m["methods"].items()}
        meta = {spec: {k: row[k] for k in ("wall_s", "options") if k in row} for spec, row in m["methods"].items()}
        result["methods"] = score(m["targets"], m["data_max"], m["budgets"], best, meta)
    return merged


def print_methods(generator: str, r: dict) -> None:
    """The method table of one generator: median normalized best per budget, AM gain, wall time."""
    budgets = r["budgets"]
    print(f"{generator}: normalized best activation, median over {r['n_scored']} neurons (AM gain over {r['n_gain']}):")
    print(
        f"{'method':<24}" + "".join(f"{b:>8}" for b in budgets) + "   gain@" + "/".join(map(str, budgets)) + "   wall_s"
    )
    for spec, row in r["methods"].items():
        cells = "".join(f"{row[str(b)]['median']:>8}" for b in budgets)
        gains = "/".join(f"{row[str(b)]['median_am_gain']}" for b in budgets)
        print(f"{spec:<24}{cells}   {gains}   {row.get('wall_s')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=None, help="project with the repro'd outputs (default: working directory)")
    ap.add_argument("--generators", default="sngan,vqvae", help="comma list")
    ap.add_argument(
        "--methods", default="tt,cma,ngopt,random", help="comma list; variants as method:key=value (tt:cma=0.9)"
    )
    ap.add_argument("--prior", action="store_true", help="vqvae: fit the TT data prior (variants use prior=1)")
    ap.add_argument("--neurons", type=int, default=None, help="default 20 (8 with --quick)")
    ap.add_argument("--budgets", default=None, help="default 256,1024,4096 (256,1024 with --quick)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--overhead-targets", type=int, default=8)
    ap.add_argument("--overhead-budget", type=int, default=None, help="default 512 (256 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="default 2 (1 with --quick)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the target machine has 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="budgets 256,1024; 8 neurons; 1 repeat")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: overhead,methods")
    ap.add_argument("--out", default=None, help="write results JSON here")
    ap.add_argument("--merge", default=None, help="comma list of JSONs of this script: print and --out them as one")
    a = ap.parse_args()
    if a.merge:
        merged = merge(a.merge.split(","))
        for generator, result in merged.items():
            print_methods(generator, result["methods"])
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(merged, indent=2) + "\n")
        return
    for name, full, quick in (
        ("budgets", "256,1024,4096", "256,1024"),
        ("neurons", 20, 8),
        ("repeats", 2, 1),
        ("overhead_budget", 512, 256),
    ):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    torch.set_num_threads(a.threads)
    budgets = [int(b) for b in a.budgets.split(",")]
    skip = set(filter(None, a.skip.split(",")))
    results = {}
    for generator in a.generators.split(","):
        params, net, grid, epoch, prepared = _setup(a.params, generator, a.root)
        targets = _neurons(net, a.neurons, a.seed)
        result: dict = {
            "checkpoint_epoch": epoch,
            "generator": generator,
            "grid": {"d": grid.d, "n": grid.n, "ordered": bool(grid.ordered)},
            "threads": a.threads,
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
        }
        if "overhead" not in skip:
            with tempfile.TemporaryDirectory() as tmp:
                result["overhead"] = bench_overhead(
                    net, grid, targets[: a.overhead_targets], a.overhead_budget, a.batch, a.repeats, Path(tmp)
                )
            o = result["overhead"]
            print(
                f"loop: {o['queries_per_s_off']} q/s without logging, {o['queries_per_s_logged']} q/s logged "
                f"-> overhead {o['overhead_pct']} % by wall difference; time inside the logger "
                f"{o['logging_share_pct']} % of the logged loop ({o['logging_ms_per_query_measured']} ms/query)"
            )
        prior = None
        if a.prior and not grid.ordered:
            prior, _ = fit_prior(grid, prepared, int(params.maximize.tt.rank), a.seed)
            result["prior_class_entropy"] = prior_entropy(net, grid, prior, prepared.classes, a.seed)
            print(f"class entropy (nats) of 1,000 samples under the SNN: {result['prior_class_entropy']}")
        if "methods" not in skip:
            methods = [s for s in a.methods.split(",") if "prior=1" not in s or prior is not None]
            tuned = None
            if any("tuned=1" in s for s in methods):
                from spikemax.tuning import tuned_results

                tuned = tuned_results(Path(a.root or ".") / "metrics" / "tune.json", [generator])
                result["tuned"] = tuned.get(generator)
            result["methods"] = r = bench_methods(
                net,
                grid,
                targets,
                methods,
                budgets,
                a.batch,
                a.seed,
                params.maximize,
                prepared,
                prior,
                tuned,
                generator,
            )
            print_methods(generator, r)
        result["load_avg_1m_end"] = os.getloadavg()[0]
        results[generator] = result
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
