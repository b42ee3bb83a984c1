"""A worker's registrations: each connection's policy, liveness and DNS targets, driven on the SIP thread.

Rules
-----
* Each connection has a registration policy (``agent/core/policy.py``), a
  registrar liveness probe (``agent/core/liveness.py``) and, when its next hop
  is a host name, a cursor over the hop's DNS targets (``agent/core/targets.py``).
  This module carries out what they decide on the stack, and feeds them what
  the stack reports; the rules themselves live in those modules.
* A REGISTER goes to the cursor's target (a new route registers at once); one
  whose hop has no target (the supervisor's lookup failed) is not sent: it is
  a transient failure with the DNS error as its text.
* A keepalive goes to the current target, or the outbound proxy, or the
  registrar; its first answer after a miss registers at once.
* A registrar that becomes unreachable is left for the hop's next target, at
  once. A registration on a lower target moves back to the best one at a
  refresh only if that one answered an OPTIONS from the worker's own account
  shortly before (one such probe per worker at a time).
* A TCP/TLS flow the edge saw close (``FlowClosed``) re-registers the
  connections registered over it: the PBX lost the flow their calls come over.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.core.clock import Clock
from agent.core.liveness import RegistrarProbe
from agent.core.policy import Action, RegisterResponse, RegistrationPolicy, RegState
from agent.core.sipmsg import uri_host_port
from agent.core.targets import TargetCursor, fails_over
from agent.ipc.messages import ConnSpec, Event, Failover, FlowLost
from agent.worker.events import KeepaliveResult, RegResult, RegStarted
from agent.worker.reporting import Reporter
from agent.worker.stack import LIMITS, Stack

__all__ = ["BEST_PROBE_AHEAD_SEC", "BEST_PROBE_FRESH_SEC", "Conn", "Registrations", "to_register_response"]

# A probe of a connection's best target goes out this long before its refresh, and
# its answer counts for this long.
BEST_PROBE_AHEAD_SEC = 15.0
BEST_PROBE_FRESH_SEC = 30.0


@dataclass
class Conn:
    spec: ConnSpec
    policy: RegistrationPolicy
    probe: RegistrarProbe
    log: Any
    has_account: bool = False
    reachable: bool | None = None  # last logged registrar liveness
    cursor: TargetCursor | None = None  # which of spec.hop's targets REGISTERs go to (None: no hop)
    route: str | None = None  # the route the account has now
    best_probed_at: float | None = None  # a probe of the best target went out before this refresh
    best_answered_at: float | None = None  # ... and the best target answered it then
    last_state: tuple[object, ...] = field(default_factory=tuple)  # for state_changed lines
    last_sent: tuple[object, ...] = field(default_factory=tuple)  # for StateChanged messages


def to_register_response(ev: RegResult) -> RegisterResponse:
    """Turn the stack's report into the policy's terms, with a clear text for local failures."""
    reason = ev.reason.strip()
    if not ev.received:
        if ev.code == 408:
            error = "408 Request Timeout (no response from registrar)"
        elif "SSL" in reason or "TLS" in reason:
            error = f"TLS failure: {reason}"
        elif ev.code == 502:
            error = f"DNS or transport failure: {reason}"
        else:
            error = f"transport failure: {reason or 'unknown error'}"
        return RegisterResponse(code=ev.code, reason=reason, error=error)
    source_ip = ev.source.rsplit(":", 1)[0].strip("[]") if ev.source else None
    return RegisterResponse(
        code=ev.code,
        reason=reason,
        expires=ev.expiration if 200 <= ev.code < 300 else None,
        retry_after=ev.retry_after,
        min_expires=ev.min_expires,
        source_ip=source_ip,
    )


class Registrations:
    def __init__(
        self,
        stack: Stack,
        clock: Clock,
        rng: random.Random,
        log: Any,
        emit: Callable[[Event], None],
        reporter: Reporter,
    ) -> None:
        self._stack = stack
        self._clock = clock
        self._rng = rng
        self._log = log
        self._emit = emit
        self._report = reporter
        self.conns: dict[str, Conn] = {}
        self.max_connections = LIMITS.connections
        self._best_probe: str | None = None  # the connection whose best target is being probed

    def now(self) -> float:
        return self._clock.monotonic()

    # -- adding, updating, dropping -------------------------------------------------

    def add(self, spec: ConnSpec) -> None:
        policy = RegistrationPolicy(spec.policy, self._clock, self._rng)
        probe = RegistrarProbe(spec.policy.keepalive_interval_sec, spec.policy.keepalive_misses, self._clock)
        log = self._log.bind(connection_id=spec.connection_id)
        c = Conn(spec=spec, policy=policy, probe=probe, log=log)
        acc = spec.account
        if spec.hop is not None:
            c.cursor = TargetCursor(len(spec.hop.targets))
            c.route = spec.hop.targets[0].uri if spec.hop.targets else None
        self._stack.add_account(acc, route=c.route)
        self.conns[spec.connection_id] = c
        c.has_account = True
        policy.activate()
        if spec.register_at_once:
            policy.request_refresh()
        log.info(
            "connection_added",
            registrar=acc.registrar_uri,
            transport=acc.transport,
            aor=acc.id_uri,
            outbound_proxy=acc.proxies[0] if acc.proxies else None,
            next_in=round(policy.next_action_in or 0.0, 3),
        )

    def add_or_undo(self, spec: ConnSpec) -> None:
        try:
            self.add(spec)
        except Exception:
            c = self.conns.pop(spec.connection_id, None)
            if c is not None and c.has_account:
                self._stack.remove_account(spec.connection_id)
            raise

    def update(self, c: Conn, spec: ConnSpec) -> None:
        """The same account, new settings (policy knobs, the route of calls, DNS targets)."""
        self._retarget(c, spec)
        c.spec = spec
        c.policy.settings = spec.policy
        c.probe.interval = spec.policy.keepalive_interval_sec
        c.probe.misses_allowed = max(1, spec.policy.keepalive_misses)
        c.log.info("connection_updated", reregister=False)

    def _retarget(self, c: Conn, spec: ConnSpec) -> None:
        """New targets for the same account (the supervisor looked the host up again)."""
        new = spec.hop
        if new == c.spec.hop:
            return
        if new is None:
            c.cursor = None
            return
        old = c.spec.hop
        current = old.targets[c.cursor.index].uri if old and c.cursor and old.targets else None
        uris = [t.uri for t in new.targets]
        keep = uris.index(current) if current in uris else None
        if c.cursor is None:
            c.cursor = TargetCursor(len(uris))
        c.cursor.retarget(len(uris), keep)
        c.log.info("registrar_targets_changed", targets=[t.label for t in new.targets], error=new.error)

    def drop(self, c: Conn, quiet: bool = False) -> str:
        key = c.spec.connection_id
        if c.has_account:
            self._stack.remove_account(key)
            c.has_account = False
        if self.conns.get(key) is c:
            del self.conns[key]
        if not quiet:
            c.log.info("connection_removed", last_response=c.policy.last_response)
        return "removed"

    # -- the loop ---------------------------------------------------------------------

    def step_all(self) -> None:
        for c in self.conns.values():
            self._step(c)

    def stop_all(self) -> None:
        for c in self.conns.values():
            c.policy.stop()

    def unfinished(self) -> list[str]:
        return [k for k, c in self.conns.items() if not c.policy.finished]

    def next_deadline(self) -> float | None:
        times = [d for c in self.conns.values() for d in (c.policy.next_deadline(), c.probe.next_deadline())]
        return min((t for t in times if t is not None), default=None)

    def publish(self) -> None:
        self._report.publish(self.conns.values(), self.target_label)

    def _step(self, c: Conn) -> None:
        action = c.policy.poll()
        while c.policy.timeouts:
            c.probe.on_register_result(answered=False)
            self._report.response(c, c.policy.timeouts.pop(0), 408)
        if action is None:
            self._keepalive(c)
            self._probe_best(c)
            self._report.state(c, None)
            return
        try:
            if action is Action.REGISTER:
                self._register(c)
            else:
                c.log.info("unregister_sending")
                self._stack.unregister(c.spec.connection_id)
        except Exception as e:
            outcome = c.policy.on_response(RegisterResponse(code=0, error=f"REGISTER not sent: {e}"))
            self._report.response(c, outcome, 0)
        self._report.state(c, None)

    def _register(self, c: Conn) -> None:
        hop = c.spec.hop
        if hop is not None and not hop.targets:
            # the supervisor's lookup failed: a transient failure, nothing is sent
            error = hop.error or f"DNS: no target for {hop.name}"
            outcome = c.policy.on_response(RegisterResponse(code=0, error=error))
            self._report.response(c, outcome, 0)
            return
        p = c.policy
        c.log.debug("register_sending", expires=p.requested_expires, attempt=p.attempts, target=self.target_label(c))
        if not self._pick_target(c):
            self._stack.register(c.spec.connection_id)

    # -- what the stack reports ----------------------------------------------------

    def on_reg_result(self, ev: RegResult) -> None:
        c = self.conns.get(ev.key)
        if c is None:
            return
        in_flight = c.policy.state == RegState.REGISTERING
        failover = in_flight and self._failover(c, ev)
        outcome = c.policy.on_response(to_register_response(ev), failover=failover)
        if not outcome.ignored and not outcome.unregister:
            c.probe.on_register_result(answered=ev.received)
            self._note_liveness(c)
        self._report.response(c, outcome, ev.code)

    def on_reg_started(self, ev: RegStarted) -> None:
        c = self.conns.get(ev.key)
        if c is not None:
            c.log.debug("register_started", renew=ev.renew)

    def on_keepalive_result(self, ev: KeepaliveResult, forward: bool) -> None:
        if forward:
            self._best_probe_result(ev)
            return
        c = self.conns.get(ev.key)
        if c is None:
            return
        if ev.received:
            response = f"{ev.code} {ev.reason}".strip()
            self._answered_again(c, c.probe.on_answer(ev.code, ev.reason), response)
            key = self._keepalive_key(c)
            for peer in self.conns.values():  # the same registrar answered for them too
                if peer is not c and peer.probe.enabled and self._keepalive_key(peer) == key:
                    self._answered_again(peer, peer.probe.on_peer_answer(), response)
                    self._note_liveness(peer)
        else:
            c.probe.on_failure(f"{ev.code} {ev.reason}".strip() or "no answer")
        self._note_liveness(c)

    def _answered_again(self, c: Conn, recovered: bool, response: str) -> None:
        if recovered and c.policy.keeps_registering:
            # the registrar is back: whatever it lost, the binding is restored now
            c.log.info("registrar_answering_again", response=response)
            c.policy.request_refresh()

    def on_flow_closed(self, address: str, port: int) -> None:
        """The edge's connection to ``address:port`` closed: re-register what went over it."""
        seen: set[str] = set()
        for c in self.conns.values():
            kind = c.spec.account.transport
            if kind not in ("TCP", "TLS") or not c.policy.registered or self._next_hop(c) != (address, port):
                continue
            if kind not in seen:
                seen.add(kind)
                self._emit(FlowLost(kind))
            c.log.warning("flow_lost", transport=kind, remote=f"{address}:{port}")
            c.policy.on_flow_lost()

    def _next_hop(self, c: Conn) -> tuple[str, int]:
        """(address, port) the edge sends this connection's REGISTERs to."""
        host, port = uri_host_port(self._keepalive_key(c)[1])
        return host, port or (5061 if c.spec.account.transport == "TLS" else 5060)

    # -- liveness (agent/core/liveness.py) ----------------------------------------------

    def _keepalive(self, c: Conn) -> None:
        """Send a keepalive when one is due."""
        hop = c.spec.hop
        usable = hop is None or bool(hop.targets)
        if not c.probe.poll(allowed=c.policy.keeps_registering and usable):
            self._note_liveness(c)
            return
        target = self._keepalive_key(c)[1]
        try:
            self._stack.send_keepalive(c.spec.connection_id, target)
            c.log.debug("keepalive_sent", target=target)
        except Exception as e:
            c.probe.on_failure(f"keepalive not sent: {e}")
        self._note_liveness(c)

    def _keepalive_key(self, c: Conn) -> tuple[str, str]:
        """(transport, where keepalives go): connections with the same key share a registrar."""
        acc, hop = c.spec.account, c.spec.hop
        if hop is not None and c.cursor is not None and hop.targets:
            target = hop.targets[c.cursor.index].uri
        else:
            target = acc.proxies[0].replace(";lr", "") if acc.proxies else acc.registrar_uri
        return acc.transport, target

    def _note_liveness(self, c: Conn) -> None:
        if self._report.liveness(c, self.target_label(c)):
            self._failover_unreachable(c)

    # -- targets of a next hop given by a host name (agent/core/targets.py) ---------------

    def target_label(self, c: Conn) -> str | None:
        hop, cursor = c.spec.hop, c.cursor
        if hop is None or cursor is None or not hop.targets:
            return None
        return hop.targets[min(cursor.index, len(hop.targets) - 1)].label

    def _pick_target(self, c: Conn) -> bool:
        """Before a REGISTER: back to the best target if it answered a probe lately; route there.
        True when that sent the REGISTER (a new route registers at once)."""
        hop, cursor = c.spec.hop, c.cursor
        if hop is None or cursor is None or not hop.targets:
            return False
        if (
            cursor.index > 0
            and c.best_answered_at is not None
            and self.now() - c.best_answered_at < BEST_PROBE_FRESH_SEC
            and cursor.prefer_best()
        ):
            c.log.info("registrar_target_back", target=hop.targets[0].label)
        c.best_answered_at = None  # an answer serves one refresh
        uri = hop.targets[cursor.index].uri
        if uri == c.route:
            return False
        self._stack.set_route(c.spec.connection_id, uri)
        c.route = uri
        return True

    def _failover(self, c: Conn, ev: RegResult) -> bool:
        """After a REGISTER's answer: True when the next one goes to another target at once."""
        hop, cursor = c.spec.hop, c.cursor
        if hop is None or cursor is None or not hop.targets:
            return False
        if not fails_over(ev.code, ev.received):
            cursor.end_round()
            return False
        failed = hop.targets[cursor.index].label
        nxt = cursor.on_failover()
        if nxt is None:
            c.log.warning("registrar_targets_exhausted", targets=len(hop.targets), last=failed)
            return False
        c.log.warning(
            "registrar_failover", failed=failed, code=ev.code, reason=ev.reason, target=hop.targets[nxt].label
        )
        self._emit(Failover(c.spec.connection_id, "registration"))
        return True

    def _failover_unreachable(self, c: Conn) -> None:
        """The current target stopped answering: register at the next one now (it counts as a
        target that failed over); with no other target, the keepalives wait for this one."""
        hop, cursor = c.spec.hop, c.cursor
        if hop is None or cursor is None or len(hop.targets) < 2 or not c.policy.keeps_registering:
            return
        failed = hop.targets[cursor.index].label
        nxt = cursor.on_failover()
        if nxt is None:
            return
        c.log.warning("registrar_failover", failed=failed, reason="unreachable", target=hop.targets[nxt].label)
        self._emit(Failover(c.spec.connection_id, "registration"))
        c.probe.forget()  # the new target has not been heard from yet
        c.reachable = None
        c.policy.request_refresh()

    def _probe_best(self, c: Conn) -> None:
        """A connection registered at a lower target asks the best one, from the worker's own
        account, shortly before its refresh: it moves back only if that one answers."""
        hop, cursor, p = c.spec.hop, c.cursor, c.policy
        if hop is None or cursor is None or cursor.index == 0 or not hop.targets or self._best_probe is not None:
            return
        if p.state != RegState.REGISTERED or p.next_kind != "refresh":
            return
        if c.best_probed_at is not None and self.now() - c.best_probed_at < BEST_PROBE_AHEAD_SEC:
            return  # one probe per refresh: a TCP probe's refused connect reports a dropped flow,
            # which re-registers (once per probe, never in a loop)
        due = p.next_action_in
        if due is None or due > BEST_PROBE_AHEAD_SEC:
            return
        try:
            self._stack.probe(hop.targets[0].uri)
        except Exception as e:
            c.log.debug("best_target_probe_not_sent", error=str(e))
            return
        c.best_probed_at = self.now()
        self._best_probe = c.spec.connection_id

    def _best_probe_result(self, ev: KeepaliveResult) -> None:
        cid, self._best_probe = self._best_probe, None
        c = self.conns.get(cid) if cid is not None else None
        if c is None:
            return
        if ev.received:
            c.best_answered_at = self.now()
        c.log.debug("best_target_probe", answered=ev.received, code=ev.code)
