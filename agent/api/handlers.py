"""HTTP request handling of ``/v2/uac_connections`` and ``/openapi.json``.

Called by the HTTP server's threads with the parsed request; never touches
pjsua2 (the service hands changes to the worker pool). Order of checks: path
(404), method (405), key (401), body (400/415/422), ownership (403), state
(409).
"""

from __future__ import annotations

import json
import math
import re
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from agent.api.errors import ApiError, Problem
from agent.api.models import Record, resource
from agent.api.service import ConnectionService
from agent.config import HttpSettings
from agent.http.keys import ApiKeys, InvalidKey

__all__ = ["MAX_BODY_BYTES", "Authenticator", "ConnectionsApi", "Principal"]

MAX_BODY_BYTES = 64 * 1024
BASE = "/v2/uac_connections"
_ID_PATH = re.compile(r"^/v2/uac_connections/(?P<id>[^/]+)(?:/actions/(?P<action>[^/]+))?$")
_JSON_TYPES = ("application/json", "application/merge-patch+json")
ORDER_BY = ("created_at", "connection_name", "active", "registration_status")
LIST_PARAMS = (
    "page",
    "per_page",
    "order_by",
    "sort_direction",
    "filter_connection_name",
    "filter_user_name",
    "filter_auth_user_name",
    "filter_active",
    "filter_registration_status",
    "filter_managed_by",
    "filter_user_id",
)


@dataclass(frozen=True)
class Principal:
    """Who a key acts for: ``user_id`` None means every user (the operator's ``http.api_key``)."""

    user_id: str | None


class Authenticator:
    """Bearer keys: ``http.api_key`` acts for every user; each ``http.api_keys`` entry for one."""

    def __init__(self, admin_key: str | ApiKeys, user_keys: Mapping[str, str] | None = None) -> None:
        self.keys = admin_key if isinstance(admin_key, ApiKeys) else ApiKeys(admin_key, user_keys)

    @classmethod
    def from_settings(cls, http: HttpSettings) -> Authenticator:
        return cls(ApiKeys.from_settings(http))

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        value = headers.get("authorization")
        if not value:
            raise ApiError.one(401, "unauthorized", "missing Authorization header: send 'Bearer <api_key>'")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError.one(401, "unauthorized", "Authorization must be 'Bearer <api_key>'")
        user = self.keys.user_of(token.strip())
        if isinstance(user, InvalidKey):
            raise ApiError.one(401, "unauthorized", "invalid API key")
        return Principal(user)


def _json(status: int, body: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body, indent=None).encode()


