"""Prometheus metrics, on a registry the caller passes in (tests use a fresh one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent.status import ConnectionStatus

__all__ = ["Metrics"]

_SETUP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 32.0, 64.0)


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
        self.call_setup = Histogram(
            "uac_agent_call_setup_seconds",
            "INVITE from the PBX in to the final answer sent to the PBX.",
            label,
            buckets=_SETUP_BUCKETS,
            registry=registry,
        )
        self.inbound_rejected = Counter(
            "uac_agent_inbound_rejected",
            "INVITEs refused before forwarding, by reason: source_not_allowed, unknown_contact, no_destination, "
            "over_limit (connection_id is empty when no connection matched).",
            ["connection_id", "reason"],
            registry=registry,
        )
        self.sip_thread_up = Gauge("uac_agent_sip_thread_up", "1 while the SIP thread runs.", registry=registry)
        self._last_info: dict[str, str] = {}

    def observe_response(self, connection_id: str, code: int, duration: float | None) -> None:
        self.attempts.labels(connection_id=connection_id, code=str(code)).inc()
        if duration is not None:
            self.duration.labels(connection_id=connection_id).observe(duration)

    def publish(self, st: ConnectionStatus) -> None:
        cid = st.connection_id
        self.registered.labels(connection_id=cid).set(1 if st.registered else 0)
        for state in ("ACTIVE", "INACTIVE"):
            self.pair_state.labels(connection_id=cid, pair_state=state).set(1 if st.pair_state == state else 0)
        self.registration_status.labels(connection_id=cid).set(int(st.registration_status))
        self.last_code.labels(connection_id=cid).set(st.last_response_code)
        self.expires.labels(connection_id=cid).set(st.granted_expires or 0)
        self.failures.labels(connection_id=cid).set(st.consecutive_failures)
        self.next_action.labels(connection_id=cid).set(st.next_action_at or 0)
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
