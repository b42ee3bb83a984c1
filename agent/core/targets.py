"""Which of a next hop's targets a request goes to, and when to fail over (no I/O).

Rules (seed 003, "Failover & Retries")
--------------------------------------
* Targets come in failover order (agent/dns.py: SRV priority, then weight).
* A final answer of 408, 480, 503 or 504, or no answer at all (timeout,
  transport or TLS error), **fails over**: the next target not yet tried in
  this round is used at once, before any backoff. Any other answer (2xx, 401,
  403, 404, 486, 603, ...) is the registrar's word and does not.
* When every target of the round has failed over, the round ends: the caller
  applies its backoff, and the next attempt starts a new round from the best
  target.
* A success ends the round too; the target that answered stays in use. The
  best target is tried again only when the caller says so (``prefer_best``,
  once it has answered a probe).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FAILOVER_CODES", "TargetCursor", "fails_over"]

FAILOVER_CODES = frozenset({408, 480, 503, 504})


def fails_over(code: int, received: bool) -> bool:
    """Whether this outcome moves the request to the next target."""
    return not received or code in FAILOVER_CODES


@dataclass
class TargetCursor:
    count: int
    index: int = 0
    tried: set[int] = field(default_factory=set)

    def on_failover(self) -> int | None:
        """The current target failed over: the next untried one, or None when the round is over
        (the cursor is then back at the best target for the next round)."""
        self.tried.add(self.index)
        for i in range(self.count):
            if i not in self.tried:
                self.index = i
                return i
        self.tried.clear()
        self.index = 0
        return None

    def end_round(self) -> None:
        """An answer that does not fail over: the round is over, the current target stays."""
        self.tried.clear()

    def prefer_best(self) -> bool:
        """Go back to the best target (it answered a probe); True when that is a move."""
        moved = self.index != 0
        self.index = 0
        self.tried.clear()
        return moved

    def retarget(self, count: int, keep: int | None) -> None:
        """The target list changed (DNS TTL): stay on ``keep`` (the current target's new index) when
        it is still there, else start from the best."""
        self.count = count
        self.tried.clear()
        self.index = keep if keep is not None and 0 <= keep < count else 0
