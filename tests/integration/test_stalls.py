"""Nothing a stuck worker, a client or a slow reader does stalls the agent (issue 16), black-box:
a real agent, a real Kamailio registrar, real processes stopped with SIGSTOP, real sockets."""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.kamailio import Kamailio
from tests.integration.agentproc import AgentProcess
from tests.integration.conftest import start_kamailio
from tests.integration.test_api_kamailio import BASE, call

USERS = {f"s{i}": f"s{i}-pw" for i in range(6)}


@pytest.fixture(scope="module")
def kam(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[Kamailio]:
    k = start_kamailio(tmp_path_factory.mktemp("kamailio-stalls"), pki, users=USERS)
    yield k
    k.stop()


def body(k: Kamailio, i: int) -> dict[str, Any]:
    return {
        "connection_name": f"stall {i}",
        "user_id": "323",
        "external_uac_settings": {
            "proxy": f"sip:127.0.0.1:{k.cfg.port}",
            "transport": "UDP",
            "username": f"s{i}",
            "password": f"s{i}-pw",
            "expiration_sec": 300,
        },
    }


def timed_healthz(agent: AgentProcess) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(agent.base + "/healthz", timeout=5) as r:
            code = r.status
    except OSError:
        code = 0
    return code, time.monotonic() - t0


def test_a_stopped_worker_holds_up_only_its_own_connections_changes(
    kam: Kamailio, agent_factory: Callable[..., AgentProcess]
) -> None:
    agent = agent_factory([], workers={"connections_per_worker": 1})
    ids = []
    for i in (0, 1):
        code, out = call(agent, "POST", BASE, body(kam, i))
        assert code == 201, out
        ids.append(out["data"]["id"])
    a, b = ids
    agent.wait_for(lambda: all(agent.status(c)["registered"] for c in ids), 10, "both registered")
    da, db = (agent.status(c)["sip_registration_details"] for c in ids)
    assert da["worker"] != db["worker"]
    os.kill(da["worker_pid"], signal.SIGSTOP)  # its worker answers nothing now
    outcome: dict[str, Any] = {}

    def patch_a() -> None:
        outcome["a"] = call(agent, "PATCH", f"{BASE}/{a}", {"connection_name": "waits for a stopped worker"})

    try:
        t = threading.Thread(target=patch_a)
        t.start()
        agent.wait_for(  # committed, then sent to its worker: from here on it waits for the worker
            lambda: call(agent, "GET", f"{BASE}/{a}")[1]["data"]["connection_name"] == "waits for a stopped worker",
            5,
            "a's change committed",
        )
        t0 = time.monotonic()
        code, out = call(agent, "PATCH", f"{BASE}/{b}", {"connection_name": "b on a healthy worker"})
        took = time.monotonic() - t0
        assert code == 200, out
        assert took < 1.0, f"a change on a healthy worker took {took:.1f} s"
        assert t.is_alive(), "a's change must still be waiting"
        probes = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            probes.append(timed_healthz(agent))
            time.sleep(0.25)
        assert all(code == 200 for code, _ in probes), probes
        assert max(took for _, took in probes) < 1.0, max(took for _, took in probes)
        t.join(30)
        code, out = outcome["a"]
        assert code == 504 and out["errors"][0]["code"] == "change_timeout", out
    finally:
        os.kill(da["worker_pid"], signal.SIGCONT)
    agent.wait_for(
        lambda: any(e.get("event") == "change_completed_late" and e.get("connection_id") == a for e in agent.logs()),
        10,
        "a's change completed once its worker runs again",
    )
    assert call(agent, "GET", f"{BASE}/{b}")[1]["data"]["connection_name"] == "b on a healthy worker"
    assert agent.status(b)["registered"]


def file_connection(k: Kamailio, i: int) -> dict[str, Any]:
    return {"connection_id": f"f{i}", **body(k, i)}


def test_1100_clients_that_each_sent_one_byte_cannot_take_the_agent(
    kam: Kamailio, agent_factory: Callable[..., AgentProcess]
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # this test's own 1,100 sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    timeout = 20.0
    cap = 300
    agent = agent_factory(
        [file_connection(kam, 2), file_connection(kam, 3)],
        nofile=1024,  # systemd's default soft limit (the unit sets LimitNOFILE; this agent may not have it)
        workers={"connections_per_worker": 1},
        http={"request_timeout_sec": timeout, "max_connections": cap},
    )
    agent.wait_for(lambda: all(agent.status(c)["registered"] for c in ("f2", "f3")), 10, "both registered")
    clients: list[socket.socket] = []
    opened = time.monotonic()
    for _ in range(1100):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", agent.http_port))
            s.sendall(b"G")
        except OSError:
            pass  # past the cap the agent may close it before the byte is sent
        clients.append(s)
    try:
        # those past the cap and its overflow are closed at once, the overflow's within 2 s
        agent.wait_for(lambda: open_count(clients) <= cap, 10, "every connection past the cap closed")
        assert open_count(clients) >= cap - 5  # the cap's slots are held: the agent is under siege
        probes = [timed_healthz(agent) for _ in range(10)]
        assert all(code == 200 for code, _ in probes), probes
        victim = agent.status("f3")["sip_registration_details"]["worker_pid"]
        os.kill(victim, signal.SIGKILL)
        agent.wait_for(
            lambda: (
                agent.status("f3")["sip_registration_details"]["worker_pid"] not in (None, victim)
                and agent.status("f3")["registered"]
            ),
            15,
            "the killed worker replaced and f3 registered again",
        )
        assert open_count(clients) >= cap - 5, "the held connections are still held: the replacement got its fds"
        agent.wait_for(lambda: open_count(clients) == 0, timeout + 5 - (time.monotonic() - opened), "all closed")
        assert time.monotonic() - opened < timeout + 5
    finally:
        for s in clients:
            s.close()
    assert agent.http_get("/healthz")[0] == 200
    lines = agent.log_path.read_text(errors="replace")
    assert "Too many open files" not in lines
    assert any(e.get("event") == "http_connections_capped" for e in agent.logs())
    assert agent.terminate() == 0


def open_count(clients: list[socket.socket]) -> int:
    """How many of ``clients`` the agent has not closed yet (an unread 408 counts as closed: the
    agent closes right after it)."""
    poller = select.poll()
    by_fd = {}
    for s in clients:
        if s.fileno() >= 0:
            by_fd[s.fileno()] = s
            poller.register(s, select.POLLIN)
    ready = dict(poller.poll(0))
    alive = 0
    for fd, s in by_fd.items():
        if fd not in ready:
            alive += 1
            continue
        try:
            data = s.recv(1024, socket.MSG_PEEK)
        except OSError:
            continue
        if data and not data.startswith(b"HTTP/1.1 408"):
            alive += 1
    return alive


def invite(port: int, i: int) -> bytes:
    """An INVITE to a Contact no connection has (the edge refuses it with 404 and logs a warning)."""
    return (
        f"INVITE sip:nobody@127.0.0.1:{port};line=not-a-token-{i} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK-flood-{i}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:flood@127.0.0.1>;tag=f{i}\r\n"
        "To: <sip:nobody@127.0.0.1>\r\n"
        f"Call-ID: flood-{i}@127.0.0.1\r\n"
        "CSeq: 1 INVITE\r\n"
        "Contact: <sip:flood@127.0.0.1:9>\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def test_a_log_reader_that_never_reads_and_a_flood_of_refused_invites_cost_no_registration(
    kam: Kamailio, agent_factory: Callable[..., AgentProcess]
) -> None:
    expires = 12
    conn = file_connection(kam, 4)
    conn["external_uac_settings"]["expiration_sec"] = expires
    agent = agent_factory([conn], unread_stdout=True)  # debug level: the pipe is full within seconds
    agent.wait_for(lambda: agent.status("f4")["registered"], 10, "f4 registered")
    before = len([ln for ln in kam.register_lines() if "to=sip:s4@" in ln])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        for i in range(3000):  # about 1,000 a second: a flood, not a socket buffer overrun
            try:
                s.sendto(invite(agent.sip_port, i), ("127.0.0.1", agent.sip_port))
            except BlockingIOError:
                pass
            time.sleep(0.001)
    # the binding never lapses and is refreshed on time, 2.5 expiry periods long
    lapsed = []
    deadline = time.monotonic() + 2.5 * expires
    while time.monotonic() < deadline:
        if kam.lookup("s4") is None:
            lapsed.append(time.monotonic())
        code, _ = timed_healthz(agent)
        assert code == 200
        time.sleep(0.5)
    assert not lapsed, "the binding lapsed at the registrar"
    refreshes = len([ln for ln in kam.register_lines() if "to=sip:s4@" in ln]) - before
    assert refreshes >= 2, refreshes  # (each refresh may be a challenge and its answer)
    rejected = metric_value(agent, 'uac_agent_inbound_rejected_total{connection_id="",reason="unknown_contact"}')
    assert rejected >= 2900, rejected  # the edge saw the flood (a few datagrams may be lost on loopback)
    # the lines wait in the bounded queue (none had to be dropped yet); the counter alerts start at 0
    assert metric_value(agent, "uac_agent_log_lines_dropped_total") == 0
    assert agent.terminate() == 0


def metric_value(agent: AgentProcess, series: str) -> float:
    for line in agent.metrics().splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {series} in /metrics")
