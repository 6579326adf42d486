"""``result_in_steps``: the supervisor's waits on actors, which tell lost queues between steps
(a stopped worker's bound held back the news of every queue lost meanwhile: reviewer 11)."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from zdq.client.slots import NoAnswer, result_in_steps


def test_meanwhile_runs_between_steps_until_the_answer_comes() -> None:
    call: concurrent.futures.Future[str] = concurrent.futures.Future()
    calls: list[float] = []

    def meanwhile() -> None:
        calls.append(time.monotonic())
        if len(calls) == 3:
            call.set_result("created")

    assert result_in_steps(call, 5.0, meanwhile, step=0.01) == "created"
    assert len(calls) == 3


def test_no_answer_within_the_bound_is_no_answer_after_meanwhile_ran_at_each_step() -> None:
    call: concurrent.futures.Future[str] = concurrent.futures.Future()
    calls: list[int] = []
    began = time.monotonic()
    with pytest.raises(NoAnswer, match="no answer within 0.05 s"):
        result_in_steps(call, 0.05, lambda: calls.append(1), step=0.01)
    assert 0.05 <= time.monotonic() - began < 1.0
    assert 3 <= len(calls) <= 6


def test_a_timeout_that_is_the_calls_own_answer_is_raised_as_it_is() -> None:
    call: concurrent.futures.Future[str] = concurrent.futures.Future()
    call.set_exception(TimeoutError("the actor's own"))
    with pytest.raises(TimeoutError, match="the actor's own") as raised:
        result_in_steps(call, 1.0, lambda: None)
    assert not isinstance(raised.value, NoAnswer)


def test_an_answer_that_came_during_the_last_step_is_taken() -> None:
    call: concurrent.futures.Future[str] = concurrent.futures.Future()

    def meanwhile() -> None:  # answered as the bound runs out: taken, not "no answer"
        time.sleep(0.03)
        call.set_result("late but in")

    assert result_in_steps(call, 0.02, meanwhile, step=0.01) == "late but in"
