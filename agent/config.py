"""Configuration: a YAML, TOML or JSON file (chosen by extension), overridden by
``UAC_AGENT_*`` environment variables (``__`` for nesting).

Connection objects use the seed's field names (``external_uac_settings``,
``internal_uac_settings``), so a payload from the product docs can be pasted in.
Errors are reported as :class:`ConfigError` with one line per problem naming the
field; secrets are never echoed.
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from agent.addresses import is_wildcard
from agent.core.policy import PolicySettings
from agent.worker.stack import LIMITS

__all__ = [
    "AgentSettings",
    "ApiKeySettings",
    "ClientSettings",
    "ConfigError",
    "Connection",
    "EdgeSettings",
    "ExternalUacSettings",
    "InternalUacSettings",
    "RegistrationKnobs",
    "StoreSettings",
    "WorkerSettings",
    "check_id",
    "load_client_settings",
    "load_settings",
    "parse_sip_uri",
    "read_secret_file",
    "shown_input",
]

# The SIP stack's per-process limits are facts of the stack (agent/worker/stack.py): one
# worker holds LIMITS.connections (7) registering connections.

# Loopback ports the edge itself uses from edge.loopback_port on (agent/edge/layout.py).
EDGE_OWN_PORTS = 10

_SECRET_FIELDS = {"password", "api_key"}
_USERPART = r"[A-Za-z0-9._~!$&'()*+,;=%-]+"
_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
_URI_RE = re.compile(
    rf"^(?P<scheme>sips?):(?:(?P<user>{_USERPART})@)?(?P<host>{_HOST})(?::(?P<port>\d{{1,5}}))?"
    r"(?P<params>(?:;[A-Za-z0-9._~!$&'()*+=%-]+(?:=[A-Za-z0-9._~!$&'()*+%:-]*)?)*)$"
)
_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_ID_RULE = "must be 1-64 characters of letters, digits, '.', '_' or '-'"


def check_id(value: str) -> str:
    """A connection_id or user_id: ValueError naming the rule otherwise (the one place it is checked)."""
    if not _ID_RE.match(value):
        raise ValueError(_ID_RULE)
    return value


def read_secret_file(path: Path, what: str, strip_all: bool = True) -> SecretStr:
    """A secret kept in a file (``*_file`` settings): its text without the final newline (``strip_all``:
    without surrounding whitespace); ValueError naming the setting when it cannot be read."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{what}_file {path} cannot be read: {e.strerror}") from None
    return SecretStr(text.strip() if strip_all else text.rstrip("\r\n"))


_NAMED = re.compile(r"^(?:connections|[a-z_]+\.[a-z_.]+): ")
_USER_RE = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=?/%-]{1,128}$")


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_sip_uri(value: str) -> dict[str, str]:
    """Split a ``sip:``/``sips:`` URI; raise ValueError naming what is wrong."""
    m = _URI_RE.match(value.strip())
    if not m:
        raise ValueError("must be a SIP URI such as sip:pbx.example.com:5060")
    parts = {k: v for k, v in m.groupdict().items() if v}
    if "port" in parts and not 1 <= int(parts["port"]) <= 65535:
        raise ValueError("port must be 1-65535")
    return parts


def _normalise_uri(value: str, *, allow_user: bool) -> str:
    v = value.strip()
    if not v.lower().startswith(("sip:", "sips:")):
        v = "sip:" + v
    parts = parse_sip_uri(v)
    if not allow_user and "user" in parts:
        raise ValueError("must address a server, without a user part (sip:host[:port])")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class RegistrationKnobs(_Strict):
    """The registration policy's knobs; every one can be set per connection."""

    initial_delay_max_sec: Annotated[float, Field(ge=0, le=3600)] | None = None
    refresh_margin_sec: Annotated[float, Field(ge=1, le=3600)] | None = None
    retry_base_sec: Annotated[float, Field(gt=0, le=3600)] | None = None
    retry_max_sec: Annotated[float, Field(gt=0, le=86400)] | None = None
    forbidden_retry_interval: Annotated[float, Field(ge=1, le=86400)] | None = None
    register_timeout_sec: Annotated[float, Field(ge=5, le=300)] | None = None
    # OPTIONS to the registrar (or outbound proxy) this often; 0 turns it off (agent/core/liveness.py).
    keepalive_interval_sec: Annotated[float, Field(ge=0, le=3600)] | None = None
    # Keepalive windows without an answer, in a row, before the registrar counts as unreachable.
    keepalive_misses: Annotated[int, Field(ge=1, le=100)] | None = None

    @field_validator("keepalive_interval_sec")
    @classmethod
    def _ka(cls, v: float | None) -> float | None:
        if v is not None and 0 < v < 5:
            raise ValueError("must be 0 (off) or at least 5 seconds")
        return v

    def merged(self, base: RegistrationKnobs) -> RegistrationKnobs:
        data = base.model_dump()
        data.update({k: v for k, v in self.model_dump().items() if v is not None})
        return RegistrationKnobs(**data)


