"""Registration policy of one connection: a state machine with no I/O.

Rules
-----
* Events come in as method calls (``activate``, ``poll``, ``on_response``,
  ``on_flow_lost``, ``request_refresh``, ``stop``); decisions come out of
  ``poll()`` as an :class:`Action` the caller must carry out at once.
* Time comes only from the injected :class:`~agent.core.clock.Clock`, and
  chance only from the injected ``random.Random``: tests drive both.
* At most one REGISTER is in flight. A refresh is sent at
  ``max(granted - refresh_margin, granted / 2)`` after the last 2xx.
* Transient failures (no answer, 408, 429, 480, 5xx, 6xx, transport errors)
  back off as RFC 5626 §4.5: the upper bound is
  ``min(retry_max, retry_base * 2**failures)`` and the wait is drawn from
  ``[upper/2, upper]``; a Retry-After larger than that wins. A 2xx that grants
  no time (Expires: 0) made no binding: it backs off the same way.
* Rejected credentials (401/407 after credentials were sent, 403) and other
  4xx retry only after ``forbidden_retry_interval`` (plus up to 10 % jitter,
  never less): never hammer the PBX, never give up for good.
* 423 adopts Min-Expires and asks again at once (once per larger value); a
  423 whose Min-Expires is not larger backs off.
* A failure the caller fails over (the registrar's next DNS target,
  agent/core/targets.py) asks again at once and does not count toward the
  backoff; the round's last target's failure does.
* A binding is ``registered`` from a 2xx until its granted expiry passes
  without another 2xx; then ``registration_status`` becomes EXPIRED.
* A lost TCP/TLS flow re-registers at once.
* ``stop()`` unregisters (Expires: 0) a binding that exists, after any
  REGISTER in flight has been answered.
* An answer with no REGISTER in flight is ignored (never counted twice),
  except while REGISTERED with no stop pending: it is the stack's own refresh,
  taken as a refresh sent now.

The table
---------
Every (state, event) pair the policy knows is a row of ``TABLE``: the next
state, the rule for the next timer, what else changes, and a note; a row
whose outcome differs while a stop is pending carries that row beside it
(``Row.stopping``), h11 style. An event is a command (a method call), a timer
``poll()`` finds due, or an answer, classed by :func:`answer_event`. A pair
the table does not list raises :class:`IllegalTransitionError`;
``TRANSITIONS`` (which states may follow which) is derived from it.
``python -m agent.core.policy --markdown`` prints the table for operators
(docs/policy.md; a unit test keeps that file true).
"""

from __future__ import annotations

import enum
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from agent.core.clock import Clock
from agent.core.responses import ResponseClass, classify, response_text

__all__ = [
    "EVENT_TEXT",
    "TABLE",
    "TIMER_TEXT",
    "TRANSITIONS",
    "Action",
    "Effect",
    "EventKind",
    "IllegalTransitionError",
    "NextTimer",
    "Outcome",
    "PolicySettings",
    "PolicySnapshot",
    "RegState",
    "RegisterResponse",
    "RegistrationPolicy",
    "RegistrationStatus",
    "Row",
    "answer_event",
    "iter_rows",
    "render_markdown",
]


class RegState(enum.StrEnum):
    DISABLED = "DISABLED"  # connection not active: nothing is sent
    WAITING = "WAITING"  # random initial delay before the first REGISTER
    REGISTERING = "REGISTERING"  # a REGISTER is in flight
    REGISTERED = "REGISTERED"  # 2xx received; refresh scheduled
    RETRY_WAIT = "RETRY_WAIT"  # last attempt failed; retry scheduled
    UNREGISTERING = "UNREGISTERING"  # REGISTER Expires: 0 in flight
    STOPPED = "STOPPED"  # stopped; nothing more is sent


class RegistrationStatus(enum.IntEnum):
    """Seed 004's ``registration_status`` codes."""

    NOT_APPLICABLE = 0
    NOT_REGISTERED = 1
    FAILED = 2
    EXPIRED = 3
    SUCCESS = 4
    UNREGISTERED = 5


class Action(enum.Enum):
    REGISTER = "register"
    UNREGISTER = "unregister"


class IllegalTransitionError(RuntimeError):
    """A move the state table does not allow: a bug in the caller or here."""


@dataclass(frozen=True)
class PolicySettings:
    expiration_sec: int = 3600
    initial_delay_max_sec: float = 2.0
    refresh_margin_sec: float = 30.0
    retry_base_sec: float = 30.0
    retry_max_sec: float = 1800.0
    forbidden_retry_interval_sec: float = 300.0
    register_timeout_sec: float = 40.0
    unregister_timeout_sec: float = 5.0
    retry_after_max_sec: float = 86400.0
    # Registrar liveness (agent/core/liveness.py), run beside the policy by the worker.
    keepalive_interval_sec: float = 30.0
    keepalive_misses: int = 2


@dataclass(frozen=True)
class RegisterResponse:
    """A final answer to a REGISTER, or a failure with no SIP answer (code 0)."""

    code: int
    reason: str = ""
    expires: int | None = None  # granted expiry, meaningful on 2xx only
    retry_after: int | None = None
    min_expires: int | None = None
    source_ip: str | None = None  # registrar's address that answered
    error: str | None = None  # transport/TLS failure text when code is 0 or stack-made

    @property
    def text(self) -> str:
        if self.error:
            return self.error
        return response_text(self.code, self.reason)


@dataclass(frozen=True)
class Outcome:
    """What ``on_response`` did, for logs and metrics."""

    response_class: ResponseClass | None
    text: str
    duration: float | None  # REGISTER sent to final answer
    next_in: float | None  # seconds until the next action, if any
    state: RegState
    registration_status: RegistrationStatus
    unregister: bool = False
    ignored: bool = False


