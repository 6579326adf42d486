"""Durable pools on LMDB, with real worker processes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from distributed import Client

from zdq import ConsumerPool, Durability, QueuePool
from zdq.errors import QueueLocked, StorageCorrupt

from .conftest import wait_until
from .tasks import add, process_item


def test_the_daskqueue_durable_restart_flow_loses_nothing(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zdq.client.consumer_pool

    seen: list[tuple[int, int]] = []

    class Bar(zdq.client.consumer_pool._JoinBar):
        def __call__(self, done: int, total: int) -> None:
            seen.append((done, total))

    monkeypatch.setattr(zdq.client.consumer_pool, "_JoinBar", Bar)

    dirpath = str(tmp_path / "queue_dir")
    queue_pool = QueuePool(client, 2, durability="durable", dirpath=dirpath)
    queue_pool.batch_submit([(process_item,) for _ in range(100_000)], batch_size=10_000)
    assert queue_pool.get_queue_size() == {"default-queue-0": 50_000, "default-queue-1": 50_000}
    assert sorted(p.name for p in Path(dirpath).iterdir()) == ["default-queue-0", "default-queue-1"]

    client.restart()  # a sudden cluster shutdown: the brokers die with their workers
    # Its supervisor sees the restart, then fails the pending tasks.
    wait_until(lambda: queue_pool.reset_by_restart and queue_pool.driver.statistics().tasks_failed == 100_000, timeout=60)
    text = repr(queue_pool)  # what it says now: not its queues as they were (reviewer 23)
    assert "stopped (the cluster was restarted)" in text and "100000 submitted, 0 done, 100000 failed" in text, text
    assert "its queues were taken by the restart (a new pool on its dirpath serves" in text and "pending" not in text, text

    queue_pool.close()
    queue_pool = QueuePool(client, 2, durability="durable", dirpath=dirpath)
    assert queue_pool.get_queue_size() == {"default-queue-0": 50_000, "default-queue-1": 50_000}
    assert "default-queue-0: up, 50000 pending (counted" in repr(queue_pool)
    consumer_pool = ConsumerPool(client, queue_pool, n_consumers=4, batch_size=1000)
    consumer_pool.start()
    consumer_pool.join(progress=True, timeout=120)
    # This driver submitted none: the bar counts against what the queues hold and sent here
    # (not what came in here: the results on their way were counted twice), and ends at what
    # was done.
    assert seen and seen[-1] == (100_000, 100_000), seen[-3:]
    assert all(total == 100_000 and done <= total for done, total in seen), seen
    results = consumer_pool.results()
    assert sum(len(r) for r in results.values()) == 100_000
    assert all(v == 328350 for r in results.values() for v in r.values())
    assert queue_pool.get_queue_size() == {"default-queue-0": 0, "default-queue-1": 0}
    consumer_pool.close()
    queue_pool.close()


def test_a_second_pool_on_a_live_queue_directory_attaches_and_its_broker_stays_the_only_owner(
    client: Client, tmp_path: Path
) -> None:
    with QueuePool(client, 1, durability=Durability.DURABLE, dirpath=tmp_path, name="jobs") as first:
        first.batch_submit([(add, i) for i in range(10)])
        first.flush()
        with QueuePool(client, 1, durability=Durability.DURABLE, dirpath=tmp_path, name="jobs") as second:
            assert second.attached and second.endpoints == first.endpoints
            second.batch_submit([(add, i) for i in range(5)])
            second.flush()
            assert second.get_queue_size() == first.get_queue_size() == {"jobs-queue-0": 15}
        # The directory itself stays locked by its one broker: a broker placed on it is refused.
        from zdq.storage.lmdb import LMDBStorage

        with pytest.raises(QueueLocked):
            LMDBStorage(str(tmp_path / "jobs-queue-0")).open()


def test_durable_results_come_back_like_transient_ones(client: Client, tmp_path: Path) -> None:
    with QueuePool(client, 2, durability="durable", dirpath=tmp_path) as queue_pool:
        with ConsumerPool(client, queue_pool, n_consumers=2) as consumers:
            consumers.start()
            assert queue_pool.batch_submit([(add, i, 1) for i in range(5000)]).result(timeout=60) == [
                i + 1 for i in range(5000)
            ]
            assert queue_pool.submit(add, 2, b=3).result(timeout=30) == 5



def test_a_durable_pool_keeps_more_chunks_in_flight_unless_told_its_window(client: Client, tmp_path: Path) -> None:
    # zdq.durable.window (48 shipped): a durable broker confirms a round once its commit is
    # flushed, so its driver keeps a larger window; window= on the pool (or attaching) still wins.
    with QueuePool(client, 1, durability="durable", dirpath=tmp_path, name="wide") as wide:
        assert wide.settings.window == 48 and wide._driver._ledger.settings.window == 48
        with QueuePool(client, 1, durability="durable", dirpath=tmp_path, name="wide", window=8) as attached:
            assert attached.attached and attached._driver._ledger.settings.window == 8
        wide.batch_submit([(add, i, 1) for i in range(100)], batch_size=1)  # 100 chunks: beyond 48 in flight
        wide.flush(timeout=30)
        assert wide.get_queue_size() == {"wide-queue-0": 100}
    with QueuePool(client, 1, durability="durable", dirpath=tmp_path, name="narrow", window=4) as narrow:
        assert narrow._driver._ledger.settings.window == 4
    with QueuePool(client, 1) as transient:
        assert transient._driver._ledger.settings.window == 16


def test_a_full_disk_fails_the_chunks_it_could_not_store_and_nothing_else(client: Client, small_disk: Path) -> None:
    from zdq.errors import BatchError, StorageFull

    with QueuePool(client, 1, durability="durable", dirpath=small_disk, map_size="1MiB") as queue_pool:
        blob = b"z" * 200_000
        batch = queue_pool.batch_submit([(len, blob) for _ in range(40)], batch_size=1)  # 8 MB > 4 MB
        queue_pool.flush(timeout=60)  # every chunk is either confirmed or refused by now
        refused = batch.completed
        stored = queue_pool.get_queue_size()["default-queue-0"]
        assert refused > 0 and stored > 0 and stored + refused == 40  # confirmed = stored, no more
        with ConsumerPool(client, queue_pool) as consumers:
            consumers.start()
            with pytest.raises(BatchError) as info:
                batch.result(timeout=60)
        errors = info.value.errors
        assert len(errors) == refused and all(isinstance(e, StorageFull) for e in errors.values())
        assert [v for i, v in enumerate(info.value.values) if i not in errors] == [200_000] * stored


def test_a_durable_pool_opened_again_with_fewer_queues_warns_of_the_queues_it_leaves_unserved(
    client: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with QueuePool(client, 3, durability="durable", dirpath=str(tmp_path), name="jobs") as queue_pool:
        queue_pool.batch_submit([(add, i) for i in range(30)])
        queue_pool.flush(timeout=30)
    with caplog.at_level("WARNING", logger="zdq"):
        with QueuePool(client, 1, durability="durable", dirpath=str(tmp_path), name="jobs"):
            pass
    (warning,) = [r.getMessage() for r in caplog.records if "beyond" in r.getMessage()]
    assert "opened with 1 queue," in warning and "jobs-queue-1" in warning and "jobs-queue-2" in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="zdq"):  # all of them: nothing to say
        with QueuePool(client, 3, durability="durable", dirpath=str(tmp_path), name="jobs") as queue_pool:
            assert sum(queue_pool.get_queue_size().values()) == 30
    assert not [r for r in caplog.records if "beyond" in r.getMessage()]


def test_a_durable_pool_opened_again_with_more_queues_serves_its_old_tasks_and_its_new_queues(
    client: Client, tmp_path: Path
) -> None:
    with QueuePool(client, 1, durability="durable", dirpath=tmp_path, name="jobs") as queue_pool:
        queue_pool.batch_submit([(add, i, 1) for i in range(100)])
        queue_pool.flush(timeout=30)
    # The new queue is opened with a key of its own first: it takes the pool's (issue: the open
    # was refused as "written by different pools", and left an empty jobs-queue-1 behind).
    with QueuePool(client, 2, durability="durable", dirpath=tmp_path, name="jobs") as queue_pool:
        assert queue_pool.get_queue_size() == {"jobs-queue-0": 100, "jobs-queue-1": 0}
        new = queue_pool.batch_submit([(add, i, 2) for i in range(100)], batch_size=10)
        queue_pool.flush(timeout=30)
        assert queue_pool.get_queue_size()["jobs-queue-1"] > 0
        with ConsumerPool(client, queue_pool, n_consumers=2) as consumers:
            consumers.start()
            assert new.result(timeout=60) == [i + 2 for i in range(100)]
            consumers.join(timeout=60)
            values = sorted(v for results in consumers.results().values() for v in results.values())
        assert values == sorted([i + 1 for i in range(100)] + [i + 2 for i in range(100)])
    with QueuePool(client, 2, durability="durable", dirpath=tmp_path, name="jobs") as queue_pool:  # agreed since
        assert queue_pool.get_queue_size() == {"jobs-queue-0": 0, "jobs-queue-1": 0}


def test_queues_of_different_pools_in_one_dirpath_are_refused_and_the_failed_open_leaves_no_queue_behind(
    client: Client, tmp_path: Path
) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    with QueuePool(client, 1, durability="durable", dirpath=mine, name="jobs") as queue_pool:
        queue_pool.batch_submit([(add, i) for i in range(10)])
        queue_pool.flush(timeout=30)
    with QueuePool(client, 2, durability="durable", dirpath=other, name="jobs") as queue_pool:
        queue_pool.batch_submit([(add, i) for i in range(10)], batch_size=1)
        queue_pool.flush(timeout=30)
        assert all(queue_pool.get_queue_size().values())
    shutil.copytree(other / "jobs-queue-1", mine / "jobs-queue-1")  # another pool's tasks, another key
    with pytest.raises(StorageCorrupt, match="different pools"):
        QueuePool(client, 3, durability="durable", dirpath=mine, name="jobs")
    # jobs-queue-2, created by the failed open, is gone; the two queues holding tasks are untouched.
    assert sorted(p.name for p in mine.iterdir()) == ["jobs-queue-0", "jobs-queue-1"]


def test_an_empty_queue_left_by_an_open_that_failed_joins_the_pool_and_is_not_warned_of(
    client: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    with QueuePool(client, 2, durability="durable", dirpath=other, name="jobs"):
        pass  # two empty queues of another key: what a refused growth left behind before
    with QueuePool(client, 1, durability="durable", dirpath=mine, name="jobs") as queue_pool:
        queue_pool.batch_submit([(add, i) for i in range(10)])
        queue_pool.flush(timeout=30)
    shutil.copytree(other / "jobs-queue-1", mine / "jobs-queue-1")
    with caplog.at_level("WARNING", logger="zdq"):
        with QueuePool(client, 1, durability="durable", dirpath=mine, name="jobs") as queue_pool:
            assert queue_pool.get_queue_size() == {"jobs-queue-0": 10}
    assert not [r for r in caplog.records if "beyond" in r.getMessage()]  # it holds nothing to serve
    with QueuePool(client, 2, durability="durable", dirpath=mine, name="jobs") as queue_pool:
        assert queue_pool.get_queue_size() == {"jobs-queue-0": 10, "jobs-queue-1": 0}
        with ConsumerPool(client, queue_pool, n_consumers=1) as consumers:
            consumers.start()
            consumers.join(timeout=60)
            assert sorted(v for r in consumers.results().values() for v in r.values()) == list(range(10))
