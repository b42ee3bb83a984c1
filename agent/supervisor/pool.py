"""The worker pool: which connection runs on which worker process, and keeping every worker alive.

Rules
-----
* Only connections that keep a registration live on a worker; the others
  (inactive, or without ``external_uac_settings``) are shown by the pool
  itself as Not Applicable.
* **Placement.** A connection stays on its worker while it lives. A new one
  goes to the lowest-numbered worker with room (``connections_per_worker``),
  else to a new worker at the lowest free index. A worker left with no
  connection is stopped. At most ``workers.max_connections`` connections are
  placed: one more is a :class:`ConnectionLimitError`.
* **Ports.** Worker k listens on loopback port ``edge.loopback_port + 10 + k``
  (UDP) and sends every request through the edge; a replacement takes the same
  index. The Contact names the edge, so a replacement registers the same one.
* **The edge** (``agent/edge``) gets each placed connection's record before its
  worker gets the connection (the REGISTER's From and the calls depend on it),
  and loses it when the connection leaves its worker. A TCP flow the edge saw
  close reaches the workers as ``FlowClosed``.
* **Changes** reach only the worker holding the connection, as one request
  each (``Apply``, ``Remove``, ``RegisterNow``, ``UnregisterNow``) answered by
  ``Done``. The pool commits a change when the worker confirms it; a worker
  lost before answering fails the request (:class:`WorkerLostError`) and the
  committed settings stay. A change to a connection whose worker is being
  replaced is committed at once and applied by the replacement.
* **Faults.** A worker that dies (its socket closes) is noticed at once: its
  connections show ``registered: false`` with the reason, and a replacement
  is started at once, registering without the start-up stagger. One that keeps
  dying is restarted after 1 s, 2 s, 4 s ... up to ``restart_delay_max_sec``,
  and counted. One whose SIP thread answers no ping for
  ``heartbeat_timeout_sec`` is killed and replaced. Other workers are never
  touched.

All of the pool's state belongs to one thread running an asyncio loop; other
threads call the public methods, which hand the work to that loop and return
a ``concurrent.futures.Future``. Status reads never wait: :meth:`statuses`
returns an immutable mapping replaced whole after each batch of events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import math
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from agent.config import AgentSettings, Connection
from agent.core.policy import PolicySnapshot
from agent.edge.messages import EdgeConnection, TlsTarget
from agent.ipc import messages as m
from agent.ipc.wire import FrameReader, WireError, encode
from agent.metrics import Metrics
from agent.status import (
    ConnectionStatus,
    build_status,
    inactive_snapshot,
    pending_snapshot,
    worker_down_snapshot,
)
from agent.supervisor.errors import (
    ConnectionLimitError,
    EngineError,
    NotRegisteringError,
    StackRejectedError,
    UnknownConnectionError,
    WorkerLostError,
)
from agent.supervisor.hops import HopResolver
from agent.supervisor.launcher import Launched, Launcher, describe_exit
from agent.supervisor.specs import EdgeRecords, needs_lookup, tls_targets

__all__ = ["EdgeSink", "WorkerPool"]

T = TypeVar("T")

# A worker that ran this long before dying is restarted at once (its earlier deaths are forgotten).
STABLE_AFTER_SEC = 60.0
# How long a new worker may take to answer Start with Ready.
START_TIMEOUT_SEC = 30.0
# /healthz and the systemd watchdog: how long the pool's loop may take to answer.
HEALTH_TIMEOUT_SEC = 2.0
# ... and an answer serves for this long (several probes in a second ask the loop once).
HEALTH_CACHE_SEC = 1.0
# How long a change waits for the edge to route a new TLS target before its worker gets it.
EDGE_TLS_WAIT_SEC = 2.0
# A heartbeat round is sent in at most this many groups spread over its period.
PING_GROUPS = 20
# At start-up, how long a port held by a previous supervisor's workers is waited for.
BIND_RETRY_SEC = 8.0


class EdgeSink(Protocol):
    """What the pool hands the edge (agent/edge/supervisor.py's Edge; never blocks)."""

    def put(self, rec: EdgeConnection) -> None: ...
    def remove(self, line: str) -> None: ...
    def put_tls(self, target: TlsTarget) -> concurrent.futures.Future[None]: ...


@dataclass
class _Worker:
    index: int
    state: str = "starting"  # starting, running, retiring, down (replacement pending), gone
    proc: Launched | None = None
    writer: asyncio.StreamWriter | None = None
    pid: int | None = None
    conns: set[str] = field(default_factory=set)  # placed here, including changes in flight
    pending: dict[int, tuple[asyncio.Future[m.Done], str | None]] = field(default_factory=dict)
    started_at: float = 0.0
    quick_deaths: int = 0  # deaths in a row, each within STABLE_AFTER_SEC of its start
    last_pong: float = 0.0  # monotonic time the worker last sent anything
    ping_seq: int = 0
    ping_sent: float = 0.0  # monotonic time the last ping left
    ready: asyncio.Future[str | None] | None = None  # None once started; else the start error
    log: Any = None
    restart_handle: asyncio.TimerHandle | None = None
    outbox: list[m.Command] = field(default_factory=list)  # sent once the socket is connected
    generation: int = 0  # counts its launches: a task for an earlier process sees it was replaced
    spawning: bool = False  # the launcher is starting its process (off the loop)


@dataclass
class _Placed:
    conn: Connection  # the committed settings
    worker: int | None = None  # None: on no worker (it keeps no registration)
    snapshot: PolicySnapshot | None = None
    down: str | None = None  # why its worker is not running, while it is not
    held: bool = False  # unregistered on request: a replacement worker keeps it so
    spec: m.ConnSpec | None = None  # the last spec sent to its worker
    dns_expires: float | None = None  # monotonic time its host names are looked up again (None: none to look up)
    dns_print: tuple[object, ...] | None = None  # what its host names resolved to (Hops.fingerprint)
    record: EdgeConnection | None = None  # the edge's record of its committed settings


class WorkerPool:
    def __init__(
        self,
        settings: AgentSettings,
        launcher: Launcher,
        metrics: Metrics,
        logger: Any,
        hops: HopResolver | None = None,
        edge: EdgeSink | None = None,
        records: EdgeRecords | None = None,
    ) -> None:
        self._settings = settings
        self._launcher = launcher
        self._metrics = metrics
        self._log = logger
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._workers: dict[int, _Worker] = {}
        self._conns: dict[str, _Placed] = {}
        self._statuses: Mapping[str, ConnectionStatus] = {}
        self._dirty: set[str] = set()
        self._requests = itertools.count(1)
        self._stopping = False
        self._starting_up = False
        self._tasks: set[asyncio.Future[Any]] = set()
        self._ping_task: asyncio.Task[None] | None = None
        self._started = False
        self._health_seen: tuple[float, str | None] | None = None  # (monotonic, answer) of health()
        self._hops = hops or HopResolver(settings.sip)
        self._edge = edge
        self._records = records or EdgeRecords(settings)
        self._tls_slots: dict[str, int] = {}  # TLS target "IP:PORT" -> its loopback port's slot
        self._calls: Mapping[str, int] = {}  # calls active by connection (the edge's count)
        self._reachable: Mapping[str, bool | None] = {}  # destination health by connection (the edge's)
        self._built: dict[str, tuple[EdgeConnection, tuple[m.Hop | None, ...]]] = {}  # by _spec, for _to_edge
        # DNS lookups run here, never on the loop thread (nor, in the workers, on a SIP thread).
        self._dns = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="dns")
        # Processes are started here: the launcher waits for the zygote (up to its timeout), the loop never does.
        self._spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="spawn")
        self._refreshing: set[str] = set()
        self._prints: dict[str, tuple[object, ...]] = {}  # fingerprints from the DNS threads, by connection

    # -- other threads -------------------------------------------------------------

    def start(self, connections: Iterable[Connection], timeout: float = START_TIMEOUT_SEC) -> None:
        """Start the loop thread and a worker for every ``connections_per_worker`` registering
        connections; return once every worker is up. Raise :class:`EngineError` if one cannot start."""
        if self._thread is not None:
            raise EngineError("already started")
        self._thread = threading.Thread(target=self._loop.run_forever, name="workers", daemon=True)
        self._thread.start()
        try:
            self._call(self._start(list(connections)), timeout + 5)
        except BaseException:
            self.stop(2.0)
            raise
        self._started = True

    def apply_connection(self, conn: Connection) -> concurrent.futures.Future[str]:
        """Add ``conn``, or bring the running connection with its id to it.

        Result: ``"added"``; ``"updated"`` (nothing the registration uses changed:
        no REGISTER is sent); or ``"replaced"`` (the old binding was unregistered,
        then the registration re-created).
        """
        return self._submit(self._apply(conn))

    def remove_connection(self, connection_id: str) -> concurrent.futures.Future[bool]:
        """Unregister (waiting for the answer, at most the unregister deadline), then remove."""
        return self._submit(self._remove(connection_id))

    def register_now(self, connection_id: str) -> concurrent.futures.Future[str]:
        return self._submit(self._action(connection_id, register=True))

    def unregister_now(self, connection_id: str) -> concurrent.futures.Future[str]:
        return self._submit(self._action(connection_id, register=False))

    def flow_closed(self, address: str, port: int) -> None:
        """The edge's TCP connection to ``address:port`` closed (any thread): every worker with a
        TCP or TLS connection is told; those registered over it register again."""
        self._loop.call_soon_threadsafe(self._flow_closed, address, port)

    def set_destination_reachable(self, connection_id: str, reachable: bool | None) -> None:
        """Whether the connection's destination answers the edge's pings (any thread)."""
        self._loop.call_soon_threadsafe(self._set_reachable, connection_id, reachable)

    def set_calls_active(self, counts: Mapping[str, int]) -> None:
        """The edge's counts of calls in progress, by connection (any thread), for their status."""
        self._loop.call_soon_threadsafe(self._set_calls, dict(counts))

    def replace_settings(self, settings: AgentSettings) -> None:
        """Use ``settings`` (e.g. new ``defaults``) for connections applied from now on."""
        self._settings = settings

    def statuses(self) -> Mapping[str, ConnectionStatus]:
        return self._statuses  # replaced whole on the loop thread; never mutated

    @property
    def alive(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive() and not self._loop.is_closed()

    @property
    def ready(self) -> bool:
        """Every worker started at start-up has its transports bound, and the pool runs."""
        return self._started and self.alive and not self._stopping

    def health(self, timeout: float = HEALTH_TIMEOUT_SEC) -> str | None:
        """None while the pool's loop answers within ``timeout`` and every running worker's SIP
        thread has been heard from within the heartbeat timeout; else what is wrong.

        A worker that died and waits for its replacement does not count: the pool is doing
        its job. One whose heartbeat is older than the timeout does: the pool should have
        replaced it (``/healthz``, and the systemd watchdog, catch the pool failing).
        """
        if not self.alive:
            return "the worker pool has stopped"
        now = time.monotonic()
        seen = self._health_seen
        if seen is not None and now - seen[0] < HEALTH_CACHE_SEC:
            return seen[1]  # probes and scrapes arriving together ask the loop once
        try:
            problem = self._call(self._health(), timeout)
        except concurrent.futures.TimeoutError:
            problem = f"the worker pool did not answer within {timeout:.0f} s"
        except Exception as e:
            problem = f"the worker pool did not answer: {e}"
        self._health_seen = (time.monotonic(), problem)
        return problem

    async def _health(self) -> str | None:
        if self._ping_task is not None and self._ping_task.done():
            return "the heartbeat task has stopped"
        limit = self._settings.workers.heartbeat_timeout_sec * 4 / 3 + 1.0  # the pinger's period of grace
        now = time.monotonic()
        stale = sorted(k for k, w in self._workers.items() if w.state == "running" and now - w.last_pong > limit)
        if stale:
            return f"worker(s) {', '.join(map(str, stale))} silent for over {limit:.0f} s"
        return None

    def worker_pids(self) -> list[tuple[int, int]]:
        """(index, pid) of every worker process that runs now."""
        return [(w.index, w.pid) for w in list(self._workers.values()) if w.pid is not None and w.state != "gone"]

    def mark_stopping(self) -> None:
        """The agent is stopping (safe in a signal handler): workers exiting from now on are not replaced.

        Under systemd's default KillMode every process of the unit gets SIGTERM at
        once; a worker that exits before :meth:`stop` runs must not look like a crash.
        """
        self._stopping = True

    def stop(self, timeout: float = 5.0) -> None:
        """Every worker unregisters within ``timeout`` and exits (stragglers are killed); safe twice."""
        t = self._thread
        if t is None or not t.is_alive():
            return
        try:
            self._call(self._stop(timeout), timeout + 10)
        except Exception as e:
            self._log.error("workers_stop_failed", error=repr(e))
        self._loop.call_soon_threadsafe(self._loop.stop)
        t.join(5)
        if not t.is_alive():
            self._loop.close()
        self._dns.shutdown(wait=False, cancel_futures=True)
        self._spawner.shutdown(wait=False, cancel_futures=True)

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if not self.alive:
            coro.close()
            fut: concurrent.futures.Future[T] = concurrent.futures.Future()
            fut.set_exception(EngineError("the agent is not running"))
            return fut
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return self._submit(coro).result(timeout)

    # -- start and stop (loop thread) ----------------------------------------------

    async def _start(self, connections: list[Connection]) -> None:
        self._starting_up = True
        try:
            await self._start_all(connections)
        finally:
            self._starting_up = False

    async def _start_all(self, connections: list[Connection]) -> None:
        now = time.time()
        placed: list[tuple[_Worker, Connection]] = []
        for conn in connections:
            cid = conn.connection_id
            if not conn.registers:
                self._conns[cid] = _Placed(conn, snapshot=inactive_snapshot(conn, now))
                self._dirty.add(cid)
                continue
            w = self._place(cid)
            self._conns[cid] = _Placed(conn, worker=w.index, snapshot=pending_snapshot(conn, now))
            self._dirty.add(cid)
            placed.append((w, conn))
        for w, conn in placed:
            self._send_apply(w, conn, at_once=False)
        self._publish()
        errors = []
        for w in list(self._workers.values()):
            err = await self._until_started(w)
            if err is not None:
                errors.append(f"worker {w.index} (SIP port {self._settings.worker_sip_port(w.index)}): {err}")
        if errors:
            raise EngineError("; ".join(errors))
        self._ping_task = self._loop.create_task(self._pinger())
        self._track(self._loop.create_task(self._dns_refresher()))
        self._log.info(
            "workers_started",
            workers=len(self._workers),
            connections=sum(1 for p in self._conns.values() if p.worker is not None),
        )

    async def _until_started(self, w: _Worker) -> str | None:
        """Wait for worker ``w`` to start; None once it runs, else why it could not.

        Its ports may still be held for a few seconds by workers of a supervisor
        that was just killed (they unregister, then exit): a start refused with
        "Address already in use" is tried again for up to BIND_RETRY_SEC.
        """
        give_up = time.monotonic() + BIND_RETRY_SEC
        while True:
            assert w.ready is not None
            try:
                err = await asyncio.wait_for(asyncio.shield(w.ready), START_TIMEOUT_SEC)
            except TimeoutError:
                return f"no answer within {START_TIMEOUT_SEC:.0f} s"
            if err is None or "already in use" not in err or time.monotonic() >= give_up:
                return err
            while w.state != "down":
                await asyncio.sleep(0.05)  # the failed process exits first
            w.log.info("worker_start_retry", reason=err, retry_in_sec=0.5)
            await asyncio.sleep(0.5)
            self._launch(w)
            for cid in sorted(w.conns):
                p = self._conns.get(cid)
                if p is not None:
                    self._send_apply(w, p.conn, at_once=False)

    async def _stop(self, timeout: float) -> None:
        self._stopping = True
        if self._ping_task is not None:
            self._ping_task.cancel()
        for w in self._workers.values():
            if w.restart_handle is not None:
                w.restart_handle.cancel()
            if w.state in ("starting", "running", "retiring"):
                self._send(w, m.Shutdown(timeout, reason="the agent is stopping"))
        deadline = time.monotonic() + timeout + 2.0
        while time.monotonic() < deadline and any(
            w.state != "gone" and (w.proc or w.spawning) for w in self._workers.values()
        ):
            await asyncio.sleep(0.02)
        for w in self._workers.values():
            if w.state != "gone" and w.proc is not None:
                self._log.warning("worker_killed", worker=w.index, reason="did not stop within the deadline")
                w.proc.kill()
        end = time.monotonic() + 3.0
        while time.monotonic() < end and any(w.state != "gone" and w.proc for w in self._workers.values()):
            await asyncio.sleep(0.02)
        try:
            self._launcher.close()
        except Exception as e:
            self._log.warning("launcher_close_failed", error=repr(e))
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._loop.shutdown_default_executor()

    # -- placement -----------------------------------------------------------------

    def _placed_count(self) -> int:
        return sum(1 for p in self._conns.values() if p.worker is not None)

    def _place(self, cid: str) -> _Worker:
        per = self._settings.workers.connections_per_worker
        for k in sorted(self._workers):
            w = self._workers[k]
            if w.state in ("starting", "running") and len(w.conns) < per:
                w.conns.add(cid)
                self._metrics.worker_connections.labels(worker=str(k)).set(len(w.conns))
                return w
        k = next(i for i in itertools.count() if i not in self._workers)
        if k >= self._settings.max_workers:
            raise ConnectionLimitError(
                f"all {self._settings.max_workers} workers (workers.max_workers) are full or being replaced"
            )
        w = self._new_worker(k)
        w.conns.add(cid)
        self._metrics.worker_connections.labels(worker=str(k)).set(len(w.conns))
        return w

    def _unplace(self, w: _Worker, cid: str) -> None:
        w.conns.discard(cid)
        self._metrics.worker_connections.labels(worker=str(w.index)).set(len(w.conns))
        self._maybe_retire(w)

    def _maybe_retire(self, w: _Worker) -> None:
        """Stop a worker left with no connection, once no request is in progress on it."""
        if w.conns or w.pending or w.state not in ("starting", "running"):
            return
        w.state = "retiring"
        w.log.info("worker_retiring", reason="no connection left")
        self._send(w, m.Shutdown(self._settings.shutdown_timeout_sec, reason="no connection left"))

    # -- workers -------------------------------------------------------------------

    def _new_worker(self, k: int) -> _Worker:
        w = _Worker(index=k, log=self._log.bind(worker=k))
        self._workers[k] = w
        self._launch(w)
        return w

    def _launch(self, w: _Worker) -> None:
        """Start (or restart) worker ``w``'s process; ``w.ready`` resolves when it answers Start."""
        w.state = "starting"
        w.ready = self._loop.create_future()
        w.pid = None
        w.generation += 1
        w.started_at = time.monotonic()
        w.last_pong = w.started_at
        s = self._settings
        k = w.index
        stack = m.StackSettings(
            bind="127.0.0.1",
            port=s.worker_sip_port(k),
            edge_route=f"sip:127.0.0.1:{s.edge.loopback_port};lr",
            user_agent=s.sip.user_agent,
            log_level=s.sip.stack_log_level,
            trace=s.sip.trace,
        )
        start = m.Start(worker=k, stack=stack, log_level=s.log.level, shutdown_timeout_sec=s.shutdown_timeout_sec)
        w.spawning = True  # commands sent meanwhile wait in its outbox
        self._track(self._loop.create_task(self._spawn(w, start)))

    async def _spawn(self, w: _Worker, start: m.Start) -> None:
        """Start ``w``'s process on the spawn thread, then talk to it."""
        try:
            proc = await self._loop.run_in_executor(self._spawner, self._launcher.launch, w.index)
        except Exception as e:
            w.spawning = False
            w.log.error("worker_launch_failed", error=str(e))
            await self._on_exit(w, None, f"could not be started: {e}")
            return
        w.spawning = False
        w.proc = proc
        w.pid = proc.pid
        proc.sock.setblocking(False)
        await self._serve(w, proc, start)

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, w: _Worker, proc: Launched, start: m.Start) -> None:
        """Talk to one worker process until its socket closes."""
        reader, writer = await asyncio.open_connection(sock=proc.sock)
        w.writer = writer
        queued, w.outbox = w.outbox, []
        writer.write(encode([start, *queued]))
        frames = FrameReader()
        why: str | None = None
        watchdog = self._loop.call_later(START_TIMEOUT_SEC, self._start_timeout, w, proc)
        try:
            while True:
                try:
                    chunk = await reader.read(256 * 1024)
                except OSError as e:
                    why = f"socket error: {e.strerror}"
                    break
                if not chunk:
                    break
                try:
                    events = frames.feed(chunk)
                except WireError as e:
                    why = f"sent a bad frame: {e}"
                    proc.kill()
                    break
                w.last_pong = time.monotonic()  # only the SIP thread sends: any frame shows it is alive
                for ev in events:
                    try:
                        self._on_event(w, ev)
                    except Exception as e:  # one bad event must never stop the pool
                        self._log.error(
                            "worker_event_failed", worker=w.index, event_type=type(ev).__name__, error=repr(e)
                        )
                self._publish()
        finally:
            watchdog.cancel()
            w.writer = None
            writer.close()
        await self._on_exit(w, proc, why)

    def _start_timeout(self, w: _Worker, proc: Launched) -> None:
        if w.proc is proc and w.state == "starting":
            w.log.error("worker_unresponsive", reason=f"no answer to Start within {START_TIMEOUT_SEC:.0f} s")
            proc.kill()

    async def _on_exit(self, w: _Worker, proc: Launched | None, why: str | None) -> None:
        status = None
        if proc is not None:
            if why is not None:
                proc.kill()
            status = await asyncio.to_thread(proc.wait, 5.0)
            if status is None:
                proc.kill()
                status = await asyncio.to_thread(proc.wait, 5.0)
            proc.sock.close()
        reason = why or describe_exit(status)
        was = w.state
        w.proc = None
        w.pid = None
        w.outbox.clear()
        for fut, _ in w.pending.values():
            if not fut.done():
                fut.set_exception(WorkerLostError(f"worker {w.index} stopped ({reason}) before it answered"))
        w.pending.clear()
        if w.ready is not None and not w.ready.done():
            w.ready.set_result(f"stopped before it was ready ({reason})")
        self._metrics.worker_up.labels(worker=str(w.index)).set(0)
        if was == "starting" and self._starting_up:
            w.state = "down"  # _until_started decides whether to try again
            return
        if was == "retiring" or self._stopping or not w.conns:
            w.state = "gone"
            w.log.info("worker_exited", status=describe_exit(status), reason=why)
            if not self._stopping and self._workers.get(w.index) is w:
                del self._workers[w.index]
                self._metrics.worker_up.remove(str(w.index))
                self._metrics.worker_connections.remove(str(w.index))
            self._refresh_worker_metrics()
            return
        # Died: its connections are not registered now; a replacement comes.
        lived = time.monotonic() - w.started_at
        w.quick_deaths = 1 if lived >= STABLE_AFTER_SEC else w.quick_deaths + 1
        delay = (
            0.0
            if w.quick_deaths <= 1
            else min(self._settings.workers.restart_delay_max_sec, 2.0 ** (w.quick_deaths - 2))
        )
        w.state = "down"
        text = f"worker {w.index} stopped ({reason}); restarting" + (f" in {delay:.0f} s" if delay else "")
        now = time.time()
        for cid in w.conns:
            p = self._conns.get(cid)
            if p is None:
                continue
            p.down = text
            p.snapshot = worker_down_snapshot(p.snapshot or pending_snapshot(p.conn, now), text, now)
            self._dirty.add(cid)
        w.log.error(
            "worker_died",
            reason=reason,
            lived_sec=round(lived, 3),
            connections=sorted(w.conns),
            restart_in_sec=delay,
            deaths_in_a_row=w.quick_deaths,
        )
        self._refresh_worker_metrics()
        self._publish()
        w.restart_handle = self._loop.call_later(delay, self._restart, w)

    def _restart(self, w: _Worker) -> None:
        w.restart_handle = None
        if self._stopping or self._workers.get(w.index) is not w or w.state != "down":
            return
        if not w.conns:
            del self._workers[w.index]
            return
        self._metrics.worker_restarts.labels(worker=str(w.index)).inc()
        w.log.info("worker_restarting", connections=len(w.conns))
        self._launch(w)
        for cid in sorted(w.conns):
            p = self._conns.get(cid)
            if p is None:
                continue
            self._send_apply(w, p.conn, at_once=True, unregister_after=p.held)

    def _refresh_worker_metrics(self) -> None:
        running = [w for w in self._workers.values() if w.state == "running"]
        self._metrics.workers.set(len(running))
        self._metrics.sip_thread_up.set(
            1 if all(w.state in ("running", "retiring", "gone") for w in self._workers.values()) else 0
        )

    async def _pinger(self) -> None:
        """Every heartbeat_timeout/3, ping each running worker that has sent nothing since the last
        round (any frame comes from its SIP thread); kill one silent past the heartbeat timeout.

        A round is spread over the period in at most PING_GROUPS small groups: the supervisor
        wakes a few times per round, not once per worker, and no burst of pings makes every
        worker compete for the CPU at once (the round trip stays a single command's wait).
        """
        timeout = self._settings.workers.heartbeat_timeout_sec
        period = timeout / 3
        while True:
            indices = sorted(self._workers)
            size = max(1, math.ceil(len(indices) / PING_GROUPS))
            groups = [indices[i : i + size] for i in range(0, len(indices), size)] or [[]]
            for group in groups:
                await asyncio.sleep(period / len(groups))
                now = time.monotonic()
                for k in group:
                    w = self._workers.get(k)
                    if w is None or w.state != "running" or w.proc is None:
                        continue
                    silent = now - w.last_pong
                    if silent > timeout:
                        w.log.error(
                            "worker_unresponsive", reason=f"its SIP thread answered no ping for {timeout:.0f} s"
                        )
                        w.proc.kill()
                        continue
                    if silent < 0.8 * period:
                        continue  # it spoke since the last round (states, logs): no ping needed
                    w.ping_seq += 1
                    w.ping_sent = now
                    self._send(w, m.Ping(w.ping_seq))

    # -- messages ------------------------------------------------------------------

    def _send(self, w: _Worker, *msgs: m.Command) -> bool:
        """Send to ``w`` (queued while its process starts); False when it cannot be reached."""
        if w.writer is None:
            if w.state == "starting" and (w.proc is not None or w.spawning):
                w.outbox.extend(msgs)
                return True
            return False
        if w.writer.is_closing():
            return False
        w.writer.write(encode(msgs))
        return True

    def _request(self, w: _Worker, make: Callable[[int], m.Command], cid: str | None) -> asyncio.Future[m.Done]:
        request = next(self._requests)
        fut: asyncio.Future[m.Done] = self._loop.create_future()
        if self._send(w, make(request)):
            w.pending[request] = (fut, cid)
        else:
            fut.set_exception(WorkerLostError(f"worker {w.index} cannot be reached (it is {w.state})"))
        return fut

    def _send_apply(
        self, w: _Worker, conn: Connection, at_once: bool, unregister_after: bool = False
    ) -> asyncio.Future[m.Done]:
        """Apply ``conn`` on ``w`` once its host names are looked up (start-up, restart)."""
        cid = conn.connection_id
        generation = w.generation

        async def send() -> m.Done:
            spec, expires = await self._spec(conn, at_once)
            p = self._conns.get(cid)
            if p is not None and p.conn == conn:
                p.spec, p.dns_expires = spec, expires
                await self._to_edge(conn)
            if w.generation != generation:
                raise asyncio.CancelledError  # replaced meanwhile: the replacement is sent its own
            fut = self._request(w, lambda r: m.Apply(r, spec), cid)
            if unregister_after:
                self._request(w, functools.partial(m.UnregisterNow, connection_id=cid), cid)
            return await fut

        task = self._loop.create_task(send())
        task.add_done_callback(functools.partial(self._start_apply_done, cid=cid))
        return task

    async def _spec(self, conn: Connection, at_once: bool) -> tuple[m.ConnSpec, float | None]:
        """What the worker runs for ``conn``, its host names looked up in a DNS thread; and when to
        look them up again (None: no host name). The edge gets the connection's record first."""
        if needs_lookup(conn, self._settings.sip):
            built = await self._loop.run_in_executor(self._dns, self._build_spec, conn, at_once)
        else:
            built = self._build_spec(conn, at_once)
        spec, record, tls, expires = built
        self._built[conn.connection_id] = (record, tls)
        p = self._conns.get(conn.connection_id)
        printed = self._prints.pop(conn.connection_id, None)
        if p is not None and p.conn == conn and printed is not None:
            p.dns_print = printed
        hop = spec.hop
        if hop is not None and hop.error:
            self._log.warning("dns_failed", connection_id=conn.connection_id, name=hop.name, error=hop.error)
        elif hop is not None:
            self._log.debug(
                "dns_resolved", connection_id=conn.connection_id, name=hop.name, targets=[t.label for t in hop.targets]
            )
        return spec, expires

    async def _to_edge(self, conn: Connection) -> None:
        """Hand the edge the record built last for ``conn`` (by _spec), before its worker gets it;
        its TLS targets are routed by the edge before this returns (at most EDGE_TLS_WAIT_SEC)."""
        built = self._built.pop(conn.connection_id, None)
        if built is None:
            return
        record, tls = built
        p = self._conns.get(conn.connection_id)
        if p is not None:
            p.record = record
        if self._edge is not None:
            told = [self._edge.put_tls(target) for target in self._tls_ports(conn, tls)]
            self._edge.put(record)
            if told:
                await asyncio.wait([asyncio.wrap_future(f) for f in told], timeout=EDGE_TLS_WAIT_SEC)

    def _edge_undo(self, cid: str) -> None:
        """The edge goes back to the connection's committed record (or forgets it)."""
        if self._edge is None:
            return
        p = self._conns.get(cid)
        if p is not None and p.worker is not None and p.record is not None:
            self._edge.put(p.record)
        else:
            self._edge.remove(cid)

    def _tls_ports(self, conn: Connection, hops: tuple[m.Hop | None, ...]) -> list[TlsTarget]:
        first, count = self._settings.tls_target_ports
        try:
            return tls_targets(hops, first, self._tls_slots, count)
        except ValueError as e:
            self._log.error("tls_target_refused", connection_id=conn.connection_id, error=str(e))
            return []

    def _build_spec(
        self, conn: Connection, at_once: bool
    ) -> tuple[m.ConnSpec, EdgeConnection, tuple[m.Hop | None, ...], float | None]:
        """(spec, the edge's record, the hops that may be TLS, when to look again); blocks on DNS
        when a host is a name (DNS thread only then)."""
        account, record = self._records.both(conn)
        spec = m.ConnSpec(
            connection_id=conn.connection_id,
            account=account,
            policy=self._settings.policy_settings(conn),
            register_at_once=at_once,
        )
        literal = self._records.literal_hops(conn)
        if not needs_lookup(conn, self._settings.sip):
            return spec, record, literal, None
        hops = self._hops.hops(conn)
        self._prints[conn.connection_id] = hops.fingerprint  # read on the loop thread once _spec returns
        record = replace(
            record,
            targets=tuple(t.uri for t in hops.destination.targets) if hops.destination else record.targets,
            target_labels=tuple((t.uri, t.label) for t in hops.destination.targets) if hops.destination else (),
            sources=self._records.sources(conn, hops.pbx_addresses),
        )
        return (
            replace(spec, hop=hops.registration),
            record,
            (*literal, hops.registration, hops.destination),
            hops.expires_at,
        )

    async def _dns_refresher(self) -> None:
        """Look connections' host names up again when their answers expire (in the DNS threads, all
        due connections in one job: the resolver's cache makes a shared host one lookup); a
        connection whose targets changed gets an Apply whose account is unchanged (no REGISTER,
        the new targets from its next request on)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            due = [
                (cid, p.conn)
                for cid, p in self._conns.items()
                if p.worker is not None and p.dns_expires is not None and p.dns_expires <= now
            ]
            if not due:
                continue
            try:
                looked = await self._loop.run_in_executor(self._dns, self._look_again, due)
            except Exception as e:  # the next pass tries again
                self._log.warning("dns_refresh_failed", error=repr(e))
                continue
            for cid, conn, printed, expires in looked:
                p = self._conns.get(cid)
                if p is None or p.conn != conn:
                    continue
                p.dns_expires = expires
                if printed != p.dns_print and cid not in self._refreshing:
                    self._refreshing.add(cid)
                    self._track(self._loop.create_task(self._send_new_hops(cid, conn)))

    def _look_again(self, due: list[tuple[str, Connection]]) -> list[tuple[str, Connection, tuple[object, ...], float]]:
        out = []
        for cid, conn in due:
            hops = self._hops.hops(conn)
            out.append((cid, conn, hops.fingerprint, hops.expires_at))
        return out

    async def _send_new_hops(self, cid: str, conn: Connection) -> None:
        try:
            spec, _ = await self._spec(conn, at_once=False)
            p = self._conns.get(cid)
            if p is None or p.conn != conn or p.worker is None:
                return
            w = self._workers.get(p.worker)
            if w is None or w.state != "running":
                return
            self._log.info(
                "dns_changed",
                connection_id=cid,
                name=spec.hop.name if spec.hop else None,
                targets=[t.label for t in spec.hop.targets] if spec.hop else None,
                error=spec.hop.error if spec.hop else None,
            )
            p.spec = spec
            await self._to_edge(conn)
            done = await self._request(w, lambda r: m.Apply(r, spec), cid)
            if done.error_kind is not None:
                self._log.warning("dns_change_not_applied", connection_id=cid, error=done.error)
        except Exception as e:  # the next expiry tries again
            self._log.warning("dns_refresh_failed", connection_id=cid, error=repr(e))
        finally:
            self._refreshing.discard(cid)

    def _flow_closed(self, address: str, port: int) -> None:
        for key, slot in self._tls_slots.items():  # a TLS flow: the edge's connection to HAProxy's port
            first = self._settings.tls_target_ports[0]
            if address == "127.0.0.1" and port == first + slot:
                host, _, p = key.rpartition(":")
                address, port = host.strip("[]"), int(p)
                break
        for w in self._workers.values():
            if w.state != "running":
                continue
            if any(
                (pl := self._conns.get(cid)) is not None
                and pl.conn.external_uac_settings is not None
                and pl.conn.external_uac_settings.transport in ("TCP", "TLS")
                for cid in w.conns
            ):
                self._send(w, m.FlowClosed(address, port))

    def _set_reachable(self, cid: str, reachable: bool | None) -> None:
        if self._reachable.get(cid) == reachable:
            return
        values = dict(self._reachable)
        values[cid] = reachable
        self._reachable = values
        if cid in self._conns:
            self._dirty.add(cid)
            self._publish()

    def _set_calls(self, counts: dict[str, int]) -> None:
        self._calls = {**self._calls, **counts}
        changed = [cid for cid in counts if cid in self._conns]
        if changed:
            self._dirty.update(changed)
            self._publish()

    def _start_apply_done(self, fut: asyncio.Future[m.Done], cid: str) -> None:
        """A failure of an Apply nobody awaits (start-up, restart) is logged and shown."""
        if fut.cancelled():
            return
        exc = fut.exception()
        done = None if exc is not None else fut.result()
        if done is not None and done.error_kind is None:
            return
        p = self._conns.get(cid)
        error = str(exc) if exc is not None else (done.error if done is not None else "")
        if p is not None and done is not None:
            self._log.error("connection_start_failed", connection_id=cid, error=error)
            p.snapshot = worker_down_snapshot(
                p.snapshot or pending_snapshot(p.conn, time.time()), f"not started: {error}", time.time()
            )
            self._dirty.add(cid)
            self._publish()

    def _on_event(self, w: _Worker, ev: object) -> None:
        if isinstance(ev, m.StateChanged):
            p = self._conns.get(ev.connection_id)
            if p is not None and p.worker == w.index:
                p.snapshot = ev.snapshot
                p.down = None
                self._dirty.add(ev.connection_id)
        elif isinstance(ev, m.Log):
            getattr(w.log, ev.level, w.log.info)(ev.event, **ev.fields)
        elif isinstance(ev, m.RegisterAnswered):
            self._metrics.observe_response(ev.connection_id, ev.code, ev.duration)
        elif isinstance(ev, m.Failover):
            self._metrics.failovers.labels(connection_id=ev.connection_id, kind=ev.kind).inc()
        elif isinstance(ev, m.Done):
            entry = w.pending.pop(ev.request, None)
            if entry is not None and not entry[0].done():
                entry[0].set_result(ev)
            self._maybe_retire(w)
        elif isinstance(ev, m.Pong):
            if ev.seq == w.ping_seq and w.ping_sent:
                self._metrics.worker_heartbeat.observe(time.monotonic() - w.ping_sent)
        elif isinstance(ev, m.FlowLost):
            self._metrics.flows_lost.labels(transport=ev.transport).inc()
        elif isinstance(ev, m.Ready):
            w.state = "running" if w.state == "starting" else w.state
            w.pid = ev.pid
            w.last_pong = time.monotonic()
            if w.ready is not None and not w.ready.done():
                w.ready.set_result(None)
            self._metrics.worker_up.labels(worker=str(w.index)).set(1)
            self._metrics.worker_restarts.labels(worker=str(w.index))  # 0 until its first restart
            self._refresh_worker_metrics()
            for cid in w.conns:
                self._dirty.add(cid)  # their worker_pid
        elif isinstance(ev, m.StartFailed):
            w.log.error("worker_start_failed", error=ev.error)
            if w.ready is not None and not w.ready.done():
                w.ready.set_result(ev.error)
        elif isinstance(ev, m.Stopped):
            if ev.unfinished:
                w.log.warning("worker_stopped_with_bindings", still_registered=list(ev.unfinished))
        else:
            w.log.warning("worker_event_unknown", event_type=type(ev).__name__)

    def _publish(self) -> None:
        """Rebuild the statuses of the connections that changed, then swap the mapping."""
        if not self._dirty:
            return
        statuses = dict(self._statuses)
        for cid in self._dirty:
            p = self._conns.get(cid)
            if p is None:
                statuses.pop(cid, None)
                self._metrics.forget(cid)
                continue
            snap = p.snapshot or (pending_snapshot(p.conn, time.time()) if p.worker is not None else None)
            if snap is None:
                snap = inactive_snapshot(p.conn, time.time())
            w = self._workers.get(p.worker) if p.worker is not None else None
            st = build_status(
                p.conn,
                snap,
                p.worker,
                w.pid if w is not None else None,
                self._calls.get(cid, 0),
                self._reachable.get(cid),
            )
            if p.down is not None:
                st = replace(st, state="WORKER_DOWN")
            statuses[cid] = st
            self._metrics.publish(st)
            self._metrics.place(cid, p.worker)
        self._dirty.clear()
        self._statuses = statuses

    # -- changes (loop thread) -------------------------------------------------------

    def _check(self, done: m.Done) -> str:
        if done.error_kind is None:
            return done.result or ""
        text = done.error or done.error_kind
        if done.error_kind == "limit":
            raise ConnectionLimitError(text)
        if done.error_kind == "unknown":
            raise UnknownConnectionError(text)
        if done.error_kind == "not_registering":
            raise NotRegisteringError(text)
        if done.error_kind in ("stopping", "failed"):
            raise EngineError(text)
        raise StackRejectedError(text)

    def _limit_check(self, cid: str) -> None:
        limit = self._settings.workers.max_connections
        placed = self._placed_count()
        if placed >= limit:
            raise ConnectionLimitError(
                f"this agent already runs {placed} registering connections, its limit (workers.max_connections = "
                f"{limit}): delete or deactivate one (active: false), or raise workers.max_connections"
            )

    async def _apply(self, conn: Connection) -> str:
        if self._stopping:
            raise EngineError("the agent is stopping")
        cid = conn.connection_id
        p = self._conns.get(cid)
        now = time.time()
        if p is None or p.worker is None:
            if not conn.registers:
                self._conns[cid] = _Placed(conn, snapshot=inactive_snapshot(conn, now))
                self._dirty.add(cid)
                self._publish()
                return "added" if p is None else "updated"
            self._limit_check(cid)
            w = self._place(cid)
            old = p
            self._conns[cid] = _Placed(conn, worker=w.index, snapshot=pending_snapshot(conn, now))
            self._dirty.add(cid)
            self._publish()
            try:
                spec, expires = await self._spec(conn, at_once=True)
                placed = self._conns.get(cid)
                if placed is not None:
                    placed.spec, placed.dns_expires = spec, expires
                await self._to_edge(conn)
                done = await self._request(w, lambda r: m.Apply(r, spec), cid)
                result = self._check(done)
            except BaseException:
                if self._conns.get(cid) is not None and self._conns[cid].worker == w.index:
                    if old is None:
                        del self._conns[cid]
                    else:
                        self._conns[cid] = old
                    self._dirty.add(cid)
                self._unplace(w, cid)
                self._edge_undo(cid)
                self._publish()
                raise
            return result if old is None else "replaced"
        w = self._workers[p.worker]
        if w.state == "down":  # committed now; the replacement applies it
            if conn.registers:
                p.conn = conn
            else:
                self._unplace(w, cid)
                self._conns[cid] = _Placed(conn, snapshot=inactive_snapshot(conn, now))
                self._edge_undo(cid)
            self._dirty.add(cid)
            self._publish()
            return "updated"
        if not conn.registers:  # deactivated: unregister, leave the worker
            done = await self._request(w, lambda r: m.Remove(r, cid), cid)
            self._check(done)
            self._unplace(w, cid)
            self._conns[cid] = _Placed(conn, snapshot=inactive_snapshot(conn, time.time()))
            self._edge_undo(cid)
            self._dirty.add(cid)
            self._publish()
            return "replaced"
        spec, expires = await self._spec(conn, at_once=True)
        committed = p.record
        await self._to_edge(conn)
        new_record, p.record = p.record, committed  # the new one counts once the worker confirms
        try:
            done = await self._request(w, lambda r: m.Apply(r, spec), cid)
            result = self._check(done)
        except BaseException:
            self._edge_undo(cid)
            raise
        p.conn = conn
        p.spec, p.dns_expires = spec, expires
        p.record = new_record
        p.held = False if result == "replaced" else p.held
        self._dirty.add(cid)
        self._publish()
        return result

    async def _remove(self, cid: str) -> bool:
        if self._stopping:
            raise EngineError("the agent is stopping")
        p = self._conns.get(cid)
        if p is None:
            raise UnknownConnectionError(f"no connection {cid}")
        if p.worker is not None:
            w = self._workers[p.worker]
            if w.state != "down":
                done = await self._request(w, lambda r: m.Remove(r, cid), cid)
                if done.error_kind not in (None, "unknown"):
                    self._check(done)
            self._unplace(w, cid)
        del self._conns[cid]
        self._edge_undo(cid)
        self._dirty.add(cid)
        self._publish()
        return True

    async def _action(self, cid: str, register: bool) -> str:
        if self._stopping:
            raise EngineError("the agent is stopping")
        p = self._conns.get(cid)
        if p is None:
            raise UnknownConnectionError(f"no connection {cid}")
        if p.worker is None:
            raise NotRegisteringError(f"connection {cid} keeps no registration (inactive or no settings)")
        w = self._workers[p.worker]
        if w.state not in ("running", "starting"):
            raise EngineError(f"worker {w.index}, which holds connection {cid}, is being replaced: try again shortly")
        if register:
            done = await self._request(w, lambda r: m.RegisterNow(r, cid), cid)
        else:
            done = await self._request(w, lambda r: m.UnregisterNow(r, cid), cid)
        result = self._check(done)
        p.held = not register
        return result
