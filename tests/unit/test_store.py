"""The SQLite store: rows, schema version, file mode, and kill -9 at any moment."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.store import SCHEMA_VERSION, ConnectionStore, StoreError, resolve_store_path


def test_rows_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    s = ConnectionStore(str(path))
    s.insert("1", "323", {"connection": {"connection_id": "1"}, "password": "pw"}, 100.0)
    s.insert("2", "999", {"connection": {"connection_id": "2"}}, 101.0)
    with pytest.raises(StoreError):
        s.insert("1", "323", {}, 102.0)  # ids are unique
    s.update("1", {"connection": {"connection_id": "1"}, "password": "new"}, 150.0)
    with pytest.raises(StoreError):
        s.update("nope", {}, 1.0)
    row = s.get("1")
    assert row is not None
    assert row.document["password"] == "new"
    assert (row.created_at, row.updated_at, row.user_id) == (100.0, 150.0, "323")
    assert [r.id for r in s.all()] == ["1", "2"]
    assert s.delete("2") is True
    assert s.delete("2") is False
    s.restore(row)
    assert s.get("1") == row
    assert s.schema_version == SCHEMA_VERSION
    assert s.integrity_ok()
    s.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # it holds SIP passwords
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = ConnectionStore(str(path))
    assert [r.id for r in again.all()] == ["1"]
    again.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    ConnectionStore(str(path)).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this agent knows"):
        ConnectionStore(str(path))


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        ConnectionStore(str(tmp_path / "nope" / "c.db"))


def test_store_path_resolution(tmp_path: Path) -> None:
    cfg = tmp_path / "etc" / "agent.yaml"
    assert resolve_store_path(None, cfg, {}) == str(tmp_path / "etc" / "connections.db")
    assert resolve_store_path(None, cfg, {"STATE_DIRECTORY": "/var/lib/uac-agent"}) == (
        "/var/lib/uac-agent/connections.db"
    )
    assert resolve_store_path("db/x.db", cfg, {"STATE_DIRECTORY": "/s"}) == str(tmp_path / "etc" / "db" / "x.db")
    assert resolve_store_path("/abs/x.db", cfg, {}) == "/abs/x.db"
    assert resolve_store_path(":memory:", cfg, {}) == ":memory:"
    assert resolve_store_path(None, None, {}) == str(Path.cwd() / "connections.db")


WRITER = r"""
import hashlib, json, random, sys
from agent.store import ConnectionStore
s = ConnectionStore(sys.argv[1])
rng = random.Random(int(sys.argv[2]))
seq = max([int(r.document["seq"]) for r in s.all()] or [0])
while True:
    seq += 1
    cid = str(rng.randrange(20))
    payload = "x" * rng.randrange(1, 20000)
    doc = {"seq": seq, "payload": payload, "check": hashlib.sha256(payload.encode()).hexdigest()}
    row = s.get(cid)
    if row is None:
        s.insert(cid, "u", doc, float(seq))
    elif rng.random() < 0.2:
        s.delete(cid)
    else:
        s.update(cid, doc, float(seq))
    # acknowledged: the transaction has committed. One write per line, so a kill
    # leaves at most one unterminated line, which the reader drops.
    sys.stdout.write(f"{seq} {cid}\n")
    sys.stdout.flush()
"""


def test_kill_9_at_any_moment_leaves_a_consistent_store(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    root = Path(__file__).resolve().parents[2]
    rng = random.Random(4)
    for round_ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(round_)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=root,
        )
        time.sleep(0.15 + rng.random() * 0.35)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL, err.decode()
        # Only newline-terminated lines were fully acknowledged; a kill can cut the last one.
        complete = out.decode().rsplit("\n", 1)[0] if "\n" in out.decode() else ""
        acknowledged = [line.split() for line in complete.split("\n") if line.strip()]
        assert all(len(a) == 2 for a in acknowledged), complete[-200:]
        assert acknowledged, f"writer made no change in round {round_}: {err.decode()}"
        s = ConnectionStore(str(path))
        try:
            assert s.integrity_ok()
            rows = s.all()
            for r in rows:
                doc = r.document
                assert hashlib.sha256(doc["payload"].encode()).hexdigest() == doc["check"], "half-written row"
                assert r.updated_at == float(doc["seq"])
            # Every acknowledged change is there: the last acknowledged seq is at most
            # one behind the newest row (the kill may land after COMMIT, before print).
            newest = max((int(r.document["seq"]) for r in rows), default=0)
            last_ack = int(acknowledged[-1][0])
            last_row = s.get(acknowledged[-1][1])
            assert newest >= last_ack or last_row is None  # the last change may have been a delete
            assert json.dumps([r.document for r in rows])  # every document is whole JSON
        finally:
            s.close()
