"""What daskqueue and Dask users expect, without traps, on a real LocalCluster."""

from __future__ import annotations

import gc
import logging
import os
import re
import tempfile
import threading
import time

import pytest
from distributed import Client

from zdq import ConsumerBaseClass, ConsumerPool, QueuePool, ZdqError
from zdq.errors import NoConsumers, ZdqTimeoutError
from zdq._actor import scheduler_workers

from .conftest import wait_until
from .tasks import add, fail, noop, sleep


class Upper(ConsumerBaseClass):
    def process_item(self, item: str) -> str:
        return item.upper()


class LogsItsId(ConsumerBaseClass):
    """As daskqueue's examples: ``logger.debug(f"[{self.id}] : Processing {item}")``."""

    def process_item(self, item: int) -> str:
        return f"[{self.id}] {item}"


class DaskqueueInit(ConsumerBaseClass):
    """A subclass written for daskqueue 0.2, with its ConsumerBaseClass.__init__ signature."""

    def __init__(self, id, name, pool, batch_size, max_concurrency, retries, early_ack):  # type: ignore[no-untyped-def]
        super().__init__(id, name, pool, batch_size, max_concurrency, retries, early_ack)
        self.prefix = f"{self.name}/{self.pool}/{self.batch_size}/{self.max_concurrency}/{self.n_retries}/{self.early_ack}"

    def process_item(self, item: int) -> str:
        return f"{self.prefix}: {item}"


def test_a_queue_handle_answers_daskqueues_queue_methods_with_futures(client: Client) -> None:
    with QueuePool(client, 2) as queue_pool:
        for _ in range(10):
            queue_pool.submit(noop)
        assert [queue_pool[i].qsize().result(timeout=30) for i in range(2)] == [5, 5]
        assert queue_pool[1].empty().result(timeout=30) is False
        assert queue_pool[0].full().result() is False
        assert queue_pool[-1].name == queue_pool.queue_names[1]
        assert isinstance(queue_pool[0].pid().result(timeout=30), int)
        with pytest.raises(IndexError, match="2 queues"):
            queue_pool[2]


def test_submitting_to_a_consumer_class_that_does_not_run_functions_is_also_a_runtime_error(client: Client) -> None:
    with QueuePool(client, 1) as queue_pool:
        for call in (
            lambda: queue_pool.submit(add, 1, 2, worker_class=Upper),
            lambda: queue_pool.batch_submit([(add, 1, 2)], worker_class=Upper),
        ):
            with pytest.raises(RuntimeError) as info:
                call()
            assert isinstance(info.value, (ZdqError, TypeError))
        assert queue_pool.statistics().driver.tasks_submitted == 0


def test_join_with_pending_tasks_and_no_running_consumer_says_so_at_once(client: Client) -> None:
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool) as consumers:
        future = queue_pool.submit(add, 1, 2)
        start = time.monotonic()
        with pytest.raises(NoConsumers, match=r"start\(\)"):
            consumers.join(timeout=60)
        assert time.monotonic() - start < 10
        with pytest.raises(ZdqTimeoutError, match="no consumer is running") as info:
            future.result(timeout=0.5)
        assert isinstance(info.value, TimeoutError)
        consumers.start()
        assert future.result(timeout=30) == 3


def test_a_consumer_pool_made_with_start_true_runs_at_once_and_join_stop_false_leaves_it_running(
    client: Client,
) -> None:
    with QueuePool(client, 2) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=2, start=True) as consumers:
        batch = queue_pool.batch_submit([(add, i, 1) for i in range(100)])
        consumers.join(timeout=60, stop=False)
        assert batch.result(timeout=5) == list(range(1, 101))
        # Still consuming: no start() needed for what comes next.
        assert queue_pool.submit(add, 2, 2).result(timeout=30) == 4
        consumers.join(timeout=60)  # the daskqueue default: stops them
        late = queue_pool.submit(add, 3, 3)
        with pytest.raises(TimeoutError):
            late.result(timeout=1.0)
        consumers.start()
        assert late.result(timeout=30) == 6


@pytest.mark.parametrize("how", ["batch_submit", "submit_iter", "submit_iter of a generator with total", "submit"])
def test_a_small_batch_of_long_tasks_runs_on_every_consumer(client: Client, how: str) -> None:
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=2) as consumers:
        consumers.start()
        calls = [(sleep, 0.005) for _ in range(1000)]
        start = time.monotonic()
        if how == "batch_submit":
            assert queue_pool.batch_submit(calls).result(timeout=60) == [0.005] * 1000
        elif how == "submit":
            futures = [queue_pool.submit(*call) for call in calls]
            assert [f.result(timeout=60) for f in futures] == [0.005] * 1000
        else:
            queue_pool.submit_iter(calls if how == "submit_iter" else iter(calls), total=1000)
            consumers.join(timeout=60)
        elapsed = time.monotonic() - start
        per_consumer = [len(r) for r in consumers.results().values()]
        assert len(per_consumer) == 2 and min(per_consumer) >= 200, per_consumer
        assert elapsed < 4.5, elapsed  # 5.2 s on one consumer; about 2.6 s on two


