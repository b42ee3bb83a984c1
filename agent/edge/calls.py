"""What the edge reports about calls, turned into the agent's metrics and log lines.

Kamailio reports raw facts (an INVITE admitted, refused, answered, ended); the words and
the counting are here, so every call metric keeps the name and labels it had when the
workers bridged calls: ``uac_agent_calls_total{connection_id,result}``,
``uac_agent_calls_active``, ``uac_agent_call_setup_seconds``,
``uac_agent_inbound_rejected_total{connection_id,reason}``, ``uac_agent_failovers_total``.
One ``call_started`` and one ``call_ended`` line per admitted call (both Call-IDs: the edge
is a proxy and topology hiding leaves the Call-ID alone, so they are the same).

Runs on the edge's event loop only; the counts it keeps are handed out as immutable
mappings (:attr:`CallBook.active`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from agent.core.forwarding import CallResult, caller_identity, final_outcome
from agent.edge.messages import (
    CallEnded,
    CallFailover,
    CallFinal,
    CallPlainRtp,
    CallRedirected,
    CallRejected,
    CallStarted,
    EdgeEvent,
    TcpClosed,
)
from agent.metrics import Metrics

__all__ = ["CallBook"]

# Calls the book remembers the answer time of, at most (an answered call's entry goes when
# it ends; a lost end event must not grow it for ever).
MAX_TRACKED = 100_000
# Events of calls whose start has not come yet, at most: Kamailio tells a call's start once its
# INVITE is on the way, so the destination's answer, told by another of its processes, may
# overtake it. Such events wait for the start (a lost start must not grow this for ever).
MAX_EARLY = 1_000

_DETAILS = {
    "unknown_contact": "no connection registered this Contact",
    "source_not_allowed": "the source is not this connection's PBX (nor in its allowed_sources)",
    "wrong_transport": "this connection's calls come over its own transport only",
    "no_destination": "connection has no destination_uri",
    "over_limit": "over sip.max_calls or the connection's max_calls",
    "media_unavailable": "the media relay refused the call (overloaded or restarting)",
    "method_not_allowed": "only INVITE and OPTIONS are accepted outside a dialog",
}


@dataclass
class _Call:
    connection_id: str
    started_at: float
    answered_at: float | None = None


class CallBook:
    def __init__(
        self,
        metrics: Metrics,
        log: Any,
        on_active: Callable[[str, int], None] | None = None,
        describe: Callable[[str, str], str] | None = None,
    ) -> None:
        self._metrics = metrics
        self._describe = describe or (lambda _cid, uri: uri)  # (connection_id, target URI) -> its label
        self._log = log
        self._on_active = on_active
        self._active: dict[str, int] = {}
        self._calls: dict[str, _Call] = {}
        self._early: dict[str, list[CallFinal | CallEnded | CallFailover | CallPlainRtp]] = {}
        self.active: Mapping[str, int] = MappingProxyType({})

    def on_event(self, ev: EdgeEvent) -> None:
        if isinstance(ev, _OF_A_STARTED_CALL) and ev.call_id not in self._calls:
            self._hold(ev)
            return
        handler = self._handlers.get(type(ev))
        if handler is not None:
            handler(self, ev)

    def _hold(self, ev: CallFinal | CallEnded | CallFailover | CallPlainRtp) -> None:
        if ev.call_id not in self._early and len(self._early) >= MAX_EARLY:
            self._early.pop(next(iter(self._early)))
        self._early.setdefault(ev.call_id, []).append(ev)

    def reset(self, why: str) -> None:
        """The process that carried the calls is gone: none is active any more."""
        dropped = [cid for cid, n in self._active.items() if n]
        for cid in dropped:
            self._set_active(cid, 0)
        if self._calls:
            self._log.warning("calls_dropped", calls=len(self._calls), connections=dropped, reason=why)
        self._calls.clear()
        self._early.clear()

    def _set_active(self, cid: str, n: int) -> None:
        self._active[cid] = max(0, n)
        if cid:
            self._metrics.calls_active.labels(connection_id=cid).set(self._active[cid])
        self.active = MappingProxyType(dict(self._active))
        if self._on_active is not None:
            self._on_active(cid, self._active[cid])

    def _started(self, ev: CallStarted) -> None:
        if len(self._calls) >= MAX_TRACKED:
            self._calls.pop(next(iter(self._calls)))
        self._calls[ev.call_id] = _Call(ev.connection_id, ev.at)
        self._set_active(ev.connection_id, self._active.get(ev.connection_id, 0) + 1)
        display, user = caller_identity(ev.from_value)
        self._log.info(
            "call_started",
            connection_id=ev.connection_id,
            call_id_a=ev.call_id,
            call_id_b=ev.call_id,
            source=ev.source,
            transport=ev.transport or None,
            request_uri=ev.request_uri,
            mode="bridge",
            caller=user or None,
            display_name=display or None,
        )
        for held in self._early.pop(ev.call_id, []):
            self.on_event(held)

    def _rejected(self, ev: CallRejected) -> None:
        self._metrics.inbound_rejected.labels(connection_id=ev.connection_id, reason=ev.reason).inc()
        if ev.connection_id and ev.method == "INVITE":
            self._metrics.calls.labels(connection_id=ev.connection_id, result=CallResult.REJECTED.value).inc()
        self._log.warning(
            "call_rejected",
            connection_id=ev.connection_id or None,
            call_id_a=ev.call_id,
            method=ev.method,
            reason=ev.reason,
            code=ev.code,
            source=ev.source,
            transport=ev.transport,
            request_uri=ev.request_uri,
            detail=_DETAILS.get(ev.reason, ev.reason),
        )

    def _redirected(self, ev: CallRedirected) -> None:
        self._metrics.calls.labels(connection_id=ev.connection_id, result=CallResult.REDIRECTED.value).inc()
        self._metrics.call_setup.labels(connection_id=ev.connection_id).observe(0.0)
        self._log.info("call_started", connection_id=ev.connection_id, call_id_a=ev.call_id, mode="redirect")
        self._log.info(
            "call_ended", connection_id=ev.connection_id, call_id_a=ev.call_id, result="redirected", code=302
        )

    def _final(self, ev: CallFinal) -> None:
        call = self._calls.get(ev.call_id)
        started = ev.started_at or (call.started_at if call is not None else ev.at)
        result, code = final_outcome(ev.code, ev.by)
        self._metrics.call_setup.labels(connection_id=ev.connection_id).observe(max(0.0, ev.at - started))
        if result is CallResult.ANSWERED:
            if call is not None:
                call.answered_at = ev.at
            return
        self._calls.pop(ev.call_id, None)
        self._set_active(ev.connection_id, self._active.get(ev.connection_id, 0) - 1)
        self._metrics.calls.labels(connection_id=ev.connection_id, result=result.value).inc()
        self._log.info(
            "call_ended",
            connection_id=ev.connection_id,
            call_id_a=ev.call_id,
            call_id_b=ev.call_id,
            result=result.value,
            code=code,
            destination_code=ev.code or None,
            duration_sec=round(max(0.0, ev.at - started), 3),
        )

    def _ended(self, ev: CallEnded) -> None:
        call = self._calls.pop(ev.call_id, None)
        started = ev.started_at or (call.started_at if call is not None else ev.at)
        answered = call.answered_at if call is not None else None
        self._set_active(ev.connection_id, self._active.get(ev.connection_id, 0) - 1)
        self._metrics.calls.labels(connection_id=ev.connection_id, result=CallResult.ANSWERED.value).inc()
        self._log.info(
            "call_ended",
            connection_id=ev.connection_id,
            call_id_a=ev.call_id,
            call_id_b=ev.call_id,
            result=CallResult.ANSWERED.value,
            code=200,
            duration_sec=round(max(0.0, ev.at - started), 3),
            talk_sec=None if answered is None else round(max(0.0, ev.at - answered), 3),
        )

    def _failover(self, ev: CallFailover) -> None:
        self._metrics.failovers.labels(connection_id=ev.connection_id, kind="leg_b").inc()
        self._log.warning(
            "leg_b_failover",
            connection_id=ev.connection_id,
            call_id_a=ev.call_id,
            failed=self._describe(ev.connection_id, ev.failed),
            code=ev.code,
            target=self._describe(ev.connection_id, ev.next) if ev.next else None,
        )

    def _plain_rtp(self, ev: CallPlainRtp) -> None:
        self._log.info(
            "leg_b_plain_rtp",
            connection_id=ev.connection_id,
            call_id_a=ev.call_id,
            target=self._describe(ev.connection_id, ev.target) if ev.target else None,
            detail="the destination refused SDES-SRTP (488); offered again as plain RTP, SRTP kept towards the PBX",
        )

    _handlers: dict[type, Callable[[CallBook, Any], None]] = {
        CallStarted: _started,
        CallRejected: _rejected,
        CallRedirected: _redirected,
        CallFinal: _final,
        CallEnded: _ended,
        CallFailover: _failover,
        CallPlainRtp: _plain_rtp,
        TcpClosed: lambda _self, _ev: None,
    }


# events that only follow a call's start
_OF_A_STARTED_CALL = (CallFinal, CallEnded, CallFailover, CallPlainRtp)
