"""Registration benchmark: N registrations held against a Kamailio registrar, the agent against uac_reg.

One lab registrar (:class:`lab.kamailio.Kamailio`, users ``u0`` .. ``uN-1``, digest auth,
usrloc in memory) serves the whole run. Two systems hold the same N registrations to it,
one after the other, each for ``--duration`` seconds:

``agent``
    ``python -m agent run`` with N UDP connections (``expiration_sec`` = ``--expires``),
    ``workers.connections_per_worker`` = ``--per-worker``, ``workers.max_workers`` =
    ceil(N / per-worker), the registration defaults as shipped (start-up stagger
    ``initial_delay_max_sec`` = 2 s), log level info to a file. It refreshes
    max(granted - 30 s, granted / 2) after each 2xx: every 90 s for 120 s.
``uacreg`` (the baseline)
    A Kamailio whose only job is Kamailio's own registration agent, the ``uac`` module's
    ``uac_reg``, with the same N accounts loaded from a ``db_text`` table
    (:class:`bench.kamailio_uac.UacReg`). uac_reg refreshes in timer passes
    ``reg_timer_interval`` s apart, sending every record whose binding expires within
    interval + 3 s; so with an interval R >= expires / 2 every record is refreshed at
    every pass, every R s. R is set to the agent's refresh interval, rounded down to
    whole seconds (90 s for 120 s), the closest cadence uac_reg allows. Two differences
    remain that uac_reg does not let us remove: all N records go out in one burst per
    pass (the agent's refreshes keep the 0-2 s spread of its start), and a failed
    REGISTER is retried only at the next pass.

Between the two the registrar is brought back to 0 contacts (the agent unregisters on
SIGTERM; whatever is left is removed with ``ul.rm``).

What is measured, per system
----------------------------
* **Time to all registered**: from launching the process (``Popen``) until the
  registrar holds N contacts (statistic ``usrloc:location_contacts``, polled every
  50 ms from a thread started before the launch), and for the agent until ``/readyz``
  says ready.
* **Lapses**, over the hold (must be 0): samples in which the registrar held fewer than
  N contacts; samples in which the agent's ``/readyz`` listed a connection not
  registered (``/readyz`` is cheap, and what one read costs the supervisor is measured
  after the hold and printed; ``/metrics`` renders ~15 series per connection and reads
  every worker's smaps, so it is read only before and after the hold);
  contacts the registrar expired (``usrloc:location_expires``, which also catches a
  lapse shorter than a sample); and users whose registrations, from the registrar's
  log, are further apart than the expiry.
* **REGISTERs per second**, from the registrar's log over the hold: all requests, and
  those carrying credentials (the lab registrar's REGISTER log line is extended here
  with ``au=$au``, the Authorization username, ``<null>`` without one). A digest
  registration is an unauthenticated REGISTER, a 401, then one with credentials (a
  client sending credentials pre-emptively would send only the second; both systems
  here send both, at every refresh). Also the requests in each one-second bin (mean,
  p50, p99, max, share of seconds with none) and the refresh waves (REGISTERs less
  than 5 s apart).
* **Refresh spread**: per user, the intervals between successive registrations, a
  registration being a REGISTER with credentials (two within 5 s on one user, e.g. a
  stale-nonce retry, count once): min, p50, p99, max over all users.
* **CPU** of the whole process tree (the agent: supervisor, zygote and workers; the
  baseline: every Kamailio process), in % of one core, summed over every thread from
  ``/proc/PID/task/TID/schedstat`` (:mod:`bench.proctree`), every ``--sample`` s. A
  sample second is a *refresh* second when the registrar logged a REGISTER in it or in
  the 6 s before it, else *idle*; the figures are the mean over idle seconds, refresh
  seconds and the whole hold, and for the agent the supervisor alone and the mean
  worker. The 6 s: a UDP client transaction lingers T4 = 5 s after its final answer,
  and when pjsip's timer ends it the agent's worker wakes again (its SIP thread's
  ``pselect`` times out, seen with strace, and runs one loop iteration): a second,
  smaller burst of worker CPU 5 s after each refresh wave, measured. Counting those
  seconds as idle would charge refresh work to idle. The mean over seconds with no REGISTER in them at all (the
  tail counted as idle) is printed too.
* **Memory**: summed PSS and RSS of the tree (and supervisor, zygote, mean worker),
  six times over the hold; the maximum is reported.
* **A killed worker** (agent only, unless ``--no-kill``; after the hold): SIGKILL to the
  worker holding connection ``c0``, then the time until each of that worker's
  connections has a binding with a new Call-ID at the registrar (its log; ``ul.lookup``
  polled too) and shows ``registered`` again with a new ``worker_pid`` in the status
  API. Then SIGTERM: exit code, and time until the registrar holds 0 contacts.
  For uac_reg there is no such figure: its records live in one Kamailio instance,
  and Kamailio's main process shuts the whole instance down when any child dies.

Figures are printed with the agent / uac_reg ratio, against the goal (1,000
registrations within 3 % of one core idle, 2 GiB PSS, 0 lapses), never asserted.
Everything started is stopped on exit, Ctrl-C or SIGTERM included: the agent runs in a
session of its own (a Ctrl-C reaches only the benchmark), gets SIGTERM, and any process
of its tree still there after it is SIGKILLed by pid and start time.

Run: ``.venv/bin/python -m bench.registrations [--n 1000] [--expires 120] [--duration 600]``
(both systems: about 2 x (duration + 1 min)). Short runs: ``--n 100 --duration 60 --expires 60``.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from agent.config import DEFAULT_KNOBS
from bench.forwarding import machine, percentile
from bench.kamailio_uac import UacReg, UacRegConfig, registrar_contacts, registrar_stat
from bench.proctree import cpu_by_process, process_name, pss_rss_kib, start_time, stop_processes, tree_pids
from lab.kamailio import Kamailio, KamailioConfig, free_port
from tests.integration.agentproc import AgentProcess

__all__ = ["PhaseResult", "Register", "agent_refresh_interval", "main", "parse_registers", "uacreg_timer_interval"]

SYSTEMS = ("agent", "uacreg")
LABEL = {"agent": "agent", "uacreg": "uac_reg"}
REPO = Path(__file__).resolve().parents[1]
GOAL_N = 1000
GOAL_IDLE_CPU_PCT = 3.0
GOAL_PSS_KIB = 2 * 1024 * 1024
POLL_SEC = 0.05  # registrar contact count and /readyz while waiting for registrations
SAME_REGISTRATION_SEC = 5.0  # REGISTERs of one user closer than this are one registration
WAVE_GAP_SEC = 5.0
# A sample counts as a refresh sample when a REGISTER was logged in it or in the REFRESH_TAIL_SEC
# before it: a UDP client transaction lingers T4 = 5 s after its final response, and the agent's
# worker wakes again when pjsip's timer ends it (measured: a second, smaller burst 5 s after each wave).
REFRESH_TAIL_SEC = 6.0
MEMORY_SAMPLES = 6
KIB_PER_MIB = 1024.0


def agent_refresh_interval(expires: float) -> float:
    """When the agent refreshes after a 2xx granting ``expires`` s (agent/core/policy.py)."""
    margin = DEFAULT_KNOBS.refresh_margin_sec
    assert margin is not None
    return max(expires - margin, expires / 2.0)


def uacreg_timer_interval(expires: int) -> int:
    """The uac_reg ``reg_timer_interval`` whose refresh cadence is closest to the agent's.

    uac_reg refreshes a record at the first timer pass at which its binding expires within
    interval + 3 s; passes are ``interval`` apart. For an interval R >= (expires - 3) / 2 that
    is the first pass after the registration, so records are refreshed every R s. The
    agent's interval is >= expires / 2, so R = its interval, in whole seconds, qualifies.
    """
    return max(1, math.floor(agent_refresh_interval(expires)))


# -- the registrar ----------------------------------------------------------------------------------


class Registrar(Kamailio):
    """The lab registrar, its REGISTER log line extended with ``au=$au`` (Authorization username)."""

    def write_config(self) -> Path:
        path = super().write_config()
        text = path.read_text()
        old = 't=$TV(Sn)\\n"'
        if old not in text:
            raise RuntimeError(f"lab/kamailio.py's REGISTER log line changed: {old!r} not found in {path}")
        path.write_text(text.replace(old, 't=$TV(Sn) au=$au\\n"', 1))
        return path


_REGISTER = re.compile(
    r"REGISTER from (?P<ip>[\d.]+):(?P<port>\d+) proto=\S+ to=sips?:(?P<user>[^@\s]+)@\S+ ci=(?P<ci>\S+) "
    r"cseq=(?P<cseq>\d+) exp=(?P<exp>\S*)(?: from=\S+)? t=(?P<t>[\d.]+)(?: au=(?P<au>\S+))?"
)


@dataclass(frozen=True)
class Register:
    """One REGISTER request the registrar logged."""

    t: float  # unix time, as the registrar stamped it
    user: str
    call_id: str
    cseq: int
    port: int  # the sender's source port
    expires: str  # the Expires header ("<null>" when absent)
    authed: bool  # it carried an Authorization header


def parse_registers(log: Path, since: float = 0.0, until: float = math.inf) -> list[Register]:
    """Every REGISTER in the registrar's log stamped in [since, until], in log order."""
    out: list[Register] = []
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        m = _REGISTER.search(line)
        if m is None:
            continue
        t = float(m["t"])
        if since <= t <= until:
            au = m["au"]
            out.append(
                Register(t, m["user"], m["ci"], int(m["cseq"]), int(m["port"]), m["exp"], au not in (None, "<null>"))
            )
    return out


