"""Project helpers shared by the tests: the repo root, tiny settings, params files, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TINY_PREPARE = {"dataset": "fashion-mnist", "train_size": 1000, "test_size": 300, "val_fraction": 0.2, "seed": 0}

TINY_GENERATORS = {
    "sngan": {"width": 16, "epochs": 1, "batch_size": 64},
    "vqvae": {"width": 16, "epochs": 3, "batch_size": 32, "lr": 3e-3},
}


TINY_SNN = {
    "channels": [4, 8],
    "hidden": [32],
    "num_steps": 6,
    "epochs": 2,
    "batch_size": 64,
    "lr": 0.005,
    "threads": 1,
}


def write_params(root: Path, sections: dict) -> Path:
    """Write a params.yaml into `root` and return its path."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `spikemax ARGS` as a subprocess (the way users and DVC run it)."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "spikemax.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
