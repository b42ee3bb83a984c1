"""RFC 2782 ordering of SRV records (agent.dns.order_srv), and the pure parts of agent.dns: no sockets."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from agent.dns import Resolver, SrvRecord, Target, order_srv, parse_nameserver


def rec(priority: int, weight: int, target: str, port: int = 5060) -> SrvRecord:
    return SrvRecord(priority, weight, port, target)


def first_picks(records: list[SrvRecord], draws: int, seed: int = 7) -> Counter[str]:
    rng = random.Random(seed)
    return Counter(order_srv(records, rng)[0].target for _ in range(draws))


def test_priorities_strictly_ascending_whatever_the_weights() -> None:
    records = [rec(30, 1000, "c"), rec(10, 0, "a1"), rec(20, 5, "b"), rec(10, 100, "a2"), rec(30, 0, "c2")]
    for seed in range(200):
        ordered = order_srv(records, random.Random(seed))
        assert sorted(ordered) == sorted(records)  # every record once
        assert [r.priority for r in ordered] == [10, 10, 20, 30, 30]


def test_weights_60_40_give_the_first_place_in_proportion() -> None:
    picks = first_picks([rec(10, 40, "light"), rec(10, 60, "heavy")], draws=10_000)
    assert picks["heavy"] + picks["light"] == 10_000
    # RFC 2782's draw in [0, 100] gives the heavy record (61 + 60) / 202 = 0.599 of first places
    assert 0.57 < picks["heavy"] / 10_000 < 0.63


def test_zero_weight_records_are_picked_first_rarely_but_sometimes() -> None:
    picks = first_picks([rec(10, 100, "weighted"), rec(10, 0, "spare")], draws=20_000)
    share = picks["spare"] / 20_000
    assert picks["spare"] > 0
    assert share < 0.025  # 1/101 expected
    for seed in range(50):
        assert {r.target for r in order_srv([rec(10, 100, "weighted"), rec(10, 0, "spare")], random.Random(seed))} == {
            "weighted",
            "spare",
        }


def test_all_zero_weights_come_in_random_order() -> None:
    picks = first_picks([rec(10, 0, "a"), rec(10, 0, "b"), rec(10, 0, "c")], draws=3000)
    assert set(picks) == {"a", "b", "c"}
    assert min(picks.values()) > 800


def test_seeded_rng_is_deterministic() -> None:
    records = [rec(10, 10, "a"), rec(10, 20, "b"), rec(10, 30, "c"), rec(20, 0, "d"), rec(20, 5, "e")]
    one, two = random.Random(42), random.Random(42)
    for _ in range(100):
        assert order_srv(records, one) == order_srv(records, two)


def test_plain_tuples_and_empty_input() -> None:
    assert order_srv([], random.Random(1)) == []
    ordered = order_srv([(20, 0, 5070, "b"), (10, 0, 5060, "a")], random.Random(1))
    assert ordered == [SrvRecord(10, 0, 5060, "a"), SrvRecord(20, 0, 5070, "b")]
    assert ordered[0].target == "a"


@pytest.mark.parametrize(
    ("ip", "transport", "address", "uri"),
    [
        ("192.0.2.1", "UDP", "192.0.2.1:5060", "sip:192.0.2.1:5060"),
        ("192.0.2.1", "TCP", "192.0.2.1:5060", "sip:192.0.2.1:5060;transport=tcp"),
        ("2001:db8::1", "TLS", "[2001:db8::1]:5060", "sip:[2001:db8::1]:5060;transport=tls"),
    ],
)
def test_target_address_and_uri(ip: str, transport: str, address: str, uri: str) -> None:
    t = Target("pbx.example.com", ip, 5060, transport, 10, 50, "SRV _sip._udp.example.com")
    assert t.address == address
    assert t.uri == uri


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
        ("2001:db8::53", ("2001:db8::53", 53)),
    ],
)
def test_parse_nameserver(text: str, parsed: tuple[str, int]) -> None:
    assert parse_nameserver(text) == parsed


@pytest.mark.parametrize("text", ["dns.example.com", "127.0.0.1:0", "127.0.0.1:x", "[::1]5353", "", "1.2.3.4:70000"])
def test_parse_nameserver_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="nameserver"):
        parse_nameserver(text)


@pytest.mark.parametrize(
    ("host", "port", "transport", "expected"),
    [
        ("192.0.2.7", None, "UDP", "sip:192.0.2.7:5060"),
        ("192.0.2.7", 5080, "tcp", "sip:192.0.2.7:5080;transport=tcp"),
        ("[2001:db8::7]", None, "TLS", "sip:[2001:db8::7]:5061;transport=tls"),
    ],
)
def test_ip_literal_needs_no_dns(host: str, port: int | None, transport: str, expected: str) -> None:
    # a nameserver nobody listens on: a literal must not ask it
    res = Resolver(["192.0.2.53"], timeout=0.01).resolve(host, port, transport)
    assert res.error is None
    assert [(t.uri, t.via) for t in res.targets] == [(expected, "literal")]


def test_bad_transport_and_port_are_errors_not_exceptions() -> None:
    r = Resolver(["192.0.2.53"], timeout=0.01)
    assert r.resolve("pbx.example.com", None, "SCTP").error == "DNS: unknown transport 'SCTP' (UDP, TCP or TLS)"
    assert r.resolve("pbx.example.com", 0, "UDP").error == "DNS: port 0 out of range 1-65535"
    assert r.resolve("a..b", None, "UDP").error == "DNS: 'a..b' is not a valid host name"
