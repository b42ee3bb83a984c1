"""agent.dns.Resolver against a real DNS server (Debian's dnsmasq on loopback) and one that never answers."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator

import pytest

from agent.dns import Resolver
from lab.dnsmasq import Dnsmasq, SilentDns, dnsmasq_binary

TTL = 1  # seconds, dnsmasq's --local-ttl for every record

SRV = [
    # two priorities
    ("_sip._udp.two.lab.test", "first.two.lab.test", 5071, 10, 0),
    ("_sip._udp.two.lab.test", "second.two.lab.test", 5072, 20, 0),
    # one priority, two weights
    ("_sip._udp.weighted.lab.test", "w1.lab.test", 5081, 10, 50),
    ("_sip._udp.weighted.lab.test", "w2.lab.test", 5082, 10, 50),
    # what the NAPTR records name
    ("_sip._tcp.proxies.lab.test", "p1.lab.test", 5090, 10, 0),
    ("_sip._udp.udp-only.lab.test", "w1.lab.test", 5091, 10, 0),
    # a default SRV name the NAPTR path must not reach
    ("_sip._tcp.naptr.lab.test", "w2.lab.test", 5099, 10, 0),
]
HOSTS = {
    "first.two.lab.test": ["127.0.0.11", "127.0.0.12"],
    "second.two.lab.test": ["127.0.0.13"],
    "w1.lab.test": ["127.0.0.21"],
    "w2.lab.test": ["127.0.0.22"],
    "p1.lab.test": ["127.0.0.31"],
    "plain.lab.test": ["127.0.0.41"],
    "ported.lab.test": ["127.0.0.42"],
    "cached.lab.test": ["127.0.0.43"],
}
NAPTR = [
    ("naptr.lab.test", 10, 50, "S", "SIP+D2U", "", "_sip._udp.udp-only.lab.test"),
    ("naptr.lab.test", 20, 50, "S", "SIP+D2T", "", "_sip._tcp.proxies.lab.test"),
]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    try:
        dnsmasq_binary()
    except RuntimeError as e:
        pytest.fail(f"{e}: the DNS tests need a real DNS server")
    d = Dnsmasq(tmp_path_factory.mktemp("dnsmasq"), srv=SRV, hosts=HOSTS, naptr=NAPTR, ttl=TTL).start()
    yield d
    d.stop()


def resolver(d: Dnsmasq, clock: Callable[[], float] = time.monotonic, negative_ttl: float = 5.0) -> Resolver:
    return Resolver([d.address], timeout=2.0, clock=clock, rng=random.Random(3), negative_ttl=negative_ttl)


def asked(d: Dnsmasq, since: int, name_part: str) -> list[tuple[str, str]]:
    return [q for q in d.queries()[since:] if name_part in q[1]]


def test_srv_priorities_give_the_failover_order(dnsmasq: Dnsmasq) -> None:
    res = resolver(dnsmasq).resolve("two.lab.test", None, "UDP")
    assert res.error is None
    assert not res.from_cache
    # first.two.lab.test's two addresses in a row (in the order DNS gave them), then the priority 20 target
    assert [(t.host, t.port, t.priority) for t in res.targets] == [
        ("first.two.lab.test", 5071, 10),
        ("first.two.lab.test", 5071, 10),
        ("second.two.lab.test", 5072, 20),
    ]
    assert sorted(t.ip for t in res.targets[:2]) == ["127.0.0.11", "127.0.0.12"]
    assert {t.via for t in res.targets} == {"SRV _sip._udp.two.lab.test"}
    assert res.targets[-1].uri == "sip:127.0.0.13:5072"


def test_same_priority_weights_both_appear_and_are_redrawn_from_cache(dnsmasq: Dnsmasq) -> None:
    r = resolver(dnsmasq)
    firsts: set[str] = set()
    for i in range(30):
        res = r.resolve("weighted.lab.test", None, "udp")
        assert res.from_cache == (i > 0)
        assert sorted(t.address for t in res.targets) == ["127.0.0.21:5081", "127.0.0.22:5082"]
        assert {t.weight for t in res.targets} == {50}
        firsts.add(res.targets[0].host)
    assert firsts == {"w1.lab.test", "w2.lab.test"}  # the cached records, drawn again each time


def test_naptr_srv_a_chain_for_tcp(dnsmasq: Dnsmasq) -> None:
    before = len(dnsmasq.queries())
    res = resolver(dnsmasq).resolve("naptr.lab.test", None, "TCP")
    assert res.error is None
    assert [(t.host, t.address, t.transport, t.via) for t in res.targets] == [
        ("p1.lab.test", "127.0.0.31:5090", "TCP", "NAPTR+SRV _sip._tcp.proxies.lab.test")
    ]
    assert res.targets[0].uri == "sip:127.0.0.31:5090;transport=tcp"
    assert dnsmasq.queries()[before:] == [
        ("NAPTR", "naptr.lab.test"),
        ("SRV", "_sip._tcp.proxies.lab.test"),
        ("A", "p1.lab.test"),
    ]


def test_naptr_for_another_transport_is_not_followed(dnsmasq: Dnsmasq) -> None:
    # TLS: no SIPS+D2T record, so _sips._tcp.naptr.lab.test (none), then naptr.lab.test's A (none)
    res = resolver(dnsmasq).resolve("naptr.lab.test", None, "TLS")
    assert res.error == "DNS: no SRV or A record for naptr.lab.test"


def test_no_srv_falls_back_to_a_with_the_default_port(dnsmasq: Dnsmasq) -> None:
    r = resolver(dnsmasq)
    udp = r.resolve("plain.lab.test", None, "UDP")
    tls = r.resolve("plain.lab.test", None, "TLS")
    assert [(t.address, t.via, t.host) for t in udp.targets] == [("127.0.0.41:5060", "A", "plain.lab.test")]
    assert [(t.uri, t.via) for t in tls.targets] == [("sip:127.0.0.41:5061;transport=tls", "A")]


def test_explicit_port_asks_only_for_the_address(dnsmasq: Dnsmasq) -> None:
    before = len(dnsmasq.queries())
    res = resolver(dnsmasq).resolve("ported.lab.test", 5099, "TCP")
    assert [(t.address, t.via) for t in res.targets] == [("127.0.0.42:5099", "A")]
    assert dnsmasq.queries()[before:] == [("A", "ported.lab.test")]  # no NAPTR, no SRV, no AAAA


def test_ip_literal_asks_nothing(dnsmasq: Dnsmasq) -> None:
    before = len(dnsmasq.queries())
    r = resolver(dnsmasq)
    res = r.resolve("127.0.0.9", None, "UDP")
    res6 = r.resolve("[::1]", 5070, "TCP")
    assert [(t.address, t.via) for t in res.targets] == [("127.0.0.9:5060", "literal")]
    assert [t.uri for t in res6.targets] == ["sip:[::1]:5070;transport=tcp"]
    assert dnsmasq.queries()[before:] == []


def test_name_without_records(dnsmasq: Dnsmasq) -> None:
    before = len(dnsmasq.queries())
    res = resolver(dnsmasq).resolve("missing.lab.test", None, "UDP")
    assert res.error == "DNS: no SRV or A record for missing.lab.test"
    assert res.targets == ()
    assert [q[0] for q in dnsmasq.queries()[before:]] == ["NAPTR", "SRV", "A", "AAAA"]


def test_ttl_caching_with_an_injected_clock(dnsmasq: Dnsmasq) -> None:
    clock = FakeClock()
    r = resolver(dnsmasq, clock=clock, negative_ttl=5.0)
    before = len(dnsmasq.queries())
    first = r.resolve("cached.lab.test", None, "UDP")
    asked_first = len(asked(dnsmasq, before, "cached.lab.test"))
    assert not first.from_cache
    assert first.expires_at == clock.now + TTL

    clock.now += TTL - 0.01
    again = r.resolve("cached.lab.test", None, "UDP")
    assert again.from_cache
    assert again.targets == first.targets
    assert len(asked(dnsmasq, before, "cached.lab.test")) == asked_first  # nothing asked

    clock.now += 0.02
    later = r.resolve("cached.lab.test", None, "UDP")
    assert not later.from_cache
    assert len(asked(dnsmasq, before, "cached.lab.test")) == 2 * asked_first

    # a different port is a different question
    assert not r.resolve("cached.lab.test", 5070, "UDP").from_cache


def test_failures_are_cached_for_negative_ttl(dnsmasq: Dnsmasq) -> None:
    clock = FakeClock()
    r = resolver(dnsmasq, clock=clock, negative_ttl=5.0)
    before = len(dnsmasq.queries())
    first = r.resolve("gone.lab.test", None, "UDP")
    n = len(asked(dnsmasq, before, "gone.lab.test"))
    assert first.expires_at == clock.now + 5.0
    clock.now += 4.9
    again = r.resolve("gone.lab.test", None, "UDP")
    assert (again.from_cache, again.error) == (True, first.error)
    assert len(asked(dnsmasq, before, "gone.lab.test")) == n
    clock.now += 0.2
    assert not r.resolve("gone.lab.test", None, "UDP").from_cache
    assert len(asked(dnsmasq, before, "gone.lab.test")) == 2 * n


def test_real_ttl_expiry(dnsmasq: Dnsmasq) -> None:
    r = resolver(dnsmasq)
    assert not r.resolve("w1.lab.test", None, "UDP").from_cache
    assert r.resolve("w1.lab.test", None, "UDP").from_cache
    time.sleep(TTL + 0.05)
    assert not r.resolve("w1.lab.test", None, "UDP").from_cache


def test_a_server_that_never_answers_gives_a_timeout_error_in_bounded_time() -> None:
    silent = SilentDns().start()
    try:
        r = Resolver([silent.address], timeout=0.5)
        t0 = time.monotonic()
        res = r.resolve("pbx.lab.test", None, "UDP")
        elapsed = time.monotonic() - t0
        assert res.targets == ()
        assert res.error == f"DNS: no answer from {silent.address} within 0.5 s for pbx.lab.test (NAPTR)"
        assert elapsed < 0.5 + 2.0  # a sanity bound: the first timeout ends the resolution
        assert silent.queries >= 1
        received = silent.queries
        cached = r.resolve("pbx.lab.test", None, "UDP")
        assert (cached.from_cache, cached.error) == (True, res.error)
        assert silent.queries == received
    finally:
        silent.stop()
