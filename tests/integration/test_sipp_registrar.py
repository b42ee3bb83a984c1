"""The agent against scripted SIPp registrars: what the registrar saw, and when."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab.kamailio import free_port
from lab.sipp import Sipp, scenario_path
from tests.integration.agentproc import AgentProcess


@pytest.fixture
def sipp_factory(tmp_path: Path) -> Iterator[Callable[..., Sipp]]:
    started: list[Sipp] = []

    def make(scenario: str, **variables: str | int) -> Sipp:
        # calls: pjsip starts a new Call-ID after a failed attempt, a new "call" for SIPp
        s = Sipp(scenario_path(scenario), free_port(), variables, tmp_path / f"sipp{len(started)}", calls=1000)
        started.append(s)
        s.start()
        return s

    yield make
    for s in started:
        s.stop()


def conn(
    sipp: Sipp, user: str = "alice", password: str = "secret", expires: int = 300, **registration: float
) -> dict[str, object]:
    return {
        "connection_id": "c-sipp",
        "user_id": "323",
        "external_uac_settings": {
            "proxy": sipp.uri,
            "transport": "UDP",
            "username": user,
            "password": password,
            "expiration_sec": expires,
        },
        "internal_uac_settings": {"destination_uri": "1006@assistant-abc123.sip.telnyx.com"},
        "registration": registration,
    }


def test_423_then_200_adopts_min_expires(
    sipp_factory: Callable[..., Sipp], agent_factory: Callable[..., AgentProcess]
) -> None:
    sipp = sipp_factory("reg_423_then_200.xml", min=120, user="alice", **{"pass": "secret"})
    agent = agent_factory([conn(sipp, expires=30)])
    agent.wait_for(lambda: agent.status("c-sipp")["registered"], 15, "registered after 423")
    st = agent.status("c-sipp")
    assert st["last_registration_response"] == "200 OK"
    assert st["sip_registration_details"]["expires"] == 120
    regs = sipp.received_requests("REGISTER")
    assert regs[0].expires == 30
    assert any(r.status_code == 423 for r in sipp.sent_responses())
    # every REGISTER after the 423 asks for Min-Expires
    assert all(r.expires == 120 for r in regs[1:]), [r.expires for r in regs]
    assert agent.terminate() == 0


def test_wrong_password_register_count_is_bounded_by_forbidden_interval(
    sipp_factory: Callable[..., Sipp], agent_factory: Callable[..., AgentProcess]
) -> None:
    interval = 4.0
    window = 13.0
    sipp = sipp_factory("reg_auth_reject.xml", user="alice", **{"pass": "secret"})
    start = time.monotonic()
    agent = agent_factory([conn(sipp, password="wrong-password", forbidden_retry_interval=interval)])
    time.sleep(window - (time.monotonic() - start))
    regs = sipp.received_requests("REGISTER")
    attempts = [r for r in regs if r.has_authorization]
    # Policy bound: the first attempt, then at most one per forbidden interval.
    bound = 1 + int(window // interval)
    assert 2 <= len(attempts) <= bound, [r.timestamp for r in attempts]
    assert len(regs) <= 2 * bound  # each attempt: one unauthenticated + one with credentials
    gaps = [b.timestamp - a.timestamp for a, b in itertools.pairwise(attempts)]
    assert all(g >= interval - 0.05 for g in gaps), gaps  # never sooner than the interval
    st = agent.status("c-sipp")
    assert st["last_registration_response"] == "401 Unauthorized"
    assert st["registered"] is False
    assert st["registration_status"] == 2
    assert st["sip_registration_details"]["auth_retries"] == len(attempts)
    assert "wrong-password" not in agent.raw_log()
    assert agent.terminate() == 0


def test_503_with_retry_after_next_attempt_not_sooner(
    sipp_factory: Callable[..., Sipp], agent_factory: Callable[..., AgentProcess]
) -> None:
    retry_after = 5
    sipp = sipp_factory("reg_503_retry_after.xml", ra=retry_after)
    agent = agent_factory([conn(sipp, retry_base_sec=0.5, retry_max_sec=1.0)])
    agent.wait_for(lambda: len(sipp.received_requests("REGISTER")) >= 3, 20, "three REGISTERs")
    regs = sipp.received_requests("REGISTER")
    gaps = [b.timestamp - a.timestamp for a, b in itertools.pairwise(regs)]
    # backoff alone would retry within 1 s; Retry-After holds it off
    assert all(g >= retry_after - 0.05 for g in gaps), gaps
    st = agent.status("c-sipp")
    assert st["last_registration_response"] == "503 Service Unavailable"
    assert st["registered"] is False
    assert agent.terminate() == 0


def test_short_granted_expiry_refreshes_same_call_id_cseq_increasing_never_lapsed(
    sipp_factory: Callable[..., Sipp], agent_factory: Callable[..., AgentProcess]
) -> None:
    granted = 4
    sipp = sipp_factory("reg_short_expiry.xml", exp=granted, user="alice", **{"pass": "secret"})
    agent = agent_factory([conn(sipp, expires=3600)])
    agent.wait_for(lambda: agent.status("c-sipp")["registered"], 15, "first registration")
    observed_lapse = False
    deadline = time.monotonic() + 13
    while time.monotonic() < deadline:
        st = agent.status("c-sipp")
        observed_lapse |= not st["registered"]
        time.sleep(0.2)
    assert not observed_lapse
    st = agent.status("c-sipp")
    assert st["sip_registration_details"]["expires"] == granted
    assert st["registration_status"] == 4
    oks = sipp.sent_responses(200)
    assert len(oks) >= 4, len(oks)  # several refreshes in 13 s with a 4 s binding
    regs = sipp.received_requests("REGISTER")
    assert len({r.call_id for r in regs}) == 1  # one Call-ID for the connection
    cseqs = [r.cseq_number for r in regs]
    assert cseqs == sorted(cseqs)
    assert len(set(cseqs)) == len(cseqs)  # strictly increasing
    # each 200 was followed by the next REGISTER before the binding lapsed
    ok_times = [r.timestamp for r in oks]
    for a, b in itertools.pairwise(ok_times):
        assert b - a < granted, (a, b)
    assert agent.terminate() == 0
    # the unregistration was seen too (Expires: 0)
    assert sipp.received_requests("REGISTER")[-1].expires == 0


def test_a_register_in_flight_when_the_tcp_registrar_goes_away_is_answered_at_once(
    tmp_path: Path, agent_factory: Callable[..., AgentProcess]
) -> None:
    """A TCP registrar takes the REGISTER and closes the connection without answering (it
    restarts). The edge answers the worker's REGISTER itself as soon as the connection closes,
    so the agent reports why and retries on its own schedule; it does not wait out the 32 s
    transaction timer."""
    sipp = Sipp(scenario_path("reg_close_unanswered.xml"), free_port(), {}, tmp_path / "sipp", transport="t1")
    sipp.start()
    try:
        c = conn(sipp, retry_base_sec=30, retry_max_sec=60)
        c["external_uac_settings"]["transport"] = "TCP"  # type: ignore[index]
        agent = agent_factory([c])
        sipp.wait(15)
        closed = time.monotonic()
        assert len(sipp.received_requests("REGISTER")) == 1
        agent.wait_for(
            lambda: "closed before the PBX answered" in (agent.status("c-sipp")["last_registration_response"] or ""),
            5,
            "the edge's answer to the REGISTER in flight",
        )
        assert time.monotonic() - closed < 5
        st = agent.status("c-sipp")
        assert not st["registered"], st
        answered = agent.events("register_response")
        assert "closed before the PBX answered" in str(answered[-1]), answered[-1]
    finally:
        sipp.stop()
