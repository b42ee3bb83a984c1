"""The agent against a real Kamailio registrar with digest auth, over UDP, TCP and TLS."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from lab.kamailio import Kamailio, make_test_pki
from tests.integration.agentproc import API_KEY, AgentProcess
from tests.integration.conftest import USERS, connection, start_kamailio


def test_registers_over_udp_tcp_tls_and_unregisters_on_sigterm(
    kamailio: Kamailio, agent_factory: Callable[..., AgentProcess], pki: dict[str, Path]
) -> None:
    port, tls_port = kamailio.cfg.port, kamailio.cfg.tls_port
    agent = agent_factory(
        [
            connection("c-udp", f"sip:127.0.0.1:{port}", "UDP", "alice"),
            connection("c-tcp", f"sip:127.0.0.1:{port}", "TCP", "bob"),
            # TLS: dial a host name that the test server certificate names, verified against the test CA
            connection("c-tls", f"sip:localhost:{tls_port}", "TLS", "carol"),
        ],
        sip={"tls_ca_file": str(pki["ca"])},
    )
    agent.wait_for(lambda: agent.http_get("/readyz?registered=all")[0] == 200, 15, "all connections registered")

    # What the registrar saw: one binding per user, on the right transport, with
    # a Contact that names its connection.
    for cid, user, proto in (("c-udp", "alice", "udp"), ("c-tcp", "bob", "tcp"), ("c-tls", "carol", "tls")):
        binding = kamailio.lookup(user)
        assert binding is not None, f"no binding for {user}"
        assert f"line={cid}" in binding
        assert f"Socket: {proto}:127.0.0.1:" in binding, binding
        st = agent.status(cid)
        assert st["registered"] is True
        assert st["last_registration_response"] == "200 OK"
        assert st["registration_status"] == 4
        assert st["last_registered_ip"] == "127.0.0.1"
        assert st["sip_registration_details"]["expires"] == 300
        assert st["third-party_uac_settings"]["password"] == "***"

    # TLS is the edge's (HAProxy on the system's OpenSSL 3), never the wheel's 1.0.2k: the PBX
    # offers TLS 1.3 and saw it negotiated
    assert set(kamailio.tls_registers("carol")) == {"TLSv1.3"}, kamailio.tls_registers("carol")

    metrics = agent.metrics()
    for cid in ("c-udp", "c-tcp", "c-tls"):
        assert f'uac_agent_registered{{connection_id="{cid}"}} 1.0' in metrics
        assert f'uac_agent_last_registration_response_code{{connection_id="{cid}"}} 200.0' in metrics
        assert f'uac_agent_registration_attempts_total{{code="200",connection_id="{cid}"}} 1.0' in metrics

    # No secret in logs, metrics or status output.
    everything = agent.raw_log() + metrics + str([agent.status(c) for c in ("c-udp", "c-tcp", "c-tls")])
    for pw in USERS.values():
        assert pw not in everything
    assert API_KEY not in everything

    # Each state change is logged at info with its connection_id and the response.
    changes = [e for e in agent.logs() if e.get("event") == "register_response" and e.get("code") == 200]
    assert {e["connection_id"] for e in changes} == {"c-udp", "c-tcp", "c-tls"}
    assert all(e["level"] == "info" and e["response"] == "200 OK" for e in changes)

    assert agent.terminate() == 0
    for user in ("alice", "bob", "carol"):
        assert kamailio.lookup(user) is None, f"{user} still bound after SIGTERM"
    unreg = [e for e in agent.logs() if e.get("event") == "unregister_response"]
    assert {e["connection_id"] for e in unreg} == {"c-udp", "c-tcp", "c-tls"}


def test_wrong_ca_leaves_tls_connection_unregistered_with_clear_response(
    kamailio: Kamailio, agent_factory: Callable[..., AgentProcess], pki: dict[str, Path]
) -> None:
    agent = agent_factory(
        [connection("c-tls-bad", f"sip:localhost:{kamailio.cfg.tls_port}", "TLS", "dave")],
        sip={"tls_ca_file": str(pki["other_ca"])},
    )
    agent.wait_for(lambda: agent.status("c-tls-bad")["last_registration_response"] is not None, 15, "a TLS attempt")
    st = agent.status("c-tls-bad")
    assert st["registered"] is False
    assert st["registration_status"] == 2
    text = st["last_registration_response"]
    assert text.startswith("TLS failure"), text
    assert "certificate" in text.lower()
    assert kamailio.lookup("dave") is None
    assert 'uac_agent_registered{connection_id="c-tls-bad"} 0.0' in agent.metrics()
    code, body = agent.http_get("/readyz?registered=all")
    assert code == 503
    assert "c-tls-bad" in body
    assert agent.terminate() == 0


def test_dropped_tcp_flow_reregisters_at_once(
    tmp_path: Path, agent_factory: Callable[..., AgentProcess], pki: dict[str, Path]
) -> None:
    """Kamailio restarts (bindings kept in memory are lost, TCP flows close): the
    agent notices the dropped flow and registers again long before its refresh."""
    k = start_kamailio(tmp_path / "k1", pki)
    try:
        agent = agent_factory(
            [
                connection(
                    "c-flow",
                    f"sip:127.0.0.1:{k.cfg.port}",
                    "TCP",
                    "alice",
                    expiration_sec=600,
                    registration={"retry_base_sec": 0.5, "retry_max_sec": 2},
                )
            ],
        )
        agent.wait_for(lambda: k.lookup("alice") is not None, 15, "first binding")
        k.stop()
        restarted = time.monotonic()
        k = start_kamailio(tmp_path / "k2", pki, port=k.cfg.port)
        assert k.lookup("alice") is None  # the registrar lost the binding
        agent.wait_for(lambda: k.lookup("alice") is not None, 15, "binding after the registrar restart")
        took = time.monotonic() - restarted
        assert took < 30, took  # the refresh would have come only after ~570 s
        lost = [e for e in agent.logs() if e.get("event") == "flow_lost"]
        assert lost, "no flow_lost logged"
        assert lost[0]["connection_id"] == "c-flow"
        counted = [
            float(line.split()[-1])
            for line in agent.metrics().splitlines()
            if line.startswith('uac_agent_transport_flows_lost_total{transport="TCP"}')
        ]
        assert counted and counted[0] >= 1, counted
        assert agent.status("c-flow")["registered"] is True
        assert agent.terminate() == 0
    finally:
        k.stop()


def test_wrong_password_with_kamailio_is_401_and_slow(
    kamailio: Kamailio, agent_factory: Callable[..., AgentProcess]
) -> None:
    agent = agent_factory(
        [
            connection(
                "c-pw",
                f"sip:127.0.0.1:{kamailio.cfg.port}",
                "UDP",
                "bob",
                password="not-bobs",
                registration={"forbidden_retry_interval": 120},
            )
        ],
    )
    agent.wait_for(lambda: agent.status("c-pw")["last_registration_response"] is not None, 15, "first answer")
    st = agent.status("c-pw")
    assert st["last_registration_response"] == "401 Unauthorized"
    assert st["registered"] is False
    assert st["sip_registration_details"]["auth_retries"] == 1
    assert st["sip_registration_details"]["next_action"] == "retry"
    time.sleep(2)
    assert agent.status("c-pw")["sip_registration_details"]["attempts"] == 1  # no hammering
    assert "not-bobs" not in agent.raw_log()
    assert agent.terminate() == 0


def test_sha256_digest_through_outbound_proxy(
    tmp_path: Path, agent_factory: Callable[..., AgentProcess], pki: dict[str, Path]
) -> None:
    """The registrar's domain is not resolvable; the REGISTER reaches it only through
    outbound_proxy. The registrar challenges with SHA-256 only."""
    k = start_kamailio(tmp_path / "k-sha", pki, algorithm="SHA-256")
    try:
        agent = agent_factory(
            [
                connection(
                    "c-sha",
                    "sip:pbx.lab.invalid",
                    "UDP",
                    "alice",
                    ext={"outbound_proxy": f"sip:127.0.0.1:{k.cfg.port}", "auth_username": "alice"},
                )
            ],
            sip={"trace": True},
        )
        agent.wait_for(lambda: k.lookup("alice") is not None, 15, "binding via outbound proxy")
        st = agent.status("c-sha")
        assert st["registered"] is True
        assert st["third-party_uac_settings"]["outbound_proxy"] == f"sip:127.0.0.1:{k.cfg.port}"
        assert "line=c-sha" in (k.lookup("alice") or "")
        trace = agent.raw_log()
        assert "algorithm=SHA-256" in trace  # the challenge, as the agent's SIP trace saw it
        assert "REGISTER sip:pbx.lab.invalid" in trace  # R-URI is the registrar; sent via the proxy
        assert "Authorization: <redacted>" in trace
        assert 'response=\\"' not in trace and 'response="' not in trace  # digest never logged
        assert USERS["alice"] not in trace
        assert agent.terminate() == 0
        assert k.lookup("alice") is None
    finally:
        k.stop()


def test_a_valid_chain_naming_another_host_is_refused_before_any_register(
    tmp_path: Path, agent_factory: Callable[..., AgentProcess]
) -> None:
    """The PBX's certificate is signed by the trusted CA but names pbx.lab.test, not the host
    dialled (localhost): the TLS handshake is refused, the PBX receives no REGISTER, and the
    connection's last response says why."""
    other = make_test_pki(tmp_path / "pki-other-name", host="pbx.lab.test")
    k = start_kamailio(tmp_path / "k-name", other)
    try:
        agent = agent_factory(
            [connection("c-tls-name", f"sip:localhost:{k.cfg.tls_port}", "TLS", "dave")],
            sip={"tls_ca_file": str(other["ca"])},
        )
        agent.wait_for(
            lambda: agent.status("c-tls-name")["last_registration_response"] is not None, 15, "a TLS attempt"
        )
        st = agent.status("c-tls-name")
        assert st["registered"] is False
        text = st["last_registration_response"]
        assert text.startswith("TLS failure") and "localhost" in text, text
        assert "certificate" in text.lower(), text
        assert k.registers("dave") == []  # not one byte of SIP reached the PBX
        assert k.lookup("dave") is None
        assert agent.terminate() == 0
    finally:
        k.stop()


