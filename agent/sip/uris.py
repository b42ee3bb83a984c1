"""From a connection's settings to the URIs pjsua2 needs (pure, no pjsua2)."""

from __future__ import annotations

from agent.config import Connection, parse_sip_uri
from agent.sip.specs import AccountSpec

__all__ = ["account_spec", "contact_line", "with_transport"]


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
