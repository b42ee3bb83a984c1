"""The SIP thread: the one thread that owns pjsua2.

It creates the adapter (Endpoint, transports, accounts), polls
``libHandleEvents``, feeds what the stack reports to each connection's
registration policy, carries out the policy's decisions, and publishes
immutable :class:`~agent.status.ConnectionStatus` snapshots for the HTTP thread.
Other threads talk to it only through :meth:`SipEngine.submit` and the stop
request. Started and stopped the aiosmtpd way: ``start()`` waits for the thread
to be ready and re-raises its start-up error; ``stop()`` is safe twice.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from agent.config import MAX_CONNECTIONS, PJSUA_MAX_CALLS, AgentSettings, Connection
from agent.core.clock import Clock
from agent.core.policy import Action, Outcome, RegisterResponse, RegistrationPolicy, RegState
from agent.metrics import Metrics
from agent.sip.calls import CallRouter
from agent.sip.events import (
    CallDtmf,
    CallMedia,
    CallState,
    IncomingCall,
    RegResult,
    RegStarted,
    SipEvent,
    StackLog,
    TransportDown,
)
from agent.sip.specs import StackSettings
from agent.sip.uris import account_spec
from agent.status import ConnectionStatus, build_status

__all__ = ["ConnectionLimitError", "EngineError", "NotRegisteringError", "SipEngine", "UnknownConnectionError"]

Command = Callable[[], None]


class EngineError(RuntimeError):
    """The SIP thread could not start (or, for a runtime change, is stopping)."""


class ConnectionLimitError(EngineError):
    """One more registering connection would pass pjsua2's PJSUA_MAX_ACC."""


class UnknownConnectionError(EngineError):
    """No connection has that id on the SIP thread."""


class NotRegisteringError(EngineError):
    """The connection keeps no registration (inactive, or no external_uac_settings)."""


@dataclass
class _Wait:
    """A runtime change that continues once ``done()`` (or at ``deadline``, monotonic)."""

    done: Callable[[], bool]
    deadline: float
    then: Callable[[], Any]


@dataclass
class _Conn:
    conn: Connection
    policy: RegistrationPolicy
    log: Any
    has_account: bool = False
    last_key: tuple[object, ...] = field(default_factory=tuple)


def to_register_response(ev: RegResult) -> RegisterResponse:
    """Turn the stack's report into the policy's terms, with a clear text for local failures."""
    reason = ev.reason.strip()
    if not ev.received:
        if ev.code == 408:
            error = "408 Request Timeout (no response from registrar)"
        elif "SSL" in reason or "TLS" in reason:
            error = f"TLS failure: {reason}"
        elif ev.code == 502:
            error = f"DNS or transport failure: {reason}"
        else:
            error = f"transport failure: {reason or 'unknown error'}"
        return RegisterResponse(code=ev.code, reason=reason, error=error)
    source_ip = ev.source.rsplit(":", 1)[0].strip("[]") if ev.source else None
    return RegisterResponse(
        code=ev.code,
        reason=reason,
        expires=ev.expiration if 200 <= ev.code < 300 else None,
        retry_after=ev.retry_after,
        min_expires=ev.min_expires,
        source_ip=source_ip,
    )


