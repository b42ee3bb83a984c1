"""The forwarding rules (agent.core.forwarding) and the edge's records and events
(agent.edge.messages): no SIP stack, no sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent.core.forwarding import (
    CallResult,
    call_sources,
    caller_identity,
    final_outcome,
    line_of,
    request_uri,
    result_for_code,
)
from agent.edge.calls import CallBook
from agent.edge.messages import (
    CallEnded,
    CallFinal,
    CallPlainRtp,
    CallRejected,
    CallStarted,
    EdgeConnection,
    EdgeEventError,
    TcpClosed,
    TcpPending,
    parse_event,
)
from agent.metrics import Metrics

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


def test_call_sources_are_host_cidrs_of_the_pbx_and_the_allowed_networks() -> None:
    assert call_sources(["192.0.2.5", "[2001:db8::1]", "pbx.example.com"], ["10.1.0.0/16"]) == (
        "192.0.2.5/32",
        "2001:db8::1/128",
        "10.1.0.0/16",
    )
    assert call_sources(["192.0.2.5", "192.0.2.5"], ["192.0.2.5/32"]) == ("192.0.2.5/32",)  # once each
    assert call_sources([], []) == ()  # nobody may call


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


def test_result_for_code() -> None:
    assert result_for_code(486) is CallResult.BUSY
    assert result_for_code(600) is CallResult.BUSY
    assert result_for_code(603) is CallResult.DECLINED
    assert result_for_code(404) is CallResult.FAILED


@pytest.mark.parametrize(
    ("code", "by", "result", "relayed"),
    [
        (200, "destination", CallResult.ANSWERED, 200),
        (486, "destination", CallResult.BUSY, 486),
        (404, "destination", CallResult.FAILED, 404),
        (603, "destination", CallResult.DECLINED, 603),
        (503, "destination", CallResult.FAILED, 500),  # the PBX gets 500 (RFC 3261 16.7)
        (0, "destination", CallResult.FAILED, 480),  # no response at all
        (487, "destination", CallResult.FAILED, 480),  # cancelled, but not by the PBX
        (0, "pbx_cancel", CallResult.CANCELLED, 487),
        (0, "ring_timeout", CallResult.NO_ANSWER, 480),
        (500, "edge", CallResult.FAILED, 500),
    ],
)
def test_final_outcome(code: int, by: str, result: CallResult, relayed: int) -> None:
    assert final_outcome(code, by) == (result, relayed)


def record(**kw: object) -> EdgeConnection:
    base: dict[str, object] = {
        "line": "c-1",
        "connection_id": "c-1",
        "transport": "TCP",
        "mode": "bridge",
        "destination": "sip:1006@127.0.0.1:5999",
        "targets": ("sip:127.0.0.1:5999", "sip:127.0.0.2:5999"),
        "ring_timeout_sec": 30,
        "max_calls": 5,
        "sources": ("127.0.0.1/32", "10.0.0.0/8"),
        "pbx_address": "127.0.0.1",
        "pbx_record_route": "127.0.0.1:5060;transport=tcp",
        "dest_address": "127.0.0.1",
        "pbx_media": "loc",
        "dest_media": "loc",
        "from_user": "601",
    }
    base.update(kw)
    return EdgeConnection(**base)  # type: ignore[arg-type]


def test_edge_record_is_the_layout_routes_cfg_reads() -> None:
    fields = record().encode().split("|")
    assert len(fields) == 14  # route CONN reads fields 0..13
    assert fields[:3] == ["c-1", "tcp", "bridge"]
    assert fields[4] == "sip:127.0.0.1:5999,sip:127.0.0.2:5999"
    assert fields[5] == "30000"  # ring timeout in ms
    assert fields[6] == "5"
    assert fields[13] == "601"
    assert record(max_calls=None).encode().split("|")[6] == "0"  # 0: no per-connection limit


@pytest.mark.parametrize("bad", [{"destination": "sip:a|b@h"}, {"from_user": "x\ny"}, {"targets": ("sip:a,b",)}])
def test_edge_record_refuses_what_would_break_its_layout(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"cannot be handed to the edge|holds ','"):
        record(**bad).encode()


def event(**kw: object) -> bytes:
    return json.dumps(kw).encode()


def test_edge_events_are_typed_values() -> None:
    ev = parse_event(
        event(ev="start", cid="c-1", ci="abc", t="12.5", src="127.0.0.1", ruri="sip:x;line=c-1", proto="tls")
    )
    assert ev == CallStarted("c-1", "abc", "127.0.0.1", "", "sip:x;line=c-1", 12.5, "tls")
    ev = parse_event(event(ev="rejected", cid="", method="SUBSCRIBE", reason="method_not_allowed", code=405))
    assert isinstance(ev, CallRejected) and (ev.method, ev.code, ev.reason) == ("SUBSCRIBE", 405, "method_not_allowed")
    assert parse_event(event(ev="final", cid="c", ci="x", code="486", by="destination", t="2", t0="1")) == CallFinal(
        "c", "x", 486, "destination", 2.0, 1.0
    )
    assert parse_event(event(ev="end", cid="c", ci="x", t="3", t0="1")) == CallEnded("c", "x", 3.0, 1.0)
    assert parse_event(event(ev="tcp_closed", ip="127.0.0.1", port=5060)) == TcpClosed("127.0.0.1", 5060)
    # a worker's request on a TCP connection to the PBX (the port 5060 when the URI names none)
    assert parse_event(event(ev="tcp_pending", ip="[::1]", port="", ci="x", cseq="2 REGISTER")) == TcpPending(
        "::1", 5060, "x", "2 REGISTER"
    )
    # events written out whole by the edge carry the Call-ID hex-encoded
    cix = b'a"b\\c@host'.hex()
    assert parse_event(event(ev="end", cid="c", cix=cix, t="3", t0="1")) == CallEnded("c", 'a"b\\c@host', 3.0, 1.0)
    with pytest.raises(EdgeEventError):
        parse_event(event(ev="end", cid="c", cix="not hex", t="3"))
    assert parse_event(event(ev="plain_rtp", cid="c", ci="x", code="488", by="sip:d1:5060", t="2")) == CallPlainRtp(
        "c", "x", "sip:d1:5060", 2.0
    )


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.lines.append((event, kw))


def test_an_answer_that_overtakes_the_start_of_its_call_waits_for_it() -> None:
    """Kamailio tells a call's start once its INVITE is on the way; the destination's answer and
    even the call's end (told by other Kamailio processes) may come first. They wait for the
    start: the call is counted once, answered, and is no longer active."""
    registry = CollectorRegistry()
    log = _Log()
    counts: list[tuple[str, int]] = []
    book = CallBook(Metrics(registry), log, lambda cid, n: counts.append((cid, n)))
    book.on_event(CallFinal("c-1", "abc", 200, "destination", 1.2, 1.0))
    book.on_event(CallEnded("c-1", "abc", 3.0, 1.0))
    assert (book.active, log.lines) == ({}, [])  # nothing yet: the call has not started
    book.on_event(CallStarted("c-1", "abc", "127.0.0.1", "", "sip:x;line=c-1", 1.0, "udp"))
    assert counts == [("c-1", 1), ("c-1", 0)] and book.active == {"c-1": 0}
    answered = registry.get_sample_value("uac_agent_calls_total", {"connection_id": "c-1", "result": "answered"})
    assert answered == 1.0
    assert [e for e, _ in log.lines] == ["call_started", "call_ended"]
    assert log.lines[1][1]["duration_sec"] == 2.0
    # a refusal has no start: counted, and no call is left active
    book.on_event(CallRejected("c-1", "def", "INVITE", "media_unavailable", 503, "127.0.0.1", "udp", "sip:x", 4.0))
    refused = registry.get_sample_value(
        "uac_agent_inbound_rejected_total", {"connection_id": "c-1", "reason": "media_unavailable"}
    )
    assert refused == 1.0 and book.active == {"c-1": 0}


@pytest.mark.parametrize("raw", [b"not json", b"[1]", json.dumps({"ev": "nonsense"}).encode(), b"\xff"])
def test_anything_else_on_the_event_stream_is_refused(raw: bytes) -> None:
    with pytest.raises(EdgeEventError):
        parse_event(raw)
