"""Prometheus metrics, on a registry the caller passes in (tests use a fresh one).

All of them live in the supervisor: workers send what they count as events
(``agent.ipc.messages``), so one ``/metrics`` covers every connection whichever
worker holds it, and a restarted worker never resets or double-counts a
counter. Worker processes' own memory and CPU are read from ``/proc`` at
scrape time (:class:`WorkerProcessCollector`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.status import ConnectionStatus

__all__ = ["Metrics", "WorkerProcessCollector", "read_proc"]

_SETUP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
_HEARTBEAT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 32.0, 64.0)


# Label values a counter has a sample of (0) from the start, so that an alert on increase()
# sees its first event: every reason the edge refuses a request for, every failover kind, the
# transports whose flows can drop. (agent/edge/calls.py explains each reason; a test keeps
# the two lists the same.)
REJECT_REASONS = (
    "unknown_contact",
    "wrong_transport",
    "source_not_allowed",
    "no_destination",
    "over_limit",
    "media_unavailable",
    "method_not_allowed",
)
UNMATCHED_REASONS = ("unknown_contact", "method_not_allowed")  # with connection_id ""
FAILOVER_KINDS = ("registration", "leg_b")
FLOW_TRANSPORTS = ("TCP", "TLS")


class Metrics:
    def __init__(self, registry: CollectorRegistry, version: str = "") -> None:
        label = ["connection_id"]
        self.registry = registry
        self.info = Gauge("uac_agent_build_info", "Agent build (value is always 1).", ["version"], registry=registry)
        self.info.labels(version=version).set(1)
        self.registered = Gauge(
            "uac_agent_registered",
            "1 when a 2xx was received and the binding has not lapsed.",
            label,
            registry=registry,
        )
        self.pair_state = Gauge(
            "uac_agent_pair_state",
            "1 for the connection's current pair_state, 0 for the other.",
            ["connection_id", "pair_state"],
            registry=registry,
        )
        self.registration_status = Gauge(
            "uac_agent_registration_status",
            "Seed registration_status: 0 Not Applicable, 1 Not Registered, 2 Failed, 3 Expired, 4 Success, "
            "5 Unregistered.",
            label,
            registry=registry,
        )
        self.last_code = Gauge(
            "uac_agent_last_registration_response_code",
            "SIP code of the last final REGISTER answer (0 before any).",
            label,
            registry=registry,
        )
        self.last_info = Gauge(
            "uac_agent_last_registration_response_info",
            "The last registration response text (value is 1).",
            ["connection_id", "response"],
            registry=registry,
        )
        self.attempts = Counter(
            "uac_agent_registration_attempts",
            "Final REGISTER answers by SIP code (0: no SIP answer).",
            ["connection_id", "code"],
            registry=registry,
        )
        self.expires = Gauge(
            "uac_agent_registration_expires_seconds",
            "Expiry the registrar granted at the last 2xx.",
            label,
            registry=registry,
        )
        self.duration = Histogram(
            "uac_agent_registration_duration_seconds",
            "REGISTER sent to final response.",
            label,
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.failures = Gauge(
            "uac_agent_registration_consecutive_failures",
            "Failed attempts since the last 2xx.",
            label,
            registry=registry,
        )
        self.next_action = Gauge(
            "uac_agent_registration_next_action_timestamp_seconds",
            "Unix time of the next scheduled REGISTER (refresh or retry); 0 when none.",
            label,
            registry=registry,
        )
        self.registrar_reachable = Gauge(
            "uac_agent_registrar_reachable",
            "1 while the registrar (or outbound proxy) answers keepalives and REGISTERs; 0 after "
            "registration.keepalive_misses windows in a row without an answer.",
            label,
            registry=registry,
        )
        self.failovers = Counter(
            "uac_agent_failovers",
            "Requests sent on to the next DNS target after 408, 480, 503, 504 or no answer "
            "(kind: registration, leg_b).",
            ["connection_id", "kind"],
            registry=registry,
        )
        self.flows_lost = Counter(
            "uac_agent_transport_flows_lost",
            "TCP/TLS transport disconnects (dropped flows and failed connects).",
            ["transport"],
            registry=registry,
        )
        self.calls = Counter(
            "uac_agent_calls",
            "Calls from the PBX by result: answered, redirected, busy, declined, no_answer, cancelled, failed, "
            "rejected.",
            ["connection_id", "result"],
            registry=registry,
        )
        self.calls_active = Gauge(
            "uac_agent_calls_active",
            "Calls from the PBX being forwarded now.",
            label,
            registry=registry,
        )
        self.destination_reachable = Gauge(
            "uac_agent_destination_reachable",
            "1 while the connection's destination answers the edge's OPTIONS pings, 0 when "
            "none of its targets did twice in a row; absent until known or without pings.",
            label,
            registry=registry,
        )
        self.call_setup = Histogram(
            "uac_agent_call_setup_seconds",
            "INVITE from the PBX in to the final answer sent to the PBX.",
            label,
            buckets=_SETUP_BUCKETS,
            registry=registry,
        )
        self.inbound_rejected = Counter(
            "uac_agent_inbound_rejected",
            "Requests the edge refused before forwarding, by reason: unknown_contact, wrong_transport, "
            "source_not_allowed, no_destination, over_limit, media_unavailable, method_not_allowed "
            "(connection_id is empty when no connection matched).",
            ["connection_id", "reason"],
            registry=registry,
        )
        self.sip_thread_up = Gauge(
            "uac_agent_sip_thread_up", "1 while every worker's SIP thread answers.", registry=registry
        )
        self.workers = Gauge("uac_agent_workers", "Worker processes running.", registry=registry)
        self.worker_up = Gauge(
            "uac_agent_worker_up",
            "1 while worker k runs and its SIP thread answers pings.",
            ["worker"],
            registry=registry,
        )
        self.worker_restarts = Counter(
            "uac_agent_worker_restarts",
            "Replacement processes started for worker k after it died or hung.",
            ["worker"],
            registry=registry,
        )
        self.worker_heartbeat = Histogram(
            "uac_agent_worker_heartbeat_seconds",
            "Supervisor ping to the worker's SIP thread and back: how long a command waits for an idle worker.",
            buckets=_HEARTBEAT_BUCKETS,
            registry=registry,
        )
        self.worker_connections = Gauge(
            "uac_agent_worker_connections", "Connections placed on worker k.", ["worker"], registry=registry
        )
        self.connection_worker = Gauge(
            "uac_agent_connection_worker_info",
            "Which worker holds a connection (value is always 1).",
            ["connection_id", "worker"],
            registry=registry,
        )
        self.edge_up = Gauge(
            "uac_agent_edge_up",
            "1 while the edge's process (kamailio, rtpengine, haproxy) runs and answers on its control socket.",
            ["process"],
            registry=registry,
        )
        self.edge_restarts = Counter(
            "uac_agent_edge_restarts",
            "Times the edge's process was started again after it died or stopped answering.",
            ["process"],
            registry=registry,
        )
        self.log_lines_dropped = Counter(
            "uac_agent_log_lines_dropped",
            "Log lines dropped rather than let a flood of them, or a reader of the log that falls behind, "
            "slow the agent down.",
            registry=registry,
        )
        self._last_info: dict[str, str] = {}
        self._placed: dict[str, str] = {}
        self._known: set[str] = set()  # connections whose counters were started at 0
        for transport in FLOW_TRANSPORTS:
            self.flows_lost.labels(transport=transport)
        for reason in UNMATCHED_REASONS:
            self.inbound_rejected.labels(connection_id="", reason=reason)

    def known(self, connection_id: str) -> None:
        """A connection the agent holds: its alerting counters get their 0 samples (once)."""
        if connection_id in self._known:
            return
        self._known.add(connection_id)
        for reason in REJECT_REASONS:
            self.inbound_rejected.labels(connection_id=connection_id, reason=reason)
        for kind in FAILOVER_KINDS:
            self.failovers.labels(connection_id=connection_id, kind=kind)

    def observe_response(self, connection_id: str, code: int, duration: float | None) -> None:
        self.attempts.labels(connection_id=connection_id, code=str(code)).inc()
        if duration is not None:
            self.duration.labels(connection_id=connection_id).observe(duration)

    def place(self, connection_id: str, worker: int | None) -> None:
        """Record which worker holds ``connection_id`` (None: none)."""
        old = self._placed.get(connection_id)
        new = None if worker is None else str(worker)
        if old == new:
            return
        if old is not None:
            self.connection_worker.remove(connection_id, old)
            del self._placed[connection_id]
        if new is not None:
            self.connection_worker.labels(connection_id=connection_id, worker=new).set(1)
            self._placed[connection_id] = new

    def forget(self, connection_id: str) -> None:
        """Drop every series of a removed connection: gauges, counters and histograms (a deleted
        connection's series end; ``/metrics`` does not grow with every connection ever made)."""
        self._known.discard(connection_id)
        for metric in (
            self.attempts,
            self.duration,
            self.failovers,
            self.calls,
            self.call_setup,
            self.inbound_rejected,
        ):
            _remove_connection(metric, connection_id)
        for gauge in (
            self.registered,
            self.registration_status,
            self.last_code,
            self.expires,
            self.failures,
            self.next_action,
            self.calls_active,
            self.registrar_reachable,
            self.destination_reachable,
        ):
            try:
                gauge.remove(connection_id)
            except KeyError:
                pass
        for state in ("ACTIVE", "INACTIVE"):
            try:
                self.pair_state.remove(connection_id, state)
            except KeyError:
                pass
        last = self._last_info.pop(connection_id, None)
        if last is not None:
            try:
                self.last_info.remove(connection_id, last)
            except KeyError:
                pass
        self.place(connection_id, None)

    def publish(self, st: ConnectionStatus) -> None:
        self.known(st.connection_id)
        cid = st.connection_id
        self.registered.labels(connection_id=cid).set(1 if st.registered else 0)
        for state in ("ACTIVE", "INACTIVE"):
            self.pair_state.labels(connection_id=cid, pair_state=state).set(1 if st.pair_state == state else 0)
        self.registration_status.labels(connection_id=cid).set(int(st.registration_status))
        self.last_code.labels(connection_id=cid).set(st.last_response_code)
        self.expires.labels(connection_id=cid).set(st.granted_expires or 0)
        self.failures.labels(connection_id=cid).set(st.consecutive_failures)
        self.next_action.labels(connection_id=cid).set(st.next_action_at or 0)
        if st.connection.registers:
            self.registrar_reachable.labels(connection_id=cid).set(0 if st.registrar_reachable is False else 1)
        else:
            try:
                self.registrar_reachable.remove(cid)
            except KeyError:
                pass
        if st.destination_reachable is None:
            try:
                self.destination_reachable.remove(cid)
            except KeyError:
                pass
        else:
            self.destination_reachable.labels(connection_id=cid).set(1 if st.destination_reachable else 0)
        text = st.last_registration_response
        old = self._last_info.get(cid)
        if text != old:
            if old is not None:
                self.last_info.remove(cid, old)
            if text is not None:
                self.last_info.labels(connection_id=cid, response=text).set(1)
                self._last_info[cid] = text
            else:
                self._last_info.pop(cid, None)


def read_proc(pid: int) -> tuple[float, int, int] | None:
    """(CPU seconds, RSS bytes, PSS bytes) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode()
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            rollup = f.read().decode()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = _CLK_TCK or 100
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime, every thread
    rss = pss = 0
    for line in rollup.splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    return cpu, rss, pss


def _clk_tck() -> int:
    import os

    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError):
        return 100


_CLK_TCK = _clk_tck()


class WorkerProcessCollector(Collector):
    """Each worker process's CPU and memory, read from /proc when /metrics is scraped."""

    def __init__(self, workers: Callable[[], Iterable[tuple[int, int]]]) -> None:
        self._workers = workers  # (index, pid) of running workers

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            "uac_agent_worker_cpu_seconds", "CPU time of worker k's process (user + system).", labels=["worker"]
        )
        rss = GaugeMetricFamily("uac_agent_worker_resident_memory_bytes", "RSS of worker k.", labels=["worker"])
        pss = GaugeMetricFamily(
            "uac_agent_worker_pss_bytes",
            "Proportional set size of worker k (shared pages split among the processes sharing them).",
            labels=["worker"],
        )
        for index, pid in self._workers():
            got = read_proc(pid)
            if got is None:
                continue
            k = str(index)
            cpu.add_metric([k], got[0])
            rss.add_metric([k], got[1])
            pss.add_metric([k], got[2])
        yield cpu
        yield rss
        yield pss


def _remove_connection(metric: Counter | Histogram, connection_id: str) -> None:
    """Remove each of ``metric``'s children whose connection_id is ``connection_id``."""
    names = list(metric._labelnames)
    at = names.index("connection_id")
    seen: set[tuple[str, ...]] = set()
    for family in metric.collect():
        for sample in family.samples:
            if sample.labels.get("connection_id") != connection_id:
                continue
            values = tuple(sample.labels.get(n, "") for n in names)
            if values[at] == connection_id and values not in seen:
                seen.add(values)
    for values in seen:
        try:
            metric.remove(*values)
        except KeyError:
            pass
