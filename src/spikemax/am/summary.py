"""The maximize stage's summary: one row per finished run (results/am/summary.csv) and the
stage's metrics (metrics/am.json)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spikemax.am import SUMMARY_COLUMNS
from spikemax.am.spec import RunSpec
from spikemax.outputs import write_json

if TYPE_CHECKING:
    import pandas as pd

    from spikemax.am.loop import AMResult
    from spikemax.am.plan import Plan


def queries_to_level(responses: np.ndarray, other: np.ndarray, fraction: float = 0.95) -> int:
    """Queries until `responses` reach `fraction` of the best of both runs (its length if never)."""
    y = np.nan_to_num(np.asarray(responses, dtype=np.float64), nan=-np.inf)
    best = max(float(np.max(y, initial=-np.inf)), float(np.nanmax(np.r_[other, -np.inf])))
    if not np.isfinite(best):
        return int(y.size)
    hit = np.flatnonzero(y >= best - (1.0 - fraction) * abs(best))
    return int(hit[0]) + 1 if hit.size else int(y.size)


def queries_saved(res: AMResult, cold: AMResult | None) -> int:
    """Measured: queries the cold twin (same neuron, seed and budget, no warm start) needs to reach
    95 % of the better of the two bests, minus the warm run's (a run that never reaches it counts
    its whole budget), over the twin's queries (the scan's `budget` when the run has budget_last)."""
    if cold is None:
        return 0
    warm_head = res.responses[: len(cold.responses)]
    return queries_to_level(cold.responses, warm_head) - queries_to_level(warm_head, cold.responses)


def run_row(
    spec: RunSpec,
    run_id: str,
    warm_from: str,
    res: AMResult,
    scan_budget: int,
    dataset_max: float,
    saved: int,
    extras: dict[str, Any],
) -> dict[str, Any]:
    """A finished run's summary row (summary.csv's columns, plus the run's extra measures)."""
    from spikemax.selectivity import am_gain

    # Across checkpoints runs compare at the scan's common budget (the last one may search longer).
    head = res.responses[:scan_budget]
    scan_best = float(np.nanmax(head)) if np.isfinite(head).any() else float("nan")
    return {
        "run_key": spec.key,
        "run_id": run_id,
        "epoch": spec.epoch,
        "step": spec.step,
        "progress": spec.progress,
        "generator": spec.generator,
        "target": spec.target.name,
        "layer": spec.target.layer,
        "unit": spec.target.unit,
        "method": spec.method,
        "seed": spec.seed,
        "budget": spec.budget,
        "n_queries": res.n_queries,
        "best_activation": res.best_response,
        "queries_to_95": res.queries_to(0.95),
        "dataset_max": dataset_max,
        "am_gain": am_gain(res.best_response, dataset_max),
        "queries_saved": saved,
        "scan_best_activation": scan_best,
        "scan_am_gain": am_gain(scan_best, dataset_max),
        "run_dir": spec.run_dir,
        "stopped_early": res.stop_reason,
        "warm_start_from": warm_from,
        "grid_n": spec.grid_n,  # a tuned SN-GAN re-grid (empty: the generator's own grid_n)
        **res.interval,  # noise-aware runs: best_estimate, best_low, best_high, best_count
        **extras,
    }


INTERVAL_COLUMNS = ("best_estimate", "best_low", "best_high", "best_count")


def run_metrics(row: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The summary metrics of a nested MLflow run (best_activation is already its curve's last point)."""
    keys = ("queries_to_95", "dataset_max", "am_gain", "queries_saved", "n_queries")
    interval = {k: row[k] for k in INTERVAL_COLUMNS if row.get(k) is not None}  # noise-aware runs only
    extras = {k: v for k, v in row.items() if k not in SUMMARY_COLUMNS and isinstance(v, (int, float))}
    return {**{k: row[k] for k in keys}, "wall_s": wall_s, **interval, **extras}


def write_summary(am_dir: Path, plan: Plan, done: dict[str, dict]) -> pd.DataFrame:
    """results/am/summary.csv: the finished runs of the plan, in plan order (atomic)."""
    import pandas as pd

    rows = [done[r.key] for r in plan.runs if r.key in done]
    df = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    tmp = am_dir / "summary.csv.tmp"
    df.to_csv(tmp, index=False)
    tmp.replace(am_dir / "summary.csv")
    return df


def write_metrics(
    path: Path, df: pd.DataFrame, n_planned: int, n_failed: int, wall_s: float, n_queries_run: int, logging_s: float
) -> dict[str, Any]:
    """metrics/am.json: counts, throughput, logging share and AM gain per (generator, method)."""
    out: dict[str, Any] = {
        "n_runs": len(df),
        "n_planned": n_planned,
        "n_failed": n_failed,
        "wall_s": round(wall_s, 2),
        "queries_run": n_queries_run,
        "queries_per_s": round(n_queries_run / wall_s, 1) if wall_s > 0 else None,
        "logging_s": round(logging_s, 2),
        "logging_share_pct": round(100 * logging_s / wall_s, 2) if wall_s > 0 else None,
    }
    if len(df):
        out["queries_saved_warm_start"] = int(df["queries_saved"].sum())
        out["methods"] = {f"{g}/{method}": gain_stats(sub) for (g, method), sub in df.groupby(["generator", "method"])}
        # The last checkpoint is the trained network: where AM should beat the dataset.
        last = df[df["epoch"] == df["epoch"].max()]
        out["last_checkpoint"] = {
            f"{g}/{method}": gain_stats(sub) for (g, method), sub in last.groupby(["generator", "method"])
        }
    write_json(path, out)
    return out


def gain_stats(runs: pd.DataFrame) -> dict[str, Any]:
    """What am.json reports of a set of summary rows: AM gain medians and the share of runs beating
    the best test image (`selectivity.am_gain_summary`, the tune stage's score too); `n_silent` counts
    runs on units silent on every test image (no AM gain; above the dataset only if AM drives them)."""
    from spikemax.selectivity import am_gain_summary

    return {
        "n_runs": len(runs),
        "n_silent": int((runs["dataset_max"].astype(float) <= 0).sum()),
        "median_best_activation": float(runs["best_activation"].median()),
        **am_gain_summary(runs["best_activation"].to_numpy(float), runs["dataset_max"].to_numpy(float)),
        "median_queries_to_95": float(runs["queries_to_95"].median()),
    }
