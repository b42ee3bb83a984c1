"""Kamailio's own registration agent (the ``uac`` module's ``uac_reg``) as a baseline.

:class:`UacReg` runs a Kamailio whose only job is to keep a list of accounts registered
at a registrar over UDP, the way uac-agent does: records are loaded from a ``db_text``
table ``uacreg``, the module sends REGISTER, answers the 401 challenge and refreshes
before expiry. Its process tree (:attr:`UacReg.pid` and descendants) is what a
benchmark compares the agent with.

Run ``.venv/bin/python -m bench.kamailio_uac [N]`` for the demo: a lab registrar, N
registrations to it, time to all registered, CPU and memory of the uac_reg tree, and a
lapse watch over a whole refresh cycle (see :func:`main`).
"""

from __future__ import annotations

import argparse
import itertools
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.proctree import CpuSampler, pss_rss_kib, tree_pids
from lab.kamailio import (
    Kamailio,
    KamailioConfig,
    free_port,
    kamcmd,
    module_dir,
    start_kamailio_process,
    stop_process_group,
    wait_until_answering,
)

__all__ = ["UacReg", "UacRegConfig", "dbtext_escape", "main", "registrar_contacts", "registrar_stat"]


#: Columns of table ``uacreg`` version 5 (Kamailio 5.6), in the order of the shipped
#: db_text schema (``/usr/share/kamailio/dbtext/kamailio/uacreg``). Columns we may leave
#: empty carry the ``null`` attribute: in db_text an empty field *is* NULL, and a column
#: without ``null`` refuses it.
UACREG_COLUMNS = (
    "id(int,auto)",
    "l_uuid(string)",
    "l_username(string)",
    "l_domain(string)",
    "r_username(string)",
    "r_domain(string)",
    "realm(string,null)",
    "auth_username(string)",
    "auth_password(string,null)",
    "auth_ha1(string,null)",
    "auth_proxy(string)",
    "expires(int)",
    "flags(int)",
    "reg_delay(int)",
    "contact_addr(string,null)",
    "socket(string,null)",
)
UACREG_VERSION = 5

# uac_reg state flags, as ``uac.reg_info`` shows them (README of the uac module, 8.2).
REG_DISABLED = 1
REG_ONGOING = 2
REG_ONLINE = 4
REG_AUTHSENT = 8
REG_INIT = 16


def dbtext_escape(value: str) -> str:
    """A string as a db_text field: ``\\``, ``:``, newline, CR, tab and NUL backslash-escaped.

    An empty string cannot be written (db_text reads an empty field as NULL).
    """
    if value == "":
        raise ValueError("db_text cannot store an empty string (an empty field is NULL)")
    return (
        value.replace("\\", "\\\\")
        .replace(":", "\\:")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
        .replace("\0", "\\0")
    )


