"""Talking to the edge's engines, on the edge's event loop (never blocking it).

* :class:`KamailioRpc`: JSON-RPC over Kamailio's UNIX datagram socket (jsonrpcs): the
  htables the routing script reads.
* :func:`rtpengine_ping`: the ng protocol's ``ping`` over UDP (bencode).
* :class:`HaproxyApi`: HAProxy's runtime API over its UNIX stream socket: the TLS maps.
* :class:`EventStream`: Kamailio's event stream (evapi, netstrings) as parsed events.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agent.edge.messages import EdgeEvent, EdgeEventError, parse_event

__all__ = ["ControlError", "EventStream", "HaproxyApi", "KamailioRpc", "rtpengine_ping"]

RPC_TIMEOUT_SEC = 2.0
# An event line longer than this is not one of Kamailio's (a From header is capped by the
# SIP parser well below it): the stream is dropped and read again.
MAX_EVENT_BYTES = 65536


class ControlError(Exception):
    """An engine did not answer, or refused a command; the message says which and why."""


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            reply = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return
        if not isinstance(reply, dict):
            return
        fut = self.waiting.pop(reply.get("id", -1), None) if isinstance(reply.get("id"), int) else None
        if fut is not None and not fut.done():
            fut.set_result(reply)


class KamailioRpc:
    """JSON-RPC to Kamailio over ``server`` (a UNIX datagram socket), from a socket of our own."""

    def __init__(self, server: Path, local: Path) -> None:
        self._server = str(server)
        self._local = local
        self._ids = itertools.count(1)
        self._transport: asyncio.DatagramTransport | None = None
        self._proto: _Datagrams | None = None

    async def open(self) -> None:
        if self._transport is not None:
            return
        try:
            self._local.unlink()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self._local))
        os.chmod(self._local, 0o600)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(_Datagrams, sock=sock)
        self._transport, self._proto = transport, proto

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = self._proto = None

    async def call(self, method: str, *params: str | int, timeout: float = RPC_TIMEOUT_SEC) -> Any:
        await self.open()
        assert self._transport is not None and self._proto is not None
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._proto.waiting[rid] = fut
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": list(params), "id": rid}).encode()
        try:
            self._transport.sendto(body, self._server)
            reply = await asyncio.wait_for(fut, timeout)
        except (TimeoutError, OSError) as e:
            raise ControlError(f"kamailio: no answer to {method} ({e or 'timeout'})") from None
        finally:
            self._proto.waiting.pop(rid, None)
        if "error" in reply:
            err = reply["error"]
            raise ControlError(f"kamailio: {method} refused: {err.get('message') if isinstance(err, dict) else err}")
        return reply.get("result")


async def rtpengine_ping(host: str, port: int, timeout: float = RPC_TIMEOUT_SEC) -> None:
    """Raise ControlError unless rtpengine answers ``pong`` on its ng port."""
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[bytes] = loop.create_future()

    class _Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not answered.done():
                answered.set_result(data)

        def error_received(self, exc: Exception) -> None:
            if not answered.done():
                answered.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(_Proto, remote_addr=(host, port))
    try:
        transport.sendto(b"uacping d7:command4:pinge")
        data = await asyncio.wait_for(answered, timeout)
    except (TimeoutError, OSError) as e:
        raise ControlError(f"rtpengine: no answer to ping ({e or 'timeout'})") from None
    finally:
        transport.close()
    if b"pong" not in data:
        raise ControlError(f"rtpengine: unexpected answer to ping: {data[:80]!r}")


class HaproxyApi:
    """HAProxy's runtime API (one command per connection, as HAProxy expects without ``prompt``)."""

    def __init__(self, path: Path) -> None:
        self._path = str(path)

    async def command(self, line: str, timeout: float = RPC_TIMEOUT_SEC) -> str:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(self._path), timeout)
        except (TimeoutError, OSError) as e:
            raise ControlError(f"haproxy: cannot reach the runtime API ({e or 'timeout'})") from None
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            out = await asyncio.wait_for(reader.read(1 << 20), timeout)
        except (TimeoutError, OSError) as e:
            raise ControlError(f"haproxy: no answer to {line.split()[0]!r} ({e or 'timeout'})") from None
        finally:
            writer.close()
        return out.decode(errors="replace")


class EventStream:
    """Kamailio's events (evapi netstrings ``LEN:JSON,``) from one TCP connection."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    async def __aiter__(self) -> AsyncIterator[EdgeEvent | EdgeEventError]:
        r = self._reader
        while True:
            head = await r.readuntil(b":")
            digits = head[:-1].strip()
            if not digits.isdigit() or len(digits) > 6 or int(digits) > MAX_EVENT_BYTES:
                raise EdgeEventError(f"bad netstring length {head[:20]!r}")
            data = await r.readexactly(int(digits) + 1)
            if data[-1:] != b",":
                raise EdgeEventError("netstring without its ','")
            try:
                yield parse_event(data[:-1])
            except EdgeEventError as e:
                yield e
