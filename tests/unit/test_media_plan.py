"""Which rtpengine interface each side of a call gets (agent/edge/media.py)."""

from __future__ import annotations

from agent.edge.media import media_plan


def test_a_bound_address_without_external_is_one_interface() -> None:
    plan = media_plan("192.0.2.10", None, local_nets=False)
    assert plan.interfaces == {"loc": "192.0.2.10"}
    assert plan.interface_for("192.0.2.10") == "loc"
    assert plan.interface_for(None) == "loc"


def test_a_bound_address_with_external_advertises_it_and_local_nets_keep_the_local_one() -> None:
    plan = media_plan("10.0.0.5", "203.0.113.7", local_nets=True)
    assert plan.interfaces == {"ext": "10.0.0.5!203.0.113.7", "loc": "10.0.0.5"}
    assert plan.interface_for("203.0.113.7") == "ext"
    assert plan.interface_for("10.0.0.5") == "loc"


def test_a_wildcard_without_external_has_one_interface_per_address() -> None:
    plan = media_plan("0.0.0.0", None, local_nets=False, addresses=["127.0.0.1", "10.0.0.5", "fe80::1"])
    assert plan.interfaces == {"if0": "127.0.0.1", "if1": "10.0.0.5"}
    assert plan.interface_for("10.0.0.5") == "if1"
    assert plan.interface_for("127.0.0.1") == "if0"


def test_a_wildcard_with_external_binds_each_address_and_picks_the_one_routing_to_the_peer() -> None:
    """rtpengine cannot bind 0.0.0.0: one advertised interface per local address; a peer on
    loopback gets the loopback one (the kernel routes 127.0.0.0/8 over lo)."""
    plan = media_plan("0.0.0.0", "127.0.0.6", local_nets=False, addresses=["127.0.0.1", "10.0.0.5"])
    assert set(plan.interfaces.values()) == {"127.0.0.1!127.0.0.6", "10.0.0.5!127.0.0.6"}
    assert plan.interfaces[plan.interface_for("127.0.0.6", "127.0.0.1")] == "127.0.0.1!127.0.0.6"
    # the peer's address unknown (a host name): the first interface
    assert plan.interface_for("127.0.0.6", None) == next(iter(plan.interfaces))
    assert not plan.by_address  # without local_nets, nobody is told a local address
