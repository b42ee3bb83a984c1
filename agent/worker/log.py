"""A worker's logger: structlog's calling style, lines sent to the supervisor.

The supervisor writes every worker's lines to its one log stream, adding
``worker`` (and redacting secrets, as for its own lines). Lines below the
configured level are dropped here, so they never cross the socket. Values are
reduced to JSON types before they are sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.ipc.messages import Event, Log

__all__ = ["LEVELS", "WorkerLog", "plain"]

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def plain(value: Any) -> Any:
    """``value`` as JSON types (str, int, float, bool, None, lists and dicts of them)."""
    if value is None or isinstance(value, bool):
        return value
    for kind in (int, float, str):  # enums and other subclasses become their plain value
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return str(value)


class WorkerLog:
    def __init__(self, emit: Callable[[Event], None], level: str = "info", context: dict[str, Any] | None = None):
        self._emit = emit
        self._threshold = LEVELS.get(level, 20)
        self._context = context or {}

    def bind(self, **kw: Any) -> WorkerLog:
        out = WorkerLog(self._emit, "info", {**self._context, **kw})
        out._threshold = self._threshold
        return out

    def _log(self, level: str, event: str, kw: dict[str, Any]) -> None:
        if LEVELS[level] < self._threshold:
            return
        fields = {k: plain(v) for k, v in {**self._context, **kw}.items()}
        self._emit(Log(level=level, event=event, fields=fields))

    def debug(self, event: str, **kw: Any) -> None:
        self._log("debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._log("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._log("error", event, kw)
