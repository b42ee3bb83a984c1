"""The registration policy, driven by a fake clock: no SIP stack, no sockets."""

from __future__ import annotations

import itertools
import random

import pytest

from agent.core.clock import FakeClock
from agent.core.policy import (
    TRANSITIONS,
    Action,
    IllegalTransitionError,
    PolicySettings,
    RegisterResponse,
    RegistrationPolicy,
    RegistrationStatus,
    RegState,
)
from agent.core.responses import ResponseClass, classify, response_text

OK = RegisterResponse(code=200, reason="OK", expires=600, source_ip="192.0.2.10")


def make(**kw: float) -> tuple[RegistrationPolicy, FakeClock]:
    settings = PolicySettings(
        expiration_sec=int(kw.pop("expiration_sec", 600)),
        initial_delay_max_sec=kw.pop("initial_delay_max_sec", 0.0),
        **kw,  # type: ignore[arg-type]
    )
    clock = FakeClock()
    return RegistrationPolicy(settings, clock, random.Random(7)), clock


def run_until_action(p: RegistrationPolicy, clock: FakeClock, limit: float = 100_000.0, step: float = 0.05) -> float:
    """Advance the clock until poll() yields an action; return the time waited."""
    waited = 0.0
    while waited <= limit:
        action = p.poll()
        if action is not None:
            return waited
        clock.advance(step)
        waited += step
    raise AssertionError("no action within limit")


def registered_policy(**kw: float) -> tuple[RegistrationPolicy, FakeClock]:
    p, clock = make(**kw)
    p.activate()
    assert p.poll() is Action.REGISTER
    p.on_response(OK)
    return p, clock


# -- classification ---------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (200, ResponseClass.SUCCESS),
        (202, ResponseClass.SUCCESS),
        (423, ResponseClass.TOO_BRIEF),
        (401, ResponseClass.AUTH_REJECTED),
        (403, ResponseClass.AUTH_REJECTED),
        (407, ResponseClass.AUTH_REJECTED),
        (404, ResponseClass.REJECTED),
        (400, ResponseClass.REJECTED),
        (420, ResponseClass.REJECTED),
        (408, ResponseClass.TRANSIENT),
        (429, ResponseClass.TRANSIENT),
        (480, ResponseClass.TRANSIENT),
        (500, ResponseClass.TRANSIENT),
        (503, ResponseClass.TRANSIENT),
        (504, ResponseClass.TRANSIENT),
        (600, ResponseClass.TRANSIENT),
        (603, ResponseClass.TRANSIENT),
        (0, ResponseClass.TRANSIENT),
    ],
)
def test_every_response_class(code: int, cls: ResponseClass) -> None:
    assert classify(code) is cls


def test_response_text_uses_standard_phrase_when_missing() -> None:
    assert response_text(408, "") == "408 Request Timeout"
    assert response_text(200, "OK") == "200 OK"
    assert response_text(401, " Unauthorized ") == "401 Unauthorized"


# -- start-up ------------------------------------------------------------------


def test_initial_delay_is_random_and_bounded() -> None:
    delays = []
    for seed in range(30):
        clock = FakeClock()
        p = RegistrationPolicy(PolicySettings(initial_delay_max_sec=5.0), clock, random.Random(seed))
        p.activate()
        assert p.state is RegState.WAITING
        delays.append(run_until_action(p, clock, step=0.01))
    assert all(0.0 <= d <= 5.01 for d in delays)
    assert len({round(d, 1) for d in delays}) > 5  # spread out, not one storm


def test_inactive_connection_is_not_applicable_and_sends_nothing() -> None:
    p, clock = make()
    for _ in range(10):
        assert p.poll() is None
        clock.advance(100)
    snap = p.snapshot()
    assert snap.state is RegState.DISABLED
    assert snap.registration_status is RegistrationStatus.NOT_APPLICABLE
    assert not snap.registered


def test_first_register_then_success() -> None:
    p, clock = make()
    p.activate()
    assert p.snapshot().registration_status is RegistrationStatus.NOT_REGISTERED
    assert p.poll() is Action.REGISTER
    assert p.state is RegState.REGISTERING
    assert p.poll() is None  # never two in flight
    clock.advance(0.02)
    out = p.on_response(OK)
    assert out.response_class is ResponseClass.SUCCESS
    assert out.duration == pytest.approx(0.02)
    snap = p.snapshot()
    assert snap.registered
    assert snap.state is RegState.REGISTERED
    assert snap.registration_status is RegistrationStatus.SUCCESS
    assert snap.last_registration_response == "200 OK"
    assert snap.last_response_code == 200
    assert snap.last_registered_ip == "192.0.2.10"
    assert snap.granted_expires == 600
    assert snap.next_action == "refresh"
    assert snap.consecutive_failures == 0


