"""The forwarding rules (agent.core.forwarding): no SIP stack, no sockets."""

from __future__ import annotations

import ipaddress

import pytest

from agent.core.forwarding import (
    Action,
    BridgeCall,
    BridgeState,
    CallResult,
    IllegalCallEventError,
    Kind,
    caller_identity,
    leg_b_from_uri,
    line_of,
    request_uri,
    result_for_code,
    source_allowed,
)

INVITE = (
    "INVITE sip:frank@127.0.0.1:5070;line=c-1 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1\r\n"
    'From: "Alice" <sip:1000@pbx>;tag=1\r\n\r\n'
)


def test_request_uri_and_line() -> None:
    ruri = request_uri(INVITE)
    assert ruri == "sip:frank@127.0.0.1:5070;line=c-1"
    assert line_of(ruri) == "c-1"
    assert line_of("sip:frank@127.0.0.1:5070;transport=tcp;line=abc_9;ob") == "abc_9"
    assert line_of("sip:frank@127.0.0.1:5070") is None
    assert line_of("sip:frank@h;lines=x") is None
    assert line_of("sip:frank@h?X-Line=;line=evil") is None  # URI headers are not parameters
    assert request_uri("garbage") == ""


def test_source_allowed() -> None:
    cidrs = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]
    assert source_allowed("192.0.2.5", {"192.0.2.5"}, [])
    assert not source_allowed("192.0.2.6", {"192.0.2.5"}, [])
    assert source_allowed("10.1.2.3", set(), cidrs)
    assert source_allowed("[2001:db8::1]", set(), cidrs)
    assert not source_allowed("11.0.0.1", {"not-an-ip"}, cidrs)
    assert not source_allowed("", {"192.0.2.5"}, cidrs)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"Alice Smith" <sip:1000@pbx.example.com>;tag=x', ("Alice Smith", "1000")),
        ("Bob <sip:2000@pbx>;tag=y", ("Bob", "2000")),
        ("<sip:3000@pbx>;tag=z", ("", "3000")),
        ("sip:4000@pbx;tag=z", ("", "4000")),
        ('"Esc \\"q\\"" <sips:5000@pbx>', ('Esc \\"q\\"', "5000")),
        ("<sip:pbx.example.com>", ("", "")),
    ],
)
def test_caller_identity(value: str, expected: tuple[str, str]) -> None:
    assert caller_identity(value) == expected


def test_leg_b_from_uri_carries_caller_and_sanitises() -> None:
    assert leg_b_from_uri("Alice", "1000", "127.0.0.1", "uac-agent") == '"Alice" <sip:1000@127.0.0.1>'
    assert leg_b_from_uri("", "", "h", "uac-agent") == "<sip:uac-agent@h>"
    assert leg_b_from_uri('x"\r\nEvil: 1', "1000", "h", "a") == '"xEvil: 1" <sip:1000@h>'
    assert leg_b_from_uri("", "bad user>", "h", "a") == "<sip:a@h>"


def test_result_for_code() -> None:
    assert result_for_code(486) is CallResult.BUSY
    assert result_for_code(600) is CallResult.BUSY
    assert result_for_code(603) is CallResult.DECLINED
    assert result_for_code(404) is CallResult.FAILED


def test_answered_call_answers_leg_a_only_when_leg_b_answers() -> None:
    b = BridgeCall(started_at=0.0, ring_timeout_sec=60)
    assert b.b_progress(100, early_media=False) == []
    assert b.b_progress(180, early_media=False) == [Action(Kind.ANSWER_A, 180)]
    assert b.b_progress(180, early_media=False) == []  # relayed once
    assert b.b_progress(183, early_media=True) == [Action(Kind.ANSWER_A, 183)]
    assert b.state is BridgeState.EARLY
    assert b.b_answered(now=1.5) == [Action(Kind.ANSWER_A, 200)]
    assert (b.state, b.answered_at, b.code) == (BridgeState.ANSWERED, 1.5, 200)
    assert b.b_progress(180, early_media=False) == []  # late provisional: ignored
    assert b.a_ended() == [Action(Kind.HANGUP_B)]
    assert (b.state, b.result) == (BridgeState.ENDED, CallResult.ANSWERED)
    assert b.b_ended() == []  # leg B's own end afterwards is expected


def test_bye_from_destination_ends_leg_a() -> None:
    b = BridgeCall(started_at=0.0, ring_timeout_sec=60)
    b.b_answered(now=1.0)
    assert b.b_ended() == [Action(Kind.HANGUP_A)]
    assert b.result is CallResult.ANSWERED


@pytest.mark.parametrize(
    ("code", "relayed", "result"),
    [
        (486, 486, CallResult.BUSY),
        (404, 404, CallResult.FAILED),
        (603, 603, CallResult.DECLINED),
        (503, 503, CallResult.FAILED),
        (408, 408, CallResult.FAILED),
        (0, 480, CallResult.FAILED),  # no response at all
        (487, 480, CallResult.FAILED),  # cancelled, but not by the PBX
        (200, 500, CallResult.FAILED),  # nonsense from the stack
    ],
)
def test_leg_b_failure_is_relayed(code: int, relayed: int, result: CallResult) -> None:
    b = BridgeCall(started_at=0.0, ring_timeout_sec=60)
    assert b.b_failed(code) == [Action(Kind.REJECT_A, relayed)]
    assert (b.state, b.result, b.code) == (BridgeState.ENDED, result, relayed)


def test_cancel_from_pbx_cancels_leg_b() -> None:
    b = BridgeCall(started_at=0.0, ring_timeout_sec=60)
    b.b_progress(180, early_media=False)
    assert b.a_ended() == [Action(Kind.HANGUP_B)]
    assert (b.result, b.code) == (CallResult.CANCELLED, 487)
    assert b.b_failed(487) == []  # leg B's 487 that follows is not relayed again


def test_ring_timeout() -> None:
    b = BridgeCall(started_at=10.0, ring_timeout_sec=60)
    assert b.ring_deadline == 70.0
    assert b.poll(69.9) == []
    assert b.poll(70.0) == [Action(Kind.HANGUP_B), Action(Kind.REJECT_A, 480)]
    assert (b.result, b.code, b.ring_deadline) == (CallResult.NO_ANSWER, 480, None)
    assert b.poll(100.0) == []


def test_no_ring_timeout_once_answered() -> None:
    b = BridgeCall(started_at=0.0, ring_timeout_sec=5)
    b.b_answered(now=1.0)
    assert b.ring_deadline is None
    assert b.poll(1000.0) == []


def test_illegal_events_raise() -> None:
    b = BridgeCall(started_at=0.0, ring_timeout_sec=60)
    with pytest.raises(IllegalCallEventError):
        b.b_ended()  # a BYE from leg B before it answered is not a thing
    b.b_answered(now=0.5)
    with pytest.raises(IllegalCallEventError):
        b.b_failed(486)  # a failure after the answer
