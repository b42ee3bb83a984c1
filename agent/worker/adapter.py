"""The thin layer over pjsua2: the only module that imports it.

Every method must be called on the thread that called :meth:`PjsuaAdapter.start`
(pjsua2's "main thread"; ``threadCnt = 0`` and ``mainThreadOnly``). Callbacks run
inside :meth:`handle_events` on that same thread; they only turn what happened
into event objects handed to ``sink`` and never let an exception escape.
"""

from __future__ import annotations

import gc
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pjsua2 as pj

from agent.addresses import is_wildcard
from agent.core.forwarding import request_uri
from agent.core.sipmsg import header_values, int_header, redact
from agent.ipc.messages import AccountSpec, StackSettings
from agent.worker.events import (
    FORWARD_KEY,
    CallDtmf,
    CallMedia,
    CallRefusedByStack,
    CallState,
    IncomingCall,
    KeepaliveResult,
    RegResult,
    RegStarted,
    SipEvent,
    StackLog,
    TransportDown,
)
from agent.worker.stack import LIMITS, NoCallSlotError, StackError

__all__ = ["AdapterError", "PjsuaAdapter"]

_CALL_STATES = {
    pj.PJSIP_INV_STATE_NULL: "null",
    pj.PJSIP_INV_STATE_CALLING: "calling",
    pj.PJSIP_INV_STATE_INCOMING: "incoming",
    pj.PJSIP_INV_STATE_EARLY: "early",
    pj.PJSIP_INV_STATE_CONNECTING: "connecting",
    pj.PJSIP_INV_STATE_CONFIRMED: "confirmed",
    pj.PJSIP_INV_STATE_DISCONNECTED: "disconnected",
}
_DTMF_METHODS = {"rfc2833": pj.PJSUA_DTMF_METHOD_RFC2833, "info": pj.PJSUA_DTMF_METHOD_SIP_INFO}
FORWARD_ACCOUNT = FORWARD_KEY
_TRANSPORTS = {"UDP": pj.PJSIP_TRANSPORT_UDP, "TCP": pj.PJSIP_TRANSPORT_TCP, "TLS": pj.PJSIP_TRANSPORT_TLS}


class AdapterError(StackError):
    """pjsua2 refused an operation; the message says which and why."""


def _err(e: Exception) -> str:
    info = getattr(e, "info", None)
    if callable(info):
        try:
            return str(info())
        except Exception:
            pass
    return str(e)


# pjsua walks the RTP port range and logs each port in use as an error before
# taking the next one; only running out of ports is an error (logged apart).
_PORT_IN_USE = re.compile(r"RTC?P socket bind\(\) .*Address already in use")


class _LogWriter(pj.LogWriter):  # type: ignore[misc]
    def __init__(self, sink: Callable[[SipEvent], None]) -> None:
        super().__init__()
        self._sink = sink
        self.probing = False  # the reaper's getInfo on a freed slot fails by design

    def write(self, entry: Any) -> None:
        try:
            level, msg = int(entry.level), redact(str(entry.msg)).rstrip()
            if level <= 1 and _PORT_IN_USE.search(msg):
                level = 4
            elif self.probing and "pjsua_call_get_info" in msg:
                return
            if "too many calls" in msg and "incoming" in msg:
                # pjsua answered an INVITE 486 itself: every call slot was in use
                self._sink(CallRefusedByStack(reason="all SIP call slots in use"))
                return
            self._sink(StackLog(level=level, message=msg))
        except Exception:
            pass


class _Endpoint(pj.Endpoint):  # type: ignore[misc]
    def __init__(self, sink: Callable[[SipEvent], None]) -> None:
        super().__init__()
        self._sink = sink

    def onTransportState(self, prm: Any) -> None:  # noqa: N802 - pjsua2's name
        try:
            if prm.state == pj.PJSIP_TP_STATE_DISCONNECTED:
                tls = prm.tlsInfo
                remote = "" if tls.isEmpty() else str(tls.remoteAddr)
                self._sink(TransportDown(kind=str(prm.type), remote=remote, error=self.utilStrError(prm.lastError)))
        except Exception as e:
            self._sink(StackLog(level=1, message=f"onTransportState failed: {e!r}"))