def contacts_or_none(registrar: Kamailio) -> int | None:
    try:
        return registrar_contacts(registrar)
    except (RuntimeError, subprocess.SubprocessError):
        return None


def binding_call_id(registrar: Kamailio, user: str) -> str | None:
    found = registrar.lookup(user)
    m = re.search(r"Call-ID: (\S+)", found or "")
    return m.group(1) if m else None


def clear_registrar(registrar: Kamailio, users: Sequence[str], wait: float = 10.0) -> tuple[int, int]:
    """Wait up to ``wait`` s for 0 contacts, then ``ul.rm`` every user; (contacts found, contacts left)."""
    deadline = time.monotonic() + wait
    count = contacts_or_none(registrar)
    while count != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        count = contacts_or_none(registrar)
    if count == 0:
        return 0, 0
    commands = "".join(f"ul.rm location {u}\n" for u in users)
    subprocess.run(["kamcmd", "-s", registrar.ctl], input=commands, capture_output=True, text=True, timeout=120)
    return count or -1, contacts_or_none(registrar) or 0


class ContactPoller:
    """A thread reading the registrar's contact count every POLL_SEC until it reaches ``target``."""

    def __init__(self, registrar: Kamailio, target: int) -> None:
        self._registrar = registrar
        self._target = target
        self._stop = threading.Event()
        self._done = threading.Event()
        self.reached_at: float | None = None  # time.monotonic()
        self.last: int | None = None
        self._thread = threading.Thread(target=self._run, name="contacts", daemon=True)

    def start(self) -> ContactPoller:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.last = contacts_or_none(self._registrar)
            if self.last is not None and self.last >= self._target:
                self.reached_at = time.monotonic()
                break
            self._stop.wait(POLL_SEC)
        self._done.set()

    def wait(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and alive() and not self._done.wait(0.2):
            pass
        return self.reached_at

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


# -- the agent --------------------------------------------------------------------------------------


class BenchAgent(AgentProcess):
    """The test suite's agent process, with the shipped registration defaults and a session of its own.

    ``AgentProcess`` writes ``defaults.initial_delay_max_sec = 0.2`` for quick tests: removed
    here, so the agent staggers its start as shipped. Its own session keeps a Ctrl-C at the
    terminal from reaching the agent: the benchmark stops it itself.
    """

    def __init__(self, workdir: Path, connections: list[dict[str, Any]], **sections: Any) -> None:
        super().__init__(workdir, connections, **sections)
        config = json.loads(self.config_path.read_text())
        config.pop("defaults", None)
        self.config_path.write_text(json.dumps(config))
        self.launched_at: float | None = None  # time.monotonic() just before Popen

    def start(self, timeout: float = 20.0, env: dict[str, str] | None = None) -> BenchAgent:
        env = {**os.environ, **(env or {})}
        env.pop("UAC_AGENT_CONFIG", None)
        with open(self.log_path, "ab") as log:
            self.launched_at = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                start_new_session=True,
            )
        self.wait_for(lambda: self.http_get("/healthz")[0] == 200, timeout, "agent /healthz")
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def registered_count(self, n: int) -> int | None:
        """Connections ``/readyz`` does not list as unregistered; None when it does not answer."""
        code, body = self.http_get("/readyz")
        if code not in (200, 503):
            return None
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            return None
        if data.get("reason"):
            return 0  # the pool is down
        return n - len(data.get("not_registered") or [])

    def metric_sums(self) -> dict[str, float]:
        """Every series of /metrics summed by name, and by ``name{code=...}`` where it has a ``code`` label."""
        out: dict[str, float] = {}
        for line in self.metrics().splitlines():
            if not line or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            name, _, labels = head.partition("{")
            try:
                v = float(value)
            except ValueError:
                continue
            out[name] = out.get(name, 0.0) + v
            code = re.search(r'code="([^"]*)"', labels)
            if code:
                key = f"{name}{{code={code.group(1)}}}"
                out[key] = out.get(key, 0.0) + v
        return out

    def placement(self) -> dict[str, int]:
        """connection_id -> worker index, from ``uac_agent_connection_worker_info``."""
        out: dict[str, int] = {}
        for m in re.finditer(r"uac_agent_connection_worker_info\{([^}]*)\} 1", self.metrics()):
            cid = re.search(r'connection_id="([^"]*)"', m.group(1))
            worker = re.search(r'worker="(\d+)"', m.group(1))
            if cid and worker:
                out[cid.group(1)] = int(worker.group(1))
        return out


def agent_connection(i: int, user: str, password: str, registrar_port: int, expires: int) -> dict[str, Any]:
    return {
        "connection_id": f"c{i}",
        "user_id": "323",
        "connection_name": f"registration benchmark {i}",
        "external_uac_settings": {
            "proxy": f"sip:127.0.0.1:{registrar_port}",
            "transport": "UDP",
            "username": user,
            "password": password,
            "expiration_sec": expires,
        },
        # an address, not a name: this benchmark measures registrations, not DNS lookups
        "internal_uac_settings": {"destination_uri": "1006@127.0.0.1:5999"},
    }


