"""Rig sessions in process: replay after a restart equals a session never restarted; isolation; validation."""

from __future__ import annotations

import numpy as np
import pytest

from spikemax.optim.options import POPULATION_CMA_POPSIZE
from spikemax.rig.models import SessionCreate, TellRequest
from spikemax.rig.sessions import Conflict, Invalid, NotFound, SessionManager
from tests.support.rig import as_results, make_project, neuron


@pytest.fixture(scope="module")
def proj(generator_checkpoints, tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("rigproj"), generator_checkpoints)


def drive(manager: SessionManager, sid: str, steps: list[int], channels: int = 1) -> None:
    """Ask k for each step and tell the answers in two uneven parts, the later part first."""
    for k in steps:
        asked = manager.ask(sid, k)
        ids = [x for x, _ in asked]
        y = neuron(np.stack([i for _, i in asked]), channels)
        cut = max(1, len(ids) // 3)
        for part in (slice(cut, None), slice(0, cut)):
            if ids[part]:
                manager.tell(sid, TellRequest.model_validate({"results": as_results(ids[part], y[part])}))


def table(manager: SessionManager, sid: str) -> tuple[list, list, list]:
    s = manager.get(sid)
    return [i.tolist() for i in s.q_idx], [np.nan_to_num(y, nan=-1e9).tolist() for y in s.q_y], s.q_sid


@pytest.mark.parametrize(
    ("method", "generator"), [("tt", "sngan"), ("random", "vqvae"), ("cma", "sngan"), ("ngopt", "vqvae")]
)
def test_restart_replays_to_the_same_optimizer(proj, tmp_path, method, generator):
    """Same seed and answers: a session restarted twice (with asks pending) asks exactly what an unbroken one asks."""
    params, paths = proj
    req = SessionCreate(generator=generator, method=method, budget=66, seed=3, batch=8, channels=2)
    plan = [7, 5, 9, 8, 11, 6, 10, 4]
    whole = SessionManager(params, paths, tmp_path / "whole", mlflow=False)
    a = whole.create(req).id
    broken = SessionManager(params, paths, tmp_path / "broken", mlflow=False)
    b = broken.create(req).id
    for part in (plan[:3], plan[3:6], plan[6:]):
        drive(whole, a, part, 2)
        drive(broken, b, part, 2)
        pending = broken.ask(b, 2)  # asked, then the server dies before they are answered
        broken.close()
        broken = SessionManager(params, paths, tmp_path / "broken", mlflow=False)
        assert broken.get(b).pending == [x for x, _ in pending]
        y = neuron(np.stack([i for _, i in pending]), 2)
        broken.tell(b, TellRequest.model_validate({"results": as_results([x for x, _ in pending], y)}))
        twin = whole.ask(a, 2)
        whole.tell(a, TellRequest.model_validate({"results": as_results([x for x, _ in twin], y)}))
    ta, tb = table(whole, a), table(broken, b)
    assert ta[0] == tb[0] and ta[1] == tb[1]
    assert [x.split("-")[1] for x in ta[2]] == [x.split("-")[1] for x in tb[2]]
    sa, sb = whole.get(a).status(), broken.get(b).status()
    assert (
        (sa.asked, sa.answered, sa.pending, sa.queries)
        == (sb.asked, sb.answered, sb.pending, sb.queries)
        == (
            66,
            66,
            0,
            66,
        )
    )
    assert sa.best is not None and sb.best is not None and sa.best.indices == sb.best.indices
    assert sa.state == sb.state == "finished"
    whole.close()
    broken.close()


def test_sessions_interleaved_equal_sessions_alone(proj, tmp_path):
    """Each optimizer draws from its own generator (pycma too): two interleaved sessions ask what each asks alone."""
    params, paths = proj
    reqs = [SessionCreate(generator="sngan", method="cma", budget=40, seed=s, batch=8) for s in (0, 1)]
    both = SessionManager(params, paths, tmp_path / "both", mlflow=False)
    ids = [both.create(r).id for r in reqs]
    for _ in range(5):
        for sid in ids:
            drive(both, sid, [8])
    for r, sid in zip(reqs, ids):
        alone = SessionManager(params, paths, tmp_path / f"alone{r.seed}", mlflow=False)
        one = alone.create(r).id
        drive(alone, one, [8] * 5)
        assert table(alone, one)[:2] == table(both, sid)[:2]
        alone.close()
    assert table(both, ids[0])[0] != table(both, ids[1])[0]
    both.close()


def test_bad_tells_change_nothing(proj, tmp_path):
    params, paths = proj
    m = SessionManager(params, paths, tmp_path / "s", mlflow=False)
    sid = m.create(SessionCreate(generator="vqvae", method="tt", budget=10, seed=0, batch=4, channels=2)).id
    asked = m.ask(sid, 4)
    ids = [x for x, _ in asked]
    m.tell(sid, TellRequest.model_validate({"results": [{"id": ids[0], "responses": [1.0, 2.0]}]}))
    before = m.get(sid).status()
    bad = [
        (NotFound, r"results\[1\]\.id: unknown stimulus 'nope'", [{"id": ids[1], "responses": [1, 2]}, {"id": "nope"}]),
        (Conflict, r"results\[0\]\.id: stimulus .* was already answered", [{"id": ids[0], "responses": [1, 2]}]),
        (Invalid, r"results\[0\]\.responses: expected 2 values", [{"id": ids[1], "responses": [1.0]}]),
        (Invalid, r"results\[1\]\.id: .* appears twice", [{"id": ids[1]}, {"id": ids[1]}]),
        (Invalid, r"results\[0\]\.indices\[2\]: 99 is outside the grid", [{"indices": [0, 0, 99] + [0] * 46}]),
        (Invalid, r"results\[0\]\.indices: expected 49 grid indices, got 3", [{"indices": [0, 0, 1]}]),
        (
            Invalid,
            r"results\[0\]\.repeats\[1\]\.counts: expected 2",
            [{"id": ids[2], "repeats": [{}, {"counts": [1], "window": 1}]}],
        ),
    ]
    for err, match, results in bad:
        with pytest.raises(err, match=match):
            m.tell(sid, TellRequest.model_validate({"results": results}))
        assert m.get(sid).status() == before
    # repeats and counts: every presentation is a query; a failed presentation counts but is never best
    st = m.tell(
        sid,
        TellRequest.model_validate(
            {"results": [{"id": ids[1], "repeats": [{"counts": [3, 0], "window": 0.5}, {"responses": None}]}]}
        ),
    )
    assert (st.answered, st.queries, st.failed) == (2, 3, 1)
    assert st.best is not None and st.best.response == 6.0 and st.best.stimulus_id == ids[1]
    m.close()


def test_all_channels_session_runs_the_stages_population_options(proj, tmp_path):
    """target_channel 'all' is the stage's population mode: its TT climbs from its best point (elite 1,
    options_for with `maximize.population`), its CMA-ES runs generations of 6; one target channel runs
    the plain options."""
    params, paths = proj
    m = SessionManager(params, paths, tmp_path / "opts", mlflow=False)
    for target, elite in (("all", 1), (0, params.maximize.tt.elite)):
        req = SessionCreate(
            generator="vqvae",
            method="tt",
            budget=16,
            channels=2,
            target_channel=target,
            noise_aware=False,
            prior=False,
        )
        s = m.get(m.create(req).id)
        assert s.cfg.options["elite"] == elite
        assert all(opt.elite == elite for opt in s.driver.optimizers)
    # CMA-ES there adopts the other channels' better points, in short generations
    req = SessionCreate(generator="sngan", method="cma", budget=16, channels=2, target_channel="all", noise_aware=False)
    s = m.get(m.create(req).id)
    assert s.cfg.options["popsize"] == POPULATION_CMA_POPSIZE and s.cfg.options["adopt"] is True
    assert all(opt.es.popsize == POPULATION_CMA_POPSIZE for opt in s.driver.optimizers)
    m.close()


def test_all_channels_session_tells_each_optimizer_its_channel(proj, tmp_path):
    """target_channel 'all': one optimizer per channel, each told exactly its column; replay equals unbroken."""
    params, paths = proj
    req = SessionCreate(generator="vqvae", method="tt", budget=48, seed=1, batch=8, channels=3, target_channel="all")
    m = SessionManager(params, paths, tmp_path / "pop", mlflow=False)
    sid = m.create(req).id
    drive(m, sid, [8, 8, 8], 3)
    s = m.get(sid)
    I, Y = np.stack(s.q_idx), np.stack(s.q_y)
    for j, opt in enumerate(s.driver.optimizers):
        assert opt.n_told == len(I)  # every presentation, whichever channel proposed it
        i_best, y_best = opt.best
        assert y_best == np.nanmax(Y[:, j]) and any((I[Y[:, j] == y_best] == i_best).all(axis=1))
    before = table(m, sid)
    m.close()
    again = SessionManager(params, paths, tmp_path / "pop", mlflow=False)
    assert table(again, sid) == before
    status = again.get(sid).status()
    assert [b.response for b in status.best_per_channel] == [float(np.nanmax(Y[:, j])) for j in range(3)]
    drive(again, sid, [8, 8, 8], 3)
    assert again.get(sid).status().state == "finished"
    again.close()
