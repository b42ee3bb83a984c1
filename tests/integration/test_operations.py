"""Running it where admins run it: systemd's notify protocol on a real NOTIFY_SOCKET, and the
commands that ask a running agent (``status``, ``reload``, ``register``, ``unregister``), against
a real Kamailio on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.kamailio import Kamailio, free_port, free_port_block
from tests.integration.agentproc import AgentProcess
from tests.integration.conftest import connection


class NotifySocket:
    """systemd's side of sd_notify: a datagram socket that keeps every message, in order."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="nfy")  # AF_UNIX paths are short: not under tmp_path
        self.path = os.path.join(self._dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self) -> list[str]:
        return [m for _, m in self.messages]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self._dir)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    n = NotifySocket()
    yield n
    n.close()


def agent_with_a_failing_connection(kamailio: Kamailio, tmp_path: Path) -> AgentProcess:
    port = kamailio.cfg.port
    return AgentProcess(
        tmp_path / "agent",
        [
            connection("c-alice", f"sip:127.0.0.1:{port}", "UDP", "alice"),
            connection("c-bob", f"sip:127.0.0.1:{port}", "UDP", "bob", password="wrong-pw"),
        ],
        workers={"max_workers": 2},
    )


def test_systemd_notify_ready_status_watchdog_reload_stopping(
    kamailio: Kamailio, tmp_path: Path, notify: NotifySocket
) -> None:
    agent = agent_with_a_failing_connection(kamailio, tmp_path)
    agent.start(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000"})
    try:
        agent.wait_for(lambda: "READY=1" in notify.lines(), 10, "READY=1")
        # READY=1 came once HTTP serves and the workers' transports are bound
        assert agent.http_get("/readyz")[0] == 200
        agent.wait_for(lambda: "STATUS=1/2 registered, 1 failing" in notify.lines(), 15, "STATUS= summary")
        agent.wait_for(lambda: notify.lines().count("WATCHDOG=1") >= 3, 10, "watchdog pings every second")

        before = len(notify.lines())
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_for(lambda: "READY=1" in notify.lines()[before:], 10, "READY=1 after the reload")
        after = notify.lines()[before:]
        assert after.index("RELOADING=1") < after.index("READY=1")
    finally:
        assert agent.terminate() == 0
    assert "STOPPING=1" in notify.lines()
    assert notify.lines().index("STOPPING=1") > notify.lines().index("READY=1")
    assert not [e for e in agent.logs() if e.get("event") in ("sd_notify_failed", "watchdog_withheld")]


def test_a_reload_waiting_for_a_stopped_worker_never_starves_the_watchdog(
    kamailio: Kamailio, tmp_path: Path, notify: NotifySocket
) -> None:
    """A reload runs on a thread of its own: while it waits for a worker (here stopped), the main
    loop keeps pinging the watchdog, well within WatchdogSec (3 s here)."""
    port = kamailio.cfg.port
    agent = AgentProcess(
        tmp_path / "agent",
        [
            connection("c-alice", f"sip:127.0.0.1:{port}", "UDP", "alice"),
            connection("c-bob", f"sip:127.0.0.1:{port}", "UDP", "bob"),
        ],
        workers={"connections_per_worker": 1},
    )
    agent.start(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "3000000"})
    stopped = None
    try:
        agent.wait_for(lambda: "READY=1" in notify.lines(), 10, "READY=1")
        agent.wait_for(lambda: agent.status("c-alice")["registered"], 10, "alice registered")
        stopped = agent.status("c-alice")["sip_registration_details"]["worker_pid"]
        config = json.loads(agent.config_path.read_text())
        config["connections"][0]["external_uac_settings"]["expiration_sec"] = 240  # alice's worker must apply it
        agent.config_path.write_text(json.dumps(config))
        os.kill(stopped, signal.SIGSTOP)
        before = len(notify.messages)
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_for(lambda: "RELOADING=1" in notify.lines()[before:], 5, "the reload under way")
        t0 = time.monotonic()
        # the reload waits for the stopped worker (15 s) all this time: watch the pings meanwhile
        agent.wait_for(
            lambda: sum(1 for t, m in notify.messages[before:] if t >= t0 and m == "WATCHDOG=1") >= 6,
            12,
            "six watchdog pings while the reload waits",
        )
        window = [(t, m) for t, m in notify.messages[before:] if t >= t0]
        assert "READY=1" not in [m for _, m in window], "the reload should still be waiting"
        pings = [t for t, m in window if m == "WATCHDOG=1"]
        gaps = [b - a for a, b in zip([t0, *pings], [*pings, time.monotonic()], strict=True)]
        assert max(gaps) < 3.0, gaps
        assert agent.http_get("/healthz")[0] == 200
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
    agent.wait_for(lambda: "READY=1" in notify.lines()[before:], 30, "READY=1 once the reload is done")
    assert agent.terminate() == 0
    assert not [e for e in agent.logs() if e.get("event") == "watchdog_withheld"]


