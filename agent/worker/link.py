"""The worker's end of its socket to the supervisor.

* Commands are read by a reader thread (:meth:`Link.serve_commands`) and handed
  to the SIP thread's queue; end of file means the supervisor is gone.
* Events are sent by the SIP thread, one frame per loop (:meth:`Link.send`).
  Once the supervisor is gone, log lines go to stderr as JSON instead, so the
  last words of a worker whose supervisor died still reach the journal.
* :class:`Waker` makes a blocked ``libHandleEvents`` return at once: a
  CRLF datagram (a SIP keep-alive, which pjsip drops silently) to the worker's
  own UDP port. It stays queued in the socket, so a wake sent just before the
  SIP thread blocks is never lost.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
import threading
from collections.abc import Callable

from agent.ipc.messages import Command, Event, Log, Start
from agent.ipc.wire import FrameReader, WireError, encode

__all__ = ["Link", "Waker", "wake_address"]


def wake_address(bind: str, port: int) -> tuple[str, int]:
    """Where to send a wake datagram for a UDP transport bound to ``bind:port``."""
    addr = ipaddress.ip_address(bind)
    if addr.is_unspecified:
        return ("::1" if addr.version == 6 else "127.0.0.1", port)
    return (bind, port)


class Waker:
    def __init__(self, bind: str, port: int) -> None:
        self._addr = wake_address(bind, port)
        family = socket.AF_INET6 if ":" in self._addr[0] else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        # bound to loopback: left to the kernel, the first send would bind it to the wildcard,
        # a port open on every address for as long as the worker lives
        self._sock.bind((self._addr[0], 0))

    def __call__(self) -> None:
        try:
            self._sock.sendto(b"\r\n\r\n", self._addr)
        except OSError:
            pass  # the loop still comes round at its next deadline


class Link:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._reader = FrameReader()
        self._early: list[object] = []  # commands that came with Start
        self.broken = False

    def read_start(self) -> Start:
        """Block for the first message, which must be ``Start``."""
        while True:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise EOFError("the supervisor closed the socket before Start")
            msgs = self._reader.feed(chunk)
            if msgs:
                first, rest = msgs[0], msgs[1:]
                if not isinstance(first, Start):
                    raise WireError(f"the first message must be Start, not {type(first).__name__}")
                self._early = rest
                return first

    def serve_commands(self, submit: Callable[[Command], None], on_eof: Callable[[str], None]) -> None:
        """Reader thread: hand every command to ``submit`` until the socket closes."""
        for msg in self._early:
            submit(msg)  # type: ignore[arg-type]
        reason = "the supervisor closed the socket"
        while True:
            try:
                chunk = self._sock.recv(65536)
            except OSError as e:
                reason = f"socket error: {e.strerror}"
                break
            if not chunk:
                break
            try:
                msgs = self._reader.feed(chunk)
            except WireError as e:
                reason = f"bad frame from the supervisor: {e}"
                break
            for msg in msgs:
                submit(msg)  # type: ignore[arg-type]
        on_eof(reason)

    def send(self, batch: list[Event]) -> None:
        """Send one batch (SIP thread). Never raises: a gone supervisor only diverts log lines."""
        if not self.broken:
            try:
                data = encode(batch)
                with self._lock:
                    self._sock.sendall(data)
                return
            except (OSError, WireError):
                self.broken = True
        for ev in batch:
            if isinstance(ev, Log):
                line = {"event": ev.event, "level": ev.level, **ev.fields, "supervisor": "gone"}
                try:
                    sys.stderr.write(json.dumps(line, default=str) + "\n")
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread; the peer sees end of file
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
