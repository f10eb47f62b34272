"""Noisy neurons: methods x noise models (x drift) x budgets on real model neurons, both generators.

Run on a project that has run `dvc repro` (models/snn, models/generators, data/prepared):
  python benchmarks/bench_noise.py --root /work/repro --out noise.json
  python benchmarks/bench_noise.py --root /work/repro --quick          # 6 neurons, sngan, one seed
  python benchmarks/bench_noise.py combine a.json b.json --out noise.json  # parts run in parallel

Neurons: `--neurons` units spread over the spiking layers of the last checkpoint (scored over those
that fire). A method spec is `METHOD[+na][+ref][:key=value...]`:
  METHOD  auto (the per-grid default as the stage resolves it: CMA-ES on SN-GAN, TT + data prior on
          VQ-VAE), tt, cma, ngopt, random, or an anchor's own noise handling: cma-nh (pycma
          NoiseHandler, recommends the distribution mean), ngopt-noisy (nevergrad told the function
          is noisy, pessimistic recommendation);
  +na     the noise-aware layer with the params' `maximize.noise` settings (`aware: auto` turns it
          on whenever a noise model is set), `key=value` overriding them (retest, final, tell, ...);
  +ref    reference stimuli interleaved (`refs=4` per batch, counted in the budget), drift-corrected.
Noise: clean | poisson (window = the SNN's T) | mult0.5 (r * max(0, 1 + 0.5 N(0, 1))), each
optionally `+drift` (gain -30 % over the run plus a random walk of 5 % per 100 presentations).
Every run is told its budget (one run per budget, as the stage runs it). Score = clean rate of the
reported best / the best clean rate any run presented for that neuron; per neuron the mean over
seeds, then median and mean over neurons. `found` = the same for the best point a run presented
(search), `coverage` = share of runs whose `recommend()` interval holds the reported point's clean
rate (the layer's calibration; nominal 95 %).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noise_common import (
    DRIFT,
    NOISE_MODELS,
    CleanRates,
    draw,
    grid_prior,
    noise_spec,
    prepared_data,
    reference_points,
    setup,
    spread_neurons,
)

PRIOR_METHODS = ("tt", "auto", "random")  # the stage gives these the data prior on codebook grids


def parse_options(text: str) -> dict:
    """'retest=0.2,estimator=shrink' (or ':'-separated) -> {'retest': 0.2, 'estimator': 'shrink'}."""
    out: dict = {}
    for part in filter(None, text.replace(":", ",").split(",")):
        key, _, value = part.partition("=")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def parse_spec(spec: str) -> tuple[str, set[str], dict]:
    """'auto+na+ref:final=0.2' -> ('auto', {'na', 'ref'}, {'final': 0.2})."""
    head, _, rest = spec.partition(":")
    method, *flags = head.split("+")
    return method, set(flags), parse_options(rest)


def method_options(spec: str, params, grid, budget: int, na: dict, prior=None) -> tuple[str, dict]:
    """Base method and make_optimizer options of a spec such as 'auto+na:final=0.2' or 'cma'
    (without the `+ref` wrapper's `refs`)."""
    from spikemax.optim import options_for

    method, flags, extra = parse_spec(spec)
    m = params.maximize.model_copy(update={"budget": budget})
    # +na: the stage's options under a noise model (the layer and its base settings); else none.
    m = m.model_copy(update={"noise": m.noise.model_copy(update={"aware": "na" in flags})})
    opts = options_for(method, m, grid) if method not in ("cma-nh", "ngopt-noisy") else {}
    if "na" in flags and method in ("cma-nh", "ngopt-noisy"):
        opts = {k: v for k, v in options_for("random", m, grid).items()}
    if method in ("ngopt", "ngopt-noisy"):
        opts["budget"] = budget
    if prior is not None and method in PRIOR_METHODS and opts.get("resolved", "tt") == "tt":
        opts["prior"] = prior
    extra.pop("refs", None)
    extra.pop("window", None)
    if "na" in flags:
        opts.update(na)
    opts.update(extra)
    return method, opts


def build(spec: str, ctx: dict, budget: int, seed: int):
    """The optimizer of a spec for one run (with references and drift correction for `+ref`)."""
    from spikemax.optim import make_optimizer

    grid = ctx["grid"]
    method, opts = method_options(spec, ctx["params"], grid, budget, ctx["na"], ctx["prior"])
    opt = make_optimizer(method, grid.d, grid.n, seed=seed, **opts)
    _, flags, extra = parse_spec(spec)
    if "ref" in flags:
        from spikemax.optim.drift import DriftCorrected

        win = {"window": int(extra["window"])} if "window" in extra else {}
        opt = DriftCorrected(opt, ctx["refs"], per_batch=int(extra.get("refs", 4)), **win)
    return opt


def run_panel(spec: str, ctx: dict, noise: str, budget: int, seed: int) -> dict[str, np.ndarray]:
    """One run per neuron in lock step for `budget` presentations under `noise`.

    Returns per neuron: `reported` (clean rate of the reported best), `found` (best clean rate
    presented, references excluded), `low`/`high`/`estimate` (the `recommend()` interval, NaN if none).
    """
    from spikemax.optim.drift import DriftingGain

    clean, steps, batch = ctx["clean"], ctx["steps"], ctx["batch"]
    m = len(clean.targets)
    spec_noise, drifting = noise_spec(noise)
    opts = [build(spec, ctx, budget, seed + j) for j in range(m)]
    rngs = [np.random.default_rng([seed, j, 7]) for j in range(m)]
    gains = [DriftingGain(**DRIFT, horizon=budget, seed=1000 * seed + j) if drifting else None for j in range(m)]
    found = np.zeros(m)
    spent = 0
    while spent < budget:
        k = min(batch, budget - spent)
        asked = [np.asarray(o.ask(k), dtype=np.int64) for o in opts]
        Y = clean(np.concatenate(asked))
        for j, (o, I) in enumerate(zip(opts, asked)):
            r = Y[j * k : (j + 1) * k, j]
            refs = getattr(o, "is_reference", np.zeros(k, dtype=bool))
            found[j] = max(found[j], float(np.max(r[~refs], initial=0.0)))
            if gains[j] is not None:
                r = r * gains[j](spent + np.arange(k))
            o.tell(I, draw(r, spec_noise, steps, rngs[j]))
        spent += k
    out = {key: np.full(m, np.nan) for key in ("reported", "low", "high", "estimate")}
    out["found"] = found
    for j, o in enumerate(opts):
        i_best = o.best[0]
        if i_best is None:
            continue
        out["reported"][j] = clean(i_best[None])[0, j]
        rec = o.recommend() if callable(getattr(o, "recommend", None)) else None
        if rec is not None:
            out["low"][j], out["high"][j], out["estimate"][j] = rec.low, rec.high, rec.estimate
    return out


def summarize_cells(raw: dict, ref: np.ndarray) -> dict:
    """Scores per (noise, spec, budget): per neuron mean over seeds, median/mean over firing neurons."""
    ok = ref > 0
    table: dict = {}
    for (spec, noise, B), runs in raw.items():
        rep = np.stack([r["reported"] for r in runs]) / np.where(ok, ref, 1.0)
        fnd = np.stack([r["found"] for r in runs]) / np.where(ok, ref, 1.0)
        per = np.nanmean(rep, axis=0)[ok]
        cell = {
            "median": round(float(np.median(per)), 4),
            "mean": round(float(np.mean(per)), 4),
            "found_median": round(float(np.median(np.nanmean(fnd, axis=0)[ok])), 4),
            "runs": int(ok.sum()) * len(runs),
        }
        low = np.stack([r["low"] for r in runs])[:, ok]
        if np.isfinite(low).any() and not noise.endswith("+drift"):
            true = np.stack([r["reported"] for r in runs])[:, ok]
            high = np.stack([r["high"] for r in runs])[:, ok]
            has = np.isfinite(low) & np.isfinite(true)
            # A rate equals its estimate exactly on clean responses: allow float round-off.
            tol = 1e-9 * np.maximum(np.abs(true), 1.0)
            cover = (low - tol <= true) & (true <= high + tol)
            cell["coverage"] = round(float(cover[has].mean()), 4) if has.any() else None
            cell["coverage_runs"] = int(has.sum())
        table.setdefault(noise, {}).setdefault(spec, {})[str(B)] = cell
    return table


def snapshot(result: dict, gen: str, raw: dict, clean, epoch, grid, ctx: dict, targets, t0: float, out) -> dict:
    """Put the cells measured so far into `result` (and `out`, if given); the score table."""
    ref = clean.best_seen()
    table = summarize_cells(raw, ref)
    result["generators"][gen] = {
        "epoch": epoch,
        "grid": {"d": grid.d, "n": int(np.max(grid.n))},
        "batch": ctx["batch"],
        "targets": targets,
        "firing": int((ref > 0).sum()),
        "clean_forwards": clean.forwards,
        "wall_s": round(time.perf_counter() - t0, 1),
        "scores": table,
        "reference": ref.tolist(),
        "raw": {
            f"{spec}|{noise}|{B}": {k: np.stack([r[k] for r in runs]).tolist() for k in runs[0]}
            for (spec, noise, B), runs in raw.items()
        },
    }
    result["cpus"], result["load_avg_1m"] = os.cpu_count(), os.getloadavg()[0]
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return table


def combine(paths: list[str], out: str | None) -> dict:
    """Merge the JSONs of several invocations on the same panel (e.g. one per noise model, run in
    parallel): one reference per neuron (the best any of them presented) and every cell rescored."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    merged: dict = {k: v for k, v in parts[0].items() if k != "generators"}
    merged.update(combined=paths, methods=[], noise=[], generators={})
    for part in parts:
        merged["methods"] += [m for m in part["methods"] if m not in merged["methods"]]
        merged["noise"] += [n for n in part["noise"] if n not in merged["noise"]]
        for gen, g in part["generators"].items():
            into = merged["generators"].setdefault(gen, {**g, "raw": {}, "wall_s": 0.0})
            if g["targets"] != into["targets"]:
                raise SystemExit(f"{gen}: the JSONs hold different panels; combine runs of one panel only")
            into["raw"].update(g["raw"])
            into["wall_s"] += g["wall_s"]
            into["reference"] = np.maximum(into["reference"], g["reference"]).tolist()
    for g in merged["generators"].values():
        ref = np.asarray(g["reference"])
        raw = {}
        for key, v in g["raw"].items():
            spec, noise, B = key.rsplit("|", 2)
            arrays = {k: np.asarray(x, dtype=np.float64) for k, x in v.items()}
            raw[(spec, noise, int(B))] = [{k: x[s] for k, x in arrays.items()} for s in range(len(arrays["reported"]))]
        g["scores"] = summarize_cells(raw, ref)
        g["firing"] = int((ref > 0).sum())
    if out:
        Path(out).write_text(json.dumps(merged, indent=2))
    return merged


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "combine":  # bench_noise.py combine A.json B.json ... --out C.json
        args = sys.argv[2:]
        out = args[args.index("--out") + 1] if "--out" in args else None
        merged = combine([p for i, p in enumerate(args) if p != "--out" and (i == 0 or args[i - 1] != "--out")], out)
        for gen, g in merged["generators"].items():
            for noise, cells in g["scores"].items():
                for spec, by_b in cells.items():
                    shown = "  ".join(f"B={b}: {c['median']:.3f} ({c['found_median']:.2f})" for b, c in by_b.items())
                    print(f"{gen:<6} {noise:<14} {spec:<32} {shown}")
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="relative to --root")
    ap.add_argument("--root", default=None, help="project whose outputs are read (default: cwd)")
    ap.add_argument("--generators", default=None, help="default sngan,vqvae (sngan with --quick)")
    ap.add_argument("--methods", default="auto,auto+na,cma,cma+na,tt+na,cma-nh,ngopt-noisy")
    ap.add_argument("--noise", default="clean,poisson,mult0.5", help=f"of {', '.join(NOISE_MODELS)} (+drift)")
    ap.add_argument("--na", default="", help="noise-aware options for every +na spec, e.g. retest=0.2")
    ap.add_argument("--neurons", type=int, default=None, help="default 12 (6 with --quick)")
    ap.add_argument("--budgets", default="256,1024")
    ap.add_argument("--seeds", default=None, help="default 0,1 (0 with --quick)")
    ap.add_argument("--refs", type=int, default=16, help="size of the fixed reference set (+ref)")
    ap.add_argument("--batch", type=int, default=None, help="default: the params' maximize.batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="write results JSON here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    params_path = str(Path(a.root or ".") / a.params)
    gens = (a.generators or ("sngan" if a.quick else "sngan,vqvae")).split(",")
    n_neurons = a.neurons or (6 if a.quick else 12)
    budgets = [int(b) for b in a.budgets.split(",")]
    seeds = [int(s) for s in (a.seeds or ("0" if a.quick else "0,1")).split(",")]
    methods, noises = a.methods.split(","), a.noise.split(",")
    for n in noises:
        noise_spec(n)
    result: dict = {
        "budgets": budgets,
        "methods": methods,
        "noise": noises,
        "na": parse_options(a.na),
        "seeds": seeds,
        "drift": DRIFT,
        "generators": {},
    }
    prepared = prepared_data(params_path, a.root)
    for gen in gens:
        params, net, grid, epoch = setup(params_path, gen, a.root)
        ctx = {
            "params": params,
            "grid": grid,
            "na": parse_options(a.na),
            "steps": int(net.num_steps),
            "batch": a.batch or int(params.maximize.batch),
            "prior": grid_prior(params, grid, prepared, cache=f"/tmp/spikemax_prior_{gen}_{os.getuid()}.npz"),
            "refs": reference_points(grid, prepared, a.refs),
        }
        targets = spread_neurons(net, n_neurons, 0)
        ctx["clean"] = clean = CleanRates(net, grid, targets)
        t0 = time.perf_counter()
        raw: dict = {}
        for noise in noises:
            for spec in methods:
                for B in budgets:
                    t = time.perf_counter()
                    raw[(spec, noise, B)] = runs = [run_panel(spec, ctx, noise, B, s) for s in seeds]
                    snapshot(result, gen, raw, clean, epoch, grid, ctx, targets, t0, a.out)  # a kill keeps it
                    # A provisional score (over the best seen so far) to follow a long run.
                    now = np.nanmean([r["reported"] for r in runs], axis=0) / np.maximum(clean.best_seen(), 1e-12)
                    print(
                        f"  {gen} {noise:>13} {spec:>22} B={B}: {time.perf_counter() - t:.1f} s, "
                        f"median so far {np.median(now[clean.best_seen() > 0]):.3f}",
                        file=sys.stderr,
                    )
        table = snapshot(result, gen, raw, clean, epoch, grid, ctx, targets, t0, a.out)
        ref = clean.best_seen()
        print(f"\n{gen} (epoch {epoch}, {int((ref > 0).sum())}/{len(targets)} neurons fire, batch {ctx['batch']})")
        print(f"{'noise':<14} {'method':<24} " + " ".join(f"{'B=' + str(B):>16}" for B in budgets) + "  coverage")
        for noise in noises:
            for spec in methods:
                cells = [table[noise][spec][str(B)] for B in budgets]
                shown = " ".join(f"{c['median']:>7.3f} ({c['found_median']:.2f})" for c in cells)
                cov = " ".join(f"{c['coverage']:.2f}" for c in cells if c.get("coverage") is not None)
                print(f"{noise:<14} {spec:<24} {shown}  {cov}")
    if a.out:
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