class ConnectionsApi:
    def __init__(
        self, service: ConnectionService, auth: Authenticator, openapi: Callable[[], dict[str, Any]], logger: Any
    ) -> None:
        self._service = service
        self._auth = auth
        self._openapi = openapi
        self._log = logger
        self._openapi_body: bytes | None = None

    @staticmethod
    def serves(path: str) -> bool:
        return path == "/openapi.json" or path == BASE or path.startswith(BASE + "/")

    def handle(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, str, bytes]:
        try:
            return self._route(method, path, query, headers, body)
        except ApiError as e:
            return _json(e.status, e.to_json())
        except Exception as e:  # a bug: answer 500 with no detail, log it whole
            self._log.error("api_internal_error", method=method, path=path, error=repr(e), trace=traceback.format_exc())
            err = ApiError.one(500, "internal_error", "the agent failed to handle this request; see its log")
            return _json(500, err.to_json())

    # -- routing ------------------------------------------------------------------

    def _route(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, str, bytes]:
        if path == "/openapi.json":
            self._allow(method, ("GET", "HEAD"), path)
            if self._openapi_body is None:
                self._openapi_body = json.dumps(self._openapi(), indent=None).encode()
            return 200, "application/json", self._openapi_body
        if path == BASE:
            self._allow(method, ("GET", "HEAD", "POST"), path)
            who = self._auth.authenticate(headers)
            if method == "POST":
                self._no_query(query)
                rec, generated = self._service.create(self._body(headers, body, required=True), who.user_id)
                data = self._resource(rec)
                if generated is not None:
                    data["password"] = generated  # shown once, here only
                return _json(201, {"data": data})
            return _json(200, self._list(query, who))
        m = _ID_PATH.match(path)
        if m is None:
            raise ApiError.one(404, "not_found", f"no resource at {path}")
        cid, action = m.group("id"), m.group("action")
        if action is not None:
            if action not in ("register", "unregister"):
                raise ApiError.one(404, "not_found", f"no action {action}: use actions/register or actions/unregister")
            self._allow(method, ("POST",), path)
            who = self._auth.authenticate(headers)
            self._no_query(query)
            self._body(headers, body, required=False)  # none expected; an object is tolerated
            rec = self._service.act(cid, action, who.user_id)
            return _json(202 if action == "register" else 200, {"data": self._resource(rec)})
        self._allow(method, ("GET", "HEAD", "PATCH", "DELETE"), path)
        who = self._auth.authenticate(headers)
        self._no_query(query)
        if method in ("GET", "HEAD"):
            return _json(200, {"data": self._resource(self._service.get(cid, who.user_id))})
        if method == "PATCH":
            rec = self._service.update(cid, self._body(headers, body, required=True), who.user_id)
            return _json(200, {"data": self._resource(rec)})
        rec = self._service.delete(cid, who.user_id)
        return _json(200, {"data": self._resource(rec)})  # its worker has forgotten it: status 0

    @staticmethod
    def _allow(method: str, allowed: tuple[str, ...], path: str) -> None:
        if method not in allowed:
            raise ApiError.one(
                405, "method_not_allowed", f"{method} is not served on {path}; allowed: {', '.join(allowed)}"
            )

    @staticmethod
    def _no_query(query: str) -> None:
        if query:
            name = query.split("&", 1)[0].split("=", 1)[0]
            raise ApiError.one(422, "unknown_parameter", "this request takes no query parameters", parameter=name)

    @staticmethod
    def _body(headers: Mapping[str, str], body: bytes, *, required: bool) -> dict[str, Any]:
        if not body.strip():
            if required:
                raise ApiError.one(400, "missing_body", "send a JSON object (Content-Type: application/json)")
            return {}
        ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype not in _JSON_TYPES and not ctype.endswith("+json"):
            raise ApiError.one(
                415, "unsupported_media_type", f"Content-Type must be application/json (got {ctype or 'none'})"
            )

        def no_constants(name: str) -> Any:
            raise ValueError(f"{name} is not JSON")

        try:
            data = json.loads(body, parse_constant=no_constants)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError.one(400, "invalid_json", f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError.one(422, "invalid_type", "the body must be a JSON object", pointer="")
        return data

    def _resource(self, rec: Record) -> dict[str, Any]:
        return resource(rec, self._service.statuses().get(rec.id), self._service.settings)

    # -- list ---------------------------------------------------------------------

    def _list(self, query: str, who: Principal) -> dict[str, Any]:
        try:
            params = parse_qs(query, keep_blank_values=True, strict_parsing=False, max_num_fields=len(LIST_PARAMS))
        except ValueError as e:
            raise ApiError.one(422, "invalid_parameter", f"query string is malformed: {e}") from None
        problems: list[Problem] = []
        values: dict[str, str] = {}
        for name, got in params.items():
            if name not in LIST_PARAMS:
                problems.append(Problem("unknown_parameter", f"unknown query parameter {name}", parameter=name))
            elif len(got) > 1:
                problems.append(Problem("invalid_parameter", f"query parameter {name} is given twice", parameter=name))
            else:
                values[name] = got[0].strip()

        def integer(name: str, default: int, low: int, high: int) -> int:
            raw = values.get(name)
            if raw is None:
                return default
            if not re.fullmatch(r"[0-9]{1,9}", raw) or not low <= int(raw) <= high:
                problems.append(Problem("invalid_parameter", f"{name} must be an integer {low}-{high}", parameter=name))
                return default
            return int(raw)

        page = integer("page", 1, 1, 10**6)
        per_page = integer("per_page", 100, 1, 1000)
        order_by = values.get("order_by", "created_at")
        if order_by not in ORDER_BY:
            problems.append(
                Problem("invalid_parameter", f"order_by must be one of {', '.join(ORDER_BY)}", parameter="order_by")
            )
        reverse = values.get("sort_direction")
        if reverse not in (None, "reverse"):
            problems.append(Problem("invalid_parameter", "sort_direction must be reverse", parameter="sort_direction"))
        texts: dict[str, str] = {}
        for name in ("filter_connection_name", "filter_user_name", "filter_auth_user_name"):
            if name in values:
                if len(values[name]) < 3:
                    problems.append(Problem("invalid_parameter", f"{name} needs at least 3 characters", parameter=name))
                texts[name] = values[name].lower()
        active: bool | None = None
        if "filter_active" in values:
            if values["filter_active"] not in ("true", "false"):
                problems.append(
                    Problem("invalid_parameter", "filter_active must be true or false", parameter="filter_active")
                )
            active = values["filter_active"] == "true"
        reg_status = integer("filter_registration_status", -1, 0, 5)
        managed = values.get("filter_managed_by")
        if managed not in (None, "file", "api"):
            problems.append(
                Problem("invalid_parameter", "filter_managed_by must be file or api", parameter="filter_managed_by")
            )
        owner = values.get("filter_user_id")
        if owner is not None and who.user_id is not None and owner != who.user_id:
            raise ApiError.one(
                403, "forbidden", "this API key sees its own user_id's connections only", parameter="filter_user_id"
            )
        if problems:
            raise ApiError(422, *problems)

        statuses = self._service.statuses()
        rows: list[tuple[Record, dict[str, Any]]] = []
        for rec in self._service.visible(who.user_id):
            data = resource(rec, statuses.get(rec.id), self._service.settings)
            name = rec.conn.connection_name.lower()
            if "filter_connection_name" in texts and texts["filter_connection_name"] not in name:
                continue
            uname = (rec.user_name or "").lower()
            if any(texts[k] not in uname for k in ("filter_user_name", "filter_auth_user_name") if k in texts):
                continue
            if active is not None and rec.conn.active != active:
                continue
            if reg_status >= 0 and data["registration_status"] != reg_status:
                continue
            if managed is not None and rec.managed_by != managed:
                continue
            if owner is not None and rec.conn.user_id != owner:
                continue
            rows.append((rec, data))

        # Seed 004's defaults: created_at newest first, connection_name A-Z, active first.
        if order_by == "connection_name":
            rows.sort(key=lambda r: (r[0].conn.connection_name.lower(), r[0].id))
        elif order_by == "active":
            rows.sort(key=lambda r: (not r[0].conn.active, -r[0].created_at, r[0].id))
        elif order_by == "registration_status":
            rows.sort(key=lambda r: (-int(r[1]["registration_status"]), r[0].id))
        else:
            rows.sort(key=lambda r: (-r[0].created_at, r[0].id))
        if reverse:
            rows.reverse()
        total = len(rows)
        start = (page - 1) * per_page
        return {
            "data": [d for _, d in rows[start : start + per_page]],
            "meta": {
                "page_number": page,
                "page_size": per_page,
                "total_pages": max(1, math.ceil(total / per_page)),
                "total_results": total,
            },
        }
