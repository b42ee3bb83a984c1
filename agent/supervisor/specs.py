"""From a connection's settings to what its worker needs (pure, no pjsua2)."""

from __future__ import annotations

import ipaddress

from agent.addresses import advertised_for, is_wildcard
from agent.config import AgentSettings, Connection, SipSettings, parse_sip_uri
from agent.ipc.messages import AccountSpec, ConnSpec, Route

__all__ = [
    "account_spec",
    "conn_spec",
    "contact_line",
    "needs_lookup",
    "route",
    "transport_address",
    "with_transport",
]


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


def transport_address(sip: SipSettings) -> str | None:
    """What every transport of a worker publishes (Via, and Contact unless an account says otherwise)."""
    if sip.external_signaling_address:
        return sip.external_signaling_address
    return None if is_wildcard(sip.bind) else sip.bind


def account_spec(conn: Connection, sip: SipSettings | None = None) -> AccountSpec:
    ext = conn.external_uac_settings
    assert ext is not None and ext.password is not None
    registrar = with_transport(ext.proxy, ext.transport)
    host = parse_sip_uri(ext.proxy)["host"]
    contact_host = media = None
    if sip is not None:
        adv = advertised_for(sip, parse_sip_uri(ext.outbound_proxy or ext.proxy)["host"].strip("[]"))
        media = adv.media
        if adv.signaling != transport_address(sip):
            contact_host = adv.signaling
    proxies: tuple[str, ...] = ()
    if ext.outbound_proxy:
        proxies = (with_transport(ext.outbound_proxy, ext.transport, loose_route=True),)
    return AccountSpec(
        key=conn.connection_id,
        id_uri=f"sip:{ext.username}@{host}",
        registrar_uri=registrar,
        proxies=proxies,
        transport=ext.transport,
        auth_username=ext.effective_auth_username,
        password=ext.password.get_secret_value(),
        expires=ext.expiration_sec,
        contact_uri_params=contact_line(conn),
        contact_host=contact_host,
        media_address=media,
    )


def route(conn: Connection, sip: SipSettings | None = None) -> Route:
    internal = conn.internal_uac_settings
    ext = conn.external_uac_settings
    hosts: list[str] = []
    if ext is not None:
        for uri in (ext.proxy, ext.outbound_proxy):
            if uri:
                hosts.append(parse_sip_uri(uri)["host"])
    leg_b_host = leg_b_media = None
    dest = internal.destination_sip_uri
    if sip is not None and dest is not None and internal.forward_mode == "bridge":
        adv = advertised_for(sip, parse_sip_uri(dest.split(";", 1)[0])["host"].strip("[]"))
        leg_b_host, leg_b_media = adv.signaling, adv.media
    return Route(
        destination=internal.destination_sip_uri,
        forward_mode=internal.forward_mode,
        allowed_sources=tuple(str(n) for n in internal.allowed_sources),
        ring_timeout_sec=internal.ring_timeout_sec,
        max_calls=internal.max_calls,
        pbx_hosts=tuple(hosts),
        leg_b_host=leg_b_host,
        leg_b_media=leg_b_media,
    )


def conn_spec(conn: Connection, settings: AgentSettings, register_at_once: bool = False) -> ConnSpec:
    """What the worker runs for a registering connection (``conn.registers`` must be true)."""
    return ConnSpec(
        connection_id=conn.connection_id,
        account=account_spec(conn, settings.sip),
        policy=settings.policy_settings(conn),
        route=route(conn, settings.sip),
        register_at_once=register_at_once,
    )
