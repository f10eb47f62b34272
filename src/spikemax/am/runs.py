"""The maximize stage's runs: open, finish or fail each nested MLflow run, and write the stage's outputs."""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from spikemax import images, tracking
from spikemax.am import SUMMARY_COLUMNS
from spikemax.am.loop import AMResult
from spikemax.am.plan import (
    PRIOR_GENERATORS,
    PRIOR_METHODS,
    Combo,
    Plan,
    finished_runs,
    population_key,
    read_summary,
    run_settings,
    runs_tt,
    with_budget,
)
from spikemax.neurons import Target
from spikemax.optim import Optimizer, make_optimizer, options_for
from spikemax.outputs import write_json
from spikemax.querylog import QueryLogger

if TYPE_CHECKING:
    import pandas as pd

    from spikemax.data import Prepared
    from spikemax.generators import LatentGrid
    from spikemax.params import Params, Paths
    from spikemax.snn import ConvSNN


def metric_batch(values: dict[str, Any]) -> list:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(k, float(v), ts, 0) for k, v in values.items() if v is not None]


def param_batch(values: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)) for k, v in values.items()]


@dataclass
class OpenRun:
    """A nested run in flight."""

    combo: Combo
    run_id: str
    logger: QueryLogger
    warm_from: str


def queries_to_level(responses: np.ndarray, other: np.ndarray, fraction: float = 0.95) -> int:
    """Queries until `responses` reach `fraction` of the best of both runs (its length if never)."""
    y = np.nan_to_num(np.asarray(responses, dtype=np.float64), nan=-np.inf)
    best = max(float(np.max(y, initial=-np.inf)), float(np.nanmax(np.r_[other, -np.inf])))
    if not np.isfinite(best):
        return int(y.size)
    hit = np.flatnonzero(y >= best - (1.0 - fraction) * abs(best))
    return int(hit[0]) + 1 if hit.size else int(y.size)


def fit_grid_prior(grid: Any, prepared: Any, ckpt: Path, rank: int, n_images: int, cache: Path) -> Any:
    """TT prior of the grid's encoder indices of the first `n_images` prepared train images; reused
    from `cache` when the generator checkpoint, the train images and the settings are the same."""
    import hashlib

    from spikemax.optim.prior import TTPrior, fit_tt_prior

    x, _ = prepared.tensors("train")
    x = x[:n_images]
    h = hashlib.sha1()
    h.update(Path(ckpt).read_bytes())
    h.update(x.numpy().tobytes())
    h.update(f"{rank}/{n_images}".encode())
    key = h.hexdigest()
    if cache.is_file():
        with np.load(cache) as z:
            if str(z["key"]) == key:
                return TTPrior.from_dict(z)
    idx = grid.encode(x).numpy()
    prior = fit_tt_prior(idx, grid.n, rank=rank, seed=0)
    np.savez(cache, key=np.array(key), **prior.to_dict())
    return prior


