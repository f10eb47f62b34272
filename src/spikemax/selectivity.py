"""Per-neuron selectivity metrics: small pure functions on numpy arrays.

Conventions: `rates` are non-negative responses shaped (N stimuli, U units); `labels` are int
class ids (N,). Degenerate cases (a silent unit) are given a defined value, never NaN, so layer
means stay finite; the docstrings say which.
"""

from __future__ import annotations

import numpy as np


def class_means(rates: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean response of every unit to every class: (num_classes, U); an absent class gives 0."""
    rates = np.asarray(rates, dtype=np.float64)
    if rates.ndim == 1:
        rates = rates[:, None]
    labels = np.asarray(labels, dtype=np.int64)
    sums = np.zeros((num_classes, rates.shape[1]))
    np.add.at(sums, labels, rates)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return sums / np.maximum(counts, 1.0)[:, None]


def csi(means: np.ndarray) -> np.ndarray:
    """Class selectivity index (Morcos et al. 2018) per unit from class means (K, U).

    CSI = (mu_max - mu_rest) / (mu_max + mu_rest), mu_rest = mean of the other K - 1 classes.
    In [0, 1] for non-negative responses: 0 = equal response to all classes, 1 = responds to one
    class only. A silent unit (0/0) gets CSI 0: it prefers nothing.
    """
    means = np.asarray(means, dtype=np.float64)
    if means.ndim == 1:
        means = means[:, None]
    k = means.shape[0]
    mu_max = means.max(axis=0)
    mu_rest = (means.sum(axis=0) - mu_max) / max(k - 1, 1)
    den = mu_max + mu_rest
    out = np.zeros_like(mu_max)
    ok = den > 0
    out[ok] = (mu_max[ok] - mu_rest[ok]) / den[ok]
    return out


def preferred_class(means: np.ndarray) -> np.ndarray:
    """Class with the highest mean response per unit (K, U) -> (U,); -1 for a silent unit."""
    means = np.asarray(means, dtype=np.float64)
    if means.ndim == 1:
        means = means[:, None]
    pref = means.argmax(axis=0)
    pref[means.max(axis=0) <= 0] = -1
    return pref


def lifetime_sparseness(rates: np.ndarray) -> np.ndarray:
    """Lifetime sparseness per unit over N stimuli (Vinje & Gallant 2000), (N, U) -> (U,).

    With Rolls & Tovee's activity ratio a = (sum_i r_i / N)^2 / (sum_i r_i^2 / N),
    S = (1 - a) / (1 - 1/N): 0 = equal response to every stimulus, 1 = responds to a single one.
    A silent unit (a = 0/0) gets S 0, like a flat one. N = 1 gives 0 (nothing to compare).
    """
    rates = np.asarray(rates, dtype=np.float64)
    if rates.ndim == 1:
        rates = rates[:, None]
    n = rates.shape[0]
    mean = rates.mean(axis=0)
    mean_sq = (rates**2).mean(axis=0)
    out = np.zeros(rates.shape[1])
    if n < 2:
        return out
    ok = mean_sq > 0
    a = mean[ok] ** 2 / mean_sq[ok]
    out[ok] = (1.0 - a) / (1.0 - 1.0 / n)
    return np.clip(out, 0.0, 1.0)


def am_gain(best: np.ndarray | float, dataset_max: np.ndarray | float) -> np.ndarray | float:
    """AM gain = best AM activation / highest activation over the dataset; NaN where that max is 0."""
    best = np.asarray(best, dtype=np.float64)
    dmax = np.asarray(dataset_max, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(dmax > 0, best / np.where(dmax > 0, dmax, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


def am_gain_summary(best: np.ndarray, dataset_max: np.ndarray) -> dict[str, float | None]:
    """What the maximize stage reports of a set of runs (and the tune stage scores a trial by):
    the median AM gain over runs whose gain is defined, and the fraction of runs whose best beats
    the best test image (None where no run has a value)."""
    best = np.asarray(best, dtype=np.float64).reshape(-1)
    dmax = np.asarray(dataset_max, dtype=np.float64).reshape(-1)
    gain = np.asarray(am_gain(best, dmax), dtype=np.float64).reshape(-1)
    ok = np.isfinite(gain)
    return {
        "median_am_gain": float(np.median(gain[ok])) if ok.any() else None,
        "frac_above_dataset": float(np.mean(best > dmax)) if best.size else None,
    }


def normalized_perplexity(probs: np.ndarray) -> np.ndarray | float:
    """exp(entropy) / K of class distributions (..., K): 1/K = one class certain, 1 = uniform."""
    p = np.asarray(probs, dtype=np.float64)
    p = p / p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
    out = np.exp(h) / p.shape[-1]
    return float(out) if np.ndim(out) == 0 else out


def concept(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concept of stimuli from class probabilities (B, K): (class, its probability, normalized perplexity)."""
    p = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    cls = p.argmax(axis=1)
    return cls, p[np.arange(len(p)), cls], np.atleast_1d(normalized_perplexity(p))


def png_complexity(pixels01: np.ndarray) -> int:
    """Stimulus complexity: bytes of the image as a maximally compressed 8-bit PNG."""
    from spikemax.images import png_bytes

    return len(png_bytes(pixels01, optimize=True))
