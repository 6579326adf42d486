"""Durable pools on LMDB, with real worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed import Client

from zdq import ConsumerPool, Durability, QueuePool
from zdq.errors import QueueLocked

from .tasks import add, process_item


def test_the_daskqueue_durable_restart_flow_loses_nothing(client: Client, tmp_path: Path) -> None:
    dirpath = str(tmp_path / "queue_dir")
    queue_pool = QueuePool(client, 2, durability="durable", dirpath=dirpath)
    queue_pool.batch_submit([(process_item,) for _ in range(100_000)], batch_size=10_000)
    assert queue_pool.get_queue_size() == {"default-queue-0": 50_000, "default-queue-1": 50_000}
    assert sorted(p.name for p in Path(dirpath).iterdir()) == ["default-queue-0", "default-queue-1"]

    client.restart()  # a sudden cluster shutdown: the brokers die with their workers

    queue_pool.close()
    queue_pool = QueuePool(client, 2, durability="durable", dirpath=dirpath)
    assert queue_pool.get_queue_size() == {"default-queue-0": 50_000, "default-queue-1": 50_000}
    assert "DurableQueue-default-queue-0: 50000 pending items" in repr(queue_pool)
    consumer_pool = ConsumerPool(client, queue_pool, n_consumers=4, batch_size=1000)
    consumer_pool.start()
    consumer_pool.join(progress=True, timeout=120)
    results = consumer_pool.results()
    assert sum(len(r) for r in results.values()) == 100_000
    assert all(v == 328350 for r in results.values() for v in r.values())
    assert queue_pool.get_queue_size() == {"default-queue-0": 0, "default-queue-1": 0}
    consumer_pool.close()
    queue_pool.close()


def test_a_second_pool_on_a_live_queue_directory_is_refused(client: Client, tmp_path: Path) -> None:
    with QueuePool(client, 1, durability=Durability.DURABLE, dirpath=tmp_path, name="jobs") as first:
        first.batch_submit([(add, i) for i in range(10)])
        first.flush()
        with pytest.raises(QueueLocked):
            QueuePool(client, 1, durability=Durability.DURABLE, dirpath=tmp_path, name="jobs")
        assert first.get_queue_size() == {"jobs-queue-0": 10}


def test_durable_results_come_back_like_transient_ones(client: Client, tmp_path: Path) -> None:
    with QueuePool(client, 2, durability="durable", dirpath=tmp_path) as queue_pool:
        with ConsumerPool(client, queue_pool, n_consumers=2) as consumers:
            consumers.start()
            assert queue_pool.batch_submit([(add, i, 1) for i in range(5000)]).result(timeout=60) == [
                i + 1 for i in range(5000)
            ]
            assert queue_pool.submit(add, 2, b=3).result(timeout=30) == 5


def test_killing_the_worker_of_a_durable_broker_loses_no_confirmed_task(client: Client, tmp_path: Path) -> None:
    import os
    import signal

    from .conftest import wait_until
    from .tasks import slow_add

    n = 20_000
    dirpath = str(tmp_path)
    queue_pool = QueuePool(client, 1, durability="durable", dirpath=dirpath, chunk_size=100)
    consumers = ConsumerPool(client, queue_pool, n_consumers=2)
    consumers.start()
    batch = queue_pool.batch_submit([(slow_add, i) for i in range(n)])
    queue_pool.flush()  # every chunk is confirmed: from here on none may be lost
    wait_until(lambda: batch.completed > 1000, timeout=60)
    broker_pid = queue_pool[0].pid().result()
    os.kill(broker_pid, signal.SIGKILL)
    wait_until(lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == 2 and batch.completed < n, timeout=60)
    before = {k for r in consumers.results().values() for k in r}
    assert 0 < len(before) < n

    # A new pool on the same directory serves what the dead broker had not seen acknowledged.
    client.wait_for_workers(2, timeout=60)
    consumers.close()
    queue_pool.close()
    recovered = QueuePool(client, 1, durability="durable", dirpath=dirpath)
    assert 0 < recovered.get_queue_size()["default-queue-0"] <= n - len(before) + 1000
    after_consumers = ConsumerPool(client, recovered, n_consumers=2)
    after_consumers.start()
    after_consumers.join(timeout=120)
    after = {k for r in after_consumers.results().values() for k in r}
    assert before | after == set(batch.keys)  # lost = 0
    after_consumers.close()
    recovered.close()
