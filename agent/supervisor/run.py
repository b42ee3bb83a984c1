"""``uac-agent run``: wire the supervisor together and run it until a signal.

SIGTERM/SIGINT: every worker unregisters within ``shutdown_timeout_sec``, then
exit 0 (a second signal exits at once, 128 + N). SIGHUP, or ``POST
/admin/reload`` (``uac-agent reload``), re-reads the config file and applies
only what changed (``agent/reload.py``), each change reaching only the worker
that holds the connection; a thread of its own runs every reload, one at a time.
Under systemd it reports readiness, reloads, its status and the watchdog
(``agent/supervisor/systemd.py``). The main loop feeds the watchdog and never waits
for a reload: a reload waiting for a stuck worker does not get the agent killed.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import resource
import signal
import threading
import time
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector

from agent import __version__
from agent.api.service import ConnectionService
from agent.config import AgentSettings
from agent.edge.supervisor import Edge, EdgeError
from agent.http.app import create_app
from agent.http.keys import ApiKeys
from agent.http.routes import AgentState
from agent.http.server import OVERFLOW, HttpServer
from agent.logs import configure_logging, log_sink
from agent.metrics import Metrics, WorkerProcessCollector
from agent.reload import ReloadOutcome, reload_outcome
from agent.status import summary
from agent.store import ConnectionStore, StoreError, resolve_store_path
from agent.supervisor.edge import plan_edge
from agent.supervisor.errors import EngineError
from agent.supervisor.launcher import Launcher, ZygoteLauncher
from agent.supervisor.pool import WorkerPool
from agent.supervisor.systemd import Notifier

__all__ = ["run"]


def _raise_fd_limit(workers: int, log: Any) -> int:
    """The supervisor holds a socket per worker, and the edge's engines (which inherit the limit)
    a descriptor per connection: make sure the soft file limit leaves room for both. Returns the
    soft limit now in force."""
    need = 2 * workers + 512 + 16384
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError) as e:
            log.warning("fd_limit_low", soft=soft, hard=hard, needed=need, error=str(e))
            return int(soft)
        if new < need:
            log.warning("fd_limit_low", soft=new, hard=hard, needed=need)
        return int(new)
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def http_connection_cap(configured: int, fd_limit: int, workers: int) -> int:
    """``http.max_connections``, lowered so that HTTP clients can never take the descriptors the
    supervisor needs for its workers, the edge and a worker's replacement."""
    room = fd_limit - 2 * workers - 512 - OVERFLOW
    return max(16, min(configured, room))


