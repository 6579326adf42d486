"""Several producers per pool, and tasks that submit tasks, on a real LocalCluster."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from zdq import ClosedError, ConsumerPool, QueuePool, ZdqError

from .conftest import wait_until
from .tasks import add, document, sleep


def test_two_producers_on_one_durable_directory_share_the_queues_and_each_gets_its_own_results(
    client: Client, tmp_path: Path
) -> None:
    with QueuePool(client, 2, durability="durable", dirpath=tmp_path) as first:
        second = QueuePool(client, 2, durability="durable", dirpath=tmp_path)  # no QueueLocked: attached
        try:
            assert second.attached and not first.attached
            assert second.endpoints == first.endpoints
            with ConsumerPool(client, first, n_consumers=2, start=True):
                out: dict[str, Any] = {}

                def feed(pool: QueuePool, offset: int, key: str) -> None:
                    futures = [pool.batch_submit([(add, i, offset) for i in range(j, j + 500)]) for j in range(0, 5000, 500)]
                    out[key] = [v for f in futures for v in f.result(timeout=120)]

                threads = [
                    threading.Thread(target=feed, args=(first, 0, "first")),
                    threading.Thread(target=feed, args=(second, 100_000, "second")),
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(150)
                assert out["first"] == list(range(5000))
                assert out["second"] == [100_000 + i for i in range(5000)]
                assert first.statistics().driver.foreign_tasks == 0  # nothing of the other producer
                assert second.statistics().driver.tasks_completed == 5000
        finally:
            second.close()


def test_a_transient_pool_given_the_name_of_a_live_pool_attaches_and_learns_when_its_owner_closes(
    client: Client,
) -> None:
    with pytest.raises(ClosedError, match="no live zdq pool"):
        QueuePool.attach(client, "nobody-here")
    owner = QueuePool(client, 1, name="shared")
    try:
        producer = QueuePool(client, 1, name="shared")
        other = QueuePool.attach(client, "shared")
        assert producer.attached and other.attached
        with pytest.raises(ZdqError, match="attached"):
            producer.dead_letters()
        waiting = producer.submit(add, 1, 2)  # no consumer: it waits
        owner.close()
        with pytest.raises(ClosedError, match="closed by the process that placed it"):
            waiting.result(timeout=30)
        producer.close()
        other.close()
    finally:
        owner.close()


def test_tasks_attach_to_their_own_pool_and_submit_more_work_which_runs(client: Client, tmp_path: Path) -> None:
    pages = tmp_path / "pages"
    with QueuePool(client, 2) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=2, start=True):
        docs = queue_pool.batch_submit([(document, str(pages), d, 50) for d in range(10)])
        assert docs.result(timeout=120) == [50] * 10
        wait_until(lambda: pages.exists() and len(pages.read_text().split()) >= 500, timeout=120)
        assert sorted(set(pages.read_text().split())) == sorted(f"{d}-{i}" for d in range(10) for i in range(50))
        # Consumers busy with long tasks do not stop a task from submitting (it never waits on them).
        busy = [queue_pool.submit(sleep, 1.0) for _ in range(4)]
        assert queue_pool.submit(document, str(tmp_path / "more"), 99, 5).result(timeout=60) == 5
        assert [f.result(timeout=60) for f in busy] == [1.0] * 4


def test_attaching_to_a_durable_pool_without_its_dirpath_says_which_dirpath_it_is_published_with(
    client: Client, tmp_path: Path
) -> None:
    with QueuePool(client, 1, name="jobs-attach-hint", durability="durable", dirpath=tmp_path) as owner:
        with pytest.raises(ClosedError, match=rf"no live zdq pool named 'jobs-attach-hint' on this cluster; a durable pool "
                           rf"'jobs-attach-hint' is published with dirpath='{tmp_path}': pass it"):
            QueuePool.attach(client, "jobs-attach-hint")
        with QueuePool.attach(client, "jobs-attach-hint", dirpath=tmp_path) as attached:  # as it says
            assert attached.queue_names == owner.queue_names and attached.endpoints == owner.endpoints
