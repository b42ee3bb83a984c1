"""Logging never waits for the log's reader (agent/logs.py): a pipe nobody reads costs dropped
lines, counted and told, never a blocked caller; a flood of one warning is kept to a few a second."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import structlog

from agent.logs import REPEATS_PER_SEC, LineSink, RepeatLimiter


def test_a_pipe_nobody_reads_drops_and_counts_lines_and_never_blocks_a_caller() -> None:
    r, w = os.pipe()
    stream = os.fdopen(w, "w")
    sink = LineSink(stream, capacity=1000)
    counted: list[float] = []
    sink.count_drops(counted.append)  # the metric's inc
    done = threading.Event()

    def flood() -> None:
        for i in range(50_000):  # about 3 MB: far more than the pipe (64 KB) and the queue hold
            sink.write(json.dumps({"event": "line", "i": i, "pad": "x" * 40}))
        done.set()

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    assert done.wait(30), "a write waited for the reader"
    assert sink.dropped > 40_000
    assert sum(counted) == sink.dropped
    dropped = sink.dropped
    reader = os.fdopen(r, "r")
    seen: list[dict[str, Any]] = []

    def told() -> int:
        return sum(e["dropped"] for e in list(seen) if e["event"] == "log_lines_dropped")

    def read() -> None:
        for line in reader:
            seen.append(json.loads(line))

    def until(cond: Any) -> bool:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.01)
        return False

    rt = threading.Thread(target=read, daemon=True)
    rt.start()
    # the writer can write again: it says what it dropped, within a second or so
    assert until(lambda: told() == sink.dropped >= dropped), (told(), sink.dropped)
    notices = [e for e in seen if e["event"] == "log_lines_dropped"]
    assert notices[-1]["dropped_total"] == sink.dropped and notices[-1]["level"] == "warning"
    sink.write(json.dumps({"event": "last"}))
    assert until(lambda: any(e["event"] == "last" for e in list(seen)))
    sink.close()
    stream.close()
    rt.join(5)
    reader.close()


def test_a_flood_of_one_warning_is_kept_to_a_few_a_second_and_says_how_many_it_left_out() -> None:
    now = [100.0]
    limiter = RepeatLimiter(clock=lambda: now[0])

    def log(method: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(limiter(None, method, {"event": name}))
        except structlog.DropEvent:
            return None

    kept = [log("warning", "inbound_rejected") for _ in range(REPEATS_PER_SEC + 30)]
    assert sum(e is not None for e in kept) == REPEATS_PER_SEC
    assert log("warning", "another_event") is not None  # each event name has its own budget
    assert all(log("info", "call_started") is not None for _ in range(500))  # info is never limited
    now[0] += 1.0
    nxt = log("error", "inbound_rejected")
    assert nxt == {"event": "inbound_rejected", "repeats_suppressed": 30}
    assert log("warning", "inbound_rejected") == {"event": "inbound_rejected"}


def test_close_writes_what_is_queued() -> None:
    r, w = os.pipe()
    stream = os.fdopen(w, "w")
    sink = LineSink(stream, capacity=10)
    for i in range(5):
        sink.write(f'{{"event": "q", "i": {i}}}')
    sink.close()
    stream.close()
    with os.fdopen(r) as reader:
        assert [json.loads(line)["i"] for line in reader] == [0, 1, 2, 3, 4]
