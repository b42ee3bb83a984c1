"""How a worker process is started: forked from a zygote, reached by a socketpair.

* The supervisor starts one **zygote** (``python -m agent.worker.zygote``) with
  ``subprocess``. It imports the worker's code and pjsua2 once, then forks each
  worker on request (``agent/worker/zygote.py``): workers share those pages, so
  an idle worker costs about 4 MiB instead of about 15 MiB, and starting one
  takes milliseconds instead of an interpreter start-up.
* Not ``multiprocessing``: its spawned or forkserver children re-import the
  supervisor's ``__main__`` (the HTTP server, the API, pydantic), which a lean
  worker must not carry, and its pickled-process hand-over hides the one
  channel that matters here.
* Each worker gets one end of its own ``socketpair`` (handed to the zygote with
  SCM_RIGHTS): the only channel between the two, which nothing else can reach.
  When the supervisor dies, the socket closes and the worker unregisters and
  exits.
* The supervisor is a child subreaper (``PR_SET_CHILD_SUBREAPER``) and the
  zygote double-forks, so every worker is the supervisor's own child: it reaps
  it and reads its exit status (killed by SIGKILL, aborted, ...).

Worker stdout and stderr are the supervisor's own, so what a dying worker
prints (a pjsip assertion, say) reaches the same journal.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import agent

__all__ = ["Launched", "Launcher", "ZygoteLauncher", "become_subreaper", "describe_exit", "worker_environment"]


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

    def close(self) -> None:
        """Release what the launcher holds (the zygote), once every worker has stopped."""
        ...


_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (the double-forked workers); False where the kernel refuses."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class _Adopted:
    """A worker forked by the zygote and re-parented to this process."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self._pid = pid
        self._sock = sock
        self._status: int | None = None

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def sock(self) -> socket.socket:
        return self._sock

    def poll(self) -> int | None:
        if self._status is None:
            try:
                pid, status = os.waitpid(self._pid, os.WNOHANG)
            except ChildProcessError:
                return None  # not re-parented to us yet (its middle process is exiting)
            if pid == self._pid:
                self._status = os.waitstatus_to_exitcode(status)
        return self._status

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        return self._status

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# What the zygote and its workers keep of the supervisor's environment: what Python and the
# C library need to run, nothing else. Settings reach workers over their socket; an API key,
# a password in UAC_AGENT_CONNECTIONS, systemd's NOTIFY_SOCKET or a proxy setting never does.
_KEPT = frozenset({"PATH", "HOME", "TMPDIR", "TZ", "LANG", "LANGUAGE", "LD_LIBRARY_PATH", "VIRTUAL_ENV"})
_KEPT_PREFIXES = ("LC_", "PYTHON")


def worker_environment(environ: Mapping[str, str], root: str) -> dict[str, str]:
    """The zygote's (and so every worker's) environment: ``environ`` scrubbed, and ``root`` (the
    directory holding the ``agent`` package) first on PYTHONPATH."""
    env = {k: v for k, v in environ.items() if k in _KEPT or k.startswith(_KEPT_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


class ZygoteLauncher:
    """Start worker k by asking the zygote to fork it (the zygote is started, and restarted, as needed)."""

    def __init__(self, python: str | None = None, timeout: float = 30.0) -> None:
        self._python = python or sys.executable
        self._timeout = timeout
        self._env = worker_environment(os.environ, str(Path(agent.__file__).resolve().parent.parent))
        self._lock = threading.Lock()
        self._zygote: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        if not become_subreaper():
            raise OSError("cannot become a child subreaper (prctl PR_SET_CHILD_SUBREAPER); Linux 3.4+ is needed")

    @property
    def zygote_pid(self) -> int | None:
        z = self._zygote
        return z.pid if z is not None and z.poll() is None else None

    def _start_zygote(self) -> socket.socket:
        self._stop_zygote()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._zygote = subprocess.Popen(
                [self._python, "-m", "agent.worker.zygote", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=self._env,
            )
        finally:
            theirs.close()
        ours.settimeout(self._timeout)
        try:
            hello = ours.recv(64)
        except OSError as e:
            raise OSError(f"the worker zygote did not start: {e}") from None
        if hello != b"ready":
            raise OSError(f"the worker zygote did not start (it said {hello!r})")
        self._ctl = ours
        return ours

    def launch(self, index: int) -> Launched:
        with self._lock:
            for attempt in (1, 2):
                ctl = self._ctl if self._ctl is not None and self.zygote_pid is not None else self._start_zygote()
                parent, child = socket.socketpair()
                try:
                    socket.send_fds(ctl, [f"fork {index}".encode()], [child.fileno()])
                    reply = ctl.recv(256).decode(errors="replace")
                except OSError as e:
                    parent.close()
                    if attempt == 2:
                        raise OSError(f"the worker zygote does not answer: {e}") from None
                    self._ctl = None  # start a new zygote and try once more
                    continue
                finally:
                    child.close()
                parts = reply.split(maxsplit=2)
                if len(parts) == 3 and parts[0] == "pid" and parts[1] == str(index) and parts[2].isdigit():
                    return _Adopted(int(parts[2]), parent)
                parent.close()
                if not reply:
                    self._ctl = None
                    if attempt == 1:
                        continue
                raise OSError(f"the worker zygote could not fork worker {index}: {reply or 'it exited'}")
        raise OSError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._stop_zygote()

    def _stop_zygote(self) -> None:
        if self._ctl is not None:
            self._ctl.close()  # the zygote exits on end of file
            self._ctl = None
        z = self._zygote
        if z is not None:
            try:
                z.wait(5)
            except subprocess.TimeoutExpired:
                z.kill()
                z.wait(5)
            self._zygote = None


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