def shut_agent(agent: BenchAgent, known: dict[int, int]) -> int:
    """SIGTERM (unregister, exit), SIGKILL if it hangs; then any process of its tree still left.

    Returns how many processes had to be killed (0 when the agent stopped cleanly).
    """
    if agent.proc is None:
        return 0
    killed = 0
    if agent.running:
        known.update(_tree_ids(agent.proc.pid))
        agent.proc.send_signal(signal.SIGTERM)
        try:
            agent.proc.wait(20)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            agent.proc.wait(5)
            killed += 1
    known.pop(agent.proc.pid, None)
    return killed + stop_processes(known)


def _tree_ids(root: int) -> dict[int, int]:
    out: dict[int, int] = {}
    for pid in tree_pids(root):
        st = start_time(pid)
        if st is not None:
            out[pid] = st
    return out


# -- sampling the tree ------------------------------------------------------------------------------


@dataclass
class CpuSample:
    t0: float  # unix time at the start of the interval
    t1: float
    wall_ns: int
    ns: dict[str, int]  # on-CPU ns in the interval, by role
    procs: dict[str, int]  # processes by role at the end


@dataclass
class MemSample:
    t: float
    pss_kib: dict[str, int]  # by role
    rss_kib: dict[str, int]
    procs: dict[str, int]


class TreeWatch:
    """CPU by role of a process tree between successive :meth:`step` calls, and its memory."""

    def __init__(self, root: int, role: Callable[[int, int, str], str], seen: dict[int, int] | None = None) -> None:
        self.root = root
        self._role = role
        self._roles: dict[tuple[int, int], str] = {}
        self.seen = {} if seen is None else seen  # every process of the tree seen: pid -> start time
        self._last = self._read()

    def _read(self) -> tuple[float, int, dict[tuple[int, int], int]]:
        pids = tree_pids(self.root)
        cpu = cpu_by_process(pids)
        for key in cpu:
            if key not in self._roles:
                self._roles[key] = self._role(self.root, key[0], process_name(key[0]) or "?")
                self.seen[key[0]] = key[1]
        return time.time(), time.monotonic_ns(), cpu

    def step(self) -> CpuSample:
        t0, m0, before = self._last
        t1, m1, after = self._last = self._read()
        ns: dict[str, int] = {}
        procs: Counter[str] = Counter()
        for key, used in after.items():
            role = self._roles[key]
            ns[role] = ns.get(role, 0) + max(0, used - before.get(key, 0))
            procs[role] += 1
        return CpuSample(t0, t1, m1 - m0, ns, dict(procs))

    def memory(self) -> MemSample:
        pss: dict[str, int] = {}
        rss: dict[str, int] = {}
        procs: Counter[str] = Counter()
        for pid in tree_pids(self.root):
            st = start_time(pid)
            if st is None:
                continue
            role = self._roles.get((pid, st)) or self._role(self.root, pid, process_name(pid) or "?")
            p, r = pss_rss_kib([pid])
            pss[role] = pss.get(role, 0) + p
            rss[role] = rss.get(role, 0) + r
            procs[role] += 1
        return MemSample(time.time(), pss, rss, dict(procs))


def agent_role(root: int, pid: int, name: str) -> str:
    if pid == root:
        return "supervisor"
    if name == "uac-zygote":
        return "zygote"
    if name.startswith("uac-worker"):
        return "worker"
    return "other"


def kamailio_role(root: int, pid: int, name: str) -> str:
    return "kamailio"


@dataclass
class Hold:
    t0: float  # unix time
    t1: float
    cpu: list[CpuSample] = field(default_factory=list)
    contacts: list[int | None] = field(default_factory=list)
    registered: list[int | None] = field(default_factory=list)  # the agent's own view; [] for uac_reg
    memory: list[MemSample] = field(default_factory=list)
    bench_cpu_pct: float = math.nan  # the benchmark's own CPU while sampling (kamcmd included)
    ended_early: str | None = None


def _own_cpu_sec() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def hold(
    watch: TreeWatch,
    duration: float,
    every: float,
    contacts: Callable[[], int | None],
    registered: Callable[[], int | None] | None,
    alive: Callable[[], bool],
) -> Hold:
    """Sample CPU (then the registrar's count, then the system's own view) every ``every`` s for ``duration`` s."""
    own0 = _own_cpu_sec()
    watch.step()  # the interval starts now
    start = time.monotonic()
    h = Hold(t0=time.time(), t1=math.nan)
    mem_at = [start + duration * i / (MEMORY_SAMPLES - 1) for i in range(MEMORY_SAMPLES)]
    k = 0
    while True:
        k += 1
        due = start + k * every
        if due > start + duration + 1e-6:
            break
        time.sleep(max(0.0, due - time.monotonic()))
        h.cpu.append(watch.step())
        h.contacts.append(contacts())
        if registered is not None:
            h.registered.append(registered())
        if mem_at and time.monotonic() >= mem_at[0] - every / 2:
            mem_at.pop(0)
            h.memory.append(watch.memory())
        if not alive():
            h.ended_early = f"the process tree's root exited after {time.monotonic() - start:.1f} s of the hold"
            break
    h.t1 = time.time()
    h.bench_cpu_pct = 100.0 * (_own_cpu_sec() - own0) / max(1e-9, h.t1 - h.t0)
    return h


# -- figures ----------------------------------------------------------------------------------------


@dataclass
class Lapses:
    samples: int = 0
    registrar_below_n: int = 0  # samples with fewer than N contacts
    registrar_min: int | None = None
    registrar_unread: int = 0
    own_below_n: int | None = None  # samples the system itself said fewer than N registered (agent)
    own_min: int | None = None
    own_unread: int | None = None
    expired_contacts: int | None = None  # usrloc:location_expires over the phase up to the hold's end
    users_gap_over_expiry: int = 0
    users_never_registered: int = 0
    longest_gap_s: float = math.nan  # between one user's registrations, or since the last one

    @property
    def total(self) -> int:
        return (
            self.registrar_below_n
            + (self.own_below_n or 0)
            + max(0, self.expired_contacts or 0)
            + self.users_gap_over_expiry
            + self.users_never_registered
        )


@dataclass
class RegisterFigures:
    hold_s: float = math.nan
    requests: int = 0  # REGISTERs over the hold, all
    with_credentials: int = 0
    per_s: float = math.nan
    per_s_with_credentials: float = math.nan
    bin_mean: float = math.nan  # REGISTERs in each one-second bin of the hold
    bin_p50: float = math.nan
    bin_p99: float = math.nan
    bin_max: int = 0
    bin_max_with_credentials: int = 0
    zero_seconds_pct: float = math.nan
    waves: int = 0  # groups of REGISTERs less than WAVE_GAP_SEC apart
    wave_width_p50_s: float = math.nan
    wave_width_max_s: float = math.nan
    intervals: int = 0  # per-user intervals between successive registrations, over the phase
    interval_min_s: float = math.nan
    interval_p50_s: float = math.nan
    interval_p99_s: float = math.nan
    interval_max_s: float = math.nan


@dataclass
class CpuFigures:
    idle_s: float = 0.0
    refresh_s: float = 0.0
    idle_pct: float = math.nan  # whole tree, % of one core
    refresh_pct: float = math.nan
    whole_pct: float = math.nan
    idle_strict_s: float = 0.0  # seconds with no REGISTER in them (the tail not excluded)
    idle_strict_pct: float = math.nan
    by_role_idle_pct: dict[str, float] = field(default_factory=dict)
    by_role_whole_pct: dict[str, float] = field(default_factory=dict)
    workers: float = math.nan  # worker processes, mean over the samples
    per_worker_idle_pct: float = math.nan
    per_worker_refresh_pct: float = math.nan


