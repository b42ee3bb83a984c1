"""What each peer is told (agent/addresses.py): no SIP stack; route lookups on loopback only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent import addresses
from agent.addresses import advertised_for, route_source
from agent.cli import main
from agent.config import ConfigError, SipSettings, load_settings
from agent.supervisor.specs import EdgeRecords
from tests.unit.test_config import GOOD, write


def sip(**kw: Any) -> SipSettings:
    return SipSettings(**kw)


def test_external_address_is_told_to_every_peer_outside_local_nets() -> None:
    s = sip(bind="0.0.0.0", external_signaling_address="203.0.113.10", local_nets=["10.0.0.0/8"])
    adv = advertised_for(s, "127.0.0.1")
    assert (adv.signaling, adv.media) == ("203.0.113.10", "203.0.113.10")  # media follows signaling
    s = sip(bind="0.0.0.0", external_signaling_address="sip.example.com", external_media_address="203.0.113.11")
    adv = advertised_for(s, "127.0.0.1")
    assert (adv.signaling, adv.media) == ("sip.example.com", "203.0.113.11")


def test_peers_in_local_nets_are_told_the_local_address() -> None:
    s = sip(bind="0.0.0.0", external_signaling_address="203.0.113.10", local_nets=["127.0.0.0/8"])
    adv = advertised_for(s, "127.0.0.3")
    assert adv.signaling == route_source("127.0.0.3")
    assert adv.signaling is not None and adv.signaling.startswith("127.")
    assert "local_nets" in adv.why
    s = sip(bind="127.0.0.2", external_signaling_address="203.0.113.10", local_nets="127.0.0.0/8")
    assert advertised_for(s, "127.0.0.3").signaling == "127.0.0.2"  # a specific bind is the local address


def test_wildcard_bind_without_external_address_is_told_the_routing_interface_never_0000() -> None:
    for bind in ("0.0.0.0", "::"):
        adv = advertised_for(sip(bind=bind), "127.0.0.1")
        assert adv.signaling == "127.0.0.1"
        assert adv.media == "127.0.0.1"
    adv = advertised_for(sip(bind="0.0.0.0"), "localhost")  # a host name is resolved (off the SIP threads)
    assert adv.signaling == "127.0.0.1"
    adv = advertised_for(sip(bind="0.0.0.0", rtp_address="127.0.0.9"), "127.0.0.1")
    assert adv.media == "127.0.0.9"  # a specific RTP address is what SDP names


def test_an_unknown_peer_leaves_it_to_the_stack_rather_than_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(addresses, "_lookup", lambda host: None)  # no DNS query leaves this test
    adv = advertised_for(sip(bind="0.0.0.0"), "no-such-host.invalid")
    assert adv.signaling is None
    assert adv.media is None
    assert "stack" in adv.why


def test_every_contact_names_the_edge_with_the_address_its_peer_is_told(tmp_path: Path) -> None:
    data = json.loads(json.dumps(GOOD))
    data["sip"] = {"bind": "0.0.0.0", "external_signaling_address": "127.0.0.5", "local_nets": ["10.0.0.0/8"]}
    data["connections"][0]["internal_uac_settings"] = {"destination_uri": "1006@127.0.0.1:5999"}
    data["connections"][0]["external_uac_settings"].update(
        proxy="sip:127.0.0.1:5060", outbound_proxy=None, transport="UDP"
    )
    settings = load_settings(write(tmp_path, data))
    conn = settings.connections[0]
    ext = conn.external_uac_settings
    assert ext is not None
    records = EdgeRecords(settings)
    acc, rec = records.both(conn)
    line = f";line={conn.connection_id}"
    assert acc.contact == f"<sip:{ext.username}@127.0.0.5:{settings.sip.port}{line}>"
    assert (rec.pbx_address, rec.dest_address) == ("127.0.0.5", "127.0.0.5")
    assert rec.pbx_record_route == f"127.0.0.5:{settings.sip.port}"
    data["sip"] = {"bind": "0.0.0.0"}
    settings = load_settings(write(tmp_path, data))
    acc, rec = EdgeRecords(settings).both(settings.connections[0])
    assert acc.contact == f"<sip:{ext.username}@127.0.0.1:{settings.sip.port}{line}>"  # what routes to this PBX
    assert "0.0.0.0" not in acc.contact and rec.pbx_address == "127.0.0.1"


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("external_signaling_address", "0.0.0.0", "not 0.0.0.0"),
        ("external_media_address", "not a host!", "host name or an IP address"),
        ("local_nets", ["10.0.0.1/8"], "local_nets"),
    ],
)
def test_bad_address_settings_name_the_field(tmp_path: Path, field: str, value: object, needle: str) -> None:
    data = json.loads(json.dumps(GOOD))
    data["sip"][field] = value
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, data))
    assert any(f"sip.{field}" in p and needle in p for p in e.value.problems), e.value.problems


def test_check_config_says_what_each_peer_is_told(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads(json.dumps(GOOD))
    data["sip"] = {"bind": "0.0.0.0", "external_signaling_address": "203.0.113.10"}
    assert main(["check-config", "--config", str(write(tmp_path, data))]) == 0
    out = capsys.readouterr().out
    assert "external address 203.0.113.10" in out
    assert "Contact 203.0.113.10" in out
    assert "0.0.0.0" not in out.split("bind:", 1)[1].split("\n", 1)[1]
