"""Figures of the analysis stage (matplotlib, Agg): one function per figure, each writing a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spikemax.stats import mean_ci

# The report shows figures at 1:1 in a 1,200 px column: every figure is at most MAX_WIDTH_PX wide at
# DPI, and no text is smaller than 10 px (FONT and SMALL are points: px = pt * DPI / 72).
DPI = 100
MAX_WIDTH_PX = 1150
FONT = 9.0
SMALL = 7.5
PROGRESS_TICKS = [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500]  # and 0; finer ones crowd


def _plt():
    """pyplot on the non-interactive Agg backend (stages run headless), text at FONT points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT, "legend.fontsize": SMALL, "figure.dpi": DPI})
    return plt


def _width(inches: float) -> float:
    """A figure width that fits the report's column at DPI."""
    return min(inches, MAX_WIDTH_PX / DPI)


def _save(fig: Any, path: Path) -> Any:
    """Write the PNG at DPI and release it from pyplot; returns the figure (tests inspect its text)."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return fig


def _show(ax: Any, pix: np.ndarray) -> None:
    """Draw a (C, H, W) [0, 1] image without axes."""
    if pix.shape[0] == 1:
        ax.imshow(pix[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.transpose(pix, (1, 2, 0)))
    ax.set_xticks([])
    ax.set_yticks([])


def _progress_axis(*axes: Any, xs: Any = None) -> None:
    """Training-progress axes: linear up to the first checkpoint after 0, logarithmic after, so that
    checkpoints a few steps apart early in training stay apart from the once-per-epoch ones; ticks
    at 1-2-5 values written as plain numbers (a bare symlog axis labels only 0 and 10^0)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    for ax in axes:
        x = np.asarray(xs if xs is not None else [v for line in ax.get_lines() for v in line.get_xdata()], float)
        x = x[np.isfinite(x)]
        pos = x[x > 0]
        lin = float(pos.min()) if pos.size else 1.0
        top = float(x.max()) if x.size else 1.0
        ax.set_xscale("symlog", linthresh=lin, linscale=0.5)
        ticks = [0.0] + [t for t in PROGRESS_TICKS if lin <= t <= top * 1.05]
        if len(ticks) < 3:  # a short range (AM on the first few checkpoints only): label its ends
            ticks = sorted({*ticks, float(f"{lin:.2g}"), float(f"{top:.2g}")})
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("epochs of training")


def _log_axis(ax: Any) -> None:
    """A log x axis labelled with plain numbers (1, 10, 100, ...), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


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
) -> Any:
    """Claim 2: test accuracy, mean CSI per layer and fraction selective per layer vs training progress,
    with 95 % bootstrap bands over units (AM gain: over AM'd neurons)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(_width(15), 4), layout="constrained")
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
    axes[0].legend(loc="upper left")
    axes[0].set_title("accuracy, CSI, AM gain (95 % CI)")
    for lay in layers:
        u = units[units["layer"] == lay]
        xs, csi = _by_checkpoint(u, "csi")
        _band(axes[1], xs, csi, label=lay)
        _band(axes[2], xs, [c > threshold for c in csi], label=lay)
    axes[0].set_ylabel("accuracy, mean CSI")
    axes[1].set(ylabel="mean CSI", title="mean CSI per layer")
    axes[2].set(ylabel=f"fraction CSI > {threshold}", title="selective units per layer")
    axes[1].legend()
    _progress_axis(*axes, xs=x)
    return _save(fig, path)


def fig_first_selective(
    first: pd.DataFrame, epochs: list[int], layers: list[str], threshold: float, path: Path, progress: list[float]
) -> Any:
    """Claim 1: cumulative fraction of units per layer that have become selective by each checkpoint."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    for lay in layers:
        f = first.loc[first["layer"] == lay, "first_selective_epoch"].to_numpy(dtype=np.float64)
        reached = [np.nan_to_num(f, nan=np.inf) <= e for e in epochs]
        _band(ax, progress, reached, label=f"{lay} ({len(f)} units)")
    ax.set(
        ylabel=f"fraction with CSI > {threshold} so far",
        ylim=(-0.02, 1.02),
        title="first checkpoint of selectivity (cumulative; 95 % CI)",
    )
    ax.legend()
    _progress_axis(ax, xs=progress)
    return _save(fig, path)


def fig_am_gain(runs: pd.DataFrame, layers: list[str], path: Path) -> Any:
    """AM gain per layer and per method vs training progress (per-layer bands: 95 % CI over neurons)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(_width(11), 4.2), layout="constrained")
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
        ax.legend()
        _progress_axis(ax, xs=runs.get("progress"))
    return _save(fig, path)


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


