"""Run specs: everything one AM run (and one lock-step group) runs with, resolved by the planner."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spikemax.neurons import Target

if TYPE_CHECKING:
    from spikemax.optim import Optimizer


@dataclass(frozen=True)
class RunSpec:
    """One AM run: (checkpoint, generator, target, method, seed) under one configuration, resolved.

    `epoch` is the checkpoint's index (0 = untrained); `step` and `progress` say how far training was
    (optimizer steps, fractional epochs; step None for legacy `epoch=NNN.ckpt` names)."""

    epoch: int
    generator: str
    target: Target
    method: str
    seed: int
    key: str
    step: int | None
    progress: float
    budget: int  # queries of this run (maximize.budget, or budget_last at the scan's last checkpoint)
    resolved: str  # the method that runs (`auto` resolved for the grid)
    options_json: str  # make_optimizer options as logged (prior and warm state are added when built)
    rank: int | None  # the TT rank a run that runs TT uses (tuned or `tt.rank`), None otherwise
    prior_rank: int | None  # the data prior's rank (None: no prior)
    tuned_study: str  # the tune study whose adopted settings this run takes ("none")
    method_source: str  # what decided its method and settings: study | default | fallback | configured
    grid_n: int | None  # a tuned grid resolution (None: the generator's own)
    warm_from: str  # key of the previous checkpoint's run it may warm-start from ("" = always cold)
    population: str  # key of its presentation set in population mode ("" otherwise)

    @property
    def run_dir(self) -> str:
        return f"runs/{self.key}"

    @property
    def options(self) -> dict[str, Any]:
        return dict(json.loads(self.options_json))

    def cold_twin(self, budget: int) -> RunSpec:
        """The same run without the warm start (same seed, options and prior) over `budget` queries:
        the measured reference of `queries_saved`."""
        return dataclasses.replace(self, warm_from="", budget=budget, key=f"{self.key}~cold")


@dataclass(frozen=True)
class GroupSpec:
    """The runs of one (checkpoint, generator, method, seed): one grid, one responder, lock-stepped
    (or one population); `after` names the group whose warm-start states it reads."""

    epoch: int
    generator: str
    method: str
    seed: int
    runs: tuple[RunSpec, ...]
    snn_ckpt: Path
    gen_ckpt: Path
    noise_seed: int
    grid_n: int | None
    after: tuple[int, str, str, int] | None  # (epoch, generator, method, seed) of the group it waits for

    @property
    def name(self) -> str:
        return f"e{self.epoch} {self.generator} {self.method} s{self.seed}"

    @property
    def ident(self) -> tuple[int, str, str, int]:
        return (self.epoch, self.generator, self.method, self.seed)


def build_optimizer(spec: RunSpec, d: int, n: int, prior: Any = None, init: Any = None) -> Optimizer:
    """The optimizer of a run spec on a (d, n) grid, from its prior and warm-start state if any."""
    from spikemax.optim import make_optimizer

    opts = spec.options
    if prior is not None:
        opts["prior"] = prior
    if init is not None:
        opts["init"] = init
    return make_optimizer(spec.method, d, n, seed=spec.seed, **opts)
