"""The lab of the call benchmarks (``bench/concurrent.py``, ``bench/cps.py``): who runs where.

Everything binds its own loopback address, 127.0.0.60 .. 127.0.0.64 by default
(``--ip-base``), so nothing here meets the integration tests' ports on 127.0.0.1::

    .60  the agent: its edge's public SIP socket (Kamailio UDP, HAProxy TCP), its media relay
         (rtpengine, RTP ports 40000-49999) and its HTTP listener
    .61  the registrar the agent registers to (a lab Kamailio)
    .62  the baseline: Kamailio + rtpengine configured by hand (:class:`Baseline`)
    .63  the PBX (SIPp: signalling on 5060, media on 6000)
    .64  the destination (SIPp: signalling on 5060, media on 6000, echoing RTP)

The agent's own plumbing (its workers, Kamailio's worker socket, rtpengine's control port) is
on 127.0.0.1 by design (docs/edge.md); its block of ports (``edge.loopback_port``) is picked
between 61000 and 64999: above Linux's ephemeral range and the tests' port blocks (10000-32000).

The pieces:

* :class:`EdgeAgent`: ``python -m agent run`` with one UDP connection to the registrar and
  ``destination_uri`` at the destination, limits set high; stopped with SIGTERM (unregisters),
  then SIGKILL of whatever of its tree is left.
* :class:`Baseline`: rtpengine (userspace, as the agent's edge starts it) and a Kamailio whose
  script is a plain stateful, record-routing proxy to the destination calling
  ``rtpengine_offer`` / ``rtpengine_answer`` / ``rtpengine_delete``: no dialogs, no topology
  hiding, no events, no admission checks.
* :class:`SippRun`: one SIPp process bound to one of these addresses.
* :class:`TreeCpu`, :func:`host_busy`, :func:`udp_drops`: CPU of process trees (schedstat, via
  ``bench/proctree.py``), of the whole host (``/proc/stat``), and UDP receive-buffer drops per
  local address (``/proc/net/udp``).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench.proctree import cpu_by_process, process_name, start_time, stop_processes, tree_pids
from lab.kamailio import (
    Kamailio,
    KamailioConfig,
    module_dir,
    start_kamailio_process,
    stop_process_group,
    wait_until_answering,
)
from lab.sipp import SipMessage, parse_message_log, scenario_path, socket_inodes

__all__ = [
    "AUDIO_FILE",
    "Baseline",
    "CallLab",
    "EdgeAgent",
    "Hosts",
    "Route",
    "SippRun",
    "TreeCpu",
    "host_busy",
    "machine",
    "percentile",
    "percentiles",
    "udp_drops",
]

REPO = Path(__file__).resolve().parent.parent
SIP_PORT = 5060
MEDIA_PORT = 6000
HTTP_PORT = 8080
RTP_FIRST = 40000
RTP_COUNT = 10000
NG_PORT = 2223
USER = "bench"
PASSWORD = "bench-pw-0123456789"  # noqa: S105 - a throwaway account on a loopback Kamailio
API_KEY = "bench-api-key-0123456789"
CONNECTION = "bench"
#: the raw G.711 u-law file ``bench_pbx_rtp.xml`` loops, in each PBX SIPp's working directory
AUDIO_FILE = "bench_audio.pcmu"
_SIPP_FAILED = re.compile(r"Failed call\s*\|\s*\d+\s*\|\s*(\d+)")
_SIPP_OK = re.compile(r"Successful call\s*\|\s*\d+\s*\|\s*(\d+)")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), interpolated linearly between ranks; NaN when empty."""
    return percentiles(sorted(values), (q,))[0]


def percentiles(ordered: Sequence[float], qs: Sequence[float]) -> list[float]:
    """:func:`percentile` of each of ``qs`` over values already sorted (one sort for several)."""
    out = []
    for q in qs:
        if not ordered:
            out.append(math.nan)
            continue
        k = (len(ordered) - 1) * q / 100.0
        lo = math.floor(k)
        hi = min(lo + 1, len(ordered) - 1)
        out.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo))
    return out


