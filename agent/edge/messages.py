"""Every value that crosses the boundary between the supervisor and the edge's engines.

The supervisor hands Kamailio data, never code: one :class:`EdgeConnection` per placed
connection (the htable ``conn``, keyed by the Contact's ``;line=`` token) and one
:class:`TlsTarget` per TLS PBX address (the htables ``tlsport`` and ``tlspeer``, and
HAProxy's maps). Kamailio tells the supervisor what happened as JSON lines on its
event stream (evapi), read here into :data:`EdgeEvent` values; anything else is refused.

The record layout is the one ``routes.cfg`` reads (route ``CONN``): fields joined by ``|``,
lists by ``,``. Nothing in them may hold those characters (config and API values are
checked at the boundary; :func:`_field` refuses the rest).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CallEnded",
    "CallFailover",
    "CallFinal",
    "CallPlainRtp",
    "CallRedirected",
    "CallRejected",
    "CallStarted",
    "EdgeConnection",
    "EdgeEvent",
    "EdgeEventError",
    "TcpClosed",
    "TcpPending",
    "TlsTarget",
    "parse_event",
]


def _field(value: str) -> str:
    if "|" in value or "\n" in value:
        raise ValueError(f"{value!r} cannot be handed to the edge (it holds '|' or a newline)")
    return value


@dataclass(frozen=True)
class EdgeConnection:
    """How the edge routes one connection's calls and REGISTERs."""

    line: str  # the Contact's ;line= token (the connection_id)
    connection_id: str
    transport: Literal["UDP", "TCP", "TLS"]  # a TCP or TLS connection's calls come over that transport only
    mode: Literal["bridge", "redirect", "none"]  # none: no destination_uri
    destination: str  # leg B's Request-URI (or the 302's Contact); "" with mode none
    targets: tuple[str, ...]  # where leg B goes, in failover order; (): to the Request-URI itself
    ring_timeout_sec: int
    max_calls: int | None
    sources: tuple[str, ...]  # networks calls may come from (CIDRs)
    pbx_address: str  # what the PBX is told (Via); "" : the socket's own
    pbx_record_route: str  # host:port[;transport=...] the PBX reaches the edge at, in dialogs
    dest_address: str  # what the destination is told (Via, Record-Route)
    pbx_media: str  # rtpengine's interface towards the PBX
    dest_media: str  # ... towards the destination
    from_user: str  # the REGISTER's From user ("": the AoR's)
    # For logs only (not sent to Kamailio): each target's label (host name, address, SRV), by URI.
    target_labels: tuple[tuple[str, str], ...] = ()

    def label_of(self, uri: str) -> str:
        return dict(self.target_labels).get(uri, uri)

    def encode(self) -> str:
        """The htable value routes.cfg's route CONN reads."""
        parts = [
            self.connection_id,
            self.transport.lower(),
            self.mode,
            self.destination,
            ",".join(self.targets),
            str(self.ring_timeout_sec * 1000),
            str(self.max_calls or 0),
            ",".join(self.sources),
            self.pbx_address,
            self.pbx_record_route,
            self.dest_address,
            self.pbx_media,
            self.dest_media,
            self.from_user,
        ]
        for p in parts:
            _field(p)
        if any("," in t for t in (*self.targets, *self.sources)):
            raise ValueError("a target or a source holds ','")
        return "|".join(parts)


