"""Small, forgiving readers for SIP message text, and redaction of secrets.

These never raise on malformed input: a bad message yields ``None``.
"""

from __future__ import annotations

import re

__all__ = ["header_values", "int_header", "redact"]

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


def redact(text: str) -> str:
    """Hide Authorization header values and digest secrets in any text."""
    text = _AUTH_LINE.sub(lambda m: f"{m.group(1)}: <redacted>", text)
    return _DIGEST_SECRETS.sub(lambda m: f"{m.group(1)}=<redacted>", text)
