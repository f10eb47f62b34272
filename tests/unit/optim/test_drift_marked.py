"""DriftCorrected told with explicit reference marks (the rig's tells need not follow its asks)."""

from __future__ import annotations

import numpy as np
import pytest

from spikemax.optim import make_optimizer
from spikemax.optim.drift import DriftCorrected

D, N = 3, 6
REFS = np.array([[0, 0, 0], [5, 5, 5], [2, 3, 4]])


def wrapped() -> tuple[DriftCorrected, list[tuple[np.ndarray, np.ndarray]]]:
    """A drift-corrected random search recording what its base is told."""
    opt = DriftCorrected(make_optimizer("random", D, N, seed=0), REFS, per_batch=2)
    told: list[tuple[np.ndarray, np.ndarray]] = []
    inner = opt.base.tell
    opt.base.tell = lambda I, y: (told.append((np.asarray(I), np.asarray(y))), inner(I, y))  # type: ignore[method-assign]
    return opt, told


def test_marked_tells_in_any_order_equal_the_in_order_tell() -> None:
    rng = np.random.default_rng(0)
    plain, told_plain = wrapped()
    marked, told_marked = wrapped()
    for b in range(4):
        I = plain.ask(8)
        assert np.array_equal(marked.ask(8), I)
        ids = marked.reference_ids
        assert ids.tolist()[:2] == [(2 * b) % 3, (2 * b + 1) % 3] and (ids[2:] == -1).all()
        y = rng.uniform(0.5, 1.5, 8) * (1.0 - 0.1 * b)  # the gain falls batch by batch
        plain.tell(I, y)
        order = rng.permutation(8)  # the same batch told shuffled, with each row's reference id
        marked.tell_marked(I[order], y[order], ids[order])
        assert marked.gain == pytest.approx(plain.gain)
    for (Ia, ya), (Ib, yb) in zip(told_plain, told_marked):  # the base got the same rescaled searched rows
        key = lambda I: np.lexsort(I.T)  # noqa: E731
        assert np.array_equal(Ia[key(Ia)], Ib[key(Ib)]) and np.allclose(np.sort(ya), np.sort(yb))
    assert plain.gain is not None and plain.gain < 1.0


def test_marks_must_name_every_row_and_no_references_keep_the_gain() -> None:
    opt, told = wrapped()
    assert opt.gain is None
    I = opt.ask(5)
    with pytest.raises(ValueError, match="one reference id per told row"):
        opt.tell_marked(I, np.ones(5), [-1, -1])
    assert opt.n_told == 0  # refused before anything was counted
    opt.tell_marked(I, np.ones(5), opt.reference_ids)
    g = opt.gain
    opt.tell_marked(I[2:], np.full(3, 2.0), [-1, -1, -1])  # a tell without references: the last gain rescales it
    assert opt.gain == g and np.allclose(told[-1][1], 2.0 / g)
