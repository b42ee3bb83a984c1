"""The UAC Connections API's operations (seeds 000, 001, 004) under ``/v2/uac_connections``.

Declared on FastAPI (``agent/http/app.py`` serves them); never touches pjsua2: the
service hands changes to the worker pool. The key, the query and the body are read by
``agent/http/inputs.py``; the service checks what is in the body, ownership (403) and
state (409), and may answer 503 (a worker or the store unavailable) or 504 (a change
that did not complete in time). Endpoints are plain ``def``: FastAPI runs them in its
thread pool, so the service's waits for a worker never block the event loop.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse

from agent.api.errors import ApiError
from agent.api.models import Record, resource
from agent.api.schemas import (
    BODY_ERRORS,
    UNAUTHORIZED,
    ConnectionCreate,
    ConnectionEnvelope,
    ConnectionList,
    ConnectionUpdate,
    ListQuery,
    error_responses,
)
from agent.api.service import ConnectionService
from agent.http.inputs import Principal, Who, list_query, no_query, optional_body, required_body

__all__ = ["router"]

BASE = "/v2/uac_connections"


async def _service(request: Request) -> ConnectionService:
    return cast(ConnectionService, request.app.state.service)


Service = Annotated[ConnectionService, Depends(_service)]
ConnectionId = Annotated[str, Path(description="The connection's id (connection_id).")]
NoQuery = Annotated[None, Depends(no_query)]
Body = Annotated[dict[str, Any], Depends(required_body)]
OptionalBody = Annotated[dict[str, Any], Depends(optional_body)]


def _body_schema(model: Any) -> dict[str, Any]:
    """``openapi_extra`` declaring the request body: the body is read by ``required_body`` and
    validated by the service, with the models ``model`` is derived from (agent/api/schemas.py)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _resource(service: ConnectionService, rec: Record) -> dict[str, Any]:
    return resource(rec, service.statuses().get(rec.id), service.settings)


router = APIRouter(prefix=BASE, tags=["UAC connections"])

_ONE = {
    "e403": "The connection belongs to another user than the key's.",
    "e404": "No connection with this id.",
}
_CHANGE = {
    "e503": "A worker or the store is unavailable; nothing was changed.",
    "e504": "The change did not complete in time (the worker holding the connection is busy); it may still be "
    "applied: read the connection to see.",
}
_TOO_MANY = "A query string of more than 20 fields (it cannot be read)."
_NO_QUERY = "A query parameter was sent (this operation takes none), or a field is wrong: source names it."


@router.get(
    "",
    operation_id="listUacConnections",
    summary="List connections (the key's user's; every user's with the operator key)",
    response_model=ConnectionList,
    responses=error_responses(
        e400=_TOO_MANY,
        e401=UNAUTHORIZED,
        e403="filter_user_id names another user than the key's.",
        e422="A query parameter is wrong: source.parameter names it.",
    ),
)
def list_connections(who: Who, query: Annotated[ListQuery, Depends(list_query)], service: Service) -> JSONResponse:
    return JSONResponse(page(service, query, who))


@router.post(
    "",
    operation_id="createUacConnection",
    summary="Create a connection; it starts registering within a second",
    status_code=201,
    response_model=ConnectionEnvelope,
    response_description="Created. password is included once when it was generated.",
    responses=error_responses(
        **BODY_ERRORS,
        e401=UNAUTHORIZED,
        e403="user_id names another user than the key's.",
        e409="More registering connections than workers.max_connections, or the store is full.",
        e422=_NO_QUERY + " Nothing was stored.",
        **_CHANGE,
    ),
    openapi_extra=_body_schema(ConnectionCreate),
)
def create_connection(who: Who, body: Body, service: Service) -> JSONResponse:
    rec, generated = service.create(body, who.user_id)
    data = _resource(service, rec)
    if generated is not None:
        data["password"] = generated  # shown once, here only
    return JSONResponse({"data": data}, status_code=201)


@router.get(
    "/{id}",
    operation_id="getUacConnection",
    summary="Retrieve a connection",
    response_model=ConnectionEnvelope,
    responses=error_responses(
        e400=_TOO_MANY, e401=UNAUTHORIZED, **_ONE, e422="A query parameter was sent (this takes none)."
    ),
)
def get_connection(id: ConnectionId, who: Who, _: NoQuery, service: Service) -> JSONResponse:  # noqa: A002 - seed's name
    return JSONResponse({"data": _resource(service, service.get(id, who.user_id))})


@router.patch(
    "/{id}",
    operation_id="updateUacConnection",
    summary="Update a connection: only the fields sent change",
    response_model=ConnectionEnvelope,
    response_description="Updated (and applied).",
    responses=error_responses(
        **BODY_ERRORS,
        e401=UNAUTHORIZED,
        **_ONE,
        e409="Config-file connection (read-only here), or the connection limit.",
        e422=_NO_QUERY + " Nothing was changed.",
        **_CHANGE,
    ),
    openapi_extra=_body_schema(ConnectionUpdate),
)
def update_connection(id: ConnectionId, who: Who, body: Body, service: Service) -> JSONResponse:  # noqa: A002
    rec = service.update(id, body, who.user_id)
    return JSONResponse({"data": _resource(service, rec)})