@dataclass(frozen=True)
class PolicySnapshot:
    state: RegState
    registered: bool
    registration_status: RegistrationStatus
    registration_status_updated_at: float | None  # wall time
    last_registration_response: str | None
    last_response_code: int
    last_registered_ip: str | None
    requested_expires: int
    granted_expires: int | None
    binding_expires_at: float | None  # wall time
    consecutive_failures: int
    auth_retries: int
    next_action: str | None
    next_action_at: float | None  # wall time
    registered_since: float | None  # wall time
    uptime_sec: float | None
    attempts: int
    # Registrar liveness (agent/core/liveness.py), filled in by the worker beside the policy.
    registrar_reachable: bool | None = None
    keepalive_misses: int = 0
    last_keepalive: str | None = None
    registrar_reachable_since: float | None = None  # wall time registrar_reachable last changed
    # The target REGISTERs go to when the next hop is a host name (agent/core/targets.py).
    target: str | None = None


# -- events ------------------------------------------------------------------------


class EventKind(enum.StrEnum):
    """What can happen to a connection: a command, a timer found due by ``poll()``, or an answer."""

    # commands: the caller's method calls
    ACTIVATE = "activate"
    STOP = "stop"
    REQUEST_REFRESH = "request_refresh"
    FLOW_LOST = "flow_lost"
    # timers: found due by poll(), in this order
    BINDING_EXPIRY = "binding_expiry"
    REGISTER_TIMEOUT = "register_timeout"
    UNREGISTER_TIMEOUT = "unregister_timeout"
    UNREGISTER_DUE = "unregister_due"
    STOP_DUE = "stop_due"
    REGISTER_DUE = "register_due"
    REFRESH_DUE = "refresh_due"
    RETRY_DUE = "retry_due"
    FAILOVER_DUE = "failover_due"
    # answers: on_response(), classed by answer_event()
    GRANTED = "2xx"
    NOT_GRANTED = "2xx_expires_0"
    TOO_BRIEF_LARGER = "423_larger"
    TOO_BRIEF_NOT_LARGER = "423_not_larger"
    AUTH_REJECTED = "auth_rejected"
    REJECTED = "rejected"
    TRANSIENT = "transient"
    FAILOVER = "failover"
    UNREGISTERED = "unregister_2xx"
    UNREGISTER_FAILED = "unregister_failed"
    STRAY = "stray_answer"


_COMMAND_EVENTS = (EventKind.ACTIVATE, EventKind.STOP, EventKind.REQUEST_REFRESH, EventKind.FLOW_LOST)
_TIMER_EVENTS = (
    EventKind.BINDING_EXPIRY,
    EventKind.REGISTER_TIMEOUT,
    EventKind.UNREGISTER_TIMEOUT,
    EventKind.UNREGISTER_DUE,
    EventKind.STOP_DUE,
    EventKind.REGISTER_DUE,
    EventKind.REFRESH_DUE,
    EventKind.RETRY_DUE,
    EventKind.FAILOVER_DUE,
)

EVENT_TEXT: dict[EventKind, str] = {
    EventKind.ACTIVATE: "`activate()`: the connection is enabled (added, or registered again after a stop)",
    EventKind.STOP: "`stop()`: the connection is removed, disabled, replaced or unregistered, or the agent stops",
    EventKind.REQUEST_REFRESH: "`request_refresh()`: register now (an operator's request, the registrar answering "
    "keepalives again, a failover after keepalive misses)",
    EventKind.FLOW_LOST: "`on_flow_lost()`: the TCP/TLS connection the binding lives on dropped",
    EventKind.BINDING_EXPIRY: "the granted expiry passed without another 2xx",
    EventKind.REGISTER_TIMEOUT: "no final answer to the REGISTER within `register_timeout_sec`",
    EventKind.UNREGISTER_TIMEOUT: "no final answer to the unregister within `unregister_timeout_sec`",
    EventKind.UNREGISTER_DUE: "a stop is pending and a binding exists",
    EventKind.STOP_DUE: "a stop is pending and no binding exists",
    EventKind.REGISTER_DUE: "a `register` timer is due (the first REGISTER, or one asked for at once)",
    EventKind.REFRESH_DUE: "the `refresh` timer is due",
    EventKind.RETRY_DUE: "the `retry` timer is due",
    EventKind.FAILOVER_DUE: "the `failover` timer is due (the registrar's next target)",
    EventKind.GRANTED: "2xx granting an expiry > 0 (none given: the requested one)",
    EventKind.NOT_GRANTED: "2xx granting no time (Expires: 0): no binding was made",
    EventKind.TOO_BRIEF_LARGER: "423 with a Min-Expires larger than the expiry requested",
    EventKind.TOO_BRIEF_NOT_LARGER: "423 with no Min-Expires, or one not larger than the expiry requested",
    EventKind.AUTH_REJECTED: "401/407 (the stack answers the first challenge itself, so the credentials were "
    "refused) or 403",
    EventKind.REJECTED: "any other 4xx (404 unknown user, 400, 420, ...)",
    EventKind.TRANSIENT: "no answer, 408, 429, 480, 5xx, 6xx, or a transport, TLS or DNS failure",
    EventKind.FAILOVER: "a failure the caller fails over (`failover=True`: 408, 480, 503, 504 or no answer, and "
    "another of the registrar's targets is next; agent/core/targets.py)",
    EventKind.UNREGISTERED: "2xx to the unregister",
    EventKind.UNREGISTER_FAILED: "any other answer to the unregister, or none",
    EventKind.STRAY: "an answer with no REGISTER in flight (a late or repeated report, or the stack's own refresh)",
}


def answer_event(state: RegState, resp: RegisterResponse, failover: bool, requested_expires: int) -> EventKind:
    """The event an answer is in ``state``: to the unregister in flight, to the REGISTER in flight
    (or to the stack's own refresh, once the policy took it), or to nothing (``STRAY``)."""
    if state is RegState.UNREGISTERING:
        return EventKind.UNREGISTERED if 200 <= resp.code < 300 else EventKind.UNREGISTER_FAILED
    if state is not RegState.REGISTERING:
        return EventKind.STRAY
    cls = _answer_class(resp)
    if cls is ResponseClass.SUCCESS:  # never a failover: the registrar gave its word
        return EventKind.GRANTED if resp.expires is None or resp.expires > 0 else EventKind.NOT_GRANTED
    if cls is ResponseClass.TOO_BRIEF and resp.min_expires and resp.min_expires > requested_expires:
        return EventKind.TOO_BRIEF_LARGER  # before a failover: this target asked for something we can give
    if failover:
        return EventKind.FAILOVER
    return _FAILURES[cls]


