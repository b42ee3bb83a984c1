"""``uac-agent run`` and ``uac-agent check-config``.

SIGHUP (``systemctl reload``) re-reads the config file and applies only what
changed (agent/reload.py); a bad file is refused and the agent carries on.

The process it starts is the supervisor (``agent/supervisor``); the SIP work
runs in worker processes it starts and watches (``agent/worker``).

Exit codes: 0 after a graceful stop (or a valid config), 2 for a bad config
(one line per problem on stderr, no traceback), 1 when the agent cannot start
(e.g. a SIP port is taken), 128+N when a second signal N forces the exit.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.config import AgentSettings, ConfigError, load_settings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uac-agent", description="SIP UAC registration agent")
    p.add_argument("--version", action="version", version=f"uac-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "register the configured connections and serve status"),
        ("check-config", "validate the configuration and exit"),
    ):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument(
            "--config", "-c", type=Path, default=None, help="YAML, TOML or JSON file (default: $UAC_AGENT_CONFIG)"
        )
    return p


def _load(args: argparse.Namespace) -> AgentSettings:
    path = args.config
    if path is None and os.environ.get("UAC_AGENT_CONFIG"):
        path = Path(os.environ["UAC_AGENT_CONFIG"])
    return load_settings(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _load(args)
    except ConfigError as e:
        for line in e.problems:
            print(f"uac-agent: config error: {line}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        active = sum(1 for c in settings.connections if c.registers)
        workers = -(-active // settings.workers.connections_per_worker)
        print(
            f"config OK: {len(settings.connections)} connection(s), {active} registering "
            f"(on {workers} worker process(es) at start, at most {settings.max_workers}; "
            f"SIP ports {settings.sip.port}-{settings.worker_sip_port(settings.max_workers - 1)} UDP/TCP, "
            f"{settings.tls_base_port}-{settings.worker_tls_port(settings.max_workers - 1)} TLS)"
        )
        return 0
    from agent.supervisor.run import run  # not needed by check-config

    return run(settings)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
