"""Render the measured numbers in README.md and docs/*.md from the committed JSON under docs/data/.

A doc holds `<!-- gen:NAME -->` ... `<!-- /gen -->`; the text between is what `RENDERERS[NAME]` makes
of its JSON file, so a number in the docs is never typed by hand:

    python docs/tables.py            # rewrite the generated blocks in place
    python docs/tables.py --check    # exit 1 and name the stale blocks (the docs test runs this)
    python docs/tables.py collect --root /path/to/finished/project   # refresh docs/data/default_run.json

To update a benchmark table, copy the numbers the benchmark printed (its `--out` JSON) into the
matching docs/data file, then run the first command.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "data"
BLOCK = re.compile(r"(<!-- gen:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /gen -->)", re.S)


def load(name: str) -> dict[str, Any]:
    """One docs/data JSON file."""
    return json.loads((DATA / f"{name}.json").read_text())


def prose(text: str) -> str:
    """A paragraph wrapped at 100 columns, as the docs are written."""
    return textwrap.fill(text, 100, break_long_words=False, break_on_hyphens=False) + "\n"


def md_table(head: list[str], rows: list[list[Any]]) -> str:
    """A Markdown pipe table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def score(v: float | None) -> str:
    """A normalized score in [0, 1] as the benchmarks print it (.849, 1.0)."""
    if v is None:
        return "–"
    return "1.0" if v >= 1 else f"{v:.3f}".removeprefix("0")


def pct(v: float, digits: int = 0) -> str:
    """A fraction as a percentage."""
    return f"{100 * v:.{digits}f} %"


