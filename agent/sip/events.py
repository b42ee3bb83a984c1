"""What the SIP stack reports, as plain data (no pjsua2 types)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RegResult", "RegStarted", "SipEvent", "StackLog", "TransportDown"]


@dataclass(frozen=True)
class RegStarted:
    key: str
    renew: bool


@dataclass(frozen=True)
class RegResult:
    key: str
    code: int
    reason: str
    expiration: int
    status: int  # pj_status_t; non-zero when the stack failed locally
    received: bool  # a SIP response was received (False: timeout/transport error)
    source: str  # "ip:port" of the registrar that answered
    retry_after: int | None
    min_expires: int | None


@dataclass(frozen=True)
class TransportDown:
    kind: str  # "TCP", "TLS", ...
    remote: str
    error: str


@dataclass(frozen=True)
class StackLog:
    level: int
    message: str


SipEvent = RegStarted | RegResult | TransportDown | StackLog
