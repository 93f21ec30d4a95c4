"""The API's ASGI app: one per process, built from the farm (create_app), served by uvicorn (serve).

Every route but /healthz and /readyz (a status only, for probes) needs a caller: a bearer token,
or the gallery's session cookie (`caller`). Errors are JSON with a `detail`: 401 without a valid
token, 404 for an unknown batch, 413 for a body over SDFARM_API_MAX_BODY_BYTES, 422 for invalid input
(a batch's problems listed as the CLI lists them, nothing enqueued), 429 past a token's concurrent
requests, 503 while Redis or S3 cannot be reached.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from sdfarm.errors import BatchInvalid, InvalidInput, UnknownBatch, is_transient, printable

from ..farm import Farm
from .auth import SESSION_COOKIE, Auth, TooManyRequests, parse_tokens

log = logging.getLogger("sdfarm.api")


def farm_of(request: Request) -> Farm:
    farm: Farm = request.app.state.farm
    return farm


SAFE_METHODS = frozenset({"GET", "HEAD"})


def identify(request: Request) -> str:
    """The calling token's name: a bearer token; or, for a request that changes nothing (GET, HEAD),
    the gallery's session cookie too. A cookie rides along with any request a browser sends, even one
    a page of another port or subdomain made it send, so it never authorises a change here (the
    gallery's own forms check their origin and a form token)."""
    auth: Auth = request.app.state.auth
    name = auth.bearer(request.headers.get("authorization"))
    if name is None and request.method in SAFE_METHODS:
        name = auth.session_name(request.cookies.get(SESSION_COOKIE))
    if name is None:
        raise HTTPException(401, "a valid token is required: Authorization: Bearer TOKEN",
                            headers={"WWW-Authenticate": "Bearer"})
    return name


def caller(request: Request) -> Iterator[str]:
    """The calling token's name, holding one of its concurrent-request slots for the request."""
    name = identify(request)
    with request.app.state.auth.slot(name):
        yield name


Caller = Depends(caller)
# for the requests that must get through while the token's slots are taken by its own long waits
# (A1111's /progress and /interrupt): authenticated, not counted
Identified = Depends(identify)


def problems_json(e: BatchInvalid) -> list[dict[str, Any]]:
    return [{"source": p.source, "line": p.line, "item": p.item, "field": p.field, "message": p.message}
            for p in e.problems]


def create_app(farm: Farm) -> FastAPI:
    from . import a1111, gallery, native  # the routers

    settings = farm.settings
    tokens = parse_tokens(settings.api_tokens.get_secret_value() if settings.api_tokens else "")
    app = FastAPI(title="sdfarm", summary="Distributed batch rendering for Stable Diffusion",
                  max_body_size=settings.api_max_body_bytes, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.farm = farm
    key = settings.api_session_key
    app.state.auth = (Auth(tokens, settings.api_max_concurrent, key.get_secret_value().encode()) if key
                      else Auth(tokens, settings.api_max_concurrent))
    origins = [o.strip() for o in settings.api_cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    _errors(app)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is up (no token needed)."""
        return {"status": "ok"}

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Caller])
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/docs", include_in_schema=False, dependencies=[Caller])
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="sdfarm API")

    @app.get("/readyz", tags=["health"])
    def readyz(request: Request) -> JSONResponse:
        """Redis and S3 answer: 200, else 503 (no token needed, for probes); with a token, which one
        failed and why."""
        checks = {"redis": _check(farm.board.ping), "s3": _check(lambda: farm.store.exists("healthcheck"))}
        ok = all(v == "ok" for v in checks.values())
        auth: Auth = request.app.state.auth
        shown = checks if auth.bearer(request.headers.get("authorization")) else {}
        return JSONResponse({"status": "ok" if ok else "unavailable", **shown}, status_code=200 if ok else 503)

    app.include_router(native.router)
    app.include_router(a1111.router)
    app.include_router(gallery.router)
    return app


def _check(probe: Any) -> str:
    try:
        probe()
    except Exception as e:
        return f"unreachable: {type(e).__name__}"
    return "ok"


def _errors(app: FastAPI) -> None:
    @app.exception_handler(BatchInvalid)
    def batch_invalid(_: Request, e: BatchInvalid) -> JSONResponse:
        head = str(e).split("\n", 1)[0]
        return JSONResponse({"detail": head, "problems": problems_json(e), "stopped": e.stopped}, status_code=422)

    @app.exception_handler(UnknownBatch)
    def unknown_batch(_: Request, e: UnknownBatch) -> JSONResponse:
        return JSONResponse({"detail": printable(str(e))}, status_code=404)

    @app.exception_handler(InvalidInput)
    def invalid(_: Request, e: InvalidInput) -> JSONResponse:
        return JSONResponse({"detail": printable(str(e))}, status_code=422)

    @app.exception_handler(TooManyRequests)
    def too_many(_: Request, e: TooManyRequests) -> JSONResponse:
        return JSONResponse({"detail": "too many requests in flight for this token"}, status_code=429)

    @app.exception_handler(Exception)
    def unexpected(request: Request, e: Exception) -> JSONResponse:
        if is_transient(e):
            log.warning("%s %s: a dependency is unreachable: %s", request.method, request.url.path, type(e).__name__)
            return JSONResponse({"detail": f"Redis or S3 is unreachable ({type(e).__name__}); try again"},
                                status_code=503, headers={"Retry-After": "5"})
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)


def serve(farm: Farm, host: str, port: int, loglevel: str = "info") -> None:
    import uvicorn

    uvicorn.run(create_app(farm), host=host, port=port, log_level=loglevel.lower(), proxy_headers=False)
