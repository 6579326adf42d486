"""zdq.as_completed's Dask extras with plain futures settled by the test: add/update while
iterating, with_results, raise_errors, batches, count, is_empty, and the timeout."""

from __future__ import annotations

import concurrent.futures

import pytest

import zdq
from zdq.errors import ZdqTimeoutError

pytestmark = pytest.mark.unit

Future = concurrent.futures.Future


def done(value: object) -> Future[object]:
    fut: Future[object] = Future()
    fut.set_result(value)
    return fut


def test_futures_added_while_iterating_are_yielded_too() -> None:
    first = done(1)
    ac = zdq.as_completed([first])
    seen = []
    for fut in ac:
        seen.append(fut.result())
        if fut is first:
            ac.add(done(2))
            ac.update([done(3), done(4)])
    assert seen == [1, 2, 3, 4] and ac.is_empty()


def test_count_says_what_is_left_to_yield() -> None:
    pending: Future[object] = Future()
    ac = zdq.as_completed([done(1), pending])
    assert ac.count() == 2 and not ac.is_empty() and ac.has_ready()
    next(ac)
    assert ac.count() == 1 and not ac.has_ready()
    pending.set_result(2)
    assert next(ac) is pending and ac.count() == 0 and ac.is_empty()
    with pytest.raises(StopIteration):
        next(ac)


def test_with_results_yields_pairs_and_raises_a_failure() -> None:
    bad: Future[object] = Future()
    bad.set_exception(ValueError("boom"))
    ac = zdq.as_completed([done(1)], with_results=True)
    assert [r for _, r in ac] == [1]
    ac = zdq.as_completed([bad], with_results=True)
    with pytest.raises(ValueError, match="boom"):
        next(ac)
    ac = zdq.as_completed([bad], with_results=True, raise_errors=False)
    fut, exc = next(ac)
    assert fut is bad and isinstance(exc, ValueError)


def test_batches_hand_what_is_done_at_once() -> None:
    ac = zdq.as_completed([done(1), done(2)], with_results=True)
    batches = ac.batches()
    assert sorted(r for _, r in next(batches)) == [1, 2]
    ac.add(done(3))
    assert [r for _, r in next(batches)] == [3]
    assert list(batches) == []
    assert ac.next_batch(block=False) == []


def test_the_timeout_counts_from_the_call_and_names_what_is_left() -> None:
    ac = zdq.as_completed([done(1), Future()], timeout=0)
    next(ac)
    with pytest.raises(ZdqTimeoutError, match="1 of 2 futures did not complete"):
        next(ac)