# -- addresses --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hosts:
    agent: str
    registrar: str
    baseline: str
    pbx: str
    dest: str

    @classmethod
    def from_base(cls, base: str) -> Hosts:
        first = ipaddress.IPv4Address(base)
        if not first.is_loopback or not ipaddress.IPv4Address(int(first) + 4).is_loopback:
            raise ValueError(f"{base}: the benchmark binds 5 addresses from it, all in 127.0.0.0/8")
        a, r, b, p, d = (str(ipaddress.IPv4Address(int(first) + k)) for k in range(5))
        return cls(agent=a, registrar=r, baseline=b, pbx=p, dest=d)


def check_bindable(host: str, port: int, tcp: bool = False) -> None:
    """Raise a clear error when ``host:port`` is taken (another benchmark, a wildcard listener)."""
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            proto = "TCP" if tcp else "UDP"
            raise RuntimeError(f"{proto} {host}:{port} is taken ({e}): another run, or a wildcard listener") from None


def loopback_block(count: int, low: int = 61000, high: int = 65000) -> int:
    """The first of ``count`` consecutive ports free on 127.0.0.1 for UDP and TCP (the edge's own)."""
    rng = random.Random()
    for _ in range(300):
        base = rng.randrange(low, high - count)
        try:
            for port in range(base, base + count):
                check_bindable("127.0.0.1", port)
                check_bindable("127.0.0.1", port, tcp=True)
        except RuntimeError:
            continue
        return base
    raise RuntimeError(f"no block of {count} free ports on 127.0.0.1 between {low} and {high}")


# -- processes ----------------------------------------------------------------------------------------


def _tree_ids(root: int) -> dict[int, int]:
    out: dict[int, int] = {}
    for pid in tree_pids(root):
        st = start_time(pid)
        if st is not None:
            out[pid] = st
    return out