@dataclass
class UacRegConfig:
    """What the uac_reg Kamailio registers, where, and how it paces itself.

    Pacing, as uac_reg 5.6 does it: a timer process wakes every ``reg_timer_interval``
    seconds (the first pass runs at start) and, in that one pass, sends REGISTER for every
    record whose expiry is within ``reg_timer_interval + 3`` s. So the refresh period is a
    whole number of timer intervals: with ``expires`` 120, an interval of 60 refreshes
    every 60 s (lab.md's baseline, the default here), uac's own default of 90 every 90 s
    (the agent's cadence for 120 s: ``max(granted - 30, granted / 2)``). Retries of a failed
    REGISTER (``reg_retry_interval`` s later) also wait for a timer pass.

    All records loaded at start fall in the same pass and stay together: N records go out
    as one burst of N REGISTERs, then N authenticated ones as the 401s come back, at start
    and at every refresh. Choice made here: keep the burst (everything registered in one
    pass, as a restarted deployment would) and let the UDP receive buffer grow, with
    ``maxbuffer`` = 4 MiB (Kamailio's default probe limit is 256 KiB; the kernel's
    ``net.core.rmem_max`` caps it too, 4 MiB on these machines). Measured with 1,000
    records: at 256 KiB the uac_reg socket dropped 344 replies, 344 REGISTERs were
    retransmitted and all were registered after 1.7 s; at 4 MiB, 0 drops, 0
    retransmissions, all registered after 0.4-0.8 s. The alternative, ``reg_random_delay``
    = D > 0, gives each record a random initial delay in [0, D) s, but a delayed record is
    only sent at the first timer pass after its delay, so spreading needs a short
    ``reg_timer_interval`` too (e.g. 5 s with D = 60: 12 groups of ~85, all registered
    only after ~60 s); the groups then keep their phase at every refresh.

    ``reg_retry_interval`` must be > 0: with uac's default 0 a record is disabled for good
    after one failed attempt.
    """

    registrar_port: int
    accounts: Sequence[tuple[str, str]]  # (username, password): auth username = AoR user
    registrar_host: str = "127.0.0.1"
    expires: int = 120
    listen_host: str = "127.0.0.1"
    listen_port: int = 0  # 0: a free port is chosen at start
    r_domain: str | None = None  # AoR domain and Request-URI; default registrar host:port
    realm: str | None = None  # None: accept the realm the registrar challenges with
    reg_timer_interval: int = 60
    reg_retry_interval: int = 10
    reg_random_delay: int = 0
    reg_hash_size: int = 8  # 2^8 = 256 slots for up to a few thousand records
    reg_keep_callid: bool = True  # reuse Call-ID/CSeq on refresh (RFC 3261 10.2.4), like a UA
    maxbuffer: int = 4 * 1024 * 1024  # bytes: UDP receive buffer autoprobe limit
    children: int = 2  # UDP worker processes
    shm_mib: int = 64
    pkg_mib: int = 8
    debug: int = 2  # Kamailio log level, as the lab registrar's (2 = info; nothing per REGISTER)

    @property
    def domain(self) -> str:
        return self.r_domain or f"{self.registrar_host}:{self.registrar_port}"

    @property
    def proxy_uri(self) -> str:
        return f"sip:{self.registrar_host}:{self.registrar_port}"


