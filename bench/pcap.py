"""Packets on ``lo`` with kernel timestamps, captured by ``dumpcap`` and read back afterwards.

The call benchmarks measure what a relay adds (a SIP hop's INVITE in to INVITE out, an RTP
packet in to the same packet out) from the kernel's timestamps of the packets on ``lo``, as
``bench/forwarding.py``'s ``WireTap`` did. Here the capture is ``dumpcap`` (Wireshark's capture
engine, C, ``TPACKET_V3`` ring) writing a classic pcap file, and the file is read once the load
is over: a Python socket reading 200,000 RTP packets a second would take a core of the two the
system under test runs on, and drop packets.

* :class:`Dumpcap`: ``dumpcap -i lo -f FILTER -s SNAPLEN -P -w FILE``; :meth:`Dumpcap.stop`
  returns what it captured and what the kernel dropped (a full ring: then a relayed packet may
  look lost, so the figures say so).
* :func:`udp_packets`: every UDP/IPv4 packet of the file as ``(ts, src, sport, dst, dport,
  payload)``; addresses as 32-bit integers (:func:`ip_int`), ``ts`` in epoch seconds (the
  kernel's ``CLOCK_REALTIME``, microsecond resolution in this format).

On ``lo`` libpcap sees each packet once (the outgoing copy is skipped). Needs root or
``CAP_NET_RAW`` (dumpcap's own capabilities, as Debian installs it for the ``wireshark`` group).
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CaptureStats", "Dumpcap", "ip_int", "udp_packets"]

_STATS = re.compile(r"received/dropped on interface '[^']*':\s*(\d+)/(\d+)")
_CAPTURED = re.compile(r"Packets captured:\s*(\d+)")
_PCAP_MAGIC_LE = 0xA1B2C3D4
_LINKTYPE_ETHERNET = 1


def ip_int(address: str) -> int:
    """``127.0.0.60`` -> its 32-bit value, as :func:`udp_packets` reports addresses."""
    return int.from_bytes(socket.inet_aton(address), "big")


@dataclass(frozen=True)
class CaptureStats:
    captured: int
    received: int
    dropped: int  # by the kernel (ring full) or by dumpcap: packets seen on lo but not in the file


class Dumpcap:
    """``dumpcap`` on ``lo`` writing ``path`` (classic pcap), in a session of its own."""

    def __init__(self, path: Path, bpf: str, snaplen: int = 96, buffer_mib: int = 64) -> None:
        self.path = path
        self.bpf = bpf
        self.snaplen = snaplen
        self.buffer_mib = buffer_mib
        self.log_path = path.with_suffix(".dumpcap.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # time.time() once dumpcap said it captures
        self.stopped_at = 0.0

    def start(self, timeout: float = 10.0, settle: float = 0.5) -> Dumpcap:
        """Return once dumpcap captures: it says so a moment before its ring takes packets (the
        first start measured here missed 0.1 s), so ``settle`` seconds more."""
        if shutil.which("dumpcap") is None:
            raise RuntimeError("dumpcap is not installed: apt-get install tshark (or wireshark-common)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        cmd = [
            *("dumpcap", "-i", "lo", "-f", self.bpf, "-s", str(self.snaplen)),
            *("-B", str(self.buffer_mib), "-P", "-q", "-w", str(self.path)),
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"dumpcap exited at start:\n{self._log()[-2000:]}")
            if "Capturing on" in self._log():
                time.sleep(settle)
                self.started_at = time.time()
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"dumpcap did not start capturing:\n{self._log()[-2000:]}")

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self) -> CaptureStats:
        """SIGINT (dumpcap flushes and prints its counts), SIGKILL if it hangs; the counts."""
        self.stopped_at = time.time()
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            except ProcessLookupError:
                proc.wait(5)
        text = self._log()
        stats = _STATS.search(text)
        captured = _CAPTURED.search(text)
        return CaptureStats(
            captured=int(captured.group(1)) if captured else -1,
            received=int(stats.group(1)) if stats else -1,
            dropped=int(stats.group(2)) if stats else -1,
        )

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)


UdpPacket = tuple[float, int, int, int, int, bytes]


def udp_packets(path: Path, payload_bytes: int = 65535) -> Iterator[UdpPacket]:
    """Every UDP/IPv4 packet in the pcap file ``path``: ``(ts, src, sport, dst, dport, payload)``.

    ``payload`` is at most ``payload_bytes`` of what was captured (the snap length may have cut
    it). Non-UDP frames, fragments past the first and truncated headers are skipped.
    """
    if not path.exists() or path.stat().st_size < 24:
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        magic, _, _, _, _, _, linktype = struct.unpack_from("<IHHiIII", data, 0)
        if magic != _PCAP_MAGIC_LE or linktype != _LINKTYPE_ETHERNET:
            raise ValueError(f"{path}: not a little-endian Ethernet pcap file (magic {magic:#x}, link {linktype})")
        size = len(data)
        off = 24
        hdr = struct.Struct("<IIII")
        ports = struct.Struct("!HH")
        addrs = struct.Struct("!II")
        while off + 16 <= size:
            sec, usec, incl, _ = hdr.unpack_from(data, off)
            p = off + 16
            off = p + incl
            if off > size:
                return  # the last record was cut short (dumpcap killed)
            if incl < 14 + 20 + 8 or data[p + 12] != 0x08 or data[p + 13] != 0x00:
                continue
            ver_ihl = data[p + 14]
            if ver_ihl >> 4 != 4 or data[p + 23] != 17:
                continue
            if (data[p + 20] & 0x1F) or data[p + 21]:  # a fragment past the first
                continue
            udp = p + 14 + (ver_ihl & 0x0F) * 4
            if udp + 8 > off:
                continue
            src, dst = addrs.unpack_from(data, p + 26)
            sport, dport = ports.unpack_from(data, udp)
            end = min(off, udp + 8 + payload_bytes)
            yield sec + usec / 1e6, src, sport, dst, dport, data[udp + 8 : end]
