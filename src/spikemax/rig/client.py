"""A small client for rigs written in Python: the HTTP API of the rig service behind methods."""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from typing import Any

import httpx

from spikemax import SpikemaxError


class RigHTTPError(SpikemaxError):
    """The service refused a request: `status` is the HTTP status, the message its `detail`."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


class RigClient:
    """Sessions, asks and tells over HTTP (one keep-alive connection; `with RigClient(...) as rig:`)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> RigClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self.http.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        resp = self.http.request(method, path, json=body)
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise RigHTTPError(resp.status_code, str(detail))
        if resp.headers.get("content-type", "").startswith("application/json"):
            return resp.json()
        return resp.content

    def health(self) -> dict:
        """GET /health."""
        return self._call("GET", "/health")

    def create(self, **fields: Any) -> dict:
        """POST /sessions (generator, method, budget, seed, batch, channels, target_channel, name,
        noise_aware, noise={repeats, retest, final, estimator, references, reference_set}, retry_failed, prior)."""
        return self._call("POST", "/sessions", fields)

    def sessions(self) -> list[dict]:
        """GET /sessions."""
        return self._call("GET", "/sessions")

    def status(self, session: str) -> dict:
        """GET /sessions/{id}."""
        return self._call("GET", f"/sessions/{session}")

    def ask(self, session: str, k: int | None = None, png: bool = True) -> list[dict]:
        """POST /sessions/{id}/ask: the stimuli (id, indices, png base64)."""
        body: dict[str, Any] = {"png": png}
        if k is not None:
            body["k"] = k
        return self._call("POST", f"/sessions/{session}/ask", body)["stimuli"]

    def tell(self, session: str, results: Sequence[dict]) -> dict:
        """POST /sessions/{id}/tell with result dicts ({"id", "responses"} or counts/window/repeats)."""
        return self._call("POST", f"/sessions/{session}/tell", {"results": list(results)})

    def tell_responses(self, session: str, ids: Sequence[str], responses: Sequence[Sequence[float | None]]) -> dict:
        """Tell m responses per stimulus id (None or NaN = a failed channel)."""
        clean = [
            [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in r] for r in responses
        ]
        return self.tell(session, [{"id": i, "responses": r} for i, r in zip(ids, clean)])

    def png(self, session: str, stimulus: str) -> bytes:
        """GET /sessions/{id}/stimuli/{sid}.png."""
        return self._call("GET", f"/sessions/{session}/stimuli/{stimulus}.png")


def decode_png(b64: str) -> bytes:
    """The PNG bytes of an ask's base64 `png` field."""
    return base64.b64decode(b64)
