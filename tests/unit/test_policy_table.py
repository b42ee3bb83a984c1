"""The registration policy's table: every row fed through the public API, whole snapshots compared.

Each case puts a policy in a state, feeds one event (a command, a timer made due by the
clock, or an answer), and compares the whole :class:`PolicySnapshot` after it with the one
before plus the changes the row makes. A random draw is always the middle of its range, so
every wait is exact: the initial delay 1 s, the first backoff 45 s, the slow retry 315 s.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from agent.core.clock import FakeClock
from agent.core.policy import (
    TABLE,
    TRANSITIONS,
    Action,
    EventKind,
    IllegalTransitionError,
    Outcome,
    PolicySettings,
    RegisterResponse,
    RegistrationPolicy,
    RegistrationStatus,
    RegState,
    answer_event,
    iter_rows,
    main,
    render_markdown,
)
from agent.core.responses import ResponseClass

ROOT = Path(__file__).resolve().parents[2]
W = 1_700_000_000.0  # FakeClock's wall time at the start


def at(t: float) -> float:
    """Wall time ``t`` seconds after the start."""
    return W + t


class Midpoint(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


SETTINGS = PolicySettings(
    expiration_sec=600,
    initial_delay_max_sec=2.0,  # first REGISTER 1 s after activate()
    refresh_margin_sec=30.0,  # refresh 570 s after a 2xx granting 600
    retry_base_sec=30.0,  # first backoff 45 s
    retry_max_sec=1800.0,
    forbidden_retry_interval_sec=300.0,  # slow retry 315 s
    register_timeout_sec=40.0,
    unregister_timeout_sec=5.0,
)

OK = RegisterResponse(code=200, reason="OK", expires=600, source_ip="192.0.2.10")
OK_0 = RegisterResponse(code=200, reason="OK", expires=0)
E503 = RegisterResponse(code=503, reason="Service Unavailable")

Policy = tuple[RegistrationPolicy, FakeClock]
Step = Callable[[RegistrationPolicy, FakeClock], object]


# -- situations: a policy in a known state, at a known time --------------------------------


def disabled() -> Policy:
    clock = FakeClock()
    return RegistrationPolicy(SETTINGS, clock, Midpoint()), clock


def waiting() -> Policy:  # t=0, first REGISTER due at t=1
    p, clock = disabled()
    p.activate()
    return p, clock


def registering() -> Policy:  # t=1, REGISTER sent at t=1
    p, clock = waiting()
    clock.advance(1)
    assert p.poll() is Action.REGISTER
    return p, clock


def registered() -> Policy:  # t=2, bound until t=602, refresh due at t=572
    p, clock = registering()
    clock.advance(1)
    p.on_response(OK)
    return p, clock


def refreshing() -> Policy:  # t=572, the refresh in flight, bound until t=602
    p, clock = registered()
    clock.advance(570)
    assert p.poll() is Action.REGISTER
    return p, clock


def retry_wait() -> Policy:  # t=2, one failure, retry due at t=47
    p, clock = registering()
    clock.advance(1)
    p.on_response(E503)
    return p, clock


def retry_wait_register() -> Policy:  # t=2, after a 423 with a larger Min-Expires: register due now
    p, clock = registering()
    clock.advance(1)
    p.on_response(RegisterResponse(code=423, reason="Interval Too Brief", min_expires=1200))
    return p, clock


def retry_wait_failover() -> Policy:  # t=2, after a failure failed over: failover due now
    p, clock = registering()
    clock.advance(1)
    p.on_response(E503, failover=True)
    return p, clock


def retry_wait_bound() -> Policy:  # t=573, a failed refresh: still bound until t=602, retry due at t=618
    p, clock = refreshing()
    clock.advance(1)
    p.on_response(E503)
    return p, clock


def unregistering() -> Policy:  # t=2, unregister sent at t=2, bound until t=602
    p, clock = registered()
    p.stop()
    assert p.poll() is Action.UNREGISTER
    return p, clock


def unregistering_late() -> Policy:  # t=601, unregister sent at t=601, bound until t=602
    p, clock = registered()
    p.stop()
    clock.advance(599)
    assert p.poll() is Action.UNREGISTER
    return p, clock


def stopped() -> Policy:  # t=2, unregistered at t=2
    p, clock = unregistering()
    p.on_response(OK_0)
    return p, clock


def stopping(situation: Callable[[], Policy]) -> Callable[[], Policy]:
    def build() -> Policy:
        p, clock = situation()
        p.stop()
        return p, clock

    return build


# -- steps -------------------------------------------------------------------------------------


def adv(seconds: float) -> Step:
    return lambda p, clock: clock.advance(seconds)


def poll(p: RegistrationPolicy, clock: FakeClock) -> object:
    return p.poll()


def answer(resp: RegisterResponse, failover: bool = False) -> Step:
    return lambda p, clock: p.on_response(resp, failover=failover)


def activate(p: RegistrationPolicy, clock: FakeClock) -> object:
    return p.activate()


def stop(p: RegistrationPolicy, clock: FakeClock) -> object:
    return p.stop()


def refresh(p: RegistrationPolicy, clock: FakeClock) -> object:
    return p.request_refresh()


def flow_lost(p: RegistrationPolicy, clock: FakeClock) -> object:
    return p.on_flow_lost()


@dataclass(frozen=True)
class Case:
    situation: Callable[[], Policy]
    steps: tuple[Step, ...]
    changes: dict[str, object] = field(default_factory=dict)  # snapshot fields the event changes
    result: object = None  # what the last step returns
    timeouts: tuple[Outcome, ...] = ()  # what poll() gave up, for the caller's logs


def ignored(state: RegState, status: RegistrationStatus) -> Outcome:
    return Outcome(None, "200 OK", None, None, state, status, ignored=True)


def outcome(
    cls: ResponseClass, text: str, next_in: float | None, state: RegState, status: RegistrationStatus
) -> Outcome:
    """An answer arriving 1 s after its REGISTER."""
    return Outcome(cls, text, 1.0, next_in, state, status)


S, E = RegState, EventKind
SUCCESS, FAILED = RegistrationStatus.SUCCESS, RegistrationStatus.FAILED
NOT_REGISTERED, EXPIRED = RegistrationStatus.NOT_REGISTERED, RegistrationStatus.EXPIRED
UNBOUND: dict[str, object] = {
    "registered": False,
    "binding_expires_at": None,
    "registered_since": None,
    "uptime_sec": None,
}
NO_TIMER: dict[str, object] = {"next_action": None, "next_action_at": None}
LAPSED_AT_602 = {**UNBOUND, "registration_status": EXPIRED, "registration_status_updated_at": at(602)}
SENT_AGAIN: dict[str, object] = {"state": S.REGISTERING, **NO_TIMER, "attempts": 2}
GRANTED_AT_2: dict[str, object] = {
    "state": S.REGISTERED,
    "registered": True,
    "registration_status": SUCCESS,
    "registration_status_updated_at": at(2),
    "last_registration_response": "200 OK",
    "last_response_code": 200,
    "last_registered_ip": "192.0.2.10",
    "granted_expires": 600,
    "binding_expires_at": at(602),
    "registered_since": at(2),
    "uptime_sec": 0.0,
}


def failed_at_2(text: str, code: int, **more: object) -> dict[str, object]:
    return {
        "state": S.RETRY_WAIT,
        "registration_status": FAILED,
        "registration_status_updated_at": at(2),
        "last_registration_response": text,
        "last_response_code": code,
        "consecutive_failures": 1,
        **more,
    }


def answered(
    resp: RegisterResponse,
    changes: dict[str, object],
    timer: tuple[str, float],
    result: Outcome,
    failover: bool = False,
) -> dict[bool, Case]:
    """An answer to the REGISTER sent at t=1, arriving at t=2; with a stop pending, no timer."""
    kind, due = timer
    steps = (adv(1), answer(resp, failover))
    return {
        False: Case(registering, steps, {**changes, "next_action": kind, "next_action_at": at(due)}, result),
        True: Case(stopping(registering), steps, {**changes, **NO_TIMER}, replace(result, next_in=0.0)),
    }


_GRANTED = answered(
    OK, GRANTED_AT_2, ("refresh", 572), outcome(ResponseClass.SUCCESS, "200 OK", 570.0, S.REGISTERED, SUCCESS)
)
_NOT_GRANTED = answered(
    OK_0,
    failed_at_2("200 OK (no binding granted)", 200),
    ("retry", 47),
    outcome(ResponseClass.SUCCESS, "200 OK (no binding granted)", 45.0, S.RETRY_WAIT, FAILED),
)
_423_LARGER = answered(
    RegisterResponse(code=423, reason="Interval Too Brief", min_expires=1200),
    {
        "state": S.RETRY_WAIT,
        "last_registration_response": "423 Interval Too Brief",
        "last_response_code": 423,
        "requested_expires": 1200,
    },
    ("register", 2),
    outcome(ResponseClass.TOO_BRIEF, "423 Interval Too Brief", 0.0, S.RETRY_WAIT, NOT_REGISTERED),
)
_423_NOT_LARGER = answered(
    RegisterResponse(code=423, reason="Interval Too Brief", min_expires=60),
    failed_at_2("423 Interval Too Brief", 423),
    ("retry", 47),
    outcome(ResponseClass.TOO_BRIEF, "423 Interval Too Brief", 45.0, S.RETRY_WAIT, FAILED),
)
_AUTH_REJECTED = answered(
    RegisterResponse(code=403, reason="Forbidden"),
    failed_at_2("403 Forbidden", 403, auth_retries=1),
    ("retry", 317),
    outcome(ResponseClass.AUTH_REJECTED, "403 Forbidden", 315.0, S.RETRY_WAIT, FAILED),
)
_REJECTED = answered(
    RegisterResponse(code=404, reason="Not Found"),
    failed_at_2("404 Not Found", 404),
    ("retry", 317),
    outcome(ResponseClass.REJECTED, "404 Not Found", 315.0, S.RETRY_WAIT, FAILED),
)
_TRANSIENT = answered(  # a Retry-After larger than the backoff (45 s) wins
    RegisterResponse(code=503, reason="Service Unavailable", retry_after=120),
    failed_at_2("503 Service Unavailable", 503),
    ("retry", 122),
    outcome(ResponseClass.TRANSIENT, "503 Service Unavailable", 120.0, S.RETRY_WAIT, FAILED),
)
_FAILOVER = answered(
    E503,
    {"state": S.RETRY_WAIT, "last_registration_response": "503 Service Unavailable", "last_response_code": 503},
    ("failover", 2),
    outcome(ResponseClass.TRANSIENT, "503 Service Unavailable", 0.0, S.RETRY_WAIT, NOT_REGISTERED),
    failover=True,
)

TIMEOUT_TEXT = "408 Request Timeout (no final response)"
_TIMED_OUT: dict[str, object] = {
    "registration_status": FAILED,
    "registration_status_updated_at": at(41),
    "last_registration_response": TIMEOUT_TEXT,
    "last_response_code": 408,
    "consecutive_failures": 1,
}

RowKey = tuple[RegState, EventKind, bool]  # state, event, only while a stop is pending

CASES: dict[RowKey, Case] = {
    # -- DISABLED
    (S.DISABLED, E.ACTIVATE, False): Case(
        disabled,
        (adv(10), activate),
        {
            "state": S.WAITING,
            "registration_status": NOT_REGISTERED,
            "registration_status_updated_at": at(10),
            "next_action": "register",
            "next_action_at": at(11),
        },
    ),
    (S.DISABLED, E.STOP, False): Case(disabled, (stop,)),
    (S.DISABLED, E.REQUEST_REFRESH, False): Case(disabled, (refresh,)),
    (S.DISABLED, E.FLOW_LOST, False): Case(disabled, (flow_lost,)),
    (S.DISABLED, E.STRAY, False): Case(
        disabled, (answer(OK),), result=ignored(S.DISABLED, RegistrationStatus.NOT_APPLICABLE)
    ),
    # -- WAITING
    (S.WAITING, E.REGISTER_DUE, False): Case(
        waiting, (adv(1), poll), {"state": S.REGISTERING, **NO_TIMER, "attempts": 1}, Action.REGISTER
    ),
    (S.WAITING, E.STOP, False): Case(waiting, (stop,), {"state": S.STOPPED, **NO_TIMER}),
    (S.WAITING, E.REQUEST_REFRESH, False): Case(waiting, (refresh,), {"next_action_at": at(0)}),
    (S.WAITING, E.FLOW_LOST, False): Case(waiting, (flow_lost,)),
    (S.WAITING, E.STRAY, False): Case(waiting, (answer(OK),), result=ignored(S.WAITING, NOT_REGISTERED)),
    # -- REGISTERING
    (S.REGISTERING, E.GRANTED, False): _GRANTED[False],
    (S.REGISTERING, E.GRANTED, True): _GRANTED[True],
    (S.REGISTERING, E.NOT_GRANTED, False): _NOT_GRANTED[False],
    (S.REGISTERING, E.NOT_GRANTED, True): _NOT_GRANTED[True],
    (S.REGISTERING, E.TOO_BRIEF_LARGER, False): _423_LARGER[False],
    (S.REGISTERING, E.TOO_BRIEF_LARGER, True): _423_LARGER[True],
    (S.REGISTERING, E.TOO_BRIEF_NOT_LARGER, False): _423_NOT_LARGER[False],
    (S.REGISTERING, E.TOO_BRIEF_NOT_LARGER, True): _423_NOT_LARGER[True],
    (S.REGISTERING, E.AUTH_REJECTED, False): _AUTH_REJECTED[False],
    (S.REGISTERING, E.AUTH_REJECTED, True): _AUTH_REJECTED[True],
    (S.REGISTERING, E.REJECTED, False): _REJECTED[False],
    (S.REGISTERING, E.REJECTED, True): _REJECTED[True],
    (S.REGISTERING, E.TRANSIENT, False): _TRANSIENT[False],
    (S.REGISTERING, E.TRANSIENT, True): _TRANSIENT[True],
    (S.REGISTERING, E.FAILOVER, False): _FAILOVER[False],
    (S.REGISTERING, E.FAILOVER, True): _FAILOVER[True],
    (S.REGISTERING, E.REGISTER_TIMEOUT, False): Case(
        registering,
        (adv(40), poll),
        {"state": S.RETRY_WAIT, **_TIMED_OUT, "next_action": "retry", "next_action_at": at(86)},
        timeouts=(Outcome(ResponseClass.TRANSIENT, TIMEOUT_TEXT, 40.0, 45.0, S.RETRY_WAIT, FAILED),),
    ),
    (S.REGISTERING, E.REGISTER_TIMEOUT, True): Case(  # then, in the same poll(), RETRY_WAIT's stop_due
        stopping(registering),
        (adv(40), poll),
        {"state": S.STOPPED, **_TIMED_OUT, **NO_TIMER},
        timeouts=(Outcome(ResponseClass.TRANSIENT, TIMEOUT_TEXT, 40.0, 0.0, S.RETRY_WAIT, FAILED),),
    ),
    (S.REGISTERING, E.STOP, False): Case(registering, (stop,)),
    (S.REGISTERING, E.REQUEST_REFRESH, False): Case(registering, (refresh,)),
    (S.REGISTERING, E.FLOW_LOST, False): Case(registering, (flow_lost,)),
    (S.REGISTERING, E.BINDING_EXPIRY, False): Case(refreshing, (adv(30), poll), LAPSED_AT_602),
    # -- REGISTERED
    (S.REGISTERED, E.REFRESH_DUE, False): Case(
        registered, (adv(570), poll), {**SENT_AGAIN, "uptime_sec": 570.0}, Action.REGISTER
    ),
    (S.REGISTERED, E.REGISTER_DUE, False): Case(registered, (refresh, poll), SENT_AGAIN, Action.REGISTER),
    (S.REGISTERED, E.UNREGISTER_DUE, False): Case(
        registered, (stop, poll), {"state": S.UNREGISTERING, **NO_TIMER}, Action.UNREGISTER
    ),
    (S.REGISTERED, E.STOP_DUE, False): Case(  # poll() ran late: the binding lapsed first
        registered, (stop, adv(600), poll), {"state": S.STOPPED, **LAPSED_AT_602, **NO_TIMER}
    ),
    (S.REGISTERED, E.STOP, False): Case(registered, (stop,)),
    (S.REGISTERED, E.REQUEST_REFRESH, False): Case(
        registered, (refresh,), {"next_action": "register", "next_action_at": at(2)}
    ),
    (S.REGISTERED, E.FLOW_LOST, False): Case(
        registered, (flow_lost,), {"next_action": "register", "next_action_at": at(2)}
    ),
    (S.REGISTERED, E.FLOW_LOST, True): Case(stopping(registered), (flow_lost,)),
    (S.REGISTERED, E.STRAY, False): Case(  # the stack's own refresh, at t=102
        registered,
        (adv(100), answer(OK)),
        {
            "attempts": 2,
            "binding_expires_at": at(702),
            "next_action_at": at(672),
            "uptime_sec": 100.0,
        },
        Outcome(ResponseClass.SUCCESS, "200 OK", None, 570.0, S.REGISTERED, SUCCESS),
    ),
    (S.REGISTERED, E.STRAY, True): Case(stopping(registered), (answer(OK),), result=ignored(S.REGISTERED, SUCCESS)),
    (S.REGISTERED, E.BINDING_EXPIRY, False): Case(  # poll() ran late: the refresh goes in the same poll()
        registered, (adv(600), poll), {**LAPSED_AT_602, **SENT_AGAIN}, Action.REGISTER
    ),
    # -- RETRY_WAIT
    (S.RETRY_WAIT, E.RETRY_DUE, False): Case(retry_wait, (adv(45), poll), SENT_AGAIN, Action.REGISTER),
    (S.RETRY_WAIT, E.REGISTER_DUE, False): Case(retry_wait_register, (poll,), SENT_AGAIN, Action.REGISTER),
    (S.RETRY_WAIT, E.FAILOVER_DUE, False): Case(retry_wait_failover, (poll,), SENT_AGAIN, Action.REGISTER),
    (S.RETRY_WAIT, E.UNREGISTER_DUE, False): Case(
        retry_wait_bound, (stop, poll), {"state": S.UNREGISTERING, **NO_TIMER}, Action.UNREGISTER
    ),
    (S.RETRY_WAIT, E.STOP_DUE, False): Case(retry_wait, (stop, poll), {"state": S.STOPPED, **NO_TIMER}),
    (S.RETRY_WAIT, E.STOP, False): Case(retry_wait, (stop,)),
    (S.RETRY_WAIT, E.REQUEST_REFRESH, False): Case(
        retry_wait, (refresh,), {"next_action": "register", "next_action_at": at(2)}
    ),
    (S.RETRY_WAIT, E.FLOW_LOST, False): Case(retry_wait, (flow_lost,)),
    (S.RETRY_WAIT, E.STRAY, False): Case(retry_wait, (answer(OK),), result=ignored(S.RETRY_WAIT, FAILED)),
    (S.RETRY_WAIT, E.BINDING_EXPIRY, False): Case(retry_wait_bound, (adv(29), poll), LAPSED_AT_602),
    # -- UNREGISTERING
    (S.UNREGISTERING, E.UNREGISTERED, False): Case(
        unregistering,
        (adv(1), answer(OK_0)),
        {
            "state": S.STOPPED,
            **UNBOUND,
            "registration_status": RegistrationStatus.UNREGISTERED,
            "registration_status_updated_at": at(3),
        },
        Outcome(ResponseClass.SUCCESS, "200 OK", 1.0, None, S.STOPPED, RegistrationStatus.UNREGISTERED, True),
    ),
    (S.UNREGISTERING, E.UNREGISTER_FAILED, False): Case(
        unregistering,
        (adv(1), answer(E503)),
        {
            "state": S.STOPPED,
            **UNBOUND,
            "registration_status": NOT_REGISTERED,
            "registration_status_updated_at": at(3),
            "last_registration_response": "503 Service Unavailable",
            "last_response_code": 503,
        },
        Outcome(ResponseClass.TRANSIENT, "503 Service Unavailable", 1.0, None, S.STOPPED, NOT_REGISTERED, True),
    ),
    (S.UNREGISTERING, E.UNREGISTER_TIMEOUT, False): Case(
        unregistering,
        (adv(5), poll),
        {
            "state": S.STOPPED,
            **UNBOUND,
            "registration_status": NOT_REGISTERED,
            "registration_status_updated_at": at(7),
            "last_registration_response": "unregister timed out",
        },
    ),
    (S.UNREGISTERING, E.STOP, False): Case(unregistering, (stop,)),
    (S.UNREGISTERING, E.REQUEST_REFRESH, False): Case(unregistering, (refresh,)),
    (S.UNREGISTERING, E.FLOW_LOST, False): Case(unregistering, (flow_lost,)),
    (S.UNREGISTERING, E.BINDING_EXPIRY, False): Case(unregistering_late, (adv(1), poll), LAPSED_AT_602),
    # -- STOPPED
    (S.STOPPED, E.ACTIVATE, False): Case(
        stopped,
        (adv(10), activate),
        {
            "state": S.WAITING,
            "registration_status": NOT_REGISTERED,
            "registration_status_updated_at": at(12),
            "next_action": "register",
            "next_action_at": at(13),
        },
    ),
    (S.STOPPED, E.STOP, False): Case(stopped, (stop,)),
    (S.STOPPED, E.REQUEST_REFRESH, False): Case(stopped, (refresh,)),
    (S.STOPPED, E.FLOW_LOST, False): Case(stopped, (flow_lost,)),
    (S.STOPPED, E.STRAY, False): Case(
        stopped, (answer(OK),), result=ignored(S.STOPPED, RegistrationStatus.UNREGISTERED)
    ),
}


def _label(key: RowKey) -> str:
    state, event, stop_pending = key
    return f"{state.value}-{event.value}" + ("-stop_pending" if stop_pending else "")


@pytest.fixture
def fired(monkeypatch: pytest.MonkeyPatch) -> list[RowKey]:
    """The rows the policy looks up, as (state, event, the stop-pending row was used)."""
    seen: list[RowKey] = []
    lookup = RegistrationPolicy._row

    def spy(self: RegistrationPolicy, event: EventKind) -> object:
        key = (self.state, event)
        row = lookup(self, event)
        seen.append((*key, row is not TABLE[key]))
        return row

    monkeypatch.setattr(RegistrationPolicy, "_row", spy)
    return seen


def test_every_row_of_the_table_has_a_case() -> None:
    assert set(CASES) == {(state, event, stop_pending) for state, event, stop_pending, _ in iter_rows()}
    assert len(CASES) == 65


@pytest.mark.parametrize("key", list(CASES), ids=_label)
def test_row(key: RowKey, fired: list[RowKey]) -> None:
    case = CASES[key]
    p, clock = case.situation()
    p.timeouts.clear()
    before = p.snapshot()
    fired.clear()
    result: object = None
    for step in case.steps:
        result = step(p, clock)
    assert key in fired, f"the case took {fired}"
    assert p.snapshot() == replace(before, **case.changes)  # type: ignore[arg-type]
    assert result == case.result
    assert tuple(p.timeouts) == case.timeouts


# -- what the table does not list ------------------------------------------------------------

IN_STATE: dict[RegState, Callable[[], Policy]] = {
    S.DISABLED: disabled,
    S.WAITING: waiting,
    S.REGISTERING: registering,
    S.REGISTERED: registered,
    S.RETRY_WAIT: retry_wait,
    S.UNREGISTERING: unregistering,
    S.STOPPED: stopped,
}
UNLISTED = [(state, event) for state in RegState for event in EventKind if (state, event) not in TABLE]


@pytest.mark.parametrize(("state", "event"), UNLISTED, ids=[f"{s.value}-{e.value}" for s, e in UNLISTED])
def test_an_unlisted_pair_raises_and_changes_nothing(state: RegState, event: EventKind) -> None:
    p, _ = IN_STATE[state]()
    assert p.state is state
    before = p.snapshot()
    with pytest.raises(IllegalTransitionError, match=f"{event.value} in {state.value}"):
        p._fire(event)
    assert p.snapshot() == before


@pytest.mark.parametrize("state", [S.WAITING, S.REGISTERING, S.REGISTERED, S.RETRY_WAIT, S.UNREGISTERING])
def test_activate_only_from_disabled_or_stopped(state: RegState) -> None:
    p, _ = IN_STATE[state]()
    with pytest.raises(IllegalTransitionError, match=f"activate in {state.value}"):
        p.activate()
    assert p.state is state


def test_commands_are_listed_in_every_state_but_activate() -> None:
    """A command never raises: where it means nothing, its row says it is ignored."""
    for state in RegState:
        for event in (E.STOP, E.REQUEST_REFRESH, E.FLOW_LOST):
            assert (state, event) in TABLE


def test_the_moves_are_the_tables() -> None:
    assert TRANSITIONS == {
        S.DISABLED: {S.WAITING},
        S.WAITING: {S.REGISTERING, S.STOPPED},
        S.REGISTERING: {S.REGISTERED, S.RETRY_WAIT},
        S.REGISTERED: {S.REGISTERING, S.UNREGISTERING, S.STOPPED},
        S.RETRY_WAIT: {S.REGISTERING, S.UNREGISTERING, S.STOPPED},
        S.UNREGISTERING: {S.STOPPED},
        S.STOPPED: {S.WAITING},
    }


# -- answers as events ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "resp", "failover", "event"),
    [
        (S.REGISTERING, OK, False, E.GRANTED),
        (S.REGISTERING, RegisterResponse(code=202, reason="Accepted"), False, E.GRANTED),  # no Expires: requested
        (S.REGISTERING, OK, True, E.GRANTED),  # a 2xx is never a failover
        (S.REGISTERING, OK_0, False, E.NOT_GRANTED),
        (S.REGISTERING, RegisterResponse(code=200, expires=-1), False, E.NOT_GRANTED),
        (S.REGISTERING, OK_0, True, E.NOT_GRANTED),
        (S.REGISTERING, RegisterResponse(code=200, expires=600, error="transport failure: x"), False, E.TRANSIENT),
        (S.REGISTERING, RegisterResponse(code=423, min_expires=1200), False, E.TOO_BRIEF_LARGER),
        (S.REGISTERING, RegisterResponse(code=423, min_expires=1200), True, E.TOO_BRIEF_LARGER),
        (S.REGISTERING, RegisterResponse(code=423, min_expires=600), False, E.TOO_BRIEF_NOT_LARGER),
        (S.REGISTERING, RegisterResponse(code=423), False, E.TOO_BRIEF_NOT_LARGER),
        (S.REGISTERING, RegisterResponse(code=423, min_expires=60), True, E.FAILOVER),
        (S.REGISTERING, RegisterResponse(code=401), False, E.AUTH_REJECTED),
        (S.REGISTERING, RegisterResponse(code=407), False, E.AUTH_REJECTED),
        (S.REGISTERING, RegisterResponse(code=403), False, E.AUTH_REJECTED),
        (S.REGISTERING, RegisterResponse(code=404), False, E.REJECTED),
        (S.REGISTERING, RegisterResponse(code=404), True, E.FAILOVER),
        (S.REGISTERING, RegisterResponse(code=408), False, E.TRANSIENT),
        (S.REGISTERING, RegisterResponse(code=0, error="REGISTER not sent: DNS"), False, E.TRANSIENT),
        (S.REGISTERING, RegisterResponse(code=0, error="REGISTER not sent: DNS"), True, E.FAILOVER),
        (S.REGISTERING, RegisterResponse(code=603), False, E.TRANSIENT),
        (S.UNREGISTERING, OK_0, False, E.UNREGISTERED),
        (S.UNREGISTERING, RegisterResponse(code=200, error="x"), False, E.UNREGISTERED),  # the code decides
        (S.UNREGISTERING, E503, True, E.UNREGISTER_FAILED),
        (S.UNREGISTERING, RegisterResponse(code=0, error="transport failure: x"), False, E.UNREGISTER_FAILED),
        (S.REGISTERED, OK, False, E.STRAY),
        (S.RETRY_WAIT, E503, True, E.STRAY),
        (S.STOPPED, OK, False, E.STRAY),
    ],
)
def test_answer_event(state: RegState, resp: RegisterResponse, failover: bool, event: EventKind) -> None:
    assert answer_event(state, resp, failover, requested_expires=600) is event


# -- the docs ---------------------------------------------------------------------------------------


def test_docs_policy_md_is_the_table() -> None:
    docs = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")
    assert docs == render_markdown(), "regenerate: python -m agent.core.policy --markdown > docs/policy.md"


def test_the_docs_have_a_line_per_row() -> None:
    lines = [line for line in render_markdown().splitlines() if line.startswith("| `") and line.count("|") == 7]
    assert len(lines) == len(iter_rows())


def test_generator_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--markdown"]) == 0
    assert capsys.readouterr().out == render_markdown()
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_generator_runs_as_a_module() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent.core.policy", "--markdown"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == render_markdown()
    assert out.stderr == ""
