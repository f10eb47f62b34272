"""Stage `report`: the self-contained HTML report under reports/."""

from __future__ import annotations

from pathlib import Path

from spikemax.params import Params, Paths
from spikemax.report import build


def run(params: Params, paths: Paths) -> Path:
    """Write reports/index.html from the analysis outputs; returns its path."""
    page = build(paths)
    paths.reports.mkdir(parents=True, exist_ok=True)
    out = paths.reports / "index.html"
    out.write_text(page, encoding="utf-8")
    return out
