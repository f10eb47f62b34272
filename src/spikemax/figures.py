"""Figures of the analysis stage (matplotlib, Agg): one function per figure, each writing a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spikemax.stats import mean_ci


def _plt():
    """pyplot on the non-interactive Agg backend (stages run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show(ax: Any, pix: np.ndarray) -> None:
    """Draw a (C, H, W) [0, 1] image without axes."""
    if pix.shape[0] == 1:
        ax.imshow(pix[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.transpose(pix, (1, 2, 0)))
    ax.set_xticks([])
    ax.set_yticks([])


def _progress_axis(*axes: Any) -> None:
    """Training-progress axes: linear over the first epoch, logarithmic after, so that checkpoints
    taken every few steps early in training stay apart from the once-per-epoch ones."""
    for ax in axes:
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("epochs of training")


def _band(ax: Any, x: Any, groups: Any, color: Any = None, fmt: str = "-o", label: str | None = None) -> None:
    """Mean per x of each group's values with its 95 % bootstrap interval as a shaded band."""
    cis = [mean_ci(np.asarray(v, dtype=np.float64)) for v in groups]
    mean = np.array([np.nan if c["value"] is None else c["value"] for c in cis])
    lo = np.array([np.nan if c["lo"] is None else c["lo"] for c in cis])
    hi = np.array([np.nan if c["hi"] is None else c["hi"] for c in cis])
    (line,) = ax.plot(x, mean, fmt, color=color, label=label, ms=3)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)


def _by_checkpoint(df: pd.DataFrame, value: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """(progress per checkpoint, that checkpoint's values) in training order."""
    key = "progress" if "progress" in df else "epoch"
    groups = list(df.groupby(key)[value])
    return np.array([k for k, _ in groups], dtype=np.float64), [g.to_numpy() for _, g in groups]


def fig_accuracy_selectivity(
    epochs_t: pd.DataFrame, units: pd.DataFrame, layers: list[str], threshold: float, path: Path
) -> None:
    """Claim 2: test accuracy, mean CSI per layer and fraction selective per layer vs training progress,
    with 95 % bootstrap bands over units (AM gain: over AM'd neurons)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = epochs_t["progress"] if "progress" in epochs_t else epochs_t["epoch"]
    if "test_acc" in epochs_t:
        axes[0].plot(x, epochs_t["test_acc"], "k-o", ms=3, label="test accuracy")
    axes[0].plot(x, epochs_t["mean_csi"], "b-s", ms=3, label="mean CSI (all units)")
    if "mean_csi_lo" in epochs_t:
        axes[0].fill_between(x, epochs_t["mean_csi_lo"], epochs_t["mean_csi_hi"], color="b", alpha=0.2, lw=0)
    if epochs_t["am_gain"].notna().any():
        ax2 = axes[0].twinx()
        ok = epochs_t["am_gain"].notna()  # AM may have run on some checkpoints only: join those points
        ax2.plot(x[ok], epochs_t.loc[ok, "am_gain"], "r-^", ms=3, label="mean AM gain")
        if "am_gain_lo" in epochs_t:
            ax2.fill_between(
                x[ok], epochs_t.loc[ok, "am_gain_lo"], epochs_t.loc[ok, "am_gain_hi"], color="r", alpha=0.15, lw=0
            )
        ax2.set_ylabel("AM gain (AM best / dataset max)", color="r")
    axes[0].legend(loc="upper left", fontsize=8)
    axes[0].set_title("accuracy, selectivity, AM gain (bands: 95 % CI)")
    for lay in layers:
        u = units[units["layer"] == lay]
        xs, csi = _by_checkpoint(u, "csi")
        _band(axes[1], xs, csi, label=lay)
        _band(axes[2], xs, [c > threshold for c in csi], label=lay)
    axes[1].set(ylabel="mean CSI", title="mean CSI per layer")
    axes[2].set(ylabel=f"fraction CSI > {threshold}", title="selective units per layer")
    axes[1].legend(fontsize=8)
    _progress_axis(*axes)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def fig_first_selective(
    first: pd.DataFrame, epochs: list[int], layers: list[str], threshold: float, path: Path, progress: list[float]
) -> None:
    """Claim 1: cumulative fraction of units per layer that have become selective by each checkpoint."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for lay in layers:
        f = first.loc[first["layer"] == lay, "first_selective_epoch"].to_numpy(dtype=np.float64)
        reached = [np.nan_to_num(f, nan=np.inf) <= e for e in epochs]
        _band(ax, progress, reached, label=f"{lay} ({len(f)} units)")
    ax.set(
        ylabel=f"fraction with CSI > {threshold} so far",
        ylim=(-0.02, 1.02),
        title="first checkpoint of selectivity (cumulative; band: 95 % CI)",
    )
    ax.legend(fontsize=8)
    _progress_axis(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def fig_am_gain(runs: pd.DataFrame, layers: list[str], path: Path) -> None:
    """AM gain per layer and per method vs training progress (per-layer bands: 95 % CI over neurons)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for lay in layers:
        r = runs[runs["layer"] == lay]
        if len(r):
            per = r.groupby(["progress", "generator", "target"])["am_gain_dataset"].mean().reset_index()
            xs, vals = _by_checkpoint(per, "am_gain_dataset")
            _band(axes[0], xs, vals, label=lay)
    for (gen, method), r in runs.groupby(["generator", "method"]):
        g = r.groupby("progress")["am_gain_dataset"].mean()
        axes[1].plot(g.index, g.values, "-o", ms=3, label=f"{gen}/{method}")
    for ax, title in zip(axes, ("per layer", "per generator / method")):
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set(ylabel="AM best / dataset max", title=f"AM gain {title}")
        ax.legend(fontsize=8)
        _progress_axis(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def pick_neurons(traj: pd.DataFrame, layers: list[str], rows: int) -> list[str]:
    """Up to `rows` targets spread evenly over the layers, in depth then unit order."""
    order = {lay: i for i, lay in enumerate(layers)}
    t = traj[["target", "layer", "unit"]].drop_duplicates("target")
    t = t.assign(d=t["layer"].map(order).fillna(len(layers))).sort_values(["d", "unit"])
    groups = [g["target"].tolist() for _, g in t.groupby("d", sort=True)]
    picked: list[str] = []
    while len(picked) < rows and any(groups):
        for g in groups:
            if g and len(picked) < rows:
                picked.append(g.pop(0))
    return sorted(
        picked,
        key=lambda tg: (
            order.get(t.set_index("target").loc[tg, "layer"], len(layers)),
            t.set_index("target").loc[tg, "unit"],
        ),
    )


def fig_evolution(
    traj: pd.DataFrame,
    generator: str,
    targets: list[str],
    pixels: dict[str, np.ndarray],
    classes: list[str],
    path: Path,
) -> None:
    """Stimulus evolution: rows = neurons, columns = AM'd epochs; titled with concept and activation."""
    plt = _plt()
    t = traj[(traj["generator"] == generator) & traj["target"].isin(targets)]
    epochs = sorted(t["epoch"].unique())
    fig, axes = plt.subplots(
        len(targets), len(epochs), figsize=(1.6 * len(epochs) + 0.8, 1.9 * len(targets)), squeeze=False
    )
    cell = {(r["target"], r["epoch"]): r for _, r in t.iterrows()}
    for i, tg in enumerate(targets):
        for j, e in enumerate(epochs):
            ax = axes[i, j]
            r = cell.get((tg, e))
            if r is None:
                ax.axis("off")
                continue
            _show(ax, pixels[r["run_key"]])
            mark = " *" if r["concept_changed"] else ""
            ax.set_title(
                f"{r.get('progress', e):.2f}ep: {classes[int(r['concept'])][:10]} {r['concept_prob']:.2f}{mark}\n"
                f"act {r['best_activation']:.3g}",
                fontsize=7,
                color="red" if mark else "black",
            )
            if j == 0:
                ax.set_ylabel(tg, fontsize=8)
    fig.suptitle(
        f"{generator}: optimal stimulus per checkpoint (epochs of training)\n"
        "(concept under the final SNN, its probability; * = changed)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the two-line suptitle
    fig.savefig(path, dpi=80)
    plt.close(fig)


def fig_concepts(traj: pd.DataFrame, layers: list[str], classes: list[str], path: Path) -> None:
    """Claim 3: concept of each tracked neuron's optimal stimulus over epochs (colour = class)."""
    plt = _plt()
    order = {lay: i for i, lay in enumerate(layers)}
    seqs = traj.assign(d=traj["layer"].map(order)).sort_values(["d", "unit", "generator", "epoch"])
    names = list(dict.fromkeys(zip(seqs["generator"], seqs["target"])))
    epochs = sorted(seqs["epoch"].unique())
    grid = np.full((len(names), len(epochs)), np.nan)
    for _, r in seqs.iterrows():
        grid[names.index((r["generator"], r["target"])), epochs.index(r["epoch"])] = r["concept"]
    fig, ax = plt.subplots(figsize=(2 + 0.6 * len(epochs), 1 + 0.22 * len(names)))
    im = ax.imshow(
        np.ma.masked_invalid(grid), cmap="tab10", vmin=-0.5, vmax=9.5, aspect="auto", interpolation="nearest"
    )
    prog = seqs.groupby("epoch")["progress"].first().to_dict() if "progress" in seqs else {}
    ax.set_xticks(range(len(epochs)), [f"{prog.get(e, e):.2g}" for e in epochs], rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), [f"{g}/{t}" for g, t in names], fontsize=6)
    ax.set_xlabel("epochs of training")
    cbar = fig.colorbar(im, ax=ax, ticks=range(len(classes)))
    cbar.ax.set_yticklabels(classes, fontsize=7)
    ax.set_title("concept of the optimal stimulus per neuron")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def fig_convergence(curves: pd.DataFrame, path: Path) -> None:
    """Method comparison: median (IQR band) best-so-far AM gain vs queries, one panel per generator."""
    plt = _plt()
    gens = sorted(curves["generator"].unique()) or ["(none)"]
    fig, axes = plt.subplots(1, len(gens), figsize=(5.5 * len(gens), 4), squeeze=False)
    for ax, gen in zip(axes[0], gens):
        for method, c in curves[curves["generator"] == gen].groupby("method"):
            # Runs that stopped early keep their final best for the later queries.
            wide = c.pivot(index="query", columns="run_key", values="gain").ffill()
            q = wide.index.to_numpy()
            med = wide.median(axis=1)
            ax.plot(q, med, label=f"{method} ({wide.shape[1]} runs)")
            ax.fill_between(q, wide.quantile(0.25, axis=1), wide.quantile(0.75, axis=1), alpha=0.2)
        ax.set(xlabel="queries", ylabel="best-so-far / dataset max", title=f"convergence: {gen}")
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def fig_methods_best(runs: pd.DataFrame, pixels: dict[str, np.ndarray], targets: list[str], path: Path) -> None:
    """Best stimuli side by side per (generator, method) at the last AM'd epoch, one row per neuron."""
    plt = _plt()
    last = runs[runs["epoch"] == runs["epoch"].max()]
    cols = sorted(set(zip(last["generator"], last["method"])))
    targets = [t for t in targets if t in set(last["target"])]
    fig, axes = plt.subplots(
        max(len(targets), 1),
        max(len(cols), 1),
        squeeze=False,
        figsize=(1.7 * max(len(cols), 1) + 0.8, 1.8 * max(len(targets), 1)),
    )
    for i, tg in enumerate(targets):
        for j, (gen, method) in enumerate(cols):
            ax = axes[i, j]
            r = last[(last["target"] == tg) & (last["generator"] == gen) & (last["method"] == method)]
            if r.empty:
                ax.axis("off")
                continue
            r = r.loc[r["best_activation"].idxmax()]
            _show(ax, pixels[r["run_key"]])
            ax.set_title(
                f"{gen}/{method}\nact {r['best_activation']:.3g}" if i == 0 else f"act {r['best_activation']:.3g}",
                fontsize=7,
            )
            if j == 0:
                ax.set_ylabel(tg, fontsize=8)
    fig.suptitle(f"best stimulus per method, epoch {int(last['epoch'].max()) if len(last) else '-'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_figures(
    fig_dir: Path,
    *,
    units: pd.DataFrame,
    runs: pd.DataFrame,
    traj: pd.DataFrame,
    first: pd.DataFrame,
    epochs_t: pd.DataFrame,
    curves: pd.DataFrame,
    layers: list[str],
    classes: list[str],
    pixels: dict[str, np.ndarray],
    threshold: float,
    grid_rows: int,
) -> list[Path]:
    """Every analysis figure under fig_dir; returns their paths."""
    epochs = sorted(units["epoch"].unique().tolist())
    written = []

    def out(name: str) -> Path:
        written.append(fig_dir / name)
        return written[-1]

    fig_accuracy_selectivity(epochs_t, units, layers, threshold, out("accuracy_selectivity.png"))
    prog = units.groupby("epoch")["progress"].first() if "progress" in units else pd.Series(epochs, index=epochs)
    fig_first_selective(first, epochs, layers, threshold, out("first_selective.png"), [float(prog[e]) for e in epochs])
    fig_am_gain(runs, layers, out("am_gain.png"))
    targets = pick_neurons(traj, layers, grid_rows)
    for gen in sorted(traj["generator"].unique()):
        fig_evolution(traj, gen, targets, pixels, classes, out(f"evolution_{gen}.png"))
    fig_concepts(traj, layers, classes, out("concepts.png"))
    fig_convergence(curves, out("convergence.png"))
    fig_methods_best(runs, pixels, targets, out("methods_best.png"))
    return written
