"""The UAC Connections API over the real SIP thread, service and SQLite store, with a
fake SIP stack: create, list, retrieve, update, delete, actions, limits, errors."""

from __future__ import annotations

import copy
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.api.schemas import AdminStatus, ConnectionEnvelope, ConnectionList, Errors, RegistrationStatusView
from tests.unit.apifakes import DEST, EXT, KEY, USER_KEYS, Harness, running_agent, settings_for

TENANT = next(k for k, u in USER_KEYS.items() if u == "323")
OTHER = next(k for k, u in USER_KEYS.items() if u == "999")
BASE = "/v2/uac_connections"

FILE_CONN = {
    "connection_id": "file-1",
    "user_id": "323",
    "connection_name": "From the file",
    "external_uac_settings": {**EXT, "username": "file-user", "password": "file-pw-secret"},
    "internal_uac_settings": DEST,
}


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Harness]:
    with running_agent(settings_for(tmp_path, [FILE_CONN])) as h:
        h.wait(lambda: h.status("file-1")["registered"], what="file connection registered")
        yield h


def create(h: Harness, body: dict[str, Any] | None = None, key: str = KEY, **fields: Any) -> dict[str, Any]:
    payload = body if body is not None else {"connection_name": "Office PBX", **fields}
    code, out = h.call("POST", BASE, payload, key=key)
    assert code == 201, out
    data: dict[str, Any] = out["data"]
    return data


def registering(h: Harness, **fields: Any) -> dict[str, Any]:
    data = create(h, external_uac_settings=copy.deepcopy(EXT), internal_uac_settings=DEST, **fields)
    h.wait(lambda: h.status(data["id"])["registered"], what="registered")
    return data


