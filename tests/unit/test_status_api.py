"""The status endpoint's request logic over a real HTTP socket, without a SIP stack."""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import structlog
from prometheus_client import CollectorRegistry

from agent.config import Connection
from agent.core.clock import FakeClock
from agent.core.policy import PolicySettings, RegisterResponse, RegistrationPolicy
from agent.http.app import create_app
from agent.http.keys import ApiKeys
from agent.http.routes import AgentState
from agent.http.server import HttpServer
from agent.metrics import Metrics
from agent.status import ConnectionStatus, build_status

KEY = "test-api-key-123"
PASSWORD = "very-secret-pw"


def status_for(cid: str, user: str, registered: bool) -> ConnectionStatus:
    conn = Connection.model_validate(
        {
            "connection_id": cid,
            "user_id": user,
            "connection_name": "Office PBX",
            "external_uac_settings": {
                "proxy": "sip:pbx.example.com:5060",
                "outbound_proxy": "sip:edge.example.com:5060",
                "transport": "TCP",
                "username": "telnyx-reg",
                "password": PASSWORD,
                "from_user": "601",
            },
            "internal_uac_settings": {"destination_uri": "1006@assistant-abc123.sip.telnyx.com"},
        }
    )
    p = RegistrationPolicy(PolicySettings(initial_delay_max_sec=0), FakeClock(), random.Random(1))
    p.activate()
    p.poll()
    if registered:
        p.on_response(RegisterResponse(code=200, reason="OK", expires=3600, source_ip="192.0.2.1"))
    else:
        p.on_response(RegisterResponse(code=401, reason="Unauthorized"))
    return build_status(conn, p.snapshot())


@pytest.fixture
def server() -> Iterator[tuple[str, CollectorRegistry]]:
    statuses = {
        "2954035328656082602": status_for("2954035328656082602", "323", True),
        "77": status_for("77", "999", False),
    }
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for st in statuses.values():
        metrics.publish(st)
    app = create_app(ApiKeys(KEY), AgentState(statuses=lambda: statuses), registry, structlog.get_logger())
    srv = HttpServer("127.0.0.1", 0, app, structlog.get_logger())
    srv.start()
    yield f"http://127.0.0.1:{srv.port}", registry
    srv.stop()


def get(url: str, key: str | None = KEY) -> tuple[int, dict[str, object] | str]:
    req = urllib.request.Request(url)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            body = r.read().decode()
            code = r.status
    except urllib.error.HTTPError as e:
        body = e.read().decode()
        code = e.code
    try:
        return code, json.loads(body)
    except json.JSONDecodeError:
        return code, body


Q = "/v2/sip_registration_status?credential_type=uac_third-party_credential&connection_id={}&user_id={}"


def test_seed_response_shape(server: tuple[str, CollectorRegistry]) -> None:
    base, _ = server
    code, body = get(base + Q.format("2954035328656082602", "323"))
    assert code == 200
    assert isinstance(body, dict)
    assert body["connection_id"] == "2954035328656082602"
    assert body["user_id"] == "323"
    assert body["connection_name"] == "Office PBX"
    assert body["username"] == "telnyx-reg"
    assert body["pair_state"] == "ACTIVE"
    assert body["registered"] is True
    assert body["last_registration_response"] == "200 OK"
    assert body["third-party_uac_settings"] == {
        "proxy": "sip:pbx.example.com:5060",
        "outbound_proxy": "sip:edge.example.com:5060",
        "transport": "TCP",
        "username": "telnyx-reg",
        "auth_username": "telnyx-reg",
        "from_user": "601",
        "expiration_sec": 3600,
        "password": "***",
    }
    assert body["internal_uac_settings"] == {"destination_uri": "1006@assistant-abc123.sip.telnyx.com"}
    assert body["registration_status"] == 4
    assert body["last_registered_ip"] == "192.0.2.1"
    assert isinstance(body["registration_status_updated_at"], str)
    details = body["sip_registration_details"]
    assert isinstance(details, dict)
    for key in ("auth_retries", "expires", "uptime", "next_action_at", "failures"):
        assert key in details


def test_failed_connection_shows_auth_retries(server: tuple[str, CollectorRegistry]) -> None:
    base, _ = server
    code, body = get(base + Q.format("77", "999"))
    assert code == 200
    assert isinstance(body, dict)
    assert body["registered"] is False
    assert body["last_registration_response"] == "401 Unauthorized"
    assert body["registration_status"] == 2
    details = body["sip_registration_details"]
    assert isinstance(details, dict)
    assert details["auth_retries"] == 1


@pytest.mark.parametrize(
    ("query", "key", "status", "words"),
    [
        (Q.format("2954035328656082602", "323"), None, 401, "missing Authorization"),
        (Q.format("2954035328656082602", "323"), "wrong", 401, "invalid API key"),
        ("/v2/sip_registration_status?connection_id=1&user_id=2", KEY, 400, "credential_type is required"),
        (
            "/v2/sip_registration_status?credential_type=uac_third-party_credential&user_id=2",
            KEY,
            400,
            "connection_id is required",
        ),
        (
            "/v2/sip_registration_status?credential_type=uac_third-party_credential&connection_id=1",
            KEY,
            400,
            "user_id is required",
        ),
        ("/v2/sip_registration_status?credential_type=bogus&connection_id=1&user_id=2", KEY, 400, "must be one of"),
        (
            "/v2/sip_registration_status?credential_type=telephony_credential&connection_id=1&user_id=2",
            KEY,
            400,
            "not served",
        ),
        (
            "/v2/sip_registration_status?credential_type=sip_credential_connection&connection_id=1&user_id=2",
            KEY,
            400,
            "not served",
        ),
        (Q.format("2954035328656082602", "999"), KEY, 403, "not owned by user_id 999"),
        (Q.format("nope", "323"), KEY, 404, "no connection matches connection_id nope"),
    ],
)
def test_every_error(
    server: tuple[str, CollectorRegistry], query: str, key: str | None, status: int, words: str
) -> None:
    base, _ = server
    code, body = get(base + query, key)
    assert code == status
    assert isinstance(body, dict)
    errors = body["errors"]
    assert isinstance(errors, list)
    assert words in errors[0]["detail"]
    assert errors[0]["title"]
    assert errors[0]["code"]


