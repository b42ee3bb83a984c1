"""The worker zygote's environment (agent.supervisor.launcher.worker_environment): no sockets."""

from __future__ import annotations

from agent.supervisor.launcher import worker_environment


def test_the_workers_environment_keeps_what_python_needs_and_nothing_secret() -> None:
    environ = {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": "/opt/extra",
        "UAC_AGENT_HTTP__API_KEY": "operator-key-0123456789",
        "UAC_AGENT_CONNECTIONS": '[{"external_uac_settings": {"password": "pw"}}]',
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "CREDENTIALS_DIRECTORY": "/run/credentials/uac-agent.service",
        "https_proxy": "http://user:pw@proxy:3128",
        "AWS_SECRET_ACCESS_KEY": "x",
    }
    assert worker_environment(environ, "/srv/uac-agent") == {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": "/srv/uac-agent:/opt/extra",
    }
