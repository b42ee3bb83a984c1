"""Forwarding the PBX's calls, with real peers on loopback.

A SIPp "PBX" calls the agent's AoR through Kamailio (registrar, then
``lookup("location")`` and a stateful, record-routing relay to the Contact the
agent registered); the agent forwards to a SIPp destination UAS. RTP ends are
UDP endpoints named in each SIPp's SDP (lab/rtp.py), which count what arrives.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lab.dnsmasq import Dnsmasq
from lab.kamailio import Kamailio, free_port
from lab.rtp import RtpEndpoint
from lab.sipp import Sipp, scenario_path
from tests.integration.agentproc import AgentProcess
from tests.integration.conftest import connection, start_kamailio

PBX_PATTERN = 0x2A
DEST_PATTERN = 0x55


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def metric(agent: AgentProcess, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in agent.metrics().splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        head, _, value = line.rpartition(" ")
        got = head[len(name) :].strip("{}")
        if all(part in got.split(",") for part in want.split(",") if part):
            total += float(value)
    return total


def media_of(sdp: str) -> tuple[str, int]:
    """(address, port) of the audio an SDP body offers or answers."""
    c = re.search(r"^c=IN IP4 (\S+)", sdp, re.M)
    m = re.search(r"^m=audio (\d+)", sdp, re.M)
    assert c is not None and m is not None, sdp
    return c.group(1), int(m.group(1))


def connect_media(
    pbx: Sipp,
    dest: Sipp,
    pbx_rtp: RtpEndpoint,
    dest_rtp: RtpEndpoint,
    code: int = 200,
    nat: dict[str, str] | None = None,
) -> None:
    """Each RTP end sends to what the SDP it got names (the media relay's ports): the PBX's
    from the answer (or 183) it received, the destination's from the INVITE. ``nat`` plays the
    NAT in front of an agent told to advertise an external address: a packet to the external
    address reaches the host's own (external -> local)."""

    def via_nat(addr: tuple[str, int]) -> tuple[str, int]:
        return (nat or {}).get(addr[0], addr[0]), addr[1]

    wait_until(lambda: bool(dest.received_requests("INVITE")), 10, "the INVITE at the destination")
    dest_rtp.send_to(via_nat(media_of(dest.received_requests("INVITE")[0].body)))
    wait_until(lambda: any("m=audio" in r.body for r in pbx.received_responses(code)), 10, f"{code} with SDP")
    pbx_rtp.send_to(via_nat(media_of(next(r.body for r in pbx.received_responses(code) if "m=audio" in r.body))))


@dataclass
class CallLab:
    kamailio: Kamailio
    agent: AgentProcess
    dest_port: int
    workdir: Path
    user: str
    sipps: list[Sipp] = field(default_factory=list)  # stopped by the fixture, even after a failure

    def dest(self, scenario: str, calls: int = 1, port: int | None = None, **kw: Any) -> Sipp:
        variables = {"callee": "assistant"}
        if "rtp_port" in kw:
            variables["rtp_port"] = kw.pop("rtp_port")
        elif scenario.startswith("dest_answer"):
            variables["rtp_port"] = str(free_port())
        variables.update(kw.pop("variables", {}))
        s = Sipp(
            scenario_path(scenario),
            port or self.dest_port,
            variables=variables,
            workdir=self.workdir / f"dest-{scenario}-{time.monotonic_ns()}",
            calls=calls,
            **kw,
        )
        self.sipps.append(s)
        s.start()
        return s

    def pbx(self, scenario: str, calls: int = 1, host: str = "127.0.0.1", via_kamailio: bool = True, **kw: Any) -> Sipp:
        # straight to the agent, the Request-URI is the Contact it registered
        params = "" if via_kamailio else ";line=c-fwd"
        variables: dict[str, str | int] = {"caller": "1000", "sdp_user": "pbx", "ruri_params": params}
        variables["rtp_port"] = kw.pop("rtp_port", None) or free_port()
        variables.update(kw.pop("variables", {}))
        remote = f"127.0.0.1:{self.kamailio.cfg.port if via_kamailio else self.agent.sip_port}"
        s = Sipp(
            scenario_path(scenario),
            free_port(),
            variables=variables,
            workdir=self.workdir / f"pbx-{scenario}-{time.monotonic_ns()}",
            calls=calls,
            remote=remote,
            service=self.user,
            host=host,
            **kw,
        )
        self.sipps.append(s)
        s.start()
        return s


USER = "frank"


@pytest.fixture(scope="module")
def pbx_proxy(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[Kamailio]:
    """The PBX: a Kamailio registrar that routes INVITEs to registered Contacts."""
    k = start_kamailio(tmp_path_factory.mktemp("pbx"), pki, users={USER: "frank-pw"})
    yield k
    k.stop()


@pytest.fixture
def call_lab(pbx_proxy: Kamailio, tmp_path: Path) -> Iterator[Callable[..., CallLab]]:
    kamailio = pbx_proxy
    agents: list[AgentProcess] = []
    labs: list[CallLab] = []
    kamailio.rpc("ul.rm", "location", USER, check=False)  # no binding left by an earlier test

    def make(
        user: str = USER,
        internal: dict[str, Any] | None = None,
        sip: dict[str, Any] | None = None,
        expiration_sec: int = 300,
        dest_params: str = "",
        dest_port: int | None = None,
        transport: str = "UDP",
        proxy: str | None = None,
        **sections: Any,
    ) -> CallLab:
        dest_port = dest_port or free_port()
        proxy = proxy or f"sip:127.0.0.1:{kamailio.cfg.port}"
        conn = connection("c-fwd", proxy, transport, user, "frank-pw", expiration_sec=expiration_sec)
        destination = f"1006@127.0.0.1:{dest_port}{dest_params}"
        conn["internal_uac_settings"] = {"destination_uri": destination, **(internal or {})}
        sip_section = {**(sip or {})}
        agent = AgentProcess(
            tmp_path / f"agent{len(agents)}", [conn], sip=sip_section, log={"level": "debug"}, **sections
        )
        agents.append(agent)
        agent.start()
        agent.wait_for(lambda: kamailio.lookup(user) is not None, 10, f"{user} bound in Kamailio")
        lab = CallLab(kamailio, agent, dest_port, tmp_path, user)
        labs.append(lab)
        return lab

    yield make
    for s in (s for lab in labs for s in lab.sipps):
        s.stop()
    for a in agents:
        try:
            a.terminate()  # unregisters: no stale binding for the next test
        finally:
            a.kill()


def test_answered_calls_are_bridged_and_torn_down(call_lab: Callable[..., CallLab]) -> None:
    lab = call_lab()
    dest = lab.dest("dest_answer.xml", calls=20)
    pbx = lab.pbx("pbx_call.xml", calls=20, timeout=60, extra_args=["-r", "5", "-l", "2", "-d", "300"])
    assert pbx.wait(90) == 0, pbx.output()[-2000:]
    wait_until(lambda: len(dest.received_requests("BYE")) == 20, 10, "20 BYEs at the destination")
    dest.stop()
    assert len(pbx.received_responses(200)) >= 40  # 200 INVITE + 200 BYE for each call
    invites_in = dest.received_requests("INVITE")
    assert len(invites_in) == 20
    # caller identity carried over to leg B: From user and display name
    assert all("<sip:1000@" in (m.header("From") or "") for m in invites_in)
    assert all('"PBX caller' in (m.header("From") or "") for m in invites_in)
    wait_until(lambda: metric(lab.agent, "uac_agent_calls_total", result="answered") == 20, 10, "20 answered")
    assert metric(lab.agent, "uac_agent_calls_active", connection_id="c-fwd") == 0
    assert metric(lab.agent, "uac_agent_call_setup_seconds_count", connection_id="c-fwd") == 20
    ended = lab.agent.events("call_ended", 20)
    assert len(ended) == 20
    assert all(e["call_id_a"] and e["call_id_b"] and e["result"] == "answered" for e in ended)


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_transport_in_destination_uri_is_honoured(
    call_lab: Callable[..., CallLab], pki: dict[str, Path], tmp_path: Path, transport: str
) -> None:
    """``;transport=`` on destination_uri: leg B goes over TCP or TLS while leg A stays on UDP.

    SIPp here has no TLS, so for TLS the destination is a Kamailio (TLS, certificate
    for ``localhost`` from the test CA) relaying to the SIPp destination over UDP.
    """
    relay: Kamailio | None = None
    if transport == "tcp":
        lab = call_lab(dest_params=";transport=tcp")
        dest = lab.dest("dest_answer.xml", calls=2, transport="t1")
    else:
        dest_port = free_port()
        relay = start_kamailio(tmp_path / "tls-relay", pki, relay_to=f"sip:1006@127.0.0.1:{dest_port}")
        lab = call_lab(
            dest_port=dest_port,
            internal={"destination_uri": f"1006@localhost:{relay.cfg.tls_port};transport=tls"},
            sip={"tls_ca_file": str(pki["ca"])},
        )
        dest = lab.dest("dest_answer.xml", calls=2)
    try:
        pbx = lab.pbx("pbx_call.xml", calls=2, timeout=30, extra_args=["-r", "2", "-d", "300"])
        assert pbx.wait(30) == 0, pbx.output()[-2000:]
        wait_until(lambda: len(dest.received_requests("BYE")) == 2, 10, "2 BYEs at the destination")
        dest.stop()
    finally:
        if relay is not None:
            relay.stop()
    invites = dest.received_requests("INVITE")
    assert len(invites) == 2
    # the edge's own Via (below the relay's, for TLS) names TCP: Kamailio speaks TCP to its TLS
    # proxy, which dialled the relay's TLS-only port (the INVITE reached it: TLS was used);
    # below it, the PBX side's Vias are one masked Via (topology hiding)
    agent_vias = [m.header_all("Via")[1 if relay else 0] for m in invites]
    assert all("SIP/2.0/TCP 127.0.0.1:" in v for v in agent_vias), agent_vias
    hidden = [m.header_all("Via")[-1] for m in invites]
    assert all("branch=z9hG4bKsr-" in v and str(lab.kamailio.cfg.port) not in v for v in hidden), hidden
    if transport == "tcp":
        assert all(m.transport == "TCP" for m in invites), [m.transport for m in invites]
    assert all(m.transport == "UDP" for m in pbx.received_responses(200))
    wait_until(lambda: metric(lab.agent, "uac_agent_calls_total", result="answered") == 2, 5, "2 answered")


def test_destination_hangs_up_and_bye_reaches_the_pbx(call_lab: Callable[..., CallLab]) -> None:
    lab = call_lab()
    dest = lab.dest("dest_answer_bye.xml", calls=3, extra_args=["-d", "300"])
    pbx = lab.pbx("pbx_call_wait_bye.xml", calls=3, timeout=30, extra_args=["-l", "1"])
    assert pbx.wait(40) == 0, pbx.output()[-2000:]
    assert dest.wait(10) == 0, dest.output()[-2000:]
    assert len(dest.sent_requests("BYE")) == 3
    assert len(pbx.received_requests("BYE")) == 3  # the agent ended leg A when leg B ended
    wait_until(lambda: metric(lab.agent, "uac_agent_calls_total", result="answered") == 3, 10, "3 answered")


@pytest.mark.parametrize(("code", "result"), [(486, "busy"), (404, "failed"), (603, "declined")])
def test_destination_failure_code_is_relayed(call_lab: Callable[..., CallLab], code: int, result: str) -> None:
    lab = call_lab()
    dest = lab.dest(f"dest_reject_{code}.xml")
    pbx = lab.pbx("pbx_call.xml", timeout=20)
    assert pbx.wait(30) == 0, pbx.output()[-2000:]
    assert dest.wait(10) == 0, dest.output()[-2000:]
    finals = [m.status_code for m in pbx.received_responses() if m.cseq_method == "INVITE"]
    assert code in finals and 200 not in finals, finals
    wait_until(lambda: metric(lab.agent, "uac_agent_calls_total", result=result) == 1, 10, f"{result} counted")
    ended = lab.agent.events("call_ended")
    assert ended and ended[0]["code"] == code and ended[0]["result"] == result


def test_pbx_cancel_while_ringing_cancels_leg_b(call_lab: Callable[..., CallLab]) -> None:
    lab = call_lab()
    dest = lab.dest("dest_ring.xml")
    pbx = lab.pbx("pbx_call_cancel.xml", timeout=20)
    assert pbx.wait(30) == 0, pbx.output()[-2000:]
    assert dest.wait(10) == 0, dest.output()[-2000:]
    assert len(dest.received_requests("CANCEL")) == 1
    assert len(pbx.received_responses(487)) >= 1
    wait_until(lambda: metric(lab.agent, "uac_agent_calls_total", result="cancelled") == 1, 10, "cancelled counted")


def test_ring_timeout_cancels_leg_b_and_answers_480(call_lab: Callable[..., CallLab]) -> None:
    lab = call_lab(internal={"ring_timeout_sec": 2})
    dest = lab.dest("dest_ring.xml")
    pbx = lab.pbx("pbx_call.xml", timeout=20)
    assert pbx.wait(30) == 0, pbx.output()[-2000:]
    assert dest.wait(10) == 0, dest.output()[-2000:]
    assert len(dest.received_requests("CANCEL")) == 1
    assert [m.status_code for m in pbx.received_responses(480)]
    wait_until(lambda: metric(lab.agent, "uac_agent_calls_total", result="no_answer") == 1, 10, "no_answer counted")


def test_rtp_is_bridged_both_ways_and_dtmf_is_relayed(call_lab: Callable[..., CallLab]) -> None:
    lab = call_lab()
    pbx_rtp = RtpEndpoint(free_port(), PBX_PATTERN).start()
    dest_rtp = RtpEndpoint(free_port(), DEST_PATTERN).start()
    try:
        dest = lab.dest("dest_answer.xml", rtp_port=str(dest_rtp.port))
        pbx = lab.pbx("pbx_call.xml", rtp_port=pbx_rtp.port, timeout=30, extra_args=["-d", "6000"])
        connect_media(pbx, dest, pbx_rtp, dest_rtp)
        wait_until(lambda: pbx_rtp.packets_in > 0 and dest_rtp.packets_in > 0, 10, "RTP at both ends")
        offer = dest.received_requests("INVITE")[0].body
        te = re.search(r"a=rtpmap:(\d+) telephone-event/8000", offer)
        assert te is not None, offer
        dest_rtp.event_pt = int(te.group(1))  # leg B uses the payload type the agent offered
        pbx_rtp.send_digits("159#")
        wait_until(lambda: dest_rtp.digits == list("159#"), 5, "RFC 2833 digits at the destination")
        dest_rtp.send_digits("42")
        wait_until(lambda: pbx_rtp.digits == list("42"), 5, "RFC 2833 digits back at the PBX")
        assert pbx.wait(30) == 0, pbx.output()[-2000:]
        dest.stop()
    finally:
        pbx_rtp.stop()
        dest_rtp.stop()
    # each end received the other end's audio (the byte pattern survives the bridge)
    assert dest_rtp.count_of(PBX_PATTERN) > 100, dest_rtp.received
    assert pbx_rtp.count_of(DEST_PATTERN) > 100, pbx_rtp.received


def test_183_early_media_is_relayed_and_bridged_before_the_answer(call_lab: Callable[..., CallLab]) -> None:
    lab = call_lab()
    pbx_rtp = RtpEndpoint(free_port(), PBX_PATTERN).start()
    dest_rtp = RtpEndpoint(free_port(), DEST_PATTERN).start()
    try:
        dest = lab.dest("dest_early_media.xml", rtp_port=str(dest_rtp.port))  # 183 + SDP, 200 after 2 s
        pbx = lab.pbx("pbx_call.xml", rtp_port=pbx_rtp.port, timeout=30, extra_args=["-d", "1000"])
        connect_media(pbx, dest, pbx_rtp, dest_rtp, code=183)
        wait_until(lambda: pbx_rtp.count_of(DEST_PATTERN) >= 25, 10, "the destination's early media at the PBX")
        heard_at = time.time()
        assert pbx.wait(30) == 0, pbx.output()[-2000:]
        dest.stop()
    finally:
        pbx_rtp.stop()
        dest_rtp.stop()
    progress = pbx.received_responses(183)
    assert progress and "m=audio" in progress[0].body, "183 without SDP at the PBX"
    (answer,) = [m for m in pbx.received_responses(200) if m.cseq_method == "INVITE"][:1]
    # 25 packets of the destination's audio (0.5 s) reached the PBX before leg A was answered
    assert heard_at < answer.timestamp, (heard_at, answer.timestamp)
    assert answer.timestamp - progress[0].timestamp > 1.5  # the 2 s of early media, then the answer
    assert dest_rtp.count_of(PBX_PATTERN) > 0  # bridged both ways
    wait_until(lambda: metric(lab.agent, "uac_agent_calls_total", result="answered") == 1, 5, "answered counted")


def test_sip_info_dtmf_is_relayed(call_lab: Callable[..., CallLab]) -> None:
    lab = call_lab()
    dest = lab.dest("dest_answer.xml")
    pbx = lab.pbx("pbx_call_info.xml", timeout=20, variables={"digit": "7"})
    assert pbx.wait(30) == 0, pbx.output()[-2000:]
    wait_until(lambda: len(dest.received_requests("BYE")) == 1, 10, "BYE at the destination")
    dest.stop()
    infos = dest.received_requests("INFO")
    assert len(infos) == 1
    assert "Signal=7" in infos[0].body.replace(" ", "")


def test_source_not_allowed_gets_403_and_destination_sees_nothing(call_lab: Callable[..., CallLab]) -> None:
    lab = call_lab()
    dest = lab.dest("dest_answer.xml")
    # straight to the agent's Contact from 127.0.0.2: not the PBX (Kamailio on 127.0.0.1)
    intruder = lab.pbx("pbx_call.xml", host="127.0.0.2", via_kamailio=False, timeout=10)
    assert intruder.wait(20) == 0, intruder.output()[-2000:]
    dest.stop()
    assert [m.status_code for m in intruder.received_responses(403)]
    assert dest.received_requests("INVITE") == []
    wait_until(
        lambda: metric(lab.agent, "uac_agent_inbound_rejected_total", reason="source_not_allowed") == 1,
        5,
        "rejection counted",
    )
    rejected = lab.agent.events("call_rejected")
    assert rejected[0]["reason"] == "source_not_allowed" and "127.0.0.2" in rejected[0]["source"]


def test_allowed_sources_admits_another_address(call_lab: Callable[..., CallLab]) -> None:
    lab = call_lab(internal={"allowed_sources": ["127.0.0.2/32"]})
    dest = lab.dest("dest_answer.xml")
    pbx = lab.pbx("pbx_call.xml", host="127.0.0.2", via_kamailio=False, timeout=20)
    assert pbx.wait(30) == 0, pbx.output()[-2000:]
    wait_until(lambda: len(dest.received_requests("BYE")) == 1, 10, "call completed")
    dest.stop()


def test_unknown_contact_gets_404(call_lab: Callable[..., CallLab]) -> None:
    lab = call_lab()
    s = Sipp(
        scenario_path("pbx_call.xml"),
        free_port(),
        variables={"caller": "1000", "sdp_user": "pbx", "rtp_port": free_port(), "ruri_params": ";line=nope"},
        workdir=lab.workdir / "unknown",
        remote=f"127.0.0.1:{lab.agent.sip_port}",
        service="nobody",
        timeout=10,
    )
    s.start()
    assert s.wait(20) == 0, s.output()[-2000:]
    assert [m.status_code for m in s.received_responses(404)]
    wait_until(
        lambda: metric(lab.agent, "uac_agent_inbound_rejected_total", reason="unknown_contact") == 1, 5, "counted"
    )


def test_redirect_mode_answers_302_with_destination(call_lab: Callable[..., CallLab]) -> None:
    lab = call_lab(internal={"forward_mode": "redirect"})
    pbx = lab.pbx("pbx_call.xml", timeout=20)
    assert pbx.wait(30) == 0, pbx.output()[-2000:]
    redirects = pbx.received_responses(302)
    assert redirects
    assert f"sip:1006@127.0.0.1:{lab.dest_port}" in (redirects[0].header("Contact") or "")
    wait_until(lambda: metric(lab.agent, "uac_agent_calls_total", result="redirected") == 1, 5, "counted")


def test_options_to_the_contact_gets_200(call_lab: Callable[..., CallLab]) -> None:
    lab = call_lab()
    s = Sipp(
        scenario_path("pbx_options.xml"),
        free_port(),
        workdir=lab.workdir / "options",
        remote=f"127.0.0.1:{lab.agent.sip_port}",
        service=USER,
        timeout=10,
    )
    s.start()
    assert s.wait(20) == 0, s.output()[-2000:]
    assert len(s.received_responses(200)) == 1


def test_calls_over_the_limit_get_486_and_registration_keeps_refreshing(call_lab: Callable[..., CallLab]) -> None:
    lab = call_lab(internal={"max_calls": 1}, expiration_sec=10)
    dest = lab.dest("dest_answer.xml", calls=100)
    flood_start = time.time()
    # a flood: 10 calls/s for 12 s, each held 3 s; only one at a time fits
    pbx = lab.pbx("pbx_call.xml", calls=120, timeout=40, extra_args=["-r", "10", "-d", "3000", "-l", "40"])
    assert pbx.wait(60) == 0, pbx.output()[-2000:]
    dest.stop()
    finals = [m.status_code for m in pbx.received_responses() if m.cseq_method == "INVITE" and m.status_code != 100]
    answered = finals.count(200)
    busy = len(pbx.received_responses(486))
    assert answered >= 3 and busy >= 60, (answered, busy)
    assert set(finals) <= {180, 200, 486}, set(finals)
    rejected = metric(lab.agent, "uac_agent_inbound_rejected_total", reason="over_limit")
    assert rejected >= 60
    # registration: refreshed on time through the flood (granted 10 s, refresh at 5 s)
    regs = [t for t, _, _ in lab.kamailio.registers(lab.user) if t >= flood_start]
    assert len(regs) >= 3
    gaps = [b - a for a, b in itertools.pairwise(regs)]
    assert max(gaps) < 8.0, gaps
    assert lab.agent.status("c-fwd")["registered"] is True


def test_calls_ending_as_new_ones_arrive_get_200_or_486_never_603(call_lab: Callable[..., CallLab]) -> None:
    """Short calls back to back at the limit: pjsua reuses a slot the moment a call ends.

    A leg dropped after its slot was reused used to hang up the new INVITE with
    pjsua2's default 603 (its destructor acts on the slot id). Every INVITE must
    get exactly one final answer, 200 or the agent's 486, and every 486 is counted.
    """
    lab = call_lab()  # sip.max_calls: 2
    dest = lab.dest("dest_answer.xml", calls=100)  # answers after 100 ms
    pbx = lab.pbx("pbx_call.xml", calls=60, timeout=40, extra_args=["-r", "17", "-d", "0", "-l", "10"])
    assert pbx.wait(60) == 0, pbx.output()[-2000:]
    dest.stop()
    finals: dict[str, list[int]] = {}
    for m in pbx.received_responses():
        code = m.status_code
        if m.cseq_method == "INVITE" and code is not None and code >= 200 and m.call_id:
            finals.setdefault(m.call_id, []).append(code)
    invites = {m.call_id for m in pbx.sent_requests("INVITE")}
    assert len(invites) == 60
    assert set(finals) == invites, f"{len(invites - set(finals))} INVITEs got no final answer"
    codes = [c for cs in finals.values() for c in set(cs)]
    assert all(len(set(cs)) == 1 for cs in finals.values()), finals  # one final per call (retransmits aside)
    assert set(codes) <= {200, 486}, sorted(set(codes))
    answered = codes.count(200)
    busy = codes.count(486)
    assert answered >= 20, (answered, busy)
    wait_until(
        lambda: metric(lab.agent, "uac_agent_inbound_rejected_total", reason="over_limit") == busy,
        5,
        f"{busy} over_limit rejections counted",
    )
    wait_until(
        lambda: metric(lab.agent, "uac_agent_calls_total", result="answered") == answered,
        5,
        f"{answered} answered calls counted",
    )
    log = lab.agent.log_path.read_text()
    assert "call_reject_failed" not in log
    assert lab.agent.status("c-fwd")["registered"] is True


EXTERNAL = {"external_signaling_address": "127.0.0.5", "external_media_address": "127.0.0.6"}


@pytest.mark.parametrize(
    ("transport", "sip", "sig", "media"),
    [
        pytest.param("UDP", EXTERNAL, "127.0.0.5", "127.0.0.6", id="external-udp"),
        pytest.param("TCP", EXTERNAL, "127.0.0.5", "127.0.0.6", id="external-tcp"),
        # no external address: the address of the interface that routes to each peer
        pytest.param("UDP", {}, "127.0.0.1", "127.0.0.1", id="routed"),
        # the peers are in local_nets: they are told the local address, not the external one
        pytest.param("UDP", {**EXTERNAL, "local_nets": ["127.0.0.0/8"]}, "127.0.0.1", "127.0.0.1", id="local-net"),
    ],
)
def test_bound_to_wildcard_advertises_the_right_addresses(
    call_lab: Callable[..., CallLab], transport: str, sip: dict[str, Any], sig: str, media: str
) -> None:
    """NAT/container: sockets on 0.0.0.0; the peers are told ``sig`` (Contact, leg B's From) and
    ``media`` (SDP). The binding carries it, the PBX's call reaches the agent through it, RTP flows
    both ways, and no message either peer saw names 0.0.0.0."""
    lab = call_lab(sip={"bind": "0.0.0.0", **sip}, transport=transport)
    binding = lab.kamailio.lookup(lab.user)
    assert binding is not None
    assert f"@{sig}:{lab.agent.sip_port}" in binding, binding
    pbx_rtp = RtpEndpoint(free_port(), PBX_PATTERN).start()
    dest_rtp = RtpEndpoint(free_port(), DEST_PATTERN).start()
    try:
        dest = lab.dest("dest_answer.xml", rtp_port=str(dest_rtp.port))
        pbx = lab.pbx("pbx_call.xml", rtp_port=pbx_rtp.port, timeout=30, extra_args=["-d", "3000"])
        # the NAT forwards what is sent to the external media address to the host's address
        # on loopback (the relay cannot bind a wildcard: it binds each local address)
        connect_media(pbx, dest, pbx_rtp, dest_rtp, nat={media: "127.0.0.1"})
        wait_until(lambda: pbx_rtp.count_of(DEST_PATTERN) > 20 and dest_rtp.count_of(PBX_PATTERN) > 20, 10, "RTP")
        assert pbx.wait(30) == 0, pbx.output()[-2000:]
        dest.stop()
    finally:
        pbx_rtp.stop()
        dest_rtp.stop()
    offer_b = dest.received_requests("INVITE")[0]
    answer_a = next(r for r in pbx.received_responses(200) if r.cseq_method == "INVITE")
    for msg in (offer_b, answer_a):
        assert f"c=IN IP4 {media}" in msg.body, msg.body
        assert re.search(rf"^o=.* IN IP4 {re.escape(media)}\s*$", msg.body, re.M), msg.body
    # leg B reaches the destination from the edge, which names itself as ``sig`` (the
    # edge is a proxy: From stays the caller's; Via and Record-Route are the edge's)
    assert f"SIP/2.0/UDP {sig}:{lab.agent.sip_port}" in offer_b.header_all("Via")[0], offer_b.header_all("Via")
    assert f"sip:{sig}:{lab.agent.sip_port}" in offer_b.header_all("Record-Route")[0], offer_b.headers
    # the PBX reaches the edge in the dialog at what it is told (Record-Route); the
    # destination's Contact is hidden from it
    assert f"sip:{sig}:{lab.agent.sip_port}" in ",".join(answer_a.header_all("Record-Route")), answer_a.headers
    assert f":{lab.dest_port}" not in (answer_a.header("Contact") or ""), answer_a.header("Contact")
    seen = [m.raw for m in (*dest.messages(), *pbx.messages())]
    assert not [raw for raw in seen if "0.0.0.0" in raw]


@pytest.mark.parametrize(("first", "pbx_code"), [("dest_reject_503.xml", 200), ("dest_reject_486.xml", 486)])
def test_destination_srv_fails_over_on_503_and_relays_486(
    call_lab: Callable[..., CallLab], tmp_path: Path, first: str, pbx_code: int
) -> None:
    """destination_uri's host has two SRV targets. The first answers 503: leg B is retried on the
    second, which answers, and the PBX never hears the 503. The first answers 486: the PBX gets 486."""
    p1, p2 = free_port(), free_port()
    name = "_sip._udp.app.lab.test"
    dns = Dnsmasq(
        tmp_path / "dns",
        srv=[(name, "d1.lab.test", p1, 10, 0), (name, "d2.lab.test", p2, 20, 0)],
        hosts={"d1.lab.test": ["127.0.0.1"], "d2.lab.test": ["127.0.0.1"]},
    ).start()
    try:
        lab = call_lab(internal={"destination_uri": "1006@app.lab.test"}, sip={"nameservers": [dns.address]})
        d1 = lab.dest(first, port=p1)
        d2 = lab.dest("dest_answer.xml", port=p2)
        pbx = lab.pbx("pbx_call.xml", timeout=20)
        assert pbx.wait(30) == 0, pbx.output()[-2000:]
        finals = [m.status_code for m in pbx.received_responses() if m.cseq_method == "INVITE"]
        assert pbx_code in finals, finals
        assert 503 not in finals
        invite = d1.received_requests("INVITE")[0]
        assert invite.first_line.split()[1] == "sip:1006@app.lab.test"  # the destination's URI, sent to its target
        if pbx_code == 200:
            assert [m.first_line.split()[1] for m in d2.received_requests("INVITE")] == ["sip:1006@app.lab.test"]
            failover = lab.agent.events("leg_b_failover")[0]
            assert failover["code"] == 503 and "d2.lab.test" in failover["target"]
            wait_until(
                lambda: metric(lab.agent, "uac_agent_failovers_total", connection_id="c-fwd", kind="leg_b") == 1,
                5,
                "the failover counted",
            )
            wait_until(lambda: metric(lab.agent, "uac_agent_calls_total", result="answered") == 1, 10, "answered")
        else:
            assert d2.received_requests("INVITE") == []  # a 486 is the destination's word: no failover
            wait_until(lambda: metric(lab.agent, "uac_agent_calls_total", result="busy") == 1, 10, "busy counted")
    finally:
        dns.stop()
