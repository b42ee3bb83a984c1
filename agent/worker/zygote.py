"""``python -m agent.worker.zygote FD``: the process every worker is forked from.

Started once by the supervisor (``agent/supervisor/launcher.py``). It imports
the worker's code and the pjsua2 bindings once, freezes those objects out of
the garbage collector's reach, and then forks a worker on each request. The
workers share those pages copy-on-write: about 4 MiB of memory each instead of
about 15 MiB for a worker that imports everything itself (measured in
docs/workers.md), and no interpreter start-up per worker.

Protocol on FD (a SOCK_SEQPACKET socket to the supervisor, one message each):
``fork K`` with one file descriptor attached (the worker's end of its own
socketpair) is answered by ``pid K PID`` or ``error K TEXT``. Each worker is
double-forked, so that it becomes the supervisor's own child (the supervisor
is a child subreaper): the supervisor reaps it and reads its exit status.

It has no threads (forking is safe), ignores SIGINT and SIGHUP like the
workers, and exits when the supervisor closes the socket. Nothing in it calls
pjsua2: each worker creates its own Endpoint after the fork.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import socket
import sys
from collections.abc import Sequence

from agent.worker.adapter import PjsuaAdapter
from agent.worker.main import serve

__all__ = ["main"]

_PR_SET_NAME = 15


def _name(title: str) -> None:
    """Name the process as ``ps -o comm`` and ``top`` show it (15 bytes at most)."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, title.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _worker(ctl: socket.socket, fd: int, index: int) -> None:
    """In the grandchild: become worker ``index`` on ``fd``; never returns."""
    code = 1
    try:
        ctl.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _name(f"uac-worker-{index}")
        code = serve(socket.socket(fileno=fd), PjsuaAdapter, hard_exit=os._exit)
    except BaseException as e:  # the process ends here whatever happens
        print(f"uac-agent worker {index}: {e!r}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _fork(ctl: socket.socket, fd: int, index: int) -> None:
    try:
        middle = os.fork()
    except OSError as e:
        os.close(fd)
        ctl.send(f"error {index} fork failed: {e.strerror}".encode())
        return
    if middle == 0:
        # The middle process forks the worker, reports its pid and exits at once,
        # so the worker is re-parented to the supervisor (the nearest subreaper).
        try:
            worker = os.fork()
            if worker == 0:
                _worker(ctl, fd, index)
            ctl.send(f"pid {index} {worker}".encode())
        except BaseException as e:
            try:
                ctl.send(f"error {index} fork failed: {e!r}".encode())
            except OSError:
                pass
        os._exit(0)
    os.close(fd)
    os.waitpid(middle, 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m agent.worker.zygote FD (started by uac-agent run, not by hand)", file=sys.stderr)
        return 2
    ctl = socket.socket(fileno=int(args[0]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _name("uac-zygote")
    gc.collect()
    gc.freeze()  # what is loaded now stays shared with every worker forked from here
    ctl.send(b"ready")
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctl, 256, 1)
        except InterruptedError:
            continue
        except OSError:
            return 0
        if not msg:
            for fd in fds:
                os.close(fd)
            return 0  # the supervisor is gone
        parts = msg.decode(errors="replace").split()
        if len(parts) != 2 or parts[0] != "fork" or not parts[1].isdigit() or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            ctl.send(f"error - bad request {msg[:40]!r}".encode())
            continue
        _fork(ctl, fds[0], int(parts[1]))


if __name__ == "__main__":
    raise SystemExit(main())
