"""Destination health (agent/edge/probes.py): targets pinged, the dispatcher's states read back."""

from __future__ import annotations

from dataclasses import replace

from agent.edge.messages import EdgeConnection, TlsTarget
from agent.edge.probes import DestinationHealth, dispatcher_list, parse_dispatcher_list, probe_uris

REC = EdgeConnection(
    line="c-1",
    connection_id="c-1",
    transport="UDP",
    mode="bridge",
    destination="sip:1006@192.0.2.20:5062",
    targets=(),
    ring_timeout_sec=30,
    max_calls=None,
    sources=("192.0.2.10/32",),
    pbx_address="",
    pbx_record_route="192.0.2.1:5070",
    dest_address="192.0.2.1",
    pbx_media="loc",
    dest_media="loc",
    from_user="",
)


def test_the_destination_itself_without_targets_and_each_target_with_them() -> None:
    assert probe_uris(REC, {}) == ("sip:192.0.2.20:5062",)
    many = replace(
        REC, targets=("sip:1006@192.0.2.21:5060;transport=tcp", "sip:1006@192.0.2.22:5060", "sip:1006@192.0.2.22")
    )
    assert probe_uris(many, {}) == ("sip:192.0.2.21:5060;transport=tcp", "sip:192.0.2.22:5060")
    assert probe_uris(replace(REC, mode="none", destination=""), {}) == ()


def test_a_tls_target_is_pinged_through_its_haproxy_port_and_skipped_without_one() -> None:
    tls = replace(REC, destination="sip:1006@192.0.2.30:5061;transport=tls")
    assert probe_uris(tls, {}) == ()
    t = TlsTarget(name="dest.example.com", address="192.0.2.30", port=5061, local_port=25400)
    assert probe_uris(tls, {t.key: t}) == ("sip:127.0.0.1:25400;transport=tcp",)


def test_the_list_file_starts_every_target_inactive_and_probing() -> None:
    assert dispatcher_list(["sip:b:5060", "sip:a:5060", "sip:a:5060"]) == "1 sip:a:5060 9 0\n1 sip:b:5060 9 0\n"


def test_dispatcher_list_reply_is_read_as_flags_by_uri() -> None:
    reply = {
        "NRSETS": 1,
        "RECORDS": [
            {
                "SET": {
                    "ID": 1,
                    "TARGETS": [
                        {"DEST": {"URI": "sip:a:5060", "FLAGS": "AP", "PRIORITY": 0}},
                        {"DEST": {"URI": "sip:b:5060", "FLAGS": "IP", "PRIORITY": 0}},
                    ],
                }
            }
        ],
    }
    assert parse_dispatcher_list(reply) == {"sip:a:5060": "AP", "sip:b:5060": "IP"}
    assert parse_dispatcher_list(None) == {}
    assert parse_dispatcher_list({"RECORDS": [{"SET": {}}]}) == {}


def test_reachable_when_any_target_answers_unreachable_when_none_did_in_time() -> None:
    h = DestinationHealth(grace_sec=10)
    assert h.set_targets({"c-1": ("sip:a", "sip:b"), "c-2": ("sip:b",), "c-3": ()}, now=0) is True
    assert h.targets == ("sip:a", "sip:b")
    assert h.all_reachable(0) == {"c-1": None, "c-2": None}  # c-3 has nothing to ping
    h.observe({"sip:a": "IP", "sip:b": "IP"})
    assert h.all_reachable(5) == {"c-1": None, "c-2": None}  # not had its chance yet
    assert h.all_reachable(10) == {"c-1": False, "c-2": False}
    h.observe({"sip:a": "AP"})
    assert h.all_reachable(11) == {"c-1": True, "c-2": False}
    h.observe({"sip:a": "TP", "sip:b": "AP"})  # one ping missed: still up
    assert h.all_reachable(12) == {"c-1": True, "c-2": True}
    assert h.set_targets({"c-1": ("sip:a", "sip:b"), "c-2": ("sip:b",)}, now=13) is False
    h.restarted(20)  # a new Kamailio: known states are forgotten
    assert h.all_reachable(21) == {"c-1": None, "c-2": None}
    assert h.set_targets({"c-2": ("sip:b",)}, now=22) is True
    assert h.targets == ("sip:b",) and h.targets_of("c-1") == ()


def test_an_unresolved_host_name_is_never_handed_to_kamailio() -> None:
    named = replace(REC, destination="sip:1006@assistant.example.com")
    assert probe_uris(named, {}) == ()
    resolved = replace(named, targets=("sip:1006@192.0.2.40:5060",))
    assert probe_uris(resolved, {}) == ("sip:192.0.2.40:5060",)
