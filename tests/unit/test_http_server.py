"""The HTTP server as clients meet it, over real sockets: bursts of connections, idle ones held
open, clients that hang up early, request framing, HEAD, and bugs. No timing is asserted: each
loop is bounded, and a test fails only when an answer is missing or wrong."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry

from agent.http.app import MAX_BODY_BYTES, create_app
from agent.http.keys import ApiKeys
from agent.http.routes import AgentState
from agent.http.server import HttpServer
from agent.logs import configure_logging
from agent.status import ConnectionStatus
from tests.unit.apifakes import EXT, KEY, running_agent, settings_for


@dataclass
class Served:
    port: int
    log: io.StringIO

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in map(json.loads, self.log.getvalue().splitlines()) if e.get("event") == name]


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """Start a server over an AgentState (its log as JSON lines in memory)."""
    previous = structlog.get_config()
    servers: list[HttpServer] = []

    def start(
        statuses: Callable[[], dict[str, ConnectionStatus]] = dict,
        health: Callable[[], str | None] = lambda: None,
        idle_sec: int = 15,
        **bounds: Any,
    ) -> Served:
        stream = io.StringIO()
        log = configure_logging("json", "debug", stream)
        state = AgentState(statuses=statuses, health=health)
        app = create_app(ApiKeys(KEY), state, CollectorRegistry(), log)
        srv = HttpServer("127.0.0.1", 0, app, log, idle_sec=idle_sec, **bounds)
        srv.start()
        servers.append(srv)
        return Served(srv.port, stream)

    yield start
    for srv in servers:
        srv.stop()
    structlog.configure(**previous)


def answer(s: socket.socket, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One whole answer from ``s`` (its Content-Length says where it ends)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = 0 if head_only else int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def exchange(port: int, request: bytes, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a new connection, read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        return answer(s, head_only=request.startswith(b"HEAD "))


def get(port: int, path: str, extra: str = "") -> tuple[int, dict[str, str], bytes]:
    return exchange(port, f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{extra}\r\n".encode())


# -- load --------------------------------------------------------------------------------


def test_a_burst_of_500_connections_all_get_answers(serve: Callable[..., Served]) -> None:
    served = serve()
    n = 500

    async def one(i: int, start: asyncio.Event) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        await start.wait()  # every connection is open (or queued by the kernel) before any request
        writer.write(f"GET /healthz?i={i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        answer = await reader.read()
        writer.close()
        return int(answer.split(b" ", 2)[1]) if answer else 0

    async def burst() -> list[int | BaseException]:
        start = asyncio.Event()
        tasks = [asyncio.create_task(one(i, start)) for i in range(n)]
        await asyncio.sleep(0)
        start.set()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)

    results = asyncio.run(burst())
    refused = [r for r in results if isinstance(r, BaseException)]
    assert refused == []
    assert results == [200] * n
    assert get(served.port, "/healthz")[0] == 200


def test_300_idle_connections_held_open_while_probes_answer(serve: Callable[..., Served]) -> None:
    served = serve()
    silent = [socket.create_connection(("127.0.0.1", served.port), timeout=30) for _ in range(150)]
    kept: list[socket.socket] = []
    try:
        for _ in range(150):  # keep-alive connections that had one answer and now say nothing
            s = socket.create_connection(("127.0.0.1", served.port), timeout=30)
            kept.append(s)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert answer(s)[0] == 200
        for _ in range(20):
            assert get(served.port, "/healthz")[0] == 200
            assert get(served.port, "/metrics")[0] == 200
        # and the held connections still work
        for s in (kept[0], kept[-1]):
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert answer(s)[0] == 200
        silent[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert answer(silent[0])[0] == 200
    finally:
        for s in silent + kept:
            s.close()


def test_a_connection_silent_for_the_idle_time_is_closed(serve: Callable[..., Served]) -> None:
    served = serve(idle_sec=1)
    silent = socket.create_connection(("127.0.0.1", served.port), timeout=30)
    kept = socket.create_connection(("127.0.0.1", served.port), timeout=30)
    try:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert answer(kept)[0] == 200
        assert silent.recv(1) == b""  # closed by the server (the stdlib server's socket timeout did the same)
        assert kept.recv(1) == b""  # and so is a keep-alive connection idle as long
        assert get(served.port, "/healthz")[0] == 200
    finally:
        silent.close()
        kept.close()


# -- clients that hang up ------------------------------------------------------------------


def _abort(s: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a killed client does."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_a_client_that_hangs_up_early_leaves_a_debug_line_at_most(
    serve: Callable[..., Served], capfd: pytest.CaptureFixture[str]
) -> None:
    answering = threading.Event()

    def slow_health() -> str | None:
        answering.set()
        time.sleep(0.3)  # the client is gone by the time the answer is written
        return None

    served = serve(health=slow_health)
    for _ in range(5):
        answering.clear()
        s = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert answering.wait(10)
        _abort(s)
    for _ in range(3):  # not HTTP at all
        assert exchange(served.port, b"\x16\x03\x01 not http\r\n\r\n")[0] == 400
    assert get(served.port, "/healthz")[0] == 200  # still serving
    deadline = time.monotonic() + 10
    while len(served.events("http_request")) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert err == ""
    lines = [json.loads(line) for line in served.log.getvalue().splitlines()]
    assert all(line["level"] == "debug" for line in lines), [line for line in lines if line["level"] != "debug"]
    assert served.events("http_client_error")  # the requests that were not HTTP, as debug lines


def test_a_client_gone_before_its_body_is_in_is_a_debug_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with running_agent(settings_for(tmp_path)) as h:
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", h.server.port), timeout=10)
            s.sendall(
                f"POST /v2/uac_connections HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
            )
            s.shutdown(socket.SHUT_WR)  # gone: after the request's start, before its body is in
            s.close()
        h.wait(lambda: h.log.getvalue().count('"http_client_gone"') == 5, what="5 clients gone")
        assert h.call("GET", "/healthz")[0] == 200  # still serving
        assert h.service.visible(None) == []  # nothing was created
        lines = [json.loads(line) for line in h.log.getvalue().splitlines()]
        gone = [line for line in lines if line["event"] == "http_client_gone"]
        assert {line["level"] for line in gone} == {"debug"}
        assert not [line for line in lines if line["level"] == "error"]
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


def test_a_bug_is_a_500_and_a_structured_line_never_a_traceback(
    serve: Callable[..., Served], capfd: pytest.CaptureFixture[str]
) -> None:
    def broken() -> dict[str, ConnectionStatus]:
        raise RuntimeError("boom")

    served = serve(statuses=broken)
    status, _, body = get(served.port, "/readyz")
    assert status == 500
    assert json.loads(body)["errors"][0]["code"] == "internal_error"
    assert get(served.port, "/healthz")[0] == 200
    (line,) = served.events("api_internal_error")
    assert line["level"] == "error" and "boom" in line["error"] and "RuntimeError" in line["trace"]
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


# -- framing, HEAD, paths, queries -----------------------------------------------------------


def test_body_framing_head_and_trailing_slash(serve: Callable[..., Served]) -> None:
    served = serve()
    auth = f"Authorization: Bearer {KEY}\r\n"
    status, headers, body = exchange(
        served.port,
        f"POST /admin/reload HTTP/1.1\r\nHost: t\r\n{auth}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(),
    )
    assert (status, json.loads(body)["errors"][0]["code"]) == (411, "length_required")
    assert headers["connection"] == "close"
    big = MAX_BODY_BYTES + 1
    status, headers, body = exchange(
        served.port, f"POST /admin/reload HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {big}\r\n\r\n".encode()
    )
    assert (status, json.loads(body)["errors"][0]["code"]) == (413, "payload_too_large")
    assert headers["connection"] == "close"
    status, headers, body = exchange(served.port, b"HEAD /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) == len(get(served.port, "/healthz")[2])
    status, headers, _ = get(served.port, "/healthz/")
    assert status == 200 and headers["cache-control"] == "no-store" and headers["server"] == "uac-agent"
    assert "date" in headers
    status, headers, _ = exchange(served.port, b"HEAD /admin/reload HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert (status, headers["allow"]) == (405, "POST")


def test_a_query_string_too_long_to_read_is_400_everywhere(serve: Callable[..., Served]) -> None:
    """The old stacks answered 400 on the status endpoint and 422 on the connections API: now 400."""
    served = serve()
    many = "&".join(f"f{i}=1" for i in range(21))
    auth = f"Authorization: Bearer {KEY}\r\n"
    for path in (f"/v2/sip_registration_status?{many}", f"/readyz?{many}", f"/admin/status?{many}"):
        status, _, body = get(served.port, path, auth)
        err = json.loads(body)["errors"][0]
        assert (status, err["code"]) == (400, "invalid_parameter"), path
        assert err["detail"] == "query string is malformed: more than 20 fields"


def test_connections_api_query_limits_and_a_change_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import Future

    with running_agent(settings_for(tmp_path)) as h:
        many = "&".join(f"f{i}=1" for i in range(21))
        for path in (f"/v2/uac_connections?{many}", f"/v2/uac_connections/x?{many}"):
            code, body = h.call("GET", path)
            assert (code, body["errors"][0]["code"]) == (400, "invalid_parameter"), path
        code, body = h.call("GET", "/v2/uac_connections?colour=red&page=0")
        assert code == 422
        assert [(e["code"], e["source"]) for e in body["errors"]] == [
            ("invalid_parameter", {"parameter": "page"}),
            ("unknown_parameter", {"parameter": "colour"}),
        ]
        # A change its worker does not confirm in time: 504 in the usual shape, never a success.
        h.service.wait_timeout = 0.2
        pending: Future[Any] = Future()
        monkeypatch.setattr(h.pool, "apply_connection", lambda c: pending)
        code, body = h.call("POST", "/v2/uac_connections", {"connection_name": "late", "external_uac_settings": EXT})
        assert code == 504, body
        (err,) = body["errors"]
        assert (err["code"], err["title"]) == ("change_timeout", "Gateway Timeout")
        pending.set_result(None)


def test_a_port_already_taken_is_http_listen_failed_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.supervisor.run import run
    from tests.unit.apifakes import FakeStack, ThreadLauncher

    previous = structlog.get_config()
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        settings = settings_for(tmp_path)
        settings = settings.model_copy(
            update={"http": settings.http.model_copy(update={"listen": f"127.0.0.1:{port}"})}
        )
        assert run(settings, install_signals=False, launcher=ThreadLauncher(FakeStack())) == 1
    finally:
        taken.close()
        structlog.configure(**previous)
    out, err = capsys.readouterr()
    (line,) = [json.loads(x) for x in out.splitlines() if "http_listen_failed" in x]
    assert line["listen"] == f"127.0.0.1:{port}" and line["error"] == "Address already in use"
    assert err == ""


# -- bounds ------------------------------------------------------------------------------


def closed_within(s: socket.socket, limit: float) -> tuple[bool, bytes]:
    """Whether the server closed ``s`` within ``limit`` seconds, and what it sent first."""
    s.settimeout(limit)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except TimeoutError:
        return False, data
    except ConnectionResetError:
        pass
    return True, data


def test_a_request_not_complete_in_time_is_answered_408_and_closed(serve: Callable[..., Served]) -> None:
    served = serve(request_sec=1.0)
    partial = [
        b"G",  # one byte of a request line
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n",  # headers never finished
    ]
    for request in partial:
        with socket.create_connection(("127.0.0.1", served.port), timeout=5) as s:
            s.sendall(request)
            closed, data = closed_within(s, 5.0)
            assert closed, request
            assert data.startswith(b"HTTP/1.1 408 "), (request, data)
    # a request sent whole is not hurried: the connection then waits for the next as before
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert answer(s)[0] == 200
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert answer(s)[0] == 200


def test_past_the_connection_cap_a_probe_still_gets_in_and_a_flood_is_closed(serve: Callable[..., Served]) -> None:
    from agent.http.server import OVERFLOW

    served = serve(max_connections=16, request_sec=30.0)
    held = []
    for _ in range(16):  # every slot held by a client that sent one byte
        s = socket.create_connection(("127.0.0.1", served.port), timeout=5)
        s.sendall(b"G")
        held.append(s)
    try:
        # the server has them all: a probe's connection is one past the cap, and is served once
        status, _, _ = exchange(served.port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n", timeout=5)
        assert status == 200
        flood = []
        for _ in range(OVERFLOW + 20):
            s = socket.create_connection(("127.0.0.1", served.port), timeout=5)
            s.sendall(b"G")
            flood.append(s)
        outcomes = [closed_within(s, 5.0) for s in flood]
        assert all(closed for closed, _ in outcomes)  # the overflow ones within OVERFLOW_SEC, the rest at once
        assert not any(data for _, data in outcomes[OVERFLOW:])  # past the overflow: closed unanswered
        for s in flood:
            s.close()
        status, _, _ = exchange(served.port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n", timeout=5)
        assert status == 200  # the flood gone, probes get in again though the 16 are still held
        assert served.events("http_connections_capped")
        assert all(not closed_within(s, 0.1)[0] for s in held)  # the 16 wait for their own timeout
    finally:
        for s in held:
            s.close()


def test_a_body_not_complete_in_time_is_answered_408_and_closed(tmp_path: Path) -> None:
    with running_agent(settings_for(tmp_path, [])) as h:
        keys = ApiKeys(KEY)
        app = create_app(
            keys, AgentState(statuses=h.pool.statuses), CollectorRegistry(), structlog.get_logger(), h.service
        )
        srv = HttpServer("127.0.0.1", 0, app, structlog.get_logger(), request_sec=1.0)
        srv.start()
        try:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
                s.sendall(
                    f"POST /v2/uac_connections HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 40\r\n\r\n{".encode()
                )
                closed, data = closed_within(s, 5.0)
            assert closed
            assert data.startswith(b"HTTP/1.1 408 "), data
            assert h.service.visible(None) == []  # nothing half-read was acted on
        finally:
            srv.stop()
