"""structlog set-up: JSON lines by default, a readable console format on request.

A last processor redacts anything that looks like a secret, so that even a
careless log call cannot leak a password or an Authorization value.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
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


def configure_logging(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> Any:
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger("uac-agent")
