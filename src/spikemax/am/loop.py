"""The activation-maximization loop: ask -> decode -> respond -> log -> tell, one or many optimizers in lock step."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from spikemax.optim import Optimizer
from spikemax.querylog import PopulationTable, QueryLogger, log_batches

if TYPE_CHECKING:
    from spikemax.generators import LatentGrid

Responder = Callable[[torch.Tensor], np.ndarray]


@dataclass
class AMResult:
    """Outcome of one AM run: the best stimulus and every query in order."""

    best_indices: np.ndarray | None
    best_response: float
    best_image: torch.Tensor | None
    indices: np.ndarray  # (n_queries, d) grid indices in query order
    responses: np.ndarray  # (n_queries,), NaN = failed query
    batches: np.ndarray  # (n_queries,) batch number of each query
    stopped_early: bool = False
    stop_reason: str = ""
    wall_s: float = 0.0
    # Noise-aware runs: the reported best's estimate and interval of its true response
    # (best_estimate, best_low, best_high, best_count; `NoisyOptimizer.recommend`), else empty.
    interval: dict = field(default_factory=dict)

    @property
    def n_queries(self) -> int:
        return len(self.responses)

    @property
    def history(self) -> np.ndarray:
        """Every response in query order (the optimizers' `history` convention)."""
        return self.responses

    def queries_to(self, fraction: float = 0.95) -> int:
        """Queries (1-based) until the running best first reaches `fraction` of the final best."""
        return queries_to_fraction(self.responses, fraction)


def queries_to_fraction(responses: np.ndarray, fraction: float = 0.95) -> int:
    """Queries (1-based) until the running best reaches `fraction` of the best; 0 if none succeeded."""
    y = np.asarray(responses, dtype=np.float64)
    ok = ~np.isnan(y)
    if not ok.any():
        return 0
    best = float(y[ok].max())
    # Works for negative bests too: the threshold lies `1 - fraction` of |best| below it.
    threshold = best - (1.0 - fraction) * abs(best)
    return int(np.argmax(np.where(ok, y, -np.inf) >= threshold)) + 1


@dataclass
class _Track:
    """Per-optimizer state inside a lock-step group."""

    optimizer: Optimizer
    logger: QueryLogger | None
    target_value: float | None
    indices: list = field(default_factory=list)
    responses: list = field(default_factory=list)
    batches: list = field(default_factory=list)
    best: float = -math.inf
    best_indices: np.ndarray | None = None
    best_image: torch.Tensor | None = None
    n: int = 0
    stopped: str = ""
    t0: float = field(default_factory=time.perf_counter)
    wall: float = 0.0


def _respond(
    responder: Responder, images: torch.Tensor, max_images: int, times: np.ndarray | None = None
) -> np.ndarray:
    """Responses to many images in chunks (bounded memory); (K,) or (K, m). `times`: each image's
    presentation count in its own run, for a responder with a clock (`clocked`, e.g. a drifting gain)."""
    chunks = range(0, len(images), max_images)
    if times is not None and getattr(responder, "clocked", False):
        outs = [responder(images[i : i + max_images], times=times[i : i + max_images]) for i in chunks]  # type: ignore[call-arg]
    else:
        outs = [responder(images[i : i + max_images]) for i in chunks]
    return np.concatenate([np.asarray(o, dtype=np.float64) for o in outs], axis=0)


def _decode(grid: LatentGrid, indices: np.ndarray, max_images: int) -> torch.Tensor:
    with torch.no_grad():
        parts = [
            grid.decode(torch.as_tensor(indices[i : i + max_images], dtype=torch.long))
            for i in range(0, len(indices), max_images)
        ]
    return torch.cat(parts, dim=0)


def run_am_group(
    optimizers: Sequence[Optimizer],
    grid: LatentGrid,
    responder: Responder,
    budget: int | Sequence[int],
    batch: int,
    loggers: Sequence[QueryLogger | None] | None = None,
    target_value: float | None = None,
    on_batch: Callable[[int], None] | None = None,
    max_images: int = 512,
) -> list[AMResult]:
    """Run several AM loops in lock step, sharing one decode and one responder call per step.

    `responder(images)` returns (K, m) with one column per optimizer (m = len(optimizers)); optimizer
    j is told column j of its own rows only. Each loop spends exactly `budget` queries (or its own
    entry of a per-optimizer list) unless its best reaches `target_value` (then it stops, and its
    logger records why). Every batch is logged before the next one is asked, so an exception or kill
    loses nothing already measured.
    """
    budgets = [int(budget)] * len(optimizers) if isinstance(budget, (int, np.integer)) else [int(b) for b in budget]
    if len(budgets) != len(optimizers) or min(budgets, default=1) <= 0 or batch <= 0:
        raise ValueError(f"budget and batch must be positive, one budget per optimizer (got {budget}, {batch})")
    loggers = list(loggers) if loggers is not None else [None] * len(optimizers)
    tracks = [_Track(opt, lg, target_value) for opt, lg in zip(optimizers, loggers)]
    m = len(tracks)
    step = 0
    while True:
        active = [j for j, t in enumerate(tracks) if t.n < budgets[j] and not t.stopped]
        if not active:
            break
        asked = []
        for j in active:
            k = min(batch, budgets[j] - tracks[j].n)
            asked.append(np.asarray(tracks[j].optimizer.ask(k), dtype=np.int64).reshape(k, -1))
        all_idx = np.concatenate(asked, axis=0)
        images = _decode(grid, all_idx, max_images)
        # Each run is its own session with the neuron: a drift's clock counts that run's presentations.
        times = np.concatenate([tracks[j].n + np.arange(len(idx)) for j, idx in zip(active, asked)])
        y_all = _respond(responder, images, max_images, times)
        if y_all.ndim == 1:
            y_all = y_all[:, None]
        row = 0
        ys, rows = [], []
        for j, idx in zip(active, asked):
            col = j if y_all.shape[1] == m else 0
            ys.append(y_all[row : row + len(idx), col].copy())
            rows.append(row)
            row += len(idx)
        # Every run's batch is in its table (and a local store) before any optimizer sees it.
        logged = [i for i, j in enumerate(active) if tracks[j].logger is not None]
        loggers_now = [lg for i in logged if (lg := tracks[active[i]].logger) is not None]
        if logged:
            log_batches(loggers_now, [asked[i] for i in logged], [ys[i] for i in logged])
        for j, idx, y, row in zip(active, asked, ys, rows):
            t = tracks[j]
            k = len(idx)
            imgs = images[row : row + k]
            t.optimizer.tell(idx, y)
            if not np.all(np.isnan(y)):
                b = int(np.nanargmax(y))
                if y[b] > t.best:
                    t.best, t.best_indices, t.best_image = float(y[b]), idx[b].copy(), imgs[b].cpu().clone()
            t.indices.append(idx.astype(np.int32))
            t.responses.append(y)
            t.batches.append(np.full(k, step, dtype=np.int32))
            t.n += k
            t.wall = time.perf_counter() - t.t0
            if t.target_value is not None and t.best >= t.target_value and t.n < budgets[j]:
                # Early stop is a choice the params made: record it, keep everything measured.
                t.stopped = f"target_value {t.target_value:g} reached after {t.n} queries"
                if t.logger is not None:
                    t.logger.log_stop(t.stopped)
            if on_batch is not None:
                on_batch(k)
        step += 1
    return [_result(t, grid, max_images) for t in tracks]


def _result(t: _Track, grid: LatentGrid, max_images: int) -> AMResult:
    """The AMResult of a finished track."""
    d = t.indices[0].shape[1] if t.indices else 0
    stats = getattr(t.optimizer, "best_stats", None)
    if stats is not None:
        # Noise-aware: report the point with the best estimated mean (not the luckiest draw).
        t.best, t.best_indices = stats.estimate, stats.index.copy()
        t.best_image = _decode(grid, stats.index[None], max_images)[0].cpu()
    rec = getattr(t.optimizer, "recommend", None)
    rec = rec() if callable(rec) else None
    return AMResult(
        best_indices=t.best_indices,
        best_response=t.best if t.best_indices is not None else float("nan"),
        best_image=t.best_image,
        indices=np.concatenate(t.indices) if t.indices else np.zeros((0, d), np.int32),
        responses=np.concatenate(t.responses) if t.responses else np.zeros(0),
        batches=np.concatenate(t.batches) if t.batches else np.zeros(0, np.int32),
        stopped_early=bool(t.stopped),
        stop_reason=t.stopped,
        wall_s=t.wall,
        interval=rec.as_dict() if rec is not None else {},
    )


def run_am_population(
    optimizers: Sequence[Optimizer],
    grid: LatentGrid,
    responder: Responder,
    budget: int,
    batch: int,
    loggers: Sequence[QueryLogger | None] | None = None,
    table: PopulationTable | None = None,
    rule: str = "round_robin",
    target_value: float | None = None,
    on_batch: Callable[[int], None] | None = None,
    max_images: int = 512,
) -> list[AMResult]:
    """Population mode: m optimizers (one per neuron) share one stimulus set of `budget` presentations.

    Each batch of `batch` points is composed by `spikemax.optim.Population` (`rule`) from the
    optimizers' proposals; `responder(images)` returns (K, m) and optimizer j is told column j of
    every presentation (off-policy for the points other neurons proposed). A logger of None skips
    that neuron's logging (a neuron finished by an earlier attempt still proposes, so the
    presentation set is the one planned). `table` records every presentation with all m responses.
    The population stops early only when every neuron's best reached `target_value`. Every batch
    is in the tables (and a local store) before any optimizer is told it; an `mlflow server` gets
    it from `QueryLogger`'s background mirror, acknowledged when the run's logger is closed.
    """
    from spikemax.optim import Population

    if budget <= 0 or batch <= 0:
        raise ValueError(f"budget and batch must be positive (got {budget}, {batch})")
    pop = Population(optimizers, rule=rule)
    loggers = list(loggers) if loggers is not None else [None] * pop.m
    tracks = [_Track(opt, lg, target_value) for opt, lg in zip(optimizers, loggers)]
    step = spent = 0
    while spent < budget and not tracks[0].stopped:
        k = min(batch, budget - spent)
        idx = pop.ask(k)
        owner = pop.owner.copy()
        images = _decode(grid, idx, max_images)
        Y = _respond(responder, images, max_images).reshape(k, -1)
        if Y.shape[1] != pop.m:
            raise ValueError(f"responder gave {Y.shape[1]} responses per image for {pop.m} neurons")
        logged = [j for j, t in enumerate(tracks) if t.logger is not None]
        if logged:
            log_batches(
                [lg for j in logged if (lg := tracks[j].logger) is not None],
                [idx] * len(logged),
                [Y[:, j] for j in logged],
            )
        if table is not None:
            table.log(idx, owner, Y)
        pop.tell(idx, Y)
        spent += k
        for j, t in enumerate(tracks):
            y = Y[:, j].copy()
            if not np.all(np.isnan(y)):
                b = int(np.nanargmax(y))
                if y[b] > t.best:
                    t.best, t.best_indices, t.best_image = float(y[b]), idx[b].copy(), images[b].cpu().clone()
            t.indices.append(idx.astype(np.int32))
            t.responses.append(y)
            t.batches.append(np.full(k, step, dtype=np.int32))
            t.n = spent
            t.wall = time.perf_counter() - t.t0
        if target_value is not None and spent < budget and all(t.best >= target_value for t in tracks):
            reason = f"target_value {target_value:g} reached by every neuron after {spent} presentations"
            for t in tracks:
                t.stopped = reason
                if t.logger is not None:
                    t.logger.log_stop(reason)
        if on_batch is not None:
            on_batch(k)
        step += 1
    return [_result(t, grid, max_images) for t in tracks]


def run_am(
    optimizer: Optimizer,
    grid: LatentGrid,
    responder: Responder,
    budget: int,
    batch: int,
    logger: QueryLogger | None = None,
    target_value: float | None = None,
    on_batch: Callable[[int], None] | None = None,
    max_images: int = 512,
) -> AMResult:
    """One AM loop: optimizer.ask -> grid.decode -> responder -> optimizer.tell, to `budget` queries."""

    def single(images: torch.Tensor) -> np.ndarray:
        y = np.asarray(responder(images), dtype=np.float64)
        return y.reshape(len(images), -1)[:, :1]

    return run_am_group([optimizer], grid, single, budget, batch, [logger], target_value, on_batch, max_images)[0]
