"""What the SIP stack reports, as plain data (no pjsua2 types)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "FORWARD_KEY",
    "CallDtmf",
    "CallMedia",
    "CallRefusedByStack",
    "CallState",
    "IncomingCall",
    "KeepaliveResult",
    "RegResult",
    "RegStarted",
    "SipEvent",
    "StackLog",
    "TransportDown",
]


# The key of the worker's own account (leg B of calls, probes of a registrar's other targets).
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
class TransportDown:
    kind: str  # "TCP", "TLS", ...
    remote: str
    error: str


@dataclass(frozen=True)
class StackLog:
    level: int
    message: str


@dataclass(frozen=True)
class IncomingCall:
    """An INVITE reached the agent (pjsua made call leg ``leg`` for it)."""

    leg: int
    request_uri: str
    source: str  # "ip:port" it came from
    call_id: str
    from_value: str  # the From header's value


@dataclass(frozen=True)
class CallState:
    leg: int
    state: str  # "calling", "incoming", "early", "connecting", "confirmed", "disconnected"
    code: int  # last SIP status code on the leg (0 when none)
    reason: str
    call_id: str


@dataclass(frozen=True)
class CallMedia:
    leg: int
    active: bool  # audio is flowing (or can be connected)


@dataclass(frozen=True)
class CallRefusedByStack:
    """The stack refused an incoming INVITE itself (486), before the agent saw it."""

    reason: str


@dataclass(frozen=True)
class CallDtmf:
    leg: int
    digit: str
    method: str  # "rfc2833" or "info"
    duration_ms: int


SipEvent = (
    RegStarted
    | RegResult
    | KeepaliveResult
    | TransportDown
    | StackLog
    | IncomingCall
    | CallState
    | CallMedia
    | CallDtmf
    | CallRefusedByStack
)
