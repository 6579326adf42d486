"""Futures as arguments (issue 24 section 2) and zdq.as_completed's Dask extras, end to end on a
LocalCluster of worker processes: a call given futures runs with their results, never runs when
one failed or was cancelled, and cancels along its inputs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from distributed import Client

import zdq
from zdq import ConsumerPool, QueuePool
from zdq.errors import SerializationError

from .conftest import wait_until
from .tasks import add, fail, mark_and_sleep, noop, sleep_return

pytestmark = pytest.mark.cluster


@pytest.fixture
def pool(client: Client):  # type: ignore[no-untyped-def]
    queue_pool = QueuePool(client, n_queues=1)
    consumers = ConsumerPool(client, queue_pool, n_consumers=2, start=True)
    try:
        yield queue_pool
    finally:
        consumers.cancel()
        queue_pool.close()


def test_a_future_as_an_argument_gives_its_result_anywhere_in_the_arguments(pool: QueuePool) -> None:
    a = pool.submit(sleep_return, 3, 0.3)
    b = pool.submit(add, a, 1)  # held here until a is done, then submitted with 3
    c = pool.submit(sum, [a, b])
    d = pool.submit(noop, {"pair": (a, b), "plain": [1, 2]})
    e = pool.submit(add, a, b=b)
    assert not b.done()
    assert b.result(60) == 4 and c.result(60) == 7 and e.result(60) == 7
    assert d.result(60) == {"pair": (3, 4), "plain": [1, 2]}
    assert isinstance(b, zdq.TaskFuture) and b.key is not None


def test_a_failed_input_gives_its_error_and_the_dependent_never_runs(pool: QueuePool, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    upstream = pool.submit(fail, "upstream broke")
    middle = pool.submit(noop, upstream)
    dependent = pool.submit(mark_and_sleep, str(marker), middle)  # would write marker if it ran
    with pytest.raises(ValueError, match="upstream broke"):
        dependent.result(60)
    assert type(dependent.exception(0)) is type(upstream.exception(0))
    pool.submit(noop, 1).result(60)  # the queue went on: a task submitted after it has run
    assert not marker.exists()


def test_cancelling_an_input_cancels_its_dependents_and_theirs(client: Client) -> None:
    with QueuePool(client) as queue_pool:  # no consumer: nothing starts
        upstream = queue_pool.submit(noop, 1)
        middle = queue_pool.submit(add, upstream, 1)
        last = queue_pool.submit(add, middle, 1)
        other = queue_pool.submit(add, 1, 1)
        assert upstream.cancel()
        # Dependents hear of it from the callback thread (callbacks never run on the driver's
        # I/O thread), so a moment after cancel() returns: waited for, bounded.
        wait_until(lambda: middle.cancelled() and last.cancelled(), timeout=10)
        assert not other.done()
        assert zdq.wait([middle, last], timeout=10).not_done == set()


def test_cancelling_a_held_call_drops_it_and_cancelling_a_submitted_one_cancels_its_task(client: Client) -> None:
    with QueuePool(client) as queue_pool:
        upstream = queue_pool.submit(noop, 1)
        held = queue_pool.submit(add, upstream, 1)
        assert held.cancel() and held.cancelled() and not upstream.done()
        done_input = zdq.TaskFuture(0)
        done_input.set_result(5)
        submitted = queue_pool.submit(add, done_input, 1)  # submitted at once: its input is done
        assert submitted.key is not None and submitted.cancel() and submitted.cancelled()
        stats = queue_pool.driver.statistics()  # the held call was never submitted
        assert (stats.tasks_submitted, stats.tasks_cancelled) == (2, 1)


def test_futures_of_another_pool_and_of_the_executor_are_taken(client: Client, pool: QueuePool) -> None:
    with QueuePool(client) as other:
        consumers = ConsumerPool(client, other, n_consumers=1, start=True)
        try:
            theirs = other.submit(add, 20, 1)
            with pool.executor() as executor:
                ours = executor.submit(add, theirs, 21)
                assert ours.result(60) == 42
        finally:
            consumers.cancel()


def test_a_future_given_to_map_or_batch_submit_is_refused_naming_submit(pool: QueuePool) -> None:
    fut = pool.submit(noop, 1)
    with pytest.raises(SerializationError, match="give it to submit"):
        pool.batch_submit([(noop, fut)])
    fut.result(60)


def test_as_completed_takes_futures_added_while_iterating_with_results(pool: QueuePool) -> None:
    done = zdq.as_completed([pool.submit(add, i, 0) for i in range(5)], with_results=True, timeout=60)
    seen = []
    for fut, value in done:
        seen.append(value)
        if value < 5:
            done.add(pool.submit(add, fut, 5))  # stage two: runs with stage one's result
    assert sorted(seen) == list(range(10)) and done.is_empty()


def test_as_completed_async_for_and_batches(pool: QueuePool) -> None:
    async def main() -> list[int]:
        done = zdq.as_completed([pool.submit(add, i, 0) for i in range(3)], with_results=True, timeout=60)
        out = []
        async for fut, value in done:
            out.append(value)
            if value == 0:
                done.add(pool.submit(add, fut, 10))
        return out

    assert sorted(asyncio.run(main())) == [0, 1, 2, 10]
    batches = zdq.as_completed([pool.submit(add, i, 0) for i in range(4)], timeout=60).batches()
    assert sorted(f.result() for batch in batches for f in batch) == [0, 1, 2, 3]


def test_map_resolves_futures_among_the_items_of_lists(pool: QueuePool) -> None:
    firsts = [pool.submit(add, i, 0) for i in range(3)]
    assert [f.result(60) for f in pool.map(add, firsts, [10, 20, 30])] == [10, 21, 32]
    assert [f.result(60) for f in pool.map(add, [1, 2], b=firsts[2])] == [3, 4]
    with pool.executor() as executor:
        assert list(executor.map(add, firsts, range(3), timeout=60)) == [0, 2, 4]
