"""Reference stimuli in rig sessions: flagged in every ask, counted, replayed, and correcting the search for drift."""

from __future__ import annotations

import json
import re

import mlflow
import numpy as np
import pytest
import torch

from spikemax.data import Prepared
from spikemax.neurons import reference_points
from spikemax.optim.drift import DriftCorrected, DriftingGain
from spikemax.querytable import read_queries
from spikemax.rig.models import SessionCreate, TellRequest
from spikemax.rig.sessions import SessionManager
from tests.support.rig import http_service, make_project

pytestmark = pytest.mark.usefixtures("own_store")
TOKEN = "tok"


@pytest.fixture(scope="module")
def proj(generator_checkpoints, tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("rigrefs"), generator_checkpoints)


@pytest.fixture(scope="module")
def service(proj, tmp_path_factory):
    """The rig over real HTTP with MLflow on the project's sqlite store; yields (client, manager)."""
    with http_service(*proj, tmp_path_factory.mktemp("rigstate"), TOKEN) as served:
        yield served


def rate(indices: np.ndarray, n: int) -> np.ndarray:
    """A positive, deterministic 'neuron' of grid points (k, d) -> (k,): one peak, a floor of 0.2."""
    x = np.asarray(indices, dtype=np.float64) / max(n - 1, 1)
    peak = (np.arange(x.shape[1]) % 3) / 2.0
    return 0.2 + np.exp(-8.0 * ((x - peak) ** 2).mean(axis=1))


def results(stimuli: list[dict] | list[tuple[str, np.ndarray]], y: np.ndarray) -> list[dict]:
    """Tell results of one channel (NaN -> a failed presentation)."""
    ids = [x["id"] if isinstance(x, dict) else x[0] for x in stimuli]
    return [{"id": i, "responses": None if np.isnan(v) else [float(v)]} for i, v in zip(ids, y)]


def test_references_are_flagged_fixed_and_counted_in_the_budget(service, tmp_path):
    c, manager = service
    noise = {"references": 2, "reference_set": 2}
    body = c.post(
        "/sessions", json={"generator": "sngan", "method": "random", "budget": 24, "batch": 6, "noise": noise}
    ).json()
    sid, n = body["id"], body["n"]
    assert body["noise"]["references"] == 2 and body["noise"]["reference_set"] == 2 and body["gain"] is None
    grid = manager.grid("sngan")
    stage_set = reference_points(grid, torch.zeros(0), 2)  # the stage's set for the grid (fixed latents on SN-GAN)
    seen, lefts, gains = [], [], []
    while True:
        r = c.post(f"/sessions/{sid}/ask", json={"png": False})
        if r.status_code == 409:
            break
        asked = r.json()
        refs = [x for x in asked["stimuli"] if x["reference"]]
        assert len(asked["stimuli"]) == 6 and len(refs) == 2
        seen.append(sorted(map(tuple, (x["indices"] for x in refs))))
        lefts.append(asked["left"])
        idx = np.asarray([x["indices"] for x in asked["stimuli"]])
        status = c.post(f"/sessions/{sid}/tell", json={"results": results(asked["stimuli"], rate(idx, n))}).json()
        gains.append(status["gain"])
    # the same fixed set in every ask, the stage's, and the references spent the budget: 4 asks of 6
    assert len(seen) == 4 and all(s == seen[0] for s in seen)
    assert seen[0] == sorted(map(tuple, stage_set.tolist()))
    assert lefts == [18, 12, 6, 0] and status["state"] == "finished" and status["queries"] == 24
    assert all(g is not None and g > 0 for g in gains)
    # the best is a searched stimulus, never a reference
    s = manager.get(sid)
    ref_ids = {x for x, st in s.stimuli.items() if st.reference is not None}
    assert len(ref_ids) == 8 and status["best"]["stimulus_id"] not in ref_ids
    listed = c.get(f"/sessions/{sid}/stimuli", params={"pending": False}).json()
    assert {x["id"] for x in listed if x["reference"]} == ref_ids
    # the query table marks the reference rows
    table = read_queries(s.write_queries(tmp_path).parent)
    assert table["reference"].tolist() == [x in ref_ids for x in table["stimulus"]]
    client = mlflow.MlflowClient(manager.client.tracking_uri)
    params = client.get_run(body["run_id"]).data.params
    assert (params["noise.references"], params["noise.reference_set"]) == ("2", "2")
    logged = client.get_metric_history(body["run_id"], "reference_gain")
    assert [(m.step, m.value) for m in logged] == [(6 * (j + 1), g) for j, g in enumerate(gains)]

    plain = c.post("/sessions", json={"generator": "sngan", "method": "random", "budget": 8}).json()
    assert plain["noise"]["references"] == manager.params.maximize.noise.references == 0
    asked = c.post(f"/sessions/{plain['id']}/ask", json={"k": 4, "png": False}).json()
    assert not any(x["reference"] for x in asked["stimuli"]) and plain["gain"] is None


