"""QueuePool and ConsumerPool end to end, on a LocalCluster of worker processes."""

from __future__ import annotations

import re
import asyncio
import concurrent.futures
import threading
import time
from pathlib import Path

import pytest
from distributed import Client

import zdq
from zdq import ConsumerBaseClass, ConsumerPool, QueuePool
from zdq.errors import BatchError, ClosedError, RemoteTaskError, SerializationError
from zdq._actor import scheduler_workers

from .conftest import wait_until
from .tasks import add, blob, fail, marked_blob, noop, process_item, raise_large, sleep


def test_a_daskqueue_program_runs_with_only_the_import_changed(client: Client) -> None:
    # The daskqueue notebook, line for line, with `from zdq import ...`.
    queue_pool = QueuePool(client, n_queues=2)
    consumer_pool = ConsumerPool(client, queue_pool, n_consumers=2)
    for _ in range(10):
        queue_pool.submit(process_item)
    # 10 tasks over 2 queues, no consumer yet: 5 pending in each, and the repr shows what was counted.
    assert queue_pool.get_queue_size() == dict.fromkeys(queue_pool.queue_names, 5)
    assert repr(queue_pool).count(", 5 pending (counted") == 2, repr(queue_pool)
    outcomes = queue_pool.driver._outcomes
    assert not outcomes.folding  # kept by chunk: no dict insertion per task until a reader shows up
    consumer_pool.start()
    consumer_pool.join()
    assert outcomes.folding  # join() comes before results(): from here on they are folded as they come
    result = consumer_pool.results()
    assert set(result) == {"GeneralConsumer-0", "GeneralConsumer-1"}
    assert sum(len(r) for r in result.values()) == 10
    assert all(v == 328350 for r in result.values() for v in r.values())
    assert consumer_pool.nb_consumed() == 10

    n_msgs = 100_000
    consumer_pool = ConsumerPool(client, queue_pool, n_consumers=2, batch_size=1000)
    queue_pool.batch_submit([(process_item,) for _ in range(n_msgs)], batch_size=10_000)
    consumer_pool.start()
    consumer_pool.join(progress=True)
    results = consumer_pool.results()
    assert sum(len(r) for r in results.values()) == n_msgs
    assert consumer_pool.nb_consumed() == n_msgs
    assert "2 GeneralConsumer consumers" in repr(consumer_pool)
    assert f"tasks: {10 + n_msgs} submitted, {10 + n_msgs} done" in repr(queue_pool)
    consumer_pool.close()
    queue_pool.close()


def test_the_scheduler_does_not_see_zdq_tasks(client: Client) -> None:
    def scheduler_counts(dask_scheduler):  # type: ignore[no-untyped-def]
        return len(dask_scheduler.tasks), dask_scheduler.transition_counter

    with QueuePool(client, 2) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=2) as consumers:
        consumers.start()
        before_tasks, before_transitions = client.run_on_scheduler(scheduler_counts)
        batch = queue_pool.batch_submit([(noop, i) for i in range(100_000)])
        assert batch.result(timeout=60) == list(range(100_000))
        after_tasks, after_transitions = client.run_on_scheduler(scheduler_counts)
    # 100,000 tasks ran, and the scheduler saw no new task and (almost) no transition.
    assert after_tasks <= before_tasks
    assert after_transitions - before_transitions < 50


def test_submit_returns_a_standard_future(client: Client) -> None:
    with QueuePool(client, 2) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=1) as consumers:
        consumers.start()
        called = threading.Event()
        futures = [queue_pool.submit(add, i, b=1) for i in range(20)]
        futures[0].add_done_callback(lambda f: called.set())
        done, not_done = zdq.wait(futures, timeout=30)
        assert not not_done
        assert sorted(f.result() for f in zdq.as_completed(futures)) == [i + 1 for i in range(20)]
        assert futures[3].result(timeout=1) == 4 and futures[3].done() and futures[3].exception() is None
        assert called.wait(5)
        assert isinstance(futures[0], concurrent.futures.Future)

        async def awaited() -> int:
            return await queue_pool.submit(add, 40, 2)

        assert asyncio.run(awaited()) == 42


