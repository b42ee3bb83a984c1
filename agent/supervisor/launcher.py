"""How a worker is started: a new interpreter (``python -m agent.worker``) and a socketpair.

``subprocess`` plus a socket rather than ``multiprocessing``: a spawned
multiprocessing child re-imports the parent's ``__main__`` (the whole
supervisor: HTTP, API, pydantic), which a lean worker must not carry. Here the
child imports only ``agent.worker`` and what it needs, and the socket is the
one channel between the two (inherited as a file descriptor; nothing else can
reach it).

Worker stdout and stderr are the supervisor's own, so what a dying worker
prints (a pjsip assertion, say) reaches the same journal.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Protocol

import agent

__all__ = ["Launched", "Launcher", "ProcessLauncher", "describe_exit"]


class Launched(Protocol):
    """A started worker, as the pool sees it."""

    @property
    def pid(self) -> int: ...

    @property
    def sock(self) -> socket.socket: ...

    def poll(self) -> int | None:
        """Exit status once ended (negative: killed by that signal), else None."""
        ...

    def wait(self, timeout: float) -> int | None: ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    def launch(self, index: int) -> Launched: ...


class _Process:
    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self._proc = proc
        self._sock = sock

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def sock(self) -> socket.socket:
        return self._sock

    def poll(self) -> int | None:
        return self._proc.poll()

    def wait(self, timeout: float) -> int | None:
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass


class ProcessLauncher:
    """Start worker k as ``python -m agent.worker FD k``."""

    def __init__(self, python: str | None = None) -> None:
        self._python = python or sys.executable
        root = str(Path(agent.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        self._env = env

    def launch(self, index: int) -> Launched:
        parent, child = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [self._python, "-m", "agent.worker", str(child.fileno()), str(index)],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env=self._env,
            )
        except Exception:
            parent.close()
            raise
        finally:
            child.close()
        return _Process(proc, parent)


def describe_exit(status: int | None) -> str:
    """Words for a worker's exit status."""
    if status is None:
        return "still running"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        extra = {"SIGKILL": " (killed, or out of memory)", "SIGABRT": " (aborted: a SIP stack assertion)"}
        return f"killed by {name}{extra.get(name, '')}"
    return f"exited with status {status}"