def test_status_register_unregister_and_reload_commands(kamailio: Kamailio, tmp_path: Path) -> None:
    agent = agent_with_a_failing_connection(kamailio, tmp_path).start()
    try:
        agent.wait_for(lambda: agent.status("c-alice")["registered"], 10, "alice registered")
        agent.wait_for(lambda: agent.status("c-bob")["registration_status"] == 2, 10, "bob refused")

        res = agent.cli("status")
        assert res.returncode == 1, res.stderr  # bob is not registered
        lines = res.stdout.splitlines()
        assert "1/2 registered, 1 failing" in lines[0]
        header = "ID NAME WORKER STATE REGISTERED CALLS LAST RESPONSE EXPIRES IN NEXT ACTION"
        assert lines[1].split() == header.split()
        alice = next(ln for ln in lines if ln.startswith("c-alice"))
        bob = next(ln for ln in lines if ln.startswith("c-bob"))
        assert " REGISTERED " in alice and " yes " in alice and "200 OK" in alice and "refresh in" in alice
        assert " RETRY_WAIT " in bob and " no " in bob and ("401" in bob or "403" in bob) and "retry in" in bob
        assert "integration-test-key" not in res.stdout + res.stderr

        res = agent.cli("status", "--json")
        data = json.loads(res.stdout)
        assert res.returncode == 1
        assert [c["connection_id"] for c in data["connections"]] == ["c-alice", "c-bob"]
        assert all(c["third-party_uac_settings"]["password"] == "***" for c in data["connections"])

        attempts = agent.status("c-alice")["sip_registration_details"]["attempts"]
        res = agent.cli("register", "c-alice")
        assert (res.returncode, res.stdout.strip()) == (0, "c-alice: registered (200 OK)"), res.stderr
        assert agent.status("c-alice")["sip_registration_details"]["attempts"] > attempts
        res = agent.cli("register", "c-bob", "--wait", "5")
        assert res.returncode == 1
        assert "c-bob: not registered" in res.stderr
        res = agent.cli("register", "no-such-id")
        assert res.returncode == 1
        assert "404" in res.stderr

        res = agent.cli("unregister", "c-alice")
        assert res.returncode == 0, res.stderr
        agent.wait_for(lambda: kamailio.lookup("alice") is None, 5, "alice's binding removed")

        # reload: a refused file exits 1 with the reason; the running config stays
        good = json.loads(agent.config_path.read_text())
        bad = json.loads(json.dumps(good))
        bad["connections"][0]["external_uac_settings"]["transport"] = "SCTP"
        agent.config_path.write_text(json.dumps(bad))
        res = agent.cli("reload")
        assert res.returncode == 1
        assert "reload refused" in res.stderr and "transport" in res.stderr and "SCTP" in res.stderr
        # applied: bob's password fixed; exits 0 and bob registers
        good["connections"][1]["external_uac_settings"]["password"] = "bob-pw"
        agent.config_path.write_text(json.dumps(good))
        res = agent.cli("reload")
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "reload applied: added -; removed -; changed c-bob"
        agent.wait_for(lambda: agent.status("c-bob")["registered"], 10, "bob registered after the reload")
        assert agent.cli("register", "c-alice").returncode == 0
        assert agent.cli("status").returncode == 0  # every connection registered now
    finally:
        assert agent.terminate() == 0
    res = agent.cli("status")
    assert res.returncode == 2
    assert "no agent answers" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_user_key_may_not_use_the_operator_endpoints(kamailio: Kamailio, tmp_path: Path) -> None:
    agent = AgentProcess(
        tmp_path / "agent",
        [],
        http={"api_keys": [{"user_id": "323", "api_key": "user-323-key-0123456789"}]},
    ).start()
    try:
        assert agent.http_get("/admin/status", "user-323-key-0123456789")[0] == 403
        assert agent.http_get("/admin/status", "wrong")[0] == 401
        code, body = agent.http_get("/admin/status", "integration-test-key")
        assert code == 200
        assert json.loads(body)["connections"] == []
    finally:
        assert agent.terminate() == 0


