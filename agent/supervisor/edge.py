"""The edge the supervisor runs, planned from the agent's settings (agent/edge is the how).

Everything an engine is started with comes from here: the layout of ports and files
(agent/edge/layout.py), what peers are told, the media relay's interfaces and limits, the
TLS certificate and CA. Nothing in /etc is read or written.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.addresses import is_wildcard
from agent.config import AgentSettings
from agent.edge.haproxy import HaproxyOptions
from agent.edge.kamailio import KamailioOptions
from agent.edge.layout import layout_of, runtime_dir
from agent.edge.media import local_ipv4_addresses, media_plan
from agent.edge.supervisor import EdgePlan
from agent.supervisor.specs import EdgeRecords, default_address

__all__ = ["plan_edge"]

_KAMAILIO_LEVELS = {"debug": 2, "info": 1, "warning": 0, "error": -1}
_RTPENGINE_LEVELS = {"debug": 6, "info": 4, "warning": 4, "error": 3}


def _server_pem(settings: AgentSettings, rundir: Path) -> Path | None:
    """The agent's certificate and key in one file, as HAProxy reads them (mode 0600)."""
    sip = settings.sip
    if sip.tls_cert_file is None or sip.tls_key_file is None:
        return None
    path = rundir / "tls-server.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(sip.tls_cert_file.read_text().rstrip("\n") + "\n")
        f.write(sip.tls_key_file.read_text().rstrip("\n") + "\n")
    return path


def plan_edge(settings: AgentSettings, topoh_key: str | None = None) -> tuple[EdgePlan, EdgeRecords]:
    sip = settings.sip
    rundir, temporary = runtime_dir(settings)
    lay = layout_of(settings, rundir)
    media = media_plan(
        sip.effective_rtp_address, sip.external_media_address or sip.external_signaling_address, bool(sip.local_nets)
    )
    records = EdgeRecords(settings, media)
    default = default_address(sip)
    told = {default, *([sip.bind] if not is_wildcard(sip.bind) else local_ipv4_addresses())}
    kam = KamailioOptions(
        advertised=default,
        aliases=(),
        told=tuple(sorted(told)),
        max_calls=sip.max_calls,
        over_limit_code=sip.over_limit_response,
        retry_after_sec=sip.over_limit_retry_after_sec,
        user_agent=sip.user_agent,
        processes=settings.edge.sip_processes,
        log_level=_KAMAILIO_LEVELS[settings.log.level],
        topoh_key=topoh_key or KamailioOptions.new_key(),
        hep=settings.capture.hep,
        hep_id=settings.capture.hep_id,
        destination_ping_sec=settings.edge.destination_ping_sec,
    )
    ca = sip.tls_ca_file if sip.tls_verify_server else None
    plan = EdgePlan(
        layout=lay,
        kamailio=kam,
        shm_mib=settings.edge.shm_mib,
        haproxy=HaproxyOptions(ca_file=ca, server_pem=_server_pem(settings, rundir)),
        media_interfaces=media.interfaces,
        max_sessions=sip.max_calls,
        media_max_cpu_percent=settings.edge.media_max_cpu_percent,
        rtpengine_log_level=_RTPENGINE_LEVELS[settings.log.level],
        hep=settings.capture.hep,
        hep_id=settings.capture.hep_id,
        remove_runtime_dir=temporary,
    )
    return plan, records
