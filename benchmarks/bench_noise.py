"""Noise-aware optimization on real neurons: methods x noise models x budgets, both generators.

Run from a project root that has run `dvc repro` up to train_generator (models/snn, models/generators):
  python benchmarks/bench_noise.py --out noise.json
  python benchmarks/bench_noise.py --quick          # 6 neurons, sngan only (smoke run)

Neurons: `--neurons` units spread over the spiking layers of the last checkpoint. Each method
("tt", "cma", ...; "+na" = noise-aware with `--na` options) runs once per (neuron, noise model)
with budget max(--budgets) under that noise (clean | poisson, window = the SNN's T steps |
mult0.5, r * max(0, 1 + 0.5 N(0, 1))). Score of a run at budget B = the clean rate of the point it
reports as best after B presentations / the best clean rate any run presented for that neuron;
medians over the neurons that fire (reference > 0).
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
from noise_common import NOISE_MODELS, CleanRates, draw, setup, spread_neurons, summarize


def parse_options(text: str) -> dict:
    """'retest=0.2,estimator=shrink' -> {'retest': 0.2, 'estimator': 'shrink'}."""
    out: dict = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def method_options(spec: str, params, grid, budget: int, na: dict) -> tuple[str, dict]:
    """Base method and make_optimizer options of a spec such as 'tt+na' or 'cma'."""
    from spikemax.optim import options_for

    method, _, flag = spec.partition("+")
    opts = options_for(method, params, grid)
    if method == "ngopt":
        opts["budget"] = budget
    if flag == "na":
        opts.update({"noise_aware": True, **na})
    return method, opts


def run_panel(spec, params, grid, clean, noise, budgets, batch, seed, na, steps) -> np.ndarray:
    """One run per neuron in lock step; clean rate of each run's reported best at each budget (m, B).

    A noise-aware run with a budget-aware schedule (`final` > 0) is told its budget, as the stage
    tells it, so it runs once per budget; every other run is scored at each budget on the way."""
    if spec.endswith("+na") and float(na.get("final", 0) or 0) > 0:
        cols = [_panel(spec, params, grid, clean, noise, [B], batch, seed, {**na, "budget": B}, steps) for B in budgets]
        return np.concatenate(cols, axis=1)
    return _panel(spec, params, grid, clean, noise, budgets, batch, seed, na, steps)


def _panel(spec, params, grid, clean, noise, budgets, batch, seed, na, steps) -> np.ndarray:
    from spikemax.optim import make_optimizer

    top = max(budgets)
    method, opts = method_options(spec, params, grid, top, na)
    m = len(clean.targets)
    opts_list = [make_optimizer(method, grid.d, grid.n, seed=seed + j, **opts) for j in range(m)]
    rngs = [np.random.default_rng([seed, j, 7]) for j in range(m)]
    out = np.full((m, len(budgets)), np.nan)
    spent = 0
    while spent < top:
        k = min(batch, top - spent)
        asked = [np.asarray(o.ask(k), dtype=np.int64) for o in opts_list]
        Y = clean(np.concatenate(asked))
        for j, (o, I) in enumerate(zip(opts_list, asked)):
            y = draw(Y[j * k : (j + 1) * k, j], NOISE_MODELS[noise], steps, rngs[j])
            o.tell(I, y)
        spent += k
        for b, B in enumerate(budgets):
            if spent == B:
                for j, o in enumerate(opts_list):
                    i_best = o.best[0]
                    out[j, b] = clean(i_best[None])[0, j] if i_best is not None else np.nan
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--generators", default=None, help="default sngan,vqvae (sngan with --quick)")
    ap.add_argument("--methods", default="tt,tt+na,cma,cma+na")
    ap.add_argument("--noise", default="clean,poisson,mult0.5", help=f"of {', '.join(NOISE_MODELS)}")
    ap.add_argument("--na", default="", help="noise-aware options, e.g. retest=0.2,estimator=shrink")
    ap.add_argument("--neurons", type=int, default=None, help="default 12 (6 with --quick)")
    ap.add_argument("--budgets", default="256,1024")
    ap.add_argument("--batch", type=int, default=None, help="default: the params' maximize.batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="write results JSON here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gens = (a.generators or ("sngan" if a.quick else "sngan,vqvae")).split(",")
    n_neurons = a.neurons or (6 if a.quick else 12)
    budgets = [int(b) for b in a.budgets.split(",")]
    methods, noises = a.methods.split(","), a.noise.split(",")
    na = parse_options(a.na)
    result: dict = {"budgets": budgets, "methods": methods, "noise": noises, "na": na, "generators": {}}
    for gen in gens:
        params, net, grid, epoch = setup(a.params, gen)
        batch = a.batch or int(params.maximize.batch)
        targets = spread_neurons(net, n_neurons, a.seed)
        clean = CleanRates(net, grid, targets)
        steps = int(net.num_steps)
        t0 = time.perf_counter()
        raw = {}
        for noise in noises:
            for spec in methods:
                t = time.perf_counter()
                raw[(spec, noise)] = run_panel(spec, params, grid, clean, noise, budgets, batch, a.seed, na, steps)
                print(f"  {gen} {noise:>8} {spec:>8}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        ref = clean.best_seen()
        ok = ref > 0
        table: dict = {}
        for (spec, noise), v in raw.items():
            scores = {str(B): v[:, b] / np.where(ok, ref, 1.0) for b, B in enumerate(budgets)}
            table.setdefault(noise, {})[spec] = summarize(scores, ok)
        result["generators"][gen] = {
            "epoch": epoch,
            "grid": {"d": grid.d, "n": int(np.max(grid.n))},
            "batch": batch,
            "targets": targets,
            "firing": int(ok.sum()),
            "clean_forwards": clean.forwards,
            "wall_s": round(time.perf_counter() - t0, 1),
            "scores": table,
            # Per neuron: the reference and each run's clean rate at each budget (for pooling runs).
            "reference": ref.tolist(),
            "raw": {f"{spec}|{noise}": v.tolist() for (spec, noise), v in raw.items()},
        }
        print(f"\n{gen} (epoch {epoch}, {int(ok.sum())}/{len(targets)} neurons fire, batch {batch})")
        print(f"{'noise':<9} {'method':<9} " + " ".join(f"{'B=' + str(B):>10}" for B in budgets))
        for noise in noises:
            for spec in methods:
                cells = [table[noise][spec][str(B)] for B in budgets]
                meds = [c["median"] if c else float("nan") for c in cells]
                print(f"{noise:<9} {spec:<9} " + " ".join(f"{v:>10.4f}" for v in meds))
    result["cpus"], result["load_avg_1m"] = os.cpu_count(), os.getloadavg()[0]
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