def test_results_stream_back_before_the_whole_run_ends(client: Client) -> None:
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=1) as consumers:
        consumers.start()
        futures = []
        for _ in range(5):
            futures.append(queue_pool.submit(sleep, 0.5))
            queue_pool.flush()  # each its own chunk
        assert futures[0].result(timeout=30) == 0.5
        assert not futures[-1].done()
        assert [f.result(timeout=30) for f in futures] == [0.5] * 5


def test_a_failing_task_records_its_exception_and_traceback_and_the_consumer_carries_on(client: Client) -> None:
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=1) as consumers:
        bad = queue_pool.submit(fail, "boom")
        good = [queue_pool.submit(add, i) for i in range(5)]
        consumers.start()
        consumers.join(timeout=30)
        exc = bad.exception(timeout=10)
        assert isinstance(exc, ValueError) and str(exc) == "boom"
        notes = "\n".join(getattr(exc, "__notes__", []))
        assert "remote traceback" in notes and "in fail" in notes
        assert [f.result() for f in good] == [0, 1, 2, 3, 4]
        results = consumers.results()["GeneralConsumer-0"]
        assert isinstance(results[bad.key], ValueError)
        consumers.start()  # join() stopped the consumers, as daskqueue's does
        with pytest.raises(BatchError) as info:
            queue_pool.batch_submit([(add, 1), (fail, "x"), (add, 2)]).result(timeout=30)
        assert set(info.value.errors) == {1} and info.value.values == [1, None, 2]


def test_unpicklable_work_is_refused_with_the_culprit_named_and_nothing_queued(client: Client) -> None:
    lock = threading.Lock()
    with QueuePool(client, 2) as queue_pool:
        with pytest.raises(SerializationError, match="argument 1"):
            queue_pool.submit(add, 1, lock)
        with pytest.raises(SerializationError, match="keyword argument 'b'"):
            queue_pool.submit(add, 1, b=lock)
        with pytest.raises(SerializationError, match="function"):
            queue_pool.submit(lock.acquire)
        calls = [(add, i) for i in range(5000)] + [(add, lock)] + [(add, i) for i in range(5000)]
        with pytest.raises(SerializationError, match="item 5000 of the batch: .*argument 0"):
            queue_pool.batch_submit(calls, batch_size=1000)
        with pytest.raises(SerializationError, match="item 5000: .*argument 0") as raised:
            queue_pool.submit_iter(iter(calls[:5001]), batch_size=1000)
        # Read lazily, queued chunk by chunk: what came before the culprit is queued, and said so.
        assert raised.value.queued == 5000 and "(5000 tasks before this chunk were queued, and run)" in str(raised.value)
        with pytest.raises(SerializationError, match="cannot put the item"):
            queue_pool.put(lock)
        with pytest.raises(SerializationError, match="cannot put the item"):
            queue_pool.put_many(["a", lock])
        sizes = queue_pool.get_queue_size()
        assert sum(sizes.values()) == 5000  # only the submit_iter chunks before the culprit
        assert queue_pool.statistics().driver.tasks_submitted == 5000


class _Stubborn(int):
    """An int that refuses to be pickled."""

    def __reduce__(self) -> object:
        raise TypeError("not today")


