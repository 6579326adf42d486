"""daskqueue's actor mode on worker processes, as its own tests and programs used it: a
``QueuePoolActor`` and consumer classes placed as Dask actors by hand, the consumers given the
pool's handle and started (``consumer.start()``). Every item put is handed to one consumer once,
``cancel()`` loses none (daskqueue's cancelled its loop mid-get), an item that raises is logged and
the loop goes on, ``max_concurrency`` bounds what runs at once, and bad arguments fail at the call."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import psutil
import pytest
from distributed import Client, LocalCluster, get_client

from zdq import ConsumerBaseClass, DummyConsumer, GeneralConsumer, QueuePoolActor, TransientQueue

#: Seconds any one wait of these tests may take.
WAIT = 30


class Flaky(ConsumerBaseClass):
    """Raises for 13; records the most items it ran at once."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._lock = threading.Lock()
        self.now = self.most = 0

    def process_item(self, item: Any) -> Any:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(0.02)
            if item == 13:
                raise ValueError("13 is refused")
            return item
        finally:
            with self._lock:
                self.now -= 1

    async def most_at_once(self) -> int:
        return self.most


class Awaiting(ConsumerBaseClass):
    """An async process_item: its coroutine is awaited."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.seen: list[Any] = []

    async def process_item(self, item: Any) -> None:
        await asyncio.sleep(0)
        self.seen.append(item)

    async def how_many_seen(self) -> int:
        return len(self.seen)


class SlowQueue(TransientQueue):
    """A queue whose takes answer after ``stall`` seconds, having taken their items then."""

    stall = 0.0

    async def get_up_to(self, n: int) -> list[Any]:
        await asyncio.sleep(self.stall)
        return await super().get_up_to(n)

    async def get_many(self, n: int, timeout: float | None = None) -> list[Any]:
        await asyncio.sleep(self.stall)
        return await super().get_many(n, timeout)

    async def set_stall(self, seconds: float) -> None:
        self.stall = seconds


class AckFails(TransientQueue):
    """A queue whose acknowledgements fail (its worker lost or silent at that moment)."""

    async def ack_many(self, items: Any) -> None:
        raise OSError("Unable to contact Actor's worker")


class Cancelling(ConsumerBaseClass):
    """Items that raise CancelledError of their own."""

    def process_item(self, item: Any) -> None:
        if item % 2:
            raise asyncio.CancelledError


async def double(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


class SlowPool:
    """A pool of given queues whose get_next_queue answers after ``pause`` seconds."""

    def __init__(self, queues: list[Any], pause: float) -> None:
        self.queues, self.pause, self.asked = queues, pause, 0

    async def get_next_queue(self) -> Any:
        await asyncio.sleep(self.pause)
        self.asked += 1
        return self.queues[(self.asked - 1) % len(self.queues)]


def _until(check: Any, what: str) -> None:
    give_up = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > give_up:
            pytest.fail(f"{what}: not within {WAIT} s")
        time.sleep(0.05)


def _held(pool: Any) -> int:
    return sum(pool.get_queue_size().result(timeout=WAIT).values())


def test_consumers_placed_by_hand_take_every_item_of_a_pool_actor_once_and_stop_on_cancel(client: Client) -> None:
    pool = client.submit(QueuePoolActor, 2, actor=True).result(timeout=WAIT)
    assert pool.get_len().result(timeout=WAIT) == 2 and _held(pool) == 0
    consumers = [
        client.submit(DummyConsumer, i + 1, f"dummy-{i}", pool, 7, 4, 1, False, actor=True, pure=False).result(timeout=WAIT)
        for i in range(2)
    ]
    items = list(range(500))
    for part in (items[:250], items[250:]):
        assert pool.put_many(part).result(timeout=WAIT) is None
    assert _held(pool) == 500 and not consumers[0].done().result(timeout=WAIT)  # not started: not done
    for consumer in consumers:
        consumer.start().result(timeout=WAIT)
    assert all(c.is_consumming().result(timeout=WAIT) for c in consumers)
    _until(lambda: sum(c.len_items().result(timeout=WAIT) for c in consumers) == 500, "all 500 items handed out")
    assert all(c.cancel().result(timeout=WAIT) for c in consumers)
    assert all(c.done().result(timeout=WAIT) and not c.is_consumming().result(timeout=WAIT) for c in consumers)
    taken = [item for c in consumers for item in c.get_items().result(timeout=WAIT)]
    assert sorted(taken) == items and _held(pool) == 0
    # each consumer took from its own queue, the pool's queues in turn
    queues = [c.get_current_queue().result(timeout=WAIT) for c in consumers]
    assert {q.key for q in queues} == {q.key for q in pool.get_queues().result(timeout=WAIT)}


def test_a_cancel_loses_no_item_the_queues_still_hold_and_a_start_again_takes_them(client: Client) -> None:
    pool = client.submit(QueuePoolActor, 1, actor=True).result(timeout=WAIT)
    consumer = client.submit(DummyConsumer, 1, "dummy-0", pool, 1, 1, 1, True, actor=True, pure=False).result(timeout=WAIT)
    pool.put_many(list(range(2000))).result(timeout=WAIT)
    consumer.start().result(timeout=WAIT)
    time.sleep(0.05)
    assert consumer.cancel().result(timeout=WAIT) is True
    handed, held = consumer.len_items().result(timeout=WAIT), _held(pool)
    assert handed >= 1 and handed + held == 2000  # the batch it took was handed on, the rest stayed
    consumer.start().result(timeout=WAIT)
    _until(lambda: _held(pool) == 0 and consumer.len_items().result(timeout=WAIT) == 2000, "the rest handed out after a new start")
    assert consumer.cancel().result(timeout=WAIT)
    assert sorted(consumer.get_items().result(timeout=WAIT)) == list(range(2000))


def test_an_item_that_raises_is_counted_and_the_loop_goes_on_within_max_concurrency(client: Client) -> None:
    pool = client.submit(QueuePoolActor, 1, actor=True).result(timeout=WAIT)
    consumer = client.submit(Flaky, 1, "flaky-0", pool, 10, 3, 0, False, actor=True, pure=False).result(timeout=WAIT)
    consumer.start().result(timeout=WAIT)
    for i in range(40):
        pool.put(i).result(timeout=WAIT)
    _until(lambda: consumer.len_items().result(timeout=WAIT) == 40, "40 items handed out")
    assert consumer.cancel().result(timeout=WAIT)
    assert consumer.failed_items == 1 and consumer.loop_error is None
    assert 1 <= consumer.most_at_once().result(timeout=WAIT) <= 3


def test_messages_submitted_to_a_pool_actor_are_run_by_a_general_consumer_placed_by_hand(client: Client) -> None:
    pool = client.submit(QueuePoolActor, 1, "transient", 1, False, actor=True).result(timeout=WAIT)
    for i in range(5):
        pool.submit(pow, i, 2).result(timeout=WAIT)
    consumer = client.submit(GeneralConsumer, 1, "general-0", pool, 10, 10, 0, False, actor=True, pure=False).result(timeout=WAIT)
    consumer.start().result(timeout=WAIT)
    _until(lambda: consumer.len_items().result(timeout=WAIT) == 5, "5 messages handed out")
    assert consumer.cancel().result(timeout=WAIT)
    messages = consumer.get_items().result(timeout=WAIT)
    assert sorted(m.data() for m in messages) == [0, 1, 4, 9, 16] and all(m.delivered_timestamp for m in messages)
    assert consumer.failed_items == 0
    assert consumer.get_results().result(timeout=WAIT) == {hash(m): m.data() for m in messages}  # daskqueue's save kept them


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0,), ValueError, "n_queues must be an int from 1 to 1024"),
        ((1, "durable"), NotImplementedError, "durability='durable'"),
        ((1, "sometimes"), ValueError, "durability must be 'transient' or 'durable'"),
    ],
)
def test_a_pool_actor_with_bad_arguments_fails_at_its_placing(client: Client, args: tuple[Any, ...], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        client.submit(QueuePoolActor, *args, actor=True, pure=False).result(timeout=WAIT)


def test_a_consumer_placed_by_hand_without_a_pool_actor_says_so_at_start(client: Client) -> None:
    consumer = client.submit(DummyConsumer, 1, "dummy-0", "a-pool-name", 1, 1, 1, False, actor=True, pure=False).result(timeout=WAIT)
    with pytest.raises(TypeError, match="takes items from a daskqueue QueuePoolActor"):
        consumer.start().result(timeout=WAIT)
    assert consumer.cancel().result(timeout=WAIT) and not consumer.done().result(timeout=WAIT)


def _set_call_timeout(seconds: float) -> float:
    import zdq.consumer.daskqueue_loop as loop

    before, loop.CALL_TIMEOUT = loop.CALL_TIMEOUT, seconds
    return before


def test_a_take_its_queue_is_slow_to_answer_is_waited_for_past_the_call_bound_and_loses_nothing(client: Client) -> None:
    """Dask does not cancel an actor's call: a take abandoned at the bound still takes its items,
    which were lost (the loop ended too). It is waited for, said in the log."""
    queue = client.submit(SlowQueue, actor=True, pure=False).result(timeout=WAIT)
    pool = client.submit(SlowPool, [queue], 0.0, actor=True, pure=False).result(timeout=WAIT)
    consumer = client.submit(DummyConsumer, 1, "dummy-0", pool, 50, 10, 0, False, actor=True, pure=False).result(timeout=WAIT)
    before = client.run(_set_call_timeout, 0.5, workers=[consumer._address])[consumer._address]
    try:
        queue.put_nowait_batch(list(range(200))).result(timeout=WAIT)
        queue.set_stall(2.0).result(timeout=WAIT)
        consumer.start().result(timeout=WAIT)
        time.sleep(0.3)
        queue.set_stall(0.0).result(timeout=WAIT)
        _until(lambda: consumer.len_items().result(timeout=WAIT) == 200, "all 200 items handed out")
        assert consumer.loop_error is None and consumer.is_consumming().result(timeout=WAIT)
        assert consumer.cancel().result(timeout=WAIT) and queue.qsize().result(timeout=WAIT) == 0
    finally:
        client.run(_set_call_timeout, before, workers=[consumer._address])


def test_start_and_cancel_overlapping_end_as_the_later_call_says_and_never_run_two_loops(client: Client) -> None:
    queues = [client.submit(TransientQueue, actor=True, pure=False).result(timeout=WAIT) for _ in range(2)]
    pool = client.submit(SlowPool, queues, 0.5, actor=True, pure=False).result(timeout=WAIT)
    for q in queues:
        q.put_nowait_batch(list(range(20))).result(timeout=WAIT)
    # a cancel() while start() waits for its queue wins: nothing is taken
    consumer = client.submit(DummyConsumer, 1, "dummy-0", pool, 1, 1, 0, False, actor=True, pure=False).result(timeout=WAIT)
    starting = consumer.start()
    time.sleep(0.1)
    assert consumer.cancel().result(timeout=WAIT) is True
    starting.result(timeout=WAIT)
    time.sleep(0.3)
    assert not consumer.is_consumming().result(timeout=WAIT) and consumer.len_items().result(timeout=WAIT) == 0
    # two start()s at once run one loop, on one queue (two loops drained both queues)
    other = client.submit(DummyConsumer, 2, "dummy-1", pool, 1, 1, 0, False, actor=True, pure=False).result(timeout=WAIT)
    both = [other.start(), other.start()]
    for started in both:
        started.result(timeout=WAIT)
    _until(lambda: other.len_items().result(timeout=WAIT) == 20, "20 items handed out")
    time.sleep(0.3)
    assert sorted(q.qsize().result(timeout=WAIT) for q in queues) == [0, 20] and other.len_items().result(timeout=WAIT) == 20
    # a start() after a cancel() that ran out of time resumes, on the same queue
    mine = other.get_current_queue().result(timeout=WAIT).key
    mine_q = next(q for q in queues if q.key == mine)
    mine_q.put_nowait_batch(list(range(100, 130))).result(timeout=WAIT)
    other.cancel(timeout=0).result(timeout=WAIT)
    other.start().result(timeout=WAIT)
    _until(lambda: other.len_items().result(timeout=WAIT) == 50, "the 30 items put later handed out")
    assert other.get_current_queue().result(timeout=WAIT).key == mine and other.cancel().result(timeout=WAIT)


def test_an_idle_consumer_of_a_large_batch_stays_idle_and_none_is_an_item_like_any(client: Client) -> None:
    pool = client.submit(QueuePoolActor, 1, actor=True).result(timeout=WAIT)
    consumer = client.submit(DummyConsumer, 1, "dummy-0", pool, 10**6, 1, 0, False, actor=True, pure=False).result(timeout=WAIT)
    consumer.start(timeout=0).result(timeout=WAIT)  # daskqueue's get wait: no busy loop at 0 either
    where = consumer._address
    pid = client.run(os.getpid, workers=[where])[where]
    time.sleep(0.3)
    before = sum(psutil.Process(pid).cpu_times()[:2])
    time.sleep(2)
    busy = sum(psutil.Process(pid).cpu_times()[:2]) - before
    assert busy < 0.6, f"an idle consumer's worker used {busy:.2f} s of CPU in 2 s"  # daskqueue's padding: ~2 s
    pool.put(None).result(timeout=WAIT)
    _until(lambda: consumer.len_items().result(timeout=WAIT) == 1, "None handed out")
    assert consumer.get_items().result(timeout=WAIT) == [None] and consumer.cancel().result(timeout=WAIT)


def test_a_released_consumer_stops_taking_and_async_items_and_general_results_work(client: Client) -> None:
    pool = client.submit(QueuePoolActor, 1, actor=True).result(timeout=WAIT)
    dropped = client.submit(DummyConsumer, 1, "dummy-0", pool, 1, 1, 0, False, actor=True, pure=False)
    dropped.result(timeout=WAIT).start().result(timeout=WAIT)
    del dropped
    _until(lambda: not client.run_on_scheduler(lambda dask_scheduler: [k for k in dask_scheduler.tasks if "DummyConsumer" in str(k)]), "the dropped consumer released")
    time.sleep(0.2)
    pool.put_many(list(range(10))).result(timeout=WAIT)
    time.sleep(0.5)
    assert sum(pool.get_queue_size().result(timeout=WAIT).values()) == 10  # nobody took them for a dropped actor
    awaiting = client.submit(Awaiting, 1, "awaiting-0", pool, 4, 2, 0, False, actor=True, pure=False).result(timeout=WAIT)
    awaiting.start().result(timeout=WAIT)
    _until(lambda: awaiting.how_many_seen().result(timeout=WAIT) == 10, "10 items seen by an async process_item")
    assert awaiting.cancel().result(timeout=WAIT) and awaiting.failed_items == 0


def test_a_cancel_gives_back_at_once_what_its_batch_had_not_started_first_in_line(client: Client) -> None:
    pool = client.submit(QueuePoolActor, 1, actor=True).result(timeout=WAIT)
    consumer = client.submit(Flaky, 1, "flaky-0", pool, 500, 1, 0, False, actor=True, pure=False).result(timeout=WAIT)
    pool.put_many(list(range(1000, 1500))).result(timeout=WAIT)  # 500 items of 20 ms: 10 s in one batch
    consumer.start().result(timeout=WAIT)
    _until(lambda: consumer.len_items().result(timeout=WAIT) >= 5, "5 items started")
    began = time.monotonic()
    assert consumer.cancel(timeout=3).result(timeout=WAIT) is True and time.monotonic() - began < 3
    handed = consumer.get_items().result(timeout=WAIT)
    queue = consumer.get_current_queue().result(timeout=WAIT)
    assert 5 <= len(handed) < 100 and queue.qsize().result(timeout=WAIT) == 500 - len(handed)
    assert handed == list(range(1000, 1000 + len(handed)))
    assert queue.get_nowait().result(timeout=WAIT) == 1000 + len(handed)  # given back first in line, in order


def test_an_early_acknowledgement_that_fails_runs_its_batch_and_items_own_cancels_and_async_calls_count(client: Client) -> None:
    queue = client.submit(AckFails, actor=True, pure=False).result(timeout=WAIT)
    pool = client.submit(SlowPool, [queue], 0.0, actor=True, pure=False).result(timeout=WAIT)
    from zdq import Message

    queue.put_nowait_batch([Message(double, i) for i in range(10)]).result(timeout=WAIT)
    general = client.submit(GeneralConsumer, 1, "general-0", pool, 10, 2, 0, True, actor=True, pure=False).result(timeout=WAIT)
    general.start().result(timeout=WAIT)
    _until(lambda: len(general.get_results().result(timeout=WAIT)) == 10, "10 async calls run and saved")
    assert sorted(general.get_results().result(timeout=WAIT).values()) == [2 * i for i in range(10)]
    assert general.loop_error is None and general.cancel().result(timeout=WAIT)
    cancelling = client.submit(Cancelling, 2, "cancelling-0", pool, 10, 2, 0, False, actor=True, pure=False).result(timeout=WAIT)
    queue.put_nowait_batch(list(range(10))).result(timeout=WAIT)
    cancelling.start().result(timeout=WAIT)
    _until(lambda: cancelling.len_items().result(timeout=WAIT) == 10, "10 items handed out")
    assert cancelling.cancel().result(timeout=WAIT) and cancelling.failed_items == 5


def _client_here() -> bool:
    return get_client() is not None  # the worker's own client: actor handles it unpickles bind to it


def test_a_queue_whose_worker_is_killed_ends_its_loops_and_what_was_taken_runs_here() -> None:
    """Dask's call to an actor whose worker died never answers (the handle waits on the actor's
    future): a cancel() waiting to give items back hung, and an idle loop ran on for ever."""
    import signal

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None) as cluster, Client(cluster) as client:
        doomed, kept = sorted(w.worker_address for w in cluster.workers.values())
        assert client.submit(_client_here, workers=[kept], pure=False).result(timeout=WAIT)
        queue = client.submit(TransientQueue, actor=True, pure=False, workers=[doomed]).result(timeout=WAIT)
        pool = client.submit(SlowPool, [queue], 0.0, actor=True, pure=False, workers=[kept]).result(timeout=WAIT)
        busy = client.submit(Flaky, 1, "flaky-0", pool, 300, 1, 0, False, actor=True, pure=False, workers=[kept]).result(timeout=WAIT)
        idle = client.submit(DummyConsumer, 2, "dummy-1", pool, 1, 1, 0, False, actor=True, pure=False, workers=[kept]).result(timeout=WAIT)
        queue.put_nowait_batch(list(range(300))).result(timeout=WAIT)
        busy.start().result(timeout=WAIT)
        _until(lambda: busy.len_items().result(timeout=WAIT) >= 3, "3 items started")
        idle.start().result(timeout=WAIT)
        time.sleep(0.3)
        os.kill(client.run(os.getpid, workers=[doomed])[doomed], signal.SIGKILL)
        began = time.monotonic()
        assert busy.cancel(timeout=WAIT).result(timeout=WAIT + 10) is True
        assert time.monotonic() - began < 25
        assert sorted(busy.get_items().result(timeout=WAIT)) == list(range(300))  # its queue gone: they ran here
        _until(lambda: not idle.is_consumming().result(timeout=WAIT), "the idle loop ended")
        assert "has left the cluster" in str(idle.loop_error) or "Unable to contact" in str(idle.loop_error)