def errors(out: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [
        (e["code"], (e.get("source") or {}).get("pointer") or (e.get("source") or {}).get("parameter"))
        for e in out["errors"]
    ]


# -- create -----------------------------------------------------------------------


def test_create_with_only_a_name_generates_credentials_once(agent: Harness) -> None:
    data = create(agent)
    assert data["record_type"] == "uac_connection"
    assert data["connection_name"] == "Office PBX"
    assert data["managed_by"] == "api"
    assert data["user_id"] == "ops"  # the operator key's default user
    assert data["active"] is True
    assert data["external_uac_settings"] is None
    assert data["registration_status"] == 0  # nothing to register
    assert data["pair_state"] == "INACTIVE"
    assert data["id"].isdigit() and len(data["id"]) == 19
    assert data["user_name"].startswith("uac") and len(data["user_name"]) == 15
    generated = data["password"]
    assert len(generated) >= 32
    assert data["fqdn"] == "127.0.0.1:5070"
    assert data["created_at"] == data["updated_at"] and data["created_at"].endswith("Z")
    again = agent.status(data["id"])
    assert "password" not in again  # only once
    listed = agent.call("GET", BASE)[1]["data"]
    assert generated not in json.dumps(listed)
    assert generated not in agent.log.getvalue()


def test_create_registers_within_a_second_and_never_returns_passwords(agent: Harness) -> None:
    code, out = agent.call(
        "POST",
        BASE,
        {
            "connection_name": "Office PBX",
            "user_name": "my-sip-user",
            "password": "my-sip-password",
            "external_uac_settings": EXT,
            "internal_uac_settings": DEST,
        },
    )
    assert code == 201, out
    data = out["data"]
    assert "password" not in data  # a password that was sent is not echoed
    assert data["user_name"] == "my-sip-user"
    assert data["external_uac_settings"] == {
        "proxy": "sip:pbx.example.com:5060",
        "outbound_proxy": None,
        "transport": "TCP",
        "username": "telnyx-reg",
        "auth_username": None,
        "from_user": None,
        "expiration_sec": 300,
    }
    agent.wait(lambda: agent.status(data["id"])["registered"], timeout=1.0, what="registered within 1 s")
    st = agent.status(data["id"])
    assert st["registration_status"] == 4 and st["last_registration_response"] == "200 OK"
    assert st["pair_state"] == "ACTIVE"
    # The status endpoint serves it too.
    q = f"/v2/sip_registration_status?credential_type=uac_third-party_credential&connection_id={data['id']}&user_id=ops"
    code, body = agent.call("GET", q)
    assert code == 200 and body["registered"] is True
    everything = json.dumps(agent.call("GET", BASE)[1]) + agent.log.getvalue()
    for secret in ("my-sip-password", EXT["password"], KEY):
        assert secret not in everything


def test_invalid_input_is_422_naming_the_field_and_changes_nothing(agent: Harness) -> None:
    before = list(agent.adapter.sent)
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"external_uac_settings": {**EXT, "transport": "SCTP"}}, "invalid_value", "/external_uac_settings/transport"),
        ({"external_uac_settings": {**EXT, "proxy": "http://pbx"}}, "invalid_value", "/external_uac_settings/proxy"),
        (
            {"external_uac_settings": {**EXT, "expiration_sec": 5}},
            "invalid_value",
            "/external_uac_settings/expiration_sec",
        ),
        (
            {"external_uac_settings": {**EXT, "expiration_sec": "300"}},
            "invalid_type",
            "/external_uac_settings/expiration_sec",
        ),
        (
            {"internal_uac_settings": {"destination_uri": "not a uri"}},
            "invalid_value",
            "/internal_uac_settings/destination_uri",
        ),
        ({"external_uac_settings": {**EXT, "colour": "red"}}, "unknown_field", "/external_uac_settings/colour"),
        ({"colour": "red"}, "unknown_field", "/colour"),
        ({"active": "yes"}, "invalid_type", "/active"),
        ({"connection_name": 7}, "invalid_type", "/connection_name"),
        ({"connection_name": "   "}, "invalid_value", "/connection_name"),
        (
            {"external_uac_settings": {k: v for k, v in EXT.items() if k != "password"}},
            "missing_field",
            "/external_uac_settings/password",
        ),
        (
            {"external_uac_settings": {**EXT, "password_file": "/etc/shadow"}},
            "unknown_field",
            "/external_uac_settings/password_file",
        ),
        ({"user_name": "a b"}, "invalid_value", "/user_name"),
        ({"password": "short"}, "invalid_value", "/password"),
        ({"registration": {"forbidden_retry_interval": 0}}, "invalid_value", "/registration/forbidden_retry_interval"),
        (
            {"external_uac_settings": {**EXT, "transport": "TLS"}},
            "tls_not_configured",
            "/external_uac_settings/transport",
        ),
    ]
    for extra, code_name, pointer in cases:
        body = {"connection_name": "bad", **extra}
        code, out = agent.call("POST", BASE, body)
        assert code == 422, (extra, out)
        assert (code_name, pointer) in errors(out), (extra, out)
        assert "/etc/shadow" not in json.dumps(out) or pointer.endswith("password_file")
    code, out = agent.call("POST", BASE, {})
    assert code == 422 and ("missing_field", "/connection_name") in errors(out)
    assert agent.store.all() == []
    assert [r.id for r in agent.service.visible(None)] == ["file-1"]
    assert agent.adapter.sent == before  # the SIP stack saw nothing


def test_body_errors(agent: Harness) -> None:
    assert agent.call("POST", BASE, raw=b"{not json")[0] == 400
    assert agent.call("POST", BASE, raw=b"NaN")[0] == 400
    code, out = agent.call("POST", BASE, raw=b"[1, 2]")
    assert code == 422 and out["errors"][0]["source"] == {"pointer": ""}
    assert agent.call("POST", BASE, raw=b'{"connection_name": "x"}', ctype="text/plain")[0] == 415
    assert agent.call("POST", BASE)[0] == 400  # no body
    assert agent.call("POST", BASE + "?x=1", {"connection_name": "x"})[0] == 422
    assert agent.call("PUT", BASE + "/file-1", {"connection_name": "x"})[0] == 405
    assert agent.call("GET", BASE + "/file-1/actions/dance")[0] == 404
    assert agent.call("GET", "/v2/uac_connections/a/b")[0] == 404


# -- auth and ownership ----------------------------------------------------------


