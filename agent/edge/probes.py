"""Destination health: which destinations the edge pings, and what their answers mean.

Kamailio's dispatcher module sends the OPTIONS (every ``edge.destination_ping_sec``, one set
holding each distinct destination target of every connection, rendered by
:func:`dispatcher_list`); the supervisor reads each target's state back over RPC
(``dispatcher.list``) and :class:`DestinationHealth` turns those states into one answer per
connection: reachable when any of its targets answered its last ping, unreachable when every
target has had time to answer and none did, unknown (None) before that or without targets.
Any answer a server sends counts (a 404 or 405 to OPTIONS still says the destination is
there), except 503 (kamailio.PING_REPLY_CODES). Pure: no sockets, the clock is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.addresses import is_ip
from agent.config import parse_sip_uri
from agent.edge.messages import EdgeConnection, TlsTarget

__all__ = ["DestinationHealth", "dispatcher_list", "parse_dispatcher_list", "probe_uris"]

# Dispatcher flags (dispatch.h): a target starts inactive and probing ("IP"); its first answer
# makes it active ("AP"); missed pings past the threshold make it inactive again.
INITIAL_FLAGS = 1 | 8  # DS_INACTIVE_DST | DS_PROBING_DST


def _target(uri: str) -> tuple[str, int, str] | None:
    """(host, port, transport) of a target URI (parsed as the config parses URIs); None: not one."""
    try:
        parts = parse_sip_uri(uri)
    except ValueError:
        return None
    transport = "udp"
    for param in parts.get("params", "").split(";"):
        name, _, value = param.partition("=")
        if name.lower() == "transport":
            transport = value.lower()
    port = int(parts["port"]) if "port" in parts else (5061 if transport == "tls" else 5060)
    return parts["host"].strip("[]"), port, transport


def probe_uris(rec: EdgeConnection, tls: Mapping[str, TlsTarget]) -> tuple[str, ...]:
    """Where the edge pings ``rec``'s destination: each of its targets (or the destination URI
    itself when it has none), with a TLS one replaced by its HAProxy loopback port (HAProxy
    dials and verifies it, as for calls). A TLS target with no port yet, and a host name (the
    supervisor resolves names into targets; an unresolved one has none), are left out."""
    if rec.mode == "none" or not rec.destination:
        return ()
    uris = rec.targets or (rec.destination if rec.destination.startswith("sip") else f"sip:{rec.destination}",)
    out: list[str] = []
    for uri in uris:
        target = _target(uri)
        if target is None or not is_ip(target[0]):
            continue  # a name the agent has not resolved: Kamailio would block on its DNS
        host, port, transport = target
        h = f"[{host}]" if ":" in host else host
        if transport == "tls":
            t = tls.get(f"{h}:{port}")
            if t is not None:
                out.append(f"sip:127.0.0.1:{t.local_port};transport=tcp")
        else:  # the Request-URI's user is not part of a ping target
            out.append(f"sip:{h}:{port}" + ("" if transport == "udp" else f";transport={transport}"))
    return tuple(dict.fromkeys(out))


def dispatcher_list(uris: Iterable[str]) -> str:
    """The dispatcher's list file: set 1, one line per distinct target, each starting inactive
    and probing (the first answer makes it active)."""
    return "".join(f"1 {uri} {INITIAL_FLAGS} 0\n" for uri in sorted(set(uris)))


def parse_dispatcher_list(reply: Any) -> dict[str, str]:
    """``dispatcher.list``'s JSON-RPC result as {target URI: flags} (e.g. "AP", "IP", "TP")."""
    out: dict[str, str] = {}
    if not isinstance(reply, Mapping):
        return out
    for rec in reply.get("RECORDS") or []:
        targets = (rec.get("SET") or {}).get("TARGETS") or [] if isinstance(rec, Mapping) else []
        for t in targets:
            dest = t.get("DEST") if isinstance(t, Mapping) else None
            if isinstance(dest, Mapping) and isinstance(dest.get("URI"), str):
                out[dest["URI"]] = str(dest.get("FLAGS", ""))
    return out


@dataclass
class DestinationHealth:
    """Per connection, whether its destination answers the edge's pings."""

    grace_sec: float  # how long a new target has to answer before its silence counts
    _uris: dict[str, tuple[str, ...]] = field(default_factory=dict)  # connection -> its targets
    _since: dict[str, float] = field(default_factory=dict)  # target -> when first pinged
    _flags: dict[str, str] = field(default_factory=dict)  # target -> the dispatcher's flags

    def set_targets(self, targets: Mapping[str, tuple[str, ...]], now: float) -> bool:
        """Every connection's targets; True when the set of targets to ping changed."""
        before = set(self._since)
        self._uris = {cid: uris for cid, uris in targets.items() if uris}
        wanted = {u for uris in self._uris.values() for u in uris}
        for u in wanted - before:
            self._since[u] = now
        for u in before - wanted:
            self._since.pop(u, None)
            self._flags.pop(u, None)
        return wanted != before

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(sorted(self._since))

    @property
    def connections(self) -> tuple[str, ...]:
        return tuple(self._uris)

    def targets_of(self, connection_id: str) -> tuple[str, ...]:
        return self._uris.get(connection_id, ())

    def observe(self, flags: Mapping[str, str]) -> None:
        """The dispatcher's current flags of each target."""
        for uri, f in flags.items():
            if uri in self._since:
                self._flags[uri] = f

    def restarted(self, now: float) -> None:
        """Kamailio started again: every target is probed afresh."""
        self._flags.clear()
        for u in self._since:
            self._since[u] = now

    def target_up(self, uri: str, now: float) -> bool | None:
        f = self._flags.get(uri, "")
        if f.startswith("A") or f.startswith("T"):  # active, or one ping missed (trying)
            return True
        if f.startswith("I") and now - self._since.get(uri, now) >= self.grace_sec:
            return False
        return None

    def reachable(self, connection_id: str, now: float) -> bool | None:
        states = [self.target_up(u, now) for u in self._uris.get(connection_id, ())]
        if any(s is True for s in states):
            return True
        if states and all(s is False for s in states):
            return False
        return None

    def all_reachable(self, now: float) -> dict[str, bool | None]:
        return {cid: self.reachable(cid, now) for cid in self._uris}
