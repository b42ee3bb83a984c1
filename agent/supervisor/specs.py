"""From a connection's settings to what its worker needs (pure, no pjsua2)."""

from __future__ import annotations

from agent.config import AgentSettings, Connection, parse_sip_uri
from agent.ipc.messages import AccountSpec, ConnSpec, Route

__all__ = ["account_spec", "conn_spec", "contact_line", "route", "with_transport"]


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


def account_spec(conn: Connection) -> AccountSpec:
    ext = conn.external_uac_settings
    assert ext is not None and ext.password is not None
    registrar = with_transport(ext.proxy, ext.transport)
    host = parse_sip_uri(ext.proxy)["host"]
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
    )


def route(conn: Connection) -> Route:
    internal = conn.internal_uac_settings
    ext = conn.external_uac_settings
    hosts: list[str] = []
    if ext is not None:
        for uri in (ext.proxy, ext.outbound_proxy):
            if uri:
                hosts.append(parse_sip_uri(uri)["host"])
    return Route(
        destination=internal.destination_sip_uri,
        forward_mode=internal.forward_mode,
        allowed_sources=tuple(str(n) for n in internal.allowed_sources),
        ring_timeout_sec=internal.ring_timeout_sec,
        max_calls=internal.max_calls,
        pbx_hosts=tuple(hosts),
    )


def conn_spec(conn: Connection, settings: AgentSettings, register_at_once: bool = False) -> ConnSpec:
    """What the worker runs for a registering connection (``conn.registers`` must be true)."""
    return ConnSpec(
        connection_id=conn.connection_id,
        account=account_spec(conn),
        policy=settings.policy_settings(conn),
        route=route(conn),
        register_at_once=register_at_once,
    )
