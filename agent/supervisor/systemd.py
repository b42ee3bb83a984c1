"""systemd integration of the supervisor: ``Type=notify`` and the watchdog.

Rules
-----
* Nothing happens unless systemd asked for it: no ``NOTIFY_SOCKET``, no message.
  The messages go through ``sd_notify(3)`` itself (the ``cysystemd`` wheel
  binds libsystemd), never a hand-made datagram.
* ``READY=1`` once every worker started at start-up has bound its transports
  and HTTP serves; ``STATUS=`` a one-line summary (``12/14 registered, 2
  failing``) whenever it changes; ``RELOADING=1`` ... ``READY=1`` around a
  reload (whatever its outcome); ``STOPPING=1`` when the shutdown starts.
* ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` only while the supervisor's main
  loop runs and its worker pool answers with every running worker's heartbeat
  fresh (``WorkerPool.health``). A worker that dies is the supervisor's to
  replace: the watchdog is withheld only when the supervisor itself is stuck
  or fails to replace a silent worker, and then systemd restarts the unit.
* Only the main process speaks: ``WATCHDOG_PID``, when set, must be ours.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["Notifier", "watchdog_interval"]


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``); None when no watchdog is asked for."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(pid):
        return None
    return int(usec) / 2e6


class Notifier:
    """Sends the service's state to systemd; every method is a no-op outside systemd."""

    def __init__(self, log: Any, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._log = log
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self.watchdog_sec = watchdog_interval(env, os.getpid()) if self.enabled else None
        self._status: str | None = None
        self._withheld: str | None = None

    def _send(self, name: str, value: str | None = None) -> None:
        if not self.enabled:
            return
        from cysystemd.daemon import Notification, notify  # only under systemd

        try:
            if value is None:
                notify(Notification[name])
            else:
                notify(Notification[name], value)
        except Exception as e:  # a notify failure must never stop the agent
            self._log.warning("sd_notify_failed", state=name, error=str(e))

    def ready(self) -> None:
        self._send("READY")

    def reloading(self) -> None:
        self._send("RELOADING")

    def stopping(self) -> None:
        self._send("STOPPING")

    def status(self, text: str) -> None:
        """``STATUS=text``, sent only when it changed."""
        if text != self._status:
            self._status = text
            self._send("STATUS", text)

    def watchdog(self, problem: str | None) -> None:
        """``WATCHDOG=1`` when ``problem`` is None; else log once why it is withheld."""
        if self.watchdog_sec is None:
            return
        if problem is not None:
            if problem != self._withheld:
                self._log.error("watchdog_withheld", reason=problem)
            self._withheld = problem
            return
        if self._withheld is not None:
            self._log.info("watchdog_resumed")
            self._withheld = None
        self._send("WATCHDOG")
