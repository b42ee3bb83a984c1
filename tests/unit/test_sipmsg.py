"""Reading headers from SIP text, and redacting secrets from it."""

from __future__ import annotations

from agent.core.sipmsg import header_values, int_header, redact

RESPONSE = (
    "SIP/2.0 503 Service Unavailable\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n"
    "i: abc@host\r\n"
    "Retry-After: 120 (maintenance);duration=60\r\n"
    "Min-Expires: 3600\r\n"
    "\r\n"
    "Retry-After: 9\r\n"
)

REQUEST = (
    "REGISTER sip:pbx.example.com SIP/2.0\r\n"
    'Authorization: Digest username="alice", realm="pbx", nonce="n", uri="sip:pbx", '
    'response="0123456789abcdef0123456789abcdef", cnonce="c0ffee"\r\n'
    'Proxy-Authorization: Digest username="alice", response="feedface"\r\n'
    "Contact: <sip:alice@127.0.0.1:5070;line=c1>\r\n\r\n"
)


def test_int_header_reads_leading_number_in_head_only() -> None:
    assert int_header(RESPONSE, "Retry-After") == 120
    assert int_header(RESPONSE, "Min-Expires") == 3600
    assert int_header(RESPONSE, "Expires") is None


def test_compact_form() -> None:
    assert header_values(RESPONSE, "Call-ID") == ["abc@host"]


def test_malformed_input_never_raises() -> None:
    for text in ("", "garbage", "SIP/2.0 200\r\nRetry-After: soon\r\n", "\x00\xff:::", ":\n:\n"):
        assert int_header(text, "Retry-After") is None


def test_redact_hides_authorization_values() -> None:
    out = redact(REQUEST)
    assert "0123456789abcdef" not in out
    assert "feedface" not in out
    assert "c0ffee" not in out
    assert "Authorization: <redacted>" in out
    assert "Proxy-Authorization: <redacted>" in out
    assert "Contact: <sip:alice@127.0.0.1:5070;line=c1>" in out