class _Call(pj.Call):  # type: ignore[misc]
    """One call leg; ``leg`` is the agent's own id (pjsua reuses call ids)."""

    def __init__(
        self,
        acc: pj.Account,
        leg: int,
        sink: Callable[[SipEvent], None],
        on_gone: Callable[[int, bool], None],
        call_id: int | None = None,
    ) -> None:
        if call_id is None:
            super().__init__(acc)
        else:
            super().__init__(acc, call_id)
        self.leg = leg
        self._sink = sink
        self._on_gone = on_gone
        self.sip_call_id = ""
        # Set while the adapter ends this leg itself (BYE, CANCEL, a final
        # response): pjsua then reports DISCONNECTED at once but keeps the call
        # slot until that transaction completes, and says nothing when it does.
        self.ending = False

    def onCallState(self, prm: Any) -> None:  # noqa: N802
        try:
            ci = self.getInfo()
            state = _CALL_STATES.get(ci.state, str(ci.state))
            self.sip_call_id = str(ci.callIdString) or self.sip_call_id
            self._sink(
                CallState(
                    leg=self.leg,
                    state=state,
                    code=int(ci.lastStatusCode),
                    reason=str(ci.lastReason),
                    call_id=self.sip_call_id,
                )
            )
        except Exception as e:
            self._sink(StackLog(level=1, message=f"onCallState failed: {e!r}"))
            return
        if state == "disconnected":
            self._on_gone(self.leg, self.ending)

    def onCallMediaState(self, prm: Any) -> None:  # noqa: N802
        try:
            ci = self.getInfo()
            active = any(
                m.type == pj.PJMEDIA_TYPE_AUDIO
                and m.status in (pj.PJSUA_CALL_MEDIA_ACTIVE, pj.PJSUA_CALL_MEDIA_REMOTE_HOLD)
                for m in ci.media
            )
            self._sink(CallMedia(leg=self.leg, active=active))
        except Exception as e:
            self._sink(StackLog(level=1, message=f"onCallMediaState failed: {e!r}"))

    def onDtmfDigit(self, prm: Any) -> None:  # noqa: N802
        try:
            method = "info" if prm.method == pj.PJSUA_DTMF_METHOD_SIP_INFO else "rfc2833"
            self._sink(CallDtmf(leg=self.leg, digit=str(prm.digit), method=method, duration_ms=int(prm.duration)))
        except Exception as e:
            self._sink(StackLog(level=1, message=f"onDtmfDigit failed: {e!r}"))


@contextmanager
def _ending(call: _Call, final: bool = True) -> Iterator[None]:
    """Mark ``call`` as ended by the agent while pjsua runs the operation (see _Call.ending)."""
    call.ending = final
    try:
        yield
    finally:
        call.ending = False


