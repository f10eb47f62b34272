"""Population mode: one optimizer per recorded neuron, one stimulus set presented to all of them.

A multi-electrode array records m neurons from every presentation. `Population` composes each
batch from the neurons' own proposals (`RULES`) and tells every optimizer every presentation's
response for its neuron (off-policy: an optimizer also learns from points other neurons chose).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import Optimizer, check_k

RULES = ("round_robin", "progress")
"""How a batch of k is split among the m optimizers' proposals:

round_robin  equal quotas k // m; the remainder goes to the next optimizers in turn, so over
             batches every optimizer proposes the same number of points (+-1).
progress     quotas in proportion to each neuron's recent progress (its best estimate's rise over
             its last tells, relative to its level), every neuron keeping at least `floor` of an
             equal share: neurons still climbing get more points, settled ones fewer.

Under both rules a neuron that has answered nothing yet (every response told so far 0: a channel
the stimuli do not drive, or a dead electrode) proposes with weight `silent` of a responsive one's,
so the responsive neurons' searches get the presentations a silent channel would waste; it keeps
proposing (at least one point of a batch of k >= m), and gets its full share once it responds.
"""


class Population:
    """m optimizers over one grid, asked together and told every response of their neuron.

    `ask(k)` returns (k, d) points, `owner` the optimizer that proposed each; `tell(I, Y)` with
    Y (k, m) tells optimizer j the column Y[:, j] for all k points.
    """

    def __init__(
        self, optimizers: Sequence[Optimizer], rule: str = "round_robin", floor: float = 0.5, silent: float = 0.25
    ) -> None:
        self.optimizers = list(optimizers)
        if not self.optimizers:
            raise ValueError("Population needs at least one optimizer")
        first = self.optimizers[0]
        for o in self.optimizers[1:]:
            if o.d != first.d or not np.array_equal(o.n, first.n):
                raise ValueError("every optimizer of a Population must search the same grid (d, n)")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
        if not 0.0 <= float(floor) <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {floor!r}")
        if not 0.0 < float(silent) <= 1.0:
            raise ValueError(f"silent must be in (0, 1], got {silent!r}")
        self.rule, self.floor, self.silent = rule, float(floor), float(silent)
        self.d, self.n = first.d, first.n.copy()
        self.owner = np.zeros(0, dtype=np.int64)  # proposer of each point of the last ask
        self.proposed = np.zeros(self.m, dtype=np.int64)  # points each optimizer proposed so far
        self._turn = 0
        self._trace: list[list[float]] = [[] for _ in self.optimizers]  # best estimate after each tell
        self.responded = np.zeros(self.m, dtype=bool)  # neuron j answered some presentation with > 0

    @property
    def m(self) -> int:
        """Number of neurons (optimizers)."""
        return len(self.optimizers)

    @property
    def batch(self) -> int:
        """Default ask size: the sum of the optimizers' own batches."""
        return int(sum(o.batch for o in self.optimizers))

    def quotas(self, k: int) -> np.ndarray:
        """How many of the k points each optimizer proposes (sums to k)."""
        k = check_k(k)
        m = self.m
        if self.rule == "progress" and all(len(t) >= 2 for t in self._trace):
            share = self._progress()
        else:
            share = np.full(m, 1.0 / m)
        if self.responded.any() and not self.responded.all():
            share = np.where(self.responded, share, self.silent * share)
            share = share / share.sum()
        q = np.floor(share * k + 1e-9).astype(np.int64)
        if k >= m:  # every neuron keeps proposing (a silent one may start firing on its own points)
            for j in np.flatnonzero(q == 0):
                q[int(np.argmax(q))] -= 1
                q[j] = 1
        left = k - int(q.sum())
        order = (self._turn + np.arange(m)) % m
        order = order[np.argsort(~self.responded[order], kind="stable")]  # responsive neurons first, in turn
        q[order[:left]] += 1
        self._turn = int((self._turn + left) % m)
        return q

    def _progress(self) -> np.ndarray:
        """Share of each neuron: a floor of the equal share plus the rest by relative recent rise."""
        rise = np.empty(self.m)
        for j, t in enumerate(self._trace):
            last = t[-4:]
            scale = max(abs(last[-1]), 1e-12)
            rise[j] = max(last[-1] - last[0], 0.0) / scale if np.isfinite(last[0]) else 1.0
        extra = rise / rise.sum() if rise.sum() > 0 else np.full(self.m, 1.0 / self.m)
        return self.floor / self.m + (1.0 - self.floor) * extra

    def ask(self, k: int | None = None) -> np.ndarray:
        """k points (int (k, d)): each optimizer's proposals in turn, `owner` says whose."""
        k = self.batch if k is None else check_k(k)
        q = self.quotas(k)
        parts, owner = [], []
        for j, (opt, qj) in enumerate(zip(self.optimizers, q)):
            if qj:
                parts.append(np.asarray(opt.ask(int(qj)), dtype=np.int64).reshape(int(qj), self.d))
                owner.append(np.full(int(qj), j, dtype=np.int64))
        self.proposed += q
        self.owner = np.concatenate(owner)
        return np.concatenate(parts, axis=0)

    def tell(self, I: Any, Y: Any) -> None:
        """Tell optimizer j the responses Y[:, j] (k,) of neuron j to all k points I."""
        I = np.asarray(I, dtype=np.int64).reshape(-1, self.d)
        Y = np.asarray(Y, dtype=np.float64)
        if Y.shape != (I.shape[0], self.m):
            raise ValueError(f"Y must have shape ({I.shape[0]}, {self.m}) (one column per neuron), got {Y.shape}")
        self.responded |= np.any(np.nan_to_num(Y, nan=0.0) > 0, axis=0)
        for j, opt in enumerate(self.optimizers):
            opt.tell(I, Y[:, j])
            self._trace[j].append(float(opt.best[1]))

    @property
    def best(self) -> list[tuple[np.ndarray | None, float]]:
        """Each optimizer's `best`."""
        return [o.best for o in self.optimizers]


def run_population(pop: Population, f: Any, budget: int, batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Drive a Population on f (points (k, d) -> responses (k, m)) for `budget` presentations in all.

    Returns every presented point (budget, d) and every response (budget, m), in presentation order.
    """
    from .base import check_positive_int

    budget = check_positive_int("budget", budget)
    k_max = pop.batch if batch is None else check_positive_int("batch", batch)
    Is, Ys = [], []
    spent = 0
    while spent < budget:
        k = min(k_max, budget - spent)
        I = pop.ask(k)
        Y = np.asarray(f(I), dtype=np.float64).reshape(k, pop.m)
        pop.tell(I, Y)
        Is.append(I)
        Ys.append(Y)
        spent += k
    return np.concatenate(Is), np.concatenate(Ys)