TILE_IN = 1.25  # one stimulus tile with its two-line label at SMALL points


def _tiles(plt: Any, rows: int, cols: int, title_lines: int) -> tuple[Any, Any, int]:
    """A grid of rows x cols tiles, wrapped into blocks of columns so the figure fits the column;
    returns the figure, `at(i, j)` (the axes of tile (i, j)) and the columns per block."""
    per = max(1, min(cols, int((MAX_WIDTH_PX / DPI - 1.0) // TILE_IN)))
    blocks = -(-cols // per)
    fig, axes = plt.subplots(
        max(rows, 1) * blocks,
        per,
        squeeze=False,
        figsize=(max(1.0 + TILE_IN * per, 5.5), 0.25 + 0.2 * title_lines + 1.4 * max(rows, 1) * blocks),
        layout="constrained",
    )
    for ax in axes.flat:
        ax.axis("off")  # `at` switches a tile back on when it gets a stimulus

    def at(i: int, j: int) -> Any:
        ax = axes[(j // per) * max(rows, 1) + i, j % per]
        ax.axis("on")
        return ax

    return fig, at, per


def fig_evolution(
    traj: pd.DataFrame,
    generator: str,
    targets: list[str],
    pixels: dict[str, np.ndarray],
    classes: list[str],
    path: Path,
) -> Any:
    """Stimulus evolution: rows = neurons, columns = AM'd checkpoints (wrapped into blocks that fit the
    report's column); each tile labelled with the concept, its probability, progress and activation."""
    plt = _plt()
    t = traj[(traj["generator"] == generator) & traj["target"].isin(targets)]
    epochs = sorted(t["epoch"].unique())
    fig, at, per = _tiles(plt, len(targets), len(epochs), 2)
    cell = {(r["target"], r["epoch"]): r for _, r in t.iterrows()}
    for i, tg in enumerate(targets):
        for j, e in enumerate(epochs):
            r = cell.get((tg, e))
            if r is None:
                continue
            ax = at(i, j)
            _show(ax, pixels[r["run_key"]])
            mark = " *" if r["concept_changed"] else ""
            ax.set_title(
                f"{classes[int(r['concept'])][:11]} {r['concept_prob']:.2f}{mark}\n"
                f"{r.get('progress', e):.2g} ep, act {r['best_activation']:.2g}",
                fontsize=SMALL,
                color="red" if mark else "black",
            )
            if j % per == 0:
                ax.set_ylabel(tg, fontsize=SMALL)
    fig.suptitle(
        f"{generator}: optimal stimulus per checkpoint (ep = epochs of training)\n"
        "concept under the final SNN and its probability (* = changed), activation",
        fontsize=FONT,
    )
    return _save(fig, path)


def fig_concepts(traj: pd.DataFrame, layers: list[str], classes: list[str], path: Path) -> Any:
    """Claim 3: concept of each tracked neuron's optimal stimulus over checkpoints (colour = class)."""
    plt = _plt()
    order = {lay: i for i, lay in enumerate(layers)}
    seqs = traj.assign(d=traj["layer"].map(order)).sort_values(["d", "unit", "generator", "epoch"])
    names = list(dict.fromkeys(zip(seqs["generator"], seqs["target"])))
    epochs = sorted(seqs["epoch"].unique())
    grid = np.full((len(names), len(epochs)), np.nan)
    for _, r in seqs.iterrows():
        grid[names.index((r["generator"], r["target"])), epochs.index(r["epoch"])] = r["concept"]
    fig, ax = plt.subplots(figsize=(_width(3.5 + 0.45 * len(epochs)), 1.6 + 0.2 * len(names)), layout="constrained")
    im = ax.imshow(
        np.ma.masked_invalid(grid), cmap="tab10", vmin=-0.5, vmax=9.5, aspect="auto", interpolation="nearest"
    )
    prog = seqs.groupby("epoch")["progress"].first().to_dict() if "progress" in seqs else {}
    ax.set_xticks(range(len(epochs)), [f"{prog.get(e, e):.2g}" for e in epochs], rotation=90, fontsize=SMALL)
    ax.set_yticks(range(len(names)), [f"{g}/{t}" for g, t in names], fontsize=SMALL)
    ax.set_xlabel("epochs of training")
    cbar = fig.colorbar(im, ax=ax, ticks=range(len(classes)))
    cbar.ax.set_yticklabels(classes, fontsize=SMALL)
    ax.set_title("concept of the optimal stimulus per neuron")
    return _save(fig, path)


def fig_convergence(curves: pd.DataFrame, path: Path) -> Any:
    """Median (IQR band) best-so-far AM gain vs queries per method, one panel per generator."""
    plt = _plt()
    gens = sorted(curves["generator"].unique()) or ["(none)"]
    fig, axes = plt.subplots(1, len(gens), figsize=(_width(5.5 * len(gens)), 4.2), squeeze=False, layout="constrained")
    for ax, gen in zip(axes[0], gens):
        for method, c in curves[curves["generator"] == gen].groupby("method"):
            # Runs that stopped early keep their final best for the later queries.
            wide = c.pivot(index="query", columns="run_key", values="gain").ffill()
            q = wide.index.to_numpy()
            med = wide.median(axis=1)
            (line,) = ax.plot(q, med, label=f"{method} ({wide.shape[1]} runs)")
            ax.fill_between(
                q, wide.quantile(0.25, axis=1), wide.quantile(0.75, axis=1), color=line.get_color(), alpha=0.2, lw=0
            )
        ax.set(xlabel="queries", ylabel="best so far / dataset max", title=f"convergence: {gen}")
        _log_axis(ax)
        ax.legend()
    return _save(fig, path)


def fig_methods_best(runs: pd.DataFrame, pixels: dict[str, np.ndarray], targets: list[str], path: Path) -> Any:
    """Best stimuli side by side per (generator, method) at the last AM'd checkpoint, one row per neuron."""
    plt = _plt()
    last = runs[runs["epoch"] == runs["epoch"].max()]
    cols = sorted(set(zip(last["generator"], last["method"])))
    targets = [t for t in targets if t in set(last["target"])]
    fig, at, per = _tiles(plt, len(targets), len(cols), 1)
    for i, tg in enumerate(targets):
        for j, (gen, method) in enumerate(cols):
            r = last[(last["target"] == tg) & (last["generator"] == gen) & (last["method"] == method)]
            if r.empty:
                continue
            r = r.loc[r["best_activation"].idxmax()]
            ax = at(i, j)
            _show(ax, pixels[r["run_key"]])
            ax.set_title(f"{gen}/{method}\nact {r['best_activation']:.3g}", fontsize=SMALL)
            if j % per == 0:
                ax.set_ylabel(tg, fontsize=SMALL)
    when = f"{last['progress'].max():.2g} epochs" if "progress" in last and len(last) else "the last checkpoint"
    fig.suptitle(f"best stimulus per generator/method at {when}", fontsize=FONT)
    return _save(fig, path)


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
