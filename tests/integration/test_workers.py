"""One agent, many worker processes, against a real Kamailio registrar (and SIPp for a call).

What each test shows: connections spread over workers and all bound; a worker
killed with SIGKILL costs only its own connections, which are back within 5 s
while the others keep their Call-ID and send nothing; the supervisor killed
with SIGKILL leaves no worker and no binding; SIGTERM unregisters everything;
a stuck worker is replaced; SIGHUP reaches only the worker holding the changed
connection; a call is forwarded through a worker other than worker 0.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.kamailio import Kamailio, free_port
from tests.integration.agentproc import AgentProcess
from tests.integration.conftest import start_kamailio
from tests.integration.test_api_kamailio import (
    BASE,
    binding_call_id,
    call,
    forwarding_connection,
    registers,
    start_call,
)

USERS = {f"w{i}": f"w{i}-pw" for i in range(30)}


@pytest.fixture
def kam(tmp_path: Path, pki: dict[str, Path]) -> Iterator[Kamailio]:
    """A registrar of its own for each test: no binding is left over from another."""
    k = start_kamailio(tmp_path / "kamailio", pki, users=USERS)
    yield k
    k.stop()


def conn(k: Kamailio, i: int, transport: str = "UDP") -> dict[str, Any]:
    return {
        "connection_id": f"f{i}",
        "user_id": "323",
        "connection_name": f"file {i}",
        "external_uac_settings": {
            "proxy": f"sip:127.0.0.1:{k.cfg.port}",
            "transport": transport,
            "username": f"w{i}",
            "password": f"w{i}-pw",
            "expiration_sec": 300,
        },
        "internal_uac_settings": {"destination_uri": "1006@assistant.example.com"},
    }


def api_body(k: Kamailio, i: int) -> dict[str, Any]:
    return {
        "connection_name": f"api {i}",
        "user_id": "323",
        "external_uac_settings": {
            "proxy": f"sip:127.0.0.1:{k.cfg.port}",
            "transport": "TCP",
            "username": f"w{i}",
            "password": f"w{i}-pw",
            "expiration_sec": 300,
        },
    }


def statuses(agent: AgentProcess, ids: list[str]) -> dict[str, dict[str, Any]]:
    return {cid: agent.status(cid) for cid in ids}


def bound(k: Kamailio, users: list[str]) -> bool:
    return all(k.lookup(u) is not None for u in users)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def metric(agent: AgentProcess, name: str) -> float | None:
    for line in agent.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def attempts_200(agent: AgentProcess, cid: str) -> float:
    return metric(agent, f'uac_agent_registration_attempts_total{{code="200",connection_id="{cid}"}}') or 0.0


def start_agent(
    agent_factory: Callable[..., AgentProcess], k: Kamailio, n: int, **sections: Any
) -> tuple[AgentProcess, list[str]]:
    workers = {"connections_per_worker": 7, **sections.pop("workers", {})}
    agent = agent_factory([conn(k, i, "TCP" if i % 3 == 0 else "UDP") for i in range(n)], workers=workers, **sections)
    users = [f"w{i}" for i in range(n)]
    agent.wait_for(lambda: bound(k, users), 20, f"{n} bindings in Kamailio")
    return agent, [f"f{i}" for i in range(n)]


def test_21_file_and_5_api_connections_register_on_4_workers(
    kam: Kamailio, agent_factory: Callable[..., AgentProcess]
) -> None:
    agent, ids = start_agent(agent_factory, kam, 21)
    for i in range(21, 26):
        code, out = call(agent, "POST", BASE, api_body(kam, i))
        assert code == 201, out
        ids.append(out["data"]["id"])
    agent.wait_for(lambda: bound(kam, [f"w{i}" for i in range(26)]), 10, "26 bindings")
    agent.wait_for(lambda: all(s["registered"] for s in statuses(agent, ids).values()), 10, "26 registered")
    details = [s["sip_registration_details"] for s in statuses(agent, ids).values()]
    per_worker = {k: sum(1 for d in details if d["worker"] == k) for k in range(4)}
    assert per_worker == {0: 7, 1: 7, 2: 7, 3: 5}
    # worker_pid is the real process of that worker, and each worker has its own ports.
    pids = {d["worker"]: d["worker_pid"] for d in details}
    assert sorted(pids.values()) == agent.worker_pids()
    for k, pid in pids.items():
        assert Path(f"/proc/{pid}/comm").read_text().strip() == f"uac-worker-{k}"
    # What each process has loaded: pjsua2 only in workers, no HTTP/API/store/pydantic in them.
    assert agent.proc is not None
    supervisor_maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
    worker_maps = Path(f"/proc/{pids[0]}/maps").read_text()
    assert "_pjsua2" not in supervisor_maps and "_pjsua2" in worker_maps
    assert "pydantic_core" in supervisor_maps and "pydantic_core" not in worker_maps
    assert "_sqlite3" not in worker_maps
    b = kam.lookup("w8") or ""  # f8 lives on worker 1
    assert f"127.0.0.1:{agent.sip_port};line=f8" in b  # the edge's port, whichever worker holds it
    code, out = call(agent, "GET", f"{BASE}/{ids[-1]}")
    assert out["data"]["fqdn"] == f"127.0.0.1:{agent.sip_port}"
    # One /metrics for all of them.
    assert metric(agent, "uac_agent_workers") == 4
    assert sum(1 for line in agent.metrics().splitlines() if line.startswith("uac_agent_registered{")) == 26
    assert metric(agent, 'uac_agent_connection_worker_info{connection_id="f20",worker="2"}') == 1
    assert (metric(agent, 'uac_agent_worker_pss_bytes{worker="3"}') or 0) > 0
    assert (metric(agent, "process_resident_memory_bytes") or 0) > 0  # the supervisor's own
    # One log stream: every worker line names its worker, registration lines their connection.
    lines = [e for e in agent.logs() if e.get("event") == "register_response"]
    assert len(lines) >= 26 and all("worker" in e and "connection_id" in e for e in lines)
    assert {e["worker"] for e in lines} == {0, 1, 2, 3}
    assert agent.terminate() == 0
    assert not any(kam.lookup(f"w{i}") for i in range(26))


def test_a_killed_worker_is_back_within_5_s_and_no_other_connection_notices(
    kam: Kamailio, agent_factory: Callable[..., AgentProcess]
) -> None:
    agent, ids = start_agent(agent_factory, kam, 21)
    agent.wait_for(lambda: all(s["registered"] for s in statuses(agent, ids).values()), 10, "registered")
    before = statuses(agent, ids)
    victim = next(
        s["sip_registration_details"]["worker_pid"]
        for s in before.values()
        if s["sip_registration_details"]["worker"] == 1
    )
    on_1 = [cid for cid, s in before.items() if s["sip_registration_details"]["worker"] == 1]
    others = [cid for cid in ids if cid not in on_1]
    user = {cid: f"w{cid[1:]}" for cid in ids}
    call_ids = {cid: binding_call_id(kam, user[cid]) for cid in ids}
    counts = {cid: len(registers(kam, user[cid])) for cid in others}
    answered = {cid: attempts_200(agent, cid) for cid in ids}
    health: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            health.append(agent.http_get("/healthz")[0])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        agent.wait_for(
            lambda: all(binding_call_id(kam, user[c]) not in (None, call_ids[c]) for c in on_1),
            5.0,
            "worker 1's connections bound again (new Call-ID)",
        )
        back_in = time.monotonic() - killed_at
        agent.wait_for(lambda: all(agent.status(c)["registered"] for c in on_1), 2, "shown registered")
    finally:
        stop.set()
        watcher.join()
    assert back_in < 5.0
    after = statuses(agent, on_1)
    assert {s["sip_registration_details"]["worker"] for s in after.values()} == {1}
    assert {s["sip_registration_details"]["worker_pid"] for s in after.values()} != {victim}
    # Nobody else noticed: same binding, no REGISTER sent.
    assert {c: binding_call_id(kam, user[c]) for c in others} == {c: call_ids[c] for c in others}
    assert {c: len(registers(kam, user[c])) for c in others} == counts
    assert health and set(health) == {200}
    assert metric(agent, 'uac_agent_worker_restarts_total{worker="1"}') == 1
    # Counters live in the supervisor: the restart adds the new 200s, nothing is lost or counted twice.
    assert {c: attempts_200(agent, c) - answered[c] for c in ids} == {c: 1 if c in on_1 else 0 for c in ids}
    died = [e for e in agent.logs() if e.get("event") == "worker_died"]
    assert len(died) == 1 and died[0]["worker"] == 1 and "SIGKILL" in died[0]["reason"]
    assert sorted(died[0]["connections"]) == sorted(on_1)
    assert agent.terminate() == 0


def test_a_killed_supervisor_leaves_no_worker_and_no_binding(
    kam: Kamailio, agent_factory: Callable[..., AgentProcess]
) -> None:
    agent, _ids = start_agent(agent_factory, kam, 14)
    children = agent.descendants()  # the workers, the zygote, the edge's engines, the keeper
    names = set(children.values())
    assert {"uac-worker-0", "uac-worker-1", "uac-zygote", "kamailio", "rtpengine", "haproxy"} <= names, names
    assert agent.proc is not None
    agent.proc.kill()  # SIGKILL: the supervisor cannot tell anyone
    agent.proc.wait(5)
    killed_at = time.monotonic()
    deadline = killed_at + 6.0
    while time.monotonic() < deadline and (
        any(alive(p) for p in children) or any(kam.lookup(f"w{i}") for i in range(14))
    ):
        time.sleep(0.05)
    assert not [(p, children[p]) for p in children if alive(p)], "a process outlived its supervisor"
    assert not [i for i in range(14) if kam.lookup(f"w{i}")], "a binding was left behind"


def test_sigterm_unregisters_every_connection_on_every_worker_and_exits_0(
    kam: Kamailio, agent_factory: Callable[..., AgentProcess]
) -> None:
    agent, _ids = start_agent(agent_factory, kam, 22, shutdown_timeout_sec=3)
    workers = agent.worker_pids()
    assert len(workers) == 4
    t0 = time.monotonic()
    assert agent.terminate(timeout=10) == 0
    took = time.monotonic() - t0
    assert took < 3 + 2.0
    assert not [i for i in range(22) if kam.lookup(f"w{i}")]
    assert not [p for p in workers if alive(p)]
    stopped = [e for e in agent.logs() if e.get("event") == "worker_stopped"]
    assert len(stopped) == 4 and all(e["still_registered"] is None for e in stopped)


def test_a_stuck_worker_is_killed_and_replaced(kam: Kamailio, agent_factory: Callable[..., AgentProcess]) -> None:
    agent, ids = start_agent(agent_factory, kam, 10, workers={"heartbeat_timeout_sec": 3})
    st = agent.status("f8")["sip_registration_details"]
    assert st["worker"] == 1
    call_id = binding_call_id(kam, "w8")
    os.kill(st["worker_pid"], signal.SIGSTOP)  # its SIP thread (and everything else) stops answering
    agent.wait_for(lambda: any(e.get("event") == "worker_unresponsive" for e in agent.logs()), 8, "the hang noticed")
    agent.wait_for(lambda: binding_call_id(kam, "w8") not in (None, call_id), 5, "w8 bound by the replacement")
    assert agent.status("f8")["sip_registration_details"]["worker_pid"] != st["worker_pid"]
    assert not alive(st["worker_pid"])
    assert all(agent.status(c)["registered"] for c in ids)
    assert agent.terminate() == 0


def test_sighup_reaches_only_the_worker_holding_the_changed_connection(
    kam: Kamailio, agent_factory: Callable[..., AgentProcess]
) -> None:
    agent, ids = start_agent(agent_factory, kam, 16)
    user = {cid: f"w{cid[1:]}" for cid in ids}
    call_ids = {cid: binding_call_id(kam, user[cid]) for cid in ids}
    counts = {cid: len(registers(kam, user[cid])) for cid in ids}
    pids = {cid: agent.status(cid)["sip_registration_details"]["worker_pid"] for cid in ids}
    data = json.loads(agent.config_path.read_text())
    data["connections"][15]["external_uac_settings"]["expiration_sec"] = 240  # f15, on worker 2
    data["connections"][3]["internal_uac_settings"]["destination_uri"] = "2000@other.example.com"  # f3: no REGISTER
    agent.config_path.write_text(json.dumps(data))
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_for(lambda: any(e.get("event") == "reload_applied" for e in agent.logs()), 10, "reload applied")
    agent.wait_for(lambda: binding_call_id(kam, "w15") not in (None, call_ids["f15"]), 5, "f15 re-registered")
    untouched = [c for c in ids if c != "f15"]
    assert {c: binding_call_id(kam, user[c]) for c in untouched} == {c: call_ids[c] for c in untouched}
    assert {c: len(registers(kam, user[c])) for c in untouched} == {c: counts[c] for c in untouched}
    assert {c: agent.status(c)["sip_registration_details"]["worker_pid"] for c in ids} == pids  # no restart
    assert agent.status("f3")["internal_uac_settings"]["destination_uri"] == "2000@other.example.com"
    changed = [e for e in agent.logs() if e.get("event") == "connection_replacing"]
    assert [(e["worker"], e["connection_id"]) for e in changed] == [(2, "f15")]
    assert agent.terminate() == 0


def test_a_call_through_a_connection_on_worker_1_outlives_that_worker(
    tmp_path: Path, kam: Kamailio, agent_factory: Callable[..., AgentProcess]
) -> None:
    """The edge carries calls, the workers registrations only: the worker holding the call's
    connection dies while the call is up, the call goes on to its normal end, and the worker's
    replacement registers the connection again."""
    agent, _ids = start_agent(agent_factory, kam, 7)
    dest_port = free_port()
    cid = forwarding_connection(agent, kam, "w7", dest_port)  # the 8th connection: worker 1
    details = agent.status(cid, user_id="default")["sip_registration_details"]
    assert details["worker"] == 1
    assert f"127.0.0.1:{agent.sip_port};line={cid}" in (kam.lookup("w7") or "")
    worker_1 = details["worker_pid"]
    w7_call_id = binding_call_id(kam, "w7")
    dest, pbx = start_call(tmp_path, kam, "w7", dest_port, hold_ms=3000)
    try:
        agent.events("call_started")
        os.kill(worker_1, signal.SIGKILL)  # the call's own connection's worker dies mid-call
        agent.wait_for(lambda: binding_call_id(kam, "w7") not in (None, w7_call_id), 5, "worker 1 replaced")
        assert pbx.wait(30) == 0, pbx.output()[-2000:]  # answered, held, ended by its BYE
    finally:
        pbx.stop()
        dest.stop()
    assert len(dest.received_requests("INVITE")) == 1
    assert len(dest.received_requests("BYE")) == 1  # torn down by the PBX's BYE, not before
    ended = agent.events("call_ended")
    assert len(ended) == 1 and ended[0]["component"] == "edge" and ended[0]["connection_id"] == cid
    assert ended[0]["result"] == "answered" and ended[0]["talk_sec"] >= 2.5
    answered = f'uac_agent_calls_total{{connection_id="{cid}",result="answered"}}'
    assert metric(agent, answered) == 1
    assert agent.terminate() == 0
