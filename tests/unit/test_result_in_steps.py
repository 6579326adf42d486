"""``result_in_steps``: the supervisor's waits on actors, which tell lost queues between steps
(a stopped worker's bound held back the news of every queue lost meanwhile: reviewer 11)."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from zdq.client.slots import NoAnswer, answers_within, result_in_steps


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


class _AnsweredAsTheWaitEnds:
    """An actor call whose answer lands just after its timed wait gave up, as a Dask actor future's
    can: ``result(timeout)`` raises TimeoutError, and the call is done with its answer."""

    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.answered = False

    def done(self) -> bool:
        return self.answered

    def result(self, timeout: float | None = None) -> object:
        if not self.answered:
            self.answered = True
            raise TimeoutError(f"timed out after {timeout} s.")
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def test_answers_within_takes_an_answer_that_lands_as_its_wait_gives_up() -> None:
    # Before, the wait's own TimeoutError was recorded as the actor's answer: a consumer whose
    # start() had worked was reported "start ... failed: timed out after 0.99 s" (reviewer 12).
    calls = {"started": (_AnsweredAsTheWaitEnds("started"), "tcp://w:1")}
    answers, errors, gone, silent = answers_within(None, calls, timeout=30)
    assert (answers, errors, gone, silent) == ({"started": "started"}, {}, set(), set())


def test_answers_within_keeps_a_timeout_that_is_the_actors_own_answer() -> None:
    own = TimeoutError("the actor's own")
    answers, errors, _, _ = answers_within(None, {"own": (_AnsweredAsTheWaitEnds(own), "tcp://w:1")}, timeout=30)
    assert answers == {} and errors == {"own": own}
