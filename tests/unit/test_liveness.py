"""Registrar liveness (agent/core/liveness.py): a hand-driven clock, no sockets, no SIP stack."""

from __future__ import annotations

from agent.core.clock import FakeClock
from agent.core.liveness import RegistrarProbe


def probe(interval: float = 30.0, misses: int = 2) -> tuple[RegistrarProbe, FakeClock]:
    clock = FakeClock()
    return RegistrarProbe(interval, misses, clock), clock


def test_first_keepalive_one_interval_after_the_register_then_every_interval() -> None:
    p, clock = probe()
    assert p.poll(allowed=True) is False  # a REGISTER was just answered
    assert p.next_deadline() == clock.monotonic() + 30
    clock.advance(29.9)
    assert p.poll(allowed=True) is False
    clock.advance(0.1)
    assert p.poll(allowed=True) is True
    assert p.on_answer(200, "OK") is False  # alive all along: nothing to recover
    assert p.view().reachable is True
    clock.advance(30)
    assert p.poll(allowed=True) is True


def test_misses_in_a_row_make_it_unreachable_and_the_first_answer_is_a_recovery() -> None:
    p, clock = probe(interval=10, misses=2)
    p.poll(True)
    clock.advance(10)
    assert p.poll(True) is True  # keepalive 1
    p.on_failure("408 Request Timeout")  # the stack gave up on it
    clock.advance(10)
    assert p.poll(True) is True  # window 1 missed; keepalive 2
    assert (p.misses, p.reachable) == (1, None)
    clock.advance(10)
    assert p.poll(True) is False  # keepalive 2 still in the stack: not doubled
    assert (p.misses, p.reachable) == (2, False)
    assert p.view().last_probe == "no answer"
    clock.advance(3)
    assert p.on_answer(200, "OK") is True  # a retransmission was answered: register now
    assert (p.misses, p.reachable) == (0, True)
    assert p.on_answer(200, "OK") is False


def test_any_final_answer_counts_as_alive() -> None:
    p, clock = probe(interval=5, misses=1)
    p.poll(True)
    clock.advance(5)
    assert p.poll(True)
    p.on_failure("transport failure: Connection refused")
    clock.advance(5)
    assert p.poll(True)
    assert p.reachable is False
    assert p.on_answer(404, "Not Found") is True
    assert p.view().last_probe == "404 Not Found"


def test_no_keepalive_while_a_register_is_in_flight_or_the_connection_is_not_registering() -> None:
    p, clock = probe(interval=10)
    p.poll(True)
    clock.advance(100)
    assert p.poll(allowed=False) is False
    assert p.next_deadline() is None
    assert p.misses == 0  # nothing was outstanding: nothing missed
    assert p.poll(allowed=True) is False  # restarts one interval later
    clock.advance(10)
    assert p.poll(allowed=True) is True


def test_register_outcomes_count_too() -> None:
    p, _clock = probe(interval=10, misses=2)
    assert p.on_register_result(answered=False) is False
    assert p.on_register_result(answered=False) is False
    assert (p.misses, p.reachable) == (2, False)
    assert p.on_register_result(answered=True) is True
    assert p.reachable is True


def test_off_when_the_interval_is_zero() -> None:
    p, clock = probe(interval=0)
    clock.advance(1000)
    assert p.poll(True) is False
    assert p.next_deadline() is None
    assert p.view().reachable is None


def test_connections_sharing_a_registrar_share_one_keepalive_per_interval() -> None:
    clock = FakeClock()
    a = RegistrarProbe(10, 2, clock)
    a.poll(True)
    clock.advance(3)
    b = RegistrarProbe(10, 2, clock)  # registered 3 s later: its windows end 3 s after a's
    b.poll(True)
    sent = {"a": 0, "b": 0}
    for _ in range(100):  # 100 s
        clock.advance(1)
        for name, p, peer in (("a", a, b), ("b", b, a)):
            if p.poll(True):
                sent[name] += 1
                p.on_answer(200, "OK")
                peer.on_peer_answer()
    assert sent == {"a": 10, "b": 0}  # one keepalive per interval for the two
    assert (a.misses, b.misses, a.reachable, b.reachable) == (0, 0, True, True)


def test_a_peer_that_stops_probing_leaves_the_keepalive_to_the_other() -> None:
    clock = FakeClock()
    a, b = RegistrarProbe(10, 2, clock), RegistrarProbe(10, 2, clock)
    a.poll(True)
    b.poll(True)
    clock.advance(10)
    assert a.poll(True) is True
    a.on_answer(200, "OK")
    b.on_peer_answer()
    assert b.poll(True) is False  # a's answer counts for b: it sends none
    clock.advance(10)
    assert a.poll(allowed=False) is False  # a's REGISTER is in flight: it probes no more
    assert b.poll(True) is True  # no peer answer in b's last window: b probes itself
    assert b.misses == 0  # b did not probe in the window a covered: nothing missed
