"""What a lab's machine does to the rig's state: each a clear error or refusal, nothing silently lost."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest

from spikemax.rig.errors import JournalDamaged
from spikemax.rig.mirror import SESSION_TAG
from spikemax.rig.models import SessionCreate, TellRequest
from spikemax.rig.sessions import SessionManager
from tests.support.rig import as_results, make_project, neuron, serving

pytestmark = pytest.mark.usefixtures("own_store")
TOKEN = "tok"


@pytest.fixture(scope="module")
def proj(generator_checkpoints, tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("rigdamage"), generator_checkpoints)


def session_with_queries(m: SessionManager, tells: int = 3) -> str:
    sid = m.create(SessionCreate(generator="sngan", method="random", budget=64, seed=0, batch=8)).id
    for _ in range(tells):
        asked = m.ask(sid, 8)
        y = neuron(np.stack([i for _, i in asked]))
        m.tell(sid, TellRequest.model_validate({"results": as_results([x for x, _ in asked], y)}))
    return sid


def serve_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SPIKEMAX_TOKEN")}
    return subprocess.run(
        [sys.executable, "-m", "spikemax.cli", "serve", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_garbled_journal_is_one_clear_error_saying_what_is_readable(proj, tmp_path):
    params, paths = proj
    state = tmp_path / "s"
    m = SessionManager(params, paths, state, mlflow=False)
    session_with_queries(m, tells=40 // 8)
    m.close()
    db = state / "rig.db"
    good = db.read_bytes()
    assert len(good) > 4 * 4096  # several pages: the damage below hits data, not the header
    # garbled pages past the header: the schema reads, a table's pages do not
    db.write_bytes(good[: 2 * 4096] + b"\xa5" * (len(good) - 2 * 4096))
    with pytest.raises(JournalDamaged) as err:
        SessionManager(params, paths, state, mlflow=False)
    msg = str(err.value)
    assert msg.startswith(f"{db} ({len(good)} bytes) is damaged: ")
    assert "unreadable: " in msg and ".recover" in msg and "move it aside" in msg
    # truncated to half
    db.write_bytes(good[: len(good) // 2])
    with pytest.raises(JournalDamaged, match=r"is damaged: .*(readable|unreadable)"):
        SessionManager(params, paths, state, mlflow=False)
    # the header gone: nothing can be read, and it says so
    db.write_bytes(b"\0" * 100 + good[100:])
    with pytest.raises(JournalDamaged, match=r"not an SQLite database .* nothing in it can be read"):
        SessionManager(params, paths, state, mlflow=False)


def test_serve_on_a_damaged_journal_is_one_line_exit_2(proj, tmp_path):
    params, paths = proj
    state = tmp_path / "s"
    state.mkdir()
    (state / "rig.db").write_bytes(b"this is not a database" * 100)
    res = serve_cli(paths.root, "--port", "0", "--state", str(state))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("error: ") and "is damaged" in res.stderr and "Traceback" not in res.stderr


def test_port_out_of_range_is_one_line(proj):
    params, paths = proj
    res = serve_cli(paths.root, "--port", "99999")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr == "error: --port 99999 is not a TCP port (0..65535; 0 picks a free one)\n"


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_lost_journal_with_open_mlflow_sessions_is_reported(proj, tmp_path, how):
    """rig.db gone or empty while MLflow has the sessions open: refused, naming them; --forget-lost fails their runs."""
    params, paths = proj
    state = tmp_path / "s"
    m = SessionManager(params, paths, state)
    sids = [session_with_queries(m, 1) for _ in range(2)]
    m.close()  # their runs: KILLED, session_state=paused
    db = state / "rig.db"
    if how == "deleted":
        for p in state.glob("rig.db*"):
            p.unlink()
    else:
        db.write_bytes(b"")
    with pytest.raises(JournalDamaged) as err:
        SessionManager(params, paths, state)
    msg = str(err.value)
    assert f"{db} holds 0 sessions, but MLflow has 2 open sessions of this state directory" in msg
    assert all(sid in msg for sid in sids) and "--forget-lost" in msg
    m = SessionManager(params, paths, state, forget_lost=True)
    assert m.all() == []
    client = mlflow.MlflowClient(m.client.tracking_uri)
    for sid in sids:
        (run,) = client.search_runs([m.mirror.eid], f"tags.`{SESSION_TAG}` = '{sid}'")
        assert run.info.status == "FAILED" and run.data.tags["spikemax.session_state"].startswith("lost: ")
    m.close()
    SessionManager(params, paths, state).close()  # reported once: the next start is clean


def test_deleting_the_state_directory_while_serving_refuses_requests(proj, tmp_path):
    params, paths = proj
    state = tmp_path / "s"
    m = SessionManager(params, paths, state, mlflow=False)
    with serving(m, TOKEN) as url:
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        sid = c.post("/sessions", json={"generator": "sngan", "method": "random", "budget": 16, "seed": 0}).json()["id"]
        stimuli = c.post(f"/sessions/{sid}/ask", json={"k": 4, "png": False}).json()["stimuli"]
        backup = tmp_path / "backup"
        shutil.copytree(state, backup)
        shutil.rmtree(state)
        told = {"results": [{"id": x["id"], "responses": [1.0]} for x in stimuli]}
        for method, path, body in (
            ("POST", f"/sessions/{sid}/tell", told),
            ("POST", f"/sessions/{sid}/ask", {"k": 2}),
            ("POST", "/sessions", {"generator": "sngan"}),
            ("GET", f"/sessions/{sid}", None),
        ):
            r = c.request(method, path, json=body)
            assert r.status_code == 503, (path, r.text)
            assert "was deleted while the service was running" in r.json()["detail"]
            assert "Restore the state directory" in r.json()["detail"]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert not state.exists()  # nothing was written to a new file in its place either
        c.close()
    m.close()
    # restored: the session resumes with its pending stimuli, the refused tell was not applied
    shutil.rmtree(state, ignore_errors=True)
    shutil.copytree(backup, state)
    again = SessionManager(params, paths, state, mlflow=False)
    st = again.get(sid).status()
    assert (st.asked, st.answered, st.pending_ids) == (4, 0, [x["id"] for x in stimuli])
    again.close()


def test_infinite_rate_is_refused(proj, tmp_path):
    """2^53 spikes in 1e-300 s is no rate: 422 naming the field, nothing stored."""
    params, paths = proj
    m = SessionManager(params, paths, tmp_path / "s", mlflow=False)
    with serving(m, TOKEN) as url:
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        sid = c.post("/sessions", json={"generator": "sngan", "method": "random", "budget": 8}).json()["id"]
        (x,) = c.post(f"/sessions/{sid}/ask", json={"k": 1, "png": False}).json()["stimuli"]
        r = c.post(f"/sessions/{sid}/tell", json={"results": [{"id": x["id"], "counts": [2**53], "window": 1e-300}]})
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith("results[0]: counts[0] / window = 9007199254740992 / 1e-300 is not a")
        assert c.get(f"/sessions/{sid}").json()["queries"] == 0
        r = c.post(f"/sessions/{sid}/tell", json={"results": [{"id": x["id"], "counts": [2**53], "window": 1e-3}]})
        assert r.status_code == 200 and r.json()["best"]["response"] == pytest.approx(2**53 / 1e-3)
        c.close()
    m.close()


def test_schema_pages_need_the_token(proj, tmp_path):
    params, paths = proj
    m = SessionManager(params, paths, tmp_path / "s", mlflow=False)
    with serving(m, TOKEN) as url:
        assert httpx.get(f"{url}/health").status_code == 200  # the one open route
        for page in ("/docs", "/openapi.json"):
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = httpx.get(url + page, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (page, r.text)
            assert httpx.get(url + page, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
            assert httpx.get(f"{url}{page}?token=wrong").status_code == 401
        page = httpx.get(f"{url}/docs?token={TOKEN}")  # a browser: the token in the address
        assert page.status_code == 200 and f"/openapi.json?token={TOKEN}" in page.text
        assert "cdn." not in page.text and "/docs-assets/swagger-ui-bundle.js" in page.text
        assert httpx.get(f"{url}/openapi.json?token={TOKEN}").json()["info"]["title"] == "spikemax rig service"
    m.close()
