"""The pjsua2 wheel's compile-time call limit, measured, so LIMITS.call_slots stays true.

Run in a child process: a failed makeCall leaves a Call that pjsua2 cannot delete
(it asserts and aborts), so the child leaks it on purpose and exits with os._exit.
"""

from __future__ import annotations

import subprocess
import sys

from agent.worker.stack import LIMITS
from lab.kamailio import free_port

PROBE = """
import os, sys
import pjsua2 as pj
ep = pj.Endpoint(); ep.libCreate()
cfg = pj.EpConfig()
cfg.uaConfig.threadCnt = 0; cfg.uaConfig.mainThreadOnly = True; cfg.uaConfig.maxCalls = 32
cfg.logConfig.level = 0; cfg.logConfig.consoleLevel = 0; cfg.medConfig.threadCnt = 0
ep.libInit(cfg); ep.audDevManager().setNullDev()
tc = pj.TransportConfig(); tc.port = 0; tc.boundAddress = "127.0.0.1"
ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tc); ep.libStart()
ac = pj.AccountConfig(); ac.idUri = "sip:probe@127.0.0.1"
acc = pj.Account(); acc.create(ac)
calls = []
for i in range(40):
    c = pj.Call(acc)
    try:
        c.makeCall("sip:nobody@127.0.0.1:%s" % sys.argv[1], pj.CallOpParam(True))
    except Exception:
        c.thisown = False
        break
    calls.append(c)
print(len(calls), flush=True)
os._exit(0)
"""


def test_the_wheel_caps_concurrent_call_legs_at_pjsua_max_calls() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(free_port())], capture_output=True, text=True, timeout=60, check=True
    )
    assert int(out.stdout.strip().splitlines()[-1]) == LIMITS.call_slots == 4
    assert LIMITS.bridged_calls == LIMITS.call_slots // 2
