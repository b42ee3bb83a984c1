"""Reload: re-read the config file and apply only what changed.

Rules
-----
* A file that does not load (syntax, validation, a limit) is refused with one
  ``reload_refused`` log line per reason; the running state carries on.
* Connections are compared whole (settings and secrets): a connection whose
  validated settings are equal is not touched at all: no REGISTER, same
  Call-ID. Added ones are added, removed ones unregistered and removed, changed
  ones applied (the SIP thread re-registers only if the registration changed).
* ``defaults`` (registration knobs) apply live; the other sections (``sip``,
  ``http``, ``log``, ``store``, ``workers``, ``shutdown_timeout_sec``) need a restart: a
  change there is logged as ``reload_needs_restart`` and the running values stay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.config import AgentSettings, ConfigError, Connection, load_settings

__all__ = [
    "RELOADABLE_FIELDS",
    "RESTART_ONLY",
    "ConnectionDiff",
    "ReloadOutcome",
    "api_keys_changed",
    "diff_connections",
    "reload_from_file",
    "reload_outcome",
    "restart_only_changes",
]

# (edge and capture are rendered into the engines' configs once, at start)
RESTART_ONLY = ("sip", "http", "log", "store", "workers", "edge", "capture", "shutdown_timeout_sec")


@dataclass(frozen=True)
class ConnectionDiff:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]


def diff_connections(old: dict[str, Connection], new: dict[str, Connection]) -> ConnectionDiff:
    """Which connection ids were added, removed, changed or left as they were (in file order)."""
    return ConnectionDiff(
        added=tuple(k for k in new if k not in old),
        removed=tuple(k for k in old if k not in new),
        changed=tuple(k for k in new if k in old and old[k] != new[k]),
        unchanged=tuple(k for k in new if k in old and old[k] == new[k]),
    )


# Fields of a restart-only section that a reload does apply.
RELOADABLE_FIELDS = {"http": ("api_key", "api_keys")}


def restart_only_changes(old: AgentSettings, new: AgentSettings) -> list[str]:
    """Sections that differ but can only take effect on a restart."""
    out = []
    for name in RESTART_ONLY:
        a, b = getattr(old, name), getattr(new, name)
        live = RELOADABLE_FIELDS.get(name, ())
        if live:
            a = a.model_copy(update=dict.fromkeys(live))
            b = b.model_copy(update=dict.fromkeys(live))
        if a != b:
            out.append(name)
    return out


def api_keys_changed(old: AgentSettings, new: AgentSettings) -> bool:
    return any(getattr(old.http, f) != getattr(new.http, f) for f in RELOADABLE_FIELDS["http"])


class Reloadable(Protocol):
    def reload(self, new: AgentSettings) -> dict[str, Any]: ...


class ReloadRefusedError(Exception):
    """The new file loads but cannot be applied; ``problems`` says why, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload did: applied (``report`` says what changed), or refused (``problems`` say why)."""

    applied: bool
    problems: tuple[str, ...] = ()
    report: dict[str, Any] = field(default_factory=dict)


def reload_outcome(path: Path | None, target: Reloadable, log: Any) -> ReloadOutcome:
    """Re-read ``path`` and apply it; log the outcome and return it."""
    if path is None:
        reason = "the agent was started without a config file: nothing to re-read"
        log.warning("reload_refused", reason=reason)
        return ReloadOutcome(False, (reason,))
    log.info("reload_requested", config=str(path))
    try:
        new = load_settings(path)
    except ConfigError as e:
        log.error("reload_refused", config=str(path), problems=e.problems, note="the running configuration stays")
        return ReloadOutcome(False, tuple(e.problems))
    try:
        report = target.reload(new)
    except ReloadRefusedError as e:
        log.error("reload_refused", config=str(path), problems=e.problems, note="the running configuration stays")
        return ReloadOutcome(False, tuple(e.problems))
    log.info("reload_applied", config=str(path), **report)
    return ReloadOutcome(True, (), report)


def reload_from_file(path: Path | None, target: Reloadable, log: Any) -> bool:
    """Re-read ``path`` and apply it; log and return False when it is refused."""
    return reload_outcome(path, target, log).applied
