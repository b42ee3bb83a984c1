"""Config files: every format, env overrides, and clear errors (exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.config import AgentSettings, ConfigError, load_settings

GOOD = {
    "sip": {"bind": "127.0.0.1", "port": 5070},
    "http": {"listen": "127.0.0.1:8080", "api_key": "k3y-secret-0123456"},
    "connections": [
        {
            "connection_id": "2954035328656082602",
            "user_id": "323",
            "connection_name": "Office PBX",
            "active": True,
            "external_uac_settings": {
                "proxy": "sip:pbx.example.com:5060",
                "outbound_proxy": "sip:edge.example.com:5060",
                "transport": "TCP",
                "username": "telnyx-reg",
                "auth_username": "telnyx-reg",
                "password": "s3cret-pw",
                "from_user": "601",
                "expiration_sec": 3600,
            },
            "internal_uac_settings": {"destination_uri": "1006@assistant-abc123.sip.telnyx.com"},
        }
    ],
}


def write(tmp_path: Path, data: object, name: str = "c.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def bad(tmp_path: Path, mutate: dict[str, object]) -> list[str]:
    data = json.loads(json.dumps(GOOD))
    ext = data["connections"][0]["external_uac_settings"]
    ext.update(mutate)
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, data))
    return e.value.problems


def test_seed_payload_loads_in_every_format(tmp_path: Path) -> None:
    import tomllib  # noqa: F401  (toml is read by tomllib)

    import yaml

    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump(GOOD))
    j = write(tmp_path, GOOD)
    t = tmp_path / "c.toml"
    t.write_text(
        """