def test_a_batch_by_columns_with_one_call_that_cannot_go_anywhere_in_it_queues_nothing(client: Client) -> None:
    # Calls of one function go by columns (SHARED chunks cut from columns of the whole batch): a
    # culprit first, at a chunk's edges, past a window's worth, in the middle or last, of any
    # kind (not picklable, an int subclass refusing, larger than max-message-size) stops all.
    n = 20_000
    nothing = "item {} of the batch: .*argument 0.*nothing of the batch was queued"
    culprits = ((threading.Lock(), nothing), (_Stubborn(3), nothing), ("x" * (1 << 17), "pickles to .* more than max-message-size"))
    with QueuePool(client, 2, window=2, chunk_bytes="16KiB", max_message_size="64KiB") as queue_pool:
        for where in (0, 999, 1000, 7999, 8000, n // 2, n - 1):
            for bad, match in culprits:
                calls = [(add, i, i) for i in range(n)]
                calls[where] = (add, bad, 1)
                with pytest.raises(SerializationError, match=match.format(where)):
                    queue_pool.batch_submit(calls, batch_size=1000, timeout=30)
        assert queue_pool.statistics().driver.tasks_submitted == 0
        assert sum(queue_pool.get_queue_size().values()) == 0
        batch = queue_pool.batch_submit([(add, i, i) for i in range(n)], batch_size=1000, timeout=30)  # and then it goes
        queue_pool.flush(timeout=30)
        assert queue_pool.statistics().driver.tasks_submitted == n
        with ConsumerPool(client, queue_pool, n_consumers=1, start=True):
            assert batch.result(timeout=60) == [2 * i for i in range(n)]


def test_a_task_larger_than_max_message_size_is_refused_at_the_call_by_every_way_in(client: Client) -> None:
    # Reviewer 23: submit() returned a pending future that failed later, where batch_submit raised.
    big = "x" * (1 << 17)
    with QueuePool(client, 1, max_message_size="64KiB") as queue_pool, queue_pool.executor() as executor:
        ways = (
            lambda: queue_pool.submit(len, big),
            lambda: queue_pool.submit(len, big, delay=0.1),
            lambda: queue_pool.submit_call(len, (big,)),
            lambda: executor.submit(len, big),
            lambda: queue_pool.batch_submit([(len, big)]),
        )
        for way in ways:
            with pytest.raises(SerializationError, match="pickles to [0-9]+ bytes, more than max-message-size"):
                way()
        assert queue_pool.statistics().driver.tasks_submitted == 0
        with ConsumerPool(client, queue_pool, n_consumers=1, start=True):
            assert queue_pool.submit(len, "ab").result(timeout=60) == 2


def test_a_task_near_max_message_size_is_run_or_refused_at_the_call_never_lost_on_the_wire(client: Client) -> None:
    # Reviewer 24: tasks within ~150 bytes of the limit were accepted; some chunks were then
    # dropped by the broker's socket (CurveZMQ's box around a frame counts against the limit)
    # and their futures never settled, others failed later.
    limit = 64 << 10
    with QueuePool(client, 1, max_message_size=limit) as queue_pool:
        sent, refused = [], 0
        for n in range(limit - 600, limit + 20, 20):
            try:
                sent.append((n, queue_pool.submit(len, b"y" * n)))
            except SerializationError:
                refused += 1
        assert sent and refused  # the band is split between the two
        assert max(n for n, _ in sent) < min(n for n in range(limit - 600, limit + 20, 20) if n not in dict(sent))
        with ConsumerPool(client, queue_pool, n_consumers=1, start=True):
            assert [f.result(timeout=60) for _, f in sent] == [n for n, _ in sent]


@pytest.mark.parametrize("max_concurrency", [1, 2])
def test_results_that_each_fit_but_not_together_reach_their_futures_by_a_split(client: Client, max_concurrency: int) -> None:
    # Reviewer 27a: zdq put six tasks whose 600 KiB results each fit a 1 MiB report in one chunk,
    # and failed those that did not fit beside the others (SerializationError), values lost.
    size = 600 << 10
    with QueuePool(client, 1, max_message_size="1MiB") as queue_pool:
        batch = queue_pool.batch_submit([(blob, size)] * 6, batch_size=6)  # one chunk
        singles = [queue_pool.submit(blob, size) for _ in range(4)]  # packed together by the driver
        with ConsumerPool(client, queue_pool, n_consumers=1, max_concurrency=max_concurrency, start=True):
            assert [len(v) for v in batch.result(timeout=60)] == [size] * 6
            assert [len(f.result(timeout=60)) for f in singles] == [size] * 4
            stats = queue_pool.statistics()
            assert stats.driver.tasks_completed == 10 and stats.driver.tasks_failed == 0
            assert sum(b.chunks_split for b in stats.brokers) >= 1
        # A result too large alone fails its own task, and only it, without a split: running the
        # chunk's tasks again would not help it (reviewer 28a: 99 of 200 small tasks ran twice).
        split = sum(b.chunks_split for b in queue_pool.statistics().brokers)
        mixed = queue_pool.batch_submit([(blob, 2 << 20), (blob, 10), (blob, 20)], batch_size=3)
        with ConsumerPool(client, queue_pool, n_consumers=1, start=True):
            with pytest.raises(BatchError) as caught:
                mixed.result(timeout=60)
            assert list(caught.value.errors) == [0] and caught.value.values[1:] == [b"x" * 10, b"x" * 20]
            assert isinstance(caught.value.errors[0], SerializationError)
            assert re.search(r"the result of task \d+ pickles to \d+ bytes, more than", str(caught.value.errors[0]))
            # So does an exception too large alone (reviewer 28e), keeping its type and its text's head.
            raised = queue_pool.batch_submit([(blob, 10), (raise_large, 2 << 20), (blob, 20)], batch_size=3)
            with pytest.raises(BatchError) as caught:
                raised.result(timeout=60)
            assert list(caught.value.errors) == [1] and caught.value.values[::2] == [b"x" * 10, b"x" * 20]
            error = caught.value.errors[1]
            assert isinstance(error, RemoteTaskError) and error.type_name == "builtins.ValueError", repr(error)[:200]
            assert str(error).startswith("builtins.ValueError: eeee") and str(error).endswith(" bytes)")
            assert "(cut: the error pickled to" in str(error)
        assert sum(b.chunks_split for b in queue_pool.statistics().brokers) == split


def test_tasks_of_a_chunk_split_for_the_size_of_its_results_ran_and_are_never_cancelled_as_not_started(
    client: Client, tmp_path: Path
) -> None:
    # Reviewer 28a: the parts of such a chunk went back as never started, and a cancel() then
    # said True of a task that had run (its value thrown away).
    size = 600 << 10
    with (
        QueuePool(client, 1, max_message_size="1MiB", prefetch=1) as queue_pool,
        ConsumerPool(client, queue_pool, n_consumers=1, start=True),
    ):
        batch = queue_pool.batch_submit([(marked_blob, str(tmp_path), i, size, 0.3) for i in range(4)], batch_size=4)
        # The chunk ran whole, then its parts began to run again, each alone.
        wait_until(lambda: any(f.read_text() == "xx" for f in tmp_path.iterdir()), timeout=60, interval=0.02)
        assert batch.cancel() is False  # every task may have started: none is cancelled
        assert [len(v) for v in batch.result(timeout=60)] == [size] * 4


@pytest.mark.parametrize("way", ["early_ack", "expires"])
def test_results_too_large_together_fail_the_largest_where_running_again_would_not_be_true(client: Client, way: str) -> None:
    # early_ack: a chunk leaves the broker on receipt and never runs again. An expiry: a part run
    # again after it would say "expired, it never ran" of a task that ran (reviewer 28a). Those
    # chunks' largest results fail (SerializationError), counted as failures by the consumer too.
    size = 600 << 10
    with QueuePool(client, 1, max_message_size="1MiB") as queue_pool:
        options = {"expires": time.time() + 3600} if way == "expires" else {}
        batch = queue_pool.batch_submit([(blob, size)] * 3, batch_size=3, **options)
        with ConsumerPool(client, queue_pool, n_consumers=1, early_ack=way == "early_ack", start=True) as consumers:
            with pytest.raises(BatchError) as caught:
                batch.result(timeout=60)
            assert all(isinstance(e, SerializationError) for e in caught.value.errors.values())
            assert 1 <= len(caught.value.errors) <= 2
            counts = consumers.statistics()[0]
            assert (counts.tasks_done, counts.tasks_failed) == (3 - len(caught.value.errors), len(caught.value.errors))
        assert sum(b.chunks_split for b in queue_pool.statistics().brokers) == 0


def test_bad_arguments_get_clear_errors(client: Client) -> None:
    with pytest.raises(ValueError, match="n_queues"):
        QueuePool(client, 0)
    with pytest.raises(ValueError, match="durability"):
        QueuePool(client, 1, durability="forever")
    with pytest.raises(ValueError, match="dirpath"):  # a durable one without: /tmp, as daskqueue's
        QueuePool(client, 1, dirpath="queue_dir")
    with QueuePool(client, 1) as queue_pool:
        with pytest.raises(TypeError, match="ConsumerBaseClass"):
            ConsumerPool(client, queue_pool, ConsumerClass=dict)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="n_consumers"):
            ConsumerPool(client, queue_pool, n_consumers=0)
        with pytest.raises(TypeError, match="item 1"):
            queue_pool.batch_submit([(noop,), "not a call"])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="callable"):
            queue_pool.submit(42)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="batch_size"):
            queue_pool.batch_submit([(noop,)], batch_size=0)


