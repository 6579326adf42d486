"""Delayed and prioritised tasks on a real LocalCluster: release times, durable restarts, order."""

from __future__ import annotations

import datetime
import os
import signal
import time
from pathlib import Path

import pytest
from distributed import Client

from zdq import ConsumerPool, QueuePool

from .conftest import wait_until
from .tasks import add, started_at, write_start

UTC = datetime.timezone.utc


def test_a_delayed_task_starts_at_its_time_and_not_before(client: Client) -> None:
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=1) as consumers:
        consumers.start()
        submitted = time.time_ns()
        delayed = queue_pool.submit(started_at, delay=1.0)
        eta = datetime.datetime.now(UTC) + datetime.timedelta(seconds=0.5)
        batch = queue_pool.batch_submit([(started_at,) for _ in range(20)], eta=eta)
        at_once = queue_pool.submit(started_at)
        assert at_once.result(timeout=30) < submitted + 400_000_000  # the plain task did not wait
        assert submitted + 1_000_000_000 <= delayed.result(timeout=30) < submitted + 3_000_000_000
        starts = batch.result(timeout=30)
        assert min(starts) >= eta.timestamp() * 1e9 - 1e6  # (eta's float rounds below a microsecond)
        assert max(starts) < eta.timestamp() * 1e9 + 2e9


def test_a_delayed_task_counts_as_queued_until_released_join_waits_for_it_and_cancel_removes_it(
    client: Client,
) -> None:
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=1) as consumers:
        consumers.start()
        later = queue_pool.submit(add, 1, 1, delay=60)
        soon = queue_pool.submit(add, 2, 2, delay=1.0)
        queue_pool.flush(timeout=10)
        [stats] = queue_pool.broker_statistics()
        assert (stats.delayed_chunks, stats.delayed_tasks, stats.ready_tasks) == (2, 2, 0)
        assert queue_pool.get_queue_size() == {queue_pool.queue_names[0]: 2}
        assert later.cancel()
        assert wait_until(lambda: queue_pool.broker_statistics()[0].delayed_tasks == 1, timeout=10)
        started = time.monotonic()
        consumers.join(timeout=30)  # waits for the delayed task, not for the cancelled one
        assert soon.done() and soon.result() == 4 and time.monotonic() - started > 0.5
        assert later.cancelled()


def test_bad_timing_keywords_raise_at_the_call_and_submit_nothing(client: Client) -> None:
    with QueuePool(client, 1) as queue_pool:
        naive = datetime.datetime.now() + datetime.timedelta(seconds=1)
        calls = [
            lambda: queue_pool.submit(add, 1, delay=-1),
            lambda: queue_pool.submit(add, 1, delay="soon"),
            lambda: queue_pool.submit(add, 1, eta=naive),
            lambda: queue_pool.submit(add, 1, priority=2.0),
            lambda: queue_pool.batch_submit([(add, 1)], delay=-0.5),
            lambda: queue_pool.batch_submit([(add, 1)], priority="1"),
            lambda: queue_pool.submit_iter(iter([(add, 1)]), eta=naive),
        ]
        names = ["delay", "delay", "eta", "priority", "delay", "priority", "eta"]
        for call, name in zip(calls, names):
            with pytest.raises((TypeError, ValueError), match=name):
                call()
        queue_pool.flush(timeout=10)
        assert queue_pool.driver.statistics().tasks_submitted == 0
        assert queue_pool.get_queue_size() == {queue_pool.queue_names[0]: 0}


