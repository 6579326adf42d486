"""Names and reprs in pure code: the naming functions, statistics that read well, future reprs
(the broker's and the pools' names and reprs are in tests/test_names.py)."""

from __future__ import annotations

import os

from zdq.errors import BrokerLost
from zdq.futures import BatchFuture, TaskFuture
from zdq.names import (
    consumer_names,
    driver_name,
    queue_name,
    queue_name_of,
    sorted_by_name,
)
from zdq.stats import BrokerStats, DriverStats, PoolStats, QueueState


# -- the naming functions ------------------------------------------------------------------------
def test_a_queue_is_named_after_its_pool_and_index_and_its_directory_gives_the_name_back() -> None:
    assert queue_name("jobs", 3) == "jobs-queue-3"
    assert queue_name_of(os.path.join("/data", queue_name("jobs", 3)) + "/") == "jobs-queue-3"
    assert sorted_by_name(["jobs-queue-10", "jobs-queue-2", "jobs-queue-1"]) == [
        "jobs-queue-1", "jobs-queue-2", "jobs-queue-10",
    ]


def test_every_driver_of_a_pool_gets_a_name_of_its_own_that_says_where_it_runs() -> None:
    first, second = driver_name("names-unit"), driver_name("names-unit")
    assert first != second and first.startswith("names-unit-driver@") and f":{os.getpid()}" in first
    assert second.startswith(first) and second.endswith("#2")


def test_consumers_keep_daskqueues_names() -> None:
    assert consumer_names("GeneralConsumer", 2) == ["GeneralConsumer-0", "GeneralConsumer-1"]


# -- statistics that read well ----------------------------------------------------------------
def _broker_stats(**changes: object) -> BrokerStats:
    counts = dict.fromkeys(
        [f for f in BrokerStats.__dataclass_fields__ if f not in {"name", "endpoint", "durable", "routed_tasks", "consumer_names"}],
        0,
    )
    counts.update(changes)
    return BrokerStats(name="jobs-queue-0", endpoint="tcp://10.0.0.1:4000", durable=True, **counts)  # type: ignore[arg-type]


def test_statistics_reprs_leave_out_zero_counters_and_show_peers_by_name() -> None:
    stats = _broker_stats(
        ready_tasks=5, ready_chunks=1, consumers=1, consumer_names=("GeneralConsumer-0",),
        routed_tasks={"jobs-driver@host:1": 7},
    )
    text = repr(stats)
    assert text == (
        "BrokerStats(name='jobs-queue-0', endpoint='tcp://10.0.0.1:4000', durable=True, ready_chunks=1, "
        "ready_tasks=5, consumers=1, routed_tasks={'jobs-driver@host:1': 7}, consumer_names=('GeneralConsumer-0',))"
    )
    assert stats.leased_tasks == 0 and stats.pending_tasks == 5  # left out of the repr, still there
    driver = DriverStats(3, 2, 0, 0, 0, 0, 1, 0, name="jobs-driver@host:1")
    assert repr(driver) == "DriverStats(tasks_submitted=3, tasks_completed=2, chunks_outstanding=1, name='jobs-driver@host:1')"
    pool = repr(PoolStats(driver, [stats, _broker_stats()], "jobs"))
    assert pool.splitlines()[0] == "PoolStats(name='jobs',"
    assert len(pool.splitlines()) == 6 and max(len(line) for line in pool.splitlines()) < 240


def test_a_queue_state_says_what_is_known_and_how_old_the_count_is() -> None:
    assert QueueState("jobs-queue-0", "up", 0).describe() == "jobs-queue-0: up"
    assert (
        QueueState("jobs-queue-1", "down", 3, 5, 1.25).describe()
        == "jobs-queue-1: down (lost with its worker, being placed again), 3 awaiting results, 5 pending (counted 1.2 s ago)"
    )


def test_future_reprs_say_their_state_without_waiting() -> None:
    fut = TaskFuture(7)
    assert repr(fut) == "<TaskFuture key=7 pending>"
    fut.set_result(1)
    assert repr(fut) == "<TaskFuture key=7 finished>"
    failed = TaskFuture(8)
    failed.set_exception(BrokerLost("jobs-queue-0 was lost"))
    assert repr(failed) == "<TaskFuture key=8 failed: BrokerLost>"
    batch = BatchFuture(10, 3)
    batch._fill(0, [1], {})
    assert repr(batch) == "<BatchFuture keys=10..12 pending: 1 of 3 done, 0 failed>"
    batch._fail(1, 2, BrokerLost("gone"))
    assert repr(batch) == "<BatchFuture keys=10..12 failed: 2 of 3 tasks>"
    assert repr(BatchFuture(5, 0)) == "<BatchFuture no keys finished: 0 tasks>"
