"""A real Kamailio registrar on loopback, for tests and for the lab demo.

Generates a config (digest auth from an in-memory table, usrloc in memory,
423 on too-brief expiries, optional TLS), runs Kamailio in the foreground as
a child process, and reads its location table through ``kamcmd``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Kamailio",
    "KamailioConfig",
    "free_port",
    "free_port_block",
    "kamcmd",
    "make_test_pki",
    "module_dir",
    "start_kamailio_process",
    "stop_process_group",
    "wait_until_answering",
]

MODULE_DIRS = (
    "/usr/lib/x86_64-linux-gnu/kamailio/modules",
    "/usr/lib/aarch64-linux-gnu/kamailio/modules",
    "/usr/lib/kamailio/modules",
)


def _bindable(host: str, ports: range | tuple[int, ...]) -> bool:
    """Whether every port in ``ports`` can be bound for both UDP and TCP now."""
    try:
        for p in ports:
            for k in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, k) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((host, p))
    except OSError:
        return False
    return True


# Ports this process has handed out: a port is free when picked but bound only later
# (by a peer or an agent started afterwards), so it is never handed out twice.
_handed_out: set[int] = set()


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP, and its +1 for TCP (TLS)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = int(u.getsockname()[1])
        if port > 65000 or {port, port + 1} & _handed_out:
            continue
        if _bindable(host, (port, port + 1)):
            _handed_out.update((port, port + 1))
            return port
    raise RuntimeError("no free port pair found")


def free_port_block(count: int, host: str = "127.0.0.1", low: int = 10000, high: int = 20000) -> int:
    """The first of ``count`` consecutive ports all free for UDP and TCP (an agent's worker ports).

    Below Linux's ephemeral range (32768-60999), so that no socket another
    process opens meanwhile (a client's source port) takes one of them.
    """
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(low, high - count)
        block = range(base, base + count)
        if not _handed_out.intersection(block) and _bindable(host, block):
            _handed_out.update(block)
            return base
    raise RuntimeError(f"no block of {count} free ports found")


def release_port_block(base: int, count: int) -> None:
    """Hand a block out again once whatever used it has exited (an agent under test's RTP ports)."""
    _handed_out.difference_update(range(base, base + count))


@dataclass
class KamailioConfig:
    port: int
    users: Mapping[str, str]  # auth username -> password
    host: str = "127.0.0.1"
    tls: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    min_expires: int = 10
    max_expires: int = 3600
    algorithm: str = "MD5"  # or SHA-256
    realm: str = "lab.uac-agent.test"
    extra_route: str = ""
    # Calls: INVITEs are sent to the callee's registered Contact (lookup("location"))
    # through a stateful, record-routing proxy, as a PBX does; with relay_to every
    # INVITE goes straight to that URI instead (the forwarding benchmark's baseline).
    route_calls: bool = True
    relay_to: str | None = None

    @property
    def tls_port(self) -> int:
        return self.port + 1


def module_dir() -> str:
    """Where Debian put Kamailio's modules."""
    for d in MODULE_DIRS:
        if os.path.isdir(d):
            return d
    raise RuntimeError("Kamailio modules not found: apt-get install kamailio kamailio-tls-modules")


def _call_route(cfg: KamailioConfig) -> str:
    if not cfg.route_calls:
        return ""
    if cfg.relay_to:
        target = f'        $ru = "{cfg.relay_to}";\n'
    else:
        target = (
            '        if (!lookup("location")) {\n'
            '            sl_send_reply("404", "Not registered");\n'
            "            exit;\n"
            "        }\n"
        )
    return (
        "    if (has_totag()) {\n"
        "        if (loose_route()) {\n            t_relay();\n            exit;\n        }\n"
        '        if (is_method("ACK")) {\n            if (t_check_trans()) {\n                t_relay();\n'
        "            }\n            exit;\n        }\n"
        '        sl_send_reply("404", "Not here");\n        exit;\n    }\n'
        '    if (is_method("CANCEL")) {\n        if (t_check_trans()) {\n            t_relay();\n        }\n'
        "        exit;\n    }\n"
        '    if (is_method("INVITE|OPTIONS|INFO|MESSAGE")) {\n'
        '        if (is_method("INVITE")) {\n            record_route();\n        }\n'
        f"{target}"
        "        t_relay();\n        exit;\n    }\n"
    )


def render_config(cfg: KamailioConfig, rundir: Path) -> str:
    users = "\n".join(f'    $sht(creds=>{u}) = "{p}";' for u, p in cfg.users.items())
    tls_lines = ""
    tls_mod = ""
    tls_log = ""
    if cfg.tls:
        # what a TLS client negotiated, as this PBX saw it (Kamailio.tls_registers)
        tls_log = (
            '        if ($proto == "tls") {\n'
            '            xlog("L_NOTICE", "TLS REGISTER to=$tu version=$tls_version cipher=$tls_description\\n");\n'
            "        }\n"
        )
        tls_lines = f"listen=tls:{cfg.host}:{cfg.tls_port}\nenable_tls=yes\n"
        tls_mod = f'loadmodule "tls.so"\nmodparam("tls", "config", "{rundir}/tls.cfg")\n'
    return f"""#!KAMAILIO
debug=2
log_stderror=yes
log_facility=LOG_LOCAL0
children=2
tcp_children=2
auto_aliases=no
listen=udp:{cfg.host}:{cfg.port}
listen=tcp:{cfg.host}:{cfg.port}
{tls_lines}
mpath="{module_dir()}/"
loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "sanity.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "auth.so"
loadmodule "htable.so"
loadmodule "ctl.so"
{tls_mod}
modparam("ctl", "binrpc", "unix:{rundir}/kamailio_ctl")
modparam("usrloc", "db_mode", 0)
modparam("registrar", "min_expires", {cfg.min_expires})
modparam("registrar", "max_expires", {cfg.max_expires})
modparam("registrar", "min_expires_mode", 1)
modparam("auth", "algorithm", "{cfg.algorithm}")
modparam("htable", "htable", "creds=>size=4;")

event_route[htable:mod-init] {{
{users}
}}

request_route {{
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    if (is_method("REGISTER")) {{
        xlog("L_NOTICE", "REGISTER from $si:$sp proto=$proto to=$tu ci=$ci cseq=$cs "
             "exp=$hdr(Expires) from=$fu t=$TV(Sn)\\n");
{tls_log}        if (!pv_www_authenticate("{cfg.realm}", "$sht(creds=>$au)", "0")) {{
            www_challenge("{cfg.realm}", "0");
            exit;
        }}
        if (!save("location")) {{
            sl_reply_error();
        }}
        exit;
    }}
    if (is_method("OPTIONS") && uri==myself) {{
        sl_send_reply("200", "OK");
        exit;
    }}
{_call_route(cfg)}
{cfg.extra_route}
    sl_send_reply("404", "Not here");
    exit;
}}
"""


TLS_CFG = """[server:default]
method = TLSv1.2+
verify_certificate = no
require_certificate = no
private_key = {key}
certificate = {cert}

[client:default]
method = TLSv1.2+
verify_certificate = no
require_certificate = no
"""


def start_kamailio_process(
    cfg: Path, rundir: Path, log_path: Path, shm_mib: int = 64, pkg_mib: int = 8
) -> subprocess.Popen[bytes]:
    """Check ``cfg``, then run Kamailio in the foreground in a session of its own, logging to ``log_path``."""
    if shutil.which("kamailio") is None:
        raise RuntimeError("kamailio is not installed: apt-get install kamailio kamailio-tls-modules")
    check = subprocess.run(["kamailio", "-c", "-f", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"kamailio config check failed:\n{check.stderr[-3000:]}")
    with open(log_path, "ab") as log:
        pidfile = str(rundir / "kamailio.pid")
        return subprocess.Popen(
            [
                *("kamailio", "-DD", "-E", "-f", str(cfg), "-Y", str(rundir), "-P", pidfile, "-w", str(rundir)),
                *("-m", str(shm_mib), "-M", str(pkg_mib)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kamcmd(ctl: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["kamcmd", "-s", ctl, *args], capture_output=True, text=True, timeout=10)
    if check and res.returncode != 0:
        raise RuntimeError(f"kamcmd {' '.join(args)} failed: {res.stderr or res.stdout}")
    return res


def wait_until_answering(
    proc: subprocess.Popen[bytes], ctl: str, log_path: Path, timeout: float, what: str = "kamailio"
) -> None:
    """Return once Kamailio answers on its ctl socket; stop it and raise with its log's tail otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start:\n{log_path.read_text()[-3000:]}")
        if kamcmd(ctl, "core.version", check=False).returncode == 0:
            return
        time.sleep(0.05)
    stop_process_group(proc)
    raise RuntimeError(f"{what} did not come up:\n{log_path.read_text()[-3000:]}")


def stop_process_group(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM to the process group, SIGKILL if it has not exited after 10 s."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        proc.wait(5)


@dataclass
class Kamailio:
    """A Kamailio process; ``start()`` waits until it answers on its ctl socket."""

    cfg: KamailioConfig
    rundir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.rundir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.rundir / "kamailio.log"

    @property
    def ctl(self) -> str:
        return f"unix:{self.rundir}/kamailio_ctl"

    def write_config(self) -> Path:
        path = self.rundir / "kamailio.cfg"
        path.write_text(render_config(self.cfg, self.rundir))
        if self.cfg.tls:
            assert self.cfg.tls_cert and self.cfg.tls_key
            (self.rundir / "tls.cfg").write_text(TLS_CFG.format(key=self.cfg.tls_key, cert=self.cfg.tls_cert))
        return path

    def start(self, timeout: float = 15.0) -> None:
        self.proc = start_kamailio_process(self.write_config(), self.rundir, self.log_path)
        wait_until_answering(self.proc, self.ctl, self.log_path, timeout, "kamailio")

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.proc = None

    def rpc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return kamcmd(self.ctl, *args, check=check)

    def registers(self, user: str) -> list[tuple[float, str, int]]:
        """Every REGISTER Kamailio received for ``user``: (unix time, Call-ID, CSeq)."""
        out: list[tuple[float, str, int]] = []
        pat = re.compile(
            rf"REGISTER from \S+ proto=\S+ to=sips?:{re.escape(user)}@\S+ ci=(\S+) cseq=(\d+) .* t=([\d.]+)"
        )
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = pat.search(line)
            if m:
                out.append((float(m.group(3)), m.group(1), int(m.group(2))))
        return out

    def register_froms(self, user: str) -> list[str]:
        """The From URI of every REGISTER Kamailio received for ``user`` (the AoR in To)."""
        pat = re.compile(rf"REGISTER from \S+ proto=\S+ to=sips?:{re.escape(user)}@\S+ .* from=(\S+) t=")
        return [m.group(1) for ln in self.log_path.read_text(errors="replace").splitlines() if (m := pat.search(ln))]

    def tls_registers(self, user: str) -> list[str]:
        """The TLS version of every REGISTER for ``user`` that came over TLS (e.g. "TLSv1.3")."""
        pat = re.compile(rf"TLS REGISTER to=sips?:{re.escape(user)}@\S+ version=(\S+)")
        return [m.group(1) for ln in self.log_path.read_text(errors="replace").splitlines() if (m := pat.search(ln))]

    def lookup(self, user: str) -> str | None:
        """The ``ul.lookup`` output for ``user``, or None when it has no binding."""
        res = self.rpc("ul.lookup", "location", user, check=False)
        if res.returncode != 0 or "Contact" not in res.stdout:
            return None
        return res.stdout

    def register_lines(self) -> list[str]:
        """REGISTER requests Kamailio has logged (one line each)."""
        if not self.log_path.exists():
            return []
        return [ln for ln in self.log_path.read_text(errors="replace").splitlines() if "REGISTER from" in ln]


def make_test_pki(directory: Path, host: str = "localhost") -> dict[str, Path]:
    """A test CA, a server certificate for ``host`` signed by it, and an unrelated CA."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "ca": directory / "ca.pem",
        "ca_key": directory / "ca.key",
        "cert": directory / "server.pem",
        "key": directory / "server.key",
        "other_ca": directory / "other-ca.pem",
        "other_ca_key": directory / "other-ca.key",
    }

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    for ca, key, cn in (("ca", "ca_key", "uac-agent test CA"), ("other_ca", "other_ca_key", "unrelated CA")):
        run(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-subj",
            f"/CN={cn}",
            "-keyout",
            str(paths[key]),
            "-out",
            str(paths[ca]),
        )
    csr = directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text(
        f"subjectAltName=DNS:{host}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host}", "-keyout", str(paths["key"]), "-out", str(csr))
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(paths["ca"]),
        "-CAkey",
        str(paths["ca_key"]),
        "-CAcreateserial",
        "-days",
        "30",
        "-out",
        str(paths["cert"]),
        "-extfile",
        str(ext),
    )
    return paths