class Doubler(ConsumerBaseClass):
    def process_item(self, item: int) -> int:
        return item * 2


def test_a_custom_consumer_class_processes_raw_items(client: Client) -> None:
    with QueuePool(client, 2) as queue_pool:
        with ConsumerPool(client, queue_pool, ConsumerClass=Doubler, n_consumers=2) as consumers:
            one = queue_pool.put(21)
            many = queue_pool.put_many(list(range(1000)))
            consumers.start()
            consumers.join(timeout=30)
            assert one.result() == 42
            assert many.result() == [2 * i for i in range(1000)]
            merged = {k: v for r in consumers.results().values() for k, v in r.items()}
            assert len(merged) == 1001 and merged[one.key] == 42
            assert set(consumers.results()) == {"Doubler-0", "Doubler-1"}


def test_fewer_consumers_than_queues_drain_every_queue(client: Client) -> None:
    with QueuePool(client, 3) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=1) as consumers:
        batch = queue_pool.batch_submit([(add, i) for i in range(3000)], batch_size=100)
        consumers.start()
        assert batch.result(timeout=60) == list(range(3000))
        assert queue_pool.get_queue_size() == dict.fromkeys(queue_pool.queue_names, 0)


def test_max_concurrency_runs_io_bound_tasks_in_parallel(client: Client) -> None:
    with QueuePool(client, 1) as queue_pool:
        with ConsumerPool(client, queue_pool, n_consumers=1, max_concurrency=50) as consumers:
            consumers.start()
            started = time.monotonic()
            batch = queue_pool.batch_submit([(sleep, 0.05) for _ in range(200)])
            batch.result(timeout=60)
            # Serially this takes 10 s; fifty threads need about 0.2 s.
            assert time.monotonic() - started < 5


