"""A connection's status as the product shows it (seed 002 + seed 004 fields).

Built on the SIP thread from the config and the policy snapshot; read by the
HTTP thread. Immutable, so handing one across threads is safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.config import Connection
from agent.core.policy import PolicySnapshot, RegistrationStatus, RegState

__all__ = ["ConnectionStatus", "build_status", "iso"]


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class ConnectionStatus:
    connection: Connection
    state: RegState
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
    uptime_sec: float | None
    attempts: int

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
                "state": self.state.value,
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
            },
        }


def build_status(conn: Connection, snap: PolicySnapshot) -> ConnectionStatus:
    return ConnectionStatus(
        connection=conn,
        state=snap.state,
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
        uptime_sec=snap.uptime_sec,
        attempts=snap.attempts,
    )
