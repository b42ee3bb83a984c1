"""Forwarding benchmark: the agent's added call-setup latency and its highest clean call rate.

Superseded by ``bench/cps.py``: this benchmark predates the SIP edge. It was written when the
agent bridged calls in its workers (2 at a time, ``sip.max_calls`` 2), and its baseline Kamailio
relays signalling only (no rtpengine). It still runs (the agent's hop is now its edge), and is
kept because BENCHMARKS.md's forwarding figures came from it; ``bench/cps.py`` measures the edge
against a Kamailio + rtpengine baseline, from 50 to 800 calls a second.

Three call paths run in one process, one after another at each rate, with the
same SIPp scenarios and parameters (``pbx_call.xml`` calling, ``dest_answer.xml``
answering: 100, 180, 200 after 100 ms)::

    agent     PBX SIPp -> Kamailio A (lookup) -> uac-agent (B2BUA)          -> destination SIPp
    kamailio  PBX SIPp -> Kamailio A (lookup) -> Kamailio B (relay_to dest) -> destination SIPp
    direct    PBX SIPp -> Kamailio A (lookup)                               -> destination SIPp

``kamailio`` is the baseline: the agent's hop replaced by a stateful,
record-routing Kamailio relay (``KamailioConfig.relay_to``). ``direct`` is the
floor both share. Kamailio A routes all three with ``lookup("location")``: the
agent registers its AoR, the other two AoRs are static contacts (``ul.add``).

Two measurements per answered call, matched by the display name "PBX caller N"
(the agent carries it over to leg B; Kamailio leaves From alone):

* path, from the SIPp message traces: the destination's INVITE received minus
  the PBX's INVITE sent, and the PBX's 200 received minus the destination's 200
  sent (whole path, Kamailio A included, SIPp's own timestamping included).
* hop, from kernel timestamps of the UDP packets on ``lo`` (an AF_PACKET socket
  with SO_TIMESTAMPNS; needs root or CAP_NET_RAW, else skipped): INVITE in to
  INVITE out, and the destination's 200 in to the 200 out, at the middle hop
  (the agent, Kamailio B, or Kamailio A for ``direct``).

A call fails when the PBX's final answer to its INVITE is not 200 (the agent
answers 486 over ``sip.max_calls``), when it has none, when its BYE gets no 200,
or when SIPp counts it failed. Figures are printed, never asserted.

Run: ``.venv/bin/python -m bench.forwarding [--rates 2,5,10,20,40] [--calls-per-rate 40] [--hold-ms 100]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from lab.kamailio import Kamailio, KamailioConfig, free_port
from lab.sipp import SipMessage, Sipp, scenario_path
from tests.integration.agentproc import AgentProcess

__all__ = ["Packet", "RunResult", "WireTap", "main", "percentile"]

USER = "bench"
PASSWORD = "bench-pw"  # noqa: S105 - a throwaway account on a loopback Kamailio
SETUPS = ("agent", "kamailio", "direct")
AOR = {"agent": USER, "kamailio": "relay", "direct": "direct"}
MIDDLE = {"agent": "uac-agent", "kamailio": "Kamailio B", "direct": "Kamailio A"}
_CALLER = re.compile(r"PBX caller (\d+)")
_CSEQ = re.compile(r"^CSeq:[ \t]*\d+[ \t]+(\w+)", re.MULTILINE | re.IGNORECASE)
_SIPP_FAILED = re.compile(r"Failed call\s*\|\s*\d+\s*\|\s*(\d+)")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), interpolated linearly between ranks; NaN when empty."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# -- packets on lo, with kernel timestamps ----------------------------------------------------------

_ETH_P_ALL = 0x0003
_SO_TIMESTAMPNS = 35
_SO_RCVBUFFORCE = 33
_SOL_PACKET = 263
_PACKET_STATISTICS = 6
_PACKET_OUTGOING = 4


@dataclass(frozen=True)
class Packet:
    """One SIP message seen on ``lo``: kernel send time (epoch seconds), UDP ports, what it is."""

    ts: float
    sport: int
    dport: int
    first_line: str
    caller: int | None
    cseq_method: str | None

    @property
    def is_invite(self) -> bool:
        return self.first_line.startswith("INVITE ")

    @property
    def is_invite_200(self) -> bool:
        return self.first_line.startswith("SIP/2.0 200") and self.cseq_method == "INVITE"


def parse_frame(frame: bytes, ts: float, ports: set[int]) -> Packet | None:
    """A SIP-over-UDP/IPv4 frame from ``lo`` (14-byte Ethernet header) to or from one of ``ports``."""
    if len(frame) < 14 + 20 + 8 or frame[12:14] != b"\x08\x00" or frame[14] >> 4 != 4 or frame[23] != 17:
        return None
    udp = 14 + (frame[14] & 0x0F) * 4
    sport, dport = struct.unpack_from("!HH", frame, udp)
    if sport not in ports and dport not in ports:
        return None
    text = frame[udp + 8 :].decode("latin-1")
    first_line = text.split("\r\n", 1)[0].strip()
    if not first_line:
        return None
    caller = _CALLER.search(text)
    cseq = _CSEQ.search(text)
    return Packet(
        ts, sport, dport, first_line, int(caller.group(1)) if caller else None, cseq.group(1) if cseq else None
    )


class WireTap:
    """Every UDP packet on ``lo`` to or from ``ports``, timestamped by the kernel as it is sent.

    An AF_PACKET socket (root or CAP_NET_RAW); ``start()`` returns False when the
    system refuses one. Timestamps are CLOCK_REALTIME, like SIPp's traces.
    """

    def __init__(self, ports: Iterable[int]) -> None:
        self.ports = set(ports)
        self.error = ""
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._packets: list[Packet] = []

    def start(self) -> bool:
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
            sock.bind(("lo", 0))
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        except (OSError, AttributeError) as e:
            self.error = str(e)
            return False
        for opt in (_SO_RCVBUFFORCE, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, 16 << 20)
                break
            except OSError:
                continue
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._loop, name="wiretap", daemon=True)
        self._thread.start()
        return True

    def _loop(self) -> None:
        sock = self._sock
        assert sock is not None
        cmsg_space = socket.CMSG_SPACE(16)
        while not self._stop.is_set():
            try:
                frame, ancdata, _, addr = sock.recvmsg(65535, cmsg_space)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] != _PACKET_OUTGOING:  # lo shows each packet twice: as sent and as received
                continue
            ts = time.time()
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= 16:
                    sec, nsec = struct.unpack("qq", data[:16])
                    ts = sec + nsec / 1e9
            packet = parse_frame(frame, ts, self.ports)
            if packet is not None:
                with self._lock:
                    self._packets.append(packet)

    def packets(self, since: float, until: float) -> list[Packet]:
        with self._lock:
            return [p for p in self._packets if since <= p.ts <= until]

    def drops(self) -> int:
        """Packets the kernel dropped for a full socket buffer (then some hops go unmeasured)."""
        if self._sock is None:
            return 0
        try:
            raw = self._sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8)
        except OSError:
            return 0
        return int(struct.unpack("II", raw)[1])

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._sock is not None:
            self._sock.close()


# -- one run: a setup at a rate ---------------------------------------------------------------------


@dataclass
class RunResult:
    setup: str
    rate: float
    calls: int
    answered: int = 0
    failed: int = 0
    finals: dict[str, int] = field(default_factory=dict)  # PBX's final answers to INVITE: code -> count
    bye_failed: int = 0  # answered, but the PBX's BYE got no 200
    sipp_failed: int | None = None
    achieved_cps: float = math.nan
    peak_concurrent: int = 0
    invite_ms: list[float] = field(default_factory=list)  # path, SIPp traces
    ok_ms: list[float] = field(default_factory=list)
    call_ms: list[float] = field(default_factory=list)  # answered: PBX's INVITE sent to its BYE's 200
    hop_invite_ms: list[float] = field(default_factory=list)  # middle hop, kernel timestamps
    hop_ok_ms: list[float] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.failed == 0


def _caller(m: SipMessage) -> int | None:
    match = _CALLER.search(m.header("from") or "")
    return int(match.group(1)) if match else None


def _first(messages: list[SipMessage], want: Callable[[SipMessage], bool]) -> dict[int, SipMessage]:
    """The first message per call (by caller number) that ``want`` accepts; retransmissions ignored."""
    out: dict[int, SipMessage] = {}
    for m in messages:
        if want(m):
            key = _caller(m)
            if key is not None and key not in out:
                out[key] = m
    return out


def analyse(setup: str, rate: float, calls: int, pbx: Sipp, dest: Sipp) -> RunResult:
    res = RunResult(setup, rate, calls)
    pm = pbx.messages()
    dm = dest.messages()

    def invite_resp(m: SipMessage) -> bool:
        return m.direction == "received" and not m.is_request and m.cseq_method == "INVITE"

    inv_sent = _first(pm, lambda m: m.direction == "sent" and m.method == "INVITE")
    final = _first(pm, lambda m: invite_resp(m) and (m.status_code or 0) >= 200)
    ok_recv = _first(pm, lambda m: invite_resp(m) and m.status_code == 200)
    bye_ok = _first(pm, lambda m: m.direction == "received" and m.cseq_method == "BYE" and (m.status_code or 0) >= 200)
    inv_recv = _first(dm, lambda m: m.direction == "received" and m.method == "INVITE")
    ok_sent = _first(dm, lambda m: m.direction == "sent" and m.status_code == 200 and m.cseq_method == "INVITE")

    codes = Counter(str(final[k].status_code) if k in final else "none" for k in inv_sent)
    res.finals = dict(sorted(codes.items()))
    res.answered = codes.get("200", 0)
    res.bye_failed = sum(
        1 for k, m in final.items() if m.status_code == 200 and (k not in bye_ok or bye_ok[k].status_code != 200)
    )
    match = _SIPP_FAILED.search(pbx.output())
    res.sipp_failed = int(match.group(1)) if match else None
    res.failed = max(calls - res.answered + res.bye_failed, res.sipp_failed or 0)

    starts = sorted(m.timestamp for m in inv_sent.values())
    if len(starts) > 1 and starts[-1] > starts[0]:
        res.achieved_cps = (len(starts) - 1) / (starts[-1] - starts[0])
    events: list[tuple[float, int]] = []
    for key, m in inv_sent.items():
        end = bye_ok.get(key) if key in final and final[key].status_code == 200 else final.get(key)
        if end is not None:
            events += [(m.timestamp, 1), (end.timestamp, -1)]
    level = 0
    for _, step in sorted(events):
        level += step
        res.peak_concurrent = max(res.peak_concurrent, level)

    for key in sorted(ok_recv):
        if key in inv_sent and key in inv_recv and key in ok_sent:
            res.invite_ms.append((inv_recv[key].timestamp - inv_sent[key].timestamp) * 1000.0)
            res.ok_ms.append((ok_recv[key].timestamp - ok_sent[key].timestamp) * 1000.0)
        if key in inv_sent and key in bye_ok:
            res.call_ms.append((bye_ok[key].timestamp - inv_sent[key].timestamp) * 1000.0)
    return res


def analyse_hop(res: RunResult, packets: list[Packet], middle: int, dest: int) -> None:
    """INVITE in to INVITE out and 200 in to 200 out at port ``middle``, per answered call."""

    def first(want: Callable[[Packet], bool]) -> dict[int, float]:
        out: dict[int, float] = {}
        for p in packets:
            if p.caller is not None and p.caller not in out and want(p):
                out[p.caller] = p.ts
        return out

    inv_in = first(lambda p: p.is_invite and p.dport == middle)
    inv_out = first(lambda p: p.is_invite and p.sport == middle and p.dport == dest)
    ok_in = first(lambda p: p.is_invite_200 and p.sport == dest and p.dport == middle)
    ok_out = first(lambda p: p.is_invite_200 and p.sport == middle and p.dport != dest)
    for key in sorted(ok_out):
        if key in inv_in and key in inv_out and key in ok_in:
            res.hop_invite_ms.append((inv_out[key] - inv_in[key]) * 1000.0)
            res.hop_ok_ms.append((ok_out[key] - ok_in[key]) * 1000.0)


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _metric(agent: AgentProcess, name: str) -> float:
    total = 0.0
    for line in agent.metrics().splitlines():
        head, _, value = line.rpartition(" ")
        if head == name or head.startswith(name + "{"):
            total += float(value)
    return total


def _version(cmd: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(0).strip() if match else "?"


def machine() -> dict[str, str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sipp": _version(["sipp", "-v"], r"SIPp v[\d.]+"),
        "kamailio": _version(["kamailio", "-v"], r"kamailio [\d.]+"),
    }


class Bench:
    """Kamailio A and B, the agent, the packet tap and the SIPp runs; ``close()`` stops all it started."""

    def __init__(self, workdir: Path, hold_ms: int) -> None:
        self.workdir = workdir
        self.hold_ms = hold_ms
        self.dest_port = free_port()
        self.dest_uri = f"sip:1006@127.0.0.1:{self.dest_port}"
        # echoes Record-Route, so the PBX's ACK and BYE follow the record-routing proxies
        self.dest_scenario = scenario_path("dest_answer.xml")
        self.kam_a: Kamailio | None = None
        self.kam_b: Kamailio | None = None
        self.agent: AgentProcess | None = None
        self.tap: WireTap | None = None
        self.sipps: list[Sipp] = []
        self._runs = 0

    def start(self) -> None:
        self.kam_a = Kamailio(KamailioConfig(port=free_port(), users={USER: PASSWORD}), self.workdir / "kamailio-a")
        self.kam_a.start()
        # the baseline hop: every INVITE relayed statefully (record-routed) to the destination
        self.kam_b = Kamailio(
            KamailioConfig(port=free_port(), users={"unused": "unused"}, relay_to=self.dest_uri),
            self.workdir / "kamailio-b",
        )
        self.kam_b.start()
        for aor, contact in (("relay", f"sip:relay@127.0.0.1:{self.kam_b.cfg.port}"), ("direct", self.dest_uri)):
            # table, AoR, contact, expires (0: permanent), q, path, flags, cflags, methods
            res = self.kam_a.rpc("ul.add", "location", aor, contact, "0", "1.0", "s:", "0", "0", "4294967295")
            if "error" in res.stdout or self.kam_a.lookup(aor) is None:
                raise RuntimeError(f"ul.add {aor} failed: {res.stdout} {res.stderr}")
        conn: dict[str, Any] = {
            "connection_id": "bench",
            "user_id": "323",
            "connection_name": "forwarding benchmark",
            "external_uac_settings": {
                "proxy": f"sip:127.0.0.1:{self.kam_a.cfg.port}",
                "transport": "UDP",
                "username": USER,
                "password": PASSWORD,
                "expiration_sec": 600,
            },
            "internal_uac_settings": {"destination_uri": f"1006@127.0.0.1:{self.dest_port}"},
        }
        self.agent = AgentProcess(
            self.workdir / "agent",
            [conn],
            sip={"rtp_port": random.randrange(20000, 40000, 2), "rtp_port_range": 200},
            log={"level": "info"},
        )
        self.agent.start()
        kam_a = self.kam_a
        self.agent.wait_for(lambda: kam_a.lookup(USER) is not None, 15, f"{USER} registered in Kamailio A")
        tap = WireTap({self.kam_a.cfg.port, self.kam_b.cfg.port, self.agent.sip_port, self.dest_port})
        if tap.start():
            self.tap = tap

    def middle_port(self, setup: str) -> int:
        assert self.kam_a is not None and self.kam_b is not None and self.agent is not None
        return {"agent": self.agent.sip_port, "kamailio": self.kam_b.cfg.port, "direct": self.kam_a.cfg.port}[setup]

    def run(self, setup: str, rate: float, calls: int) -> RunResult:
        assert self.kam_a is not None and self.agent is not None
        self._runs += 1
        tag = f"{self._runs:02d}-{setup}-{rate:g}cps"
        began = time.time()
        dest = Sipp(
            self.dest_scenario,
            self.dest_port,
            variables={"callee": "assistant", "rtp_port": free_port()},
            workdir=self.workdir / tag / "dest",
            calls=calls,
        )
        self.sipps.append(dest)
        dest.start()
        pbx = Sipp(
            scenario_path("pbx_call.xml"),
            free_port(),
            variables={"caller": "1000", "sdp_user": "pbx", "rtp_port": free_port(), "ruri_params": ""},
            workdir=self.workdir / tag / "pbx",
            calls=calls,
            timeout=calls / rate + 20.0,
            extra_args=["-r", f"{rate:g}", "-d", str(self.hold_ms)],
            remote=f"127.0.0.1:{self.kam_a.cfg.port}",
            service=AOR[setup],
        )
        self.sipps.append(pbx)
        try:
            pbx.start()
            pbx.wait(calls / rate + 40.0)
            answered = sum(1 for m in pbx.received_responses(200) if m.cseq_method == "INVITE")
            _wait(lambda: len(dest.received_requests("BYE")) >= answered, 5.0)
            time.sleep(0.3)  # the last 200 to BYE, and SIPp's 200 ms linger
        finally:
            pbx.stop()
            dest.stop()
        agent = self.agent
        if setup == "agent":  # every call slot free before the next run
            _wait(lambda: _metric(agent, "uac_agent_calls_active") == 0, 10.0)
        res = analyse(setup, rate, calls, pbx, dest)
        if self.tap is not None:
            analyse_hop(res, self.tap.packets(began, time.time()), self.middle_port(setup), self.dest_port)
        return res

    def agent_setup_metric(self) -> tuple[float, float]:
        """uac_agent_call_setup_seconds: (sum, count)."""
        if self.agent is None:
            return math.nan, 0.0
        return (
            _metric(self.agent, "uac_agent_call_setup_seconds_sum"),
            _metric(self.agent, "uac_agent_call_setup_seconds_count"),
        )

    def close(self) -> None:
        if self.tap is not None:
            self.tap.stop()
        for s in self.sipps:
            s.stop()
        if self.agent is not None:
            try:
                if self.agent.proc is not None and self.agent.proc.poll() is None:
                    self.agent.terminate()  # unregisters
            except Exception:
                pass
            finally:
                self.agent.kill()
        for k in (self.kam_b, self.kam_a):
            if k is not None:
                k.stop()


# -- report -----------------------------------------------------------------------------------------


def _ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}"


def _cps(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1f}"


def _pp(values: Sequence[float]) -> str:
    return f"{_ms(percentile(values, 50))} / {_ms(percentile(values, 99))}" if values else "-"


def _ratio(a: float, b: float) -> str:
    return "-" if math.isnan(a) or math.isnan(b) or b <= 0 else f"{a / b:.1f}x"


def _top(top: float | None, rates: Sequence[float]) -> str:
    """The highest clean rate; ">= R" when no tested rate made the setup fail."""
    if top is None:
        return "none"
    return f">= {top:g}" if rates and top >= max(rates) else f"{top:g}"


def _rate_list(rates: Sequence[float]) -> str:
    return ", ".join(f"{r:g}" for r in rates) + " cps" if rates else "none"


def _finals(r: RunResult) -> str:
    """The PBX's final answers, e.g. ``200: 27, 486: 13`` (``none``: no final answer at all)."""
    text = ", ".join(f"{code}: {n}" for code, n in r.finals.items())
    return text + (f" (BYE not 200: {r.bye_failed})" if r.bye_failed else "")


