"""The sd_notify side of the supervisor (agent/supervisor/systemd.py), on a real datagram socket."""

from __future__ import annotations

import io
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.logs import configure_logging
from agent.supervisor.systemd import Notifier, watchdog_interval


@pytest.fixture
def sock() -> Iterator[tuple[socket.socket, str]]:
    d = tempfile.mkdtemp(prefix="nfy")
    path = os.path.join(d, "n")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.5)
    yield s, path
    s.close()
    os.unlink(path)
    os.rmdir(d)


def received(s: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(s.recv(4096).decode())
        except TimeoutError:
            return out


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_our_pid() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval({}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 7) is None


def test_states_status_and_a_watchdog_withheld_while_something_is_wrong(
    monkeypatch: pytest.MonkeyPatch, sock: tuple[socket.socket, str]
) -> None:
    s, path = sock
    monkeypatch.setenv("NOTIFY_SOCKET", path)  # libsystemd reads it from the environment
    stream = io.StringIO()
    n = Notifier(configure_logging("json", "info", stream), {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    assert n.watchdog_sec == 0.5
    n.ready()
    n.status("1/2 registered, 1 failing")
    n.status("1/2 registered, 1 failing")  # unchanged: not sent again
    n.watchdog(None)
    n.watchdog("worker(s) 3 silent for over 41 s")
    n.watchdog("worker(s) 3 silent for over 41 s")
    n.watchdog(None)
    n.reloading()
    n.stopping()
    assert received(s) == [
        "READY=1",
        "STATUS=1/2 registered, 1 failing",
        "WATCHDOG=1",
        "WATCHDOG=1",
        "RELOADING=1",
        "STOPPING=1",
    ]
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["event"], e.get("reason")) for e in events] == [
        ("watchdog_withheld", "worker(s) 3 silent for over 41 s"),
        ("watchdog_resumed", None),
    ]


def test_outside_systemd_nothing_is_sent(sock: tuple[socket.socket, str]) -> None:
    s, _ = sock
    n = Notifier(configure_logging("json", "info", io.StringIO()), {})
    n.ready()
    n.status("x")
    n.watchdog(None)
    assert not n.enabled
    assert n.watchdog_sec is None
    assert received(s) == []


def test_log_lines_carry_their_priority_only_when_stdout_is_the_journal(tmp_path: Path) -> None:
    with open(tmp_path / "journal", "w") as stream:
        st = os.fstat(stream.fileno())
        log = configure_logging("json", "debug", stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        log.warning("w_event", connection_id="c1")
        log.info("i_event")
        log.error("e_event")
        log.debug("d_event")
    lines = (tmp_path / "journal").read_text().splitlines()
    assert [ln[:3] for ln in lines] == ["<4>", "<6>", "<3>", "<7>"]
    assert json.loads(lines[0][3:])["event"] == "w_event"  # the rest of the line is the usual JSON
    with open(tmp_path / "plain", "w") as stream:
        log = configure_logging("json", "info", stream, {"JOURNAL_STREAM": "1:2"})  # another stream is the journal
        log.warning("w_event")
    assert json.loads((tmp_path / "plain").read_text())["event"] == "w_event"