@dataclass
class MemoryFigures:
    pss_mib_max: float = math.nan  # whole tree
    rss_mib_max: float = math.nan  # summed: shared pages counted once per process
    pss_mib_by_role_max: dict[str, float] = field(default_factory=dict)
    pss_mib_per_worker_max: float = math.nan
    rss_mib_per_worker_max: float = math.nan
    processes_max: int = 0


@dataclass
class KillFigures:
    worker: int | None = None
    pid: int | None = None
    connections: int = 0
    bound_s: float | None = None  # all of them with a new Call-ID at the registrar (its log)
    bound_polled_s: float | None = None  # the same seen by polling ul.lookup
    shown_s: float | None = None  # all shown registered (new worker_pid) in the status API
    back_s: float | None = None  # the later of the two
    registrar_min_contacts: int | None = None
    error: str | None = None


@dataclass
class StopFigures:
    exit_code: int | None = None
    exit_s: float | None = None
    zero_contacts_s: float | None = None


@dataclass
class AgentLog:
    lines_per_s: float = math.nan  # over the hold
    problems: dict[str, int] = field(default_factory=dict)  # warnings and errors during the hold, by event
    problems_after: dict[str, int] = field(default_factory=dict)  # after it (the kill, SIGTERM)


@dataclass
class PhaseResult:
    system: str
    n: int
    expires: int
    refresh_every_s: float  # the configured cadence: agent's policy, uac_reg's timer interval
    error: str | None = None
    to_registrar_s: float | None = None
    to_ready_s: float | None = None  # agent: /readyz ready
    own_registered_after: int | None = None  # the system's own count after the hold
    hold_start: float = math.nan  # unix time; the series' t counts from here
    hold_end: float = math.nan
    lapses: Lapses = field(default_factory=Lapses)
    registers: RegisterFigures = field(default_factory=RegisterFigures)
    cpu: CpuFigures = field(default_factory=CpuFigures)
    memory: MemoryFigures = field(default_factory=MemoryFigures)
    kill: KillFigures | None = None
    stop: StopFigures | None = None
    agent_metrics: dict[str, float] = field(default_factory=dict)  # deltas over the hold
    # Supervisor ping to a worker's SIP thread and back, over the run (uac_agent_worker_heartbeat_seconds):
    # how long a command waits for a worker blocked in libHandleEvents.
    heartbeat: dict[str, float] = field(default_factory=dict)
    agent_log: AgentLog | None = None
    bench_cpu_pct: float = math.nan
    readyz_cost_ms: float = math.nan  # supervisor CPU per /readyz read (the agent's own view, every sample)
    readyz_cost_pct: float = math.nan  # the same in % of one core, at one read per sample
    notes: list[str] = field(default_factory=list)
    series: dict[str, list[Any]] = field(default_factory=dict)  # per sample: for plots


def registrations(regs: Sequence[Register]) -> dict[str, list[float]]:
    """Per user, the times of its registrations: REGISTERs with credentials, one per SAME_REGISTRATION_SEC.

    Unregistrations (``Expires: 0``) are left out.
    """
    out: dict[str, list[float]] = {}
    for r in sorted(regs, key=lambda r: r.t):
        if not r.authed or r.expires == "0":
            continue
        times = out.setdefault(r.user, [])
        if times and r.t - times[-1] < SAME_REGISTRATION_SEC:
            times[-1] = r.t  # a retry of the same registration (stale nonce, retransmission)
        else:
            times.append(r.t)
    return out


def waves(times: Sequence[float], gap: float = WAVE_GAP_SEC) -> list[tuple[float, float, int]]:
    """Sorted times grouped where less than ``gap`` s apart: (first, last, count)."""
    out: list[tuple[float, float, int]] = []
    for t in sorted(times):
        if out and t - out[-1][1] < gap:
            out[-1] = (out[-1][0], t, out[-1][2] + 1)
        else:
            out.append((t, t, 1))
    return out


def register_figures(phase: Sequence[Register], h: Hold) -> RegisterFigures:
    f = RegisterFigures(hold_s=h.t1 - h.t0)
    in_hold = [r for r in phase if h.t0 <= r.t <= h.t1]
    f.requests = len(in_hold)
    f.with_credentials = sum(1 for r in in_hold if r.authed)
    f.per_s = f.requests / f.hold_s
    f.per_s_with_credentials = f.with_credentials / f.hold_s
    seconds = max(1, math.ceil(f.hold_s - 1e-6))
    bins = [0] * seconds
    authed = [0] * seconds
    for r in in_hold:
        i = min(seconds - 1, int(r.t - h.t0))
        bins[i] += 1
        authed[i] += r.authed
    f.bin_mean = sum(bins) / seconds
    f.bin_p50 = percentile(bins, 50)
    f.bin_p99 = percentile(bins, 99)
    f.bin_max = max(bins)
    f.bin_max_with_credentials = max(authed)
    f.zero_seconds_pct = 100.0 * bins.count(0) / seconds
    groups = waves([r.t for r in in_hold])
    f.waves = len(groups)
    widths = [last - first for first, last, _ in groups]
    f.wave_width_p50_s = percentile(widths, 50)
    f.wave_width_max_s = max(widths, default=math.nan)
    until_end = [r for r in phase if r.t <= h.t1]
    intervals = [b - a for times in registrations(until_end).values() for a, b in itertools.pairwise(times)]
    f.intervals = len(intervals)
    f.interval_min_s = min(intervals, default=math.nan)
    f.interval_p50_s = percentile(intervals, 50)
    f.interval_p99_s = percentile(intervals, 99)
    f.interval_max_s = max(intervals, default=math.nan)
    return f


def lapse_figures(
    n: int, users: Sequence[str], expires: int, phase: Sequence[Register], h: Hold, expired: int | None
) -> Lapses:
    lap = Lapses(samples=len(h.contacts), expired_contacts=expired)
    read = [c for c in h.contacts if c is not None]
    lap.registrar_unread = len(h.contacts) - len(read)
    lap.registrar_below_n = sum(1 for c in read if c < n)
    lap.registrar_min = min(read, default=None)
    if h.registered:
        own = [c for c in h.registered if c is not None]
        lap.own_unread = len(h.registered) - len(own)
        lap.own_below_n = sum(1 for c in own if c < n)
        lap.own_min = min(own, default=None)
    regs = registrations([r for r in phase if r.t <= h.t1])
    longest = 0.0
    for user in users:
        times = regs.get(user)
        if not times:
            lap.users_never_registered += 1
            continue
        gaps = [b - a for a, b in itertools.pairwise(times)] + [h.t1 - times[-1]]
        worst = max(gaps)
        longest = max(longest, worst)
        lap.users_gap_over_expiry += worst > expires
    lap.longest_gap_s = longest
    return lap


def _registers_in(times: Sequence[float], t0: float, t1: float) -> bool:
    """Whether sorted ``times`` has one in [t0, t1)."""
    i = bisect.bisect_left(times, t0)
    return i < len(times) and times[i] < t1


