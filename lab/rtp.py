"""An RTP media end for the lab: what a phone's or an assistant's audio would be.

SIPp does the signalling in the tests; its SDP names this endpoint's port, so the
media of that call leg lands here. The endpoint sends G.711 u-law packets (20 ms,
payload type 0) filled with its own byte ``pattern`` to the address the other side's
SDP named (:meth:`send_to`), or to whoever sends it RTP, counts the packets
it receives by the pattern they carry, and decodes RFC 2833 telephone events
(``event_pt``) into digits. It can also send RFC 2833 digits.

The media relay (rtpengine) passes each packet unchanged, so a packet of the other end's
pattern arriving here proves that audio was relayed in that direction.

With :meth:`use_srtp` the end speaks SDES-SRTP (AES_CM_128_HMAC_SHA1_80, libsrtp through
pylibsrtp): it encrypts what it sends with its own key and decrypts what it receives with the
key the other side's SDP gave; a packet that does not authenticate is counted, never read.
With ``rtcp`` it also sends an RTCP sender report every 200 ms from port + 1 to the peer's
port + 1 (RFC 3550's default pairing), as a phone does.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from pylibsrtp import Error as SrtpError
from pylibsrtp import Policy, Session

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
    rtcp: bool = False  # send RTCP sender reports from port + 1
    srtp_errors: int = 0  # packets that did not authenticate with the receiving key
    rtcp_out: int = 0

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
        self._tx: Session | None = None
        self._rx: Session | None = None
        self._rtcp_sock: socket.socket | None = None
        if self.rtcp:
            self._rtcp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._rtcp_sock.bind((self.host, self.port + 1))
        self._thread = threading.Thread(target=self._run, name=f"rtp-{self.port}", daemon=True)

    def start(self) -> RtpEndpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        if self._rtcp_sock is not None:
            self._rtcp_sock.close()

    def use_srtp(self, send_key: bytes, recv_key: bytes | None) -> None:
        """Send SRTP keyed with ``send_key`` (the 30 bytes of key and salt this end's SDP gave);
        read what arrives with ``recv_key`` (the other side's), or as plain RTP with None."""
        tx = Session(policy=Policy(key=send_key, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
        rx = None if recv_key is None else Session(policy=Policy(key=recv_key, ssrc_type=Policy.SSRC_ANY_INBOUND))
        with self._lock:
            self._tx, self._rx = tx, rx

    def receive_srtp(self, recv_key: bytes) -> None:
        """Read what arrives as SRTP keyed with ``recv_key``; keep sending as before."""
        with self._lock:
            self._rx = Session(policy=Policy(key=recv_key, ssrc_type=Policy.SSRC_ANY_INBOUND))

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
            if self._tx is not None:
                data = self._tx.protect(data)
            self._sock.sendto(data, self._peer)
            self.packets_out += 1

    def _send_report(self) -> None:
        """An RTCP sender report (RFC 3550 6.4.1) with no report blocks."""
        if self._rtcp_sock is None or self._peer is None:
            return
        ntp = time.time() + 2_208_988_800
        sr = struct.pack(
            "!BBHIIIIII",
            0x80,
            200,
            6,
            self._ssrc,
            int(ntp),
            int((ntp % 1) * 2**32),
            self._ts,
            self.packets_out,
            self.packets_out * 160,
        )
        self._rtcp_sock.sendto(sr, (self._peer[0], self._peer[1] + 1))
        self.rtcp_out += 1

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
        if self._rx is not None:
            try:
                data = self._rx.unprotect(data)
            except SrtpError:
                self.srtp_errors += 1
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
        ticks = 0
        while not self._stop.is_set():
            ticks += 1
            if ticks % 10 == 0:
                self._send_report()
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
