"""The real supervisor (service, store, HTTP handling, worker pool) and the real
worker engine, over a fake SIP stack.

Workers run as threads (``ThreadLauncher``) that talk to the pool over a real
socketpair, exactly as worker processes do. ``FakeAdapter`` stands in for
pjsua2: it records what each worker's engine asks for in one shared
``FakeStack`` and answers every REGISTER at the next poll (200, or 401 for a
password in ``bad_passwords``), so the API's effect on registrations is
observable without sockets to a PBX.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from agent.api.service import ConnectionService
from agent.config import AgentSettings
from agent.core.policy import RegistrationPolicy
from agent.dns import Resolution, Resolver, Target
from agent.http.app import create_app
from agent.http.keys import ApiKeys
from agent.http.routes import AgentState
from agent.http.server import HttpServer
from agent.ipc.messages import AccountSpec, StackSettings
from agent.logs import configure_logging
from agent.metrics import Metrics
from agent.store import ConnectionStore, resolve_store_path
from agent.supervisor.hops import HopResolver
from agent.supervisor.launcher import Launched
from agent.supervisor.pool import WorkerPool
from agent.worker.engine import WorkerEngine
from agent.worker.events import KeepaliveResult, RegResult, SipEvent
from agent.worker.main import serve
from agent.worker.stack import StackFactory

KEY = "operator-key-0123456789"
USER_KEYS = {"tenant-323-key-0123456789": "323", "tenant-999-key-0123456789": "999"}


class FakeStack:
    """What every worker's fake SIP stack was asked to do, in order (connection ids are unique)."""

    bad_passwords = frozenset({"wrong-password"})

    def __init__(self) -> None:
        self.crashing: set[int] = set()  # workers whose stack fails at every poll (a crash loop)
        self.hanging: set[int] = set()  # workers whose SIP thread blocks (stuck)
        self.accounts: dict[str, AccountSpec] = {}
        self.sent: list[tuple[str, str, str]] = []  # (connection_id, "register"/"unregister"/"add"/"remove", password)
        self.lock = threading.Lock()

    def registers(self, key: str) -> int:
        return sum(1 for k, what, _ in list(self.sent) if k == key and what == "register")


class FakeDns(Resolver):
    """Every host name is 127.0.0.1 here: these tests are about the API and the pool, not DNS
    (tests/integration/test_dns*.py use a real DNS server)."""

    def resolve(self, host: str, port: int | None, transport: str) -> Resolution:
        target = Target(host, "127.0.0.1", port or 5060, transport, 0, 0, "A")
        return Resolution(host, (target,), None, time.monotonic() + 3600, False)


