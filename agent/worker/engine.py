"""A worker's SIP thread: the one thread that owns pjsua2 in its process.

It creates the adapter (Endpoint, transports, accounts), blocks in
``libHandleEvents`` until the next deadline (a policy's refresh or retry, a
binding's expiry, a REGISTER's timeout, a ring timeout) or until a command
arrives, feeds what the stack reports to each connection's registration
policy, carries out the policy's decisions, and reports to the supervisor
(``agent.ipc.messages``): states, metric events, log lines, answers.

Other threads reach it only through :meth:`WorkerEngine.submit`, which queues
the command and wakes the loop (``wake``: a datagram to the worker's own SIP
port, so ``libHandleEvents`` returns at once). Changes to one connection run
one at a time, in order; a change that must wait for an unregister answer is
parked and continues from the loop. Connections a change does not name are
never touched.
"""

from __future__ import annotations

import math
import os
import queue
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from agent.core.clock import Clock
from agent.core.liveness import RegistrarProbe
from agent.core.policy import Action, Outcome, PolicySnapshot, RegisterResponse, RegistrationPolicy, RegState
from agent.core.targets import TargetCursor, fails_over
from agent.ipc.messages import (
    Apply,
    Command,
    ConnSpec,
    Done,
    ErrorKind,
    Event,
    Failover,
    FlowLost,
    InboundRejected,
    Ping,
    Pong,
    Ready,
    RegisterAnswered,
    RegisterNow,
    Remove,
    Route,
    Shutdown,
    Start,
    StartFailed,
    StateChanged,
    Stopped,
    UnregisterNow,
)
from agent.worker.calls import CallRouter
from agent.worker.events import (
    FORWARD_KEY,
    CallDtmf,
    CallMedia,
    CallState,
    IncomingCall,
    KeepaliveResult,
    RegResult,
    RegStarted,
    SipEvent,
    StackLog,
    TransportDown,
)
from agent.worker.limits import MAX_CONNECTIONS
from agent.worker.log import WorkerLog

__all__ = ["ChangeError", "WorkerEngine", "to_register_response"]

# Longest block in libHandleEvents with nothing due: the supervisor's pings
# wake the loop more often than this anyway.
IDLE_CAP_SEC = 60.0
# A probe of a connection's best target goes out this long before its refresh, and
# its answer counts for this long.
BEST_PROBE_AHEAD_SEC = 15.0
BEST_PROBE_FRESH_SEC = 30.0
# While calls are set up or carried (or legs wait for their slot to free), the
# loop comes round at least this often.
BUSY_CAP_SEC = 0.05


