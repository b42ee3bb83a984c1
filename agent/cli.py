# PYTHON_ARGCOMPLETE_OK
"""``uac-agent``: ``run``, ``check-config``, and the commands that ask a running agent
(``status``, ``reload``, ``register``, ``unregister``; ``agent/ctl.py``).

SIGHUP or ``uac-agent reload`` (``systemctl reload``) re-reads the config file and
applies only what changed (agent/reload.py); a bad file is refused and the agent
carries on, and ``uac-agent reload`` then exits 1 with the reason.

The process ``run`` starts is the supervisor (``agent/supervisor``); the SIP work
runs in worker processes it starts and watches (``agent/worker``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.config import AgentSettings, ConfigError, load_client_settings, load_settings

__all__ = ["main"]

_CONFIG_ENV = """\
environment:
  UAC_AGENT_CONFIG            the config file when --config is not given
  UAC_AGENT_<SECTION>__<KEY>  overrides a setting, e.g. UAC_AGENT_HTTP__LISTEN, UAC_AGENT_SIP__PORT
  UAC_AGENT_CONNECTIONS       a JSON list that replaces the file's connections
"""
_CLIENT_ENV = """\
environment:
  UAC_AGENT_CONFIG            the config file when --config is not given
  UAC_AGENT_HTTP__LISTEN      where the agent listens (else the file's http.listen)
  UAC_AGENT_HTTP__API_KEY     the operator key (else the file's http.api_key or http.api_key_file)
"""

_EXITS = {
    "run": "exit codes:\n  0 stopped by SIGTERM/SIGINT after unregistering\n  1 cannot start (a port taken, "
    "the store unreadable)\n  2 bad config (one line per problem)\n  128+N a second signal N forced the exit\n",
    "check-config": "exit codes:\n  0 the config is valid\n  2 it is not (one line per problem)\n",
    "status": "exit codes:\n  0 every active connection is registered\n  1 at least one is not\n"
    "  2 the agent cannot be reached (or refused the key), or a bad config\n",
    "reload": "exit codes:\n  0 the file was applied\n  1 the agent refused it (the reason is printed; "
    "the running config stays), or a connection failed to apply\n  2 the agent cannot be reached, or a bad config\n",
    "register": "exit codes:\n  0 registered (or requested, with --wait 0)\n  1 refused, or not registered "
    "within --wait (the last response is printed)\n  2 the agent cannot be reached, or a bad config\n",
    "unregister": "exit codes:\n  0 unregistered\n  1 refused (unknown id, a connection that keeps no "
    "registration)\n  2 the agent cannot be reached, or a bad config\n",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uac-agent",
        description="SIP UAC registration agent: registers to PBXs, keeps the registrations alive, "
        "forwards the PBX's calls",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_CONFIG_ENV,
    )
    p.add_argument("--version", action="version", version=f"uac-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "run": "register the configured connections and serve status until SIGTERM",
        "check-config": "validate the configuration, say what will be advertised, and exit",
        "status": "show every connection of the running agent",
        "reload": "make the running agent re-read its config file (ExecReload)",
        "register": "register (refresh) a connection of the running agent now",
        "unregister": "unregister a connection of the running agent now (it stays unregistered)",
    }
    for name, help_text in helps.items():
        client = name not in ("run", "check-config")
        sp = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=(_CLIENT_ENV if client else _CONFIG_ENV) + "\n" + _EXITS[name],
        )
        sp.add_argument(
            "--config", "-c", type=Path, default=None, help="YAML, TOML or JSON file (default: $UAC_AGENT_CONFIG)"
        )
        if client:
            sp.add_argument("--url", help="the agent's HTTP address, e.g. http://127.0.0.1:8080 (default: http.listen)")
            sp.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer (default 10)")
        if name in ("register", "unregister"):
            sp.add_argument("connection_id", help="the connection's id")
        if name == "register":
            sp.add_argument(
                "--wait", type=float, default=15.0, help="seconds to wait for the registrar's answer (0: do not wait)"
            )
        if name == "status":
            sp.add_argument("--json", action="store_true", help="print the agent's JSON (for scripts)")
    try:
        import argcomplete

        argcomplete.autocomplete(p)  # `eval "$(register-python-argcomplete uac-agent)"` turns it on
    except ImportError:  # pragma: no cover - optional
        pass
    return p


def _config_path(args: argparse.Namespace) -> Path | None:
    path: Path | None = args.config
    if path is None and os.environ.get("UAC_AGENT_CONFIG"):
        path = Path(os.environ["UAC_AGENT_CONFIG"])
    return path


def _problems(e: ConfigError) -> int:
    for line in e.problems:
        print(f"uac-agent: config error: {line}", file=sys.stderr)
    return 2


def _client_command(args: argparse.Namespace) -> int:
    from agent import ctl

    try:
        settings = load_client_settings(_config_path(args))
    except ConfigError as e:
        return _problems(e)
    client = ctl.Client.from_settings(settings, args.url, args.timeout)
    if args.command == "status":
        return ctl.run_status(client, sys.stdout, sys.stderr, as_json=args.json)
    if args.command == "reload":
        return ctl.run_reload(client, sys.stdout, sys.stderr)
    register = args.command == "register"
    wait = args.wait if register else 0.0
    return ctl.run_action(client, args.connection_id, register, sys.stdout, sys.stderr, wait=wait)


def _check_config(settings: AgentSettings) -> int:
    active = sum(1 for c in settings.connections if c.registers)
    workers = -(-active // settings.workers.connections_per_worker)
    print(
        f"config OK: {len(settings.connections)} connection(s), {active} registering "
        f"(on {workers} worker process(es) at start, at most {settings.max_workers}; "
        f"SIP: UDP and TCP on {settings.sip.bind}:{settings.sip.port}"
        + (f", TLS on {settings.sip.effective_tls_port}" if settings.sip.tls_server else ", no TLS listener")
        + f"; loopback ports {settings.edge.loopback_port}-{sum(settings.tls_target_ports) - 1})"
    )
    from agent.addresses import explain

    for line in explain(settings):
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command not in ("run", "check-config"):
        return _client_command(args)
    try:
        settings = load_settings(_config_path(args))
    except ConfigError as e:
        return _problems(e)
    if args.command == "check-config":
        return _check_config(settings)
    from agent.supervisor.run import run  # not needed by check-config

    return run(settings)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
