"""The maximize stage's result files: one folder per run (best stimulus, convergence, optimizer
state, summary.json), the stimulus grid PNGs, and pruning what the current plan no longer holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from spikemax import images
from spikemax.am.spec import RunSpec
from spikemax.outputs import write_json

if TYPE_CHECKING:
    from spikemax.am.loop import AMResult
    from spikemax.am.plan import Plan
    from spikemax.data import Prepared

STATE_ARRAYS = "tt_state.npz"  # optimizer state: arrays (np.savez, loaded with allow_pickle=False) ...
STATE_FIELDS = "tt_state.json"  # ... and everything else as JSON: no format that can execute code


def save_state(state: dict[str, Any], run_dir: Path) -> None:
    """Store an optimizer's `state_dict()`: its arrays in an .npz, the rest as JSON."""
    arrays: dict[str, Any] = {k: np.asarray(v) for k, v in state.items() if isinstance(v, np.ndarray)}
    fields = {k: v for k, v in state.items() if k not in arrays}
    np.savez(run_dir / STATE_ARRAYS, **arrays)
    write_json(run_dir / STATE_FIELDS, {"fields": fields, "arrays": sorted(arrays)}, indent=None)


def load_state(run_dir: Path) -> dict[str, Any]:
    """An optimizer state stored by `save_state` (numeric arrays only: a pickle in the .npz is refused)."""
    meta = json.loads((run_dir / STATE_FIELDS).read_text())
    with np.load(run_dir / STATE_ARRAYS, allow_pickle=False) as z:
        arrays = {k: z[k] for k in meta["arrays"]}
    return {**meta["fields"], **arrays}


def has_state(run_dir: Path) -> bool:
    return (run_dir / STATE_ARRAYS).is_file() and (run_dir / STATE_FIELDS).is_file()


class ResultFiles:
    """results/am of one project: the files the stage writes besides summary.csv and am.json."""

    def __init__(self, am_dir: Path, prepared: Prepared) -> None:
        self.am_dir = am_dir
        self.prepared = prepared

    def run_dir(self, spec: RunSpec) -> Path:
        return self.am_dir / spec.run_dir

    def fresh_run_dir(self, spec: RunSpec) -> Path:
        """The run's folder, emptied of an unfinished attempt's leftovers."""
        path = self.run_dir(spec)
        if path.exists():
            shutil.rmtree(path)
        return path

    def read_row(self, spec: RunSpec) -> dict | None:
        """The run's summary.json (its summary.csv row and more), None if missing or unreadable."""
        path = self.run_dir(spec) / "summary.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, json.JSONDecodeError):
            return None

    def write_run(self, spec: RunSpec, res: AMResult, state: dict[str, Any] | None) -> list[Path]:
        """best.npz, the best stimulus and convergence PNGs and the optimizer state; the PNGs."""
        run_dir = self.run_dir(spec)
        image = res.best_image
        np.savez(
            run_dir / "best.npz",
            image=(image.numpy() if image is not None else np.full(self.prepared.shape, np.nan)).astype(np.float32),
            indices=(res.best_indices if res.best_indices is not None else np.full(1, -1)).astype(np.int64),
        )
        if image is not None:
            pixels = self.prepared.denormalize(image[None])[0].clamp(0, 1)
            images.save_png(pixels, run_dir / "best_stimulus.png")
        title = f"{spec.target.name} e{spec.epoch} {spec.generator} {spec.method}"
        images.save_convergence_png(res.responses, run_dir / "convergence.png", title=title)
        if state is not None:
            save_state(state, run_dir)
        return [run_dir / "best_stimulus.png", run_dir / "convergence.png"]

    def write_row(self, spec: RunSpec, row: dict[str, Any]) -> None:
        write_json(self.run_dir(spec) / "summary.json", row, indent=None)

    def write_grids(
        self, plan: Plan, done: dict[str, dict], generators: list[str], methods: list[str], seed: int
    ) -> list[Path]:
        """One PNG per (generator, method): best stimuli of the first 40 targets across checkpoints."""
        out = []
        targets = plan.targets[:40]  # a readable page; every stimulus is in its run dir
        by_cell = {(r.epoch, r.generator, r.target, r.method, r.seed): r for r in plan.runs}
        for g in generators:
            for method in methods:
                cells: list[np.ndarray | None] = []
                for t in targets:
                    for e in plan.epochs:
                        spec = by_cell.get((e, g, t, method, seed))
                        img = None
                        best = self.run_dir(spec) / "best.npz" if spec is not None else None
                        if spec is not None and best is not None and spec.key in done and best.is_file():
                            with np.load(best, allow_pickle=False) as z:
                                x = torch.from_numpy(z["image"])
                            if torch.isfinite(x).all():
                                img = self.prepared.denormalize(x[None])[0].clamp(0, 1).numpy()
                        cells.append(img)
                path = self.am_dir / f"stimuli_{g}_{method}.png"
                images.save_image_grid_png(
                    cells,
                    len(targets),
                    len(plan.epochs),
                    path,
                    row_labels=[t.name for t in targets],
                    col_labels=[f"epoch {e}" for e in plan.epochs],
                    title=f"best stimuli: {g}, {method}, seed {seed}",
                )
                out.append(path)
        return out

    def prune(self, plan: Plan) -> None:
        """Drop run dirs of other params (results/am mirrors the current plan; MLflow keeps them all)."""
        keys = {r.key for r in plan.runs}
        for d in (self.am_dir / "runs").glob("*"):
            if d.is_dir() and d.name not in keys:
                shutil.rmtree(d, ignore_errors=True)
        pops = {r.population for r in plan.runs if r.population}
        for d in (self.am_dir / "populations").glob("*"):
            if d.is_dir() and d.name not in pops:
                shutil.rmtree(d, ignore_errors=True)
