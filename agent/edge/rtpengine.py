"""The edge's rtpengine: how it is started (pure).

Userspace only: ``--table=-1`` (no kernel module, no root), ``--config-file=none`` (nothing in
/etc is read). Its logical interfaces come from :mod:`agent.edge.media`; its ports are
``sip.rtp_port`` ..; it refuses new sessions past ``sip.max_calls`` or when the host's CPU
use passes ``edge.media_max_cpu_percent``, so a call is refused with 503 rather than relayed
by a relay that has fallen behind.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from agent.edge.layout import LOOPBACK, EdgeLayout

__all__ = ["argv"]


def argv(
    lay: EdgeLayout,
    interfaces: Mapping[str, str],
    max_sessions: int,
    max_cpu_percent: float,
    log_level: int,
    hep: tuple[str, int] | None = None,
    hep_id: int = 2001,
) -> list[str]:
    """``interfaces``: name -> ``IP`` or ``IP!ADVERTISED``; ``hep``: a collector for RTCP stats."""
    first, last = lay.rtp_ports
    homer = []
    if hep is not None:
        host = f"[{hep[0]}]" if ":" in hep[0] else hep[0]
        homer = [f"--homer={host}:{hep[1]}", "--homer-protocol=udp", f"--homer-id={hep_id}"]
    return [
        "rtpengine",
        "--config-file=none",
        "--table=-1",
        "--foreground",
        "--log-stderr",
        f"--log-level={log_level}",
        f"--pidfile={Path(lay.runtime_dir) / 'rtpengine.pid'}",
        *(f"--interface={name}/{spec}" for name, spec in interfaces.items()),
        f"--listen-ng={LOOPBACK}:{lay.rtpengine_port}",
        f"--port-min={first}",
        f"--port-max={last}",
        f"--max-sessions={max_sessions}",
        f"--max-cpu={max_cpu_percent:g}",
        "--timeout=60",
        "--silent-timeout=3600",
        "--delete-delay=0",
        "--num-threads=2",
        *homer,
    ]