# -- refresh -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("granted", "margin", "expected"),
    [(3600, 30.0, 3570.0), (600, 30.0, 570.0), (60, 30.0, 30.0), (20, 30.0, 10.0), (4, 30.0, 2.0)],
)
def test_refresh_point_uses_granted_expiry(granted: int, margin: float, expected: float) -> None:
    p, clock = make(refresh_margin_sec=margin, expiration_sec=3600)
    p.activate()
    p.poll()
    p.on_response(RegisterResponse(code=200, reason="OK", expires=granted))
    assert p.next_action_in == pytest.approx(expected)
    clock.advance(expected - 0.01)
    assert p.poll() is None
    clock.advance(0.02)
    assert p.poll() is Action.REGISTER
    assert p.registered  # still bound while the refresh is in flight


def test_granted_expiry_smaller_than_requested_is_used() -> None:
    p, clock = make(expiration_sec=3600)
    p.activate()
    p.poll()
    p.on_response(RegisterResponse(code=200, reason="OK", expires=120))
    assert p.snapshot().granted_expires == 120
    clock.advance(120)
    assert not p.registered  # the binding is the granted one, not the requested one


def test_refreshes_keep_binding_alive_forever() -> None:
    p, clock = make(expiration_sec=60)
    p.activate()
    p.poll()
    p.on_response(RegisterResponse(code=200, reason="OK", expires=60))
    for _ in range(50):
        waited = run_until_action(p, clock, step=0.5)
        assert waited <= 60
        assert p.registered
        clock.advance(0.01)
        p.on_response(RegisterResponse(code=200, reason="OK", expires=60))
    assert p.snapshot().registration_status is RegistrationStatus.SUCCESS


def test_expiry_lapse_sets_expired() -> None:
    p, clock = make(expiration_sec=60, retry_base_sec=100.0, retry_max_sec=1000.0)
    p.activate()
    p.poll()
    p.on_response(RegisterResponse(code=200, reason="OK", expires=60))
    clock.advance(30)
    assert p.poll() is Action.REGISTER  # refresh
    p.on_response(RegisterResponse(code=503, reason="Service Unavailable"))
    assert p.registered  # failed refresh: binding still valid
    assert p.snapshot().registration_status is RegistrationStatus.SUCCESS
    clock.advance(30)
    p.poll()
    snap = p.snapshot()
    assert not snap.registered
    assert snap.registration_status is RegistrationStatus.EXPIRED
    assert snap.last_registration_response == "503 Service Unavailable"
    # a later success clears it
    run_until_action(p, clock, step=1.0)
    p.on_response(OK)
    assert p.snapshot().registration_status is RegistrationStatus.SUCCESS


# -- transient failures ---------------------------------------------------------------


def test_backoff_grows_exponentially_with_jitter_up_to_cap() -> None:
    p, clock = make(retry_base_sec=30.0, retry_max_sec=1800.0)
    p.activate()
    p.poll()
    waits = []
    for failures in range(1, 10):
        out = p.on_response(RegisterResponse(code=408, reason="Request Timeout"))
        upper = min(1800.0, 30.0 * 2**failures)
        assert out.next_in is not None
        assert upper / 2 <= out.next_in <= upper, (failures, out.next_in)
        waits.append(out.next_in)
        waited = run_until_action(p, clock, step=0.5)
        assert waited >= upper / 2 - 0.5
    assert waits[-1] <= 1800.0
    assert max(waits) >= 900.0  # the cap is reached
    assert p.snapshot().consecutive_failures == 9
    assert p.snapshot().registration_status is RegistrationStatus.FAILED


@pytest.mark.parametrize("code", [0, 408, 429, 480, 500, 502, 503, 504, 600, 603])
def test_transient_codes_back_off_and_never_give_up(code: int) -> None:
    p, clock = make(retry_base_sec=2.0, retry_max_sec=8.0)
    p.activate()
    sends = 0
    for _ in range(20):
        assert run_until_action(p, clock, step=0.25) <= 8.0
        sends += 1
        p.on_response(RegisterResponse(code=code, reason="x"))
    assert sends == 20
    assert p.state is RegState.RETRY_WAIT