def test_keys_users_and_ownership(agent: Harness) -> None:
    assert agent.call("GET", BASE, key=None)[0] == 401
    assert agent.call("GET", BASE, key="wrong-key")[0] == 401
    code, out = agent.call("GET", BASE, key=None)
    assert out["errors"][0]["code"] == "unauthorized"
    mine = create(agent, key=TENANT)
    assert mine["user_id"] == "323"
    theirs = create(agent, key=OTHER)
    assert theirs["user_id"] == "999"
    ids = {d["id"] for d in agent.call("GET", BASE, key=TENANT)[1]["data"]}
    assert ids == {mine["id"], "file-1"}  # own connections, from the API and the file
    assert {d["id"] for d in agent.call("GET", BASE)[1]["data"]} == {mine["id"], theirs["id"], "file-1"}
    code, out = agent.call("GET", f"{BASE}/{theirs['id']}", key=TENANT)
    assert code == 403 and out["errors"][0]["code"] == "forbidden"
    assert agent.call("PATCH", f"{BASE}/{theirs['id']}", {"connection_name": "x"}, key=TENANT)[0] == 403
    assert agent.call("DELETE", f"{BASE}/{theirs['id']}", key=TENANT)[0] == 403
    assert agent.call("POST", f"{BASE}/{theirs['id']}/actions/register", key=TENANT)[0] == 403
    assert agent.call("GET", f"{BASE}/nope", key=TENANT)[0] == 404
    assert agent.call("GET", BASE + "?filter_user_id=999", key=TENANT)[0] == 403
    code, out = agent.call("POST", BASE, {"connection_name": "x", "user_id": "999"}, key=TENANT)
    assert code == 403 and errors(out) == [("forbidden", "/user_id")]
    assert create(agent, user_id="777")["user_id"] == "777"  # the operator key may name the owner
    # The status endpoint honours user keys too.
    q = "/v2/sip_registration_status?credential_type=uac_third-party_credential&connection_id=file-1&user_id={}"
    assert agent.call("GET", q.format("323"), key=TENANT)[0] == 200
    assert agent.call("GET", q.format("999"), key=OTHER)[0] == 403


# -- update ---------------------------------------------------------------------------


def test_patch_internal_settings_only_swaps_destination_without_register(agent: Harness) -> None:
    data = registering(agent)
    cid = data["id"]
    sent = len(agent.adapter.sent)
    code, out = agent.call(
        "PATCH", f"{BASE}/{cid}", {"internal_uac_settings": {"destination_uri": "2000@cc.example.com"}}
    )
    assert code == 200, out
    assert out["data"]["internal_uac_settings"]["destination_uri"] == "2000@cc.example.com"
    assert out["data"]["registered"] is True
    assert agent.adapter.sent[sent:] == []  # no REGISTER, no new account
    st = agent.engine.statuses()[cid]
    assert st.connection.internal_uac_settings.destination_uri == "2000@cc.example.com"
    stored = agent.store.get(cid)
    assert stored is not None and stored.document["connection"]["internal_uac_settings"]["destination_uri"] == (
        "2000@cc.example.com"
    )
    # Name, from_user and registration knobs do not re-register either.
    for body in (
        {"connection_name": "Renamed"},
        {"external_uac_settings": {"from_user": "601"}},
        {"registration": {"forbidden_retry_interval": 60}},
    ):
        assert agent.call("PATCH", f"{BASE}/{cid}", body)[0] == 200
    assert agent.adapter.sent[sent:] == []
    assert agent.engine.statuses()[cid].connection.connection_name == "Renamed"
    # A PATCH that changes nothing changes nothing (updated_at included).
    before = agent.status(cid)["updated_at"]
    assert agent.call("PATCH", f"{BASE}/{cid}", {"connection_name": "Renamed"})[0] == 200
    assert agent.status(cid)["updated_at"] == before


