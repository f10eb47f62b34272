"""Analysis of the AM results: selectivity across training epochs, concept changes, links to accuracy.

Inputs: every SNN checkpoint (dataset responses -> CSI for all epochs, cheap), the maximize
stage's `results/am/summary.csv` and run folders (optimal stimuli of the AM'd epochs), and
`metrics/snn_epochs.csv` (accuracy per epoch). Outputs go under `results/analysis/` plus
`metrics/analysis.json`; an MLflow run in experiment `analysis` carries the claims' headline metrics,
analysis.json and the figures, every AM run gets class tags (`spikemax.final_concept`,
`spikemax.preferred_class`), and the AM experiment gets saved comparison views.

Checkpoints are keyed by their index (`epoch` column: 0 = untrained, ordered by training
progress); `progress` is the fractional epoch and `step` the optimizer step of each one.

The *optimal stimulus* of a neuron at a checkpoint (for one generator) is the best stimulus found by
any method and seed for that (epoch, generator, target); a *restart* is one seed of it (best over
methods). A concept change is *restart-robust* when every restart of both checkpoints agrees on its
concept and the two concepts differ; checkpoints whose restarts disagree are skipped.

Every claim number carries a seeded 95 % percentile-bootstrap interval over neurons (`lo`, `hi`);
correlations over checkpoints carry a permutation p-value.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spikemax import SpikemaxError
from spikemax import selectivity as S
from spikemax.am import SUMMARY_COLUMNS
from spikemax.params import Params, Paths
from spikemax.stats import bootstrap_ci, mean_ci, spearman, spearman_ci, spearman_rho

STIMULUS_KEYS = ["epoch", "generator", "target"]


# ---- pure functions over sequences -------------------------------------------------------


def pixel_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two images' pixels; 0 when either image is flat."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / den) if den > 0 else 0.0


def latent_distance(a: np.ndarray, b: np.ndarray, n: int | None = None) -> float:
    """Distance of two latent grid points in [0, 1].

    Ordinal grids (SN-GAN: index -> N(0,1) quantile) pass `n`: mean |a - b| / (n - 1).
    Categorical latents (VQ-VAE codes) pass n=None: the fraction of positions whose code differs.
    """
    a = np.asarray(a, dtype=np.int64).ravel()
    b = np.asarray(b, dtype=np.int64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"latent shapes differ: {a.shape} vs {b.shape}")
    if n is None:
        return float(np.mean(a != b))
    return float(np.mean(np.abs(a - b)) / max(n - 1, 1))


def concept_changes(epochs: Sequence[int], concepts: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Change events (epoch_before, epoch_after, concept_before, concept_after) in epoch order."""
    order = np.argsort(np.asarray(epochs), kind="stable")
    ep = [int(epochs[i]) for i in order]
    cs = [int(concepts[i]) for i in order]
    return [(ep[i - 1], ep[i], cs[i - 1], cs[i]) for i in range(1, len(ep)) if cs[i] != cs[i - 1]]


def robust_concept_changes(
    epochs: Sequence[int], restart_concepts: Sequence[Sequence[int]]
) -> list[tuple[int, int, int, int]]:
    """Change events that exceed the spread between restarts: over the checkpoints whose restarts all
    agree (one concept), in epoch order, the consecutive pairs whose concepts differ.

    A checkpoint where two restarts disagree is skipped: its concept is not resolved by the search,
    so a change into or out of it could be a different local optimum rather than a changed neuron.
    """
    settled = [(int(e), int(next(iter(set(cs))))) for e, cs in zip(epochs, restart_concepts) if len(set(cs)) == 1]
    settled.sort()
    return [
        (settled[i - 1][0], settled[i][0], settled[i - 1][1], settled[i][1])
        for i in range(1, len(settled))
        if settled[i][1] != settled[i - 1][1]
    ]


def first_selective_epoch(epochs: Sequence[int], csi_values: Sequence[float], threshold: float) -> int | None:
    """First epoch (in epoch order) whose CSI is above `threshold`; None if never."""
    for e, c in sorted(zip(epochs, csi_values)):
        if c > threshold:
            return int(e)
    return None


def selective_fraction_by_epoch(first: Sequence[int | None], epochs: Sequence[int]) -> np.ndarray:
    """Fraction of units that have become selective at or before each epoch (cumulative)."""
    f = np.array([np.inf if v is None else v for v in first], dtype=np.float64)
    if f.size == 0:
        return np.zeros(len(epochs))
    return np.array([float(np.mean(f <= e)) for e in epochs])


