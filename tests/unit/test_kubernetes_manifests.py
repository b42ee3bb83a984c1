"""The Kubernetes examples (deploy/kubernetes/*.yaml).

No cluster and no container engine here, so this is what checks them: every document
validates against the Kubernetes JSON schemas (kubernetes-validate, strict: an unknown
field fails), and each agent pod agrees with the config its ConfigMap carries. That
config loads with the agent's own loader (the Secret's placeholders standing in for the
mounted files), and the probes, ports, Services, volumes, securityContext, grace period
and resources follow from it.
"""

from __future__ import annotations

import copy
import ipaddress
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agent.config import AgentSettings, load_settings, parse_sip_uri, unknown_env_settings

ROOT = Path(__file__).resolve().parents[2]
MANIFEST_DIR = ROOT / "deploy" / "kubernetes"
MANIFESTS = sorted([*MANIFEST_DIR.glob("*.yaml"), *MANIFEST_DIR.glob("*.yml")])
# The oldest release the examples are meant for (the PBX's preStop `sleep` needs 1.30)
# and the newest the installed kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
AGENT = "uac-agent"
WORKLOAD_KINDS = ("Pod", "Deployment", "StatefulSet")
# BENCHMARKS.md, "Registrations: 1,000 connections on one host": PSS of the supervisor,
# the zygote and one worker of 7 connections, in MiB.
PSS_SUPERVISOR_MIB, PSS_ZYGOTE_MIB, PSS_WORKER_MIB = 86.2, 10.1, 5.9
# ... and the edge's engines at idle (Kamailio, rtpengine, HAProxy, the keeper): docs/kubernetes.md
PSS_EDGE_MIB = 69.0
_PORT_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")  # IANA_SVC_NAME


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _doc_id(path: Path, doc: dict[str, Any]) -> str:
    return f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"


def _workload(docs: list[dict[str, Any]]) -> dict[str, Any] | None:
    found = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    assert len(found) <= 1, "one workload per example"
    return found[0] if found else None


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"] if workload["kind"] == "Pod" else workload["spec"]["template"]["spec"]
    return spec


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    meta = workload["metadata"] if workload["kind"] == "Pod" else workload["spec"]["template"]["metadata"]
    labels: dict[str, str] = meta.get("labels", {})
    return labels


def _named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name} must be defined once in the same file"
    return found[0]


def _walk(node: Any, key: str = "") -> list[tuple[str, Any]]:
    """Every (key, scalar) in a parsed config."""
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _walk(v, str(k))]
    if isinstance(node, list):
        return [kv for v in node for kv in _walk(v, key)]
    return [(key, node)]