class SipEngine:
    def __init__(
        self,
        settings: AgentSettings,
        metrics: Metrics,
        logger: Any,
        clock: Clock,
        rng: random.Random | None = None,
        adapter_factory: Callable[[Callable[[SipEvent], None]], Any] | None = None,
        poll_ms: int = 10,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._log = logger
        self._clock = clock
        self._rng = rng or random.Random()
        self._adapter_factory = adapter_factory
        self._poll_ms = poll_ms
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._events: list[SipEvent] = []
        self._conns: dict[str, _Conn] = {}
        self._statuses: dict[str, ConnectionStatus] = {}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._stop_deadline: float | None = None
        self._heartbeat = 0.0
        self._router: CallRouter | None = None
        self._adapter: Any = None  # set on the SIP thread; runtime changes use it there
        self._busy: dict[str, tuple[_Wait, Future[Any]]] = {}  # connection_id -> change in progress
        self._waiting: dict[str, list[tuple[Command, Future[Any]]]] = {}  # changes queued behind it

    # -- other threads ----------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        if self._thread is not None:
            raise EngineError("already started")
        self._thread = threading.Thread(target=self._run, name="sip", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise EngineError(f"SIP thread not ready after {timeout} s")
        if self._error is not None:
            self._thread.join(5)
            raise EngineError(str(self._error)) from self._error

    def submit(self, command: Command) -> None:
        """Run ``command`` on the SIP thread (its only entry point for others)."""
        self._commands.put(command)

    def request_stop(self, timeout: float) -> None:
        """Begin the graceful stop: unregister all, give up after ``timeout`` seconds."""
        if not self._stop.is_set():
            self._stop_deadline = time.monotonic() + timeout
            self._stop.set()

    def stop(self, timeout: float = 5.0) -> None:
        self.request_stop(timeout)
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout + 10)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive() and time.monotonic() - self._heartbeat < 5.0

    def statuses(self) -> dict[str, ConnectionStatus]:
        return self._statuses  # replaced whole on the SIP thread; never mutated

    # -- the SIP thread ---------------------------------------------------

    def _run(self) -> None:
        adapter = None
        try:
            self._heartbeat = time.monotonic()
            from agent.sip.adapter import PjsuaAdapter  # only here: the SIP thread owns pjsua2

            factory = self._adapter_factory or PjsuaAdapter
            adapter = factory(self._events.append)
            self._adapter = adapter
            s = self._settings.sip
            adapter.start(
                StackSettings(
                    bind=s.bind,
                    port=s.port,
                    tls_port=s.effective_tls_port,
                    tls_ca_file=s.tls_ca_file,
                    tls_verify_server=s.tls_verify_server,
                    user_agent=s.user_agent,
                    log_level=s.stack_log_level,
                    trace=s.trace,
                    want_tls=True,
                    rtp_address=s.effective_rtp_address,
                    rtp_port=s.rtp_port,
                    rtp_port_range=s.rtp_port_range,
                    call_slots=PJSUA_MAX_CALLS,
                )
            )
            self._router = CallRouter(
                adapter,
                s,
                self._connection,
                self._registrar_ip,
                self._metrics,
                self._log,
                self._clock,
            )
            for conn in self._settings.connections:
                self._add(adapter, conn)
            self._publish()
        except BaseException as e:
            self._error = e
            self._ready.set()
            if adapter is not None:
                try:
                    adapter.shutdown()
                except Exception:
                    pass
            return
        self._metrics.sip_thread_up.set(1)
        self._ready.set()
        try:
            self._loop(adapter)
        except BaseException as e:
            self._log.error("sip_thread_crashed", error=repr(e))
            self._error = e
        finally:
            try:
                adapter.shutdown()
            except Exception as e:
                self._log.error("sip_stack_shutdown_failed", error=repr(e))
            self._metrics.sip_thread_up.set(0)
            self._fail_changes()
            self._publish()
            self._log.info("sip_thread_stopped")

    def _add(self, adapter: Any, conn: Connection) -> None:
        policy = RegistrationPolicy(self._settings.policy_settings(conn), self._clock, self._rng)
        log = self._log.bind(connection_id=conn.connection_id)
        c = _Conn(conn=conn, policy=policy, log=log)
        self._conns[conn.connection_id] = c
        if conn.registers:
            spec = account_spec(conn)
            adapter.add_account(spec)
            c.has_account = True
            policy.activate()
            log.info(
                "connection_added",
                registrar=spec.registrar_uri,
                transport=spec.transport,
                aor=spec.id_uri,
                outbound_proxy=spec.proxies[0] if spec.proxies else None,
                next_in=round(policy.next_action_in or 0.0, 3),
            )
        else:
            log.info("connection_inactive", active=conn.active, pair_state=conn.pair_state)

    def _loop(self, adapter: Any) -> None:
        stopping = False
        last_publish = 0.0
        while True:
            self._heartbeat = time.monotonic()
            while True:
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                try:
                    cmd()
                except Exception as e:
                    self._log.error("command_failed", error=repr(e))
            adapter.handle_events(self._poll_ms)
            changed = self._dispatch(adapter)
            if self._router is not None:
                self._router.poll()
            if self._stop.is_set() and not stopping:
                stopping = True
                self._log.info("stopping", connections=len(self._conns))
                for c in self._conns.values():
                    c.policy.stop()
            for c in self._conns.values():
                changed |= self._step(adapter, c)
            changed |= self._run_waits()
            now = time.monotonic()
            if changed or now - last_publish >= 0.1:
                self._publish()
                last_publish = now
            if stopping:
                if all(c.policy.finished for c in self._conns.values()):
                    return
                if self._stop_deadline is not None and now >= self._stop_deadline:
                    pending = [k for k, c in self._conns.items() if not c.policy.finished]
                    self._log.warning("stop_deadline_passed", still_unregistering=pending)
                    return

    def _step(self, adapter: Any, c: _Conn) -> bool:
        action = c.policy.poll()
        while c.policy.timeouts:
            self._report(c, c.policy.timeouts.pop(0), 408)
        if action is None:
            return self._note_state(c, None)
        key = c.conn.connection_id
        try:
            if action is Action.REGISTER:
                c.log.debug("register_sending", expires=c.policy.requested_expires, attempt=c.policy.attempts)
                adapter.register(key)
            else:
                c.log.info("unregister_sending")
                adapter.unregister(key)
        except Exception as e:
            outcome = c.policy.on_response(RegisterResponse(code=0, error=f"REGISTER not sent: {e}"))
            self._report(c, outcome, 0)
        return self._note_state(c, None)

    def _dispatch(self, adapter: Any) -> bool:
        if not self._events:
            return False
        events, self._events[:] = list(self._events), []
        for ev in events:
            if isinstance(ev, RegResult):
                c = self._conns.get(ev.key)
                if c is None:
                    continue
                outcome = c.policy.on_response(to_register_response(ev))
                self._report(c, outcome, ev.code)
            elif isinstance(ev, TransportDown):
                self._flow_lost(ev)
            elif isinstance(ev, RegStarted):
                c = self._conns.get(ev.key)
                if c is not None:
                    c.log.debug("register_started", renew=ev.renew)
            elif isinstance(ev, StackLog):
                self._stack_log(ev)
            elif self._router is not None:
                self._call_event(ev)
        return True

    def _call_event(self, ev: SipEvent) -> None:
        router = self._router
        assert router is not None
        try:
            if isinstance(ev, IncomingCall):
                router.on_incoming(ev)
            elif isinstance(ev, CallState):
                router.on_state(ev)
            elif isinstance(ev, CallMedia):
                router.on_media(ev)
            elif isinstance(ev, CallDtmf):
                router.on_dtmf(ev)
        except Exception as e:  # a bad call must never take the SIP thread down
            self._log.error("call_event_failed", event=type(ev).__name__, error=repr(e))

    def _connection(self, connection_id: str) -> Connection | None:
        c = self._conns.get(connection_id)
        return c.conn if c is not None else None

    def _registrar_ip(self, connection_id: str) -> str | None:
        c = self._conns.get(connection_id)
        return c.policy.last_registered_ip if c is not None else None

    def _report(self, c: _Conn, outcome: Outcome, code: int) -> None:
        if outcome.ignored:
            c.log.debug("register_response_ignored", response=outcome.text)
            return
        self._metrics.observe_response(c.conn.connection_id, code, outcome.duration)
        level = "info" if outcome.registration_status.value == 4 or outcome.unregister else "warning"
        getattr(c.log, level)(
            "unregister_response" if outcome.unregister else "register_response",
            response=outcome.text,
            code=code,
            result=outcome.response_class.value if outcome.response_class else None,
            duration_ms=None if outcome.duration is None else round(outcome.duration * 1000, 1),
            state=outcome.state.value,
            registered=c.policy.registered,
            registration_status=int(outcome.registration_status),
            next_in=None if outcome.next_in is None else round(outcome.next_in, 3),
            granted_expires=c.policy.granted_expires if 200 <= code < 300 else None,
            failures=c.policy.failures,
        )
        self._note_state(c, outcome.text)

    def _note_state(self, c: _Conn, cause: str | None) -> bool:
        p = c.policy
        key = (p.state, p.registered, p.registration_status)
        if key == c.last_key:
            return False
        old = c.last_key
        c.last_key = key
        if old:
            c.log.info(
                "state_changed",
                old_state=old[0].value if hasattr(old[0], "value") else old[0],
                state=p.state.value,
                registered=p.registered,
                registration_status=int(p.registration_status),
                cause=cause or p.last_response,
            )
        return True

    def _flow_lost(self, ev: TransportDown) -> None:
        kind = ev.kind.upper()
        if kind not in ("TCP", "TLS"):
            return
        self._metrics.flows_lost.labels(transport=kind).inc()
        for c in self._conns.values():
            ext = c.conn.external_uac_settings
            if ext is None or ext.transport != kind or not c.policy.registered:
                continue
            c.log.warning("flow_lost", transport=kind, remote=ev.remote or None, error=ev.error)
            c.policy.on_flow_lost()

    def _stack_log(self, ev: StackLog) -> None:
        msg = ev.message
        if "too many calls" in msg and "incoming" in msg:
            # pjsua answered an INVITE 486 itself: every call slot was in use
            self._metrics.inbound_rejected.labels(connection_id="", reason="over_limit").inc()
            self._log.warning("call_rejected", reason="over_limit", code=486, detail="all SIP call slots in use")
            return
        if self._settings.sip.trace and ("TX " in msg[:40] or "RX " in msg[:40]):
            self._log.info("sip_trace", message=msg)
        elif ev.level <= 1:
            self._log.error("sip_stack", message=msg)
        elif ev.level == 2:
            self._log.warning("sip_stack", message=msg)
        else:
            self._log.debug("sip_stack", message=msg)

    def _publish(self) -> None:
        statuses = {k: build_status(c.conn, c.policy.snapshot()) for k, c in self._conns.items()}
        self._statuses = statuses
        for st in statuses.values():
            self._metrics.publish(st)

    # -- runtime changes (UAC Connections API, reload) ------------------------
    #
    # Other threads call the public methods; each returns a Future and queues a
    # command that runs on the SIP thread. Changes to one connection run one at a
    # time, in order; a change that must wait for an unregister answer parks in
    # ``_busy`` and continues from the loop. Connections a change does not name
    # are never touched.

    def apply_connection(self, conn: Connection) -> Future[Any]:
        """Add ``conn``, or bring the running connection with its id to it.

        Result: ``"added"``; ``"updated"`` (nothing the registration uses changed:
        the new settings are swapped in, no REGISTER is sent); or ``"replaced"``
        (the old binding was unregistered, then the account re-created).
        """
        return self._change(conn.connection_id, lambda: self._apply(conn))

    def remove_connection(self, connection_id: str) -> Future[Any]:
        """Unregister (waiting for the answer, at most the unregister deadline), then remove."""
        return self._change(connection_id, lambda: self._remove(connection_id))

    def register_now(self, connection_id: str) -> Future[Any]:
        """Refresh (or retry) the registration now; restarts one stopped by ``unregister_now``."""
        return self._change(connection_id, lambda: self._register_now(connection_id))

    def unregister_now(self, connection_id: str) -> Future[Any]:
        """Unregister and stay stopped until ``register_now`` or a change of the connection."""
        return self._change(connection_id, lambda: self._unregister_now(connection_id))

    def replace_settings(self, settings: AgentSettings) -> Future[Any]:
        """Use ``settings`` (e.g. new ``defaults``) for connections applied from now on."""

        def swap() -> None:
            self._settings = settings

        return self._change("", swap)

    def _change(self, key: str, fn: Callable[[], Any]) -> Future[Any]:
        fut: Future[Any] = Future()

        def run() -> None:
            if key in self._busy:
                self._waiting.setdefault(key, []).append((run, fut))
                return
            if self._stop.is_set():
                fut.set_exception(EngineError("the agent is stopping"))
                return
            try:
                result = fn()
            except Exception as e:
                fut.set_exception(e)
                return
            if isinstance(result, _Wait):
                self._busy[key] = (result, fut)
            else:
                fut.set_result(result)
                self._publish()

        self.submit(run)
        return fut

    def _run_waits(self) -> bool:
        if not self._busy:
            return False
        now = time.monotonic()
        progressed = False
        for key, (wait, fut) in list(self._busy.items()):
            if not (wait.done() or now >= wait.deadline):
                continue
            del self._busy[key]
            progressed = True
            try:
                fut.set_result(wait.then())
            except Exception as e:
                fut.set_exception(e)
            for run, _ in self._waiting.pop(key, []):
                run()
        if progressed:
            self._publish()
        return progressed

    def _fail_changes(self) -> None:
        pending = [fut for _, fut in self._busy.values()]
        pending += [fut for queued in self._waiting.values() for _, fut in queued]
        self._busy.clear()
        self._waiting.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(EngineError("the SIP thread stopped before the change completed"))

    def _wait_deadline(self) -> float:
        # An unregister is given up by the policy after unregister_timeout_sec; a
        # REGISTER in flight is waited for at most as long again.
        return time.monotonic() + 2 * self._settings.shutdown_timeout_sec + 1.0

    def _conn(self, connection_id: str) -> _Conn:
        c = self._conns.get(connection_id)
        if c is None:
            raise UnknownConnectionError(f"no connection {connection_id}")
        return c

    def _check_room(self, conn: Connection) -> None:
        if not conn.registers:
            return
        others = sum(1 for k, c in self._conns.items() if k != conn.connection_id and c.has_account)
        if others + 1 > MAX_CONNECTIONS:
            raise ConnectionLimitError(
                f"{others} registering connections are running; one agent process holds at most "
                f"{MAX_CONNECTIONS} (pjsua2's account limit)"
            )

    @staticmethod
    def _registration_changed(old: Connection, new: Connection) -> bool:
        if old.registers != new.registers:
            return True
        return old.registers and account_spec(old) != account_spec(new)

    def _add_or_undo(self, conn: Connection) -> None:
        try:
            self._add(self._adapter, conn)
        except Exception:
            c = self._conns.pop(conn.connection_id, None)
            if c is not None and c.has_account:
                self._adapter.remove_account(conn.connection_id)
            raise
        c = self._conns[conn.connection_id]
        if c.has_account:
            c.policy.request_refresh()  # added at runtime: register now (the stagger is for start-up)

    def _apply(self, conn: Connection) -> Any:
        key = conn.connection_id
        old = self._conns.get(key)
        if old is None:
            self._check_room(conn)
            self._add_or_undo(conn)
            return "added"
        if not self._registration_changed(old.conn, conn):
            old.conn = conn
            old.policy.settings = self._settings.policy_settings(conn)
            old.log.info("connection_updated", reregister=False)
            return "updated"
        self._check_room(conn)
        old.log.info("connection_replacing", registered=old.policy.registered, registers=conn.registers)
        old.policy.stop()
        return _Wait(
            done=lambda: old.policy.finished, deadline=self._wait_deadline(), then=lambda: self._replace(old, conn)
        )

    def _replace(self, old: _Conn, conn: Connection) -> str:
        key = conn.connection_id
        if old.has_account:
            self._adapter.remove_account(key)
            old.has_account = False
        try:
            self._add_or_undo(conn)
        except Exception as e:
            old.log.error("connection_replace_failed", error=str(e))
            try:
                self._add_or_undo(old.conn)  # carry on with the settings that worked
            except Exception as e2:
                old.log.error("connection_restore_failed", error=str(e2))
            raise
        return "replaced"

    def _remove(self, connection_id: str) -> Any:
        c = self._conn(connection_id)
        c.log.info("connection_removing", registered=c.policy.registered)
        c.policy.stop()
        return _Wait(done=lambda: c.policy.finished, deadline=self._wait_deadline(), then=lambda: self._drop(c))

    def _drop(self, c: _Conn) -> bool:
        key = c.conn.connection_id
        if c.has_account:
            self._adapter.remove_account(key)
            c.has_account = False
        if self._conns.get(key) is c:
            del self._conns[key]
        self._forget_metrics(key)
        c.log.info("connection_removed", last_response=c.policy.last_response)
        return True

    def _register_now(self, connection_id: str) -> Any:
        c = self._conn(connection_id)
        if not c.has_account:
            raise NotRegisteringError(f"connection {connection_id} keeps no registration (inactive or no settings)")
        p = c.policy

        def restart() -> str:
            if p.state == RegState.STOPPED:
                p.activate()
            p.request_refresh()
            c.log.info("register_requested", state=p.state.value)
            return p.state.value

        if p.state == RegState.UNREGISTERING:
            return _Wait(done=lambda: p.finished, deadline=self._wait_deadline(), then=restart)
        return restart()

    def _unregister_now(self, connection_id: str) -> Any:
        c = self._conn(connection_id)
        if not c.has_account:
            raise NotRegisteringError(f"connection {connection_id} keeps no registration (inactive or no settings)")
        c.log.info("unregister_requested", registered=c.policy.registered)
        c.policy.stop()
        return _Wait(done=lambda: c.policy.finished, deadline=self._wait_deadline(), then=lambda: c.policy.state.value)

    def _forget_metrics(self, key: str) -> None:
        """Drop a removed connection's gauges (counters and histograms stay, as Prometheus expects)."""
        m = self._metrics
        for name in ("registered", "registration_status", "last_code", "expires", "failures", "next_action"):
            try:
                getattr(m, name).remove(key)
            except (AttributeError, KeyError, ValueError):
                pass
        for state in ("ACTIVE", "INACTIVE"):
            try:
                m.pair_state.remove(key, state)
            except (AttributeError, KeyError, ValueError):
                pass
        last = getattr(m, "_last_info", {}).pop(key, None)
        if last is not None:
            try:
                m.last_info.remove(key, last)
            except (AttributeError, KeyError, ValueError):
                pass
