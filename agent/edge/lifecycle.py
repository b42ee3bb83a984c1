"""An edge engine's lifecycle (Kamailio, rtpengine, HAProxy): states, moves, restart delays (pure).

Rules
-----
* An engine is started once (``STOPPED`` -> ``STARTING``), is ``UP`` once it answers on its
  control socket, and is ``DOWN`` from the moment its process exits until it is started
  again. Stopping wins over everything: from ``STOPPING`` only the exit is expected.
* A dead engine is started again at once when it had run for ``STABLE_AFTER_SEC``; one
  that keeps dying waits 0.5 s, 1 s, 2 s ... up to ``MAX_DELAY_SEC`` between tries, so a
  broken engine (a port taken, a bad config) is retried without spinning. The first
  restart is always immediate: a killed engine is back well within 2 s.
* Any move not in :data:`MOVES` raises :class:`IllegalMoveError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from agent.core.clock import Clock

__all__ = ["MAX_DELAY_SEC", "MOVES", "STABLE_AFTER_SEC", "EngineLifecycle", "EngineState", "IllegalMoveError", "Move"]

STABLE_AFTER_SEC = 30.0
FIRST_DELAY_SEC = 0.5
MAX_DELAY_SEC = 10.0


class EngineState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    UP = "up"
    DOWN = "down"
    STOPPING = "stopping"


class Move(enum.StrEnum):
    START = "start"  # the process is started
    READY = "ready"  # it answered on its control socket
    EXITED = "exited"  # its process ended (or was killed for not answering in time)
    STOP = "stop"  # the supervisor is stopping


class IllegalMoveError(Exception):
    """A move the engine's current state does not allow."""


S, M = EngineState, Move
MOVES: dict[tuple[EngineState, Move], EngineState] = {
    (S.STOPPED, M.START): S.STARTING,
    (S.STARTING, M.READY): S.UP,
    (S.STARTING, M.EXITED): S.DOWN,
    (S.UP, M.EXITED): S.DOWN,
    (S.DOWN, M.START): S.STARTING,
    (S.STOPPED, M.STOP): S.STOPPED,
    (S.STARTING, M.STOP): S.STOPPING,
    (S.UP, M.STOP): S.STOPPING,
    (S.DOWN, M.STOP): S.STOPPED,
    (S.STOPPING, M.EXITED): S.STOPPED,
    (S.STOPPING, M.STOP): S.STOPPING,
}


@dataclass
class EngineLifecycle:
    name: str
    clock: Clock
    state: EngineState = EngineState.STOPPED
    started_at: float | None = None
    quick_deaths: int = 0  # deaths in a row, each within STABLE_AFTER_SEC of its start
    restarts: int = 0
    history: list[tuple[EngineState, Move, EngineState]] = field(default_factory=list)

    def move(self, move: Move) -> EngineState:
        new = MOVES.get((self.state, move))
        if new is None:
            raise IllegalMoveError(f"{self.name}: {move.value} while {self.state.value}")
        old, self.state = self.state, new
        self.history.append((old, move, new))
        del self.history[:-20]
        now = self.clock.monotonic()
        if move is Move.START:
            if old is EngineState.DOWN:
                self.restarts += 1
            self.started_at = now
        elif move is Move.EXITED and new is EngineState.DOWN:
            ran = now - (self.started_at if self.started_at is not None else now)
            self.quick_deaths = self.quick_deaths + 1 if ran < STABLE_AFTER_SEC else 1
        return new

    @property
    def restart_delay(self) -> float:
        """How long a DOWN engine waits before it is started again."""
        if self.quick_deaths <= 1:
            return 0.0
        return min(MAX_DELAY_SEC, FIRST_DELAY_SEC * float(2 ** (self.quick_deaths - 2)))