def _rewrite(node: Any, prefixes: dict[str, Path]) -> Any:
    """``node`` with string values under a mount path moved to the local copy of that mount."""
    if isinstance(node, dict):
        return {k: _rewrite(v, prefixes) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite(v, prefixes) for v in node]
    if isinstance(node, str):
        for mount, local in prefixes.items():
            if node.startswith(mount + "/"):
                return str(local / node[len(mount) + 1 :])
    return node


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity in base units (cores, bytes) for the suffixes used here."""
    text = str(value)
    for suffix, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("m", 1e-3)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@dataclass
class AgentPod:
    path: Path
    docs: list[dict[str, Any]]
    workload: dict[str, Any]
    spec: dict[str, Any]
    container: dict[str, Any]
    config: dict[str, Any]  # the ConfigMap's config as written (paths not rewritten)
    secrets: dict[str, dict[str, Any]]  # mount path -> Secret
    settings: AgentSettings

    @property
    def volumes(self) -> dict[str, dict[str, Any]]:
        return {v["name"]: v for v in self.spec.get("volumes", [])}

    @property
    def claim_templates(self) -> set[str]:
        return {t["metadata"]["name"] for t in self.workload["spec"].get("volumeClaimTemplates", [])}

    @property
    def mounts(self) -> dict[str, dict[str, Any]]:
        return {m["mountPath"]: m for m in self.container.get("volumeMounts", [])}

    def container_env(self, name: str) -> str:
        (value,) = [e["value"] for e in self.container.get("env", []) if e["name"] == name]
        return str(value)

    @property
    def http_port(self) -> int:
        return self.settings.http.host_port[1]

    def port_number(self, port: str | int) -> int:
        if isinstance(port, int):
            return port
        named = [p["containerPort"] for p in self.container.get("ports", []) if p.get("name") == port]
        assert len(named) == 1, f"no container port named {port!r}"
        return int(named[0])

    def sip_ports(self) -> set[tuple[int, str]]:
        """(port, protocol) of the edge's public SIP listeners, from the loaded settings: UDP and TCP
        on sip.port, and TLS (TCP) on sip.tls_port only when a certificate and key are configured."""
        sip = self.settings.sip
        out = {(sip.port, "UDP"), (sip.port, "TCP")}
        if sip.tls_server:
            out.add((sip.effective_tls_port, "TCP"))
        return out

    @property
    def rtp_range(self) -> tuple[int, int]:
        """First and last UDP port of rtpengine's media range."""
        sip = self.settings.sip
        return sip.rtp_port, sip.rtp_port + sip.rtp_port_range - 1

    @property
    def loopback_range(self) -> tuple[int, int]:
        """First and last of the loopback ports the edge and the workers use (never declared)."""
        first, count = self.settings.tls_target_ports
        return self.settings.edge.loopback_port, first + count - 1

    def runtime_dir(self) -> PurePosixPath:
        """Where agent/edge/layout.py's runtime_dir() puts the edge's files in this container:
        edge.runtime_dir, else $RUNTIME_DIRECTORY/edge, else a new folder in the temporary one."""
        if self.settings.edge.runtime_dir is not None:
            return PurePosixPath(self.settings.edge.runtime_dir)
        env = {e["name"]: e.get("value", "") for e in self.container.get("env", [])}
        if env.get("RUNTIME_DIRECTORY"):
            return PurePosixPath(env["RUNTIME_DIRECTORY"].split(":")[0]) / "edge"
        return PurePosixPath(env.get("TMPDIR") or "/tmp")

    def mount_holding(self, path: PurePosixPath) -> dict[str, Any] | None:
        """The volume mount ``path`` lies in (the deepest one), if any."""
        holding = [m for m in self.mounts.values() if path.is_relative_to(m["mountPath"])]
        return max(holding, key=lambda m: len(PurePosixPath(m["mountPath"]).parts), default=None)


def _agent_files() -> list[Path]:
    return [p for p in MANIFESTS if (w := _workload(_docs(p))) is not None and _has_agent(w)]


def _has_agent(workload: dict[str, Any]) -> bool:
    return any(c["name"] == AGENT for c in _pod_spec(workload)["containers"])


def _load_agent_pod(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AgentPod:
    docs = _docs(path)
    workload = _workload(docs)
    assert workload is not None
    spec = _pod_spec(workload)
    (container,) = [c for c in spec["containers"] if c["name"] == AGENT]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}

    # The config: the ConfigMap mounted at the folder $UAC_AGENT_CONFIG names.
    config_file = PurePosixPath(env["UAC_AGENT_CONFIG"])
    config_mount = mounts.get(str(config_file.parent))
    assert config_mount is not None, f"nothing is mounted at {config_file.parent}"
    config_map = _named(docs, "ConfigMap", volumes[config_mount["name"]]["configMap"]["name"])
    config = yaml.safe_load(config_map["data"][config_file.name])

    # The Secrets: each mounted one written out under tmp_path, its stringData as the files.
    secrets: dict[str, dict[str, Any]] = {}
    local: dict[str, Path] = {}
    for mount_path, mount in mounts.items():
        source = volumes.get(mount["name"], {}).get("secret")
        if source is None:
            continue
        secret = _named(docs, "Secret", source["secretName"])
        folder = tmp_path / f"secret-{len(local)}"
        folder.mkdir()
        for key, value in secret["stringData"].items():
            (folder / key).write_text(value)
        secrets[mount_path], local[mount_path] = secret, folder

    target = tmp_path / "config.yaml"
    target.write_text(yaml.safe_dump(_rewrite(config, local)))
    for name in [n for n in os.environ if n.upper().startswith("UAC_AGENT_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name != "UAC_AGENT_CONFIG":
            monkeypatch.setenv(name, value)
    settings = load_settings(target)  # ConfigError (one line per problem) fails the test
    return AgentPod(path, docs, workload, spec, container, config, secrets, settings)


@pytest.fixture(params=_agent_files(), ids=lambda p: p.name)
def pod(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AgentPod:
    return _load_agent_pod(request.param, tmp_path, monkeypatch)


# -- the files --------------------------------------------------------------------


def test_the_examples_are_there() -> None:
    assert {p.name for p in MANIFESTS} >= {"sidecar.yaml", "statefulset.yaml"}
    assert {p.name for p in _agent_files()} >= {"sidecar.yaml", "statefulset.yaml"}
    guide = (ROOT / "docs" / "kubernetes.md").read_text()
    for p in MANIFESTS:
        assert f"deploy/kubernetes/{p.name}" in guide, f"docs/kubernetes.md does not mention {p.name}"


_DOCS = [(p, i, d) for p in MANIFESTS for i, d in enumerate(_docs(p))]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("path", "index", "doc"), _DOCS, ids=[_doc_id(p, d) for p, _, d in _DOCS])
def test_every_document_matches_the_kubernetes_schema_strictly(
    path: Path, index: int, doc: dict[str, Any], version: str
) -> None:
    assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path.name} document {index}"
    assert "namespace" not in doc["metadata"], "the examples take their namespace from kubectl -n"
    kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_an_unknown_field() -> None:
    workload = _workload(_docs(MANIFEST_DIR / "statefulset.yaml"))
    assert workload is not None
    bad = copy.deepcopy(workload)
    _pod_spec(bad)["containers"][0]["livenessprobe"] = {"httpGet": {"path": "/healthz", "port": 8080}}
    kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=False)  # a typo passes without strict
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