def test_patch_external_settings_reregisters_with_new_ones_and_leaves_others_alone(agent: Harness) -> None:
    a = registering(agent)
    b = registering(agent, connection_name="Other")
    b_sent = [s for s in agent.adapter.sent if s[0] == b["id"]]
    file_sent = [s for s in agent.adapter.sent if s[0] == "file-1"]
    code, out = agent.call("PATCH", f"{BASE}/{a['id']}", {"external_uac_settings": {"password": "wrong-password"}})
    assert code == 200, out
    agent.wait(lambda: agent.status(a["id"])["last_registration_response"] == "401 Unauthorized", what="401")
    st = agent.status(a["id"])
    assert st["registration_status"] == 2 and st["registered"] is False
    ops = [(what, pw) for k, what, pw in agent.adapter.sent if k == a["id"]]
    # registered with the old password, unregistered with it, re-created, registered with the new one
    assert ops[-4:] == [
        ("unregister", EXT["password"]),
        ("remove", EXT["password"]),
        ("add", "wrong-password"),
        ("register", "wrong-password"),
    ]
    code, out = agent.call("PATCH", f"{BASE}/{a['id']}", {"external_uac_settings": {"password": EXT["password"]}})
    assert code == 200
    agent.wait(lambda: agent.status(a["id"])["registered"], what="registered again")
    # Untouched connections were not touched.
    assert [s for s in agent.adapter.sent if s[0] == b["id"]] == b_sent
    assert [s for s in agent.adapter.sent if s[0] == "file-1"] == file_sent
    assert "wrong-password" not in agent.log.getvalue()


def test_patch_merges_nested_fields_and_null_removes(agent: Harness) -> None:
    a = registering(agent, connection_name="Merge")
    code, out = agent.call(
        "PATCH", f"{BASE}/{a['id']}", {"external_uac_settings": {"outbound_proxy": "sip:edge.example.com"}}
    )
    assert code == 200
    ext = out["data"]["external_uac_settings"]
    assert ext["outbound_proxy"] == "sip:edge.example.com" and ext["username"] == "telnyx-reg"
    code, out = agent.call("PATCH", f"{BASE}/{a['id']}", {"external_uac_settings": {"outbound_proxy": None}})
    assert code == 200 and out["data"]["external_uac_settings"]["outbound_proxy"] is None
    agent.wait(lambda: agent.status(a["id"])["registered"], what="registered again")
    sent = list(agent.adapter.sent)
    for body, err in (
        ({"connection_name": None}, ("invalid_value", "/connection_name")),
        ({"user_id": "999"}, ("read_only_field", "/user_id")),
        ({"external_uac_settings": {"password": None}}, ("missing_field", "/external_uac_settings/password")),
        ({"external_uac_settings": {"transport": "FTP"}}, ("invalid_value", "/external_uac_settings/transport")),
        ({"external_uac_settings": "sip:x"}, ("invalid_type", "/external_uac_settings")),
    ):
        code, out = agent.call("PATCH", f"{BASE}/{a['id']}", body)
        assert code == 422 and err in errors(out), (body, out)
    assert agent.adapter.sent == sent  # refused changes touch nothing
    assert agent.status(a["id"])["registered"] is True
    # external_uac_settings: null stops registering (unregisters) and keeps the connection.
    code, out = agent.call("PATCH", f"{BASE}/{a['id']}", {"external_uac_settings": None})
    assert code == 200 and out["data"]["external_uac_settings"] is None
    assert a["id"] not in agent.adapter.accounts


def test_active_false_unregisters_and_keeps_the_connection(agent: Harness) -> None:
    a = registering(agent)
    code, out = agent.call("PATCH", f"{BASE}/{a['id']}", {"active": False})
    assert code == 200
    assert out["data"]["active"] is False and out["data"]["registered"] is False
    assert out["data"]["registration_status"] == 0
    assert [w for k, w, _ in agent.adapter.sent if k == a["id"]][-2:] == ["unregister", "remove"]
    assert agent.call("GET", f"{BASE}/{a['id']}")[0] == 200
    assert agent.call("PATCH", f"{BASE}/{a['id']}", {"active": True})[0] == 200
    agent.wait(lambda: agent.status(a["id"])["registered"], what="registered after active: true")


# -- delete ---------------------------------------------------------------------------


def test_delete_unregisters_then_removes(agent: Harness) -> None:
    a = registering(agent)
    code, out = agent.call("DELETE", f"{BASE}/{a['id']}")
    assert code == 200 and out["data"]["id"] == a["id"]
    assert [w for k, w, _ in agent.adapter.sent if k == a["id"]][-2:] == ["unregister", "remove"]
    assert agent.call("GET", f"{BASE}/{a['id']}")[0] == 404
    assert agent.call("DELETE", f"{BASE}/{a['id']}")[0] == 404
    assert agent.store.get(a["id"]) is None
    assert a["id"] not in agent.engine.statuses()


