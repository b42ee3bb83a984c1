"""What a registrar's answer means to the registration policy.

Pure data and functions: no SIP stack, no I/O.

Classes of answer (RFC 3261 §10.2, RFC 5626 §4.5, and what the peers in
``shared/reference/peers.md`` do):

* ``SUCCESS``      2xx: the binding exists for the granted expiry.
* ``TOO_BRIEF``    423: ask again at once with the registrar's Min-Expires.
* ``AUTH_REJECTED`` 401/407 that reach the policy (the stack answers the first
  challenge itself, so these mean the credentials were sent and refused) and
  403: retry only at the slow ``forbidden_retry_interval``.
* ``REJECTED``     every other 4xx (404 unknown user, 400, 420, ...): a
  configuration problem, retried at the same slow interval.
* ``TRANSIENT``    no answer/408, 429, 480, 5xx, 6xx and transport failures
  (code 0): exponential backoff with jitter, Retry-After honoured.
"""

from __future__ import annotations

import enum

__all__ = ["ResponseClass", "classify", "reason_phrase", "response_text"]


class ResponseClass(enum.Enum):
    SUCCESS = "success"
    TOO_BRIEF = "too_brief"
    AUTH_REJECTED = "auth_rejected"
    REJECTED = "rejected"
    TRANSIENT = "transient"


_TRANSIENT_4XX = frozenset({408, 429, 480})
_AUTH = frozenset({401, 403, 407})

# RFC 3261 §21 reason phrases, used when a registrar sends an empty or odd one
# and for the texts shown in status output.
_REASONS: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    410: "Gone",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    421: "Extension Required",
    423: "Interval Too Brief",
    429: "Too Many Requests",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    485: "Ambiguous",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    489: "Bad Event",
    491: "Request Pending",
    493: "Undecipherable",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}


def classify(code: int) -> ResponseClass:
    """Class of a final REGISTER answer; ``code`` 0 means no SIP answer at all."""
    if 200 <= code < 300:
        return ResponseClass.SUCCESS
    if code == 423:
        return ResponseClass.TOO_BRIEF
    if code in _AUTH:
        return ResponseClass.AUTH_REJECTED
    if 400 <= code < 500 and code not in _TRANSIENT_4XX:
        return ResponseClass.REJECTED
    # 0 (transport), 408, 429, 480, 5xx, 6xx, and anything outside the final
    # ranges (a stack oddity) are treated as transient: retrying with backoff
    # is the one answer that can never hammer nor give up.
    return ResponseClass.TRANSIENT


def reason_phrase(code: int) -> str:
    return _REASONS.get(code, "")


def response_text(code: int, reason: str) -> str:
    """``"200 OK"``-style text; the standard phrase when the peer sent none."""
    phrase = reason.strip() or reason_phrase(code)
    return f"{code} {phrase}".strip()
