"""A HEP3 collector for the lab: what a Homer capture server would receive.

HEP3 (the Homer Encapsulation Protocol, version 3) frames a captured packet as the bytes
``HEP3``, a 16-bit total length, then chunks: vendor id (16 bits), chunk type (16 bits),
chunk length (16 bits, header included), payload. Chunk type 0x000b is the protocol type
(1: SIP, 5: RTCP as JSON), 0x000c the capture agent id, 0x000f the captured payload.
This decoder keeps every packet it receives and parses those chunks; nothing else.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field

__all__ = ["HepCollector", "HepPacket", "parse_hep3"]

PROTO_SIP = 1
PROTO_RTCP_JSON = 5


@dataclass(frozen=True)
class HepPacket:
    proto_type: int | None
    capture_id: int | None
    payload: bytes

    @property
    def text(self) -> str:
        return self.payload.decode(errors="replace")

    @property
    def first_line(self) -> str:
        return self.text.split("\r\n", 1)[0]


def parse_hep3(data: bytes) -> HepPacket:
    if data[:4] != b"HEP3":
        raise ValueError("not HEP3")
    (total,) = struct.unpack("!H", data[4:6])
    pos, end = 6, min(total, len(data))
    proto = capture = None
    payload = b""
    while pos + 6 <= end:
        _vendor, kind, length = struct.unpack("!HHH", data[pos : pos + 6])
        if length < 6:
            raise ValueError("bad chunk length")
        body = data[pos + 6 : pos + length]
        if kind == 0x000B and len(body) == 1:
            proto = body[0]
        elif kind == 0x000C and len(body) == 4:
            (capture,) = struct.unpack("!I", body)
        elif kind == 0x000F:
            payload = body
        pos += length
    return HepPacket(proto, capture, payload)


@dataclass
class HepCollector:
    host: str = "127.0.0.1"
    port: int = 0
    packets: list[HepPacket] = field(default_factory=list)
    errors: int = 0

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((self.host, self.port))
        self.port = self._sock.getsockname()[1]
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"hep-{self.port}", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> HepCollector:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()

    def sip(self) -> list[HepPacket]:
        with self._lock:
            return [p for p in self.packets if p.proto_type == PROTO_SIP]

    def rtcp(self) -> list[HepPacket]:
        """rtpengine's RTCP statistics (one JSON object per report it relayed)."""
        with self._lock:
            return [p for p in self.packets if p.proto_type == PROTO_RTCP_JSON]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                pkt = parse_hep3(data)
            except (ValueError, struct.error):
                self.errors += 1
                continue
            with self._lock:
                self.packets.append(pkt)
