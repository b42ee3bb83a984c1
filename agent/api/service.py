"""The connections the agent runs: the config file's, and the API's (kept in the store).

Rules
-----
* Config-file connections are the baseline: read-only through the API (409
  ``managed_by_file``), changed only by editing the file and reloading. Their
  ids are reserved: a stored API connection with the same id is not loaded.
* Every change is checked in full before anything is touched: the request
  (422), ownership (403), the connection limit (409). Then it is written to the
  store in one transaction, then applied on the worker holding the connection; a change the SIP
  stack refuses is undone in the store.
* One change at a time per connection. A change waits only for its own connection's
  earlier change, never for another's: the checks and the store write are made under a
  short lock that is never held while a worker is waited for. Reads never wait: the
  records are a mapping replaced whole by each change (copy on write), so a read sees
  the state before or after a change, never a change in progress.
* A change the workers do not confirm within ``wait_timeout`` is a 504
  ``change_timeout``, never a success; it may still complete, and its outcome is
  applied when it does (a late failure is undone as an early one would be), on a thread
  of the service's own: never on the worker pool's event loop.
* A DELETE unregisters first and forgets the row only after that, so an
  acknowledged delete is durable and an interrupted one leaves the connection.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from pydantic import SecretStr, ValidationError

from agent.api.errors import ApiError, Problem, validation_problems
from agent.api.models import (
    CREATE_FIELDS,
    NOT_NULL,
    PATCH_FIELDS,
    ApiFields,
    Record,
    build_connection,
    connection_input,
    merge_patch,
    secret_document,
)
from agent.config import AgentSettings, Connection
from agent.http.keys import ApiKeys
from agent.reload import (
    RELOADABLE_FIELDS,
    RESTART_ONLY,
    ReloadRefusedError,
    api_keys_changed,
    diff_connections,
    restart_only_changes,
)
from agent.status import ConnectionStatus
from agent.store import ConnectionStore, StoredConnection, StoreError
from agent.supervisor.errors import ConnectionLimitError, EngineError, NotRegisteringError, UnknownConnectionError

__all__ = ["MAX_STORED", "ConnectionService", "Engine"]

# API connections kept at most (registering or not): bounds the store and the lists.
MAX_STORED = 1000
_UNKNOWN = "unknown field (check the spelling against the API reference)"
_API_FIELDS = ("connection_name", "user_name", "password", "user_id", "active")


class Engine(Protocol):
    def apply_connection(self, conn: Connection) -> Future[Any]: ...
    def remove_connection(self, connection_id: str) -> Future[Any]: ...
    def register_now(self, connection_id: str) -> Future[Any]: ...
    def unregister_now(self, connection_id: str) -> Future[Any]: ...
    def replace_settings(self, settings: AgentSettings) -> None: ...
    def statuses(self) -> Mapping[str, ConnectionStatus]: ...


def _limit_detail(running: int, limit: int) -> str:
    return (
        f"this agent already runs {running} registering connections, its limit (workers.max_connections = "
        f"{limit}): delete or deactivate one (active: false), or raise workers.max_connections"
    )


@dataclass
class _Turn:
    """One connection's changes, one at a time; ``users`` counts the changes holding or awaiting it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


