"""The UAC Connections API of a running agent against a real Kamailio registrar:
live changes, untouched neighbours (same Call-ID, no REGISTER), restart, SIGHUP."""

from __future__ import annotations

import itertools
import json
import random
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from lab.kamailio import Kamailio, free_port
from lab.sipp import Sipp, scenario_path
from tests.integration.agentproc import API_KEY, AgentProcess
from tests.integration.conftest import start_kamailio

USERS = {"erin": "erin-pw", "frank": "frank-pw", "grace": "grace-pw", "heidi": "heidi-pw", "ivan": "ivan-pw"}
BASE = "/v2/uac_connections"
DEST = {"destination_uri": "1006@assistant-abc123.sip.telnyx.com"}
_LINE = re.compile(r"to=sip:(?P<user>[^@]+)@\S+ ci=(?P<ci>\S+) cseq=(?P<cseq>\d+) (?:expires|exp)=(?P<expires>\S*)")


@pytest.fixture(scope="module")
def kam(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[Kamailio]:
    k = start_kamailio(tmp_path_factory.mktemp("kamailio-api"), pki, users=USERS)
    yield k
    k.stop()


def registers(k: Kamailio, user: str) -> list[dict[str, str]]:
    """Every REGISTER Kamailio received for ``user`` (a digest attempt is two: challenge, then auth)."""
    out = []
    for line in k.register_lines():
        m = _LINE.search(line)
        if m and m.group("user") == user:
            out.append(m.groupdict())
    return out


def binding_call_id(k: Kamailio, user: str) -> str | None:
    b = k.lookup(user)
    if b is None:
        return None
    m = re.search(r"Call-ID: (\S+)", b)
    return m.group(1) if m else None


def call(a: AgentProcess, method: str, path: str, body: Any = None, key: str = API_KEY) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(a.base + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ext(k: Kamailio, user: str, password: str | None = None, **more: Any) -> dict[str, Any]:
    return {
        "proxy": f"sip:127.0.0.1:{k.cfg.port}",
        "transport": "UDP",
        "username": user,
        "password": password or USERS[user],
        "expiration_sec": 60,
        **more,
    }


def get(a: AgentProcess, cid: str) -> dict[str, Any]:
    code, body = call(a, "GET", f"{BASE}/{cid}")
    assert code == 200, body
    data: dict[str, Any] = body["data"]
    return data


def test_create_patch_delete_against_kamailio(kam: Kamailio, agent_factory: Callable[..., AgentProcess]) -> None:
    agent = agent_factory([])
    code, out = call(
        agent,
        "POST",
        BASE,
        {"connection_name": "Neighbour", "external_uac_settings": ext(kam, "frank"), "internal_uac_settings": DEST},
    )
    assert code == 201, out
    frank = out["data"]["id"]
    t0 = time.monotonic()
    code, out = call(
        agent,
        "POST",
        BASE,
        {
            "connection_name": "Office PBX",
            "external_uac_settings": ext(kam, "erin"),
            "internal_uac_settings": DEST,
            "registration": {"forbidden_retry_interval": 3},
        },
    )
    assert code == 201, out
    erin = out["data"]["id"]
    generated = out["data"]["password"]
    agent.wait_for(lambda: kam.lookup("erin") is not None, 5, "erin's binding")
    assert time.monotonic() - t0 < 1.0  # registered within a second of the request
    assert f"line={erin}" in (kam.lookup("erin") or "")
    agent.wait_for(lambda: kam.lookup("frank") is not None, 5, "frank's binding")
    assert get(agent, erin)["registration_status"] == 4
    frank_call_id = binding_call_id(kam, "frank")
    frank_registers = len(registers(kam, "frank"))
    assert frank_registers >= 2 and len(registers(kam, "erin")) >= 2  # the REGISTER log is read (challenge + auth)

    # A wrong password: the status shows 401, and REGISTERs come no faster than forbidden_retry_interval.
    code, out = call(agent, "PATCH", f"{BASE}/{erin}", {"external_uac_settings": {"password": "not-erins"}})
    assert code == 200, out
    agent.wait_for(lambda: get(agent, erin)["last_registration_response"] == "401 Unauthorized", 5, "401")
    st = get(agent, erin)
    assert st["registration_status"] == 2 and st["registered"] is False
    assert kam.lookup("erin") is None  # the old binding was unregistered first
    time.sleep(4.0)
    answers = [e for e in agent.logs() if e.get("event") == "register_response" and e.get("connection_id") == erin]
    rejected = [e for e in answers if e.get("code") == 401]
    assert 1 <= len(rejected) <= 2, rejected
    stamps = [datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp() for e in rejected]
    assert all(b - a >= 3.0 for a, b in itertools.pairwise(stamps)), stamps
    # What Kamailio saw since the PATCH: one unregister and each attempt, two REGISTERs each (digest).
    assert len(registers(kam, "erin")) <= 2 + 2 + 2 * len(rejected)

    # The right password again: registered.
    code, out = call(agent, "PATCH", f"{BASE}/{erin}", {"external_uac_settings": {"password": USERS["erin"]}})
    assert code == 200, out
    agent.wait_for(lambda: get(agent, erin)["registered"], 5, "registered again")
    agent.wait_for(lambda: kam.lookup("erin") is not None, 5, "erin's binding again")
    erin_call_id = binding_call_id(kam, "erin")
    assert erin_call_id is not None

    # Only the destination: no new REGISTER, same Call-ID.
    before = len(registers(kam, "erin"))
    code, out = call(
        agent, "PATCH", f"{BASE}/{erin}", {"internal_uac_settings": {"destination_uri": "2000@cc-app-xyz789.example"}}
    )
    assert code == 200, out
    assert out["data"]["internal_uac_settings"]["destination_uri"] == "2000@cc-app-xyz789.example"
    time.sleep(1.5)
    assert len(registers(kam, "erin")) == before
    assert binding_call_id(kam, "erin") == erin_call_id
    status = agent.status(erin, user_id="default")
    assert status["internal_uac_settings"]["destination_uri"] == "2000@cc-app-xyz789.example"
    assert status["registered"] is True

    # DELETE: unregistered before the answer, then gone.
    code, out = call(agent, "DELETE", f"{BASE}/{erin}")
    assert code == 200, out
    assert kam.lookup("erin") is None
    assert call(agent, "GET", f"{BASE}/{erin}")[0] == 404

    # The neighbour was never touched: no REGISTER, same Call-ID.
    assert len(registers(kam, "frank")) == frank_registers
    assert binding_call_id(kam, "frank") == frank_call_id
    assert get(agent, frank)["registered"] is True

    log = agent.raw_log()
    for secret in (*USERS.values(), "not-erins", generated, API_KEY):
        assert secret not in log
    assert agent.terminate() == 0
    assert kam.lookup("frank") is None


def test_api_connections_come_back_after_a_restart(kam: Kamailio, agent_factory: Callable[..., AgentProcess]) -> None:
    agent = agent_factory([])
    code, out = call(agent, "POST", BASE, {"connection_name": "Persisted", "external_uac_settings": ext(kam, "grace")})
    assert code == 201, out
    grace = out["data"]["id"]
    code, out = call(agent, "POST", BASE, {"connection_name": "Idle", "active": False})
    idle = out["data"]["id"]
    agent.wait_for(lambda: kam.lookup("grace") is not None, 5, "grace's binding")
    assert agent.terminate() == 0
    assert kam.lookup("grace") is None

    agent.start()
    agent.wait_for(lambda: kam.lookup("grace") is not None, 10, "grace's binding after the restart")
    assert get(agent, grace)["connection_name"] == "Persisted"
    assert get(agent, grace)["registered"] is True
    assert get(agent, idle)["active"] is False

    # kill -9 right after a change was acknowledged: it is there after the restart.
    code, out = call(agent, "PATCH", f"{BASE}/{grace}", {"connection_name": "Renamed"})
    assert code == 200
    assert agent.proc is not None
    agent.proc.kill()
    agent.proc.wait(5)
    agent.start()
    assert get(agent, grace)["connection_name"] == "Renamed"
    agent.wait_for(lambda: get(agent, grace)["registered"], 10, "registered after kill -9")
    assert agent.terminate() == 0


def test_sighup_reregisters_only_the_connection_edited_in_the_file(
    kam: Kamailio, agent_factory: Callable[..., AgentProcess]
) -> None:
    def file_conn(cid: str, user: str, **more: Any) -> dict[str, Any]:
        return {
            "connection_id": cid,
            "user_id": "323",
            "connection_name": cid,
            "external_uac_settings": ext(kam, user, **more),
            "internal_uac_settings": DEST,
        }

    agent = agent_factory([file_conn("f-heidi", "heidi"), file_conn("f-ivan", "ivan")])
    agent.wait_for(lambda: agent.http_get("/readyz?registered=all")[0] == 200, 10, "both registered")
    heidi_ci, ivan_ci = binding_call_id(kam, "heidi"), binding_call_id(kam, "ivan")
    heidi_n = len(registers(kam, "heidi"))
    assert heidi_n >= 2 and registers(kam, "ivan")
    assert call(agent, "PATCH", f"{BASE}/f-heidi", {"connection_name": "x"})[0] == 409  # the file's

    config = json.loads(agent.config_path.read_text())
    config["connections"][1]["external_uac_settings"]["expiration_sec"] = 90
    agent.config_path.write_text(json.dumps(config))
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for(
        lambda: binding_call_id(kam, "ivan") not in (None, ivan_ci), 10, "ivan re-registered with the new settings"
    )
    agent.wait_for(lambda: any(e.get("event") == "reload_applied" for e in agent.logs()), 5, "reload_applied")
    applied = next(e for e in agent.logs() if e.get("event") == "reload_applied")
    assert applied["changed"] == ["f-ivan"] and applied["unchanged"] == 1
    assert agent.status("f-ivan")["third-party_uac_settings"]["expiration_sec"] == 90
    time.sleep(1.0)
    assert len(registers(kam, "heidi")) == heidi_n  # untouched
    assert binding_call_id(kam, "heidi") == heidi_ci

    # A bad file is refused with a clear log line; everything carries on.
    agent.config_path.write_text(agent.config_path.read_text().replace('"UDP"', '"SCTP"'))
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for(lambda: any(e.get("event") == "reload_refused" for e in agent.logs()), 5, "reload_refused")
    refused = next(e for e in agent.logs() if e.get("event") == "reload_refused")
    assert refused["level"] == "error"
    assert any("transport" in p and "SCTP" in p for p in refused["problems"])
    assert agent.http_get("/readyz?registered=all")[0] == 200
    assert len(registers(kam, "heidi")) == heidi_n

    # Rotating the API key is a reload too: the old key is refused from then on.
    config["http"]["api_key"] = "rotated-operator-key-0123456789"
    agent.config_path.write_text(json.dumps(config))
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for(
        lambda: sum(e.get("event") == "reload_applied" for e in agent.logs()) == 2, 5, "second reload_applied"
    )
    applied = [e for e in agent.logs() if e.get("event") == "reload_applied"][-1]
    assert applied["api_keys_reloaded"] is True and applied["needs_restart"] == []
    assert agent.http_get(BASE, key=API_KEY)[0] == 401
    assert agent.http_get(BASE, key="rotated-operator-key-0123456789")[0] == 200
    assert "rotated-operator-key" not in agent.raw_log()
    assert len(registers(kam, "heidi")) == heidi_n
    assert agent.terminate() == 0


def forwarding_connection(agent: AgentProcess, k: Kamailio, user: str, dest_port: int) -> str:
    """Create (through the API) a connection registering ``user`` that forwards to ``dest_port``; its id."""
    code, out = call(
        agent,
        "POST",
        BASE,
        {
            "connection_name": user.title(),
            "external_uac_settings": ext(k, user, password=f"{user}-pw", expiration_sec=300),
            "internal_uac_settings": {"destination_uri": f"1006@127.0.0.1:{dest_port}"},
        },
    )
    assert code == 201, out
    agent.wait_for(lambda: k.lookup(user) is not None, 5, f"{user} bound")
    cid: str = out["data"]["id"]
    return cid


def start_call(tmp_path: Path, k: Kamailio, user: str, dest_port: int, hold_ms: int) -> tuple[Sipp, Sipp]:
    """A destination UAS on ``dest_port``, then one PBX call to ``user`` through Kamailio, held ``hold_ms``."""
    dest = Sipp(
        scenario_path("dest_answer.xml"),
        dest_port,
        variables={"callee": "assistant", "rtp_port": str(free_port())},
        workdir=tmp_path / "dest",
    )
    dest.start()
    pbx = Sipp(
        scenario_path("pbx_call.xml"),
        free_port(),
        variables={"caller": "1000", "sdp_user": "pbx", "ruri_params": "", "rtp_port": free_port()},
        workdir=tmp_path / "pbx-call",
        remote=f"127.0.0.1:{k.cfg.port}",
        service=user,
        timeout=30,
        extra_args=["-d", str(hold_ms)],  # hold the call, then BYE
    )
    try:
        pbx.start()
    except Exception:
        dest.stop()
        raise
    return dest, pbx


def test_a_call_in_progress_carries_on_while_connections_change(
    tmp_path: Path, pki: dict[str, Path], agent_factory: Callable[..., AgentProcess]
) -> None:
    """A bridged call on one connection lasts through a PATCH of its destination (new calls
    only) and through creating, re-registering and deleting another connection."""
    k = start_kamailio(tmp_path / "pbx", pki, users={"judy": "judy-pw", "ken": "ken-pw"})
    dest_port = free_port()
    try:
        agent = agent_factory([], sip={"rtp_port": random.randrange(30000, 40000, 2), "rtp_port_range": 200})
        judy = forwarding_connection(agent, k, "judy", dest_port)
        dest, pbx = start_call(tmp_path, k, "judy", dest_port, hold_ms=5000)
        try:
            agent.wait_for(lambda: any(e.get("event") == "call_started" for e in agent.logs()), 10, "call up")
            judy_ci = binding_call_id(k, "judy")
            judy_n = len(registers(k, "judy"))
            # Where new calls go: swapped in place, the call in progress stays on its destination.
            code, _ = call(
                agent, "PATCH", f"{BASE}/{judy}", {"internal_uac_settings": {"destination_uri": "2000@x.test"}}
            )
            assert code == 200
            # Another connection comes, re-registers and goes.
            code, out = call(
                agent,
                "POST",
                BASE,
                {"connection_name": "Ken", "external_uac_settings": ext(k, "ken", password="ken-pw")},
            )
            assert code == 201, out
            ken = out["data"]["id"]
            agent.wait_for(lambda: k.lookup("ken") is not None, 5, "ken bound")
            assert call(agent, "PATCH", f"{BASE}/{ken}", {"external_uac_settings": {"expiration_sec": 120}})[0] == 200
            agent.wait_for(lambda: get(agent, ken)["registered"], 5, "ken registered again")
            assert call(agent, "DELETE", f"{BASE}/{ken}")[0] == 200
            assert pbx.wait(30) == 0, pbx.output()[-2000:]  # the call ended by its own BYE, answered
        finally:
            pbx.stop()
            dest.stop()
        assert len(dest.received_requests("INVITE")) == 1
        assert len(dest.received_requests("BYE")) == 1  # leg B was torn down by the PBX's BYE, not before
        ended = agent.events("call_ended")
        assert len(ended) == 1 and ended[0]["result"] == "answered", ended
        assert len(registers(k, "judy")) == judy_n and binding_call_id(k, "judy") == judy_ci
        assert agent.terminate() == 0
    finally:
        k.stop()


@pytest.mark.parametrize("change", ["re-register", "delete"])
def test_a_call_carries_on_while_its_own_connection_changes(
    tmp_path: Path, pki: dict[str, Path], agent_factory: Callable[..., AgentProcess], change: str
) -> None:
    """A registration change re-creates the connection's pjsua2 account, a DELETE removes it;
    a bridged call that came in on that connection is not cut off by either, and ends by its
    own BYE."""
    k = start_kamailio(tmp_path / "pbx", pki, users={"lena": "lena-pw"})
    dest_port = free_port()
    try:
        agent = agent_factory([], sip={"rtp_port": random.randrange(30000, 40000, 2), "rtp_port_range": 200})
        lena = forwarding_connection(agent, k, "lena", dest_port)
        lena_ci = binding_call_id(k, "lena")
        dest, pbx = start_call(tmp_path, k, "lena", dest_port, hold_ms=4000)
        try:
            agent.wait_for(lambda: any(e.get("event") == "call_started" for e in agent.logs()), 10, "call up")
            time.sleep(0.5)
            if change == "re-register":
                patch = {"external_uac_settings": {"expiration_sec": 120}}
                assert call(agent, "PATCH", f"{BASE}/{lena}", patch)[0] == 200
                agent.wait_for(
                    lambda: binding_call_id(k, "lena") not in (None, lena_ci), 10, "lena re-registered (new account)"
                )
            else:
                assert call(agent, "DELETE", f"{BASE}/{lena}")[0] == 200
                agent.wait_for(lambda: k.lookup("lena") is None, 10, "lena unregistered")
            assert pbx.wait(30) == 0, pbx.output()[-2000:]  # the call ended by its own BYE, answered
        finally:
            pbx.stop()
            dest.stop()
        assert len(dest.received_requests("BYE")) == 1  # torn down by the PBX's BYE, not before
        ended = agent.events("call_ended")
        assert len(ended) == 1 and ended[0]["result"] == "answered", ended
        assert ended[0]["talk_sec"] >= 3.5, ended
        if change == "re-register":
            assert get(agent, lena)["registered"] is True
        else:
            assert call(agent, "GET", f"{BASE}/{lena}")[0] == 404
        assert agent.terminate() == 0
    finally:
        k.stop()
