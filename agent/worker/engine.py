"""A worker's SIP thread: the one thread that owns pjsua2 in its process.

It creates the stack (Endpoint, transports, accounts), blocks in
``libHandleEvents`` until the next deadline (a policy's refresh or retry, a
binding's expiry, a REGISTER's timeout, a keepalive) or until a
command arrives, hands what the stack reports to the part that owns it, and
sends what they report to the supervisor (``agent.ipc.messages``).

The parts, one concern each:

* this module: the thread's lifecycle and loop, and the dispatch of commands
  and stack events (tables keyed by type);
* ``registrations.py``: each connection's policy, liveness and DNS targets;
* ``changes.py``: the changes the supervisor asks for, one at a time per connection;
* ``reporting.py``: log lines, metric events and state snapshots.

A worker holds registrations only: calls from the PBX reach the edge, never a worker.

Other threads reach it only through :meth:`WorkerEngine.submit`, which queues
the command and wakes the loop (``wake``: a datagram to the worker's own SIP
port, so ``libHandleEvents`` returns at once).
"""

from __future__ import annotations

import math
import os
import queue
import random
from collections.abc import Callable
from typing import Any

from agent.core.clock import Clock
from agent.core.policy import RegistrationPolicy
from agent.ipc.messages import (
    Apply,
    Command,
    Event,
    FlowClosed,
    Ping,
    Pong,
    Ready,
    RegisterNow,
    Remove,
    Shutdown,
    Start,
    StartFailed,
    Stopped,
    UnregisterNow,
)
from agent.worker.changes import ChangeQueue, ConnectionChanges, Wait
from agent.worker.events import FORWARD_KEY, KeepaliveResult, RegResult, RegStarted, SipEvent, StackLog
from agent.worker.log import WorkerLog
from agent.worker.registrations import Registrations
from agent.worker.reporting import Reporter
from agent.worker.stack import Stack, StackFactory

__all__ = ["WorkerEngine"]

# Longest block in libHandleEvents with nothing due: the supervisor's pings
# wake the loop more often than this anyway.
IDLE_CAP_SEC = 60.0
# While the stack has work in hand, the loop comes round at least this often.
BUSY_CAP_SEC = 0.05