def _stop_group(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
    except ProcessLookupError:
        proc.wait(5)


def ng_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether rtpengine answers an ng ``ping`` on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(b"bench d7:command4:pinge", (host, port))
            return s.recv(256) == b"bench d6:result4:ponge"
        except OSError:
            return False


def rtpengine_argv(host: str, ng_port: int, rundir: Path, threads: int = 2) -> list[str]:
    """rtpengine in userspace, started the way ``agent/edge/rtpengine.py`` starts the edge's."""
    return [
        "rtpengine",
        "--config-file=none",
        "--table=-1",
        "--foreground",
        "--log-stderr",
        "--log-level=4",
        f"--pidfile={rundir / 'rtpengine.pid'}",
        f"--interface={host}",
        f"--listen-ng={host}:{ng_port}",
        f"--port-min={RTP_FIRST}",
        f"--port-max={RTP_FIRST + RTP_COUNT - 1}",
        "--timeout=60",
        "--silent-timeout=3600",
        "--delete-delay=0",
        f"--num-threads={threads}",
    ]


# -- the agent --------------------------------------------------------------------------------------


class EdgeAgent:
    """``python -m agent run`` in a session of its own, with one UDP connection (docs/edge.md).

    ``sip.max_calls`` is ``max_calls``; the connection has no ``max_calls`` of its own (the
    default), so only the agent's limit is counted per INVITE. The PBX's address is the
    connection's ``allowed_sources``, so the PBX SIPp may call the Contact straight.
    """

    def __init__(
        self,
        workdir: Path,
        hosts: Hosts,
        *,
        max_calls: int = 2000,
        media_max_cpu: float | None = None,
        sip_processes: int | None = None,
        log_level: str = "info",
    ) -> None:
        self.workdir = workdir
        self.hosts = hosts
        workdir.mkdir(parents=True, exist_ok=True)
        for port in (SIP_PORT, HTTP_PORT):
            check_bindable(hosts.agent, port, tcp=True)
        check_bindable(hosts.agent, SIP_PORT)
        edge: dict[str, Any] = {
            "loopback_port": loopback_block(12),
            "tls_targets": 1,
            "runtime_dir": str(workdir / "edge"),
            # the destination SIPp answers INVITEs only: an OPTIONS ping would count as one of its
            # -m calls (the baseline pings nothing either)
            "destination_ping_sec": 0,
        }
        if media_max_cpu is not None:
            edge["media_max_cpu_percent"] = media_max_cpu
        if sip_processes is not None:
            edge["sip_processes"] = sip_processes
        self.config: dict[str, Any] = {
            "sip": {
                "bind": hosts.agent,
                "port": SIP_PORT,
                "rtp_port": RTP_FIRST,
                "rtp_port_range": RTP_COUNT,
                "max_calls": max_calls,
            },
            "edge": edge,
            "http": {"listen": f"{hosts.agent}:{HTTP_PORT}", "api_key": API_KEY},
            "log": {"format": "json", "level": log_level},
            "store": {"path": ":memory:"},
            "workers": {"max_workers": 1},
            "connections": [
                {
                    "connection_id": CONNECTION,
                    "user_id": "323",
                    "connection_name": "call benchmark",
                    "external_uac_settings": {
                        "proxy": f"sip:{hosts.registrar}:{SIP_PORT}",
                        "transport": "UDP",
                        "username": USER,
                        "password": PASSWORD,
                        "expiration_sec": 3600,
                    },
                    "internal_uac_settings": {
                        "destination_uri": f"1006@{hosts.dest}:{SIP_PORT}",
                        "allowed_sources": [f"{hosts.pbx}/32"],
                    },
                }
            ],
        }
        self.config_path = workdir / "agent.json"
        self.config_path.write_text(json.dumps(self.config, indent=1))
        self.log_path = workdir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._known: dict[int, int] = {}

    @property
    def base(self) -> str:
        return f"http://{self.hosts.agent}:{HTTP_PORT}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> EdgeAgent:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UAC_AGENT_")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                start_new_session=True,  # a Ctrl-C at the terminal is the benchmark's to handle
            )
        self.wait_for(lambda: self.http_get("/readyz")[0] == 200, timeout, "the agent's /readyz")
        self._known.update(_tree_ids(self.pid))
        return self

    def http_get(self, path: str) -> tuple[int, str]:
        # http to the agent's own loopback listener, never a URL from outside
        req = urllib.request.Request(self.base + path, headers={"Authorization": f"Bearer {API_KEY}"})  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def metrics(self) -> str:
        return self.http_get("/metrics")[1]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of every series of ``name`` whose labels include ``labels``."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            base, _, rest = head.partition("{")
            if base != name:
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', rest))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(value)
        return total

    def rejected(self) -> dict[str, float]:
        """``uac_agent_inbound_rejected_total`` by reason."""
        out: dict[str, float] = {}
        for m in re.finditer(r"^uac_agent_inbound_rejected_total\{([^}]*)\} (\S+)$", self.metrics(), re.M):
            reason = re.search(r'reason="([^"]*)"', m.group(1))
            if reason:
                out[reason.group(1)] = out.get(reason.group(1), 0.0) + float(m.group(2))
        return out

    def pids(self) -> list[int]:
        """The supervisor and every process under it (workers, zygote, keeper, the edge's engines)."""
        return tree_pids(self.pid) if self.running else []

    def wait_for(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited ({self.proc.returncode}) waiting for {what}:\n{self.tail()}")
            if cond():
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}:\n{self.tail()}")

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Until no call is counted active (the edge's dialogs ended); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metric("uac_agent_calls_active") == 0:
                return True
            time.sleep(0.3)
        return False

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_lines(self, event: str) -> list[dict[str, Any]]:
        out = []
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        for line in text.splitlines():
            if f'"{event}"' not in line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == event:
                out.append(rec)
        return out

    def stop(self) -> int:
        """SIGTERM (the workers unregister, the engines stop), SIGKILL if it hangs; then whatever of
        its tree is left. How many processes had to be killed."""
        if self.proc is None:
            return 0
        killed = 0
        if self.proc.poll() is None:
            self._known.update(_tree_ids(self.proc.pid))
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                killed += 1
        self._known.pop(self.proc.pid, None)
        killed += stop_processes(self._known, 6.0)  # the keeper ends the engines 3 s after the supervisor
        self._known.clear()
        return killed


# -- the baseline: Kamailio + rtpengine by hand -----------------------------------------------------

BASELINE_MODULES = ("kex", "corex", "tm", "sl", "rr", "pv", "maxfwd", "textops", "siputils", "xlog", "ctl", "rtpengine")


def baseline_config(host: str, port: int, ng_port: int, dest_uri: str, children: int, rundir: Path) -> str:
    """A plain stateful, record-routing proxy to ``dest_uri`` with the media through rtpengine."""
    modules = "\n".join(f'loadmodule "{m}.so"' for m in BASELINE_MODULES)
    flags = "replace-origin replace-session-connection ICE=remove"
    return f"""#!KAMAILIO
# The call benchmarks' baseline (bench/edgelab.py): Kamailio + rtpengine configured by hand.
debug=0
log_stderror=yes
children={children}
auto_aliases=no
dns=no
rev_dns=no
listen=udp:{host}:{port}

mpath="{module_dir()}/"
{modules}
modparam("ctl", "binrpc", "unix:{rundir}/kamailio_ctl")
modparam("rtpengine", "rtpengine_sock", "udp:{host}:{ng_port}")

request_route {{
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    if (has_totag()) {{
        if (loose_route()) {{
            if (is_method("BYE")) {{
                rtpengine_delete();
            }} else if (has_body("application/sdp")) {{
                rtpengine_manage("{flags}");
            }}
            t_relay();
            exit;
        }}
        if (is_method("ACK")) {{
            if (t_check_trans()) {{
                t_relay();
            }}
            exit;
        }}
        sl_send_reply("404", "Not here");
        exit;
    }}
    if (is_method("CANCEL|ACK")) {{
        if (t_check_trans()) {{
            t_relay();
        }}
        exit;
    }}
    if (!is_method("INVITE")) {{
        sl_send_reply("405", "Method Not Allowed");
        exit;
    }}
    if (!t_newtran()) {{
        sl_reply_error();
        exit;
    }}
    record_route();
    if (has_body("application/sdp")) {{
        if (!rtpengine_offer("{flags}")) {{
            t_reply("503", "Media relay unavailable");
            exit;
        }}
    }}
    $ru = "{dest_uri}";
    t_on_reply("REPLY");
    t_on_failure("FAILED");
    if (!t_relay()) {{
        rtpengine_delete();
        t_reply("500", "Cannot relay");
    }}
    exit;
}}

onreply_route[REPLY] {{
    if (has_body("application/sdp")) {{
        rtpengine_answer("{flags}");
    }}
}}

failure_route[FAILED] {{
    rtpengine_delete();
}}
"""


class Baseline:
    """rtpengine, then a Kamailio with :func:`baseline_config`, both on ``hosts.baseline``."""

    def __init__(self, workdir: Path, hosts: Hosts, children: int = 4, rtp_threads: int = 2) -> None:
        self.workdir = workdir
        self.hosts = hosts
        self.children = children
        self.rtp_threads = rtp_threads
        workdir.mkdir(parents=True, exist_ok=True)
        self.kamailio: subprocess.Popen[bytes] | None = None
        self.rtpengine: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return self.hosts.baseline

    def start(self) -> Baseline:
        host = self.hosts.baseline
        check_bindable(host, SIP_PORT)
        check_bindable(host, NG_PORT)
        if shutil.which("rtpengine") is None:
            raise RuntimeError("rtpengine is not installed: apt-get install rtpengine-daemon")
        with open(self.workdir / "rtpengine.log", "ab") as log:
            self.rtpengine = subprocess.Popen(
                rtpengine_argv(host, NG_PORT, self.workdir, self.rtp_threads),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while not ng_ping(host, NG_PORT):
            if self.rtpengine.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the baseline's rtpengine did not start:\n{_tail(self.workdir / 'rtpengine.log')}")
            time.sleep(0.05)
        cfg = self.workdir / "kamailio.cfg"
        dest_uri = f"sip:1006@{self.hosts.dest}:{SIP_PORT}"
        cfg.write_text(baseline_config(host, SIP_PORT, NG_PORT, dest_uri, self.children, self.workdir))
        log_path = self.workdir / "kamailio.log"
        self.kamailio = start_kamailio_process(cfg, self.workdir, log_path, shm_mib=128)
        wait_until_answering(self.kamailio, f"unix:{self.workdir}/kamailio_ctl", log_path, 15, "baseline kamailio")
        return self

    def pids(self) -> list[int]:
        out: list[int] = []
        for proc in (self.kamailio, self.rtpengine):
            if proc is not None and proc.poll() is None:
                out += tree_pids(proc.pid)
        return out

    def stop(self) -> None:
        stop_process_group(self.kamailio)
        self.kamailio = None
        _stop_group(self.rtpengine)
        self.rtpengine = None


def registrar(workdir: Path, hosts: Hosts) -> Kamailio:
    """The lab Kamailio the agent registers to (the PBX's registrar; the calls do not cross it)."""
    check_bindable(hosts.registrar, SIP_PORT)
    return Kamailio(KamailioConfig(port=SIP_PORT, host=hosts.registrar, users={USER: PASSWORD}), workdir)


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# -- SIPp ---------------------------------------------------------------------------------------------


def _hex_address(host: str, port: int) -> str:
    """How /proc/net/udp writes ``host:port``."""
    return f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"


def _udp_inodes(host: str, port: int) -> set[str]:
    want = _hex_address(host, port)
    out: set[str] = set()
    try:
        with open("/proc/net/udp") as f:
            next(f, None)
            for line in f:
                cols = line.split()
                if len(cols) > 9 and cols[1] == want:
                    out.add(cols[9])
    except OSError:
        pass
    return out


@dataclass
class SippRun:
    """One SIPp on ``host:port`` (UDP), in a session of its own, in ``workdir``.

    ``rate``/``limit``/``hold_ms`` are ``-r``/``-l``/``-d``; ``media`` binds the media socket to
    ``host:MEDIA_PORT`` (``-mi``/``-mp``); ``rtp_echo`` starts the echo thread; ``trace`` writes
    every message to ``messages.log`` (``-trace_msg``, parsed by :meth:`messages`).
    """

    scenario: str
    host: str
    workdir: Path
    calls: int
    remote: str | None = None
    service: str | None = None
    rate: float | None = None
    limit: int | None = None
    hold_ms: int | None = None
    media: bool = False
    rtp_echo: bool = False
    trace: bool = False
    timeout: float | None = None
    variables: Mapping[str, str] = field(default_factory=dict)
    port: int = SIP_PORT
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    returncode: int | None = field(default=None, init=False)

    @property
    def message_log(self) -> Path:
        return self.workdir / "messages.log"

    @property
    def output_log(self) -> Path:
        return self.workdir / "sipp.out"

    def command(self) -> list[str]:
        cmd = [
            *("sipp", "-sf", str(scenario_path(self.scenario)), "-i", self.host, "-p", str(self.port)),
            *("-t", "u1", "-ci", self.host, "-m", str(self.calls), "-nd", "-nostdin"),
            *("-buff_size", str(4 << 20), "-trace_err", "-error_file", str(self.workdir / "errors.log")),
        ]
        if self.trace:
            cmd += ["-trace_msg", "-message_file", str(self.message_log)]
        if self.rate is not None:
            cmd += ["-r", f"{self.rate:g}"]
        if self.limit is not None:
            cmd += ["-l", str(self.limit)]
        if self.hold_ms is not None:
            cmd += ["-d", str(self.hold_ms)]
        if self.media:
            cmd += ["-mi", self.host, "-mp", str(MEDIA_PORT)]
        if self.rtp_echo:
            cmd.append("-rtp_echo")
        for name, value in self.variables.items():
            cmd += ["-set", name, value]
        if self.timeout is not None:
            cmd += ["-timeout", f"{math.ceil(self.timeout)}s", "-timeout_error"]
        if self.service is not None:
            cmd += ["-s", self.service]
        if self.remote is not None:
            cmd.append(self.remote)
        return cmd

    def start(self, wait: float = 10.0) -> SippRun:
        if shutil.which("sipp") is None:
            raise RuntimeError("sipp is not installed: apt-get install sip-tester")
        self.workdir.mkdir(parents=True, exist_ok=True)
        check_bindable(self.host, self.port)
        if self.media:
            check_bindable(self.host, MEDIA_PORT)
        env = dict(os.environ, TZ="UTC")  # trace timestamps are local time
        with open(self.output_log, "wb") as out:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"sipp exited at start (rc={self.returncode}):\n{self.output()[-3000:]}")
            if _udp_inodes(self.host, self.port) & socket_inodes(self.proc.pid):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"sipp did not bind {self.host}:{self.port}:\n{self.output()[-3000:]}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def wait(self, timeout: float) -> int | None:
        """Wait for SIPp to end by itself; its exit code (None: still running after ``timeout``)."""
        if self.proc is None:
            return self.returncode
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.proc = None
        return self.returncode

    def stop(self) -> int | None:
        """SIGTERM (SIPp prints its final counts), SIGKILL after 5 s; safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _stop_group(proc, signal.SIGTERM, 5.0)
            self.returncode = proc.returncode
        return self.returncode

    def output(self) -> str:
        try:
            return self.output_log.read_text(errors="replace")
        except OSError:
            return ""

    def counts(self) -> tuple[int | None, int | None]:
        """SIPp's own (successful, failed) calls from its final screen."""
        text = self.output()
        ok = _SIPP_OK.findall(text)
        failed = _SIPP_FAILED.findall(text)
        return (int(ok[-1]) if ok else None), (int(failed[-1]) if failed else None)

    def messages(self) -> list[SipMessage]:
        return parse_message_log(self.message_log) if self.trace else []


def write_audio(directory: Path) -> Path:
    """One second of a 440 Hz tone in G.711 u-law (8,000 bytes), the PBX's looped audio."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / AUDIO_FILE
    path.write_bytes(bytes(_ulaw(int(8000 * math.sin(2 * math.pi * 440 * i / 8000))) for i in range(8000)))
    return path


def _ulaw(sample: int) -> int:
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = 7
    for e in range(7, -1, -1):
        if magnitude & (0x4000 >> (7 - e)):
            exponent = e
            break
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


# -- CPU, drops -------------------------------------------------------------------------------------


@dataclass
class CpuFigures:
    percent: float  # of one core, the whole tree
    by_process: dict[str, float]  # of one core, by process name (the root as ``root_name``)
    seconds: float


class TreeCpu:
    """CPU of the processes ``pids_fn()`` lists, between :meth:`start` and :meth:`stop`, in total and
    by process name (``/proc/PID/task/TID/schedstat``, every thread; see bench/proctree.py)."""

    def __init__(self, pids_fn: Callable[[], Iterable[int]], root: Callable[[], int | None] | None = None) -> None:
        self._pids_fn = pids_fn
        self._root = root
        self._t0 = 0
        self._start: dict[tuple[int, int], int] = {}

    def start(self) -> TreeCpu:
        self._start = cpu_by_process(self._pids_fn())
        self._t0 = time.monotonic_ns()
        return self

    def stop(self, root_name: str = "supervisor") -> CpuFigures:
        end = cpu_by_process(self._pids_fn())
        wall = time.monotonic_ns() - self._t0
        root = self._root() if self._root is not None else None
        by: dict[str, float] = {}
        total = 0
        for key, ns in end.items():
            used = max(0, ns - self._start.get(key, 0))
            total += used
            name = root_name if key[0] == root else (process_name(key[0]) or "?")
            name = re.sub(r"-\d+$", "", name)  # uac-worker-0 -> uac-worker
            by[name] = by.get(name, 0.0) + 100.0 * used / wall
        return CpuFigures(100.0 * total / wall if wall else math.nan, dict(sorted(by.items())), wall / 1e9)


def host_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def host_busy(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of all the host's cores busy between two :func:`host_jiffies` readings, in percent."""
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total > 0 else math.nan


def udp_drops(hosts: Iterable[str]) -> dict[str, int]:
    """UDP datagrams dropped (receive buffer full) so far on the sockets bound to each of ``hosts``."""
    want = {socket.inet_aton(h)[::-1].hex().upper(): h for h in hosts}
    out = dict.fromkeys(want.values(), 0)
    try:
        with open("/proc/net/udp") as f:
            next(f, None)
            for line in f:
                cols = line.split()
                if len(cols) < 13:
                    continue
                host = want.get(cols[1].split(":")[0])
                if host is not None:
                    out[host] += int(cols[12])
    except OSError:
        pass
    return out


def udp_rcvbuf_errors() -> int:
    """The host's ``Udp: RcvbufErrors`` (every UDP socket's receive-buffer drops so far)."""
    try:
        lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines() if ln.startswith("Udp:")]
        return int(lines[1][lines[0].index("RcvbufErrors")])
    except (OSError, ValueError, IndexError):
        return -1


# -- reporting --------------------------------------------------------------------------------------


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
    commit = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], r"[0-9a-f]{7,}")
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True).stdout
    return {
        "cpus": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sipp": _version(["sipp", "-v"], r"SIPp v[\d.]+"),
        "kamailio": _version(["kamailio", "-v"], r"kamailio [\d.]+"),
        "rtpengine": _version(["rtpengine", "--version"], r"Version: \S+"),
        "commit": commit + (" (with uncommitted changes)" if dirty.strip() else ""),
    }


