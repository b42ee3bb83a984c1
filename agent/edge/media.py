"""Which of rtpengine's logical interfaces each side of a call uses (pure, but for the host's addresses).

The media relay binds ``sip.rtp_address`` (default ``sip.bind``). What a peer is told in SDP
follows the same rules as signalling (agent/addresses.py): the external media address
unless the peer is in ``sip.local_nets``, else the local address. rtpengine has one logical
interface per address a peer may be told:

* ``ext``: bound to the RTP address, advertising ``sip.external_media_address`` (or the
  external signalling one); bound to a wildcard, one per local address (``ext0``, ``ext1``,
  ...: rtpengine cannot bind a wildcard), each peer getting the one that routes to it;
* ``loc``: the RTP address itself (with an external address: for ``local_nets``; without:
  for everyone);
* bound to a wildcard with no external address: one interface per local address
  (``if0``, ``if1``, ...), and each peer gets the one that routes to it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass, field

from agent.addresses import is_wildcard, route_source

__all__ = ["MediaPlan", "local_ipv4_addresses", "media_plan"]

_SIOCGIFADDR = 0x8915


def local_ipv4_addresses() -> list[str]:
    """The host's IPv4 addresses (loopback included), one per interface that has one."""
    out: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            try:
                res = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            ip = socket.inet_ntoa(res[20:24])
            if ip not in out:
                out.append(ip)
    return out


@dataclass(frozen=True)
class MediaPlan:
    interfaces: dict[str, str]  # name -> "IP" or "IP!ADVERTISED" (rtpengine --interface)
    external: str | None  # the advertised external media address, if any
    by_address: dict[str, str]  # local address -> interface name (a peer told that address)
    external_by_address: dict[str, str] = field(default_factory=dict)  # local address -> its "IP!EXT" one

    def interface_for(self, told: str | None, peer_ip: str | None = None) -> str:
        """The interface of a peer told ``told`` in SDP (None: the relay's default, the first).
        Told the external address on a wildcard bind: the one bound to the local address that
        routes to ``peer_ip`` (rtpengine cannot bind a wildcard)."""
        if told is not None and told == self.external:
            if self.external_by_address:
                local = route_source(peer_ip) if peer_ip else None
                if local is not None and local in self.external_by_address:
                    return self.external_by_address[local]
                return next(iter(self.external_by_address.values()))
            return "ext"
        if told is not None and told in self.by_address:
            return self.by_address[told]
        return next(iter(self.interfaces))


def media_plan(
    rtp_address: str, external: str | None, local_nets: bool, addresses: list[str] | None = None
) -> MediaPlan:
    """``rtp_address``: where media binds; ``external``: the external media address (or None)."""
    if not is_wildcard(rtp_address):
        local = {rtp_address: "loc"}
        if external is not None:
            interfaces = {"ext": f"{rtp_address}!{external}"}
            if local_nets:
                interfaces["loc"] = rtp_address
            return MediaPlan(interfaces, external, local if local_nets else {})
        return MediaPlan({"loc": rtp_address}, None, local)
    family = 6 if rtp_address == "::" else 4
    found = addresses if addresses is not None else local_ipv4_addresses()
    found = [a for a in found if ipaddress.ip_address(a).version == family] or ["127.0.0.1"]
    by_address = {a: f"if{i}" for i, a in enumerate(found)}
    interfaces = {name: a for a, name in by_address.items()}
    if external is not None:
        # the address that routes to the default gateway first: the default for peers whose
        # address is not known yet (a host name)
        primary = route_source("192.0.2.1")  # TEST-NET: nothing is sent
        ordered = sorted(found, key=lambda a: a != primary)
        ext_by = {a: f"ext{found.index(a)}" for a in ordered}
        ext_ifs = {ext_by[a]: f"{a}!{external}" for a in ordered}
        return MediaPlan(
            {**ext_ifs, **(interfaces if local_nets else {})}, external, by_address if local_nets else {}, ext_by
        )
    return MediaPlan(interfaces, None, by_address)
