"""The rig's /docs renders offline: headless Chromium with every non-loopback request blocked."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from spikemax.rig.sessions import SessionManager
from tests.support.rig import make_project, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "tok"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package `chromium`)")
def test_docs_render_the_operations_with_the_network_off(generator_checkpoints, tmp_path):
    params, paths = make_project(tmp_path / "proj", generator_checkpoints)
    manager = SessionManager(params, paths, tmp_path / "state", mlflow=False)
    try:
        with serving(manager, TOKEN) as url:
            assert CHROMIUM is not None
            cmd = [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                # the network off: anything not on loopback goes to a dead proxy, and no name resolves
                "--proxy-server=127.0.0.1:9",
                "--proxy-bypass-list=127.0.0.1",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=15000",  # let Swagger UI fetch the schema and render
                "--dump-dom",
                f"{url}/docs?token={TOKEN}",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        manager.close()
    dom = proc.stdout
    assert 'class="swagger-ui"' in dom, proc.stderr[-2000:]
    # every operation of the API is listed (Swagger UI's ids: operations-<tag>-<operationId>)
    for op in (
        "operations-health-get_health_health_get",
        "operations-sessions-create_session_sessions_post",
        "operations-stimuli-ask_sessions__session_id__ask_post",
        "operations-stimuli-tell_sessions__session_id__tell_post",
    ):
        assert op in dom, op
