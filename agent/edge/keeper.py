"""``python -m agent.edge.keeper GRACE``: ends the edge's engines once the supervisor is gone.

The supervisor starts one keeper and tells it, one line each on its stdin, the process
group of every engine it starts (``pgid N``) or stops (``forget N``). When stdin ends
(the supervisor exited, or was killed with SIGKILL), the keeper waits GRACE seconds, for
the workers to unregister through the edge, then sends SIGTERM to every group it knows,
SIGKILL to what is left a second later, and exits: no engine outlives its supervisor.
It ignores SIGINT, SIGTERM and SIGHUP (the supervisor stops the engines in order itself).
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal_all(groups: set[int], sig: signal.Signals) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    grace = float(argv[0]) if argv else 3.0
    groups: set[int] = set()
    for line in sys.stdin:
        word, _, number = line.strip().partition(" ")
        if not number.isdigit():
            continue
        if word == "pgid":
            groups.add(int(number))
        elif word == "forget":
            groups.discard(int(number))
    groups = {g for g in groups if _alive(g)}
    if not groups:
        return 0
    time.sleep(grace)
    _signal_all(groups, signal.SIGTERM)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and any(_alive(g) for g in groups):
        time.sleep(0.05)
    _signal_all({g for g in groups if _alive(g)}, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