@pytest.mark.parametrize(
    ("noise", "message"),
    [
        ({"references": -1}, r"noise\.references: Input should be greater than or equal to 0"),
        ({"references": 1.5}, r"noise\.references: Input should be a valid integer"),
        ({"references": "2"}, r"noise\.references: Input should be a valid integer"),
        ({"references": True}, r"noise\.references: Input should be a valid integer"),
        ({"reference_set": 0}, r"noise\.reference_set: Input should be greater than or equal to 1"),
    ],
)
def test_bad_references_are_422_naming_the_field(service, noise, message):
    c, manager = service
    before = len(manager.all())
    r = c.post("/sessions", json={"generator": "sngan", "noise": noise})
    assert r.status_code == 422 and re.match(message, r.json()["detail"]), r.text
    assert len(manager.all()) == before


def test_population_mode_refuses_references(service):
    c, _ = service
    r = c.post(
        "/sessions", json={"generator": "sngan", "channels": 2, "target_channel": "all", "noise": {"references": 1}}
    )
    assert r.status_code == 422 and r.json()["detail"].startswith("noise.references: "), r.text


def test_vqvae_references_are_the_stages_test_images_through_the_encoder(proj, generator_checkpoints, tmp_path):
    params, paths = proj
    m = SessionManager(params, paths, tmp_path / "s", mlflow=False)
    req = SessionCreate.model_validate(
        {"generator": "vqvae", "method": "random", "budget": 8, "noise": {"references": 2, "reference_set": 3}}
    )
    s = m.create(req)
    want = reference_points(m.grid("vqvae"), Prepared.load(paths.prepared).tensors("test")[0], 3)
    assert np.array_equal(np.asarray(s.cfg.reference_points), want)
    assert isinstance(s.driver.optimizer, DriftCorrected)
    m.close()
    # without prepared data there are no test images to encode: a clear error naming the field
    bare_params, bare_paths = make_project(tmp_path / "bare", generator_checkpoints)
    (bare_paths.root / "data" / "prepared").unlink()
    bare = SessionManager(bare_params, bare_paths, tmp_path / "b", mlflow=False)
    with pytest.raises(Exception, match=r"^noise\.references: the vqvae reference stimuli are prepared test images"):
        bare.create(req)
    assert bare.all() == []
    bare.close()


@pytest.mark.parametrize("aware", [True, False])
def test_the_best_is_never_a_reference_even_where_references_respond_most(proj, tmp_path, aware):
    params, paths = proj
    m = SessionManager(params, paths, tmp_path / "s", mlflow=False)
    req = SessionCreate.model_validate(
        {"generator": "sngan", "method": "random", "budget": 30, "batch": 6, "noise_aware": aware}
        | {"noise": {"references": 2, "reference_set": 3}}
    )
    s = m.create(req)
    while s.state.left > 0:
        asked = m.ask(s.id, None)
        y = np.asarray([100.0 if s.stimuli[x].reference is not None else 1.0 + j for j, (x, _) in enumerate(asked)])
        m.tell(s.id, TellRequest.model_validate({"results": results(asked, y)}))
    st = s.status()
    refs = {tuple(p) for p in s.cfg.reference_points}
    assert st.state == "finished" and max(np.max(q) for q in s.q_y) == 100.0
    for best in (st.best, st.best_draw, *st.best_per_channel):
        assert best is not None and tuple(best.indices) not in refs and best.response < 100.0
    m.close()