def _answer_class(resp: RegisterResponse) -> ResponseClass:
    return ResponseClass.TRANSIENT if resp.error is not None else classify(resp.code)


_FAILURES: dict[ResponseClass, EventKind] = {
    ResponseClass.TOO_BRIEF: EventKind.TOO_BRIEF_NOT_LARGER,
    ResponseClass.AUTH_REJECTED: EventKind.AUTH_REJECTED,
    ResponseClass.REJECTED: EventKind.REJECTED,
    ResponseClass.TRANSIENT: EventKind.TRANSIENT,
}

# The kind of the timer poll() finds due -> its event.
_DUE: dict[str, EventKind] = {
    "register": EventKind.REGISTER_DUE,
    "refresh": EventKind.REFRESH_DUE,
    "retry": EventKind.RETRY_DUE,
    "failover": EventKind.FAILOVER_DUE,
}


# -- rules for the next timer and for what else changes ----------------------------


class NextTimer(enum.Enum):
    """When the next REGISTER goes; the value is the text the docs show."""

    KEEP = "unchanged"
    NONE = "none"
    INITIAL = "register in uniform(0, initial_delay_max_sec)"
    AT_ONCE = "register at once"
    REFRESH = "refresh in max(granted - refresh_margin_sec, granted / 2)"
    BACKOFF = "retry in backoff"
    SLOW = "retry in forbidden interval"
    FAILOVER = "failover at once"
    STOP_NEXT = "none: poll() unregisters (or stops) at once"


TIMER_TEXT: dict[NextTimer, str] = {
    NextTimer.KEEP: "the timer set before stays",
    NextTimer.NONE: "no timer: only an event moves on",
    NextTimer.INITIAL: "`register` after a random delay in [0, `initial_delay_max_sec`], so many connections "
    "never storm a PBX together",
    NextTimer.AT_ONCE: "`register` due now",
    NextTimer.REFRESH: "`refresh` after `max(granted - refresh_margin_sec, granted / 2)`, from the expiry the "
    "registrar granted",
    NextTimer.BACKOFF: "`retry` after a wait drawn from [u/2, u], u = `min(retry_max_sec, retry_base_sec * "
    "2^failures)` (RFC 5626 §4.5); a Retry-After larger than that (at most `retry_after_max_sec`) wins",
    NextTimer.SLOW: "`retry` after `forbidden_retry_interval_sec` times a draw from [1.0, 1.1]",
    NextTimer.FAILOVER: "`failover` due now: the next REGISTER goes to the registrar's next target",
    NextTimer.STOP_NEXT: "no timer; the stop is due: the next `poll()` unregisters a binding that exists, else stops",
}


class Effect(enum.Enum):
    """What a row changes besides the state and the timer; the value is the text the docs show."""

    NONE = "-"
    IGNORE = "ignored: nothing changes"
    ACTIVATE = "a pending stop is cleared"
    STOP = "a stop is pending"
    SEND_REGISTER = "poll() returns REGISTER; attempts +1"
    SEND_UNREGISTER = "poll() returns UNREGISTER (REGISTER Expires: 0)"
    STACK_REFRESH = "taken as a refresh sent now (attempts +1, no duration), then answered as in REGISTERING"
    BIND = "binding made for the granted expiry; failures and auth_retries reset; registrar's address kept"
    NO_BINDING = 'failures +1; the response text gets "(no binding granted)"'
    ADOPT_MIN_EXPIRES = "requested expiry = Min-Expires"
    FAIL = "failures +1"
    FAIL_AUTH = "failures +1, auth_retries +1"
    LAPSE = "binding forgotten: status EXPIRED"
    UNBIND = "binding forgotten"
    UNBIND_DONE = "binding removed: status UNREGISTERED"
    GIVE_UP = 'binding forgotten; last response "unregister timed out"'


@dataclass(frozen=True)
class Row:
    """What one event does in one state."""

    next_state: RegState
    timer: NextTimer
    effect: Effect = Effect.NONE
    note: str = ""
    stopping: Row | None = None  # what the event does instead while a stop is pending


def _ignored(state: RegState, note: str) -> Row:
    return Row(state, NextTimer.KEEP, Effect.IGNORE, note)


def _answered(next_state: RegState, timer: NextTimer, effect: Effect, note: str) -> Row:
    """An answer to the REGISTER in flight; a stop asked for meanwhile comes next, instead of the timer."""
    return Row(
        next_state,
        timer,
        effect,
        note,
        stopping=Row(next_state, NextTimer.STOP_NEXT, effect, "the stop asked for during the REGISTER comes next"),
    )


def _sent(note: str) -> Row:
    return Row(RegState.REGISTERING, NextTimer.NONE, Effect.SEND_REGISTER, note)


_S = RegState
_E = EventKind

