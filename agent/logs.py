"""structlog set-up: JSON lines by default, a readable console format on request.

A last processor redacts anything that looks like a secret, so that even a
careless log call cannot leak a password or an Authorization value.

Under systemd, when stdout is the journal (``JOURNAL_STREAM`` names it), each
line starts with its syslog priority (``<4>`` for warning, sd-daemon(3)): journald
strips it and files the line at that priority, so ``journalctl -p warning``
shows warnings and errors. Anywhere else the lines are plain JSON.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

from agent.core.sipmsg import redact

__all__ = ["configure_logging", "redact_processor"]

_SECRET_KEYS = {"password", "api_key", "authorization", "proxy_authorization", "secret"}


def redact_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if key.lower() in _SECRET_KEYS:
            event[key] = "***"
        elif isinstance(event[key], str) and ("uthorization" in event[key] or "response=" in event[key]):
            event[key] = redact(event[key])
    return event


# sd-daemon(3) priorities of the agent's levels.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def writes_to_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Whether ``stream`` is the journal's stream (``JOURNAL_STREAM=<dev>:<inode>`` names it)."""
    dev, _, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def _with_priority(renderer: Any) -> Any:
    def render(logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        priority = _PRIORITY.get(str(event.get("level", "info")), 6)
        return f"<{priority}>{renderer(logger, name, event)}"

    return render


def configure_logging(
    fmt: str = "json", level: str = "info", stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> Any:
    out = stream or sys.stdout
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    if writes_to_journal(out, os.environ if environ is None else environ):
        renderer = _with_priority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger("uac-agent")
