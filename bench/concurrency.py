"""Concurrent calls through ONE connection, with G.711 RTP both ways for the whole call.

Three setups get the same calls, one after the other at each size (10, 100, 400, 800, 1,000
calls up at once by default)::

    agent     PBX SIPp -> uac-agent's edge (Kamailio + rtpengine), one connection -> destination SIPp
    baseline  PBX SIPp -> Kamailio + rtpengine configured by hand                 -> destination SIPp
    floor     PBX SIPp ------------------------------------------------------------> destination SIPp

The PBX (``bench_pbx_rtp.xml``) calls the agent's Contact (``;line=bench``; its address is the
connection's ``allowed_sources``), the baseline or the destination straight, at ``--ramp-cps``
until ``N`` calls are up; each answered call sends G.711 u-law (20 ms, 50 packets a second)
for the whole call. The destination (``bench_dest_echo.xml`` with ``-rtp_echo``) answers at once
and sends every RTP packet back as it came, so each call carries RTP both ways. Every call lasts
as long as the ramp, ``--settle`` and ``--measure`` seconds and a second more, so all ``N`` are
up during the measured window.

Measured in the window, for each setup and size (kernel timestamps of the packets on ``lo``,
captured by dumpcap and matched by RTP SSRC and sequence number, which the relays pass on):

* **answered**: the PBX's 200s (its SIPp trace), and the other final answers;
* **RTP loss at the relay**: packets into the relay that never came out (PBX to destination,
  and the echo back);
* **RTP loss end to end**: packets the PBX sent that never came back to it (relay both ways and
  the destination's echo: the floor has only the latter);
* **added one-way delay**: a packet into the relay to the same packet out of it, both
  directions pooled (p50, p99, max); 0 by definition for the floor;
* **CPU**: of the whole agent tree (supervisor, workers, zygote, keeper, Kamailio and its
  children, rtpengine, HAProxy) or of the baseline's Kamailio and rtpengine, in % of one core,
  per call, and by process; the host's busy share; the load generators' and the capture's.

Figures are printed, never asserted. Run ``.venv/bin/python -m bench.concurrency --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.edgelab import (
    MIDDLE,
    SETUPS,
    CallLab,
    CpuFigures,
    Hosts,
    SippRun,
    TreeCpu,
    fmt,
    host_busy,
    host_jiffies,
    machine,
    machine_line,
    missing_engines,
    percentiles,
    ratio,
    terminate_on_sigterm,
    udp_drops,
    udp_rcvbuf_errors,
    write_audio,
)
from bench.pcap import CaptureStats, Dumpcap, ip_int, udp_packets
from lab.sipp import SipMessage

__all__ = ["RtpFigures", "RunResult", "analyse_rtp", "main"]

LEVELS = (10, 100, 400, 800, 1000)
GOAL_LOSS_PCT = 0.1
GOAL_DELAY_P50_MS = 1.0
GOAL_CAPACITY = 0.9  # the agent carries at least 90 % of the baseline's clean calls
PACKETS_PER_SECOND = 50  # G.711 at 20 ms


# -- RTP --------------------------------------------------------------------------------------------


def _delays(values: array[float]) -> dict[str, float]:
    """ms: p50, p99, max and the count of ``values`` (seconds)."""
    ordered = sorted(values)
    p50, p99 = percentiles(ordered, (50, 99))
    return {
        "n": float(len(ordered)),
        "p50": p50 * 1000.0,
        "p99": p99 * 1000.0,
        "max": (ordered[-1] * 1000.0) if ordered else math.nan,
    }


@dataclass
class RtpFigures:
    """RTP in the window, matched by (SSRC, sequence number). Counts are packets."""

    window_s: float = 0.0
    streams: int = 0  # calls whose PBX sent RTP in the window
    sent: int = 0  # PBX -> relay (floor: -> destination), sent in the window
    fwd_lost: int = 0  # ... never out of the relay to the destination
    echoed: int = 0  # destination -> relay (its echo), sent in the window
    back_lost: int = 0  # ... never out of the relay to the PBX
    dest_in: int = 0  # into the destination, in the window
    dest_lost: int = 0  # ... never echoed (the destination SIPp's own loss)
    e2e_lost: int = 0  # sent by the PBX in the window, never back at the PBX
    calls_with_loss: int = 0  # end to end
    worst_call_loss_pct: float = 0.0
    unmatched_out: int = 0  # out of the relay, never seen going in (sent before the window)
    fwd_ms: dict[str, float] = field(default_factory=dict)  # relay, PBX -> destination
    back_ms: dict[str, float] = field(default_factory=dict)  # relay, destination -> PBX
    added_ms: dict[str, float] = field(default_factory=dict)  # both directions pooled
    echo_ms: dict[str, float] = field(default_factory=dict)  # the destination SIPp's turnaround
    rtt_ms: dict[str, float] = field(default_factory=dict)  # PBX out to PBX in

    @property
    def relay_loss_pct(self) -> float:
        total = self.sent + self.echoed
        return 100.0 * (self.fwd_lost + self.back_lost) / total if total else math.nan

    @property
    def e2e_loss_pct(self) -> float:
        return 100.0 * self.e2e_lost / self.sent if self.sent else math.nan

    @property
    def dest_loss_pct(self) -> float:
        return 100.0 * self.dest_lost / self.dest_in if self.dest_in else math.nan

    @property
    def pps_per_call(self) -> float:
        """What the PBX actually sent per call and second (50 when it keeps up)."""
        return self.sent / self.streams / self.window_s if self.streams and self.window_s > 0 else math.nan


def analyse_rtp(path: Path, pbx: str, dest: str, relay: str | None, lo: float, hi: float) -> RtpFigures:
    """RTP legs in the capture ``path``; a packet counts when it was sent into a hop in ``[lo, hi]``.

    Each PBX packet is followed through its four legs: PBX -> relay (t0), relay -> destination
    (t1), destination -> relay (the echo, t2: same SSRC and sequence number), relay -> PBX (t3).
    The relay's added delay is t1 - t0 and t3 - t2. With no relay (``relay`` None, the floor) the
    PBX's packet is both t0 and t1, the destination's both t2 and t3.
    """
    p, d = ip_int(pbx), ip_int(dest)
    r = ip_int(relay) if relay is not None else None
    pend_fwd: dict[int, float] = {}  # t0 waiting for t1
    pend_e2e: dict[int, float] = {}  # t0 waiting for t3
    pend_dest: dict[int, float] = {}  # t1 waiting for t2
    pend_back: dict[int, float] = {}  # t2 waiting for t3
    fwd: array[float] = array("d")
    back: array[float] = array("d")
    echo: array[float] = array("d")
    rtt: array[float] = array("d")
    per_call: Counter[int] = Counter()
    res = RtpFigures(window_s=max(0.0, hi - lo))
    unmatched = 0
    for ts, src, _sport, dst, _dport, payload in udp_packets(path, 12):
        if len(payload) < 12 or payload[0] & 0xC0 != 0x80:
            continue
        key = int.from_bytes(payload[8:12], "big") << 16 | int.from_bytes(payload[2:4], "big")
        in_window = lo <= ts <= hi
        a_in = src == p and (dst == r if r is not None else dst == d)
        b_out = dst == d and (src == r if r is not None else src == p)
        b_in = src == d and (dst == r if r is not None else dst == p)
        a_out = dst == p and (src == r if r is not None else src == d)
        if a_in and in_window:
            pend_fwd[key] = ts
            pend_e2e[key] = ts
            res.sent += 1
            per_call[key >> 16] += 1
        if b_out:
            t0 = pend_fwd.pop(key, None)
            if t0 is not None:
                fwd.append(ts - t0)
            elif r is not None and lo + 0.1 <= ts <= hi:  # its way in was in the window too
                unmatched += 1
            if in_window:
                pend_dest[key] = ts
                res.dest_in += 1
        if b_in:
            t1 = pend_dest.pop(key, None)
            if t1 is not None:
                echo.append(ts - t1)
            if in_window:
                pend_back[key] = ts
                res.echoed += 1
        if a_out:
            t2 = pend_back.pop(key, None)
            if t2 is not None:
                back.append(ts - t2)
            t0 = pend_e2e.pop(key, None)
            if t0 is not None:
                rtt.append(ts - t0)
    res.fwd_lost, res.back_lost = len(pend_fwd), len(pend_back)
    res.dest_lost, res.e2e_lost = len(pend_dest), len(pend_e2e)
    res.streams = len(per_call)
    res.unmatched_out = unmatched
    lost_by_call = Counter(key >> 16 for key in pend_e2e)
    res.calls_with_loss = len(lost_by_call)
    res.worst_call_loss_pct = max((100.0 * n / per_call[c] for c, n in lost_by_call.items()), default=0.0)
    if r is not None:
        res.fwd_ms = _delays(fwd)
        res.back_ms = _delays(back)
        res.added_ms = _delays(fwd + back)
    res.echo_ms = _delays(echo)
    res.rtt_ms = _delays(rtt)
    return res


# -- one run: a setup at a size ---------------------------------------------------------------------


@dataclass
class RunResult:
    setup: str
    calls: int
    answered: int = 0  # 200 to the INVITE
    up_at_window: int = 0  # answered before the window opened
    finals: dict[str, int] = field(default_factory=dict)  # the PBX's final answers: code -> calls
    bye_failed: int = 0
    sipp_failed: int | None = None
    answer_ms: dict[str, float] = field(default_factory=dict)  # PBX: INVITE sent to 200 received
    rtp: RtpFigures = field(default_factory=RtpFigures)
    cpu: CpuFigures | None = None  # the middle (agent tree, baseline pair)
    cpu_per_call: float = math.nan  # % of one core per call up
    host_busy_pct: float = math.nan  # of all cores
    loadgen_cpu: float = math.nan  # both SIPps, % of one core
    capture_cpu: float = math.nan
    capture: CaptureStats | None = None
    udp_drops: dict[str, int] = field(default_factory=dict)  # receive-buffer drops in the window, by role
    udp_rcvbuf_errors: int = 0  # the whole host's, in the window
    rejected: dict[str, float] = field(default_factory=dict)  # the agent's refusals by reason
    elapsed_s: float = 0.0

    @property
    def clean(self) -> bool:
        loss = self.rtp.e2e_loss_pct
        return self.answered == self.calls and not math.isnan(loss) and loss < GOAL_LOSS_PCT


def _finals(messages: list[SipMessage]) -> tuple[dict[str, int], int, int, list[float]]:
    """(final answers by code, answered, BYEs without 200, answer times in ms) from the PBX's trace."""
    sent: dict[str, float] = {}
    final: dict[str, tuple[int, float]] = {}
    bye_ok: set[str] = set()
    for m in messages:
        cid = m.call_id
        if cid is None:
            continue
        if m.direction == "sent" and m.method == "INVITE":
            sent.setdefault(cid, m.timestamp)
        elif m.direction == "received" and not m.is_request and m.cseq_method == "INVITE":
            code = m.status_code or 0
            if code >= 200 and cid not in final:
                final[cid] = (code, m.timestamp)
        elif m.direction == "received" and m.cseq_method == "BYE" and m.status_code == 200:
            bye_ok.add(cid)
    codes = Counter(str(final[c][0]) if c in final else "none" for c in sent)
    answered = [c for c in sent if c in final and final[c][0] == 200]
    times = [(final[c][1] - sent[c]) * 1000.0 for c in answered]
    return dict(sorted(codes.items())), len(answered), sum(1 for c in answered if c not in bye_ok), times


