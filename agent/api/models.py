"""What the API reads and writes: the request fields it accepts, how a body is
checked against the same models the config file uses, and the connection
resource it returns (never a password).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from agent.addresses import is_wildcard
from agent.api.errors import ApiError, Problem, validation_problems
from agent.config import AgentSettings, Connection
from agent.status import ConnectionStatus, iso

__all__ = [
    "CREATE_FIELDS",
    "PATCH_FIELDS",
    "ApiFields",
    "Record",
    "build_connection",
    "fqdn_for",
    "merge_patch",
    "public_settings",
    "resource",
    "secret_document",
]

CREATE_FIELDS = (
    "connection_name",
    "user_name",
    "password",
    "user_id",
    "active",
    "external_uac_settings",
    "internal_uac_settings",
    "registration",
)
PATCH_FIELDS = tuple(f for f in CREATE_FIELDS if f != "user_id")
# Fields that must not be null in a PATCH (null removes/resets the others).
NOT_NULL = ("connection_name", "user_name", "password", "active")

_USER_NAME = r"^[A-Za-z0-9._~-]{4,64}$"
_ID = r"^[A-Za-z0-9._-]{1,64}$"
_HIDDEN = {"password", "password_file"}


class ApiFields(BaseModel):
    """The API's own fields of a connection (the rest are the config file's models)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    connection_name: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    user_name: Annotated[str, Field(pattern=_USER_NAME)] | None = None
    password: Annotated[SecretStr, Field(min_length=8, max_length=128)] | None = None
    user_id: Annotated[str, Field(pattern=_ID)] | None = None
    active: bool | None = None

    @field_validator("connection_name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None:
            v = v.strip()
            if not v:
                raise ValueError("must not be blank")
            if any(ord(ch) < 32 for ch in v):
                raise ValueError("must not contain control characters")
        return v

    @field_validator("password")
    @classmethod
    def _password(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and any(ord(ch) < 33 or ord(ch) == 127 for ch in v.get_secret_value()):
            raise ValueError("must be printable characters without spaces")
        return v


@dataclass(frozen=True)
class Record:
    """A connection as the API knows it."""

    conn: Connection
    managed_by: Literal["file", "api"]
    user_name: str | None
    password: SecretStr | None  # the connection's own password (API connections)
    created_at: float
    updated_at: float
    running: bool = True  # handed to the workers (False: over the limit at start-up)

    @property
    def id(self) -> str:
        return self.conn.connection_id


def _unsecret(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _unsecret(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unsecret(v) for v in value]
    return value


def secret_document(rec: Record) -> dict[str, Any]:
    """The stored form of an API record: everything, secrets in clear (the store is 0600)."""
    conn = _unsecret(rec.conn.model_dump(mode="python", exclude={"external_uac_settings": {"password_file"}}))
    conn = json.loads(json.dumps(conn, default=str))
    return {
        "connection": conn,
        "user_name": rec.user_name,
        "password": rec.password.get_secret_value() if rec.password is not None else None,
    }


def connection_input(conn: Connection) -> dict[str, Any]:
    """``conn`` as request-shaped JSON with its secrets, the base a PATCH is merged into."""
    doc = _unsecret(conn.model_dump(mode="python", exclude={"external_uac_settings": {"password_file"}}))
    out: dict[str, Any] = json.loads(json.dumps(doc, default=str))
    return out


def public_settings(model: BaseModel | None) -> dict[str, Any] | None:
    """A settings model as JSON without its secrets."""
    if model is None:
        return None
    hidden = {n for n in type(model).model_fields if n in _HIDDEN or isinstance(getattr(model, n), SecretStr)}
    out: dict[str, Any] = model.model_dump(mode="json", exclude=hidden)
    for name in out:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out[name] = public_settings(value)
    return out


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def build_connection(data: dict[str, Any], settings: AgentSettings) -> Connection:
    """Validate a connection exactly as the config file's models do, strictly typed."""
    problems: list[Problem] = []
    ext = data.get("external_uac_settings")
    if isinstance(ext, dict) and "password_file" in ext:
        problems.append(
            Problem(
                "unknown_field",
                "password_file is accepted in the config file only; send password",
                pointer="/external_uac_settings/password_file",
            )
        )
        ext = {k: v for k, v in ext.items() if k != "password_file"}
        data = {**data, "external_uac_settings": ext}
    try:
        conn = Connection.model_validate_json(json.dumps(data), strict=True)
    except ValidationError as e:
        problems += validation_problems(e)
        raise ApiError(422, *problems) from None
    if problems:
        raise ApiError(422, *problems)
    ext_s = conn.external_uac_settings
    if conn.registers and ext_s is not None and ext_s.transport == "TLS":
        if settings.sip.tls_ca_missing:
            raise ApiError.one(
                422,
                "tls_not_configured",
                "a TLS connection needs sip.tls_ca_file in the agent's config to verify the PBX certificate",
                pointer="/external_uac_settings/transport",
            )
    return conn


def fqdn_for(conn: Connection, settings: AgentSettings, worker: int | None = None) -> str:
    """host:port of the edge this connection's Contact names (it also carries ``;line=<id>``), so
    where the PBX sends this connection's calls: ``sip.port`` for UDP and TCP, ``sip.tls_port``
    for TLS, whichever worker holds it."""
    s = settings.sip
    host = s.external_signaling_address or s.bind
    if is_wildcard(host):  # a wildcard bind has no address of its own
        host = socket.getfqdn()
    elif ":" in host:
        host = f"[{host}]"
    ext = conn.external_uac_settings
    port = s.effective_tls_port if ext is not None and ext.transport == "TLS" else s.port
    return f"{host}:{port}"


def resource(rec: Record, status: ConnectionStatus | None, settings: AgentSettings) -> dict[str, Any]:
    c = rec.conn
    return {
        "record_type": "uac_connection",
        "id": c.connection_id,
        "user_id": c.user_id,
        "connection_name": c.connection_name,
        "user_name": rec.user_name,
        "active": c.active,
        "managed_by": rec.managed_by,
        "external_uac_settings": public_settings(c.external_uac_settings),
        "internal_uac_settings": public_settings(c.internal_uac_settings),
        "registration": {k: v for k, v in c.registration.model_dump().items() if v is not None},
        "fqdn": fqdn_for(c, settings, status.worker if status is not None else None),
        "pair_state": c.pair_state,
        "registration_status": int(status.registration_status) if status is not None else 0,
        "registered": status.registered if status is not None else False,
        "last_registration_response": status.last_registration_response if status is not None else None,
        "registration_status_updated_at": iso(status.registration_status_updated_at) if status is not None else None,
        "created_at": iso(rec.created_at),
        "updated_at": iso(rec.updated_at),
    }
