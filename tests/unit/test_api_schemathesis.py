"""Property-based run over the OpenAPI document (schemathesis): no request, valid or
not, gets a 5xx, and every answer matches the document (status, content type,
schema). Runs against the real HTTP server, service, SQLite store and SIP thread,
over the fake SIP stack (random proxies must not reach a real resolver)."""

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

from agent.api.openapi import build_openapi
from agent.http.server import HttpServer
from tests.unit.apifakes import EXT, KEY, Harness, running_agent, settings_for

schema = schemathesis.openapi.from_dict(build_openapi())

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Harness]]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    file_conn = {
        "connection_id": "file-1",
        "user_id": "ops",
        "connection_name": "From the file",
        "external_uac_settings": EXT,
    }
    with running_agent(settings_for(tmp, [file_conn])) as h:
        srv = HttpServer("127.0.0.1", 0, h.api, h.service._log)
        srv.start()
        try:
            yield f"http://127.0.0.1:{srv.port}", h
        finally:
            srv.stop()


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors_and_answers_match_the_document(case: Any, server: tuple[str, Harness]) -> None:
    base, h = server
    params = case.path_parameters or {}
    if "id" in params and len(str(params["id"])) % 2 == 0:
        # Half the time, aim at a connection that exists (the file's or one created earlier).
        ids = sorted(r.id for r in h.service.visible(None))
        params["id"] = ids[len(str(params["id"])) % len(ids)]
    response = case.call(base_url=base, headers={"Authorization": f"Bearer {KEY}"})
    case.validate_response(response, checks=CHECKS)
    assert h.engine.alive
