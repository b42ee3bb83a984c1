"""Plain data the engine hands the adapter (no pjsua2 types)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["AccountSpec", "StackSettings"]


@dataclass(frozen=True)
class StackSettings:
    bind: str
    port: int
    tls_port: int
    tls_ca_file: Path | None
    tls_verify_server: bool
    user_agent: str
    log_level: int
    trace: bool
    want_tls: bool
    rtp_address: str = "127.0.0.1"
    rtp_port: int = 40000
    rtp_port_range: int = 1000
    call_slots: int = 32


@dataclass(frozen=True)
class AccountSpec:
    key: str
    id_uri: str
    registrar_uri: str
    proxies: tuple[str, ...]
    transport: str
    auth_username: str
    password: str
    expires: int
    contact_uri_params: str
