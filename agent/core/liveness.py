"""Registrar liveness of one connection: OPTIONS keepalives, with no I/O.

Rules
-----
* Every ``interval`` seconds (``registration.keepalive_interval_sec``; 0 turns
  it off) the registrar, or the outbound proxy when one is set, must have shown
  it is alive: any final SIP answer to a keepalive OPTIONS, or to a REGISTER,
  counts. A window that ends with no answer is a **miss**; so is a REGISTER
  that failed with no SIP answer (timeout, transport error).
* After ``misses_allowed`` misses in a row the registrar is **unreachable**
  (``reachable`` False). The binding is still assumed until its granted expiry
  passes (the policy's ``registered``): the registrar may only be cut off from
  the agent, and nothing says it lost the binding; what it lost is restored at
  once when it answers again.
* The **first answer after a miss** is a recovery: the caller registers at
  once, whatever the expiry or the backoff (a registrar that comes back empty,
  a standby that takes over). A registrar that answers with errors is not
  missing: the policy's backoff governs its REGISTERs.
* Never hammers: at most one keepalive in flight (a transaction the stack has
  not finished is not doubled: its retransmissions are the probe), none while
  a REGISTER is in flight, none while the connection is not registering
  (the caller says when probing is allowed).
* Connections of one worker that share a registrar (same target and
  transport) share its answers: an answer to one's keepalive counts for all
  (``on_peer_answer``), and a connection whose last window saw such an answer
  sends none in the next one. So a worker sends about one keepalive per
  registrar per interval, not one per connection; a miss is counted only in a
  window in which the connection itself was probing.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.core.clock import Clock

__all__ = ["ProbeView", "RegistrarProbe"]


@dataclass(frozen=True)
class ProbeView:
    """What the status shows of a connection's registrar liveness."""

    reachable: bool | None  # None: not probed yet (or keepalives off)
    misses: int
    changed_at: float | None  # monotonic time ``reachable`` last changed
    last_probe: str | None  # the last keepalive's result, e.g. "200 OK" or "no answer"


class RegistrarProbe:
    def __init__(self, interval: float, misses_allowed: int, clock: Clock) -> None:
        self.interval = interval
        self.misses_allowed = max(1, misses_allowed)
        self._clock = clock
        self.misses = 0
        self.reachable: bool | None = None
        self.in_flight = False  # a keepalive transaction the stack has not finished
        self._window_end: float | None = None  # None: not probing
        self._answered = False  # an answer arrived in the current window
        self._probing = False  # this connection probes in the current window (its own keepalive)
        self._peer_heard = False  # a peer's keepalive was answered in the current window
        self.changed_at: float | None = None
        self.last_probe: str | None = None

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def _restart_window(self) -> None:
        self._window_end = self._clock.monotonic() + self.interval
        self._answered = False
        self._peer_heard = False

    def _set(self, reachable: bool) -> None:
        if reachable != self.reachable:
            self.reachable = reachable
            self.changed_at = self._clock.monotonic()

    def _miss(self) -> None:
        self.misses += 1
        if self.misses >= self.misses_allowed:
            self._set(False)

    def poll(self, allowed: bool) -> bool:
        """Advance time; True when a keepalive must be sent now. ``allowed``: the connection is
        registering and no REGISTER is in flight."""
        if not self.enabled:
            return False
        if not allowed:
            self._window_end = None  # paused: a REGISTER in flight will say more than a probe
            return False
        now = self._clock.monotonic()
        if self._window_end is None:
            # (re)start: a REGISTER has just been answered or failed; the first keepalive
            # goes one interval later, and nothing can be missed before it
            self._window_end = now + self.interval
            self._answered = True
            self._probing = False
            return False
        if now < self._window_end:
            return False
        if self._probing and not self._answered:
            self._miss()
            self.last_probe = "no answer"
        peer = self._peer_heard
        self._restart_window()
        if peer and not self.in_flight:
            self._probing = False  # a peer's keepalive was answered: none needed from this one now
            return False
        self._probing = True
        if self.in_flight:
            return False  # its retransmissions still probe; one transaction at a time
        self.in_flight = True
        return True

    def on_answer(self, code: int, reason: str = "") -> bool:
        """A final SIP answer to a keepalive; True when it is the first after a miss (register now)."""
        self.in_flight = False
        self.last_probe = f"{code} {reason}".strip()
        return self._alive()

    def on_peer_answer(self) -> bool:
        """Another connection's keepalive to the same registrar was answered: it is alive (True: the
        first answer after a miss, register now)."""
        self._peer_heard = True
        return self._alive()

    def on_failure(self, text: str) -> None:
        """The keepalive transaction ended with no SIP answer (timeout, transport error): the miss is
        counted when its window ends."""
        self.in_flight = False
        self.last_probe = text

    def on_register_result(self, answered: bool) -> bool:
        """A REGISTER's outcome: a SIP answer shows the registrar is alive (True: first after a miss,
        though the REGISTER itself already restores the binding); none is a miss."""
        if answered:
            return self._alive()
        self._miss()
        self._window_end = None
        return False

    def _alive(self) -> bool:
        recovered = self.misses > 0 or self.reachable is False
        self.misses = 0
        self._set(True)
        self._answered = True
        return recovered

    def forget(self) -> None:
        """A new target: nothing is known of it yet."""
        self.misses = 0
        self.reachable = None
        self.changed_at = self._clock.monotonic()
        self._window_end = None

    def next_deadline(self) -> float | None:
        """Monotonic time ``poll`` must next run (None: only an event changes anything)."""
        return self._window_end if self.enabled else None

    def view(self) -> ProbeView:
        return ProbeView(self.reachable, self.misses, self.changed_at, self.last_probe)
