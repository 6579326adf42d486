"""Futures as arguments, the pure parts: finding futures in a call's arguments, putting their
results in place, and a held call's life (launched, failed, cancelled) with plain
``concurrent.futures.Future`` objects settled by the test (no pool, no thread)."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import pytest

from zdq.client.dependencies import (
    HeldFuture,
    find_futures,
    hold,
    holds_futures,
    may_hold,
    substitute,
)

pytestmark = pytest.mark.unit

Future = concurrent.futures.Future


class Launches:
    """Plays the submission: records each launch and hands back a future the test settles."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.real: list[Future[Any]] = []
        self.fail = fail

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        if self.fail is not None:
            raise self.fail
        self.calls.append((args, kwargs))
        fut: Future[Any] = Future()
        self.real.append(fut)
        return fut


def test_plain_arguments_are_not_scanned_past_one_type_check() -> None:
    assert not may_hold((1, "a", 2.0, None, object()), {"x": b"b"})
    assert not may_hold((), None)
    assert may_hold(([1],), None) and may_hold((), {"k": Future()})


def test_futures_are_found_anywhere_in_lists_tuples_dicts_and_sets_once_each() -> None:
    a, b, c = Future(), Future(), Future()
    args = (1, [a, {"k": (b, 2)}], {3}, frozenset({c}))
    assert find_futures(args, {"again": a}) == [a, b, c]
    assert find_futures((1, [2, (3,)]), {"x": {"y": 4}}) == []


def test_results_take_the_futures_places_and_containers_without_futures_are_kept() -> None:
    a, b = Future(), Future()
    a.set_result(10)
    b.set_result(20)
    untouched = [1, 2]
    args = (a, [b, untouched], {"k": (a, 3)}, {5})
    out = substitute(args)
    assert out == (10, [20, [1, 2]], {"k": (10, 3)}, {5})
    assert out[1][1] is untouched


def test_a_container_subclass_is_passed_as_it_is() -> None:
    class Mine(list):  # type: ignore[type-arg]
        pass

    a = Future()
    assert find_futures((Mine([a]),), None) == []


def test_the_call_is_launched_with_the_results_once_every_input_is_done() -> None:
    a, b = Future(), Future()
    launches = Launches()
    held = hold([a, b], launches, (a, [b]), {"k": a})
    assert isinstance(held, HeldFuture) and not held.done() and "waiting for 2 of 2" in repr(held)
    a.set_result(1)
    assert launches.calls == []
    b.set_result(2)
    assert launches.calls == [((1, [2]), {"k": 1})]
    launches.real[0].set_result("ran")
    assert held.result(0) == "ran"


def test_inputs_done_already_launch_at_once() -> None:
    a = Future()
    a.set_result(5)
    launches = Launches()
    held = hold([a], launches, (a,), None)
    assert launches.calls == [((5,), {})]
    launches.real[0].set_exception(ValueError("task failed"))
    with pytest.raises(ValueError, match="task failed"):
        held.result(0)


def test_a_failed_input_gives_its_own_error_and_the_call_never_runs() -> None:
    a, b = Future(), Future()
    launches = Launches()
    held = hold([a, b], launches, (a, b), None)
    error = KeyError("upstream")
    a.set_exception(error)
    b.set_result(1)
    assert launches.calls == []
    assert held.exception(0) is error


def test_a_cancelled_input_cancels_the_call_and_what_depends_on_it() -> None:
    a = Future()
    launches = Launches()
    held = hold([a], launches, (a,), None)
    after = hold([held], launches, (held,), None)
    assert a.cancel()
    assert held.cancelled() and after.cancelled() and launches.calls == []
    assert concurrent.futures.wait([held, after], timeout=0).not_done == set()


def test_cancelling_a_held_call_drops_it_and_its_inputs_launch_nothing() -> None:
    a = Future()
    launches = Launches()
    held = hold([a], launches, (a,), None)
    assert held.cancel() and held.cancelled()
    a.set_result(1)
    assert launches.calls == []


def test_cancelling_a_submitted_call_cancels_its_task() -> None:
    a = Future()
    a.set_result(1)
    launches = Launches()
    held = hold([a], launches, (a,), None)
    assert held.cancel() and held.cancelled() and launches.real[0].cancelled()


def test_a_started_task_is_not_cancelled() -> None:
    a = Future()
    a.set_result(1)
    launches = Launches()
    held = hold([a], launches, (a,), None)
    launches.real[0].set_running_or_notify_cancel()
    assert not held.cancel() and not held.done()
    launches.real[0].set_result(2)
    assert held.result(0) == 2


def test_a_launch_that_fails_fails_the_call() -> None:
    a = Future()
    a.set_result(1)
    held = hold([a], Launches(fail=TypeError("cannot pickle")), (a,), None)
    with pytest.raises(TypeError, match="cannot pickle"):
        held.result(0)


def test_map_items_are_scanned_for_futures_in_containers_too() -> None:
    assert not holds_futures([1, "a", [2, 3], {"k": 4}])
    assert holds_futures([1, [2, (Future(),)]]) and holds_futures([Future()])
