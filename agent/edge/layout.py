"""Where the edge's processes listen and keep their files, derived from the agent's settings (pure).

Public (``sip.bind``): UDP on ``sip.port`` (Kamailio), TCP on ``sip.port`` (HAProxy, which
hands every connection to Kamailio with the peer's real address in a PROXY header) and, with
a certificate, TLS on ``sip.tls_port`` (HAProxy). Media: ``sip.rtp_port`` ..
(rtpengine). Loopback, from ``edge.loopback_port`` (L) on; nobody outside the host reaches them:

=========================  ===========================================================
L (UDP)                    Kamailio: the workers' REGISTERs and OPTIONS
L (TCP)                    Kamailio: TCP connections HAProxy accepted (PROXY protocol)
L + 1 (TCP)                Kamailio: TLS connections HAProxy accepted (PROXY protocol)
L + 2 (TCP)                Kamailio's event stream to the supervisor (evapi)
L + 3 (UDP)                rtpengine's control port (ng protocol)
L + 10 + k (UDP)           worker k
after the workers (TCP)    HAProxy: one port per TLS PBX target, dialled by Kamailio
=========================  ===========================================================

Kamailio's RPC and HAProxy's runtime API are UNIX sockets in the runtime directory.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent.addresses import is_wildcard
from agent.config import EDGE_OWN_PORTS, MAX_RUNTIME_DIR_CHARS, AgentSettings

__all__ = ["LOOPBACK", "EdgeLayout", "layout_of", "runtime_dir"]

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class EdgeLayout:
    bind: str  # public address (sip.bind)
    sip_port: int  # public UDP and TCP
    tls_port: int  # the port TLS Contacts name (sip.tls_port)
    tls_listen: bool  # whether the edge listens there (a certificate and key are configured)
    rtp_address: str
    rtp_ports: tuple[int, int]  # first, last
    loopback_port: int  # L
    max_workers: int
    tls_targets: tuple[int, int]  # first port, count
    runtime_dir: Path

    @property
    def kamailio_port(self) -> int:
        """UDP from the workers, TCP from HAProxy."""
        return self.loopback_port

    @property
    def kamailio_tls_port(self) -> int:
        """TCP from HAProxy's TLS side."""
        return self.loopback_port + 1

    @property
    def evapi_port(self) -> int:
        return self.loopback_port + 2

    @property
    def rtpengine_port(self) -> int:
        return self.loopback_port + 3

    @property
    def edge_uri(self) -> str:
        """The route every worker request takes first."""
        return f"sip:{LOOPBACK}:{self.kamailio_port};lr"

    def worker_port(self, k: int) -> int:
        return self.loopback_port + EDGE_OWN_PORTS + k

    def tls_target_port(self, slot: int) -> int:
        return self.tls_targets[0] + slot

    @property
    def kamailio_rpc(self) -> Path:
        return self.runtime_dir / "kamailio-rpc.sock"

    @property
    def dispatcher_list(self) -> Path:
        """The destinations the edge pings (agent/edge/probes.py)."""
        return self.runtime_dir / "dispatcher.list"

    @property
    def haproxy_api(self) -> Path:
        return self.runtime_dir / "haproxy.sock"

    @property
    def wildcard(self) -> bool:
        return is_wildcard(self.bind)


def runtime_dir(settings: AgentSettings) -> tuple[Path, bool]:
    """``edge.runtime_dir``, else ``$RUNTIME_DIRECTORY`` (systemd), else a new private temporary
    one; and whether it is that temporary one (removed when the edge stops)."""
    if settings.edge.runtime_dir is not None:
        path = settings.edge.runtime_dir
    elif os.environ.get("RUNTIME_DIRECTORY"):
        path = Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / "edge"
    else:
        path = Path(tempfile.mkdtemp(prefix="uac-agent-edge-"))
        if len(str(path)) > MAX_RUNTIME_DIR_CHARS:
            path.rmdir()
            raise ValueError(f"the temporary directory {path} is too long for the edge's sockets: set edge.runtime_dir")
        return path, True
    if len(str(path)) > MAX_RUNTIME_DIR_CHARS:
        raise ValueError(f"RUNTIME_DIRECTORY {path} is too long for the edge's sockets: set edge.runtime_dir")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path, False


def layout_of(settings: AgentSettings, rundir: Path) -> EdgeLayout:
    sip = settings.sip
    return EdgeLayout(
        bind=sip.bind,
        sip_port=sip.port,
        tls_port=sip.effective_tls_port,
        tls_listen=sip.tls_server,
        rtp_address=sip.effective_rtp_address,
        rtp_ports=(sip.rtp_port, sip.rtp_port + sip.rtp_port_range - 1),
        loopback_port=settings.edge.loopback_port,
        max_workers=settings.max_workers,
        tls_targets=settings.tls_target_ports,
        runtime_dir=rundir,
    )
