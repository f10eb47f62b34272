"""Stage `summarize`: metrics/summary.json, the handful of headline numbers DVC tables and diffs.

Flat and small on purpose (at most 12 numbers): `dvc metrics show`, `dvc metrics diff` and
`dvc exp show` compare these; the detailed JSON files stay stage outputs and MLflow artifacts.
"""

from __future__ import annotations

import json
from typing import Any

from spikemax import SpikemaxError
from spikemax.outputs import write_json
from spikemax.params import Params, Paths

MAX_NUMBERS = 12
# What each number is (the docs' table); GEN stands for each generator of maximize.generators.
MEANING = {
    "test_acc": "test accuracy of the trained SNN (last checkpoint)",
    "GEN_gain": "median AM gain (best activation / best test image's) of GEN's runs at the last checkpoint",
    "GEN_above": "share of GEN's runs at the last checkpoint whose best beats every test image",
    "queries_per_s": "SNN queries per second of the maximize stage (its wall time)",
    "c1_early_selective": "claim 1: share of units selective (CSI > threshold) by the early checkpoint",
    "c2_rho_csi_acc": "claim 2: Spearman rho of mean CSI vs test accuracy across checkpoints",
    "c3_concept_change": "claim 3: share of neurons whose optimal stimulus changes concept (restart-robust)",
}
CLAIMS = ("c1_early_selective", "c2_rho_csi_acc", "c3_concept_change")


def _read(paths: Paths, name: str, stage: str) -> dict[str, Any]:
    path = paths.metrics / name
    if not path.is_file():
        raise SpikemaxError(f"{path} missing: run `spikemax {stage}` (or `dvc repro`) first")
    return json.loads(path.read_text())


def summary(params: Params, snn: dict, am: dict, analysis: dict) -> dict[str, float | None]:
    """The headline numbers from the stages' metrics JSON (None where a stage had no value)."""
    method = params.maximize.methods[0]  # the method a plain run uses (`auto` by default)
    out: dict[str, float | None] = {"test_acc": snn.get("test_acc")}
    for g in params.maximize.generators:
        last = am.get("last_checkpoint", {}).get(f"{g}/{method}", {})
        out[f"{g}_gain"] = last.get("median_am_gain")
        out[f"{g}_above"] = last.get("frac_above_dataset")
    out["queries_per_s"] = am.get("queries_per_s")
    heads = analysis.get("headline", {})
    out.update({k: heads.get(k) for k in CLAIMS})
    if len(out) > MAX_NUMBERS:
        raise SpikemaxError(
            f"metrics/summary.json would hold {len(out)} numbers (at most {MAX_NUMBERS}): fewer generators"
        )
    return {k: None if v is None else round(float(v), 4) for k, v in out.items()}


def run(params: Params, paths: Paths) -> dict[str, float | None]:
    """Write metrics/summary.json from metrics/snn.json, am.json and analysis.json."""
    out = summary(
        params,
        _read(paths, "snn.json", "train-snn"),
        _read(paths, "am.json", "maximize"),
        _read(paths, "analysis.json", "analyze"),
    )
    write_json(paths.metrics / "summary.json", out)
    return out
