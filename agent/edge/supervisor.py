"""The SIP edge as the supervisor runs it: Kamailio, rtpengine and HAProxy as its children.

Rules
-----
* Each engine is a child process in a session of its own, configured only from the
  agent's settings (configs rendered into the runtime directory; nothing in /etc is read
  or written), its output read line by line into the agent's log. Its lifecycle is
  :class:`~agent.edge.lifecycle.EngineLifecycle`: one that dies is started again at once
  (then with a growing delay if it keeps dying), counted in
  ``uac_agent_edge_restarts_total{process}``; ``uac_agent_edge_up{process}`` says which run.
* What Kamailio routes by is data (:mod:`agent.edge.messages`): the supervisor keeps the
  whole of it here and hands every change over RPC at once, and all of it to a Kamailio
  that (re)started, before Kamailio takes calls (``state=>ready``). A change touches one
  record: no restart, no other connection's call.
* Kamailio's events are read from its event stream into :class:`~agent.edge.calls.CallBook`
  (metrics, log lines); a closed TCP flow goes to ``on_flow_closed``.
* The keeper (``agent/edge/keeper.py``) ends every engine a few seconds after the
  supervisor is gone, whatever killed it, once the workers have unregistered through
  the edge.
* Everything here runs on the edge's own event loop thread; other threads use the public
  methods, which hand the work over and never wait for an engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.core.clock import SystemClock
from agent.edge import haproxy, kamailio, rtpengine
from agent.edge.calls import CallBook
from agent.edge.control import ControlError, EventStream, HaproxyApi, KamailioRpc, rtpengine_ping
from agent.edge.layout import LOOPBACK, EdgeLayout
from agent.edge.lifecycle import EngineLifecycle, EngineState, Move
from agent.edge.messages import (
    EdgeConnection,
    EdgeEventError,
    TcpClosed,
    TcpPending,
    TlsFailure,
    TlsPending,
    TlsTarget,
    parse_tls_failure,
)
from agent.edge.probes import DestinationHealth, dispatcher_list, parse_dispatcher_list, probe_uris
from agent.metrics import Metrics

__all__ = ["Edge", "EdgeError", "EdgePlan"]

T = TypeVar("T")
K = TypeVar("K", int, tuple[str, int])

READY_TIMEOUT_SEC = 15.0
STOP_TIMEOUT_SEC = 3.0
# After the supervisor is gone, the keeper waits this long (the workers unregister within 2.5 s).
KEEPER_GRACE_SEC = 3.0
# Engine output lines logged per second at most (a burst of twice that), the rest counted.
LOG_LINES_PER_SEC = 50.0
DROPPED_TOLD_SEC = 1.0  # lines dropped are told (and counted) at most once a second
_CHILD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
_KAMAILIO_LEVEL = re.compile(r"^\s*-?\d+\((\d+)\) (\w+):")


# How often a running engine's main process is checked for its exit.
EXIT_POLL_SEC = 0.1
# calls-in-progress counts reach the pool (status, `uac-agent status`) at most this often: one
# hand-over per interval, however many calls start and end in it
ACTIVE_PUBLISH_SEC = 0.1

# A worker's request waits on a TLS target or a TCP connection to a PBX at most this long (its
# transaction's timer is 34 s); at most MAX_PENDING are remembered per target.
PENDING_SEC = 40.0
MAX_PENDING = 10_000


class EdgeError(Exception):
    """The edge could not start; the message says which engine and why."""


@dataclass(frozen=True)
class EdgePlan:
    """Everything the engines are started with (built once by the supervisor, agent/supervisor/edge.py)."""

    layout: EdgeLayout
    kamailio: kamailio.KamailioOptions
    shm_mib: int
    haproxy: haproxy.HaproxyOptions
    media_interfaces: Mapping[str, str]
    max_sessions: int
    media_max_cpu_percent: float
    rtpengine_log_level: int
    hep: tuple[str, int] | None = None
    hep_id: int = 2001
    remove_runtime_dir: bool = False  # a temporary one of our own: removed on stop


@dataclass
class _Engine:
    name: str
    life: EngineLifecycle
    argv: list[str]
    ready: Callable[[], Awaitable[None]]
    on_up: Callable[[], Awaitable[None]] | None = None
    proc: asyncio.subprocess.Process | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    up_once: asyncio.Event = field(default_factory=asyncio.Event)
    tokens: float = 2 * LOG_LINES_PER_SEC
    refilled: float = 0.0
    dropped: int = 0
    dropped_told: float = 0.0  # when edge_log_dropped was last logged


class Edge:
    def __init__(
        self,
        plan: EdgePlan,
        metrics: Metrics,
        logger: Any,
        on_flow_closed: Callable[[str, int], None] | None = None,
        on_active: Callable[[Mapping[str, int]], None] | None = None,
        on_destination: Callable[[str, bool | None], None] | None = None,
    ) -> None:
        self._plan = plan
        self._lay = plan.layout
        self._metrics = metrics
        self._log = logger.bind(component="edge")
        self._on_flow_closed = on_flow_closed
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._engines: dict[str, _Engine] = {}
        self._records: dict[str, EdgeConnection] = {}
        self._tls: dict[str, TlsTarget] = {}  # by key "IP:PORT"
        self._changes: asyncio.Queue[tuple[str, object]] | None = None
        self._rpc = KamailioRpc(self._lay.kamailio_rpc, self._lay.runtime_dir / "supervisor-rpc.sock")
        self._haproxy_api = HaproxyApi(self._lay.haproxy_api)
        self._stopping = False
        self._tasks: set[asyncio.Future[Any]] = set()
        self._keeper: subprocess.Popen[bytes] | None = None
        self._on_active = on_active
        self._active_pending: dict[str, int] = {}
        self.calls = CallBook(metrics, self._log, self._active_changed, self._target_label)
        # workers' requests waiting on a TLS target, by its loopback port: (Call-ID, CSeq) -> when
        self._tls_pending: dict[int, dict[tuple[str, str], float]] = {}
        # ... and on a PBX over TCP, by its address and port
        self._tcp_pending: dict[tuple[str, int], dict[tuple[str, str], float]] = {}
        self._tls_waiters: dict[str, list[concurrent.futures.Future[None]]] = {}  # put_tls's, by key
        self._clock = SystemClock()
        ping = plan.kamailio.destination_ping_sec
        # a new target has two pings (and their timeouts) to answer before its silence counts
        self.destinations = DestinationHealth(
            grace_sec=kamailio.PING_MISSES * (ping + kamailio.PING_TIMEOUT_MS / 1000) + ping
        )
        self._on_destination = on_destination
        self._reachable: dict[str, bool | None] = {}  # what was told (absent: unknown)
        self._probe: dict[str, tuple[str, ...]] = {}  # each record's targets to ping

    def _target_label(self, connection_id: str, uri: str) -> str:
        rec = self._records.get(connection_id)
        return uri if rec is None else rec.label_of(uri)

    # -- other threads -------------------------------------------------------------

    def start(self, timeout: float = READY_TIMEOUT_SEC) -> None:
        """Write the configs, start every engine and return once all answer; EdgeError otherwise."""
        if self._thread is not None:
            raise EdgeError("already started")
        self._write_configs()
        self._keeper = subprocess.Popen(
            [sys.executable, "-m", "agent.edge.keeper", str(KEEPER_GRACE_SEC)],
            stdin=subprocess.PIPE,
            env={**_CHILD_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
            start_new_session=True,
        )
        self._thread = threading.Thread(target=self._loop.run_forever, name="edge", daemon=True)
        self._thread.start()
        try:
            self._call(self._start(), timeout + 2)
        except concurrent.futures.TimeoutError:
            self.stop()
            raise EdgeError(f"the edge did not start within {timeout:.0f} s: {self._waiting_for()}") from None
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = STOP_TIMEOUT_SEC) -> None:
        """Stop every engine (SIGTERM, SIGKILL after ``timeout``); safe twice."""
        t = self._thread
        if t is not None and t.is_alive():
            try:
                self._call(self._stop(timeout), timeout + 5)
            except Exception as e:
                self._log.error("edge_stop_failed", error=repr(e))
            self._loop.call_soon_threadsafe(self._loop.stop)
            t.join(5)
            if not t.is_alive():
                self._loop.close()
        keeper, self._keeper = self._keeper, None
        if keeper is not None and keeper.stdin is not None:
            keeper.stdin.close()  # nothing left for it to end
            try:
                keeper.wait(2)
            except subprocess.TimeoutExpired:
                keeper.kill()
        if self._plan.remove_runtime_dir:  # rendered configs, sockets, the TLS key: none outlive us
            shutil.rmtree(self._plan.layout.runtime_dir, ignore_errors=True)

    def put(self, rec: EdgeConnection) -> None:
        self._soon(self._put, rec)

    def remove(self, line: str) -> None:
        self._soon(self._remove, line)

    def put_tls(self, target: TlsTarget) -> concurrent.futures.Future[None]:
        """Done once Kamailio and HAProxy route to ``target`` (or could not be told): a worker's
        first REGISTER to it must not leave before."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self._loop.is_closed():
            done.set_result(None)
        else:
            self._loop.call_soon_threadsafe(self._put_tls, target, done)
        return done

    def health(self) -> str | None:
        """None while every engine runs; else which do not."""
        down = [e.name for e in list(self._engines.values()) if e.life.state is not EngineState.UP]
        return f"edge process(es) not running: {', '.join(down)}" if down else None

    def pids(self) -> list[tuple[str, int]]:
        return [(e.name, e.proc.pid) for e in list(self._engines.values()) if e.proc is not None]

    def _soon(self, fn: Callable[[T], None], arg: T) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, arg)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _waiting_for(self) -> str:
        parts = []
        for e in self._engines.values():
            if e.life.state is not EngineState.UP:
                last = " | ".join(list(e.tail)[-3:])
                parts.append(f"{e.name} ({e.life.state.value}{': ' + last if last else ''})")
        return "; ".join(parts) or "nothing"

    # -- configs -------------------------------------------------------------------

    def _write_configs(self) -> None:
        lay, plan = self._lay, self._plan
        lay.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (lay.runtime_dir / "kamailio.cfg").write_text(kamailio.render(lay, plan.kamailio))
        (lay.runtime_dir / "haproxy.cfg").write_text(haproxy.render(lay, plan.haproxy))
        self._write_tls_maps(self._tls_maps())  # none from an earlier run
        self._write_dispatcher_list(self.destinations.targets)

    # -- the loop thread -----------------------------------------------------------

    async def _start(self) -> None:
        self._changes = asyncio.Queue()
        lay, plan = self._lay, self._plan
        self._engines = {
            "rtpengine": _Engine(
                "rtpengine",
                EngineLifecycle("rtpengine", self._clock),
                rtpengine.argv(
                    lay,
                    plan.media_interfaces,
                    plan.max_sessions,
                    plan.media_max_cpu_percent,
                    plan.rtpengine_log_level,
                    plan.hep,
                    plan.hep_id,
                ),
                lambda: rtpengine_ping(LOOPBACK, lay.rtpengine_port, timeout=0.5),
            ),
            "haproxy": _Engine(
                "haproxy",
                EngineLifecycle("haproxy", self._clock),
                haproxy.argv(lay.runtime_dir / "haproxy.cfg"),
                self._haproxy_ready,
                self._haproxy_up,
            ),
            "kamailio": _Engine(
                "kamailio",
                EngineLifecycle("kamailio", self._clock),
                kamailio.argv(lay.runtime_dir / "kamailio.cfg", lay.runtime_dir, plan.shm_mib),
                self._kamailio_ready,
                self._kamailio_up,
            ),
        }
        # rtpengine first: Kamailio's processes ping it as they start, and a ping that finds
        # nobody leaves an ICMP error on that process's socket that fails its next command.
        media = self._engines["rtpengine"]
        self._track(self._loop.create_task(self._supervise(media)))
        await media.up_once.wait()
        for e in self._engines.values():
            if e is not media:
                self._track(self._loop.create_task(self._supervise(e)))
        self._track(self._loop.create_task(self._push_changes()))
        self._track(self._loop.create_task(self._read_events()))
        if plan.kamailio.destination_ping_sec > 0:
            self._track(self._loop.create_task(self._poll_destinations()))
        await asyncio.gather(*(e.up_once.wait() for e in self._engines.values()))
        self._log.info(
            "edge_started", processes={e.name: e.proc.pid if e.proc else None for e in self._engines.values()}
        )

    async def _stop(self, timeout: float) -> None:
        self._stopping = True
        for e in self._engines.values():
            e.life.move(Move.STOP)
            self._signal(e, signal.SIGTERM)
        end = time.monotonic() + timeout
        while time.monotonic() < end and any(e.proc and e.proc.returncode is None for e in self._engines.values()):
            await asyncio.sleep(0.02)
        for e in self._engines.values():
            if e.proc is not None and e.proc.returncode is None:
                self._log.warning("edge_process_killed", process=e.name, reason="did not stop in time")
            self._signal(e, signal.SIGKILL)
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._rpc.close()

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _signal(self, e: _Engine, sig: signal.Signals) -> None:
        """``sig`` to the engine's whole process group (Kamailio's children too)."""
        if e.proc is None:
            return
        try:
            os.killpg(e.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _keep(self, word: str, pgid: int) -> None:
        k = self._keeper
        if k is None or k.stdin is None:
            return
        try:
            os.write(k.stdin.fileno(), f"{word} {pgid}\n".encode())
        except OSError:
            pass

    async def _supervise(self, e: _Engine) -> None:
        while not self._stopping:
            e.life.move(Move.START)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *e.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=_CHILD_ENV,
                    cwd=str(self._lay.runtime_dir),
                    start_new_session=True,
                    limit=1 << 16,
                )
            except OSError as err:
                e.tail.append(f"cannot start: {err}")
                self._log.error("edge_process_failed", process=e.name, error=str(err))
                e.life.move(Move.EXITED)
                await asyncio.sleep(max(1.0, e.life.restart_delay))
                continue
            e.proc = proc
            self._keep("pgid", proc.pid)
            relay = self._loop.create_task(self._relay(e, proc))
            await self._until_ready(e, proc)
            code = await _exited(proc)
            await asyncio.wait({relay}, timeout=1.0)
            self._signal(e, signal.SIGKILL)  # what is left of its group (Kamailio's children)
            self._reap_group(proc.pid)
            self._keep("forget", proc.pid)
            self._metrics.edge_up.labels(process=e.name).set(0)
            was_up = e.life.state is EngineState.UP
            e.life.move(Move.EXITED)
            if self._stopping or e.life.state is EngineState.STOPPED:
                return
            self._metrics.edge_restarts.labels(process=e.name).inc()
            self._log.error(
                "edge_process_died",
                process=e.name,
                exit=describe(code),
                was_up=was_up,
                restart_in_sec=e.life.restart_delay,
                last_lines=list(e.tail)[-5:],
            )
            if e.name == "kamailio":
                self.calls.reset(f"kamailio {describe(code)}")
            await asyncio.sleep(e.life.restart_delay)

    async def _until_ready(self, e: _Engine, proc: asyncio.subprocess.Process) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SEC
        while proc.returncode is None:
            try:
                await e.ready()
            except (ControlError, OSError):
                if time.monotonic() > deadline:
                    self._log.error("edge_process_unresponsive", process=e.name, timeout_sec=READY_TIMEOUT_SEC)
                    self._signal(e, signal.SIGKILL)
                    return
                await asyncio.sleep(0.05)
                continue
            if e.on_up is not None:
                try:
                    await e.on_up()
                except (ControlError, OSError) as err:
                    self._log.error("edge_setup_failed", process=e.name, error=str(err))
                    self._signal(e, signal.SIGKILL)
                    return
            if e.life.state is EngineState.STARTING:
                e.life.move(Move.READY)
                self._metrics.edge_up.labels(process=e.name).set(1)
                self._metrics.edge_restarts.labels(process=e.name)  # 0 until its first restart
                if e.up_once.is_set():
                    self._log.info("edge_process_restarted", process=e.name, pid=proc.pid, restarts=e.life.restarts)
                e.up_once.set()
            return

    def _reap_group(self, pgid: int) -> None:
        """Reap the engine's children re-parented to this process (a child subreaper) once it died."""
        me = os.getpid()
        for task in Path(f"/proc/{me}/task").glob("*"):
            try:
                pids = [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
            for pid in pids:
                try:
                    if os.getpgid(pid) != pgid:
                        continue
                    os.waitpid(pid, os.WNOHANG)
                except (ChildProcessError, ProcessLookupError, PermissionError):
                    continue

    async def _relay(self, e: _Engine, proc: asyncio.subprocess.Process) -> None:
        """The engine's output into the agent's log, at most LOG_LINES_PER_SEC lines a second."""
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line longer than the limit: skip it
                continue
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            e.tail.append(line[:300])
            now = time.monotonic()
            e.tokens = min(2 * LOG_LINES_PER_SEC, e.tokens + (now - e.refilled) * LOG_LINES_PER_SEC)
            e.refilled = now
            if e.tokens < 1:
                e.dropped += 1
                continue
            e.tokens -= 1
            if e.dropped and now - e.dropped_told >= DROPPED_TOLD_SEC:
                self._log.warning("edge_log_dropped", process=e.name, lines=e.dropped)
                self._metrics.log_lines_dropped.inc(e.dropped)
                e.dropped, e.dropped_told = 0, now
            level = _level(e.name, line)
            getattr(self._log, level)("edge_log", process=e.name, line=line[:2000])
            if e.name == "haproxy":
                failure = parse_tls_failure(line)
                if failure is not None:
                    self._track(self._loop.create_task(self._answer_tls_failure(failure)))

    # -- engines' readiness and set-up ---------------------------------------------

    async def _haproxy_ready(self) -> None:
        out = await self._haproxy_api.command("show info", timeout=0.5)
        if "Pid:" not in out:
            raise ControlError("haproxy: no info")

    async def _kamailio_ready(self) -> None:
        await self._rpc.call("core.version", timeout=0.5)

    async def _kamailio_up(self) -> None:
        """A Kamailio that (re)started gets every record, then takes calls."""
        for rec in list(self._records.values()):
            await self._rpc.call("htable.sets", "conn", rec.line, rec.encode())
        for t in list(self._tls.values()):
            await self._send_tls(t)
        await self._rpc.call("htable.seti", "state", "ready", 1)
        # a new Kamailio reads the list file as it starts and pings every target afresh
        self.destinations.restarted(self._clock.monotonic())

    # -- data ------------------------------------------------------------------------

    def _put(self, rec: EdgeConnection) -> None:
        if self._records.get(rec.line) == rec:
            return
        self._records[rec.line] = rec
        if self._changes is not None:
            self._changes.put_nowait(("put", rec))
        self._destinations_changed(rec.line)

    def _remove(self, line: str) -> None:
        if self._records.pop(line, None) is not None and self._changes is not None:
            self._changes.put_nowait(("remove", line))
        self._destinations_changed(line)

    # -- destination health ----------------------------------------------------------

    def _destinations_changed(self, line: str | None = None) -> None:
        """The targets to ping follow the records (``line``'s alone changed; None: any, e.g. a
        new TLS port) and the TLS ports they need."""
        if self._plan.kamailio.destination_ping_sec <= 0:
            return
        if line is None:
            self._probe = {ln: probe_uris(rec, self._tls) for ln, rec in self._records.items()}
        elif line in self._records:
            self._probe[line] = probe_uris(self._records[line], self._tls)
        else:
            self._probe.pop(line, None)
        if self.destinations.set_targets(self._probe, self._clock.monotonic()) and self._changes is not None:
            self._changes.put_nowait(("dispatcher", self.destinations.targets))
        self._tell_destinations(None if line is None else [line])

    def _write_dispatcher_list(self, targets: tuple[str, ...]) -> None:
        path = self._lay.dispatcher_list
        tmp = path.with_suffix(".tmp")
        tmp.write_text(dispatcher_list(targets))
        tmp.replace(path)

    def _tell_destinations(self, only: list[str] | None = None) -> None:
        now = self._clock.monotonic()
        cids = only if only is not None else set(self._reachable) | set(self.destinations.connections)
        for cid in cids:
            value = self.destinations.reachable(cid, now)
            before = self._reachable.get(cid)
            if before == value:  # unchanged (None: unknown, never told)
                continue
            if value is None:
                self._reachable.pop(cid, None)
            else:
                self._reachable[cid] = value
                if before is not None or value is False:
                    log = self._log.info if value else self._log.warning
                    log(
                        "destination_reachable" if value else "destination_unreachable",
                        connection_id=cid,
                        targets=list(self.destinations.targets_of(cid)),
                    )
            if self._on_destination is not None:
                self._on_destination(cid, value)

    async def _poll_destinations(self) -> None:
        """Every target's state, read back from the dispatcher twice per ping interval."""
        every = max(0.5, min(5.0, self._plan.kamailio.destination_ping_sec / 2))
        k = self._engines["kamailio"]
        while True:
            await asyncio.sleep(every)
            if k.life.state is not EngineState.UP or not self.destinations.targets:
                continue
            try:
                reply = await self._rpc.call("dispatcher.list")
            except ControlError as e:
                self._log.warning("edge_destinations_unread", error=str(e))
                continue
            self.destinations.observe(parse_dispatcher_list(reply))
            self._tell_destinations()

    def _put_tls(self, target: TlsTarget, done: concurrent.futures.Future[None] | None = None) -> None:
        if self._tls.get(target.key) == target and target.key not in self._tls_waiters:
            if done is not None:
                done.set_result(None)
            return
        self._tls[target.key] = target
        if done is not None:
            self._tls_waiters.setdefault(target.key, []).append(done)
        if self._changes is not None:
            self._changes.put_nowait(("tls", target))
        else:  # not running yet: Kamailio gets every target before it takes requests
            self._tls_told(target.key)
        self._destinations_changed()  # a TLS destination is pinged through its port

    def _tls_told(self, key: str) -> None:
        for done in self._tls_waiters.pop(key, []):
            if not done.done():
                done.set_result(None)

    async def _send_tls(self, t: TlsTarget) -> None:
        await self._rpc.call("htable.sets", "tlsport", t.key, str(t.local_port))
        await self._rpc.call("htable.sets", "tlspeer", str(t.local_port), t.address)

    def _tls_maps(self) -> dict[Path, dict[str, str]]:
        """HAProxy's three maps (loopback port -> name, address, port) of every TLS target."""
        lay = self._lay
        out: dict[Path, dict[str, str]] = {
            haproxy.names_map(lay): {},
            haproxy.addresses_map(lay): {},
            haproxy.ports_map(lay): {},
        }
        for t in self._tls.values():
            port = str(t.local_port)
            out[haproxy.names_map(lay)][port] = t.name
            out[haproxy.addresses_map(lay)][port] = t.address
            out[haproxy.ports_map(lay)][port] = str(t.port)
        return out

    def _write_tls_maps(self, maps: dict[Path, dict[str, str]]) -> None:
        """The maps' files, read by a HAProxy that (re)starts (runs off the loop)."""
        for path, entries in maps.items():
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(f"{k} {v}\n" for k, v in sorted(entries.items())))
            tmp.replace(path)

    async def _send_tls_maps(self, maps: dict[Path, dict[str, str]]) -> None:
        """The running HAProxy's maps, changed live (runtime API)."""
        for path, entries in maps.items():
            for key, value in entries.items():
                out = await self._haproxy_api.command(f"set map {path} {key} {value}")
                if "not found" in out.lower():
                    out = await self._haproxy_api.command(f"add map {path} {key} {value}")
                if out.strip():
                    raise ControlError(f"haproxy: map {path.name} {key}: {out.strip()[:200]}")

    async def _haproxy_up(self) -> None:
        """A HAProxy that (re)started has the maps' files; a target added since is sent again."""
        await self._send_tls_maps(self._tls_maps())

    async def _push_changes(self) -> None:
        """Each change to Kamailio as it comes; one Kamailio misses is in the full set it gets at (re)start."""
        assert self._changes is not None
        while True:
            kind, item = await self._changes.get()
            if kind == "dispatcher" and isinstance(item, tuple):
                await asyncio.to_thread(self._write_dispatcher_list, item)
                k = self._engines.get("kamailio")
                if k is not None and k.life.state is EngineState.UP:
                    try:
                        await self._rpc.call("dispatcher.reload")
                    except ControlError as e:
                        self._log.warning("edge_change_failed", change="destinations", error=str(e))
                continue
            if kind == "tls":
                maps = self._tls_maps()
                await asyncio.to_thread(self._write_tls_maps, maps)
                h = self._engines.get("haproxy")
                if h is not None and h.life.state is EngineState.UP:
                    try:
                        await self._send_tls_maps(maps)
                    except ControlError as e:
                        self._log.warning("edge_change_failed", change="tls_map", error=str(e))
            k = self._engines.get("kamailio")
            try:
                if k is None or k.life.state is not EngineState.UP:
                    continue
                if kind == "put" and isinstance(item, EdgeConnection):
                    await self._rpc.call("htable.sets", "conn", item.line, item.encode())
                elif kind == "remove" and isinstance(item, str):
                    await self._rpc.call("htable.delete", "conn", item)
                elif kind == "tls" and isinstance(item, TlsTarget):
                    await self._send_tls(item)
            except ControlError as e:
                self._log.warning("edge_change_failed", change=kind, error=str(e))
            finally:
                if kind == "tls" and isinstance(item, TlsTarget):
                    self._tls_told(item.key)

    def _active_changed(self, cid: str, count: int) -> None:
        """A connection's calls in progress changed (edge loop): handed on in one batch."""
        if self._on_active is None:
            return
        if not self._active_pending:
            self._loop.call_later(ACTIVE_PUBLISH_SEC, self._publish_active)
        self._active_pending[cid] = count

    def _publish_active(self) -> None:
        pending, self._active_pending = self._active_pending, {}
        if pending and self._on_active is not None:
            self._on_active(pending)

    async def _read_events(self) -> None:
        k = self._engines["kamailio"]
        while True:
            await k.up_once.wait()
            if k.life.state is not EngineState.UP:
                await asyncio.sleep(0.2)
                continue
            try:
                reader, writer = await asyncio.open_connection(LOOPBACK, self._lay.evapi_port)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            try:
                async for ev in EventStream(reader):
                    if isinstance(ev, EdgeEventError):
                        self._log.warning("edge_event_bad", error=str(ev))
                    elif isinstance(ev, TlsPending):
                        _note_pending(self._tls_pending, ev.port, (ev.call_id, ev.cseq))
                    elif isinstance(ev, TcpPending):
                        _note_pending(self._tcp_pending, (ev.address, ev.port), (ev.call_id, ev.cseq))
                    elif isinstance(ev, TcpClosed):
                        waiting = self._tcp_pending.pop((ev.address, ev.port), {})
                        if waiting:
                            self._track(self._loop.create_task(self._answer_closed(ev, waiting)))
                        if self._on_flow_closed is not None:
                            self._on_flow_closed(ev.address, ev.port)
                    else:
                        try:
                            self.calls.on_event(ev)
                        except Exception as e:  # one bad event must never stop the reader
                            self._log.error("edge_event_failed", event=type(ev).__name__, error=repr(e))
            except (asyncio.IncompleteReadError, ConnectionError, EdgeEventError, asyncio.LimitOverrunError) as e:
                if not self._stopping:
                    self._log.debug("edge_events_reconnect", reason=repr(e))
            finally:
                writer.close()
            await asyncio.sleep(0.1)

    # -- TLS targets HAProxy could not reach -------------------------------------------

    async def _answer_closed(self, ev: TcpClosed, waiting: dict[tuple[str, str], float]) -> None:
        """The TCP connection to a PBX closed: the workers' requests sent over it that it had not
        answered get 503 at once, marked as the edge's (the worker reports no answer and its
        policy retries), instead of waiting 34 s for their timer. One it had answered is no
        longer a transaction: tm refuses the reply, and nothing happens."""
        why = f"the TCP connection to {ev.address}:{ev.port} closed before the PBX answered"
        now = time.monotonic()
        for (call_id, cseq), at in waiting.items():
            if now - at > PENDING_SEC:
                continue
            try:
                await self._rpc.call(
                    "tm.reply_callid", 503, "Connection closed", call_id, cseq, "", f"X-UAC-Edge: {why}\r\n", ""
                )
            except ControlError as err:  # answered meanwhile (or gone): nothing to do
                self._log.debug("edge_tcp_reply_skipped", call_id=call_id, error=str(err))

    async def _answer_tls_failure(self, failure: TlsFailure) -> None:
        """HAProxy refused the target behind ``failure.port`` (or could not reach it): the
        requests waiting on it get 503 at once, marked as the edge's, with HAProxy's reason
        (the worker reports "TLS failure: ..."), instead of the PBX's silence for 34 s."""
        waiting = self._tls_pending.pop(failure.port, {})
        target = next((t for t in self._tls.values() if t.local_port == failure.port), None)
        name = failure.name or (target.name if target is not None else "")
        where = f"{name} ({target.key})" if target is not None else name
        why = f"TLS to {where} failed: {failure.reason}"
        self._log.warning("edge_tls_failed", port=failure.port, target=where, reason=failure.reason)
        for call_id, cseq in waiting:
            try:
                await self._rpc.call(
                    "tm.reply_callid", 503, "TLS failure", call_id, cseq, "", f"X-UAC-Edge: {why}\r\n", ""
                )
            except ControlError as err:  # answered meanwhile (or gone): nothing to do
                self._log.debug("edge_tls_reply_skipped", call_id=call_id, error=str(err))


