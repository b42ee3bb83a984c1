"""The real SIP thread, service, store and HTTP handling, over a fake SIP stack.

``FakeAdapter`` stands in for pjsua2: it records what the engine asks for and
answers every REGISTER at the next poll (200, or 401 for a password in
``bad_passwords``), so the API's effect on registrations is observable without
sockets.
"""

from __future__ import annotations

import io
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from agent.api.handlers import Authenticator, ConnectionsApi
from agent.api.openapi import build_openapi
from agent.api.service import ConnectionService
from agent.config import AgentSettings
from agent.core.clock import SystemClock
from agent.http.keys import ApiKeys
from agent.http.server import StatusApi
from agent.logs import configure_logging
from agent.metrics import Metrics
from agent.sip.engine import SipEngine
from agent.sip.events import RegResult, SipEvent
from agent.sip.specs import AccountSpec, StackSettings
from agent.store import ConnectionStore, resolve_store_path

KEY = "operator-key-0123456789"
USER_KEYS = {"tenant-323-key-0123456789": "323", "tenant-999-key-0123456789": "999"}


class FakeAdapter:
    bad_passwords = frozenset({"wrong-password"})

    def __init__(self, sink: Callable[[SipEvent], None]) -> None:
        self._sink = sink
        self.accounts: dict[str, AccountSpec] = {}
        self.sent: list[tuple[str, str, str]] = []  # (connection_id, "register"/"unregister"/"add"/"remove", password)
        self._pending: list[SipEvent] = []
        self._lock = threading.Lock()

    def start(self, s: StackSettings) -> None:
        pass

    @property
    def account_count(self) -> int:
        return len(self.accounts)

    def add_account(self, spec: AccountSpec) -> None:
        if spec.key in self.accounts:
            raise RuntimeError(f"connection {spec.key} already has an account")
        if len(self.accounts) >= 8:
            raise RuntimeError("at most 8 connections per process")
        self.accounts[spec.key] = spec
        self.sent.append((spec.key, "add", spec.password))

    def _answer(self, key: str, code: int, reason: str, expiration: int) -> None:
        with self._lock:
            self._pending.append(
                RegResult(key, code, reason, expiration, 0, True, "127.0.0.1:5060", retry_after=None, min_expires=None)
            )

    def register(self, key: str) -> None:
        spec = self.accounts[key]
        self.sent.append((key, "register", spec.password))
        if spec.password in self.bad_passwords:
            self._answer(key, 401, "Unauthorized", 0)
        else:
            self._answer(key, 200, "OK", spec.expires)

    def unregister(self, key: str) -> None:
        spec = self.accounts[key]
        self.sent.append((key, "unregister", spec.password))
        self._answer(key, 200, "OK", 0)

    def remove_account(self, key: str) -> None:
        spec = self.accounts.pop(key, None)
        if spec is not None:
            self.sent.append((key, "remove", spec.password))
            with self._lock:
                self._pending = [e for e in self._pending if getattr(e, "key", None) != key]

    def handle_events(self, msec: int) -> None:
        time.sleep(msec / 1000)
        with self._lock:
            events, self._pending = self._pending, []
        for ev in events:
            self._sink(ev)

    def shutdown(self) -> None:
        self.accounts.clear()

    def registers(self, key: str) -> int:
        return sum(1 for k, what, _ in self.sent if k == key and what == "register")


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
    }
    data.update(extra)
    return AgentSettings(**data)


@dataclass
class Harness:
    settings: AgentSettings
    store: ConnectionStore
    service: ConnectionService
    engine: SipEngine
    api: StatusApi
    log: io.StringIO
    adapters: list[FakeAdapter] = field(default_factory=list)

    @property
    def adapter(self) -> FakeAdapter:
        return self.adapters[0]

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
            headers["authorization"] = f"Bearer {key}"
        content = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        if content:
            headers["content-type"] = ctype
        status, _, out = self.api.handle(method, path, headers, content)
        return status, json.loads(out) if out else None

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
    """The agent's pieces as cli.run wires them, with the fake SIP stack."""
    stream = io.StringIO()
    previous = structlog.get_config()
    log = configure_logging("json", "debug", stream)
    store = ConnectionStore(resolve_store_path(settings.store.path, settings.config_path, {}))
    service = ConnectionService(settings, store, log)
    adapters: list[FakeAdapter] = []

    def factory(sink: Callable[[SipEvent], None]) -> FakeAdapter:
        a = FakeAdapter(sink)
        adapters.append(a)
        return a

    registry = CollectorRegistry()
    engine = SipEngine(
        service.engine_settings(),
        Metrics(registry),
        log,
        SystemClock(),
        random.Random(1),
        adapter_factory=factory,
        poll_ms=2,
    )
    service.attach(engine)
    engine.start()
    keys = ApiKeys.from_settings(settings.http)
    service.api_keys = keys
    connections = ConnectionsApi(service, Authenticator(keys), build_openapi, log)
    api = StatusApi(keys, engine.statuses, lambda: engine.alive, registry, connections=connections)
    h = Harness(settings, store, service, engine, api, stream, adapters)
    try:
        yield h
    finally:
        engine.stop(2.0)
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
