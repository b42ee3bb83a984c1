"""A connection's next hops, resolved by the supervisor for its worker (never on a SIP thread).

Rules
-----
* The registration's next hop is ``outbound_proxy`` when set, else ``proxy``. A
  host name there is resolved (agent/dns.py: NAPTR, SRV, A/AAAA) into a
  :class:`~agent.ipc.messages.Hop`: its targets in failover order, or the DNS
  error. An IP literal needs no hop: the worker sends to it as it is.
* Targets are addresses (``sip:IP:port``, with ``;transport=tcp|tls``): nothing
  downstream looks a name up. A TLS target also carries the host name it came
  from (the SRV target, or the host itself): the edge's TLS proxy dials the
  address and checks that the PBX's certificate names that host.
* A ``destination_uri`` with a host name gets the same treatment for leg B.
* The addresses calls from the PBX may come from are those of every target of
  ``proxy`` and ``outbound_proxy`` and of their hosts' own A/AAAA records.
* Every answer carries the time it may be used until (the smallest TTL); the
  pool looks the hops up again then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.addresses import is_ip
from agent.dns import Resolution, Resolver, Target
from agent.ipc.messages import Hop, HopTarget

if TYPE_CHECKING:
    from agent.config import Connection, SipSettings

__all__ = ["HopResolver", "Hops", "hop_of"]

# Looked up again at most this often, whatever the TTL says (a TTL of 0 is common, and a
# failed lookup is cached for seconds only): 1,000 connections on one PBX cost one lookup
# and 1,000 cache reads per period.
MIN_REFRESH_SEC = 30.0


@dataclass(frozen=True)
class Hops:
    registration: Hop | None
    destination: Hop | None
    pbx_addresses: tuple[str, ...]
    expires_at: float  # monotonic; a day when nothing was looked up

    @property
    def fingerprint(self) -> tuple[object, ...]:
        """What a worker must be told again when it changes: the targets as sets (the weighted
        order of equal-priority SRV records is drawn anew on every lookup: not a change), the
        errors, the PBX's addresses."""

        def of(hop: Hop | None) -> object:
            return None if hop is None else (hop.name, frozenset(t.uri for t in hop.targets), hop.error)

        return (of(self.registration), of(self.destination), frozenset(self.pbx_addresses))


def _label(t: Target) -> str:
    how = t.via if t.via in ("A", "AAAA", "literal") else f"{t.via}, priority {t.priority}, weight {t.weight}"
    name = "" if t.host == t.ip else f"{t.host} "
    return f"{name}{t.address} ({how})"


def _target(t: Target) -> HopTarget:
    return HopTarget(uri=t.uri, label=_label(t), name=t.host)


def hop_of(res: Resolution) -> Hop:
    return Hop(name=res.name, targets=tuple(_target(t) for t in res.targets), error=res.error)


class HopResolver:
    def __init__(self, sip: SipSettings, resolver: Resolver | None = None) -> None:
        self._resolver = resolver or Resolver(sip.nameservers or None, timeout=sip.dns_timeout_sec)

    def _resolve(self, uri: str, transport: str) -> Resolution | None:
        """None for an IP literal host (nothing to look up)."""
        from agent.config import parse_sip_uri

        parts = parse_sip_uri(uri)
        host = parts["host"].strip("[]")
        if is_ip(host):
            return None
        params = parts.get("params", "").lower()
        if "transport=tcp" in params:
            transport = "TCP"
        elif "transport=tls" in params or parts["scheme"] == "sips":
            transport = "TLS"
        elif "transport=udp" in params:
            transport = "UDP"
        port = int(parts["port"]) if "port" in parts else None
        return self._resolver.resolve(host, port, transport)

    def hops(self, conn: Connection) -> Hops:
        """Look up every host name ``conn`` sends to (blocking: call it off the loop and SIP threads)."""
        ext = conn.external_uac_settings
        now = time.monotonic()
        expires = now + 86400.0
        registration: Hop | None = None
        addresses: list[str] = []
        if ext is not None:
            hop_uri = ext.outbound_proxy or ext.proxy
            for uri in (ext.proxy, ext.outbound_proxy):
                if not uri:
                    continue
                res = self._resolve(uri, ext.transport)
                if res is None:
                    from agent.config import parse_sip_uri

                    addresses.append(parse_sip_uri(uri)["host"].strip("[]"))
                    continue
                expires = min(expires, res.expires_at)
                addresses += [t.ip for t in res.targets]
                if uri == hop_uri:
                    registration = hop_of(res)
                host_only = self._resolver.resolve(res.name, 5060, ext.transport)  # the host's own A records
                addresses += [t.ip for t in host_only.targets]
        destination: Hop | None = None
        dest = conn.internal_uac_settings.destination_sip_uri
        if dest is not None and conn.internal_uac_settings.forward_mode == "bridge":
            res = self._resolve(dest, "UDP")
            if res is not None:
                expires = min(expires, res.expires_at)
                destination = hop_of(res)
        return Hops(
            registration=registration,
            destination=destination,
            pbx_addresses=tuple(dict.fromkeys(addresses)),
            expires_at=max(expires, now + MIN_REFRESH_SEC),
        )
