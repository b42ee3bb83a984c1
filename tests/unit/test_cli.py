"""The command line: every command's --help lists its options, environment and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ["run", "check-config", "status", "reload", "register", "unregister"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_options_environment_and_exit_codes(command: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "agent", command, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "--config" in out
    assert "environment:" in out and "UAC_AGENT_CONFIG" in out
    assert "exit codes:" in out and "\n  0 " in out and "\n  2 " in out
    if command not in ("run", "check-config"):
        assert "--url" in out and "UAC_AGENT_HTTP__API_KEY" in out and "\n  1 " in out


def test_a_client_command_with_no_agent_exits_2_naming_the_address(tmp_path: Path) -> None:
    cfg = f"{tmp_path}/c.json"
    with open(cfg, "w") as f:
        f.write('{"http": {"listen": "127.0.0.1:9", "api_key": "k3y-secret-0123456"}, "connections": "not read"}')
    for args in (["status"], ["reload"], ["register", "x"], ["unregister", "x"]):
        res = subprocess.run(
            [sys.executable, "-m", "agent", *args, "--config", cfg], capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 2, (args, res.stderr)
        assert "no agent answers at http://127.0.0.1:9" in res.stderr
        assert "k3y-secret" not in res.stderr + res.stdout