class AMRuns:
    """State of one `maximize` invocation."""

    def __init__(self, params: Params, paths: Paths, plan_: Plan, scan: bool = True) -> None:
        import mlflow

        from spikemax.data import Prepared

        self.m = params.maximize
        self.paths = paths
        self.plan = plan_
        self.am_dir = paths.results / "am"
        self.am_dir.mkdir(parents=True, exist_ok=True)
        self.prepared = Prepared.load(paths.prepared)
        tracking.enable_fast_sqlite()
        self.uri = tracking.configure(paths.root)
        self.client = mlflow.MlflowClient(self.uri)
        self.eid = tracking.experiment_id(tracking.AM_EXPERIMENT, paths.root)
        # scan=False: a worker running one group of a live stage (whose other runs are not stale).
        self.done = finished_runs(self.client, self.eid, plan_, self.am_dir) if scan else {}
        self.failed: list[str] = []
        self.parent_id: str | None = None
        self.logging_s = 0.0  # time inside the query loggers (the cost of logging every query)
        self._priors: dict[tuple[str, int], Any] = {}

    # -- runs ---------------------------------------------------------------------------------
    def open_run(self, combo: Combo, grid: LatentGrid, snn_ckpt: Path) -> OpenRun:

        m = with_budget(
            run_settings(self.m, combo.method, combo.generator), combo.budget
        )  # tuned settings where they apply
        tuned = m.tuned_settings(combo.generator) if m.tuned_for(combo.generator, combo.method) else {}
        warm_from = self.warm_source(combo)
        tags = {
            "mlflow.parentRunId": self.parent_id,
            tracking.RUN_KEY_TAG: combo.key,
            "spikemax.layer": combo.target.layer,
            "spikemax.warm_start_from": warm_from or "none",
        }
        run = self.client.create_run(self.eid, run_name=combo.key, tags=tags)
        run_id = run.info.run_id
        self.client.log_batch(
            run_id,
            params=param_batch(
                {
                    "method": combo.method,
                    "rank": m.tt.rank if runs_tt(combo.method, combo.generator, m) else "none",
                    "grid_n": grid.n,
                    "grid_d": grid.d,
                    "budget": m.budget,
                    "batch": m.batch,
                    "epoch": combo.epoch,
                    "step": combo.step,
                    "progress": combo.progress,
                    "target": combo.target.name,
                    "generator": combo.generator,
                    "seed": combo.seed,
                    "layer": combo.target.layer,
                    "unit": combo.target.unit,
                    "noise": json.dumps(m.noise.model_dump(), sort_keys=True),
                    "target_value": m.target_value,
                    "warm_start": bool(warm_from),
                    "checkpoint": snn_ckpt.name,
                    "options": json.dumps(options_for(combo.method, m, grid)),
                    "resolved_method": options_for(combo.method, m, grid).get("resolved", combo.method),
                    "prior": bool(m.prior and combo.generator in PRIOR_GENERATORS and combo.method in PRIOR_METHODS),
                    "tuned": tuned.get("study", "none"),  # the tune study whose adopted settings ran
                    # what decided the method and settings: study | default | fallback | configured
                    "method_source": m.method_source(combo.generator, combo.method),
                    **(
                        {"population": population_key(combo), "population_rule": m.population_rule}
                        if m.population
                        else {}
                    ),
                }
            ),
        )
        run_dir = self.am_dir / combo.run_dir
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)  # leftovers of an unfinished attempt
        logger = QueryLogger(self.client, run_id, run_dir, artifact_uri=run.info.artifact_uri)
        return OpenRun(combo, run_id, logger, warm_from)

    def warm_source(self, combo: Combo) -> str:
        """Key of the previous epoch's TT run this combination warm-starts from ("" = cold start)."""
        if runs_tt(combo.method, combo.generator, self.m) and self.m.warm_start:
            prev = self._prev_combo(combo)
            # Only from a search that made the neuron fire: a silent neuron's search (e.g. class units
            # of the untrained epoch 0) learned nothing about it, and starting from it cost queries
            # (benchmarks: SN-GAN e0 -> e2 warm starts were slower on 6 of 8 neurons).
            # The previous run's summary from memory or, on a Ray worker that did not run it, from disk.
            row = (self.done.get(prev.key) or read_summary(self.am_dir, prev) or {}) if prev is not None else {}
            fired = prev is not None and float(row.get("best_activation", 0.0) or 0.0) > 0
            if prev is not None and fired and (self.am_dir / prev.run_dir / "tt_state.pkl").is_file():
                return prev.key
        return ""

    def _prev_combo(self, combo: Combo) -> Combo | None:
        epochs = self.plan.epochs
        i = epochs.index(combo.epoch)
        if i == 0:
            return None
        want = (epochs[i - 1], combo.generator, combo.target, combo.method, combo.seed)
        for c in self.plan.combos:
            if (c.epoch, c.generator, c.target, c.method, c.seed) == want:
                return c
        return None

    def make_optimizer(self, op: OpenRun | Combo, grid: LatentGrid) -> Optimizer:
        """The optimizer of an open run (or of a finished combination re-proposing in a population)."""
        combo, warm_from = (op.combo, op.warm_from) if isinstance(op, OpenRun) else (op, self.warm_source(op))
        m = with_budget(run_settings(self.m, combo.method, combo.generator), combo.budget)
        opts = options_for(combo.method, m, grid)
        prior = self.prior_for(combo.generator, grid, m.tt.rank) if combo.method in PRIOR_METHODS else None
        if prior is not None:
            opts["prior"] = prior
        if warm_from:
            with open(self.am_dir / "runs" / warm_from / "tt_state.pkl", "rb") as f:
                opts["init"] = pickle.load(f)
        return make_optimizer(combo.method, grid.d, grid.n, seed=combo.seed, **opts)

    def prior_for(self, generator: str, grid: Any, rank: int | None = None) -> Any:
        """The TT data prior of a codebook grid (None: ordered grid, or `prior: false`) at `rank`
        (default `tt.rank`; a tuned TT run's prior has its tuned rank), fitted once per stage run to
        the encoder's indices of the prepared train images, cached by content hash."""
        if not self.m.prior or generator not in PRIOR_GENERATORS:
            return None
        rank = self.m.tt.rank if rank is None else rank
        if (generator, rank) not in self._priors:
            name = f"prior_{generator}.npz" if rank == self.m.tt.rank else f"prior_{generator}_r{rank}.npz"
            self._priors[generator, rank] = fit_grid_prior(
                grid,
                self.prepared,
                self.plan.gen_ckpts[generator],
                rank,
                self.m.prior_images,
                self.am_dir / name,
            )
        return self._priors[generator, rank]

    def make_cold_twin(self, op: OpenRun, grid: Any) -> Any:
        """The same run without the warm start (same seed, options and prior): the measured reference
        of `queries_saved`."""
        m = with_budget(run_settings(self.m, op.combo.method, op.combo.generator), op.combo.budget)
        opts = options_for(op.combo.method, m, grid)
        prior = self.prior_for(op.combo.generator, grid, m.tt.rank) if op.combo.method in PRIOR_METHODS else None
        if prior is not None:
            opts["prior"] = prior
        return make_optimizer(op.combo.method, grid.d, grid.n, seed=op.combo.seed, **opts)

    def finish_run(
        self,
        op: OpenRun,
        res: AMResult,
        optimizer: Optimizer,
        dataset_max: float,
        extras: dict[str, float],
        cold: AMResult | None = None,
    ) -> dict:
        from spikemax import selectivity as S

        c = op.combo
        run_dir = self.am_dir / c.run_dir
        op.logger.close()
        self.logging_s += op.logger.seconds
        q95 = res.queries_to(0.95)
        saved = 0
        if op.warm_from and cold is not None:
            # Measured: queries the cold twin (same neuron, seed and budget, no warm start) needs to
            # reach 95 % of the better of the two bests, minus the warm run's (a run that never
            # reaches it counts its whole budget).
            # Over the scan's first `budget` queries (the twin's budget when the run has budget_last).
            warm_head = res.responses[: len(cold.responses)]
            saved = queries_to_level(cold.responses, warm_head) - queries_to_level(warm_head, cold.responses)
        image = res.best_image if res.best_image is not None else None
        np.savez(
            run_dir / "best.npz",
            image=(image.numpy() if image is not None else np.full(self.prepared.shape, np.nan)).astype(np.float32),
            indices=(res.best_indices if res.best_indices is not None else np.full(1, -1)).astype(np.int64),
        )
        if image is not None:
            pixels = self.prepared.denormalize(image[None])[0].clamp(0, 1)
            images.save_png(pixels, run_dir / "best_stimulus.png")
        images.save_convergence_png(
            res.responses, run_dir / "convergence.png", title=f"{c.target.name} e{c.epoch} {c.generator} {c.method}"
        )
        if hasattr(optimizer, "state_dict") and runs_tt(c.method, c.generator, self.m):
            with open(run_dir / "tt_state.pkl", "wb") as f:
                pickle.dump(optimizer.state_dict(), f)
        gain = S.am_gain(res.best_response, dataset_max)
        # Across checkpoints runs compare at the scan's common budget (the last one may search longer).
        head = res.responses[: self.m.budget]
        scan_best = float(np.nanmax(head)) if np.isfinite(head).any() else float("nan")
        summary = {
            "best_activation": res.best_response,
            "queries_to_95": q95,
            "dataset_max": dataset_max,
            "am_gain": gain,
            "queries_saved": saved,
            "n_queries": res.n_queries,
            "wall_s": res.wall_s,
            **extras,
        }
        # best_activation is already the last point of its per-query curve (MLflow shows the latest).
        self.client.log_batch(
            op.run_id, metrics=metric_batch({k: v for k, v in summary.items() if k != "best_activation"})
        )
        for name in ("best_stimulus.png", "convergence.png"):
            if (run_dir / name).is_file():
                op.logger.log_artifact(run_dir / name)
        row = {
            "run_key": c.key,
            "run_id": op.run_id,
            "epoch": c.epoch,
            "step": c.step,
            "progress": c.progress,
            "generator": c.generator,
            "target": c.target.name,
            "layer": c.target.layer,
            "unit": c.target.unit,
            "method": c.method,
            "seed": c.seed,
            "budget": c.budget or self.m.budget,
            "n_queries": res.n_queries,
            "best_activation": res.best_response,
            "queries_to_95": q95,
            "dataset_max": dataset_max,
            "am_gain": gain,
            "queries_saved": saved,
            "scan_best_activation": scan_best,
            "scan_am_gain": S.am_gain(scan_best, dataset_max),
            "run_dir": c.run_dir,
            "stopped_early": res.stop_reason,
            "warm_start_from": op.warm_from,
            **extras,
        }
        write_json(run_dir / "summary.json", row, indent=None)
        # FINISHED last: a kill before this line leaves the run to be redone, never half-counted.
        self.client.set_terminated(op.run_id, "FINISHED")
        self.done[c.key] = row
        return row

    def fail_run(self, op: OpenRun, err: BaseException) -> None:
        msg = f"{type(err).__name__}: {err}"[:4000]
        if op.logger.writer is not None:
            op.logger.writer.abandon(msg)  # the queued metrics of a failed run need not reach the server
        try:
            self.client.set_tag(op.run_id, "spikemax.failure", msg)
            self.client.set_terminated(op.run_id, "FAILED")
        except Exception:
            pass
        self.failed.append(f"{op.combo.key}: {msg}")

    def fail_open_children(self, reason: str) -> None:
        """Mark FAILED every run of this invocation's parent still RUNNING (its process is gone)."""
        for run in self.client.search_runs(
            [self.eid],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}' and status = 'RUNNING'",
            max_results=10000,
        ):
            self.client.set_tag(run.info.run_id, "spikemax.failure", reason)
            self.client.set_terminated(run.info.run_id, "FAILED")
            self.failed.append(f"{run.data.tags.get(tracking.RUN_KEY_TAG, run.info.run_id)}: {reason}")

    # -- outputs ------------------------------------------------------------------------------
    def write_summary(self) -> pd.DataFrame:
        import pandas as pd

        rows = [self.done[c.key] for c in self.plan.combos if c.key in self.done]
        df = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
        tmp = self.am_dir / "summary.csv.tmp"
        df.to_csv(tmp, index=False)
        tmp.replace(self.am_dir / "summary.csv")
        return df

    def write_grids(self) -> list[Path]:

        out = []
        seed = self.m.seeds[0]
        targets = self.plan.targets[:40]  # a readable page; every stimulus is in its run dir
        for g in self.m.generators:
            for method in self.m.methods:
                cells: list[np.ndarray | None] = []
                for t in targets:
                    for e in self.plan.epochs:
                        c = next(
                            (
                                c
                                for c in self.plan.combos
                                if (c.epoch, c.generator, c.target, c.method, c.seed) == (e, g, t, method, seed)
                            ),
                            None,
                        )
                        img = None
                        best = self.am_dir / c.run_dir / "best.npz" if c is not None else None
                        if c is not None and best is not None and c.key in self.done and best.is_file():
                            with np.load(best) as z:
                                x = torch.from_numpy(z["image"])
                            if torch.isfinite(x).all():
                                img = self.prepared.denormalize(x[None])[0].clamp(0, 1).numpy()
                        cells.append(img)
                path = self.am_dir / f"stimuli_{g}_{method}.png"
                images.save_image_grid_png(
                    cells,
                    len(targets),
                    len(self.plan.epochs),
                    path,
                    row_labels=[t.name for t in targets],
                    col_labels=[f"epoch {e}" for e in self.plan.epochs],
                    title=f"best stimuli: {g}, {method}, seed {seed}",
                )
                out.append(path)
        return out

    def prune(self) -> None:
        """Drop run dirs of other params (results/am mirrors the current plan; MLflow keeps them all)."""
        import shutil

        keys = {c.key for c in self.plan.combos}
        for d in (self.am_dir / "runs").glob("*"):
            if d.is_dir() and d.name not in keys:
                shutil.rmtree(d, ignore_errors=True)
        pops = {population_key(c) for c in self.plan.combos} if self.m.population else set()
        for d in (self.am_dir / "populations").glob("*"):
            if d.is_dir() and d.name not in pops:
                shutil.rmtree(d, ignore_errors=True)

    def write_metrics(self, df: pd.DataFrame, wall_s: float, n_queries_run: int) -> dict:
        out: dict[str, Any] = {
            "n_runs": len(df),
            "n_planned": len(self.plan.combos),
            "n_failed": len(self.failed),
            "wall_s": round(wall_s, 2),
            "queries_run": n_queries_run,
            "queries_per_s": round(n_queries_run / wall_s, 1) if wall_s > 0 else None,
            "logging_s": round(self.logging_s, 2),
            "logging_share_pct": round(100 * self.logging_s / wall_s, 2) if wall_s > 0 else None,
        }
        if len(df):
            out["queries_saved_warm_start"] = int(df["queries_saved"].sum())
            out["methods"] = {
                f"{g}/{method}": gain_stats(sub) for (g, method), sub in df.groupby(["generator", "method"])
            }
            # The last checkpoint is the trained network: where AM should beat the dataset.
            last = df[df["epoch"] == df["epoch"].max()]
            out["last_checkpoint"] = {
                f"{g}/{method}": gain_stats(sub) for (g, method), sub in last.groupby(["generator", "method"])
            }
        write_json(self.paths.metrics / "am.json", out)
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


