"""Which address the agent advertises to each peer (NAT, containers), apart from where it binds.

Rules
-----
* Sockets bind to ``sip.bind`` (and RTP to ``sip.rtp_address``, default the same).
  What a peer is told (Contact, Via, SDP ``c=``/``o=``, leg B's From) is chosen
  per peer:
  1. ``sip.external_signaling_address`` / ``sip.external_media_address`` (the
     media one defaults to the signaling one), unless the peer is in
     ``sip.local_nets``;
  2. otherwise the bound address, when it is a specific one;
  3. otherwise (``0.0.0.0`` or ``::``) the address of the interface that routes
     to the peer (the kernel's choice for a UDP socket connected to it; no
     packet is sent);
  4. and when even that is unknown (a host name that does not resolve in time),
     the stack's own choice, the host's primary address.
  ``0.0.0.0`` and ``::`` are never advertised.
* The edge writes each of these per peer, per request it sends (routes.cfg's
  route[TELL]: Via, Record-Route, Contact; rtpengine: SDP); the workers only
  speak to the edge on loopback.
* Host names are resolved off the SIP threads (in the supervisor, with a
  timeout); a lookup failure only means rule 4.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config import AgentSettings, SipSettings

__all__ = ["WILDCARDS", "Advertised", "advertised_for", "explain", "is_ip", "is_wildcard", "route_source"]

WILDCARDS = frozenset({"0.0.0.0", "::"})
RESOLVE_TIMEOUT_SEC = 2.0
CACHE_SEC = 60.0

_cache: dict[str, tuple[float, str | None]] = {}
_cache_lock = threading.Lock()
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="resolve")


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IP address (an IPv6 one with or without brackets), not a name."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def is_wildcard(address: str | None) -> bool:
    return address is None or address in WILDCARDS


def _lookup(host: str) -> str | None:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family in (socket.AF_INET, socket.AF_INET6):
        for info in infos:
            if info[0] == family:
                return str(info[4][0])
    return None


def resolve_ip(host: str) -> str | None:
    """``host`` as an IP address: itself if it is one; else resolved with a timeout, cached for a minute."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(host)
        if hit is not None and hit[0] > now:
            return hit[1]
    try:
        ip = _pool.submit(_lookup, host).result(RESOLVE_TIMEOUT_SEC)
    except concurrent.futures.TimeoutError:
        ip = None
    with _cache_lock:
        _cache[host] = (now + CACHE_SEC, ip)
    return ip


def route_source(peer_ip: str) -> str | None:
    """The local address the kernel would send from to ``peer_ip`` (connect() on UDP sends nothing)."""
    try:
        family = socket.AF_INET6 if ":" in peer_ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((peer_ip, 9))
            return str(s.getsockname()[0])
    except OSError:
        return None


@dataclass(frozen=True)
class Advertised:
    """What one peer is told; None: leave it to the stack (the transport's address)."""

    signaling: str | None
    media: str | None
    why: str


def _in_local_nets(sip: SipSettings, peer_ip: str | None) -> bool:
    if peer_ip is None:
        return False
    ip = ipaddress.ip_address(peer_ip)
    return any(ip.version == net.version and ip in net for net in sip.local_nets)


def advertised_for(sip: SipSettings, peer_host: str | None) -> Advertised:
    """The addresses advertised to the peer ``peer_host`` (a registrar, a proxy or a destination).

    The peer's host name is looked up only when the answer depends on it (``local_nets``, or a
    wildcard bind without an external address)."""
    external = sip.external_signaling_address
    external_media = sip.external_media_address or external
    media_bound = sip.effective_rtp_address
    needs_peer = (external and sip.local_nets) or (not external and (is_wildcard(sip.bind) or is_wildcard(media_bound)))
    peer_ip = resolve_ip(peer_host) if peer_host and needs_peer else None
    if external and not _in_local_nets(sip, peer_ip):
        return Advertised(external, external_media, "sip.external_signaling_address")
    local = None if peer_ip is None else route_source(peer_ip)
    why = "in sip.local_nets" if external else "no external address set"
    signaling = sip.bind if not is_wildcard(sip.bind) else local
    media = media_bound if not is_wildcard(media_bound) else local
    if signaling is None:
        why += "; the peer's address is unknown: the stack's choice"
    elif is_wildcard(sip.bind):
        why += f"; the interface that routes to {peer_ip}"
    return Advertised(signaling, media, why)


def explain(settings: AgentSettings) -> list[str]:
    """Lines for ``check-config``: what each connection's peer will be told."""
    sip = settings.sip
    lines = [
        f"bind: SIP on {sip.bind}, RTP on {sip.effective_rtp_address}"
        + (f"; external address {sip.external_signaling_address}" if sip.external_signaling_address else "")
        + (f", media {sip.external_media_address}" if sip.external_media_address else "")
        + (f"; local_nets {', '.join(map(str, sip.local_nets))}" if sip.local_nets else "")
    ]
    for conn in settings.connections:
        ext = conn.external_uac_settings
        if ext is None or not conn.registers:
            continue
        from agent.config import parse_sip_uri

        peer = parse_sip_uri(ext.outbound_proxy or ext.proxy)["host"].strip("[]")
        adv = advertised_for(sip, peer)
        lines.append(
            f"  {conn.connection_id} -> {peer}: Contact {adv.signaling or 'the stack choice'}, "
            f"SDP {adv.media or 'the stack choice'} ({adv.why})"
        )
    return lines