def test_submit_iter_streams_a_generator_through_a_bounded_window(client: Client) -> None:
    with QueuePool(client, 2, chunk_size=100, window=2) as queue_pool:
        with ConsumerPool(client, queue_pool, n_consumers=2) as consumers:
            consumers.start()
            count = queue_pool.submit_iter((add, i) for i in range(20_000))
            assert count == 20_000
            consumers.join(timeout=60)
            assert consumers.nb_consumed() == 20_000


def test_close_is_idempotent_and_fails_pending_futures(client: Client) -> None:
    queue_pool = QueuePool(client, 1)
    consumers = ConsumerPool(client, queue_pool)
    pending = queue_pool.submit(noop)
    consumers.close()
    consumers.close()
    queue_pool.close()
    queue_pool.close()
    assert isinstance(pending.exception(timeout=5), ClosedError)
    with pytest.raises(ClosedError):
        queue_pool.submit(noop)
    assert "closed" in repr(queue_pool) and "closed" in repr(consumers)


def test_functions_defined_in_a_test_module_or_as_lambdas_run_on_workers(client: Client) -> None:
    offset = 7
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool) as consumers:
        consumers.start()
        assert queue_pool.submit(lambda x: x + offset, 1).result(timeout=30) == 8


def test_a_task_larger_than_brokers_accept_is_refused_on_the_driver(client: Client) -> None:
    big = b"x" * (2 << 20)
    with QueuePool(client, 1, max_message_size="1MiB", chunk_bytes="256KiB") as queue_pool:
        with ConsumerPool(client, queue_pool) as consumers:
            consumers.start()
            with pytest.raises(SerializationError, match="max-message-size"):
                queue_pool.batch_submit([(len, b"small"), (len, big)])
            with pytest.raises(SerializationError, match="max-message-size"):  # at the call too
                queue_pool.submit(len, big)
            fine = queue_pool.submit(len, b"abc")
            assert fine.result(timeout=30) == 3
            # Chunks past chunk-bytes are split, not refused.
            assert queue_pool.batch_submit([(len, b"y" * 100_000) for _ in range(20)]).result(timeout=30) == [
                100_000
            ] * 20


