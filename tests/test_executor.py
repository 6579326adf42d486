"""zdq.Executor as a concurrent.futures.Executor, and Dask's map/gather on a pool, on a real cluster.

The at-exit cases run a small program with an embedded cluster in a subprocess (bounded by a
timeout): what happens when a program ends is only seen from outside it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import itertools
import os
import subprocess
import sys
import textwrap
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from distributed import Client

import zdq
from zdq import ConsumerPool, QueuePool
from zdq.errors import TaskTimeout

from .conftest import wait_until
from .executor_tasks import (
    Box,
    echo,
    nap,
    nap_marked,
    nap_noted,
    square,
    square_unless,
    unbox,
)

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent


def test_an_executor_on_the_default_client_makes_its_own_pool_and_closes_it_on_shutdown(client: Client) -> None:
    with zdq.Executor(max_workers=2) as executor:
        pool = executor.queue_pool
        assert pool.client is client and pool.consumer_count() == 2
        assert executor.submit(pow, 2, 10).result(timeout=60) == 1024
        # fn is positional-only: keywords named fn and self reach the function.
        assert executor.submit(echo, 1, fn="f", self="s").result(timeout=60) == ((1,), {"fn": "f", "self": "s"})
        with pytest.raises(TypeError):
            executor.submit(arg=1)  # type: ignore[call-arg]
    assert pool.closed
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(pow, 2, 2)
    assert client.run(os.getpid)  # the cluster was the client's: still up


def test_map_gives_results_in_order_raises_a_tasks_error_at_its_position_and_counts_its_timeout_from_the_call(
    client: Client,
) -> None:
    with zdq.Executor(2, client=client) as executor:
        assert list(executor.map(square, range(20), timeout=60)) == [i * i for i in range(20)]
        assert list(executor.map(pow, [2, 3, 4], [5, 6], timeout=60)) == [32, 729]  # the shortest iterable
        assert list(executor.map(square, range(10), chunksize=4, timeout=60)) == [i * i for i in range(10)]
        results = executor.map(square_unless, range(6), itertools.repeat(3), timeout=60)
        assert [next(results) for _ in range(3)] == [0, 1, 4]
        with pytest.raises(KeyError, match="item 3"):
            next(results)
        chunked = executor.map(square_unless, range(6), itertools.repeat(3), chunksize=2, timeout=60)
        assert [next(chunked) for _ in range(2)] == [0, 1]
        with pytest.raises(KeyError, match="item 3"):  # its chunk (2, 3) fails as a whole
            next(chunked)
        start = time.monotonic()
        slow = executor.map(nap, [0.0, 5.0], timeout=1.5)
        assert next(slow) == 0.0
        with pytest.raises(TimeoutError):
            next(slow)
        assert time.monotonic() - start < 4.8  # not the 5 s the second task takes


def test_map_with_a_buffersize_maps_an_endless_generator_with_at_most_buffersize_tasks_unfinished(
    client: Client,
) -> None:
    with zdq.Executor(2, client=client) as executor:
        driver = executor.queue_pool.driver
        results = executor.map(square, itertools.count(), buffersize=4, timeout=120)
        seen = []
        for value in itertools.islice(results, 200):
            seen.append(value)
            assert driver.outstanding <= 4
        assert seen == [i * i for i in range(200)]
        results.close()  # type: ignore[attr-defined]
        wait_until(lambda: driver.outstanding == 0, timeout=30)


@contextlib.contextmanager
def _one_consumer_busy(
    client: Client, tmp_path: Path, seconds: float
) -> Iterator[tuple[QueuePool, zdq.PoolExecutor, concurrent.futures.Future[Any]]]:
    """A pool of one consumer, an executor on it, and the future of a task that consumer has
    started (it naps ``seconds``)."""
    marker = tmp_path / "started"
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=1, start=True):
        executor = queue_pool.executor()
        first = executor.submit(nap_marked, str(marker), seconds)
        wait_until(marker.exists, timeout=60)
        yield queue_pool, executor, first


def test_shutdown_cancel_futures_cancels_what_has_not_started_and_leaves_a_given_pool_open(
    client: Client, tmp_path: Path
) -> None:
    with _one_consumer_busy(client, tmp_path, 2.0) as (queue_pool, executor, first):
        assert isinstance(executor, zdq.PoolExecutor) and not isinstance(executor, zdq.Executor)
        assert repr(executor).startswith(f"<zdq.PoolExecutor on the pool {queue_pool.name}: running")
        rest = [executor.submit(nap, 1.0) for _ in range(5)]
        executor.shutdown(wait=True, cancel_futures=True)
        assert first.result(timeout=0) == 2.0
        assert all(f.cancelled() for f in rest)
        # Cancelled futures are done for the standard library's wait too.
        _, not_done = concurrent.futures.wait([first, *rest], timeout=5)
        assert not not_done
        with pytest.raises(RuntimeError, match="after shutdown"):
            executor.submit(nap, 0)
        assert not queue_pool.closed and queue_pool.submit(pow, 2, 3).result(timeout=60) == 8


def test_shutdown_without_wait_with_cancel_futures_returns_at_once_and_cancels_only_what_had_not_started(
    client: Client, tmp_path: Path
) -> None:
    # The cancellations go from a thread (a silent broker must not block the shutdown). A task
    # that had started runs to its end and its future gets its result, as a thread pool's does:
    # it read cancelled, its result dropped, when every future was marked before the queues were
    # asked (reviewer 27a).
    with _one_consumer_busy(client, tmp_path, 1.0) as (queue_pool, executor, first):
        rest = [executor.submit(nap_noted, str(tmp_path), i, 1.0) for i in range(5)]
        mapped = executor.map(nap_noted, itertools.repeat(str(tmp_path)), range(10, 15), itertools.repeat(1.0))
        start = time.monotonic()
        executor.shutdown(wait=False, cancel_futures=True)
        assert time.monotonic() - start < 0.5
        _, not_done = concurrent.futures.wait(rest, timeout=30)
        assert not not_done and [f.cancelled() for f in rest] == [True] * 5
        with pytest.raises(concurrent.futures.CancelledError):
            next(mapped)
        assert first.result(timeout=60) == 1.0 and not first.cancelled()  # it had started: it ran to its end
        wait_until(lambda: queue_pool.driver.outstanding == 0, timeout=60)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["started"]  # none of the others ran
        assert not queue_pool.closed and queue_pool.submit(pow, 2, 3).result(timeout=60) == 8


def test_shutdown_without_wait_returns_at_once_and_closes_its_own_pool_once_the_work_is_done(client: Client) -> None:
    executor = zdq.Executor(1, client=client)
    pool = executor.queue_pool
    futures = [executor.submit(nap, 0.5) for _ in range(3)]
    start = time.monotonic()
    executor.shutdown(wait=False)
    assert time.monotonic() - start < 0.5
    assert not pool.closed
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(nap, 0)
    assert [f.result(timeout=60) for f in futures] == [0.5] * 3
    wait_until(lambda: pool.closed, timeout=30)


def test_shutdown_gives_up_on_work_that_cannot_progress_and_says_why(
    client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from zdq.client import executor as executor_module

    monkeypatch.setattr(executor_module, "STALL_LIMIT", 1.0)
    with QueuePool(client, 1) as queue_pool:  # no consumer: the task can never run
        executor = queue_pool.executor()
        future = executor.submit(square, 2)
        start = time.monotonic()
        with caplog.at_level("WARNING", logger="zdq.client.executor"):
            executor.shutdown(wait=True)
        assert time.monotonic() - start < 10
        assert "1 tasks cannot finish" in caplog.text and "no ConsumerPool" in caplog.text
        assert not future.done() and not queue_pool.closed


def test_no_reference_to_an_argument_or_a_result_is_kept_once_the_future_is_dropped(client: Client) -> None:
    with zdq.Executor(1, client=client) as executor:
        box = Box(7)
        argument = weakref.ref(box)
        future = executor.submit(unbox, box)
        result = future.result(timeout=60)
        assert result.value == 7
        returned = weakref.ref(result)
        mapped = list(executor.map(unbox, [Box(8)], timeout=60))
        assert mapped[0].value == 8
        returned_by_map = weakref.ref(mapped[0])
        del box, future, result, mapped

        def all_freed() -> bool:
            # The done-callbacks run on the driver's callback thread: given a moment to have run.
            gc.collect()
            return argument() is None and returned() is None and returned_by_map() is None

        wait_until(all_freed, timeout=10)


def test_the_executor_works_with_run_in_executor_and_beside_the_standard_librarys_futures(client: Client) -> None:
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=2, start=True):
        with queue_pool.executor() as executor:

            async def main() -> list[int]:
                loop = asyncio.get_running_loop()
                return list(await asyncio.gather(*(loop.run_in_executor(executor, square, x) for x in range(5))))

            assert asyncio.run(main()) == [0, 1, 4, 9, 16]
            with concurrent.futures.ThreadPoolExecutor(2) as threads:
                mixed = [threads.submit(square, 3), executor.submit(square, 4), threads.submit(square, 5), executor.submit(nap, 0.2)]
                _, not_done = concurrent.futures.wait(mixed, timeout=60)
                assert not not_done
                completed = list(concurrent.futures.as_completed(mixed, timeout=60))
                assert sorted(f.result() for f in completed) == [0.2, 9, 16, 25]
        assert not queue_pool.closed


def test_queue_pool_map_returns_a_future_per_call_and_gather_keeps_the_structure(client: Client) -> None:
    with QueuePool(client, 2) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=2, start=True):
        futures = queue_pool.map(echo, range(3), "abc", kw=1)
        assert all(isinstance(f, zdq.TaskFuture) for f in futures)
        assert zdq.gather(futures, timeout=60) == [((i, c), {"kw": 1}) for i, c in zip(range(3), "abc")]
        many = queue_pool.map(square, range(5000), priority=1, batch_size=500)
        keys = [f.key for f in many]
        assert keys == list(range(keys[0], keys[0] + 5000))  # reserved and queued in chunks, not one by one
        assert queue_pool.gather(many, timeout=60) == [i * i for i in range(5000)]
        nested = {"a": futures[0], "b": [futures[1], (futures[2], "plain")]}
        one, two, three = (((i, c), {"kw": 1}) for i, c in zip(range(3), "abc"))
        assert queue_pool.gather(nested, timeout=60) == {"a": one, "b": [two, (three, "plain")]}
        bad = queue_pool.map(square_unless, range(5), [2] * 5)
        with pytest.raises(KeyError, match="item 2"):
            zdq.gather(bad, timeout=60)
        assert zdq.gather(bad, errors="skip", timeout=60) == [0, 1, 9, 16]
        with pytest.raises(ValueError, match="'raise', 'skip'"):
            zdq.gather(bad, errors="ignore")
        # 2 s, 4x the limit: the abandoned nap keeps a zdq thread alive until it ends, and the
        # teardown's leak check waits for it.
        (limited,) = queue_pool.map(nap, [2.0], time_limit=0.5)
        with pytest.raises(TaskTimeout):
            limited.result(timeout=60)
        with pytest.raises(TypeError, match="workers"):
            queue_pool.map(square, [1], workers=["somewhere"])
        assert zdq.gather(queue_pool.map(square, [3], pure=False), timeout=60) == [9]
        assert queue_pool.map(square, []) == []


_PROGRAM = textwrap.dedent(
    """
    import os, sys, time
    import zdq

    def write(path, i):
        time.sleep(0.3)
        with open(path, "a") as f:
            f.write(f"{i}\\n")
        return i

    if __name__ == "__main__":
        out, how = sys.argv[1], sys.argv[2]
        executor = zdq.Executor(max_workers=1)
        print(" ".join(str(p) for p in executor.queue_pool.client.run(os.getpid).values()), flush=True)
        for i in range(5):
            executor.submit(write, out, i)
        if how == "shutdown(wait=False)":
            executor.shutdown(wait=False)
        print("main is done", flush=True)
    """
)


@pytest.mark.parametrize("how", ["no shutdown", "shutdown(wait=False)"])
def test_at_exit_the_submitted_tasks_run_then_the_embedded_cluster_closes_without_a_traceback(
    tmp_path: Path, how: str
) -> None:
    script = tmp_path / "program.py"
    script.write_text(_PROGRAM)
    out = tmp_path / "out.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(script), str(out), how], capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "main is done", proc.stdout
    assert sorted(out.read_text().split()) == ["0", "1", "2", "3", "4"]
    workers = [int(pid) for pid in lines[0].split()]

    def gone() -> bool:
        return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in workers)

    wait_until(gone, timeout=30)


def test_a_task_submitted_while_another_runs_long_goes_to_an_idle_consumer(client: Client) -> None:
    """As a thread pool's idle thread takes the next task: the executor's consumers hold only the
    chunk they run (prefetch 1), so a quick task never waits behind a long one (it did: 2.7 s)."""
    with zdq.Executor(2, client=client) as executor:
        assert executor.submit(square, 2).result(timeout=60) == 4
        executor.submit(nap, 3.0)
        time.sleep(0.3)  # the long task is running
        for i in range(4):
            started = time.monotonic()
            assert executor.submit(square, i).result(timeout=30) == i * i
            assert time.monotonic() - started < 1.5, f"task {i} waited behind the long one"