class FakeAdapter:
    """The SIP stack of a worker thread: registrations answered at once. It implements
    agent.worker.stack.Stack (mypy checks it: ThreadWorker hands it to serve() as a StackFactory)."""

    def __init__(
        self, stack: FakeStack, sink: Callable[[SipEvent], None], wake: threading.Event, worker: int = 0
    ) -> None:
        self.worker = worker
        self._stack = stack
        self._sink = sink
        self._wake = wake
        self.mine: set[str] = set()
        self._pending: list[SipEvent] = []
        self._lock = threading.Lock()
        self.crash = False
        self.stuck = threading.Event()  # set while its SIP thread is held in `hanging`

    def start(self, s: StackSettings) -> None:
        pass

    @property
    def busy(self) -> bool:
        return False

    def add_account(self, spec: AccountSpec, route: str | None = None) -> None:
        if spec.key in self.mine:
            raise RuntimeError(f"connection {spec.key} already has an account")
        if len(self.mine) >= 7:
            raise RuntimeError("at most 7 connections per process")
        self.mine.add(spec.key)
        with self._stack.lock:
            self._stack.accounts[spec.key] = spec
            self._stack.sent.append((spec.key, "add", spec.password))

    def _answer(self, key: str, code: int, reason: str, expiration: int) -> None:
        with self._lock:
            self._pending.append(
                RegResult(key, code, reason, expiration, 0, True, "127.0.0.1:5060", retry_after=None, min_expires=None)
            )

    def register(self, key: str) -> None:
        spec = self._stack.accounts[key]
        with self._stack.lock:
            self._stack.sent.append((key, "register", spec.password))
        if spec.password in self._stack.bad_passwords:
            self._answer(key, 401, "Unauthorized", 0)
        else:
            self._answer(key, 200, "OK", spec.expires)

    def set_route(self, key: str, route: str) -> None:
        with self._stack.lock:
            self._stack.sent.append((key, "route", route))
        self.register(key)  # a new route registers at once, as pjsua's account modify does

    def probe(self, target_uri: str) -> None:
        raise RuntimeError("the fake stack has no forward account")

    def send_keepalive(self, key: str, target_uri: str) -> None:
        with self._stack.lock:
            self._stack.sent.append((key, "keepalive", target_uri))
        with self._lock:
            self._pending.append(KeepaliveResult(key, 200, "OK", True))

    def unregister(self, key: str) -> None:
        spec = self._stack.accounts[key]
        with self._stack.lock:
            self._stack.sent.append((key, "unregister", spec.password))
        self._answer(key, 200, "OK", 0)

    def remove_account(self, key: str) -> None:
        if key not in self.mine:
            return
        self.mine.discard(key)
        with self._stack.lock:
            spec = self._stack.accounts.pop(key)
            self._stack.sent.append((key, "remove", spec.password))
        with self._lock:
            self._pending = [e for e in self._pending if getattr(e, "key", None) != key]

    def handle_events(self, msec: int) -> None:
        while self.worker in self._stack.hanging and not self.crash:
            self.stuck.set()
            time.sleep(0.01)
        self.stuck.clear()
        if self.crash or self.worker in self._stack.crashing:
            raise RuntimeError("the fake SIP stack crashed")
        with self._lock:
            idle = not self._pending
        if idle:
            self._wake.wait(msec / 1000)
        self._wake.clear()
        with self._lock:
            events, self._pending = self._pending, []
        for ev in events:
            self._sink(ev)

    def shutdown(self) -> None:
        for key in list(self.mine):
            self.remove_account(key)


class ThreadWorker:
    """A worker "process" that is a thread of the test process (same protocol, same engine)."""

    def __init__(self, index: int, stack: FakeStack, engines: list[WorkerEngine]) -> None:
        self.index = index
        self._parent, self._child = socket.socketpair()
        self.adapter: FakeAdapter | None = None
        wake = threading.Event()

        def adapter_factory(sink: Callable[[SipEvent], None]) -> FakeAdapter:
            self.adapter = FakeAdapter(stack, sink, wake, index)
            return self.adapter

        factory: StackFactory = adapter_factory  # mypy: the fake is a Stack

        self._thread = threading.Thread(
            target=self._run,
            args=(factory, lambda _b, _p: wake.set, engines),
            name=f"worker-{index}",
            daemon=True,
        )
        self.status: int | None = None
        self._thread.start()

    def _run(self, factory: StackFactory, waker: Any, engines: list[WorkerEngine]) -> None:
        try:
            self.status = serve(self._child, factory, waker, install_signals=False, on_engine=engines.append)
        except Exception:
            self.status = 1
        finally:
            self._child.close()

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def sock(self) -> socket.socket:
        return self._parent

    def poll(self) -> int | None:
        return None if self._thread.is_alive() else (self.status or 0)

    def wait(self, timeout: float) -> int | None:
        self._thread.join(timeout)
        return self.poll()

    def kill(self) -> None:
        """Crash the worker: its stack fails in the next poll and the thread ends."""
        if self.adapter is not None:
            self.adapter.crash = True
        try:
            self._child.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class ThreadLauncher:
    def __init__(self, stack: FakeStack) -> None:
        self.stack = stack
        self.workers: list[ThreadWorker] = []
        self.engines: list[WorkerEngine] = []

    def launch(self, index: int) -> Launched:
        w = ThreadWorker(index, self.stack, self.engines)
        self.workers.append(w)
        return w

    def close(self) -> None:
        pass


