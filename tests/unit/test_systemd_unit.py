"""config/uac-agent.service: systemd's own checker accepts it, and it uses what the agent offers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "config" / "uac-agent.service"


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: install Debian's systemd package (scripts/setup.sh does)"
    # the unit names the virtualenv of the install steps; point it at this one's entry point
    exe = Path(sys.executable).with_name("uac-agent")
    assert exe.exists(), exe
    unit = tmp_path / "uac-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/uac-agent/bin/uac-agent", str(exe)))
    res = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "uac-agent.service" not in res.stdout + res.stderr, res.stdout + res.stderr  # no warning about it


def test_the_unit_uses_notify_the_watchdog_and_a_reload_that_can_fail() -> None:
    settings = [ln.split("=", 1) for ln in UNIT.read_text().splitlines() if "=" in ln and not ln.startswith("#")]
    lines = dict(settings)
    assert lines["Type"] == "notify"
    assert lines["NotifyAccess"] == "main"
    assert int(lines["WatchdogSec"]) > 0
    assert lines["ExecReload"].split()[:2] == ["/opt/uac-agent/bin/uac-agent", "reload"]
    assert lines["ExecStart"].split()[:2] == ["/opt/uac-agent/bin/uac-agent", "run"]
    assert "AF_UNIX" in lines["RestrictAddressFamilies"]  # the notify socket
    assert lines["RestartPreventExitStatus"] == "2"
