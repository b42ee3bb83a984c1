"""The thin layer over pjsua2: the only module that imports it.

Every method must be called on the thread that called :meth:`PjsuaAdapter.start`
(pjsua2's "main thread"; ``threadCnt = 0`` and ``mainThreadOnly``). Callbacks run
inside :meth:`handle_events` on that same thread; they only turn what happened
into event objects handed to ``sink`` and never let an exception escape.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from typing import Any

import pjsua2 as pj

from agent.config import MAX_CONNECTIONS
from agent.core.sipmsg import int_header, redact
from agent.sip.events import RegResult, RegStarted, SipEvent, StackLog, TransportDown
from agent.sip.specs import AccountSpec, StackSettings

__all__ = ["AdapterError", "PjsuaAdapter"]

_TRANSPORTS = {"UDP": pj.PJSIP_TRANSPORT_UDP, "TCP": pj.PJSIP_TRANSPORT_TCP, "TLS": pj.PJSIP_TRANSPORT_TLS}


class AdapterError(RuntimeError):
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


class PjsuaAdapter:
    """One pjsua2 Endpoint with UDP/TCP(/TLS) transports and up to 8 accounts."""

    def __init__(self, sink: Callable[[SipEvent], None]) -> None:
        self._sink = sink
        self._ep: _Endpoint | None = None
        self._writer: _LogWriter | None = None
        self._transport_ids: dict[str, int] = {}
        self._accounts: dict[str, _Account] = {}

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
        cfg.uaConfig.maxCalls = 4
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
        try:
            ep.libInit(cfg)
            ep.audDevManager().setNullDev()
            for name in ("UDP", "TCP"):
                tc = pj.TransportConfig()
                tc.boundAddress = s.bind
                tc.port = s.port
                self._transport_ids[name] = ep.transportCreate(_TRANSPORTS[name], tc)
            if s.want_tls:
                tc = pj.TransportConfig()
                tc.boundAddress = s.bind
                tc.port = s.tls_port
                tc.tlsConfig.method = pj.PJSIP_TLSV1_2_METHOD
                tc.tlsConfig.verifyServer = s.tls_verify_server
                if s.tls_ca_file is not None:
                    tc.tlsConfig.CaListFile = str(s.tls_ca_file)
                self._transport_ids["TLS"] = ep.transportCreate(_TRANSPORTS["TLS"], tc)
            ep.libStart()
        except Exception as e:
            raise AdapterError(f"SIP stack failed to start on {s.bind}:{s.port}: {_err(e)}") from None

    @property
    def account_count(self) -> int:
        return len(self._accounts)

    def add_account(self, spec: AccountSpec) -> None:
        if spec.key in self._accounts:
            raise AdapterError(f"connection {spec.key} already has an account")
        if len(self._accounts) >= MAX_CONNECTIONS:
            raise AdapterError(f"at most {MAX_CONNECTIONS} connections per process (pjsua2 PJSUA_MAX_ACC)")
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
        ac.sipConfig.transportId = self._transport_ids[spec.transport]
        for proxy in spec.proxies:
            ac.sipConfig.proxies.append(proxy)
        ac.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", spec.auth_username, 0, spec.password))
        ac.natConfig.sipOutboundUse = 0
        ac.natConfig.contactRewriteUse = 0
        ac.natConfig.viaRewriteUse = 0
        ac.natConfig.sdpNatRewriteUse = 0
        ac.natConfig.sipStunUse = pj.PJSUA_STUN_USE_DISABLED
        ac.natConfig.mediaStunUse = pj.PJSUA_STUN_USE_DISABLED
        acc = _Account(spec.key, self._sink)
        try:
            acc.create(ac, False)
        except Exception as e:
            raise AdapterError(f"connection {spec.key}: account rejected by the SIP stack: {_err(e)}") from None
        self._accounts[spec.key] = acc

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

    def remove_account(self, key: str) -> None:
        acc = self._accounts.pop(key, None)
        if acc is not None:
            acc.removed = True  # its account may be re-created under the same key at once
            acc.shutdown()

    def handle_events(self, msec: int) -> None:
        if self._ep is not None:
            self._ep.libHandleEvents(msec)

    def str_error(self, status: int) -> str:
        return str(self._ep.utilStrError(status)) if self._ep is not None else str(status)

    def shutdown(self) -> None:
        """Shut down every account, then the library (on the owning thread)."""
        for acc in list(self._accounts.values()):
            try:
                acc.shutdown()
            except Exception:
                pass
        self._accounts.clear()
        gc.collect()
        if self._ep is not None:
            try:
                self._ep.libDestroy()
            finally:
                self._ep = None
                self._writer = None