# ---- dataset responses over all checkpoints ---------------------------------------------


def unit_stats(
    rates: dict[str, np.ndarray], labels: np.ndarray, num_classes: int, min_rate: float = 0.0
) -> pd.DataFrame:
    """One row per unit: CSI, preferred class, lifetime sparseness, dataset max and mean rate.

    `csi` is 0 for a unit whose mean rate is below `min_rate`: a few stray spikes on one class
    would make a nearly silent unit look perfectly selective. `csi_raw` keeps the unfiltered value.
    """
    frames = []
    for layer, r in rates.items():
        means = S.class_means(r, labels, num_classes)
        raw = S.csi(means)
        mean_rate = r.mean(axis=0)
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "unit": np.arange(r.shape[1]),
                    "csi": np.where(mean_rate >= min_rate, raw, 0.0),
                    "csi_raw": raw,
                    "preferred_class": S.preferred_class(means),
                    "sparseness": S.lifetime_sparseness(r),
                    "dataset_max": r.max(axis=0),
                    "mean_rate": mean_rate,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def dataset_selectivity(
    ckpts: dict[int, Path], images: Any, labels: np.ndarray, num_classes: int, batch_size: int, min_rate: float = 0.0
) -> tuple[pd.DataFrame, list[str]]:
    """Unit stats for every checkpoint epoch, and the spiking layers in depth order."""
    import torch

    from spikemax.neurons import layer_rates
    from spikemax.snn import load_snn, progress

    frames, layers = [], []
    for epoch in sorted(ckpts):
        net = load_snn(ckpts[epoch])
        net.eval()
        layers = list(net.spiking_layers())
        with torch.no_grad():
            rates = {
                k: np.asarray(v, dtype=np.float64) for k, v in layer_rates(net, images, batch_size=batch_size).items()
            }
        df = unit_stats(rates, labels, num_classes, min_rate)
        df.insert(0, "epoch", epoch)
        df.insert(1, "progress", progress(ckpts[epoch]).epoch)
        frames.append(df)
    return pd.concat(frames, ignore_index=True), layers


# ---- AM results -----------------------------------------------------------------------------


def load_summary(paths: Paths) -> pd.DataFrame:
    """The maximize stage's summary.csv, checked for the columns the analysis reads."""
    path = paths.results / "am" / "summary.csv"
    if not path.is_file():
        raise SpikemaxError(f"{path} missing: run `spikemax maximize` (or `dvc repro maximize`) first")
    df = pd.read_csv(path)
    missing = [c for c in SUMMARY_COLUMNS if c not in df.columns]
    if missing:
        raise SpikemaxError(f"{path}: missing columns {', '.join(missing)}")
    if df.empty:
        raise SpikemaxError(f"{path} has no runs: the maximize stage finished nothing")
    return df


