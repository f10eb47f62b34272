"""Stage `prepare`: a seeded, class-balanced subset of the dataset split into train / val / test."""

from __future__ import annotations

import numpy as np
import torch

from spikemax import SpikemaxError
from spikemax.data import balanced_indices, load_raw
from spikemax.outputs import write_json
from spikemax.params import Params, Paths


def run(params: Params, paths: Paths) -> dict:
    """Subset and split the dataset into data/prepared/ and record its normalization; returns meta.json."""
    p = params.prepare
    raw = load_raw(p.dataset, paths.resolve(p.root), p.download)
    n_val = int(round(p.train_size * p.val_fraction))
    n_fit = p.train_size - n_val
    if n_fit < 1 or n_val < 1:
        raise SpikemaxError(
            f"prepare.train_size={p.train_size} with val_fraction={p.val_fraction} leaves an empty split"
        )
    if p.train_size > len(raw.train_y):
        raise SpikemaxError(
            f"prepare.train_size={p.train_size} is larger than the {len(raw.train_y)} training "
            f"images of {p.dataset}; allowed: 1..{len(raw.train_y)}"
        )
    if p.test_size > len(raw.test_y):
        raise SpikemaxError(
            f"prepare.test_size={p.test_size} is larger than the {len(raw.test_y)} test images "
            f"of {p.dataset}; allowed: 1..{len(raw.test_y)}"
        )
    rng = np.random.default_rng(p.seed)
    pick = balanced_indices(raw.train_y, p.train_size, rng)
    # Stratify the val split too, so both splits keep the class balance.
    val_local = balanced_indices(raw.train_y[pick], n_val, rng)
    fit_mask = np.ones(len(pick), dtype=bool)
    fit_mask[val_local] = False
    splits = {
        "train": (raw.train_x[pick[fit_mask]], raw.train_y[pick[fit_mask]]),
        "val": (raw.train_x[pick[val_local]], raw.train_y[pick[val_local]]),
    }
    test_pick = balanced_indices(raw.test_y, p.test_size, rng)
    splits["test"] = (raw.test_x[test_pick], raw.test_y[test_pick])

    train01 = splits["train"][0].astype(np.float64) / 255.0
    mean = train01.mean(axis=(0, 2, 3))
    std = train01.std(axis=(0, 2, 3))
    out = paths.prepared
    out.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in splits.items():
        torch.save({"x": torch.from_numpy(np.ascontiguousarray(x)), "y": torch.from_numpy(y)}, out / f"{name}.pt")
    c, h, w = raw.train_x.shape[1:]
    meta = {
        "dataset": p.dataset,
        "classes": raw.classes,
        "num_classes": len(raw.classes),
        "shape": [int(c), int(h), int(w)],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "sizes": {k: len(v[1]) for k, v in splits.items()},
        "seed": p.seed,
    }
    write_json(out / "meta.json", meta)
    return meta
