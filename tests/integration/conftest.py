"""Real peers on loopback. A missing peer is a failure here, never a skip."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.dnsmasq import Dnsmasq
from lab.kamailio import Kamailio, KamailioConfig, free_port, make_test_pki
from tests.integration import agentproc
from tests.integration.agentproc import AgentProcess

USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw", "dave": "dave-pw"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _peers_installed() -> None:
    missing = [tool for tool in ("kamailio", "kamcmd", "sipp", "openssl") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"real SIP peers missing: {', '.join(missing)} (run .ci/run or apt-get install them)")


@pytest.fixture(scope="session", autouse=True)
def lab_dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    """Every agent under test asks this loopback DNS server (localhost only; every other name is
    NXDOMAIN at once), so no lookup of a test's made-up host names leaves loopback."""
    try:
        dns = Dnsmasq(tmp_path_factory.mktemp("lab-dns"), hosts={"localhost": ["127.0.0.1"]}).start()
    except RuntimeError as e:
        pytest.fail(str(e))
    agentproc.DEFAULT_NAMESERVERS[:] = [dns.address]
    yield dns
    agentproc.DEFAULT_NAMESERVERS[:] = []
    dns.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_test_pki(tmp_path_factory.mktemp("pki"), host="localhost")


def start_kamailio(rundir: Path, pki: dict[str, Path], **kw: Any) -> Kamailio:
    cfg = KamailioConfig(
        port=kw.pop("port", None) or free_port(),
        users=kw.pop("users", USERS),
        tls=True,
        tls_cert=pki["cert"],
        tls_key=pki["key"],
        **kw,
    )
    k = Kamailio(cfg, rundir)
    k.start()
    return k


@pytest.fixture(scope="session")
def kamailio(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[Kamailio]:
    k = start_kamailio(tmp_path_factory.mktemp("kamailio"), pki)
    yield k
    k.stop()


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def make(
        connections: list[dict[str, Any]], nofile: int | None = None, unread_stdout: bool = False, **sections: Any
    ) -> AgentProcess:
        a = AgentProcess(tmp_path / f"agent{len(started)}", connections, **sections)
        a.nofile, a.unread_stdout = nofile, unread_stdout
        started.append(a)
        return a.start()

    yield make
    for a in started:
        a.kill()


def connection(
    cid: str, proxy: str, transport: str, user: str, password: str | None = None, **extra: Any
) -> dict[str, Any]:
    ext = {
        "proxy": proxy,
        "transport": transport,
        "username": user,
        "password": password if password is not None else USERS[user],
        "expiration_sec": extra.pop("expiration_sec", 300),
    }
    ext.update(extra.pop("ext", {}))
    return {
        "connection_id": cid,
        "user_id": "323",
        "connection_name": f"{transport} {user}",
        "external_uac_settings": ext,
        "internal_uac_settings": {"destination_uri": "1006@assistant-abc123.sip.telnyx.com"},
        **extra,
    }
