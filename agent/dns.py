"""Where a SIP URI's host sends to: RFC 3263 §4 resolution into targets in failover order.

Rules
-----
* The supervisor calls ``Resolver.resolve`` in a thread of its own, never on a SIP
  thread: it blocks (each DNS query for at most ``timeout`` seconds, plus at most
  0.2 s of dnspython's back-off), is thread-safe and never raises. A failure is a
  ``Resolution`` with ``error`` set and no targets.
* The transport is already chosen by the config (UDP, TCP or TLS); for it:
  1. an IP literal host is the one target (the URI's port, else 5060, 5061 for
     TLS); no DNS query;
  2. a host with an explicit port: the host's A records, or its AAAA records when
     it has no A record; no NAPTR or SRV query;
  3. a host without a port: the host's NAPTR records with flag ``s`` and the
     transport's service (``SIP+D2U`` UDP, ``SIP+D2T`` TCP, ``SIPS+D2T`` TLS) name
     the SRV records to look up, in (order, preference) order. Without such a
     record (or when their SRV names have no record): SRV ``_sip._udp.<host>``,
     ``_sip._tcp.<host>`` or ``_sips._tcp.<host>``. Each SRV target's A records (or
     AAAA when it has none) give one target per address, in a row, in the order
     ``order_srv`` draws (RFC 2782: ascending priority, weighted random within one).
     SRV records whose targets have no address give an error, not this fallback.
     Without any SRV record: the host's A (or AAAA) records with the default port.
* Without ``nameservers`` (the system's resolver), a name in the hosts file
  (``/etc/hosts``) gives its addresses there before any A/AAAA query, as the
  system's "files dns" order does (``localhost``, lab names); such an answer is
  used for HOSTS_TTL. SRV and NAPTR come from DNS only.
* A timeout stops the resolution at once (``DNS: no answer from <nameservers>
  within <timeout> s for <name> (<type>)``). NXDOMAIN and empty answers go on to
  the next step, ending in ``DNS: no SRV or A record for <host>`` (``DNS: no A or
  AAAA record for <host>`` with an explicit port). Any other failure (SERVFAIL,
  REFUSED, ...) goes on too, and the last one is the error when no target is found.
  Errors are one line starting ``DNS:``, never an exception's repr.
* Answers are cached per (host, port, transport) until the smallest TTL of the
  records used has passed; failures for ``negative_ttl`` seconds. A cached answer
  keeps the records, not their order: the weighted draw is made on every call.
"""

from __future__ import annotations

import ipaddress
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.rdtypes.IN.NAPTR
import dns.rdtypes.IN.SRV
import dns.resolver

__all__ = [
    "DEFAULT_PORTS",
    "NAPTR_SERVICES",
    "SRV_PREFIXES",
    "Resolution",
    "Resolver",
    "SrvRecord",
    "Target",
    "order_srv",
    "parse_nameserver",
]

TRANSPORTS = ("UDP", "TCP", "TLS")
DEFAULT_PORTS = {"UDP": 5060, "TCP": 5060, "TLS": 5061}
NAPTR_SERVICES = {"UDP": "SIP+D2U", "TCP": "SIP+D2T", "TLS": "SIPS+D2T"}
SRV_PREFIXES = {"UDP": "_sip._udp", "TCP": "_sip._tcp", "TLS": "_sips._tcp"}
_MAX_CACHE = 512


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True)
class Target:
    """One concrete place to send to; ``via`` says how it was found."""

    host: str  # the SRV target, or the URI's host
    ip: str
    port: int
    transport: str  # UDP | TCP | TLS
    priority: int
    weight: int
    via: str  # "SRV _sip._udp.example.com", "NAPTR+SRV ...", "A", "AAAA", "literal"

    @property
    def address(self) -> str:
        """``ip:port`` (``[ip]:port`` for IPv6)."""
        return _hostport(self.ip, self.port)

    @property
    def uri(self) -> str:
        """A SIP URI routing to this target: ``sip:ip:port``, with ``;transport=tcp|tls`` unless UDP."""
        suffix = "" if self.transport == "UDP" else f";transport={self.transport.lower()}"
        return f"sip:{self.address}{suffix}"