# fmt: off
TABLE: dict[tuple[RegState, EventKind], Row] = {
    # -- DISABLED: created, not active ----------------------------------------------------------------------
    (_S.DISABLED, _E.ACTIVATE): Row(_S.WAITING, NextTimer.INITIAL, Effect.ACTIVATE),
    (_S.DISABLED, _E.STOP): Row(_S.DISABLED, NextTimer.KEEP, Effect.STOP, "never active: stays Not Applicable"),
    (_S.DISABLED, _E.REQUEST_REFRESH): _ignored(_S.DISABLED, "not active"),
    (_S.DISABLED, _E.FLOW_LOST): _ignored(_S.DISABLED, "not active"),
    (_S.DISABLED, _E.STRAY): _ignored(_S.DISABLED, "not active"),
    # -- WAITING: the random delay before the first REGISTER -------------------------------------------------
    (_S.WAITING, _E.REGISTER_DUE): _sent("the first REGISTER"),
    (_S.WAITING, _E.STOP): Row(_S.STOPPED, NextTimer.NONE, Effect.STOP, "nothing was sent: nothing to unregister"),
    (_S.WAITING, _E.REQUEST_REFRESH): Row(_S.WAITING, NextTimer.AT_ONCE, Effect.NONE, "the delay is skipped"),
    (_S.WAITING, _E.FLOW_LOST): _ignored(_S.WAITING, "no binding yet"),
    (_S.WAITING, _E.STRAY): _ignored(_S.WAITING, "nothing sent yet"),
    # -- REGISTERING: a REGISTER in flight; its answer decides ------------------------------------------------
    (_S.REGISTERING, _E.GRANTED): _answered(
        _S.REGISTERED, NextTimer.REFRESH, Effect.BIND,
        "status SUCCESS; a granted expiry shorter than the one requested is the one used"),
    (_S.REGISTERING, _E.NOT_GRANTED): _answered(
        _S.RETRY_WAIT, NextTimer.BACKOFF, Effect.NO_BINDING,
        "a 2xx that grants no time is a failure, backed off like a transient one"),
    (_S.REGISTERING, _E.TOO_BRIEF_LARGER): _answered(
        _S.RETRY_WAIT, NextTimer.AT_ONCE, Effect.ADOPT_MIN_EXPIRES,
        "asks again at once, once per larger value; not a failure"),
    (_S.REGISTERING, _E.TOO_BRIEF_NOT_LARGER): _answered(
        _S.RETRY_WAIT, NextTimer.BACKOFF, Effect.FAIL,
        "no loop of immediate retries: the registrar asks for nothing it has not got"),
    (_S.REGISTERING, _E.AUTH_REJECTED): _answered(
        _S.RETRY_WAIT, NextTimer.SLOW, Effect.FAIL_AUTH, "never hammers the PBX, never gives up"),
    (_S.REGISTERING, _E.REJECTED): _answered(
        _S.RETRY_WAIT, NextTimer.SLOW, Effect.FAIL, "a configuration problem: retried slowly, never given up"),
    (_S.REGISTERING, _E.TRANSIENT): _answered(
        _S.RETRY_WAIT, NextTimer.BACKOFF, Effect.FAIL,
        "never gives up; a failed refresh keeps the binding until it lapses"),
    (_S.REGISTERING, _E.FAILOVER): _answered(
        _S.RETRY_WAIT, NextTimer.FAILOVER, Effect.NONE,
        "not counted toward the backoff; the failure of the round's last target is a plain failure"),
    (_S.REGISTERING, _E.REGISTER_TIMEOUT): _answered(
        _S.RETRY_WAIT, NextTimer.BACKOFF, Effect.FAIL,
        'answered as "408 Request Timeout (no final response)", reported in `timeouts`: never stuck in progress'),
    (_S.REGISTERING, _E.STOP): Row(
        _S.REGISTERING, NextTimer.KEEP, Effect.STOP, "one transaction at a time: the answer comes first"),
    (_S.REGISTERING, _E.REQUEST_REFRESH): _ignored(_S.REGISTERING, "a REGISTER is in flight already"),
    (_S.REGISTERING, _E.FLOW_LOST): _ignored(_S.REGISTERING, "the REGISTER in flight is the re-registration"),
    (_S.REGISTERING, _E.BINDING_EXPIRY): Row(
        _S.REGISTERING, NextTimer.KEEP, Effect.LAPSE, "a refresh in flight outlived the binding"),
    # -- REGISTERED: bound; the refresh is scheduled ----------------------------------------------------------
    (_S.REGISTERED, _E.REFRESH_DUE): _sent("the binding stays until its expiry"),
    (_S.REGISTERED, _E.REGISTER_DUE): _sent("asked for at once (flow lost, request_refresh)"),
    (_S.REGISTERED, _E.UNREGISTER_DUE): Row(_S.UNREGISTERING, NextTimer.NONE, Effect.SEND_UNREGISTER),
    (_S.REGISTERED, _E.STOP_DUE): Row(
        _S.STOPPED, NextTimer.NONE, Effect.NONE, "the binding lapsed first (poll() ran late): nothing to unregister"),
    (_S.REGISTERED, _E.STOP): Row(_S.REGISTERED, NextTimer.KEEP, Effect.STOP, "the next poll() unregisters"),
    (_S.REGISTERED, _E.REQUEST_REFRESH): Row(
        _S.REGISTERED, NextTimer.AT_ONCE, Effect.NONE, "a stop pending still comes first"),
    (_S.REGISTERED, _E.FLOW_LOST): Row(
        _S.REGISTERED, NextTimer.AT_ONCE, Effect.NONE, "the binding may be gone with its flow",
        stopping=_ignored(_S.REGISTERED, "the stop comes first")),
    (_S.REGISTERED, _E.STRAY): Row(
        _S.REGISTERING, NextTimer.KEEP, Effect.STACK_REFRESH,
        "the stack refreshed on its own (its late backstop timer)",
        stopping=_ignored(_S.REGISTERED, "the stop comes first")),
    (_S.REGISTERED, _E.BINDING_EXPIRY): Row(
        _S.REGISTERED, NextTimer.KEEP, Effect.LAPSE,
        "only when poll() ran late: the refresh due before the expiry goes in the same poll()"),
    # -- RETRY_WAIT: the last attempt failed; the retry is scheduled ------------------------------------------
    (_S.RETRY_WAIT, _E.RETRY_DUE): _sent("a failed refresh's binding stays until its expiry"),
    (_S.RETRY_WAIT, _E.REGISTER_DUE): _sent("asked for at once (423 with a larger Min-Expires, request_refresh)"),
    (_S.RETRY_WAIT, _E.FAILOVER_DUE): _sent("to the registrar's next target"),
    (_S.RETRY_WAIT, _E.UNREGISTER_DUE): Row(
        _S.UNREGISTERING, NextTimer.NONE, Effect.SEND_UNREGISTER, "a failed refresh's binding is still valid"),
    (_S.RETRY_WAIT, _E.STOP_DUE): Row(_S.STOPPED, NextTimer.NONE, Effect.NONE, "no binding: nothing to unregister"),
    (_S.RETRY_WAIT, _E.STOP): Row(
        _S.RETRY_WAIT, NextTimer.KEEP, Effect.STOP, "the next poll() unregisters a binding that exists, else stops"),
    (_S.RETRY_WAIT, _E.REQUEST_REFRESH): Row(
        _S.RETRY_WAIT, NextTimer.AT_ONCE, Effect.NONE, "the backoff is cut short; a stop pending still comes first"),
    (_S.RETRY_WAIT, _E.FLOW_LOST): _ignored(
        _S.RETRY_WAIT, "never shortcuts the backoff (a failed connect is reported the same way)"),
    (_S.RETRY_WAIT, _E.STRAY): _ignored(
        _S.RETRY_WAIT, "e.g. the stack's own report of a send that already failed: never counted twice"),
    (_S.RETRY_WAIT, _E.BINDING_EXPIRY): Row(
        _S.RETRY_WAIT, NextTimer.KEEP, Effect.LAPSE, "failed refreshes did not renew it; EXPIRED until a 2xx"),
    # -- UNREGISTERING: REGISTER Expires: 0 in flight ---------------------------------------------------------
    (_S.UNREGISTERING, _E.UNREGISTERED): Row(_S.STOPPED, NextTimer.NONE, Effect.UNBIND_DONE),
    (_S.UNREGISTERING, _E.UNREGISTER_FAILED): Row(
        _S.STOPPED, NextTimer.NONE, Effect.UNBIND, "not retried: the binding lapses at the registrar"),
    (_S.UNREGISTERING, _E.UNREGISTER_TIMEOUT): Row(
        _S.STOPPED, NextTimer.NONE, Effect.GIVE_UP, "a stop never waits long for the registrar"),
    (_S.UNREGISTERING, _E.STOP): Row(_S.UNREGISTERING, NextTimer.KEEP, Effect.STOP, "stopping already"),
    (_S.UNREGISTERING, _E.REQUEST_REFRESH): _ignored(
        _S.UNREGISTERING, "stopping: the caller waits for STOPPED, then activates"),
    (_S.UNREGISTERING, _E.FLOW_LOST): _ignored(_S.UNREGISTERING, "stopping"),
    (_S.UNREGISTERING, _E.BINDING_EXPIRY): Row(
        _S.UNREGISTERING, NextTimer.KEEP, Effect.LAPSE, "the unregister's answer is still awaited"),
    # -- STOPPED: nothing more is sent ---------------------------------------------------------------------------
    (_S.STOPPED, _E.ACTIVATE): Row(_S.WAITING, NextTimer.INITIAL, Effect.ACTIVATE, "registered again"),
    (_S.STOPPED, _E.STOP): Row(_S.STOPPED, NextTimer.KEEP, Effect.STOP, "stopped already"),
    (_S.STOPPED, _E.REQUEST_REFRESH): _ignored(_S.STOPPED, "stopped: activate() first"),
    (_S.STOPPED, _E.FLOW_LOST): _ignored(_S.STOPPED, "stopped"),
    (_S.STOPPED, _E.STRAY): _ignored(_S.STOPPED, "stopped"),
}
# fmt: on


