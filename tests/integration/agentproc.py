"""The agent as a real child process (``python -m agent run``), for integration tests."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab.kamailio import free_port, free_port_block, release_port_block

API_KEY = "integration-test-key"
# DNS servers every agent under test asks (tests/integration/conftest.py starts a loopback
# dnsmasq that knows localhost and nothing else): no test's lookup leaves loopback.
DEFAULT_NAMESERVERS: list[str] = []
# Worker processes an agent under test may start (each on a loopback port of its edge's).
MAX_WORKERS = 8
# TLS PBX addresses the edge of an agent under test may dial at once (one loopback port each).
TLS_TARGETS = 16
# RTP ports of an agent under test (rtpengine's: about 4 per bridged call).
RTP_PORTS = 400


class AgentProcess:
    def __init__(self, workdir: Path, connections: list[dict[str, Any]], **sections: Any) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        workers = dict(sections.pop("workers", {}))
        self.max_workers = int(workers.setdefault("max_workers", MAX_WORKERS))
        self.sip_port = free_port()  # the edge's one public port (UDP, TCP)
        self.tls_port = free_port()  # its TLS port (open only with sip.tls_cert_file)
        self.loopback_port = free_port_block(10 + self.max_workers + TLS_TARGETS)
        self.rtp_port = free_port_block(RTP_PORTS, low=20000, high=32000)
        self._blocks = [(self.loopback_port, 10 + self.max_workers + TLS_TARGETS), (self.rtp_port, RTP_PORTS)]
        self.http_port = free_port()
        config: dict[str, Any] = {
            "sip": {
                "bind": "127.0.0.1",
                "port": self.sip_port,
                "tls_port": self.tls_port,
                "rtp_port": self.rtp_port,
                "rtp_port_range": RTP_PORTS,
                "nameservers": list(DEFAULT_NAMESERVERS),
            },
            "edge": {
                "loopback_port": self.loopback_port,
                "tls_targets": TLS_TARGETS,
                "runtime_dir": str(workdir / "edge"),
                # the tests' destination SIPps answer INVITEs only (an OPTIONS would count as one
                # of their -m calls): the destination health test turns pings on
                "destination_ping_sec": 0,
            },
            "http": {"listen": f"127.0.0.1:{self.http_port}", "api_key": API_KEY},
            "log": {"format": "json", "level": "debug"},
            "defaults": {"initial_delay_max_sec": 0.2},
            "workers": workers,
            "connections": connections,
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key].update(value)
            else:
                config[key] = value
        self.config_path = workdir / "agent.json"
        self.config_path.write_text(json.dumps(config))
        self.log_path = workdir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.nofile: int | None = None
        self.unread_stdout = False

    def worker_port(self, worker: int) -> int:
        """Worker ``worker``'s loopback SIP port (only the edge talks to it)."""
        return self.loopback_port + 10 + worker

    def start(self, timeout: float = 20.0, env: dict[str, str] | None = None) -> AgentProcess:
        """Run it; with ``self.nofile``, at that soft open-file limit (systemd's default is 1024; the
        hard one is kept); with ``self.unread_stdout``, its stdout and stderr on a pipe that nobody
        reads (its log is then lost)."""
        nofile, unread_stdout = self.nofile, self.unread_stdout
        env = {**os.environ, **(env or {})}
        env.pop("UAC_AGENT_CONFIG", None)

        def limits() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
                stdout=subprocess.PIPE if unread_stdout else log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[2],
                env=env,
                preexec_fn=limits if nofile is not None else None,
            )
        self.wait_for(lambda: self.http_get("/healthz")[0] == 200, timeout, "agent /healthz")
        return self

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def http_get(self, path: str, key: str | None = None) -> tuple[int, str]:
        req = urllib.request.Request(self.base + path)
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=3) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``uac-agent ARGS --config <this agent's file>``, as an admin would run it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("UAC_AGENT_")}
        return subprocess.run(
            [sys.executable, "-m", "agent", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=Path(__file__).resolve().parents[2],
        )

    def status(self, connection_id: str, user_id: str = "323") -> dict[str, Any]:
        code, body = self.http_get(
            "/v2/sip_registration_status?credential_type=uac_third-party_credential"
            f"&connection_id={connection_id}&user_id={user_id}",
            API_KEY,
        )
        assert code == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    def metrics(self) -> str:
        return self.http_get("/metrics")[1]

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def events(self, name: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The log lines of event ``name``, once there are at least ``count`` of them.

        Worker lines reach the log through the supervisor, a moment after the SIP
        messages that caused them: wait for them rather than read at once.
        """
        self.wait_for(
            lambda: sum(1 for e in self.logs() if e.get("event") == name) >= count, timeout, f"{count} {name} lines"
        )
        return [e for e in self.logs() if e.get("event") == name]

    def raw_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}) waiting for {what}:\n{self.tail()}")
            if cond():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def children(self) -> dict[int, str]:
        """The supervisor's child processes now (its workers, their zygote, the edge's engines and
        its keeper): pid -> process name."""
        return {} if self.proc is None else _children_of(self.proc.pid)

    def descendants(self) -> dict[int, str]:
        """Every process under the supervisor now (the children and theirs, e.g. Kamailio's)."""
        if self.proc is None:
            return {}
        out: dict[int, str] = {}
        todo = [self.proc.pid]
        while todo:
            kids = _children_of(todo.pop())
            out.update(kids)
            todo += kids
        return out

    def worker_pids(self) -> list[int]:
        """The worker processes now (``uac-worker-K``)."""
        return sorted(p for p, name in self.children().items() if name.startswith("uac-worker"))

    def kill(self) -> None:
        """SIGKILL the supervisor, its workers and its edge (test teardown: nothing outlives a test)."""
        if self.proc is not None and self.proc.poll() is None:
            workers = list(self.children())
            self.proc.kill()
            self.proc.wait(5)
            for pid in workers:
                try:
                    if os.getpgid(pid) == pid:  # an edge engine: its whole group (Kamailio's children)
                        os.killpg(pid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc is not None and self.proc.poll() is not None and self._blocks:
            for base, count in self._blocks:
                release_port_block(base, count)
            self._blocks = []


def _children_of(pid: int) -> dict[int, str]:
    """``pid``'s child processes now (whichever of its threads adopted each): pid -> name."""
    out: dict[int, str] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            try:
                out[kid] = Path(f"/proc/{kid}/comm").read_text().strip()
            except OSError:
                continue
    return out