def test_transport_error_text_is_kept() -> None:
    p, _ = make()
    p.activate()
    p.poll()
    out = p.on_response(RegisterResponse(code=503, reason="x", error="TLS failure: certificate verify failed"))
    assert out.response_class is ResponseClass.TRANSIENT
    assert p.snapshot().last_registration_response == "TLS failure: certificate verify failed"


def test_retry_after_is_honoured() -> None:
    p, clock = make(retry_base_sec=1.0, retry_max_sec=4.0)
    p.activate()
    p.poll()
    out = p.on_response(RegisterResponse(code=503, reason="Service Unavailable", retry_after=120))
    assert out.next_in == pytest.approx(120.0)
    clock.advance(119.9)
    assert p.poll() is None
    clock.advance(0.2)
    assert p.poll() is Action.REGISTER


def test_retry_after_smaller_than_backoff_does_not_shorten_it() -> None:
    p, _ = make(retry_base_sec=60.0, retry_max_sec=600.0)
    p.activate()
    p.poll()
    out = p.on_response(RegisterResponse(code=503, reason="x", retry_after=1))
    assert out.next_in is not None
    assert out.next_in >= 60.0


def test_no_final_response_times_out_as_408() -> None:
    p, clock = make(register_timeout_sec=40.0, retry_base_sec=5.0)
    p.activate()
    p.poll()
    clock.advance(39)
    assert p.poll() is None
    assert p.state is RegState.REGISTERING
    clock.advance(1.5)
    p.poll()
    assert p.state is RegState.RETRY_WAIT  # never stuck "in progress"
    assert len(p.timeouts) == 1  # surfaced for logs and metrics
    assert p.timeouts[0].duration == pytest.approx(40.5)
    assert p.snapshot().last_response_code == 408
    # a late answer from the stack while waiting to retry is ignored, not counted twice
    assert p.on_response(OK).ignored
    assert p.snapshot().consecutive_failures == 1


# -- credentials --------------------------------------------------------------------


@pytest.mark.parametrize("code", [401, 403, 407])
def test_rejected_credentials_retry_only_at_forbidden_interval(code: int) -> None:
    p, clock = make(forbidden_retry_interval_sec=300.0, retry_base_sec=1.0)
    p.activate()
    sent = []
    t = 0.0
    for _ in range(5):
        t += run_until_action(p, clock, step=1.0)
        sent.append(t)
        p.on_response(RegisterResponse(code=code, reason="Nope"))
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert all(300.0 <= g <= 331.0 for g in gaps), gaps
    snap = p.snapshot()
    assert snap.auth_retries == 5
    assert snap.consecutive_failures == 5
    assert snap.registration_status is RegistrationStatus.FAILED
    assert snap.next_action == "retry"


def test_auth_retries_reset_on_success() -> None:
    p, clock = make(forbidden_retry_interval_sec=10.0)
    p.activate()
    p.poll()
    p.on_response(RegisterResponse(code=401, reason="Unauthorized"))
    assert p.snapshot().auth_retries == 1
    run_until_action(p, clock, step=1.0)
    p.on_response(OK)
    assert p.snapshot().auth_retries == 0
    assert p.snapshot().consecutive_failures == 0


def test_other_4xx_is_retried_slowly_not_counted_as_auth() -> None:
    p, _ = make(forbidden_retry_interval_sec=300.0)
    p.activate()
    p.poll()
    out = p.on_response(RegisterResponse(code=404, reason="Not Found"))
    assert out.response_class is ResponseClass.REJECTED
    assert out.next_in is not None
    assert out.next_in >= 300.0
    assert p.snapshot().auth_retries == 0


# -- 423 -------------------------------------------------------------------------------


def test_423_adopts_min_expires_and_retries_at_once() -> None:
    p, _clock = make(expiration_sec=30)
    p.activate()
    p.poll()
    out = p.on_response(RegisterResponse(code=423, reason="Interval Too Brief", min_expires=120))
    assert out.next_in == 0.0
    assert p.requested_expires == 120
    assert p.poll() is Action.REGISTER
    p.on_response(RegisterResponse(code=200, reason="OK", expires=120))
    assert p.snapshot().granted_expires == 120
    assert p.snapshot().requested_expires == 120


