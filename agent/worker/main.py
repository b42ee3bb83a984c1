"""``python -m agent.worker FD INDEX``: worker INDEX of a supervisor.

Started by the supervisor with one end of a socketpair as file descriptor FD.
The first message on it is :class:`~agent.ipc.messages.Start`; the main thread
then becomes the SIP thread (pjsua2's "main thread") and a reader thread feeds
it commands.

* SIGTERM: unregister everything (within ``shutdown_timeout_sec``) and exit 0.
* SIGINT and SIGHUP are ignored: a Ctrl-C in a terminal reaches the whole
  process group, and the supervisor decides what each worker does.
* The supervisor gone (end of file on the socket, whatever killed it): the
  worker unregisters its connections and exits within 5 s. If its SIP thread
  cannot (stuck), the reader thread ends the process anyway: a worker never
  outlives its supervisor.

Lean on purpose: this module and what it imports never load the HTTP server,
the API, the store, pydantic or structlog.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence

from agent.core.clock import SystemClock
from agent.ipc.messages import Shutdown
from agent.worker.engine import WorkerEngine
from agent.worker.link import Link, Waker
from agent.worker.stack import StackFactory

__all__ = ["GONE_DEADLINE_SEC", "main", "serve"]

# Unregister deadline once the supervisor is gone; the process ends by 5 s.
GONE_DEADLINE_SEC = 2.5
_HARD_EXIT_SEC = 4.5


def serve(
    sock: socket.socket,
    stack_factory: StackFactory,
    waker_factory: Callable[[str, int], Callable[[], None]] = Waker,
    install_signals: bool = True,
    hard_exit: Callable[[int], None] | None = None,
    on_engine: Callable[[WorkerEngine], None] | None = None,
) -> int:
    """Run one worker on ``sock`` until it is told to stop or the supervisor is gone."""
    link = Link(sock)
    try:
        start = link.read_start()
    except Exception as e:
        print(f"uac-agent worker: no start message: {e}", file=sys.stderr)
        return 1
    engine = WorkerEngine(
        start,
        stack_factory,
        link.send,
        waker_factory(start.stack.bind, start.stack.port),
        SystemClock(),
        random.Random(),
    )
    if on_engine is not None:
        on_engine(engine)
    deadline = min(start.shutdown_timeout_sec, GONE_DEADLINE_SEC)

    def on_eof(reason: str) -> None:
        engine.submit(Shutdown(deadline, reason=f"supervisor gone ({reason})"))
        if hard_exit is not None:
            timer = threading.Timer(_HARD_EXIT_SEC, hard_exit, args=(3,))
            timer.daemon = True
            timer.start()

    if install_signals:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(
            signal.SIGTERM, lambda _s, _f: engine.submit(Shutdown(start.shutdown_timeout_sec, reason="SIGTERM"))
        )
    reader = threading.Thread(target=link.serve_commands, args=(engine.submit, on_eof), name="link", daemon=True)
    reader.start()
    try:
        return engine.run()
    finally:
        link.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2) or not all(a.isdigit() for a in args):
        print("usage: python -m agent.worker FD [INDEX] (started by uac-agent run, not by hand)", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(args[0]))
    from agent.worker.adapter import PjsuaAdapter  # the only module that imports pjsua2

    return serve(sock, PjsuaAdapter, hard_exit=os._exit)