def test_a_delayed_task_on_a_durable_queue_survives_a_close_and_reopen_and_runs_at_its_time(
    client: Client, tmp_path: Path
) -> None:
    dirpath = tmp_path / "queues"
    marks = {name: tmp_path / f"{name}.started" for name in ("later", "passed")}
    with QueuePool(client, 1, durability="durable", dirpath=dirpath, name="timed") as queue_pool:
        release = time.time() + 4.0
        queue_pool.submit(write_start, str(marks["later"]), eta=datetime.datetime.fromtimestamp(release, UTC))
        queue_pool.submit(write_start, str(marks["passed"]), delay=0.5)  # its time passes while the pool is closed
        queue_pool.flush(timeout=10)
        assert queue_pool.broker_statistics()[0].delayed_tasks == 2
    time.sleep(1.0)
    with QueuePool(client, 1, durability="durable", dirpath=dirpath, name="timed") as queue_pool:
        [stats] = queue_pool.broker_statistics()
        assert (stats.delayed_tasks, stats.ready_tasks) == (1, 1)
        with ConsumerPool(client, queue_pool, n_consumers=1) as consumers:
            reopened = time.time()
            consumers.start()
            assert wait_until(lambda: marks["passed"].exists() and marks["passed"].read_text(), timeout=30)
            assert float(marks["passed"].read_text()) < reopened + 3.0  # at once, well before 'later'
            assert not marks["later"].exists()
            consumers.join(timeout=30)
            assert marks["later"].exists()
            assert release <= float(marks["later"].read_text()) < release + 3.0


def test_a_high_priority_task_overtakes_ten_thousand_queued_ones(client: Client) -> None:
    with QueuePool(client, 1) as queue_pool:
        backlog = queue_pool.batch_submit([(started_at,) for _ in range(10_000)], batch_size=100)
        urgent = queue_pool.submit(started_at, priority=10)
        queue_pool.flush(timeout=30)  # all stored before any consumer asks
        # One consumer, so that start times are one process's clock and nothing runs beside it.
        with ConsumerPool(client, queue_pool, n_consumers=1) as consumers:
            consumers.start()
            first = urgent.result(timeout=60)
            starts = backlog.result(timeout=120)
        assert sum(start < first for start in starts) == 0


@pytest.mark.parametrize("way", ["batch_submit", "map"])
def test_a_batch_after_tasks_submitted_alone_runs_after_them_first_in_first_out(client: Client, way: str) -> None:
    # Reviewer 28a: tasks submitted alone wait in the driver to be packed together; a batch's
    # chunk went straight into line, ahead of them (a b d e c f, 9 runs of 9).
    with QueuePool(client, 1) as queue_pool:
        for _ in range(3):
            before = [queue_pool.submit(started_at) for _ in range(3)]
            if way == "map":
                batch = queue_pool.map(started_at, [None, None])
            else:
                batch = queue_pool.batch_submit([(started_at,), (started_at,)])
            after = queue_pool.submit(started_at)
            queue_pool.flush(timeout=30)  # all in line before the consumer asks
            with ConsumerPool(client, queue_pool, n_consumers=1, start=True):
                firsts = [f.result(timeout=60) for f in before]
                middle = [f.result(timeout=60) for f in batch] if way == "map" else batch.result(timeout=60)
                starts = [*firsts, *middle, after.result(timeout=60)]
            assert starts == sorted(starts), starts


@pytest.mark.faults
def test_a_delayed_task_on_a_durable_queue_survives_its_broker_worker_being_killed_and_runs_at_its_time(
    client3: Client, tmp_path: Path
) -> None:
    fast = {"heartbeat_interval": "250ms", "heartbeat_timeout": "2s"}
    with (
        QueuePool(client3, 1, durability="durable", dirpath=tmp_path, workers=["a"], **fast) as queue_pool,
        ConsumerPool(client3, queue_pool, n_consumers=1, workers=["c"]) as consumers,
    ):
        consumers.start()
        release = time.time() + 6.0
        delayed = queue_pool.submit(started_at, eta=datetime.datetime.fromtimestamp(release, UTC))
        queue_pool.flush(timeout=10)  # confirmed: on disk
        os.kill(int(queue_pool[0].pid().result(timeout=10)), signal.SIGKILL)
        assert wait_until(lambda: queue_pool.recoveries >= 1, timeout=30)
        started = delayed.result(timeout=60) / 1e9
        assert release <= started < release + 3.0