def load_best(am_dir: Path, run_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Best stimulus (C, H, W, normalized space) and its latent indices of one AM run."""
    with np.load(am_dir / run_dir / "best.npz") as z:
        return np.asarray(z["image"], dtype=np.float32), np.asarray(z["indices"], dtype=np.int64)


def stimulus_stats(
    runs: pd.DataFrame, images: np.ndarray, final_net: Any, prepared: Any, units: pd.DataFrame
) -> pd.DataFrame:
    """Per AM run: concept under the final SNN, complexity, AM gain vs the dataset, the unit's CSI."""
    import torch

    x = torch.from_numpy(images)
    probs = final_net.class_probs(x).detach().cpu().numpy()
    cls, prob, ppl = S.concept(probs)
    pixels = prepared.denormalize(x).clamp(0, 1).numpy()
    out = runs.copy()
    out["concept"] = cls
    out["concept_name"] = [prepared.classes[c] for c in cls]
    out["concept_prob"] = prob
    out["perplexity"] = ppl
    out["complexity"] = [S.png_complexity(p) for p in pixels]
    stats = units[["epoch", "layer", "unit", "csi", "preferred_class", "sparseness", "dataset_max"]]
    out = out.drop(columns=[c for c in ("csi", "preferred_class", "sparseness") if c in out.columns])
    out = out.rename(columns={"dataset_max": "am_dataset_max"}).merge(stats, on=["epoch", "layer", "unit"], how="left")
    # At the scan's common budget: the last checkpoint may search longer (maximize.budget_last).
    best = out["scan_best_activation"] if "scan_best_activation" in out else out["best_activation"]
    out["am_gain_dataset"] = S.am_gain(best.to_numpy(dtype=float), out["dataset_max"].to_numpy())
    return out


def optimal_stimuli(runs: pd.DataFrame) -> pd.DataFrame:
    """Best run per (epoch, generator, target) over methods and seeds."""
    idx = runs.sort_values("best_activation", ascending=False, kind="stable").groupby(STIMULUS_KEYS).head(1).index
    return runs.loc[idx].sort_values(["generator", "layer", "unit", "epoch"], kind="stable").reset_index(drop=True)


def restart_stimuli(runs: pd.DataFrame) -> pd.DataFrame:
    """Best run per (epoch, generator, target, seed) over methods: one stimulus per restart."""
    keys = [*STIMULUS_KEYS, "seed"]
    idx = runs.sort_values("best_activation", ascending=False, kind="stable").groupby(keys).head(1).index
    return runs.loc[idx].sort_values(["generator", "layer", "unit", "epoch", "seed"], kind="stable")


def grid_size(params: Params, generator: str, run: Any = None) -> int | None:
    """Grid resolution of an ordinal latent (SN-GAN): the run's own (a tuned re-grid, summary.csv's
    `grid_n`) or the generator's; None for categorical codes (VQ-VAE)."""
    if generator == "vqvae":
        return None
    own = None if run is None else run.get("grid_n")
    if own is not None and not pd.isna(own):
        return int(own)
    section = getattr(params.generators, generator, None)
    return getattr(section, "grid_n", None)


def trajectories(
    optimal: pd.DataFrame, latents: dict[str, np.ndarray], params: Params, pixels: dict[str, np.ndarray]
) -> pd.DataFrame:
    """Optimal stimuli with similarity to the previous AM'd epoch, to the last one, and concept changes."""
    rows = []
    from_epoch = params.analyze.concept_from_epoch
    for (gen, _target), g in optimal.groupby(["generator", "target"], sort=False):
        g = g.sort_values("epoch")
        keys = g["run_key"].tolist()
        last = keys[-1]
        prev_key = None
        prev_n = None
        prev_concept = None
        for key, (_, row) in zip(keys, g.iterrows()):
            r = row.to_dict()
            n = grid_size(params, gen, r)
            r["pixel_corr_prev"] = pixel_correlation(pixels[prev_key], pixels[key]) if prev_key else np.nan
            # grid indices compare only on one grid (a tuned re-grid of one run is another grid)
            r["latent_dist_prev"] = (
                latent_distance(latents[prev_key], latents[key], n)
                if prev_key and latents[prev_key].shape == latents[key].shape and n == prev_n
                else np.nan
            )
            r["pixel_corr_final"] = pixel_correlation(pixels[last], pixels[key])
            tracked = row["progress"] >= from_epoch
            r["concept_changed"] = bool(tracked and prev_concept is not None and row["concept"] != prev_concept)
            if tracked:
                prev_concept = row["concept"]
            prev_key = key
            prev_n = n
            rows.append(r)
    return pd.DataFrame(rows)


def neuron_changes(traj: pd.DataFrame, from_epoch: float, restarts: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per tracked (generator, target): checkpoints tracked (progress >= from_epoch), concept sequence,
    raw change count (optimal stimuli) and restart-robust change count (None with one restart)."""
    rows = []
    by_neuron = dict(iter(restarts.groupby(["generator", "target"], sort=False))) if restarts is not None else {}
    for (gen, target), g in traj.groupby(["generator", "target"], sort=False):
        g = g[g["progress"] >= from_epoch].sort_values("epoch")
        events = concept_changes(g["epoch"].tolist(), g["concept"].tolist())
        r = by_neuron.get((gen, target))
        robust: int | None = None
        settled: float | None = None
        n_restarts = 0
        if r is not None and len(g):
            r = r[r["epoch"].isin(g["epoch"])]
            per = r.groupby("epoch")["concept"].apply(list)
            n_restarts = int(r.groupby("epoch")["seed"].nunique().min()) if len(r) else 0
            if n_restarts >= 2:
                robust = len(robust_concept_changes(per.index.tolist(), per.tolist()))
                settled = float(np.mean([len(set(c)) == 1 for c in per]))
        rows.append(
            {
                "generator": gen,
                "target": target,
                "layer": g["layer"].iloc[0] if len(g) else None,
                "unit": g["unit"].iloc[0] if len(g) else None,
                "epochs_tracked": len(g),
                "concepts": " ".join(str(c) for c in g["concept"]),
                "changes": len(events),
                "changed": len(events) > 0,
                "distinct_concepts": int(g["concept"].nunique()),
                "restarts": n_restarts,
                "robust_changes": robust,
                "robust_changed": None if robust is None else robust > 0,
                "frac_restarts_agree": settled,
            }
        )
    return pd.DataFrame(rows)


# ---- summaries --------------------------------------------------------------------------


def first_selective_table(units: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per unit: first epoch with CSI above the threshold (NaN if never), final CSI and preferred class."""
    rows = []
    final = units["epoch"].max()
    for (layer, unit), g in units.groupby(["layer", "unit"], sort=False):
        fe = first_selective_epoch(g["epoch"].tolist(), g["csi"].tolist(), threshold)
        last = g[g["epoch"] == final].iloc[0]
        prog = dict(zip(g["epoch"], g["progress"])) if "progress" in g else {}
        rows.append(
            {
                "layer": layer,
                "unit": unit,
                "first_selective_epoch": np.nan if fe is None else fe,
                "first_selective_progress": np.nan if fe is None else prog.get(fe, np.nan),
                "final_csi": last["csi"],
                "final_preferred_class": last["preferred_class"],
                "max_csi": g["csi"].max(),
            }
        )
    return pd.DataFrame(rows)


def epoch_table(units: pd.DataFrame, runs: pd.DataFrame, accuracy: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per checkpoint: progress, accuracy, mean CSI and fraction selective (all units), mean AM gain and
    concept prob; `*_lo` / `*_hi` = 95 % bootstrap interval over units (CSI) or AM'd neurons (AM)."""
    rows = []
    for e, u in units.groupby("epoch"):
        row: dict[str, Any] = {"epoch": e}
        if "progress" in u:
            row["progress"] = float(u["progress"].iloc[0])
        for name, values in (("mean_csi", u["csi"]), ("frac_selective", (u["csi"] > threshold).astype(float))):
            ci = mean_ci(values.to_numpy())
            row.update({name: ci["value"], f"{name}_lo": ci["lo"], f"{name}_hi": ci["hi"]})
        row["mean_sparseness"] = float(u["sparseness"].mean())
        r = runs[runs["epoch"] == e]
        for name, col in (("am_gain", "am_gain_dataset"), ("concept_prob", "concept_prob")):
            # one value per AM'd neuron (mean over methods and restarts), resampled as neurons
            per = r.groupby(["generator", "target"])[col].mean().to_numpy() if len(r) else np.array([])
            ci = mean_ci(per)
            row.update({name: ci["value"], f"{name}_lo": ci["lo"], f"{name}_hi": ci["hi"]})
        row["perplexity"] = float(r["perplexity"].mean()) if len(r) else np.nan
        row["complexity"] = float(r["complexity"].mean()) if len(r) else np.nan
        rows.append(row)
    t = pd.DataFrame(rows)
    if not accuracy.empty:
        acc = accuracy.drop(columns=[c for c in ("step", "progress") if c in accuracy and "progress" in t])
        t = acc.merge(t, on="epoch", how="right")
    return t.sort_values("epoch").reset_index(drop=True)


def wide_by_layer(df: pd.DataFrame, value: str, layers: list[str]) -> pd.DataFrame:
    """checkpoint x layer table of the mean of `value` (one column per layer, depth order), with progress."""
    keys = ["epoch", "progress"] if "progress" in df else ["epoch"]
    w = df.groupby([*keys, "layer"])[value].mean().unstack("layer")
    return w.reindex(columns=[lay for lay in layers if lay in w.columns]).reset_index()


def read_accuracy(paths: Paths) -> pd.DataFrame:
    """metrics/snn_epochs.csv (epoch, ..., test_acc), or an empty frame if training wrote none."""
    path = paths.metrics / "snn_epochs.csv"
    if not path.is_file():
        return pd.DataFrame(columns=["epoch", "test_acc"])
    df = pd.read_csv(path)
    return df[[c for c in ("epoch", "step", "progress", "val_acc", "test_acc") if c in df.columns]]


def _num(v: Any) -> float | None:
    """A JSON-safe number: NaN / inf / missing become None."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _matrix(df: pd.DataFrame, rows: list[str], value: str, epochs: list[int]) -> np.ndarray:
    """(neurons x checkpoints) matrix of the mean `value` per (row keys, epoch); NaN where absent."""
    if df.empty:
        return np.zeros((0, len(epochs)))
    w = df.groupby([*rows, "epoch"])[value].mean().unstack("epoch")
    return w.reindex(columns=epochs).to_numpy(dtype=np.float64)


def _col_means(m: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Column means over the rows idx, ignoring NaN (NaN where a column has no value)."""
    sub = m[idx]
    ok = np.isfinite(sub)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok.any(axis=0), np.where(ok, sub, 0).sum(axis=0) / ok.sum(axis=0), np.nan)


def _corr_vs_acc(m: np.ndarray, acc: np.ndarray) -> dict:
    """Spearman rho over checkpoints of the neuron-mean of m vs accuracy: permutation p, bootstrap CI."""
    return spearman_ci(len(m), lambda idx: (_col_means(m, idx), acc))


def _frac(mask: np.ndarray) -> dict:
    """Fraction of neurons with the property, with its bootstrap interval."""
    return mean_ci(np.asarray(mask, dtype=np.float64))


def _stat_ci(values: np.ndarray, fn: Any) -> dict:
    """A statistic of per-neuron values (NaN allowed) with its bootstrap interval over neurons."""
    v = np.asarray(values, dtype=np.float64)

    def stat(idx: np.ndarray) -> float | None:
        x = v[idx]
        x = x[np.isfinite(x)]
        return float(fn(x)) if x.size else None

    return bootstrap_ci(len(v), stat)


def claims(
    units: pd.DataFrame,
    first: pd.DataFrame,
    runs: pd.DataFrame,
    traj: pd.DataFrame,
    changes: pd.DataFrame,
    epochs_t: pd.DataFrame,
    layers: list[str],
    params: Params,
) -> dict:
    """metrics/analysis.json: the three claims of the abstract as measured numbers, overall and per
    layer, each {"value", "lo", "hi", "n"} (95 % bootstrap interval over neurons) or, for correlations
    over checkpoints, {"rho", "p", "n", "lo", "hi", "neurons"} (permutation p, bootstrap interval)."""
    a = params.analyze
    epochs = sorted(units["epoch"].unique().tolist())
    prog = units.groupby("epoch")["progress"].first().to_dict() if "progress" in units else {e: e for e in epochs}
    early = min((e for e in epochs if prog[e] >= a.early_epoch), default=epochs[-1])
    final = epochs[-1]
    acc_by_epoch = dict(zip(epochs_t["epoch"], epochs_t["test_acc"])) if "test_acc" in epochs_t else {}
    acc = np.array([acc_by_epoch.get(e, np.nan) for e in epochs], dtype=np.float64)

    def csi_at(df: pd.DataFrame, e: int) -> np.ndarray:
        return df.loc[df["epoch"] == e].sort_values(["layer", "unit"])["csi"].to_numpy(dtype=np.float64)

    def unit_block(u: pd.DataFrame, f: pd.DataFrame) -> dict[str, Any]:
        early_csi, final_csi = csi_at(u, early), csi_at(u, final)
        fse = f["first_selective_epoch"].to_numpy(dtype=np.float64)
        return {
            "units": len(f),
            "frac_selective_by_early_epoch": _frac(np.nan_to_num(fse, nan=np.inf) <= early),
            "frac_selective_final": _frac(final_csi > a.csi_threshold),
            "mean_csi_early": mean_ci(early_csi),
            "mean_csi_final": mean_ci(final_csi),
            "max_csi_early": _stat_ci(early_csi, np.max),
            "median_first_selective_progress": _stat_ci(f["first_selective_progress"].to_numpy(), np.median),
            "mean_sparseness_final": mean_ci(u.loc[u["epoch"] == final, "sparseness"].to_numpy()),
        }

    whole = unit_block(units, first)
    c1: dict[str, Any] = {
        "early_epoch": early,
        "early_progress": float(prog[early]),
        "final_epoch": final,
        "final_progress": float(prog[final]),
        "csi_threshold": a.csi_threshold,
        "min_rate": a.min_rate,
        **{k: whole[k] for k in ("frac_selective_by_early_epoch", "frac_selective_final", "max_csi_early")},
        "per_layer": {},
    }
    for lay in layers:
        c1["per_layer"][lay] = unit_block(units[units["layer"] == lay], first[first["layer"] == lay])

    am_epochs = sorted(runs["epoch"].unique().tolist()) if len(runs) else []
    am_acc = np.array([acc_by_epoch.get(e, np.nan) for e in am_epochs], dtype=np.float64)
    neuron = ["generator", "target"]
    csi_m = _matrix(units, ["layer", "unit"], "csi", epochs)
    gain_m = _matrix(runs, neuron, "am_gain_dataset", am_epochs)
    c2: dict[str, Any] = {
        "checkpoints": len(epochs),
        "am_checkpoints": len(am_epochs),
        "spearman_mean_csi_vs_test_acc": _corr_vs_acc(csi_m, acc),
        "spearman_am_gain_vs_test_acc": _corr_vs_acc(gain_m, am_acc),
        "spearman_concept_prob_vs_test_acc": _corr_vs_acc(_matrix(runs, neuron, "concept_prob", am_epochs), am_acc),
        "spearman_similarity_to_final_vs_test_acc": _corr_vs_acc(
            _matrix(traj, neuron, "pixel_corr_final", am_epochs), am_acc
        ),
        "test_acc_first": _num(acc[0]) if len(acc) else None,
        "test_acc_final": _num(acc[-1]) if len(acc) else None,
        "per_layer": {},
    }
    for lay in layers:
        u, r = units[units["layer"] == lay], runs[runs["layer"] == lay]
        t = traj[traj["layer"] == lay] if len(traj) else traj
        gm = _matrix(r, neuron, "am_gain_dataset", am_epochs)
        c2["per_layer"][lay] = {
            "spearman_mean_csi_vs_test_acc": _corr_vs_acc(_matrix(u, ["unit"], "csi", epochs), acc),
            "spearman_am_gain_vs_test_acc": _corr_vs_acc(gm, am_acc),
            "mean_am_gain": mean_ci(np.nanmean(gm, axis=1) if gm.size else []),
            "mean_pixel_corr_consecutive": mean_ci(
                t.groupby(neuron)["pixel_corr_prev"].mean().to_numpy() if len(t) else []
            ),
            "mean_latent_dist_consecutive": mean_ci(
                t.groupby(neuron)["latent_dist_prev"].mean().to_numpy() if len(t) else []
            ),
        }

    tracked = changes[changes["epochs_tracked"] >= 2] if len(changes) else changes
    restarts = int(tracked["restarts"].min()) if len(tracked) and "restarts" in tracked else 0

    def change_block(t: pd.DataFrame) -> dict[str, Any]:
        robust = t["robust_changes"].astype(float).to_numpy() if restarts >= 2 else np.array([])
        return {
            "tracked_neurons": len(t),
            "frac_neurons_changing_concept": _frac(t["changed"].to_numpy(dtype=bool)) if len(t) else mean_ci([]),
            "mean_concept_changes": mean_ci(t["changes"].to_numpy(dtype=float) if len(t) else []),
            "frac_neurons_changing_concept_robust": _frac(robust > 0) if robust.size else mean_ci([]),
            "mean_concept_changes_robust": mean_ci(robust),
            "frac_checkpoints_restarts_agree": mean_ci(
                t["frac_restarts_agree"].astype(float).to_numpy() if restarts >= 2 and len(t) else []
            ),
        }

    depth = np.array([layers.index(lay) for lay in tracked["layer"]] if len(tracked) else [], dtype=np.float64)

    def depth_rho(col: str) -> dict:
        if not len(tracked) or (col == "robust_changes" and restarts < 2):
            return {"rho": None, "p": None, "n": 0, "lo": None, "hi": None}
        v = tracked[col].astype(float).to_numpy()
        res = dict(spearman(depth, v))
        ci = bootstrap_ci(len(v), lambda idx: spearman_rho(depth[idx], v[idx]))
        return {**res, "lo": ci["lo"], "hi": ci["hi"]}

    c3: dict[str, Any] = {
        "from_progress": a.concept_from_epoch,
        "restarts": restarts,
        **change_block(tracked),
        "spearman_layer_depth_vs_changes": depth_rho("changes"),
        "spearman_layer_depth_vs_changes_robust": depth_rho("robust_changes"),
        "per_layer": {},
    }
    final_runs = traj[traj["epoch"] == traj["epoch"].max()] if len(traj) else traj
    for lay in layers:
        t = tracked[tracked["layer"] == lay] if len(tracked) else tracked
        fr = final_runs[final_runs["layer"] == lay] if len(final_runs) else final_runs
        c3["per_layer"][lay] = {
            **change_block(t),
            "frac_concept_is_preferred_class_final": _frac(fr["concept"].to_numpy() == fr["preferred_class"].to_numpy())
            if len(fr)
            else mean_ci([]),
        }
    return {"claim1_early_selectivity": c1, "claim2_selectivity_and_accuracy": c2, "claim3_concept_change": c3}


def method_table(runs: pd.DataFrame, curves: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (generator, method): runs, mean best activation and AM gain, queries to 95 %, win rate, wall time."""
    task = ["epoch", "generator", "target", "seed"]
    best = runs.groupby(task)["best_activation"].transform("max")
    r = runs.assign(win=(runs["best_activation"] >= best).astype(float))
    if curves is not None and len(curves):
        # elapsed_s is cumulative per run (lock-step groups share it): the last value is the run's wall time
        r = r.merge(curves.groupby("run_key")["elapsed_s"].max().rename("wall_s"), on="run_key", how="left")
    agg = {
        "runs": ("run_key", "count"),
        "mean_best_activation": ("best_activation", "mean"),
        "mean_am_gain": ("am_gain_dataset", "mean"),
        "win_rate": ("win", "mean"),
        "mean_concept_prob": ("concept_prob", "mean"),
    }
    if "queries_to_95" in r:
        agg["median_queries_to_95"] = ("queries_to_95", "median")
    if "n_queries" in r:
        agg["mean_queries"] = ("n_queries", "mean")
    if "wall_s" in r:
        agg["mean_wall_s"] = ("wall_s", "mean")
    return r.groupby(["generator", "method"]).agg(**agg).reset_index()


def convergence_curves(runs: pd.DataFrame, am_dir: Path) -> pd.DataFrame:
    """Best-so-far AM gain after every query, long format (run_key, generator, method, query, gain)."""
    frames = []
    for _, row in runs.iterrows():
        path = am_dir / row["run_dir"] / "queries.parquet"
        if not path.is_file():
            continue
        import pyarrow.parquet as pq

        # The indices column is the bulk of the file and is not needed here.
        cols = [c for c in ("response", "elapsed_s") if c in pq.read_schema(path).names]
        q = pd.read_parquet(path, columns=cols)
        resp = q["response"].to_numpy(dtype=np.float64)
        resp = np.where(np.isfinite(resp), resp, -np.inf)
        best = np.maximum.accumulate(resp)
        scale = row["dataset_max"] if row["dataset_max"] > 0 else 1.0
        elapsed = q["elapsed_s"].to_numpy(dtype=np.float64) if "elapsed_s" in q else np.full(len(q), np.nan)
        frames.append(
            pd.DataFrame(
                {
                    "run_key": row["run_key"],
                    "generator": row["generator"],
                    "method": row["method"],
                    "query": np.arange(1, len(best) + 1),
                    "gain": best / scale,
                    "elapsed_s": elapsed,
                }
            )
        )
    return (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["run_key", "generator", "method", "query", "gain", "elapsed_s"])
    )


# ---- MLflow -----------------------------------------------------------------------------


# The claims' headline numbers: the analysis run's metrics and (the first three) metrics/summary.json.
# name -> (claim, number, field); claim 3 counts restart-robust changes where there are restarts.
HEADLINE = {
    "c1_early_selective": ("claim1_early_selectivity", "frac_selective_by_early_epoch", "value"),
    "c2_rho_csi_acc": ("claim2_selectivity_and_accuracy", "spearman_mean_csi_vs_test_acc", "rho"),
    "c3_concept_change": ("claim3_concept_change", "frac_neurons_changing_concept_robust", "value"),
    "c1_selective_final": ("claim1_early_selectivity", "frac_selective_final", "value"),
    "c2_rho_gain_acc": ("claim2_selectivity_and_accuracy", "spearman_am_gain_vs_test_acc", "rho"),
    "c3_concept_changes_mean": ("claim3_concept_change", "mean_concept_changes_robust", "value"),
}


def headline(result: dict) -> dict[str, float | None]:
    """The claims as a handful of numbers (None where undefined, e.g. a correlation over one checkpoint)."""
    out: dict[str, float | None] = {}
    robust = result.get("claim3_concept_change", {}).get("restarts", 0) >= 2
    for name, (claim, key, field) in HEADLINE.items():
        if claim == "claim3_concept_change" and not robust:
            key = key.removesuffix("_robust")  # one restart: the raw count is all there is
        v = result.get(claim, {}).get(key, {}).get(field)
        out[name] = float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
    return out


def log_mlflow(paths: Paths, params: Params, summary: dict, out_dir: Path, runs: pd.DataFrame) -> dict[str, Any]:
    """The analysis run in its own experiment (the claims' headline metrics, analysis.json and the
    figures and tables as artifacts), class tags on every AM run, the UI's comparison views; returns
    ids and view links for the report."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    from spikemax import tracking

    uri = tracking.configure(paths.root)
    exp_id = tracking.experiment_id(tracking.ANALYSIS_EXPERIMENT, paths.root)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(exp_id, run_name="analysis", tags=tracking.run_tags(paths.root, params, "analyze"))
    rid = run.info.run_id
    numbers = summary.get("headline") or headline(summary)
    with tracking.terminated(client, rid):  # FAILED on any error, FINISHED otherwise
        now = int(time.time() * 1000)
        a = params.analyze
        client.log_batch(
            rid,
            metrics=[Metric(k, v, now, 0) for k, v in numbers.items() if v is not None],
            params=[
                Param(k, str(v))
                for k, v in {
                    "csi_threshold": a.csi_threshold,
                    "min_rate": a.min_rate,
                    "early_epoch": a.early_epoch,
                    "concept_from_epoch": a.concept_from_epoch,
                    "am_runs": len(runs),
                    "restarts": summary.get("claim3_concept_change", {}).get("restarts", 0),
                }.items()
            ],
        )
        client.log_artifact(rid, str(paths.metrics / "analysis.json"))  # every claim number, intervals included
        for path in sorted(out_dir.rglob("*")):
            if path.is_file() and path.suffix in (".png", ".csv"):
                client.log_artifact(
                    rid, str(path), artifact_path=str(path.parent.relative_to(out_dir)).strip(".") or None
                )
    classes = summary.get("meta", {}).get("classes", [])
    tagged = missing = 0
    for _, row in runs.iterrows():
        tags = [RunTag("spikemax.analysis_run", rid)]
        tags += tracking.concept_tags("spikemax.final_concept", row["concept"], classes)
        if pd.notna(row["preferred_class"]):
            tags += tracking.concept_tags("spikemax.preferred_class", row["preferred_class"], classes)
        try:
            client.log_batch(str(row["run_id"]), tags=tags)
            tagged += 1
        except MlflowException:
            missing += 1  # an AM run id absent from this store (e.g. a copied results tree)
    views = tracking.save_views(paths.root, [*comparison_views(runs), tracking.analysis_view(list(HEADLINE))])
    return {
        "tracking_uri": uri,
        "experiment_id": exp_id,
        "experiment": tracking.ANALYSIS_EXPERIMENT,
        "run_id": rid,
        "am_experiment_id": tracking.experiment_id(tracking.AM_EXPERIMENT, paths.root),
        "am_runs_tagged": tagged,
        "am_runs_missing": missing,
        "views": views,
    }


def comparison_views(runs: pd.DataFrame) -> list:
    """The AM experiment's saved views for this analysis: the trained checkpoint, and across
    checkpoints the neuron with the most concept changes (the first target when none changed)."""
    from spikemax import tracking

    last = int(runs["epoch"].max())
    distinct = runs.groupby(["generator", "target"], sort=True)["concept"].nunique()
    generator, target = distinct.idxmax()
    return tracking.am_views(last, str(generator), str(target))


def layer_table(result: dict, layers: list[str]) -> pd.DataFrame:
    """One row per layer with every per-layer number of the three claims and its 95 % interval
    (`NAME`, `NAME_lo`, `NAME_hi`; correlations also `NAME_p`): the report's layer table."""
    rows = []
    for lay in layers:
        row: dict[str, Any] = {"layer": lay}
        for _claim, body in result.items():
            for k, v in body.get("per_layer", {}).get(lay, {}).items():
                if isinstance(v, dict):
                    row[k] = v.get("rho", v.get("value"))
                    row[f"{k}_lo"], row[f"{k}_hi"] = v.get("lo"), v.get("hi")
                    if "p" in v:
                        row[f"{k}_p"] = v["p"]
                else:
                    row[k] = v
        rows.append(row)
    return pd.DataFrame(rows)
