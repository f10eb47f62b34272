"""Closed loop for external responders (a living neuron's rig): ask/tell over HTTP with JSON.

Endpoints: `GET /status`, `POST /ask {"k": 8}` -> indices and PNG images (base64, pixel space),
`POST /tell {"indices": [[...]], "responses": [...]}` (NaN or null = failed presentation),
`GET /best`. Every told batch is logged before the reply, like the in-silico loop.
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib import request as urlrequest

import numpy as np
import torch

from spikemax import SpikemaxError
from spikemax.images import png_base64


class ClosedLoop:
    """An optimizer and a generator behind thread-safe ask/tell, with a query budget and a logger."""

    def __init__(self, optimizer: Any, grid: Any, budget: int, logger: Any | None = None) -> None:
        if budget < 1:
            raise SpikemaxError(f"budget must be >= 1 (got {budget})")
        self.optimizer, self.grid, self.budget, self.logger = optimizer, grid, budget, logger
        self.lock = threading.Lock()
        self.n_asked = 0
        self.n_told = 0

    def ask(self, k: int) -> dict:
        """Up to k new stimuli (fewer when the budget is nearly spent): indices and PNG images."""
        with self.lock:
            left = self.budget - self.n_asked
            if not isinstance(k, int) or k < 1:
                raise SpikemaxError(f"k must be a positive integer (got {k!r})")
            if left <= 0:
                raise SpikemaxError(f"budget of {self.budget} queries is spent")
            indices = np.asarray(self.optimizer.ask(min(k, left)))
            self.n_asked += len(indices)
        with torch.no_grad():
            images = self.grid.denormalize(self.grid.decode(torch.as_tensor(indices)))
        return {"indices": indices.tolist(), "images_png": [png_base64(im) for im in images]}

    def tell(self, indices: Any, responses: Any) -> dict:
        """Record measured responses (any indices, not only asked ones; None/NaN = failed)."""
        idx = np.asarray(indices, dtype=np.int64)
        y = np.array([np.nan if v is None else float(v) for v in np.ravel(responses)], dtype=np.float64)
        if idx.ndim != 2 or idx.shape[1] != self.grid.d or len(idx) != len(y):
            raise SpikemaxError(
                f"tell needs indices of shape (k, {self.grid.d}) and k responses (got {tuple(idx.shape)} and {len(y)})"
            )
        self.grid.check_indices(idx)
        with self.lock:
            self.optimizer.tell(idx, y)
            if self.logger is not None:
                self.logger.log(idx, y)
            self.n_told += len(y)
            return self.status()

    def status(self) -> dict:
        """Budget, queries asked and told, and the best response so far."""
        i_best, y_best = self.optimizer.best
        best = None if i_best is None or not math.isfinite(float(y_best)) else float(y_best)
        return {
            "budget": self.budget,
            "asked": self.n_asked,
            "told": self.n_told,
            "d": self.grid.d,
            "n": self.grid.n,
            "best_response": best,
        }

    def best(self) -> dict:
        """The best stimulus so far: indices, response and PNG image."""
        i_best, y_best = self.optimizer.best
        if i_best is None:
            raise SpikemaxError("no response has been told yet")
        with torch.no_grad():
            image = self.grid.denormalize(self.grid.decode(torch.as_tensor(np.asarray(i_best)[None])))[0]
        return {"indices": np.asarray(i_best).tolist(), "response": float(y_best), "image_png": png_base64(image)}


def make_handler(loop: ClosedLoop) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to one closed loop."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: the logger records queries
            pass

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            size = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(size) or b"{}")
            except json.JSONDecodeError as err:
                raise SpikemaxError(f"request body is not JSON: {err.msg}") from None
            if not isinstance(body, dict):
                raise SpikemaxError("request body must be a JSON object")
            return body

        def _route(self, method: str) -> None:
            try:
                if method == "GET" and self.path == "/status":
                    return self._reply(200, loop.status())
                if method == "GET" and self.path == "/best":
                    return self._reply(200, loop.best())
                if method == "POST" and self.path == "/ask":
                    return self._reply(200, loop.ask(self._body().get("k", 1)))
                if method == "POST" and self.path == "/tell":
                    body = self._body()
                    return self._reply(200, loop.tell(body.get("indices"), body.get("responses")))
                self._reply(
                    404,
                    {"error": f"no route {method} {self.path}; routes: GET /status, GET /best, POST /ask, POST /tell"},
                )
            except (SpikemaxError, ValueError, TypeError) as err:
                self._reply(400, {"error": str(err)})

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

    return Handler


def make_server(loop: ClosedLoop, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """An HTTP server for `loop` (port 0 picks a free port: see `server.server_address`)."""
    return ThreadingHTTPServer((host, port), make_handler(loop))


class Client:
    """The rig's side: ask for stimuli, tell measured responses."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout

    def _call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urlrequest.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urlrequest.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urlrequest.HTTPError as err:
            raise SpikemaxError(json.loads(err.read()).get("error", str(err))) from None

    def status(self) -> dict:
        return self._call("/status")

    def ask(self, k: int) -> dict:
        return self._call("/ask", {"k": k})

    def tell(self, indices: list, responses: list) -> dict:
        return self._call(
            "/tell",
            {
                "indices": indices,
                "responses": [None if r is None or (isinstance(r, float) and math.isnan(r)) else r for r in responses],
            },
        )

    def best(self) -> dict:
        return self._call("/best")


def serve(
    params: Any,
    paths: Any,
    host: str = "127.0.0.1",
    port: int = 8765,
    generator: str | None = None,
    method: str | None = None,
) -> None:
    """`spikemax serve`: the maximize section's first generator and method (or the ones named)."""
    import time

    import mlflow

    from spikemax import tracking
    from spikemax.generators import load_generator
    from spikemax.optim import make_optimizer, options_for
    from spikemax.querylog import QueryLogger

    mp = params.maximize
    generator = generator or mp.generators[0]
    method = method or mp.methods[0]
    grid = load_generator(generator, paths.generators_dir / f"{generator}.ckpt")
    options = {"batch": mp.batch, **options_for(method, mp, grid)}
    try:
        opt = make_optimizer(method, grid.d, grid.n, seed=mp.seeds[0], **options)
    except ValueError as err:
        raise SpikemaxError(str(err)) from None
    uri = tracking.configure(paths.root)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(
        tracking.experiment_id(tracking.AM_EXPERIMENT, paths.root),
        tags={"spikemax.source": "server", "mlflow.runName": f"serve-{generator}-{method}"},
    )
    for key, value in {
        "method": method,
        "generator": generator,
        "budget": mp.budget,
        "grid_n": grid.n,
        "d": grid.d,
    }.items():
        client.log_param(run.info.run_id, key, value)
    run_dir = paths.results / "serve" / time.strftime("%Y%m%d-%H%M%S")
    logger = QueryLogger(client, run.info.run_id, run_dir)
    loop = ClosedLoop(opt, grid, mp.budget, logger)
    server = make_server(loop, host, port)
    print(
        f"serving {generator} x {method} (d={grid.d}, n={grid.n}, budget {mp.budget}) on "
        f"http://{host}:{server.server_address[1]}  (MLflow run {run.info.run_id}); Ctrl-C stops"
    )
    status = "FINISHED"
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        logger.close()
        client.set_terminated(run.info.run_id, status)
