"""Process boundaries in imports: the supervisor never loads pjsua2; a worker loads nothing it does not need."""

from __future__ import annotations

import json
import subprocess
import sys

SUPERVISOR_ONLY = ("agent.api", "agent.http", "agent.store", "agent.config", "agent.supervisor", "agent.reload")
HEAVY = ("pydantic", "pydantic_settings", "structlog", "prometheus_client", "yaml", "asyncio", "sqlite3")
HTTP = ("fastapi", "starlette", "uvicorn", "anyio", "h11")  # the supervisor's HTTP stack


def loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_supervisor_never_imports_pjsua2() -> None:
    mods = loaded_after("import agent.cli, agent.supervisor.run, agent.supervisor.pool, agent.http.server")
    assert {"agent.supervisor.pool", "agent.http.app", "agent.api.routes", "fastapi", "uvicorn"} <= mods
    assert not {m for m in mods if m == "pjsua2" or m.startswith("pjsua2.") or m == "agent.worker.adapter"}


def test_a_worker_imports_only_what_it_needs() -> None:
    mods = loaded_after("import agent.worker.zygote")  # everything a worker process has: the zygote's imports
    assert "pjsua2" in mods and "agent.worker.engine" in mods
    unwanted = {m for m in mods if m.split(".")[0] in HEAVY + HTTP or m.startswith(SUPERVISOR_ONLY)}
    assert unwanted == set()
