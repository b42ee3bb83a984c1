"""Call forwarding rules: plain Python, no SIP stack, no sockets, no clock reads.

Rules this module holds:

1. An INVITE belongs to the connection whose Contact it was sent to: the agent
   registers ``Contact: <sip:user@agent;line=<connection_id>>`` and the PBX's
   lookup puts that URI in the Request-URI. No ``line`` (or an unknown one) is a
   404; nothing is guessed from the To or From user.
2. Only the connection's PBX may call through it: the source IP must be one the
   connection's proxy / outbound_proxy resolved to, the address its registrar
   answered from, or inside one of its ``allowed_sources`` CIDRs. Else 403.
3. A bridged call (:class:`BridgeCall`) is a small state machine: events from
   the two legs in, actions out (the transition table below). Leg A (from the
   PBX) is answered only when leg B (to the destination) answers; B's failure
   code is relayed to A; a CANCEL or BYE on one leg ends the other; an
   unanswered leg B is ended after the ring timeout and A gets 480.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "Action",
    "BridgeCall",
    "BridgeState",
    "CallResult",
    "IllegalCallEventError",
    "Kind",
    "caller_identity",
    "leg_b_from_uri",
    "line_of",
    "request_uri",
    "result_for_code",
    "source_allowed",
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


def source_allowed(
    source_ip: str, pbx_addresses: Iterable[str], cidrs: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    """Whether ``source_ip`` may place calls through a connection (rule 2)."""
    try:
        ip = ipaddress.ip_address(source_ip.strip("[]"))
    except ValueError:
        return False
    for a in pbx_addresses:
        try:
            if ipaddress.ip_address(a.strip("[]")) == ip:
                return True
        except ValueError:
            continue
    return any(ip.version == net.version and ip in net for net in cidrs)


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


_SAFE_DISPLAY_RE = re.compile(r'[\x00-\x1f"\\]')


def leg_b_from_uri(display: str, user: str, host: str, fallback_user: str) -> str:
    """The From of leg B: the caller's display name and user at the agent's host."""
    user = user if user and re.fullmatch(r"[A-Za-z0-9._~!$&'()*+,;=%+-]{1,128}", user) else fallback_user
    uri = f"<sip:{user}@{host}>"
    display = _SAFE_DISPLAY_RE.sub("", display)[:64].strip()
    return f'"{display}" {uri}' if display else uri


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


class BridgeState(enum.StrEnum):
    CALLING = "calling"  # leg B INVITE sent, nothing back yet
    EARLY = "early"  # leg B sent 180/183, relayed to leg A
    ANSWERED = "answered"  # leg B answered, leg A answered 200
    ENDED = "ended"


class Kind(enum.Enum):
    ANSWER_A = "answer_a"  # send a provisional or 200 to leg A (``code``)
    REJECT_A = "reject_a"  # final failure to leg A (``code``)
    HANGUP_A = "hangup_a"  # BYE leg A
    HANGUP_B = "hangup_b"  # CANCEL or BYE leg B, whichever its state needs


@dataclass(frozen=True)
class Action:
    kind: Kind
    code: int = 0


class IllegalCallEventError(Exception):
    """An event that the bridge's current state does not accept."""


# What each event may do in each state; anything else raises IllegalCallEventError
# except the events listed in _IGNORED (late or duplicate reports from a leg).
_ACCEPTS: dict[BridgeState, frozenset[str]] = {
    BridgeState.CALLING: frozenset({"b_progress", "b_answered", "b_failed", "a_ended", "ring_timeout"}),
    BridgeState.EARLY: frozenset({"b_progress", "b_answered", "b_failed", "a_ended", "ring_timeout"}),
    BridgeState.ANSWERED: frozenset({"a_ended", "b_ended"}),
    BridgeState.ENDED: frozenset(),
}
_IGNORED: dict[BridgeState, frozenset[str]] = {
    BridgeState.CALLING: frozenset(),
    BridgeState.EARLY: frozenset(),
    BridgeState.ANSWERED: frozenset({"b_progress", "b_answered", "ring_timeout"}),
    BridgeState.ENDED: frozenset({"b_progress", "b_answered", "b_failed", "b_ended", "a_ended", "ring_timeout"}),
}


@dataclass
class BridgeCall:
    """One forwarded call in bridge mode. Times are seconds from the caller's clock."""

    started_at: float
    ring_timeout_sec: float
    state: BridgeState = BridgeState.CALLING
    result: CallResult | None = None
    code: int | None = None  # the final code leg A got
    answered_at: float | None = None
    relayed: list[int] = field(default_factory=list)  # provisional codes sent to leg A

    @property
    def ring_deadline(self) -> float | None:
        if self.state in (BridgeState.CALLING, BridgeState.EARLY):
            return self.started_at + self.ring_timeout_sec
        return None

    def _check(self, event: str) -> bool:
        if event in _ACCEPTS[self.state]:
            return True
        if event in _IGNORED[self.state]:
            return False
        raise IllegalCallEventError(f"{event} in state {self.state.value}")

    def _end(self, result: CallResult, code: int | None) -> None:
        self.state = BridgeState.ENDED
        self.result = result
        if code is not None:
            self.code = code

    def b_progress(self, code: int, early_media: bool) -> list[Action]:
        """Leg B sent a provisional response (180, or 183 with SDP)."""
        if not self._check("b_progress") or code <= 100:
            return []
        relay = 183 if early_media else 180
        self.state = BridgeState.EARLY
        if relay in self.relayed:
            return []
        self.relayed.append(relay)
        return [Action(Kind.ANSWER_A, relay)]

    def b_answered(self, now: float) -> list[Action]:
        if not self._check("b_answered"):
            return []
        self.state = BridgeState.ANSWERED
        self.answered_at = now
        self.result = CallResult.ANSWERED
        self.code = 200
        return [Action(Kind.ANSWER_A, 200)]

    def b_failed(self, code: int) -> list[Action]:
        """Leg B ended before answering with ``code`` (0: no response at all)."""
        if not self._check("b_failed"):
            return []
        relay = code if 400 <= code <= 699 else (480 if code in (0, 487) else 500)
        if relay == 487:  # leg B was cancelled, but not by the PBX: nobody answered
            relay = 480
        self._end(result_for_code(code), relay)
        return [Action(Kind.REJECT_A, relay)]

    def a_ended(self) -> list[Action]:
        """Leg A went away: CANCEL while ringing, or BYE once answered."""
        if not self._check("a_ended"):
            return []
        if self.state is BridgeState.ANSWERED:
            self._end(CallResult.ANSWERED, None)
        else:
            self._end(CallResult.CANCELLED, 487)
        return [Action(Kind.HANGUP_B)]

    def b_ended(self) -> list[Action]:
        """The destination hung up an answered call (BYE)."""
        if not self._check("b_ended"):
            return []
        self._end(CallResult.ANSWERED, None)
        return [Action(Kind.HANGUP_A)]

    def poll(self, now: float) -> list[Action]:
        """The ring timeout: end leg B and answer leg A with 480."""
        deadline = self.ring_deadline
        if deadline is None or now < deadline or not self._check("ring_timeout"):
            return []
        self._end(CallResult.NO_ANSWER, 480)
        return [Action(Kind.HANGUP_B), Action(Kind.REJECT_A, 480)]