def test_daskqueue_positional_arguments_and_submit_keywords_keep_their_meaning(client: Client) -> None:
    from zdq import GeneralConsumer

    with QueuePool(client, 1) as queue_pool:
        # daskqueue 0.2.0: ConsumerPool(client, queue_pool, ConsumerClass, n_consumers, batch_size,
        # retries, early_ack, max_concurrency)
        with ConsumerPool(client, queue_pool, GeneralConsumer, 2, 10, 0, False, 4) as consumers:
            assert (consumers.n_consumers, consumers.batch_size, consumers.retries) == (2, 10, 0)
            assert consumers.early_ack is False and consumers.max_concurrency == 4
            consumers.start()
            assert queue_pool.submit(add, 1, 2, worker_class=GeneralConsumer).result(timeout=30) == 3
            with pytest.raises(TypeError, match="worker_class"):
                queue_pool.submit(add, 1, 2, worker_class=Doubler)


def test_a_busy_consumer_still_fetches_its_next_chunk_while_one_runs(client: Client) -> None:
    # A busy consumer holds back its request for more, hoping a DONE can carry it; a long task must
    # not hold it back for long: the next chunk is prefetched while the first still runs.
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=1, prefetch=2) as consumers:
        consumers.start()
        # Only the first task must be long (the consumer runs one at a time): the others are the
        # chunk it prefetches and the one its credit holds back, short once their turn comes.
        batch = queue_pool.batch_submit([(sleep, 2.0), (sleep, 0.1), (sleep, 0.1)], batch_size=1)
        stats = wait_until(lambda: [s for s in consumers.statistics() if s.chunks_received == 2], timeout=1.8)
        assert stats[0].tasks_in_flight == 2 and not batch.done()
        assert batch.result(timeout=30) == [2.0, 0.1, 0.1]


def test_the_driver_acknowledges_results_so_brokers_forget_them(client: Client) -> None:
    # Receipts are batched, but go out on their own shortly after the last results arrive.
    with QueuePool(client, 2) as queue_pool, ConsumerPool(client, queue_pool) as consumers:
        consumers.start()
        assert [queue_pool.submit(add, i, 1).result(timeout=30) for i in range(5)] == [1, 2, 3, 4, 5]
        wait_until(lambda: all(s.awaiting_tasks == 0 for s in queue_pool.broker_statistics()), timeout=5)
        assert sum(s.chunks_acked for s in queue_pool.broker_statistics()) == 5


@pytest.mark.cluster
def test_a_threaded_cluster_runs_every_link_over_inproc() -> None:
    """``Client(processes=False)``, the laptop default: driver, brokers and consumers share one
    process and one context, so every link is inproc; it works the same and leaves nothing behind."""
    from distributed import LocalCluster

    from zdq.transport import sockets

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster, Client(cluster) as client:
        with QueuePool(client, 2) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=2) as consumers:
            consumers.start()
            assert all(sockets._local.get(e, "").startswith("inproc://") for e in queue_pool.endpoints)
            assert [queue_pool.submit(add, i, 1).result(timeout=30) for i in range(20)] == list(range(1, 21))
            assert queue_pool.batch_submit([(add, i, i) for i in range(5000)]).result(timeout=60) == [
                2 * i for i in range(5000)
            ]
            assert not any(stats.bad_messages for stats in queue_pool.broker_statistics())
        assert not any(e in sockets._local for e in queue_pool.endpoints)  # brokers stopped serving


def test_consumers_placed_but_not_started_name_their_workers_in_their_statistics(client: Client) -> None:
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=2) as consumers:
        stats = consumers.statistics()
        workers = set(scheduler_workers(client))
        assert [s.running for s in stats] == [False, False]
        assert all(s.worker in workers for s in stats), [s.worker for s in stats]
