"""agent.metrics: the series a connection has from the start, and none left once it is gone."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from agent.edge.calls import _DETAILS
from agent.metrics import FAILOVER_KINDS, REJECT_REASONS, Metrics


def _series_of(registry: CollectorRegistry, connection_id: str) -> list[str]:
    return [ln for ln in generate_latest(registry).decode().splitlines() if f'connection_id="{connection_id}"' in ln]


def test_alerting_counters_of_a_connection_start_at_zero() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.known("c-1")
    for reason in REJECT_REASONS:
        assert (
            registry.get_sample_value("uac_agent_inbound_rejected_total", {"connection_id": "c-1", "reason": reason})
            == 0.0
        ), reason
    for kind in FAILOVER_KINDS:
        assert registry.get_sample_value("uac_agent_failovers_total", {"connection_id": "c-1", "kind": kind}) == 0.0
    for transport in ("TCP", "TLS"):
        assert registry.get_sample_value("uac_agent_transport_flows_lost_total", {"transport": transport}) == 0.0
    # an INVITE no connection matched
    assert (
        registry.get_sample_value(
            "uac_agent_inbound_rejected_total", {"connection_id": "", "reason": "unknown_contact"}
        )
        == 0.0
    )


def test_the_reasons_counted_are_the_reasons_the_edge_explains() -> None:
    assert set(REJECT_REASONS) == set(_DETAILS)


def test_a_forgotten_connection_leaves_no_series_and_metrics_stay_flat_over_cycles() -> None:
    """Counters and histograms of a deleted connection go with it: 2,000 create/use/delete
    cycles leave /metrics as it was after the first."""
    registry = CollectorRegistry()
    m = Metrics(registry)

    def cycle(cid: str) -> None:
        m.known(cid)
        m.place(cid, 0)
        m.observe_response(cid, 200, 0.01)
        m.observe_response(cid, 401, None)
        m.calls.labels(connection_id=cid, result="answered").inc()
        m.call_setup.labels(connection_id=cid).observe(1.5)
        m.inbound_rejected.labels(connection_id=cid, reason="over_limit").inc()
        m.failovers.labels(connection_id=cid, kind="leg_b").inc()
        m.calls_active.labels(connection_id=cid).set(1)
        assert _series_of(registry, cid)
        m.forget(cid)
        assert _series_of(registry, cid) == []

    m.known("c-kept")  # a connection that stays
    cycle("c-0")
    size = len(generate_latest(registry))
    for k in range(1, 2000):
        cycle(f"c-{k}")
    assert len(generate_latest(registry)) == size
    assert _series_of(registry, "c-kept")  # the others' series are untouched
