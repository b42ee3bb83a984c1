"""Call rate: short calls at 50 to 800 calls a second, and the hop latency of INVITE and 200.

The successor of ``bench/forwarding.py`` (which measured the agent when it bridged calls in its
workers, 2 at a time): the same questions, asked of the edge, with the baseline now a Kamailio
*and* an rtpengine configured by hand. Three setups get the same calls, one after the other at
each rate::

    agent     PBX SIPp -> uac-agent's edge (Kamailio + rtpengine), one connection -> destination SIPp
    baseline  PBX SIPp -> Kamailio + rtpengine configured by hand                 -> destination SIPp
    floor     PBX SIPp ------------------------------------------------------------> destination SIPp

The PBX (``pbx_call.xml``; ``bench_pbx_rtp.xml`` with ``--rtp``) places ``rate x --seconds``
calls at ``-r rate``, each held ``--hold-ms`` after its 200, then BYE. The destination
(``bench_dest_echo.xml``) answers at once: 180, then 200 with SDP. Every SIP packet on ``lo`` to
or from the two SIPps is captured by dumpcap (kernel timestamps) and matched by Call-ID, which
the edge and the baseline both pass on unchanged:

* **failed**: a call whose final answer was not 200, that got none, or whose BYE got no 200
  (or that SIPp itself counted failed); the PBX's final answers by code; INVITE retransmissions
  (the PBX resends an INVITE 500 ms after it when nothing came back: a hop falling behind);
* **hop**: at the middle, the INVITE in to the INVITE out, and the destination's 200 in to the
  200 out (p50, p99); 0 by definition for the floor;
* **100**: INVITE in to the middle's 100 Trying out (how soon the hop takes the call);
* **answer**: the PBX's INVITE to the 200 it gets (the whole path, destination included);
* **CPU**: of the whole agent tree or the baseline's pair over the run, in % of one core and in
  ms of CPU per call; the host's busy share.

Per setup, the highest clean rate (no failed call at it and at every lower rate), and the
agent's hops against the baseline's. Figures are printed, never asserted.
Run ``.venv/bin/python -m bench.cps --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.edgelab import (
    MEDIA_PORT,
    MIDDLE,
    SETUPS,
    SIP_PORT,
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
    write_audio,
)
from bench.pcap import CaptureStats, Dumpcap, ip_int, udp_packets

__all__ = ["CallTimes", "RunResult", "analyse_sip", "main"]

RATES = (50.0, 100.0, 200.0, 400.0, 600.0, 800.0)
GOAL_CPS = 400.0
GOAL_HOP_RATIO = 1.2
_CALL_ID = re.compile(rb"\r\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]+)", re.IGNORECASE)
_CSEQ = re.compile(rb"\r\ncseq[ \t]*:[ \t]*\d+[ \t]+([A-Za-z]+)", re.IGNORECASE)


# -- SIP on the wire --------------------------------------------------------------------------------


@dataclass
class CallTimes:
    """One call as the capture saw it (epoch seconds; None: not seen)."""

    inv_in: float | None = None  # the PBX's first INVITE, into the middle
    inv_out: float | None = None  # the first INVITE out of the middle, to the destination
    invites: int = 0  # INVITEs the PBX sent (1 + retransmissions)
    trying: float | None = None  # the middle's first 100 to the PBX
    ok_in: float | None = None  # the destination's first 200 (INVITE), into the middle
    ok_out: float | None = None  # the first 200 (INVITE) out of the middle, to the PBX
    final: int | None = None  # the first final answer to the INVITE the PBX got
    final_ts: float | None = None
    bye_ok: bool = False  # the PBX's BYE got 200


def analyse_sip(path: Path, pbx: str, dest: str, middle: str | None) -> dict[str, CallTimes]:
    """Each call's times from the capture ``path`` (every SIP packet to or from the two SIPps).

    With no middle (the floor) the PBX's INVITE is both "in" and "out", and so is the 200.
    """
    p, d = ip_int(pbx), ip_int(dest)
    m = ip_int(middle) if middle is not None else None
    to_mid = m if m is not None else d  # where the PBX's requests go
    from_mid_to_dest = m if m is not None else p  # who sends the destination its requests
    to_mid_from_dest = m if m is not None else p  # where the destination's answers go
    from_mid_to_pbx = m if m is not None else d  # who sends the PBX its answers
    calls: dict[str, CallTimes] = {}
    for ts, src, sport, dst, dport, payload in udp_packets(path):
        if sport != SIP_PORT and dport != SIP_PORT:
            continue
        cid_m = _CALL_ID.search(payload)
        cseq_m = _CSEQ.search(payload)
        if cid_m is None or cseq_m is None:
            continue
        cid = cid_m.group(1).strip().decode("latin-1")
        cseq = cseq_m.group(1).upper()
        c = calls.get(cid)
        if c is None:
            c = calls[cid] = CallTimes()
        if payload.startswith(b"SIP/2.0 "):
            try:
                code = int(payload[8:11])
            except ValueError:
                continue
            if cseq == b"INVITE":
                if src == d and dst == to_mid_from_dest and code == 200 and c.ok_in is None:
                    c.ok_in = ts
                if dst == p and src == from_mid_to_pbx:
                    if code == 100 and c.trying is None:
                        c.trying = ts
                    if code >= 200 and c.final is None:
                        c.final, c.final_ts = code, ts
                    if code == 200 and c.ok_out is None:
                        c.ok_out = ts
            elif cseq == b"BYE" and dst == p and src == from_mid_to_pbx and code == 200:
                c.bye_ok = True
        elif payload.startswith(b"INVITE "):
            if src == p and dst == to_mid:
                c.invites += 1
                if c.inv_in is None:
                    c.inv_in = ts
            if dst == d and src == from_mid_to_dest and c.inv_out is None:
                c.inv_out = ts
    return {cid: c for cid, c in calls.items() if c.invites}  # the PBX's calls only


def _pp(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p50, p99 = percentiles(ordered, (50, 99))
    return {"n": float(len(ordered)), "p50": p50, "p99": p99, "max": ordered[-1] if ordered else math.nan}


# -- one run: a setup at a rate ---------------------------------------------------------------------


@dataclass
class RunResult:
    setup: str
    rate: float
    planned: int
    placed: int = 0
    answered: int = 0
    failed: int = 0
    finals: dict[str, int] = field(default_factory=dict)
    bye_failed: int = 0
    sipp_failed: int | None = None
    invite_retransmissions: int = 0
    achieved_cps: float = math.nan
    hop_invite_ms: dict[str, float] = field(default_factory=dict)
    hop_ok_ms: dict[str, float] = field(default_factory=dict)
    trying_ms: dict[str, float] = field(default_factory=dict)
    answer_ms: dict[str, float] = field(default_factory=dict)
    hop_invite: list[float] = field(default_factory=list)  # per answered call, for pooling
    hop_ok: list[float] = field(default_factory=list)
    cpu: CpuFigures | None = None
    cpu_ms_per_call: float = math.nan
    host_busy_pct: float = math.nan
    capture: CaptureStats | None = None
    rejected: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    round: int = 1
    rounds: int = 1  # how many runs a merged result stands for

    @property
    def clean(self) -> bool:
        return self.failed == 0 and self.placed >= self.planned


def merged(runs: list[RunResult]) -> RunResult:
    """The runs of one setup at one rate over every round, as one: counts summed, hops pooled
    (p50/p99 over every answered call of every round), CPU averaged; 100 and answer times are
    the median of the rounds' p50s and p99s."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    out = RunResult(first.setup, first.rate, sum(r.planned for r in runs), rounds=len(runs))
    out.placed = sum(r.placed for r in runs)
    out.answered = sum(r.answered for r in runs)
    out.failed = sum(r.failed for r in runs)
    out.finals = dict(sum((Counter(r.finals) for r in runs), Counter()))
    out.bye_failed = sum(r.bye_failed for r in runs)
    out.invite_retransmissions = sum(r.invite_retransmissions for r in runs)
    out.achieved_cps = sum(r.achieved_cps for r in runs) / len(runs)
    out.hop_invite = [v for r in runs for v in r.hop_invite]
    out.hop_ok = [v for r in runs for v in r.hop_ok]
    out.hop_invite_ms, out.hop_ok_ms = _pp(out.hop_invite), _pp(out.hop_ok)
    for name in ("trying_ms", "answer_ms"):
        keys = {k for r in runs for k in getattr(r, name)}
        setattr(out, name, {k: _median([getattr(r, name).get(k, math.nan) for r in runs]) for k in keys})
    cpus = [r.cpu for r in runs if r.cpu is not None]
    if cpus:
        names = {k for c in cpus for k in c.by_process}
        out.cpu = CpuFigures(
            sum(c.percent for c in cpus) / len(cpus),
            {k: sum(c.by_process.get(k, 0.0) for c in cpus) / len(cpus) for k in names},
            sum(c.seconds for c in cpus),
        )
    out.cpu_ms_per_call = sum(r.cpu_ms_per_call for r in runs) / len(runs)
    out.host_busy_pct = sum(r.host_busy_pct for r in runs) / len(runs)
    out.rejected = dict(sum((Counter(r.rejected) for r in runs), Counter()))
    out.elapsed_s = sum(r.elapsed_s for r in runs)
    return out


