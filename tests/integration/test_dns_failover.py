"""Registration across DNS targets (RFC 3263, seed 003's "Failover & Retries"), with a real DNS
server (dnsmasq) on loopback, real Kamailio registrars and SIPp registrars:

* SRV with two registrars (priority 10 and 20): the agent registers at the first; when it dies
  the agent is registered at the second within seconds, not after a backoff;
* a 503 from the first moves the registration too; a 403 does not;
* a DNS server that never answers: the agent stays healthy, other connections refresh on time,
  and the affected one shows the DNS failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.dnsmasq import Dnsmasq, SilentDns, dnsmasq_binary
from lab.kamailio import Kamailio, free_port
from lab.sipp import Sipp, scenario_path
from tests.integration.agentproc import AgentProcess
from tests.integration.conftest import connection, start_kamailio

DOMAIN = "pbx.lab.test"


@pytest.fixture(scope="session", autouse=True)
def _dnsmasq_installed() -> None:
    try:
        dnsmasq_binary()
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture
def two_registrars(tmp_path: Path, pki: dict[str, Path]) -> Iterator[tuple[Kamailio, Kamailio]]:
    k1 = start_kamailio(tmp_path / "k1", pki)
    k2 = start_kamailio(tmp_path / "k2", pki)
    yield k1, k2
    k1.stop()
    k2.stop()


def srv_for(transport: str, *targets: tuple[str, int, int]) -> list[tuple[str, str, int, int, int]]:
    prefix = {"UDP": "_sip._udp", "TCP": "_sip._tcp"}[transport]
    return [(f"{prefix}.{DOMAIN}", host, port, prio, 0) for host, port, prio in targets]


def start_dns(tmp_path: Path, srv: list[tuple[str, str, int, int, int]], **kw: Any) -> Dnsmasq:
    hosts = {"r1.lab.test": ["127.0.0.1"], "r2.lab.test": ["127.0.0.1"]}
    return Dnsmasq(tmp_path / "dns", srv=srv, hosts=hosts, ttl=kw.pop("ttl", 60), **kw).start()


def target_of(agent: AgentProcess, cid: str) -> str:
    return str(agent.status(cid)["sip_registration_details"]["target"])


def test_srv_registers_at_the_best_target_and_fails_over_when_it_dies(
    tmp_path: Path, agent_factory: Callable[..., AgentProcess], two_registrars: tuple[Kamailio, Kamailio]
) -> None:
    k1, k2 = two_registrars
    srv = srv_for("UDP", ("r1.lab.test", k1.cfg.port, 10), ("r2.lab.test", k2.cfg.port, 20))
    srv += srv_for("TCP", ("r1.lab.test", k1.cfg.port, 10), ("r2.lab.test", k2.cfg.port, 20))
    dns = start_dns(tmp_path, srv)
    try:
        knobs = {"keepalive_interval_sec": 5, "keepalive_misses": 2}
        agent = agent_factory(
            [
                connection("c-udp", f"sip:{DOMAIN}", "UDP", "alice", expiration_sec=600, registration=knobs),
                connection("c-tcp", f"sip:{DOMAIN}", "TCP", "bob", expiration_sec=600, registration=knobs),
            ],
            sip={"nameservers": [dns.address]},
        )
        agent.wait_for(lambda: k1.lookup("alice") is not None and k1.lookup("bob") is not None, 15, "bound at r1")
        assert k2.lookup("alice") is None and k2.lookup("bob") is None
        assert f"r1.lab.test 127.0.0.1:{k1.cfg.port}" in target_of(agent, "c-udp")
        assert "SRV _sip._udp.pbx.lab.test, priority 10" in target_of(agent, "c-udp")
        assert ("SRV", "_sip._udp.pbx.lab.test") in dns.queries()

        k1.stop()
        killed = time.monotonic()
        # TCP: the flow drops, the REGISTER to r1 is refused, r2 is next: at once. UDP: r1 stops
        # answering keepalives (2 x 5 s), then the next REGISTER goes to r2. No backoff either way.
        agent.wait_for(lambda: k2.lookup("bob") is not None, 5, "TCP binding moved to r2")
        agent.wait_for(lambda: k2.lookup("alice") is not None, 20, "UDP binding moved to r2")
        took = time.monotonic() - killed
        for cid in ("c-udp", "c-tcp"):
            st = agent.status(cid)
            assert st["registered"] is True
            assert f"r2.lab.test 127.0.0.1:{k2.cfg.port}" in st["sip_registration_details"]["target"]
            assert st["sip_registration_details"]["failures"] == 0  # failover is not a backoff
        failovers = agent.events("registrar_failover", 2)
        assert {e["connection_id"] for e in failovers} == {"c-udp", "c-tcp"}
        assert 'uac_agent_failovers_total{connection_id="c-tcp",kind="registration"} 1.0' in agent.metrics()
        assert took < 25, took  # the backoff (retry_base_sec 30) would have taken longer
        assert agent.terminate() == 0
    finally:
        dns.stop()


@pytest.mark.parametrize(("scenario", "moves"), [("reg_503_retry_after.xml", True), ("reg_403.xml", False)])
def test_a_503_fails_over_and_a_403_does_not(
    tmp_path: Path, agent_factory: Callable[..., AgentProcess], kamailio: Kamailio, scenario: str, moves: bool
) -> None:
    variables = {"ra": "300"} if "503" in scenario else {}
    first = Sipp(scenario_path(scenario), free_port(), variables, tmp_path / "first", calls=1000)
    first.start()
    dns = start_dns(tmp_path, srv_for("UDP", ("r1.lab.test", first.port, 10), ("r2.lab.test", kamailio.cfg.port, 20)))
    kamailio.rpc("ul.rm", "location", "carol", check=False)
    try:
        agent = agent_factory(
            [connection("c-srv", f"sip:{DOMAIN}", "UDP", "carol")], sip={"nameservers": [dns.address]}
        )
        agent.wait_for(lambda: bool(first.received_requests("REGISTER")), 10, "a REGISTER at the first target")
        if moves:
            agent.wait_for(lambda: kamailio.lookup("carol") is not None, 10, "registered at the second target")
            st = agent.status("c-srv")
            assert st["registered"] is True
            assert "r2.lab.test" in st["sip_registration_details"]["target"]
            assert agent.events("registrar_failover")[0]["code"] == 503
        else:
            agent.wait_for(lambda: agent.status("c-srv")["last_registration_response"] is not None, 10, "an answer")
            time.sleep(2)  # long enough for a failover REGISTER to reach the second target, were there one
            st = agent.status("c-srv")
            assert st["last_registration_response"] == "403 Forbidden"
            assert st["sip_registration_details"]["next_action"] == "retry"  # the forbidden interval, no failover
            assert kamailio.lookup("carol") is None
            assert not [e for e in agent.logs() if e.get("event") == "registrar_failover"]
        assert agent.terminate() == 0
    finally:
        first.stop()
        dns.stop()


def test_a_dns_server_that_never_answers_fails_only_its_connection(
    tmp_path: Path, agent_factory: Callable[..., AgentProcess], kamailio: Kamailio
) -> None:
    silent = SilentDns().start()
    try:
        agent = agent_factory(
            [
                connection("c-ip", f"sip:127.0.0.1:{kamailio.cfg.port}", "UDP", "dave", expiration_sec=20),
                connection("c-dns", "sip:pbx.silent.test", "UDP", "alice"),
            ],
            sip={"nameservers": [silent.address], "dns_timeout_sec": 1.0},
        )
        agent.wait_for(lambda: agent.status("c-ip")["registered"], 10, "the IP connection registered")
        agent.wait_for(
            lambda: (agent.status("c-dns")["last_registration_response"] or "").startswith("DNS: no answer from"),
            15,
            "the DNS failure shown",
        )
        st = agent.status("c-dns")
        assert silent.address in st["last_registration_response"]
        assert st["registered"] is False
        assert st["registration_status"] == 2
        # the other connection keeps refreshing on time (Expires 20: a refresh every 10 s)
        first = agent.status("c-ip")["sip_registration_details"]["attempts"]
        agent.wait_for(
            lambda: agent.status("c-ip")["sip_registration_details"]["attempts"] >= first + 2, 25, "two refreshes"
        )
        assert agent.status("c-ip")["registered"] is True
        assert agent.http_get("/healthz")[0] == 200
        assert silent.queries > 0
        assert agent.terminate() == 0
    finally:
        silent.stop()


def test_a_registration_moves_back_to_the_best_target_at_a_refresh_only_if_it_answers(
    tmp_path: Path, agent_factory: Callable[..., AgentProcess], pki: dict[str, Path]
) -> None:
    k1 = start_kamailio(tmp_path / "k1", pki)
    k2 = start_kamailio(tmp_path / "k2", pki)
    dns = start_dns(tmp_path, srv_for("TCP", ("r1.lab.test", k1.cfg.port, 10), ("r2.lab.test", k2.cfg.port, 20)))
    try:
        # Expires 30: a refresh every 15 s; the best target is probed before each one
        agent = agent_factory(
            [connection("c-back", f"sip:{DOMAIN}", "TCP", "alice", expiration_sec=30)],
            sip={"nameservers": [dns.address]},
        )
        agent.wait_for(lambda: k1.lookup("alice") is not None, 15, "bound at r1")
        port1 = k1.cfg.port
        k1.stop()
        agent.wait_for(lambda: k2.lookup("alice") is not None, 5, "moved to r2")
        # a refresh while r1 is still down stays at r2: r1 did not answer the probe
        refreshes = agent.status("c-back")["sip_registration_details"]["attempts"]
        agent.wait_for(
            lambda: agent.status("c-back")["sip_registration_details"]["attempts"] > refreshes, 20, "a refresh at r2"
        )
        assert "r2.lab.test" in target_of(agent, "c-back")
        assert agent.status("c-back")["registered"] is True
        assert not [e for e in agent.logs() if e.get("event") == "registrar_target_back"]

        k1 = start_kamailio(tmp_path / "k1b", pki, port=port1)
        # the probe before a refresh (every 15 s here) finds r1 answering; the refresh after it moves
        agent.wait_for(lambda: k1.lookup("alice") is not None, 40, "back at r1 at a refresh")
        assert "r1.lab.test" in target_of(agent, "c-back")
        assert agent.events("registrar_target_back")
        agent.wait_for(lambda: k2.lookup("alice") is None, 5, "the binding at r2 unregistered")
        assert agent.terminate() == 0
    finally:
        dns.stop()
        k1.stop()
        k2.stop()
