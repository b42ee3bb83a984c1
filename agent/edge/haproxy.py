"""The edge's HAProxy: TCP and TLS on the public side, TLS towards PBXs (pure rendering).

* **TCP from peers** (``sip.port``): every connection goes to Kamailio's loopback TCP
  socket with a PROXY v2 header, so Kamailio sees the peer's real address (and, since only
  HAProxy ever connects to it, no client can forge one or hold Kamailio's accept loop).
* **TLS from peers** (``sip.tls_port``, only with ``sip.tls_cert_file``): terminated here,
  then the same way; Kamailio tells it from TCP by the port in the PROXY header.
* **TLS to PBXs**: Kamailio dials loopback port ``first + slot`` over TCP; the maps (data,
  changed live over the runtime API and kept in files for a restart) say which address,
  port and name that slot stands for. The chain is verified against ``sip.tls_ca_file``
  and the certificate must name the host dialled (sent as SNI), both before a byte of SIP
  is sent; TLS 1.2 at least, 1.3 whenever the PBX offers it. Each such connection leaves
  from ``sip.tls_port`` when the edge does not listen there, so a PBX that reuses the
  connection its Contact names finds the flow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.edge.layout import LOOPBACK, EdgeLayout

__all__ = ["HaproxyOptions", "argv", "render"]


@dataclass(frozen=True)
class HaproxyOptions:
    ca_file: Path | None  # None: the PBX's certificate is not verified (sip.tls_verify_server false)
    server_pem: Path | None  # certificate and key in one file (None: no TLS listener)


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def names_map(lay: EdgeLayout) -> Path:
    return lay.runtime_dir / "tls-names.map"


def addresses_map(lay: EdgeLayout) -> Path:
    return lay.runtime_dir / "tls-addresses.map"


def ports_map(lay: EdgeLayout) -> Path:
    return lay.runtime_dir / "tls-ports.map"


def render(lay: EdgeLayout, opts: HaproxyOptions) -> str:
    first, count = lay.tls_targets
    verify = f"verify required ca-file {opts.ca_file}" if opts.ca_file is not None else "verify none"
    source = ""
    if not lay.tls_listen and not lay.wildcard:
        source = f" source {_host(lay.bind)}:{lay.tls_port}"
    lines = [
        "# uac-agent's SIP edge: HAProxy. Rendered by the agent at every start (agent/edge/haproxy.py).",
        "global",
        "    log stderr format short local0 notice",
        f"    stats socket {lay.haproxy_api} mode 600 level admin",
        "    # connections at once (each takes two descriptors; the soft limit of 1,024 a service",
        "    # gets by default would not do: the supervisor raises its own, which HAProxy inherits)",
        "    maxconn 4096",
        "    nbthread 1",
        "    ssl-default-server-options ssl-min-ver TLSv1.2",
        "    ssl-default-bind-options ssl-min-ver TLSv1.2",
        "",
        "defaults",
        "    mode tcp",
        "    log global",
        "    option dontlognull",
        "    timeout connect 5s",
        "    # SIP connections stay open between refreshes: as long as Kamailio keeps them",
        "    timeout client 25h",
        "    timeout server 25h",
        "    timeout client-fin 5s",
        "    timeout server-fin 5s",
        "",
        "frontend sip_tcp",
        f"    bind {_host(lay.bind)}:{lay.sip_port}",
        "    default_backend kamailio",
    ]
    if opts.server_pem is not None and lay.tls_listen:
        lines += [
            "",
            "frontend sip_tls",
            f"    bind {_host(lay.bind)}:{lay.tls_port} ssl crt {opts.server_pem}",
            "    default_backend kamailio_tls",
            "",
            "# Kamailio tells TLS connections by the port they reach it on (the PROXY header's",
            "# destination port is not usable: Kamailio 5.6 reads it byte-swapped)",
            "backend kamailio_tls",
            f"    server kamailio {LOOPBACK}:{lay.kamailio_tls_port} send-proxy-v2",
        ]
    lines += [
        "",
        "backend kamailio",
        f"    server kamailio {LOOPBACK}:{lay.kamailio_port} send-proxy-v2",
        "",
        "frontend tls_targets",
        f"    bind {LOOPBACK}:{first}-{first + count - 1}",
        "    # a connection that fails (refused, or the PBX's certificate or name refused) is logged,",
        "    # with OpenSSL's reason, for the supervisor to answer the request waiting on it",
        "    option dontlog-normal",
        "    option log-separate-errors",
        '    log-format "tls_out port=%[var(sess.lport)] name=%[var(sess.name)] state=%ts '
        'ssl_err=%[ssl_bc_err] reason=%[ssl_bc_err_str]"',
        "    tcp-request connection set-var(sess.lport) dst_port",
        f"    tcp-request connection set-var(sess.name) dst_port,map({names_map(lay)})",
        f"    tcp-request connection set-var(sess.port) dst_port,map({ports_map(lay)})",
        f"    tcp-request connection set-dst dst_port,map({addresses_map(lay)})",
        "    tcp-request connection set-dst-port var(sess.port)",
        "    default_backend tls_out",
        "",
        "backend tls_out",
        "    # a refused certificate is final: the worker's policy decides when to try again",
        "    retries 0",
        f"    server pbx 0.0.0.0:0 ssl {verify} sni var(sess.name){source}",
        "",
    ]
    return "\n".join(lines)


def argv(cfg: Path) -> list[str]:
    """HAProxy in the foreground (-db), one process."""
    return ["haproxy", "-db", "-f", str(cfg)]