def test_failed_tasks_are_logged_from_the_users_frame_and_join_reports_them(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="zdq"):
        with QueuePool(client, 1, keep_results=False) as queue_pool:
            with ConsumerPool(client, queue_pool, start=True) as consumers:
                queue_pool.submit_iter((fail, f"boom {i}") for i in range(20))
                consumers.join(timeout=60)
                told = len(caplog.records)
                consumers.start()
                consumers.join(timeout=60)  # nothing failed since: nothing said again
                assert not [r.getMessage() for r in caplog.records[told:] if "failed" in r.getMessage()]
            with ConsumerPool(client, queue_pool, start=True) as later:
                queue_pool.submit(fail, "one more").exception(timeout=60)
                later.join(timeout=60)  # its own failure, not the earlier pool's twenty again
                assert "join: 1 task failed" in caplog.records[-1].getMessage()
    failures = [r for r in caplog.records if r.name == "zdq.tasks" and "failed:" in r.getMessage()]
    assert len(failures) == 5, [r.getMessage()[:80] for r in caplog.records]  # the first in full...
    text = failures[0].getMessage()
    assert "ValueError: boom" in text and "tests/tasks.py" in text
    frames = [line for line in text.splitlines() if line.strip().startswith("File ")]
    assert frames and "zdq" not in frames[0].split("/")[-2:][0], frames  # the user's frame comes first
    # ...then counted (with the later pool's one: said every 10 s at most, and at the pool's close)
    counts = [re.search(r"(\d+) more tasks? failed", r.getMessage()) for r in caplog.records]
    assert sum(int(m.group(1)) for m in counts if m) == 16
    assert any("join: 20 tasks failed" in r.getMessage() for r in caplog.records)


def test_bad_arguments_fail_at_the_call_naming_the_argument(client: Client, tmp_path: object) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        QueuePool(client, 1, chunk_size="big")
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        QueuePool(client, 1, heartbeat_timeout=-1)
    with pytest.raises(TypeError, match="nonsense"):
        QueuePool(client, 1, nonsense=3)
    with pytest.raises(ValueError, match="durable"):
        QueuePool(client, 1, dirpath=str(tmp_path))
    with pytest.raises(TypeError, match="QueuePool"):
        ConsumerPool(client, "not a pool")  # type: ignore[arg-type]
    with QueuePool(None, 1) as queue_pool:  # the default client, as Dask's APIs take it
        with pytest.raises(ValueError, match="time_limit"):
            queue_pool.submit(add, 1, 2, time_limit="soon")
        for call, match in (
            (lambda: queue_pool.submit(add, 1, 2, timeout=-1), "timeout must not be negative"),
            (lambda: queue_pool.submit(add, 1, 2, timeout="soon"), "timeout must be a number"),
            (lambda: queue_pool.batch_submit([(add, 1, 2)], timeout="x"), "timeout"),
            (lambda: queue_pool.submit_iter([(add, 1, 2)], timeout=[]), "timeout"),
            (lambda: queue_pool.submit(add, 1, 2, retry_backoff="x"), "retry_backoff"),
            (lambda: queue_pool.submit(add, 1, 2, retries=1, retry_backoff=float("nan")), "retry_backoff"),
            (lambda: queue_pool.submit(add, 1, 2, timeout=float("nan")), "timeout"),
            (lambda: queue_pool.flush(timeout=-2), "timeout"),
            (lambda: ConsumerPool(client, queue_pool, retries="x"), "retries"),
            (lambda: ConsumerPool(client, queue_pool, max_concurrency=True), "max_concurrency"),
        ):
            with pytest.raises(ValueError, match=match):
                call()
        with pytest.raises(TypeError, match="retry_on"):
            queue_pool.submit(add, 1, 2, retry_on=5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="early_ack"):
            ConsumerPool(client, queue_pool, early_ack="yes")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="integers"):
            queue_pool["a"]  # type: ignore[index]
        assert queue_pool.statistics().driver.tasks_submitted == 0  # nothing was queued by any of these
        with ConsumerPool(None, queue_pool, heartbeat_timeout="30s", start=True) as consumers:
            assert consumers.client is queue_pool.client
            assert consumers.settings.heartbeat_timeout == 30.0
            assert queue_pool.submit(add, 1, 2, time_limit="5s", timeout="10s").result(timeout=30) == 3
            with pytest.raises(ValueError, match="join's timeout"):
                consumers.join(timeout="x")


