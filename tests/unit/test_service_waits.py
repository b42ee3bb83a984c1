"""The connections service (agent/api/service.py): reads never wait for a change in progress, and a
change the workers do not confirm in time is a 504, completed or undone when its answer comes."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.api.errors import ApiError
from tests.unit.apifakes import EXT, running_agent, settings_for


def conn(cid: str) -> dict[str, Any]:
    return {"connection_id": cid, "user_id": "323", "connection_name": cid, "external_uac_settings": EXT}


def test_a_read_does_not_wait_behind_a_slow_change_and_the_change_times_out_as_504(tmp_path: Path) -> None:
    with running_agent(settings_for(tmp_path, [conn("f0")])) as h:
        h.wait(lambda: h.pool.statuses()["f0"].registered, what="f0 registered")
        rec, _ = h.service.create({"connection_name": "api-1", "external_uac_settings": EXT}, None)
        h.wait(lambda: h.pool.statuses()[rec.id].registered, what="api-1 registered")
        h.service.wait_timeout = 1.0
        worker = h.pool.statuses()[rec.id].worker
        assert worker is not None
        h.adapter.hanging.add(worker)  # the worker's SIP thread is stuck: the change cannot complete
        fake = next(w.adapter for w in reversed(h.launcher.workers) if w.index == worker and w.adapter is not None)
        fake._wake.set()  # out of its wait, into the hang
        assert fake.stuck.wait(5)
        outcome: dict[str, Any] = {}

        def patch() -> None:
            try:
                h.service.update(rec.id, {"connection_name": "renamed"}, None)
                outcome["ok"] = True
            except ApiError as e:
                outcome["error"] = e

        t = threading.Thread(target=patch)
        t.start()
        h.wait(lambda: h.service.get(rec.id, None).conn.connection_name == "renamed", what="the PATCH committed")
        # reads answer at once while the PATCH waits for the stuck worker
        assert {r.id for r in h.service.visible(None)} == {"f0", rec.id}
        assert h.service.get("f0", None).conn.connection_name == "f0"
        assert t.is_alive(), outcome
        t.join(10)
        err = outcome.get("error")
        assert isinstance(err, ApiError), outcome
        assert err.status == 504
        assert err.problems[0].code == "change_timeout"
        h.adapter.hanging.discard(worker)
        h.wait(lambda: "change_completed_late" in h.log.getvalue(), what="the late answer")
        assert h.service.get(rec.id, None).conn.connection_name == "renamed"  # it did complete: kept


def test_a_create_refused_late_is_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import Future

    with running_agent(settings_for(tmp_path, [])) as h:
        h.service.wait_timeout = 0.2
        pending: Future[Any] = Future()
        monkeypatch.setattr(h.pool, "apply_connection", lambda c: pending)
        with pytest.raises(ApiError) as e:
            h.service.create({"connection_name": "late", "external_uac_settings": EXT}, None)
        assert e.value.status == 504
        (rec,) = h.service.visible(None)  # accepted, not confirmed: shown while it may still complete
        pending.set_exception(RuntimeError("refused by the SIP stack"))
        h.wait(lambda: h.service.visible(None) == [], what="the late refusal undone")  # on the service's thread
        assert h.service.visible(None) == []
        assert h.store.all() == []
        assert rec.conn.connection_name == "late"


def test_a_change_waits_only_for_its_own_connection(tmp_path: Path) -> None:
    """With one worker stuck and a change to its connection pending, a change to a connection on
    another worker completes at once, and a second change to the stuck one is told so."""
    with running_agent(settings_for(tmp_path, [], workers={"connections_per_worker": 1})) as h:
        a, _ = h.service.create({"connection_name": "a", "external_uac_settings": EXT}, None)
        b, _ = h.service.create({"connection_name": "b", "external_uac_settings": EXT}, None)
        h.wait(lambda: all(h.pool.statuses()[r.id].registered for r in (a, b)), what="a and b registered")
        wa, wb = h.pool.statuses()[a.id].worker, h.pool.statuses()[b.id].worker
        assert wa is not None and wb is not None and wa != wb
        h.service.wait_timeout = 3.0
        h.adapter.hanging.add(wa)
        fake = next(w.adapter for w in reversed(h.launcher.workers) if w.index == wa and w.adapter is not None)
        fake._wake.set()
        assert fake.stuck.wait(5)
        outcome: dict[str, Any] = {}

        def patch_a() -> None:
            try:
                h.service.update(a.id, {"connection_name": "a2"}, None)
            except ApiError as e:
                outcome["a"] = e

        t = threading.Thread(target=patch_a)
        t.start()
        h.wait(lambda: h.service.get(a.id, None).conn.connection_name == "a2", what="a's change committed")
        t0 = time.monotonic()
        h.service.update(b.id, {"connection_name": "b2"}, None)
        took = time.monotonic() - t0
        assert h.service.get(b.id, None).conn.connection_name == "b2"
        assert t.is_alive(), "b's change must not wait for a's to time out"
        assert took < h.service.wait_timeout, took
        t.join(10)
        err = outcome.get("a")
        assert isinstance(err, ApiError) and err.status == 504, outcome
        h.adapter.hanging.discard(wa)