@dataclass
class UacReg:
    """A Kamailio running uac_reg for ``cfg.accounts``; ``start()`` waits until its ctl socket answers."""

    cfg: UacRegConfig
    rundir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    log_path: Path = field(init=False)
    started_at: float | None = field(default=None, init=False)  # time.monotonic() at launch

    def __post_init__(self) -> None:
        self.rundir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.rundir / "kamailio.log"
        if self.cfg.listen_port == 0:
            self.cfg.listen_port = free_port()

    # --- files -------------------------------------------------------------------------

    @property
    def db_dir(self) -> Path:
        return self.rundir / "db"

    @property
    def ctl(self) -> str:
        return f"unix:{self.rundir}/kamailio_ctl"

    def uuid(self, index: int) -> str:
        """The record's l_uuid, which uac_reg also uses as the user part of its Contact."""
        return f"r{index}"

    def write_db(self) -> Path:
        """Write the db_text database (tables ``version`` and ``uacreg``); return its directory."""
        self.db_dir.mkdir(parents=True, exist_ok=True)
        (self.db_dir / "version").write_text(f"table_name(string) table_version(int)\nuacreg:{UACREG_VERSION}\n")
        c = self.cfg
        rows = [" ".join(UACREG_COLUMNS)]
        for i, (user, password) in enumerate(c.accounts, start=1):
            fields = [
                str(i),  # id
                dbtext_escape(self.uuid(i)),  # l_uuid
                dbtext_escape(user),  # l_username
                dbtext_escape(c.listen_host),  # l_domain
                dbtext_escape(user),  # r_username: the AoR user at the registrar
                dbtext_escape(c.domain),  # r_domain
                dbtext_escape(c.realm) if c.realm else "",  # realm: NULL = any
                dbtext_escape(user),  # auth_username
                dbtext_escape(password),  # auth_password
                "",  # auth_ha1: NULL, the password is used
                dbtext_escape(c.proxy_uri),  # auth_proxy: required, where REGISTER is sent
                str(c.expires),
                "0",  # flags
                "0",  # reg_delay: 0 = reg_random_delay applies
                "",  # contact_addr: NULL = modparam reg_contact_addr
                "",  # socket: NULL = default
            ]
            rows.append(":".join(fields))
        (self.db_dir / "uacreg").write_text("\n".join(rows) + "\n")
        return self.db_dir

    def render_config(self) -> str:
        c = self.cfg
        return f"""#!KAMAILIO
debug={c.debug}
log_stderror=yes
log_facility=LOG_LOCAL0
children={c.children}
disable_tcp=yes
auto_aliases=no
maxbuffer={c.maxbuffer}
listen=udp:{c.listen_host}:{c.listen_port}

mpath="{module_dir()}/"
loadmodule "kex.so"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "db_text.so"
loadmodule "uac.so"
loadmodule "ctl.so"

modparam("ctl", "binrpc", "unix:{self.rundir}/kamailio_ctl")
modparam("uac", "restore_mode", "none")
modparam("uac", "reg_db_url", "text://{self.db_dir}")
modparam("uac", "reg_contact_addr", "{c.listen_host}:{c.listen_port}")
modparam("uac", "reg_timer_interval", {c.reg_timer_interval})
modparam("uac", "reg_retry_interval", {c.reg_retry_interval})
modparam("uac", "reg_random_delay", {c.reg_random_delay})
modparam("uac", "reg_hash_size", {c.reg_hash_size})
modparam("uac", "reg_keep_callid", {int(c.reg_keep_callid)})

request_route {{
    sl_send_reply("404", "Not here");
    exit;
}}
"""

    def write_config(self) -> Path:
        self.write_db()
        path = self.rundir / "kamailio.cfg"
        path.write_text(self.render_config())
        return path

    # --- process -----------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """PID of the Kamailio main process (root of the baseline's process tree)."""
        if self.proc is None:
            raise RuntimeError("uac_reg Kamailio is not running")
        return self.proc.pid

    def start(self, timeout: float = 15.0) -> None:
        self.started_at = time.monotonic()
        self.proc = start_kamailio_process(
            self.write_config(), self.rundir, self.log_path, self.cfg.shm_mib, self.cfg.pkg_mib
        )
        wait_until_answering(self.proc, self.ctl, self.log_path, timeout, "kamailio (uac_reg)")

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL if it has not exited after 10 s."""
        stop_process_group(self.proc)
        self.proc = None

    def __enter__(self) -> UacReg:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- state -------------------------------------------------------------------------

    def rpc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return kamcmd(self.ctl, *args, check=check)

    def reg_flags(self) -> dict[str, int]:
        """Every record's uac_reg state flags, by l_uuid, from one ``uac.reg_info`` RPC per record.

        ``uac.reg_dump`` would answer in one call, but for 1,000 records its reply is about
        400 KB and ``kamcmd`` refuses replies over 128 KB ("reply too big"); uac_reg 5.6 has
        no paging. So one ``kamcmd`` process is fed all ``uac.reg_info l_uuid X`` commands on
        stdin (its interactive mode) over the same ctl socket: ~0.25 s for 1,000 records,
        against ~1,000 process starts for one ``kamcmd`` per record. It runs in Kamailio's
        ctl process, so do not call it while measuring the tree's CPU.
        """
        n = len(self.cfg.accounts)
        commands = "".join(f"uac.reg_info l_uuid {self.uuid(i)}\n" for i in range(1, n + 1))
        res = subprocess.run(["kamcmd", "-s", self.ctl], input=commands, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"kamcmd uac.reg_info failed: {res.stderr or res.stdout}")
        flags: dict[str, int] = {}
        uuid: str | None = None
        for line in res.stdout.splitlines():
            key, _, value = line.strip().partition(":")
            if key == "l_uuid":
                uuid = value.strip()
            elif key == "flags" and uuid is not None:
                flags[uuid] = int(value)
                uuid = None
        return flags

    def registered_count(self) -> int:
        """How many records uac_reg itself holds as registered (flag ONLINE set, DISABLED not).

        From :meth:`reg_flags` (per-record ``uac.reg_info``). Not from the module's counter
        ``uac:regactive``: in 5.6.3 it is decremented when any REGISTER goes out and
        incremented when any transaction completes, success or not, so it nets to 0 with
        every record registered (measured: ``regactive = 0``, ``regtotal = 1000``, 1,000
        contacts at the registrar). While a record is being refreshed (a few ms) uac_reg
        clears its ONLINE flag, so it is not counted although its binding at the registrar
        is still valid: count at the registrar (:func:`registrar_contacts`) to detect lapses.
        """
        return sum(1 for f in self.reg_flags().values() if f & REG_ONLINE and not f & REG_DISABLED)


_STAT = re.compile(r"^\s*([\w.-]+:[\w.-]+)\s*=\s*(-?\d+)\s*$", re.MULTILINE)


def registrar_stat(registrar: Kamailio, name: str) -> int:
    """One statistic of the registrar by its bare name, e.g. ``location_contacts``.

    In Kamailio 5.6.3 ``kamcmd stats.get_statistics usrloc:location_contacts`` answers
    nothing at all (exit 0, empty output): ``stats.get_statistics`` takes a bare name
    (``location_contacts``) or a whole group (``usrloc:``). The reply line is
    ``usrloc:location_contacts = N``.
    """
    out = registrar.rpc("stats.get_statistics", name).stdout
    for m in _STAT.finditer(out):
        if m.group(1).partition(":")[2] == name:
            return int(m.group(2))
    raise RuntimeError(f"statistic {name} not in: {out!r}")


def registrar_contacts(registrar: Kamailio) -> int:
    """Contacts in the registrar's location table (statistic ``usrloc:location_contacts``).

    usrloc drops an expired contact only at its next timer run (every 60 s by default), so a
    lapse shows up here late, and in ``usrloc:location_expires`` (cumulative) for sure.
    """
    return registrar_stat(registrar, "location_contacts")


_REGISTER_LINE = re.compile(r"REGISTER from \S+ proto=\S+ to=sips?:([^@\s]+)@\S+ ci=(\S+) cseq=(\d+) .* t=([\d.]+)")


def _registrar_log(registrar: Kamailio) -> list[tuple[float, str, str, int]]:
    """Every REGISTER the registrar logged: (unix time, user, Call-ID, CSeq), in log order."""
    out: list[tuple[float, str, str, int]] = []
    for line in registrar.register_lines():
        m = _REGISTER_LINE.search(line)
        if m:
            out.append((float(m.group(4)), m.group(1), m.group(2), int(m.group(3))))
    return out


def _bursts(times: Sequence[float], gap: float = 5.0) -> list[tuple[float, float, int]]:
    """Group sorted times separated by less than ``gap`` s: (first, last, count) per group."""
    groups: list[tuple[float, float, int]] = []
    for t in sorted(times):
        if groups and t - groups[-1][1] < gap:
            first, _, count = groups[-1]
            groups[-1] = (first, t, count + 1)
        else:
            groups.append((t, t, 1))
    return groups


def _udp_drops(port: int, host: str = "127.0.0.1") -> int | None:
    """Datagrams the kernel dropped at the UDP socket bound to host:port (``/proc/net/udp``)."""
    a, b, c, d = (int(x) for x in host.split("."))
    local = f"{d:02X}{c:02X}{b:02X}{a:02X}:{port:04X}"  # little-endian IPv4, as /proc/net/udp shows it
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        cols = line.split()
        if len(cols) > 12 and cols[1] == local:
            return int(cols[12])
    return None


def _rmem_max() -> int | None:
    try:
        return int(Path("/proc/sys/net/core/rmem_max").read_text())
    except (OSError, ValueError):
        return None


def _wait_for(what: str, probe: Callable[[], int], target: int, timeout: float, step: float) -> float:
    """Poll ``probe()`` until it reaches ``target``; return time.monotonic() then."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        last = probe()
        if last >= target:
            return time.monotonic()
        time.sleep(step)
    raise RuntimeError(f"{what}: {last} of {target} after {timeout:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Demo: N registrations through uac_reg to a lab registrar; time, CPU, memory, lapses.

    1. Start the lab registrar (:class:`lab.kamailio.Kamailio`, users ``uI``/``pwI``) and the
       uac_reg Kamailio with N records, expiry ``--expires``.
    2. Time from launching the uac_reg Kamailio until the registrar holds N contacts
       (``location_contacts``, polled every 20 ms), and until uac_reg's own view says N.
    3. For ``--sample`` s: CPU share of the uac_reg process tree (:class:`CpuSampler` on
       :func:`tree_pids`), then its summed PSS and RSS. The registrar's contact count is
       read every second meanwhile (the uac_reg tree is not touched while measuring).
    4. Keep reading it every second until ``--watch`` s after all were registered (default
       130 s: past the first expiry at 120 s, so at least one refresh had to land), then
       report the lowest count seen, the registrar's ``location_expires`` (contacts that
       expired), the longest gap between one user's REGISTERs in the registrar's log, the
       refresh bursts and any retransmitted REGISTERs.
    """
    ap = argparse.ArgumentParser(
        prog="python -m bench.kamailio_uac",
        description=main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("n", nargs="?", type=int, default=1000, help="registrations (default 1000)")
    ap.add_argument("--expires", type=int, default=120, help="requested expiry, s (default 120)")
    ap.add_argument("--sample", type=float, default=60.0, help="CPU sampling window, s (default 60)")
    ap.add_argument("--watch", type=float, default=130.0, help="lapse watch from all registered, s (default 130)")
    ap.add_argument("--timer-interval", type=int, default=UacRegConfig.reg_timer_interval)
    ap.add_argument("--random-delay", type=int, default=UacRegConfig.reg_random_delay)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = ap.parse_args(argv)
    n: int = args.n

    work = Path(tempfile.mkdtemp(prefix="bench-uacreg-"))
    accounts = [(f"u{i}", f"pw{i}") for i in range(n)]
    registrar = Kamailio(
        KamailioConfig(port=free_port(), users=dict(accounts), max_expires=3600, min_expires=10),
        work / "registrar",
    )
    uac = UacReg(
        UacRegConfig(
            registrar_port=registrar.cfg.port,
            accounts=accounts,
            expires=args.expires,
            reg_timer_interval=args.timer_interval,
            reg_random_delay=args.random_delay,
        ),
        work / "uac",
    )
    c = uac.cfg
    print(f"work dir {work}")
    rmem = _rmem_max()
    if rmem is not None and rmem < c.maxbuffer:
        print(f"note: net.core.rmem_max is {rmem} B < maxbuffer {c.maxbuffer} B: the UDP burst may be dropped")
    print(
        f"uac_reg: {n} records, expires {c.expires} s, reg_timer_interval {c.reg_timer_interval} s, "
        f"reg_random_delay {c.reg_random_delay} s, reg_retry_interval {c.reg_retry_interval} s, "
        f"maxbuffer {c.maxbuffer} B, {c.children} UDP children, udp:{c.listen_host}:{c.listen_port} -> "
        f"registrar udp:{c.registrar_host}:{c.registrar_port}"
    )
    try:
        registrar.start()
        wall0 = time.time()
        uac.start()
        assert uac.started_at is not None
        t_launch = uac.started_at
        t_ctl = time.monotonic()
        t_reg = _wait_for("registrar contacts", lambda: registrar_contacts(registrar), n, 120.0, 0.02)
        t_uac = _wait_for("uac_reg registered", uac.registered_count, n, 30.0, 0.1)
        first = _registrar_log(registrar)
        last_reg = max((t for t, *_ in first), default=wall0) - wall0
        print(f"ctl socket answering      {t_ctl - t_launch:7.3f} s after launch")
        print(
            f"all {n} at the registrar  {t_reg - t_launch:7.3f} s after launch "
            f"(last REGISTER logged by the registrar at +{last_reg:.3f} s; {len(first)} REGISTERs so far)"
        )
        print(f"uac_reg says all {n}     {t_uac - t_launch:7.3f} s after launch (uac.reg_info flags)")

        seen: list[int] = []
        sampler = CpuSampler(lambda: tree_pids(uac.pid))
        sampler.start()
        s_wall0 = time.time()
        end = time.monotonic() + args.sample
        while time.monotonic() < end:
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            seen.append(registrar_contacts(registrar))
        pct, used_ns, wall_ns = sampler.stop_detail()
        s_wall1 = time.time()
        pids = tree_pids(uac.pid)
        pss, rss = pss_rss_kib(pids)
        in_window = sum(1 for t, *_ in _registrar_log(registrar) if s_wall0 <= t <= s_wall1)
        print(
            f"CPU  {pct:.4f} % of one core over {wall_ns / 1e9:.1f} s ({used_ns / 1e6:.1f} ms on CPU; "
            f"{in_window} REGISTERs reached the registrar in the window)"
        )
        print(f"PSS  {pss / 1024:.1f} MiB, RSS {rss / 1024:.1f} MiB summed over {len(pids)} processes")

        while time.monotonic() < t_reg + args.watch:
            time.sleep(1.0)
            seen.append(registrar_contacts(registrar))
        expired = registrar_stat(registrar, "location_expires")
        uac_view = uac.registered_count()
        log = _registrar_log(registrar)
        watched = time.monotonic() - t_reg
        lows = sum(1 for v in seen if v < n)
        print(
            f"lapse watch {watched:.0f} s, {len(seen)} samples: registrar contacts min {min(seen)} max {max(seen)}, "
            f"{lows} samples below {n}; location_expires {expired}; uac_reg says {uac_view} registered"
        )
        per_user: dict[str, list[float]] = {}
        transactions: dict[tuple[str, int], int] = {}
        for t, user, callid, cseq in log:
            per_user.setdefault(user, []).append(t)
            transactions[(callid, cseq)] = transactions.get((callid, cseq), 0) + 1
        now = time.time()
        worst = 0.0
        for times in per_user.values():
            stamps = [*sorted(times), now]
            worst = max(worst, *(b - a for a, b in itertools.pairwise(stamps)))
        retrans = sum(k - 1 for k in transactions.values())
        print(
            f"registrar log: {len(log)} REGISTERs from {len(per_user)} users, {retrans} retransmitted; "
            f"longest gap between one user's REGISTERs (or since the last) {worst:.1f} s (expiry {c.expires} s)"
        )
        for first_t, last_t, count in _bursts([t for t, *_ in log]):
            print(f"  burst at +{first_t - wall0:7.2f} s: {count:5d} REGISTERs in {last_t - first_t:.3f} s")
        drops = _udp_drops(c.listen_port, c.listen_host)
        print(f"UDP datagrams dropped at uac_reg's socket: {'?' if drops is None else drops}")
        lapsed = lows > 0 or expired > 0 or worst > c.expires
        print("lapses: " + ("YES" if lapsed else "none"))
    finally:
        uac.stop()
        registrar.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