def test_join_with_a_progress_bar_leaves_no_thread_behind(client: Client) -> None:
    before = {t.ident for t in threading.enumerate()}
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, start=True) as consumers:
        queue_pool.batch_submit([(add, i, 1) for i in range(1000)])
        consumers.join(progress=True, timeout=60)
    wait_until(lambda: not [t for t in threading.enumerate() if t.ident not in before], timeout=10)


@pytest.mark.parametrize("max_concurrency", [1, 4])
def test_dask_idioms_work_inside_zdq_tasks_and_exceptions_keep_their_type(client: Client, max_concurrency: int) -> None:
    from .tasks import dask_idioms

    workers = set(scheduler_workers(client))
    with QueuePool(client, 1) as queue_pool:
        with ConsumerPool(client, queue_pool, max_concurrency=max_concurrency, start=True):
            address, thread, first, second = queue_pool.submit(dask_idioms, 20).result(timeout=120)
            assert address in workers and thread.startswith("zdq-")
            assert (first, second) == (21, 40)
            timed = queue_pool.submit(dask_idioms, 1, time_limit=60).result(timeout=120)  # on its own thread
            assert timed[1].startswith("zdq-timed-") and timed[2:] == (2, 2)
            with pytest.raises(ValueError, match="typed"):
                queue_pool.submit(fail, "typed").result(timeout=60)


def test_asyncio_submission_never_blocks_the_event_loop_and_as_completed_iterates_asynchronously(
    client: Client,
) -> None:
    import asyncio

    import zdq

    async def main(queue_pool: QueuePool) -> tuple[list[int], list[int], float]:
        lags: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:  # how late the loop runs a 1 ms timer
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                before = loop.time()
                await asyncio.sleep(0.001)
                lags.append(loop.time() - before - 0.001)

        tick = asyncio.create_task(ticker())
        futures = [await queue_pool.asubmit(add, i, 1) for i in range(1000)]
        values = [await f for f in futures]
        batch = await queue_pool.abatch_submit([(add, i, 2) for i in range(5000)])
        order = [await f async for f in zdq.as_completed([batch, *futures[:10]], timeout=60)]
        stop.set()
        await tick
        lags.sort()
        return values, (await batch)[:3] + [len(order)], lags[int(len(lags) * 0.99)]

    # A window of 2 chunks of 10 tasks: asubmit meets a full window often, and awaits it off the loop.
    with QueuePool(client, 1, window=2, chunk_size=10) as queue_pool:
        with ConsumerPool(client, queue_pool, start=True):
            values, tail, p99 = asyncio.run(asyncio.wait_for(main(queue_pool), 120))
    assert values == list(range(1, 1001))
    assert tail == [2, 3, 4, 11]
    assert p99 < 0.05, p99  # the loop stays responsive (the benchmark case measures it closely)


_EXITING_DRIVER = """
import sys
from distributed import Client
from zdq import ConsumerPool, QueuePool
from tests.tasks import add

client = Client(sys.argv[1], timeout=60)
queue_pool = QueuePool(client, 2)
consumers = ConsumerPool(client, queue_pool, n_consumers=2, start=True)
assert queue_pool.batch_submit([(add, i, 1) for i in range(100)]).result(timeout=60)[-1] == 100
print("ran", flush=True)
# exits without close(), as daskqueue programs do
"""