def dataset_stats(net: ConvSNN, prepared: Prepared, targets: list[Target], max_images: int) -> dict[str, np.ndarray]:
    """Per target over the prepared test images: max response, CSI and lifetime sparseness."""
    from spikemax import selectivity as S
    from spikemax.neurons import firing_rates

    x, labels = prepared.tensors("test")
    names = [t.name for t in targets]
    with torch.no_grad():
        rates = np.concatenate(
            [
                np.asarray(firing_rates(net, x[i : i + max_images], names), dtype=np.float64).reshape(-1, len(names))
                for i in range(0, len(x), max_images)
            ]
        )
    means = S.class_means(rates, labels.numpy(), len(prepared.classes))
    return {"dataset_max": rates.max(axis=0), "csi": S.csi(means), "sparseness": S.lifetime_sparseness(rates)}


def stimulus_stats(net: ConvSNN, prepared: Prepared, results: list[AMResult]) -> list[dict[str, float]]:
    """Concept of each best stimulus under this checkpoint (class, probability, perplexity), complexity."""
    from spikemax import selectivity as S

    have = [i for i, r in enumerate(results) if r.best_image is not None]
    out: list[dict[str, float]] = [{} for _ in results]
    if not have:
        return out
    x = torch.stack([img for i in have if (img := results[i].best_image) is not None])
    probs = net.class_probs(x).detach().cpu().numpy()
    cls, prob, ppl = S.concept(probs)
    pixels = prepared.denormalize(x).clamp(0, 1).numpy()
    for j, i in enumerate(have):
        out[i] = {
            "concept": int(cls[j]),
            "concept_prob": float(prob[j]),
            "perplexity": float(ppl[j]),
            "complexity": S.png_complexity(pixels[j]),
        }
    return out
