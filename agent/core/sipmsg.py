"""Small, forgiving readers for SIP message text, and redaction of secrets.

These never raise on malformed input: a bad message yields ``None``.
"""

from __future__ import annotations

import re

__all__ = ["EDGE_HEADER", "edge_failure", "header_values", "int_header", "redact", "uri_host_port"]

_COMPACT = {"expires": None, "retry-after": None, "min-expires": None, "call-id": "i", "contact": "m"}
_AUTH_LINE = re.compile(
    r"^((?:Proxy-)?Authorization|WWW-Authenticate-Info|Authentication-Info)\s*:.*$",
    re.IGNORECASE | re.MULTILINE,
)
_DIGEST_SECRETS = re.compile(r'\b(response|cnonce|password|secret)\s*=\s*("[^"]*"|[^,\s]+)', re.IGNORECASE)


def header_values(message: str, name: str) -> list[str]:
    """Values of every header ``name`` (or its compact form) in the head of ``message``."""
    wanted = {name.lower()}
    compact = _COMPACT.get(name.lower())
    if compact:
        wanted.add(compact)
    head = message.split("\r\n\r\n", 1)[0].split("\n\n", 1)[0]
    values: list[str] = []
    for line in head.splitlines()[1:]:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in wanted:
            values.append(value.strip())
    return values


def int_header(message: str, name: str) -> int | None:
    """Leading integer of the first ``name`` header (e.g. ``Retry-After: 120 (x)``)."""
    for value in header_values(message, name):
        m = re.match(r"\d{1,9}", value)
        if m:
            return int(m.group())
    return None


# The edge marks the answers it gives a worker on the PBX's behalf (no answer, no connection):
# they are the edge's failures, not the PBX's (agent/edge/routes.cfg, route FROM_WORKER).
EDGE_HEADER = "X-UAC-Edge"


def edge_failure(message: str) -> str | None:
    """Why the edge answered a worker's request itself (None: the answer is the PBX's)."""
    values = header_values(message, EDGE_HEADER)
    return values[0] if values else None


_HOST_PORT = re.compile(r"^sips?:(?:[^@;>]*@)?(\[[0-9A-Fa-f:.]+\]|[^:;>?]+)(?::(\d{1,5}))?")


def uri_host_port(uri: str) -> tuple[str, int | None]:
    """(host, port or None) of a SIP URI; ("", None) when it is not one."""
    m = _HOST_PORT.match(uri.strip().strip("<>"))
    if not m:
        return "", None
    return m.group(1).strip("[]"), int(m.group(2)) if m.group(2) else None


def redact(text: str) -> str:
    """Hide Authorization header values and digest secrets in any text."""
    text = _AUTH_LINE.sub(lambda m: f"{m.group(1)}: <redacted>", text)
    return _DIGEST_SECRETS.sub(lambda m: f"{m.group(1)}=<redacted>", text)