def machine_line(info: Mapping[str, str]) -> str:
    return (
        f"machine: {info['cpus']} CPUs ({info['cpu']}), Linux {info['kernel']}, Python {info['python']}, "
        f"{info['sipp']}, {info['kamailio']}, rtpengine {info['rtpengine'].removeprefix('Version: ')}; "
        f"agent at {info['commit']}; everything on loopback UDP"
    )


def fmt(v: float, digits: int = 2, unit: str = "") -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.{digits}f}{unit}"


def ratio(a: float, b: float) -> str:
    return "-" if math.isnan(a) or math.isnan(b) or b <= 0 else f"{a / b:.2f}x"


def terminate_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` stops what it started."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def missing_tools(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def missing_engines() -> str | None:
    """What the call benchmarks need and this machine lacks, with how to install it; None: nothing."""
    missing = missing_tools("kamailio", "kamcmd", "sipp", "rtpengine", "haproxy", "dumpcap")
    if not missing:
        return None
    return f"missing: {', '.join(missing)} (dumpcap: apt-get install wireshark-common; the others: ./scripts/setup.sh)"


# -- the lab as a whole -----------------------------------------------------------------------------

SETUPS = ("agent", "baseline", "floor")
MIDDLE = {"agent": "uac-agent (its edge)", "baseline": "Kamailio + rtpengine by hand", "floor": "none: SIPp to SIPp"}


@dataclass(frozen=True)
class Route:
    """Where one setup's PBX sends its INVITEs, and what sits in the middle."""

    setup: str
    remote: str  # "ip:port" the PBX SIPp sends to
    service: str  # the Request-URI's user (-s)
    ruri_params: str
    middle: str | None  # the middle hop's address (the relay); None: SIPp straight to SIPp


class CallLab:
    """The registrar, the agent and the baseline, started once for a whole run; :meth:`close`
    stops everything any part started (also after an error or Ctrl-C)."""

    def __init__(
        self,
        workdir: Path,
        hosts: Hosts,
        setups: Sequence[str],
        *,
        max_calls: int = 2000,
        media_max_cpu: float | None = None,
        sip_processes: int = 4,
        log_level: str = "info",
    ) -> None:
        self.workdir = workdir
        self.hosts = hosts
        self.setups = list(setups)
        self.max_calls = max_calls
        self.media_max_cpu = media_max_cpu
        self.sip_processes = sip_processes
        self.log_level = log_level
        self.registrar: Kamailio | None = None
        self.agent: EdgeAgent | None = None
        self.baseline: Baseline | None = None
        self.sipps: list[SippRun] = []
        self.captures: list[Any] = []  # bench.pcap.Dumpcap: anything with kill()
        self.agent_killed = 0

    def start(self) -> CallLab:
        if "agent" in self.setups:
            self.registrar = registrar(self.workdir / "registrar", self.hosts)
            self.registrar.start()
            self.agent = EdgeAgent(
                self.workdir / "agent",
                self.hosts,
                max_calls=self.max_calls,
                media_max_cpu=self.media_max_cpu,
                sip_processes=self.sip_processes,
                log_level=self.log_level,
            )
            self.agent.start()
            reg = self.registrar
            self.agent.wait_for(lambda: reg.lookup(USER) is not None, 20, f"{USER} registered at the registrar")
        if "baseline" in self.setups:
            self.baseline = Baseline(self.workdir / "baseline", self.hosts, children=self.sip_processes).start()
        return self

    def route(self, setup: str) -> Route:
        h = self.hosts
        if setup == "agent":
            return Route(setup, f"{h.agent}:{SIP_PORT}", USER, f";line={CONNECTION}", h.agent)
        if setup == "baseline":
            return Route(setup, f"{h.baseline}:{SIP_PORT}", "1006", "", h.baseline)
        return Route(setup, f"{h.dest}:{SIP_PORT}", "1006", "", None)

    def middle_pids(self, setup: str) -> Callable[[], list[int]]:
        """The processes whose CPU is the setup's: the agent's tree, the baseline's pair, none."""
        if setup == "agent" and self.agent is not None:
            return self.agent.pids
        if setup == "baseline" and self.baseline is not None:
            return self.baseline.pids
        return list

    def middle_root(self, setup: str) -> int | None:
        return self.agent.pid if setup == "agent" and self.agent is not None else None

    def sipp(self, run: SippRun) -> SippRun:
        self.sipps.append(run)
        return run.start()

    def close(self) -> None:
        for cap in self.captures:
            cap.kill()
        for s in self.sipps:
            s.stop()
        if self.agent is not None:
            self.agent_killed = self.agent.stop()
        if self.baseline is not None:
            self.baseline.stop()
        if self.registrar is not None:
            self.registrar.stop()
