"""Registrar liveness with a real Kamailio: it goes away for 45 s and comes back with no bindings
(an in-memory registrar restarted, a standby taking over). The agent says it is unreachable while
it is away, and registers again within one keepalive interval of its return, over UDP and TCP,
although the bindings' expiry (3600 s) is far off."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.integration.agentproc import AgentProcess
from tests.integration.conftest import connection, start_kamailio

INTERVAL = 10  # registration.keepalive_interval_sec in this test
DOWN_FOR = 45


def test_registrar_away_then_back_empty_is_noticed_and_the_bindings_restored(
    tmp_path: Path, agent_factory: Callable[..., AgentProcess], pki: dict[str, Path]
) -> None:
    k = start_kamailio(tmp_path / "k1", pki)
    knobs = {"keepalive_interval_sec": INTERVAL, "keepalive_misses": 2}
    try:
        agent = agent_factory(
            [
                connection(
                    "c-udp", f"sip:127.0.0.1:{k.cfg.port}", "UDP", "alice", expiration_sec=3600, registration=knobs
                ),
                connection(
                    "c-tcp", f"sip:127.0.0.1:{k.cfg.port}", "TCP", "bob", expiration_sec=3600, registration=knobs
                ),
            ],
        )
        agent.wait_for(lambda: k.lookup("alice") is not None and k.lookup("bob") is not None, 15, "both bound")
        agent.wait_for(
            lambda: all(agent.status(c)["sip_registration_details"]["registrar_reachable"] for c in ("c-udp", "c-tcp")),
            INTERVAL + 5,
            "keepalives answered",
        )

        k.stop()
        down_at = time.monotonic()

        def unreachable(cid: str) -> bool:
            return agent.status(cid)["sip_registration_details"]["registrar_reachable"] is False

        agent.wait_for(lambda: unreachable("c-udp") and unreachable("c-tcp"), DOWN_FOR - 5, "registrar unreachable")
        for cid in ("c-udp", "c-tcp"):
            st = agent.status(cid)
            assert st["registered"] is True  # the binding is assumed until its expiry: nothing says it was lost
            assert st["sip_registration_details"]["keepalive_misses"] >= 2
            assert f'uac_agent_registrar_reachable{{connection_id="{cid}"}} 0.0' in agent.metrics()
        assert {e["connection_id"] for e in agent.events("registrar_unreachable", 2)} == {"c-udp", "c-tcp"}

        time.sleep(max(0.0, DOWN_FOR - (time.monotonic() - down_at)))  # the outage itself
        k = start_kamailio(tmp_path / "k2", pki, port=k.cfg.port)
        assert k.lookup("alice") is None and k.lookup("bob") is None  # it lost every binding
        agent.wait_for(
            lambda: k.lookup("alice") is not None and k.lookup("bob") is not None,
            INTERVAL + 2,
            "both bound again within one keepalive interval",
        )
        for cid in ("c-udp", "c-tcp"):
            assert agent.status(cid)["registered"] is True
        agent.wait_for(lambda: not unreachable("c-udp") and not unreachable("c-tcp"), 5, "reachable again")
        # back by a keepalive's answer (which registers at once) or a REGISTER's, whichever came first
        assert {e["connection_id"] for e in agent.events("registrar_reachable", 2)} == {"c-udp", "c-tcp"}
        assert agent.events("registrar_answering_again")
        assert 'uac_agent_registrar_reachable{connection_id="c-udp"} 1.0' in agent.metrics()
        assert agent.terminate() == 0
    finally:
        k.stop()


def test_keepalives_off_send_no_options(
    tmp_path: Path, agent_factory: Callable[..., AgentProcess], pki: dict[str, Path]
) -> None:
    k = start_kamailio(tmp_path / "k", pki)
    try:
        agent = agent_factory(
            [
                connection(
                    "c-off",
                    f"sip:127.0.0.1:{k.cfg.port}",
                    "UDP",
                    "alice",
                    registration={"keepalive_interval_sec": 0},
                ),
                connection(
                    "c-on", f"sip:127.0.0.1:{k.cfg.port}", "UDP", "bob", registration={"keepalive_interval_sec": 5}
                ),
            ],
        )
        agent.events("keepalive_sent", 2, timeout=20)  # one every 5 s
        sent = {e["connection_id"] for e in agent.events("keepalive_sent")}
        assert sent == {"c-on"}
        assert agent.status("c-off")["sip_registration_details"]["registrar_reachable"] is True  # by its REGISTER
        assert agent.terminate() == 0
    finally:
        k.stop()
