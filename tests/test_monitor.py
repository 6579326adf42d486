"""The monitor's figures and the broker's side of purge and round trips, without a cluster."""

from __future__ import annotations

import time

import pytest
import zmq

from tests.conftest import wait_until
from tests.test_broker import _peer, _recv, broker  # noqa: F401 - broker is a fixture
from zdq.broker.core import BrokerCore
from zdq.names import pool_of_queue
from zdq.observe import metrics
from zdq.observe.monitor import Monitor
from zdq.stats import ROUND_TRIP_BOUNDS
from zdq.transport import protocol as p


def _queue(name: str, **counts: int) -> dict[str, object]:
    base = {"name": name, "pool": pool_of_queue(name), "durable": False, "host": "127.0.0.1", "endpoint": ""}
    fields = ("ready_tasks", "leased_tasks", "awaiting_tasks", "dead_tasks", "tasks_stored", "tasks_acked",
              "tasks_dead_lettered", "chunks_redelivered", "bad_messages", "consumers")
    return {**base, **{f: counts.get(f, 0) for f in fields}}


def _consumer(name: str, pool: str, done: int, failed: int = 0) -> dict[str, object]:
    return {"name": name, "pool": pool, "worker": "tcp://w", "running": True, "tasks_done": done,
            "tasks_failed": failed, "tasks_retried": 0, "tasks_in_flight": 0}


def test_monitor_sums_a_pools_queues_and_consumers_and_forgets_what_its_workers_report_gone() -> None:
    monitor = Monitor(None)
    monitor.on_report(
        worker="tcp://a", interval=1.0,
        queues=[_queue("jobs-queue-0", ready_tasks=5, tasks_stored=10), _queue("jobs-queue-1", tasks_stored=7)],
        consumers=[_consumer("C-0", "jobs", 12, failed=1)],
    )
    monitor.on_report(worker="tcp://b", queues=[], consumers=[_consumer("C-1", "jobs", 3)])
    pool = monitor.status()["pools"]["jobs"]
    assert [q["name"] for q in pool["queues"]] == ["jobs-queue-0", "jobs-queue-1"]
    assert pool["queues"][0]["worker"] == "tcp://a"
    t = pool["totals"]
    assert (t["submitted"], t["ready"], t["completed"], t["failed"], t["consumers"]) == (17, 5, 15, 1, 2)
    assert monitor.reports == 2 and monitor.entries == 4
    moved = _queue("jobs-queue-1", tasks_stored=0)
    moved["endpoint"] = "tcp://127.0.0.1:2"  # placed again after its worker was lost
    monitor.on_report(worker="tcp://c", queues=[moved])
    assert monitor.status()["pools"]["jobs"]["totals"]["recoveries"] == 1
    monitor.on_report(worker="tcp://b", gone=[("consumer", "jobs", "C-1")])
    assert [c["name"] for c in monitor.status()["pools"]["jobs"]["consumers"]] == ["C-0"]
    monitor._expire(time.monotonic() + 60)  # nothing reported for a minute: the pool is gone
    assert monitor.status()["pools"] == {}


def test_monitor_rates_are_per_second_between_samples_and_never_negative() -> None:
    monitor = Monitor(None)
    view = monitor._pool("jobs")
    now = time.monotonic()
    view.queues["jobs-queue-0"] = (now, _queue("jobs-queue-0"))
    view.history.extend([(now - 2, 0, 0, 0), (now - 1, 100, 50, 2), (now, 50, 150, 2)])  # a queue placed again
    rates = monitor.status()["pools"]["jobs"]["rates"]
    assert rates["submitted"][:2] == [100.0, 0.0] and rates["completed"][:2] == [50.0, 100.0]
    assert rates["failed"][:2] == [2.0, 0.0]


def test_the_metrics_collector_names_every_family_zdq_and_labels_by_pool_and_queue_only() -> None:
    pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
    monitor = Monitor(None)
    queue = _queue("jobs-queue-0", ready_tasks=4, tasks_stored=9)
    queue["round_trips"] = [1] + [0] * (len(ROUND_TRIP_BOUNDS) - 1) + [2]
    queue["round_trip_sum"] = 120.5
    monitor.on_report(worker="tcp://a", queues=[queue], consumers=[_consumer("C-0", "jobs", 8)])
    metrics._monitors.add(monitor)
    try:
        families = {f.name: f for f in metrics._Collector().collect()}
    finally:
        metrics._monitors.discard(monitor)
    assert all(name.startswith("zdq_") for name in families)
    ready = [s for s in families["zdq_queue_ready"].samples if s.labels["pool"] == "jobs"]
    assert [(s.labels, s.value) for s in ready] == [({"pool": "jobs", "queue": "jobs-queue-0"}, 4.0)]
    completed = [s for s in families["zdq_tasks_completed"].samples if s.labels["pool"] == "jobs"]
    assert completed[0].value == 8.0
    rtt = {s.name: s.value for s in families["zdq_chunk_round_trip_seconds"].samples if s.labels.get("pool") == "jobs"
           and s.labels.get("le") in (None, "+Inf", "0.001")}
    assert rtt["zdq_chunk_round_trip_seconds_count"] == 3 and rtt["zdq_chunk_round_trip_seconds_sum"] == 120.5


def test_purge_marks_every_ready_task_cancelled_and_keeps_the_chunks_for_their_drivers(
    broker: tuple[BrokerCore, str], zmq_ctx: zmq.Context
) -> None:
    core, endpoint = broker
    driver = _peer(zmq_ctx, endpoint, p.Role.DRIVER)
    consumer = _peer(zmq_ctx, endpoint, p.Role.CONSUMER)
    try:
        for seq in (1, 2):
            driver.send_multipart(p.encode(p.Put(seq, 3, f"chunk-{seq}".encode())))
            assert isinstance(_recv(driver), p.Confirm)
        assert core.purge_ready() == 6
        assert core.purge_ready() == 0  # already cancelled: nothing counted twice
        assert core.statistics().ready_tasks == 6  # kept: their drivers' futures settle through them
        consumer.send_multipart(p.encode(p.Fetch(1)))
        told = _recv(consumer)
        assert isinstance(told, p.Cancel) and told.indexes == (0, 1, 2)  # the consumer skips them all
        deliver = _recv(consumer)
        assert isinstance(deliver, p.Deliver)
        consumer.send_multipart(p.encode(p.Done(deliver.chunk_id, 3, b"results")))
        stats = wait_until(lambda: (s := core.statistics()).chunks_acked == 1 and s, timeout=10)
        assert sum(stats.round_trips) == 1 and 0 <= stats.round_trip_sum < 5
        assert "round_trips" not in repr(stats)  # kept out of the one-screen repr
    finally:
        driver.close(linger=0)
        consumer.close(linger=0)
