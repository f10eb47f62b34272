"""The rig runs the default: `auto` resolved as the stage does, the VQ-VAE prior, noise-aware sessions, retries."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from spikemax import params as P
from spikemax.am.policy import METHOD_AUTO
from spikemax.optim.noisy import NoisyOptimizer
from spikemax.rig.journal import Asked, Journal
from spikemax.rig.models import SessionCreate, TellRequest
from spikemax.rig.sessions import SessionManager
from tests.support.rig import http_service, make_project

pytestmark = pytest.mark.usefixtures("own_store")
TOKEN = "tok"


@pytest.fixture(scope="module")
def proj(generator_checkpoints, tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("rigdefault"), generator_checkpoints)


@pytest.fixture(scope="module")
def service(proj, tmp_path_factory):
    """The rig over real HTTP with MLflow on the project's sqlite store; yields (client, manager)."""
    with http_service(*proj, tmp_path_factory.mktemp("rigstate"), TOKEN) as served:
        yield served


def test_auto_is_accepted_and_resolved_as_the_stage_does(service):
    c, manager = service
    for generator, ordered in (("sngan", True), ("vqvae", False)):
        r = c.post("/sessions", json={"generator": generator, "method": "auto", "budget": 16})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["method"] == "auto" and body["resolved_method"] == METHOD_AUTO[ordered]
        assert body["options"]["resolved"] == METHOD_AUTO[ordered]
        assert c.post(f"/sessions/{body['id']}/ask", json={"k": 4}).status_code == 200
    r = c.post("/sessions", json={"generator": "sngan", "budget": 16})  # left out: maximize.methods[0]
    assert r.json()["method"] == manager.params.maximize.methods[0]


def test_noise_aware_by_default_and_recorded_in_mlflow(service):
    c, manager = service
    mp = manager.params.maximize
    body = c.post("/sessions", json={"generator": "sngan", "method": "tt", "budget": 32}).json()
    assert body["noise_aware"] is True and body["options"]["noise_aware"] is True
    s = manager.get(body["id"])
    assert isinstance(s.driver.optimizer, NoisyOptimizer)
    want = {"repeats": mp.noise.repeats, "retest": mp.noise.retest, "final": mp.noise.final}
    refs = {"references": mp.noise.references, "reference_set": mp.noise.reference_set}
    assert body["noise"] == {**want, "estimator": mp.noise.estimator, **refs}
    run = mlflow.MlflowClient(manager.client.tracking_uri).get_run(body["run_id"])
    assert run.data.params["noise_aware"] == "True"
    assert {k: run.data.params[f"noise.{k}"] for k in want} == {k: str(v) for k, v in want.items()}

    own = {"repeats": 2, "retest": 0.1, "final": 0.25, "estimator": "mean"}
    body = c.post("/sessions", json={"generator": "sngan", "method": "cma", "budget": 32, "noise": own}).json()
    opt = manager.get(body["id"]).driver.optimizer
    assert (opt.retest, opt.final, opt.estimator, opt.budget) == (0.1, 0.25, "mean", 32)
    params = mlflow.MlflowClient(manager.client.tracking_uri).get_run(body["run_id"]).data.params
    assert {k: params[f"noise.{k}"] for k in own} == {k: str(v) for k, v in own.items()}
    asked = c.post(f"/sessions/{body['id']}/ask", json={"k": 2}).json()
    assert asked["repeats"] == 2
    r = c.post(f"/sessions/{body['id']}/tell", json={"results": [{"id": asked["stimuli"][0]["id"], "responses": [1]}]})
    assert r.status_code == 422 and r.json()["detail"].startswith(
        "results[0].repeats: the session asks for 2 presentations of each stimulus (noise.repeats), got 1"
    )

    off = c.post("/sessions", json={"generator": "sngan", "method": "tt", "budget": 32, "noise_aware": False}).json()
    assert off["noise_aware"] is False and "noise_aware" not in off["options"]
    assert not isinstance(manager.get(off["id"]).driver.optimizer, NoisyOptimizer)
    run = mlflow.MlflowClient(manager.client.tracking_uri).get_run(off["run_id"])
    assert run.data.params["noise_aware"] == "False"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"noise": {"retest": 1.0}}, r"noise\.retest: Input should be less than 1"),
        ({"noise": {"final": -0.1}}, r"noise\.final: Input should be greater than or equal to 0"),
        ({"noise": {"repeats": 0}}, r"noise\.repeats: Input should be greater than or equal to 1"),
        ({"noise": {"repeats": 1.5}}, r"noise\.repeats: Input should be a valid integer"),
        ({"noise": {"estimator": "max"}}, r"noise\.estimator: Input should be 'mean', 'shrink' or 'lcb'"),
        ({"noise": {"retest": "0.1"}}, r"noise\.retest: Input should be a number"),
        ({"noise": {"sigma": 1}}, r"noise\.sigma: Extra inputs are not permitted"),
        ({"noise_aware": "no"}, r"noise_aware: Input should be a valid boolean"),
        ({"retry_failed": 1}, r"retry_failed: Input should be a valid boolean"),
    ],
)
def test_bad_noise_options_are_422_naming_the_field(service, body, message):
    c, manager = service
    before = len(manager.all())
    r = c.post("/sessions", json={"generator": "sngan", **body})
    assert r.status_code == 422 and re.match(message, r.json()["detail"]), r.text
    assert len(manager.all()) == before