def test_from_user_is_the_register_from_while_to_stays_the_aor(
    tmp_path: Path, agent_factory: Callable[..., AgentProcess], pki: dict[str, Path]
) -> None:
    """``from_user``: the edge writes it into each REGISTER's From (pjsua2 cannot); the binding,
    the digest and To stay the AoR's; without it the From is the AoR."""
    k = start_kamailio(tmp_path / "k-from", pki)  # its own: no other test's REGISTERs in its log
    try:
        agent = agent_factory(
            [
                connection("c-from", f"sip:127.0.0.1:{k.cfg.port}", "UDP", "alice", ext={"from_user": "frontdesk"}),
                connection("c-plain", f"sip:127.0.0.1:{k.cfg.port}", "TCP", "bob"),
            ]
        )
        agent.wait_for(lambda: agent.http_get("/readyz?registered=all")[0] == 200, 15, "both registered")
        froms = k.register_froms("alice")
        assert froms and all(f.startswith("sip:frontdesk@") for f in froms), froms
        assert "line=c-from" in (k.lookup("alice") or "")
        plain = k.register_froms("bob")
        assert plain and all(f.startswith("sip:bob@") for f in plain), plain
        assert agent.terminate() == 0
        assert k.lookup("alice") is None  # the unregister, with the same From, was taken too
        assert all(f.startswith("sip:frontdesk@") for f in k.register_froms("alice"))
    finally:
        k.stop()
