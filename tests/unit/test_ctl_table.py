"""``uac-agent status``: the table drawn from the status document (agent/ctl.py)."""

from __future__ import annotations

from typing import Any

from agent.ctl import render_table, rows


def _conn(cid: str, calls: int, registered: bool = True) -> dict[str, Any]:
    return {
        "connection_id": cid,
        "connection_name": f"PBX {cid}",
        "pair_state": "ACTIVE",
        "registered": registered,
        "last_registration_response": "200 OK",
        "third-party_uac_settings": {"proxy": "sip:pbx.example.com"},
        "sip_registration_details": {"worker": 0, "state": "REGISTERED", "calls_active": calls},
    }


def test_each_connection_shows_its_active_calls() -> None:
    status = {"version": "0.1.0", "pid": 1, "summary": "2/2 registered", "connections": [_conn("a", 37), _conn("b", 0)]}
    table = rows(status, now=0.0)
    assert [(r["ID"], r["CALLS"], r["REGISTERED"]) for r in table] == [("a", "37", "yes"), ("b", "0", "yes")]
    text = render_table(status, now=0.0)
    header = text.splitlines()[1].split()
    assert "CALLS" in header
    assert text.splitlines()[2].split()[header.index("CALLS") + 1] == "37"  # "NAME" is two words: "PBX a"
