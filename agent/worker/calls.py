"""Forwarding the PBX's calls, on the SIP thread.

The :class:`CallRouter` takes the call events the adapter reports (an INVITE in,
a leg's state, its media, a DTMF digit), applies the rules of
:mod:`agent.core.forwarding` and tells the adapter what to send. It never calls
pjsua2 itself and runs only on the worker's SIP thread (the engine calls it
after each ``handle_events``), so it needs no locks. What it counts goes to the
supervisor as metric events (``agent.ipc.messages``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.core.clock import Clock
from agent.core.forwarding import (
    Action,
    BridgeCall,
    BridgeState,
    CallResult,
    IllegalCallEventError,
    Kind,
    caller_identity,
    leg_b_from_uri,
    line_of,
    source_allowed,
)
from agent.core.targets import fails_over
from agent.ipc.messages import (
    CallCounted,
    CallsActive,
    CallSetupTimed,
    Event,
    Failover,
    HopTarget,
    InboundRejected,
    Route,
    StackSettings,
)
from agent.worker.events import CallDtmf, CallMedia, CallState, IncomingCall
from agent.worker.stack import NoCallSlotError, Stack

__all__ = ["CallRouter"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class _Forward:
    connection_id: str
    leg_a: int
    call_id_a: str
    started: float
    log: Any
    mode: str
    destination: str
    bridge: BridgeCall | None = None
    leg_b: int | None = None
    call_id_b: str = ""
    a_gone: bool = False
    b_gone: bool = True
    a_media: bool = False
    b_media: bool = False
    setup_observed: bool = False
    finished: bool = False
    result: CallResult | None = None
    code: int | None = None
    digits: list[str] = field(default_factory=list)
    # leg B's targets when the destination's host is a name (agent/core/targets.py), and what
    # a new leg B needs when it fails over to the next one
    targets: tuple[HopTarget, ...] = ()
    target_index: int = 0
    from_uri: str | None = None
    media: str | None = None


class CallRouter:
    def __init__(
        self,
        adapter: Stack,
        stack: StackSettings,
        route: Callable[[str], Route | None],
        registrar_ip: Callable[[str], str | None],
        emit: Callable[[Event], None],
        logger: Any,
        clock: Clock,
    ) -> None:
        self._adapter = adapter
        self._stack = stack
        self._route = route
        self._registrar_ip = registrar_ip
        self._emit = emit
        self._log = logger
        self._clock = clock
        self._by_leg: dict[int, _Forward] = {}
        self._active: dict[str, int] = {}
        self._cidrs: dict[tuple[str, ...], list[Network]] = {}

    # -- counts -------------------------------------------------------------

    @property
    def active_calls(self) -> int:
        return sum(self._active.values())

    def active_for(self, connection_id: str) -> int:
        return self._active.get(connection_id, 0)

    @property
    def busy(self) -> bool:
        """Calls are being set up or carried (the SIP thread then polls often)."""
        return bool(self._by_leg)

    def next_deadline(self) -> float | None:
        """The earliest ring timeout (monotonic), if any."""
        times = [f.bridge.ring_deadline for f in self._by_leg.values() if f.bridge and f.bridge.ring_deadline]
        return min(times) if times else None

    def _set_active(self, cid: str, count: int) -> None:
        self._active[cid] = count
        self._emit(CallsActive(cid, count))

    # -- events -------------------------------------------------------------

    def on_incoming(self, ev: IncomingCall) -> None:
        now = self._clock.monotonic()
        source_ip = ev.source.rsplit(":", 1)[0].strip("[]") if ev.source else ""
        line = line_of(ev.request_uri)
        route = self._route(line) if line else None
        base = self._log.bind(call_id_a=ev.call_id, source=ev.source, request_uri=ev.request_uri)
        if route is None or line is None:
            self._refuse(ev, "", base, 404, "unknown_contact", "no connection registered this Contact")
            return
        cid = line
        log = base.bind(connection_id=cid)
        if not source_allowed(source_ip, self._pbx_addresses(cid, route), self._networks(route.allowed_sources)):
            self._refuse(ev, cid, log, 403, "source_not_allowed", f"{source_ip} is not this connection's PBX")
            return
        dest = route.destination
        if dest is None:
            self._refuse(ev, cid, log, 404, "no_destination", "connection has no destination_uri")
            return
        most = self._stack.max_calls
        limit = route.max_calls or most
        if self.active_calls >= most or self.active_for(cid) >= limit:
            why = (
                f"{self.active_calls} calls active (worker limit {most}), "
                f"{self.active_for(cid)} on this connection (limit {limit})"
            )
            self._refuse_over_limit(ev, cid, log, why)
            return
        if route.forward_mode == "bridge" and self._adapter.free_call_slots < 1:
            # legs of ended calls hold pjsua's slots until their BYE or CANCEL completes
            self._refuse_over_limit(ev, cid, log, "no free SIP call slot for leg B (ended calls still closing)")
            return
        fwd = _Forward(
            connection_id=cid,
            leg_a=ev.leg,
            call_id_a=ev.call_id,
            started=now,
            log=log,
            mode=route.forward_mode,
            destination=dest,
        )
        display, user = caller_identity(ev.from_value)
        started = {"mode": fwd.mode, "destination": dest, "caller": user or None, "display_name": display or None}
        self._by_leg[ev.leg] = fwd
        self._set_active(cid, self._active.get(cid, 0) + 1)
        if fwd.mode == "redirect":
            log.info("call_started", call_id_b=None, **started)
            self._answer_a(fwd, 302, contact=f"<{dest}>")
            fwd.result, fwd.code = CallResult.REDIRECTED, 302
            return
        fwd.bridge = BridgeCall(started_at=now, ring_timeout_sec=float(route.ring_timeout_sec))
        host = route.leg_b_host or self._adapter.published_host  # never 0.0.0.0 (agent/addresses.py)
        from_uri = leg_b_from_uri(display, user, host, fallback_user="uac-agent")
        fwd.from_uri, fwd.media = from_uri, route.leg_b_media
        hop = route.destination_hop
        if hop is not None:
            fwd.targets = hop.targets
        try:
            if hop is not None and not hop.targets:
                raise RuntimeError(hop.error or f"DNS: no target for {hop.name}")
            fwd.leg_b, fwd.call_id_b = self._dial_b(fwd)
        except Exception as e:
            if isinstance(e, NoCallSlotError):  # no slot after all: busy, as over the limit
                self._by_leg.pop(ev.leg, None)
                self._set_active(cid, self._active[cid] - 1)
                self._refuse_over_limit(ev, cid, log, f"no free SIP call slot for leg B: {e}")
                return
            log.info("call_started", call_id_b=None, **started)
            log.warning("leg_b_failed", error=str(e))
            fwd.bridge.state = BridgeState.ENDED
            fwd.result, fwd.code = CallResult.FAILED, 503
            self._answer_a(fwd, 503)
            return
        fwd.b_gone = False
        self._by_leg[fwd.leg_b] = fwd
        log.info("call_started", call_id_b=fwd.call_id_b, from_uri=from_uri, **started)

    def on_state(self, ev: CallState) -> None:
        fwd = self._by_leg.get(ev.leg)
        if fwd is None:
            if ev.state == "disconnected":
                self._adapter.release(ev.leg)  # a refused INVITE's leg
            return
        is_a = ev.leg == fwd.leg_a
        if is_a and ev.call_id:
            fwd.call_id_a = ev.call_id
        if not is_a and ev.call_id:
            fwd.call_id_b = ev.call_id
        actions: list[Action] = []
        bc = fwd.bridge
        try:
            if is_a and ev.state == "disconnected":
                fwd.a_gone = True
                if bc is not None:
                    actions = bc.a_ended()
            elif not is_a and bc is not None:
                if ev.state == "early":
                    actions = bc.b_progress(ev.code, early_media=ev.code == 183)
                elif ev.state == "confirmed":
                    actions = bc.b_answered(self._clock.monotonic())
                elif ev.state == "disconnected":
                    fwd.b_gone = True
                    if self._leg_b_failover(fwd, ev):
                        return
                    actions = bc.b_ended() if bc.state is BridgeState.ANSWERED else bc.b_failed(ev.code)
        except IllegalCallEventError as e:
            fwd.log.warning("call_event_unexpected", error=str(e), leg="a" if is_a else "b")
        if ev.state == "disconnected":
            self._adapter.release(ev.leg)
            self._by_leg.pop(ev.leg, None)
        self._apply(fwd, actions, cause=f"leg {'A' if is_a else 'B'} {ev.state} {ev.code} {ev.reason}".strip())
        self._maybe_finish(fwd)

    def on_media(self, ev: CallMedia) -> None:
        fwd = self._by_leg.get(ev.leg)
        if fwd is None or fwd.leg_b is None:
            return
        if ev.leg == fwd.leg_a:
            fwd.a_media = ev.active
        else:
            fwd.b_media = ev.active
        if fwd.a_media and fwd.b_media:
            try:
                if self._adapter.bridge(fwd.leg_a, fwd.leg_b):
                    fwd.log.debug("audio_bridged")
            except Exception as e:
                fwd.log.warning("audio_bridge_failed", error=str(e))

    def on_dtmf(self, ev: CallDtmf) -> None:
        fwd = self._by_leg.get(ev.leg)
        if fwd is None or fwd.leg_b is None:
            return
        other = fwd.leg_b if ev.leg == fwd.leg_a else fwd.leg_a
        if other not in self._by_leg:
            return
        fwd.digits.append(ev.digit)
        try:
            self._adapter.send_dtmf(other, ev.digit, ev.method, ev.duration_ms)
            fwd.log.debug(
                "dtmf_relayed", digit=ev.digit, method=ev.method, direction="a_to_b" if other == fwd.leg_b else "b_to_a"
            )
        except Exception as e:
            fwd.log.warning("dtmf_relay_failed", digit=ev.digit, method=ev.method, error=str(e))

    def poll(self) -> None:
        """Ring timeouts (called every loop of the SIP thread)."""
        now = self._clock.monotonic()
        for fwd in {id(f): f for f in self._by_leg.values()}.values():
            bc = fwd.bridge
            if bc is None or bc.ring_deadline is None or now < bc.ring_deadline:
                continue
            fwd.log.info("ring_timeout", ring_timeout_sec=bc.ring_timeout_sec)
            self._apply(fwd, bc.poll(now), cause="ring timeout")
            self._maybe_finish(fwd)

    # -- leg B's targets ------------------------------------------------------

    def _dial_b(self, fwd: _Forward) -> tuple[int, str]:
        """INVITE the destination, through its current target when its host is a name."""
        target = fwd.targets[fwd.target_index].uri if fwd.targets else None
        return self._adapter.make_call(fwd.destination, fwd.from_uri, fwd.media, target)

    def _leg_b_failover(self, fwd: _Forward, ev: CallState) -> bool:
        """Leg B failed before anything was relayed to the PBX with 408, 480, 503, 504 or no answer:
        a new leg B to the next target, within the same ring timeout. True when one was started."""
        bc = fwd.bridge
        if bc is None or bc.state is not BridgeState.CALLING or fwd.a_gone:
            return False
        if not fails_over(ev.code, ev.code != 0) or fwd.target_index + 1 >= len(fwd.targets):
            return False
        failed = fwd.targets[fwd.target_index]
        self._adapter.release(ev.leg)
        self._by_leg.pop(ev.leg, None)
        fwd.target_index += 1
        try:
            fwd.leg_b, fwd.call_id_b = self._dial_b(fwd)
        except Exception as e:
            fwd.log.warning("leg_b_failover_failed", target=fwd.targets[fwd.target_index].label, error=str(e))
            fwd.leg_b = None
            return False
        fwd.b_gone = False
        fwd.b_media = False
        self._by_leg[fwd.leg_b] = fwd
        self._emit(Failover(fwd.connection_id, "leg_b"))
        fwd.log.warning(
            "leg_b_failover",
            failed=failed.label,
            code=ev.code,
            reason=ev.reason,
            target=fwd.targets[fwd.target_index].label,
            call_id_b=fwd.call_id_b,
        )
        return True

    # -- helpers ------------------------------------------------------------

    def _pbx_addresses(self, cid: str, route: Route) -> set[str]:
        """The PBX's addresses: its IP literal hosts, what its host names resolved to (the
        supervisor looked them up: no DNS on this thread), and the registrar's answering address."""
        out: set[str] = set(route.pbx_addresses)
        for host in route.pbx_hosts:
            try:
                out.add(str(ipaddress.ip_address(host.strip("[]"))))
            except ValueError:
                continue
        seen = self._registrar_ip(cid)
        if seen:
            out.add(seen)
        return out

    def _networks(self, cidrs: tuple[str, ...]) -> list[Network]:
        nets = self._cidrs.get(cidrs)
        if nets is None:
            nets = self._cidrs[cidrs] = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        return nets

    def _refuse_over_limit(self, ev: IncomingCall, cid: str, log: Any, why: str) -> None:
        code = self._stack.over_limit_response
        retry = self._stack.over_limit_retry_after_sec if code == 503 else None
        self._refuse(ev, cid, log, code, "over_limit", why, retry_after=retry)

    def _refuse(
        self,
        ev: IncomingCall,
        cid: str,
        log: Any,
        code: int,
        reason: str,
        detail: str,
        retry_after: int | None = None,
    ) -> None:
        self._emit(InboundRejected(cid, reason))
        if cid:
            self._emit(CallCounted(cid, CallResult.REJECTED.value))
        log.warning("call_rejected", reason=reason, code=code, detail=detail)
        try:
            self._adapter.answer(ev.leg, code, retry_after=retry_after)
        except Exception as e:
            log.warning("call_reject_failed", error=str(e))
            self._adapter.release(ev.leg)

    def _answer_a(self, fwd: _Forward, code: int, contact: str | None = None) -> None:
        try:
            self._adapter.answer(fwd.leg_a, code, contact=contact)
        except Exception as e:
            fwd.log.warning("answer_failed", code=code, error=str(e))
        if code >= 200 and not fwd.setup_observed:
            fwd.setup_observed = True
            setup = self._clock.monotonic() - fwd.started
            self._emit(CallSetupTimed(fwd.connection_id, setup))
            fwd.log.debug("call_setup", code=code, setup_ms=round(setup * 1000, 1))

    def _apply(self, fwd: _Forward, actions: list[Action], cause: str) -> None:
        for act in actions:
            try:
                if act.kind in (Kind.ANSWER_A, Kind.REJECT_A):
                    if not fwd.a_gone:
                        self._answer_a(fwd, act.code)
                elif act.kind is Kind.HANGUP_A:
                    if not fwd.a_gone:
                        self._adapter.hangup(fwd.leg_a)
                elif act.kind is Kind.HANGUP_B and fwd.leg_b is not None and not fwd.b_gone:
                    self._adapter.hangup(fwd.leg_b)
            except Exception as e:
                fwd.log.warning("call_action_failed", action=act.kind.value, code=act.code, error=str(e), cause=cause)

    def _maybe_finish(self, fwd: _Forward) -> None:
        if fwd.finished:
            return
        bc = fwd.bridge
        ended = bc is None or bc.state is BridgeState.ENDED
        if not (ended and fwd.a_gone and fwd.b_gone):
            return
        fwd.finished = True
        if bc is not None:
            fwd.result = bc.result or fwd.result
            fwd.code = bc.code if bc.code is not None else fwd.code
        result = fwd.result or CallResult.FAILED
        now = self._clock.monotonic()
        cid = fwd.connection_id
        self._set_active(cid, max(0, self._active.get(cid, 0) - 1))
        self._emit(CallCounted(cid, result.value))
        answered_at = bc.answered_at if bc is not None else None
        fwd.log.info(
            "call_ended",
            call_id_b=fwd.call_id_b or None,
            result=result.value,
            code=fwd.code,
            duration_sec=round(now - fwd.started, 3),
            talk_sec=round(now - answered_at, 3) if answered_at is not None else None,
            dtmf_relayed=len(fwd.digits),
        )
