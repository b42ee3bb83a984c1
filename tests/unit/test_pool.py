"""The worker pool: placement, a worker's death or hang costs only its own connections, restarts back off.

Workers are threads over the fake SIP stack here, talking to the real pool over
real socketpairs; tests/integration/test_workers.py does the same with real
processes, Kamailio and SIGKILL.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from agent.supervisor.launcher import Launched
from tests.unit.apifakes import EXT, Harness, running_agent, settings_for

BASE = "/v2/uac_connections"


def conn(i: int) -> dict[str, Any]:
    return {
        "connection_id": f"c{i}",
        "user_id": "323",
        "connection_name": f"c{i}",
        "external_uac_settings": {**EXT, "username": f"user{i}", "password": f"pw-{i}"},
    }


def metric(h: Harness, line_start: str) -> float | None:
    for line in generate_latest(h.registry).decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return None


def events(h: Harness, name: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, h.log.getvalue().splitlines()) if e.get("event") == name]


def registers(h: Harness, cid: str) -> int:
    return h.adapter.registers(cid)


def all_registered(h: Harness, ids: list[str]) -> bool:
    st = h.pool.statuses()
    return all(cid in st and st[cid].registered for cid in ids)


def test_connections_fill_workers_in_order_and_an_emptied_worker_stops(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, [conn(i) for i in range(8)])  # workers of 4
    with running_agent(settings) as h:
        code, out = h.call("POST", BASE, {"connection_name": "ninth", "external_uac_settings": EXT})
        assert code == 201, out
        ninth = out["data"]["id"]
        ids = [f"c{i}" for i in range(8)] + [ninth]
        h.wait(lambda: all_registered(h, ids), what="all registered")
        st = h.pool.statuses()
        assert [st[c].worker for c in ids] == [0, 0, 0, 0, 1, 1, 1, 1, 2]  # a new worker only when the rest are full
        assert len({st[c].worker_pid for c in ids}) == 1  # threads of this process here
        assert metric(h, "uac_agent_workers") == 3
        assert metric(h, f'uac_agent_connection_worker_info{{connection_id="{ninth}",worker="2"}}') == 1
        assert out["data"]["fqdn"] == "127.0.0.1:5070"  # the edge's port (sip.port), whichever worker holds it
        # Worker 2's only connection goes: the worker is stopped; the others are untouched.
        sent = [x for x in h.adapter.sent if x[0] != ninth]
        assert h.call("DELETE", f"{BASE}/{ninth}")[0] == 200
        h.wait(lambda: metric(h, "uac_agent_workers") == 2, what="worker 2 stopped")
        assert metric(h, 'uac_agent_worker_up{worker="2"}') is None
        assert [x for x in h.adapter.sent if x[0] != ninth] == sent
        assert [e["reason"] for e in events(h, "worker_retiring")] == ["no connection left"]
        # A new connection takes the free index again.
        code, out = h.call("POST", BASE, {"connection_name": "new", "external_uac_settings": EXT})
        assert code == 201, out
        h.wait(lambda: h.pool.statuses()[out["data"]["id"]].registered, what="new registered")
        assert h.pool.statuses()[out["data"]["id"]].worker == 2


def test_a_dead_worker_costs_only_its_own_connections_and_comes_back(tmp_path: Path) -> None:
    with running_agent(settings_for(tmp_path, [conn(i) for i in range(6)])) as h:
        ids = [f"c{i}" for i in range(6)]
        h.wait(lambda: all_registered(h, ids), what="all registered")
        on_0 = [f"c{i}" for i in range(4)]
        before = {c: registers(h, c) for c in ids}
        h.adapter.crashing.add(1)  # its replacement dies too, so the pause before the next one is visible
        h.launcher.workers[1].kill()  # c4, c5
        h.wait(lambda: len(events(h, "worker_died")) == 2, what="worker 1 died twice")
        st = h.pool.statuses()["c4"]
        assert (st.registered, st.state, st.registration_status) == (False, "WORKER_DOWN", 2)
        assert (st.last_registration_response or "").startswith("worker 1 stopped (")
        assert all(h.pool.statuses()[c].registered for c in on_0)
        h.adapter.crashing.discard(1)
        h.wait(lambda: all_registered(h, ids), what="back registered")
        assert [registers(h, c) - before[c] for c in on_0] == [0, 0, 0, 0]  # the other worker sent nothing
        assert all(registers(h, c) > before[c] for c in ("c4", "c5"))  # each replacement registers at once
        died = events(h, "worker_died")
        assert [d["worker"] for d in died] == [1, 1] and died[0]["connections"] == ["c4", "c5"]
        assert [d["restart_in_sec"] for d in died] == [0, 1]  # the first death is replaced at once
        assert metric(h, 'uac_agent_worker_restarts_total{worker="1"}') == 2


def test_a_worker_that_keeps_dying_is_restarted_with_growing_delays(tmp_path: Path) -> None:
    with running_agent(settings_for(tmp_path, [conn(i) for i in range(5)])) as h:
        h.wait(lambda: all_registered(h, [f"c{i}" for i in range(5)]), what="all registered")
        h.adapter.crashing.add(1)
        h.launcher.workers[1].kill()
        h.wait(lambda: len(events(h, "worker_died")) >= 3, timeout=10, what="three deaths")
        delays = [e["restart_in_sec"] for e in events(h, "worker_died")][:3]
        assert delays == [0.0, 1.0, 2.0]
        text = h.pool.statuses()["c4"].last_registration_response or ""
        assert text.startswith("worker 1 stopped") and "restarting" in text
        assert all(h.pool.statuses()[f"c{i}"].registered for i in range(4))  # worker 0 carries on
        h.adapter.crashing.discard(1)
        h.wait(lambda: h.pool.statuses()["c4"].registered, timeout=10, what="c4 back once it stops dying")
        assert (metric(h, 'uac_agent_worker_restarts_total{worker="1"}') or 0) >= 3


def test_a_worker_whose_sip_thread_hangs_is_killed_and_replaced(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path,
        [conn(i) for i in range(5)],
        workers={"max_connections": 9, "connections_per_worker": 4, "heartbeat_timeout_sec": 2},
    )
    with running_agent(settings) as h:
        h.wait(lambda: all_registered(h, [f"c{i}" for i in range(5)]), what="all registered")
        assert h.pool.ready
        assert h.pool.health() is None
        h.adapter.hanging.add(1)
        h.wait(lambda: bool(events(h, "worker_unresponsive")), timeout=6, what="hang noticed")
        assert h.pool.health() is None  # the pool replaces it: the agent as a whole is healthy
        h.adapter.hanging.discard(1)
        h.wait(lambda: len(h.launcher.workers) == 3, what="replacement started")
        h.wait(lambda: h.pool.statuses()["c4"].registered, what="c4 registered again")
        assert h.pool.health() is None
        assert events(h, "worker_unresponsive")[0]["worker"] == 1
        assert metric(h, 'uac_agent_worker_restarts_total{worker="1"}') == 1


def test_a_message_a_worker_should_not_send_is_logged_and_the_pool_carries_on(tmp_path: Path) -> None:
    from agent.ipc import messages as m

    with running_agent(settings_for(tmp_path, [conn(0)])) as h:
        h.wait(lambda: all_registered(h, ["c0"]), what="registered")
        w = h.pool._workers[0]
        h.pool._loop.call_soon_threadsafe(h.pool._on_event, w, m.Ping(1))  # a command, not an event
        h.wait(lambda: bool(events(h, "worker_event_unknown")), what="logged")
        assert events(h, "worker_event_unknown")[0]["event_type"] == "Ping"
        assert h.pool.register_now("c0").result(5) in ("REGISTERING", "REGISTERED")  # still served


def test_a_launcher_that_hangs_never_blocks_the_pools_loop(tmp_path: Path) -> None:
    """The launcher waits for the zygote (up to 30 s); the pool's loop keeps answering meanwhile."""
    with running_agent(settings_for(tmp_path, [conn(i) for i in range(6)])) as h:
        ids = [f"c{i}" for i in range(6)]
        h.wait(lambda: all_registered(h, ids), what="all registered")
        gate = threading.Event()
        entered = threading.Event()
        launch = h.launcher.launch

        def slow_launch(index: int) -> Launched:
            entered.set()
            assert gate.wait(20)
            return launch(index)

        h.launcher.launch = slow_launch  # type: ignore[method-assign]
        h.launcher.workers[1].kill()  # c4, c5: its replacement's launch hangs
        assert entered.wait(5)
        for _ in range(5):
            t0 = time.monotonic()
            assert h.pool.health(timeout=1.0) is None
            h.pool._health_seen = None  # ask the loop itself each time, not the cached answer
            assert time.monotonic() - t0 < 1.0
            time.sleep(0.1)
        assert h.pool.statuses()["c0"].registered
        gate.set()
        h.wait(lambda: all_registered(h, ids), what="c4 and c5 back on the replacement")
