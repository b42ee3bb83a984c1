"""From a connection's settings to what its worker and the edge need (pure but for the lookups
``agent/addresses.py`` may make; no pjsua2).

Rules
-----
* A worker's REGISTER goes to the edge first (the worker's stack routes every request
  there), then to the outbound proxy, or to the DNS target the worker picked, or to the
  registrar URI itself. Its Contact names the edge, never the worker: the address this
  connection's PBX is told (agent/addresses.py), the edge's UDP/TCP port (``sip.port``) or
  TLS port (``sip.tls_port``), and ``;line=<connection_id>``, the token the edge finds the
  connection by.
* The edge's record of the connection (:class:`~agent.edge.messages.EdgeConnection`) says
  where its calls go (the destination and its DNS targets), who may place them (the PBX's
  addresses and ``allowed_sources``), the limits, and what each side is told (Via,
  Record-Route, SDP through the media relay's interface for that address).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from agent.addresses import Advertised, advertised_for, is_wildcard, route_source
from agent.config import AgentSettings, Connection, SipSettings, parse_sip_uri
from agent.core.forwarding import call_sources
from agent.edge.media import MediaPlan, media_plan
from agent.edge.messages import EdgeConnection, TlsTarget
from agent.ipc.messages import AccountSpec, Hop, HopTarget

__all__ = ["EdgeRecords", "contact_line", "default_address", "needs_lookup", "tls_targets", "with_transport"]


def with_transport(uri: str, transport: str, *, loose_route: bool = False) -> str:
    """Add ``;transport=`` (and ``;lr``) unless the URI already says it."""
    parts = parse_sip_uri(uri)
    params = parts.get("params", "").lower()
    out = uri
    if transport != "UDP" and "transport=" not in params and parts["scheme"] == "sip":
        out += f";transport={transport.lower()}"
    if loose_route and ";lr" not in params:
        out += ";lr"
    return out


def contact_line(conn: Connection) -> str:
    """Contact URI parameter that maps an INVITE back to its connection."""
    return f";line={conn.connection_id}"


def _is_name(uri: str | None) -> bool:
    if not uri:
        return False
    host = parse_sip_uri(uri)["host"].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def needs_lookup(conn: Connection, sip: SipSettings) -> bool:
    """Whether building ``conn``'s spec looks a host name up (DNS: not on the pool's loop thread)."""
    ext = conn.external_uac_settings
    internal = conn.internal_uac_settings
    names = [ext.proxy, ext.outbound_proxy] if ext is not None else []
    if internal.forward_mode == "bridge":
        names.append(internal.destination_sip_uri)
    return any(_is_name(u) for u in names)


def default_address(sip: SipSettings) -> str:
    """What a peer is told when nothing more specific is known: the external address, the bound
    one, else the host's primary address (never 0.0.0.0)."""
    if sip.external_signaling_address:
        return sip.external_signaling_address
    if not is_wildcard(sip.bind):
        return sip.bind
    return route_source("192.0.2.1") or "127.0.0.1"  # TEST-NET: nothing is sent


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _peer_host(uri: str) -> str:
    return parse_sip_uri(uri.split(";", 1)[0] if uri.count(":") > 1 else uri)["host"].strip("[]")


@dataclass(frozen=True)
class _Sides:
    pbx: Advertised
    dest: Advertised | None
    pbx_host: str = ""
    dest_host: str = ""