[sip]
bind = "127.0.0.1"
[http]
listen = "127.0.0.1:8080"
api_key = "k3y-secret-0123456"
[[connections]]
connection_id = "2954035328656082602"
user_id = "323"
[connections.external_uac_settings]
proxy = "sip:pbx.example.com:5060"
transport = "TCP"
username = "telnyx-reg"
password = "s3cret-pw"
[connections.internal_uac_settings]
destination_uri = "1006@assistant-abc123.sip.telnyx.com"
"""
    )
    for path in (y, j, t):
        s = load_settings(path)
        c = s.connections[0]
        assert c.connection_id == "2954035328656082602"
        assert c.external_uac_settings is not None
        assert c.external_uac_settings.transport == "TCP"
        assert c.pair_state == "ACTIVE"


def test_defaults_fill_optional_fields(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, GOOD))
    ext = s.connections[0].external_uac_settings
    assert ext is not None
    ext.auth_username = None
    ext.from_user = None
    assert ext.effective_auth_username == "telnyx-reg"
    assert ext.effective_from_user == "telnyx-reg"
    ps = s.policy_settings(s.connections[0])
    assert ps.forbidden_retry_interval_sec == 300.0
    assert ps.retry_base_sec == 30.0
    assert ps.expiration_sec == 3600


def test_per_connection_knobs_override_defaults(tmp_path: Path) -> None:
    data = json.loads(json.dumps(GOOD))
    data["defaults"] = {"retry_base_sec": 5, "forbidden_retry_interval": 60}
    data["connections"][0]["registration"] = {"forbidden_retry_interval": 90}
    s = load_settings(write(tmp_path, data))
    ps = s.policy_settings(s.connections[0])
    assert ps.retry_base_sec == 5.0
    assert ps.forbidden_retry_interval_sec == 90.0


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UAC_AGENT_HTTP__API_KEY", "from-env-0123456789")
    monkeypatch.setenv("UAC_AGENT_SIP__PORT", "5999")
    s = load_settings(write(tmp_path, GOOD))
    assert s.http.api_key is not None
    assert s.http.api_key.get_secret_value() == "from-env-0123456789"
    assert s.sip.port == 5999
    assert s.http.listen == "127.0.0.1:8080"  # the rest of the section is kept


def test_password_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    data = json.loads(json.dumps(GOOD))
    ext = data["connections"][0]["external_uac_settings"]
    del ext["password"]
    ext["password_file"] = str(pw)
    s = load_settings(write(tmp_path, data))
    e = s.connections[0].external_uac_settings
    assert e is not None
    assert e.password is not None
    assert e.password.get_secret_value() == "from-file"


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        ({"transport": "SCTP"}, "external_uac_settings.transport", "'UDP', 'TCP' or 'TLS'"),
        ({"proxy": "http://pbx"}, "external_uac_settings.proxy", "SIP URI"),
        ({"expiration_sec": 5}, "external_uac_settings.expiration_sec", "greater than or equal to 10"),
        ({"expiration_sec": "soon"}, "external_uac_settings.expiration_sec", "integer"),
        ({"username": "a b"}, "external_uac_settings.username", "SIP user part"),
        ({"passwrd": "x"}, "external_uac_settings.passwrd", "unknown setting"),
    ],
)
def test_bad_field_is_named(tmp_path: Path, mutate: dict[str, object], field: str, words: str) -> None:
    problems = bad(tmp_path, mutate)
    assert len(problems) == 1, problems
    assert field in problems[0]
    assert "connection_id=2954035328656082602" in problems[0]
    assert words in problems[0]


def test_missing_password_is_named_and_secret_never_echoed(tmp_path: Path) -> None:
    problems = bad(tmp_path, {"password": None})
    assert any("password" in p and "required" in p for p in problems)
    problems = bad(tmp_path, {"password": 12345})
    assert not any("12345" in p for p in problems)


def test_connections_up_to_the_host_limit_are_valid(tmp_path: Path) -> None:
    data = json.loads(json.dumps(GOOD))
    base = data["connections"][0]
    data["connections"] = [dict(base, connection_id=f"c{i}") for i in range(21)]  # three workers' worth
    s = load_settings(write(tmp_path, data))
    assert len(s.connections) == 21
    assert s.workers.max_connections == 1000 and s.workers.connections_per_worker == 7
    assert s.max_workers == 143
    data["workers"] = {"max_connections": 20}
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, data))
    assert e.value.problems == [
        "connections: 21 active connections configured, but this agent holds at most 20 (workers.max_connections)"
    ]


def test_worker_ports_are_loopback_ports_after_the_edges_own(tmp_path: Path) -> None:
    data = json.loads(json.dumps(GOOD))
    data["workers"] = {"max_workers": 10, "connections_per_worker": 3}
    s = load_settings(write(tmp_path, data))
    assert s.workers.max_connections == 30  # what 10 workers of 3 hold, when not set
    first = s.edge.loopback_port
    assert [s.worker_sip_port(k) for k in (0, 9)] == [first + 10, first + 19]  # after the edge's own 10
    assert s.tls_target_ports == (first + 20, 256)  # then one per TLS target


@pytest.mark.parametrize(
    ("sip", "edge", "expected"),
    [
        (
            {"port": 5070, "tls_port": 5070, "tls_cert_file": "{cert}", "tls_key_file": "{key}"},
            {},
            "sip.tls_port: 5070 is sip.port already: choose another port for TLS",
        ),
        (
            {},
            {"loopback_port": 65000, "tls_targets": 1000},
            "edge.loopback_port: the loopback ports 65000-66152 (the edge's 10, 143 workers (workers.max_workers), "
            "1000 TLS targets (edge.tls_targets)) pass 65535: lower edge.loopback_port",
        ),
        (
            {"port": 25100},
            {},
            "sip.port: 25100 is one of the edge's loopback ports 25060-25468: move edge.loopback_port",
        ),
        (
            {"rtp_port": 25000, "rtp_port_range": 200},
            {},
            "sip.rtp_port: RTP ports 25000-25199 overlap the edge's loopback ports 25060-25468",
        ),
        (
            {"rtp_port": 5000, "rtp_port_range": 200},
            {},
            "sip.rtp_port: RTP ports 5000-5199 include sip.port 5070",
        ),
    ],
)
def test_port_ranges_that_do_not_fit_are_refused_with_one_line(
    tmp_path: Path, sip: dict[str, Any], edge: dict[str, Any], expected: str
) -> None:
    data = json.loads(json.dumps(GOOD))
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    data["sip"].update({k: str(v).format(cert=cert, key=key) if isinstance(v, str) else v for k, v in sip.items()})
    data["edge"] = edge
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, data))
    assert e.value.problems == [expected]


def test_workers_that_cannot_hold_max_connections_are_refused(tmp_path: Path) -> None:
    for workers, expected in (
        (
            {"max_workers": 10, "max_connections": 100},
            "workers: max_workers (10) x connections_per_worker (7) cannot hold max_connections (100): raise "
            "max_workers or leave it unset",
        ),
        (
            {"connections_per_worker": 8},
            "workers.connections_per_worker: Input should be less than or equal to 7 (got 8)",
        ),
    ):
        data = json.loads(json.dumps(GOOD))
        data["workers"] = workers
        with pytest.raises(ConfigError) as e:
            load_settings(write(tmp_path, data))
        assert e.value.problems == [expected]


def test_duplicate_connection_id(tmp_path: Path) -> None:
    data = json.loads(json.dumps(GOOD))
    data["connections"] = [data["connections"][0], data["connections"][0]]
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, data))
    assert "more than one connection" in str(e.value)


def test_tls_needs_a_ca_file(tmp_path: Path) -> None:
    problems = bad(tmp_path, {"transport": "TLS"})
    assert any("tls_ca_file" in p for p in problems)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("sip:\n  port: [5070\nhttp: {}\n")
    with pytest.raises(ConfigError) as e:
        load_settings(p)
    assert "line" in str(e.value)
    assert "invalid YAML" in str(e.value)


def test_check_config_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(write(tmp_path, GOOD))]) == 0
    assert "config OK" in capsys.readouterr().out
    data = json.loads(json.dumps(GOOD))
    data["connections"][0]["external_uac_settings"]["transport"] = "XYZ"
    data["sip"]["port"] = 70000
    assert main(["check-config", "--config", str(write(tmp_path, data))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2  # one line per problem
    assert all(line.startswith("uac-agent: config error: ") for line in err)


def test_bad_config_exits_2_without_traceback_and_without_secrets(tmp_path: Path) -> None:
    data = json.loads(json.dumps(GOOD))
    data["connections"][0]["external_uac_settings"]["transport"] = "XYZ"
    data["http"]["bogus"] = 1
    res = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(write(tmp_path, data))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "http.bogus" in res.stderr
    assert "transport" in res.stderr
    assert "s3cret-pw" not in res.stderr + res.stdout
    assert "k3y-secret-0123456" not in res.stderr + res.stdout


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_misspelt_environment_variable_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UAC_AGENT_HTTP__API_KYE", "x")
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, GOOD))
    assert e.value.problems == ["environment variable UAC_AGENT_HTTP__API_KYE: unknown setting"]
    assert "x" not in str(e.value).split(":")[-1]


def _internal(tmp_path: Path, internal: dict[str, object]) -> AgentSettings | list[str]:
    data = json.loads(json.dumps(GOOD))
    data["connections"][0]["internal_uac_settings"].update(internal)
    try:
        return load_settings(write(tmp_path, data))
    except ConfigError as e:
        return e.problems


def test_forwarding_settings(tmp_path: Path) -> None:
    s = _internal(tmp_path, {"forward_mode": "Redirect", "allowed_sources": "192.0.2.0/24, 2001:db8::1"})
    assert isinstance(s, AgentSettings)
    internal = s.connections[0].internal_uac_settings
    assert internal.forward_mode == "redirect"
    assert [str(n) for n in internal.allowed_sources] == ["192.0.2.0/24", "2001:db8::1/128"]
    assert internal.ring_timeout_sec == 60 and internal.max_calls is None
    assert internal.destination_sip_uri is not None and internal.destination_sip_uri.startswith("sip:")
    assert s.sip.max_calls == 1000  # the whole agent's calls at once (the edge carries them)


@pytest.mark.parametrize(
    ("internal", "field"),
    [
        ({"forward_mode": "proxy"}, "forward_mode"),
        ({"allowed_sources": ["10.0.0.0/33"]}, "allowed_sources"),
        ({"ring_timeout_sec": 0}, "ring_timeout_sec"),
        ({"max_calls": 0}, "max_calls"),
        ({"max_calls": 100_001}, "max_calls"),
        ({"destination_uri": "not a uri"}, "destination_uri"),
    ],
)
def test_bad_forwarding_settings_name_the_field(tmp_path: Path, internal: dict[str, object], field: str) -> None:
    problems = _internal(tmp_path, internal)
    assert isinstance(problems, list) and any(field in p for p in problems), problems


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("UAC_AGENT_CONNECTIONS", '[{"connection_id": "a", "password": "pw-in-json-0"'),
        ("UAC_AGENT_HTTP__API_KEYS", "{user_id: pw-in-json-0}"),
    ],
)
def test_malformed_json_in_an_environment_variable_exits_2_naming_it(tmp_path: Path, name: str, value: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(write(tmp_path, GOOD))],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, name: value},
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1  # one line, naming the variable
    assert lines[0].startswith(f"uac-agent: config error: {name}: not valid JSON (")
    assert "line 1 column" in lines[0]
    assert "pw-in-json-0" not in res.stderr + res.stdout


def test_a_runtime_dir_too_long_for_the_edge_sockets_is_refused_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = json.loads(json.dumps(GOOD))
    data["edge"] = {"runtime_dir": "/run/" + "x" * 90}
    assert main(["check-config", "--config", str(write(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    assert "edge.runtime_dir" in err and "UNIX socket path" in err, err
    data["edge"] = {"runtime_dir": "/run/uac-agent/edge"}
    assert main(["check-config", "--config", str(write(tmp_path, data))]) == 0


@pytest.mark.parametrize("section", ["operator", "user"])
def test_every_bearer_key_is_at_least_16_characters(tmp_path: Path, section: str) -> None:
    """The operator's key (http.api_key) has the user keys' minimum length; a shorter one is a
    config error naming the field, exit 2, the key never echoed."""
    data = json.loads(json.dumps(GOOD))
    if section == "operator":
        data["http"]["api_key"] = "short-key-15chr"
    else:
        data["http"]["api_keys"] = [{"user_id": "323", "api_key": "short-key-15chr"}]
    res = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "--config", str(write(tmp_path, data))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert "api_key" in res.stderr and "at least 16 characters" in res.stderr, res.stderr
    assert "short-key-15chr" not in res.stderr + res.stdout  # 15 characters