class WorkerEngine:
    def __init__(
        self,
        start: Start,
        stack_factory: StackFactory,
        send: Callable[[list[Event]], None],
        wake: Callable[[], None],
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self._start = start
        self._settings = start.stack
        self._stack_factory = stack_factory
        self._send = send
        self._wake = wake
        self._log = WorkerLog(self.emit, start.log_level)  # its lines go to the supervisor
        self._clock = clock
        self._rng = rng or random.Random()
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._events: list[SipEvent] = []
        self._out: list[Event] = []
        self._reporter = Reporter(self.emit, self._log, clock, start.stack.trace)
        self._regs: Registrations | None = None
        self._changes = ChangeQueue(self.emit, clock.monotonic, lambda: self._stop_deadline is not None)
        self._ops: ConnectionChanges | None = None
        self._stop_deadline: float | None = None  # monotonic; set once a stop is asked for
        self._stop_reason = ""
        self._on_command: dict[type, Callable[[Any], None]] = {
            Ping: lambda cmd: self.emit(Pong(cmd.seq)),
            Apply: lambda cmd: self._change(cmd.spec.connection_id, cmd.request, lambda ops: ops.apply(cmd.spec)),
            Remove: lambda cmd: self._change(cmd.connection_id, cmd.request, lambda ops: ops.remove(cmd.connection_id)),
            RegisterNow: lambda cmd: self._change(
                cmd.connection_id, cmd.request, lambda ops: ops.register_now(cmd.connection_id)
            ),
            UnregisterNow: lambda cmd: self._change(
                cmd.connection_id, cmd.request, lambda ops: ops.unregister_now(cmd.connection_id)
            ),
            FlowClosed: lambda cmd: self._regs.on_flow_closed(cmd.address, cmd.port) if self._regs else None,
            Shutdown: lambda cmd: self.request_stop(cmd.deadline_sec, cmd.reason),
            Start: lambda cmd: self._log.warning("start_ignored", reason="the stack is already started"),
        }
        self._on_event: dict[type, Callable[[Any], None]] = {}

    # -- other threads ----------------------------------------------------------

    def submit(self, command: Command) -> None:
        """Queue ``command`` for the SIP thread and wake it (the only entry point for others)."""
        self._commands.put(command)
        self._wake()

    def emit(self, event: Event) -> None:
        """Queue an event for the supervisor (SIP thread only; sent at the end of the loop)."""
        self._out.append(event)

    # -- for tests ------------------------------------------------------------------

    def policy_of(self, connection_id: str) -> RegistrationPolicy | None:
        """The registration policy of ``connection_id`` on this worker (read it, in a test only)."""
        c = self._regs.conns.get(connection_id) if self._regs is not None else None
        return c.policy if c is not None else None

    # -- the SIP thread -----------------------------------------------------------

    def run(self) -> int:
        """Start the stack, loop until stopped, shut the stack down. Returns the exit code."""
        try:
            stack = self._stack_factory(self._events.append)
            stack.start(self._settings)
        except Exception as e:
            self._log.error("sip_start_failed", error=str(e))
            self.emit(StartFailed(error=str(e)))
            self._flush()
            return 1
        regs = Registrations(stack, self._clock, self._rng, self._log, self.emit, self._reporter)
        self._regs = regs
        self._ops = ConnectionChanges(regs, 2 * self._start.shutdown_timeout_sec + 1.0)
        self._on_event = {
            RegResult: regs.on_reg_result,
            RegStarted: regs.on_reg_started,
            KeepaliveResult: lambda ev: regs.on_keepalive_result(ev, forward=ev.key == FORWARD_KEY),
            StackLog: self._reporter.stack_log,
        }
        s = self._settings
        self._log.info("worker_started", sip=f"{s.bind}:{s.port}", edge=s.edge_route)
        self.emit(Ready(pid=os.getpid()))
        self._flush()
        unfinished: list[str] = []
        try:
            unfinished = self._loop(stack, regs)
        except BaseException as e:
            self._log.error("sip_thread_crashed", error=repr(e))
            raise
        finally:
            try:
                stack.shutdown()
            except Exception as e:
                self._log.error("sip_stack_shutdown_failed", error=repr(e))
            self._changes.fail_all()
            self._log.info("worker_stopped", reason=self._stop_reason or None, still_registered=unfinished or None)
            self.emit(Stopped(unfinished=tuple(unfinished)))
            self._flush()
        return 0

    def request_stop(self, deadline_sec: float, reason: str) -> None:
        """Unregister everything, then leave the loop (SIP thread only: use submit(Shutdown) elsewhere)."""
        if self._stop_deadline is None:
            self._stop_deadline = self._clock.monotonic() + deadline_sec
            self._stop_reason = reason
            regs = self._regs
            self._log.info(
                "stopping", connections=len(regs.conns) if regs else 0, reason=reason, deadline_sec=deadline_sec
            )
            if regs is not None:
                regs.stop_all()

    def _loop(self, stack: Stack, regs: Registrations) -> list[str]:
        while True:
            self._run_commands()
            regs.step_all()
            self._changes.poll()
            regs.publish()
            self._flush()  # before blocking: answers and states leave at once
            if self._stop_deadline is not None:
                pending = regs.unfinished()
                if not pending:
                    return []
                if self._clock.monotonic() >= self._stop_deadline:
                    self._log.warning("stop_deadline_passed", still_unregistering=pending)
                    return pending
            stack.handle_events(self._timeout_ms(stack, regs))
            self._dispatch()

    def _timeout_ms(self, stack: Stack, regs: Registrations) -> int:
        """How long libHandleEvents may block: until the next deadline, 0 with commands queued."""
        if not self._commands.empty():
            return 0
        now = self._clock.monotonic()
        cap = BUSY_CAP_SEC if stack.busy else IDLE_CAP_SEC
        deadlines = (regs.next_deadline(), self._changes.next_deadline(), self._stop_deadline)
        due = min([now + cap, *(d for d in deadlines if d is not None)])
        return max(0, math.ceil((due - now) * 1000))

    def _run_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                self._on_command[type(cmd)](cmd)
            except Exception as e:  # a bad command must never take the SIP thread down
                self._log.error("command_failed", command=type(cmd).__name__, error=repr(e))

    def _change(self, key: str, request: int, change: Callable[[ConnectionChanges], str | Wait]) -> None:
        ops = self._ops
        assert ops is not None  # commands run once the stack has started
        self._changes.run(key, request, lambda: change(ops))

    def _dispatch(self) -> None:
        if not self._events:
            return
        events, self._events[:] = list(self._events), []
        for ev in events:
            handler = self._on_event.get(type(ev))
            if handler is None:
                continue
            try:
                handler(ev)
            except Exception as e:  # a bad event must never take the SIP thread down
                self._log.error("stack_event_failed", event_type=type(ev).__name__, error=repr(e))

    def _flush(self) -> None:
        if self._out:
            batch, self._out = self._out, []
            self._send(batch)
