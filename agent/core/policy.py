"""Registration policy of one connection: a state machine with no I/O.

Rules
-----
* Events come in as method calls (``activate``, ``poll``, ``on_response``,
  ``on_flow_lost``, ``request_refresh``, ``stop``); decisions come out of
  ``poll()`` as an :class:`Action` the caller must carry out at once.
* Time comes only from the injected :class:`~agent.core.clock.Clock`, and
  chance only from the injected ``random.Random``: tests drive both.
* At most one REGISTER is in flight. A refresh is sent at
  ``max(granted - refresh_margin, granted / 2)`` after the last 2xx.
* Transient failures (no answer, 408, 429, 480, 5xx, 6xx, transport errors)
  back off as RFC 5626 §4.5: the upper bound is
  ``min(retry_max, retry_base * 2**failures)`` and the wait is drawn from
  ``[upper/2, upper]``; a Retry-After larger than that wins.
* Rejected credentials (401/407 after credentials were sent, 403) and other
  4xx retry only after ``forbidden_retry_interval`` (plus up to 10 % jitter,
  never less): never hammer the PBX, never give up for good.
* 423 adopts Min-Expires and asks again at once (once per larger value).
* A failure the caller fails over (the registrar's next DNS target,
  agent/core/targets.py) asks again at once and does not count toward the
  backoff; the round's last target's failure does.
* A binding is ``registered`` from a 2xx until its granted expiry passes
  without another 2xx; then ``registration_status`` becomes EXPIRED.
* A lost TCP/TLS flow re-registers at once.
* ``stop()`` unregisters (Expires: 0) a binding that exists, after any
  REGISTER in flight has been answered.

States and the moves between them are the table ``TRANSITIONS``; any other
move raises :class:`IllegalTransitionError`.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from agent.core.clock import Clock
from agent.core.responses import ResponseClass, classify, response_text

__all__ = [
    "TRANSITIONS",
    "Action",
    "IllegalTransitionError",
    "Outcome",
    "PolicySettings",
    "PolicySnapshot",
    "RegState",
    "RegisterResponse",
    "RegistrationPolicy",
    "RegistrationStatus",
]


class RegState(enum.StrEnum):
    DISABLED = "DISABLED"  # connection not active: nothing is sent
    WAITING = "WAITING"  # random initial delay before the first REGISTER
    REGISTERING = "REGISTERING"  # a REGISTER is in flight
    REGISTERED = "REGISTERED"  # 2xx received; refresh scheduled
    RETRY_WAIT = "RETRY_WAIT"  # last attempt failed; retry scheduled
    UNREGISTERING = "UNREGISTERING"  # REGISTER Expires: 0 in flight
    STOPPED = "STOPPED"  # stopped; nothing more is sent


class RegistrationStatus(enum.IntEnum):
    """Seed 004's ``registration_status`` codes."""

    NOT_APPLICABLE = 0
    NOT_REGISTERED = 1
    FAILED = 2
    EXPIRED = 3
    SUCCESS = 4
    UNREGISTERED = 5


class Action(enum.Enum):
    REGISTER = "register"
    UNREGISTER = "unregister"


TRANSITIONS: dict[RegState, frozenset[RegState]] = {
    RegState.DISABLED: frozenset({RegState.WAITING, RegState.STOPPED}),
    RegState.WAITING: frozenset({RegState.REGISTERING, RegState.STOPPED, RegState.DISABLED}),
    RegState.REGISTERING: frozenset(
        {RegState.REGISTERED, RegState.RETRY_WAIT, RegState.REGISTERING, RegState.UNREGISTERING, RegState.STOPPED}
    ),
    RegState.REGISTERED: frozenset({RegState.REGISTERING, RegState.UNREGISTERING, RegState.STOPPED}),
    RegState.RETRY_WAIT: frozenset({RegState.REGISTERING, RegState.UNREGISTERING, RegState.STOPPED}),
    RegState.UNREGISTERING: frozenset({RegState.STOPPED}),
    RegState.STOPPED: frozenset({RegState.WAITING}),
}


class IllegalTransitionError(RuntimeError):
    """A move the state table does not allow: a bug in the caller or here."""


@dataclass(frozen=True)
class PolicySettings:
    expiration_sec: int = 3600
    initial_delay_max_sec: float = 2.0
    refresh_margin_sec: float = 30.0
    retry_base_sec: float = 30.0
    retry_max_sec: float = 1800.0
    forbidden_retry_interval_sec: float = 300.0
    register_timeout_sec: float = 40.0
    unregister_timeout_sec: float = 5.0
    retry_after_max_sec: float = 86400.0
    # Registrar liveness (agent/core/liveness.py), run beside the policy by the worker.
    keepalive_interval_sec: float = 30.0
    keepalive_misses: int = 2


