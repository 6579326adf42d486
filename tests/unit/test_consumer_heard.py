"""What a consumer's socket owner knows of each broker it connects to (``Heard``), without
sockets: never heard from, heard from, silent since, and a loop that itself did not run."""

from __future__ import annotations

import pytest

from zdq.transport.reach import OPEN_BETWEEN_WORKERS, REACHED_BEFORE, WENT_SILENT, Heard, describe

pytestmark = pytest.mark.unit


def test_a_broker_heard_from_then_silent_for_the_timeout_is_found_once_and_a_new_placement_starts_over() -> None:
    heard = Heard(2, now=100.0)
    assert heard.went_silent(200.0, 15.0) == []  # never heard from: that is overdue(), not silence
    heard.heard[0] = heard.heard[1] = True
    heard.last[0], heard.last[1] = 110.0, 120.0  # what the loop writes as messages arrive
    assert heard.went_silent(124.9, 15.0) == []
    assert heard.went_silent(125.0, 15.0) == [0]
    heard.silent[0] = "why"
    assert heard.went_silent(140.0, 15.0) == [1]  # 0 is reported already
    heard.restart(0, 141.0)  # placed again: a new connection, nothing said of it yet
    assert 0 not in heard.silent and not heard.heard[0] and heard.last[0] == 141.0


def test_a_loop_that_did_not_run_gives_every_broker_a_whole_timeout_from_when_it_runs_again() -> None:
    heard = Heard(2, now=0.0)
    heard.heard[:] = [True, True]
    last = heard.last  # the loop holds this list: it must stay the one written to
    heard.was_deaf(30.0)
    assert heard.last is last and last == [30.0, 30.0]
    assert heard.went_silent(44.0, 15.0) == []
    assert heard.went_silent(45.0, 15.0) == [0, 1]


def test_brokers_that_went_silent_get_the_advice_that_the_path_broke_not_that_ports_are_closed() -> None:
    line = ("q0", "tcp://10.0.0.2:4000", "w2", f"consumer c0 on w1: {WENT_SILENT} for 15 s")
    assert describe("cut", [line], OPEN_BETWEEN_WORKERS).endswith(REACHED_BEFORE)
    never = ("q1", "tcp://10.0.0.3:4000", "w3", "consumer c0 on w1: packets dropped")
    assert describe("cut", [line, never], OPEN_BETWEEN_WORKERS).endswith(OPEN_BETWEEN_WORKERS)
