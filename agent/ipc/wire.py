"""Framing of :mod:`agent.ipc.messages` on a stream socket.

A frame is a 4-byte big-endian length and a pickle of a tuple of messages (a
batch: a worker sends what one loop produced in one write). Only the classes
of :mod:`agent.ipc.messages` and the policy types they carry may be loaded:
anything else in a frame is refused with :class:`WireError`, as is a frame
over :data:`MAX_FRAME` bytes. The socket is a private ``socketpair`` between a
supervisor and the worker it started.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Sequence
from typing import Any

from agent.core import policy
from agent.ipc import messages

__all__ = ["MAX_FRAME", "FrameReader", "WireError", "decode", "encode"]

MAX_FRAME = 16 * 1024 * 1024
_HEADER = struct.Struct(">I")
_ALLOWED: dict[str, frozenset[str]] = {
    messages.__name__: frozenset(messages.__all__),
    policy.__name__: frozenset({"PolicySettings", "PolicySnapshot", "RegState", "RegistrationStatus"}),
}


class WireError(Exception):
    """A frame that is not a batch of known messages (a bug, or a process gone wrong)."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise WireError(f"{module}.{name} is not a message type")


def encode(batch: Sequence[object]) -> bytes:
    body = pickle.dumps(tuple(batch), protocol=pickle.HIGHEST_PROTOCOL)
    if len(body) > MAX_FRAME:
        raise WireError(f"batch of {len(body)} bytes is over the {MAX_FRAME}-byte frame limit")
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> tuple[object, ...]:
    try:
        batch = _Unpickler(io.BytesIO(body)).load()
    except WireError:
        raise
    except Exception as e:
        raise WireError(f"undecodable frame: {e!r}") from None
    if not isinstance(batch, tuple):
        raise WireError("a frame must hold a tuple of messages")
    return batch


class FrameReader:
    """Bytes in (any chunks), whole batches out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[object]:
        self._buf += data
        out: list[object] = []
        while len(self._buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise WireError(f"frame of {size} bytes announced; the limit is {MAX_FRAME}")
            end = _HEADER.size + size
            if len(self._buf) < end:
                break
            body = bytes(self._buf[_HEADER.size : end])
            del self._buf[:end]
            out.extend(decode(body))
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)