# -- each agent pod against its config --------------------------------------------


def test_the_config_loads_with_its_secrets_from_the_secret(pod: AgentPod) -> None:
    s = pod.settings
    assert s.connections, "the example shows at least one connection"
    for c in s.connections:
        ext = c.external_uac_settings
        assert ext is not None and ext.password_file is not None, "passwords come from files"
        assert ext.password is not None and ext.password.get_secret_value().startswith("REPLACE-ME")
        assert c.internal_uac_settings.destination_uri
    assert "api_key" not in pod.config["http"] and "api_key_file" in pod.config["http"]
    assert s.http.api_key is not None and s.http.api_key.get_secret_value().startswith("REPLACE-ME")
    # Every *_file is a key of a mounted Secret, and every key of the Secrets is used.
    files = [v for k, v in _walk(pod.config) if k.endswith("_file") and k != "tls_ca_file"]
    assert files
    used: set[tuple[str, str]] = set()
    for f in files:
        mount = str(PurePosixPath(f).parent)
        assert mount in pod.secrets, f"{f} is not in a mounted Secret"
        assert PurePosixPath(f).name in pod.secrets[mount]["stringData"]
        used.add((mount, PurePosixPath(f).name))
    for mount, secret in pod.secrets.items():
        assert {(mount, k) for k in secret["stringData"]} <= used, "a Secret key no config setting reads"
        assert all(str(v).startswith("REPLACE-ME") for v in secret["stringData"].values()), "placeholders only"


def test_probes_use_healthz_and_readyz_on_the_http_port(pod: AgentPod) -> None:
    host, port = pod.settings.http.host_port
    assert not ipaddress.ip_address(host).is_loopback, "the kubelet probes the pod IP, not its loopback"
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = pod.container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert pod.port_number(get["port"]) == port, probe
        assert get.get("scheme", "HTTP") == "HTTP"
    # The agent gets to start its workers before liveness counts.
    startup = pod.container["startupProbe"]
    assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 30


def test_the_agent_runs_unprivileged_on_a_read_only_root(pod: AgentPod) -> None:
    sc = {**pod.spec.get("securityContext", {}), **pod.container["securityContext"]}
    assert sc["runAsNonRoot"] is True
    user = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert user is not None
    assert sc["runAsUser"] == int(user.group(1)) == 10001, "the image's user"
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod.container.get("securityContext", {}).get("privileged") is not True
    assert pod.spec.get("automountServiceAccountToken") is False
    assert pod.spec.get("nodeSelector", {}).get("kubernetes.io/arch") == "amd64", "pjsua2 wheels are x86_64 only"


