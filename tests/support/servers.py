"""Real servers on loopback ports for the scaling tests: PostgreSQL, `mlflow server`, a local Ray cluster.

Each is started by a fixture in a temp dir and stopped (and removed) after use; a test that needs
one is skipped only when the software is missing (CI installs PostgreSQL; ray and psycopg2 are in
the dev extra).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_USER = "spikemax-pg"  # initdb refuses root: the server runs as this unprivileged user


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until 127.0.0.1:port accepts connections (fail if `proc` exits first)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class Postgres:
    """A running PostgreSQL server on 127.0.0.1:port (superuser `spikemax`, trust auth)."""

    port: int

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg2://spikemax@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        """A fresh empty database; returns its SQLAlchemy URL."""
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=self.port, user="spikemax", dbname="postgres")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
            cur.execute(f'CREATE DATABASE "{name}"')
        con.close()
        return self.url(name)


def _as_user(cmd: list[str], user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """PostgreSQL from the Debian package, initdb'd in a temp dir and run as an unprivileged user."""
    pg = _pg_bin()
    if pg is None:
        pytest.skip("PostgreSQL binaries not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg2")
    user = None
    if os.geteuid() == 0:
        user = PG_USER
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user], check=True
            )
    home = Path(tempfile.mkdtemp(prefix="spikemax-pg-"))
    if user:
        shutil.chown(home, user)
    data, port = home / "data", free_port()
    subprocess.run(
        _as_user(
            [str(pg / "initdb"), "-D", str(data), "-U", "spikemax", "--auth=trust", "-E", "UTF8", "--no-sync"], user
        ),
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run(
        _as_user([str(pg / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(home / "log"), "-w", "start"], user),
        check=True,
        capture_output=True,
    )
    try:
        yield Postgres(port)
    finally:
        subprocess.run(
            _as_user([str(pg / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], user), capture_output=True
        )
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class MlflowServer:
    """A running `mlflow server` on 127.0.0.1:port."""

    uri: str
    artifacts: Path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """A real `mlflow server` subprocess on a free loopback port (sqlite backend, local artifact root)."""
    home = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    artifacts = home / "artifacts"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination", str(artifacts), "--serve-artifacts",
    ]  # fmt: skip
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_port(port, 90, proc)
        yield MlflowServer(f"http://127.0.0.1:{port}", artifacts)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def ray_local() -> Iterator[str]:
    """A local Ray cluster with 2 worker CPUs (no dashboard); yields its address."""
    ray = pytest.importorskip("ray")
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ctx.address_info["address"]
    finally:
        ray.shutdown()
