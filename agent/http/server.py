"""The HTTP server: uvicorn serving :class:`~agent.http.app.HttpApp` on its own thread.

Rules
-----
* One thread (``http``) with its own asyncio event loop, beside the supervisor's main
  loop and the worker pool's loop thread. uvicorn installs no signal handlers off the
  main thread: the supervisor's handlers stay in charge.
* The listening socket is opened in the constructor (``OSError`` when the port is
  taken: the caller reports ``http_listen_failed``), with a deep backlog so a burst of
  connections (scrapes, dashboards and API clients arriving together) queues instead of
  being refused.
* Idle costs nothing: plain asyncio and h11 (no uvloop, httptools or file watchers), no
  reload, no access log, and none of uvicorn's 10 Hz housekeeping tick: the loop sleeps
  until a socket or :meth:`HttpServer.stop` wakes it.
* uvicorn's own log records (a request that is not HTTP, a client gone mid-answer) go
  to the agent's structured log: warnings at debug, errors at error, never a traceback
  on stderr.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from agent.http.app import HttpApp

__all__ = ["HttpServer"]

BACKLOG = 2048  # the kernel caps it at net.core.somaxconn
IDLE_SEC = 15  # a connection silent this long (before its first request, or between two) is closed
STOP_GRACE_SEC = 3  # requests in flight get this long to finish on stop


class _Bridge(logging.Handler):
    """uvicorn's log records as lines of the agent's structured log."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.log: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        log = self.log
        if log is None:
            return
        fields: dict[str, Any] = {"message": record.getMessage(), "logger": record.name}
        if record.exc_info is not None and record.exc_info[1] is not None:
            fields["error"] = repr(record.exc_info[1])
        if record.levelno >= logging.ERROR:
            log.error("http_server_error", **fields)
        else:  # a client's fault: an invalid request, an unsupported upgrade
            log.debug("http_client_error", **fields)


_bridge = _Bridge()


def _route_uvicorn_logs(log: Any) -> None:
    _bridge.log = log
    root = logging.getLogger("uvicorn")
    if _bridge not in root.handlers:
        root.addHandler(_bridge)
    root.setLevel(logging.WARNING)
    root.propagate = False


class _H11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with its idle timer armed from the start: uvicorn times out
    only the wait between two requests, so a connection that never sent one would stay open."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type] # uvicorn takes asyncio.Transport
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)


class _Server(uvicorn.Server):
    """uvicorn's server, woken by :meth:`wake` instead of polling ``should_exit`` ten times a second."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self.serving = threading.Event()

    async def main_loop(self) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.serving.set()
        if not self.should_exit:
            await self._wake.wait()

    def wake(self) -> None:
        """Stop serving (from any thread): uvicorn then closes the listener and the idle connections."""
        self.should_exit = True
        loop, event = self._loop, self._wake
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop has already closed
                pass


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket (``OSError`` with the system's own words, e.g. "Address already in use")."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    def __init__(self, host: str, port: int, app: HttpApp, logger: Any, idle_sec: int = IDLE_SEC) -> None:
        self._sock = _listen(host, port)
        self._log = logger
        config = uvicorn.Config(
            app,
            loop="asyncio",
            http=_H11,
            ws="none",
            interface="asgi3",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,  # HttpApp sends Server: uac-agent and Date on every answer
            date_header=False,
            proxy_headers=False,
            backlog=BACKLOG,
            timeout_keep_alive=idle_sec,
            timeout_graceful_shutdown=STOP_GRACE_SEC,
        )
        self._server = _Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def start(self) -> None:
        _route_uvicorn_logs(self._log)
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()
        self._server.serving.wait(5)

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except Exception as e:  # the loop itself failed: report it, the supervisor's checks see the rest
            self._log.error("http_server_failed", error=repr(e))
        finally:
            self._server.serving.set()

    def stop(self) -> None:
        """Stop listening, close idle connections, give requests in flight a moment; safe twice."""
        self._server.wake()
        if self._thread is not None:
            self._thread.join(STOP_GRACE_SEC + 2)
            self._thread = None
        self._sock.close()