def test_volumes_config_and_secrets_read_only_store_and_tmp_writable(pod: AgentPod) -> None:
    mounts = pod.mounts
    for m in mounts.values():
        assert m["name"] in pod.volumes or m["name"] in pod.claim_templates, f"no volume {m['name']}"
    assert mounts[str(PurePosixPath(pod.container_env("UAC_AGENT_CONFIG")).parent)]["readOnly"] is True
    for mount_path in pod.secrets:
        assert mounts[mount_path]["readOnly"] is True
        source = pod.volumes[mounts[mount_path]["name"]]["secret"]
        mode = source.get("defaultMode", 0o644)
        fs_group = pod.spec.get("securityContext", {}).get("fsGroup")
        assert mode & 0o004 or (mode & 0o040 and fs_group == 10001), "the agent's user must read the files"
        assert not mode & 0o002, "secrets are not writable"
    store = pod.settings.store.path
    assert store is not None and store != ":memory:"
    for folder in (str(PurePosixPath(store).parent), "/tmp"):
        assert folder in mounts, f"{folder} needs a writable volume (read-only root filesystem)"
        assert not mounts[folder].get("readOnly", False)
        name = mounts[folder]["name"]
        volume = pod.volumes.get(name, {})
        assert "emptyDir" in volume or "persistentVolumeClaim" in volume or name in pod.claim_templates
    if pod.workload["kind"] == "StatefulSet":
        assert mounts[str(PurePosixPath(store).parent)]["name"] in pod.claim_templates, "the store persists"
    # The edge (Kamailio, rtpengine, HAProxy) writes its configs and sockets to its runtime directory.
    rundir = pod.runtime_dir()
    mount = pod.mount_holding(rundir)
    assert mount is not None, f"edge runtime directory {rundir} needs a writable volume (read-only root filesystem)"
    assert not mount.get("readOnly", False), f"{rundir} is on a read-only mount"
    assert "emptyDir" in pod.volumes.get(mount["name"], {}), f"{rundir}: an emptyDir (nothing of it outlives the pod)"


def test_container_ports_are_exactly_the_configs_ports(pod: AgentPod) -> None:
    ports = pod.container["ports"]
    declared = [(p["containerPort"], p.get("protocol", "TCP")) for p in ports]
    assert len(declared) == len(set(declared))
    want = pod.sip_ports() | {(pod.http_port, "TCP")}
    assert len(want) == 2 + pod.settings.sip.tls_server + 1
    assert set(declared) == want, (
        f"missing {sorted(want - set(declared))}, not in the config {sorted(set(declared) - want)}"
    )
    # Names: valid, unique in the pod; the SIP ones say which transport.
    names = [p["name"] for c in pod.spec["containers"] for p in c.get("ports", [])]
    assert len(names) == len(set(names)) and all(_PORT_NAME.match(n) for n in names), names
    by_name = {p["name"]: (p["containerPort"], p.get("protocol", "TCP")) for p in ports}
    sip = pod.settings.sip
    assert by_name["sip-udp"] == (sip.port, "UDP")
    assert by_name["sip-tcp"] == (sip.port, "TCP")
    if sip.tls_server:
        assert by_name["sip-tls"] == (sip.effective_tls_port, "TCP")
    else:
        assert "sip-tls" not in by_name, "no TLS listener without sip.tls_cert_file and sip.tls_key_file"
    assert by_name["http"] == (pod.http_port, "TCP")
    # rtpengine's media range is not listed (informational, and hundreds of ports), and no
    # port of any container lies in it or among the loopback ports of the edge and workers.
    every = {(p["containerPort"], p.get("protocol", "TCP")) for c in pod.spec["containers"] for p in c.get("ports", [])}
    rtp_first, rtp_last = pod.rtp_range
    assert not [p for p in every if rtp_first <= p[0] <= rtp_last], f"RTP {rtp_first}-{rtp_last} is not declared"
    lo_first, lo_last = pod.loopback_range
    assert not [p for p in every if lo_first <= p[0] <= lo_last], f"loopback ports {lo_first}-{lo_last}"
    # The range holds about 4 ports (RTP + RTCP on each side) for every call the agent admits,
    # and the manifest says where it is.
    assert sip.rtp_port_range >= 4 * sip.max_calls, "rtpengine would run out of ports before sip.max_calls"
    assert f"{rtp_first}-{rtp_last}" in pod.path.read_text(), "the comments name the RTP range"
    # One network namespace: no two containers declare the same port.
    others = {
        (p["containerPort"], p.get("protocol", "TCP"))
        for c in pod.spec["containers"]
        if c["name"] != AGENT
        for p in c.get("ports", [])
    }
    assert not others & set(declared)


