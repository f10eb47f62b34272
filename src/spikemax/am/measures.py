"""What the maximize stage measures besides the search: each target's response to the dataset and
each best stimulus's concept and complexity under its checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from spikemax.am.loop import AMResult
    from spikemax.data import Prepared
    from spikemax.neurons import Target
    from spikemax.snn import ConvSNN


def dataset_stats(net: ConvSNN, prepared: Prepared, targets: list[Target], max_images: int) -> dict[str, np.ndarray]:
    """Per target over the prepared test images: max response, CSI and lifetime sparseness."""
    from spikemax import selectivity
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
    means = selectivity.class_means(rates, labels.numpy(), len(prepared.classes))
    return {
        "dataset_max": rates.max(axis=0),
        "csi": selectivity.csi(means),
        "sparseness": selectivity.lifetime_sparseness(rates),
    }


def stimulus_stats(net: ConvSNN, prepared: Prepared, results: list[AMResult]) -> list[dict[str, float]]:
    """Concept of each best stimulus under this checkpoint (class, probability, perplexity), complexity."""
    from spikemax import selectivity

    have = [i for i, r in enumerate(results) if r.best_image is not None]
    out: list[dict[str, float]] = [{} for _ in results]
    if not have:
        return out
    x = torch.stack([img for i in have if (img := results[i].best_image) is not None])
    probs = net.class_probs(x).detach().cpu().numpy()
    cls, prob, ppl = selectivity.concept(probs)
    pixels = prepared.denormalize(x).clamp(0, 1).numpy()
    for j, i in enumerate(have):
        out[i] = {
            "concept": int(cls[j]),
            "concept_prob": float(prob[j]),
            "perplexity": float(ppl[j]),
            "complexity": selectivity.png_complexity(pixels[j]),
        }
    return out
