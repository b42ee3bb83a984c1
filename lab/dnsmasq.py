"""A real DNS server on loopback for tests (Debian's dnsmasq), and one that never answers.

``Dnsmasq`` runs ``dnsmasq`` in the foreground as a child process on 127.0.0.1 and a
free port, serving only the records it is given (SRV, A/AAAA, NAPTR, all with one
TTL): every other name is NXDOMAIN (``--local=/#/``), nothing is forwarded, neither
/etc/resolv.conf nor /etc/hosts is read. Each query is logged to a file in its
workdir, so a test can tell which questions were asked (``queries()``).

``SilentDns`` is a UDP socket that receives queries and never answers them.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from lab.kamailio import free_port, stop_process_group

__all__ = ["DNSMASQ", "Dnsmasq", "NaptrRecord", "SilentDns", "SrvHost", "dnsmasq_binary"]

DNSMASQ = "/usr/sbin/dnsmasq"
PROBE_NAME = "ready.dnsmasq.lab"

# (name, target, port, priority, weight)
SrvHost = tuple[str, str, int, int, int]
# (name, order, preference, flags, service, regexp, replacement)
NaptrRecord = tuple[str, int, int, str, str, str, str]

_QUERY = re.compile(r"query\[(?P<type>[A-Z0-9]+)\] (?P<name>\S+) from ")


def dnsmasq_binary() -> str:
    """Where dnsmasq is; RuntimeError naming the package when it is not installed."""
    found = shutil.which("dnsmasq") or (DNSMASQ if os.access(DNSMASQ, os.X_OK) else None)
    if found is None:
        raise RuntimeError("dnsmasq is not installed: apt-get install dnsmasq-base (Debian's package)")
    return found


class Dnsmasq:
    """A dnsmasq process serving the given records; ``start()`` waits until it answers."""

    def __init__(
        self,
        workdir: Path,
        srv: Sequence[SrvHost] = (),
        hosts: Mapping[str, Sequence[str]] | None = None,
        naptr: Sequence[NaptrRecord] = (),
        ttl: int = 60,
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.srv = list(srv)
        self.hosts = {k: list(v) for k, v in (hosts or {}).items()}
        self.naptr = list(naptr)
        self.ttl = ttl
        self.port = port or free_port()
        self.log_path = workdir / "dnsmasq.log"
        self.out_path = workdir / "dnsmasq.out"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:port``, as ``sip.nameservers`` takes it."""
        return f"127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        # Keep the test's own user and group (as root dnsmasq would switch to "nobody",
        # and needs no such account then); no pid file in /run.
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
        args = [
            dnsmasq_binary(),
            "--keep-in-foreground",
            f"--user={user}",
            f"--group={group}",
            f"--pid-file={self.workdir / 'dnsmasq.pid'}",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            f"--port={self.port}",
            "--local=/#/",
            f"--local-ttl={self.ttl}",
            "--log-queries",
            f"--log-facility={self.log_path}",
            f"--host-record={PROBE_NAME},127.0.0.1",
        ]
        for name, ips in self.hosts.items():
            args += [f"--host-record={name},{ip}" for ip in ips]
        for name, target, port, priority, weight in self.srv:
            args.append(f"--srv-host={name},{target},{port},{priority},{weight}")
        for name, order, pref, flags, service, regexp, replacement in self.naptr:
            args.append(f"--naptr-record={name},{order},{pref},{flags},{service},{regexp},{replacement}")
        return args

    def start(self, timeout: float = 5.0) -> Dnsmasq:
        with open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(self.args(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", self.port)]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited at start (rc {self.proc.returncode}):\n{self._tail()}")
            try:
                resolver.resolve(PROBE_NAME, dns.rdatatype.A, lifetime=0.2)
                return self
            except dns.exception.DNSException:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"dnsmasq did not answer on {self.address} within {timeout} s:\n{self._tail()}")

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.proc = None

    def restart(
        self,
        srv: Sequence[SrvHost] | None = None,
        hosts: Mapping[str, Sequence[str]] | None = None,
        naptr: Sequence[NaptrRecord] | None = None,
        ttl: int | None = None,
    ) -> Dnsmasq:
        """Serve new records (those given replace the old ones) on the same port."""
        self.stop()
        if srv is not None:
            self.srv = list(srv)
        if hosts is not None:
            self.hosts = {k: list(v) for k, v in hosts.items()}
        if naptr is not None:
            self.naptr = list(naptr)
        if ttl is not None:
            self.ttl = ttl
        return self.start()

    def queries(self) -> list[tuple[str, str]]:
        """Every (type, name) asked so far, oldest first, start-up probes left out."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [(m["type"], m["name"]) for m in _QUERY.finditer(text) if m["name"].rstrip(".").lower() != PROBE_NAME]

    def _tail(self) -> str:
        parts = [p.read_text(errors="replace")[-2000:] for p in (self.out_path, self.log_path) if p.exists()]
        return "\n".join(parts)


class SilentDns:
    """A DNS server that never answers: a UDP socket on 127.0.0.1 that counts what it receives."""

    def __init__(self) -> None:
        self.port = 0
        self.received = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def queries(self) -> int:
        with self._lock:
            return self.received

    def start(self) -> SilentDns:
        self.port = free_port()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", self.port))
        sock.settimeout(0.1)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, args=(sock,), name="silent-dns", daemon=True)
        self._thread.start()
        return self

    def _run(self, sock: socket.socket) -> None:
        while self._sock is sock:
            try:
                sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.received += 1

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if self._thread is not None:
            self._thread.join(1.0)
            self._thread = None
        if sock is not None:
            sock.close()
