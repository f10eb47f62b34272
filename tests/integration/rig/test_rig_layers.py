"""The rig in layers: typed journal events, replay as a pure fold, concurrent sessions without a shared RNG lock."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from spikemax.rig.journal import Asked, Journal, Told
from spikemax.rig.models import SessionCreate, TellRequest
from spikemax.rig.replay import replay
from spikemax.rig.sessions import SessionManager
from tests.support.rig import as_results, make_project, neuron


@pytest.fixture(scope="module")
def proj(generator_checkpoints, tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("riglayers"), generator_checkpoints)


def step(m: SessionManager, sid: str, k: int = 8, channels: int = 1) -> None:
    """One ask of k and its tell."""
    asked = m.ask(sid, k)
    y = neuron(np.stack([i for _, i in asked]), channels)
    m.tell(sid, TellRequest.model_validate({"results": as_results([x for x, _ in asked], y)}))


def queries(m: SessionManager, sid: str) -> tuple[list, list]:
    s = m.get(sid)
    return [i.tolist() for i in s.q_idx], [np.nan_to_num(y, nan=-1e9).tolist() for y in s.q_y]


@pytest.mark.parametrize(("method", "generator"), [("cma", "sngan"), ("ngopt", "vqvae"), ("tt", "sngan")])
def test_sessions_stepping_concurrently_ask_what_each_asks_alone(proj, tmp_path, method, generator):
    """No global-RNG lock: every optimizer draws from its own generator, so threads cannot disturb each other."""
    params, paths = proj
    reqs = [SessionCreate(generator=generator, method=method, budget=48, seed=s, batch=8) for s in (0, 1)]
    both = SessionManager(params, paths, tmp_path / "both", mlflow=False)
    ids = [both.create(r).id for r in reqs]
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(sid: str) -> None:
        try:
            start.wait()
            for _ in range(6):
                step(both, sid)
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(sid,)) for sid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for r, sid in zip(reqs, ids):
        alone = SessionManager(params, paths, tmp_path / f"alone{r.seed}", mlflow=False)
        one = alone.create(r).id
        for _ in range(6):
            step(alone, one)
        assert queries(alone, one) == queries(both, sid)
        alone.close()
    assert queries(both, ids[0])[0] != queries(both, ids[1])[0]
    both.close()


def test_replay_is_a_fold_of_typed_events_equal_to_the_live_state(proj, tmp_path):
    """The journal holds typed events; folding them gives the live session's state (stimuli, queries, best)."""
    params, paths = proj
    m = SessionManager(params, paths, tmp_path / "s", mlflow=False)
    sid = m.create(SessionCreate(generator="vqvae", method="tt", budget=40, seed=2, batch=8, channels=2)).id
    for _ in range(3):
        step(m, sid, 8, 2)
    m.ask(sid, 5)  # pending at the end
    live = m.get(sid).state
    events = Journal(tmp_path / "s" / "rig.db").read(sid)
    assert [type(e) for e in events] == [Asked, Told] * 3 + [Asked]
    assert all(isinstance(e.k, int) for e in events if isinstance(e, Asked))
    folded = replay(live.cfg, events)
    assert (folded.seq, folded.n_asked, folded.n_tells, folded.pending) == (
        live.seq,
        live.n_asked,
        live.n_tells,
        live.pending,
    )
    assert [i.tolist() for i in folded.q_idx] == [i.tolist() for i in live.q_idx]
    assert np.array_equal(folded.responses(), live.responses(), equal_nan=True)
    assert np.array_equal(folded.best_y, live.best_y) and np.array_equal(folded.best_q, live.best_q)
    assert folded.q_sid == live.q_sid
    m.close()


def test_warnings_go_to_the_named_logger(proj, tmp_path, caplog, monkeypatch):
    """A session that cannot be resumed is reported on logging.getLogger('spikemax.rig'), not printed."""
    params, paths = proj
    m = SessionManager(params, paths, tmp_path / "s", mlflow=False)
    sid = m.create(SessionCreate(generator="sngan", method="random", budget=8, seed=0)).id
    step(m, sid, 4)
    m.close()
    from spikemax.generators import checkpoint_path

    with open(checkpoint_path("sngan", paths), "ab") as f:  # the project's own copy: another checkpoint now
        f.write(b"retrained")
    with caplog.at_level(logging.WARNING, logger="spikemax.rig"):
        again = SessionManager(params, paths, tmp_path / "s", mlflow=False)
    (rec,) = [r for r in caplog.records if r.name == "spikemax.rig"]
    assert f"rig session {sid} cannot be resumed: generator checkpoint sngan changed" in rec.getMessage()
    assert again.get(sid).status().state.startswith("broken: generator checkpoint sngan changed")
    again.close()


def test_a_journal_of_the_earlier_version_resumes(proj, tmp_path):
    """A session config without the fields added since (noise, retry_failed, prior) replays as it ran."""
    import json
    import sqlite3

    params, paths = proj
    m = SessionManager(params, paths, tmp_path / "s", mlflow=False)
    req = SessionCreate(generator="sngan", method="tt", budget=32, seed=1, batch=8, noise_aware=False)
    sid = m.create(req).id
    for _ in range(2):
        step(m, sid)
    pending = [x for x, _ in m.ask(sid, 4)]
    before = queries(m, sid)
    m.close()
    con = sqlite3.connect(tmp_path / "s" / "rig.db")
    (config,) = con.execute("SELECT config FROM sessions WHERE id=?", (sid,)).fetchone()
    old = {k: v for k, v in json.loads(config).items() if k not in ("noise", "retry_failed", "prior")}
    con.execute("UPDATE sessions SET config=? WHERE id=?", (json.dumps(old), sid))
    con.commit()
    con.close()
    again = SessionManager(params, paths, tmp_path / "s", mlflow=False)
    st = again.get(sid).status()
    assert queries(again, sid) == before and st.pending_ids == pending and st.state == "open"
    assert (st.noise_aware, st.retry_failed, st.prior) == (False, False, False)
    again.close()


def test_a_noise_aware_best_carries_its_interval(proj, tmp_path):
    """The session status shows the reported best's estimate inside its interval (NoisyOptimizer.recommend)."""
    params, paths = proj
    m = SessionManager(params, paths, tmp_path / "s", mlflow=False)
    sid = m.create(SessionCreate(generator="sngan", method="random", budget=64, seed=0, batch=8)).id
    rng = np.random.default_rng(0)
    for _ in range(8):  # a noisy neuron: the layer re-presents its elite, so the best gets repeats
        asked = m.ask(sid, 8)
        y = neuron(np.stack([i for _, i in asked])) + rng.normal(0.0, 0.5, (len(asked), 1))
        m.tell(sid, TellRequest.model_validate({"results": as_results([x for x, _ in asked], y)}))
    best = m.get(sid).status().best
    assert best is not None and best.estimate is not None and best.presentations >= 2
    assert best.low is not None and best.high is not None
    assert best.low <= best.estimate <= best.high and best.high > best.low
    m.close()
