"""An RTP media end for the lab: what a phone's or an assistant's audio would be.

SIPp does the signalling in the tests; its SDP names this endpoint's port, so the
media of that call leg lands here. The endpoint sends G.711 u-law packets (20 ms,
payload type 0) filled with its own byte ``pattern`` to the address the other side's
SDP named (:meth:`send_to`), or to whoever sends it RTP, counts the packets
it receives by the pattern they carry, and decodes RFC 2833 telephone events
(``event_pt``) into digits. It can also send RFC 2833 digits.

The media relay (rtpengine) passes each packet unchanged, so a packet of the other end's
pattern arriving here proves that audio was relayed in that direction.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["RtpEndpoint"]

_EVENTS = "0123456789*#ABCD"


@dataclass
class RtpEndpoint:
    port: int
    pattern: int  # the u-law byte this end sends (e.g. 0x2A); 0xFF is silence
    host: str = "127.0.0.1"
    event_pt: int = 101  # telephone-event payload type negotiated for this end
    received: Counter[int] = field(default_factory=Counter)  # dominant byte -> packets
    digits: list[str] = field(default_factory=list)
    packets_in: int = 0
    packets_out: int = 0
    pts: Counter[int] = field(default_factory=Counter)  # payload type -> packets

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((self.host, self.port))
        self._sock.settimeout(0.005)
        self._peer: tuple[str, int] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._seq = 1
        self._ts = 0
        self._ssrc = 0x1000 + self.port
        self._pending_digits: list[str] = []
        self._last_event: tuple[int, float] | None = None
        self._thread = threading.Thread(target=self._run, name=f"rtp-{self.port}", daemon=True)

    def start(self) -> RtpEndpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()

    def send_to(self, peer: tuple[str, int]) -> None:
        """Start sending to ``peer`` (the address the other side's SDP named), as a phone does
        behind a media relay, which sends nothing until it has heard from both ends."""
        self._peer = peer

    def send_digits(self, digits: str) -> None:
        """Queue RFC 2833 events (sent once a peer is known)."""
        with self._lock:
            self._pending_digits.extend(digits)

    def count_of(self, pattern: int) -> int:
        with self._lock:
            return self.received[pattern]

    def _packet(self, pt: int, payload: bytes, marker: bool = False, ts: int | None = None) -> bytes:
        hdr = struct.pack(
            "!BBHII",
            0x80,
            (0x80 if marker else 0) | pt,
            self._seq & 0xFFFF,
            (self._ts if ts is None else ts),
            self._ssrc,
        )
        self._seq += 1
        return hdr + payload

    def _send(self, data: bytes) -> None:
        if self._peer is not None:
            self._sock.sendto(data, self._peer)
            self.packets_out += 1

    def _send_digit(self, digit: str) -> None:
        event = _EVENTS.index(digit.upper())
        ts = self._ts
        for i in range(8):  # 8 x 20 ms updates, then 3 end packets
            duration = 160 * (i + 1)
            self._send(self._packet(self.event_pt, struct.pack("!BBH", event, 10, duration), marker=(i == 0), ts=ts))
            self._tick_sleep()
        for _ in range(3):
            self._send(self._packet(self.event_pt, struct.pack("!BBH", event, 0x80 | 10, 160 * 8), ts=ts))
        self._ts += 160 * 8

    def _tick_sleep(self) -> None:
        self._recv_until(time.monotonic() + 0.02)

    def _recv_until(self, deadline: float) -> None:
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._sock.settimeout(max(left, 0.001))
            try:
                data, addr = self._sock.recvfrom(2048)
            except TimeoutError:
                return
            except OSError:
                return
            self._on_packet(data, addr)

    def _on_packet(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12 or data[0] >> 6 != 2:
            return
        self._peer = addr
        pt = data[1] & 0x7F
        payload = data[12:]
        with self._lock:
            self.packets_in += 1
            self.pts[pt] += 1
            if pt == self.event_pt and len(payload) >= 4:
                event, flags = payload[0], payload[1]
                now = time.monotonic()
                last = self._last_event
                # the end packet is sent three times: one digit per event end
                repeat = last is not None and last[0] == event and now - last[1] < 0.15
                if flags & 0x80 and event < len(_EVENTS):
                    self._last_event = (event, now)
                    if not repeat:
                        self.digits.append(_EVENTS[event])
            elif pt == 0 and payload:
                self.received[Counter(payload).most_common(1)[0][0]] += 1

    def _run(self) -> None:
        frame = bytes([self.pattern]) * 160
        next_tick = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                digit = self._pending_digits.pop(0) if self._pending_digits and self._peer else None
            if digit is not None:
                self._send_digit(digit)
                next_tick = time.monotonic()
                continue
            if self._peer is not None:
                self._send(self._packet(0, frame))
                self._ts += 160
            next_tick += 0.02
            self._recv_until(next_tick)
