"""Shared pieces of the rig tests: a temp project with tiny generators, a deterministic 'neuron'."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from spikemax import params as P

REPO = Path(__file__).resolve().parents[2]


def make_project(root: Path, checkpoints: dict[str, Path]) -> tuple[P.Params, P.Paths]:
    """A project dir with the repo's default params.yaml, the tiny test generators and their project's
    prepared data (linked: the VQ-VAE data prior is fitted to its train images)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    gen = root / "models" / "generators"
    gen.mkdir(parents=True, exist_ok=True)
    for name, path in checkpoints.items():
        shutil.copy(path, gen / f"{name}.ckpt")
    prepared = Path(next(iter(checkpoints.values()))).resolve().parents[2] / "data" / "prepared"
    if prepared.is_dir():
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / "prepared").symlink_to(prepared)
    return P.load(root / "params.yaml", root=root)


def neuron(indices: np.ndarray, channels: int = 1) -> np.ndarray:
    """A deterministic m-channel 'neuron' of grid points (k, d) -> (k, m): a peak per channel, some failures."""
    idx = np.asarray(indices, dtype=np.float64)
    peaks = (np.arange(channels)[:, None] * 3 + np.arange(idx.shape[1])[None, :]) % 7
    y = -((idx[:, None, :] - peaks[None]) ** 2).mean(axis=2)
    y[(idx.sum(axis=1) % 11) == 0, 0] = np.nan  # a failed presentation now and then
    return y


def as_results(ids: list[str], y: np.ndarray) -> list[dict]:
    """Tell results for ids and responses (k, m) (NaN -> null: a failed channel)."""
    return [{"id": i, "responses": [None if np.isnan(v) else float(v) for v in row]} for i, row in zip(ids, y)]


@contextlib.contextmanager
def serving(manager: Any, token: str | None) -> Iterator[str]:
    """A real uvicorn server of `manager` on a free loopback port (the socket `spikemax serve` binds); yields its URL."""
    import uvicorn

    from spikemax.rig.app import bind, create_app

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(manager, token), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextlib.contextmanager
def http_service(params: P.Params, paths: P.Paths, state_dir: Path, token: str) -> Iterator[tuple[Any, Any]]:
    """A SessionManager on the project's store served over real HTTP; yields (httpx client with the token, manager)."""
    import httpx

    from spikemax.rig.sessions import SessionManager

    manager = SessionManager(params, paths, state_dir)
    try:
        with (
            serving(manager, token) as url,
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client,
        ):
            yield client, manager
    finally:
        manager.close()
