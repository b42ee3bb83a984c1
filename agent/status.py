"""A connection's status as the product shows it (seed 002 + seed 004 fields).

Built by the supervisor from the config and the policy snapshot the
connection's worker sent; read by the HTTP threads. Immutable, so handing one
across threads is safe.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from agent.config import Connection
from agent.core.policy import PolicySnapshot, RegistrationStatus, RegState

__all__ = [
    "ConnectionStatus",
    "build_status",
    "inactive_snapshot",
    "iso",
    "pending_snapshot",
    "summary",
    "worker_down_snapshot",
]


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class ConnectionStatus:
    connection: Connection
    state: str  # the policy's RegState, or WORKER_DOWN while its worker is being replaced
    registered: bool
    registration_status: RegistrationStatus
    registration_status_updated_at: float | None
    last_registration_response: str | None
    last_response_code: int
    last_registered_ip: str | None
    requested_expires: int
    granted_expires: int | None
    binding_expires_at: float | None
    consecutive_failures: int
    auth_retries: int
    next_action: str | None
    next_action_at: float | None
    registered_since: float | None
    attempts: int
    worker: int | None = None  # index of the worker process holding it (None: on none)
    worker_pid: int | None = None
    registrar_reachable: bool | None = None  # None: not probed yet, or keepalives off
    keepalive_misses: int = 0
    last_keepalive: str | None = None
    registrar_reachable_since: float | None = None
    target: str | None = None  # the DNS target REGISTERs go to, when the next hop is a host name
    calls_active: int = 0  # calls from the PBX the edge carries on this connection now
    destination_reachable: bool | None = None  # the edge's OPTIONS pings; None: not known

    @property
    def uptime_sec(self) -> float | None:
        if self.registered_since is None or not self.registered:
            return None
        return max(0.0, time.time() - self.registered_since)

    @property
    def connection_id(self) -> str:
        return self.connection.connection_id

    @property
    def pair_state(self) -> str:
        return self.connection.pair_state

    def to_json(self) -> dict[str, Any]:
        """The ``GET /v2/sip_registration_status`` body. The password is always ``***``."""
        c = self.connection
        ext = c.external_uac_settings
        settings: dict[str, Any] | None = None
        if ext is not None:
            settings = {
                "proxy": ext.proxy,
                "outbound_proxy": ext.outbound_proxy,
                "transport": ext.transport,
                "username": ext.username,
                "auth_username": ext.effective_auth_username,
                "from_user": ext.effective_from_user,
                "expiration_sec": ext.expiration_sec,
                "password": "***",
            }
        return {
            "connection_id": c.connection_id,
            "user_id": c.user_id,
            "connection_name": c.connection_name,
            "username": ext.username if ext else None,
            "pair_state": c.pair_state,
            "registered": self.registered,
            "last_registration_response": self.last_registration_response,
            "third-party_uac_settings": settings,
            "internal_uac_settings": {"destination_uri": c.internal_uac_settings.destination_uri},
            "registration_status": int(self.registration_status),
            "registration_status_updated_at": iso(self.registration_status_updated_at),
            "last_registered_ip": self.last_registered_ip,
            "sip_registration_details": {
                "state": self.state,
                "expires": self.granted_expires,
                "requested_expires": self.requested_expires,
                "binding_expires_at": iso(self.binding_expires_at),
                "uptime": None if self.uptime_sec is None else round(self.uptime_sec, 3),
                "registered_since": iso(self.registered_since),
                "next_action": self.next_action,
                "next_action_at": iso(self.next_action_at),
                "failures": self.consecutive_failures,
                "auth_retries": self.auth_retries,
                "attempts": self.attempts,
                "last_response_code": self.last_response_code,
                "worker": self.worker,
                "worker_pid": self.worker_pid,
                "registrar_reachable": self.registrar_reachable,
                "keepalive_misses": self.keepalive_misses,
                "last_keepalive": self.last_keepalive,
                "registrar_reachable_since": iso(self.registrar_reachable_since),
                "target": self.target,
                "calls_active": self.calls_active,
                "destination_reachable": self.destination_reachable,
            },
        }


def summary(statuses: Mapping[str, ConnectionStatus]) -> str:
    """One line for systemd's STATUS= and logs: ``12/14 registered, 2 failing``.

    Counts registering connections; "failing" are those whose last attempt failed
    (a connection still waiting for its first answer is neither).
    """
    registering = [st for st in statuses.values() if st.connection.registers]
    registered = sum(1 for st in registering if st.registered)
    failing = sum(1 for st in registering if not st.registered and st.registration_status == RegistrationStatus.FAILED)
    text = f"{registered}/{len(registering)} registered"
    return f"{text}, {failing} failing" if failing else text


def build_status(
    conn: Connection,
    snap: PolicySnapshot,
    worker: int | None = None,
    worker_pid: int | None = None,
    calls_active: int = 0,
    destination_reachable: bool | None = None,
) -> ConnectionStatus:
    return ConnectionStatus(
        connection=conn,
        state=str(snap.state),
        registered=snap.registered,
        registration_status=snap.registration_status,
        registration_status_updated_at=snap.registration_status_updated_at,
        last_registration_response=snap.last_registration_response,
        last_response_code=snap.last_response_code,
        last_registered_ip=snap.last_registered_ip,
        requested_expires=snap.requested_expires,
        granted_expires=snap.granted_expires,
        binding_expires_at=snap.binding_expires_at,
        consecutive_failures=snap.consecutive_failures,
        auth_retries=snap.auth_retries,
        next_action=snap.next_action,
        next_action_at=snap.next_action_at,
        registered_since=snap.registered_since,
        attempts=snap.attempts,
        worker=worker,
        worker_pid=worker_pid,
        registrar_reachable=snap.registrar_reachable,
        keepalive_misses=snap.keepalive_misses,
        last_keepalive=snap.last_keepalive,
        registrar_reachable_since=snap.registrar_reachable_since,
        target=snap.target,
        calls_active=calls_active,
        destination_reachable=destination_reachable,
    )


def _blank(state: RegState, status: RegistrationStatus, expires: int, at: float) -> PolicySnapshot:
    return PolicySnapshot(
        state=state,
        registered=False,
        registration_status=status,
        registration_status_updated_at=at,
        last_registration_response=None,
        last_response_code=0,
        last_registered_ip=None,
        requested_expires=expires,
        granted_expires=None,
        binding_expires_at=None,
        consecutive_failures=0,
        auth_retries=0,
        next_action=None,
        next_action_at=None,
        registered_since=None,
        uptime_sec=None,
        attempts=0,
    )


def inactive_snapshot(conn: Connection, at: float) -> PolicySnapshot:
    """A connection that keeps no registration (on no worker): Not Applicable."""
    ext = conn.external_uac_settings
    return _blank(RegState.DISABLED, RegistrationStatus.NOT_APPLICABLE, ext.expiration_sec if ext else 3600, at)


def pending_snapshot(conn: Connection, at: float) -> PolicySnapshot:
    """A registering connection whose worker has not reported yet."""
    ext = conn.external_uac_settings
    return _blank(RegState.WAITING, RegistrationStatus.NOT_REGISTERED, ext.expiration_sec if ext else 3600, at)


def worker_down_snapshot(last: PolicySnapshot, text: str, at: float) -> PolicySnapshot:
    """What is known of a connection whose worker stopped: not registered, and why."""
    status = RegistrationStatus.FAILED
    return replace(
        last,
        registered=False,
        registration_status=status,
        registration_status_updated_at=at
        if last.registration_status != status
        else last.registration_status_updated_at,
        last_registration_response=text,
        last_response_code=0,
        binding_expires_at=None,
        next_action=None,
        next_action_at=None,
        registered_since=None,
        uptime_sec=None,
        registrar_reachable=None,  # unknown until a worker probes it again
        keepalive_misses=0,
    )