def _median(values: list[float]) -> float:
    ordered = sorted(v for v in values if not math.isnan(v))
    return percentiles(ordered, (50,))[0] if ordered else math.nan


@dataclass(frozen=True)
class Plan:
    rates: list[float]
    setups: list[str]
    seconds: float
    hold_ms: int
    warmup: int
    rtp: bool
    keep: bool
    rounds: int = 1


def run_one(lab: CallLab, plan: Plan, setup: str, rate: float, calls: int, tag: str, measure: bool = True) -> RunResult:
    h = lab.hosts
    route = lab.route(setup)
    res = RunResult(setup, rate, calls)
    work = lab.workdir / tag
    began = time.monotonic()
    rejected_before = lab.agent.rejected() if setup == "agent" and lab.agent is not None else {}
    cap = Dumpcap(work / "sip.pcap", f"udp port {SIP_PORT} and (host {h.pbx} or host {h.dest})", snaplen=65535)
    lab.captures.append(cap)
    cap.start()
    dest = lab.sipp(
        SippRun(
            "bench_dest_echo.xml",
            h.dest,
            work / "dest",
            calls=calls,
            media=True,
            rtp_echo=plan.rtp,
            variables={"callee": "assistant"},
        )
    )
    duration = calls / rate
    if plan.rtp:
        write_audio(work / "pbx")
        scenario, variables = "bench_pbx_rtp.xml", {"ruri_params": route.ruri_params}
    else:
        scenario = "pbx_call.xml"
        variables = {"caller": "1000", "sdp_user": "pbx", "rtp_port": str(MEDIA_PORT), "ruri_params": route.ruri_params}
    middle = TreeCpu(lab.middle_pids(setup), lambda: lab.middle_root(setup))
    host0 = host_jiffies()
    middle.start()
    pbx = lab.sipp(
        SippRun(
            scenario,
            h.pbx,
            work / "pbx",
            calls=calls,
            remote=route.remote,
            service=route.service,
            rate=rate,
            hold_ms=plan.hold_ms,
            media=True,
            rtp_echo=plan.rtp,
            timeout=duration + plan.hold_ms / 1000 + 40,
            variables=variables,
        )
    )
    if pbx.wait(duration + plan.hold_ms / 1000 + 60) is None:
        pbx.stop()
    res.cpu = middle.stop()
    res.host_busy_pct = host_busy(host0, host_jiffies())
    time.sleep(0.5)  # the last BYE's 200 on the wire
    if dest.wait(5) is None:
        dest.stop()
    res.capture = cap.stop()
    lab.captures.remove(cap)
    if setup == "agent" and lab.agent is not None:
        lab.agent.wait_idle()
        after = lab.agent.rejected()
        res.rejected = {k: v - rejected_before.get(k, 0.0) for k, v in after.items() if v - rejected_before.get(k, 0.0)}
    if not measure:
        if not plan.keep:
            cap.path.unlink(missing_ok=True)
        return res
    times = analyse_sip(cap.path, h.pbx, h.dest, route.middle)
    res.placed = len(times)
    res.sipp_failed = pbx.counts()[1]
    codes = Counter(str(c.final) if c.final is not None else "none" for c in times.values())
    res.finals = dict(sorted(codes.items()))
    answered = [c for c in times.values() if c.final == 200]
    res.answered = len(answered)
    res.bye_failed = sum(1 for c in answered if not c.bye_ok)
    res.failed = max(res.planned - res.answered + res.bye_failed, res.sipp_failed or 0)
    res.invite_retransmissions = sum(c.invites - 1 for c in times.values())
    starts = sorted(c.inv_in for c in times.values() if c.inv_in is not None)
    if len(starts) > 1 and starts[-1] > starts[0]:
        res.achieved_cps = (len(starts) - 1) / (starts[-1] - starts[0])
    for c in answered:
        if route.middle is not None and None not in (c.inv_in, c.inv_out, c.ok_in, c.ok_out):
            assert c.inv_in is not None and c.inv_out is not None and c.ok_in is not None and c.ok_out is not None
            res.hop_invite.append((c.inv_out - c.inv_in) * 1000.0)
            res.hop_ok.append((c.ok_out - c.ok_in) * 1000.0)
    res.hop_invite_ms, res.hop_ok_ms = _pp(res.hop_invite), _pp(res.hop_ok)
    res.trying_ms = _pp(
        [(c.trying - c.inv_in) * 1000.0 for c in times.values() if c.trying is not None and c.inv_in is not None]
    )
    res.answer_ms = _pp(
        [(c.final_ts - c.inv_in) * 1000.0 for c in answered if c.final_ts is not None and c.inv_in is not None]
    )
    if res.cpu is not None and res.placed:
        res.cpu_ms_per_call = res.cpu.percent / 100.0 * res.cpu.seconds * 1000.0 / res.placed
    if not plan.keep:
        cap.path.unlink(missing_ok=True)
    time.sleep(1.0)
    res.elapsed_s = time.monotonic() - began
    return res


