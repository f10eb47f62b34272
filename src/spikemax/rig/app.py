"""The rig service over HTTP: FastAPI routers for health, sessions and stimuli; `serve` runs it on uvicorn.

Every route but `GET /health` needs `Authorization: Bearer <token>` when the service has a token,
the schema pages `/docs` and `/openapi.json` too (a browser may give it as `/docs?token=...`).
`/docs` is Swagger UI from files shipped in a Python package (fastapi-offline), so it renders
offline. Errors are JSON `{"detail": "<field>: <message>"}`; this module alone maps the rig's
domain errors to statuses: 401 without a valid token, 404 unknown session or stimulus, 409 a
stimulus already answered or a spent budget, 422 a malformed body or one that does not fit the
session, 503 a journal that can no longer be written (its state directory was deleted).
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import logging
import secrets
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response, status
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from spikemax import SpikemaxError
from spikemax.rig.errors import Conflict, Invalid, NotFound, RigError, Unavailable
from spikemax.rig.models import (
    AskRequest,
    AskResponse,
    Health,
    RenderRequest,
    SessionCreate,
    SessionStatus,
    Stimulus,
    TellRequest,
)
from spikemax.rig.sessions import SessionManager

_bearer = HTTPBearer(auto_error=False)  # module level: FastAPI resolves the annotations from the globals
_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's 400 for JSON that json.loads refuses
ASSETS = "/docs-assets"  # Swagger UI's JavaScript, CSS and icon (library files: no token needed)

# The one place domain errors become HTTP statuses (most specific class first).
STATUS = ((NotFound, 404), (Conflict, 409), (Invalid, 422), (Unavailable, 503), (RigError, 400))


def http_status(err: RigError) -> int:
    """The HTTP status of a rig error."""
    return next(code for cls, code in STATUS if isinstance(err, cls))


def swagger_assets() -> Path:
    """The folder of Swagger UI's files shipped by the fastapi-offline package."""
    return Path(str(importlib.resources.files("fastapi_offline") / "static"))


def error_text(loc: tuple | list, msg: str) -> str:
    """`results[0].responses[1]: msg` from a pydantic location (the leading 'body' dropped)."""
    parts = [p for p in loc if p != "body"] if loc and loc[0] == "body" else list(loc)
    path = ""
    for p in parts:
        path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else str(p))
    return f"{path or 'body'}: {msg}"


def pngs(grid: Any, indices: np.ndarray) -> list[bytes]:
    """PNG bytes of grid points (k, d), in [0, 1] pixel space at the generator's resolution."""
    from spikemax.images import png_bytes

    return [png_bytes(im) for im in grid.decode_pixels(np.asarray(indices, dtype=np.int64))]