def test_423_without_larger_min_expires_backs_off() -> None:
    p, _ = make(expiration_sec=300, retry_base_sec=10.0)
    p.activate()
    p.poll()
    out = p.on_response(RegisterResponse(code=423, reason="Interval Too Brief", min_expires=60))
    assert out.next_in is not None
    assert out.next_in >= 10.0  # no loop of immediate retries
    assert p.requested_expires == 300


# -- flows, refresh requests, stop --------------------------------------------------


def test_lost_flow_reregisters_at_once() -> None:
    p, _ = registered_policy()
    assert p.poll() is None
    p.on_flow_lost()
    assert p.poll() is Action.REGISTER


def test_lost_flow_while_backing_off_does_not_shortcut_backoff() -> None:
    p, _ = make(retry_base_sec=30.0)
    p.activate()
    p.poll()
    p.on_response(RegisterResponse(code=503, reason="x"))
    p.on_flow_lost()
    assert p.poll() is None


def test_request_refresh() -> None:
    p, _ = registered_policy()
    p.request_refresh()
    assert p.poll() is Action.REGISTER


def test_stop_unregisters_a_binding() -> None:
    p, clock = registered_policy()
    p.stop()
    assert p.poll() is Action.UNREGISTER
    assert p.state is RegState.UNREGISTERING
    clock.advance(0.01)
    out = p.on_response(RegisterResponse(code=200, reason="OK", expires=0))
    assert out.unregister
    snap = p.snapshot()
    assert snap.state is RegState.STOPPED
    assert not snap.registered
    assert snap.registration_status is RegistrationStatus.UNREGISTERED
    assert p.finished
    clock.advance(10_000)
    assert p.poll() is None  # nothing more is ever sent


def test_stop_waits_for_register_in_flight_then_unregisters() -> None:
    p, _ = make()
    p.activate()
    assert p.poll() is Action.REGISTER
    p.stop()
    assert p.poll() is None  # one transaction at a time
    p.on_response(OK)
    assert p.poll() is Action.UNREGISTER


def test_stop_without_binding_sends_nothing() -> None:
    p, _ = make(forbidden_retry_interval_sec=100.0)
    p.activate()
    p.poll()
    p.on_response(RegisterResponse(code=403, reason="Forbidden"))
    p.stop()
    assert p.poll() is None
    assert p.finished


def test_stop_during_initial_delay() -> None:
    p, _ = make(initial_delay_max_sec=10.0)
    p.activate()
    p.stop()
    assert p.poll() is None
    assert p.finished


def test_unregister_without_answer_gives_up_after_timeout() -> None:
    p, clock = registered_policy(unregister_timeout_sec=5.0)
    p.stop()
    assert p.poll() is Action.UNREGISTER
    clock.advance(5.1)
    p.poll()
    assert p.finished


def test_answer_with_nothing_in_flight_is_ignored() -> None:
    p, _ = make()
    assert p.on_response(OK).ignored


def test_stack_refresh_answer_is_accepted_when_registered() -> None:
    p, clock = registered_policy()
    clock.advance(100)
    out = p.on_response(RegisterResponse(code=200, reason="OK", expires=600))
    assert not out.ignored
    assert p.snapshot().attempts == 2


def test_illegal_move_raises() -> None:
    p, _ = make()
    with pytest.raises(IllegalTransitionError):
        p._move(RegState.REGISTERED)


def test_transition_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(RegState)


def test_status_timestamp_changes_only_with_status() -> None:
    p, clock = make()
    p.activate()
    first = p.snapshot().registration_status_updated_at
    clock.advance(5)
    assert p.snapshot().registration_status_updated_at == first
    p.poll()
    p.on_response(OK)
    assert p.snapshot().registration_status_updated_at == pytest.approx(first + 5)  # type: ignore[operator]


def test_uptime_and_next_action_are_wall_times() -> None:
    p, clock = registered_policy(expiration_sec=600)
    clock.advance(12)
    snap = p.snapshot()
    assert snap.uptime_sec == pytest.approx(12)
    assert snap.next_action_at == pytest.approx(clock.time() + 570 - 12)


def test_stray_failure_while_backing_off_is_not_counted_twice() -> None:
    p, _ = make(retry_base_sec=30.0)
    p.activate()
    p.poll()
    first = p.on_response(RegisterResponse(code=0, error="REGISTER not sent: DNS"))
    again = p.on_response(RegisterResponse(code=502, reason="x", error="DNS or transport failure: x"))
    assert again.ignored
    assert p.snapshot().consecutive_failures == 1
    assert p.next_action_in == pytest.approx(first.next_in)


