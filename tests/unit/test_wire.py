"""The supervisor/worker wire: every message survives a round trip, and nothing else is loaded."""

from __future__ import annotations

import os
import pickle
import struct

import pytest

from agent.core.clock import FakeClock
from agent.core.policy import PolicySettings, RegistrationPolicy
from agent.ipc import messages as m
from agent.ipc.wire import MAX_FRAME, FrameReader, WireError, encode

ACCOUNT = m.AccountSpec(
    "c1", "sip:u@pbx", "sip:pbx;transport=tcp", ("sip:op;lr",), "TCP", "u", "s3cret", 300, "<sip:u@edge:5060;line=c1>"
)
STACK = m.StackSettings("127.0.0.1", 25070, "sip:127.0.0.1:25060;lr", "uac-agent", 2, False)


def every_message() -> list[object]:
    hop = m.Hop("pbx.example.com", (m.HopTarget("sip:192.0.2.1:5060", "pbx1 192.0.2.1:5060 (A)"),), None)
    spec = m.ConnSpec("c1", ACCOUNT, PolicySettings(), register_at_once=True, hop=hop)
    snap = RegistrationPolicy(PolicySettings(), FakeClock()).snapshot()
    return [
        m.Start(3, STACK, "info", 5.0),
        m.Apply(1, spec),
        m.Remove(2, "c1"),
        m.RegisterNow(3, "c1"),
        m.UnregisterNow(4, "c1"),
        m.Ping(7),
        m.FlowClosed("127.0.0.1", 5060),
        m.Shutdown(5.0, "test"),
        m.Ready(1234),
        m.StartFailed("port in use"),
        m.Done(1, "added"),
        m.Done(2, error_kind="unknown", error="no connection c1"),
        m.StateChanged("c1", snap),
        m.RegisterAnswered("c1", 200, 0.01),
        m.FlowLost("TCP"),
        m.Failover("c1", "leg_b"),
        m.Log("info", "register_response", {"code": 200, "cause": None, "list": [1, "a"]}),
        m.Pong(7),
        m.Stopped(("c1",)),
    ]


def test_every_message_round_trips_in_any_chunking() -> None:
    msgs = every_message()
    assert {type(x).__name__ for x in msgs} == set(m.__all__) - {
        "AccountSpec",
        "ConnSpec",
        "Hop",
        "HopTarget",
        "StackSettings",
        "Command",
        "Event",
        "ErrorKind",
    }
    data = encode(msgs[:10]) + encode(msgs[10:])
    for size in (1, 7, len(data)):
        reader = FrameReader()
        out: list[object] = []
        for i in range(0, len(data), size):
            out += reader.feed(data[i : i + size])
        assert out == msgs
        assert reader.pending == 0


def test_the_password_is_never_in_a_repr() -> None:
    assert "s3cret" not in repr(ACCOUNT) and "s3cret" not in repr(
        m.Apply(1, m.ConnSpec("c1", ACCOUNT, PolicySettings()))
    )


def test_a_frame_with_anything_but_messages_is_refused() -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("true",))

    body = pickle.dumps((Evil(),))
    with pytest.raises(WireError, match="is not a message type"):
        FrameReader().feed(struct.pack(">I", len(body)) + body)
    body = pickle.dumps([m.Ping(1)])  # a list, not a batch
    with pytest.raises(WireError, match="tuple"):
        FrameReader().feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(WireError, match="undecodable"):
        FrameReader().feed(struct.pack(">I", 3) + b"abc")


def test_an_oversized_frame_is_refused_before_it_is_read() -> None:
    with pytest.raises(WireError, match="limit"):
        FrameReader().feed(struct.pack(">I", MAX_FRAME + 1))