# -- config-file connections -------------------------------------------------------------


def test_file_connections_are_listed_but_read_only(agent: Harness) -> None:
    st = agent.status("file-1")
    assert st["managed_by"] == "file" and st["user_name"] is None and st["registered"] is True
    for method, body in (("PATCH", {"connection_name": "x"}), ("DELETE", None)):
        code, out = agent.call(method, f"{BASE}/file-1", body)
        assert code == 409, out
        assert out["errors"][0]["code"] == "managed_by_file"
        assert "reload" in out["errors"][0]["detail"]
    # Runtime actions are allowed on them.
    assert agent.call("POST", f"{BASE}/file-1/actions/register")[0] == 202


# -- actions ----------------------------------------------------------------------------


def test_actions_unregister_then_register(agent: Harness) -> None:
    a = registering(agent)
    n = agent.adapter.registers(a["id"])
    code, out = agent.call("POST", f"{BASE}/{a['id']}/actions/unregister")
    assert code == 200, out
    assert out["data"]["registration_status"] == 5 and out["data"]["registered"] is False
    code, out = agent.call("POST", f"{BASE}/{a['id']}/actions/register")
    assert code == 202, out
    agent.wait(lambda: agent.status(a["id"])["registered"], what="registered after actions/register")
    assert agent.adapter.registers(a["id"]) == n + 1
    code, _ = agent.call("POST", f"{BASE}/{a['id']}/actions/register")  # refresh now
    assert code == 202
    agent.wait(lambda: agent.adapter.registers(a["id"]) == n + 2, what="refresh sent")
    idle = create(agent)
    code, out = agent.call("POST", f"{BASE}/{idle['id']}/actions/register")
    assert code == 409 and out["errors"][0]["code"] == "not_registering"


# -- limits -------------------------------------------------------------------------------


def test_more_connections_than_the_agent_holds_is_a_clear_409(agent: Harness) -> None:
    limit = agent.settings.workers.max_connections  # 9 here, on workers of 4
    made = [registering(agent, connection_name=f"c{i}") for i in range(limit - 1)]  # + the file's
    assert len(agent.adapter.accounts) == limit
    workers = {agent.pool.statuses()[c["id"]].worker for c in made}
    assert workers == {0, 1, 2}  # 4 + 4 + 1: a new worker only when the others are full
    code, out = agent.call("POST", BASE, {"connection_name": "one too many", "external_uac_settings": EXT})
    assert code == 409, out
    assert out["errors"][0]["code"] == "connection_limit_reached"
    assert f"its limit (workers.max_connections = {limit})" in out["errors"][0]["detail"]
    assert len(agent.store.all()) == limit - 1  # nothing stored
    # An inactive one fits; activating it does not.
    idle = create(agent, external_uac_settings=EXT, active=False)
    assert agent.pool.statuses()[idle["id"]].worker is None  # it keeps no registration: on no worker
    code, out = agent.call("PATCH", f"{BASE}/{idle['id']}", {"active": True})
    assert code == 409 and out["errors"][0]["code"] == "connection_limit_reached"
    assert agent.status(idle["id"])["active"] is False
    assert agent.engine.alive
    # Free a slot, then it fits.
    assert agent.call("DELETE", f"{BASE}/{made[0]['id']}")[0] == 200
    assert agent.call("PATCH", f"{BASE}/{idle['id']}", {"active": True})[0] == 200


# -- list ----------------------------------------------------------------------------------


