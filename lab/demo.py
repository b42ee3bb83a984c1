"""The lab: a Kamailio PBX on loopback and the agent registered to it.

``python -m lab.demo`` starts Kamailio (digest auth, UDP/TCP/TLS, a test CA),
writes an agent config for three connections (UDP, TCP, TLS) into ``.lab/``,
one per worker process so that the split shows (all behind the edge's one SIP port
``--sip-port``), runs ``uac-agent run`` against it, prints the status
endpoint's answer for each connection once they are registered, then places one
call: a SIPp caller dials connection 1001's user through the lab PBX, the agent's
edge relays it (media through its rtpengine) to a SIPp destination standing in for
the AI assistant, and the call's outcome is printed as the PBX, the destination and
the agent saw it. Then it keeps running (status at http://127.0.0.1:HTTP_PORT/...)
until Ctrl-C. ``--once`` stops after printing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from lab.kamailio import Kamailio, KamailioConfig, make_test_pki
from lab.sipp import Sipp, scenario_path

ROOT = Path(__file__).resolve().parents[1]
USERS = {"office-udp": "lab-secret-1", "office-tcp": "lab-secret-2", "office-tls": "lab-secret-3"}
API_KEY = "lab-api-key-0123456"
MAX_WORKERS = 4


def agent_config(
    lab: Path, pbx_port: int, sip_port: int, http_port: int, ca: Path, dest_port: int
) -> dict[str, object]:
    def conn(cid: str, user: str, transport: str, proxy: str, destination: str) -> dict[str, object]:
        return {
            "connection_id": cid,
            "user_id": "323",
            "connection_name": f"Lab PBX ({transport})",
            "active": True,
            "external_uac_settings": {
                "proxy": proxy,
                "transport": transport,
                "username": user,
                "password": USERS[user],
                "from_user": "601",
                "expiration_sec": 120,
            },
            "internal_uac_settings": {"destination_uri": destination},
        }

    return {
        # The edge: UDP and TCP on sip_port; workers on loopback ports from edge.loopback_port.
        "sip": {"bind": "127.0.0.1", "port": sip_port, "tls_ca_file": str(ca), "rtp_port_range": 200},
        "http": {"listen": f"127.0.0.1:{http_port}", "api_key": API_KEY},
        "log": {"format": "console", "level": "info"},
        "workers": {"connections_per_worker": 1, "max_workers": MAX_WORKERS},
        "connections": [
            # 1001's calls go to the lab's SIPp destination (the demo's call); the others' to an
            # assistant out there, as in production
            conn("1001", "office-udp", "UDP", f"sip:127.0.0.1:{pbx_port}", f"assistant@127.0.0.1:{dest_port}"),
            conn("1002", "office-tcp", "TCP", f"sip:127.0.0.1:{pbx_port}", "1006@assistant-abc123.sip.telnyx.com"),
            conn("1003", "office-tls", "TLS", f"sip:localhost:{pbx_port + 1}", "1006@assistant-abc123.sip.telnyx.com"),
        ],
    }


def get(url: str) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def place_call(lab: Path, pbx_port: int, dest_port: int, base: str) -> bool:
    """One call from a SIPp caller through the lab PBX to connection 1001, relayed by the edge to
    a SIPp destination; prints what each side saw. True when it was answered and hung up."""
    dest = Sipp(
        scenario_path("dest_answer.xml"),
        dest_port,
        variables={"callee": "assistant", "rtp_port": dest_port + 2},
        workdir=lab / "call-destination",
    )
    caller = Sipp(
        scenario_path("pbx_call.xml"),
        dest_port + 1,
        variables={"caller": "1000", "sdp_user": "pbx", "rtp_port": dest_port + 4, "ruri_params": ""},
        workdir=lab / "call-pbx",
        remote=f"127.0.0.1:{pbx_port}",
        service="office-udp",
        timeout=20,
        extra_args=["-d", "2000"],
    )
    print(f"\nA call: SIPp caller -> lab PBX -> agent's edge (1001) -> SIPp destination on {dest_port}", flush=True)
    dest.start()
    try:
        caller.start()
        rc = caller.wait(30)
    finally:
        caller.stop()
        dest.stop()
    finals = [
        r.first_line
        for r in caller.received_responses(None)
        if r.cseq_method == "INVITE" and (r.status_code or 0) >= 200
    ]
    invites = dest.received_requests("INVITE")
    print(
        f"  caller's final answer: {finals or '(none)'}; its BYE answered: {bool(caller.received_responses(200)[1:])}"
    )
    if invites:
        print(f"  destination got: {invites[0].first_line} (From {invites[0].header('From')})")
        media = re.search(r"^c=IN IP4 (\S+)\s.*?^m=audio (\d+)", invites[0].body, re.M | re.S)
        where = f"{media.group(1)}:{media.group(2)}" if media else "?"
        print(f"  destination was offered media at {where} (the edge's relay, not the caller's {dest_port + 4})")
    lines: list[str] = []
    deadline = time.monotonic() + 5  # the edge reports the call's end as it happens
    while time.monotonic() < deadline and not lines:
        _, text = get(base + "/metrics")
        lines = [ln for ln in text.splitlines() if ln.startswith("uac_agent_calls_total{") and '"1001"' in ln]
        time.sleep(0.1)
    print("  agent's metrics: " + ("; ".join(lines) or "(none)"))
    return rc == 0 and finals == ["SIP/2.0 200 OK"] and bool(invites)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("--pbx-port", type=int, default=15060, help="Kamailio UDP/TCP port (TLS on +1)")
    ap.add_argument("--sip-port", type=int, default=15070, help="the agent's edge: UDP and TCP (TLS on +1)")
    ap.add_argument(
        "--dest-port", type=int, default=15090, help="the demo call's SIPp destination (caller on +1, RTP +2, +4)"
    )
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--dir", type=Path, default=ROOT / ".lab")
    ap.add_argument("--once", action="store_true", help="stop after printing the status")
    args = ap.parse_args(argv)

    lab: Path = args.dir
    pki = make_test_pki(lab / "pki", host="localhost")
    pbx = Kamailio(
        KamailioConfig(port=args.pbx_port, users=USERS, tls=True, tls_cert=pki["cert"], tls_key=pki["key"]),
        lab / "kamailio",
    )
    pbx.start()
    print(f"lab PBX: Kamailio on udp/tcp 127.0.0.1:{args.pbx_port}, tls localhost:{args.pbx_port + 1}", flush=True)
    config_path = lab / "agent.yaml"
    config_path.write_text(
        yaml.safe_dump(
            agent_config(lab, args.pbx_port, args.sip_port, args.http_port, pki["ca"], args.dest_port),
            sort_keys=False,
        )
    )
    print(f"agent config: {config_path}", flush=True)
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config_path)], cwd=ROOT)
    base = f"http://127.0.0.1:{args.http_port}"
    code = 1
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and agent.poll() is None:
            if get(base + "/readyz?registered=all")[0] == 200:
                break
            time.sleep(0.2)
        ready, body = get(base + "/readyz?registered=all")
        print(f"\nGET /readyz?registered=all -> {ready} {body}")
        workers: list[str] = []
        for cid in ("1001", "1002", "1003"):
            url = (
                f"{base}/v2/sip_registration_status?credential_type=uac_third-party_credential"
                f"&connection_id={cid}&user_id=323"
            )
            status, text = get(url)
            print(f"\nGET /v2/sip_registration_status connection_id={cid} -> {status}")
            print(json.dumps(json.loads(text), indent=2) if text else "(no answer)")
            if status == 200:
                d = json.loads(text)["sip_registration_details"]
                workers.append(f"  {cid}: worker {d['worker']} (pid {d['worker_pid']}), state {d['state']}")
        print("\nOne supervisor, one worker process per connection here:")
        print("\n".join(workers))
        user_list = ", ".join(USERS)
        print(f"\nKamailio bindings (kamcmd ul.lookup) for {user_list}:")
        for user in USERS:
            binding = pbx.lookup(user) or ""
            contact = next((ln.strip() for ln in binding.splitlines() if "Address:" in ln), "(none)")
            print(f"  {user}: {contact}")
        called = ready == 200 and place_call(lab, args.pbx_port, args.dest_port, base)
        print(f"\nthe call {'went through' if called else 'FAILED'}", flush=True)
        code = 0 if ready == 200 and called else 1
        if not args.once:
            print(f"\nrunning; metrics at {base}/metrics; Ctrl-C to unregister and stop", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
            agent.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
        pbx.stop()  # before printing: a closed stdout must not leave the PBX running
        print(f"agent exited with {agent.returncode}", flush=True)
    return code if agent.returncode == 0 else (agent.returncode or 1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
