"""The command line: every command's --help lists its options, environment and exit codes."""

from __future__ import annotations

import os
import socket
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


def test_the_key_never_goes_through_an_http_proxy(tmp_path: Path) -> None:
    """With http_proxy (and HTTP_PROXY) naming a proxy, a client command goes to the agent's
    address itself: the proxy gets no connection, so never the key."""
    proxy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(8)
    proxy.settimeout(0.5)
    url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
    cfg = tmp_path / "c.json"
    cfg.write_text('{"http": {"listen": "127.0.0.1:9", "api_key": "k3y-secret-0123456"}, "connections": "not read"}')
    env = {**os.environ, "http_proxy": url, "HTTP_PROXY": url, "https_proxy": url, "no_proxy": "", "NO_PROXY": ""}
    try:
        res = subprocess.run(
            [sys.executable, "-m", "agent", "status", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert res.returncode == 2, res.stderr
        assert "no agent answers at http://127.0.0.1:9" in res.stderr
        with pytest.raises(TimeoutError):
            proxy.accept()  # nothing ever connected to the proxy
    finally:
        proxy.close()