def _moves() -> dict[RegState, frozenset[RegState]]:
    moves: dict[RegState, set[RegState]] = {state: set() for state in RegState}
    for (state, _), main in TABLE.items():
        for row in (main, main.stopping):
            if row is not None and row.next_state is not state:
                moves[state].add(row.next_state)
    return {state: frozenset(nexts) for state, nexts in moves.items()}


# Which states may follow which: the moves of TABLE (a row that stays is no move).
TRANSITIONS: dict[RegState, frozenset[RegState]] = _moves()


# -- the policy -------------------------------------------------------------------


@dataclass
class _Attempt:
    started: float
    unregister: bool
    expires: int


@dataclass(frozen=True)
class _Input:
    """What came with an event: the answer, and the attempt it answered."""

    resp: RegisterResponse | None = None
    attempt: _Attempt | None = None


_T = TypeVar("_T")


def _need(value: _T | None, what: str) -> _T:
    if value is None:
        raise IllegalTransitionError(f"a row needs {what}")
    return value


@dataclass
class RegistrationPolicy:
    settings: PolicySettings
    clock: Clock
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self.state = RegState.DISABLED
        self.requested_expires = self.settings.expiration_sec
        self.granted_expires: int | None = None
        self._binding_expires: float | None = None  # monotonic
        self._lapsed = False
        self._unregistered = False
        self._next_at: float | None = None  # monotonic time of the next REGISTER
        self._next_kind: str | None = None
        self._attempt: _Attempt | None = None
        self._stop_requested = False
        self._status = RegistrationStatus.NOT_APPLICABLE
        self._status_updated: float | None = None
        self.last_response: str | None = None
        self.last_code = 0
        self.last_registered_ip: str | None = None
        self.failures = 0
        self.auth_retries = 0
        self.attempts = 0
        self._registered_since: float | None = None  # monotonic
        self.timeouts: list[Outcome] = []  # attempts given up by poll(); the caller drains them

    # -- the table at work ---------------------------------------------------------

    def _row(self, event: EventKind) -> Row:
        row = TABLE.get((self.state, event))
        if row is None:
            raise IllegalTransitionError(f"{event.value} in {self.state.value}: not in the policy's table")
        if self._stop_requested and row.stopping is not None:
            return row.stopping
        return row

    def _fire(self, event: EventKind, given: _Input | None = None) -> tuple[Row, float | None]:
        """Look the event up, apply its row; return the row and the seconds until the next action it set."""
        row = self._row(event)
        given = given or _Input()
        _EFFECTS[row.effect](self, given)
        if row.next_state is not self.state:
            self._move(row.next_state)
        return row, _TIMERS[row.timer](self, given)

    def _move(self, new: RegState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransitionError(f"{self.state.value} -> {new.value}")
        self.state = new

    def _schedule(self, delay: float, kind: str) -> float:
        self._next_at = self.clock.monotonic() + max(0.0, delay)
        self._next_kind = kind
        return delay

    def _unschedule(self) -> None:
        self._next_at = None
        self._next_kind = None

    def _update_status(self) -> RegistrationStatus:
        now = self.clock.monotonic()
        if self.state == RegState.DISABLED:
            new = RegistrationStatus.NOT_APPLICABLE
        elif self._binding_expires is not None and now < self._binding_expires:
            new = RegistrationStatus.SUCCESS
        elif self._unregistered:
            new = RegistrationStatus.UNREGISTERED
        elif self._lapsed:
            new = RegistrationStatus.EXPIRED
        elif self.failures > 0:
            new = RegistrationStatus.FAILED
        else:
            new = RegistrationStatus.NOT_REGISTERED
        if new != self._status or self._status_updated is None:
            self._status = new
            self._status_updated = self.clock.time()
        return new

    # -- timer rules (NextTimer) ----------------------------------------------------------

    def _t_keep(self, given: _Input) -> float | None:
        return None

    def _t_none(self, given: _Input) -> float | None:
        self._unschedule()
        return None

    def _t_stop_next(self, given: _Input) -> float | None:
        self._unschedule()  # poll() unregisters or stops next
        return 0.0

    def _t_initial(self, given: _Input) -> float | None:
        return self._schedule(self.rng.uniform(0.0, self.settings.initial_delay_max_sec), "register")

    def _t_at_once(self, given: _Input) -> float | None:
        return self._schedule(0.0, "register")

    def _t_refresh(self, given: _Input) -> float | None:
        granted = _need(self.granted_expires, "a granted expiry")
        return self._schedule(max(granted - self.settings.refresh_margin_sec, granted / 2.0), "refresh")

    def _t_backoff(self, given: _Input) -> float | None:
        s = self.settings
        upper = min(s.retry_max_sec, s.retry_base_sec * 2.0**self.failures)
        delay = self.rng.uniform(upper / 2.0, upper)
        retry_after = given.resp.retry_after if given.resp is not None else None
        if retry_after is not None and retry_after > 0:
            delay = max(delay, float(min(retry_after, s.retry_after_max_sec)))
        return self._schedule(delay, "retry")

    def _t_slow(self, given: _Input) -> float | None:
        return self._schedule(self.settings.forbidden_retry_interval_sec * self.rng.uniform(1.0, 1.1), "retry")

    def _t_failover(self, given: _Input) -> float | None:
        return self._schedule(0.0, "failover")

    # -- effects (Effect) ---------------------------------------------------------------

    def _e_none(self, given: _Input) -> None:
        pass

    def _e_activate(self, given: _Input) -> None:
        self._stop_requested = False
        self._unregistered = False

    def _e_stop(self, given: _Input) -> None:
        self._stop_requested = True

    def _e_send_register(self, given: _Input) -> None:
        self._attempt = _Attempt(started=self.clock.monotonic(), unregister=False, expires=self.requested_expires)
        self.attempts += 1

    def _e_send_unregister(self, given: _Input) -> None:
        self._attempt = _Attempt(started=self.clock.monotonic(), unregister=True, expires=0)

    def _e_bind(self, given: _Input) -> None:
        resp = _need(given.resp, "an answer")
        granted = resp.expires if resp.expires is not None else _need(given.attempt, "an attempt").expires
        now = self.clock.monotonic()
        was_registered = self.registered
        self.granted_expires = granted
        self._binding_expires = now + granted
        if not was_registered or self._registered_since is None:
            self._registered_since = now
        self._lapsed = False
        self._unregistered = False
        self.failures = 0
        self.auth_retries = 0
        if resp.source_ip:
            self.last_registered_ip = resp.source_ip

    def _e_no_binding(self, given: _Input) -> None:
        self.failures += 1
        self.last_response = f"{_need(given.resp, 'an answer').text} (no binding granted)"

    def _e_adopt_min_expires(self, given: _Input) -> None:
        self.requested_expires = _need(_need(given.resp, "an answer").min_expires, "a Min-Expires")

    def _e_fail(self, given: _Input) -> None:
        self.failures += 1

    def _e_fail_auth(self, given: _Input) -> None:
        self.failures += 1
        self.auth_retries += 1

    def _e_lapse(self, given: _Input) -> None:
        self._clear_binding()
        self._lapsed = True

    def _e_unbind(self, given: _Input) -> None:
        self._clear_binding()

    def _e_unbind_done(self, given: _Input) -> None:
        self._clear_binding()
        self._unregistered = True

    def _e_give_up(self, given: _Input) -> None:
        self._attempt = None
        self.last_response = "unregister timed out"
        self._clear_binding()

    def _clear_binding(self) -> None:
        self._binding_expires = None
        self._registered_since = None

    # -- events -------------------------------------------------------------

    def activate(self) -> None:
        """Start registering after a random delay in [0, initial_delay_max]."""
        self._fire(EventKind.ACTIVATE)
        self._update_status()

    def poll(self) -> Action | None:
        """Advance time; return the action due now, if any."""
        now = self.clock.monotonic()
        if self._binding_expires is not None and now >= self._binding_expires:
            self._fire(EventKind.BINDING_EXPIRY)
        attempt = self._attempt
        if attempt is not None:
            if attempt.unregister:
                if now - attempt.started >= self.settings.unregister_timeout_sec:
                    self._fire(EventKind.UNREGISTER_TIMEOUT)
            elif now - attempt.started >= self.settings.register_timeout_sec:
                timeout = RegisterResponse(code=408, reason="Request Timeout (no final response)")
                self.timeouts.append(self._answer(timeout, EventKind.REGISTER_TIMEOUT, now - attempt.started))
        action: Action | None = None
        due = self._due(now)
        if due is not None:
            row, _ = self._fire(due)
            action = _ACTIONS.get(row.effect)
        self._update_status()
        return action

    def _due(self, now: float) -> EventKind | None:
        """The timer event poll() finds due now, if any: a stop pending first."""
        if self.state not in (RegState.WAITING, RegState.REGISTERED, RegState.RETRY_WAIT):
            return None
        if self._stop_requested and self.state is not RegState.WAITING:
            return EventKind.UNREGISTER_DUE if self.registered else EventKind.STOP_DUE
        if self._next_at is None or self._next_kind is None or now < self._next_at:
            return None
        return _DUE[self._next_kind]

    def on_response(self, resp: RegisterResponse, failover: bool = False) -> Outcome:
        """A final answer (or a failure) for the REGISTER in flight.

        ``failover``: the caller sends the next REGISTER to another of the registrar's
        targets (agent/core/targets.py): a failure then retries at once, without
        counting toward the backoff."""
        attempt = self._attempt
        duration: float | None = None
        if attempt is None:  # nothing in flight: ignored, or the stack's own refresh
            row, _ = self._fire(EventKind.STRAY)
            if row.effect is not Effect.STACK_REFRESH:
                return Outcome(None, resp.text, None, None, self.state, self._update_status(), ignored=True)
        else:
            duration = self.clock.monotonic() - attempt.started
        return self._answer(resp, answer_event(self.state, resp, failover, self.requested_expires), duration)

    def _answer(self, resp: RegisterResponse, event: EventKind, duration: float | None) -> Outcome:
        attempt, self._attempt = self._attempt, None
        self.last_response = resp.text
        self.last_code = resp.code
        unregister = attempt is not None and attempt.unregister
        _, next_in = self._fire(event, _Input(resp, attempt))
        status = self._update_status()
        if unregister:
            return Outcome(classify(resp.code), resp.text, duration, None, self.state, status, unregister=True)
        return Outcome(_answer_class(resp), self.last_response or resp.text, duration, next_in, self.state, status)

    def on_flow_lost(self) -> None:
        """The TCP/TLS connection the binding lives on dropped: register again now."""
        self._fire(EventKind.FLOW_LOST)

    def request_refresh(self) -> None:
        """Refresh (or retry) now, e.g. on an operator's request."""
        self._fire(EventKind.REQUEST_REFRESH)

    def stop(self) -> None:
        """Unregister if bound (after any REGISTER in flight), then stay stopped."""
        self._fire(EventKind.STOP)
        if self.state != RegState.DISABLED:  # never registered: stays Not Applicable
            self._update_status()

    # -- views --------------------------------------------------------------

    @property
    def registered(self) -> bool:
        return self._binding_expires is not None and self.clock.monotonic() < self._binding_expires

    @property
    def registration_status(self) -> RegistrationStatus:
        return self._update_status()

    @property
    def next_kind(self) -> str | None:
        """What the next scheduled REGISTER is: register, refresh, retry, failover (None: none)."""
        return self._next_kind

    @property
    def keeps_registering(self) -> bool:
        """Registered or backing off, no REGISTER in flight, no stop asked for: a keepalive may go."""
        return self.state in (RegState.REGISTERED, RegState.RETRY_WAIT) and not self._stop_requested

    @property
    def finished(self) -> bool:
        return self.state in (RegState.STOPPED, RegState.DISABLED) and self._attempt is None

    def next_deadline(self) -> float | None:
        """Monotonic time by which ``poll()`` must next run; None when only an event can change anything.

        Between now and this time ``poll()`` returns no action and changes nothing
        but derived views, so the SIP thread may block until then.
        """
        times: list[float] = []
        if self._binding_expires is not None:
            times.append(self._binding_expires)  # the binding lapses then
        attempt = self._attempt
        if attempt is not None:
            limit = self.settings.unregister_timeout_sec if attempt.unregister else self.settings.register_timeout_sec
            times.append(attempt.started + limit)  # given up then
        if self.state in (RegState.WAITING, RegState.REGISTERED, RegState.RETRY_WAIT):
            if self._stop_requested and self.state != RegState.WAITING:
                times.append(self.clock.monotonic())  # unregister (or stop) is due now
            elif self._next_at is not None:
                times.append(self._next_at)
        return min(times) if times else None

    def change_key(self) -> tuple[object, ...]:
        """What a status reader can see, without the values that move with the clock alone.

        Two equal keys mean equal snapshots apart from wall-clock conversions and
        uptime, so a caller publishes a snapshot only when this key changed.
        """
        return (
            self.state,
            self.registered,
            self._update_status(),
            self._status_updated,
            self.last_response,
            self.last_code,
            self.last_registered_ip,
            self.requested_expires,
            self.granted_expires,
            self._binding_expires,
            self.failures,
            self.auth_retries,
            self._next_kind,
            self._next_at,
            self._registered_since,
            self.attempts,
        )

    @property
    def next_action_in(self) -> float | None:
        if self._next_at is None:
            return None
        return max(0.0, self._next_at - self.clock.monotonic())

    def snapshot(self) -> PolicySnapshot:
        status = self._update_status()
        mono = self.clock.monotonic()
        wall = self.clock.time()

        def to_wall(t: float | None) -> float | None:
            return None if t is None else wall + (t - mono)

        return PolicySnapshot(
            state=self.state,
            registered=self.registered,
            registration_status=status,
            registration_status_updated_at=self._status_updated,
            last_registration_response=self.last_response,
            last_response_code=self.last_code,
            last_registered_ip=self.last_registered_ip,
            requested_expires=self.requested_expires,
            granted_expires=self.granted_expires,
            binding_expires_at=to_wall(self._binding_expires),
            consecutive_failures=self.failures,
            auth_retries=self.auth_retries,
            next_action=self._next_kind,
            next_action_at=to_wall(self._next_at),
            registered_since=to_wall(self._registered_since),
            uptime_sec=None if self._registered_since is None else mono - self._registered_since,
            attempts=self.attempts,
        )


_Rule = Callable[[RegistrationPolicy, _Input], float | None]
_TIMERS: dict[NextTimer, _Rule] = {
    NextTimer.KEEP: RegistrationPolicy._t_keep,
    NextTimer.NONE: RegistrationPolicy._t_none,
    NextTimer.INITIAL: RegistrationPolicy._t_initial,
    NextTimer.AT_ONCE: RegistrationPolicy._t_at_once,
    NextTimer.REFRESH: RegistrationPolicy._t_refresh,
    NextTimer.BACKOFF: RegistrationPolicy._t_backoff,
    NextTimer.SLOW: RegistrationPolicy._t_slow,
    NextTimer.FAILOVER: RegistrationPolicy._t_failover,
    NextTimer.STOP_NEXT: RegistrationPolicy._t_stop_next,
}

_EFFECTS: dict[Effect, Callable[[RegistrationPolicy, _Input], None]] = {
    Effect.NONE: RegistrationPolicy._e_none,
    Effect.IGNORE: RegistrationPolicy._e_none,
    Effect.ACTIVATE: RegistrationPolicy._e_activate,
    Effect.STOP: RegistrationPolicy._e_stop,
    Effect.SEND_REGISTER: RegistrationPolicy._e_send_register,
    Effect.SEND_UNREGISTER: RegistrationPolicy._e_send_unregister,
    Effect.STACK_REFRESH: RegistrationPolicy._e_send_register,
    Effect.BIND: RegistrationPolicy._e_bind,
    Effect.NO_BINDING: RegistrationPolicy._e_no_binding,
    Effect.ADOPT_MIN_EXPIRES: RegistrationPolicy._e_adopt_min_expires,
    Effect.FAIL: RegistrationPolicy._e_fail,
    Effect.FAIL_AUTH: RegistrationPolicy._e_fail_auth,
    Effect.LAPSE: RegistrationPolicy._e_lapse,
    Effect.UNBIND: RegistrationPolicy._e_unbind,
    Effect.UNBIND_DONE: RegistrationPolicy._e_unbind_done,
    Effect.GIVE_UP: RegistrationPolicy._e_give_up,
}

_ACTIONS: dict[Effect, Action] = {Effect.SEND_REGISTER: Action.REGISTER, Effect.SEND_UNREGISTER: Action.UNREGISTER}


# -- the table for operators (docs/policy.md) ---------------------------------------

_STATE_TEXT: dict[RegState, str] = {
    RegState.DISABLED: "created, not active: nothing is sent (status Not Applicable)",
    RegState.WAITING: "the random delay before the first REGISTER",
    RegState.REGISTERING: "a REGISTER is in flight; a binding made before stays until its expiry",
    RegState.REGISTERED: "bound: a 2xx came; the refresh is scheduled",
    RegState.RETRY_WAIT: "the last attempt failed; the retry is scheduled",
    RegState.UNREGISTERING: "a REGISTER with Expires: 0 is in flight",
    RegState.STOPPED: "stopped: nothing more is sent",
}


def iter_rows() -> list[tuple[RegState, EventKind, bool, Row]]:
    """Every line of the table in the docs' order: (state, event, only while a stop is pending, row)."""
    order = {event: i for i, event in enumerate(EventKind)}
    lines: list[tuple[RegState, EventKind, bool, Row]] = []
    for state in RegState:
        for event in sorted((e for s, e in TABLE if s is state), key=order.__getitem__):
            row = TABLE[(state, event)]
            lines.append((state, event, False, row))
            if row.stopping is not None:
                lines.append((state, event, True, row.stopping))
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """docs/policy.md: the table of TABLE, for operators."""
    out = [
        "# How the agent reacts: the registration policy as a table",
        "",
        "<!-- Generated from agent/core/policy.py by `python -m agent.core.policy --markdown > docs/policy.md`;",
        "     do not edit by hand: a unit test fails when this file and the table differ. -->",
        "",
        "Each connection's registration is a state machine with no I/O (`agent/core/policy.py`). Every",
        "event it can meet in every state is one line below: the next state, when the next REGISTER goes,",
        "what else changes, and why. An event in a state the table does not list is a bug: the policy raises",
        "`IllegalTransitionError` instead of guessing.",
        "",
        "Every answer to a REGISTER in flight also sets `last_registration_response` and",
        "`last_response_code`. A line marked *stop pending* applies instead of the one above it when a stop",
        "was asked for (`stop()`) and is not carried out yet. The knobs named are the `registration.*`",
        "settings (README, docs/configuration.md).",
        "",
        "## States",
        "",
        "| State | Meaning |",
        "|---|---|",
    ]
    out += [f"| `{state.value}` | {_cell(_STATE_TEXT[state])} |" for state in RegState]
    groups = (
        ("Commands (the caller's method calls)", _COMMAND_EVENTS),
        ("Timers (found due by `poll()`, in this order)", _TIMER_EVENTS),
        (
            "Answers (`on_response()`)",
            tuple(e for e in EventKind if e not in _COMMAND_EVENTS and e not in _TIMER_EVENTS),
        ),
    )
    out += ["", "## Events"]
    for title, events in groups:
        out += ["", f"### {title}", "", "| Event | What happened |", "|---|---|"]
        out += [f"| `{event.value}` | {_cell(EVENT_TEXT[event])} |" for event in events]
    out += ["", "## Next timer", "", "| Rule | When the next REGISTER goes |", "|---|---|"]
    out += [f"| {_cell(timer.value)} | {_cell(TIMER_TEXT[timer])} |" for timer in NextTimer]
    out += [
        "",
        "## The table",
        "",
        "| State | Event | Next state | Next timer | Changes | Notes |",
        "|---|---|---|---|---|---|",
    ]
    for state, event, stopping, row in iter_rows():
        label = f"`{event.value}`, *stop pending*" if stopping else f"`{event.value}`"
        out.append(
            f"| `{state.value}` | {label} | `{row.next_state.value}` | {_cell(row.timer.value)} "
            f"| {_cell(row.effect.value)} | {_cell(row.note)} |"
        )
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["--markdown"]:
        sys.stderr.write("usage: python -m agent.core.policy --markdown > docs/policy.md\n")
        return 2
    sys.stdout.write(render_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
