"""daskqueue's ``TransientQueue`` on an event loop and as a Dask actor on worker processes, as
daskqueue's own tests placed it (``client.submit(TransientQueue, actor=True)``): its waits give
the worker's event loop to the calls that end them (daskqueue's blocked it), ``queue.Full``
reaches the caller, and ``QueuePoolActor`` placed as an actor refuses, naming what to use."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest
from distributed import Client

from zdq import QueuePoolActor, TransientQueue


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


def test_daskqueues_pool_actor_placed_as_an_actor_refuses_naming_what_to_use(client: Client) -> None:
    with pytest.raises(NotImplementedError, match=r"zdq has no QueuePoolActor.*zdq\.QueuePool\(client, n_queues"):
        client.submit(QueuePoolActor, 1, actor=True).result(timeout=30)


def test_a_daskqueue_message_put_in_a_queue_pool_is_run_by_its_general_consumers(client: Client) -> None:
    from zdq import ConsumerPool, Message, QueuePool

    from .tasks import add

    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=1) as consumers:
        batch = queue_pool.put_many([Message(add, 1, 2), Message(add, 5, b=5)])
        consumers.start()
        assert batch.result(timeout=60) == [3, 10]