def _ip_or_none(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


class EdgeRecords:
    """Builds, for each connection, the Contact its worker registers and the edge's record of it."""

    def __init__(self, settings: AgentSettings, media: MediaPlan | None = None) -> None:
        self._settings = settings
        sip = settings.sip
        self._default = default_address(sip)
        self.media = media or media_plan(
            sip.effective_rtp_address,
            sip.external_media_address or sip.external_signaling_address,
            bool(sip.local_nets),
            addresses=[] if is_wildcard(sip.effective_rtp_address) else None,
        )

    def _sides(self, conn: Connection) -> _Sides:
        ext = conn.external_uac_settings
        assert ext is not None
        sip = self._settings.sip
        pbx_host = parse_sip_uri(ext.outbound_proxy or ext.proxy)["host"].strip("[]")
        pbx = advertised_for(sip, pbx_host)
        dest = conn.internal_uac_settings.destination_sip_uri
        if dest is None or conn.internal_uac_settings.forward_mode != "bridge":
            return _Sides(pbx, None, pbx_host)
        dest_host = parse_sip_uri(dest.split(";", 1)[0])["host"].strip("[]")
        return _Sides(pbx, advertised_for(sip, dest_host), pbx_host, dest_host)

    def _pbx_port(self, transport: str) -> tuple[int, str]:
        sip = self._settings.sip
        if transport == "TLS":
            return sip.effective_tls_port, ";transport=tls"
        return sip.port, ";transport=tcp" if transport == "TCP" else ""

    def account(self, conn: Connection, sides: _Sides | None = None) -> AccountSpec:
        ext = conn.external_uac_settings
        assert ext is not None and ext.password is not None
        sides = sides or self._sides(conn)
        host = parse_sip_uri(ext.proxy)["host"]
        told = sides.pbx.signaling or self._default
        port, tp = self._pbx_port(ext.transport)
        proxies: tuple[str, ...] = ()
        if ext.outbound_proxy:
            proxies = (with_transport(ext.outbound_proxy, ext.transport, loose_route=True),)
        return AccountSpec(
            key=conn.connection_id,
            id_uri=f"sip:{ext.username}@{host}",
            registrar_uri=with_transport(ext.proxy, ext.transport),
            proxies=proxies,
            transport=ext.transport,
            auth_username=ext.effective_auth_username,
            password=ext.password.get_secret_value(),
            expires=ext.expiration_sec,
            contact=f"<sip:{ext.username}@{_host(told)}:{port}{tp}{contact_line(conn)}>",
        )

    def sources(self, conn: Connection, pbx_addresses: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Where ``conn``'s calls may come from: its PBX's IP literal hosts, the addresses the
        supervisor resolved its host names to, and its ``allowed_sources``."""
        ext = conn.external_uac_settings
        assert ext is not None
        literal = [
            parse_sip_uri(uri)["host"].strip("[]")
            for uri in (ext.proxy, ext.outbound_proxy)
            if uri and not _is_name(uri)
        ]
        allowed = (str(n) for n in conn.internal_uac_settings.allowed_sources)
        return call_sources((*literal, *pbx_addresses), allowed)

    def literal_hops(self, conn: Connection) -> tuple[Hop | None, ...]:
        """The IP literal next hops of ``conn`` (registrar, outbound proxy, destination) as hops
        of one target each: the edge needs a port for each one that is TLS."""
        ext = conn.external_uac_settings
        assert ext is not None
        uris = [with_transport(u, ext.transport) for u in (ext.proxy, ext.outbound_proxy) if u]
        dest = conn.internal_uac_settings.destination_sip_uri
        if dest is not None and conn.internal_uac_settings.forward_mode == "bridge":
            uris.append(dest)
        out: list[Hop | None] = []
        for uri in uris:
            if _is_name(uri) or "transport=tls" not in uri.lower():
                continue
            parts = parse_sip_uri(uri)
            host = parts["host"].strip("[]")
            target = f"sip:{_host(host)}:{parts.get('port', '5061')};transport=tls"
            out.append(Hop(name=host, targets=(HopTarget(uri=target, label=host, name=host),)))
        return tuple(out)

    def record(self, conn: Connection, sides: _Sides | None = None) -> EdgeConnection:
        """The edge's record, before any lookup (the pool adds the destination's DNS targets and the
        addresses the PBX's host names resolved to)."""
        ext = conn.external_uac_settings
        assert ext is not None
        internal = conn.internal_uac_settings
        sides = sides or self._sides(conn)
        dest = internal.destination_sip_uri
        mode = "none" if dest is None else internal.forward_mode
        pbx_told = sides.pbx.signaling or self._default
        port, tp = self._pbx_port(ext.transport)
        dest_side = sides.dest or sides.pbx
        return EdgeConnection(
            line=conn.connection_id,
            connection_id=conn.connection_id,
            transport=ext.transport,
            mode=mode,
            destination=dest or "",
            targets=(),
            ring_timeout_sec=internal.ring_timeout_sec,
            max_calls=internal.max_calls,
            sources=self.sources(conn),
            pbx_address=pbx_told,
            pbx_record_route=f"{_host(pbx_told)}:{port}{tp}",
            dest_address=dest_side.signaling or self._default,
            pbx_media=self.media.interface_for(sides.pbx.media, _ip_or_none(sides.pbx_host)),
            dest_media=self.media.interface_for(dest_side.media, _ip_or_none(sides.dest_host or sides.pbx_host)),
            from_user=ext.from_user or "",
        )

    def both(self, conn: Connection) -> tuple[AccountSpec, EdgeConnection]:
        sides = self._sides(conn)
        return self.account(conn, sides), self.record(conn, sides=sides)


def tls_targets(hops: tuple[Hop | None, ...], first_port: int, taken: dict[str, int], count: int) -> list[TlsTarget]:
    """The TLS targets among ``hops`` (each given a loopback port: ``taken`` maps keys already
    given one; a new key takes the lowest free slot). Raises ValueError when all are taken."""
    out: list[TlsTarget] = []
    for hop in hops:
        if hop is None:
            continue
        for t in hop.targets:
            if ";transport=tls" not in t.uri:
                continue
            parts = parse_sip_uri(t.uri)
            address, port = parts["host"].strip("[]"), int(parts.get("port", 5061))
            key = f"{_host(address)}:{port}"
            slot = taken.get(key)
            if slot is None:
                used = set(taken.values())
                slot = next((s for s in range(count) if s not in used), None)
                if slot is None:
                    raise ValueError(f"all {count} TLS target ports (edge.tls_targets) are in use")
                taken[key] = slot
            out.append(TlsTarget(name=t.name or address, address=address, port=port, local_port=first_port + slot))
    return out