class _Account(pj.Account):  # type: ignore[misc]
    def __init__(
        self,
        key: str,
        sink: Callable[[SipEvent], None],
        on_incoming: Callable[[_Account, Any], None] | None = None,
    ) -> None:
        super().__init__()
        self.key = key
        self._sink = sink
        self.removed = False  # set before shutdown(): a removed account's late reports are dropped
        self._on_incoming = on_incoming

    def onIncomingCall(self, prm: Any) -> None:  # noqa: N802
        try:
            if self._on_incoming is not None:
                self._on_incoming(self, prm)
        except Exception as e:
            self._sink(StackLog(level=1, message=f"onIncomingCall failed: {e!r}"))

    def onRegStarted(self, prm: Any) -> None:  # noqa: N802
        if self.removed:
            return
        try:
            self._sink(RegStarted(key=self.key, renew=bool(prm.renew)))
        except Exception as e:
            self._sink(StackLog(level=1, message=f"onRegStarted failed: {e!r}"))

    def onRegState(self, prm: Any) -> None:  # noqa: N802
        if self.removed:
            return
        try:
            whole = str(prm.rdata.wholeMsg or "")
            src = str(prm.rdata.srcAddress or "")
            self._sink(
                RegResult(
                    key=self.key,
                    code=int(prm.code),
                    reason=str(prm.reason),
                    expiration=int(prm.expiration),
                    status=int(prm.status),
                    received=bool(whole),
                    source=src,
                    retry_after=int_header(whole, "Retry-After") if whole else None,
                    min_expires=int_header(whole, "Min-Expires") if whole else None,
                )
            )
        except Exception as e:
            self._sink(StackLog(level=1, message=f"onRegState failed: {e!r}"))

    def onSendRequest(self, prm: Any) -> None:  # noqa: N802 - the end of a keepalive OPTIONS
        if self.removed:
            return
        try:
            tsx_event = prm.e.body.tsxState
            tsx = tsx_event.tsx
            received = int(tsx_event.type) == pj.PJSIP_EVENT_RX_MSG
            self._sink(
                KeepaliveResult(key=self.key, code=int(tsx.statusCode), reason=str(tsx.statusText), received=received)
            )
        except Exception as e:
            self._sink(StackLog(level=1, message=f"onSendRequest failed: {e!r}"))


