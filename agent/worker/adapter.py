"""The thin layer over pjsua2: the only module that imports it.

Every method must be called on the thread that called :meth:`PjsuaAdapter.start`
(pjsua2's "main thread"; ``threadCnt = 0`` and ``mainThreadOnly``). Callbacks run
inside :meth:`handle_events` on that same thread; they only turn what happened
into event objects handed to ``sink`` and never let an exception escape.

pjsua2 registers, and does nothing else: one UDP transport on a loopback port, every
request routed through the edge first (a global outbound proxy), no call, no media,
no TCP, no TLS (the wheel's OpenSSL 1.0.2k is reachable from no network). An answer
the edge gave on the PBX's behalf (marked ``X-UAC-Edge``) is reported as no answer.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from typing import Any

import pjsua2 as pj

from agent.core.sipmsg import edge_failure, int_header, redact
from agent.ipc.messages import AccountSpec, StackSettings
from agent.worker.events import FORWARD_KEY, KeepaliveResult, RegResult, RegStarted, SipEvent, StackLog
from agent.worker.stack import LIMITS, StackError

__all__ = ["AdapterError", "PjsuaAdapter"]

FORWARD_ACCOUNT = FORWARD_KEY


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


class _LogWriter(pj.LogWriter):  # type: ignore[misc]
    def __init__(self, sink: Callable[[SipEvent], None]) -> None:
        super().__init__()
        self._sink = sink

    def write(self, entry: Any) -> None:
        try:
            self._sink(StackLog(level=int(entry.level), message=redact(str(entry.msg)).rstrip()))
        except Exception:
            pass


class _Endpoint(pj.Endpoint):  # type: ignore[misc]
    pass


class _Account(pj.Account):  # type: ignore[misc]
    def __init__(self, key: str, sink: Callable[[SipEvent], None]) -> None:
        super().__init__()
        self.key = key
        self._sink = sink
        self.removed = False  # set before shutdown(): a removed account's late reports are dropped

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
            edge = edge_failure(whole) if whole else None
            self._sink(
                RegResult(
                    key=self.key,
                    code=int(prm.code),
                    reason=edge or str(prm.reason),
                    expiration=int(prm.expiration),
                    status=int(prm.status),
                    received=bool(whole) and edge is None,
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
            reason = str(tsx.statusText)
            if received:
                edge = edge_failure(str(tsx_event.src.rdata.wholeMsg or ""))
                if edge is not None:
                    received, reason = False, edge
            self._sink(KeepaliveResult(key=self.key, code=int(tsx.statusCode), reason=reason, received=received))
        except Exception as e:
            self._sink(StackLog(level=1, message=f"onSendRequest failed: {e!r}"))


class PjsuaAdapter:
    """One pjsua2 Endpoint with one loopback UDP transport and up to 8 accounts."""

    def __init__(self, sink: Callable[[SipEvent], None]) -> None:
        self._sink = sink
        self._ep: _Endpoint | None = None
        self._writer: _LogWriter | None = None
        self._transport_id: int | None = None
        self._accounts: dict[str, _Account] = {}
        self._configs: dict[str, Any] = {}  # each account's AccountConfig, for modify()
        self._forward: _Account | None = None
        self.published_host = "127.0.0.1"

    def start(self, s: StackSettings) -> None:
        ep = _Endpoint()
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
        cfg.uaConfig.maxCalls = 1  # none is ever placed or taken: calls are the edge's
        # Every request goes to the edge first, whatever the account's own route set.
        cfg.uaConfig.outboundProxies.append(s.edge_route)
        self._writer = _LogWriter(self._sink)
        cfg.logConfig.writer = self._writer
        level = 5 if s.trace else s.log_level
        cfg.logConfig.level = level
        # pjsua hands a message to the writer only up to consoleLevel; the writer
        # replaces the console, so nothing is printed by pjsip itself.
        cfg.logConfig.consoleLevel = level
        cfg.logConfig.msgLogging = 1 if s.trace else 0
        cfg.logConfig.decor = 0
        # No media: no media thread, no ioqueue of its own, no sound device.
        cfg.medConfig.threadCnt = 0
        cfg.medConfig.hasIoqueue = False
        try:
            ep.libInit(cfg)
            ep.audDevManager().setNoDev()
            tc = pj.TransportConfig()
            tc.boundAddress = s.bind
            tc.port = s.port
            self._transport_id = ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tc)
            ep.libStart()
            self._forward = self._create_forward_account(s)
        except Exception as e:
            raise AdapterError(f"SIP stack failed to start on {s.bind}:{s.port}: {_err(e)}") from None

    def _create_forward_account(self, s: StackSettings) -> _Account:
        """The worker's own account: OPTIONS probes of a registrar's other targets. No
        registration, no credentials."""
        ac = pj.AccountConfig()
        ac.idUri = f"sip:{s.user_agent.split('/')[0] or 'uac-agent'}@{s.bind}:{s.port}"
        ac.regConfig.registerOnAdd = False
        ac.sipConfig.transportId = self._transport_id
        ac.natConfig.sipOutboundUse = 0
        ac.natConfig.contactRewriteUse = 0
        ac.natConfig.viaRewriteUse = 0
        acc = _Account(FORWARD_ACCOUNT, self._sink)
        acc.create(ac, True)
        return acc

    @property
    def account_count(self) -> int:
        return len(self._accounts)

    def add_account(self, spec: AccountSpec, route: str | None = None) -> None:
        """``route``: where REGISTERs and keepalives go after the edge (a target of the next hop,
        agent/core/targets.py) instead of ``spec.proxies``."""
        if spec.key in self._accounts:
            raise AdapterError(f"connection {spec.key} already has an account")
        if len(self._accounts) >= LIMITS.connections:
            raise AdapterError(f"at most {LIMITS.connections} connections per worker process")
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
        # The Contact names the edge (its address for this PBX, its port, ;line=): the PBX's
        # calls reach the edge, never this worker.
        ac.sipConfig.contactForced = spec.contact
        ac.sipConfig.transportId = self._transport_id
        for proxy in [f"{route};lr"] if route else spec.proxies:
            ac.sipConfig.proxies.append(proxy)
        ac.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", spec.auth_username, 0, spec.password))
        ac.natConfig.sipOutboundUse = 0
        ac.natConfig.contactRewriteUse = 0
        ac.natConfig.viaRewriteUse = 0
        ac.natConfig.sdpNatRewriteUse = 0
        ac.natConfig.sipStunUse = pj.PJSUA_STUN_USE_DISABLED
        ac.natConfig.mediaStunUse = pj.PJSUA_STUN_USE_DISABLED
        ac.natConfig.udpKaIntervalSec = 0  # keepalive OPTIONS (agent/core/liveness.py) instead
        acc = _Account(spec.key, self._sink)
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
        """An OPTIONS from account ``key`` to ``target_uri`` over its route set; its end comes back
        as a KeepaliveResult."""
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

    @property
    def busy(self) -> bool:
        return False

    def handle_events(self, msec: int) -> None:
        if self._ep is not None:
            self._ep.libHandleEvents(msec)

    def str_error(self, status: int) -> str:
        return str(self._ep.utilStrError(status)) if self._ep is not None else str(status)

    def shutdown(self) -> None:
        """Shut down every account, then the library (on the owning thread)."""
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