def _answered_so_far(pbx: SippRun) -> int:
    return sum(
        1 for m in pbx.messages() if m.direction == "received" and m.status_code == 200 and m.cseq_method == "INVITE"
    )


@dataclass(frozen=True)
class Plan:
    levels: list[int]
    setups: list[str]
    ramp_cps: float
    settle_s: float
    measure_s: float
    keep: bool


def run_one(lab: CallLab, plan: Plan, setup: str, calls: int, tag: str) -> RunResult:
    h = lab.hosts
    route = lab.route(setup)
    res = RunResult(setup, calls)
    work = lab.workdir / tag
    began = time.monotonic()
    ramp = calls / plan.ramp_cps
    hold_s = ramp + plan.settle_s + plan.measure_s + 2.0
    rejected_before = lab.agent.rejected() if setup == "agent" and lab.agent is not None else {}
    dest = lab.sipp(
        SippRun(
            "bench_dest_echo.xml",
            h.dest,
            work / "dest",
            calls=calls,
            media=True,
            rtp_echo=True,
            variables={"callee": "assistant"},
        )
    )
    write_audio(work / "pbx")
    pbx = lab.sipp(
        SippRun(
            "bench_pbx_rtp.xml",
            h.pbx,
            work / "pbx",
            calls=calls,
            remote=route.remote,
            service=route.service,
            rate=plan.ramp_cps,
            limit=calls,
            hold_ms=round(hold_s * 1000),
            media=True,
            rtp_echo=True,
            trace=True,
            timeout=2 * ramp + hold_s + 60,
            variables={"ruri_params": route.ruri_params},
        )
    )
    opened = time.monotonic() + ramp + plan.settle_s
    while time.monotonic() < opened and pbx.pid is not None:
        time.sleep(0.2)
    res.up_at_window = _answered_so_far(pbx)
    cap = Dumpcap(work / "rtp.pcap", f"udp and (host {h.pbx} or host {h.dest}) and not port 5060", snaplen=64)
    lab.captures.append(cap)
    cap.start()
    middle = TreeCpu(lab.middle_pids(setup), lambda: lab.middle_root(setup))
    loadgen = TreeCpu(lambda: [p for p in (pbx.pid, dest.pid) if p is not None])
    capture = TreeCpu(lambda: [cap.pid] if cap.pid is not None else [])
    roles = {"relay": route.middle or h.dest, "pbx": h.pbx, "dest": h.dest}
    drops0, snmp0, host0 = udp_drops(roles.values()), udp_rcvbuf_errors(), host_jiffies()
    for s in (middle, loadgen, capture):
        s.start()
    time.sleep(plan.measure_s)
    res.cpu = middle.stop()
    res.loadgen_cpu = loadgen.stop().percent
    res.capture_cpu = capture.stop().percent
    drops1, snmp1, host1 = udp_drops(roles.values()), udp_rcvbuf_errors(), host_jiffies()
    res.host_busy_pct = host_busy(host0, host1)
    res.udp_rcvbuf_errors = snmp1 - snmp0
    res.udp_drops = {role: drops1[ip] - drops0[ip] for role, ip in roles.items() if route.middle or role != "relay"}
    res.capture = cap.stop()
    lab.captures.remove(cap)
    if pbx.wait(2 * ramp + hold_s + 60) is None:
        pbx.stop()
    if dest.wait(10) is None:
        dest.stop()
    res.finals, res.answered, res.bye_failed, answer_times = _finals(pbx.messages())
    ordered = sorted(answer_times)
    p50, p99 = percentiles(ordered, (50, 99))
    res.answer_ms = {"p50": p50, "p99": p99, "max": ordered[-1] if ordered else math.nan}
    res.sipp_failed = pbx.counts()[1]
    res.rtp = analyse_rtp(cap.path, h.pbx, h.dest, route.middle, cap.started_at + 0.2, cap.stopped_at - 1.0)
    if res.cpu is not None and res.up_at_window:
        res.cpu_per_call = res.cpu.percent / res.up_at_window
    if setup == "agent" and lab.agent is not None:
        lab.agent.wait_idle()
        after = lab.agent.rejected()
        res.rejected = {k: v - rejected_before.get(k, 0.0) for k, v in after.items() if v - rejected_before.get(k, 0.0)}
    if not plan.keep:
        cap.path.unlink(missing_ok=True)
    time.sleep(1.0)  # the relays' sessions gone, the sockets quiet, before the next run
    res.elapsed_s = time.monotonic() - began
    return res