def cpu_figures(h: Hold, register_times: Sequence[float]) -> CpuFigures:
    """Mean CPU over idle and refresh samples (see REFRESH_TAIL_SEC), the whole hold, and by role."""
    f = CpuFigures()
    times = sorted(register_times)
    idle: list[CpuSample] = []
    busy: list[CpuSample] = []
    for s in h.cpu:
        (busy if _registers_in(times, s.t0 - REFRESH_TAIL_SEC, s.t1) else idle).append(s)
    strict = [s for s in h.cpu if not _registers_in(times, s.t0, s.t1)]

    def pct(samples: Sequence[CpuSample], role: str | None = None) -> float:
        wall = sum(s.wall_ns for s in samples)
        used = sum(sum(s.ns.values()) if role is None else s.ns.get(role, 0) for s in samples)
        return 100.0 * used / wall if wall else math.nan

    f.idle_s = sum(s.wall_ns for s in idle) / 1e9
    f.refresh_s = sum(s.wall_ns for s in busy) / 1e9
    f.idle_pct, f.refresh_pct, f.whole_pct = pct(idle), pct(busy), pct(h.cpu)
    f.idle_strict_s = sum(s.wall_ns for s in strict) / 1e9
    f.idle_strict_pct = pct(strict)
    roles = sorted({r for s in h.cpu for r in s.ns})
    f.by_role_idle_pct = {r: pct(idle, r) for r in roles}
    f.by_role_whole_pct = {r: pct(h.cpu, r) for r in roles}
    counts = [s.procs.get("worker", 0) for s in h.cpu]
    if any(counts):
        f.workers = sum(counts) / len(counts)
        f.per_worker_idle_pct = pct(idle, "worker") / f.workers
        f.per_worker_refresh_pct = pct(busy, "worker") / f.workers
    return f


def memory_figures(samples: Sequence[MemSample]) -> MemoryFigures:
    f = MemoryFigures()
    if not samples:
        return f
    f.pss_mib_max = max(sum(s.pss_kib.values()) for s in samples) / KIB_PER_MIB
    f.rss_mib_max = max(sum(s.rss_kib.values()) for s in samples) / KIB_PER_MIB
    roles = sorted({r for s in samples for r in s.pss_kib})
    f.pss_mib_by_role_max = {r: max(s.pss_kib.get(r, 0) for s in samples) / KIB_PER_MIB for r in roles}
    per_pss = [s.pss_kib["worker"] / s.procs["worker"] for s in samples if s.procs.get("worker")]
    per_rss = [s.rss_kib["worker"] / s.procs["worker"] for s in samples if s.procs.get("worker")]
    f.pss_mib_per_worker_max = max(per_pss) / KIB_PER_MIB if per_pss else math.nan
    f.rss_mib_per_worker_max = max(per_rss) / KIB_PER_MIB if per_rss else math.nan
    f.processes_max = max(sum(s.procs.values()) for s in samples)
    return f


def fill_from_hold(
    res: PhaseResult, h: Hold, users: Sequence[str], registrar: Kamailio, since: float, expired0: int | None
) -> None:
    """Lapses, REGISTER rates, refresh spread, CPU and memory of one hold (``since``: the phase's start)."""
    phase = parse_registers(registrar.log_path, since)
    expired: int | None = None
    if expired0 is not None:
        try:
            expired = registrar_stat(registrar, "location_expires") - expired0
        except RuntimeError:
            pass
    res.hold_start, res.hold_end = h.t0, h.t1
    res.lapses = lapse_figures(res.n, users, res.expires, phase, h, expired)
    res.registers = register_figures(phase, h)
    res.cpu = cpu_figures(h, [r.t for r in phase])
    res.memory = memory_figures(h.memory)
    res.bench_cpu_pct = h.bench_cpu_pct
    res.series = {
        "t": [round(s.t1 - h.t0, 3) for s in h.cpu],
        "cpu_pct": [round(100.0 * sum(s.ns.values()) / s.wall_ns, 4) if s.wall_ns else None for s in h.cpu],
        **{
            f"cpu_pct_{role}": [round(100.0 * s.ns.get(role, 0) / s.wall_ns, 4) if s.wall_ns else None for s in h.cpu]
            for role in sorted({r for s in h.cpu for r in s.ns})
        },
        "contacts": list(h.contacts),
        "registered": list(h.registered),
    }
    if h.ended_early:
        res.notes.append(h.ended_early)


# -- the two phases ---------------------------------------------------------------------------------


@dataclass
class Plan:
    n: int
    expires: int
    duration: float
    sample: float
    per_worker: int
    kill: bool
    workdir: Path
    accounts: list[tuple[str, str]]

    @property
    def users(self) -> list[str]:
        return [u for u, _ in self.accounts]

    @property
    def register_timeout(self) -> float:
        return 60.0 + self.n * 0.1


def run_agent(plan: Plan, registrar: Kamailio) -> PhaseResult:
    res = PhaseResult("agent", plan.n, plan.expires, agent_refresh_interval(plan.expires))
    per = plan.per_worker
    conns = [
        agent_connection(i, user, pw, registrar.cfg.port, plan.expires) for i, (user, pw) in enumerate(plan.accounts)
    ]
    agent = BenchAgent(
        plan.workdir / "agent",
        conns,
        log={"level": "info"},
        workers={"connections_per_worker": per, "max_workers": math.ceil(plan.n / per), "max_connections": plan.n},
    )
    known: dict[int, int] = {}  # every process of the agent's tree seen: pid -> start time
    h: Hold | None = None
    since = time.time()
    expired0 = _stat_or_none(registrar, "location_expires")
    poller = ContactPoller(registrar, plan.n).start()
    try:
        try:
            agent.start(timeout=plan.register_timeout)
        finally:
            if agent.proc is not None:
                known.update(_tree_ids(agent.proc.pid))
        assert agent.proc is not None and agent.launched_at is not None
        launched = agent.launched_at
        reached = poller.wait(plan.register_timeout - (time.monotonic() - launched), lambda: agent.running)
        res.to_registrar_s = None if reached is None else reached - launched
        if reached is None:
            res.notes.append(f"the registrar never held {plan.n} contacts (last count {poller.last})")
        ready = _wait(lambda: agent.registered_count(plan.n) == plan.n, plan.register_timeout, agent)
        res.to_ready_s = None if ready is None else ready - launched
        watch = TreeWatch(agent.proc.pid, agent_role, seen=known)
        before = agent.metric_sums()
        h = hold(
            watch,
            plan.duration,
            plan.sample,
            lambda: contacts_or_none(registrar),
            lambda: agent.registered_count(plan.n),
            lambda: agent.running,
        )
        after = agent.metric_sums()
        res.agent_metrics = _metric_deltas(before, after)
        res.heartbeat = heartbeat_figures(agent.metrics())
        res.own_registered_after = agent.registered_count(plan.n)
        res.readyz_cost_ms = readyz_cost_ms(agent)
        res.readyz_cost_pct = res.readyz_cost_ms / (plan.sample * 10.0)  # one read per sample
        fill_from_hold(res, h, plan.users, registrar, since, expired0)
        if plan.kill and agent.running:
            res.kill = kill_worker(agent, registrar, plan)
            known.update(_tree_ids(agent.proc.pid))
        if agent.running:
            res.stop = sigterm(agent, registrar)
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        poller.stop()
        if killed := shut_agent(agent, known):
            res.notes.append(f"{killed} process(es) of the agent's tree were still running at the end: SIGKILLed")
        res.agent_log = agent_log(agent, h)
    return res


def _stat_or_none(registrar: Kamailio, name: str) -> int | None:
    try:
        return registrar_stat(registrar, name)
    except RuntimeError:
        return None