@dataclass(frozen=True)
class TlsTarget:
    """A TLS PBX address the edge dials through HAProxy's loopback port ``port``."""

    name: str  # the host name its certificate must carry (sent as SNI)
    address: str  # the IP dialled
    port: int  # the PBX's port
    local_port: int  # the loopback port Kamailio connects to

    @property
    def key(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


# -- events (Kamailio -> supervisor) ---------------------------------------------------


class EdgeEventError(ValueError):
    """A line on the event stream that is not an event the edge sends."""


@dataclass(frozen=True)
class CallStarted:
    """An INVITE was admitted and sent on towards the destination."""

    connection_id: str
    call_id: str
    source: str
    from_value: str
    request_uri: str
    at: float
    transport: str = ""  # udp, tcp or tls: what the PBX's INVITE came over


@dataclass(frozen=True)
class CallRejected:
    """A request the edge refused (``connection_id`` "" when it matched none)."""

    connection_id: str
    call_id: str
    method: str
    reason: str  # the metric's label: unknown_contact, source_not_allowed, ...
    code: int
    source: str
    transport: str
    request_uri: str
    at: float


@dataclass(frozen=True)
class CallRedirected:
    connection_id: str
    call_id: str
    at: float


@dataclass(frozen=True)
class CallFinal:
    """The final answer for leg A: ``by`` says whose it was (destination, pbx_cancel, ring_timeout, edge)."""

    connection_id: str
    call_id: str
    code: int  # 0: the destination never answered
    by: str
    at: float
    started_at: float


@dataclass(frozen=True)
class CallFailover:
    """Leg B went on to the destination's next target (``failed``: host:port; code 0: no answer;
    ``next``: the target's URI)."""

    connection_id: str
    call_id: str
    failed: str
    code: int
    at: float
    next: str = ""


@dataclass(frozen=True)
class CallPlainRtp:
    """The destination refused the PBX's SDES-SRTP offer (488): leg B is offered again to the
    same target (``target``: its URI, "" for the Request-URI) as plain RTP, and the relay keeps
    SRTP towards the PBX."""

    connection_id: str
    call_id: str
    target: str
    at: float


@dataclass(frozen=True)
class CallEnded:
    """An answered call ended (BYE from either side, or the dialog timed out)."""

    connection_id: str
    call_id: str
    at: float
    started_at: float


@dataclass(frozen=True)
class TcpClosed:
    address: str
    port: int


@dataclass(frozen=True)
class TcpPending:
    """A worker's request went to the PBX at ``address``:``port`` over TCP (the connection
    :class:`TcpClosed` names when it closes)."""

    address: str
    port: int
    call_id: str
    cseq: str


@dataclass(frozen=True)
class TlsPending:
    """A worker's request went to the TLS target behind loopback port ``port``."""

    port: int
    call_id: str
    cseq: str


@dataclass(frozen=True)
class TlsFailure:
    """HAProxy could not set up TLS to the target behind loopback port ``port`` (its log line)."""

    port: int
    name: str
    reason: str


EdgeEvent = (
    CallStarted
    | CallRejected
    | CallRedirected
    | CallFinal
    | CallFailover
    | CallPlainRtp
    | CallEnded
    | TcpClosed
    | TcpPending
    | TlsPending
)

# What HAProxy logs for a connection to a TLS target that ended in error (agent/edge/haproxy.py)
_TLS_OUT = re.compile(r"tls_out port=(\d+) name=(\S*) state=(\S+) ssl_err=(\S*) reason=(.*)$")


def parse_tls_failure(line: str) -> TlsFailure | None:
    """HAProxy's line about a failed connection to a TLS target, or None for any other line."""
    m = _TLS_OUT.search(line)
    if m is None:
        return None
    port, name, state, _err, reason = m.groups()
    reason = reason.strip().strip('"')
    if reason in ("", "-"):
        known = {"SC": "connection refused", "sC": "connection timed out"}
        reason = known.get(state[:2], f"connection ended ({state})")
    return TlsFailure(int(port), "" if name == "-" else name, reason)


def _unhex(v: str) -> str:
    """A Call-ID the edge hex-encoded (``cix``), so that nothing in it needs escaping."""
    try:
        return bytes.fromhex(v).decode(errors="replace")
    except ValueError as e:
        raise EdgeEventError(f"bad cix {v[:80]!r}") from e


def _time(v: object) -> float:
    try:
        return float(str(v))
    except ValueError:
        return 0.0


def parse_event(data: bytes) -> EdgeEvent:
    """One JSON event from Kamailio; EdgeEventError for anything else."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeEventError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise EdgeEventError("not a JSON object")

    def s(key: str) -> str:
        v = obj.get(key, "")
        return v if isinstance(v, str) else str(v)

    def i(key: str) -> int:
        v = obj.get(key, 0)
        try:
            return int(v)
        except (TypeError, ValueError):
            return 0

    kind = s("ev")
    cid, ci, at = s("cid"), s("ci") or _unhex(s("cix")), _time(obj.get("t"))
    if kind == "start":
        return CallStarted(cid, ci, s("src"), s("from"), s("ruri"), at, s("proto"))
    if kind == "rejected":
        return CallRejected(cid, ci, s("method"), s("reason"), i("code"), s("src"), s("proto"), s("ruri"), at)
    if kind == "redirected":
        return CallRedirected(cid, ci, at)
    if kind == "final":
        return CallFinal(cid, ci, i("code"), s("by"), at, _time(obj.get("t0")))
    if kind == "failover":
        return CallFailover(cid, ci, s("by"), i("code"), at, s("next"))
    if kind == "plain_rtp":
        return CallPlainRtp(cid, ci, s("by"), at)
    if kind == "end":
        return CallEnded(cid, ci, at, _time(obj.get("t0")))
    if kind == "tcp_pending":
        return TcpPending(s("ip").strip("[]"), i("port") or 5060, ci, s("cseq"))
    if kind == "tls_pending":
        return TlsPending(i("port"), ci, s("cseq"))
    if kind == "tcp_closed":
        return TcpClosed(s("ip"), i("port"))
    raise EdgeEventError(f"unknown event {kind!r}")
