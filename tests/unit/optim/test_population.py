"""Population mode: batches composed from m optimizers, every response routed to its neuron."""

from __future__ import annotations

import numpy as np
import pytest

from spikemax.optim import Optimizer, Population, make_optimizer


class Recorder(Optimizer):
    """Random proposals; records every tell it receives."""

    method = "recorder"

    def __init__(self, d: int, n: int, seed: int) -> None:
        super().__init__(d, n, seed, batch=4)
        self.rng = np.random.default_rng(seed)
        self.told_I: list[np.ndarray] = []
        self.told_y: list[np.ndarray] = []

    def _ask(self, k: int) -> np.ndarray:
        return self.rng.integers(0, self.n[None, :], size=(k, self.d))

    def _tell(self, I: np.ndarray, y: np.ndarray) -> None:
        self.told_I.append(I.copy())
        self.told_y.append(y.copy())


def test_every_optimizer_gets_its_column_of_every_presentation() -> None:
    """Optimizer j is told all k points of every batch with exactly column j of the responses."""
    m, d = 5, 3
    pop = Population([Recorder(d, 6, seed=j) for j in range(m)])
    Is, Ys = [], []
    rng = np.random.default_rng(0)
    for k in (7, 10, 3, 5):
        I = pop.ask(k)
        Y = rng.standard_normal((k, m))
        pop.tell(I, Y)
        Is.append(I)
        Ys.append(Y)
    I_all, Y_all = np.concatenate(Is), np.concatenate(Ys)
    for j, opt in enumerate(pop.optimizers):
        assert opt.n_told == len(I_all)
        assert np.array_equal(np.concatenate(opt.told_I), I_all)
        assert np.array_equal(np.concatenate(opt.told_y), Y_all[:, j])


def test_round_robin_quotas_are_fair() -> None:
    """Quotas sum to k and, over batches, every optimizer proposes the same number of points +-1."""
    pop = Population([Recorder(2, 4, seed=j) for j in range(4)])
    for k in (3, 5, 6, 1, 9):
        I = pop.ask(k)
        assert I.shape == (k, 2)
        assert np.bincount(pop.owner, minlength=4).sum() == k
        pop.tell(I, np.zeros((k, 4)))
    assert pop.proposed.sum() == 24
    assert pop.proposed.max() - pop.proposed.min() <= 1


def test_owner_marks_each_optimizers_own_proposals() -> None:
    """The rows owned by optimizer j are the points it proposed (seeded: same draws again)."""
    pop = Population([Recorder(3, 8, seed=j) for j in range(3)])
    I = pop.ask(9)
    for j in range(3):
        mine = I[pop.owner == j]
        assert np.array_equal(mine, np.random.default_rng(j).integers(0, 8, size=(3, 3)))


def test_progress_rule_keeps_a_floor_and_sums_to_k() -> None:
    """Under `progress` quotas still sum to k and every neuron keeps its floor share."""
    m = 4
    pop = Population([make_optimizer("tt", 3, 6, seed=j) for j in range(m)], rule="progress", floor=0.5)
    rng = np.random.default_rng(0)
    w = rng.random((m, 3))
    for _ in range(6):
        I = pop.ask(16)
        q = np.bincount(pop.owner, minlength=m)
        assert q.sum() == 16 and q.min() >= 16 * 0.5 / m - 1
        pop.tell(I, I @ w.T)


@pytest.mark.parametrize("rule", ["round_robin", "progress"])
def test_silent_neuron_proposes_less_until_it_responds(rule: str) -> None:
    """A neuron that answered nothing gets `silent` of a responsive one's share; full once it fires."""
    m, k = 3, 30
    pop = Population([Recorder(2, 4, seed=j) for j in range(m)], rule=rule, floor=1.0, silent=0.25)
    q0 = pop.quotas(k)
    assert q0.max() - q0.min() <= 1  # nothing told yet: nobody is silent
    for _ in range(3):
        I = pop.ask(k)
        Y = np.column_stack([np.ones(k), np.full(k, 2.0), np.zeros(k)])  # neuron 2 never fires
        pop.tell(I, Y)
    q = pop.quotas(k)
    assert q.sum() == k
    # shares 1 : 1 : 0.25 of 30 points -> 13, 13, 3 (+-1 for the remainder in turn)
    assert abs(q[2] - 30 * 0.25 / 2.25) <= 1 and min(q[0], q[1]) >= 13
    I = pop.ask(k)
    Y = np.zeros((k, m))
    Y[0, 2] = 0.5  # it responds once
    pop.tell(I, Y)
    q = pop.quotas(k)
    assert q.sum() == k and q.max() - q.min() <= 1