def duration(s: float) -> str:
    """Seconds as `13 min 37 s` (or `58 s`)."""
    m, s = divmod(round(s), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def bench_am() -> str:
    """Normalized best per method × budget on real neurons (benchmarks/bench_am.py)."""
    d = load("bench_am")
    methods = d["methods"]
    head = ["grid, seed", *methods.values()]
    rows = [
        [f"{r['grid']}, {r['seed']}"]
        + [" / ".join(score(v) for v in r["scores"][m]) if m in r["scores"] else "–" for m in methods]
        for r in d["rows"]
    ]
    return (
        prose(f"{d['conditions']} Cells: {' / '.join(map(str, d['budgets']))} queries.") + "\n" + md_table(head, rows)
    )


def bench_noise() -> str:
    """Noisy model neurons: the reported best per grid × noise × method × budget (benchmarks/bench_noise.py)."""
    d = load("bench_noise")
    budgets = [str(b) for b in d["budgets"]]
    rows = []
    for gen, g in d["generators"].items():
        for noise, per in g["scores"].items():
            for method, cells in per.items():
                shown = [
                    f"{cells[b]['median']:.3f} ({cells[b]['found_median']:.2f})" if b in cells else "–" for b in budgets
                ]
                cov = [cells[b].get("coverage") for b in budgets if b in cells]
                rows.append(
                    [
                        f"{gen} ({g['firing']}/{g['targets']} fire)",
                        noise,
                        f"`{method}`",
                        *shown,
                        " / ".join(pct(c) for c in cov if c is not None) or "–",
                    ]
                )
    head = ["grid", "noise", "method", *(f"{b} queries" for b in budgets), "coverage"]
    return prose(f"{d['conditions']} Source: {d['source']}.") + "\n" + md_table(head, rows)


def bench_optimizers() -> str:
    """Median normalized score per method on planted-maximum functions (benchmarks/bench_optimizers.py)."""
    d = load("bench_optimizers")
    budgets = d["budgets"]
    head = ["method", *(f"{b:,} queries" for b in budgets)]
    rows = [[m, *(score(v) for v in vals)] for m, vals in d["median"].items()]
    fn_head = ["function", *(f"{m}, {b:,}" for m in d["per_function"]["methods"] for b in budgets)]
    fn_rows = [[f, *(score(v) for m in row for v in row[m])] for f, row in d["per_function"]["rows"].items()]
    return (
        prose(d["conditions"]) + "\n" + md_table(head, rows) + "\nOn the smooth functions, TT against CMA-ES:\n\n"
        f"{md_table(fn_head, fn_rows)}\n"
        + prose(
            f"Optimizer time per query (`--overhead`, {d['overhead']['setting']}): "
            + ", ".join(f"{m} {ms} ms" for m, ms in d["overhead"]["ms_per_query"].items())
            + "."
        )
    )


def bench_rig() -> str:
    """Rig service latency and kill/restart cycles (benchmarks/bench_rig.py)."""
    d = load("bench_rig")
    head = ["protocol", *(f"{g} p50 / p95 (ms)" for g in d["generators"])]
    rows = [[p, *(f"{v[0]} / {v[1]}" for v in d["ms"][p].values())] for p in d["ms"]]
    k = d["kills"]
    return (
        prose(d["conditions"])
        + f"\n{md_table(head, rows)}\n"
        + prose(
            f"{k['cycles']} SIGKILL and restart cycles at random moments: "
            f"{k['lost']} responses lost, {k['double_counted']} counted twice."
        )
    )


def bench_population() -> str:
    """Population mode vs independent runs per design, grid and budget (benchmarks/bench_population.py)."""
    d = load("bench_population")
    rows = [
        [
            r["design"],
            r["grid"],
            r["budget"],
            " / ".join(f"{v:.3f}" for v in r["vs_independent"]),
            f"{sum(r['vs_independent']) / len(r['vs_independent']):.3f}",
        ]
        for r in d["rows"]
    ]
    head = ["design", "grid", "B", "population / independent, seeds 0-3", "mean"]
    return prose(f"{d['conditions']} Source: {d['source']}.") + "\n" + md_table(head, rows)


def rig_client() -> str:
    """Default rig sessions on Poisson neurons: true rate of the reported best (examples/rig_client.py)."""
    import statistics

    d = load("rig_client")
    rows = []
    for gen in dict.fromkeys(r["generator"] for r in d["sessions"]):
        runs = [r for r in d["sessions"] if r["generator"] == gen and r["score"] is not None]
        got = [r["score"] for r in runs]
        draw = [r["best_draw_score"] for r in runs]
        rows.append(
            [
                gen,
                len(runs),
                f"{statistics.median(got):.3f} / {statistics.mean(got):.3f}",
                pct(sum(v >= 0.9 for v in got) / len(got)),
                f"{statistics.median(draw):.3f} / {statistics.mean(draw):.3f}",
            ]
        )
    head = ["grid", "sessions", "reported best: median / mean", "sessions >= 0.9", "highest draw: median / mean"]
    return prose(f"{d['conditions']} Source: {d['source']}.") + "\n" + md_table(head, rows)


def bench_logging() -> str:
    """Share of the AM loop spent logging, per design (benchmarks/bench_scale.py and bench_am.py)."""
    d = load("bench_logging")
    rows = [[r["design"], r["share"], r["ms_per_query"]] for r in d["rows"]]
    return prose(d["conditions"]) + "\n" + md_table(["design", "logging share of the AM loop", "ms per query"], rows)


def default_run() -> str:
    """Headline numbers of one `make repro` of the default params (docs/data/default_run.json)."""
    d = load("default_run")
    snn, am, c = d["snn"], d["am"], d["claims"]
    rows = [
        [
            "SNN test accuracy",
            f"{pct(snn['test_acc_first'])} untrained → {pct(snn['test_acc_final'], 1)} "
            f"after {snn['epochs']} epochs ({snn['checkpoints']} checkpoints)",
        ],
    ]
    seeds = am.get("other_seeds", {})  # the same pipeline with other training seeds (another machine's weights)
    for gen, g in am["last_checkpoint"].items():
        others = [
            f"{label}: {o[gen]['median_am_gain']:.2f}, {pct(o[gen]['frac_above_dataset'])}"
            for label, o in seeds.items()
        ]
        also = f" (other training seeds, {'; '.join(others)})" if others else ""
        rows.append(
            [
                f"AM on {gen}, trained net",
                f"median AM gain {g['median_am_gain']:.2f}; "
                f"{pct(g['frac_above_dataset'])} of runs above the best test image{also}",
            ]
        )
    rows += [
        ["AM runs / queries", f"{am['runs']:,} runs, {am['queries']:,} queries"],
        [
            "claim 1: selective early",
            f"{pct(c['claim1']['value'])} of units have CSI > {c['claim1']['threshold']} "
            f"by {c['claim1']['progress']:.2g} epochs",
        ],
        ["claim 2: ρ(mean CSI, accuracy)", f"{c['claim2']['rho']:+.2f} over {c['claim2']['n']} checkpoints"],
        [
            "claim 3: concept changes",
            f"{pct(c['claim3']['value'])} of {c['claim3']['n']} tracked neurons "
            f"({pct(c['claim3']['robust'])} restart-robust)",
        ],
    ]
    return md_table(["what", "measured"], rows)


def setup() -> str:
    """How long the two commands took and how much disk they used (docs/data/setup.json)."""
    d = load("setup")
    r, t = d["repro"], d["test"]
    outputs = f"{r['project_gb']:.1f} GB of outputs next to " if r.get("project_gb") is not None else ""
    return prose(
        f"`make repro` took {duration(r['seconds'])} ({r['machine']}); it leaves {outputs}a "
        f"{r['venv_gb']:.1f} GB `.venv` (PyTorch with its CUDA libraries), and a second `make repro` finds "
        f"every stage up to date. `make test` ran {t['tests']} tests in {duration(t['seconds'])}."
    )


RENDERERS: dict[str, Callable[[], str]] = {
    "bench_am": bench_am,
    "bench_noise": bench_noise,
    "bench_optimizers": bench_optimizers,
    "bench_rig": bench_rig,
    "rig_client": rig_client,
    "bench_population": bench_population,
    "bench_logging": bench_logging,
    "default_run": default_run,
    "setup": setup,
}


def docs() -> list[Path]:
    """The files that may hold generated blocks."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def render(text: str, where: str = "") -> tuple[str, list[str]]:
    """`text` with every generated block rewritten; the names of the blocks that changed."""
    changed: list[str] = []

    def sub(m: re.Match) -> str:
        name = m["name"]
        if name not in RENDERERS:
            raise SystemExit(f"{where}: unknown generated block gen:{name} (known: {', '.join(RENDERERS)})")
        body = RENDERERS[name]()
        if body != m["body"]:
            changed.append(f"{where} gen:{name}")
        return m[1] + body + m[4]

    return BLOCK.sub(sub, text), changed


def last_checkpoint(root: Path) -> dict[str, Any]:
    """Median AM gain and share of runs above the dataset per generator/method at the last checkpoint."""
    am = json.loads((root / "metrics" / "am.json").read_text())
    return {
        name: {"median_am_gain": v["median_am_gain"], "frac_above_dataset": v["frac_above_dataset"]}
        for name, v in am["last_checkpoint"].items()
    }


def training_seed(root: Path) -> str:
    """`seed N`: the SNN training seed of a project's params.yaml (the generators' follow it in the docs' runs)."""
    import yaml

    return f"seed {yaml.safe_load((root / 'params.yaml').read_text())['snn']['seed']}"


def collect(root: Path, others: list[Path] | None = None) -> dict[str, Any]:
    """The headline numbers of a finished default run, read from its metrics/ JSON; `others`: the
    same pipeline with other training seeds (`snn.seed` and the generators' seeds)."""
    m = root / "metrics"
    snn = json.loads((m / "snn.json").read_text())
    am = json.loads((m / "am.json").read_text())
    a = json.loads((m / "analysis.json").read_text())
    c1, c2, c3 = (
        a[k] for k in ("claim1_early_selectivity", "claim2_selectivity_and_accuracy", "claim3_concept_change")
    )
    return {
        "source": f"metrics/ of one `make repro` of the default params.yaml ({root.name})",
        "snn": {
            "test_acc_first": snn["test_acc_epoch0"],
            "test_acc_final": snn["test_acc"],
            "epochs": snn["epochs"],
            "checkpoints": snn["checkpoints"],
        },
        "am": {
            "runs": am["n_runs"],
            "queries": am["queries_run"],
            "last_checkpoint": last_checkpoint(root),
            "other_seeds": {training_seed(o): last_checkpoint(o) for o in others or []},
        },
        "claims": {
            "claim1": {
                "value": c1["frac_selective_by_early_epoch"]["value"],
                "threshold": c1["csi_threshold"],
                "progress": c1.get("early_progress", c1["early_epoch"]),
            },
            "claim2": {
                "rho": c2["spearman_mean_csi_vs_test_acc"]["rho"],
                "n": c2["spearman_mean_csi_vs_test_acc"]["n"],
            },
            "claim3": {
                "value": c3["frac_neurons_changing_concept"]["value"],
                "robust": c3["frac_neurons_changing_concept_robust"]["value"],
                "n": c3["tracked_neurons"],
            },
        },
    }


OUTPUTS = ("data", "models", "results", "metrics", "mlruns", "reports", "optuna", ".dvc/cache")


def outputs_gb(root: Path) -> float:
    """Disk used by what `make repro` writes into a project (not the .venv, not the git checkout)."""
    total = sum(f.stat().st_size for d in OUTPUTS for f in (root / d).rglob("*") if f.is_file() and not f.is_symlink())
    return total / 1e9


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or --check) the generated blocks; `collect` refreshes default_run.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", nargs="?", choices=["render", "collect"], default="render")
    ap.add_argument("--check", action="store_true", help="only report stale blocks (exit 1 if any)")
    ap.add_argument("--root", type=Path, help="collect: the finished project to read metrics/ from")
    ap.add_argument(
        "--seeds-root", type=Path, action="append", default=[], help="collect: a finished run with other training seeds"
    )
    a = ap.parse_args(argv)
    if a.action == "collect":
        if a.root is None:
            ap.error("collect needs --root")
        (DATA / "default_run.json").write_text(json.dumps(collect(a.root, a.seeds_root), indent=1) + "\n")
        setup = load("setup")
        setup["repro"]["project_gb"] = round(outputs_gb(a.root), 2)
        (DATA / "setup.json").write_text(json.dumps(setup, indent=1) + "\n")
        print(f"wrote {DATA / 'default_run.json'} and the output size in {DATA / 'setup.json'}")
        return 0
    stale = []
    for path in docs():
        text = path.read_text()
        new, changed = render(text, str(path.relative_to(ROOT)))
        stale += changed
        if changed and not a.check:
            path.write_text(new)
    for s in stale:
        print(("stale: " if a.check else "rewrote: ") + s)
    return 1 if (stale and a.check) else 0


if __name__ == "__main__":
    sys.exit(main())