class PjsuaAdapter:
    """One pjsua2 Endpoint with UDP/TCP(/TLS) transports and up to 8 accounts."""

    def __init__(self, sink: Callable[[SipEvent], None]) -> None:
        self._sink = sink
        self._ep: _Endpoint | None = None
        self._writer: _LogWriter | None = None
        self._transport_ids: dict[str, int] = {}
        self._accounts: dict[str, _Account] = {}
        self._configs: dict[str, Any] = {}  # each account's AccountConfig, for modify()
        self._forward: _Account | None = None
        self._calls: dict[int, _Call] = {}
        # Legs reported DISCONNECTED whose pjsua slot is still held (see _Call.ending).
        self._closing: dict[int, _Call] = {}
        self.leaked_calls = 0
        self._call_slots = 4
        self._next_leg = 1
        self._media: tuple[str, int, int] = ("127.0.0.1", 40000, 1000)
        # The null sound device runs a clock thread (50 wake-ups a second) that
        # bridged audio needs; it is opened for the first bridge and closed once
        # no call leg is left, so an idle worker has no such thread.
        self._clock_on = False
        self._udp_keepalive = 0
        self._port = 0
        # The host leg B's From and the forward account name (never 0.0.0.0); set by start().
        self.published_host = "127.0.0.1"
        self._forward_cfg: Any = None
        self._forward_default_media: str | None = None
        self._forward_now: tuple[str | None, str | None] = (None, None)  # (media address, route) set now

    def start(self, s: StackSettings) -> None:
        ep = _Endpoint(self._sink)
        # pjlib prints a banner to stdout before our log writer is installed;
        # keep stdout for the agent's JSON lines only.
        saved = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            sys.stdout.flush()
            os.dup2(devnull, 1)
            ep.libCreate()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(devnull)
        self._ep = ep
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = True
        cfg.uaConfig.userAgent = s.user_agent
        if s.call_slots > LIMITS.call_slots:  # the wheel would ignore it: a 5th call would fail
            raise AdapterError(f"{s.call_slots} call slots asked, the stack has {LIMITS.call_slots}")
        cfg.uaConfig.maxCalls = s.call_slots
        self._call_slots = s.call_slots
        self._writer = _LogWriter(self._sink)
        cfg.logConfig.writer = self._writer
        level = 5 if s.trace else s.log_level
        cfg.logConfig.level = level
        # pjsua hands a message to the writer only up to consoleLevel; the writer
        # replaces the console, so nothing is printed by pjsip itself.
        cfg.logConfig.consoleLevel = level
        cfg.logConfig.msgLogging = 1 if s.trace else 0
        cfg.logConfig.decor = 0
        cfg.medConfig.noVad = True
        # RTP shares the SIP sockets' ioqueue, polled by handle_events: no media
        # thread (with its own ioqueue pjmedia polls it every 10 ms, 0.65 % of a
        # core in an idle worker).
        cfg.medConfig.threadCnt = 0
        cfg.medConfig.hasIoqueue = False
        cfg.medConfig.clockRate = 8000  # G.711 bridging without resampling
        cfg.medConfig.sndClockRate = 8000
        self._media = (s.rtp_address, s.rtp_port, s.rtp_port_range)
        self._udp_keepalive = s.udp_keepalive_sec
        self._port = s.port
        try:
            ep.libInit(cfg)
            ep.audDevManager().setNoDev()
            for name in ("UDP", "TCP"):
                tc = pj.TransportConfig()
                tc.boundAddress = s.bind
                tc.publicAddress = s.public_address or ""  # Via (and Contact): "" is the stack's choice
                tc.port = s.port
                self._transport_ids[name] = ep.transportCreate(_TRANSPORTS[name], tc)
            if s.want_tls:
                tc = pj.TransportConfig()
                tc.boundAddress = s.bind
                tc.publicAddress = s.public_address or ""
                tc.port = s.tls_port
                tc.tlsConfig.method = pj.PJSIP_TLSV1_2_METHOD
                tc.tlsConfig.verifyServer = s.tls_verify_server
                if s.tls_ca_file is not None:
                    tc.tlsConfig.CaListFile = s.tls_ca_file
                self._transport_ids["TLS"] = ep.transportCreate(_TRANSPORTS["TLS"], tc)
            ep.libStart()
            # Never 0.0.0.0: with a wildcard bind the UDP transport publishes the stack's choice.
            self.published_host = s.leg_b_host or str(ep.transportGetInfo(self._transport_ids["UDP"]).localName)
            self.published_host = self.published_host.rsplit(":", 1)[0].strip("[]")
            self._forward = self._create_forward_account(s)
        except Exception as e:
            raise AdapterError(f"SIP stack failed to start on {s.bind}:{s.port}: {_err(e)}") from None

    def _media_config(self, ac: Any, advertised: str | None) -> None:
        """RTP bound to rtp_address; SDP c=/o= carry ``advertised`` ("": the stack's choice, never 0.0.0.0)."""
        addr, port, port_range = self._media
        tc = ac.mediaConfig.transportConfig
        tc.boundAddress = addr
        tc.publicAddress = advertised or ("" if is_wildcard(addr) else addr)
        tc.port = port
        tc.portRange = port_range

    def _create_forward_account(self, s: StackSettings) -> _Account:
        """The agent's own account for leg B of bridged calls: no registration,
        no credentials (a destination's challenge is never answered with a PBX
        password) and no outbound proxy (leg B never goes through the PBX)."""
        ac = pj.AccountConfig()
        host = f"[{self.published_host}]" if ":" in self.published_host else self.published_host
        ac.idUri = f"sip:{s.user_agent.split('/')[0] or 'uac-agent'}@{host}:{s.port}"
        ac.regConfig.registerOnAdd = False
        ac.natConfig.sipOutboundUse = 0
        ac.natConfig.contactRewriteUse = 0
        ac.natConfig.viaRewriteUse = 0
        ac.natConfig.sdpNatRewriteUse = 0
        self._media_config(ac, s.leg_b_media_address)
        self._forward_cfg = ac
        self._forward_default_media = s.leg_b_media_address
        self._forward_now = (s.leg_b_media_address, None)
        acc = _Account(FORWARD_ACCOUNT, self._sink, self._incoming)
        acc.create(ac, True)
        return acc

    @property
    def account_count(self) -> int:
        return len(self._accounts)

    def add_account(self, spec: AccountSpec, route: str | None = None) -> None:
        """``route``: where REGISTERs and keepalives go (a target of the next hop, agent/core/targets.py)
        instead of ``spec.proxies``."""
        if spec.key in self._accounts:
            raise AdapterError(f"connection {spec.key} already has an account")
        if len(self._accounts) >= LIMITS.connections:
            raise AdapterError(f"at most {LIMITS.connections} connections per worker process")
        if spec.transport not in self._transport_ids:
            raise AdapterError(f"transport {spec.transport} is not available")
        ac = pj.AccountConfig()
        ac.idUri = spec.id_uri
        ac.regConfig.registrarUri = spec.registrar_uri
        ac.regConfig.registerOnAdd = False
        ac.regConfig.timeoutSec = spec.expires
        ac.regConfig.retryIntervalSec = 0  # the agent's policy owns every retry
        ac.regConfig.firstRetryIntervalSec = 0
        ac.regConfig.randomRetryIntervalSec = 0
        ac.regConfig.delayBeforeRefreshSec = 1  # stack refresh is only a late backstop
        ac.regConfig.unregWaitMsec = 2000
        ac.regConfig.dropCallsOnFail = False
        ac.sipConfig.contactUriParams = spec.contact_uri_params
        if spec.contact_host and spec.transport != "TLS":
            # This peer is told another address than the transport's (agent/addresses.py). TLS
            # keeps the transport's: its Contact names the connection's own port.
            user = spec.id_uri.split(":", 1)[1].split("@", 1)[0]
            h = f"[{spec.contact_host}]" if ":" in spec.contact_host else spec.contact_host
            tp = ";transport=tcp" if spec.transport == "TCP" else ""
            ac.sipConfig.contactForced = f"<sip:{user}@{h}:{self._port}{tp}{spec.contact_uri_params}>"
        ac.sipConfig.transportId = self._transport_ids[spec.transport]
        for proxy in [f"{route};lr"] if route else spec.proxies:
            ac.sipConfig.proxies.append(proxy)
        ac.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", spec.auth_username, 0, spec.password))
        ac.natConfig.sipOutboundUse = 0
        ac.natConfig.contactRewriteUse = 0
        ac.natConfig.viaRewriteUse = 0
        ac.natConfig.sdpNatRewriteUse = 0
        ac.natConfig.sipStunUse = pj.PJSUA_STUN_USE_DISABLED
        ac.natConfig.mediaStunUse = pj.PJSUA_STUN_USE_DISABLED
        # A TCP Contact names the worker's listening port (sip.port + k), not the
        # connection's ephemeral one: a replacement worker registers the same
        # Contact, so the registrar replaces the binding instead of keeping a dead
        # one beside it. TLS keeps the connection's port: the agent has no server
        # certificate, so the PBX must reuse the agent's own connection.
        ac.natConfig.contactUseSrcPort = spec.transport != "TCP"
        # pjsua would send a CRLF to the registrar every 15 s for each UDP
        # registration; only on request (sip.udp_keepalive_sec), for a NAT between.
        ac.natConfig.udpKaIntervalSec = self._udp_keepalive
        self._media_config(ac, spec.media_address)
        acc = _Account(spec.key, self._sink, self._incoming)
        try:
            acc.create(ac, False)
        except Exception as e:
            raise AdapterError(f"connection {spec.key}: account rejected by the SIP stack: {_err(e)}") from None
        self._accounts[spec.key] = acc
        self._configs[spec.key] = ac

    def set_route(self, key: str, route: str) -> None:
        """Register at ``route`` now, and send this account's later REGISTERs and keepalives there.

        pjsua re-creates the registration session for a new route set: it unregisters the
        binding at the old target (which may be dead: nothing waits for that answer) and
        registers at the new one; that REGISTER's answer comes back as any other
        (pjsua 2.15 keeps the old session, and its route, when told not to register)."""
        acc, ac = self._accounts.get(key), self._configs.get(key)
        if acc is None or ac is None:
            raise AdapterError(f"connection {key} has no account")
        ac.sipConfig.proxies.clear()
        ac.sipConfig.proxies.append(f"{route};lr")
        ac.regConfig.disableRegOnModify = False
        try:
            acc.modify(ac)
        except Exception as e:
            raise AdapterError(f"route {route} refused by the SIP stack: {_err(e)}") from None

    def probe(self, target_uri: str) -> None:
        """An OPTIONS from the worker's own account to ``target_uri`` (another target of a registrar);
        its end comes back as a KeepaliveResult with key FORWARD_KEY."""
        if self._forward is None:
            raise AdapterError("the SIP stack is not started")
        self._forward_setup(self._forward_now[0], None)  # straight to the target, not via leg B's last route
        prm = pj.SendRequestParam()
        prm.method = "OPTIONS"
        prm.txOption.targetUri = target_uri
        try:
            self._forward.sendRequest(prm)
        except Exception as e:
            raise AdapterError(_err(e)) from None

    def register(self, key: str) -> None:
        self._set_registration(key, True)

    def unregister(self, key: str) -> None:
        self._set_registration(key, False)

    def _set_registration(self, key: str, renew: bool) -> None:
        acc = self._accounts.get(key)
        if acc is None:
            raise AdapterError(f"connection {key} has no account")
        try:
            acc.setRegistration(renew)
        except Exception as e:
            raise AdapterError(_err(e)) from None

    def send_keepalive(self, key: str, target_uri: str) -> None:
        """An OPTIONS from account ``key`` to ``target_uri`` over its transport and route set; its end
        comes back as a KeepaliveResult."""
        acc = self._accounts.get(key)
        if acc is None:
            raise AdapterError(f"connection {key} has no account")
        prm = pj.SendRequestParam()
        prm.method = "OPTIONS"
        prm.txOption.targetUri = target_uri
        try:
            acc.sendRequest(prm)
        except Exception as e:
            raise AdapterError(_err(e)) from None

    def remove_account(self, key: str) -> None:
        acc = self._accounts.pop(key, None)
        self._configs.pop(key, None)
        if acc is not None:
            acc.removed = True  # its account may be re-created under the same key at once
            acc.shutdown()

    # -- calls ------------------------------------------------------------

    def _incoming(self, acc: _Account, prm: Any) -> None:
        """In the callback: keep the leg (a strong reference) and report it."""
        slot = int(prm.callId)
        self._forget_slot(slot)
        leg = self._new_leg()
        call = _Call(acc, leg, self._sink, self._gone, slot)
        self._calls[leg] = call
        whole = str(prm.rdata.wholeMsg or "")
        froms = header_values(whole, "From") or header_values(whole, "f")
        call_ids = header_values(whole, "Call-ID") or header_values(whole, "i")
        call.sip_call_id = call_ids[0] if call_ids else ""
        self._sink(
            IncomingCall(
                leg=leg,
                request_uri=request_uri(whole),
                source=str(prm.rdata.srcAddress or ""),
                call_id=call_ids[0] if call_ids else "",
                from_value=froms[0] if froms else "",
            )
        )

    def _new_leg(self) -> int:
        leg = self._next_leg
        self._next_leg += 1
        return leg

    @property
    def call_count(self) -> int:
        return len(self._calls)

    @property
    def free_call_slots(self) -> int:
        """pjsua call slots neither in use nor still closing."""
        return max(0, self._call_slots - len(self._calls) - len(self._closing))

    def _call(self, leg: int) -> _Call:
        call = self._calls.get(leg)
        if call is None:
            raise AdapterError(f"call leg {leg} is gone")
        return call

    def answer(self, leg: int, code: int, contact: str | None = None, retry_after: int | None = None) -> None:
        """Send a provisional or final response to an incoming leg (302 with ``contact``)."""
        prm = pj.CallOpParam(True)
        prm.statusCode = code
        for name, value in (("Contact", contact), ("Retry-After", retry_after)):
            if value is not None:
                h = pj.SipHeader()
                h.hName = name
                h.hValue = str(value)
                prm.txOption.headers.append(h)
        call = self._call(leg)
        try:
            with _ending(call, final=code >= 300):
                if code >= 300 and contact is None:
                    call.hangup(prm)
                else:
                    call.answer(prm)
        except AdapterError:
            raise
        except Exception as e:
            raise AdapterError(f"answer {code} on leg {leg}: {_err(e)}") from None

    def hangup(self, leg: int, code: int = 0) -> None:
        """End a leg: CANCEL, BYE or a final response, whichever its state needs."""
        call = self._calls.get(leg)
        if call is None:
            return
        prm = pj.CallOpParam(True)
        if code:
            prm.statusCode = code
        try:
            if call.isActive():
                with _ending(call):
                    call.hangup(prm)
        except Exception as e:
            raise AdapterError(f"hangup leg {leg}: {_err(e)}") from None

    def make_call(
        self, dest_uri: str, from_uri: str | None, media_address: str | None = None, target: str | None = None
    ) -> tuple[int, str]:
        """Leg B: INVITE ``dest_uri`` from the agent's own account, its SDP naming
        ``media_address`` (None: the worker's default), sent to ``target`` (a Route: one of the
        destination host's DNS targets) when given. (leg, Call-ID)."""
        if self._forward is None:
            raise AdapterError("the SIP stack is not started")
        if self.free_call_slots < 1:
            # A Call whose makeCall fails cannot be deleted (pjsua2 asserts on
            # its invalid id and aborts): never start one without a free slot.
            raise NoCallSlotError(f"all {self._call_slots} call slots are in use")
        self._forward_setup(media_address, target)
        leg = self._new_leg()
        call = _Call(self._forward, leg, self._sink, self._gone)
        prm = pj.CallOpParam(True)
        prm.opt.audioCount = 1
        prm.opt.videoCount = 0
        if from_uri:
            prm.txOption.localUri = from_uri
        try:
            call.makeCall(dest_uri, prm)
        except Exception as e:
            call.thisown = False  # leak the C++ object rather than abort in its destructor
            self.leaked_calls += 1
            text = _err(e)
            if "PJ_ETOOMANY" in text:
                raise NoCallSlotError(f"INVITE to {dest_uri} not sent: no free call slot") from None
            raise AdapterError(f"INVITE to {dest_uri} not sent: {text}") from None
        self._forget_slot(int(call.getId()))
        self._calls[leg] = call
        try:
            call.sip_call_id = call_id = str(call.getInfo().callIdString)
        except Exception:
            call_id = ""
        return leg, call_id

    def _forward_setup(self, media_address: str | None, target: str | None) -> None:
        """pjsua2 takes a call's SDP address and route set from its account: the forward account
        is modified when this leg's destination is told another address, or is reached through
        another target (calls already set up keep theirs). A route set also spares pjsua a
        lookup of the destination's host name (it resolves the first hop to choose a transport:
        with a target, that is an address)."""
        want = (media_address or self._forward_default_media, target)
        if want == self._forward_now or self._forward is None or self._forward_cfg is None:
            return
        ac = self._forward_cfg
        self._media_config(ac, want[0])
        ac.sipConfig.proxies.clear()
        if target:
            ac.sipConfig.proxies.append(f"{target};lr")
        try:
            self._forward.modify(ac)
            self._forward_now = want
        except Exception as e:
            raise AdapterError(f"leg B setup ({want[0]}, {target}) refused by the SIP stack: {_err(e)}") from None

    def bridge(self, a: int, b: int) -> bool:
        """Connect the audio of two legs both ways; False while either has none."""
        ca, cb = self._calls.get(a), self._calls.get(b)
        if ca is None or cb is None or not ca.hasMedia() or not cb.hasMedia():
            return False
        try:
            if not self._clock_on and self._ep is not None:
                self._ep.audDevManager().setNullDev()  # the conference bridge's clock
                self._clock_on = True
            ma, mb = ca.getAudioMedia(-1), cb.getAudioMedia(-1)
            ma.startTransmit(mb)
            mb.startTransmit(ma)
        except Exception as e:
            raise AdapterError(f"bridge legs {a} and {b}: {_err(e)}") from None
        return True

    def send_dtmf(self, leg: int, digit: str, method: str, duration_ms: int = 0) -> None:
        call = self._call(leg)
        prm = pj.CallSendDtmfParam()
        prm.method = _DTMF_METHODS[method]
        prm.digits = digit
        if duration_ms > 0:
            prm.duration = duration_ms
        try:
            call.sendDtmf(prm)
        except Exception as e:
            raise AdapterError(f"DTMF {digit!r} on leg {leg}: {_err(e)}") from None

    def _gone(self, leg: int, held: bool) -> None:
        """Inside a leg's DISCONNECTED callback: drop it, or park it while pjsua holds its slot.

        Dropped here, pjsua2 deletes the Call as the callback returns, while the
        slot is still this call's. Any later and ~Call would act on a slot id
        that pjsua may have given to a new INVITE: it clears that call's user
        data and hangs it up with 603.
        """
        call = self._calls.pop(leg, None)
        if held and call is not None:
            self._closing[leg] = call

    def _forget_slot(self, slot: int) -> None:
        """pjsua gave ``slot`` to a new call: a parked leg on it must never be deleted."""
        for leg, call in list(self._closing.items()):
            if call.getId() == slot:
                del self._closing[leg]
                call.thisown = False  # its destructor would hang up the new call
                self.leaked_calls += 1
                self._sink(StackLog(level=4, message=f"call slot {slot} reused before leg {leg} was freed: leg kept"))

    def _reap(self) -> None:
        """Delete parked legs whose slot pjsua has freed (outside callbacks)."""
        for leg, call in list(self._closing.items()):
            if self._writer is not None:
                self._writer.probing = True
            try:
                current = str(call.getInfo().callIdString)
            except Exception:
                del self._closing[leg]  # slot free: ~Call finds no call on it
                continue
            finally:
                if self._writer is not None:
                    self._writer.probing = False
            if current != call.sip_call_id:
                self._forget_slot(call.getId())  # freed and reused in one poll

    def release(self, leg: int) -> None:
        """Drop a leg the router has finished with (idempotent; on the owning thread).

        Parked, not deleted: the reaper deletes it once pjsua has freed its slot.
        """
        call = self._calls.pop(leg, None)
        if call is not None:
            self._closing[leg] = call

    def call_stats(self, leg: int) -> tuple[int, int]:
        """(RTP packets received, sent) on a leg's audio stream."""
        call = self._call(leg)
        try:
            st = call.getStreamStat(0)
            return int(st.rtcp.rxStat.pkt), int(st.rtcp.txStat.pkt)
        except Exception:
            return 0, 0

    @property
    def busy(self) -> bool:
        """Call legs exist or are closing (the reaper then needs frequent polls)."""
        return bool(self._calls or self._closing)

    def handle_events(self, msec: int) -> None:
        if self._ep is not None:
            self._ep.libHandleEvents(msec)
            if self._closing:
                self._reap()
            if self._clock_on and not self._calls and not self._closing:
                try:
                    self._ep.audDevManager().setNoDev()
                except Exception as e:
                    self._sink(StackLog(level=2, message=f"closing the null sound device failed: {_err(e)}"))
                self._clock_on = False

    def str_error(self, status: int) -> str:
        return str(self._ep.utilStrError(status)) if self._ep is not None else str(status)

    def shutdown(self) -> None:
        """Hang up calls, shut down every account, then the library (on the owning thread)."""
        if self._ep is not None and self._calls:
            try:
                self._ep.hangupAllCalls()
                for _ in range(20):
                    self._ep.libHandleEvents(10)
            except Exception:
                pass
        self._calls.clear()
        self._closing.clear()
        gc.collect()
        accounts = list(self._accounts.values()) + ([self._forward] if self._forward is not None else [])
        self._forward = None
        for acc in accounts:
            try:
                acc.shutdown()
            except Exception:
                pass
        self._accounts.clear()
        gc.collect()
        if self._ep is not None:
            try:
                # The agent unregisters every account itself before this; without
                # NO_NETWORK pjsua would wait a further second for unregistrations.
                self._ep.libDestroy(pj.PJSUA_DESTROY_NO_NETWORK)
            finally:
                self._ep = None
                self._writer = None