def settings_for(tmp_path: Path, connections: list[dict[str, Any]] | None = None, **extra: Any) -> AgentSettings:
    data: dict[str, Any] = {
        "sip": {"bind": "127.0.0.1", "port": 5070},
        "http": {
            "listen": "127.0.0.1:0",
            "api_key": KEY,
            "api_keys": [{"user_id": u, "api_key": k} for k, u in USER_KEYS.items()],
            "default_user_id": "ops",
        },
        "defaults": {"initial_delay_max_sec": 0.0},
        "shutdown_timeout_sec": 1.0,
        "connections": connections or [],
        "store": {"path": str(tmp_path / "connections.db")},
        # Small, so the API tests cross worker boundaries: 3 workers of 4, 9 connections at most.
        "workers": {"max_connections": 9, "connections_per_worker": 4},
    }
    data.update(extra)
    return AgentSettings(**data)


@dataclass
class Harness:
    settings: AgentSettings
    store: ConnectionStore
    service: ConnectionService
    pool: WorkerPool
    server: HttpServer  # the real HTTP application and server, on a loopback port
    log: io.StringIO
    launcher: ThreadLauncher
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    @property
    def adapter(self) -> FakeStack:
        """Every worker's fake stack, as one record."""
        return self.launcher.stack

    @property
    def engine(self) -> WorkerPool:
        return self.pool

    def policy(self, cid: str) -> RegistrationPolicy:
        """The registration policy running ``cid`` on its worker (read, in a test only)."""
        for e in self.launcher.engines:
            policy = e.policy_of(cid)
            if policy is not None:
                return policy
        raise KeyError(cid)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        key: str | None = KEY,
        raw: bytes | None = None,
        ctype: str = "application/json",
    ) -> tuple[int, Any]:
        headers = {}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        content = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        if content:
            headers["Content-Type"] = ctype
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)
        try:
            conn.request(method, path, body=content or None, headers=headers)
            resp = conn.getresponse()
            status, out = resp.status, resp.read()
        finally:
            conn.close()
        return status, json.loads(out) if out else None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def status(self, cid: str) -> dict[str, Any]:
        code, body = self.call("GET", f"/v2/uac_connections/{cid}")
        assert code == 200, body
        data: dict[str, Any] = body["data"]
        return data

    def wait(self, cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def running_agent(settings: AgentSettings) -> Iterator[Harness]:
    """The agent's pieces as agent.supervisor.run wires them, workers as threads over a fake SIP stack."""
    stream = io.StringIO()
    previous = structlog.get_config()
    log = configure_logging("json", "debug", stream)
    store = ConnectionStore(resolve_store_path(settings.store.path, settings.config_path, {}))
    service = ConnectionService(settings, store, log)
    launcher = ThreadLauncher(FakeStack())
    registry = CollectorRegistry()
    pool = WorkerPool(
        service.engine_settings(), launcher, Metrics(registry), log, hops=HopResolver(settings.sip, FakeDns())
    )
    service.attach(pool)
    pool.start(service.engine_settings().connections)
    keys = ApiKeys.from_settings(settings.http)
    service.api_keys = keys
    agent = AgentState(statuses=pool.statuses, health=pool.health, ready=lambda: pool.ready)
    server = HttpServer("127.0.0.1", 0, create_app(keys, agent, registry, log, service), log)
    server.start()
    h = Harness(settings, store, service, pool, server, stream, launcher, registry)
    try:
        yield h
    finally:
        server.stop()
        pool.stop(2.0)
        store.close()
        structlog.configure(**previous)


EXT = {
    "proxy": "sip:pbx.example.com:5060",
    "username": "telnyx-reg",
    "password": "s3cret-pbx-pw",
    "transport": "TCP",
    "expiration_sec": 300,
}
DEST = {"destination_uri": "1006@assistant-abc123.sip.telnyx.com"}