@dataclass(frozen=True)
class RegisterResponse:
    """A final answer to a REGISTER, or a failure with no SIP answer (code 0)."""

    code: int
    reason: str = ""
    expires: int | None = None  # granted expiry, meaningful on 2xx only
    retry_after: int | None = None
    min_expires: int | None = None
    source_ip: str | None = None  # registrar's address that answered
    error: str | None = None  # transport/TLS failure text when code is 0 or stack-made

    @property
    def text(self) -> str:
        if self.error:
            return self.error
        return response_text(self.code, self.reason)


@dataclass(frozen=True)
class Outcome:
    """What ``on_response`` did, for logs and metrics."""

    response_class: ResponseClass | None
    text: str
    duration: float | None  # REGISTER sent to final answer
    next_in: float | None  # seconds until the next action, if any
    state: RegState
    registration_status: RegistrationStatus
    unregister: bool = False
    ignored: bool = False


@dataclass(frozen=True)
class PolicySnapshot:
    state: RegState
    registered: bool
    registration_status: RegistrationStatus
    registration_status_updated_at: float | None  # wall time
    last_registration_response: str | None
    last_response_code: int
    last_registered_ip: str | None
    requested_expires: int
    granted_expires: int | None
    binding_expires_at: float | None  # wall time
    consecutive_failures: int
    auth_retries: int
    next_action: str | None
    next_action_at: float | None  # wall time
    registered_since: float | None  # wall time
    uptime_sec: float | None
    attempts: int
    # Registrar liveness (agent/core/liveness.py), filled in by the worker beside the policy.
    registrar_reachable: bool | None = None
    keepalive_misses: int = 0
    last_keepalive: str | None = None
    registrar_reachable_since: float | None = None  # wall time registrar_reachable last changed
    # The target REGISTERs go to when the next hop is a host name (agent/core/targets.py).
    target: str | None = None


@dataclass
class _Attempt:
    started: float
    unregister: bool
    expires: int


