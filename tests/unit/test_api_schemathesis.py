"""Property-based run over the generated OpenAPI document (schemathesis): no request, valid or
not, to any of its paths gets a 5xx, and every answer matches the document (status, content
type, schema). Runs against the real HTTP server, service, SQLite store and workers, over the
fake SIP stack (random proxies must not reach a real resolver)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from agent.http.app import openapi_document
from tests.unit.apifakes import EXT, KEY, Harness, running_agent, settings_for

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
PATHS = {
    "/v2/sip_registration_status",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/admin/status",
    "/admin/reload",
    "/v2/uac_connections",
    "/v2/uac_connections/{id}",
    "/v2/uac_connections/{id}/actions/register",
    "/v2/uac_connections/{id}/actions/unregister",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    file_conn = {
        "connection_id": "file-1",
        "user_id": "ops",
        "connection_name": "From the file",
        "external_uac_settings": EXT,
        "internal_uac_settings": {"destination_uri": "1006@assistant-abc123.sip.telnyx.com"},
    }
    with running_agent(settings_for(tmp, [file_conn])) as h:
        yield h


DOCUMENT = openapi_document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_the_run_covers_every_path_the_server_serves(server: Harness) -> None:
    assert set(DOCUMENT["paths"]) == PATHS
    assert server.call("GET", "/openapi.json", key=None) == (200, DOCUMENT)  # what the server serves


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors_and_answers_match_the_document(case: Any, server: Harness) -> None:
    params = case.path_parameters or {}
    if "id" in params and len(str(params["id"])) % 2 == 0:
        # Half the time, aim at a connection that exists (the file's or one created earlier).
        ids = sorted(r.id for r in server.service.visible(None))
        params["id"] = ids[len(str(params["id"])) % len(ids)]
    if case.query and "credential_type" in case.query and len(str(case.query.get("connection_id"))) % 2 == 0:
        # Half the time, ask the status endpoint for a connection that exists, as its owner.
        case.query.update(credential_type="uac_third-party_credential", connection_id="file-1", user_id="ops")
    response = case.call(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"})
    case.validate_response(response, checks=CHECKS)
    assert server.engine.alive
