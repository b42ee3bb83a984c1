"""The SIP stack as a worker sees it: its limits, its errors, and its interface.

Rules
-----
* The stack is reached only through :class:`Stack`, a ``Protocol``; the pjsua2
  adapter (``agent/worker/adapter.py``, the only module that imports pjsua2)
  implements it, and so does the unit tests' fake (mypy checks both).
* The stack's compile-time limits are facts published here as
  :data:`LIMITS` (plain numbers: the supervisor's config checks against them
  without importing pjsua2). The adapter checks them against the running stack
  at start, and refuses cleanly before one is broken (breaking one aborts the
  process). No stack-specific name, error text or log text leaves the adapter:
  it raises :class:`StackError` or :class:`NoCallSlotError`, and reports what it
  sees as the events of ``agent/worker/events.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent.ipc.messages import AccountSpec, StackSettings
from agent.worker.events import SipEvent

__all__ = ["LIMITS", "NoCallSlotError", "Stack", "StackError", "StackFactory", "StackLimits"]


@dataclass(frozen=True)
class StackLimits:
    """What one worker process's SIP stack holds at most."""

    accounts: int  # accounts per process: the registering connections and the worker's own
    call_slots: int  # call legs per process

    @property
    def connections(self) -> int:
        """Registering connections per worker: one account is the worker's own (leg B of calls)."""
        return self.accounts - 1

    @property
    def bridged_calls(self) -> int:
        """Calls a worker bridges at once: each holds two legs (from the PBX, to the destination)."""
        return self.call_slots // 2

    @property
    def rtp_ports(self) -> int:
        """RTP ports a worker's slice needs at least: RTP and RTCP for each call leg."""
        return 2 * self.call_slots


# Measured on the pjsua2-python wheel (tests/integration/test_stack_limits.py): 8 accounts
# (a 9th aborts the process) and 4 call slots (maxCalls above 4 is ignored; a 5th call fails).
LIMITS = StackLimits(accounts=8, call_slots=4)


class StackError(Exception):
    """The stack refused an operation; the message says why in the agent's words."""


class NoCallSlotError(StackError):
    """Every call slot of the process is in use (or still closing): the call gets the over-limit answer."""


class Stack(Protocol):
    """What the SIP thread asks of the stack (every method on the SIP thread only)."""

    published_host: str  # the host the worker's own account names (never 0.0.0.0)

    def start(self, s: StackSettings) -> None: ...
    def handle_events(self, msec: int) -> None: ...
    def shutdown(self) -> None: ...

    @property
    def busy(self) -> bool: ...

    # -- registrations --
    def add_account(self, spec: AccountSpec, route: str | None = None) -> None: ...
    def remove_account(self, key: str) -> None: ...
    def register(self, key: str) -> None: ...
    def unregister(self, key: str) -> None: ...
    def set_route(self, key: str, route: str) -> None: ...
    def send_keepalive(self, key: str, target_uri: str) -> None: ...
    def probe(self, target_uri: str) -> None: ...

    # -- calls --
    @property
    def free_call_slots(self) -> int: ...

    def answer(self, leg: int, code: int, contact: str | None = None, retry_after: int | None = None) -> None: ...
    def hangup(self, leg: int, code: int = 0) -> None: ...
    def make_call(
        self, dest_uri: str, from_uri: str | None, media_address: str | None = None, target: str | None = None
    ) -> tuple[int, str]: ...
    def bridge(self, a: int, b: int) -> bool: ...
    def send_dtmf(self, leg: int, digit: str, method: str, duration_ms: int = 0) -> None: ...
    def release(self, leg: int) -> None: ...


# Builds the stack for a worker; the callback receives everything the stack reports.
StackFactory = Callable[[Callable[[SipEvent], None]], Stack]