def test_stop_of_inactive_connection_keeps_not_applicable() -> None:
    p, _ = make()
    p.stop()
    assert p.snapshot().registration_status is RegistrationStatus.NOT_APPLICABLE
    assert p.finished


# -- deadlines: how long the SIP thread may block -----------------------------------


def test_next_deadline_is_each_kind_of_due_time() -> None:
    p, clock = make(initial_delay_max_sec=2.0, register_timeout_sec=40.0, expiration_sec=600)
    assert p.next_deadline() is None  # not active: only an event can change anything
    p.activate()
    assert p.next_deadline() == pytest.approx(clock.monotonic() + (p.next_action_in or 0.0))  # first REGISTER
    clock.advance(2.0)
    assert p.poll() is Action.REGISTER
    assert p.next_deadline() == pytest.approx(clock.monotonic() + 40.0)  # the REGISTER's timeout
    p.on_response(OK)
    now = clock.monotonic()
    assert p.next_deadline() == pytest.approx(now + 570.0)  # the refresh, before the binding's expiry
    p.stop()
    assert p.next_deadline() == pytest.approx(now)  # the unregister is due at once


def test_binding_expiry_is_a_deadline_while_retries_back_off() -> None:
    p, clock = make(expiration_sec=60, refresh_margin_sec=30.0, retry_base_sec=600.0)
    p.activate()
    assert p.poll() is Action.REGISTER
    p.on_response(RegisterResponse(code=200, reason="OK", expires=60))
    clock.advance(30)
    assert p.poll() is Action.REGISTER
    p.on_response(RegisterResponse(code=503, reason="Service Unavailable"))
    expires_at = clock.monotonic() + 30.0
    assert p.next_deadline() == pytest.approx(expires_at)  # lapses before the retry (300-600 s away)
    clock.advance(30.0)
    p.poll()
    assert p.snapshot().registration_status is RegistrationStatus.EXPIRED


@pytest.mark.parametrize("seed", range(25))
def test_poll_before_the_deadline_never_acts(seed: int) -> None:
    """Blocking until next_deadline() loses nothing: polls in between change nothing visible."""
    rng = random.Random(seed)
    p, clock = make(
        initial_delay_max_sec=rng.choice([0.0, 2.0]),
        expiration_sec=rng.choice([20, 60, 600]),
        retry_base_sec=rng.choice([1.0, 30.0]),
        register_timeout_sec=rng.choice([5.0, 40.0]),
    )
    p.activate()
    answers = [OK, RegisterResponse(code=503, reason="x"), RegisterResponse(code=403, reason="x"), None]
    for _ in range(30):
        deadline = p.next_deadline()
        assert deadline is not None
        key = p.change_key()
        if deadline > clock.monotonic():
            clock.advance((deadline - clock.monotonic()) * rng.random() * 0.99)
            assert p.poll() is None
            assert p.change_key() == key
            clock.advance(deadline - clock.monotonic())
        action = p.poll()
        if action is Action.REGISTER:
            answer = rng.choice(answers)
            if answer is not None:  # else: no answer, the REGISTER times out at its deadline
                p.on_response(answer)


def test_change_key_ignores_time_alone() -> None:
    p, clock = registered_policy()
    key = p.change_key()
    clock.advance(10)
    p.poll()
    assert p.change_key() == key  # uptime and wall-clock views moved; nothing else did
    p.request_refresh()
    assert p.change_key() != key  # a refresh due now is visible


def test_a_failover_retries_at_once_without_counting_toward_the_backoff() -> None:
    p, _clock = make()
    p.activate()
    assert p.poll() is Action.REGISTER
    out = p.on_response(RegisterResponse(code=503, reason="Service Unavailable"), failover=True)
    assert out.state is RegState.RETRY_WAIT
    assert out.next_in == 0.0
    assert p.failures == 0
    assert p.next_kind == "failover"
    assert p.poll() is Action.REGISTER  # the next target, now
    out = p.on_response(RegisterResponse(code=503, reason="Service Unavailable"))  # the last target: backoff
    assert p.failures == 1
    assert out.next_in is not None and out.next_in >= 15.0
    assert p.next_kind == "retry"


def test_a_success_is_never_a_failover() -> None:
    p, _clock = make()
    p.activate()
    assert p.poll() is Action.REGISTER
    out = p.on_response(OK, failover=True)
    assert out.state is RegState.REGISTERED
    assert p.next_kind == "refresh"
