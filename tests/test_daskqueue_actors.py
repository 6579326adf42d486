"""daskqueue's actor mode on worker processes, as its own tests and programs used it: a
``QueuePoolActor`` and consumer classes placed as Dask actors by hand, the consumers given the
pool's handle and started (``consumer.start()``). Every item put is handed to one consumer once,
``cancel()`` loses none (daskqueue's cancelled its loop mid-get), an item that raises is logged and
the loop goes on, ``max_concurrency`` bounds what runs at once, and bad arguments fail at the call."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from distributed import Client

from zdq import ConsumerBaseClass, DummyConsumer, GeneralConsumer, QueuePoolActor

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


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0,), ValueError, "n_queues must be an int >= 1"),
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
