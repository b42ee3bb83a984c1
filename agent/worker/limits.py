"""The pjsua2-python wheel's compile-time limits, as plain constants.

Measured (``tests/integration/test_stack_limits.py``): breaking one aborts the
process, so they are checked before the stack is asked. Pure constants, so the
supervisor's config can check against them without importing pjsua2.
"""

from __future__ import annotations

__all__ = ["MAX_CONNECTIONS", "MAX_FORWARDED_CALLS", "PJSUA_MAX_ACC", "PJSUA_MAX_CALLS"]

# PJSUA_MAX_ACC is 8 (the 9th account aborts the process); one account is the
# worker's own, used for the outgoing leg of forwarded calls.
PJSUA_MAX_ACC = 8
MAX_CONNECTIONS = PJSUA_MAX_ACC - 1
# PJSUA_MAX_CALLS: the wheel caps UaConfig.maxCalls at 4 (the 5th makeCall fails
# with PJ_ETOOMANY and an INVITE past it gets pjsua's own 486). A bridged call
# holds two of them (leg A from the PBX, leg B to the destination), so one
# process bridges at most 2 calls at once.
PJSUA_MAX_CALLS = 4
MAX_FORWARDED_CALLS = PJSUA_MAX_CALLS // 2
