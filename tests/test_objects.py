"""Tasks as objects (zdq.Task) and QueuePool.insert on a cluster: runnable wherever a function is,
streamed lazily (the pure parts are in tests/unit/test_objects.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed import Client

from zdq import BatchError, ConsumerPool, QueuePool

from .conftest import wait_until
from .tasks import FlakyTask, Square


def test_task_objects_run_through_submit_batch_submit_and_insert(client: Client) -> None:
    with QueuePool(client, 2) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=2) as consumers:
        consumers.start()
        assert queue_pool.submit(Square(12)).result(timeout=60) == 144
        assert queue_pool.batch_submit([(Square(i),) for i in range(50)]).result(timeout=60) == [i * i for i in range(50)]
        assert queue_pool.insert([Square(i) for i in range(300)], progress=False) == 300
        with pytest.raises(TypeError, match="item 2 is neither"):
            queue_pool.insert([Square(1), Square(2), 5, Square(3)], progress=False)
        consumers.join(timeout=60, stop=False)
        values = sorted(v for per in consumers.results().values() for v in per.values())
        assert values.count(4) == 3  # Square(2) of the batch, of the 300, and the one before the bad item


def test_a_task_object_failing_is_retried_and_dead_lettered_like_any_task(client: Client, tmp_path: Path) -> None:
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool) as consumers:
        consumers.start()
        assert queue_pool.submit(FlakyTask(str(tmp_path / "a"), 2), retries=2).result(timeout=60) == 3
        error = queue_pool.submit(FlakyTask(str(tmp_path / "b"), 5), retries=1).exception(timeout=60)
        assert isinstance(error, ValueError) and "attempt 2 fails" in str(error)  # its own error, as for a function
        wait_until(lambda: len(queue_pool.dead_letters()) == 1, timeout=30)  # and dead-lettered after its attempts
        batch = queue_pool.batch_submit([(FlakyTask(str(tmp_path / "c"), 1),), (Square(3),)])
        with pytest.raises(BatchError):
            batch.result(timeout=60)


def test_insert_streams_a_hundred_thousand_tasks_from_a_generator_pulled_at_most_a_chunk_ahead(
    client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    n, chunk, window, queues = 100_000, 1000, 2, 2
    with (
        QueuePool(client, queues, keep_results=False, window=window) as queue_pool,
        ConsumerPool(client, queue_pool, n_consumers=2) as consumers,
    ):
        consumers.start()
        driver = queue_pool.driver
        ahead = {"items": 0, "chunks": 0}

        def tasks():  # type: ignore[no-untyped-def]
            for i in range(n):
                if i % 100 == 0:  # how far the generator runs ahead of what the driver took
                    stats = driver.statistics()
                    ahead["items"] = max(ahead["items"], i - stats.tasks_submitted)
                    ahead["chunks"] = max(ahead["chunks"], stats.chunks_unconfirmed)
                yield Square(i)

        assert queue_pool.insert(tasks(), total=n, batch_size=chunk) == n
        assert ahead["items"] <= chunk  # only the chunk being cut is held outside the driver
        assert ahead["chunks"] <= window * queues  # and the driver holds a bounded window
        consumers.join(timeout=300)
        assert consumers.nb_consumed() == n
    assert f"{n}/{n}" in capsys.readouterr().err  # the bar, on by default, against the total


def test_an_iterable_that_raises_midway_has_every_task_it_gave_before_queued_and_run(client: Client) -> None:
    """Its own error comes back, with how many tasks were queued; none it gave is dropped (the
    chunk being filled when it raised is queued too)."""
    from .tasks import add

    class Broken(RuntimeError):
        pass

    def calls(fail_at: int):  # type: ignore[no-untyped-def]
        for i in range(fail_at):
            yield (add, i, 1)
        raise Broken(f"the source failed at {fail_at}")

    def squares(fail_at: int):  # type: ignore[no-untyped-def]
        for i in range(fail_at):
            yield Square(i)
        raise Broken(f"the source failed at {fail_at}")

    with QueuePool(client, 2) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=2, start=True) as consumers:
        for fail_at in (10, 999, 1500):
            with pytest.raises(Broken, match=f"failed at {fail_at}") as caught:
                queue_pool.submit_iter(calls(fail_at))
            assert f"the {fail_at} tasks read from the iterable before this error were queued" in caught.value.__notes__[0]
            with pytest.raises(Broken):
                queue_pool.insert(squares(fail_at), progress=False)
        consumers.join(timeout=120, stop=False)
        assert sum(s.tasks_done for s in consumers.statistics()) == 2 * (10 + 999 + 1500)
