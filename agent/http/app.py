"""One HTTP application for everything the supervisor serves, on FastAPI.

``/metrics``, ``/healthz``, ``/readyz``, seed 002's ``GET /v2/sip_registration_status``,
the operator's ``GET /admin/status`` and ``POST /admin/reload`` (``agent/http/routes.py``),
the UAC Connections API under ``/v2/uac_connections`` (``agent/api/routes.py``) and this
application's OpenAPI document at ``/openapi.json``, generated from the declared routes
and models (``agent/api/schemas.py``). ``agent/http/server.py`` serves it with uvicorn.

Rules
-----
* Every request meets :class:`HttpApp` first: a trailing ``/`` is ignored, ``HEAD`` is
  answered as ``GET`` without the body, a chunked body is 411 and a body over
  ``MAX_BODY_BYTES`` is 413 (before anything is read; the connection is then closed).
  Every answer has ``Cache-Control: no-store``.
* Then routing: an unknown path is 404 ``not_found``; a known path with another method
  is 405 ``method_not_allowed`` with ``Allow`` listing the methods the path serves.
* Then each operation reads the key, the query and the body (``agent/http/inputs.py``).
* Every error, whatever raised it, answers in the API's shape ``{"errors": [{code,
  title, detail, source}]}`` (``agent/api/errors.py``). A bug answers 500
  ``internal_error`` and logs ``api_internal_error`` with its trace as a field of the
  structured line, never a traceback on stderr; a client that hangs up early is at
  most a debug line. Each request logs ``http_request`` (method, path without the
  query string, status) at debug.
"""

from __future__ import annotations

import copy
import traceback
from email.utils import formatdate
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from agent import __version__
from agent.api import routes as connections
from agent.api.errors import ApiError, Problem
from agent.api.schemas import ConnectionCreate, ConnectionUpdate
from agent.api.service import ConnectionService
from agent.http import routes as agent_routes
from agent.http.inputs import query_error
from agent.http.keys import ApiKeys
from agent.http.routes import AgentState

__all__ = ["MAX_BODY_BYTES", "HttpApp", "create_app", "openapi_document"]

MAX_BODY_BYTES = 64 * 1024
_REQUEST_METHOD = "uac_agent.method"  # the method as sent (HEAD is routed as GET)
_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")

DESCRIPTION = (
    "Everything the uac-agent supervisor serves on http.listen: seed 002's registration status, the UAC "
    "Connections API (seeds 000/001/004: create, list, retrieve, update and delete connections at runtime), the "
    'operator\'s /admin endpoints, the probes and the metrics. Bodies use the {"data": ...} envelope; every error '
    'is {"errors": [{code, title, detail, source}]}. Passwords are never returned, except a generated one once '
    "in the create response. Config-file connections are listed but read-only. See docs/api.md and "
    "docs/status-api.md."
)


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.to_json(), status_code=err.status, headers=err.headers)


