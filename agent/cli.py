"""``uac-agent run`` and ``uac-agent check-config``.

SIGHUP (``systemctl reload``) re-reads the config file and applies only what
changed (agent/reload.py); a bad file is refused and the agent carries on.

Exit codes: 0 after a graceful stop (or a valid config), 2 for a bad config
(one line per problem on stderr, no traceback), 1 when the agent cannot start
(e.g. the SIP port is taken), 128+N when a second signal N forces the exit.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry

from agent import __version__
from agent.api.handlers import Authenticator, ConnectionsApi
from agent.api.openapi import build_openapi
from agent.api.service import ConnectionService
from agent.config import AgentSettings, ConfigError, load_settings
from agent.core.clock import SystemClock
from agent.http.keys import ApiKeys
from agent.http.server import HttpServer, StatusApi
from agent.logs import configure_logging
from agent.metrics import Metrics
from agent.reload import reload_from_file
from agent.sip.engine import EngineError, SipEngine
from agent.store import ConnectionStore, StoreError, resolve_store_path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uac-agent", description="SIP UAC registration agent")
    p.add_argument("--version", action="version", version=f"uac-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "register the configured connections and serve status"),
        ("check-config", "validate the configuration and exit"),
    ):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument(
            "--config", "-c", type=Path, default=None, help="YAML, TOML or JSON file (default: $UAC_AGENT_CONFIG)"
        )
    return p


def _load(args: argparse.Namespace) -> AgentSettings:
    path = args.config
    if path is None and os.environ.get("UAC_AGENT_CONFIG"):
        path = Path(os.environ["UAC_AGENT_CONFIG"])
    return load_settings(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _load(args)
    except ConfigError as e:
        for line in e.problems:
            print(f"uac-agent: config error: {line}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        active = sum(1 for c in settings.connections if c.registers)
        print(f"config OK: {len(settings.connections)} connection(s), {active} registering")
        return 0
    return run(settings)


def run(settings: AgentSettings, install_signals: bool = True) -> int:
    log = configure_logging(settings.log.format, settings.log.level)
    registry = CollectorRegistry()
    metrics = Metrics(registry, __version__)
    try:
        store = ConnectionStore(resolve_store_path(settings.store.path, settings.config_path, os.environ))
    except StoreError as e:
        log.error("store_open_failed", error=str(e))
        return 1
    service = ConnectionService(settings, store, log)
    engine = SipEngine(service.engine_settings(), metrics, log, SystemClock(), random.Random())
    service.attach(engine)
    stop = threading.Event()
    reload_requested = threading.Event()
    signals_seen: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            os._exit(128 + signum)  # second signal: exit at once
        stop.set()

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        reload_requested.set()  # the main loop reloads: nothing else happens in a signal handler

    if install_signals:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hup)

    host, port = settings.http.host_port
    keys = ApiKeys.from_settings(settings.http)  # one set for every endpoint; reload swaps it
    service.api_keys = keys
    connections = ConnectionsApi(service, Authenticator(keys), build_openapi, log)
    api = StatusApi(keys, engine.statuses, lambda: engine.alive, registry, connections=connections)
    try:
        http = HttpServer(host, port, api, log)
    except OSError as e:
        log.error("http_listen_failed", listen=settings.http.listen, error=e.strerror)
        store.close()
        return 1
    try:
        engine.start()
    except EngineError as e:
        log.error("sip_start_failed", error=str(e))
        http.stop()
        store.close()
        return 1
    http.start()
    log.info(
        "agent_started",
        version=__version__,
        http=f"{host}:{http.port}",
        sip=f"{settings.sip.bind}:{settings.sip.port}",
        connections=len(settings.connections),
        store=store.path,
    )
    while not stop.wait(0.5):
        if reload_requested.is_set():
            reload_requested.clear()
            reload_from_file(settings.config_path, service, log)
        if not engine.alive and not stop.is_set():
            log.error("sip_thread_died")
            http.stop()
            store.close()
            return 1
    log.info(
        "signal_received",
        signal=signal.Signals(signals_seen[0]).name if signals_seen else None,
        deadline_sec=settings.shutdown_timeout_sec,
    )
    engine.stop(settings.shutdown_timeout_sec)
    http.stop()
    store.close()
    log.info("agent_stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
