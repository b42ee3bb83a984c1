"""SQLite store of the connections created or changed through the API.

Rules
-----
* One row per API-managed connection: its id, owner, the whole record as JSON
  (the :class:`~agent.config.Connection` with its secrets, plus the API's own
  fields), and creation/update times. Connections of the config file are never
  stored: the file stays their only source.
* Every change is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) in WAL
  mode with ``synchronous=FULL``: a kill -9 at any moment leaves either the old
  or the new row, never a half-written one; a change the API acknowledged is on
  disk.
* ``schema_version`` holds the layout's version. A newer version than this code
  knows is refused (a downgrade must not corrupt data); older ones are migrated
  in a transaction.
* The file is created with mode 0600: it holds SIP passwords.
* Thread-safe: one connection guarded by a lock (the HTTP threads and the main
  thread share it).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA_VERSION", "ConnectionStore", "StoreError", "StoredConnection", "resolve_store_path"]

SCHEMA_VERSION = 1
DEFAULT_FILE = "connections.db"

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS connections (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    document TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS connections_user ON connections (user_id);
"""


class StoreError(RuntimeError):
    """The store cannot be opened or written; the message says why."""


@dataclass(frozen=True)
class StoredConnection:
    id: str
    user_id: str
    document: dict[str, Any]  # the record as JSON, secrets included
    created_at: float
    updated_at: float


def resolve_store_path(configured: str | None, config_file: Path | None, environ: Mapping[str, str]) -> str:
    """The SQLite path: the configured one (relative to the config file's folder),
    else connections.db in $STATE_DIRECTORY, beside the config file, or in the
    working directory."""
    if configured == ":memory:":
        return configured
    base = config_file.resolve().parent if config_file is not None else Path.cwd()
    if configured is not None:
        p = Path(configured).expanduser()
        return str(p if p.is_absolute() else base / p)
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return str(Path(state) / DEFAULT_FILE)
    return str(base / DEFAULT_FILE)


class ConnectionStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            if path != ":memory:":
                parent = Path(path).parent
                if not parent.is_dir():
                    raise StoreError(f"store {path}: folder {parent} does not exist")
                # Create it 0600 before SQLite does (it holds SIP passwords).
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                os.close(fd)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as e:
            raise StoreError(f"store {path}: {e}") from None
        except OSError as e:
            raise StoreError(f"store {path}: {e.strerror}") from None

    # -- schema -------------------------------------------------------------

    def _migrate(self) -> None:
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path} has schema version {version}, newer than this agent knows "
                    f"({SCHEMA_VERSION}): run the newer agent, or point store.path elsewhere"
                )
            if version < 1:
                # executescript() would COMMIT the transaction: one statement at a time.
                for stmt in filter(None, (s.strip() for s in _SCHEMA_V1.split(";"))):
                    db.execute(stmt)
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version != SCHEMA_VERSION:
                db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    @property
    def schema_version(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0])

    # -- transactions -------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def _write(self, sql: str, args: tuple[Any, ...]) -> int:
        try:
            with self._tx() as db:
                return db.execute(sql, args).rowcount
        except sqlite3.Error as e:
            raise StoreError(f"store {self.path}: {e}") from None

    # -- rows ---------------------------------------------------------------

    def insert(self, cid: str, user_id: str, document: dict[str, Any], now: float) -> None:
        self._write(
            "INSERT INTO connections (id, user_id, document, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            (cid, user_id, json.dumps(document, separators=(",", ":")), now, now),
        )

    def update(self, cid: str, document: dict[str, Any], now: float) -> None:
        n = self._write(
            "UPDATE connections SET document = ?, updated_at = ? WHERE id = ?",
            (json.dumps(document, separators=(",", ":")), now, cid),
        )
        if n != 1:
            raise StoreError(f"store {self.path}: connection {cid} is not stored")

    def restore(self, row: StoredConnection) -> None:
        """Put ``row`` back exactly (undo of a change the SIP stack refused)."""
        self._write(
            "INSERT OR REPLACE INTO connections (id, user_id, document, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            (row.id, row.user_id, json.dumps(row.document, separators=(",", ":")), row.created_at, row.updated_at),
        )

    def delete(self, cid: str) -> bool:
        return self._write("DELETE FROM connections WHERE id = ?", (cid,)) == 1

    def get(self, cid: str) -> StoredConnection | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, user_id, document, created_at, updated_at FROM connections WHERE id = ?", (cid,)
            ).fetchone()
        return None if row is None else _row(row)

    def all(self) -> list[StoredConnection]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, user_id, document, created_at, updated_at FROM connections ORDER BY created_at, id"
            ).fetchall()
        return [_row(r) for r in rows]

    def integrity_ok(self) -> bool:
        with self._lock:
            return bool(self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _row(row: tuple[Any, ...]) -> StoredConnection:
    try:
        doc = json.loads(row[2])
    except json.JSONDecodeError:
        doc = {}
    return StoredConnection(
        id=str(row[0]),
        user_id=str(row[1]),
        document=doc if isinstance(doc, dict) else {},
        created_at=float(row[3]),
        updated_at=float(row[4]),
    )
