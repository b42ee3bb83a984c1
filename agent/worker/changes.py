"""Changes the supervisor asks of a worker (Apply, Remove, RegisterNow, UnregisterNow).

Rules
-----
* Changes to one connection run one at a time, in order; connections a change
  does not name are never touched.
* A change either answers at once, or returns a :class:`Wait` (it must wait
  for an unregister's answer): it is parked and continues from the SIP
  thread's loop once its condition holds, or at its deadline; changes queued
  behind it run after it.
* Every change is answered with one ``Done``: its result, or why it was refused
  (:class:`ChangeError` carries the kind the supervisor maps to an answer).
* Once the worker stops, parked and queued changes are answered "stopping".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from agent.core.policy import RegState
from agent.ipc.messages import ConnSpec, Done, ErrorKind, Event

if TYPE_CHECKING:
    from agent.worker.registrations import Conn, Registrations

__all__ = ["ChangeError", "ChangeQueue", "ConnectionChanges", "Wait"]


class ChangeError(Exception):
    """A change the worker refuses; ``kind`` tells the supervisor which."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind


@dataclass
class Wait:
    """A change that continues once ``done()`` (or at ``deadline``, monotonic)."""

    done: Callable[[], bool]
    deadline: float
    then: Callable[[], str]


class ChangeQueue:
    """Runs changes one at a time per connection, parking those that must wait."""

    def __init__(self, emit: Callable[[Event], None], now: Callable[[], float], stopping: Callable[[], bool]) -> None:
        self._emit = emit
        self._now = now
        self._stopping = stopping
        self._busy: dict[str, tuple[Wait, int]] = {}  # connection_id -> (change in progress, request)
        self._waiting: dict[str, list[tuple[Callable[[], None], int]]] = {}  # changes queued behind it

    def run(self, key: str, request: int, fn: Callable[[], str | Wait]) -> None:
        def go() -> None:
            if key in self._busy:
                self._waiting.setdefault(key, []).append((go, request))
                return
            if self._stopping():
                self._emit(Done(request, error_kind="stopping", error="the worker is stopping"))
                return
            try:
                result = fn()
            except ChangeError as e:
                self._emit(Done(request, error_kind=e.kind, error=str(e)))
                return
            except Exception as e:
                self._emit(Done(request, error_kind="rejected", error=str(e)))
                return
            if isinstance(result, Wait):
                self._busy[key] = (result, request)
            else:
                self._emit(Done(request, result=result))

        go()

    def poll(self) -> None:
        """Continue the parked changes whose condition holds (or whose deadline passed)."""
        if not self._busy:
            return
        now = self._now()
        for key, (wait, request) in list(self._busy.items()):
            if not (wait.done() or now >= wait.deadline):
                continue
            del self._busy[key]
            try:
                self._emit(Done(request, result=wait.then()))
            except ChangeError as e:
                self._emit(Done(request, error_kind=e.kind, error=str(e)))
            except Exception as e:
                self._emit(Done(request, error_kind="rejected", error=str(e)))
            for go, _ in self._waiting.pop(key, []):
                go()

    def next_deadline(self) -> float | None:
        return min((w.deadline for w, _ in self._busy.values()), default=None)

    def fail_all(self) -> None:
        pending = [request for _, request in self._busy.values()]
        pending += [request for queued in self._waiting.values() for _, request in queued]
        self._busy.clear()
        self._waiting.clear()
        for request in pending:
            self._emit(Done(request, error_kind="stopping", error="the worker stopped before the change completed"))


class ConnectionChanges:
    """What each change does to the worker's registrations."""

    def __init__(self, regs: Registrations, wait_sec: float) -> None:
        self._regs = regs
        # An unregister is given up by the policy after unregister_timeout_sec; a
        # REGISTER in flight is waited for at most as long again.
        self._wait_sec = wait_sec

    def _deadline(self) -> float:
        return self._regs.now() + self._wait_sec

    def _conn(self, connection_id: str) -> Conn:
        c = self._regs.conns.get(connection_id)
        if c is None:
            raise ChangeError("unknown", f"no connection {connection_id} on this worker")
        return c

    def _check_room(self, connection_id: str) -> None:
        others = sum(1 for k, c in self._regs.conns.items() if k != connection_id and c.has_account)
        limit = self._regs.max_connections
        if others + 1 > limit:
            raise ChangeError("limit", f"{others} connections run on this worker; a worker holds at most {limit}")

    def apply(self, spec: ConnSpec) -> str | Wait:
        key = spec.connection_id
        old = self._regs.conns.get(key)
        if old is None:
            self._check_room(key)
            self._regs.add_or_undo(spec)
            return "added"
        if old.spec.account == spec.account:
            self._regs.update(old, spec)
            return "updated"
        old.log.info("connection_replacing", registered=old.policy.registered)
        old.policy.stop()
        return Wait(done=lambda: old.policy.finished, deadline=self._deadline(), then=lambda: self._replace(old, spec))

    def _replace(self, old: Conn, spec: ConnSpec) -> str:
        self._regs.drop(old, quiet=True)
        try:
            self._regs.add_or_undo(replace(spec, register_at_once=True))
        except Exception as e:
            old.log.error("connection_replace_failed", error=str(e))
            try:
                self._regs.add_or_undo(replace(old.spec, register_at_once=True))  # carry on with what worked
            except Exception as e2:
                old.log.error("connection_restore_failed", error=str(e2))
            raise
        return "replaced"

    def remove(self, connection_id: str) -> str | Wait:
        c = self._conn(connection_id)
        c.log.info("connection_removing", registered=c.policy.registered)
        c.policy.stop()
        return Wait(done=lambda: c.policy.finished, deadline=self._deadline(), then=lambda: self._regs.drop(c))

    def register_now(self, connection_id: str) -> str | Wait:
        c = self._conn(connection_id)
        p = c.policy

        def restart() -> str:
            if p.state == RegState.STOPPED:
                p.activate()
            p.request_refresh()
            c.log.info("register_requested", state=p.state.value)
            return p.state.value

        if p.state == RegState.UNREGISTERING:
            return Wait(done=lambda: p.finished, deadline=self._deadline(), then=restart)
        return restart()

    def unregister_now(self, connection_id: str) -> str | Wait:
        c = self._conn(connection_id)
        c.log.info("unregister_requested", registered=c.policy.registered)
        c.policy.stop()
        return Wait(done=lambda: c.policy.finished, deadline=self._deadline(), then=lambda: c.policy.state.value)