def tell(m: SessionManager, sid: str, results: list[dict]) -> None:
    m.tell(sid, TellRequest.model_validate({"results": results}))


def test_retry_failed_reasks_a_failed_presentation_exactly_once(proj, tmp_path):
    params, paths = proj
    m = SessionManager(params, paths, tmp_path / "s", mlflow=False)
    req = SessionCreate(generator="sngan", method="random", budget=8, seed=0, batch=4, retry_failed=True)
    sid = m.create(req).id
    first = m.ask(sid, 4)
    failed_id, failed_idx = first[0]
    tell(m, sid, [{"id": failed_id, "responses": None}] + [{"id": x, "responses": [1.0]} for x, _ in first[1:]])
    assert m.get(sid).status().retries_waiting == 1
    second = m.ask(sid, 4)
    again = [(x, i) for x, i in second if m.get(sid).stimuli[x].retry_of == failed_id]
    assert len(again) == 1 and np.array_equal(again[0][1], failed_idx)  # the same stimulus, a new id
    assert len(second) == 4 and m.get(sid).state.n_new == 7  # the re-showing is extra to the budget
    # the re-showing fails too: it is not shown a third time
    tell(m, sid, [{"id": x, "responses": None if x == again[0][0] else [2.0]} for x, _ in second])
    third = m.ask(sid, 4)
    assert len(third) == 1 and all(m.get(sid).stimuli[x].retry_of is None for x, _ in third)
    tell(m, sid, [{"id": third[0][0], "responses": [0.5]}])
    st = m.get(sid).status()
    assert (st.state, st.asked, st.answered, st.retried, st.retries_waiting) == ("finished", 9, 9, 1, 0)
    # recorded in the journal: the ask that showed it again names the failed stimulus
    asks = [e for e in Journal(tmp_path / "s" / "rig.db").read(sid) if isinstance(e, Asked)]
    assert [[x.retry_of for x in e.stimuli if x.retry_of] for e in asks] == [[], [failed_id], []]
    m.close()
    again_m = SessionManager(params, paths, tmp_path / "s", mlflow=False)  # replayed: the same session
    assert again_m.get(sid).status() == st
    again_m.close()
    # without retry_failed (the default) a failed presentation is never shown again
    plain = SessionManager(params, paths, tmp_path / "p", mlflow=False)
    pid = plain.create(req.model_copy(update={"retry_failed": False})).id
    asked = plain.ask(pid, 4)
    tell(plain, pid, [{"id": x, "responses": None} for x, _ in asked])
    assert all(plain.get(pid).stimuli[x].retry_of is None for x, _ in plain.ask(pid, 4))
    plain.close()


@pytest.mark.slow  # runs the maximize stage on the tiny project (about a minute on a shared machine)
def test_vqvae_session_first_ask_equals_the_stage_first_ask(project, snn_checkpoints, generator_checkpoints, tmp_path):
    """Same seed, the default method and the stage's data prior: the session's first stimuli are the stage's."""
    from spikemax.querylog import read_queries
    from spikemax.stages.maximize import run as run_stage

    base, base_paths = project
    root = tmp_path / "p"
    (root / "data").mkdir(parents=True)
    (root / "data" / "prepared").symlink_to(base_paths.prepared)
    (root / "models").symlink_to(base_paths.root / "models")
    maximize = {
        "checkpoints": [-1],
        "generators": ["vqvae"],
        "targets": ["class:0"],
        "units_per_layer": 0,
        "methods": ["auto"],
        "seeds": [3],
        "budget": 16,
        "batch": 8,
    }
    (root / "params.yaml").write_text(yaml.safe_dump({"prepare": base.prepare.model_dump(), "maximize": maximize}))
    params, paths = P.load(root / "params.yaml", root=root)
    run_stage(params, paths)
    (run_dir,) = [p for p in Path(paths.results / "am" / "runs").iterdir() if p.is_dir()]
    stage_first = np.stack(read_queries(run_dir)["indices"].to_numpy()[:8])

    m = SessionManager(params, paths, tmp_path / "state", mlflow=False)
    s = m.create(SessionCreate(generator="vqvae", seed=3))  # method, budget, batch: the params' defaults
    assert s.cfg.prior and s.cfg.options["resolved"] == "tt" and s.cfg.noise["aware"]
    rig_first = np.stack([i for _, i in m.ask(s.id, None)])
    assert np.array_equal(rig_first, stage_first)
    uniform = m.create(SessionCreate(generator="vqvae", seed=3, prior=False))
    assert not np.array_equal(np.stack([i for _, i in m.ask(uniform.id, None)]), stage_first)  # the prior matters
    m.close()
