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
  it raises :class:`StackError`, and reports what it sees as the events of
  ``agent/worker/events.py``.
* The stack registers and nothing else: calls are the edge's (``agent/edge``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent.ipc.messages import AccountSpec, StackSettings
from agent.worker.events import SipEvent

__all__ = ["LIMITS", "Stack", "StackError", "StackFactory", "StackLimits"]


@dataclass(frozen=True)
class StackLimits:
    """What one worker process's SIP stack holds at most."""

    accounts: int  # accounts per process: the registering connections and the worker's own

    @property
    def connections(self) -> int:
        """Registering connections per worker: one account is the worker's own (probes of a
        registrar's other targets)."""
        return self.accounts - 1


# The pjsua2-python wheel is built with PJSUA_MAX_ACC = 8: a 9th account aborts the process.
LIMITS = StackLimits(accounts=8)


class StackError(Exception):
    """The stack refused an operation; the message says why in the agent's words."""


class Stack(Protocol):
    """What the SIP thread asks of the stack (every method on the SIP thread only)."""

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


# Builds the stack for a worker; the callback receives everything the stack reports.
StackFactory = Callable[[Callable[[SipEvent], None]], Stack]