def _note_pending(table: dict[K, dict[tuple[str, str], float]], key: K, request: tuple[str, str]) -> None:
    """Remember a worker's request (Call-ID, CSeq) sent towards ``key``, for PENDING_SEC."""
    now = time.monotonic()
    waiting = table.setdefault(key, {})
    while waiting:  # oldest first (arrival order); a request is answered within 34 s (its timer)
        old, at = next(iter(waiting.items()))
        if now - at <= PENDING_SEC:
            break
        del waiting[old]
    if len(waiting) < MAX_PENDING:
        waiting[request] = now


async def _exited(proc: asyncio.subprocess.Process) -> int:
    """The engine's exit status, as soon as its main process is gone. (``proc.wait()`` also
    waits for its output pipe to close, which Kamailio's children, still alive after a kill -9
    of their parent, hold open.)"""
    while proc.returncode is None:
        await asyncio.sleep(EXIT_POLL_SEC)
    return proc.returncode


def _level(engine: str, line: str) -> str:
    """The log level of an engine's output line."""
    if engine == "kamailio":
        m = _KAMAILIO_LEVEL.match(line)
        word = m.group(2) if m else ""
    elif engine == "rtpengine":
        word = line.split("] ", 1)[1].split(":", 1)[0] if "] " in line else ""
    else:  # haproxy: "[NOTICE]   (123) : ..."
        word = line[1:].split("]", 1)[0] if line.startswith("[") else ""
    word = word.upper()
    if word in ("ERROR", "ERR", "CRITICAL", "CRIT", "ALERT", "BUG", "EMERG") and "exited normally" not in line:
        return "error"
    if word in ("WARNING", "WARN"):
        return "warning"
    if word in ("DEBUG", "DBG"):
        return "debug"
    return "info"


def describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"