def test_the_lab_demo_registers_shows_status_and_puts_a_call_through(tmp_path: Path) -> None:
    """The README's first command (``scripts/lab.sh`` runs ``python -m lab.demo``): the lab PBX,
    the agent registered to it over UDP, TCP and TLS, its status printed, and a call relayed."""
    pbx, sip, dest = free_port_block(2), free_port_block(2), free_port_block(5)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lab.demo",
            "--once",
            "--dir",
            str(tmp_path / "lab"),
            "--pbx-port",
            str(pbx),
            "--sip-port",
            str(sip),
            "--dest-port",
            str(dest),
            "--http-port",
            str(free_port()),
        ],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "GET /readyz?registered=all -> 200" in text, text[-4000:]
    for cid in ("1001", "1002", "1003"):
        assert f"connection_id={cid} -> 200" in text
    assert "caller's final answer: ['SIP/2.0 200 OK']" in text, text[-4000:]
    assert "destination got: INVITE sip:assistant@127.0.0.1:" in text, text[-4000:]
    assert 'result="answered"' in text
    assert "the call went through" in text
    assert "agent exited with 0" in text


def _descendants(root: int) -> list[int]:
    """Every process under ``root`` (from each /proc/PID/stat's parent pid)."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(name))
    out, todo = [], list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def test_no_child_process_gets_a_secret_in_its_environment(kamailio: Kamailio, tmp_path: Path) -> None:
    """A connection's password in UAC_AGENT_CONNECTIONS and a user key in UAC_AGENT_HTTP__API_KEYS:
    the agent uses them (the connection registers, the key is accepted), and none of its child
    processes (the worker zygote, the workers, the edge's engines and keeper) has either in its
    environment, nor any UAC_AGENT_ variable."""
    password = "alice-pw"  # the lab registrar's password for alice
    user_key = "user-key-from-the-environment-0123"
    agent = AgentProcess(tmp_path / "agent", [])
    conns = [connection("c-env", f"sip:127.0.0.1:{kamailio.cfg.port}", "UDP", "alice", password=password)]
    conns[0]["user_id"] = "u-env"
    agent.start(
        env={
            "UAC_AGENT_CONNECTIONS": json.dumps(conns),
            "UAC_AGENT_HTTP__API_KEYS": json.dumps([{"user_id": "u-env", "api_key": user_key}]),
        }
    )
    try:
        agent.wait_for(lambda: agent.status("c-env", "u-env")["registered"], 15, "the connection from the environment")
        assert agent.http_get("/v2/uac_connections/c-env", key=user_key)[0] == 200
        assert agent.proc is not None
        children = _descendants(agent.proc.pid)
        names = set()
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
                names.add(Path(f"/proc/{pid}/comm").read_text().strip())
            except OSError:
                continue  # gone meanwhile
            assert password.encode() not in environ, (pid, names)
            assert user_key.encode() not in environ, (pid, names)
            assert b"UAC_AGENT_" not in environ, (pid, names)
        edge = {"kamailio", "rtpengine", "haproxy", "python"}  # python: the edge's keeper
        assert {"uac-zygote", "uac-worker-0", *edge} <= names, names
    finally:
        assert agent.terminate() == 0
