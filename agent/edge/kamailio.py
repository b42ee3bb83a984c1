"""The edge's Kamailio: its config, rendered from the agent's settings (pure).

The rendered ``kamailio.cfg`` holds what depends on the settings (sockets, modules and
their parameters, the names ``routes.cfg`` uses) and includes ``routes.cfg``, the routing
script itself, which never changes with the settings. What changes at run time (the
connections, the TLS targets) is data in htables, set over RPC (``agent/edge/control.py``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from agent.edge.layout import LOOPBACK, EdgeLayout

MODULE_DIRS = (
    "/usr/lib/x86_64-linux-gnu/kamailio/modules",
    "/usr/lib/aarch64-linux-gnu/kamailio/modules",
    "/usr/lib/kamailio/modules",
)


def module_dir() -> str:
    """Where Debian put Kamailio's modules (the first that exists)."""
    for d in MODULE_DIRS:
        if Path(d).is_dir():
            return d
    return MODULE_DIRS[0]


__all__ = ["ROUTES", "KamailioOptions", "argv", "module_dir", "render"]

ROUTES = Path(__file__).with_name("routes.cfg")

# Modules the edge loads, in order (each comes with Debian's kamailio package; evapi,
# jansson and topoh too).
MODULES = (
    "kex",
    "corex",
    "tm",
    "tmx",
    "sl",
    "rr",
    "pv",
    "maxfwd",
    "textops",
    "textopsx",
    "siputils",
    "xlog",
    "sanity",
    "htable",
    "jsonrpcs",
    "dialog",
    "rtpengine",
    "ipops",
    "tcpops",
    "jansson",
    "evapi",
    "topoh",
    "dispatcher",
)

PING_TIMEOUT_MS = 4000  # a destination ping's wait for an answer (tm's fr_timer; see routes.cfg)
PING_MISSES = 2  # unanswered pings in a row that make a destination unreachable
# Answers that say the destination is there besides 2xx: any a server sends, not those Kamailio
# makes up itself for a ping nobody answered (408), could not send (477, 500) or that say the
# destination is unavailable (503).
PING_REPLY_CODES = ";".join(
    ["class=3", "class=6"]
    + [f"code={c}" for c in range(400, 500) if c not in (408, 477)]
    + [f"code={c}" for c in (501, 502, 504, 505, 513, 580)]
)


@dataclass(frozen=True)
class KamailioOptions:
    """What the config needs besides the layout."""

    advertised: str  # the address peers are told unless their connection's record says another
    aliases: tuple[str, ...]  # every other address the edge is reached at (each "myself")
    told: tuple[str, ...]  # every address a connection's record may say a peer is told
    max_calls: int
    over_limit_code: int
    retry_after_sec: int
    user_agent: str
    processes: int
    log_level: int  # Kamailio's debug= (0 warnings .. 3 debug)
    topoh_key: str  # stable for the supervisor's life, so calls survive a Kamailio restart
    hep: tuple[str, int] | None = None  # a HEP3 collector every call's messages are copied to
    hep_id: int = 2001
    destination_ping_sec: int = 10  # 0: destinations are not pinged

    @staticmethod
    def new_key() -> str:
        return secrets.token_hex(16)


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _hep_lines(hep: tuple[str, int], hep_id: int) -> list[str]:
    """siptrace copies each admitted call's messages (routes.cfg: sip_trace_mode("t")) as HEP3."""
    return [
        'loadmodule "siptrace.so"',
        f'modparam("siptrace", "duplicate_uri", "sip:{_host(hep[0])}:{hep[1]}")',
        'modparam("siptrace", "hep_mode_on", 1)',
        'modparam("siptrace", "hep_version", 3)',
        f'modparam("siptrace", "hep_capture_id", {hep_id})',
        'modparam("siptrace", "trace_to_database", 0)',
        'modparam("siptrace", "trace_on", 1)',
    ]


