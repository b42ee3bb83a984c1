"""The monitoring assets: Prometheus alert rules (and their promtool unit tests), the example
scrape config, the Grafana dashboard and the runbook they link to.

Checked with Debian's promtool, and against the metric names the agent really exports (built
from ``agent.metrics``, not from a list kept here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, ProcessCollector

from agent.metrics import Metrics, WorkerProcessCollector

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
ALERTS = PROM / "alerts.yml"
ALERTS_TEST = PROM / "alerts.test.yml"
SCRAPE = PROM / "scrape.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "uac-agent.json"
RUNBOOK = ROOT / "docs" / "runbook.md"

IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
# Grafana's variables, replaced by values a query accepts before promtool parses it.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$job": "uac-agent", "$instance": ".*"}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: install Debian's prometheus package (apt-get install prometheus), "
            "which provides /usr/bin/promtool"
        )
    return path


def _run_promtool(*args: str | Path) -> None:
    proc = subprocess.run(
        [_promtool(), *map(str, args)], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )
    assert proc.returncode == 0, (
        f"promtool {' '.join(map(str, args))} exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    alerts = [rule for rule in rules if "alert" in rule]
    assert alerts, "alerts.yml holds no alert"
    return alerts


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside strings that name the agent's series."""
    bare = STRING.sub('""', expr)
    return {name for name in IDENT.findall(bare) if name.startswith(("uac_agent_", "process_")) or name == "up"}


def _exported_names() -> set[str]:
    """Every series name the agent's /metrics can carry, read from the real collectors."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, "test")
    ProcessCollector(registry=registry)
    registry.register(WorkerProcessCollector(lambda: [(0, os.getpid())]))
    # A series in every labelled family, so the sample names below cover them all too.
    metrics.observe_response("c1", 200, 0.05)
    metrics.place("c1", 0)
    metrics.flows_lost.labels(transport="TCP").inc()
    metrics.calls.labels(connection_id="c1", result="answered").inc()
    metrics.call_setup.labels(connection_id="c1").observe(0.3)
    metrics.inbound_rejected.labels(connection_id="", reason="over_limit").inc()
    metrics.worker_up.labels(worker="0").set(1)
    metrics.worker_restarts.labels(worker="0").inc()
    metrics.worker_connections.labels(worker="0").set(1)
    metrics.worker_heartbeat.observe(0.001)
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": (),
    }
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def _github_anchor(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _runbook_anchors() -> set[str]:
    anchors: set[str] = set()
    in_code = False
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)):
            anchors.add(_github_anchor(m.group(1)))
    return anchors


# --- promtool --------------------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    _run_promtool("check", "rules", ALERTS.relative_to(ROOT))


def test_alert_rules_pass_their_unit_tests() -> None:
    _run_promtool("test", "rules", ALERTS_TEST.relative_to(ROOT))


def test_scrape_config_passes_promtool_check() -> None:
    _run_promtool("check", "config", SCRAPE.relative_to(ROOT))


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each dashboard query, with Grafana's variables filled in, as a recording rule promtool parses."""
    rules = []
    for i, expr in enumerate(_dashboard_exprs(_dashboard())):
        if expr.startswith("label_values("):
            continue  # Grafana's own function, not PromQL
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        expr = re.sub(r"\$[a-zA-Z_]+", ".*", expr)  # multi-value variables as regexes
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run_promtool("check", "rules", path)


# --- alert rules -----------------------------------------------------------------------------------------


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    anchors = _runbook_anchors()
    for rule in _alert_rules():
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{name}: no summary"
        assert annotations.get("description"), f"{name}: no description"
        url = annotations.get("runbook_url", "")
        assert url.startswith("docs/runbook.md#"), f"{name}: runbook_url {url!r} is not docs/runbook.md#<anchor>"
        anchor = url.partition("#")[2]
        assert anchor in anchors, f"{name}: docs/runbook.md has no heading with anchor #{anchor}"


def test_every_alert_is_unit_tested_firing() -> None:
    doc = yaml.safe_load(ALERTS_TEST.read_text())
    firing = {
        case["alertname"] for test in doc["tests"] for case in test.get("alert_rule_test", []) if case.get("exp_alerts")
    }
    missing = {rule["alert"] for rule in _alert_rules()} - firing
    assert not missing, f"alerts without a firing case in alerts.test.yml: {sorted(missing)}"


def test_alert_names_are_unique() -> None:
    names = [rule["alert"] for rule in _alert_rules()]
    assert len(names) == len(set(names))


# --- metric names ----------------------------------------------------------------------------------------


def test_exported_names_are_read_from_the_agent() -> None:
    exported = _exported_names()
    for name in (
        "uac_agent_registered",
        "uac_agent_registration_attempts_total",
        "uac_agent_registration_duration_seconds_bucket",
        "uac_agent_worker_pss_bytes",
        "uac_agent_worker_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert name in exported
    assert "uac_agent_registration_attempts" in exported  # the family name itself is never a series
    assert _metric_names('rate(uac_agent_calls_total{reason="process_x", connection_id=~"$c"}[5m])') == {
        "uac_agent_calls_total"
    }


def test_alerts_use_only_exported_metrics() -> None:
    exported = _exported_names() | {"up"}
    for rule in _alert_rules():
        used = _metric_names(rule["expr"])
        assert used, f"{rule['alert']}: no metric found in {rule['expr']!r}"
        unknown = used - exported
        assert not unknown, f"{rule['alert']}: the agent exports no {sorted(unknown)}"
        # annotations name metrics in their text and in template queries (inside Go strings)
        for key, text in rule.get("annotations", {}).items():
            named = {n for n in IDENT.findall(text) if n.startswith(("uac_agent_", "process_"))}
            unknown = named - exported
            assert not unknown, f"{rule['alert']}: annotation {key} names {sorted(unknown)}, not exported"


def test_dashboard_uses_only_exported_metrics() -> None:
    exported = _exported_names() | {"up"}
    used: set[str] = set()
    for expr in _dashboard_exprs(_dashboard()):
        unknown = _metric_names(expr) - exported
        assert not unknown, f"the agent exports no {sorted(unknown)} (query {expr!r})"
        used |= _metric_names(expr)
    for name in (
        "uac_agent_registered",
        "uac_agent_registration_status",
        "uac_agent_registration_attempts_total",
        "uac_agent_registration_duration_seconds_bucket",
        "uac_agent_calls_total",
        "uac_agent_calls_active",
        "uac_agent_call_setup_seconds_bucket",
        "uac_agent_workers",
        "uac_agent_worker_up",
        "uac_agent_worker_restarts_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "uac_agent_worker_cpu_seconds_total",
        "uac_agent_worker_pss_bytes",
        "uac_agent_inbound_rejected_total",
    ):
        assert name in used, f"the dashboard shows no {name}"


# --- dashboard -------------------------------------------------------------------------------------------


def test_dashboard_panels_have_queries() -> None:
    dashboard = _dashboard()
    panels = [p for p in _panels(dashboard) if p.get("type") != "row"]
    assert panels
    for panel in panels:
        exprs = [t.get("expr", "") for t in panel.get("targets", [])]
        assert any(e.strip() for e in exprs), f"panel {panel.get('title')!r} has no target with an expr"
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_dashboard_variables() -> None:
    dashboard = _dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    connection = variables["connection_id"]
    assert connection["type"] == "query"
    assert re.fullmatch(r"label_values\(uac_agent_registered(\{.*\})?, connection_id\)", connection["definition"])
    for panel in _panels(dashboard):
        if panel.get("type") != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