def test_list_filters_order_and_pages(agent: Harness) -> None:
    names = ["Bravo office", "alpha office", "Charlie lab", "delta lab"]
    made = [create(agent, connection_name=n, user_name=f"user-{n.split()[0].lower()}") for n in names]
    agent.call("PATCH", f"{BASE}/{made[3]['id']}", {"active": False})
    code, out = agent.call("GET", BASE + "?order_by=connection_name&filter_managed_by=api")
    assert code == 200
    assert [d["connection_name"] for d in out["data"]] == ["alpha office", "Bravo office", "Charlie lab", "delta lab"]
    assert out["meta"] == {"page_number": 1, "page_size": 100, "total_pages": 1, "total_results": 4}
    out = agent.call("GET", BASE + "?order_by=connection_name&sort_direction=reverse&filter_managed_by=api")[1]
    assert out["data"][0]["connection_name"] == "delta lab"
    out = agent.call("GET", BASE + "?filter_managed_by=api")[1]  # default: newest first
    assert [d["id"] for d in out["data"]] == [m["id"] for m in reversed(made)]
    out = agent.call("GET", BASE + "?filter_connection_name=OFFI")[1]
    assert {d["connection_name"] for d in out["data"]} == {"Bravo office", "alpha office"}
    out = agent.call("GET", BASE + "?filter_auth_user_name=charl")[1]
    assert [d["connection_name"] for d in out["data"]] == ["Charlie lab"]
    out = agent.call("GET", BASE + "?filter_active=false")[1]
    assert [d["connection_name"] for d in out["data"]] == ["delta lab"]
    out = agent.call("GET", BASE + "?filter_registration_status=4")[1]
    assert [d["id"] for d in out["data"]] == ["file-1"]
    out = agent.call("GET", BASE + "?filter_managed_by=file")[1]
    assert [d["id"] for d in out["data"]] == ["file-1"]
    out = agent.call("GET", BASE + "?order_by=connection_name&per_page=2&page=2&filter_managed_by=api")[1]
    assert [d["connection_name"] for d in out["data"]] == ["Charlie lab", "delta lab"]
    assert out["meta"] == {"page_number": 2, "page_size": 2, "total_pages": 2, "total_results": 4}
    out = agent.call("GET", BASE + "?order_by=active&filter_managed_by=api")[1]
    assert out["data"][-1]["connection_name"] == "delta lab"
    for query, param in (
        ("filter_connection_name=ab", "filter_connection_name"),
        ("per_page=0", "per_page"),
        ("per_page=1001", "per_page"),
        ("page=x", "page"),
        ("order_by=auth_type", "order_by"),
        ("sort_direction=up", "sort_direction"),
        ("filter_active=1", "filter_active"),
        ("filter_registration_status=9", "filter_registration_status"),
        ("colour=red", "colour"),
        ("page=1&page=2", "page"),
        ("page[number]=2", "page[number]"),
    ):
        code, out = agent.call("GET", f"{BASE}?{query}")
        assert code == 422, (query, out)
        assert out["errors"][0]["source"] == {"parameter": param}, (query, out)
    code, out = agent.call("POST", BASE, {"connection_name": "dup", "user_name": "USER-ALPHA"})
    assert code == 422 and errors(out) == [("already_taken", "/user_name")]


# -- persistence ----------------------------------------------------------------------------


def test_api_connections_survive_a_restart(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, [FILE_CONN])
    with running_agent(settings) as h:
        a = registering(h, connection_name="Persisted", user_name="persisted-user")
        b = create(h, connection_name="Changed")
        h.call("PATCH", f"{BASE}/{b['id']}", {"internal_uac_settings": DEST, "active": False})
        gone = create(h, connection_name="Gone")
        h.call("DELETE", f"{BASE}/{gone['id']}")
    db = tmp_path / "connections.db"
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    with running_agent(settings) as h:
        h.wait(lambda: h.status(a["id"])["registered"], what="API connection registered after restart")
        back = h.status(a["id"])
        assert back["connection_name"] == "Persisted" and back["user_name"] == "persisted-user"
        assert back["created_at"] == a["created_at"]
        assert h.adapter.accounts[a["id"]].password == EXT["password"]
        changed = h.status(b["id"])
        assert changed["active"] is False
        assert changed["internal_uac_settings"]["destination_uri"] == DEST["destination_uri"]
        assert h.call("GET", f"{BASE}/{gone['id']}")[0] == 404
        assert h.status("file-1")["managed_by"] == "file"