# -- report -----------------------------------------------------------------------------------------


def _p(d: dict[str, float]) -> str:
    if not d or not d.get("n"):
        return "-"
    return f"{fmt(d['p50'])} / {fmt(d['p99'])}"


def _finals_text(r: RunResult) -> str:
    text = ", ".join(f"{c}: {n}" for c, n in r.finals.items())
    if r.bye_failed:
        text += f" (BYE not 200: {r.bye_failed})"
    if r.rejected:
        text += " [agent refused: " + ", ".join(f"{k} {v:g}" for k, v in sorted(r.rejected.items())) + "]"
    return text


def _goal(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**not met**")


def _pooled(runs: list[RunResult], name: str) -> float:
    values = sorted(v for r in runs for v in getattr(r, name))
    return percentiles(values, (50,))[0]


def report(results: list[RunResult], plan: Plan) -> tuple[str, dict[str, Any]]:
    grouped: dict[tuple[str, float], list[RunResult]] = {}
    for r in results:
        grouped.setdefault((r.setup, r.rate), []).append(r)
    by = {key: merged(runs) for key, runs in grouped.items()}
    lines = [
        "Per rate; ms, p50 / p99 over answered calls. hop: at the middle (agent edge, baseline Kamailio), from",
        "kernel packet timestamps; 100: INVITE in to the middle's 100 out; answer: the PBX's INVITE to its 200.",
        *(
            [
                f"{plan.rounds} rounds, the setups' order alternating; each row pools a setup's rounds at that "
                "rate (hops over every answered call; CPU averaged; 100 and answer: median of the rounds)."
            ]
            if plan.rounds > 1
            else []
        ),
        "",
        "| setup | cps asked | cps sent | calls | failed | PBX finals | INVITE resent | hop INVITE | hop 200 "
        "| 100 | answer | CPU middle | CPU per call | host busy |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rate in plan.rates:
        for s in plan.setups:
            m = by.get((s, rate))
            if m is None:
                continue
            lines.append(
                f"| {s} | {rate:g} | {fmt(m.achieved_cps, 1)} | {m.placed} | {m.failed} | {_finals_text(m)} "
                f"| {m.invite_retransmissions} | {_p(m.hop_invite_ms)} | {_p(m.hop_ok_ms)} | {_p(m.trying_ms)} "
                f"| {_p(m.answer_ms)} | {fmt(m.cpu.percent if m.cpu and s != 'floor' else math.nan, 1, ' %')} "
                f"| {fmt(m.cpu_ms_per_call if s != 'floor' else math.nan, 3, ' ms')} "
                f"| {fmt(m.host_busy_pct, 0, ' %')} |"
            )
    best: dict[str, float | None] = {}
    for s in plan.setups:
        best[s] = None
        for rate in plan.rates:
            m = by.get((s, rate))
            if m is None or not m.clean:
                break
            best[s] = rate
    both = "agent" in plan.setups and "baseline" in plan.setups
    # hops pooled over the rates both relays took with no failed call: the same load for each
    common = [
        rate
        for rate in plan.rates
        if all(by.get((s, rate)) is not None and by[(s, rate)].clean for s in ("agent", "baseline") if s in plan.setups)
    ]

    def top(s: str) -> str:
        if s not in plan.setups:
            return "-"
        b = best[s]
        if b is None:
            return "none"
        return f">= {b:g}" if b >= max(plan.rates) else f"{b:g}"

    lines += [
        "",
        f"Goals (hops pooled over the rates both relays took with no failed call: "
        f"{', '.join(f'{x:g}' for x in common) or 'none'} cps):",
        "",
        "| figure | agent | baseline | floor | agent / baseline | goal | |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    a_best = best.get("agent")
    b_best = best.get("baseline")
    verdict = "-"
    if "agent" in plan.setups:
        if (a_best or 0) >= GOAL_CPS:
            verdict = "met"
        elif a_best is not None and a_best >= max(plan.rates):
            verdict = f"not tried (rates up to {max(plan.rates):g})"
        else:
            verdict = "**not met**"
    lines.append(
        f"| highest clean cps | {top('agent')} | {top('baseline')} | {top('floor')} "
        f"| {ratio(float(a_best or 0), float(b_best or 0)) if both and b_best else '-'} "
        f"| >= {GOAL_CPS:g} cps, 0 failures | {verdict} |"
    )
    pooled: dict[str, dict[str, float]] = {}
    for s in ("agent", "baseline"):
        runs = [by[(s, rate)] for rate in common if (s, rate) in by]
        pooled[s] = {"hop_invite_p50": _pooled(runs, "hop_invite"), "hop_ok_p50": _pooled(runs, "hop_ok")}
    for label, key in (("hop INVITE p50 (pooled)", "hop_invite_p50"), ("hop 200 p50 (pooled)", "hop_ok_p50")):
        a, b = pooled["agent"][key], pooled["baseline"][key]
        ok = None if math.isnan(a) or math.isnan(b) else a <= GOAL_HOP_RATIO * b
        lines.append(
            f"| {label} | {fmt(a, 3, ' ms')} | {fmt(b, 3, ' ms')} | 0 | {ratio(a, b)} "
            f"| <= {GOAL_HOP_RATIO:g}x the baseline | {_goal(ok)} |"
        )
    if plan.rounds > 1 and both:
        for k in range(1, plan.rounds + 1):
            per = {
                s: [r for r in results if r.setup == s and r.round == k and r.rate in common]
                for s in ("agent", "baseline")
            }
            a_inv, b_inv = _pooled(per["agent"], "hop_invite"), _pooled(per["baseline"], "hop_invite")
            a_ok, b_ok = _pooled(per["agent"], "hop_ok"), _pooled(per["baseline"], "hop_ok")
            lines.append(
                f"| round {k}: hop INVITE / 200 p50 (pooled), agent / baseline | {fmt(a_inv, 3)}, {fmt(a_ok, 3)} "
                f"| {fmt(b_inv, 3)}, {fmt(b_ok, 3)} | - | {ratio(a_inv, b_inv)} / {ratio(a_ok, b_ok)} "
                f"| <= {GOAL_HOP_RATIO:g}x | |"
            )
    for rate in plan.rates:
        a_run, b_run = by.get(("agent", rate)), by.get(("baseline", rate))
        if a_run is None or b_run is None:
            continue
        cells = []
        for name in ("hop_invite_ms", "hop_ok_ms"):
            x, y = getattr(a_run, name).get("p50", math.nan), getattr(b_run, name).get("p50", math.nan)
            cells.append(ratio(x, y))
        lines.append(
            f"| {rate:g} cps: hop INVITE / 200 p50, agent / baseline | {_p(a_run.hop_invite_ms)}, "
            f"{_p(a_run.hop_ok_ms)} | {_p(b_run.hop_invite_ms)}, {_p(b_run.hop_ok_ms)} | - "
            f"| {cells[0]} / {cells[1]} | <= {GOAL_HOP_RATIO:g}x | |"
        )
        lines.append(
            f"| {rate:g} cps: CPU per call | {fmt(a_run.cpu_ms_per_call, 3, ' ms')} "
            f"| {fmt(b_run.cpu_ms_per_call, 3, ' ms')} | - | {ratio(a_run.cpu_ms_per_call, b_run.cpu_ms_per_call)} "
            "| | |"
        )
    lines += ["", "CPU of the middle by process (% of one core over the run):", ""]
    for rate in plan.rates:
        for s in plan.setups:
            m = by.get((s, rate))
            if m is None or m.cpu is None or s == "floor":
                continue
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(m.cpu.by_process.items(), key=lambda kv: -kv[1]))
            lines.append(f"- {s} {rate:g} cps: {parts}")
    summary = {"highest_clean_cps": best, "pooled_rates": common, "pooled": pooled}
    return "\n".join(lines), summary


# -- command line -----------------------------------------------------------------------------------


def _in_rounds(plan: Plan) -> str:
    return f" in each of {plan.rounds} rounds" if plan.rounds > 1 else ""


def _progress(r: RunResult, rnd: int, rounds: int) -> None:
    prefix = f"  round {rnd}/{rounds}" if rounds > 1 else " "
    print(
        f"{prefix} {r.setup:8} {r.rate:5g} cps: {r.answered}/{r.planned} answered ({_finals_text(r)}), "
        f"{r.invite_retransmissions} INVITEs resent, hop p50 INVITE "
        f"{fmt(r.hop_invite_ms.get('p50', math.nan), 3)} "
        f"200 {fmt(r.hop_ok_ms.get('p50', math.nan), 3)} ms, "
        f"CPU {fmt(r.cpu.percent if r.cpu else math.nan, 1)} % ({fmt(r.cpu_ms_per_call, 3)} ms per call), "
        f"host {fmt(r.host_busy_pct, 0)} %, {r.elapsed_s:.0f} s",
        flush=True,
    )


def _rates(text: str) -> list[float]:
    try:
        rates = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: rates are numbers separated by commas, e.g. 50,100") from None
    if not rates or rates[0] <= 0:
        raise argparse.ArgumentTypeError("rates must be positive")
    return rates


def _setups(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names or any(n not in SETUPS for n in names):
        raise argparse.ArgumentTypeError(f"setups are {', '.join(SETUPS)}")
    return [s for s in SETUPS if s in names]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cps",
        description="Short calls at rising rates through one connection: failures, INVITE and 200 hop latency "
        "and CPU, the agent against a Kamailio + rtpengine baseline and SIPp straight to SIPp.",
    )
    parser.add_argument("--rates", type=_rates, default=list(RATES), help="calls per second, e.g. 20,50")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of calls at each rate (calls = rate x s)")
    parser.add_argument("--hold-ms", type=int, default=1000, help="how long an answered call lasts (SIPp -d)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat every rate and setup, the order alternating (figures pooled)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="calls per setup at 20 cps before measuring")
    parser.add_argument("--setups", type=_setups, default=list(SETUPS), help="agent,baseline,floor (default all)")
    parser.add_argument("--rtp", action="store_true", help="G.711 both ways during each call (PBX sends, dest echoes)")
    parser.add_argument("--ip-base", default="127.0.0.60", help="the first of the 5 loopback addresses used")
    parser.add_argument(
        "--max-calls",
        type=int,
        default=2000,
        help="the agent's sip.max_calls (the connection has no max_calls of its own)",
    )
    parser.add_argument("--media-max-cpu", type=float, help="the agent's edge.media_max_cpu_percent (default 90)")
    parser.add_argument("--sip-processes", type=int, default=4, help="edge.sip_processes, and the baseline's children")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--json", type=Path, help="write every figure (and per-call hops) to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (captures, logs)")
    args = parser.parse_args(argv)
    missing = missing_engines()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    hosts = Hosts.from_base(args.ip_base)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    plan = Plan(args.rates, args.setups, args.seconds, args.hold_ms, args.warmup, args.rtp, args.keep, args.rounds)
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join([".venv/bin/python", "-m", "bench.cps", *given])
    info = machine()
    workdir = Path(tempfile.mkdtemp(prefix="uac-bench-cps-"))
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
        for s in plan.setups if plan.warmup > 0 else ():
            k += 1
            run_one(lab, plan, s, 20.0, plan.warmup, f"{k:02d}-{s}-warmup", measure=False)
        for rnd in range(1, plan.rounds + 1):
            # the setups' order alternates between rounds, so that neither always runs first
            order = plan.setups if rnd % 2 else list(reversed(plan.setups))
            for rate in plan.rates:
                for s in order:
                    k += 1
                    calls = max(2, round(rate * plan.seconds))
                    r = run_one(lab, plan, s, rate, calls, f"{k:02d}-{s}-{rate:g}cps")
                    r.round = rnd
                    results.append(r)
                    _progress(r, rnd, plan.rounds)
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
        f"{plan.seconds:g} s of calls per rate and setup{_in_rounds(plan)}, each held {plan.hold_ms} ms after its "
        f"200; the destination answers at once (180, 200)"
        f"{'; G.711 both ways during each call' if plan.rtp else '; no RTP'}; "
        f"the run took {elapsed:.0f} s"
    )
    print(f"setups: {'; '.join(f'{s} = {MIDDLE[s]}' for s in plan.setups)}")
    print()
    print(table)
    notes = []
    for r in results:
        if r.capture is not None and r.capture.dropped:
            notes.append(f"{r.setup} {r.rate:g} cps: the capture dropped {r.capture.dropped} packets")
        if r.placed < r.planned:
            notes.append(f"{r.setup} {r.rate:g} cps: the PBX placed {r.placed} of {r.planned} calls")
        if r.rejected.get("media_unavailable"):
            notes.append(
                f"{r.setup} {r.rate:g} cps: the edge's rtpengine refused {r.rejected['media_unavailable']:g} calls "
                "(the host's CPU over edge.media_max_cpu_percent; --media-max-cpu 100 lifts it)"
            )
    if lab.agent_killed:
        notes.append(f"the agent did not stop cleanly: {lab.agent_killed} processes had to be killed")
    if notes:
        print()
        print("\n".join(f"note: {n}" for n in notes))
    print()
    print(f"command: {command}")
    if args.keep:
        print(f"captures and logs kept in {workdir}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": command,
                    "machine": info,
                    "plan": asdict(plan),
                    "summary": summary,
                    "runs": [{**asdict(r), "clean": r.clean} for r in results],
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
