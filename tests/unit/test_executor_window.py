"""Executor.map's window (zdq.client.window), driven by futures the tests settle: no pool, no thread."""

from __future__ import annotations

import concurrent.futures
import gc
import itertools
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from zdq.client.window import (
    FutureSlice,
    MapBatch,
    MapChunk,
    ResultWindow,
    cancel_many,
    check_map_options,
    chunked,
    key_runs,
    map_futures,
    run_chunk,
    span_runs,
)
from zdq.errors import SerializationError, TaskCancelled, ZdqTimeoutError
from zdq.futures import TaskFuture

Future = concurrent.futures.Future


class Pool:
    """A submit() whose futures the test settles; it counts what is unfinished."""

    def __init__(self) -> None:
        self.futures: list[Future[Any]] = []
        self.calls: list[tuple[Any, ...]] = []
        self.cancelled: list[Future[Any]] = []

    def submit(self, *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self.futures.append(fut)
        self.calls.append(args)
        return fut

    def slices(self, part: list[tuple[Any, ...]], first: int = 0, timeout: float | None = None) -> FutureSlice:
        """The window's submit: a slice of one future per call (the calls go one by one)."""
        return FutureSlice([self.submit(*args) for args in part])

    def cancel(self, slices: list[Any], wait: bool = True) -> None:
        self.waited = wait
        for fut in (f for s in slices for f in s.futures()):
            fut.cancel()
            self.cancelled.append(fut)

    def unfinished(self) -> int:
        return sum(not f.done() for f in self.futures)

    def settle_all(self) -> None:
        for fut, args in zip(self.futures, self.calls):
            if not fut.done():
                fut.set_result(sum(args))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _settled_pool() -> Pool:
    """A pool whose futures come back already done (results: the sum of the arguments)."""
    pool = Pool()
    submit = pool.submit

    def done_submit(*args: Any) -> Future[Any]:
        fut = submit(*args)
        fut.set_result(sum(args))
        return fut

    pool.submit = done_submit  # type: ignore[method-assign]
    return pool


def test_without_buffersize_every_call_is_submitted_at_once_and_results_come_in_order() -> None:
    pool = Pool()
    window = ResultWindow(pool.slices, zip(range(5), range(5)), None, None, pool.cancel)
    assert len(pool.futures) == 5
    # Settled backwards: the results are still taken in the calls' order.
    for fut, args in reversed(list(zip(pool.futures, pool.calls))):
        fut.set_result(sum(args))
    assert list(window) == [0, 2, 4, 6, 8]


def test_with_buffersize_the_calls_are_read_as_results_are_taken_and_at_most_buffersize_are_unfinished() -> None:
    pool = Pool()
    read: list[int] = []

    def endless() -> Iterator[tuple[int]]:
        for i in itertools.count():
            read.append(i)
            yield (i,)

    window = ResultWindow(pool.slices, endless(), 3, None, pool.cancel)
    results = iter(window)
    assert len(pool.futures) == 3 and len(read) == 3
    for expected in range(50):
        pool.futures[expected].set_result(expected * 10)
        assert next(results) == expected * 10
        # One more submitted for each result taken; never more than three unfinished.
        assert len(pool.futures) == 3 + expected + 1
        assert pool.unfinished() <= 3
        assert len(read) <= len(pool.futures) + 1
    results.close()  # type: ignore[attr-defined]
    assert pool.unfinished() == 0
    assert len(pool.cancelled) == 3


def test_a_short_iterable_with_a_large_buffersize_ends() -> None:
    pool = _settled_pool()
    assert list(ResultWindow(pool.slices, [(1,), (2,)], 10, None, pool.cancel)) == [1, 2]


def test_a_tasks_error_is_raised_at_its_position_and_the_rest_is_cancelled() -> None:
    pool = Pool()
    window = iter(ResultWindow(pool.slices, [(i,) for i in range(5)], None, None, pool.cancel))
    pool.futures[0].set_result("a")
    pool.futures[1].set_exception(KeyError("second"))
    pool.futures[2].set_result("c")
    assert next(window) == "a"
    with pytest.raises(KeyError, match="second"):
        next(window)
    assert pool.futures[3].cancelled() and pool.futures[4].cancelled()
    with pytest.raises(StopIteration):
        next(window)


def test_the_timeout_counts_from_the_call_and_cancels_what_is_left() -> None:
    clock = Clock()
    pool = Pool()
    window = iter(ResultWindow(pool.slices, [(i,) for i in range(3)], None, 5.0, pool.cancel, clock))
    pool.futures[0].set_result(0)
    clock.now += 4.0
    assert next(window) == 0
    clock.now += 1.5  # 5.5 s since the call: past the timeout, however recent the last result
    with pytest.raises(TimeoutError):
        next(window)
    assert all(f.cancelled() for f in pool.futures[1:])


def test_a_call_that_cannot_be_submitted_cancels_those_submitted_before_it() -> None:
    pool = Pool()

    def submit(x: int) -> Future[Any]:
        if x == 2:
            raise TypeError("cannot pickle")
        return pool.submit(x)

    with pytest.raises(TypeError, match="cannot pickle"):
        ResultWindow(lambda part, first, left: FutureSlice([submit(*a) for a in part]), [(i,) for i in range(4)], None, None, pool.cancel)
    assert len(pool.futures) == 2 and all(f.cancelled() for f in pool.futures)


def test_a_suspended_iterator_holds_no_result_it_handed_out() -> None:
    class Value:
        pass

    pool = Pool()
    window = iter(ResultWindow(pool.slices, [(1,), (2,)], 1, None, pool.cancel))
    pool.futures[0].set_result(Value())
    value = next(window)
    ref = weakref.ref(value)
    del value
    pool.futures.clear()  # the test's own references
    gc.collect()
    assert ref() is None


def test_the_maps_options_are_checked_as_python_3_14_checks_them() -> None:
    with pytest.raises(ValueError, match="buffersize must be None or > 0"):
        check_map_options(1, 0)
    with pytest.raises(TypeError, match="buffersize must be an integer or None"):
        check_map_options(1, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunksize must be >= 1"):
        check_map_options(0, None)
    check_map_options(3, None)


def test_chunks_run_their_calls_in_order_and_are_read_lazily() -> None:
    assert run_chunk(pow, [(2, 3), (3, 2)]) == [8, 9]
    parts = chunked(((i,) for i in itertools.count()), 3)
    assert next(parts) == [(0,), (1,), (2,)]
    assert list(chunked([(1,), (2,)], 3)) == [[(1,), (2,)]]


def test_task_ids_are_cancelled_in_runs_of_consecutive_ids() -> None:
    assert key_runs([5, 3, 4, 9, 10, 12, 4]) == [(3, 3), (9, 2), (12, 1)]
    assert key_runs([]) == []


def test_an_executor_refuses_max_workers_below_one_and_options_beside_a_given_pool() -> None:
    import zdq

    with pytest.raises(ValueError, match="^max_workers must be greater than 0$"):
        zdq.Executor(0)
    with pytest.raises(ValueError, match="^max_workers must be greater than 0$"):
        zdq.Executor(max_workers=-1)
    with pytest.raises(TypeError, match="max_workers"):
        zdq.Executor("2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="queue_pool alone"):
        zdq.Executor(2, queue_pool=object())


# -- slices of several calls: one batch future per slice ---------------------------------------------
class Batches:
    """A submit() of slices as MapBatch futures (task ids from 100), which the test fills as the
    driver's I/O thread does (``_fill``: a run of outcomes at once)."""

    def __init__(self) -> None:
        self.batches: list[MapBatch] = []
        self.calls: list[list[tuple[Any, ...]]] = []
        self.cancelled: list[Any] = []
        self.firsts: list[int] = []
        self.timeouts: list[float | None] = []
        self.waited: list[bool] = []
        self._next_id = 100

    def submit(self, part: list[tuple[Any, ...]], first: int = 0, timeout: float | None = None) -> MapBatch:
        self.firsts.append(first)
        self.timeouts.append(timeout)
        batch = MapBatch(self._next_id, len(part))
        self._next_id += len(part)
        self.batches.append(batch)
        self.calls.append(part)
        return batch

    def cancel(self, slices: list[Any], wait: bool = True) -> None:
        self.cancelled.extend(slices)
        self.waited.append(wait)

    def settle(self, k: int, errors: dict[int, BaseException] | None = None) -> None:
        """Every outcome of slice ``k``: the sum of each call's arguments, or the error given."""
        self.batches[k]._fill(0, [sum(args) for args in self.calls[k]], errors or {})


def test_slices_give_their_results_in_order_as_runs_of_them_arrive() -> None:
    pool = Batches()
    window = ResultWindow(pool.submit, [(i,) for i in range(10)], None, None, pool.cancel, slice_size=4)
    assert [len(c) for c in pool.calls] == [4, 4, 2]
    pool.batches[0]._fill(0, [0, 1], {})  # the first two of the first slice
    results = iter(window)
    assert [next(results), next(results)] == [0, 1]
    pool.settle(2)  # the later slices first: still taken in order
    pool.settle(1)
    pool.batches[0]._fill(2, [2, 3], {})
    assert list(results) == list(range(2, 10))
    assert window.unfinished == 0 and not pool.cancelled


def test_with_buffersize_slices_are_submitted_as_results_are_taken_within_the_buffer() -> None:
    pool = Batches()
    read: list[int] = []

    def endless() -> Iterator[tuple[int]]:
        for i in itertools.count():
            read.append(i)
            yield (i,)

    window = ResultWindow(pool.submit, endless(), 10, None, pool.cancel, slice_size=4)
    results = iter(window)
    assert [len(c) for c in pool.calls] == [4, 4] and len(read) == 8  # a third would pass 10
    for k in range(30):
        pool.settle(k)
        assert [next(results) for _ in range(4)] == list(range(4 * k, 4 * k + 4))
        assert window.unfinished <= 10
        assert len(read) <= 4 * (k + 1) + 10
        assert len(pool.batches) == k + 3  # one more slice for each one taken
    results.close()  # type: ignore[attr-defined]
    assert pool.cancelled == pool.batches[-2:]


def test_an_error_in_a_slice_is_raised_after_the_results_before_it_and_the_rest_is_cancelled() -> None:
    pool = Batches()
    results = iter(ResultWindow(pool.submit, [(i,) for i in range(12)], None, None, pool.cancel, slice_size=4))
    pool.settle(0)
    pool.settle(1, {2: KeyError("item 6")})
    assert [next(results) for _ in range(6)] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(KeyError, match="item 6"):
        next(results)
    assert pool.cancelled == pool.batches[1:]
    with pytest.raises(StopIteration):
        next(results)


def test_a_slice_times_out_counting_from_the_call_and_hands_out_no_result_twice() -> None:
    class Value:
        pass

    clock = Clock()
    pool = Batches()
    results = iter(ResultWindow(pool.submit, [(i,) for i in range(4)], None, 5.0, pool.cancel, clock, slice_size=4))
    pool.batches[0]._fill(0, [Value()], {})
    value = next(results)
    assert pool.batches[0]._values[0] is None  # the slice forgot the result it handed out
    ref = weakref.ref(value)
    del value
    gc.collect()
    assert ref() is None
    clock.now += 6.0
    with pytest.raises(TimeoutError, match=r"^map\(\): the result of item 1 did not come within the map's timeout of 5s$"):
        next(results)
    assert pool.cancelled == pool.batches
    assert pool.waited == [False]  # cancelled without waiting for the queues' answers


def test_each_slice_is_submitted_with_its_position_and_what_is_left_of_the_timeout() -> None:
    clock = Clock()
    pool = Batches()
    results = iter(
        ResultWindow(pool.submit, [(i,) for i in range(12)], 8, 5.0, pool.cancel, clock, slice_size=4, started=99.0)
    )
    assert pool.firsts == [0, 4] and pool.timeouts == [4.0, 4.0]  # 1 s had passed at the construction
    pool.settle(0)
    clock.now += 3.0
    assert [next(results) for _ in range(4)] == [0, 1, 2, 3]
    assert pool.firsts == [0, 4, 8] and pool.timeouts[-1] == 1.0


def test_a_submission_that_times_out_cancels_the_slices_before_it_without_waiting_and_names_the_item() -> None:
    pool = Batches()

    def submit(part: list[tuple[Any, ...]], first: int, timeout: float | None) -> MapBatch:
        if first == 4:
            raise ZdqTimeoutError("no room in the window")
        return pool.submit(part, first, timeout)

    with pytest.raises(TimeoutError, match=r"^map\(\): the items from 4 on could not be queued within the map's timeout of 5s: no room"):
        ResultWindow(submit, [(i,) for i in range(12)], None, 5.0, pool.cancel, Clock(), slice_size=4)
    assert pool.cancelled == pool.batches and pool.waited == [False]


def test_a_call_that_cannot_be_pickled_says_how_many_results_were_yielded_before_it() -> None:
    pool = Batches()

    def submit(part: list[tuple[Any, ...]], first: int, timeout: float | None) -> MapBatch:
        if first == 12:
            raise SerializationError("item 13 of the map: cannot pickle")
        return pool.submit(part, first, timeout)

    results = iter(ResultWindow(submit, [(i,) for i in range(16)], 8, None, pool.cancel, slice_size=4))
    pool.settle(0)
    pool.settle(1)
    assert [next(results) for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(SerializationError, match=r"^item 13 of the map: cannot pickle; 4 results of the map were yielded"):
        next(results)  # slice 1's results were taken, but the error comes first (as 3.14's submit's)
    assert pool.cancelled == pool.batches[2:] and pool.waited == [False]


def test_spans_of_task_ids_are_cancelled_in_merged_runs_one_request_each() -> None:
    assert span_runs([(10, 4), (0, 2), (14, 3), (2, 1), (30, 5), (31, 2)]) == [(0, 3), (10, 7), (30, 5)]

    class Driver:
        def __init__(self) -> None:
            self.asked: list[tuple[int, int]] = []

        def cancel(self, first: int, n: int) -> set[int]:
            self.asked.append((first, n))
            return set()

    driver = Driver()
    batches = [MapBatch(first, 4) for first in (8, 0, 4, 20)]
    for batch in batches:
        batch._driver = driver
    batches[1]._fill(0, [1, 2, 3, 4], {})  # done: not asked
    cancel_many(batches)
    assert driver.asked == [(4, 8), (20, 4)]


def test_the_futures_of_a_maps_chunk_share_a_condition_and_keep_the_futures_contract() -> None:
    futures = map_futures(40, 3, None, None)
    assert [f.key for f in futures] == [40, 41, 42]
    assert futures[0]._condition is futures[2]._condition
    futures[1].set_result("b")
    with pytest.raises(TimeoutError, match="had no result within 0.01s"):
        futures[0].result(timeout=0.01)  # a sibling's result is not its own
    assert futures[1].result() == "b" and futures[1].exception() is None
    futures[2].set_exception(KeyError("c"))
    with pytest.raises(KeyError, match="c"):
        futures[2].result()
    assert isinstance(futures[2].exception(0), KeyError)
    done, not_done = concurrent.futures.wait(futures, timeout=0)
    assert done == {futures[1], futures[2]} and not_done == {futures[0]}
    seen: list[Any] = []
    futures[0].add_done_callback(seen.append)
    futures[0].set_result("a")
    assert seen == [futures[0]] and futures[0].result(0) == "a"
    assert "TaskFuture key=40 finished" in repr(futures[0])


def test_a_maps_futures_read_their_state_from_their_chunk_settled_as_a_batch() -> None:
    chunk = MapChunk(100, 4, None, None)
    futures = chunk.futures()
    assert [f.key for f in futures] == [100, 101, 102, 103] and not any(f.done() for f in futures)
    seen: list[Any] = []
    futures[2].add_done_callback(seen.append)  # before its outcome: run when it comes
    _, not_done = concurrent.futures.wait(futures, timeout=0)  # installs and removes waiters
    assert not_done == set(futures)
    chunk._fill(0, [1, 2, 3, 4], {1: KeyError("b"), 3: TaskCancelled("task 103 was cancelled")})
    assert seen == [futures[2]] and futures[0].result(0) == 1 and futures[2].result(0) == 3
    with pytest.raises(KeyError, match="b"):
        futures[1].result(0)
    assert isinstance(futures[1].exception(0), KeyError) and not futures[1].cancelled()
    assert futures[3].cancelled() and futures[3].done()
    with pytest.raises(concurrent.futures.CancelledError):
        futures[3].result(0)
    with pytest.raises(concurrent.futures.CancelledError):
        futures[3].exception(0)
    chunk._fill(0, ["again"], {})  # a position settled is never written again
    assert futures[0].result(0) == 1
    with pytest.raises(concurrent.futures.InvalidStateError):
        futures[0].set_result("again")
    done, _ = concurrent.futures.wait(futures, timeout=0)
    assert done == set(futures)
    assert [f for f in concurrent.futures.as_completed(futures, timeout=0)] and futures[3]._state == "CANCELLED_AND_NOTIFIED"
    futures[0].add_done_callback(seen.append)  # after: at once
    assert seen == [futures[2], futures[0]]
    assert "TaskFuture key=101 failed: KeyError" in repr(futures[1])


def test_a_maps_future_gets_lists_of_waiters_and_callbacks_only_when_used() -> None:
    chunk = MapChunk(0, 3, None, None)
    futures = chunk.futures()
    assert chunk._watched is None and not hasattr(futures[0], "_x")
    assert futures[1]._waiters == [] and list(chunk._watched or ()) == [1]
    chunk._fill(1, ["b"], {})
    assert not chunk._watched  # told, then forgotten
    with pytest.raises(TypeError, match="made by its chunk"):
        type(futures[0])(chunk, 0)


def test_closing_the_results_in_the_middle_of_a_run_ends_them_and_cancels_what_is_left() -> None:
    pool = Batches()
    window = ResultWindow(pool.submit, [(i,) for i in range(8)], None, None, pool.cancel, slice_size=4)
    pool.settle(0)  # a run of four results in hand
    results = iter(window)
    assert next(results) == 0
    results.close()  # type: ignore[attr-defined]
    assert list(results) == []  # as a closed generator: nothing more, not even the run in hand
    assert pool.cancelled == pool.batches[1:] and pool.waited == [True]
    dropped = iter(ResultWindow(pool.submit, [(i,) for i in range(8)], None, None, pool.cancel, slice_size=4))
    pool.settle(2)
    assert next(dropped) == 0
    del dropped  # dropped unclosed, once started: cancelled as when it is closed
    assert pool.cancelled[-1] is pool.batches[3]  # its first slice was taken whole (a run in hand)


class _Pool:
    """What Executor's slicing asks of its pool, with the real chunking arithmetic."""

    def __init__(self, consumers: int, prefetch: int, chunk_size: int = 1000) -> None:
        from zdq.codec.chunking import Chunking

        self._chunking = Chunking(chunk_size=chunk_size, chunk_bytes=1 << 22, max_bytes=1 << 26, prefetch=prefetch)
        self._consumers = consumers
        self.settings = self._chunking  # .prefetch

    def consumer_count(self) -> int:
        return self._consumers

    def map_chunk_size(self, n: int | None) -> int:
        return self._chunking.batch_size(None, n, consumers=self._consumers if n is not None else 0, queues=2)


@pytest.mark.parametrize(
    ("consumers", "prefetch", "buffersize", "chunk", "size"),
    [
        (2, 2, 20_000, 1000, 5000),  # the bench's: a fourth of the buffer, in chunks of 1,000
        (2, 2, 2000, 125, 500),  # a fourth, its chunks spread over the consumers' prefetch
        (2, 2, 8, 1, 2),
        (8, 1, 8, 1, 1),  # a fourth out of flight would idle a fourth of the consumers: one chunk a slice
        (8, 1, 10, 1, 2),  # 8 in flight while a slice of 2 refills: every consumer still busy
        (16, 1, 40, 1, 10),
        (1, 1, 1, 1, 1),
        (2, 2, 3, 1, 1),
    ],
)
def test_a_buffered_maps_slices_are_a_fourth_of_the_buffer_unless_that_would_idle_consumers(
    consumers: int, prefetch: int, buffersize: int, chunk: int, size: int
) -> None:
    from zdq.client.executor import PoolExecutor

    class Slicing:  # PoolExecutor's slicing over a stand-in pool: no cluster
        _buffered_slices = PoolExecutor._buffered_slices
        _held = PoolExecutor._held

        def __init__(self, pool: _Pool) -> None:
            self._pool = pool

    assert Slicing(_Pool(consumers, prefetch))._buffered_slices(buffersize) == (chunk, size)  # type: ignore[misc]
