"""`spikemax serve` as a subprocess with the repo's default params: SIGKILL mid-session, port in use, bind rules."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest

from spikemax.rig.sessions import SESSION_TAG
from tests.support.rig import as_results, make_project, neuron

TOKEN = "t0ken"


def start(root: Path, port: int = 0, *extra: str, token: str | None = TOKEN) -> tuple[subprocess.Popen, str]:
    """Start `spikemax serve` in `root` and return it with its URL (read from its first line)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if token:
        env["SPIKEMAX_TOKEN"] = token
    proc = subprocess.Popen(
        [sys.executable, "-m", "spikemax.cli", "serve", "--port", str(port), *extra],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("rig service on http://"), line + proc.stderr.read()
    url = line.split()[3]
    for _ in range(200):  # the socket is bound before the line is printed; wait for the app
        try:
            httpx.get(f"{url}/health", timeout=1)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("server did not answer")


def test_serve_with_default_params_answers_ask_and_tell(generator_checkpoints, tmp_path):
    """The README's `spikemax serve` on the repo's params.yaml: one session, one ask, one tell, over HTTP."""
    params, paths = make_project(tmp_path / "proj", generator_checkpoints)
    proc, url = start(paths.root)
    try:
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        made = c.post("/sessions", json={"generator": "sngan", "method": "tt"})
        assert made.status_code == 201, made.text
        sid = made.json()["id"]
        assert made.json()["budget"] == params.maximize.budget  # unspecified fields: the stage's values
        stimuli = c.post(f"/sessions/{sid}/ask", json={"k": 2}).json()["stimuli"]
        assert len(stimuli) == 2 and all(len(x["indices"]) == 16 and x["png"] for x in stimuli)
        told = c.post(f"/sessions/{sid}/tell", json={"results": [{"id": stimuli[0]["id"], "responses": [0.25]}]})
        assert told.status_code == 200, told.text
        st = c.get(f"/sessions/{sid}").json()
        assert (st["asked"], st["answered"], st["pending"]) == (2, 1, 1)
        assert st["best"]["response"] == 0.25 and st["best"]["indices"] == stimuli[0]["indices"]
        assert httpx.get(f"{url}/sessions").status_code == 401  # the token guards every route but /health
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow  # three server starts (about 5 s each on a quiet machine)
@pytest.mark.parametrize("noise", [{}, {"references": 2, "reference_set": 3}], ids=["plain", "references"])
def test_sigkill_mid_session_loses_and_doubles_nothing(generator_checkpoints, tmp_path, noise):
    """Killed at random moments (mid-request too), restarted: the session ends exactly like one never killed
    (with reference stimuli too: the drift-corrected optimizer is rebuilt and replayed the same)."""
    params, paths = make_project(tmp_path / "proj", generator_checkpoints)
    rng = random.Random(0)
    budget, k = 64, 8
    proc, url = start(paths.root)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    c = httpx.Client(base_url=url, headers=headers, timeout=30)
    create = {"generator": "sngan", "method": "tt", "budget": budget, "seed": 2, "noise": noise}
    sid = c.post("/sessions", json=create).json()["id"]
    kills = 0
    answered: dict[str, list] = {}
    while True:
        try:
            st = c.get(f"/sessions/{sid}").json()
            if st["answered"] == budget:
                break
            stimuli = c.post(f"/sessions/{sid}/ask", json={"k": k, "png": False}).json()["stimuli"]
            if kills < 2 and rng.random() < 0.5:
                # SIGKILL while a tell is in flight (or just before it)
                def kill(victim: subprocess.Popen = proc, delay: float = rng.random() * 0.02) -> None:
                    time.sleep(delay)
                    victim.send_signal(signal.SIGKILL)

                threading.Thread(target=kill).start()
                kills += 1
            ids = [s["id"] for s in stimuli]
            y = neuron(np.asarray([s["indices"] for s in stimuli]))
            r = c.post(f"/sessions/{sid}/tell", json={"results": as_results(ids, y)})
            assert r.status_code == 200, r.text
            answered.update(dict.fromkeys(ids))
        except httpx.TransportError:
            proc.wait(10)
            c.close()
            proc, url = start(paths.root)
            c = httpx.Client(base_url=url, headers=headers, timeout=30)
            # pending stimuli survived the kill (unless the killed server had stored their tell): tell them
            pending = c.get(f"/sessions/{sid}/stimuli").json()
            assert [s["id"] for s in pending] == c.get(f"/sessions/{sid}").json()["pending_ids"]
            if pending:
                ids = [s["id"] for s in pending]
                assert c.get(f"/sessions/{sid}/stimuli/{ids[0]}.png").status_code == 200
                y = neuron(np.asarray([s["indices"] for s in pending]))
                r = c.post(f"/sessions/{sid}/tell", json={"results": as_results(ids, y)})
                assert r.status_code == 200, r.text
    assert kills == 2
    final = c.get(f"/sessions/{sid}").json()
    assert (final["asked"], final["answered"], final["pending"], final["queries"]) == (budget, budget, 0, budget)
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    # the same session never killed, in process
    from spikemax.rig.models import SessionCreate, TellRequest
    from spikemax.rig.sessions import SessionManager

    ref = SessionManager(params, paths, tmp_path / "ref", mlflow=False)
    rid = ref.create(SessionCreate.model_validate(create)).id
    while ref.get(rid).n_asked < budget:
        asked = ref.ask(rid, k)
        ref.tell(
            rid,
            TellRequest.model_validate(
                {"results": as_results([x for x, _ in asked], neuron(np.stack([i for _, i in asked])))}
            ),
        )
    killed = SessionManager(params, paths, paths.results / "rig", mlflow=False)
    a, b = killed.get(sid), ref.get(rid)
    assert np.array_equal(np.stack(a.q_idx), np.stack(b.q_idx))
    assert np.array_equal(np.asarray(a.q_y), np.asarray(b.q_y), equal_nan=True)
    assert a.status().best == b.status().best.model_copy(update={"stimulus_id": a.status().best.stimulus_id})
    assert a.status().gain == b.status().gain and (a.status().gain is None) == (not noise)
    assert a.state.q_ref == b.state.q_ref and sum(r >= 0 for r in a.state.q_ref) == (16 if noise else 0)
    # MLflow got every query exactly once
    client = mlflow.MlflowClient(f"sqlite:///{paths.root / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("activation-maximization").experiment_id], f"tags.`{SESSION_TAG}` = '{sid}'"
    )
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "activation"))
    assert steps == list(range(budget)) and run.info.status == "FINISHED"
    killed.close()
    ref.close()


def test_port_in_use_is_one_line_and_exit_2_with_no_run(generator_checkpoints, tmp_path):
    params, paths = make_project(tmp_path / "proj", generator_checkpoints)
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SPIKEMAX_TOKEN")}
    res = subprocess.run(
        [sys.executable, "-m", "spikemax.cli", "serve", "--port", str(port)],
        cwd=paths.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    taken.close()
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: Address already in use")
    assert not (paths.root / "mlruns").exists()  # no store touched, so no run left RUNNING
    res = subprocess.run(
        [sys.executable, "-m", "spikemax.cli", "serve", "--host", "0.0.0.0"],
        cwd=paths.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "refusing to listen on non-loopback 0.0.0.0 without a token" in res.stderr
