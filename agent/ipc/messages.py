"""Every value that crosses the boundary between the supervisor and a worker process.

The supervisor (``agent/supervisor``) owns the config, the store, the HTTP
surface and the metrics; each worker (``agent/worker``) owns one pjsua2
Endpoint and up to ``workers.connections_per_worker`` connections. They talk
over one stream socket per worker (``agent/ipc/wire.py`` frames these values).
This module is the whole vocabulary: a reader sees every command and every
event here, and nothing else crosses.

Plain frozen dataclasses of the standard library (no pydantic, no pjsua2), so a
worker imports only what it needs. Payload types from the registration policy
(:class:`~agent.core.policy.PolicySettings`, :class:`~agent.core.policy.PolicySnapshot`)
travel inside them as they are.

Supervisor -> worker (:data:`Command`)
    ``Start`` (first, once), ``Apply``, ``Remove``, ``RegisterNow``,
    ``UnregisterNow``, ``FlowClosed``, ``Ping``, ``Shutdown``.
Worker -> supervisor (:data:`Event`)
    ``Ready`` or ``StartFailed`` (answer to ``Start``), ``Done`` (answer to each
    request), ``StateChanged``, the metric events (``RegisterAnswered``,
    ``FlowLost``, ``Failover``), ``Log``, ``Pong`` and ``Stopped`` (last).

Workers hold registrations only: calls are the edge's (``agent/edge``), whose own
messages are in ``agent/edge/messages.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from agent.core.policy import PolicySettings, PolicySnapshot

__all__ = [
    "AccountSpec",
    "Apply",
    "Command",
    "ConnSpec",
    "Done",
    "ErrorKind",
    "Event",
    "Failover",
    "FlowClosed",
    "FlowLost",
    "Hop",
    "HopTarget",
    "Log",
    "Ping",
    "Pong",
    "Ready",
    "RegisterAnswered",
    "RegisterNow",
    "Remove",
    "Shutdown",
    "StackSettings",
    "Start",
    "StartFailed",
    "StateChanged",
    "Stopped",
    "UnregisterNow",
]

# -- what a worker is given ---------------------------------------------------


@dataclass(frozen=True)
class StackSettings:
    """One worker's SIP stack: UDP on its own loopback port; every request it sends goes
    through the edge first (``edge_route``), which sends it on from its own sockets."""

    bind: str
    port: int
    edge_route: str  # sip:127.0.0.1:PORT;lr
    user_agent: str
    log_level: int
    trace: bool


@dataclass(frozen=True)
class AccountSpec:
    """The pjsua2 account of a registering connection (``password`` never printed)."""

    key: str
    id_uri: str
    registrar_uri: str
    proxies: tuple[str, ...]  # after the edge: the outbound proxy, when there is one
    transport: str  # the connection's transport to the PBX (the edge's; the worker always talks UDP to the edge)
    auth_username: str
    password: str = field(repr=False)
    expires: int
    contact: str  # the whole Contact: the edge's address and port, with ;line=<connection_id>


@dataclass(frozen=True)
class HopTarget:
    """One place a next hop's requests may go (agent/dns.py found it)."""

    uri: str  # where to send: sip:IP:PORT[;transport=tcp|tls]
    label: str  # for status and logs: "pbx1.example.com 192.0.2.10:5060 (SRV _sip._udp.example.com, priority 10)"
    name: str = ""  # the host name it came from: what a TLS PBX's certificate must name


@dataclass(frozen=True)
class Hop:
    """A next hop given by a host name, resolved by the supervisor (never on a SIP thread).

    ``targets`` in failover order; none, with ``error``, when the lookup failed.
    """

    name: str  # the host looked up, e.g. "pbx.example.com"
    targets: tuple[HopTarget, ...]
    error: str | None = None


@dataclass(frozen=True)
class ConnSpec:
    """Everything a worker needs to run one registering connection.

    Only connections that keep a registration live on a worker; the supervisor
    shows the others (inactive, or without ``external_uac_settings``) itself.
    """

    connection_id: str
    account: AccountSpec
    policy: PolicySettings
    # Register at once instead of after the start-up stagger (added at runtime, or a worker restart).
    register_at_once: bool = False
    # Where REGISTERs (and keepalives) go when the next hop (outbound_proxy, else proxy) is a host name.
    hop: Hop | None = None


# -- supervisor -> worker -------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """The first message: start the SIP stack. Answered by ``Ready`` or ``StartFailed``."""

    worker: int  # the worker's index k
    stack: StackSettings
    log_level: str  # "debug", "info", "warning", "error": lower lines are not sent
    shutdown_timeout_sec: float  # unregister deadline when the supervisor is gone


@dataclass(frozen=True)
class Apply:
    """Add the connection, or bring the running one to ``spec``. ``Done.result``: added/updated/replaced."""

    request: int
    spec: ConnSpec


@dataclass(frozen=True)
class Remove:
    """Unregister (waiting for the answer, at most the unregister deadline), then forget."""

    request: int
    connection_id: str


@dataclass(frozen=True)
class RegisterNow:
    request: int
    connection_id: str


@dataclass(frozen=True)
class UnregisterNow:
    request: int
    connection_id: str


@dataclass(frozen=True)
class Ping:
    """Answered with ``Pong`` by the SIP thread itself: proof that it is not stuck."""

    seq: int


@dataclass(frozen=True)
class FlowClosed:
    """The edge's TCP connection to ``address:port`` closed: connections registered over it
    register again at once (the PBX lost the flow its calls come over)."""

    address: str
    port: int


@dataclass(frozen=True)
class Shutdown:
    """Unregister every connection within ``deadline_sec``, send ``Stopped``, exit 0."""

    deadline_sec: float
    reason: str = "shutdown"


Command = Start | Apply | Remove | RegisterNow | UnregisterNow | FlowClosed | Ping | Shutdown

# -- worker -> supervisor -------------------------------------------------------

ErrorKind = Literal["limit", "unknown", "not_registering", "rejected", "stopping", "failed"]


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class StartFailed:
    error: str


@dataclass(frozen=True)
class Done:
    """The answer to one request: ``error_kind`` None means it was carried out."""

    request: int
    result: str | None = None
    error_kind: ErrorKind | None = None
    error: str | None = None


@dataclass(frozen=True)
class StateChanged:
    """A connection's registration state as its policy sees it (sent on every visible change)."""

    connection_id: str
    snapshot: PolicySnapshot


@dataclass(frozen=True)
class RegisterAnswered:
    """A final answer to a REGISTER (code 0: none), for ``registration_attempts_total`` and the histogram."""

    connection_id: str
    code: int
    duration: float | None


@dataclass(frozen=True)
class FlowLost:
    transport: str


@dataclass(frozen=True)
class Failover:
    """A request went on to the next DNS target (agent/core/targets.py)."""

    connection_id: str
    kind: str  # "registration" or "leg_b"


@dataclass(frozen=True)
class Log:
    """One log line; the supervisor adds ``worker`` and writes it to the one log stream."""

    level: str
    event: str
    fields: dict[str, object]


@dataclass(frozen=True)
class Pong:
    seq: int


@dataclass(frozen=True)
class Stopped:
    """The last message: the stack is down. ``unfinished``: connections not unregistered in time."""

    unfinished: tuple[str, ...]


Event = Ready | StartFailed | Done | StateChanged | RegisterAnswered | FlowLost | Failover | Log | Pong | Stopped