def test_a_failed_reference_is_shown_again_as_that_reference_and_the_file_protocol_flags_it(proj, tmp_path):
    from spikemax.rig.files import write_block

    params, paths = proj
    m = SessionManager(params, paths, tmp_path / "s", mlflow=False)
    req = SessionCreate.model_validate(
        {"generator": "sngan", "method": "random", "budget": 12, "batch": 6, "retry_failed": True}
        | {"noise": {"references": 2, "reference_set": 4}}
    )
    s = m.create(req)
    first = m.ask(s.id, None)
    block = json.loads((write_block(tmp_path / "rig", s, 0) / "manifest.json").read_text())
    flagged = [x["id"] for x in block["stimuli"] if x.get("reference")]
    assert flagged == [x for x, _ in first if s.stimuli[x].reference is not None] and len(flagged) == 2
    failed = flagged[0]
    m.tell(
        s.id,
        TellRequest.model_validate({"results": results(first, np.where([x == failed for x, _ in first], np.nan, 1.0))}),
    )
    again = [x for x, _ in m.ask(s.id, None) if s.stimuli[x].retry_of == failed]
    assert len(again) == 1 and s.stimuli[again[0]].reference == s.stimuli[failed].reference
    m.close()


def _play(m: SessionManager, sid: str, n: int, asks: int, log: list) -> None:
    """Answer `asks` asks: each told in two parts in reverse order (a rig's tells need not follow its asks)."""
    for _ in range(asks):
        asked = m.ask(sid, None)
        log.append([i.tolist() for _, i in asked])
        y = rate(np.stack([i for _, i in asked]), n) * (1.0 - 0.01 * len(log))  # a slowly falling gain
        res = results(asked, y)[::-1]
        half = len(res) // 2
        for part in (res[:half], res[half:]):
            m.tell(sid, TellRequest.model_validate({"results": part}))


def test_a_restarted_session_with_references_continues_identically(proj, tmp_path):
    params, paths = proj
    req = SessionCreate.model_validate(
        {"generator": "sngan", "method": "tt", "budget": 60, "batch": 6, "seed": 4, "noise": {"references": 2}}
    )
    whole = SessionManager(params, paths, tmp_path / "whole", mlflow=False)
    a = whole.create(req)
    n = int(a.grid.n)
    asks_a: list = []
    _play(whole, a.id, n, 10, asks_a)

    first = SessionManager(params, paths, tmp_path / "restarted", mlflow=False)
    b = first.create(req)
    asks_b: list = []
    _play(first, b.id, n, 4, asks_b)
    before = first.get(b.id).status()
    first.close()
    again = SessionManager(params, paths, tmp_path / "restarted", mlflow=False)
    assert again.get(b.id).status() == before  # replayed: counts, best and gain as they were
    assert before.gain is not None and before.queries == 24
    _play(again, b.id, n, 6, asks_b)
    assert asks_b == asks_a  # the asks after the restart are those of the session that never stopped
    sa, sb = whole.get(a.id).status(), again.get(b.id).status()
    assert (sb.queries, sb.state, sb.gain, sb.best.indices) == (sa.queries, sa.state, sa.gain, sa.best.indices)
    assert sb.queries == 60  # nothing lost, nothing counted twice
    whole.close()
    again.close()


def test_the_gain_estimate_follows_a_drifting_neuron(service):
    """A simulated client whose neuron's gain falls over the session: the session's gain estimate falls too."""
    c, _ = service
    budget, batch = 240, 12
    drift = DriftingGain(trend=-0.5, walk=0.05, horizon=budget, seed=1)
    rng = np.random.default_rng(2)
    body = c.post(
        "/sessions",
        json={
            "generator": "sngan",
            "method": "tt",
            "budget": budget,
            "batch": batch,
            "seed": 1,
            "noise": {"references": 3, "reference_set": 6},
        },
    ).json()
    sid, n = body["id"], body["n"]
    shown, true_gain, estimated = 0, [], []
    status = body
    while status["left"] > 0:
        asked = c.post(f"/sessions/{sid}/ask", json={"png": False}).json()["stimuli"]
        idx = np.asarray([x["indices"] for x in asked])
        g = drift(shown + np.arange(len(asked)))
        shown += len(asked)
        y = rate(idx, n) * g * np.maximum(0.0, 1.0 + 0.05 * rng.standard_normal(len(asked)))
        status = c.post(f"/sessions/{sid}/tell", json={"results": results(asked, y)}).json()
        true_gain.append(float(g.mean()))
        estimated.append(status["gain"])
    third = len(estimated) // 3
    assert status["state"] == "finished" and None not in estimated
    assert np.mean(true_gain[-third:]) < np.mean(true_gain[:third])  # the neuron did fade
    assert np.mean(estimated[-third:]) < np.mean(estimated[:third])  # and the session saw it fade
    assert estimated[-1] < 1.0  # relative to its first references
