"""daskqueue's ``TransientQueue`` on an event loop and as a Dask actor on worker processes, as
daskqueue's own tests placed it (``client.submit(TransientQueue, actor=True)``): its waits give
the worker's event loop to the calls that end them (daskqueue's blocked it), ``queue.Full``
reaches the caller (``QueuePoolActor`` and consumers placed by hand: ``test_daskqueue_actors.py``)."""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time

import pytest
from distributed import Client

from zdq import TransientQueue


def test_a_put_waiting_for_room_lets_the_event_loop_run_the_get_that_makes_it() -> None:
    """daskqueue's put blocked the worker's event loop (and with it every call to the actor)."""

    async def run() -> tuple[list[object], float]:
        q = TransientQueue(maxsize=1)
        await q.put("first")
        began = time.monotonic()
        waiting = asyncio.ensure_future(q.put("second", timeout=10))
        await asyncio.sleep(0.05)
        assert not waiting.done() and await q.get() == "first"
        await asyncio.wait_for(waiting, 5)
        return [await q.get(), await q.get()], time.monotonic() - began

    items, took = asyncio.run(run())
    assert items == ["second", None] and took < 5


def test_a_put_waiting_for_room_is_woken_by_a_get_of_another_thread_and_bounded_without_one() -> None:
    """A Dask actor's plain methods (get_nowait...) run on the actor's thread, its coroutines on
    the worker's event loop: a take on that thread wakes a put waiting on the loop."""

    async def run() -> tuple[float, object, float]:
        q = TransientQueue(maxsize=1)
        q.put_nowait("first")
        taker = threading.Timer(0.1, q.get_nowait)
        began = time.monotonic()
        taker.start()
        try:
            await asyncio.wait_for(q.put("second", timeout=20), 10)
        finally:
            taker.join(10)
        woken = time.monotonic() - began
        began = time.monotonic()
        with pytest.raises(queue.Full, match="waited 0.2 s for room"):
            await q.put("third", timeout=0.2)
        return woken, q.get_nowait(), time.monotonic() - began

    woken, second, bounded = asyncio.run(run())
    assert 0.09 <= woken < 5 and second == "second" and 0.19 <= bounded < 5


def test_as_a_dask_actor_it_serves_calls_while_a_put_waits_for_room_and_a_full_one_raises_queue_full(client: Client) -> None:
    q = client.submit(TransientQueue, maxsize=1, actor=True).result(timeout=30)
    assert q.put("first").result(timeout=30) is None and q.qsize().result(timeout=30) == 1
    waiting = q.put("second", timeout=20)  # on the worker's event loop, until a get makes room
    time.sleep(0.2)
    began = time.monotonic()
    assert q.full().result(timeout=30) and client.run(lambda: 1, workers=[q._address]) == {q._address: 1}
    assert q.get_nowait().result(timeout=30) == "first"  # on the actor's thread: it wakes the put
    assert waiting.result(timeout=30) is None and time.monotonic() - began < 15
    began = time.monotonic()
    with pytest.raises(queue.Full, match="waited 0.3 s for room"):
        q.put("third", timeout=0.3).result(timeout=30)
    assert time.monotonic() - began < 20
    assert q.get(timeout=5).result(timeout=30) == "second" and q.get(timeout=5).result(timeout=30) is None


def test_a_daskqueue_message_put_in_a_queue_pool_is_run_by_its_general_consumers(client: Client) -> None:
    from zdq import ConsumerPool, Message, QueuePool

    from .tasks import add

    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=1) as consumers:
        batch = queue_pool.put_many([Message(add, 1, 2), Message(add, 5, b=5)])
        consumers.start()
        assert batch.result(timeout=60) == [3, 10]


def test_each_take_wakes_one_waiting_put_so_a_thousand_drain_at_once_and_none_is_lost_or_doubled() -> None:
    """Every take used to wake every waiting put: 2,000 waiting puts moved 585 items in 60 s."""
    n = 1000

    async def run() -> tuple[list[object], float]:
        q = TransientQueue(maxsize=1)
        q.put_nowait("first")
        puts = [asyncio.ensure_future(q.put(i, timeout=60)) for i in range(n)]
        await asyncio.sleep(0.1)  # every put waits
        got: list[object] = []

        def drain() -> None:
            deadline = time.monotonic() + 30
            while len(got) < n + 1 and time.monotonic() < deadline:
                item = q.get_sync()
                if item is not None:
                    got.append(item)
                else:
                    time.sleep(0.0005)

        began = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(drain), 40)
        took = time.monotonic() - began
        await asyncio.wait_for(asyncio.gather(*puts), 10)
        return got, took

    got, took = asyncio.run(run())
    assert got[0] == "first" and sorted(got[1:]) == list(range(n))  # type: ignore[type-var]
    assert took < 15, f"1,000 waiting puts took {took:.1f} s to drain"


def test_a_put_cancelled_after_a_take_woke_it_hands_the_room_to_the_next_put() -> None:
    async def run() -> list[object]:
        q = TransientQueue(maxsize=1)
        q.put_nowait("first")
        first = asyncio.ensure_future(q.put("cancelled", timeout=30))
        second = asyncio.ensure_future(q.put("second", timeout=30))
        await asyncio.sleep(0.05)
        assert q.get_nowait() == "first"  # wakes the oldest put...
        first.cancel()  # ...which is cancelled before it runs again
        await asyncio.wait_for(second, 5)
        assert first.cancelled()
        return [q.get_nowait(), await q.get()]

    assert asyncio.run(run()) == ["second", None]


def test_a_batch_get_on_the_actors_thread_takes_all_it_asked_or_none_beside_other_takes() -> None:
    q = TransientQueue()
    short: list[int] = []
    stop = time.monotonic() + 1.0

    def other() -> None:
        while time.monotonic() < stop:
            q.put_nowait_batch([0, 1])  # the queue holds 0-4 items: a batch of 2 races this thread's takes
            q.get_sync()
            q.get_sync()

    taker = threading.Thread(target=other, name="test-other-take", daemon=True)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads take turns as often as they can: the race shows
    taker.start()
    try:
        while time.monotonic() < stop:
            try:
                batch = q.get_nowait_batch(2)
            except queue.Empty:
                continue
            if len(batch) != 2:
                short.append(len(batch))
    finally:
        taker.join(10)
        sys.setswitchinterval(switch)
    assert not short, f"{len(short)} batches came short"


def test_a_full_error_names_the_wait_whatever_number_the_timeout_was_and_a_message_taken_is_stamped() -> None:
    from fractions import Fraction

    from zdq import Message

    async def run() -> float | None:
        q = TransientQueue(maxsize=1)
        msg = Message(divmod, 7, 2)
        q.put_nowait(msg)
        with pytest.raises(queue.Full, match="waited 0.1 s for room"):
            await q.put("more", timeout=Fraction(1, 10))
        return (await q.get()).delivered_timestamp  # type: ignore[no-any-return]

    stamped = asyncio.run(run())
    assert stamped is not None and abs(stamped - time.time()) < 60
