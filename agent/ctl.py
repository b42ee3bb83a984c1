"""The commands that talk to a running agent: ``status``, ``reload``, ``register``, ``unregister``.

Rules
-----
* The agent is found, and the operator key read, from the same config file and
  environment as ``run`` (``ClientSettings``: only the ``http`` section); a
  wildcard ``http.listen`` is reached on loopback. ``--url`` overrides the address.
* Exit codes, the same for every command: 0 it is as asked (every registering
  connection registered; the reload applied; the action done), 1 it is not (a
  connection not registered; the file refused; the action refused or failed),
  2 the agent cannot be asked (not running, unreachable, wrong key, bad config).
* The key goes in the Authorization header only, straight to the agent's address: never
  through an ``http_proxy`` and never on to a redirect's host; nothing here prints it.
* No pjsua2, no agent internals: only the HTTP API, as any other client.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TextIO

from agent.config import ClientSettings

__all__ = ["AgentUnreachableError", "Client", "render_table", "run_action", "run_reload", "run_status"]

OK, NOT_OK, UNREACHABLE = 0, 1, 2


class AgentUnreachableError(Exception):
    """The agent cannot be asked: not listening, timed out, or it refused the key."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as it came (the agent never redirects; the key must not follow)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Client:
    def __init__(self, base_url: str, api_key: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self.timeout = timeout
        # no proxy from the environment, no redirects: the key goes to the agent only
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    @classmethod
    def from_settings(cls, settings: ClientSettings, url: str | None = None, timeout: float = 10.0) -> Client:
        assert settings.http.api_key is not None  # required by HttpSettings
        return cls(url or settings.base_url, settings.http.api_key.get_secret_value(), timeout)

    def call(self, method: str, path: str, timeout: float | None = None) -> tuple[int, Any]:
        """(status, decoded JSON body); raise AgentUnreachableError when there is no answer or the key is refused."""
        req = urllib.request.Request(  # noqa: S310 - the URL is http(s) from the config or --url
            self.base_url + path,
            method=method,
            headers={"Authorization": f"Bearer {self._key}", "Accept": "application/json"},
            data=b"" if method == "POST" else None,
        )
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                code, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            code, raw = e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise AgentUnreachableError(f"no agent answers at {self.base_url}: {reason}") from None
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            raise AgentUnreachableError(f"{self.base_url}{path} did not answer JSON (is it the agent?)") from None
        if code == 401:
            raise AgentUnreachableError(f"the agent at {self.base_url} refused the key: {error_text(body)}")
        return code, body


def error_text(body: Any) -> str:
    """The ``detail`` of each error in the API's ``{"errors": [...]}`` shape."""
    if isinstance(body, Mapping) and isinstance(body.get("errors"), list):
        return "; ".join(str(e.get("detail") or e.get("title")) for e in body["errors"] if isinstance(e, Mapping))
    return json.dumps(body)


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def rows(status: Mapping[str, Any], now: float) -> list[dict[str, str]]:
    """One row per connection, the table's columns as text."""
    out = []
    for c in status.get("connections", []):
        d = c.get("sip_registration_details") or {}
        expires_at = _parse_time(d.get("binding_expires_at"))
        next_at = _parse_time(d.get("next_action_at"))
        action = d.get("next_action")
        active = c.get("pair_state") == "ACTIVE" and c.get("third-party_uac_settings") is not None
        out.append(
            {
                "ID": str(c.get("connection_id")),
                "NAME": str(c.get("connection_name") or ""),
                "WORKER": "-" if d.get("worker") is None else str(d["worker"]),
                "STATE": str(d.get("state") or ""),
                "REGISTERED": ("yes" if c.get("registered") else "no") if active else "-",
                "CALLS": str(d.get("calls_active") or 0),
                "LAST RESPONSE": str(c.get("last_registration_response") or "-"),
                "EXPIRES IN": _duration(None if expires_at is None else expires_at - now),
                "NEXT ACTION": f"{action} in {_duration(next_at - now)}" if action and next_at else (action or "-"),
            }
        )
    return out


def render_table(status: Mapping[str, Any], now: float | None = None) -> str:
    table = rows(status, time.time() if now is None else now)
    head = (
        f"uac-agent {status.get('version', '?')} (pid {status.get('pid', '?')}): {status.get('summary', '')}, "
        f"{status.get('workers', '?')} worker(s), health {status.get('health', '?')}"
    )
    if not table:
        return head + "\nno connections\n"
    cols = list(table[0])
    width = {c: max(len(c), *(len(r[c]) for r in table)) for c in cols}
    width["LAST RESPONSE"] = min(width["LAST RESPONSE"], 40)
    lines = [head, "  ".join(c.ljust(width[c]) for c in cols).rstrip()]
    for r in table:
        cells = [(r[c] if len(r[c]) <= width[c] else r[c][: width[c] - 1] + "…").ljust(width[c]) for c in cols]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def all_registered(status: Mapping[str, Any]) -> bool:
    """Every active connection that registers is registered."""
    return all(
        c.get("registered")
        for c in status.get("connections", [])
        if c.get("pair_state") == "ACTIVE" and c.get("third-party_uac_settings") is not None
    )


def _ask(client: Client, method: str, path: str, err: TextIO, timeout: float | None = None) -> tuple[int, Any] | None:
    """The agent's answer; None (and the reason on ``err``) when it cannot be asked."""
    try:
        return client.call(method, path, timeout=timeout)
    except AgentUnreachableError as e:
        print(f"uac-agent: {e}", file=err)
        return None


def run_status(client: Client, out: TextIO, err: TextIO, as_json: bool = False) -> int:
    answer = _ask(client, "GET", "/admin/status", err)
    if answer is None:
        return UNREACHABLE
    code, body = answer
    if code != 200 or not isinstance(body, Mapping):
        print(f"uac-agent: status failed ({code}): {error_text(body)}", file=err)
        return UNREACHABLE
    out.write(json.dumps(body, indent=2) + "\n" if as_json else render_table(body))
    return OK if all_registered(body) else NOT_OK


def run_reload(client: Client, out: TextIO, err: TextIO) -> int:
    answer = _ask(client, "POST", "/admin/reload", err, timeout=max(client.timeout, 130.0))
    if answer is None:
        return UNREACHABLE
    code, body = answer
    if code != 200 or not isinstance(body, Mapping):
        print(f"uac-agent: reload refused: {error_text(body)}", file=err)
        return NOT_OK
    lists = {k: body.get(k) for k in ("added", "removed", "changed")}
    parts = [f"{k} {', '.join(v) or '-'}" for k, v in lists.items() if isinstance(v, list)]
    print(f"reload applied: {'; '.join(parts)}", file=out)
    if body.get("needs_restart"):
        print(f"uac-agent: not applied until a restart: {', '.join(body['needs_restart'])}", file=err)
    if body.get("failed"):
        print(f"uac-agent: reload applied, but these failed: {'; '.join(body['failed'])}", file=err)
        return NOT_OK
    return OK


def _connection(client: Client, cid: str) -> Mapping[str, Any] | None:
    code, body = client.call("GET", "/admin/status")
    if code != 200 or not isinstance(body, Mapping):
        raise AgentUnreachableError(f"status failed ({code}): {error_text(body)}")
    return next((c for c in body.get("connections", []) if c.get("connection_id") == cid), None)


def run_action(client: Client, cid: str, register: bool, out: TextIO, err: TextIO, wait: float = 15.0) -> int:
    """POST the action; for ``register``, wait up to ``wait`` seconds for the registrar's answer."""
    name = "register" if register else "unregister"
    try:
        before = _connection(client, cid)
        attempts = (before or {}).get("sip_registration_details", {}).get("attempts", 0)
        code, body = client.call("POST", f"/v2/uac_connections/{cid}/actions/{name}", timeout=max(client.timeout, 30))
        if code >= 300:
            print(f"uac-agent: {name} {cid} refused ({code}): {error_text(body)}", file=err)
            return NOT_OK
        if not register:
            print(f"{cid}: unregistered", file=out)
            return OK
        deadline = time.monotonic() + wait
        now = _connection(client, cid)
        while wait > 0 and time.monotonic() < deadline:
            d = (now or {}).get("sip_registration_details", {})
            if d.get("attempts", 0) > attempts and d.get("state") != "REGISTERING":
                break
            time.sleep(0.2)
            now = _connection(client, cid)
    except AgentUnreachableError as e:
        print(f"uac-agent: {e}", file=err)
        return UNREACHABLE
    if wait <= 0:
        print(f"{cid}: register requested", file=out)
        return OK
    registered = bool(now and now.get("registered"))
    text = (now or {}).get("last_registration_response") or "no answer yet"
    print(f"{cid}: {'registered' if registered else 'not registered'} ({text})", file=out if registered else err)
    return OK if registered else NOT_OK