def create_app(manager: SessionManager, token: str | None = None) -> FastAPI:
    """The FastAPI app of one SessionManager; `token` guards every route but /health."""
    import base64

    app = FastAPI(
        title="spikemax rig service",
        description="Closed-loop activation maximization of a living neuron: sessions, stimuli, tells.",
        version="1",
        docs_url=None,  # served below: behind the token, from local files
        redoc_url=None,
        openapi_url=None,
    )
    app.mount(ASSETS, StaticFiles(directory=swagger_assets()), name="docs-assets")

    def check_token(given: str | None) -> None:
        if token is None:
            return
        if given is None:
            raise HTTPException(401, "Authorization: Bearer <token> is required", {"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "the bearer token is wrong", {"WWW-Authenticate": "Bearer"})

    def authorized(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        check_token(creds.credentials if creds is not None and creds.scheme.lower() == "bearer" else None)
        manager.journal.check()  # a journal that lost its file refuses every request (503)

    def page_authorized(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        given: Annotated[str | None, Query(alias="token")] = None,
    ) -> str | None:
        """The schema pages: the bearer header, or `?token=` from a browser (handed on to the schema fetch)."""
        check_token(creds.credentials if creds is not None and creds.scheme.lower() == "bearer" else given)
        return given

    @app.exception_handler(RigError)
    async def _rig_error(request: Request, err: RigError) -> JSONResponse:
        return JSONResponse({"detail": " ".join(str(err).split())}, status_code=http_status(err))

    @app.exception_handler(SpikemaxError)
    async def _spikemax_error(request: Request, err: SpikemaxError) -> JSONResponse:
        return JSONResponse({"detail": " ".join(str(err).split())}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        first = errors[0]
        msg = first["msg"]
        if first.get("type") == "json_invalid":
            msg = f"not valid JSON ({first.get('ctx', {}).get('error', msg)})"
            return JSONResponse({"detail": f"body: {msg}"}, status_code=422)
        # `detail` is the first error (one clear message); `errors` lists the first ten.
        listed = [error_text(e["loc"], e["msg"]) for e in errors]
        return JSONResponse({"detail": listed[0], "errors": listed[:10]}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 400 and err.detail == _PARSE_ERROR:
            # json.loads refused the body (e.g. an integer of thousands of digits): a 422, not a dropped reply.
            return JSONResponse({"detail": "body: not valid JSON, or a number in it does not fit"}, status_code=422)
        return JSONResponse({"detail": err.detail}, status_code=err.status_code, headers=err.headers)

    health = APIRouter(tags=["health"])

    @health.get("/health", responses={503: {"model": Health}})
    def get_health() -> Any:
        """Liveness; needs no token. 503 when the journal can no longer be written."""
        try:
            manager.journal.check()
        except Unavailable as err:
            body = Health(status="unavailable", sessions=len(manager.all()), detail=" ".join(str(err).split()))
            return JSONResponse(body.model_dump(), status_code=503)
        return Health(status="ok", sessions=len(manager.all()))

    @app.get("/openapi.json", include_in_schema=False)
    # Dependencies as default values: a closure in a string annotation would not resolve from the globals.
    def openapi(_: str | None = Depends(page_authorized)) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    def docs(given: str | None = Depends(page_authorized)) -> HTMLResponse:
        from urllib.parse import quote

        return get_swagger_ui_html(
            openapi_url="/openapi.json" + (f"?token={quote(given, safe='')}" if given else ""),
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
        )

    sessions = APIRouter(prefix="/sessions", tags=["sessions"], dependencies=[Depends(authorized)])

    @sessions.post("", status_code=status.HTTP_201_CREATED)
    def create_session(req: SessionCreate) -> SessionStatus:
        """Create a session; fields left out take the maximize stage's defaults."""
        return manager.create(req).status()

    @sessions.get("")
    def list_sessions() -> list[SessionStatus]:
        """Every session, oldest first."""
        return [s.status() for s in manager.all()]

    @sessions.get("/{session_id}")
    def get_session(session_id: str) -> SessionStatus:
        """A session's status: asked, answered, pending, best."""
        return manager.get(session_id).status()

    stimuli = APIRouter(prefix="/sessions/{session_id}", tags=["stimuli"], dependencies=[Depends(authorized)])

    @stimuli.post("/ask")
    def ask(session_id: str, req: AskRequest | None = None) -> AskResponse:
        """k new stimuli, each with a unique id, its grid indices and a base64 PNG."""
        req = req or AskRequest.model_validate({})
        asked = manager.ask(session_id, req.k)
        s = manager.get(session_id)
        encoded: list[str | None] = [None] * len(asked)
        if req.png and asked:
            encoded = [base64.b64encode(b).decode("ascii") for b in pngs(s.grid, np.stack([i for _, i in asked]))]
        return AskResponse(
            stimuli=[
                Stimulus(
                    id=sid,
                    indices=i.tolist(),
                    png=p,
                    retry_of=s.stimuli[sid].retry_of,
                    reference=s.stimuli[sid].reference is not None,
                )
                for (sid, i), p in zip(asked, encoded)
            ],
            left=s.state.left,
            repeats=s.cfg.repeats,
        )

    @stimuli.post("/tell")
    def tell(session_id: str, req: TellRequest) -> SessionStatus:
        """Responses by stimulus id, all applied or none; replies with the session status."""
        return manager.tell(session_id, req)

    @stimuli.get("/stimuli")
    def list_stimuli(session_id: str, pending: bool = True) -> list[Stimulus]:
        """The session's stimuli not answered yet (pending=false: every asked stimulus), ids and indices."""
        s = manager.get(session_id)
        return [
            Stimulus(id=sid, indices=st.indices.tolist(), retry_of=st.retry_of, reference=st.reference is not None)
            for sid, st in list(s.stimuli.items())
            if not (pending and st.answered)
        ]

    @stimuli.get("/stimuli/{stimulus_id}.png", response_class=Response)
    def stimulus_png(session_id: str, stimulus_id: str) -> Response:
        """One asked stimulus as a PNG file."""
        s = manager.get(session_id)
        stim = s.stimuli.get(stimulus_id)
        if stim is None:
            raise NotFound(f"stimulus {stimulus_id!r} not found in session {session_id}")
        return Response(pngs(s.grid, stim.indices[None])[0], media_type="image/png")

    @stimuli.post("/render")
    def render(session_id: str, req: RenderRequest) -> list[str]:
        """Base64 PNGs of grid points the rig chose (nothing is asked or counted)."""
        s = manager.get(session_id)
        for r, row in enumerate(req.indices):
            if len(row) != s.grid.d:
                raise Invalid(f"indices[{r}]: expected {s.grid.d} grid indices, got {len(row)}")
            for j, v in enumerate(row):
                if not 0 <= v < s.grid.n:
                    raise Invalid(f"indices[{r}][{j}]: {v} is outside the grid (0..{s.grid.n - 1})")
        return [base64.b64encode(b).decode("ascii") for b in pngs(s.grid, np.asarray(req.indices))]

    app.include_router(health)
    app.include_router(sessions)
    app.include_router(stimuli)
    return app


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line SpikemaxError (port in use or out of range, bad address)."""
    if not 0 <= port <= 65535:
        raise SpikemaxError(f"--port {port} is not a TCP port (0..65535; 0 picks a free one)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not create_server's 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets
    # that say they are TCP; with Nagle on, every keep-alive reply waited ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets on Linux
        sock.bind((host, port))
        sock.listen(128)
        return sock
    except (OSError, OverflowError) as err:
        sock.close()
        why = getattr(err, "strerror", None) or err
        raise SpikemaxError(f"cannot listen on {host}:{port}: {why}") from None


def serve(
    params: Any,
    paths: Any,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    state_dir: str | Path | None = None,
    forget_lost: bool = False,
) -> None:
    """`spikemax serve`: bind first (so a taken port touches no MLflow run), restore sessions, serve."""
    import uvicorn

    if not token and not is_loopback(host):
        raise SpikemaxError(f"refusing to listen on non-loopback {host} without a token (--token or SPIKEMAX_TOKEN)")
    sock = bind(host, port)
    manager = None
    try:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # the rig's warnings on stderr
        manager = SessionManager(params, paths, state_dir or paths.results / "rig", forget_lost=forget_lost)
        app = create_app(manager, token or None)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        where = f"http://{host}:{sock.getsockname()[1]}"
        print(
            f"rig service on {where} ({len(manager.all())} sessions restored from {manager.store.path}); "
            f"API docs {where}/docs; Ctrl-C stops",
            flush=True,
        )
        server.run(sockets=[sock])
    finally:
        if manager is not None:
            manager.close()
        sock.close()
        sys.stdout.flush()