def test_password_never_shown_anywhere(server: tuple[str, CollectorRegistry]) -> None:
    base, _ = server
    for path in (Q.format("2954035328656082602", "323"), Q.format("77", "999"), "/metrics", "/readyz"):
        _, body = get(base + path)
        assert PASSWORD not in json.dumps(body)
        assert KEY not in json.dumps(body)


def test_readyz_is_ready_while_a_pbx_rejects_a_connection(server: tuple[str, CollectorRegistry]) -> None:
    base, _ = server
    code, body = get(base + "/readyz", None)
    assert code == 200  # connection 77 is refused by its PBX: the agent still serves
    assert body == {"ready": True, "not_registered": ["77"]}
    code, body = get(base + "/readyz?registered=all", None)
    assert code == 503
    assert body == {"ready": False, "not_registered": ["77"], "reason": "1 connection(s) not registered"}
    code, body = get(base + "/healthz", None)
    assert code == 200


@pytest.mark.parametrize("query", ["registered=some", "registered=all&registered=all", "bogus=1"])
def test_readyz_refuses_an_unknown_query(server: tuple[str, CollectorRegistry], query: str) -> None:
    base, _ = server
    code, body = get(base + "/readyz?" + query, None)
    assert code == 400
    assert isinstance(body, dict)
    assert body["errors"][0]["code"] == "invalid_parameter"


def test_probes_report_what_is_wrong() -> None:
    problem: list[str | None] = ["worker(s) 3 silent for over 41 s"]
    ready = [False]
    edge: list[str | None] = [None]
    state = AgentState(statuses=dict, health=lambda: problem[0], ready=lambda: ready[0], unready=lambda: edge[0])
    log = structlog.get_logger()
    srv = HttpServer("127.0.0.1", 0, create_app(ApiKeys(KEY), state, CollectorRegistry(), log), log)
    srv.start()
    base = f"http://127.0.0.1:{srv.port}"
    try:
        assert get(base + "/healthz", None) == (
            503,
            {"status": "worker(s) 3 silent for over 41 s", "sip_thread": False},
        )
        code, body = get(base + "/readyz", None)
        assert (code, body["reason"]) == (503, "starting or stopping")  # type: ignore[index]
        ready[0] = True
        code, body = get(base + "/readyz", None)
        assert (code, body["reason"]) == (503, "worker(s) 3 silent for over 41 s")  # type: ignore[index]
        problem[0] = None
        assert get(base + "/readyz", None)[0] == 200
        assert get(base + "/healthz", None)[0] == 200
        edge[0] = "edge process(es) not running: kamailio"  # being restarted: alive, not ready
        code, body = get(base + "/readyz", None)
        assert (code, body["reason"]) == (503, "edge process(es) not running: kamailio")  # type: ignore[index]
        assert get(base + "/healthz", None)[0] == 200
    finally:
        srv.stop()


def test_metrics_contract(server: tuple[str, CollectorRegistry]) -> None:
    base, _ = server
    _, text = get(base + "/metrics", None)
    assert isinstance(text, str)
    cid = 'connection_id="2954035328656082602"'
    for line in (
        f"uac_agent_registered{{{cid}}} 1.0",
        f'uac_agent_pair_state{{{cid},pair_state="ACTIVE"}} 1.0',
        f'uac_agent_pair_state{{{cid},pair_state="INACTIVE"}} 0.0',
        f"uac_agent_registration_status{{{cid}}} 4.0",
        f"uac_agent_last_registration_response_code{{{cid}}} 200.0",
        f'uac_agent_last_registration_response_info{{{cid},response="200 OK"}} 1.0',
        f"uac_agent_registration_expires_seconds{{{cid}}} 3600.0",
        'uac_agent_last_registration_response_code{connection_id="77"} 401.0',
    ):
        assert line in text, line


def test_unknown_path_and_method(server: tuple[str, CollectorRegistry]) -> None:
    base, _ = server
    code, body = get(base + "/nope")
    assert code == 404
    assert body == {"errors": [{"code": "not_found", "title": "Not Found", "detail": "no resource at /nope"}]}
    for method, path, allow in (
        ("DELETE", "/metrics", "GET, HEAD"),
        ("POST", "/healthz", "GET, HEAD"),
        ("OPTIONS", "/readyz", "GET, HEAD"),
        ("GET", "/admin/reload", "POST"),
    ):
        req = urllib.request.Request(base + path, method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 405
        assert e.value.headers["Allow"] == allow  # the old server sent no Allow
        err = json.loads(e.value.read())["errors"][0]
        assert (err["code"], err["detail"]) == (
            "method_not_allowed",
            f"{method} is not served on {path}; allowed: {allow}",
        )