# -- report -----------------------------------------------------------------------------------------


def _pct(v: float) -> str:
    if math.isnan(v):
        return "-"
    return f"{v:.3f} %" if v < 10 else f"{v:.1f} %"


def _ms3(d: dict[str, float], key: str = "p50") -> str:
    return fmt(d.get(key, math.nan), 3) if d else "-"


def _finals_text(r: RunResult) -> str:
    text = ", ".join(f"{c}: {n}" for c, n in r.finals.items())
    if r.bye_failed:
        text += f" (BYE not 200: {r.bye_failed})"
    if r.rejected:
        text += " [agent refused: " + ", ".join(f"{k} {v:g}" for k, v in sorted(r.rejected.items())) + "]"
    return text


def _goal(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**not met**")


def report(results: list[RunResult], plan: Plan) -> tuple[str, dict[str, Any]]:
    by = {(r.setup, r.calls): r for r in results}
    lines = [
        "Per size and setup. Loss: relay = packets into the relay that never came out (both directions);",
        "end to end = packets the PBX sent that never came back to it. Added delay: into the relay to out of",
        "it, both directions, ms. CPU: % of one core over the window (middle = agent tree / baseline pair).",
        "",
        "| setup | calls | answered | finals | up in window | RTP pkts (PBX, pps/call) | loss relay "
        "| loss end to end | calls with loss | added delay p50 / p99 / max ms | CPU middle | CPU per call "
        "| host busy | UDP drops relay/pbx/dest |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n in plan.levels:
        for s in plan.setups:
            r = by.get((s, n))
            if r is None:
                continue
            d = r.udp_drops
            lines.append(
                f"| {s} | {n} | {r.answered} | {_finals_text(r)} | {r.up_at_window} "
                f"| {r.rtp.sent} ({fmt(r.rtp.pps_per_call, 1)}) "
                f"| {_pct(r.rtp.relay_loss_pct) if s != 'floor' else 'n/a'} | {_pct(r.rtp.e2e_loss_pct)} "
                f"| {r.rtp.calls_with_loss} "
                f"| {_ms3(r.rtp.added_ms)} / {_ms3(r.rtp.added_ms, 'p99')} / {_ms3(r.rtp.added_ms, 'max')} "
                f"| {fmt(r.cpu.percent if r.cpu and s != 'floor' else math.nan, 1, ' %')} "
                f"| {fmt(r.cpu_per_call if s != 'floor' else math.nan, 3, ' %')} "
                f"| {fmt(r.host_busy_pct, 0, ' %')} "
                f"| {d.get('relay', '-')}/{d.get('pbx', 0)}/{d.get('dest', 0)} |"
            )
    # the highest size clean at it and at every lower size
    best: dict[str, int | None] = {}
    for s in plan.setups:
        best[s] = None
        for n in plan.levels:
            r = by.get((s, n))
            if r is None or not r.clean:
                break
            best[s] = n
    lines += ["", "CPU of the middle by process (% of one core over the window):", ""]
    for n in plan.levels:
        for s in plan.setups:
            r = by.get((s, n))
            if r is None or r.cpu is None or s == "floor":
                continue
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r.cpu.by_process.items(), key=lambda kv: -kv[1]))
            lines.append(
                f"- {s} {n}: {parts}; load generators {fmt(r.loadgen_cpu, 1)}, capture {fmt(r.capture_cpu, 1)}"
            )
    # goals
    have_both = "agent" in plan.setups and "baseline" in plan.setups
    lines += [
        "",
        f"Goals (calls up at once; clean = every call answered and end-to-end loss under {GOAL_LOSS_PCT} %):",
        "",
        "| figure | agent | baseline | floor | agent / baseline | goal | |",
        "|---|---:|---:|---:|---:|---|---|",
    ]

    def top(s: str) -> str:
        if s not in plan.setups:
            return "-"
        b = best[s]
        if b is None:
            return "none"
        return f">= {b}" if b >= max(plan.levels) else str(b)

    a_best, b_best = best.get("agent"), best.get("baseline")
    cap_ok: bool | None = None
    if have_both and b_best is not None:
        cap_ok = (a_best or 0) >= GOAL_CAPACITY * b_best
    cap_note = _goal(cap_ok)
    if cap_ok and b_best is not None and b_best >= max(plan.levels):
        cap_note = f"met up to {max(plan.levels)}, the largest size tried"
    lines.append(
        f"| highest clean size | {top('agent')} | {top('baseline')} | {top('floor')} "
        f"| {ratio(float(a_best or 0), float(b_best or 0)) if have_both and b_best else '-'} "
        f"| >= {GOAL_CAPACITY:.0%} of the baseline's | {cap_note} |"
    )
    for n in plan.levels:
        a, b, f = by.get(("agent", n)), by.get(("baseline", n)), by.get(("floor", n))

        def cell(r: RunResult | None, what: str) -> float:
            if r is None:
                return math.nan
            if what == "loss":
                return r.rtp.e2e_loss_pct
            if what == "relay":
                return r.rtp.relay_loss_pct
            if what == "delay":
                return r.rtp.added_ms.get("p50", math.nan) if r.rtp.added_ms else math.nan
            return r.cpu_per_call

        loss_a = cell(a, "loss")
        lines.append(
            f"| {n} calls: loss end to end | {_pct(loss_a)} | {_pct(cell(b, 'loss'))} | {_pct(cell(f, 'loss'))} "
            f"| {ratio(loss_a, cell(b, 'loss'))} | < {GOAL_LOSS_PCT} % "
            f"| {_goal(None if math.isnan(loss_a) else loss_a < GOAL_LOSS_PCT)} |"
        )
        relay_a = cell(a, "relay")
        lines.append(
            f"| {n} calls: loss at the relay | {_pct(relay_a)} | {_pct(cell(b, 'relay'))} | n/a "
            f"| {ratio(relay_a, cell(b, 'relay'))} | < {GOAL_LOSS_PCT} % "
            f"| {_goal(None if math.isnan(relay_a) else relay_a < GOAL_LOSS_PCT)} |"
        )
        delay_a = cell(a, "delay")
        lines.append(
            f"| {n} calls: added one-way delay p50 | {fmt(delay_a, 3, ' ms')} | {fmt(cell(b, 'delay'), 3, ' ms')} "
            f"| 0 | {ratio(delay_a, cell(b, 'delay'))} | <= {GOAL_DELAY_P50_MS:g} ms "
            f"| {_goal(None if math.isnan(delay_a) else delay_a <= GOAL_DELAY_P50_MS)} |"
        )
        cpu_a = cell(a, "cpu")
        lines.append(
            f"| {n} calls: CPU per call (% of a core) | {fmt(cpu_a, 3)} | {fmt(cell(b, 'cpu'), 3)} | - "
            f"| {ratio(cpu_a, cell(b, 'cpu'))} | (baseline's rtpengine: 0.14 % in the issue) | |"
        )
    summary = {"highest_clean": best}
    return "\n".join(lines), summary


