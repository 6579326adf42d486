"""daskqueue's ``TransientQueue``, which its programs and tests used as a Dask actor of its own
(``from daskqueue import TransientQueue``), and ``QueuePoolActor``, whose import made three of
daskqueue's test modules fail to load with zdq in its place: the queue works as daskqueue's did,
with bounded waits that never hold the event loop; ``QueuePoolActor`` and the consume loop of
consumers placed by hand refuse bad arguments at the call (their work with a cluster:
``tests/test_daskqueue_actors.py``)."""

from __future__ import annotations

import pickle
import queue
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

import zdq
from zdq import GeneralConsumer, Message
from zdq.daskqueue_queues import TransientQueue

T = TypeVar("T")

pytestmark = pytest.mark.unit


def done(call: Coroutine[Any, Any, T]) -> T:
    """What a coroutine that does not wait returns (an event loop opens sockets: not in this tier)."""
    try:
        call.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    call.close()
    raise AssertionError(f"{call} waited")


def test_items_come_out_in_the_order_they_went_in_and_an_empty_queue_answers_as_daskqueues_did() -> None:
    q = TransientQueue()
    done(q.put(1))
    done(q.put_many(["a", None]))
    q.put_nowait(3)
    q.put_nowait_batch([4, 5])
    q.put_sync(6)
    assert (q.qsize(), q.empty(), q.full()) == (7, False, False)  # maxsize -1: unbounded
    got = [done(q.get()), q.get_nowait(), q.get_sync(), *q.get_nowait_batch(2), *done(q.get_many(3))]
    assert got == [1, "a", None, 3, 4, 5, 6, None]  # None: an item, then get_many's filler
    # Empty: get and get_sync answer None at once, whatever their timeout; get_nowait raises Empty.
    assert q.empty() and done(q.get(timeout=5)) is None and q.get_sync() is None and q.get_sync(timeout=0) is None
    with pytest.raises(queue.Empty):
        q.get_nowait()
    assert done(q.ack(1.0, "id")) is True and done(q.ack_many([(1.0, "id")])) is None and q.stop_gc() is None


def test_a_full_queue_refuses_at_once_and_a_batch_goes_in_whole_or_not_at_all() -> None:
    q = TransientQueue(maxsize=2.0)  # daskqueue's Queue took a whole float
    q.put_nowait(1)
    with pytest.raises(queue.Full, match="2 items do not fit"):
        q.put_nowait_batch([2, 3])
    with pytest.raises(queue.Full):
        done(q.put_many([2, 3]))
    assert q.qsize() == 1  # nothing of either batch went in
    q.put_nowait(2)
    assert q.full()
    for put in (q.put_nowait, q.put_sync):
        with pytest.raises(queue.Full, match=r"maxsize 2 \(holds 2\)$"):
            put(3)
    with pytest.raises(queue.Empty, match="cannot get 3 items from a TransientQueue of 2"):
        q.get_nowait_batch(3)
    assert q.get_nowait_batch(2) == [1, 2] and q.empty()


