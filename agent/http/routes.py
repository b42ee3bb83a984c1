"""The agent's own endpoints: seed 002's status endpoint, the probes, the metrics and the
operator's ``/admin`` (what ``uac-agent status`` and ``uac-agent reload`` use).

They read the immutable status snapshots the worker pool publishes (``AgentState``),
never pjsua2. Endpoints that may wait (the pool's health check, a reload) are plain
``def``: FastAPI runs them in its thread pool, never on the event loop. The probes and
the metrics run on threads of their own (``PROBE_THREADS``): API requests waiting for a
stuck worker can fill the shared pool, never starve ``/healthz``, ``/readyz`` or ``/metrics``.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, cast

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent.api.errors import ApiError
from agent.api.schemas import (
    UNAUTHORIZED,
    AdminQuery,
    AdminStatus,
    Health,
    Readiness,
    ReadyQuery,
    RegistrationStatusView,
    ReloadReport,
    StatusQuery,
    error_responses,
)
from agent.http.inputs import Principal, Who, admin_query, ready_query, status_query
from agent.status import ConnectionStatus, summary

if TYPE_CHECKING:
    from agent.reload import ReloadOutcome

__all__ = ["RELOAD_WAIT_SEC", "AgentState", "router"]

SERVED_CREDENTIAL_TYPE = "uac_third-party_credential"
RELOAD_WAIT_SEC = 120.0  # POST /admin/reload waits this long for the outcome, then 504
PROBE_THREADS = 4  # threads of the probes and the metrics, apart from the API's pool
_probes: CapacityLimiter | None = None  # made on the HTTP loop's thread, at the first probe


async def _on_probe_thread(fn: Callable[..., Any], *args: Any) -> Any:
    global _probes
    if _probes is None:
        _probes = CapacityLimiter(PROBE_THREADS)
    return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=_probes)


def _no_problem() -> str | None:
    return None


def _always() -> bool:
    return True


@dataclass(frozen=True)
class AgentState:
    """What these endpoints read of the running agent; each callable is safe from any thread."""

    statuses: Callable[[], Mapping[str, ConnectionStatus]]
    health: Callable[[], str | None] = _no_problem  # None: alive; else what is wrong
    ready: Callable[[], bool] = _always
    # None: nothing outside the workers keeps the agent from taking calls; else what does (an
    # edge process being restarted): /readyz fails with it, /healthz does not
    unready: Callable[[], str | None] = _no_problem
    reload: Callable[[], concurrent.futures.Future[ReloadOutcome]] | None = None  # None: cannot reload
    info: Callable[[], Mapping[str, Any]] = field(default=dict)  # version, pid, workers


async def _state(request: Request) -> AgentState:
    return cast(AgentState, request.app.state.agent)


async def _registry(request: Request) -> CollectorRegistry:
    return cast(CollectorRegistry, request.app.state.registry)


State = Annotated[AgentState, Depends(_state)]


router = APIRouter()


@router.get(
    "/v2/sip_registration_status",
    operation_id="getSipRegistrationStatus",
    summary="The registration status of one connection (seed 002)",
    tags=["status"],
    response_model=RegistrationStatusView,
    responses=error_responses(
        e400="Missing or invalid query parameters: source.parameter names the first.",
        e401=UNAUTHORIZED,
        e403="The connection is not owned by user_id, or the key acts for another user_id.",
        e404="No connection matches connection_id.",
    ),
)
def registration_status(who: Who, q: Annotated[StatusQuery, Depends(status_query)], state: State) -> JSONResponse:
    if q.credential_type != SERVED_CREDENTIAL_TYPE:
        raise ApiError.one(
            400,
            "unsupported_credential_type",
            f"credential_type {q.credential_type} is not served by this agent; only {SERVED_CREDENTIAL_TYPE} is",
            parameter="credential_type",
        )
    if who.user_id is not None and q.user_id != who.user_id:
        raise ApiError.one(403, "forbidden", f"this API key acts for user_id {who.user_id} only", parameter="user_id")
    st = state.statuses().get(q.connection_id)
    if st is None:
        raise ApiError.one(
            404, "not_found", f"no connection matches connection_id {q.connection_id}", parameter="connection_id"
        )
    if st.connection.user_id != q.user_id:
        raise ApiError.one(
            403,
            "forbidden",
            f"connection {q.connection_id} is not owned by user_id {q.user_id}",
            parameter="user_id",
        )
    return JSONResponse(st.to_json())


@router.get(
    "/healthz",
    operation_id="getHealth",
    summary="Liveness: the worker pool answers and every worker's SIP thread was heard from",
    tags=["probes"],
    response_model=Health,
    responses={
        503: {"model": Health, "description": "Something is wrong: status says what."},
        **error_responses(),
    },
)
async def healthz(state: State) -> JSONResponse:
    problem = await _on_probe_thread(state.health)
    body = {"status": problem or "ok", "sip_thread": problem is None}
    return JSONResponse(body, status_code=200 if problem is None else 503)


@router.get(
    "/readyz",
    operation_id="getReadiness",
    summary="Readiness: the workers started and the pool runs, whatever the PBXs answer",
    tags=["probes"],
    response_model=Readiness,
    responses={
        503: {"model": Readiness, "description": "Not ready: reason says why."},
        **error_responses(e400="An unknown query parameter, or registered is not 'all'."),
    },
)
async def readyz(q: Annotated[ReadyQuery, Depends(ready_query)], state: State) -> JSONResponse:
    """``?registered=all``: also every registering connection registered (503 listing the others)."""
    result: JSONResponse = await _on_probe_thread(_readiness, q, state)
    return result


def _readiness(q: ReadyQuery, state: AgentState) -> JSONResponse:
    waiting = sorted(cid for cid, st in state.statuses().items() if st.connection.registers and not st.registered)
    problem = None if state.ready() else "starting or stopping"
    problem = problem or state.health() or state.unready()
    if problem is not None:
        return JSONResponse({"ready": False, "reason": problem, "not_registered": waiting}, status_code=503)
    ready = not (q.registered == "all" and waiting)
    body: dict[str, Any] = {"ready": ready, "not_registered": waiting}
    if not ready:
        body["reason"] = f"{len(waiting)} connection(s) not registered"
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    operation_id="getMetrics",
    summary="Prometheus metrics (text exposition format), without a key",
    tags=["probes"],
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}},
        **error_responses(),
    },
)
async def metrics(registry: Annotated[CollectorRegistry, Depends(_registry)]) -> Response:
    text: bytes = await _on_probe_thread(generate_latest, registry)
    return Response(text, media_type=CONTENT_TYPE_LATEST)


def _operator(who: Principal) -> None:
    if who.user_id is not None:
        raise ApiError.one(403, "forbidden", "only the operator key (http.api_key) may use /admin")


@router.get(
    "/admin/status",
    operation_id="getAdminStatus",
    summary="Every connection's status and the agent's (uac-agent status); operator key only",
    tags=["operator"],
    response_model=AdminStatus,
    responses=error_responses(
        e400="A query parameter was sent (this takes none).",
        e401=UNAUTHORIZED,
        e403="A user key: only the operator key (http.api_key) may use /admin.",
    ),
)
def admin_status(who: Who, _: Annotated[AdminQuery, Depends(admin_query)], state: State) -> JSONResponse:
    _operator(who)
    statuses = state.statuses()
    problem = state.health()
    return JSONResponse(
        {
            **state.info(),
            "ready": state.ready() and problem is None,
            "health": problem or "ok",
            "summary": summary(statuses),
            "connections": [statuses[cid].to_json() for cid in sorted(statuses)],
        }
    )


@router.post(
    "/admin/reload",
    operation_id="reloadConfig",
    summary="Re-read the config file, as SIGHUP does, and answer with the outcome (uac-agent reload)",
    tags=["operator"],
    response_model=ReloadReport,
    responses=error_responses(
        e401=UNAUTHORIZED,
        e403="A user key: only the operator key (http.api_key) may use /admin.",
        e404="This agent cannot reload (it was not started with a reload hook).",
        e411="The body was sent chunked (none is needed).",
        e413="The body is larger than 64 KiB (none is needed).",
        e422="The config file was refused; the running configuration stays. detail lists every reason.",
        e503="The agent is stopping.",
        e504=f"The reload did not finish within {RELOAD_WAIT_SEC:.0f} s.",
    ),
)
def admin_reload(who: Who, state: State) -> JSONResponse:
    _operator(who)
    if state.reload is None:
        raise ApiError.one(404, "not_found", "this agent cannot reload")
    try:
        outcome = state.reload().result(RELOAD_WAIT_SEC)
    except concurrent.futures.TimeoutError:
        raise ApiError.one(504, "reload_timeout", f"the reload did not finish within {RELOAD_WAIT_SEC:.0f} s") from None
    except concurrent.futures.CancelledError:
        raise ApiError.one(503, "unavailable", "the agent is stopping: nothing was reloaded") from None
    if not outcome.applied:
        raise ApiError.one(
            422,
            "reload_refused",
            "the config file was refused, the running configuration stays: " + "; ".join(outcome.problems),
        )
    return JSONResponse({"applied": True, **outcome.report})


@router.get(
    "/openapi.json",
    operation_id="getOpenApi",
    summary="This document (OpenAPI 3.1), without a key",
    tags=["probes"],
    responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}, **error_responses()},
)
async def openapi_document(request: Request) -> Response:
    body = request.app.state.openapi_body
    if body is None:
        body = request.app.state.openapi_body = JSONResponse(request.app.openapi()).body
    return Response(body, media_type="application/json")