# -- command line -----------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: numbers separated by commas, e.g. 10,100") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("sizes must be at least 1")
    return values


def _setups(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in SETUPS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"setups are {', '.join(SETUPS)}")
    return [s for s in SETUPS if s in names]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.concurrency",
        description="Concurrent calls with RTP both ways through one connection: the agent against a "
        "Kamailio + rtpengine baseline and SIPp straight to SIPp.",
    )
    parser.add_argument("--levels", type=_ints, default=list(LEVELS), help="calls up at once, e.g. 10,50")
    parser.add_argument("--setups", type=_setups, default=list(SETUPS), help="agent,baseline,floor (default all)")
    parser.add_argument("--ramp-cps", type=float, default=100.0, help="calls per second while the calls go up")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after the ramp before measuring")
    parser.add_argument("--measure", type=float, default=20.0, help="seconds measured with all calls up")
    parser.add_argument("--ip-base", default="127.0.0.60", help="the first of the 5 loopback addresses used")
    parser.add_argument(
        "--max-calls",
        type=int,
        default=2000,
        help="the agent's sip.max_calls (the connection has no max_calls of its own)",
    )
    parser.add_argument(
        "--media-max-cpu",
        type=float,
        help="the agent's edge.media_max_cpu_percent (default: as shipped, 90: the host's CPU, load generators in)",
    )
    parser.add_argument("--sip-processes", type=int, default=4, help="edge.sip_processes, and the baseline's children")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (traces, captures, logs)")
    args = parser.parse_args(argv)
    if args.measure < 3:
        parser.error("--measure must be at least 3 s")
    missing = missing_engines()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    hosts = Hosts.from_base(args.ip_base)
    plan = Plan(args.levels, args.setups, args.ramp_cps, args.settle, args.measure, args.keep)
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join([".venv/bin/python", "-m", "bench.concurrency", *given])
    info = machine()
    workdir = Path(tempfile.mkdtemp(prefix="uac-bench-conc-"))
    terminate_on_sigterm()
    lab = CallLab(
        workdir,
        hosts,
        plan.setups,
        max_calls=args.max_calls,
        media_max_cpu=args.media_max_cpu,
        sip_processes=args.sip_processes,
        log_level=args.log_level,
    )
    results: list[RunResult] = []
    started = time.monotonic()
    try:
        print(f"work directory {workdir}", flush=True)
        lab.start()
        k = 0
        for n in plan.levels:
            for s in plan.setups:
                k += 1
                r = run_one(lab, plan, s, n, f"{k:02d}-{s}-{n}")
                results.append(r)
                print(
                    f"  {s:8} {n:5} calls: {r.answered} answered ({_finals_text(r)}), loss relay "
                    f"{_pct(r.rtp.relay_loss_pct)} end to end {_pct(r.rtp.e2e_loss_pct)}, added p50 "
                    f"{_ms3(r.rtp.added_ms)} ms, CPU {fmt(r.cpu.percent if r.cpu else math.nan, 1)} % "
                    f"({fmt(r.cpu_per_call, 3)} % per call), host {fmt(r.host_busy_pct, 0)} %, {r.elapsed_s:.0f} s",
                    flush=True,
                )
    except KeyboardInterrupt:
        print("interrupted: everything started is stopped", file=sys.stderr)
        return 130
    finally:
        lab.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    table, summary = report(results, plan)
    print()
    print(machine_line(info))
    print(
        f"calls ramped at {plan.ramp_cps:g} cps, measured {plan.measure_s:g} s with all up ({plan.settle_s:g} s after "
        f"the ramp); G.711 u-law 20 ms from the PBX, echoed by the destination; the run took {elapsed:.0f} s"
    )
    print(f"setups: {'; '.join(f'{s} = {MIDDLE[s]}' for s in plan.setups)}")
    print()
    print(table)
    notes = []
    for r in results:
        if r.capture is not None and r.capture.dropped:
            notes.append(f"{r.setup} {r.calls}: the capture dropped {r.capture.dropped} packets (loss overstated)")
        if r.rejected.get("media_unavailable"):
            notes.append(
                f"{r.setup} {r.calls}: the edge's rtpengine refused {r.rejected['media_unavailable']:g} calls "
                "(media_unavailable: the host's CPU over edge.media_max_cpu_percent; --media-max-cpu 100 lifts it)"
            )
        if r.rtp.sent and r.rtp.pps_per_call < 0.98 * PACKETS_PER_SECOND:
            notes.append(
                f"{r.setup} {r.calls}: the PBX sent {r.rtp.pps_per_call:.1f} packets a second per call, not 50: "
                "the load generator fell behind"
            )
    if lab.agent_killed:
        notes.append(f"the agent did not stop cleanly: {lab.agent_killed} processes had to be killed")
    if notes:
        print()
        print("\n".join(f"note: {n}" for n in notes))
    print()
    print(f"command: {command}")
    if args.keep:
        print(f"traces, captures and logs kept in {workdir}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": command,
                    "machine": info,
                    "plan": asdict(plan),
                    "summary": summary,
                    "runs": [
                        {
                            **asdict(r),
                            "clean": r.clean,
                            "relay_loss_pct": r.rtp.relay_loss_pct,
                            "e2e_loss_pct": r.rtp.e2e_loss_pct,
                            "dest_loss_pct": r.rtp.dest_loss_pct,
                            "pps_per_call": r.rtp.pps_per_call,
                        }
                        for r in results
                    ],
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