def test_numpys_numbers_are_taken_as_sizes_counts_and_seconds() -> None:
    np = pytest.importorskip("numpy")
    q = TransientQueue(maxsize=np.int64(3), ack_timeout=np.float32(2.5))
    q.put_nowait_batch([1, 2, 3])
    assert q.maxsize == 3 and q.get_nowait_batch(np.int32(2)) == [1, 2] and done(q.get_many(np.int64(2), timeout=np.float64(1))) == [3, None]


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: TransientQueue(maxsize="3"), "maxsize must be an int"),
        (lambda: TransientQueue(maxsize=2.5), "maxsize must be an int"),
        (lambda: TransientQueue(ack_timeout=-1), "ack_timeout must be a finite number of seconds >= 0"),
        (lambda: TransientQueue(retry="yes"), "retry must be a bool"),
        (lambda: TransientQueue().put_sync(1, timeout=float("nan")), "timeout must be a finite number of seconds >= 0"),
        (lambda: TransientQueue().put_sync(1, timeout=1), r"put_sync never waits .*await put\(item, timeout=...\) instead"),
        (lambda: TransientQueue().get_sync(timeout=1), "get_sync never waits"),
        (lambda: done(TransientQueue().get(timeout=-1)), "timeout must be a finite number of seconds >= 0"),
        (lambda: done(TransientQueue().put(1, timeout=float("inf"))), "timeout must be a finite number of seconds >= 0"),
        (lambda: done(TransientQueue().put(1, timeout=10**400)), "timeout must be a finite number of seconds >= 0"),
        (lambda: done(TransientQueue().put(1, timeout="1")), "timeout must be a finite number of seconds >= 0"),
        (lambda: TransientQueue().get_nowait_batch(-1), "num_items must be an int >= 0"),
        (lambda: done(TransientQueue().get_many(1.5)), "n must be an int >= 0"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_are_refused_at_the_call_and_change_nothing(call: object, error: str) -> None:
    with pytest.raises((TypeError, ValueError), match=error):
        call()  # type: ignore[operator]


def test_daskqueues_queue_names_import_from_its_paths_and_the_pool_actor_refuses_naming_what_to_use() -> None:
    from zdq import TransientQueue as top
    from zdq.queue import TransientQueue as in_queue
    from zdq.queue.transient_queue import Empty, Full, TransientQueue as in_module
    from zdq.QueuePool import QueuePool, QueuePoolActor

    assert top is in_queue is in_module is TransientQueue and (Empty, Full) == (queue.Empty, queue.Full)
    assert QueuePool is zdq.QueuePool and QueuePoolActor is zdq.QueuePoolActor
    with pytest.raises(RuntimeError, match=r"make it as one, client.submit\(QueuePoolActor, n_queues, actor=True\)"):
        QueuePoolActor(1, "transient", 1, False)  # no worker, no client: nowhere to place its queues


@pytest.mark.parametrize(
    "args, kwargs, error",
    [
        ((0,), {}, "n_queues must be an int from 1 to 1024"),
        ((1.5,), {}, "n_queues must be an int from 1 to 1024"),
        ((True,), {}, "n_queues must be an int from 1 to 1024"),
        ((10**6,), {}, r"n_queues must be an int from 1 to 1024 \(each queue is a Dask actor\), got 1000000"),
        ((1, "durable"), {}, r"durability='durable'\) keeps its tasks in LMDB"),
        ((1,), {"dirpath": "/tmp"}, "unexpected keyword arguments: dirpath"),
        ((1, "transient", -1), {}, "ack_timeout must be a finite number of seconds >= 0"),
        ((1, "transient", 5, "yes"), {}, "retry must be a bool"),
    ],
)
def test_a_pool_actor_refuses_bad_arguments_before_it_places_anything(args: tuple[Any, ...], kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises((TypeError, ValueError, NotImplementedError), match=error):
        zdq.QueuePoolActor(*args, **kwargs)


def test_the_consume_loop_of_a_consumer_placed_by_hand_needs_a_pool_actor_and_is_idle_until_started() -> None:
    consumer = zdq.DummyConsumer(1, "dummy-0", "pool-name", 1, 1, 0, False)
    assert not done(consumer.done()) and not done(consumer.is_consumming()) and done(consumer.len_items()) == 0
    assert done(consumer.cancel()) is True and done(consumer.get_current_queue()) is None
    with pytest.raises(TypeError, match=r"start\(\) takes items from a daskqueue QueuePoolActor given as its pool, got 'pool-name'"):
        done(consumer.start())
    consumer._start_lock = threading.Lock()  # type: ignore[assignment]  # as unpicklable as one bound to a loop
    assert pickle.loads(pickle.dumps(consumer)).fetch_loop is None


def test_the_pool_actors_methods_that_ask_its_queues_run_on_the_event_loop_never_on_the_actor_thread() -> None:
    """A plain method waits on the worker's one actor thread: one waiting there for another
    worker's actor thread deadlocks with a pool placed crosswise (each waits 60 s, and a put
    said to have failed went in)."""
    import inspect

    asking = ("print", "get_queue_size", "get_max_queue", "submit", "put", "put_many", "put_many_sync", "put_nowait")
    assert all(inspect.iscoroutinefunction(getattr(zdq.QueuePoolActor, name)) for name in asking)


def test_a_take_of_the_consume_loop_gets_what_the_queue_has_without_fillers_none_included() -> None:
    q = TransientQueue()
    q.put_nowait_batch([None, 0, "x"])
    assert done(q.get_up_to(10**6)) == [None, 0, "x"] and done(q.get_up_to(5)) == []
    q.put_nowait_batch([3, 4])
    done(q.put_back([1, 2]))
    assert done(q.get_up_to(3)) == [1, 2, 3]
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        done(q.get_up_to(-1))


@pytest.mark.parametrize(
    "args, call, error",
    [
        ((1, "c", object(), "abc", 1, 0, False), "start", "batch_size must be an int >= 1, got 'abc'"),
        ((1, "c", object(), 0, 1, 0, False), "start", "batch_size must be an int >= 1, got 0"),
        ((1, "c", object(), 1, "x", 0, False), "start", "max_concurrency must be an int >= 1, got 'x'"),
        ((1, "c", object(), 1, 1, 0, False), "start-nan", r"start\(timeout=...\) must be a finite number of seconds >= 0"),
        ((1, "c", object(), 1, 1, 0, False), "cancel-neg", r"cancel\(timeout=...\) must be a finite number of seconds >= 0"),
    ],
)
def test_the_consume_loop_refuses_bad_numbers_at_the_call_before_it_changes_anything(args: tuple[Any, ...], call: str, error: str) -> None:
    consumer = zdq.DummyConsumer(*args)
    with pytest.raises(ValueError, match=error):
        if call == "start":
            done(consumer.start())
        elif call == "start-nan":
            done(consumer.start(timeout=float("nan")))
        else:
            done(consumer.cancel(timeout=-1))
    assert consumer._wanted is False and consumer.fetch_loop is None


def test_an_actor_call_of_the_consume_loop_answers_as_a_plain_objects_method_does() -> None:
    from zdq.consumer.daskqueue_loop import call_actor

    q = TransientQueue()
    q.put_nowait(1)
    assert done(call_actor(q, "qsize")) == 1 and done(call_actor(q, "get_nowait")) == 1


def test_zdqs_pool_made_as_daskqueues_early_actor_pool_says_which_class_that_is() -> None:
    # daskqueue's early README placed its pool by client.submit(QueuePool, n, actor=True): the
    # worker calls QueuePool(n), whose n lands where zdq's pool wants its client (reviewer 27a).
    with pytest.raises(TypeError, match=r"got 5 \(daskqueue's early QueuePool\(n_queues\).*is zdq\.QueuePoolActor"):
        zdq.QueuePool(5)
    with pytest.raises(TypeError, match=r"got 'tcp://x:1'$"):
        zdq.QueuePool("tcp://x:1")  # type: ignore[arg-type]