def test_a_loopback_agent_registers_to_a_pbx_in_the_same_pod(pod: AgentPod) -> None:
    if not ipaddress.ip_address(pod.settings.sip.bind).is_loopback:
        assert pod.settings.sip.bind == "0.0.0.0"
        return
    served = {
        (p["containerPort"], p.get("protocol", "TCP"))
        for c in pod.spec["containers"]
        if c["name"] != AGENT
        for p in c.get("ports", [])
    }
    for c in pod.settings.connections:
        ext = c.external_uac_settings
        assert ext is not None
        uri = parse_sip_uri(ext.proxy)
        assert ipaddress.ip_address(uri["host"]).is_loopback
        assert (int(uri.get("port", 5060)), "TCP" if ext.transport == "TLS" else ext.transport) in served


def test_the_grace_period_outlasts_unregistering(pod: AgentPod) -> None:
    grace = pod.spec["terminationGracePeriodSeconds"]
    assert grace > pod.settings.shutdown_timeout_sec
    # A PBX in the same pod stays up (preStop sleep) while the agent unregisters from it.
    for c in pod.spec["containers"]:
        if c["name"] != AGENT:
            sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            assert pod.settings.shutdown_timeout_sec < sleep < grace, c["name"]


def test_one_replica_and_no_service_links(pod: AgentPod) -> None:
    if pod.workload["kind"] != "Pod":
        assert pod.workload["spec"]["replicas"] == 1, "two pods would register the same connections"
    if pod.workload["kind"] == "Deployment":
        assert pod.workload["spec"]["strategy"]["type"] == "Recreate"
    # Service links would put e.g. UAC_AGENT_SERVICE_HOST (Service "uac-agent") in the
    # environment, which the agent refuses as an unknown setting.
    assert unknown_env_settings({"UAC_AGENT_SERVICE_HOST": "10.0.0.1"})
    assert pod.spec["enableServiceLinks"] is False


def test_resources_cover_the_benchmarked_memory(pod: AgentPod) -> None:
    res = pod.container["resources"]
    for what in ("cpu", "memory"):
        assert 0 < _quantity(res["requests"][what]) <= _quantity(res["limits"][what]), what
    measured = (PSS_SUPERVISOR_MIB + PSS_ZYGOTE_MIB + pod.settings.max_workers * PSS_WORKER_MIB + PSS_EDGE_MIB) * 2**20
    assert _quantity(res["requests"]["memory"]) >= measured
    assert _quantity(res["limits"]["memory"]) >= 2 * measured
    assert _quantity(res["requests"]["cpu"]) >= 0.01


def test_services_expose_the_sip_ports_and_http_of_the_pod(pod: AgentPod) -> None:
    services = [d for d in pod.docs if d["kind"] == "Service"]
    if pod.workload["kind"] == "StatefulSet":
        headless = _named(pod.docs, "Service", pod.workload["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"
        exposed = [s for s in services if s["spec"].get("clusterIP") != "None"]
        assert exposed, "a Service with the SIP ports and HTTP"
    labels = _pod_labels(pod.workload)
    container_ports = {(p["containerPort"], p.get("protocol", "TCP")) for p in pod.container["ports"]}
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items(), svc["metadata"]["name"]
        assert svc["spec"]["selector"].items() <= pod.workload["spec"]["selector"]["matchLabels"].items()
        ports = {(p["port"], p.get("protocol", "TCP")) for p in svc["spec"]["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] == p["port"], "a Contact names the edge's own port"
        assert ports <= container_ports
        assert (pod.http_port, "TCP") in ports
        if svc["spec"].get("clusterIP") != "None":
            assert pod.sip_ports() <= ports, f"missing {sorted(pod.sip_ports() - ports)}"
            by_name = {p["name"]: (p["port"], p.get("protocol", "TCP")) for p in svc["spec"]["ports"]}
            sip = pod.settings.sip
            assert by_name["sip-udp"] == (sip.port, "UDP")
            assert by_name["sip-tcp"] == (sip.port, "TCP")
            if sip.tls_server:
                assert by_name["sip-tls"] == (sip.effective_tls_port, "TCP")


def test_worker_count_follows_from_the_connection_limit(pod: AgentPod) -> None:
    w = pod.settings.workers
    assert pod.settings.max_workers == math.ceil(w.max_connections / w.connections_per_worker)
    assert len([c for c in pod.settings.connections if c.registers]) <= w.max_connections