def test_a_driver_that_exits_without_close_leaves_nothing_running_on_the_workers(client: Client) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run(
        [sys.executable, "-c", _EXITING_DRIVER, client.scheduler.address],
        cwd=root,
        env={**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "ran" in proc.stdout, proc.stderr[-2000:]

    def leftovers() -> dict[str, list[str]]:
        def threads() -> list[str]:
            return [
                f"{t.name} ({type(t).__name__})"
                for t in threading.enumerate()
                if t.name.startswith("zdq-") or "Authenticat" in type(t).__name__
            ]

        return {worker: names for worker, names in client.run(threads).items() if names}

    wait_until(lambda: not leftovers(), timeout=30)


@pytest.mark.parametrize("relay", [False, True], ids=["direct", "relayed"])
def test_a_pool_dropped_without_closing_lets_go_of_its_driver_brokers_consumers_and_relay(
    client: Client, relay: bool
) -> None:
    queue_pool = QueuePool(client, 1, relay=relay)
    consumers = ConsumerPool(client, queue_pool, n_consumers=1, start=True)
    assert queue_pool.submit(add, 1, 2).result(timeout=30) == 3
    del queue_pool, consumers  # as daskqueue programs do: the client fixture checks nothing is left
    # A started ConsumerPool and its QueuePool hold each other (it serves while the queue pool is
    # open, named or not): the two go at the next garbage collection, which this stands for.
    gc.collect()


def test_submit_iter_shows_an_insertion_bar_against_its_total(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    with QueuePool(client, 1) as queue_pool:
        n = queue_pool.submit_iter(((add, i, 1) for i in range(2500)), total=2500, progress=True, batch_size=500)
        assert n == 2500
        err = capsys.readouterr().err
        assert "zdq insert" in err and "2500/2500" in err
        with pytest.raises(ValueError, match="total"):
            queue_pool.submit_iter([(add, 1, 1)], total=-1)


def test_daskqueues_queue_pool_keywords_are_taken_with_zdqs_nearest_meaning_and_bad_values_refused(
    client: Client, tmp_path: object
) -> None:
    import dask

    # ack_timeout is zdq's heartbeat_timeout (brokers and consumers); retry=True is zdq's at least
    # once; stop_gc() has no thread to stop: the pool goes on.
    with QueuePool(client, 1, ack_timeout=5, retry=True) as queue_pool:
        assert queue_pool.settings.heartbeat_timeout == 5.0 and queue_pool.retry is True
        queue_pool.stop_gc()
        with ConsumerPool(client, queue_pool, start=True) as consumers:
            assert consumers.early_ack is False and consumers.settings.heartbeat_timeout == 5.0
            assert queue_pool.submit(add, 1, 2).result(timeout=30) == 3
    # retry=False is daskqueue's at most once: its ConsumerPools acknowledge on receipt, unless told.
    with QueuePool(client, 1, retry=False) as queue_pool:
        with ConsumerPool(client, queue_pool) as consumers:
            assert consumers.early_ack is True
        with ConsumerPool(client, queue_pool, early_ack=False) as consumers:
            assert consumers.early_ack is False
    # A durable pool without dirpath keeps its queues in this user's own directory, not in daskqueue's
    # /tmp, which every user of the host shares (zdq.durable.dirpath sets another).
    unplaced = QueuePool(client, 1, durability="durable", start=False)
    assert unplaced.dirpath == os.path.join(tempfile.gettempdir(), f"zdq-{os.getuid()}")
    unplaced.close()
    with dask.config.set({"zdq.durable.dirpath": str(tmp_path)}):
        with QueuePool(client, 1, durability="durable") as queue_pool:
            assert queue_pool.dirpath == str(tmp_path) and queue_pool.get_queue_size() == {"default-queue-0": 0}
    with pytest.raises(ValueError, match="ack_timeout must be a positive"):
        QueuePool(client, 1, ack_timeout=0)
    with pytest.raises(ValueError, match=r"ack_timeout=1 is zdq's heartbeat_timeout .*heartbeat-interval"):
        QueuePool(client, 1, ack_timeout=1)
    with pytest.raises(TypeError, match="pass one of them"):
        QueuePool(client, 1, ack_timeout=5, heartbeat_timeout="5s")
    with pytest.raises(TypeError, match="retry must be True or False"):
        QueuePool(client, 1, retry="no")


def test_daskqueue_subclasses_run_their_items_with_self_id_and_their_own_init_signature(client: Client) -> None:
    with QueuePool(client, 2) as queue_pool:
        with ConsumerPool(client, queue_pool, LogsItsId, n_consumers=2) as consumers:
            batch = queue_pool.put_many(list(range(20)))
            consumers.start()
            consumers.join(timeout=60)
            values = batch.result(timeout=10)
            assert [value.split()[1] for value in values] == [str(i) for i in range(20)]
            assert {value.split()[0] for value in values} <= {"[1]", "[2]"}, values
            for name, results in consumers.results().items():
                number = int(name.rsplit("-", 1)[1]) + 1  # daskqueue's id: the consumer's index + 1
                assert all(value.startswith(f"[{number}] ") for value in results.values()), (name, results)
        # daskqueue's positional order: ConsumerClass, n_consumers, batch_size, retries, early_ack, max_concurrency
        with ConsumerPool(client, queue_pool, DaskqueueInit, 1, 7, 2, True, 3) as consumers:
            batch = queue_pool.put_many([1, 2])
            consumers.start()
            consumers.join(timeout=60)
            prefix = f"DaskqueueInit-0/{queue_pool.name}/7/3/2/True"
            assert batch.result(timeout=10) == [f"{prefix}: 1", f"{prefix}: 2"]
