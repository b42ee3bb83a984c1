"""HTTP: ``/metrics``, ``/healthz``, ``/readyz``, ``GET /v2/sip_registration_status``,
the operator's ``GET /admin/status`` and ``POST /admin/reload`` (what ``uac-agent
status`` and ``uac-agent reload`` use), and (when given) the UAC Connections API
under ``/v2/uac_connections`` with ``/openapi.json`` (``agent/api``).

Runs on its own threads (stdlib ``ThreadingHTTPServer``) and never touches
pjsua2: it reads the immutable status snapshots the worker pool publishes.
Errors follow the API's usual shape: ``{"errors": [{"code", "title", "detail",
"source"}]}``, each naming the problem.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent.http.keys import ApiKeys, InvalidKey
from agent.status import ConnectionStatus, summary

if TYPE_CHECKING:
    from agent.api.handlers import ConnectionsApi
    from agent.reload import ReloadOutcome

__all__ = ["HttpServer", "StatusApi"]

CREDENTIAL_TYPES = ("uac_third-party_credential", "telephony_credential", "sip_credential_connection")
SERVED_CREDENTIAL_TYPE = "uac_third-party_credential"
MAX_BODY_BYTES = 64 * 1024
RELOAD_WAIT_SEC = 120.0  # POST /admin/reload waits this long for the outcome, then 504


class ApiError(Exception):
    def __init__(self, status: int, code: str, title: str, detail: str, parameter: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.body: dict[str, Any] = {"code": code, "title": title, "detail": detail}
        if parameter is not None:
            self.body["source"] = {"parameter": parameter}


class StatusApi:
    """The request logic, apart from the socket plumbing (tests call it directly too)."""

    def __init__(
        self,
        api_key: str | ApiKeys,
        statuses: Callable[[], Mapping[str, ConnectionStatus]],
        health: Callable[[], str | None],
        registry: CollectorRegistry,
        connections: ConnectionsApi | None = None,
        user_keys: Mapping[str, str] | None = None,
        ready: Callable[[], bool] = lambda: True,
        reload: Callable[[], concurrent.futures.Future[ReloadOutcome]] | None = None,
        agent_info: Callable[[], Mapping[str, Any]] = dict,
    ) -> None:
        # shared with the connections API, so a reload swaps the keys of both at once
        self.keys = api_key if isinstance(api_key, ApiKeys) else ApiKeys(api_key, user_keys)
        self._statuses = statuses
        self._health = health  # None: alive; else what is wrong
        self._ready = ready
        self._reload = reload
        self._agent_info = agent_info
        self._registry = registry
        self._connections = connections

    def handle(
        self, method: str, target: str, headers: Mapping[str, str], content: bytes = b""
    ) -> tuple[int, str, bytes]:
        url = urlsplit(target)
        path = url.path.rstrip("/") or "/"
        if self._connections is not None and self._connections.serves(path):
            return self._connections.handle(method, path, url.query, headers, content)
        try:
            if path == "/admin/reload":
                if method != "POST":
                    raise ApiError(405, "method_not_allowed", "Method Not Allowed", f"{method} is not served on {path}")
                return self._reload_now(headers)
            if method not in ("GET", "HEAD"):
                raise ApiError(405, "method_not_allowed", "Method Not Allowed", f"{method} is not served on {path}")
            if path == "/admin/status":
                return self._admin_status(url.query, headers)
            if path == "/metrics":
                return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
            if path == "/healthz":
                problem = self._health()
                body = {"status": problem or "ok", "sip_thread": problem is None}
                return _json(200 if problem is None else 503, body)
            if path == "/readyz":
                return self._readyz(url.query)
            if path == "/v2/sip_registration_status":
                return _json(200, self._registration_status(url.query, headers))
            raise ApiError(404, "not_found", "Not Found", f"no resource at {path}")
        except ApiError as e:
            return _json(e.status, {"errors": [e.body]})

    def _readyz(self, query: str) -> tuple[int, str, bytes]:
        """Ready to serve: the workers started at start-up have their transports bound and the
        pool runs; a PBX that rejects or ignores a connection does not make the agent unready.
        ``?registered=all``: also every registering connection registered (503 listing the others)."""
        params = _query(query, ("registered",))
        want_all = params.get("registered")
        if want_all not in (None, "all"):
            raise ApiError(400, "invalid_parameter", "Bad Request", "registered may only be 'all'", "registered")
        waiting = sorted(cid for cid, st in self._statuses().items() if st.connection.registers and not st.registered)
        problem = None if self._ready() else "starting or stopping"
        problem = problem or self._health()
        if problem is not None:
            return _json(503, {"ready": False, "reason": problem, "not_registered": waiting})
        ready = not (want_all and waiting)
        body: dict[str, Any] = {"ready": ready, "not_registered": waiting}
        if not ready:
            body["reason"] = f"{len(waiting)} connection(s) not registered"
        return _json(200 if ready else 503, body)

    def _operator(self, headers: Mapping[str, str]) -> None:
        if self._authorize(headers) is not None:
            raise ApiError(403, "forbidden", "Forbidden", "only the operator key (http.api_key) may use /admin")

    def _admin_status(self, query: str, headers: Mapping[str, str]) -> tuple[int, str, bytes]:
        """Every connection's status (the status endpoint's body, by connection_id) and the agent's."""
        self._operator(headers)
        _query(query, ())
        statuses = self._statuses()
        problem = self._health()
        body = {
            **self._agent_info(),
            "ready": self._ready() and problem is None,
            "health": problem or "ok",
            "summary": summary(statuses),
            "connections": [statuses[cid].to_json() for cid in sorted(statuses)],
        }
        return _json(200, body)

    def _reload_now(self, headers: Mapping[str, str]) -> tuple[int, str, bytes]:
        """Re-read the config file, as SIGHUP does, and answer with the outcome."""
        self._operator(headers)
        if self._reload is None:
            raise ApiError(404, "not_found", "Not Found", "this agent cannot reload")
        try:
            outcome = self._reload().result(RELOAD_WAIT_SEC)
        except concurrent.futures.TimeoutError:
            raise ApiError(
                504, "reload_timeout", "Gateway Timeout", f"the reload did not finish within {RELOAD_WAIT_SEC:.0f} s"
            ) from None
        if not outcome.applied:
            raise ApiError(
                422,
                "reload_refused",
                "Unprocessable Entity",
                "the config file was refused, the running configuration stays: " + "; ".join(outcome.problems),
            )
        return _json(200, {"applied": True, **outcome.report})

    def _authorize(self, headers: Mapping[str, str]) -> str | None:
        """None for ``http.api_key`` (every user); the user_id of an ``http.api_keys`` key."""
        value = headers.get("authorization")
        if not value:
            raise ApiError(401, "unauthorized", "Unauthorized", "missing Authorization header: send 'Bearer <api_key>'")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "Unauthorized", "Authorization must be 'Bearer <api_key>'")
        user = self.keys.user_of(token.strip())
        if isinstance(user, InvalidKey):
            raise ApiError(401, "unauthorized", "Unauthorized", "invalid API key")
        return user

    def _registration_status(self, query: str, headers: Mapping[str, str]) -> dict[str, Any]:
        key_user = self._authorize(headers)
        try:
            params = parse_qs(query, keep_blank_values=True, strict_parsing=False, max_num_fields=20)
        except ValueError as e:
            raise ApiError(400, "invalid_parameter", "Bad Request", f"query string is malformed: {e}") from None
        values: dict[str, str] = {}
        for name in ("credential_type", "connection_id", "user_id"):
            got = params.get(name)
            if not got or not got[0].strip():
                raise ApiError(400, "missing_parameter", "Bad Request", f"query parameter {name} is required", name)
            if len(got) > 1:
                raise ApiError(400, "invalid_parameter", "Bad Request", f"query parameter {name} is given twice", name)
            values[name] = got[0].strip()
        ctype = values["credential_type"]
        if ctype not in CREDENTIAL_TYPES:
            raise ApiError(
                400,
                "invalid_parameter",
                "Bad Request",
                f"credential_type must be one of {', '.join(CREDENTIAL_TYPES)}",
                "credential_type",
            )
        if ctype != SERVED_CREDENTIAL_TYPE:
            raise ApiError(
                400,
                "unsupported_credential_type",
                "Bad Request",
                f"credential_type {ctype} is not served by this agent; only {SERVED_CREDENTIAL_TYPE} is",
                "credential_type",
            )
        if key_user is not None and values["user_id"] != key_user:
            raise ApiError(403, "forbidden", "Forbidden", f"this API key acts for user_id {key_user} only", "user_id")
        st = self._statuses().get(values["connection_id"])
        if st is None:
            raise ApiError(
                404,
                "not_found",
                "Not Found",
                f"no connection matches connection_id {values['connection_id']}",
                "connection_id",
            )
        if st.connection.user_id != values["user_id"]:
            raise ApiError(
                403,
                "forbidden",
                "Forbidden",
                f"connection {values['connection_id']} is not owned by user_id {values['user_id']}",
                "user_id",
            )
        return st.to_json()


