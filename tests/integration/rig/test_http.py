"""The rig service over real HTTP (uvicorn on a loopback port, MLflow on a sqlite store)."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import mlflow
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from spikemax.am.loop import run_am
from spikemax.optim import make_optimizer, options_for
from spikemax.rig.app import bind, create_app
from spikemax.rig.sessions import CLOSED_LOOP_TAG, SessionManager
from tests.support.rig import as_results, make_project, neuron

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def service(generator_checkpoints, tmp_path_factory):
    """A real uvicorn server on a free loopback port; yields (url, manager, params, paths)."""
    params, paths = make_project(tmp_path_factory.mktemp("righttp"), generator_checkpoints)
    manager = SessionManager(params, paths, paths.results / "rig")
    sock = bind("127.0.0.1", 0)  # the listening socket `spikemax serve` uses
    server = uvicorn.Server(uvicorn.Config(create_app(manager, TOKEN), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", manager, params, paths
    server.should_exit = True
    thread.join(10)
    manager.close()
    sock.close()


@pytest.fixture
def http(service):
    with httpx.Client(base_url=service[0], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
        yield c


def test_http_session_equals_the_in_process_loop(service, http):
    """Same seed and responses: the HTTP session asks the same queries and reaches the same best as run_am."""
    _, manager, params, paths = service
    budget, batch = 48, 16
    r = http.post("/sessions", json={"generator": "sngan", "method": "tt", "budget": budget, "seed": 0, "channels": 1})
    assert r.status_code == 201, r.text
    body = r.json()
    sid = body["id"]
    assert body["batch"] == params.maximize.batch and body["options"]["ordinal"] == 1.0  # stage defaults, auto resolved
    grid = manager.grid("sngan")

    def respond(images: torch.Tensor) -> np.ndarray:  # the 'neuron' sees images: mean normalized brightness
        return images.reshape(len(images), -1).mean(dim=1).double().numpy()

    while True:
        r = http.post(f"/sessions/{sid}/ask", json={"k": batch})
        if r.status_code == 409:
            assert "is finished: all 48 stimuli were answered" in r.json()["detail"]
            break
        stimuli = r.json()["stimuli"]
        assert len({s["id"] for s in stimuli}) == len(stimuli)
        png = Image.open(io.BytesIO(base64.b64decode(stimuli[0]["png"])))
        assert png.size == tuple(grid.shape[1:])[::-1]
        y = respond(grid.decode(np.asarray([s["indices"] for s in stimuli])))
        status = http.post(
            f"/sessions/{sid}/tell", json={"results": as_results([s["id"] for s in stimuli], y[:, None])}
        )
        assert status.status_code == 200, status.text
    status = http.get(f"/sessions/{sid}").json()
    assert (status["asked"], status["answered"], status["pending"], status["state"]) == (budget, budget, 0, "finished")

    # the stage's optimizer for this run: the session's budget, noise-aware (the rig's default)
    mp = params.maximize
    m = mp.model_copy(update={"budget": budget, "noise": mp.noise.model_copy(update={"aware": True})})
    opt = make_optimizer("tt", grid.d, grid.n, seed=0, batch=mp.batch, **options_for("tt", m, grid))
    ref = run_am(opt, grid, respond, budget, batch)
    s = manager.get(sid)
    assert np.array_equal(np.stack(s.q_idx), ref.indices)
    assert np.allclose(np.asarray(s.q_y)[:, 0], ref.responses)
    assert status["best"]["indices"] == ref.best_indices.tolist()
    assert status["best"]["response"] == pytest.approx(ref.best_response)

    client = mlflow.MlflowClient(manager.client.tracking_uri)
    run = client.get_run(status["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[CLOSED_LOOP_TAG] == "true"
    history = client.get_metric_history(run.info.run_id, "activation")
    assert sorted(m.step for m in history) == list(range(budget))
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"best_stimulus.png", "convergence.png", "queries.parquet"} <= names


def test_token_guards_every_route_but_health(service):
    url = service[0]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = httpx.get(f"{url}/sessions", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        r = httpx.post(f"{url}/sessions", json={}, headers=headers)
        assert r.status_code == 401


@pytest.fixture
def open_session(http):
    sid = http.post(
        "/sessions", json={"generator": "vqvae", "method": "tt", "budget": 12, "seed": 1, "channels": 2}
    ).json()["id"]
    stimuli = http.post(f"/sessions/{sid}/ask", json={"k": 4}).json()["stimuli"]
    ids = [s["id"] for s in stimuli]
    http.post(f"/sessions/{sid}/tell", json={"results": [{"id": ids[0], "responses": [1.0, 0.5]}]})
    return sid, ids


D = 49  # the VQ-VAE grid of the tiny generator: 7 x 7 positions


@pytest.mark.parametrize(
    ("route", "body", "code", "message"),
    [
        (
            "tell",
            {"results": [{"id": "ID0", "responses": [1, 2]}]},
            409,
            r"results\[0\]\.id: stimulus '.*-0' was already answered",
        ),
        ("tell", {"results": [{"id": "nope", "responses": [1, 2]}]}, 404, r"results\[0\]\.id: unknown stimulus 'nope'"),
        ("tell", {"results": [{"id": "ID1", "responses": [1]}]}, 422, r"results\[0\]\.responses: expected 2 values"),
        (
            "tell",
            {"results": [{"id": "ID1", "responses": [1, "NaN"]}]},
            422,
            r"results\[0\]\.responses\[1\]: Input should be a number",
        ),
        (
            "tell",
            b'{"results": [{"id": "ID1", "responses": [NaN, 1]}]}',
            422,
            r"results\[0\]\.responses\[0\]: Input should be a finite",
        ),
        (
            "tell",
            b'{"results": [{"id": "ID1", "responses": [1e999, 1]}]}',
            422,
            r"results\[0\]\.responses\[0\]: Input should be a finite",
        ),
        (
            "tell",
            {"results": [{"id": "ID1", "responses": [True, 1]}]},
            422,
            r"results\[0\]\.responses\[0\]: Input should be a number",
        ),
        (
            "tell",
            {"results": [{"id": "ID1", "counts": [-1, 2], "window": 0.2}]},
            422,
            r"results\[0\]\.counts\[0\]: .*greater than or equal to 0",
        ),
        ("tell", {"results": [{"id": "ID1", "counts": [1, 2]}]}, 422, r"results\[0\]: .*counts need their window"),
        (
            "tell",
            {"results": [{"indices": [1.0] * D, "responses": [1, 2]}]},
            422,
            r"results\[0\]\.indices\[0\]: Input should be a valid integer",
        ),
        (
            "tell",
            {"results": [{"indices": [True] * D, "responses": [1, 2]}]},
            422,
            r"results\[0\]\.indices\[0\]: Input should be a valid integer",
        ),
        (
            "tell",
            {"results": [{"indices": [2**70] * D, "responses": [1, 2]}]},
            422,
            r"results\[0\]\.indices\[0\]: 1180591620717411303424 is outside",
        ),
        (
            "tell",
            {"results": [{"indices": [-1] * D, "responses": [1, 2]}]},
            422,
            r"results\[0\]\.indices\[0\]: -1 is outside the grid",
        ),
        (
            "tell",
            b'{"results": [{"indices": [' + b"9" * 5000 + b'], "responses": [1, 2]}]}',
            422,
            r"body: not valid JSON, or a number",
        ),
        (
            "tell",
            b'{"results": [{"indices": [1e999], "responses": [1, 2]}]}',
            422,
            r"results\[0\]\.indices\[0\]: Input should be a valid integer",
        ),
        (
            "tell",
            {"results": [{"id": "ID1", "responses": [1, 2], "extra": 1}]},
            422,
            r"results\[0\]\.extra: Extra inputs",
        ),
        ("tell", {"results": []}, 422, r"results: List should have at least 1 item"),
        ("tell", b"{not json", 422, r"body: not valid JSON"),
        ("ask", {"k": 0}, 422, r"k: Input should be greater than or equal to 1"),
        ("ask", {"k": 2.0}, 422, r"k: Input should be a valid integer"),
        ("ask", {"k": 2**64}, 422, r"k: Input should be less than or equal to 4096"),
        ("render", {"indices": [[40] * D]}, 422, r"indices\[0\]\[0\]: 40 is outside the grid"),
    ],
)
def test_each_bad_request_is_refused_and_changes_nothing(http, open_session, route, body, code, message):
    import re

    sid, ids = open_session
    before = http.get(f"/sessions/{sid}").json()
    if isinstance(body, dict):
        raw = httpx.Request("POST", "/", json=body).content.decode()
        for j, x in enumerate(ids):
            raw = raw.replace(f'"ID{j}"', f'"{x}"')
        body = raw.encode()
    r = http.post(f"/sessions/{sid}/{route}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == code, r.text
    assert re.search(message, r.json()["detail"]), r.json()["detail"]
    assert http.get(f"/sessions/{sid}").json() == before


def test_unknown_session_and_bad_create(http):
    assert http.get("/sessions/nope").status_code == 404
    assert http.post("/sessions/nope/ask", json={"k": 1}).status_code == 404
    r = http.post("/sessions", json={"generator": "gan"})
    assert r.status_code == 422 and r.json()["detail"].startswith("generator: Input should be 'sngan' or 'vqvae'")
    r = http.post("/sessions", json={"channels": 2, "target_channel": 2})
    assert r.status_code == 422 and "target_channel 2 is not one of the 2 channels" in r.json()["detail"]
    r = http.post("/sessions", json={"budget": 1.5})
    assert r.status_code == 422 and r.json()["detail"].startswith("budget: Input should be a valid integer")


def test_two_sessions_stay_isolated(http):
    a = http.post("/sessions", json={"generator": "vqvae", "method": "random", "budget": 8, "seed": 5}).json()["id"]
    b = http.post("/sessions", json={"generator": "vqvae", "method": "random", "budget": 8, "seed": 5}).json()["id"]
    sa = http.post(f"/sessions/{a}/ask", json={"k": 4}).json()["stimuli"]
    sb = http.post(f"/sessions/{b}/ask", json={"k": 4}).json()["stimuli"]
    assert [s["indices"] for s in sa] == [s["indices"] for s in sb]  # same seed, own optimizer each
    assert not {s["id"] for s in sa} & {s["id"] for s in sb}
    r = http.post(f"/sessions/{b}/tell", json={"results": [{"id": sa[0]["id"], "responses": [1.0]}]})
    assert r.status_code == 404  # a stimulus of session a is unknown to b
    y = neuron(np.asarray([s["indices"] for s in sa]))
    http.post(f"/sessions/{a}/tell", json={"results": as_results([s["id"] for s in sa], y)})
    assert http.get(f"/sessions/{a}").json()["answered"] == 4
    assert http.get(f"/sessions/{b}").json()["answered"] == 0
    png = http.get(f"/sessions/{b}/stimuli/{sb[1]['id']}.png")
    assert png.headers["content-type"] == "image/png"
    assert png.content == base64.b64decode(sb[1]["png"])
    assert {s["id"] for s in http.get("/sessions").json()} >= {a, b}


def test_keep_alive_replies_are_not_held_back_by_nagle():
    """The listening socket says it is TCP with TCP_NODELAY (else every keep-alive reply waited for a delayed ACK)."""
    import socket as sk

    from spikemax.rig.app import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == sk.IPPROTO_TCP  # asyncio sets TCP_NODELAY on accepted sockets only for these
        assert sock.getsockopt(sk.IPPROTO_TCP, sk.TCP_NODELAY) == 1
    finally:
        sock.close()