def test_a_silent_neuron_keeps_one_point_of_a_small_batch() -> None:
    """Silent neurons still propose at least one point whenever the batch has one per neuron."""
    m = 4
    pop = Population([Recorder(2, 4, seed=j) for j in range(m)], silent=0.01)
    I = pop.ask(8)
    pop.tell(I, np.column_stack([np.ones(8), np.zeros((8, 3))]))  # only neuron 0 fires
    for k in (4, 5, 8, 13):
        q = pop.quotas(k)
        assert q.sum() == k and q.min() >= 1 and q[0] == q.max()


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Population([]), "at least one optimizer"),
        (lambda: Population([Recorder(2, 4, 0), Recorder(3, 4, 1)]), "same grid"),
        (lambda: Population([Recorder(2, 4, 0)], rule="vote"), "rule must be one of"),
        (lambda: Population([Recorder(2, 4, 0)], silent=0.0), "silent must be in"),
    ],
)
def test_bad_population(build, match: str) -> None:
    """Mismatched grids, no optimizers or an unknown rule fail with one line."""
    with pytest.raises(ValueError, match=match):
        build()


def test_tell_shape_is_checked() -> None:
    """Y must hold one column per neuron."""
    pop = Population([Recorder(2, 4, seed=j) for j in range(3)])
    I = pop.ask(6)
    with pytest.raises(ValueError, match=r"Y must have shape \(6, 3\)"):
        pop.tell(I, np.zeros((6, 2)))


def test_run_population_spends_the_budget_and_improves_every_neuron() -> None:
    """run_population presents exactly `budget` points; each TT beats its neuron's first batch."""
    from spikemax.optim.population import run_population

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 8, size=(3, 5))
    f = lambda I: -np.stack([np.abs(I - t).sum(1) for t in targets], axis=1).astype(float)  # noqa: E731
    pop = Population([make_optimizer("tt", 5, 8, seed=j) for j in range(3)])
    I, Y = run_population(pop, f, 300, batch=24)
    assert I.shape == (300, 5) and Y.shape == (300, 3)
    for j, (i_best, y_best) in enumerate(pop.best):
        assert y_best == Y[:, j].max() > Y[:24, j].max()
        assert f(i_best[None])[0, j] == y_best


@pytest.mark.parametrize("adopt", [True, False])
def test_cma_adopts_a_better_point_another_source_found(adopt: bool) -> None:
    """With `adopt`, a told point CMA never proposed that beats all of its own joins its next
    generation (population mode: another neuron's proposal); without it, CMA ignores it."""
    from spikemax.optim.baselines import CMAOptimizer

    d, n = 6, 8
    foreign = np.array([[7, 0, 7, 0, 7, 0]])  # a corner: CMA from the centre with sigma 0.1 never samples it
    opt = CMAOptimizer(d, n, seed=0, sigma0=0.1, adopt=adopt)
    own = opt.ask(opt.batch)
    opt.tell(foreign, [5.0])  # while the generation is open
    opt.tell(own, np.zeros(len(own)))
    nxt = opt.ask(opt.batch)
    assert any((row == foreign[0]).all() for row in nxt) == adopt
    assert opt.best[1] == 5.0  # either way it is the best told
    # A foreign point worse than CMA's own best is not adopted.
    opt.tell(nxt, np.ones(len(nxt)))
    opt.tell(np.array([[0, 7, 0, 7, 0, 7]]), [0.5])
    assert not any((row == [0, 7, 0, 7, 0, 7]).all() for row in opt.ask(opt.batch))


def test_population_mode_makes_cma_adopt_and_tt_climb_from_its_best() -> None:
    """options_for under `maximize.population`: CMA-ES (also as `auto` on an ordered grid) adopts
    the other neurons' better points in short generations; TT (which learns from every told point
    anyway) climbs from its single best point, except under a noise model (a single draw may be luck)."""
    from spikemax import params as P
    from spikemax.optim import options_for
    from spikemax.optim.options import POPULATION_CMA_POPSIZE

    solo = P.validate({}).maximize
    pop = P.validate({"maximize": {"population": True}}).maximize
    assert options_for("cma", pop, True)["adopt"] is True
    pop_cma = {"adopt": True, "popsize": POPULATION_CMA_POPSIZE}
    assert options_for("auto", pop, True) == {**options_for("auto", solo, True), **pop_cma}
    assert "popsize" not in options_for("cma", solo, True)  # pycma's own default outside population mode
    assert "adopt" not in options_for("cma", solo, True)
    assert options_for("tt", pop, False) == {**options_for("tt", solo, False), "elite": 1}
    assert options_for("auto", pop, False)["elite"] == 1  # VQ-VAE's auto is TT
    noisy = P.validate({"maximize": {"population": True, "noise": {"model": "poisson"}}}).maximize
    assert options_for("tt", noisy, False)["elite"] > 1
    assert options_for("cma", noisy, True)["popsize"] > POPULATION_CMA_POPSIZE  # the noise-aware generation
    assert make_optimizer("auto", 4, 8, **options_for("auto", pop, True)).adopt