class ChangeError(Exception):
    """A change the worker refuses; ``kind`` tells the supervisor which."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind


@dataclass
class _Wait:
    """A change that continues once ``done()`` (or at ``deadline``, monotonic)."""

    done: Callable[[], bool]
    deadline: float
    then: Callable[[], str]


@dataclass
class _Conn:
    spec: ConnSpec
    policy: RegistrationPolicy
    probe: RegistrarProbe
    log: Any
    has_account: bool = False
    reachable: bool | None = None  # last logged registrar liveness
    cursor: TargetCursor | None = None  # which of spec.hop's targets REGISTERs go to (None: no hop)
    route: str | None = None  # the route the account has now
    best_probed_at: float | None = None  # a probe of the best target went out before this refresh
    best_answered_at: float | None = None  # ... and the best target answered it then
    last_state: tuple[object, ...] = field(default_factory=tuple)  # for state_changed lines
    last_sent: tuple[object, ...] = field(default_factory=tuple)  # for StateChanged messages


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


class WorkerEngine:
    def __init__(
        self,
        start: Start,
        adapter_factory: Callable[[Callable[[SipEvent], None]], Any],
        send: Callable[[list[Event]], None],
        wake: Callable[[], None],
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self._start = start
        self._stack = start.stack
        self._adapter_factory = adapter_factory
        self._send = send
        self._wake = wake
        self._log = WorkerLog(self.emit, start.log_level)  # its lines go to the supervisor
        self._clock = clock
        self._rng = rng or random.Random()
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._events: list[SipEvent] = []
        self._out: list[Event] = []
        self._conns: dict[str, _Conn] = {}
        self._adapter: Any = None
        self._router: CallRouter | None = None
        self._stop_deadline: float | None = None  # monotonic; set once a stop is asked for
        self._stop_reason = ""
        self._busy: dict[str, tuple[_Wait, int]] = {}  # connection_id -> (change in progress, request)
        self._waiting: dict[str, list[tuple[Callable[[], None], int]]] = {}  # changes queued behind it
        self._best_probe: str | None = None  # the connection whose best target is being probed

    # -- other threads ----------------------------------------------------------

    def submit(self, command: Command) -> None:
        """Queue ``command`` for the SIP thread and wake it (the only entry point for others)."""
        self._commands.put(command)
        self._wake()

    def emit(self, event: Event) -> None:
        """Queue an event for the supervisor (SIP thread only; sent at the end of the loop)."""
        self._out.append(event)

    # -- the SIP thread -----------------------------------------------------------

    def run(self) -> int:
        """Start the stack, loop until stopped, shut the stack down. Returns the exit code."""
        try:
            adapter = self._adapter_factory(self._events.append)
            adapter.start(self._stack)
        except Exception as e:
            self._log.error("sip_start_failed", error=str(e))
            self.emit(StartFailed(error=str(e)))
            self._flush()
            return 1
        self._adapter = adapter
        self._router = CallRouter(
            adapter, self._stack, self._route, self._registrar_ip, self.emit, self._log, self._clock
        )
        self._log.info(
            "worker_started",
            sip=f"{self._stack.bind}:{self._stack.port}",
            tls_port=self._stack.tls_port if self._stack.want_tls else None,
            rtp_ports=f"{self._stack.rtp_port}-{self._stack.rtp_port + self._stack.rtp_port_range - 1}",
        )
        self.emit(Ready(pid=os.getpid()))
        self._flush()
        unfinished: list[str] = []
        try:
            unfinished = self._loop(adapter)
        except BaseException as e:
            self._log.error("sip_thread_crashed", error=repr(e))
            raise
        finally:
            try:
                adapter.shutdown()
            except Exception as e:
                self._log.error("sip_stack_shutdown_failed", error=repr(e))
            self._fail_changes()
            self._log.info("worker_stopped", reason=self._stop_reason or None, still_registered=unfinished or None)
            self.emit(Stopped(unfinished=tuple(unfinished)))
            self._flush()
        return 0

    def request_stop(self, deadline_sec: float, reason: str) -> None:
        """Unregister everything, then leave the loop (SIP thread only: use submit(Shutdown) elsewhere)."""
        if self._stop_deadline is None:
            self._stop_deadline = self._clock.monotonic() + deadline_sec
            self._stop_reason = reason
            self._log.info("stopping", connections=len(self._conns), reason=reason, deadline_sec=deadline_sec)
            for c in self._conns.values():
                c.policy.stop()

    def _loop(self, adapter: Any) -> list[str]:
        while True:
            self._run_commands()
            if self._router is not None:
                self._router.poll()
            for c in self._conns.values():
                self._step(adapter, c)
            self._run_waits()
            self._publish()
            self._flush()  # before blocking: answers and states leave at once
            if self._stop_deadline is not None:
                pending = [k for k, c in self._conns.items() if not c.policy.finished]
                if not pending:
                    return []
                if self._clock.monotonic() >= self._stop_deadline:
                    self._log.warning("stop_deadline_passed", still_unregistering=pending)
                    return pending
            adapter.handle_events(self._timeout_ms())
            self._dispatch()

    def _timeout_ms(self) -> int:
        """How long libHandleEvents may block: until the next deadline, 0 with commands queued."""
        if not self._commands.empty():
            return 0
        now = self._clock.monotonic()
        busy = self._adapter is not None and self._adapter.busy
        cap = BUSY_CAP_SEC if busy or (self._router is not None and self._router.busy) else IDLE_CAP_SEC
        due = now + cap
        for c in self._conns.values():
            for d in (c.policy.next_deadline(), c.probe.next_deadline()):
                if d is not None and d < due:
                    due = d
        if self._router is not None:
            d = self._router.next_deadline()
            if d is not None and d < due:
                due = d
        for wait, _ in self._busy.values():
            due = min(due, wait.deadline)
        if self._stop_deadline is not None:
            due = min(due, self._stop_deadline)
        return max(0, math.ceil((due - now) * 1000))

    def _run_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                self._command(cmd)
            except Exception as e:  # a bad command must never take the SIP thread down
                self._log.error("command_failed", command=type(cmd).__name__, error=repr(e))

    def _command(self, cmd: Command) -> None:
        if isinstance(cmd, Ping):
            self.emit(Pong(cmd.seq))
        elif isinstance(cmd, Apply):
            spec = cmd.spec
            self._change(spec.connection_id, cmd.request, lambda: self._apply(spec))
        elif isinstance(cmd, Remove):
            cid = cmd.connection_id
            self._change(cid, cmd.request, lambda: self._remove(cid))
        elif isinstance(cmd, RegisterNow):
            cid = cmd.connection_id
            self._change(cid, cmd.request, lambda: self._register_now(cid))
        elif isinstance(cmd, UnregisterNow):
            cid = cmd.connection_id
            self._change(cid, cmd.request, lambda: self._unregister_now(cid))
        elif isinstance(cmd, Shutdown):
            self.request_stop(cmd.deadline_sec, cmd.reason)
        elif isinstance(cmd, Start):
            self._log.warning("start_ignored", reason="the stack is already started")

    def _flush(self) -> None:
        if self._out:
            batch, self._out = self._out, []
            self._send(batch)

    # -- registrations ------------------------------------------------------------

    def _add(self, spec: ConnSpec) -> None:
        adapter = self._adapter
        policy = RegistrationPolicy(spec.policy, self._clock, self._rng)
        probe = RegistrarProbe(spec.policy.keepalive_interval_sec, spec.policy.keepalive_misses, self._clock)
        log = self._log.bind(connection_id=spec.connection_id)
        c = _Conn(spec=spec, policy=policy, probe=probe, log=log)
        acc = spec.account
        if spec.hop is not None:
            c.cursor = TargetCursor(len(spec.hop.targets))
            c.route = spec.hop.targets[0].uri if spec.hop.targets else None
        adapter.add_account(acc, route=c.route)
        self._conns[spec.connection_id] = c
        c.has_account = True
        policy.activate()
        if spec.register_at_once:
            policy.request_refresh()
        log.info(
            "connection_added",
            registrar=acc.registrar_uri,
            transport=acc.transport,
            aor=acc.id_uri,
            outbound_proxy=acc.proxies[0] if acc.proxies else None,
            next_in=round(policy.next_action_in or 0.0, 3),
        )

    def _step(self, adapter: Any, c: _Conn) -> None:
        action = c.policy.poll()
        while c.policy.timeouts:
            c.probe.on_register_result(answered=False)
            self._report(c, c.policy.timeouts.pop(0), 408)
        if action is None:
            self._keepalive(adapter, c)
            self._probe_best(adapter, c)
            self._note_state(c, None)
            return
        key = c.spec.connection_id
        try:
            if action is Action.REGISTER:
                hop = c.spec.hop
                if hop is not None and not hop.targets:
                    # the supervisor's lookup failed: a transient failure, nothing is sent
                    error = hop.error or f"DNS: no target for {hop.name}"
                    outcome = c.policy.on_response(RegisterResponse(code=0, error=error))
                    self._report(c, outcome, 0)
                    self._note_state(c, None)
                    return
                c.log.debug(
                    "register_sending",
                    expires=c.policy.requested_expires,
                    attempt=c.policy.attempts,
                    target=self._target_label(c),
                )
                if not self._pick_target(adapter, c):
                    adapter.register(key)
            else:
                c.log.info("unregister_sending")
                adapter.unregister(key)
        except Exception as e:
            outcome = c.policy.on_response(RegisterResponse(code=0, error=f"REGISTER not sent: {e}"))
            self._report(c, outcome, 0)
        self._note_state(c, None)

    # -- targets of a next hop given by a host name (agent/core/targets.py) ---------

    def _target_label(self, c: _Conn) -> str | None:
        hop, cursor = c.spec.hop, c.cursor
        if hop is None or cursor is None or not hop.targets:
            return None
        return hop.targets[min(cursor.index, len(hop.targets) - 1)].label

    def _pick_target(self, adapter: Any, c: _Conn) -> bool:
        """Before a REGISTER: back to the best target if it answered a probe lately; route there.
        True when that sent the REGISTER (a new route registers at once)."""
        hop, cursor = c.spec.hop, c.cursor
        if hop is None or cursor is None or not hop.targets:
            return False
        now = self._clock.monotonic()
        if (
            cursor.index > 0
            and c.best_answered_at is not None
            and now - c.best_answered_at < BEST_PROBE_FRESH_SEC
            and cursor.prefer_best()
        ):
            c.log.info("registrar_target_back", target=hop.targets[0].label)
        c.best_answered_at = c.best_probed_at = None
        uri = hop.targets[cursor.index].uri
        if uri == c.route:
            return False
        adapter.set_route(c.spec.connection_id, uri)
        c.route = uri
        return True

    def _failover(self, c: _Conn, ev: RegResult) -> bool:
        """After a REGISTER's answer: True when the next one goes to another target at once."""
        hop, cursor = c.spec.hop, c.cursor
        if hop is None or cursor is None or not hop.targets:
            return False
        if not fails_over(ev.code, ev.received):
            cursor.end_round()
            return False
        failed = hop.targets[cursor.index].label
        nxt = cursor.on_failover()
        if nxt is None:
            c.log.warning("registrar_targets_exhausted", targets=len(hop.targets), last=failed)
            return False
        c.log.warning(
            "registrar_failover", failed=failed, code=ev.code, reason=ev.reason, target=hop.targets[nxt].label
        )
        self.emit(Failover(c.spec.connection_id, "registration"))
        return True

    def _failover_unreachable(self, c: _Conn) -> None:
        """The current target stopped answering: register at the next one now (it counts as a
        target that failed over); with no other target, the keepalives wait for this one."""
        hop, cursor = c.spec.hop, c.cursor
        if hop is None or cursor is None or len(hop.targets) < 2 or not c.policy.keeps_registering:
            return
        failed = hop.targets[cursor.index].label
        nxt = cursor.on_failover()
        if nxt is None:
            return
        c.log.warning("registrar_failover", failed=failed, reason="unreachable", target=hop.targets[nxt].label)
        self.emit(Failover(c.spec.connection_id, "registration"))
        c.probe.forget()  # the new target has not been heard from yet
        c.reachable = None
        c.policy.request_refresh()

    def _probe_best(self, adapter: Any, c: _Conn) -> None:
        """A connection registered at a lower target asks the best one, from the worker's own
        account, shortly before its refresh: it moves back only if that one answers."""
        hop, cursor, p = c.spec.hop, c.cursor, c.policy
        if hop is None or cursor is None or cursor.index == 0 or not hop.targets or self._best_probe is not None:
            return
        if p.state != RegState.REGISTERED or p.next_kind != "refresh" or c.best_probed_at is not None:
            return
        due = p.next_action_in
        if due is None or due > BEST_PROBE_AHEAD_SEC:
            return
        try:
            adapter.probe(hop.targets[0].uri)
        except Exception as e:
            c.log.debug("best_target_probe_not_sent", error=str(e))
            return
        c.best_probed_at = self._clock.monotonic()
        self._best_probe = c.spec.connection_id

    def _best_probe_result(self, ev: KeepaliveResult) -> None:
        cid, self._best_probe = self._best_probe, None
        c = self._conns.get(cid) if cid is not None else None
        if c is None:
            return
        if ev.received:
            c.best_answered_at = self._clock.monotonic()
        c.log.debug("best_target_probe", answered=ev.received, code=ev.code)

    def _keepalive(self, adapter: Any, c: _Conn) -> None:
        """Send a keepalive when one is due (agent/core/liveness.py)."""
        hop = c.spec.hop
        usable = hop is None or bool(hop.targets)
        if not c.probe.poll(allowed=c.policy.keeps_registering and usable):
            self._note_liveness(c)
            return
        acc = c.spec.account
        if hop is not None and c.cursor is not None:
            target = hop.targets[c.cursor.index].uri
        else:
            target = acc.proxies[0].replace(";lr", "") if acc.proxies else acc.registrar_uri
        try:
            adapter.send_keepalive(c.spec.connection_id, target)
            c.log.debug("keepalive_sent", target=target)
        except Exception as e:
            c.probe.on_failure(f"keepalive not sent: {e}")
        self._note_liveness(c)

    def _keepalive_result(self, c: _Conn, ev: KeepaliveResult) -> None:
        if ev.received:
            if c.probe.on_answer(ev.code, ev.reason) and c.policy.keeps_registering:
                # the registrar is back: whatever it lost, the binding is restored now
                c.log.info("registrar_answering_again", response=f"{ev.code} {ev.reason}".strip())
                c.policy.request_refresh()
        else:
            c.probe.on_failure(f"{ev.code} {ev.reason}".strip() or "no answer")
        self._note_liveness(c)

    def _note_liveness(self, c: _Conn) -> None:
        reachable, was = c.probe.reachable, c.reachable
        if reachable == was:
            return
        c.reachable = reachable
        if reachable is False:
            c.log.warning(
                "registrar_unreachable",
                misses=c.probe.misses,
                last_keepalive=c.probe.last_probe,
                registered=c.policy.registered,
                target=self._target_label(c),
            )
            self._failover_unreachable(c)
        elif reachable and was is False:
            c.log.info("registrar_reachable")

    def _dispatch(self) -> None:
        if not self._events:
            return
        events, self._events[:] = list(self._events), []
        for ev in events:
            if isinstance(ev, RegResult):
                c = self._conns.get(ev.key)
                if c is None:
                    continue
                in_flight = c.policy.state == RegState.REGISTERING
                failover = in_flight and self._failover(c, ev)
                outcome = c.policy.on_response(to_register_response(ev), failover=failover)
                if not outcome.ignored and not outcome.unregister:
                    c.probe.on_register_result(answered=ev.received)
                    self._note_liveness(c)
                self._report(c, outcome, ev.code)
            elif isinstance(ev, KeepaliveResult):
                if ev.key == FORWARD_KEY:
                    self._best_probe_result(ev)
                    continue
                c = self._conns.get(ev.key)
                if c is not None:
                    self._keepalive_result(c, ev)
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
            self._log.error("call_event_failed", event_type=type(ev).__name__, error=repr(e))

    def _route(self, connection_id: str) -> Route | None:
        c = self._conns.get(connection_id)
        return c.spec.route if c is not None else None

    def _registrar_ip(self, connection_id: str) -> str | None:
        c = self._conns.get(connection_id)
        return c.policy.last_registered_ip if c is not None else None

    def _report(self, c: _Conn, outcome: Outcome, code: int) -> None:
        if outcome.ignored:
            c.log.debug("register_response_ignored", response=outcome.text)
            return
        self.emit(RegisterAnswered(c.spec.connection_id, code, outcome.duration))
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

    def _note_state(self, c: _Conn, cause: str | None) -> None:
        p = c.policy
        key = (p.state, p.registered, p.registration_status)
        if key == c.last_state:
            return
        old = c.last_state
        c.last_state = key
        if old:
            # A refresh (REGISTERED -> REGISTERING -> REGISTERED) changes only the
            # state: debug. A change of registered or registration_status: info.
            log = c.log.info if old[1:] != key[1:] else c.log.debug
            log(
                "state_changed",
                old_state=str(old[0]),
                state=p.state.value,
                registered=p.registered,
                registration_status=int(p.registration_status),
                cause=cause or p.last_response,
            )

    def _publish(self) -> None:
        """Send the snapshot of every connection whose visible state changed."""
        for cid, c in self._conns.items():
            key = (*c.policy.change_key(), c.probe.view())
            if key != c.last_sent:
                c.last_sent = key
                self.emit(StateChanged(cid, self._snapshot(c)))

    def _snapshot(self, c: _Conn) -> PolicySnapshot:
        view = c.probe.view()
        changed = view.changed_at
        wall = None if changed is None else self._clock.time() + (changed - self._clock.monotonic())
        return replace(
            c.policy.snapshot(),
            target=self._target_label(c),
            registrar_reachable=view.reachable,
            keepalive_misses=view.misses,
            last_keepalive=view.last_probe,
            registrar_reachable_since=wall,
        )

    def _flow_lost(self, ev: TransportDown) -> None:
        kind = ev.kind.upper()
        if kind not in ("TCP", "TLS"):
            return
        self.emit(FlowLost(kind))
        for c in self._conns.values():
            if c.spec.account.transport != kind or not c.policy.registered:
                continue
            c.log.warning("flow_lost", transport=kind, remote=ev.remote or None, error=ev.error)
            c.policy.on_flow_lost()

    def _stack_log(self, ev: StackLog) -> None:
        msg = ev.message
        if "too many calls" in msg and "incoming" in msg:
            # pjsua answered an INVITE 486 itself: every call slot was in use
            self.emit(InboundRejected("", "over_limit"))
            self._log.warning("call_rejected", reason="over_limit", code=486, detail="all SIP call slots in use")
            return
        if self._stack.trace and ("TX " in msg[:40] or "RX " in msg[:40]):
            self._log.info("sip_trace", message=msg)
        elif ev.level <= 1:
            self._log.error("sip_stack", message=msg)
        elif ev.level == 2:
            self._log.warning("sip_stack", message=msg)
        else:
            self._log.debug("sip_stack", message=msg)

    # -- changes from the supervisor ----------------------------------------------

    def _change(self, key: str, request: int, fn: Callable[[], str | _Wait]) -> None:
        def run() -> None:
            if key in self._busy:
                self._waiting.setdefault(key, []).append((run, request))
                return
            if self._stop_deadline is not None:
                self.emit(Done(request, error_kind="stopping", error="the worker is stopping"))
                return
            try:
                result = fn()
            except ChangeError as e:
                self.emit(Done(request, error_kind=e.kind, error=str(e)))
                return
            except Exception as e:
                self.emit(Done(request, error_kind="rejected", error=str(e)))
                return
            if isinstance(result, _Wait):
                self._busy[key] = (result, request)
            else:
                self.emit(Done(request, result=result))

        run()

    def _run_waits(self) -> None:
        if not self._busy:
            return
        now = self._clock.monotonic()
        for key, (wait, request) in list(self._busy.items()):
            if not (wait.done() or now >= wait.deadline):
                continue
            del self._busy[key]
            try:
                self.emit(Done(request, result=wait.then()))
            except ChangeError as e:
                self.emit(Done(request, error_kind=e.kind, error=str(e)))
            except Exception as e:
                self.emit(Done(request, error_kind="rejected", error=str(e)))
            for run, _ in self._waiting.pop(key, []):
                run()

    def _fail_changes(self) -> None:
        pending = [request for _, request in self._busy.values()]
        pending += [request for queued in self._waiting.values() for _, request in queued]
        self._busy.clear()
        self._waiting.clear()
        for request in pending:
            self.emit(Done(request, error_kind="stopping", error="the worker stopped before the change completed"))

    def _wait_deadline(self) -> float:
        # An unregister is given up by the policy after unregister_timeout_sec; a
        # REGISTER in flight is waited for at most as long again.
        return self._clock.monotonic() + 2 * self._start.shutdown_timeout_sec + 1.0

    def _conn(self, connection_id: str) -> _Conn:
        c = self._conns.get(connection_id)
        if c is None:
            raise ChangeError("unknown", f"no connection {connection_id} on this worker")
        return c

    def _check_room(self, connection_id: str) -> None:
        others = sum(1 for k, c in self._conns.items() if k != connection_id and c.has_account)
        if others + 1 > MAX_CONNECTIONS:
            raise ChangeError(
                "limit", f"{others} connections run on this worker; a worker holds at most {MAX_CONNECTIONS}"
            )

    def _add_or_undo(self, spec: ConnSpec) -> None:
        try:
            self._add(spec)
        except Exception:
            c = self._conns.pop(spec.connection_id, None)
            if c is not None and c.has_account:
                self._adapter.remove_account(spec.connection_id)
            raise

    def _apply(self, spec: ConnSpec) -> str | _Wait:
        key = spec.connection_id
        old = self._conns.get(key)
        if old is None:
            self._check_room(key)
            self._add_or_undo(spec)
            return "added"
        if old.spec.account == spec.account:
            self._retarget(old, spec)
            old.spec = spec
            old.policy.settings = spec.policy
            old.probe.interval = spec.policy.keepalive_interval_sec
            old.probe.misses_allowed = max(1, spec.policy.keepalive_misses)
            old.log.info("connection_updated", reregister=False)
            return "updated"
        old.log.info("connection_replacing", registered=old.policy.registered)
        old.policy.stop()
        return _Wait(
            done=lambda: old.policy.finished, deadline=self._wait_deadline(), then=lambda: self._replace(old, spec)
        )

    def _retarget(self, c: _Conn, spec: ConnSpec) -> None:
        """New targets for the same account (the supervisor looked the host up again)."""
        new = spec.hop
        if new == c.spec.hop:
            return
        if new is None:
            c.cursor = None
            return
        current = c.spec.hop.targets[c.cursor.index].uri if c.spec.hop and c.cursor and c.spec.hop.targets else None
        uris = [t.uri for t in new.targets]
        keep = uris.index(current) if current in uris else None
        if c.cursor is None:
            c.cursor = TargetCursor(len(uris))
        c.cursor.retarget(len(uris), keep)
        c.log.info("registrar_targets_changed", targets=[t.label for t in new.targets], error=new.error)

    def _replace(self, old: _Conn, spec: ConnSpec) -> str:
        key = spec.connection_id
        if old.has_account:
            self._adapter.remove_account(key)
            old.has_account = False
        self._conns.pop(key, None)
        spec = replace(spec, register_at_once=True)
        try:
            self._add_or_undo(spec)
        except Exception as e:
            old.log.error("connection_replace_failed", error=str(e))
            try:
                restored = old.spec
                self._add_or_undo(replace(restored, register_at_once=True))  # carry on with what worked
            except Exception as e2:
                old.log.error("connection_restore_failed", error=str(e2))
            raise
        return "replaced"

    def _remove(self, connection_id: str) -> str | _Wait:
        c = self._conn(connection_id)
        c.log.info("connection_removing", registered=c.policy.registered)
        c.policy.stop()
        return _Wait(done=lambda: c.policy.finished, deadline=self._wait_deadline(), then=lambda: self._drop(c))

    def _drop(self, c: _Conn) -> str:
        key = c.spec.connection_id
        if c.has_account:
            self._adapter.remove_account(key)
            c.has_account = False
        if self._conns.get(key) is c:
            del self._conns[key]
        c.log.info("connection_removed", last_response=c.policy.last_response)
        return "removed"

    def _register_now(self, connection_id: str) -> str | _Wait:
        c = self._conn(connection_id)
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

    def _unregister_now(self, connection_id: str) -> str | _Wait:
        c = self._conn(connection_id)
        c.log.info("unregister_requested", registered=c.policy.registered)
        c.policy.stop()
        return _Wait(done=lambda: c.policy.finished, deadline=self._wait_deadline(), then=lambda: c.policy.state.value)
