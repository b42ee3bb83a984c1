"""Why the worker pool refused or could not finish a change (the API maps each to its status code)."""

from __future__ import annotations

__all__ = [
    "ConnectionLimitError",
    "EngineError",
    "NotRegisteringError",
    "StackRejectedError",
    "UnknownConnectionError",
    "WorkerLostError",
]


class EngineError(RuntimeError):
    """The workers cannot carry out the change now (starting, stopping, restarting): 503."""


class ConnectionLimitError(EngineError):
    """One more registering connection would pass ``workers.max_connections``: 409."""


class UnknownConnectionError(EngineError):
    """No connection has that id."""


class NotRegisteringError(EngineError):
    """The connection keeps no registration (inactive, or no external_uac_settings)."""


class WorkerLostError(EngineError):
    """The worker holding the connection stopped before it answered; nothing was changed."""


class StackRejectedError(Exception):
    """The SIP stack refused the settings (422): the message says why."""
