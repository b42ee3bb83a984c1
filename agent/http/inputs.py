"""What a request carries, read one way for every endpoint: the key, the query, the body.

Rules
-----
* Checked in this order, the first failure answering: the key (401), the query
  (400 or 422), the body (400, 415, 422). Routing (404, 405) and the body's framing
  (411, 413) come before all of them (``agent/http/app.py``).
* The key: ``ApiKeys.authenticate`` reads ``Authorization``; :class:`BearerAuth`
  hands it the header and documents the scheme (``bearerAuth``) in the OpenAPI
  document.
* The query: each operation's parameters are a :class:`~agent.api.schemas.QueryModel`
  that FastAPI validates; its ``error_status`` says what a wrong one answers (seed 002's
  endpoints 400, seed 004's 422). A parameter given twice is wrong (FastAPI would keep
  the last one). A query string of more than ``MAX_QUERY_FIELDS`` fields cannot be read:
  400 ``invalid_parameter`` on every path, like a body that is not JSON.
* The body: a JSON object (``Content-Type: application/json`` or ``+json``; NaN and
  Infinity are not JSON): 400 ``missing_body`` / ``invalid_json``, 415, 422 for another
  JSON value. What is in it is the service's to validate (``agent/api/service.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast, get_args, get_origin

import annotated_types
from fastapi import Depends, Query, Request, Security
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.routing import APIRoute
from fastapi.security.base import SecurityBase
from pydantic.fields import FieldInfo

from agent.api.errors import ApiError, Problem
from agent.api.schemas import (
    MAX_QUERY_FIELDS,
    AdminQuery,
    ListQuery,
    NoQuery,
    QueryModel,
    ReadyQuery,
    StatusQuery,
)
from agent.http.keys import ApiKeys

__all__ = [
    "BearerAuth",
    "Principal",
    "Who",
    "admin_query",
    "bearer",
    "list_query",
    "no_query",
    "optional_body",
    "query_error",
    "ready_query",
    "required_body",
    "status_query",
]

_JSON_TYPES = ("application/json", "application/merge-patch+json")


@dataclass(frozen=True)
class Principal:
    """Who a key acts for: ``user_id`` None means every user (the operator's ``http.api_key``)."""

    user_id: str | None


class BearerAuth(SecurityBase):
    """``Authorization: Bearer <key>``, checked against the app's keys (``app.state.keys``)."""

    def __init__(self) -> None:
        self.model = HTTPBearerModel(
            description="http.api_key (the operator's key: every user) or an http.api_keys entry (one user_id)."
        )
        self.scheme_name = "bearerAuth"

    async def __call__(self, request: Request) -> Principal:
        keys = cast(ApiKeys, request.app.state.keys)
        return Principal(keys.authenticate(request.headers.get("authorization")))


bearer = BearerAuth()
Who = Annotated[Principal, Security(bearer)]
"""An operation's key: ``who: Who`` (checked first, before the query and the body)."""


# -- the query ---------------------------------------------------------------------------


async def _readable(request: Request) -> None:
    if len(request.query_params.multi_items()) > MAX_QUERY_FIELDS:
        raise ApiError.one(400, "invalid_parameter", f"query string is malformed: more than {MAX_QUERY_FIELDS} fields")


def _once(request: Request, model: type[QueryModel]) -> None:
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name in seen and name in model.model_fields:
            raise ApiError(
                model.error_status,
                Problem("invalid_parameter", f"query parameter {name} is given twice", parameter=name),
            )
        seen.add(name)


Readable = Annotated[None, Depends(_readable)]


async def status_query(request: Request, q: Annotated[StatusQuery, Query()], _: Readable) -> StatusQuery:
    _once(request, StatusQuery)
    return q


async def ready_query(request: Request, q: Annotated[ReadyQuery, Query()], _: Readable) -> ReadyQuery:
    _once(request, ReadyQuery)
    return q


async def admin_query(request: Request, q: Annotated[AdminQuery, Query()], _: Readable) -> AdminQuery:
    return q


async def list_query(request: Request, q: Annotated[ListQuery, Query()], _: Readable) -> ListQuery:
    _once(request, ListQuery)
    return q


async def no_query(q: Annotated[NoQuery, Query()], _: Readable) -> None:
    return None


def _query_model(route: object) -> type[QueryModel] | None:
    """The query model an operation declares (through its dependencies)."""
    if not isinstance(route, APIRoute):
        return None
    todo = [route.dependant]
    while todo:
        dep = todo.pop()
        for field in dep.query_params:
            annotation = field.field_info.annotation
            if isinstance(annotation, type) and issubclass(annotation, QueryModel):
                return annotation
        todo.extend(dep.dependencies)
    return None


def _choices(annotation: Any) -> list[str]:
    """The values a ``Literal`` (possibly inside ``Annotated`` or ``| None``) allows."""
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    return [c for arg in get_args(annotation) for c in _choices(arg)]


def _bounds(field: FieldInfo) -> tuple[int, int] | None:
    low: Any = next((m.ge for m in field.metadata if isinstance(m, annotated_types.Ge)), None)
    high: Any = next((m.le for m in field.metadata if isinstance(m, annotated_types.Le)), None)
    return None if low is None or high is None else (int(low), int(high))


def _bounds_of(field: FieldInfo | None) -> tuple[int, int] | None:
    return None if field is None else _bounds(field)


def query_error(route: object, errors: list[dict[str, Any]]) -> ApiError:
    """FastAPI's validation errors of a query as the API's errors, one problem each."""
    model = _query_model(route) or NoQuery
    problems: list[Problem] = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        name = str(loc[1]) if len(loc) > 1 else ""
        kind = str(e.get("type", ""))
        value = e.get("input")
        field = model.model_fields.get(name)
        blank = isinstance(value, str) and not value.strip()
        if kind == "missing" or (blank and field is not None and field.is_required()):
            problems.append(Problem("missing_parameter", f"query parameter {name} is required", parameter=name))
        elif kind == "extra_forbidden":
            problems.append(Problem(model.unknown_code, f"unknown query parameter {name}", parameter=name))
        elif kind == "literal_error" and field is not None:
            choices = ", ".join(_choices(field.annotation))
            problems.append(Problem("invalid_parameter", f"{name} must be one of {choices}", parameter=name))
        elif kind.startswith(("int_", "greater_than", "less_than")) and (bounds := _bounds_of(field)):
            low, high = bounds
            problems.append(Problem("invalid_parameter", f"{name} must be an integer {low}-{high}", parameter=name))
        elif kind == "string_too_short":
            least = e.get("ctx", {}).get("min_length")
            problems.append(Problem("invalid_parameter", f"{name} needs at least {least} characters", parameter=name))
        else:
            got = f" (got {value!r})" if isinstance(value, str) and len(value) <= 60 else ""
            problems.append(Problem("invalid_parameter", f"{name}: {e.get('msg', 'invalid')}{got}", parameter=name))
    return ApiError(model.error_status, *problems)


# -- the body -----------------------------------------------------------------------------


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _json_object(request: Request, *, required: bool) -> dict[str, Any]:
    body = await request.body()
    if not body.strip():
        if required:
            raise ApiError.one(400, "missing_body", "send a JSON object (Content-Type: application/json)")
        return {}
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype not in _JSON_TYPES and not ctype.endswith("+json"):
        raise ApiError.one(
            415, "unsupported_media_type", f"Content-Type must be application/json (got {ctype or 'none'})"
        )
    try:
        data = json.loads(body, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError.one(400, "invalid_json", f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError.one(422, "invalid_type", "the body must be a JSON object", pointer="")
    return data


NoQuery_ = Annotated[None, Depends(no_query)]


async def required_body(request: Request, _: NoQuery_) -> dict[str, Any]:
    """A JSON object, required (create, update)."""
    return await _json_object(request, required=True)


async def optional_body(request: Request, _: NoQuery_) -> dict[str, Any]:
    """None expected; a JSON object is tolerated (actions)."""
    return await _json_object(request, required=False)