def _query(query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query string's parameters (each at most once, none outside ``allowed``): 400 otherwise."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=False, max_num_fields=20)
    except ValueError as e:
        raise ApiError(400, "invalid_parameter", "Bad Request", f"query string is malformed: {e}") from None
    out = {}
    for name, got in params.items():
        if name not in allowed:
            raise ApiError(400, "invalid_parameter", "Bad Request", f"unknown query parameter {name}", name)
        if len(got) > 1:
            raise ApiError(400, "invalid_parameter", "Bad Request", f"query parameter {name} is given twice", name)
        out[name] = got[0].strip()
    return out


def _json(status: int, body: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body, indent=None).encode()


class _Handler(BaseHTTPRequestHandler):
    server_version = "uac-agent"
    sys_version = ""
    api: StatusApi
    on_request: Callable[[str, str, int], None]
    timeout = 15  # seconds a client may take to send its request (a body is read whole)

    def _serve(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            request_body = self._read_body(headers)
        except ApiError as e:
            self.close_connection = True
            status, ctype, body = _json(e.status, {"errors": [e.body]})
        else:
            status, ctype, body = self.api.handle(self.command, self.path, headers, request_body)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.on_request(self.command, urlsplit(self.path).path, status)

    def _read_body(self, headers: Mapping[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise ApiError(411, "length_required", "Length Required", "send the body with a Content-Length")
        raw = headers.get("content-length", "").strip()
        if not raw:
            return b""
        if not raw.isdigit():
            raise ApiError(400, "invalid_content_length", "Bad Request", "Content-Length is not a number")
        length = int(raw)
        if length > MAX_BODY_BYTES:
            raise ApiError(
                413, "payload_too_large", "Payload Too Large", f"the body may be at most {MAX_BODY_BYTES} bytes"
            )
        return self.rfile.read(length) if length else b""

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _serve  # noqa: N815

    def __getattr__(self, name: str) -> Any:
        # Any other method (OPTIONS, TRACE, QUERY, ...) gets a JSON 405, not the stdlib's 501 page.
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        pass  # requests are logged by on_request, without query strings or headers


class HttpServer:
    def __init__(self, host: str, port: int, api: StatusApi, logger: Any) -> None:
        log = logger

        def on_request(method: str, path: str, status: int) -> None:
            log.debug("http_request", method=method, path=path, status=status)

        handler = type("Handler", (_Handler,), {"api": api, "on_request": staticmethod(on_request)})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()
