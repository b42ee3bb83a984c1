"""structlog set-up: JSON lines by default, a readable console format on request.

A last processor redacts anything that looks like a secret, so that even a
careless log call cannot leak a password or an Authorization value.

Under systemd, when stdout is the journal (``JOURNAL_STREAM`` names it), each
line starts with its syslog priority (``<4>`` for warning, sd-daemon(3)): journald
strips it and files the line at that priority, so ``journalctl -p warning``
shows warnings and errors. Anywhere else the lines are plain JSON.

Logging never waits for whoever reads the log. The agent's lines go into a bounded queue
(:class:`LineSink`) that one writer thread empties into stdout; a caller (the SIP-facing
loops, the HTTP threads) only appends. When the reader falls behind and the queue is full,
a line is dropped and counted (``uac_agent_log_lines_dropped_total``), and the writer says
so in a ``log_lines_dropped`` line at most once a second once it can write again. A warning
or error repeated in a flood (one event name more than ``REPEATS_PER_SEC`` times in a
second) is kept to that many a second; the next line of that event says how many were
left out (``repeats_suppressed``).
"""

from __future__ import annotations

import atexit
import io
import itertools
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog

from agent.core.sipmsg import redact

__all__ = ["LineSink", "RepeatLimiter", "configure_logging", "log_sink", "redact_processor"]

QUEUE_LINES = 20_000  # lines waiting for the writer at most; more are dropped and counted
REPEATS_PER_SEC = 20  # warnings or errors of one event name kept per second
DROP_NOTICE_SEC = 1.0  # log_lines_dropped at most this often

_SECRET_KEYS = {"password", "api_key", "authorization", "proxy_authorization", "secret"}


def redact_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if key.lower() in _SECRET_KEYS:
            event[key] = "***"
        elif isinstance(event[key], str) and ("uthorization" in event[key] or "response=" in event[key]):
            event[key] = redact(event[key])
    return event


class LineSink:
    """Rendered lines on their way to ``stream``: :meth:`write` never waits (a full queue drops
    the line and counts it); one writer thread does the waiting."""

    def __init__(self, stream: TextIO, capacity: int = QUEUE_LINES, clock: Any = time.monotonic) -> None:
        self._stream = stream
        # Written with os.write when it has a descriptor: a writer blocked on a full pipe then holds
        # no lock of the stream's, which the interpreter would wait for at exit.
        try:
            stream.flush()
            self._fd: int | None = stream.fileno()
        except (OSError, ValueError, io.UnsupportedOperation):
            self._fd = None
        self._queue: queue.Queue[str | None] = queue.Queue(capacity)
        self._drops = itertools.count(1)  # next() is atomic: callers on any thread count without a lock
        self._dropped = 0
        self._on_drop: Callable[[float], None] | None = None
        self._now = clock
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Lines dropped since start (a full queue)."""
        return self._dropped

    def count_drops(self, inc: Callable[[float], None]) -> None:
        """Count every drop with ``inc`` too (the metric), from the drops so far on."""
        self._on_drop = inc
        if self._dropped:
            inc(self._dropped)

    def write(self, line: str) -> None:
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self._dropped = next(self._drops)
            if self._on_drop is not None:
                self._on_drop(1)

    def _run(self) -> None:
        told, told_at = 0, 0.0
        while True:
            untold = self._dropped > told
            try:  # with drops untold, wake within a second to tell them even if nothing else comes
                line: str | None = self._queue.get(timeout=DROP_NOTICE_SEC if untold else None)
            except queue.Empty:
                line = ""
            batch: list[str] = []
            dropped = self._dropped
            if dropped > told and self._now() - told_at >= DROP_NOTICE_SEC:
                batch.append(_dropped_line(dropped - told, dropped))  # first: it is about earlier lines
                told, told_at = dropped, self._now()
            if line:
                batch.append(line)
            while line is not None and len(batch) < 512:
                try:
                    line = self._queue.get_nowait()
                except queue.Empty:
                    break
                if line is not None:
                    batch.append(line)
            if batch:
                self._put("\n".join(batch) + "\n")
            if line is None:
                return

    def _put(self, text: str) -> None:
        try:
            if self._fd is None:
                self._stream.write(text)
                self._stream.flush()
                return
            data = text.encode("utf-8", "replace")
            while data:
                data = data[os.write(self._fd, data) :]
        except (OSError, ValueError):
            pass  # the stream is gone: nothing to tell it with

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (at most ``timeout``), then stop the writer."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)


def _dropped_line(count: int, total: int) -> str:
    return json.dumps(
        {
            "event": "log_lines_dropped",
            "level": "warning",
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "dropped": count,
            "dropped_total": total,
            "reason": "the log's reader fell behind; the agent did not wait for it",
        }
    )


class RepeatLimiter:
    """A structlog processor: warnings and errors of one event name, at most ``per_sec`` a second."""

    def __init__(self, per_sec: int = REPEATS_PER_SEC, clock: Any = time.monotonic) -> None:
        self._per_sec = per_sec
        self._now = clock
        self._lock = threading.Lock()
        self._window: dict[str, tuple[int, int, int]] = {}  # event -> (second, kept, suppressed)

    def __call__(self, _: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if method not in ("warning", "error", "warn", "exception", "critical"):
            return event
        name = str(event.get("event"))
        second = int(self._now())
        with self._lock:
            at, kept, suppressed = self._window.get(name, (second, 0, 0))
            if at != second:
                at, kept = second, 0
            if kept >= self._per_sec:
                self._window[name] = (at, kept, suppressed + 1)
                raise structlog.DropEvent
            self._window[name] = (at, kept + 1, 0)
            if len(self._window) > 4096:  # names are the code's own; bounded all the same
                self._window = {name: self._window[name]}
        if suppressed:
            event["repeats_suppressed"] = suppressed
        return event


class _SinkLogger:
    """structlog's logger interface over a :class:`LineSink`."""

    def __init__(self, sink: LineSink) -> None:
        self._sink = sink

    def msg(self, message: str) -> None:
        self._sink.write(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


_sink: LineSink | None = None


def log_sink() -> LineSink | None:
    """The queue behind the agent's stdout lines (None when logging writes to a given stream)."""
    return _sink


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
    """The agent's logger. To stdout (no ``stream``): through a :class:`LineSink`, never waiting
    for the reader. To a given ``stream`` (tests, the CLI): written at once, by the caller."""
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
            RepeatLimiter(),
            redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=_factory(stream),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger("uac-agent")


def _factory(stream: TextIO | None) -> Any:
    global _sink
    if stream is not None:
        return structlog.PrintLoggerFactory(file=stream)
    if _sink is None:
        _sink = LineSink(sys.stdout)
        atexit.register(_sink.close)
    sink = _sink
    return lambda *_args: _SinkLogger(sink)