@router.delete(
    "/{id}",
    operation_id="deleteUacConnection",
    summary="Unregister, then delete a connection",
    response_model=ConnectionEnvelope,
    response_description="Deleted; the connection as it was.",
    responses=error_responses(
        e400=_TOO_MANY,
        e401=UNAUTHORIZED,
        **_ONE,
        e409="Config-file connection: remove it from the file and reload.",
        e422="A query parameter was sent (this takes none).",
        **_CHANGE,
    ),
)
def delete_connection(id: ConnectionId, who: Who, _: NoQuery, service: Service) -> JSONResponse:  # noqa: A002
    rec = service.delete(id, who.user_id)
    return JSONResponse({"data": _resource(service, rec)})  # its worker has forgotten it: status 0


_ACTION_ERRORS = error_responses(
    **BODY_ERRORS,
    e401=UNAUTHORIZED,
    **_ONE,
    e409="The connection keeps no registration (inactive, without external settings, or not started).",
    e422="A query parameter was sent, or the body is not an object.",
    e503="The connection's worker is unavailable (stopping or being replaced).",
    e504="The worker did not confirm the action in time.",
)


@router.post(
    "/{id}/actions/register",
    operation_id="registerUacConnection",
    summary="Register (refresh) now; restarts a connection stopped by unregister",
    status_code=202,
    response_model=ConnectionEnvelope,
    response_description="Done: the REGISTER is on its way.",
    responses=_ACTION_ERRORS,
)
def register_connection(id: ConnectionId, who: Who, _: OptionalBody, service: Service) -> JSONResponse:  # noqa: A002
    rec = service.act(id, "register", who.user_id)
    return JSONResponse({"data": _resource(service, rec)}, status_code=202)


@router.post(
    "/{id}/actions/unregister",
    operation_id="unregisterUacConnection",
    summary="Unregister now and stay unregistered until register, a change, or a restart",
    response_model=ConnectionEnvelope,
    response_description="Done: the registrar answered the unregister.",
    responses=_ACTION_ERRORS,
)
def unregister_connection(id: ConnectionId, who: Who, _: OptionalBody, service: Service) -> JSONResponse:  # noqa: A002
    rec = service.act(id, "unregister", who.user_id)
    return JSONResponse({"data": _resource(service, rec)})


# -- list ---------------------------------------------------------------------------------


def page(service: ConnectionService, q: ListQuery, who: Principal) -> dict[str, Any]:
    """One page of the connections ``who`` may see, filtered and ordered as seed 004 says."""
    owner = q.filter_user_id
    if owner is not None and who.user_id is not None and owner != who.user_id:
        raise ApiError.one(
            403, "forbidden", "this API key sees its own user_id's connections only", parameter="filter_user_id"
        )
    texts = {
        name: value.lower()
        for name, value in (
            ("filter_connection_name", q.filter_connection_name),
            ("filter_user_name", q.filter_user_name),
            ("filter_auth_user_name", q.filter_auth_user_name),
        )
        if value is not None
    }
    active = None if q.filter_active is None else q.filter_active == "true"
    statuses = service.statuses()
    rows: list[tuple[Record, dict[str, Any]]] = []
    for rec in service.visible(who.user_id):
        data = resource(rec, statuses.get(rec.id), service.settings)
        name = rec.conn.connection_name.lower()
        if "filter_connection_name" in texts and texts["filter_connection_name"] not in name:
            continue
        uname = (rec.user_name or "").lower()
        if any(texts[k] not in uname for k in ("filter_user_name", "filter_auth_user_name") if k in texts):
            continue
        if active is not None and rec.conn.active != active:
            continue
        if q.filter_registration_status is not None and data["registration_status"] != q.filter_registration_status:
            continue
        if q.filter_managed_by is not None and rec.managed_by != q.filter_managed_by:
            continue
        if owner is not None and rec.conn.user_id != owner:
            continue
        rows.append((rec, data))

    # Seed 004's defaults: created_at newest first, connection_name A-Z, active first.
    if q.order_by == "connection_name":
        rows.sort(key=lambda r: (r[0].conn.connection_name.lower(), r[0].id))
    elif q.order_by == "active":
        rows.sort(key=lambda r: (not r[0].conn.active, -r[0].created_at, r[0].id))
    elif q.order_by == "registration_status":
        rows.sort(key=lambda r: (-int(r[1]["registration_status"]), r[0].id))
    else:
        rows.sort(key=lambda r: (-r[0].created_at, r[0].id))
    if q.sort_direction == "reverse":
        rows.reverse()
    total = len(rows)
    start = (q.page - 1) * q.per_page
    return {
        "data": [d for _, d in rows[start : start + q.per_page]],
        "meta": {
            "page_number": q.page,
            "page_size": q.per_page,
            "total_pages": max(1, math.ceil(total / q.per_page)),
            "total_results": total,
        },
    }
