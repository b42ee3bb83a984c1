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
  on stderr. So do the loop's own errors (e.g. ``accept`` out of descriptors), at most
  once a second.
* No client can hold the server: a request must be complete (line, headers and body)
  within ``request_timeout_sec`` of its first byte, else it is answered 408 and closed;
  a connection silent for ``IDLE_SEC`` is closed.
* At most ``max_connections`` connections are served at once. Past that, up to
  ``OVERFLOW`` more are each given one request, complete within ``OVERFLOW_SEC`` and then
  closed, so a probe still gets in while the slots are held; any further connection is
  closed as soon as it is accepted (``http_connections_capped``, at most every 10 s).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from agent.http.app import HttpApp

__all__ = ["HttpServer"]

BACKLOG = 2048  # the kernel caps it at net.core.somaxconn
IDLE_SEC = 15  # a connection silent this long (before its first request, or between two) is closed
STOP_GRACE_SEC = 3  # requests in flight get this long to finish on stop
REQUEST_SEC = 10.0  # a request must be complete this long after its first byte (http.request_timeout_sec)
MAX_CONNECTIONS = 512  # served at once (http.max_connections)
OVERFLOW = 32  # connections past the cap given one short request each (a probe gets in)
OVERFLOW_SEC = 2.0  # how long such a connection may take to send its request
CAPPED_LOG_SEC = 10.0  # http_connections_capped at most this often
_TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


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


class _Limits:
    """The bounds every connection of one server meets (shared by its protocol instances)."""

    def __init__(self, max_connections: int, request_sec: float, log: Any) -> None:
        self.max_connections = max_connections
        self.request_sec = request_sec
        self.log = log
        self.refused = 0  # since the last http_connections_capped line
        self.told = 0.0  # monotonic time of that line

    def capped(self, open_now: int) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self.told >= CAPPED_LOG_SEC:
            self.log.warning(
                "http_connections_capped",
                open_connections=open_now,
                max_connections=self.max_connections,
                refused=self.refused,
                reason="every connection slot is held: new connections are closed (see http.max_connections)",
            )
            self.told, self.refused = now, 0


class _H11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the server's bounds (see the module's rules). uvicorn
    itself times out only the wait between two requests: a connection that never sent one, or
    sent one byte of it, would stay open."""

    limits: _Limits  # set on the subclass each server makes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type] # uvicorn takes asyncio.Transport
        self._request_timer: asyncio.TimerHandle | None = None
        open_now = len(self.connections)  # this one included
        self._overflow = open_now > self.limits.max_connections
        if open_now > self.limits.max_connections + OVERFLOW:
            self.limits.capped(open_now)
            self.transport.abort()
            return
        idle = OVERFLOW_SEC if self._overflow else self.timeout_keep_alive
        self.timeout_keep_alive_task = self.loop.call_later(idle, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self._request_timer is None and self.conn.their_state is h11.IDLE:
            limit = OVERFLOW_SEC if self._overflow else self.limits.request_sec
            self._request_timer = self.loop.call_later(limit, self._request_timed_out)
        super().data_received(data)
        if self._request_timer is not None and self.conn.their_state is not h11.IDLE:
            if self.conn.their_state is not h11.SEND_BODY:  # all of it is in (or the request failed)
                self._request_timer.cancel()
                self._request_timer = None

    def _request_timed_out(self) -> None:
        self._request_timer = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_TIMEOUT_ANSWER)
        if self.cycle is not None:
            self.cycle.disconnected = True  # the application stops waiting for the rest of the body
            self.cycle.message_event.set()
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._overflow and not self.transport.is_closing():
            self.transport.close()  # one request per connection past the cap

    def connection_lost(self, exc: Exception | None) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None
        super().connection_lost(exc)


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
        self._loop.set_exception_handler(self._loop_error)
        self.serving.set()
        if not self.should_exit:
            await self._wake.wait()

    log: Any = None
    _loop_error_told = 0.0

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The loop's own errors (``accept`` out of descriptors, a callback that raised): one line
        a second at most, never a traceback on stderr."""
        now = time.monotonic()
        if now - self._loop_error_told < 1.0 or self.log is None:
            return
        self._loop_error_told = now
        exc = context.get("exception")
        self.log.error("http_loop_error", message=str(context.get("message")), error=repr(exc) if exc else None)

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
    def __init__(
        self,
        host: str,
        port: int,
        app: HttpApp,
        logger: Any,
        idle_sec: int = IDLE_SEC,
        max_connections: int = MAX_CONNECTIONS,
        request_sec: float = REQUEST_SEC,
    ) -> None:
        self._sock = _listen(host, port)
        self._log = logger
        protocol = type("H11", (_H11,), {"limits": _Limits(max_connections, request_sec, logger)})
        config = uvicorn.Config(
            app,
            loop="asyncio",
            http=protocol,
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
        self._server.log = logger
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