_SERIES = ("invite_ms", "ok_ms", "hop_invite_ms", "hop_ok_ms", "call_ms")


def report(results: list[RunResult], rates: list[float], setups: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """The tables (Markdown) and a summary for JSON."""
    lines = [
        "Per rate; ms over answered calls, p50 / p99. path: PBX -> destination from the SIPp traces;",
        "hop: at the middle hop (agent, Kamailio B, Kamailio A for direct) from kernel packet timestamps.",
        "",
        "| setup | cps asked | cps sent | calls | failed | PBX finals | peak conc. "
        "| path INVITE | path 200 | hop INVITE | hop 200 |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for rate in rates:
        for setup in setups:
            for r in results:
                if r.setup == setup and r.rate == rate:
                    lines.append(
                        f"| {setup} | {rate:g} | {_cps(r.achieved_cps)} | {r.calls} | {r.failed} | {_finals(r)} "
                        f"| {r.peak_concurrent} | {_pp(r.invite_ms)} | {_pp(r.ok_ms)} "
                        f"| {_pp(r.hop_invite_ms)} | {_pp(r.hop_ok_ms)} |"
                    )
    # highest rate with zero failed calls, none failed at any lower rate either
    best: dict[str, float | None] = {}
    for setup in setups:
        best[setup] = None
        for rate in rates:
            run = next((x for x in results if x.setup == setup and x.rate == rate), None)
            if run is None or not run.clean:
                break
            best[setup] = rate
    # pooled over the rates at which the agent failed no call: the same load for every setup
    clean_rates = [
        rate
        for rate in rates
        if "agent" not in setups or all(r.clean for r in results if r.rate == rate and r.setup == "agent")
    ]
    pooled: dict[str, dict[str, float]] = {}
    for setup in setups:
        runs = [r for r in results if r.setup == setup and r.rate in clean_rates]
        p: dict[str, float] = {"calls": float(sum(len(r.invite_ms) for r in runs))}
        for name in _SERIES:
            values = [v for r in runs for v in getattr(r, name)]
            p[f"{name}_p50"] = percentile(values, 50)
            p[f"{name}_p99"] = percentile(values, 99)
        pooled[setup] = p

    def pp(p: dict[str, float], name: str) -> str:
        return f"{_ms(p[name + '_p50'])} / {_ms(p[name + '_p99'])}"

    lines += [
        "",
        f"Pooled over the rates the agent took with no failed call ({_rate_list(clean_rates)}); ms, p50 / p99:",
        "",
        "| setup | middle hop | calls | path INVITE | path 200 | hop INVITE | hop 200 | call length p50 "
        "| highest clean cps |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setup in setups:
        p = pooled[setup]
        top = best[setup]
        lines.append(
            f"| {setup} | {MIDDLE[setup]} | {int(p['calls'])} | {pp(p, 'invite_ms')} | {pp(p, 'ok_ms')} "
            f"| {pp(p, 'hop_invite_ms')} | {pp(p, 'hop_ok_ms')} | {_ms(p['call_ms_p50'])} "
            f"| {_top(top, rates)} |"
        )
    if "agent" in setups and "kamailio" in setups:
        a, k = pooled["agent"], pooled["kamailio"]
        lines += ["", "agent / kamailio baseline:"]
        for label, prefix in (("path", ""), ("hop ", "hop_")):
            cells = [
                f"{what} p50 {_ratio(a[f'{prefix}{name}_p50'], k[f'{prefix}{name}_p50'])}"
                f" p99 {_ratio(a[f'{prefix}{name}_p99'], k[f'{prefix}{name}_p99'])}"
                for what, name in (("INVITE", "invite_ms"), ("200", "ok_ms"))
            ]
            lines.append(f"  {label}  {'   '.join(cells)}")
    summary = {"pooled": pooled, "pooled_rates": clean_rates, "highest_clean_cps": best}
    return "\n".join(lines), summary


# -- command line -----------------------------------------------------------------------------------


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: rates are numbers separated by commas, e.g. 2,5,10") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates must be positive")
    return sorted(rates)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.forwarding",
        description="The agent's added call-setup latency and highest clean call rate, against a Kamailio relay.",
    )
    parser.add_argument("--rates", type=_rates, default=_rates("2,5,10,20,40"), help="calls per second, rising")
    parser.add_argument("--calls-per-rate", type=int, default=40, help="calls per setup and rate (SIPp -m)")
    parser.add_argument("--hold-ms", type=int, default=100, help="how long answered calls last (SIPp -d)")
    parser.add_argument("--warmup", type=int, default=4, help="calls per setup before measuring, not counted")
    parser.add_argument("--no-direct", action="store_true", help="skip the PBX -> Kamailio A -> destination floor")
    parser.add_argument("--json", type=Path, help="write every figure (and per-call latencies) to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (SIPp traces, logs)")
    args = parser.parse_args(argv)
    if args.calls_per_rate < 2:
        parser.error("--calls-per-rate must be at least 2")
    missing = [t for t in ("kamailio", "kamcmd", "sipp") if shutil.which(t) is None]
    if missing:
        print(f"missing: {', '.join(missing)} (./scripts/setup.sh installs them)", file=sys.stderr)
        return 2

    setups = [s for s in SETUPS if not (args.no_direct and s == "direct")]
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join([".venv/bin/python", "-m", "bench.forwarding", *given])
    info = machine()
    workdir = Path(tempfile.mkdtemp(prefix="uac-bench-fwd-"))
    signal.signal(signal.SIGTERM, _terminate)
    bench = Bench(workdir, args.hold_ms)
    results: list[RunResult] = []
    tap_note = ""
    started = time.monotonic()
    try:
        print(f"work directory {workdir}", flush=True)
        bench.start()
        if bench.tap is None:
            tap_note = "hop figures skipped: no packet socket on lo (needs root or CAP_NET_RAW)"
            print(tap_note, flush=True)
        for setup in setups if args.warmup > 0 else ():
            bench.run(setup, 2.0, args.warmup)
        metric_before = bench.agent_setup_metric()
        for rate in args.rates:
            for setup in setups:
                r = bench.run(setup, rate, args.calls_per_rate)
                results.append(r)
                print(
                    f"  {setup:8} {rate:5g} cps: {r.answered}/{r.calls} answered ({_finals(r)}), p50 ms: "
                    f"path INVITE {_ms(percentile(r.invite_ms, 50))} 200 {_ms(percentile(r.ok_ms, 50))}, "
                    f"hop INVITE {_ms(percentile(r.hop_invite_ms, 50))} 200 {_ms(percentile(r.hop_ok_ms, 50))}",
                    flush=True,
                )
        metric_after = bench.agent_setup_metric()
        drops = bench.tap.drops() if bench.tap is not None else 0
    finally:
        bench.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started

    table, summary = report(results, args.rates, setups)
    count = metric_after[1] - metric_before[1]
    own = (metric_after[0] - metric_before[0]) / count * 1000.0 if count else math.nan
    print()
    print(
        f"machine: {info['cpus']} CPUs ({info['cpu']}), Linux {info['kernel']}, Python {info['python']}, "
        f"{info['sipp']}, {info['kamailio']}; everything on loopback UDP"
    )
    print(
        f"calls held {args.hold_ms} ms, {args.calls_per_rate} calls per setup and rate, the destination answers "
        f"180 then 200 after 100 ms; the run took {elapsed:.0f} s"
    )
    print()
    print(table)
    print()
    print(
        f"agent's own uac_agent_call_setup_seconds (INVITE in to final answer out, includes the destination's "
        f"100 ms ring): mean {_ms(own)} ms over {int(count)} calls"
    )
    if tap_note:
        print(tap_note)
    elif drops:
        print(f"the packet tap dropped {drops} packets: some hops went unmeasured")
    print()
    print(f"command: {command}")
    if args.keep:
        print(f"traces and logs kept in {workdir}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": command,
                    "machine": info,
                    "hold_ms": args.hold_ms,
                    "calls_per_rate": args.calls_per_rate,
                    "agent_setup_metric_mean_ms": own,
                    "tap_drops": drops,
                    "summary": summary,
                    "runs": [asdict(r) for r in results],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
