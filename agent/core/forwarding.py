"""Call forwarding rules: plain Python, no SIP stack, no sockets, no clock reads.

The edge (Kamailio) carries every call; these rules are what it is handed and how what
it reports is read. Rules this module holds:

1. An INVITE belongs to the connection whose Contact it was sent to: the agent
   registers ``Contact: <sip:user@edge;line=<connection_id>>``, and the ``line``
   parameter survives a PBX that puts the dialled number in the Request-URI's user
   (as Asterisk's own ``line=`` does). No ``line`` (or an unknown one) is a 404;
   nothing is guessed from the To or From user.
2. Only the connection's PBX may call through it (:func:`call_sources`): the addresses
   its proxy and outbound_proxy resolved to, and its ``allowed_sources`` CIDRs; a TCP or
   TLS connection's calls come over that transport only. Else 403.
3. What a call ended as (:func:`final_outcome`): the destination's answer is relayed to
   the PBX (no answer at all, or a 487 the PBX did not ask for: 480), a CANCEL from the
   PBX is ``cancelled``, the ring timeout ``no_answer`` (480).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable

__all__ = [
    "CallResult",
    "call_sources",
    "caller_identity",
    "final_outcome",
    "line_of",
    "request_uri",
    "result_for_code",
]

_LINE_RE = re.compile(r";line=([A-Za-z0-9._-]{1,64})(?=[;?>\s]|$)", re.IGNORECASE)


def request_uri(whole_msg: str) -> str:
    """The Request-URI of a SIP request (the second token of its first line)."""
    first = whole_msg.split("\n", 1)[0].strip()
    parts = first.split()
    return parts[1] if len(parts) >= 3 else ""


def line_of(ruri: str) -> str | None:
    """The ``line`` URI parameter the agent put in its Contact, if present."""
    uri = ruri.split("?", 1)[0]
    m = _LINE_RE.search(uri)
    return m.group(1) if m else None


def call_sources(pbx_addresses: Iterable[str], allowed: Iterable[str]) -> tuple[str, ...]:
    """The networks a connection's calls may come from (rule 2), as CIDRs for the edge."""
    out: list[str] = []
    for a in pbx_addresses:
        try:
            ip = ipaddress.ip_address(a.strip("[]"))
        except ValueError:
            continue
        out.append(f"{ip}/{ip.max_prefixlen}")
    for net in allowed:
        out.append(str(ipaddress.ip_network(net, strict=False)))
    return tuple(dict.fromkeys(out))


_NAME_ADDR_RE = re.compile(r'^\s*(?:"(?P<q>(?:[^"\\]|\\.)*)"|(?P<t>[^<"]*?))\s*<(?P<uri>[^>]*)>')
_USER_RE = re.compile(r"^sips?:(?P<user>[^@;>]+)@", re.IGNORECASE)


def caller_identity(from_value: str) -> tuple[str, str]:
    """(display name, user) of a From header value; either may be empty."""
    m = _NAME_ADDR_RE.match(from_value)
    if m:
        display = (m.group("q") if m.group("q") is not None else (m.group("t") or "")).strip()
        uri = m.group("uri")
    else:
        display, uri = "", from_value.strip().split(";", 1)[0]
    u = _USER_RE.match(uri.strip())
    return display, (u.group("user") if u else "")


class CallResult(enum.StrEnum):
    """The ``result`` label of ``uac_agent_calls_total``."""

    ANSWERED = "answered"
    REDIRECTED = "redirected"
    BUSY = "busy"  # destination answered 486 or 600
    DECLINED = "declined"  # destination answered 603
    NO_ANSWER = "no_answer"  # ring timeout, the PBX got 480
    CANCELLED = "cancelled"  # the PBX cancelled before the destination answered
    FAILED = "failed"  # any other failure of leg B (404, 480, 5xx, no response ...)
    REJECTED = "rejected"  # the agent refused the INVITE (403, 404, over limit)


def result_for_code(code: int) -> CallResult:
    """How a final failure from the destination is counted."""
    if code in (486, 600):
        return CallResult.BUSY
    if code == 603:
        return CallResult.DECLINED
    return CallResult.FAILED


def final_outcome(code: int, by: str) -> tuple[CallResult, int]:
    """(result, the code the PBX got) of leg A's final answer, from the edge's report: ``code``
    is the destination's (0: none came), ``by`` whose answer it was (destination, pbx_cancel,
    ring_timeout, edge)."""
    if by == "pbx_cancel":
        return CallResult.CANCELLED, 487
    if by == "ring_timeout":
        return CallResult.NO_ANSWER, 480
    if by == "edge":
        return CallResult.FAILED, code or 500
    if 200 <= code < 300:
        return CallResult.ANSWERED, code
    relayed = code if 400 <= code <= 699 and code != 487 else (480 if code in (0, 487) else 500)
    if code == 503:  # a proxy never relays a 503 (RFC 3261 16.7): the edge answers 500 (routes.cfg)
        relayed = 500
    return result_for_code(code), relayed