class ConnectionService:
    def __init__(
        self,
        settings: AgentSettings,
        store: ConnectionStore,
        logger: Any,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._store = store
        self._log = logger
        self._now = clock
        # The checks and commits of changes: held briefly, never while a worker is waited for.
        # Reads take no lock.
        self._lock = threading.RLock()
        self._turns: dict[str, _Turn] = {}  # by connection id, while a change to it runs or waits
        self._reload_lock = threading.Lock()  # one reload at a time
        # Outcomes that come after the 504 are applied here: never on the worker pool's loop.
        self._late = ThreadPoolExecutor(max_workers=1, thread_name_prefix="late-change")
        self._engine: Engine | None = None
        # The HTTP API's keys (shared with its handlers): a reload swaps them in place.
        self.api_keys: ApiKeys | None = None
        self._records: dict[str, Record] = {}
        self.wait_timeout = 2 * settings.shutdown_timeout_sec + 5.0
        self._load()

    # -- start-up -------------------------------------------------------------

    def _load(self) -> None:
        now = self._now()
        for c in self._settings.connections:
            self._put(Record(c, "file", None, None, now, now))
        registering = sum(1 for c in self._settings.connections if c.registers)
        loaded = 0
        for row in self._store.all():
            rec = self._from_row(row)
            if rec is None:
                continue
            if rec.id in self._records:
                self._log.warning(
                    "stored_connection_shadowed",
                    connection_id=rec.id,
                    reason="the config file has a connection with this id; the file's is used",
                )
                continue
            if rec.conn.registers:
                if registering >= self._limit:
                    self._log.error(
                        "stored_connection_not_started",
                        connection_id=rec.id,
                        reason=_limit_detail(registering, self._limit),
                    )
                    rec = replace(rec, running=False)
                else:
                    registering += 1
            self._put(rec)
            loaded += 1
        self._log.info(
            "connections_loaded", from_file=len(self._settings.connections), from_store=loaded, store=self._store.path
        )

    def _from_row(self, row: StoredConnection) -> Record | None:
        doc = row.document
        try:
            conn = Connection.model_validate(doc["connection"])
            pw = doc.get("password")
            rec = Record(
                conn,
                "api",
                doc.get("user_name"),
                SecretStr(pw) if isinstance(pw, str) else None,
                row.created_at,
                row.updated_at,
            )
        except (ValidationError, KeyError, TypeError) as e:
            problems = validation_problems(e) if isinstance(e, ValidationError) else [Problem("invalid", repr(e))]
            self._log.error(
                "stored_connection_invalid",
                connection_id=row.id,
                problems=[f"{p.pointer}: {p.detail}" for p in problems],
            )
            return None
        if rec.id != row.id:
            self._log.error("stored_connection_invalid", connection_id=row.id, problems=["id does not match"])
            return None
        return rec

    def engine_settings(self) -> AgentSettings:
        """The settings the workers start with: every running connection, file ones first."""
        conns = [r.conn for r in self._records.values() if r.running]
        return self._settings.model_copy(update={"connections": conns})

    def attach(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def settings(self) -> AgentSettings:
        return self._settings

    # -- reads ------------------------------------------------------------------

    def statuses(self) -> Mapping[str, ConnectionStatus]:
        return self._engine.statuses() if self._engine is not None else {}

    def visible(self, user: str | None) -> list[Record]:
        recs = self._records  # replaced whole by changes: a consistent view without a lock
        return [r for r in recs.values() if user is None or r.conn.user_id == user]

    def get(self, cid: str, user: str | None) -> Record:
        rec = self._records.get(cid)
        if rec is None:
            raise ApiError.one(404, "not_found", f"no connection with id {cid}", parameter="id")
        if user is not None and rec.conn.user_id != user:
            raise ApiError.one(
                403, "forbidden", f"connection {cid} belongs to another user than this API key's", parameter="id"
            )
        return rec

    # -- helpers ------------------------------------------------------------------

    def _engine_or_fail(self) -> Engine:
        if self._engine is None:
            raise ApiError.one(503, "unavailable", "the workers are not running")
        return self._engine

    def _put(self, rec: Record) -> None:
        with self._lock:
            self._records = {**self._records, rec.id: rec}

    def _drop(self, cid: str) -> None:
        with self._lock:
            self._records = {k: v for k, v in self._records.items() if k != cid}

    @contextmanager
    def _turn(self, cid: str) -> Iterator[None]:
        """Wait for the connection's earlier change (at most ``wait_timeout``), then hold its turn."""
        with self._lock:
            turn = self._turns.setdefault(cid, _Turn())
            turn.users += 1
        try:
            if not turn.lock.acquire(timeout=self.wait_timeout):
                raise ApiError.one(
                    504,
                    "change_timeout",
                    f"an earlier change of connection {cid} has waited {self.wait_timeout:.0f} s for its worker "
                    "and still holds it: GET the connection to see where it stands, then try again",
                    parameter="id",
                )
            try:
                yield
            finally:
                turn.lock.release()
        finally:
            with self._lock:
                turn.users -= 1
                if turn.users == 0:
                    del self._turns[cid]

    def _wait(
        self,
        fut: Future[Any],
        what: str,
        cid: str,
        late_failure: Callable[[BaseException], None] | None = None,
        late_success: Callable[[], None] | None = None,
    ) -> Any:
        """The change's result; a 504 when the workers do not confirm it in time. Its outcome is
        then applied when it comes (``late_failure`` undoes, ``late_success`` completes)."""
        try:
            return fut.result(timeout=self.wait_timeout)
        except FutureTimeout:
            self._log.warning("change_still_in_progress", connection_id=cid, change=what, waited_sec=self.wait_timeout)

            def finish(done: Future[Any]) -> None:
                with self._lock:
                    exc = done.exception()
                    self._log.info(
                        "change_completed_late", connection_id=cid, change=what, error=None if exc is None else str(exc)
                    )
                    try:
                        if exc is not None and late_failure is not None:
                            late_failure(exc)
                        elif exc is None and late_success is not None:
                            late_success()
                    except Exception as e:  # e.g. the store cannot be written: said, never lost silently
                        self._log.error("change_late_outcome_failed", connection_id=cid, change=what, error=repr(e))

            def hand_over(done: Future[Any]) -> None:  # runs on the thread that completes it: the pool's loop
                try:
                    self._late.submit(finish, done)
                except RuntimeError:  # the agent is stopping: nothing left to apply it to
                    pass

            fut.add_done_callback(hand_over)
            raise ApiError.one(
                504,
                "change_timeout",
                f"the {what} of connection {cid} was not confirmed by its worker within "
                f"{self.wait_timeout:.0f} s; it may still complete: GET the connection to see where it stands",
                parameter="id",
            ) from None

    def _registering(self, exclude: str | None = None) -> int:
        return sum(1 for r in self._records.values() if r.running and r.conn.registers and r.id != exclude)

    @property
    def _limit(self) -> int:
        return self._settings.workers.max_connections

    def _check_room(self, conn: Connection, was_registering: bool) -> None:
        if conn.registers and not was_registering:
            running = self._registering(exclude=conn.connection_id)
            if running >= self._limit:
                raise ApiError.one(
                    409, "connection_limit_reached", _limit_detail(running, self._limit), pointer="/active"
                )

    def _check_user_name(self, name: str, cid: str) -> None:
        for r in self._records.values():
            if r.id != cid and r.user_name is not None and r.user_name.lower() == name.lower():
                raise ApiError.one(
                    422, "already_taken", "user_name is used by another connection", pointer="/user_name"
                )

    def _new_id(self) -> str:
        while True:
            cid = str(secrets.randbelow(9 * 10**18) + 10**18)  # 19 digits, like the product's ids
            if cid not in self._records:
                return cid

    def _new_user_name(self) -> str:
        while True:
            name = "uac" + secrets.token_hex(6)
            if all((r.user_name or "").lower() != name for r in self._records.values()):
                return name

    @staticmethod
    def _api_fields(body: dict[str, Any], problems: list[Problem]) -> ApiFields:
        subset = {k: body[k] for k in _API_FIELDS if k in body}
        try:
            return ApiFields.model_validate_json(json.dumps(subset), strict=True)
        except ValidationError as e:
            problems += validation_problems(e)
            return ApiFields()

    def _engine_failed(self, e: BaseException, cid: str) -> ApiError:
        if isinstance(e, ConnectionLimitError):
            return ApiError.one(409, "connection_limit_reached", str(e), pointer="/active")
        if isinstance(e, (UnknownConnectionError, NotRegisteringError)):
            return ApiError.one(409, "not_registering", str(e), parameter="id")
        if isinstance(e, EngineError):
            return ApiError.one(503, "unavailable", str(e))
        self._log.warning("change_rejected_by_sip_stack", connection_id=cid, error=str(e))
        return ApiError.one(422, "rejected_by_sip_stack", f"the SIP stack refused the settings: {e}")

    def _store_failed(self, e: StoreError) -> ApiError:
        self._log.error("store_write_failed", error=str(e))
        return ApiError.one(503, "store_unavailable", "the connection store cannot be written; nothing was changed")

    # -- writes -------------------------------------------------------------------

    def create(self, body: dict[str, Any], user: str | None) -> tuple[Record, str | None]:
        """Add a connection; returns it and the generated password (None if one was sent)."""
        engine = self._engine_or_fail()
        with self._lock:
            cid = self._new_id()
        with self._turn(cid):  # nobody can change it before it exists: the turn is for the record
            return self._create(engine, cid, body, user)

    def _create(self, engine: Engine, cid: str, body: dict[str, Any], user: str | None) -> tuple[Record, str | None]:
        with self._lock:
            problems = [Problem("unknown_field", _UNKNOWN, pointer=f"/{k}") for k in body if k not in CREATE_FIELDS]
            if "connection_name" not in body:
                problems.append(Problem("missing_field", "this field is required", pointer="/connection_name"))
            api = self._api_fields(body, problems)
            if user is not None and api.user_id is not None and api.user_id != user:
                raise ApiError.one(
                    403, "forbidden", "this API key creates connections for its own user_id only", pointer="/user_id"
                )
            data: dict[str, Any] = {
                "connection_id": cid,
                "user_id": api.user_id or user or self._settings.http.default_user_id,
                "connection_name": api.connection_name or "",
            }
            for key in ("active", "external_uac_settings", "internal_uac_settings", "registration"):
                if key in body:
                    data[key] = body[key]
            try:
                conn = build_connection(data, self._settings)
            except ApiError as e:
                problems += e.problems
            if problems:
                raise ApiError(422, *problems)
            if api.user_name is not None:
                self._check_user_name(api.user_name, cid)
            self._check_room(conn, was_registering=False)
            if sum(1 for r in self._records.values() if r.managed_by == "api") >= MAX_STORED:
                raise ApiError.one(409, "store_full", f"this agent keeps at most {MAX_STORED} API connections")
            generated = None if api.password is not None else secrets.token_urlsafe(24)
            now = self._now()
            rec = Record(
                conn,
                "api",
                api.user_name or self._new_user_name(),
                api.password or SecretStr(generated or ""),
                now,
                now,
            )
            try:
                self._store.insert(cid, conn.user_id, secret_document(rec), now)
            except StoreError as e:
                raise self._store_failed(e) from None
            self._put(rec)

        def undo_create(_e: BaseException | None = None) -> None:
            with self._lock:
                self._drop(cid)
                self._store.delete(cid)

        try:
            self._wait(engine.apply_connection(conn), "create", cid, late_failure=undo_create)
        except ApiError:
            raise
        except Exception as e:
            undo_create()
            raise self._engine_failed(e, cid) from None
        self._log.info("connection_created", connection_id=cid, user_id=conn.user_id, registers=conn.registers)
        return rec, generated

    def update(self, cid: str, body: dict[str, Any], user: str | None) -> Record:
        engine = self._engine_or_fail()
        self.get(cid, user)  # 404 and 403 at once, without waiting for the connection's turn
        with self._turn(cid):
            return self._update(engine, cid, body, user)

    def _update(self, engine: Engine, cid: str, body: dict[str, Any], user: str | None) -> Record:
        with self._lock:
            rec = self.get(cid, user)
            self._writable(rec)
            problems: list[Problem] = []
            for k in body:
                if k == "user_id":
                    problems.append(Problem("read_only_field", "user_id cannot be changed", pointer="/user_id"))
                elif k not in PATCH_FIELDS:
                    problems.append(Problem("unknown_field", _UNKNOWN, pointer=f"/{k}"))
                elif k in NOT_NULL and body[k] is None:
                    problems.append(Problem("invalid_value", "must not be null", pointer=f"/{k}"))
            api = self._api_fields({k: v for k, v in body.items() if v is not None}, problems)
            data = connection_input(rec.conn)
            for key in ("connection_name", "active"):
                if key in body and body[key] is not None:
                    data[key] = body[key]
            for key in ("external_uac_settings", "internal_uac_settings", "registration"):
                if key not in body:
                    continue
                if body[key] is None:
                    data.pop(key, None)
                elif isinstance(body[key], dict):
                    data[key] = merge_patch(data.get(key), body[key])
                else:
                    data[key] = body[key]  # the model names the wrong type
            try:
                conn = build_connection(data, self._settings)
            except ApiError as e:
                problems += e.problems
            if problems:
                raise ApiError(422, *problems)
            if api.user_name is not None:
                self._check_user_name(api.user_name, cid)
            new = replace(
                rec,
                conn=conn,
                user_name=api.user_name or rec.user_name,
                password=api.password or rec.password,
                running=True,
            )
            if new == rec:
                return rec  # nothing changed: nothing touched
            self._check_room(conn, was_registering=rec.running and rec.conn.registers)
            new = replace(new, updated_at=self._now())
            old_row = self._store.get(cid)
            try:
                self._store.update(cid, secret_document(new), new.updated_at)
            except StoreError as e:
                raise self._store_failed(e) from None
            self._put(new)

        def undo_update(_e: BaseException | None = None) -> None:
            with self._lock:
                self._put(rec)
                if old_row is not None:
                    self._store.restore(old_row)

        try:
            result = self._wait(engine.apply_connection(conn), "update", cid, late_failure=undo_update)
        except ApiError:
            raise
        except Exception as e:
            undo_update()
            raise self._engine_failed(e, cid) from None
        self._log.info("connection_changed", connection_id=cid, applied=result)
        return new

    def delete(self, cid: str, user: str | None) -> Record:
        engine = self._engine_or_fail()
        self.get(cid, user)
        with self._turn(cid):
            with self._lock:
                rec = self.get(cid, user)
                self._writable(rec)

            def forget() -> None:
                with self._lock:
                    self._store.delete(cid)
                    self._drop(cid)
                self._log.info("connection_deleted", connection_id=cid)

            if rec.running:
                try:
                    self._wait(engine.remove_connection(cid), "delete", cid, late_success=forget)
                except UnknownConnectionError:
                    pass
                except ApiError:
                    raise
                except Exception as e:
                    raise self._engine_failed(e, cid) from None
            try:
                forget()
            except StoreError as e:
                raise self._store_failed(e) from None
            return rec

    def act(self, cid: str, action: str, user: str | None) -> Record:
        """``register`` (refresh now) or ``unregister`` (and stay unregistered)."""
        engine = self._engine_or_fail()
        self.get(cid, user)
        with self._turn(cid):
            rec = self.get(cid, user)
            if not (rec.running and rec.conn.registers):
                why = "not running (over the limit at start-up)" if not rec.running else "inactive or without settings"
                raise ApiError.one(
                    409,
                    "not_registering",
                    f"connection {cid} keeps no registration ({why}): PATCH active: true and "
                    "external_uac_settings first",
                    parameter="id",
                )
            fut = engine.register_now(cid) if action == "register" else engine.unregister_now(cid)
            try:
                self._wait(fut, action, cid)
            except ApiError:
                raise
            except Exception as e:
                raise self._engine_failed(e, cid) from None
            self._log.info("connection_action", connection_id=cid, action=action)
            return rec

    def _writable(self, rec: Record) -> None:
        if rec.managed_by == "file":
            where = str(self._settings.config_path) if self._settings.config_path else "the config"
            raise ApiError.one(
                409,
                "managed_by_file",
                f"connection {rec.id} comes from the config file ({where}); change it there and reload "
                "(SIGHUP or systemctl reload uac-agent). Connections created through the API can be changed here.",
                parameter="id",
            )

    # -- reload -------------------------------------------------------------------

    def reload(self, new: AgentSettings) -> dict[str, Any]:
        """Apply a re-read config file: only the differences (see agent/reload.py)."""
        engine = self._engine_or_fail()
        with self._reload_lock:
            return self._reload(engine, new)

    def _reload(self, engine: Engine, new: AgentSettings) -> dict[str, Any]:
        with self._lock:
            old_file = {r.id: r.conn for r in self._records.values() if r.managed_by == "file"}
            new_file = {c.connection_id: c for c in new.connections}
            d = diff_connections(old_file, new_file)
            problems = [
                f"connection_id {cid} is a connection created through the API: delete it there or use another id"
                for cid in d.added
                if cid in self._records
            ]
            api_registering = sum(
                1 for r in self._records.values() if r.managed_by == "api" and r.running and r.conn.registers
            )
            file_registering = sum(1 for c in new.connections if c.registers)
            limit = self._settings.workers.max_connections
            if api_registering + file_registering > limit:
                problems.append(
                    f"{file_registering} registering connections in the file plus {api_registering} created through "
                    f"the API would pass the limit of {limit} (workers.max_connections)"
                )
            tls = [
                c.connection_id
                for c in new.connections
                if c.registers and c.external_uac_settings and c.external_uac_settings.transport == "TLS"
            ]
            if tls and self._settings.sip.tls_ca_missing:
                problems.append(f"TLS connections {', '.join(tls)} need sip.tls_ca_file, which needs a restart")
            if problems:
                raise ReloadRefusedError(problems)
            restart = restart_only_changes(self._settings, new)
            keys_changed = api_keys_changed(self._settings, new)
            if keys_changed and self.api_keys is None:
                restart.append("http")  # nothing to hand the new keys to (not wired)
                keys_changed = False
            effective = new.model_copy(update={name: getattr(self._settings, name) for name in RESTART_ONLY})
            if keys_changed:
                http = self._settings.http.model_copy(
                    update={f: getattr(new.http, f) for f in RELOADABLE_FIELDS["http"]}
                )
                effective = effective.model_copy(update={"http": http})
            old_settings = self._settings
            engine.replace_settings(effective)
            self._settings = effective
            now = self._now()
            failed: list[str] = []
            removals = {cid: engine.remove_connection(cid) for cid in d.removed}
        for cid, fut in removals.items():
            try:
                self._wait(fut, "reload remove", cid)
            except UnknownConnectionError:
                pass
            except Exception as e:
                failed.append(f"{cid}: {e}")
            self._drop(cid)
        to_apply: list[Connection] = [new_file[cid] for cid in (*d.changed, *d.added)]
        retuned: list[str] = []
        with self._lock:  # an API change commits before it applies: the retune reads the record it applies
            if old_settings.defaults != new.defaults:
                for r in self._records.values():
                    if r.running and (r.managed_by == "api" or r.id in d.unchanged):
                        if old_settings.policy_settings(r.conn) != effective.policy_settings(r.conn):
                            to_apply.append(r.conn)
                            retuned.append(r.id)
            if keys_changed and self.api_keys is not None:
                self.api_keys.replace_from(effective.http)
            applies = {c.connection_id: (c, engine.apply_connection(c)) for c in to_apply}
        for cid, (conn, fut) in applies.items():

            def applied_late(cid: str = cid, conn: Connection = conn) -> None:
                if cid in new_file:
                    old = self._records.get(cid)
                    created = old.created_at if old is not None else now
                    self._put(Record(conn, "file", None, None, created, now))

            try:
                self._wait(fut, "reload apply", cid, late_success=applied_late)
            except Exception as e:
                failed.append(f"{cid}: {e}")
                self._log.error("reload_connection_failed", connection_id=cid, error=str(e))
                continue
            if cid in new_file:
                old = self._records.get(cid)
                created = old.created_at if old is not None else now
                self._put(Record(conn, "file", None, None, created, now))
        return {
            "added": list(d.added),
            "removed": list(d.removed),
            "changed": list(d.changed),
            "unchanged": len(d.unchanged),
            "policy_retuned": retuned,
            "failed": failed,
            "api_keys_reloaded": keys_changed,
            "needs_restart": sorted(set(restart)),
        }