# Every operation and the errors it documents (405, with Allow, on every one).
OPERATIONS = {
    ("get", "/v2/sip_registration_status"): {"200", "400", "401", "403", "404"},
    ("get", "/healthz"): {"200", "503"},
    ("get", "/readyz"): {"200", "400", "503"},
    ("get", "/metrics"): {"200"},
    ("get", "/openapi.json"): {"200"},
    ("get", "/admin/status"): {"200", "400", "401", "403"},
    ("post", "/admin/reload"): {"200", "401", "403", "404", "411", "413", "422", "503", "504"},
    ("get", BASE): {"200", "400", "401", "403", "422"},
    ("post", BASE): {"201", "400", "401", "403", "409", "411", "413", "415", "422", "503", "504"},
    ("get", BASE + "/{id}"): {"200", "400", "401", "403", "404", "422"},
    ("patch", BASE + "/{id}"): {"200", "400", "401", "403", "404", "409", "411", "413", "415", "422", "503", "504"},
    ("delete", BASE + "/{id}"): {"200", "400", "401", "403", "404", "409", "422", "503", "504"},
    ("post", BASE + "/{id}/actions/register"): {
        *("202", "400", "401", "403", "404", "409", "411", "413", "415", "422", "503", "504"),
    },
    ("post", BASE + "/{id}/actions/unregister"): {
        *("200", "400", "401", "403", "404", "409", "411", "413", "415", "422", "503", "504"),
    },
}


def test_openapi_document_covers_every_path_and_its_errors(agent: Harness) -> None:
    code, doc = agent.call("GET", "/openapi.json", key=None)
    assert code == 200
    assert doc["openapi"].startswith("3.1")
    served = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert served == set(OPERATIONS)
    errors_ref = {"$ref": "#/components/schemas/Errors"}
    for (method, path), statuses in OPERATIONS.items():
        op = doc["paths"][path][method]
        assert set(op["responses"]) == statuses | {"405"}, (method, path)
        assert "Allow" in op["responses"]["405"]["headers"], (method, path)
        for status, answer in op["responses"].items():
            assert answer["description"], (method, path, status)
            probe = path in ("/healthz", "/readyz") and status == "503"  # the probe's own body, not an error
            if status >= "400" and not probe:
                assert answer["content"]["application/json"]["schema"] == errors_ref, (method, path, status)
        keyed = path.startswith(("/v2/", "/admin/"))
        assert (op.get("security") == [{"bearerAuth": []}]) == keyed, (method, path)
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "HTTPValidationError" not in json.dumps(doc)  # FastAPI's own error shape is never answered
    # Request bodies come from the models that validate them.
    assert doc["paths"][BASE]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ConnectionCreate"
    }
    schemas = doc["components"]["schemas"]
    assert schemas["ConnectionCreate"]["required"] == ["connection_name"]
    assert "user_id" not in schemas["ConnectionUpdate"]["properties"]
    assert "password_file" not in json.dumps(doc)
    assert schemas["ExternalUacSettingsCreate"]["properties"]["transport"]["enum"] == ["UDP", "TCP", "TLS"]
    assert schemas["ExternalUacSettingsCreate"]["required"] == ["proxy", "username", "password"]
    list_params = {p["name"] for p in doc["paths"][BASE]["get"]["parameters"]}
    assert list_params == {
        *("page", "per_page", "order_by", "sort_direction", "filter_connection_name", "filter_user_name"),
        *("filter_auth_user_name", "filter_active", "filter_registration_status", "filter_managed_by"),
        "filter_user_id",
    }


def test_answers_match_the_document(agent: Harness) -> None:
    """The exact response models (no extra fields) against real answers of every kind."""
    made = registering(agent)
    ConnectionEnvelope.model_validate(agent.call("GET", f"{BASE}/{made['id']}")[1])
    ConnectionEnvelope.model_validate({"data": create(agent)})  # with its generated password
    ConnectionList.model_validate(agent.call("GET", BASE)[1])
    q = "/v2/sip_registration_status?credential_type=uac_third-party_credential&connection_id=file-1&user_id=323"
    RegistrationStatusView.model_validate(agent.call("GET", q)[1])
    for bad in (f"{BASE}/nope", BASE + "?colour=red", q + "&credential_type=x"):
        Errors.model_validate(agent.call("GET", bad)[1])
    code, body = agent.call("GET", "/admin/status")
    assert code == 200
    AdminStatus.model_validate(body)