def render(lay: EdgeLayout, opts: KamailioOptions) -> str:
    pub = lay.bind
    adv = f" advertise {_host(opts.advertised)}:{lay.sip_port}" if opts.advertised else ""
    tcp_adv = (
        f" advertise {_host(opts.advertised or pub)}:{lay.sip_port}" if not lay.wildcard or opts.advertised else ""
    )
    lines = [
        "#!KAMAILIO",
        "#",
        "# uac-agent's SIP edge. Rendered by the agent from its settings at every start",
        "# (agent/edge/kamailio.py): do not edit, edit the agent's config instead.",
        "#",
        "",
        "####### Names the routing script uses ########",
    ]
    # UDP to peers always leaves from the public socket (bound to a wildcard, the kernel picks
    # the source address; never the workers' loopback socket, whose port nobody is told)
    lines.append(f'#!substdef "!PUB_SOCKET!udp:{_host(pub)}:{lay.sip_port}!g"')
    lines += [
        f'#!substdef "!SIP_PORT!{lay.sip_port}!g"',
        f'#!substdef "!TLS_PORT!{lay.tls_port}!g"',
        f'#!substdef "!WORKER_PORT!{lay.kamailio_port}!g"',
        f'#!substdef "!TLS_IN_PORT!{lay.kamailio_tls_port}!g"',
        f'#!substdef "!MAX_CALLS!{opts.max_calls}!g"',
        f'#!substdef "!OVER_CODE!{opts.over_limit_code}!g"',
        f'#!substdef "!RETRY_AFTER!{opts.retry_after_sec}!g"',
        *(["#!define OVER_503"] if opts.over_limit_code == 503 else []),
        *(["#!define HEP"] if opts.hep is not None else []),
        "",
        "####### Global parameters ########",
        f"debug={opts.log_level}",
        "log_stderror=yes",
        "memdbg=5",
        "memlog=5",
        f"children={opts.processes}",
        f"tcp_children={opts.processes}",
        "auto_aliases=no",
        f"mhomed={1 if lay.wildcard else 0}",
        "dns=no",
        "rev_dns=no",
        "dns_try_naptr=no",
        "use_dns_failover=no",
        "server_signature=no",
        f'server_header="Server: {opts.user_agent}"',
        f'user_agent_header="User-Agent: {opts.user_agent}"',
        "sip_warning=0",
        "# every TCP connection Kamailio accepts comes from HAProxy, with the peer's address",
        "tcp_accept_haproxy=yes",
        "# a PBX's flow lives as long as the longest registration it carries",
        "tcp_connection_lifetime=86500",
        "tcp_keepalive=yes",
        "tcp_keepidle=30",
        "tcp_connect_timeout=5",
        "tcp_max_connections=16384",
        *([] if lay.wildcard or ":" in pub else [f"# TCP to destinations leaves from sip.bind\ntcp_source_ipv4={pub}"]),
        "",
        "####### Sockets (agent/edge/layout.py) ########",
        f'listen=udp:{_host(pub)}:{lay.sip_port}{adv} name "pub"',
        f'listen=udp:{LOOPBACK}:{lay.kamailio_port} name "workers"',
        f'listen=tcp:{LOOPBACK}:{lay.kamailio_port}{tcp_adv} name "tcp"',
    ]
    if lay.tls_listen:  # the TLS connections HAProxy accepted on sip.tls_port
        tls_adv = f" advertise {_host(opts.advertised or pub)}:{lay.tls_port}" if tcp_adv else ""
        lines.append(f'listen=tcp:{LOOPBACK}:{lay.kamailio_tls_port}{tls_adv} name "tlsin"')
    # every address a peer is told, on both ports and any transport: HAProxy owns TCP on the SIP
    # port and TLS on the TLS port, so a Route naming them over TCP or TLS is the edge too
    for alias in sorted({*opts.aliases, opts.advertised, *opts.told, *([] if lay.wildcard else [pub])} - {""}):
        lines.append(f"alias={_host(alias)}:{lay.sip_port}")
        lines.append(f"alias={_host(alias)}:{lay.tls_port}")
    lines += [
        "",
        "####### Modules ########",
        f'mpath="{module_dir()}/"',
        *(f'loadmodule "{m}.so"' for m in MODULES),
        *(_hep_lines(opts.hep, opts.hep_id) if opts.hep is not None else []),
        "",
        'modparam("jsonrpcs", "transport", 4)',
        f'modparam("jsonrpcs", "dgram_socket", "{lay.kamailio_rpc}")',
        'modparam("jsonrpcs", "dgram_mode", 0600)',
        'modparam("htable", "htable", "conn=>size=12;")',
        'modparam("htable", "htable", "tlsport=>size=8;")',
        'modparam("htable", "htable", "tlspeer=>size=8;")',
        'modparam("htable", "htable", "state=>size=2;")',
        'modparam("rr", "append_fromtag", 1)',
        'modparam("rr", "enable_double_rr", 1)',
        'modparam("dialog", "profiles_with_value", "calls")',
        'modparam("dialog", "profiles_no_value", "all")',
        'modparam("dialog", "default_timeout", 21600)',
        'modparam("dialog", "enable_stats", 0)',
        # A branch made after a failover (failure_route) has no did= in its Record-Route:
        # those dialogs are matched by Call-ID and tags.
        'modparam("dialog", "dlg_match_mode", 1)',
        'modparam("tm", "failure_reply_mode", 3)',
        # a PBX's 503 (and its Retry-After) reaches the worker as sent: the registration policy
        # acts on it; a destination's 503 becomes 500 in routes.cfg (RFC 3261 16.7)
        'modparam("tm", "remap_503_500", 0)',
        'modparam("tm", "auto_inv_100_reason", "Trying")',
        f'modparam("rtpengine", "rtpengine_sock", "udp:{LOOPBACK}:{lay.rtpengine_port}")',
        'modparam("rtpengine", "rtpengine_tout_ms", 500)',
        'modparam("rtpengine", "rtpengine_retr", 1)',
        'modparam("rtpengine", "rtpengine_disable_tout", 1)',
        'modparam("tcpops", "closed_event", 1)',
        f'modparam("evapi", "bind_addr", "{LOOPBACK}:{lay.evapi_port}")',
        'modparam("evapi", "netstring_format", 1)',
        f'modparam("topoh", "mask_key", "{opts.topoh_key}")',
        # the masked Via and Contact name the edge (in-dialog requests follow Record-Route)
        f'modparam("topoh", "mask_ip", "{_host(opts.advertised or LOOPBACK)}")',
        'modparam("topoh", "uparam_name", "uac-th")',
        'modparam("topoh", "mask_callid", 0)',
        # Destination health (agent/edge/probes.py): every target in set 1 is pinged with
        # OPTIONS; any answer counts; the supervisor reads the states (dispatcher.list)
        f'modparam("dispatcher", "list_file", "{lay.dispatcher_list}")',
        'modparam("dispatcher", "ds_load_mode", 1)',
        f'modparam("dispatcher", "ds_ping_interval", {opts.destination_ping_sec})',
        'modparam("dispatcher", "ds_probing_mode", 1)',
        'modparam("dispatcher", "ds_ping_method", "OPTIONS")',
        f'modparam("dispatcher", "ds_ping_from", "sip:{opts.user_agent}@{_host(opts.advertised or LOOPBACK)}")',
        f'modparam("dispatcher", "ds_ping_reply_codes", "{PING_REPLY_CODES}")',
        f'modparam("dispatcher", "ds_probing_threshold", {PING_MISSES})',
        'modparam("dispatcher", "ds_inactive_threshold", 1)',
        *([] if lay.wildcard else [f'modparam("dispatcher", "ds_default_socket", "udp:{_host(pub)}:{lay.sip_port}")']),
        f'modparam("tm", "fr_timer", {PING_TIMEOUT_MS})',
        "",
        "####### Routing ########",
        "# Via names what the peer is told (set_advertised_address takes no variable: one",
        "# branch per address a connection's record may name).",
        "route[TELL] {",
    ]
    for i, addr in enumerate(sorted(set(opts.told))):
        keyword = "if" if i == 0 else "} else if"
        lines.append(f'\t{keyword} ($var(adv) == "{addr}") {{')
        lines.append(f'\t\tset_advertised_address("{_host(addr)}");')
    if opts.told:
        lines.append("\t}")
    lines += ["}", "", f'import_file "{ROUTES}"', ""]
    return "\n".join(lines)


def argv(cfg: Path, rundir: Path, shm_mib: int) -> list[str]:
    """Kamailio in the foreground, logging to stderr (the supervisor reads it)."""
    return [
        "kamailio",
        *("-DD", "-E", "-f", str(cfg), "-Y", str(rundir), "-P", str(rundir / "kamailio.pid")),
        *("-w", str(rundir), "-m", str(shm_mib), "-M", "8", "-x", "tlsf"),
    ]