def _wait(cond: Callable[[], bool], timeout: float, agent: BenchAgent) -> float | None:
    """Poll ``cond`` every POLL_SEC; time.monotonic() when it held, None on timeout or agent exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and agent.running:
        if cond():
            return time.monotonic()
        time.sleep(POLL_SEC)
    return None


def heartbeat_figures(metrics: str) -> dict[str, float]:
    """Count, mean and bucket bounds of p50/p99/max of ``uac_agent_worker_heartbeat_seconds``, in ms."""
    buckets: list[tuple[float, float]] = []
    total = count = 0.0
    for line in metrics.splitlines():
        m = re.match(r'uac_agent_worker_heartbeat_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
        if m:
            buckets.append((float(m.group(1)), float(m.group(2))))
        elif line.startswith("uac_agent_worker_heartbeat_seconds_sum "):
            total = float(line.split()[-1])
        elif line.startswith("uac_agent_worker_heartbeat_seconds_count "):
            count = float(line.split()[-1])
    if not count:
        return {}

    def bound(q: float) -> float:
        return next((le * 1000 for le, cum in sorted(buckets) if cum >= q * count), math.inf)

    return {
        "count": count,
        "mean_ms": total / count * 1000,
        "p50_le_ms": bound(0.5),
        "p99_le_ms": bound(0.99),
        "max_le_ms": bound(1.0),
    }


_METRICS_OF_INTEREST = ("uac_agent_registration_attempts_total", "uac_agent_worker_restarts_total")


def _metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in sorted(after):
        if key.startswith(_METRICS_OF_INTEREST):
            delta = after[key] - before.get(key, 0.0)
            if delta:
                out[key] = delta
    out["uac_agent_workers"] = after.get("uac_agent_workers", math.nan)
    return out


def agent_log(agent: AgentProcess, h: Hold | None) -> AgentLog:
    """The agent's log lines per second over the hold, and its warnings and errors, by event."""
    out = AgentLog()
    t0, t1 = (h.t0, h.t1) if h is not None else (math.inf, math.inf)
    lines = 0
    try:
        entries = agent.logs()
    except OSError:
        return out
    for entry in entries:
        try:
            t = datetime.fromisoformat(str(entry.get("timestamp"))).timestamp()
        except ValueError:
            t = math.nan
        lines += t0 <= t <= t1
        if entry.get("level") in ("warning", "error", "critical"):
            bucket = out.problems_after if t > t1 else out.problems
            key = f"{entry.get('level')} {entry.get('event')}"
            bucket[key] = bucket.get(key, 0) + 1
    if h is not None:
        out.lines_per_s = lines / max(1e-9, h.t1 - h.t0)
    return out


def readyz_cost_ms(agent: BenchAgent, reads: int = 50) -> float:
    """Supervisor CPU per ``/readyz`` read, in ms: the part of its CPU figure the benchmark's sampling causes."""
    assert agent.proc is not None
    pid = agent.proc.pid
    before = sum(cpu_by_process([pid]).values())
    for _ in range(reads):
        agent.http_get("/readyz")
    return (sum(cpu_by_process([pid]).values()) - before) / reads / 1e6


def kill_worker(agent: BenchAgent, registrar: Kamailio, plan: Plan) -> KillFigures:
    """SIGKILL the worker holding ``c0``; time until its connections are bound anew and shown registered.

    Polled every ~50 ms: the status API (registered, with a new ``worker_pid``) and ``ul.lookup`` (a
    new Call-ID). The registrar's log then gives the bound time precisely: the kill to the last of the
    new Call-IDs' REGISTERs with credentials (its 200 follows within a millisecond on loopback).
    """
    f = KillFigures()
    try:
        placement = agent.placement()
        first = agent.status("c0")["sip_registration_details"]
        f.worker, f.pid = first["worker"], first["worker_pid"]
        victims = sorted(cid for cid, w in placement.items() if w == f.worker)
        f.connections = len(victims)
        user = {cid: plan.accounts[int(cid[1:])][0] for cid in victims}
        old = {cid: binding_call_id(registrar, user[cid]) for cid in victims}
        assert f.pid is not None
        killed_wall = time.time()
        killed = time.monotonic()
        os.kill(f.pid, signal.SIGKILL)
        bound: dict[str, float] = {}
        shown: dict[str, float] = {}
        lowest: int | None = None
        deadline = killed + 30.0
        while (len(bound) < len(victims) or len(shown) < len(victims)) and time.monotonic() < deadline:
            for cid in victims:
                if cid not in shown:
                    d = agent.status(cid)
                    if d["registered"] and d["sip_registration_details"]["worker_pid"] not in (None, f.pid):
                        shown[cid] = time.monotonic() - killed
                if cid not in bound and binding_call_id(registrar, user[cid]) not in (None, old[cid]):
                    bound[cid] = time.monotonic() - killed
            count = contacts_or_none(registrar)
            if count is not None:
                lowest = count if lowest is None else min(lowest, count)
            time.sleep(0.02)
        f.registrar_min_contacts = lowest
        f.bound_polled_s = max(bound.values()) if len(bound) == len(victims) else None
        f.shown_s = max(shown.values()) if len(shown) == len(victims) else None
        new: dict[str, float] = {}
        old_by_user = {user[cid]: old[cid] for cid in victims}
        for r in parse_registers(registrar.log_path, killed_wall):
            if r.authed and r.user in old_by_user and r.call_id != old_by_user[r.user] and r.user not in new:
                new[r.user] = r.t - killed_wall
        f.bound_s = max(new.values()) if len(new) == len(victims) else f.bound_polled_s
        if f.bound_s is not None and f.shown_s is not None:
            f.back_s = max(f.bound_s, f.shown_s)
        else:
            f.error = f"after 30 s: {len(bound)} of {len(victims)} bound anew, {len(shown)} shown registered"
    except Exception as e:
        f.error = f"{type(e).__name__}: {e}"
    return f


def sigterm(agent: BenchAgent, registrar: Kamailio) -> StopFigures:
    f = StopFigures()
    assert agent.proc is not None
    sent = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    try:
        f.exit_code = agent.proc.wait(30)
        f.exit_s = time.monotonic() - sent
    except subprocess.TimeoutExpired:
        pass
    deadline = sent + 15.0
    while time.monotonic() < deadline:
        if contacts_or_none(registrar) == 0:
            f.zero_contacts_s = time.monotonic() - sent
            break
        time.sleep(POLL_SEC)
    return f


def run_uacreg(plan: Plan, registrar: Kamailio) -> PhaseResult:
    timer = uacreg_timer_interval(plan.expires)
    res = PhaseResult("uacreg", plan.n, plan.expires, float(timer))
    uac = UacReg(
        UacRegConfig(
            registrar_port=registrar.cfg.port, accounts=plan.accounts, expires=plan.expires, reg_timer_interval=timer
        ),
        plan.workdir / "uacreg",
    )
    since = time.time()
    expired0 = _stat_or_none(registrar, "location_expires")
    poller = ContactPoller(registrar, plan.n).start()
    try:
        uac.start()
        assert uac.started_at is not None and uac.proc is not None
        proc = uac.proc
        reached = poller.wait(plan.register_timeout, lambda: proc.poll() is None)
        res.to_registrar_s = None if reached is None else reached - uac.started_at
        if reached is None:
            res.notes.append(f"the registrar never held {plan.n} contacts (last count {poller.last})")
        watch = TreeWatch(uac.pid, kamailio_role)
        h = hold(
            watch, plan.duration, plan.sample, lambda: contacts_or_none(registrar), None, lambda: proc.poll() is None
        )
        res.own_registered_after = uac.registered_count()  # uac.reg_info: after the CPU window, it costs CPU
        fill_from_hold(res, h, plan.users, registrar, since, expired0)
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        poller.stop()
        uac.stop()
    return res


# -- report -----------------------------------------------------------------------------------------


