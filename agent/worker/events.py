"""What the SIP stack reports, as plain data (no pjsua2 types)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "FORWARD_KEY",
    "KeepaliveResult",
    "RegResult",
    "RegStarted",
    "SipEvent",
    "StackLog",
]


# The key of the worker's own account (probes of a registrar's other targets).
FORWARD_KEY = "__forward__"


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
class KeepaliveResult:
    """The end of a keepalive OPTIONS an account sent (agent/core/liveness.py)."""

    key: str
    code: int
    reason: str
    received: bool  # a SIP response came back (False: timeout, transport error)


@dataclass(frozen=True)
class StackLog:
    level: int
    message: str


SipEvent = RegStarted | RegResult | KeepaliveResult | StackLog
