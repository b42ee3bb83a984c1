"""Failover across a hop's targets (agent/core/targets.py): pure, no sockets."""

from __future__ import annotations

import pytest

from agent.core.targets import TargetCursor, fails_over


@pytest.mark.parametrize(
    ("code", "received", "moves"),
    [
        (408, True, True),
        (480, True, True),
        (503, True, True),
        (504, True, True),
        (0, False, True),  # transport or TLS error
        (408, False, True),  # the stack's timeout
        (200, True, False),
        (401, True, False),
        (403, True, False),
        (404, True, False),
        (486, True, False),
        (500, True, False),
        (603, True, False),
    ],
)
def test_which_outcomes_fail_over(code: int, received: bool, moves: bool) -> None:
    assert fails_over(code, received) is moves


def test_failover_walks_the_targets_in_order_then_ends_the_round_at_the_best() -> None:
    c = TargetCursor(3)
    assert c.index == 0
    assert c.on_failover() == 1
    assert c.on_failover() == 2
    assert c.on_failover() is None  # every target failed: backoff, then a new round
    assert c.index == 0
    assert c.on_failover() == 1  # the new round starts over


def test_a_success_keeps_the_target_and_a_probe_answer_moves_back_to_the_best() -> None:
    c = TargetCursor(2)
    assert c.on_failover() == 1
    c.end_round()  # registered at the second target
    assert c.index == 1
    assert c.on_failover() == 0  # a new round: the best one was not tried in it
    c.index = 1
    assert c.prefer_best() is True
    assert c.index == 0
    assert c.prefer_best() is False


def test_a_new_target_list_keeps_the_current_target_when_it_is_still_there() -> None:
    c = TargetCursor(3, index=2)
    c.retarget(4, keep=3)
    assert (c.count, c.index) == (4, 3)
    c.retarget(2, keep=None)
    assert c.index == 0
    c.retarget(0, keep=None)
    assert c.on_failover() is None