def _num(v: float | int | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


def _ratio(a: float | int | None, b: float | int | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def _mib(v: float) -> str:
    return _num(v, 1)


def _nums(values: Sequence[float | int | None], digits: int = 2) -> str:
    return " / ".join(_num(v, digits) for v in values)


def _kill_text(r: PhaseResult) -> str:
    if r.system != "agent":
        return "n/a"
    k = r.kill
    if k is None:
        return "not run"
    if k.back_s is None:
        return f"failed: {k.error}"
    return (
        f"{k.back_s:.2f} ({k.connections} conns of worker {k.worker}: bound {_num(k.bound_s)} by the registrar's "
        f"log, {_num(k.bound_polled_s)} polled; shown registered {_num(k.shown_s)})"
    )


def _stop_text(r: PhaseResult) -> str:
    s = r.stop
    if s is None:
        return "-"
    return f"exit {_num(s.exit_code)} after {_num(s.exit_s)} s; 0 contacts after {_num(s.zero_contacts_s)} s"


Row = tuple[str, str, float | int | None]  # label, cell, value for the ratio (None: no ratio)


def rows(r: PhaseResult) -> list[Row]:
    """One system's column of the results table."""
    agent = r.system == "agent"
    lap, reg, cpu, mem = r.lapses, r.registers, r.cpu, r.memory
    own = f"{lap.own_below_n} of {lap.samples}" if lap.own_below_n is not None else "n/a"
    own += f", {lap.own_unread} unread" if lap.own_unread else ""
    below = f"{lap.registrar_below_n} of {lap.samples}" + (
        f", {lap.registrar_unread} unread" if lap.registrar_unread else ""
    )
    sup = _nums([cpu.by_role_idle_pct.get("supervisor"), cpu.by_role_whole_pct.get("supervisor")], 3)
    per_worker = f"{_nums([cpu.per_worker_idle_pct, cpu.per_worker_refresh_pct], 4)} (x {_num(cpu.workers, 0)})"
    pss = mem.pss_mib_by_role_max
    pss_split = _nums([pss.get("supervisor"), pss.get("zygote"), mem.pss_mib_per_worker_max], 1)
    intervals = _nums([reg.interval_min_s, reg.interval_p50_s, reg.interval_p99_s, reg.interval_max_s])
    wave = f"{reg.waves}, {_nums([reg.wave_width_p50_s, reg.wave_width_max_s])}"
    return [
        ("registrations", _num(r.n), None),
        ("refresh every, configured (s)", _num(r.refresh_every_s, 1), r.refresh_every_s),
        ("time to all at the registrar (s)", _num(r.to_registrar_s), r.to_registrar_s),
        ("time to /readyz ready (s)", _num(r.to_ready_s) if agent else "n/a", None),
        ("LAPSES, total", _num(lap.total), None),
        ("  registrar count < N (samples)", below, None),
        ("  registrar count, min", _num(lap.registrar_min), None),
        ("  own view < N (samples)", own, None),
        ("  contacts expired at the registrar", _num(lap.expired_contacts), None),
        ("  users with a gap > expiry", _num(lap.users_gap_over_expiry), None),
        ("  longest gap, one user (s)", _num(lap.longest_gap_s, 1), lap.longest_gap_s),
        ("REGISTERs/s over the hold, all", _num(reg.per_s), reg.per_s),
        ("REGISTERs/s with credentials", _num(reg.per_s_with_credentials), reg.per_s_with_credentials),
        ("REGISTERs in the busiest second", _num(reg.bin_max), reg.bin_max),
        ("REGISTERs per second: mean / p50 / p99", _nums([reg.bin_mean, reg.bin_p50, reg.bin_p99]), None),
        ("seconds with no REGISTER (%)", _num(reg.zero_seconds_pct, 1), None),
        ("refresh waves: count, width p50 / max (s)", wave, None),
        ("refresh interval per user: min / p50 / p99 / max (s)", intervals, None),
        ("CPU % of one core, idle seconds", _num(cpu.idle_pct, 3), cpu.idle_pct),
        ("CPU %, refresh seconds", _num(cpu.refresh_pct, 3), cpu.refresh_pct),
        ("CPU %, whole hold", _num(cpu.whole_pct, 3), cpu.whole_pct),
        ("  idle / refresh seconds", f"{cpu.idle_s:.0f} / {cpu.refresh_s:.0f}", None),
        ("CPU %, seconds with no REGISTER in them", _num(cpu.idle_strict_pct, 3), cpu.idle_strict_pct),
        ("  supervisor, idle / whole (%)", sup if agent else "n/a", None),
        ("  zygote, whole (%)", _num(cpu.by_role_whole_pct.get("zygote"), 4) if agent else "n/a", None),
        ("  per worker, idle / refresh (%)", per_worker if agent else "n/a", None),
        ("PSS, whole tree, max (MiB)", _mib(mem.pss_mib_max), mem.pss_mib_max),
        ("RSS summed, max (MiB)", _mib(mem.rss_mib_max), mem.rss_mib_max),
        ("  processes", _num(mem.processes_max), mem.processes_max),
        ("  PSS supervisor / zygote / per worker (MiB)", pss_split if agent else "n/a", None),
        ("killed worker's connections back (s)", _kill_text(r), None),
        ("SIGTERM", _stop_text(r), None),
    ]


def table(results: dict[str, PhaseResult]) -> str:
    """Markdown: a row per figure, a column per system, and agent / uac_reg when both ran."""
    systems = [s for s in SYSTEMS if s in results]
    both = len(systems) == 2
    head = ["figure", *(LABEL[s] for s in systems)] + (["agent / uac_reg"] if both else [])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for cells in zip(*(rows(results[s]) for s in systems), strict=True):
        line = [cells[0][0], *(c[1] for c in cells)]
        if both:
            line.append(_ratio(cells[0][2], cells[1][2]) if cells[0][2] is not None else "")
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def goal_line(r: PhaseResult) -> str:
    idle_ok = r.cpu.idle_pct <= GOAL_IDLE_CPU_PCT
    pss_ok = r.memory.pss_mib_max * KIB_PER_MIB <= GOAL_PSS_KIB
    lapse_ok = r.lapses.total == 0 and r.error is None
    met = idle_ok and pss_ok and lapse_ok
    scale = "" if r.n == GOAL_N else f" (this run held {r.n}, not {GOAL_N:,}: indicative only)"
    return (
        f"goal, {GOAL_N:,} registrations within {GOAL_IDLE_CPU_PCT:g} % of one core idle, 2 GiB PSS, 0 lapses: "
        f"idle CPU {_num(r.cpu.idle_pct, 3)} % {'ok' if idle_ok else 'OVER'}, "
        f"PSS {_mib(r.memory.pss_mib_max)} MiB {'ok' if pss_ok else 'OVER'}, "
        f"lapses {r.lapses.total} {'ok' if lapse_ok else 'NOT 0'} -> {'MET' if met else 'NOT MET'}{scale}"
    )


def details(r: PhaseResult) -> list[str]:
    out = [f"{LABEL[r.system]}:"]
    if r.error:
        out.append(f"  ERROR: {r.error}")
    reg = r.registers
    out.append(
        f"  over the hold ({reg.hold_s:.0f} s): {reg.requests} REGISTERs, {reg.with_credentials} with credentials, "
        f"{reg.intervals} refresh intervals over the phase; busiest second {reg.bin_max} "
        f"({reg.bin_max_with_credentials} with credentials)"
    )
    if r.own_registered_after is not None:
        view = "/readyz" if r.system == "agent" else "uac.reg_info flags"
        out.append(f"  registered by its own count after the hold ({view}): {r.own_registered_after} of {r.n}")
    if r.agent_metrics:
        shown = ", ".join(f"{k} {v:g}" for k, v in r.agent_metrics.items())
        out.append(f"  /metrics over the hold: {shown}")
    if r.heartbeat:
        hb = r.heartbeat
        out.append(
            f"  supervisor -> worker SIP thread -> supervisor (pings, the wait of a command): {hb['count']:.0f}, "
            f"mean {hb['mean_ms']:.2f} ms, p50 <= {hb['p50_le_ms']:g} ms, p99 <= {hb['p99_le_ms']:g} ms, "
            f"max <= {hb['max_le_ms']:g} ms"
        )
    if r.cpu.by_role_whole_pct:
        roles = ", ".join(f"{k} {v:.3f}" for k, v in r.cpu.by_role_whole_pct.items())
        out.append(f"  CPU % by role, whole hold: {roles}")
    if r.kill is not None and r.kill.registrar_min_contacts is not None:
        out.append(f"  registrar contacts while the worker was replaced: min {r.kill.registrar_min_contacts}")
    if r.agent_log is not None:
        log = r.agent_log
        problems = ", ".join(f"{k} x{v}" for k, v in log.problems.items()) or "no warning or error"
        after = ", ".join(f"{k} x{v}" for k, v in log.problems_after.items()) or "none"
        out.append(f"  agent log: {_num(log.lines_per_s)} lines/s over the hold; during it: {problems}")
        out.append(f"  agent log after the hold (kill, SIGTERM): warnings and errors: {after}")
    out.append(f"  the benchmark's own sampling used {_num(r.bench_cpu_pct, 2)} % of one core (kamcmd included)")
    if not math.isnan(r.readyz_cost_ms):
        out.append(
            f"  one /readyz read costs the supervisor {r.readyz_cost_ms:.2f} ms of CPU (measured after the hold): "
            f"read once per sample, that is {r.readyz_cost_pct:.3f} % of one core, included in its figures"
        )
    out += [f"  note: {n}" for n in r.notes]
    return out


# -- command line -----------------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.registrations",
        description="N registrations held against a Kamailio registrar: the agent, then uac_reg (the baseline).",
    )
    parser.add_argument("--n", type=_positive(int), default=1000, help="registrations (default 1000)")
    parser.add_argument("--expires", type=_positive(int), default=120, help="requested expiry, s (default 120)")
    parser.add_argument("--duration", type=_positive(float), default=600.0, help="hold per system, s (default 600)")
    parser.add_argument("--per-worker", type=int, default=7, help="workers.connections_per_worker, 1-7 (default 7)")
    parser.add_argument("--only", choices=SYSTEMS, help="run one system only (default: both, agent first)")
    parser.add_argument("--sample", type=_positive(float), default=1.0, help="sampling interval, s (default 1)")
    parser.add_argument("--no-kill", action="store_true", help="skip the killed-worker measurement")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = parser.parse_args(argv)
    if not 1 <= args.per_worker <= 7:
        parser.error("--per-worker must be 1-7")
    if args.expires < 10:
        parser.error("--expires must be at least 10 (the agent's minimum)")
    missing = [t for t in ("kamailio", "kamcmd") if shutil.which(t) is None]
    if missing:
        print(f"missing: {', '.join(missing)} (./scripts/setup.sh installs them)", file=sys.stderr)
        return 2

    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join([".venv/bin/python", "-m", "bench.registrations", *given])
    systems = [args.only] if args.only else list(SYSTEMS)
    info = machine()
    workdir = Path(tempfile.mkdtemp(prefix="uac-bench-reg-"))
    accounts = [(f"u{i}", f"pw-u{i}") for i in range(args.n)]
    plan = Plan(args.n, args.expires, args.duration, args.sample, args.per_worker, not args.no_kill, workdir, accounts)
    registrar = Registrar(
        KamailioConfig(
            port=free_port(),
            users=dict(accounts),
            min_expires=min(10, args.expires),
            max_expires=max(3600, args.expires),
        ),
        workdir / "registrar",
    )
    signal.signal(signal.SIGTERM, _terminate)
    results: dict[str, PhaseResult] = {}
    between: tuple[int, int] = (0, 0)
    started = time.monotonic()
    print(f"work directory {workdir}", flush=True)
    print(
        f"{args.n} registrations, expiry {args.expires} s, hold {args.duration:g} s per system; agent refreshes every "
        f"{agent_refresh_interval(args.expires):g} s, uac_reg reg_timer_interval "
        f"{uacreg_timer_interval(args.expires)} s",
        flush=True,
    )
    try:
        registrar.start()
        for system in systems:
            if results:
                between = clear_registrar(registrar, plan.users)
            print(f"{LABEL[system]}: starting, then holding {args.duration:g} s ...", flush=True)
            r = run_agent(plan, registrar) if system == "agent" else run_uacreg(plan, registrar)
            results[system] = r
            print(f"{LABEL[system]}: done{' with an error: ' + r.error if r.error else ''}", flush=True)
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
        registrar.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    elapsed = time.monotonic() - started

    print()
    print(
        f"machine: {info['cpus']} CPUs ({info['cpu']}), Linux {info['kernel']}, Python {info['python']}, "
        f"{info['kamailio']}; everything on loopback UDP; the run took {elapsed:.0f} s"
    )
    setups = {
        "agent": f"agent: {math.ceil(args.n / args.per_worker)} workers x {args.per_worker} connections, "
        f"start-up stagger 0-2 s, refresh every {agent_refresh_interval(args.expires):g} s",
        "uacreg": f"uac_reg: reg_timer_interval {uacreg_timer_interval(args.expires)} s (the agent's refresh "
        "interval in whole seconds: uac_reg's closest cadence), one burst per timer pass",
    }
    print(
        f"{args.n} registrations to one Kamailio registrar (digest auth), requested expiry {args.expires} s, "
        f"held {args.duration:g} s per system, sampled every {args.sample:g} s; "
        + "; ".join(setups[s] for s in systems)
    )
    print()
    print(table(results))
    print()
    if "agent" in results:
        print(goal_line(results["agent"]))
    if "uacreg" in results:
        print(
            "uac_reg, killed worker: n/a - its records live in one Kamailio instance, whose main process "
            "stops every process when one dies"
        )
    if len(results) == 2:
        left = "0 contacts" if between == (0, 0) else f"{between[0]} contacts: removed with ul.rm, {between[1]} left"
        print(f"between the phases the registrar held {left}")
    print()
    for r in results.values():
        print("\n".join(details(r)))
    print(
        f"A sample second is 'refresh' when the registrar logged a REGISTER in it or in the {REFRESH_TAIL_SEC:g} s "
        "before it (UDP transactions end T4 = 5 s after their answer, which wakes the agent's workers again). "
        "Lapses: registrar samples below N, the agent's /readyz below N, contacts the registrar expired, users "
        "with a gap between registrations longer than the expiry."
    )
    print()
    print(f"command: {command}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": command,
                    "machine": info,
                    "n": args.n,
                    "expires": args.expires,
                    "duration": args.duration,
                    "sample": args.sample,
                    "per_worker": args.per_worker,
                    "elapsed_s": elapsed,
                    "registrar_left_between_phases": list(between),
                    "results": {s: asdict(r) | {"lapses_total": r.lapses.total} for s, r in results.items()},
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