@dataclass(frozen=True)
class Resolution:
    """The answer for one host: targets in failover order, or why there are none."""

    name: str
    targets: tuple[Target, ...]
    error: str | None
    expires_at: float  # clock() time until which this answer may be used (a day for an IP literal)
    from_cache: bool


class SrvRecord(NamedTuple):
    priority: int
    weight: int
    port: int
    target: str


def order_srv(records: Iterable[SrvRecord | tuple[int, int, int, str]], rng: random.Random) -> list[SrvRecord]:
    """RFC 2782's order: ascending priority; within one priority, a weighted random draw.

    For each pick, the remaining records of the priority are listed with the zero-weight
    ones first, a number is drawn uniformly in [0, sum of weights] and the first record whose
    running sum of weights reaches it is taken. A zero-weight record is so taken only when 0
    is drawn (chance 1 / (sum + 1)), and records of all zero weight come in random order.
    """
    by_priority: dict[int, list[SrvRecord]] = {}
    for item in records:
        rec = SrvRecord(*item)  # (priority, weight, port, target)
        by_priority.setdefault(rec.priority, []).append(rec)
    ordered: list[SrvRecord] = []
    for priority in sorted(by_priority):
        pending = by_priority[priority]
        rng.shuffle(pending)
        pending.sort(key=lambda r: r.weight != 0)  # stable: zero weights first, the rest shuffled
        while pending:
            drawn = rng.randint(0, sum(max(r.weight, 0) for r in pending))
            running = 0
            for i, rec in enumerate(pending):
                running += max(rec.weight, 0)
                if running >= drawn:
                    ordered.append(pending.pop(i))
                    break
    return ordered


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"IP"``, ``"IP:port"``, ``"[IPv6]:port"`` or a bare IPv6 address as (ip, port); ValueError otherwise."""
    t = text.strip()
    port = 53
    try:
        if t.startswith("["):
            close = t.index("]")
            ip, rest = t[1:close], t[close + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError
                port = int(rest[1:])
        elif t.count(":") == 1:
            ip, p = t.split(":")
            port = int(p)
        else:
            ip = t
        ip = str(ipaddress.ip_address(ip))
    except ValueError:
        raise ValueError(f"nameserver {text!r}: expected an IP address, IP:port or [IPv6]:port") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"nameserver {text!r}: port must be 1-65535")
    return ip, port


def _server_label(ip: str, port: int) -> str:
    return ip if port == 53 else _hostport(ip, port)


class _StopError(Exception):
    """Ends a resolution with ``text`` as its error (a timeout)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def _first_line(exc: BaseException) -> str:
    doc = (type(exc).__doc__ or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else type(exc).__name__


def _describe_server_error(server: str | None, err: object) -> str:
    label = server or "?"
    if label.startswith("Do53:") and "@" in label:
        addr, _, port = label[len("Do53:") :].rpartition("@")
        label = _server_label(addr, int(port)) if port.isdigit() else addr
    if isinstance(err, str):
        return f"{label} answered {err}"
    if isinstance(err, dns.exception.Timeout):
        return f"{label} did not answer"
    if isinstance(err, OSError):
        return f"{label}: {(err.strerror or type(err).__name__).lower()}"
    if isinstance(err, BaseException):
        return f"{label}: {_first_line(err)}"
    return f"{label}: {err}"


@dataclass(frozen=True)
class _Srv:
    """One SRV record and its target's addresses."""

    record: SrvRecord
    ips: tuple[str, ...]


@dataclass(frozen=True)
class _Plan:
    """What a resolution found, before the weighted draw: SRV groups (via, records) or plain targets."""

    groups: tuple[tuple[str, tuple[_Srv, ...]], ...]
    plain: tuple[Target, ...]


HOSTS_FILE = "/etc/hosts"
HOSTS_TTL = 300.0  # how long an answer from the hosts file is used
_hosts_cache: tuple[float, dict[str, tuple[str, ...]]] | None = None
_hosts_lock = threading.Lock()


def hosts_file(path: str = HOSTS_FILE) -> dict[str, tuple[str, ...]]:
    """The hosts file's names (lower case) and their addresses, re-read when the file changes."""
    global _hosts_cache
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return {}
    with _hosts_lock:
        if _hosts_cache is not None and _hosts_cache[0] == mtime:
            return _hosts_cache[1]
    table: dict[str, list[str]] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            ip = str(ipaddress.ip_address(fields[0].split("%", 1)[0]))
        except ValueError:
            continue
        for name in fields[1:]:
            table.setdefault(name.lower().rstrip("."), []).append(ip)
    result = {k: tuple(dict.fromkeys(v)) for k, v in table.items()}
    with _hosts_lock:
        _hosts_cache = (mtime, result)
    return result


class _Lookup:
    """One resolution's queries: a dnspython resolver, the smallest TTL seen, the non-timeout errors."""

    def __init__(
        self,
        resolver: dns.resolver.Resolver,
        servers: Sequence[tuple[str, int]],
        timeout: float,
        hosts: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.resolver = resolver
        self.servers = servers
        self.timeout = timeout
        self.hosts = hosts  # the hosts file, consulted first (the system resolver's "files dns")
        self.min_ttl: float | None = None
        self.errors: list[str] = []

    def query(self, qname: str, rdtype: dns.rdatatype.RdataType) -> list[object]:
        """The answer's records; [] for NXDOMAIN, no answer or a failure (noted); raises _StopError on a timeout."""
        what = f"{qname} ({dns.rdatatype.to_text(rdtype)})"
        try:
            answer = self.resolver.resolve(dns.name.from_text(qname), rdtype, lifetime=self.timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.Timeout:
            servers = ", ".join(_server_label(ip, port) for ip, port in self.servers)
            raise _StopError(f"DNS: no answer from {servers} within {self.timeout} s for {what}") from None
        except dns.resolver.NoNameservers as e:
            errors = e.kwargs.get("errors") or []
            texts = list(dict.fromkeys(_describe_server_error(err[0], err[3]) for err in errors))
            self.errors.append(f"DNS: {'; '.join(texts) or 'no nameserver answered'} for {what}")
            return []
        except dns.exception.DNSException as e:
            self.errors.append(f"DNS: {_first_line(e)} for {what}")
            return []
        except OSError as e:
            self.errors.append(f"DNS: {(e.strerror or type(e).__name__).lower()} for {what}")
            return []
        ttl = float(answer.chaining_result.minimum_ttl)
        self.min_ttl = ttl if self.min_ttl is None else min(self.min_ttl, ttl)
        return list(answer.rrset or [])

    def addresses(self, name: str) -> tuple[tuple[str, ...], str]:
        """``name``'s IPv4 addresses, or its IPv6 ones when it has none; and which record type gave them."""
        listed = self.hosts.get(name.lower()) if self.hosts is not None else None
        if listed:
            v4 = tuple(ip for ip in listed if ":" not in ip)
            self.min_ttl = HOSTS_TTL if self.min_ttl is None else min(self.min_ttl, HOSTS_TTL)
            return (v4 or listed), "hosts"
        for rdtype, via in ((dns.rdatatype.A, "A"), (dns.rdatatype.AAAA, "AAAA")):
            ips = tuple(dict.fromkeys(str(getattr(r, "address", "")) for r in self.query(name, rdtype)))
            ips = tuple(ip for ip in ips if ip)
            if ips:
                return ips, via
        return (), ""

    def srv(self, name: str) -> tuple[_Srv, ...] | None:
        """The SRV records at ``name`` with their targets' addresses; None when there are none."""
        records = [
            SrvRecord(int(r.priority), int(r.weight), int(r.port), r.target.to_text(omit_final_dot=True).lower())
            for r in self.query(name, dns.rdatatype.SRV)
            if isinstance(r, dns.rdtypes.IN.SRV.SRV)
        ]
        if not records:
            return None
        found: list[_Srv] = []
        resolved: dict[str, tuple[str, ...]] = {}
        for rec in records:
            if rec.target in ("", "."):  # RFC 2782: "." means the service is decidedly not available
                continue
            if rec.target not in resolved:
                resolved[rec.target] = self.addresses(rec.target)[0]
            if resolved[rec.target]:
                found.append(_Srv(rec, resolved[rec.target]))
        if not found:
            targets = ", ".join(dict.fromkeys(r.target for r in records))
            if all(r.target in ("", ".") for r in records):
                self.errors.append(f"DNS: {name} says the service is not available (SRV target '.')")
            else:
                self.errors.append(f"DNS: no A or AAAA record for the SRV targets of {name} ({targets})")
        return tuple(found)

    def naptr_srv_names(self, host: str, transport: str) -> list[str]:
        """SRV names the host's NAPTR records give for ``transport`` (flag ``s``), in (order, preference) order."""
        service = NAPTR_SERVICES[transport].lower()
        matching = sorted(
            (
                (int(r.order), int(r.preference), r.replacement.to_text(omit_final_dot=True).lower())
                for r in self.query(host, dns.rdatatype.NAPTR)
                if isinstance(r, dns.rdtypes.IN.NAPTR.NAPTR)
                and r.flags.decode(errors="replace").lower() == "s"
                and r.service.decode(errors="replace").lower() == service
                and r.replacement != dns.name.root
            ),
            key=lambda m: (m[0], m[1]),
        )
        return list(dict.fromkeys(name for _, _, name in matching))


def _targets(plan: _Plan, transport: str, rng: random.Random) -> tuple[Target, ...]:
    out: list[Target] = list(plan.plain)
    for via, srvs in plan.groups:
        ips = {s.record: s.ips for s in srvs}
        for rec in order_srv(ips, rng):
            out.extend(Target(rec.target, ip, rec.port, transport, rec.priority, rec.weight, via) for ip in ips[rec])
    seen: set[tuple[str, int]] = set()
    unique: list[Target] = []
    for t in out:
        if (t.ip, t.port) not in seen:
            seen.add((t.ip, t.port))
            unique.append(t)
    return tuple(unique)


class Resolver:
    """RFC 3263 resolution of SIP hosts with a cache; see the module's rules."""

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        negative_ttl: float = 5.0,
    ) -> None:
        """``nameservers``: ``"IP"`` / ``"IP:port"`` / ``"[IPv6]:port"`` (ValueError otherwise); None or empty:
        the system's (/etc/resolv.conf, read on each lookup). ``timeout``: seconds per DNS query."""
        self._servers = tuple(parse_nameserver(s) for s in nameservers or ())
        self.timeout = timeout
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self.negative_ttl = negative_ttl
        self._cache: dict[tuple[str, int | None, str], tuple[float, _Plan | None, str | None]] = {}
        self._lock = threading.Lock()

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def resolve(self, host: str, port: int | None, transport: str) -> Resolution:
        """``host`` (a SIP URI's host, with ``port`` if the URI has one) as targets for ``transport``."""
        try:
            return self._resolve(host, port, transport)
        except Exception as e:  # never raise into the caller's thread
            return Resolution(host, (), f"DNS: internal error ({type(e).__name__})", self._clock(), False)

    def _resolve(self, host: str, port: int | None, transport: str) -> Resolution:
        now = self._clock()
        transport = transport.strip().upper()
        name = host.strip().strip("[]").rstrip(".").lower()
        if transport not in TRANSPORTS:
            return Resolution(name, (), f"DNS: unknown transport {transport!r} (UDP, TCP or TLS)", now, False)
        if port is not None and not 1 <= port <= 65535:
            return Resolution(name, (), f"DNS: port {port} out of range 1-65535", now, False)
        try:
            ip = str(ipaddress.ip_address(name))
        except ValueError:
            pass
        else:
            target = Target(ip, ip, port or DEFAULT_PORTS[transport], transport, 0, 0, "literal")
            return Resolution(name, (target,), None, now + 86400.0, False)
        if not name:
            return Resolution(name, (), "DNS: empty host name", now, False)

        key = (name, port, transport)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now < hit[0]:
            expires_at, plan, error = hit
            targets = () if plan is None else _targets(plan, transport, self._rng)
            return Resolution(name, targets, error, expires_at, True)

        plan, error, ttl = self._lookup(name, port, transport)
        targets = () if plan is None else _targets(plan, transport, self._rng)
        if not targets and error is None:
            error = f"DNS: no SRV or A record for {name}"
        done = self._clock()
        expires_at = done + (self.negative_ttl if error is not None or ttl is None else ttl)
        with self._lock:
            if len(self._cache) >= _MAX_CACHE:
                for k in [k for k, v in self._cache.items() if v[0] <= done]:
                    del self._cache[k]
            self._cache[key] = (expires_at, plan if error is None else None, error)
        return Resolution(name, targets if error is None else (), error, expires_at, False)

    def _dns_resolver(self) -> tuple[dns.resolver.Resolver, tuple[tuple[str, int], ...]]:
        servers = self._servers
        if not servers:
            system = dns.resolver.Resolver(configure=True)
            listed: list[tuple[str, int]] = []
            for ns in system.nameservers:
                if isinstance(ns, str):
                    listed.append((ns, system.nameserver_ports.get(ns, system.port)))
                elif isinstance(ns, dns.nameserver.Do53Nameserver):
                    listed.append((ns.address, ns.port))
            if not listed:
                raise ValueError("no nameserver in /etc/resolv.conf")
            servers = tuple(listed)
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
        r.lifetime = self.timeout
        r.timeout = self.timeout / max(2, len(servers))  # so one lost datagram is asked again within the lifetime
        r.retry_servfail = False
        return r, servers

    def _lookup(self, name: str, port: int | None, transport: str) -> tuple[_Plan | None, str | None, float | None]:
        """(what was found, the error, the smallest TTL of the answers used)."""
        try:
            dns.name.from_text(name)
        except dns.exception.DNSException:
            return None, f"DNS: {name!r} is not a valid host name", None
        try:
            resolver, servers = self._dns_resolver()
        except dns.exception.DNSException as e:
            return None, f"DNS: no resolver configuration ({_first_line(e)})", None
        except (OSError, ValueError) as e:
            return None, f"DNS: no resolver configuration ({e})", None
        q = _Lookup(resolver, servers, self.timeout, hosts_file() if not self._servers else None)
        try:
            plan = self._find(q, name, port, transport)
        except _StopError as stop:
            return None, stop.text, None
        if plan is None:
            return None, q.errors[-1] if q.errors else None, None
        return plan, None, q.min_ttl

    @staticmethod
    def _find(q: _Lookup, name: str, port: int | None, transport: str) -> _Plan | None:
        if port is None:
            groups: list[tuple[str, tuple[_Srv, ...]]] = []
            had_srv = False  # SRV records exist, even if no target of theirs resolves: no A fallback
            names = [(f"NAPTR+SRV {n}", n) for n in q.naptr_srv_names(name, transport)]
            for via, srv_name in names:
                found = q.srv(srv_name)
                had_srv = had_srv or found is not None
                if found:
                    groups.append((via, found))
            default = f"{SRV_PREFIXES[transport]}.{name}"
            if not had_srv and default not in {n for _, n in names}:
                found = q.srv(default)
                had_srv = found is not None
                if found:
                    groups.append((f"SRV {default}", found))
            if groups:
                return _Plan(tuple(groups), ())
            if had_srv:
                return None
        ips, via = q.addresses(name)
        if not ips:
            if port is not None and not q.errors:
                q.errors.append(f"DNS: no A or AAAA record for {name}")
            return None
        p = port or DEFAULT_PORTS[transport]
        return _Plan((), tuple(Target(name, ip, p, transport, 0, 0, via) for ip in ips))