DEFAULT_KNOBS = RegistrationKnobs(
    initial_delay_max_sec=2.0,
    refresh_margin_sec=30.0,
    retry_base_sec=30.0,
    retry_max_sec=1800.0,
    forbidden_retry_interval=300.0,
    register_timeout_sec=40.0,
    keepalive_interval_sec=30.0,
    keepalive_misses=2,
)


class ExternalUacSettings(_Strict):
    """Seed 000/002: how the agent registers to the PBX."""

    proxy: str
    outbound_proxy: str | None = None
    transport: Literal["UDP", "TCP", "TLS"] = "UDP"
    username: str
    auth_username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    from_user: str | None = None
    expiration_sec: Annotated[int, Field(ge=10, le=86400)] = 3600

    @field_validator("transport", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("proxy", "outbound_proxy")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        return None if v is None or v == "" else _normalise_uri(v, allow_user=False)

    @field_validator("username", "auth_username", "from_user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not _USER_RE.match(v):
            raise ValueError("must be 1-128 characters allowed in a SIP user part (no spaces, '@' or ':')")
        return v

    @model_validator(mode="after")
    def _password(self) -> ExternalUacSettings:
        self.password = _read_key(self.password, self.password_file, "password", strip_all=False)
        if self.password is None:
            raise ValueError("password (or password_file) is required")
        return self

    @property
    def effective_auth_username(self) -> str:
        return self.auth_username or self.username

    @property
    def effective_from_user(self) -> str:
        return self.from_user or self.username


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class InternalUacSettings(_Strict):
    """Seed 000: where the PBX's calls go (``<extension>@<application FQDN>``), and how.

    ``forward_mode``: ``bridge`` (a B2BUA: a second call leg to the destination,
    audio and DTMF relayed) or ``redirect`` (302 with the destination as Contact).
    ``allowed_sources``: CIDRs allowed to place calls besides the addresses the
    connection's proxy and outbound_proxy resolve to. ``max_calls``: concurrent
    forwarded calls for this connection (the agent-wide ``sip.max_calls`` also
    applies). ``ring_timeout_sec``: an unanswered leg B is ended after this long
    and the PBX gets 480.
    """

    destination_uri: str | None = None
    forward_mode: Literal["bridge", "redirect"] = "bridge"
    allowed_sources: list[Network] = Field(default_factory=list)
    ring_timeout_sec: Annotated[int, Field(ge=1, le=600)] = 60
    max_calls: Annotated[int, Field(ge=1, le=100_000)] | None = None

    @field_validator("destination_uri")
    @classmethod
    def _dest(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        _normalise_uri(v, allow_user=True)
        return v

    @field_validator("forward_mode", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("allowed_sources", mode="before")
    @classmethod
    def _cidrs(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [p for p in re.split(r"[,\s]+", v) if p]
        if isinstance(v, list):
            out = []
            for item in v:
                try:
                    out.append(ipaddress.ip_network(str(item).strip(), strict=False))
                except ValueError:
                    raise ValueError(f"{item!r} is not an IP address or CIDR such as 192.0.2.0/24") from None
            return out
        return v

    @property
    def destination_sip_uri(self) -> str | None:
        """``destination_uri`` with ``sip:`` added when it was given without a scheme."""
        return None if self.destination_uri is None else _normalise_uri(self.destination_uri, allow_user=True)


class Connection(_Strict):
    connection_id: str
    user_id: str
    connection_name: str = ""
    active: bool = True
    external_uac_settings: ExternalUacSettings | None = None
    internal_uac_settings: InternalUacSettings = Field(default_factory=InternalUacSettings)
    registration: RegistrationKnobs = Field(default_factory=RegistrationKnobs)

    @field_validator("connection_id", "user_id", mode="before")
    @classmethod
    def _id(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str):
            check_id(v)
        return v

    @property
    def pair_state(self) -> str:
        ext = self.external_uac_settings
        if self.active and ext is not None and ext.proxy and self.internal_uac_settings.destination_uri:
            return "ACTIVE"
        return "INACTIVE"

    @property
    def registers(self) -> bool:
        """Whether the agent keeps a registration for this connection."""
        return self.active and self.external_uac_settings is not None


class SipSettings(_Strict):
    """The SIP edge's public side (docs/edge.md): UDP and TCP on ``port``, TLS on ``tls_port``, all on
    ``bind``; the media relay's ports; what peers are told; DNS. Workers use loopback ports only
    (``edge.loopback_port``)."""

    bind: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 5070
    # The edge's TLS port (PBXs opening TLS connections to the Contact): open only with
    # tls_cert_file and tls_key_file; default port + 1.
    tls_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    tls_ca_file: Path | None = None
    tls_verify_server: bool = True
    # The agent's certificate and key for TLS connections a PBX opens to the Contact.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    user_agent: str = "uac-agent"
    trace: bool = False  # log every SIP message, Authorization values redacted
    stack_log_level: Annotated[int, Field(ge=0, le=6)] = 2
    # Media of bridged calls, relayed by the edge (rtpengine): bound to rtp_address (default:
    # bind) on ports rtp_port .. rtp_port + rtp_port_range - 1 (about four per call).
    rtp_address: str | None = None
    rtp_port: Annotated[int, Field(ge=1024, le=65000)] = 40000
    rtp_port_range: Annotated[int, Field(ge=8, le=25000)] = 10000
    # Concurrent forwarded calls for the whole agent (each connection's max_calls also applies).
    max_calls: Annotated[int, Field(ge=1, le=100_000)] = 1000
    # What a call over a limit gets: 486 Busy Here, or 503 with Retry-After.
    over_limit_response: Literal[486, 503] = 486
    over_limit_retry_after_sec: Annotated[int, Field(ge=1, le=3600)] = 5
    # Accepted for older configs and ignored: the registrar keepalives (OPTIONS every
    # registration.keepalive_interval_sec through the edge) keep a NAT binding open.
    udp_keepalive_sec: Annotated[int, Field(ge=0, le=3600)] = 0
    # NAT and containers (agent/addresses.py): the address peers are told (Contact,
    # Via, Record-Route, SDP) while the sockets stay bound to `bind`; media defaults to the
    # signaling one. Peers in local_nets are told the local address instead.
    external_signaling_address: str | None = None
    external_media_address: str | None = None
    local_nets: list[Network] = Field(default_factory=list)
    # DNS servers for proxy/outbound_proxy/destination host names ("IP" or "IP:port");
    # empty: the system's (/etc/resolv.conf). Looked up by the supervisor, never on a
    # SIP thread (agent/dns.py, docs/dns.md).
    nameservers: list[str] = Field(default_factory=list)
    dns_timeout_sec: Annotated[float, Field(gt=0, le=30)] = 2.0

    @property
    def effective_tls_port(self) -> int:
        return self.tls_port or self.port + 1

    @property
    def tls_server(self) -> bool:
        """Whether the edge listens for TLS (a certificate and key are configured)."""
        return self.tls_cert_file is not None and self.tls_key_file is not None

    @field_validator("nameservers", mode="before")
    @classmethod
    def _ns_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("nameservers")
    @classmethod
    def _ns(cls, v: list[str]) -> list[str]:
        from agent.dns import parse_nameserver

        for item in v:
            try:
                parse_nameserver(item)
            except ValueError:
                raise ValueError(f"{item!r} must be IP or IP:port, e.g. 127.0.0.1:5353 or [::1]:53") from None
        return v

    @field_validator("external_signaling_address", "external_media_address")
    @classmethod
    def _external(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        try:
            ip = ipaddress.ip_address(v.strip("[]"))
        except ValueError:
            if not re.fullmatch(_HOST, v) or v.replace(".", "").isdigit():
                raise ValueError("must be a host name or an IP address, e.g. 203.0.113.10 or sip.example.com") from None
            return v
        if ip.is_unspecified:
            raise ValueError("must be an address peers can reach, not 0.0.0.0 or ::")
        return str(ip)

    @field_validator("local_nets", mode="before")
    @classmethod
    def _nets(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("bind", "rtp_address")
    @classmethod
    def _bind(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError("must be an IP address of this host, e.g. 127.0.0.1 or 0.0.0.0") from None
        return v

    @property
    def effective_rtp_address(self) -> str:
        return self.rtp_address or self.bind

    @property
    def tls_ca_missing(self) -> bool:
        """TLS registrations would verify the PBX's certificate with no CA to verify it against
        (the one place this rule lives: the config, reloads and the API all ask it)."""
        return self.tls_ca_file is None and self.tls_verify_server

    @field_validator("tls_ca_file", "tls_cert_file", "tls_key_file")
    @classmethod
    def _ca(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"{v} is not a readable file")
        return v

    @model_validator(mode="after")
    def _cert_pair(self) -> SipSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("sip.tls_cert_file and sip.tls_key_file go together: set both or neither")
        return self


def _read_key(value: SecretStr | None, path: Path | None, what: str, strip_all: bool = True) -> SecretStr | None:
    """``what`` given inline or in a file (never both)."""
    if value is not None and path is not None:
        raise ValueError(f"set either {what} or {what}_file, not both")
    if path is not None:
        return read_secret_file(path, what, strip_all)
    return value


MIN_KEY_CHARS = 16  # every Bearer key, the operator's and each user's


def _required_key(value: SecretStr | None, path: Path | None) -> SecretStr:
    key = _read_key(value, path, "api_key")
    if key is None or len(key.get_secret_value()) < MIN_KEY_CHARS:
        raise ValueError(f"api_key (or api_key_file) is required and must be at least {MIN_KEY_CHARS} characters")
    return key


class ApiKeySettings(_Strict):
    """A Bearer key that acts for one user: it sees and changes only that user's connections."""

    user_id: str
    api_key: SecretStr | None = None
    api_key_file: Path | None = None

    @field_validator("user_id", mode="before")
    @classmethod
    def _uid(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str):
            check_id(v)
        return v

    @model_validator(mode="after")
    def _key(self) -> ApiKeySettings:
        self.api_key = _required_key(self.api_key, self.api_key_file)
        return self


class HttpSettings(_Strict):
    listen: str = "127.0.0.1:8080"
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    # Keys that act for one user each (the UAC Connections API); api_key acts for every user.
    api_keys: list[ApiKeySettings] = Field(default_factory=list)
    # Owner of connections created with api_key when the request names no user_id.
    default_user_id: str = "default"
    # Connections served at once (lowered at start-up if the open-file limit is too low for it).
    max_connections: Annotated[int, Field(ge=16, le=100_000)] = 512
    # A request must be complete (line, headers, body) this long after its first byte: else 408.
    request_timeout_sec: Annotated[float, Field(gt=0, le=120)] = 10.0

    @field_validator("default_user_id")
    @classmethod
    def _default_uid(cls, v: str) -> str:
        check_id(v)
        return v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080")
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ValueError("host must be an IP address, e.g. 127.0.0.1:8080") from None
        return v

    @model_validator(mode="after")
    def _key(self) -> HttpSettings:
        self.api_key = _required_key(self.api_key, self.api_key_file)
        return self

    @model_validator(mode="after")
    def _user_keys(self) -> HttpSettings:
        seen = {self.api_key.get_secret_value()} if self.api_key is not None else set()
        for k in self.api_keys:
            assert k.api_key is not None
            if k.api_key.get_secret_value() in seen:
                raise ValueError(f"api_keys: the key of user_id {k.user_id} is used twice (or equals api_key)")
            seen.add(k.api_key.get_secret_value())
        return self

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class CaptureSettings(_Strict):
    """Copies of the calls' SIP messages for a Homer collector (docs/edge.md#capture)."""

    # "IP:PORT" of a HEP3 collector (UDP); None: off. Every SIP message of both legs of
    # every admitted call (TLS legs in clear), and rtpengine's RTCP statistics.
    hep_address: str | None = None
    # The HEP capture id this agent's packets carry (tells agents apart at the collector).
    hep_id: Annotated[int, Field(ge=1, le=2**31 - 1)] = 2001

    @field_validator("hep_address")
    @classmethod
    def _hep_address(cls, v: str | None) -> str | None:
        if v is None:
            return None
        host, sep, port = v.strip().rpartition(":")
        host = host.strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{v!r} must be IP:PORT, e.g. 192.0.2.20:9060") from None
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{v!r} must be IP:PORT with a port 1-65535, e.g. 192.0.2.20:9060")
        return f"{host}:{int(port)}" if ":" not in host else f"[{host}]:{int(port)}"

    @property
    def hep(self) -> tuple[str, int] | None:
        if self.hep_address is None:
            return None
        host, _, port = self.hep_address.rpartition(":")
        return host.strip("[]"), int(port)


class StoreSettings(_Strict):
    """Where connections created or changed through the API are kept (SQLite)."""

    # A file path, or ":memory:" to keep nothing across restarts. Default:
    # connections.db in $STATE_DIRECTORY (systemd's StateDirectory=, also set in
    # the Docker image), else beside the config file, else the working directory.
    path: str | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError('must be a file path or ":memory:"')
        return v


class WorkerSettings(_Strict):
    """The worker processes that hold the connections (see docs/workers.md)."""

    # Registering connections this agent holds at most (config file and API together).
    max_connections: Annotated[int, Field(ge=1, le=100_000)] = 1000
    # Connections per worker process (the stack holds 7 per process). 7 packs the
    # most per process (memory); fewer isolates each connection more from a crash
    # (docs/workers.md has the measurements). Calls never touch a worker.
    connections_per_worker: Annotated[int, Field(ge=1, le=LIMITS.connections)] = LIMITS.connections
    # Worker processes at most (default: enough for max_connections). Worker k
    # uses the loopback port edge.loopback_port + 10 + k.
    max_workers: Annotated[int, Field(ge=1, le=10_000)] | None = None
    # A worker whose SIP thread answers no ping for this long is killed and replaced.
    heartbeat_timeout_sec: Annotated[float, Field(ge=2, le=300)] = 30.0
    # A worker that keeps dying is restarted after 1 s, 2 s, 4 s ... up to this.
    restart_delay_max_sec: Annotated[float, Field(ge=1, le=3600)] = 60.0

    @property
    def effective_max_workers(self) -> int:
        if self.max_workers is not None:
            return self.max_workers
        return math.ceil(self.max_connections / self.connections_per_worker)

    @model_validator(mode="after")
    def _enough(self) -> WorkerSettings:
        if self.max_workers is None:
            return self
        room = self.max_workers * self.connections_per_worker
        if "max_connections" not in self.model_fields_set:
            self.max_connections = min(self.max_connections, room)  # as many as the workers hold
        elif room < self.max_connections:
            raise ValueError(
                f"max_workers ({self.max_workers}) x connections_per_worker ({self.connections_per_worker}) "
                f"cannot hold max_connections ({self.max_connections}): raise max_workers or leave it unset"
            )
        return self


# The longest path of the edge's control sockets ("<runtime_dir>/supervisor-rpc.sock") must fit
# a UNIX socket address (107 characters).
MAX_RUNTIME_DIR_CHARS = 107 - len("/supervisor-rpc.sock")


class EdgeSettings(_Strict):
    """The SIP edge the supervisor runs beside its workers (docs/edge.md): Kamailio routes the
    signalling, rtpengine relays the media, HAProxy carries TCP and TLS. Loopback ports from
    ``loopback_port`` on: the edge's own (``loopback_port`` .. ``+ 9``), then worker k's SIP port
    (``+ 10 + k``), then the TLS targets' (``tls_targets`` of them). No admin opens any of them."""

    loopback_port: Annotated[int, Field(ge=1024, le=65000)] = 25060
    # Distinct TLS PBX addresses (host, address, port) the edge can dial at once.
    tls_targets: Annotated[int, Field(ge=1, le=10_000)] = 256
    # Where the edge's configs, control sockets and state live: $RUNTIME_DIRECTORY (systemd's
    # RuntimeDirectory=), else a private directory made under the system's temporary one.
    runtime_dir: Path | None = None
    # Kamailio's SIP worker processes (for UDP and for TCP each) and its shared memory.
    sip_processes: Annotated[int, Field(ge=1, le=64)] = 4
    shm_mib: Annotated[int, Field(ge=32, le=8192)] = 128
    # rtpengine refuses new calls (the PBX gets 503 with Retry-After) while the host's CPU use
    # (all cores, from /proc/stat, as rtpengine's --max-cpu measures it) is over this, before
    # it falls behind and drops packets.
    media_max_cpu_percent: Annotated[float, Field(gt=0, le=100)] = 90.0
    # The edge pings each distinct destination with OPTIONS this often (any answer counts; two
    # unanswered in a row, each waited for 4 s, make it unreachable); 0: no pings.
    destination_ping_sec: Annotated[int, Field(ge=0, le=3600)] = 10

    @field_validator("runtime_dir")
    @classmethod
    def _fits_a_socket_path(cls, v: Path | None) -> Path | None:
        if v is not None and len(str(v)) > MAX_RUNTIME_DIR_CHARS:
            raise ValueError(
                f"is {len(str(v))} characters; the edge's control sockets live there and a UNIX "
                f"socket path holds 107, so at most {MAX_RUNTIME_DIR_CHARS}"
            )
        return v


class LogSettings(_Strict):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("uac_agent_config_file", default=None)


class _FileSource(PydanticBaseSettingsSource):
    """The config file, parsed by its extension."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        if path is None:
            return {}
        return read_config_file(path)


class _FileAndEnvironment(BaseSettings):
    """Settings read from ``UAC_AGENT_*`` variables over the config file (the environment wins)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls))


class AgentSettings(_FileAndEnvironment):
    model_config = SettingsConfigDict(
        env_prefix="UAC_AGENT_",
        env_nested_delimiter="__",
        extra="forbid",
        nested_model_default_partial_update=True,
    )

    sip: SipSettings = Field(default_factory=SipSettings)
    http: HttpSettings
    log: LogSettings = Field(default_factory=LogSettings)
    defaults: RegistrationKnobs = Field(default_factory=RegistrationKnobs)
    shutdown_timeout_sec: Annotated[float, Field(gt=0, le=60)] = 5.0
    connections: list[Connection] = Field(default_factory=list)
    store: StoreSettings = Field(default_factory=StoreSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    edge: EdgeSettings = Field(default_factory=EdgeSettings)
    capture: CaptureSettings = Field(default_factory=CaptureSettings)
    _config_path: Path | None = PrivateAttr(default=None)

    # -- ports (docs/edge.md) ----------------------------------------------------

    @property
    def max_workers(self) -> int:
        return self.workers.effective_max_workers

    def worker_sip_port(self, k: int) -> int:
        """Worker k's loopback SIP port (UDP, on 127.0.0.1): only the edge talks to it."""
        return self.edge.loopback_port + EDGE_OWN_PORTS + k

    @property
    def tls_target_ports(self) -> tuple[int, int]:
        """(first, count) of the loopback ports the edge dials TLS PBXs through."""
        return self.edge.loopback_port + EDGE_OWN_PORTS + self.max_workers, self.edge.tls_targets

    @property
    def config_path(self) -> Path | None:
        """The file these settings were read from (None: environment only)."""
        return self._config_path

    @model_validator(mode="after")
    def _ports(self) -> AgentSettings:
        sip, first = self.sip, self.edge.loopback_port
        tls_first, tls_count = self.tls_target_ports
        last = tls_first + tls_count - 1
        if last > 65535:
            raise ValueError(
                f"edge.loopback_port: the loopback ports {first}-{last} (the edge's {EDGE_OWN_PORTS}, "
                f"{self.max_workers} workers (workers.max_workers), {tls_count} TLS targets (edge.tls_targets)) "
                "pass 65535: lower edge.loopback_port"
            )
        public = {"sip.port": sip.port}
        if sip.tls_server:
            public["sip.tls_port"] = sip.effective_tls_port
        if sip.tls_server and sip.effective_tls_port == sip.port:
            raise ValueError(f"sip.tls_port: {sip.port} is sip.port already: choose another port for TLS")
        for name, port in public.items():
            if first <= port <= last:
                raise ValueError(
                    f"{name}: {port} is one of the edge's loopback ports {first}-{last}: move edge.loopback_port"
                )
        rtp_first, rtp_last = sip.rtp_port, sip.rtp_port + sip.rtp_port_range - 1
        if rtp_last > 65535:
            raise ValueError(f"sip.rtp_port_range: RTP ports {rtp_first}-{rtp_last} pass 65535")
        if rtp_first <= last and first <= rtp_last:
            raise ValueError(
                f"sip.rtp_port: RTP ports {rtp_first}-{rtp_last} overlap the edge's loopback ports {first}-{last}"
            )
        for name, port in public.items():
            if rtp_first <= port <= rtp_last:
                raise ValueError(f"sip.rtp_port: RTP ports {rtp_first}-{rtp_last} include {name} {port}")
        return self

    @model_validator(mode="after")
    def _connections(self) -> AgentSettings:
        registering = [c for c in self.connections if c.registers]
        limit = self.workers.max_connections
        if len(registering) > limit:
            raise ValueError(
                f"connections: {len(registering)} active connections configured, but this agent holds at most {limit} "
                "(workers.max_connections)"
            )
        seen: set[str] = set()
        for c in self.connections:
            if c.connection_id in seen:
                raise ValueError(f"connection_id {c.connection_id!r} is used by more than one connection")
            seen.add(c.connection_id)
        if any(c.external_uac_settings and c.external_uac_settings.transport == "TLS" for c in registering):
            if self.sip.tls_ca_missing:
                raise ValueError("a TLS connection needs sip.tls_ca_file to verify the PBX certificate")
        return self

    def knobs_for(self, conn: Connection) -> RegistrationKnobs:
        return conn.registration.merged(self.defaults.merged(DEFAULT_KNOBS))

    def policy_settings(self, conn: Connection) -> PolicySettings:
        k = self.knobs_for(conn)
        ext = conn.external_uac_settings
        assert k.initial_delay_max_sec is not None and k.refresh_margin_sec is not None
        assert k.retry_base_sec is not None and k.retry_max_sec is not None
        assert k.forbidden_retry_interval is not None and k.register_timeout_sec is not None
        return PolicySettings(
            expiration_sec=ext.expiration_sec if ext else 3600,
            initial_delay_max_sec=k.initial_delay_max_sec,
            refresh_margin_sec=k.refresh_margin_sec,
            retry_base_sec=k.retry_base_sec,
            retry_max_sec=max(k.retry_max_sec, k.retry_base_sec),
            forbidden_retry_interval_sec=k.forbidden_retry_interval,
            register_timeout_sec=k.register_timeout_sec,
            unregister_timeout_sec=self.shutdown_timeout_sec,
            keepalive_interval_sec=k.keepalive_interval_sec or 0.0,
            keepalive_misses=k.keepalive_misses or 2,
        )


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config file: {e.strerror}"]) from None
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError([f"{path}: unknown config format {suffix!r}: use .yaml, .yml, .toml or .json"])
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}:{where}: invalid YAML: {getattr(e, 'problem', None) or e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: invalid TOML: {e}"]) from None
    except json.JSONDecodeError as e:
        raise ConfigError([f"{path}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of settings"])
    return data


def _loc(loc: tuple[int | str, ...], data: dict[str, Any] | None) -> str:
    parts: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            if isinstance(node, list) and item < len(node):
                node = node[item]
                if isinstance(node, dict) and isinstance(node.get("connection_id"), (str, int)):
                    label = f"[{item}](connection_id={node['connection_id']})"
            parts.append(label)
        else:
            if item in ("function-after", "function-before", "function-wrap", "tagged-union"):
                continue
            parts.append(("." if parts else "") + str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "(top level)"


def shown_input(loc: tuple[object, ...], value: object) -> str:
    """`` (got 'x')`` after an error about a plain value, shortened; nothing for a secret field (the
    one place this is decided, for the config's lines and the API's problems alike)."""
    if any(str(p) in _SECRET_FIELDS for p in loc) or not isinstance(value, (str, int, float, bool)):
        return ""
    s = repr(value)
    return f" (got {s if len(s) <= 60 else s[:57] + '...'})"


def format_validation_error(err: ValidationError, data: dict[str, Any] | None) -> list[str]:
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        where = _loc(loc, data)
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling against the config reference)"
        shown = "" if e["type"] == "missing" else shown_input(loc, e.get("input"))
        if where == "(top level)" and _NAMED.match(msg):
            lines.append(f"{msg}{shown}")  # the message names its setting (checks across sections)
            continue
        lines.append(f"{where}: {msg}{shown}")
    return lines


def unknown_env_settings(environ: Mapping[str, str]) -> list[str]:
    """``UAC_AGENT_*`` variables that name no setting (a typo would be ignored otherwise)."""
    problems = []
    for name in sorted(environ):
        if not name.startswith("UAC_AGENT_") or name == "UAC_AGENT_CONFIG":
            continue
        parts = name[len("UAC_AGENT_") :].lower().split("__")
        fields: dict[str, Any] | None = AgentSettings.model_fields
        for part in parts:
            if fields is None or part not in fields:
                problems.append(f"environment variable {name}: unknown setting")
                break
            ann = fields[part].annotation
            fields = ann.model_fields if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return problems


def load_settings(path: Path | None, environ: Mapping[str, str] | None = None) -> AgentSettings:
    """Read ``path`` (may be None: environment only); raise ConfigError on any problem."""
    env_problems = unknown_env_settings(os.environ if environ is None else environ)
    if env_problems:
        raise ConfigError(env_problems)
    settings = _read(AgentSettings, path, environ)
    settings._config_path = path
    return settings


S = TypeVar("S", bound="_FileAndEnvironment")


def _read(cls: type[S], path: Path | None, environ: Mapping[str, str] | None) -> S:
    """``cls`` filled by the file and the environment; ConfigError with one line per problem."""
    data = read_config_file(path) if path is not None else None
    token = _config_file.set(path)
    try:
        return cls()
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, data)) from None
    except SettingsError as e:  # a UAC_AGENT_* value that is not valid JSON where JSON is expected
        raise ConfigError(_env_json_problems(str(e), os.environ if environ is None else environ)) from None
    finally:
        _config_file.reset(token)


class ClientSettings(_FileAndEnvironment):
    """What the commands that talk to a running agent (``status``, ``reload``, ``register``,
    ``unregister``) need: where it listens and the operator key, from the same file and
    environment as ``run``. The rest is not read: an admin may run them without being able to
    read the SIP passwords."""

    model_config = SettingsConfigDict(env_prefix="UAC_AGENT_", env_nested_delimiter="__", extra="ignore")

    http: HttpSettings

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` of the running agent; a wildcard listen address is reached on loopback."""
        host, port = self.http.host_port
        if is_wildcard(host):  # a wildcard listen address is reached on loopback
            host = "::1" if ":" in host else "127.0.0.1"
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def load_client_settings(path: Path | None, environ: Mapping[str, str] | None = None) -> ClientSettings:
    """Read only the ``http`` section of ``path`` and the environment; raise ConfigError on a problem."""
    return _read(ClientSettings, path, environ)


_SETTINGS_FIELD = re.compile(r'field "([a-z_]+)"')


def _env_json_problems(message: str, environ: Mapping[str, str]) -> list[str]:
    """One line per ``UAC_AGENT_*`` variable whose JSON does not parse, naming the variable and
    where the JSON breaks; never its value (it may hold a password)."""
    m = _SETTINGS_FIELD.search(message)
    field = m.group(1).upper() if m else ""
    prefix = f"UAC_AGENT_{field}"
    problems = []
    for name in sorted(environ):
        if not name.upper().startswith(prefix) or name.upper()[len(prefix) :][:2] not in ("", "__"):
            continue
        value = environ[name].strip()
        if not value.startswith(("[", "{")):
            continue
        try:
            json.loads(value)
        except json.JSONDecodeError as e:
            problems.append(f"{name}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    if not problems:
        which = f"{prefix} or {prefix}__*" if field else "a UAC_AGENT_* variable"
        problems.append(f"{which}: a value here must be JSON (a list or a table) and is not")
    return problems
