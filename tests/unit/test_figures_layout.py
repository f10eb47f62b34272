"""The analysis figures read at 1:1 in the report's column: at most figures.MAX_WIDTH_PX wide, no text
under 10 px, no title or axis label on top of another, progress axes with readable ticks."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from spikemax import figures as F

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# The default schedule's shape: the untrained net, ten checkpoints inside the first epoch, then 1..5.
PROGRESS = [0.0, *(s / 85 for s in (2, 4, 6, 8, 12, 16, 24, 32, 48, 64)), 1.0, 2.0, 3.0, 4.0, 5.0]
LAYERS = ["lif1", "lif2", "fc_lif1", "out"]
GENERATORS = ["sngan", "vqvae"]


@pytest.fixture(scope="module")
def data() -> dict:
    """Analysis tables shaped like the default run's: 16 checkpoints, 16 neurons, 2 generators, 1 method."""
    rng = np.random.default_rng(0)
    targets = [(lay, u) for lay in LAYERS for u in range(4)]
    epochs = list(range(len(PROGRESS)))
    units = pd.DataFrame(
        [
            {"layer": lay, "unit": u, "epoch": e, "progress": PROGRESS[e], "csi": rng.random()}
            for e in epochs
            for lay, u in targets
        ]
    )
    rows, curves, pixels = [], [], {}
    for e in epochs:
        for gen in GENERATORS:
            for lay, u in targets:
                key = f"e{e}-{gen}-{lay}{u}"
                tg = f"class:{u}" if lay == "out" else f"{lay}:{u}"
                rows.append(
                    {
                        "run_key": key,
                        "epoch": e,
                        "progress": PROGRESS[e],
                        "generator": gen,
                        "method": "auto",
                        "target": tg,
                        "layer": lay,
                        "unit": u,
                        "best_activation": rng.random(),
                        "am_gain_dataset": 0.5 + rng.random(),
                        "concept": int(rng.integers(10)),
                        "concept_prob": rng.random(),
                        "concept_changed": bool(rng.random() < 0.3),
                    }
                )
                pixels[key] = rng.random((1, 28, 28))
                q = np.arange(1, 385)
                curves += [
                    {"run_key": key, "generator": gen, "method": "auto", "query": int(i), "gain": float(g)}
                    for i, g in zip(q[::16], np.maximum.accumulate(rng.random(384))[::16])
                ]
    runs = pd.DataFrame(rows)
    epochs_t = pd.DataFrame(
        {
            "epoch": epochs,
            "progress": PROGRESS,
            "test_acc": np.linspace(0.1, 0.85, len(epochs)),
            "mean_csi": np.linspace(0.1, 0.4, len(epochs)),
            "mean_csi_lo": np.linspace(0.05, 0.35, len(epochs)),
            "mean_csi_hi": np.linspace(0.15, 0.45, len(epochs)),
            "am_gain": np.linspace(0.8, 1.1, len(epochs)),
        }
    )
    first = pd.DataFrame([{"layer": lay, "first_selective_epoch": float(rng.integers(16))} for lay, _ in targets])
    return {
        "units": units,
        "runs": runs,
        "traj": runs,
        "curves": pd.DataFrame(curves),
        "pixels": pixels,
        "epochs_t": epochs_t,
        "first": first,
        "targets": F.pick_neurons(runs, LAYERS, 16),
    }


def figures(d: dict, tmp: Path) -> dict[str, object]:
    """Every analysis figure of the synthetic run, by file name."""
    return {
        "accuracy_selectivity": F.fig_accuracy_selectivity(
            d["epochs_t"], d["units"], LAYERS, 0.5, tmp / "accuracy_selectivity.png"
        ),
        "first_selective": F.fig_first_selective(
            d["first"], list(range(16)), LAYERS, 0.5, tmp / "first_selective.png", PROGRESS
        ),
        "am_gain": F.fig_am_gain(d["runs"], LAYERS, tmp / "am_gain.png"),
        "evolution_sngan": F.fig_evolution(
            d["traj"], "sngan", d["targets"], d["pixels"], CLASSES, tmp / "evolution_sngan.png"
        ),
        "concepts": F.fig_concepts(d["traj"], LAYERS, CLASSES, tmp / "concepts.png"),
        "convergence": F.fig_convergence(d["curves"], tmp / "convergence.png"),
        "methods_best": F.fig_methods_best(d["runs"], d["pixels"], d["targets"], tmp / "methods_best.png"),
    }


@pytest.fixture(scope="module")
def drawn(data, tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("figures")
    return tmp, figures(data, tmp)


def _texts(fig) -> list:
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def test_every_figure_fits_the_report_column(drawn):
    tmp, figs = drawn
    for name in figs:
        width, _ = Image.open(tmp / f"{name}.png").size
        assert width <= F.MAX_WIDTH_PX, (name, width)


def test_no_text_under_10_px(drawn):
    _, figs = drawn
    for name, fig in figs.items():
        small = {t.get_text()[:30] for t in _texts(fig) if t.get_fontsize() * F.DPI / 72 < 10}
        assert not small, (name, sorted(small)[:5])


def test_titles_and_labels_do_not_overlap(drawn):
    _, figs = drawn
    for name, fig in figs.items():
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        canvas = FigureCanvasAgg(fig)  # pyplot closed the figure: draw it again as it was saved
        canvas.draw()
        renderer = canvas.get_renderer()
        labels = [fig._suptitle] if fig._suptitle is not None else []
        for ax in fig.axes:
            labels += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels if t.get_visible() and t.get_text()]
        for (a, ba), (b, bb) in combinations(boxes, 2):
            assert not ba.overlaps(bb), (name, a, b)
        page = fig.bbox
        for a, box in boxes:  # nothing cut off at the figure's edge
            assert box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1 and box.y1 <= page.y1 + 1, (name, a)


def test_progress_axes_have_readable_ticks(drawn):
    """A symlog axis alone labels only 0 and 10^0: the progress axes carry plain 1-2-5 ticks."""
    _, figs = drawn
    for name in ("accuracy_selectivity", "first_selective", "am_gain"):
        for ax in figs[name].axes:
            if ax.get_xlabel() != "epochs of training":
                continue
            labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
            assert len(labels) >= 5 and "0" in labels and "1" in labels and "5" in labels, (name, labels)
            assert not any("^" in s for s in labels), labels
    conv = figs["convergence"].axes[0]
    labels = [t.get_text() for t in conv.get_xticklabels() if t.get_text()]
    assert "100" in labels and not any("^" in s for s in labels), labels


def test_a_short_progress_range_still_has_labelled_ends(data, tmp_path):
    """AM on the first two checkpoints only (0 and 0.024 epochs): both ends get a tick label."""
    first = data["first"]
    fig = F.fig_first_selective(first, [0, 1], LAYERS, 0.5, tmp_path / "f.png", PROGRESS[:2])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert labels == ["0", "0.024"], labels
