"""What a worker tells the supervisor about its connections: log lines, metric events, states.

Rules
-----
* Every REGISTER answer is one ``register_response`` line (info when it leaves
  the connection registered, else warning) and one ``RegisterAnswered`` event
  (the supervisor's metrics); answers the policy ignored are debug lines only.
* ``state_changed`` is logged at info when ``registered`` or
  ``registration_status`` changed, at debug when only the state did (a
  refresh goes REGISTERED -> REGISTERING -> REGISTERED).
* A connection's snapshot goes to the supervisor only when something a reader
  can see changed (the policy's ``change_key`` and the registrar's liveness).
* The stack's own log lines keep their level; a SIP trace (``sip.trace``) is
  logged at info.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from agent.core.clock import Clock
from agent.core.policy import Outcome, PolicySnapshot
from agent.ipc.messages import Event, RegisterAnswered, StateChanged
from agent.worker.events import StackLog

if TYPE_CHECKING:
    from agent.worker.registrations import Conn

__all__ = ["Reporter"]


class Reporter:
    def __init__(self, emit: Callable[[Event], None], log: Any, clock: Clock, trace: bool) -> None:
        self._emit = emit
        self._log = log
        self._clock = clock
        self._trace = trace

    def response(self, c: Conn, outcome: Outcome, code: int) -> None:
        if outcome.ignored:
            c.log.debug("register_response_ignored", response=outcome.text)
            return
        self._emit(RegisterAnswered(c.spec.connection_id, code, outcome.duration))
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
        self.state(c, outcome.text)

    def state(self, c: Conn, cause: str | None) -> None:
        p = c.policy
        key = (p.state, p.registered, p.registration_status)
        if key == c.last_state:
            return
        old = c.last_state
        c.last_state = key
        if old:
            log = c.log.info if old[1:] != key[1:] else c.log.debug
            log(
                "state_changed",
                old_state=str(old[0]),
                state=p.state.value,
                registered=p.registered,
                registration_status=int(p.registration_status),
                cause=cause or p.last_response,
            )

    def liveness(self, c: Conn, target: str | None) -> bool:
        """Log a change of the registrar's liveness; True when it just became unreachable."""
        reachable, was = c.probe.reachable, c.reachable
        if reachable == was:
            return False
        c.reachable = reachable
        if reachable is False:
            c.log.warning(
                "registrar_unreachable",
                misses=c.probe.misses,
                last_keepalive=c.probe.last_probe,
                registered=c.policy.registered,
                target=target,
            )
            return True
        if reachable and was is False:
            c.log.info("registrar_reachable")
        return False

    def publish(self, conns: Iterable[Conn], target_of: Callable[[Conn], str | None]) -> None:
        """Send the snapshot of every connection whose visible state changed."""
        for c in conns:
            target = target_of(c)
            key = (*c.policy.change_key(), c.probe.view(), target)
            if key != c.last_sent:
                c.last_sent = key
                self._emit(StateChanged(c.spec.connection_id, self.snapshot(c, target)))

    def snapshot(self, c: Conn, target: str | None) -> PolicySnapshot:
        view = c.probe.view()
        changed = view.changed_at
        wall = None if changed is None else self._clock.time() + (changed - self._clock.monotonic())
        return replace(
            c.policy.snapshot(),
            target=target,
            registrar_reachable=view.reachable,
            keepalive_misses=view.misses,
            last_keepalive=view.last_probe,
            registrar_reachable_since=wall,
        )

    def stack_log(self, ev: StackLog) -> None:
        msg = ev.message
        if self._trace and ("TX " in msg[:40] or "RX " in msg[:40]):
            self._log.info("sip_trace", message=msg)
        elif ev.level <= 1:
            self._log.error("sip_stack", message=msg)
        elif ev.level == 2:
            self._log.warning("sip_stack", message=msg)
        else:
            self._log.debug("sip_stack", message=msg)
