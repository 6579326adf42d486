"""Expiry on a real LocalCluster (issue 25): a task given ``expires=`` that has not started by then
never runs, and its future fails with TaskExpired: held in its broker, in a consumer's prefetch,
or on a durable queue whose broker's worker was killed; counted in statistics, status and metrics.

Each task that must not run writes a file if it does: the tests assert the file is absent.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

import zdq
from zdq import ConsumerPool, QueuePool, TaskExpired
from zdq.errors import BatchError
from zdq.observe.commands import format_status

from .conftest import abc_cluster, assert_no_zdq_leaks, wait_until
from .inprocess_cli import zdq_here
from .tasks import add, flaky, sleep, write_start

pytestmark = pytest.mark.cluster

_FAST = {"heartbeat_interval": "250ms", "heartbeat_timeout": "2s"}


@pytest.fixture(scope="module")
def named_cluster() -> Iterator[LocalCluster]:
    """Worker processes named a (the queues), b and c (the consumers), for the whole module: the
    only test that kills a worker comes last."""
    with abc_cluster() as cluster:
        yield cluster


@pytest.fixture
def named_client(named_cluster: LocalCluster) -> Iterator[Client]:
    with Client(named_cluster) as c:
        c.wait_for_workers(3, timeout=60)
        yield c
        assert_no_zdq_leaks(c)


def _exposition(dask_scheduler: object = None) -> str:
    """What the scheduler's /metrics serves: its Prometheus registry, where zdq's collector is."""
    import prometheus_client

    return prometheus_client.generate_latest().decode()


def _metric(client: Client, name: str, pool: str) -> float | None:
    for line in client.run_on_scheduler(_exposition).splitlines():
        if line.startswith(f'{name}{{pool="{pool}"}} '):
            return float(line.split()[-1])
    return None


def test_tasks_stuck_behind_a_long_one_expire_in_their_broker_never_run_and_are_counted_everywhere(
    named_cluster: LocalCluster, named_client: Client, tmp_path: Path
) -> None:
    pytest.importorskip("prometheus_client", reason="prometheus_client is not installed: Dask serves no /metrics")
    marks = [tmp_path / f"ran-{i}" for i in range(4)]
    with (
        QueuePool(named_client, 1, name="expiring", workers=["a"]) as queue_pool,
        # prefetch=1: the consumer holds the long task alone; the others wait in the broker.
        ConsumerPool(named_client, queue_pool, n_consumers=1, prefetch=1, workers=["c"]) as consumers,
    ):
        consumers.start()
        long = queue_pool.submit(sleep, 3.5)  # ends well after the others expire, even on a loaded machine
        assert wait_until(lambda: queue_pool.broker_statistics()[0].leased_tasks == 1, timeout=20)
        single = queue_pool.submit(write_start, str(marks[0]), expires=1)
        batch = queue_pool.batch_submit([(write_start, str(m)) for m in marks[1:]], expires=datetime.timedelta(seconds=1))
        kept = queue_pool.submit(add, 1, 2, expires=120)
        items = [queue_pool.put("an item", expires=1), queue_pool.put_many(["two", "items"], expires=1)]
        with pytest.raises(TaskExpired, match="expired before it started"):
            single.result(timeout=30)
        with pytest.raises(BatchError) as caught:
            batch.result(timeout=30)
        assert all(isinstance(e, TaskExpired) for e in caught.value.errors.values()) and len(caught.value.errors) == 3
        for future in items:  # raw items expire the same way (GeneralConsumer would refuse them if run)
            with pytest.raises((TaskExpired, BatchError)) as caught_item:
                future.result(timeout=30)
            assert "TaskExpired" in repr(caught_item.value)
        assert long.result(timeout=30) == 3.5 and kept.result(timeout=30) == 3  # not expired: it runs
        consumers.join(timeout=30)
        assert not any(m.exists() for m in marks)  # never ran
        [stats] = queue_pool.broker_statistics()
        assert stats.tasks_expired == 7 and stats.tasks_acked == 2
        assert sum(c.tasks_expired for c in consumers.statistics()) == 0  # none reached the consumer
        # The monitor shows it (reports come once a second): the status command and /metrics.
        assert wait_until(lambda: _metric(named_client, "zdq_tasks_expired_total", "expiring") == 7, timeout=20)
        # In this process: `zdq status` runs as a subprocess in tests/test_observe.py.
        proc = zdq_here("status", "--scheduler", named_cluster.scheduler_address, "--json")
        assert proc.returncode == 0, proc.stderr
        state = json.loads(proc.stdout)
        pool = state["pools"]["expiring"]
        assert pool["totals"]["expired"] == 7 and pool["queues"][0]["tasks_expired"] == 7
        assert "dead-lettered 0, expired 7;" in format_status(state)  # what `zdq status` prints


def test_a_task_expired_in_a_consumers_prefetch_is_not_run_and_an_expiry_before_its_delay_is_refused(
    named_client: Client, tmp_path: Path
) -> None:
    mark = tmp_path / "ran"
    with (
        QueuePool(named_client, 1, workers=["a"]) as queue_pool,
        # prefetch=4: the expiring task is delivered at once, and waits in the consumer behind the long one.
        ConsumerPool(named_client, queue_pool, n_consumers=1, prefetch=4, workers=["c"]) as consumers,
    ):
        consumers.start()
        long = queue_pool.submit(sleep, 2.5)
        assert wait_until(lambda: queue_pool.broker_statistics()[0].leased_tasks == 1, timeout=20)
        buffered = queue_pool.submit(write_start, str(mark), expires=0.5)
        assert wait_until(lambda: queue_pool.broker_statistics()[0].leased_tasks == 2, timeout=20)  # delivered
        with pytest.raises(TaskExpired):
            buffered.result(timeout=30)
        assert long.result(timeout=30) == 2.5
        assert not mark.exists()
        assert sum(c.tasks_expired for c in consumers.statistics()) == 1
        assert queue_pool.broker_statistics()[0].tasks_expired == 0  # the broker had handed it out
        with pytest.raises(ValueError, match="expires comes before"):
            queue_pool.submit(add, 1, delay=5, expires=2)
        with pytest.raises(TypeError, match="expires"):
            queue_pool.batch_submit([(add, 1)], expires="soon")


def test_a_daskqueue_programs_counts_leave_expired_tasks_out_and_no_retry_starts_after_an_expiry(
    named_client: Client, tmp_path: Path
) -> None:
    with QueuePool(named_client, 1, name="counted", workers=["a"]) as queue_pool:
        expired = [queue_pool.submit(add, i, expires=0.5) for i in range(3)]
        for future in expired:
            with pytest.raises(TaskExpired):
                future.result(timeout=30)
        # Another process asking by id hears the same (results by id).
        assert zdq.state("counted", expired[0].key, client=named_client) == "expired"
        with pytest.raises(TaskExpired):
            zdq.result("counted", expired[0].key, timeout=5, client=named_client)
        ran = queue_pool.submit(add, 1, 2)
        counter = tmp_path / "attempts"
        with ConsumerPool(named_client, queue_pool, n_consumers=1, workers=["c"]) as consumers:
            consumers.start()
            assert ran.result(timeout=30) == 3  # the consumer serves: the next task starts at once
            # It fails; its retry would come at least 5 s later (backoff 10 s, jitter at most half),
            # after its expiry: it is not retried.
            retried = queue_pool.submit(flaky, str(counter), 5, retries=5, retry_backoff=10.0, expires=4)
            consumers.join(timeout=60)
            assert ran.result(timeout=30) == 3
            with pytest.raises(Exception, match="not retried: its expiry"):
                retried.result(timeout=30)
            assert int(counter.read_text()) == 1  # one attempt, no retry past the expiry
            results = consumers.results()
            # Each task once: the expired ones among the tasks that never ran, not also as an
            # earlier consumer's; and no consumer consumed them.
            keys = [key for by_consumer in results.values() for key in by_consumer]
            assert sorted(keys) == sorted(f.key for f in [*expired, ran, retried])
            assert set(results["not-run"]) == {f.key for f in expired}
            assert consumers.nb_consumed() == 2


@pytest.mark.faults
def test_an_expiry_on_a_durable_queue_survives_its_broker_worker_being_killed_and_the_task_never_runs(
    named_client: Client, tmp_path: Path
) -> None:
    mark = tmp_path / "ran"
    with QueuePool(named_client, 1, durability="durable", dirpath=tmp_path / "q", workers=["a"], **_FAST) as queue_pool:
        # No consumer yet: the task stays queued, on disk, until its expiry.
        expiring = queue_pool.submit(write_start, str(mark), expires=3)
        queue_pool.flush(timeout=10)  # confirmed: on disk
        os.kill(int(queue_pool[0].pid().result(timeout=10)), signal.SIGKILL)
        assert wait_until(lambda: queue_pool.recoveries >= 1, timeout=60)
        with pytest.raises(TaskExpired):
            expiring.result(timeout=60)  # told by the broker placed again, with no consumer asking
        with ConsumerPool(named_client, queue_pool, n_consumers=1, workers=["c"]) as consumers:
            consumers.start()
            assert queue_pool.submit(add, 2, 2).result(timeout=30) == 4
            consumers.join(timeout=30)
        assert not mark.exists()
        assert queue_pool.broker_statistics()[0].tasks_expired == 1