@dataclass
class RegistrationPolicy:
    settings: PolicySettings
    clock: Clock
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self.state = RegState.DISABLED
        self.requested_expires = self.settings.expiration_sec
        self.granted_expires: int | None = None
        self._binding_expires: float | None = None  # monotonic
        self._lapsed = False
        self._unregistered = False
        self._next_at: float | None = None  # monotonic time of the next REGISTER
        self._next_kind: str | None = None
        self._attempt: _Attempt | None = None
        self._stop_requested = False
        self._status = RegistrationStatus.NOT_APPLICABLE
        self._status_updated: float | None = None
        self.last_response: str | None = None
        self.last_code = 0
        self.last_registered_ip: str | None = None
        self.failures = 0
        self.auth_retries = 0
        self.attempts = 0
        self._registered_since: float | None = None  # monotonic
        self.timeouts: list[Outcome] = []  # attempts given up by poll(); the caller drains them

    # -- moves ------------------------------------------------------------

    def _move(self, new: RegState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransitionError(f"{self.state.value} -> {new.value}")
        self.state = new

    def _schedule(self, delay: float, kind: str) -> None:
        self._next_at = self.clock.monotonic() + max(0.0, delay)
        self._next_kind = kind

    def _update_status(self) -> RegistrationStatus:
        now = self.clock.monotonic()
        if self.state == RegState.DISABLED:
            new = RegistrationStatus.NOT_APPLICABLE
        elif self._binding_expires is not None and now < self._binding_expires:
            new = RegistrationStatus.SUCCESS
        elif self._unregistered:
            new = RegistrationStatus.UNREGISTERED
        elif self._lapsed:
            new = RegistrationStatus.EXPIRED
        elif self.failures > 0:
            new = RegistrationStatus.FAILED
        else:
            new = RegistrationStatus.NOT_REGISTERED
        if new != self._status or self._status_updated is None:
            self._status = new
            self._status_updated = self.clock.time()
        return new

    # -- events -------------------------------------------------------------

    def activate(self) -> None:
        """Start registering after a random delay in [0, initial_delay_max]."""
        self._stop_requested = False
        self._unregistered = False
        self._move(RegState.WAITING)
        self._schedule(self.rng.uniform(0.0, self.settings.initial_delay_max_sec), "register")
        self._update_status()

    def poll(self) -> Action | None:
        """Advance time; return the action due now, if any."""
        now = self.clock.monotonic()
        if self._binding_expires is not None and now >= self._binding_expires:
            # The binding lapsed without a successful refresh.
            self._binding_expires = None
            self._registered_since = None
            self._lapsed = True
        action: Action | None = None
        attempt = self._attempt
        if self.state == RegState.REGISTERING and attempt is not None:
            if now - attempt.started >= self.settings.register_timeout_sec:
                timeout = RegisterResponse(code=408, reason="Request Timeout (no final response)")
                self.timeouts.append(self.on_response(timeout))
        elif self.state == RegState.UNREGISTERING and attempt is not None:
            if now - attempt.started >= self.settings.unregister_timeout_sec:
                self._attempt = None
                self.last_response = "unregister timed out"
                self._clear_binding()
                self._move(RegState.STOPPED)
        if self._stop_requested and self.state in (RegState.REGISTERED, RegState.RETRY_WAIT):
            action = self._begin_unregister_or_stop()
        elif (
            self.state in (RegState.WAITING, RegState.REGISTERED, RegState.RETRY_WAIT)
            and self._next_at is not None
            and now >= self._next_at
        ):
            self._move(RegState.REGISTERING)
            self._attempt = _Attempt(started=now, unregister=False, expires=self.requested_expires)
            self._next_at = None
            self._next_kind = None
            self.attempts += 1
            action = Action.REGISTER
        self._update_status()
        return action

    def _begin_unregister_or_stop(self) -> Action | None:
        self._next_at = None
        self._next_kind = None
        if self.registered:
            self._move(RegState.UNREGISTERING)
            self._attempt = _Attempt(started=self.clock.monotonic(), unregister=True, expires=0)
            return Action.UNREGISTER
        self._move(RegState.STOPPED)
        return None

    def on_response(self, resp: RegisterResponse, failover: bool = False) -> Outcome:
        """A final answer (or a failure) for the REGISTER in flight.

        ``failover``: the caller sends the next REGISTER to another of the registrar's
        targets (agent/core/targets.py): a failure then retries at once, without
        counting toward the backoff."""
        now = self.clock.monotonic()
        attempt = self._attempt
        duration: float | None
        if attempt is None and self.state == RegState.REGISTERED and not self._stop_requested:
            # The stack refreshed on its own (its late backstop timer): take the
            # result. While backing off, a stray answer (e.g. the stack's own
            # report of a send that already failed) is ignored, never counted twice.
            self._move(RegState.REGISTERING)
            attempt = _Attempt(started=now, unregister=False, expires=self.requested_expires)
            self.attempts += 1
            duration = None
        elif attempt is None or self.state not in (RegState.REGISTERING, RegState.UNREGISTERING):
            return Outcome(None, resp.text, None, None, self.state, self._update_status(), ignored=True)
        else:
            duration = now - attempt.started
        self._attempt = None
        self.last_response = resp.text
        self.last_code = resp.code
        if attempt.unregister:
            self._clear_binding()
            if 200 <= resp.code < 300:
                self._unregistered = True
            self._move(RegState.STOPPED)
            status = self._update_status()
            return Outcome(classify(resp.code), resp.text, duration, None, self.state, status, unregister=True)

        cls = classify(resp.code)
        if resp.error is not None:
            cls = ResponseClass.TRANSIENT
        delay: float
        if cls is ResponseClass.SUCCESS and (resp.expires is None or resp.expires > 0):
            granted = resp.expires if resp.expires is not None else attempt.expires
            was_registered = self.registered
            self.granted_expires = granted
            self._binding_expires = now + granted
            if not was_registered or self._registered_since is None:
                self._registered_since = now
            self._lapsed = False
            self._unregistered = False
            self.failures = 0
            self.auth_retries = 0
            if resp.source_ip:
                self.last_registered_ip = resp.source_ip
            self._move(RegState.REGISTERED)
            delay = max(granted - self.settings.refresh_margin_sec, granted / 2.0)
            self._schedule(delay, "refresh")
        elif cls is ResponseClass.TOO_BRIEF and resp.min_expires and resp.min_expires > self.requested_expires:
            self.requested_expires = resp.min_expires
            self._move(RegState.RETRY_WAIT)
            delay = 0.0
            self._schedule(delay, "register")
        elif failover and cls is not ResponseClass.SUCCESS:
            self._move(RegState.RETRY_WAIT)
            delay = 0.0
            self._schedule(delay, "failover")
        else:
            self.failures += 1
            if cls is ResponseClass.SUCCESS:
                # 2xx that grants no time: the binding was not made.
                self.last_response = f"{resp.text} (no binding granted)"
            if cls in (ResponseClass.AUTH_REJECTED, ResponseClass.REJECTED):
                if cls is ResponseClass.AUTH_REJECTED:
                    self.auth_retries += 1
                base = self.settings.forbidden_retry_interval_sec
                delay = base * self.rng.uniform(1.0, 1.1)
            else:
                upper = min(self.settings.retry_max_sec, self.settings.retry_base_sec * 2.0**self.failures)
                delay = self.rng.uniform(upper / 2.0, upper)
                if resp.retry_after is not None and resp.retry_after > 0:
                    delay = max(delay, float(min(resp.retry_after, self.settings.retry_after_max_sec)))
            self._move(RegState.RETRY_WAIT)
            self._schedule(delay, "retry")
        if self._stop_requested:
            self._next_at = None  # poll() unregisters or stops next
            self._next_kind = None
            delay = 0.0
        status = self._update_status()
        return Outcome(cls, self.last_response or resp.text, duration, delay, self.state, status)

    def on_flow_lost(self) -> None:
        """The TCP/TLS connection the binding lives on dropped: register again now."""
        # Only a binding believed healthy: while backing off, a dropped flow (or
        # a failed connect, which pjsip reports the same way) must not shortcut
        # the backoff.
        if self.state == RegState.REGISTERED and not self._stop_requested:
            self._schedule(0.0, "register")

    def request_refresh(self) -> None:
        """Refresh (or retry) now, e.g. on an operator's request."""
        if self.state in (RegState.REGISTERED, RegState.RETRY_WAIT, RegState.WAITING):
            self._schedule(0.0, "register")

    def stop(self) -> None:
        """Unregister if bound (after any REGISTER in flight), then stay stopped."""
        self._stop_requested = True
        if self.state == RegState.DISABLED:
            return  # never registered: stays Not Applicable
        if self.state == RegState.WAITING:
            self._next_at = None
            self._next_kind = None
            self._move(RegState.STOPPED)
        self._update_status()

    def _clear_binding(self) -> None:
        self._binding_expires = None
        self._registered_since = None

    # -- views --------------------------------------------------------------

    @property
    def registered(self) -> bool:
        return self._binding_expires is not None and self.clock.monotonic() < self._binding_expires

    @property
    def registration_status(self) -> RegistrationStatus:
        return self._update_status()

    @property
    def next_kind(self) -> str | None:
        """What the next scheduled REGISTER is: register, refresh, retry, failover (None: none)."""
        return self._next_kind

    @property
    def keeps_registering(self) -> bool:
        """Registered or backing off, no REGISTER in flight, no stop asked for: a keepalive may go."""
        return self.state in (RegState.REGISTERED, RegState.RETRY_WAIT) and not self._stop_requested

    @property
    def finished(self) -> bool:
        return self.state in (RegState.STOPPED, RegState.DISABLED) and self._attempt is None

    def next_deadline(self) -> float | None:
        """Monotonic time by which ``poll()`` must next run; None when only an event can change anything.

        Between now and this time ``poll()`` returns no action and changes nothing
        but derived views, so the SIP thread may block until then.
        """
        times: list[float] = []
        if self._binding_expires is not None:
            times.append(self._binding_expires)  # the binding lapses then
        attempt = self._attempt
        if attempt is not None:
            limit = self.settings.unregister_timeout_sec if attempt.unregister else self.settings.register_timeout_sec
            times.append(attempt.started + limit)  # given up then
        if self.state in (RegState.WAITING, RegState.REGISTERED, RegState.RETRY_WAIT):
            if self._stop_requested and self.state != RegState.WAITING:
                times.append(self.clock.monotonic())  # unregister (or stop) is due now
            elif self._next_at is not None:
                times.append(self._next_at)
        return min(times) if times else None

    def change_key(self) -> tuple[object, ...]:
        """What a status reader can see, without the values that move with the clock alone.

        Two equal keys mean equal snapshots apart from wall-clock conversions and
        uptime, so a caller publishes a snapshot only when this key changed.
        """
        return (
            self.state,
            self.registered,
            self._update_status(),
            self._status_updated,
            self.last_response,
            self.last_code,
            self.last_registered_ip,
            self.requested_expires,
            self.granted_expires,
            self._binding_expires,
            self.failures,
            self.auth_retries,
            self._next_kind,
            self._next_at,
            self._registered_since,
            self.attempts,
        )

    @property
    def next_action_in(self) -> float | None:
        if self._next_at is None:
            return None
        return max(0.0, self._next_at - self.clock.monotonic())

    def snapshot(self) -> PolicySnapshot:
        status = self._update_status()
        mono = self.clock.monotonic()
        wall = self.clock.time()

        def to_wall(t: float | None) -> float | None:
            return None if t is None else wall + (t - mono)

        return PolicySnapshot(
            state=self.state,
            registered=self.registered,
            registration_status=status,
            registration_status_updated_at=self._status_updated,
            last_registration_response=self.last_response,
            last_response_code=self.last_code,
            last_registered_ip=self.last_registered_ip,
            requested_expires=self.requested_expires,
            granted_expires=self.granted_expires,
            binding_expires_at=to_wall(self._binding_expires),
            consecutive_failures=self.failures,
            auth_retries=self.auth_retries,
            next_action=self._next_kind,
            next_action_at=to_wall(self._next_at),
            registered_since=to_wall(self._registered_since),
            uptime_sec=None if self._registered_since is None else mono - self._registered_since,
            attempts=self.attempts,
        )