def run(settings: AgentSettings, install_signals: bool = True, launcher: Launcher | None = None) -> int:
    log = configure_logging(settings.log.format, settings.log.level)
    fd_limit = _raise_fd_limit(settings.max_workers, log)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_* of the supervisor
    metrics = Metrics(registry, __version__)
    sink = log_sink()
    if sink is not None:
        sink.count_drops(metrics.log_lines_dropped.inc)
    try:
        store = ConnectionStore(resolve_store_path(settings.store.path, settings.config_path, os.environ))
    except StoreError as e:
        log.error("store_open_failed", error=str(e))
        return 1
    service = ConnectionService(settings, store, log)
    try:
        launcher = launcher or ZygoteLauncher()
    except OSError as e:
        log.error("workers_unavailable", error=str(e))
        store.close()
        return 1
    try:
        plan, records = plan_edge(settings)
    except (OSError, ValueError) as e:  # the runtime directory cannot be made or is too long
        log.error("edge_unavailable", error=str(e))
        store.close()
        return 1
    edge = Edge(
        plan,
        metrics,
        log,
        on_flow_closed=lambda address, port: pool.flow_closed(address, port),
        on_active=lambda counts: pool.set_calls_active(counts),
        on_destination=lambda cid, reachable: pool.set_destination_reachable(cid, reachable),
    )
    pool = WorkerPool(service.engine_settings(), launcher, metrics, log, edge=edge, records=records)
    registry.register(WorkerProcessCollector(pool.worker_pids))
    service.attach(pool)
    stop = threading.Event()
    # SIGHUP and POST /admin/reload queue here; list.append and list.pop are atomic,
    # so the signal handler and the HTTP threads need no lock (a lock in a signal
    # handler could deadlock with the main thread it interrupted).
    reloads: list[concurrent.futures.Future[ReloadOutcome]] = []
    wake = threading.Event()  # set by the signal handlers: the main loop sleeps otherwise
    signals_seen: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            os._exit(128 + signum)  # second signal: exit at once
        pool.mark_stopping()
        stop.set()
        wake.set()

    def request_reload() -> concurrent.futures.Future[ReloadOutcome]:
        fut: concurrent.futures.Future[ReloadOutcome] = concurrent.futures.Future()
        reloads.append(fut)
        wake.set()
        return fut

    def drop_reloads() -> None:
        """Reloads asked for while stopping: answered 503 (the agent is stopping), not left waiting."""
        while reloads:
            reloads.pop(0).cancel()

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        reloads.append(concurrent.futures.Future())  # the main loop reloads, not the handler
        wake.set()

    if install_signals:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hup)

    host, port = settings.http.host_port
    keys = ApiKeys.from_settings(settings.http)  # one set for every endpoint; reload swaps it
    service.api_keys = keys
    agent = AgentState(
        statuses=pool.statuses,
        health=pool.health,
        ready=lambda: pool.ready,
        unready=edge.health,
        reload=request_reload,
        info=lambda: {"version": __version__, "pid": os.getpid(), "workers": len(pool.worker_pids())},
    )
    cap = http_connection_cap(settings.http.max_connections, fd_limit, settings.max_workers)
    if cap < settings.http.max_connections:
        log.warning(
            "http_connection_cap_lowered",
            max_connections=cap,
            configured=settings.http.max_connections,
            fd_limit=fd_limit,
            reason="the open-file limit leaves no room for more (raise LimitNOFILE, or ulimit -n)",
        )
    try:
        http = HttpServer(
            host,
            port,
            create_app(keys, agent, registry, log, service),
            log,
            max_connections=cap,
            request_sec=settings.http.request_timeout_sec,
        )
    except OSError as e:
        log.error("http_listen_failed", listen=settings.http.listen, error=e.strerror)
        store.close()
        return 1
    try:
        edge.start()
    except EdgeError as e:
        log.error("edge_start_failed", error=str(e))
        http.stop()
        store.close()
        return 1
    try:
        pool.start(service.engine_settings().connections)
    except EngineError as e:
        log.error("sip_start_failed", error=str(e))
        edge.stop()
        http.stop()
        store.close()
        return 1
    http.start()
    log.info(
        "agent_started",
        version=__version__,
        pid=os.getpid(),
        http=f"{host}:{http.port}",
        sip=f"{settings.sip.bind}:{settings.sip.port}",
        workers=len(pool.worker_pids()),
        connections=len(settings.connections),
        store=store.path,
    )
    systemd = Notifier(log)
    systemd.status(summary(pool.statuses()))
    systemd.ready()
    batches: queue.SimpleQueue[list[concurrent.futures.Future[ReloadOutcome]] | None] = queue.SimpleQueue()

    def reloader() -> None:
        """Every reload, one at a time, off the main loop (which keeps feeding the watchdog)."""
        while (batch := batches.get()) is not None:
            if stop.is_set():
                for fut in batch:
                    fut.cancel()
                continue
            systemd.reloading()
            try:
                outcome = reload_outcome(settings.config_path, service, log)
            except Exception as e:  # a bug: said, and the callers answered, never a dead thread
                log.error("reload_failed", error=repr(e))
                for fut in batch:
                    fut.set_exception(e)
                continue
            finally:
                systemd.ready()
            for fut in batch:
                fut.set_result(outcome)

    reload_thread = threading.Thread(target=reloader, name="reload", daemon=True)
    reload_thread.start()
    # The loop wakes for a signal or a reload at once; else every 5 s (or half the
    # watchdog interval) to check the pool, refresh STATUS= and feed the watchdog.
    period = min(5.0, systemd.watchdog_sec or 5.0)
    next_watchdog = 0.0
    while True:
        wake.wait(max(0.05, min(period, next_watchdog - time.monotonic())) if next_watchdog else period)
        wake.clear()
        if stop.is_set():
            break
        pending = []
        while reloads:
            pending.append(reloads.pop(0))
        if pending:  # one reload answers every request queued before it started
            batches.put(pending)
        if not pool.alive and not stop.is_set():
            log.error("worker_pool_died")
            drop_reloads()
            batches.put(None)
            edge.stop()
            http.stop()
            store.close()
            return 1
        systemd.status(summary(pool.statuses()))
        if systemd.watchdog_sec is not None and time.monotonic() >= next_watchdog:
            problem = pool.health()
            systemd.watchdog(problem)
            # a failed check is asked again within a second, not half an interval later
            next_watchdog = time.monotonic() + (systemd.watchdog_sec * 0.9 if problem is None else 1.0)
    systemd.stopping()
    log.info(
        "signal_received",
        signal=signal.Signals(signals_seen[0]).name if signals_seen else None,
        deadline_sec=settings.shutdown_timeout_sec,
    )
    drop_reloads()
    batches.put(None)
    pool.stop(settings.shutdown_timeout_sec)  # the workers unregister through the edge, then it stops
    reload_thread.join(5)
    edge.stop()
    http.stop()
    drop_reloads()
    store.close()
    log.info("agent_stopped")
    return 0
