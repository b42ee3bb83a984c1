"""Reload (SIGHUP): re-read the file, apply only the differences, refuse a bad file."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from agent.config import AgentSettings, Connection, load_settings
from agent.reload import diff_connections, reload_from_file, restart_only_changes
from tests.unit.apifakes import EXT, KEY, USER_KEYS, Harness, running_agent

# The reload tests run with room for 9 registering connections (3 workers of 4).
LIMIT = 9

BASE = "/v2/uac_connections"


def conn(cid: str, user: str, **ext: Any) -> dict[str, Any]:
    return {
        "connection_id": cid,
        "user_id": "323",
        "connection_name": cid,
        "external_uac_settings": {**EXT, "username": user, "password": f"{user}-password", **ext},
        "internal_uac_settings": {"destination_uri": "1006@app.example.com"},
    }


def write_config(path: Path, connections: list[dict[str, Any]], **extra: Any) -> Path:
    data: dict[str, Any] = {
        "sip": {"bind": "127.0.0.1", "port": 5070},
        "http": {
            "listen": "127.0.0.1:0",
            "api_key": KEY,
            "api_keys": [{"user_id": u, "api_key": k} for k, u in USER_KEYS.items()],
        },
        "defaults": {"initial_delay_max_sec": 0.0},
        "shutdown_timeout_sec": 1.0,
        "connections": connections,
        "workers": {"max_connections": LIMIT, "connections_per_worker": 4},
        **extra,
    }
    path.write_text(json.dumps(data))
    return path


def ops(h: Harness, cid: str) -> list[str]:
    return [what for k, what, _ in h.adapter.sent if k == cid]


def test_diff_connections() -> None:
    a = Connection.model_validate(conn("a", "alice"))
    b = Connection.model_validate(conn("b", "bob"))
    b2 = Connection.model_validate(conn("b", "bob", password="other-password"))
    c = Connection.model_validate(conn("c", "carol"))
    d = diff_connections({"a": a, "b": b}, {"b": b2, "c": c, "a": a})
    assert (d.added, d.removed, d.changed, d.unchanged) == (("c",), (), ("b",), ("a",))
    d = diff_connections({"a": a, "b": b}, {"b": b})
    assert (d.added, d.removed, d.changed, d.unchanged) == ((), ("a",), (), ("b",))


def test_reload_applies_only_the_differences(tmp_path: Path) -> None:
    path = write_config(tmp_path / "agent.json", [conn("a", "alice"), conn("b", "bob"), conn("gone", "gina")])
    with running_agent(load_settings(path)) as h:
        for cid in ("a", "b", "gone"):
            h.wait(lambda cid=cid: h.status(cid)["registered"], what=f"{cid} registered")
        _code, out = h.call("POST", BASE, {"connection_name": "api one", "external_uac_settings": EXT})
        api_id = out["data"]["id"]
        h.wait(lambda: h.status(api_id)["registered"], what="API connection registered")
        before = {cid: ops(h, cid) for cid in ("a", "b", "gone", api_id)}

        write_config(
            path,
            [
                conn("a", "alice"),
                conn("b", "bob", password="bob-new-password"),
                conn("new", "nina"),
                {**conn("quiet", "quentin"), "active": False},
            ],
        )
        assert reload_from_file(path, h.service, h.service._log) is True
        h.wait(lambda: h.status("b")["registered"], what="b registered with the new password")
        h.wait(lambda: h.status("new")["registered"], what="new registered")
        assert ops(h, "a") == before["a"]  # untouched: no REGISTER
        assert ops(h, api_id) == before[api_id]  # API connections are not the file's business
        assert ops(h, "b")[len(before["b"]) :] == ["unregister", "remove", "add", "register"]
        assert h.adapter.accounts["b"].password == "bob-new-password"
        assert ops(h, "gone")[len(before["gone"]) :] == ["unregister", "remove"]
        assert h.call("GET", f"{BASE}/gone")[0] == 404
        assert h.status("quiet")["managed_by"] == "file" and h.status("quiet")["registration_status"] == 0
        log = h.log.getvalue()
        applied = [json.loads(line) for line in log.splitlines() if '"reload_applied"' in line]
        assert applied and applied[-1]["changed"] == ["b"] and applied[-1]["removed"] == ["gone"]
        assert applied[-1]["added"] == ["new", "quiet"] and applied[-1]["unchanged"] == 1
        assert "bob-new-password" not in log


def test_bad_file_on_reload_is_refused_and_the_agent_carries_on(tmp_path: Path) -> None:
    path = write_config(tmp_path / "agent.json", [conn("a", "alice")])
    with running_agent(load_settings(path)) as h:
        h.wait(lambda: h.status("a")["registered"], what="a registered")
        before = list(h.adapter.sent)
        good = path.read_text()

        path.write_text(good.replace('"transport": "TCP"', '"transport": "SCTP"'))
        assert reload_from_file(path, h.service, h.service._log) is False
        path.write_text("{ this is not json")
        assert reload_from_file(path, h.service, h.service._log) is False
        # An id the API already uses cannot be claimed by the file.
        _code, out = h.call("POST", BASE, {"connection_name": "mine"})
        api_id = out["data"]["id"]
        write_config(path, [conn("a", "alice"), conn(api_id, "ivan")])
        assert reload_from_file(path, h.service, h.service._log) is False
        # More registering connections than the agent holds: in the file alone, or with the API's.
        write_config(path, [conn(f"c{i}", f"user{i}") for i in range(LIMIT + 1)])
        assert reload_from_file(path, h.service, h.service._log) is False
        made = [
            h.call("POST", BASE, {"connection_name": f"api {i}", "external_uac_settings": EXT})[1] for i in range(3)
        ]
        for m in made:
            h.wait(lambda m=m: h.status(m["data"]["id"])["registered"], what="API connection registered")
        before = list(h.adapter.sent)
        write_config(path, [conn(f"c{i}", f"user{i}") for i in range(LIMIT - 2)])
        assert reload_from_file(path, h.service, h.service._log) is False

        refused = [json.loads(line) for line in h.log.getvalue().splitlines() if '"reload_refused"' in line]
        assert len(refused) == 5
        assert "transport" in refused[0]["problems"][0] and "SCTP" in refused[0]["problems"][0]
        assert "invalid JSON" in refused[1]["problems"][0]
        assert "created through the API" in refused[2]["problems"][0]
        assert f"at most {LIMIT} (workers.max_connections)" in refused[3]["problems"][0]
        assert f"plus 3 created through the API would pass the limit of {LIMIT}" in refused[4]["problems"][0]
        assert all(r["level"] == "error" for r in refused)
        assert h.adapter.sent == before  # nothing touched
        assert h.status("a")["registered"] is True
        assert [r.id for r in h.service.visible(None) if r.managed_by == "file"] == ["a"]


def test_reload_retunes_defaults_live_and_reports_restart_only_sections(tmp_path: Path) -> None:
    path = write_config(tmp_path / "agent.json", [conn("a", "alice")])
    with running_agent(load_settings(path)) as h:
        h.wait(lambda: h.status("a")["registered"], what="a registered")
        before = list(h.adapter.sent)
        data = json.loads(path.read_text())
        data["defaults"]["forbidden_retry_interval"] = 42
        data["sip"]["port"] = 5999
        path.write_text(json.dumps(data))
        assert reload_from_file(path, h.service, h.service._log) is True
        applied = [json.loads(line) for line in h.log.getvalue().splitlines() if '"reload_applied"' in line][-1]
        assert applied["needs_restart"] == ["sip"]
        assert applied["policy_retuned"] == ["a"]
        assert h.adapter.sent == before  # knobs change without a REGISTER
        st = h.engine.statuses()["a"]
        assert st.registered
        assert h.service.settings.sip.port == 5070  # the running value stays until a restart
        assert h.policy("a").settings.forbidden_retry_interval_sec == 42  # on its worker


def test_reload_rotates_api_keys_on_every_endpoint(tmp_path: Path) -> None:
    path = write_config(tmp_path / "agent.json", [conn("a", "alice")])
    status_q = "/v2/sip_registration_status?credential_type=uac_third-party_credential&connection_id=a&user_id=323"
    with running_agent(load_settings(path)) as h:
        h.wait(lambda: h.status("a")["registered"], what="a registered")
        old_user_key = next(k for k, u in USER_KEYS.items() if u == "323")
        assert h.call("GET", BASE, key=old_user_key)[0] == 200
        data = json.loads(path.read_text())
        data["http"]["api_key"] = "operator-key-rotated-0123"
        data["http"]["api_keys"] = [{"user_id": "323", "api_key": "tenant-323-rotated-0123"}]
        path.write_text(json.dumps(data))
        assert reload_from_file(path, h.service, h.service._log) is True
        applied = [json.loads(line) for line in h.log.getvalue().splitlines() if '"reload_applied"' in line][-1]
        assert applied["api_keys_reloaded"] is True
        assert applied["needs_restart"] == []  # keys alone need no restart
        # the old keys stop working on the connections API and the status endpoint alike
        for old in (KEY, old_user_key, "tenant-999-key-0123456789"):
            code, body = h.call("GET", BASE, key=old)
            assert code == 401 and body["errors"][0]["code"] == "unauthorized", body
            assert h.call("GET", status_q, key=old)[0] == 401
        code, body = h.call("GET", BASE, key="operator-key-rotated-0123")
        assert code == 200 and [c["id"] for c in body["data"]] == ["a"]
        code, body = h.call("GET", BASE, key="tenant-323-rotated-0123")
        assert code == 200  # the rotated key still acts for user 323
        assert h.call("GET", status_q, key="tenant-323-rotated-0123")[0] == 200
        assert h.call("GET", status_q, key="operator-key-rotated-0123")[0] == 200
        # the new keys never reach the log
        assert "rotated-0123" not in h.log.getvalue()
        assert h.adapter.registers("a") == 1  # no connection was touched


def test_reload_without_a_config_file_is_refused(tmp_path: Path) -> None:
    from tests.unit.apifakes import settings_for

    with running_agent(settings_for(tmp_path)) as h:
        assert reload_from_file(None, h.service, h.service._log) is False
        assert "nothing to re-read" in h.log.getvalue()


def test_api_connections_keep_their_ids_after_reload(tmp_path: Path) -> None:
    path = write_config(tmp_path / "agent.json", [])
    with running_agent(load_settings(path)) as h:
        _code, out = h.call("POST", BASE, {"connection_name": "api", "external_uac_settings": copy.deepcopy(EXT)})
        cid = out["data"]["id"]
        h.wait(lambda: h.status(cid)["registered"], what="registered")
        write_config(path, [conn("a", "alice")])
        assert reload_from_file(path, h.service, h.service._log) is True
        h.wait(lambda: h.status("a")["registered"], what="a registered")
        assert h.status(cid)["registered"] is True


def test_edge_and_capture_changes_are_reported_as_needing_a_restart() -> None:
    old = AgentSettings.model_validate({"http": {"api_key": KEY}})
    new = AgentSettings.model_validate(
        {"http": {"api_key": KEY}, "edge": {"media_max_cpu_percent": 50}, "capture": {"hep_address": "127.0.0.1:9060"}}
    )
    assert restart_only_changes(old, new) == ["edge", "capture"]
    assert restart_only_changes(old, old) == []