def allowed_methods(routes: list[APIRoute], path: str) -> str:
    """The methods the routes serve on ``path``, for ``Allow`` (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in routes:
        if route.path_regex.match(path):
            methods |= route.methods or set()
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods, key=lambda m: (*_METHOD_ORDER, m).index(m)))


async def _on_api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _error(exc)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own answers (no route, another method) in the API's shape."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    method = request.scope.get(_REQUEST_METHOD, request.method)
    if exc.status_code == 405:
        allow = allowed_methods(request.app.state.routes, path)
        detail = f"{method} is not served on {path}; allowed: {allow}"
        return _error(ApiError(405, Problem("method_not_allowed", detail), headers={"Allow": allow}))
    if exc.status_code == 404:
        return _error(ApiError.one(404, "not_found", f"no resource at {path}"))
    code = str(exc.detail).lower().replace(" ", "_")
    return _error(ApiError(exc.status_code, Problem(code, str(exc.detail)), headers=dict(exc.headers or {})))


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _error(query_error(request.scope.get("route"), list(exc.errors())))


def _bug() -> ApiError:
    return ApiError.one(500, "internal_error", "the agent failed to handle this request; see its log")


async def _on_bug(_request: Request, _exc: Exception) -> JSONResponse:
    # Logged once, with its trace, by HttpApp (Starlette re-raises it after this answer).
    return _error(_bug())


def _document(app: FastAPI) -> dict[str, Any]:
    """The generated document, plus the request bodies (read by the service, so declared by
    ``openapi_extra``) and without FastAPI's own validation-error shape (never answered)."""
    doc = get_openapi(
        title="uac-agent HTTP API",
        version=__version__,
        description=DESCRIPTION,
        routes=app.routes,
        tags=[
            {"name": "status", "description": "Seed 002: the registration status of one connection."},
            {"name": "UAC connections", "description": "Seeds 000/001/004: connections at runtime."},
            {"name": "operator", "description": "The operator key's endpoints (uac-agent status, reload)."},
            {"name": "probes", "description": "Liveness, readiness, metrics and this document; no key."},
        ],
    )
    _, defs = models_json_schema(
        [(ConnectionCreate, "validation"), (ConnectionUpdate, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in defs.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    for item in doc["paths"].values():
        for operation in item.values():
            responses = operation.get("responses", {})
            if "HTTPValidationError" in str(responses.get("422", {})):
                del responses["422"]
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return doc


def _fastapi(routers: list[APIRouter]) -> FastAPI:
    app = FastAPI(
        title="uac-agent HTTP API",
        version=__version__,
        openapi_url=None,  # served by agent/http/routes.py, as a documented path
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # HttpApp ignores a trailing slash instead
    )
    for router in routers:
        app.include_router(router)
    app.state.routes = [r for router in routers for r in router.routes if isinstance(r, APIRoute)]
    app.state.openapi_body = None
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_bug)
    document: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not document:
            document.update(_document(app))
        return copy.deepcopy(document)

    app.openapi = openapi  # type: ignore[method-assign] # FastAPI's documented way to shape the document
    return app


def create_app(
    keys: ApiKeys,
    agent: AgentState,
    registry: CollectorRegistry,
    logger: Any,
    service: ConnectionService | None = None,
) -> HttpApp:
    """The application: the agent's endpoints always, the connections API when ``service`` is given.

    ``keys`` is shared with the service, which swaps them on a reload: every endpoint
    sees the new keys at once.
    """
    app = _fastapi([agent_routes.router] if service is None else [agent_routes.router, connections.router])
    app.state.keys = keys
    app.state.agent = agent
    app.state.registry = registry
    app.state.service = service
    return HttpApp(app, logger)


def openapi_document() -> dict[str, Any]:
    """The document a running agent serves at ``/openapi.json``, without running one."""
    return _fastapi([agent_routes.router, connections.router]).openapi()


class HttpApp:
    """The ASGI application uvicorn serves: :func:`create_app`'s FastAPI app behind the rules
    every request meets first (see the module's rules)."""

    def __init__(self, app: FastAPI, logger: Any) -> None:
        self.app = app
        self._log = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # uvicorn runs no lifespan here and no websockets
            return
        method: str = scope["method"]
        path: str = scope["path"]
        status = 0
        gone = False

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    *message.get("headers", ()),
                    (b"cache-control", b"no-store"),
                    (b"date", formatdate(usegmt=True).encode()),
                    (b"server", b"uac-agent"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        try:
            refused = _framing(scope)
            if refused is not None:
                refused.headers["Connection"] = "close"  # the body is not read: do not parse it as a request
                await _error(refused)(scope, receive, answer)
                return
            inner = {**scope, "path": path.rstrip("/") or "/", _REQUEST_METHOD: method}
            if method == "HEAD":
                inner["method"] = "GET"  # uvicorn sends no body to a HEAD request
            await self.app(inner, receive, answer)
        except ClientDisconnect:  # before its body was in: nothing to answer, nobody to tell
            gone = True
            self._log.debug("http_client_gone", method=method, path=path)
        except Exception as e:  # a bug: answered 500 by _on_bug when it could be; logged here, whole
            if status == 0:
                await _error(_bug())(scope, receive, answer)
            self._log.error("api_internal_error", method=method, path=path, error=repr(e), trace=traceback.format_exc())
        finally:
            if not gone:
                self._log.debug("http_request", method=method, path=path, status=status)


def _framing(scope: Scope) -> ApiError | None:
    """411 for a chunked body, 413 for one over ``MAX_BODY_BYTES`` (h11 has checked Content-Length)."""
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" and b"chunked" in value.lower():
            return ApiError.one(411, "length_required", "send the body with a Content-Length")
        if name == b"content-length" and value.strip().isdigit() and int(value) > MAX_BODY_BYTES:
            return ApiError.one(413, "payload_too_large", f"the body may be at most {MAX_BODY_BYTES} bytes")
    return None
