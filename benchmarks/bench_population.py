"""Population mode on real neurons: m neurons of one layer optimized together vs independently.

Run from a project root that has run `dvc repro` up to train_generator:
  python benchmarks/bench_population.py --out population.json
  python benchmarks/bench_population.py --quick     # sngan, budget 256 only

m = `--neurons` units of `--layer` (default: the first spiking layer with at least m units whose
sample fires). Independent: one run per neuron with budget B. Population: one `Population` of m
optimizers presenting `--factor` x B stimuli in all (each presentation told to all m), batches
composed by each `--rules` entry. Score = clean rate of the reported best / best clean rate any
run presented for that neuron; medians over the neurons that fire. Target: population median >=
0.9 x independent median with factor 2 (8x fewer presentations in total for m = 16).
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
from bench_noise import method_options, parse_options, run_panel
from noise_common import NOISE_MODELS, CleanRates, draw, grid_prior, prepared_data, setup, spread_neurons, summarize


def run_population(
    spec, params, grid, clean, noise, total, batch, seed, na, steps, rule, prior=None, silent=None
) -> np.ndarray:
    """One Population over the panel for `total` presentations; clean rate of each neuron's best (m,)."""
    from spikemax.optim import Population, make_optimizer

    # the stage's options in population mode (maximize.population: true)
    params = params.model_copy(update={"maximize": params.maximize.model_copy(update={"population": True})})
    method, opts = method_options(spec, params, grid, total, na, prior)
    m = len(clean.targets)
    extra = {} if silent is None else {"silent": silent}
    pop = Population(
        [make_optimizer(method, grid.d, grid.n, seed=seed + j, **opts) for j in range(m)], rule=rule, **extra
    )
    rng = np.random.default_rng([seed, 99])
    spent = 0
    while spent < total:
        k = min(batch, total - spent)
        I = pop.ask(k)
        pop.tell(I, draw(clean(I), NOISE_MODELS[noise], steps, rng))
        spent += k
    return np.array([clean(i[None])[0, j] if i is not None else np.nan for j, (i, _) in enumerate(pop.best)])


def pick_layer(net, m: int) -> str:
    """The first spiking layer (input side) with at least m units."""
    for name, units in net.spiking_layers().items():
        if units >= m:
            return name
    sys.exit(f"no spiking layer has {m} units")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="relative to --root")
    ap.add_argument("--root", default=None, help="project whose outputs are read (default: cwd)")
    ap.add_argument("--generators", default=None, help="default sngan,vqvae (sngan with --quick)")
    ap.add_argument("--layer", default=None)
    ap.add_argument("--neurons", type=int, default=16)
    ap.add_argument("--method", default="tt", help="e.g. tt, tt+na, cma")
    ap.add_argument("--pop-method", default=None, help="the population's spec when it differs (default: --method)")
    ap.add_argument("--na", default="", help="noise-aware options (with +na)")
    ap.add_argument("--rules", default="round_robin,progress")
    ap.add_argument("--noise", default="clean")
    ap.add_argument("--budgets", default=None, help="independent budgets B; default 256,1024 (256 with --quick)")
    ap.add_argument("--factor", type=float, default=2.0, help="population presentations = factor x B")
    ap.add_argument("--batch", type=int, default=None, help="default: the params' maximize.batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--silent", type=float, default=None, help="Population's silent weight (default: its own)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gens = (a.generators or ("sngan" if a.quick else "sngan,vqvae")).split(",")
    budgets = [int(b) for b in (a.budgets or ("256" if a.quick else "256,1024")).split(",")]
    rules, na = a.rules.split(","), parse_options(a.na)
    result: dict = {
        "method": a.method,
        "pop_method": a.pop_method or a.method,
        "noise": a.noise,
        "factor": a.factor,
        "silent": a.silent,
        "budgets": budgets,
        "generators": {},
    }
    params_path = str(Path(a.root or ".") / a.params)
    prepared = prepared_data(params_path, a.root)
    for gen in gens:
        params, net, grid, epoch = setup(params_path, gen, a.root)
        prior = grid_prior(params, grid, prepared, cache=f"/tmp/spikemax_prior_{gen}_{os.getuid()}.npz")
        batch = a.batch or int(params.maximize.batch)
        layer = a.layer or pick_layer(net, a.neurons)
        targets = spread_neurons(net, a.neurons, a.seed, layers=[layer])
        clean = CleanRates(net, grid, targets)
        steps = int(net.num_steps)
        t0 = time.perf_counter()
        raw: dict = {}
        for B in budgets:
            t = time.perf_counter()
            ctx = {"params": params, "grid": grid, "na": na, "steps": steps, "batch": batch, "prior": prior}
            ctx["clean"], ctx["refs"] = clean, None
            raw[("independent", B)] = run_panel(a.method, ctx, a.noise, B, a.seed)["reported"]
            print(f"  {gen} independent B={B}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
            for rule in rules:
                t = time.perf_counter()
                total = round(a.factor * B)
                raw[(rule, B)] = run_population(
                    a.pop_method or a.method,
                    params,
                    grid,
                    clean,
                    a.noise,
                    total,
                    batch,
                    a.seed,
                    na,
                    steps,
                    rule,
                    prior,
                    a.silent,
                )
                print(f"  {gen} {rule} {total}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        ref = clean.best_seen()
        ok = ref > 0
        table = {}
        for B in budgets:
            scores = {name: raw[(name, B)] / np.where(ok, ref, 1.0) for name in ["independent", *rules]}
            table[str(B)] = summarize(scores, ok)
            ind = table[str(B)]["independent"]
            for rule in rules:
                cell = table[str(B)][rule]
                if cell and ind:
                    cell["vs_independent"] = round(cell["median"] / ind["median"], 4) if ind["median"] else None
        result["generators"][gen] = {
            "epoch": epoch,
            "layer": layer,
            "targets": targets,
            "firing": int(ok.sum()),
            "batch": batch,
            "wall_s": round(time.perf_counter() - t0, 1),
            "scores": table,
        }
        print(f"\n{gen} {layer} ({int(ok.sum())}/{len(targets)} fire, {a.method}, noise {a.noise}, batch {batch})")
        print(f"{'B':>6} {'run':<12} {'presented':>9} {'median':>8} {'vs indep':>9}")
        for B in budgets:
            for name in ["independent", *rules]:
                c = table[str(B)][name]
                shown = B * len(targets) if name == "independent" else round(a.factor * B)
                ratio = c.get("vs_independent", 1.0) if c else float("nan")
                print(f"{B:>6} {name:<12} {shown:>9} {c['median'] if c else float('nan'):>8.4f} {ratio:>9.4f}")
    result["cpus"], result["load_avg_1m"] = os.cpu_count(), os.getloadavg()[0]
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
