"""Streaming with back pressure (issue 24 section 2): ``max_pending`` bounds this driver's
unfinished tasks, not only its unconfirmed chunks, so a producer faster than its consumers runs
in bounded memory; and a two-stage pipeline (stage two consuming stage one's results as they
complete) stays within the bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

import zdq
from zdq import ConsumerPool, QueuePool
from zdq.errors import SubmitTimeout

from .tasks import add, noop, sleep, tiny_sleep

pytestmark = pytest.mark.cluster

#: The driver of the memory test: a separate process, so that its RSS is its own. It submits
#: N tasks (a short sleep each) to 2 consumers and keeps no future, then prints its RSS growth.
_DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import psutil
    from distributed import Client
    from zdq import ConsumerPool, QueuePool
    from tests.tasks import tiny_sleep

    address, n, max_pending = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    sys.stdin.readline()  # started ahead (its imports overlap the other run): the line says go
    me = psutil.Process()
    with Client(address) as client:
        pool = QueuePool(client, keep_results=False, max_pending=max_pending)
        consumers = ConsumerPool(client, pool, n_consumers=2, start=True)
        pool.submit(tiny_sleep, 0).result(60)
        before = me.memory_info().rss
        peak = before
        start = time.monotonic()
        for i in range(n):
            pool.submit(tiny_sleep, i)
            if i % 5000 == 0:
                peak = max(peak, me.memory_info().rss)
        peak = max(peak, me.memory_info().rss)
        elapsed = time.monotonic() - start
        unfinished = pool.driver.outstanding
        consumers.cancel()
        pool.close()
    print(json.dumps({"growth_mib": (peak - before) / 2**20, "unfinished": unfinished, "seconds": elapsed}))
    """
)


def _start_driver(cluster: LocalCluster, n: int, max_pending: int | None) -> subprocess.Popen[str]:
    """The driver's process, importing; it runs once :func:`_driver_result` tells it to."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", _DRIVER, cluster.scheduler_address, str(n), json.dumps(max_pending)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root, env=env,
    )


def _driver_result(proc: subprocess.Popen[str]) -> dict[str, float]:
    try:
        stdout, stderr = proc.communicate("go\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_max_pending_keeps_a_fast_producers_memory_bounded(cluster: LocalCluster, client: Client) -> None:
    # The bounded driver runs at its consumers' pace (some 3,500 tasks a second here): 15,000
    # submits, its growth held to 25 MiB (what 50 MiB was for 30,000: a leak of some 1.7 KiB a
    # task still shows). The unbounded one runs at the producer's pace: 30,000 take under a
    # second, of which about 25,000 pile up (some 45 MiB), enough to tell the two apart.
    n_bounded, n = 15_000, 30_000
    # The unbounded driver's process starts (imports) while the bounded one runs; it runs after.
    later = _start_driver(cluster, n, None)
    try:
        bounded = _driver_result(_start_driver(cluster, n_bounded, 1000))
    except BaseException:
        later.kill()
        later.communicate(timeout=10)
        raise
    unbounded = _driver_result(later)
    print(f"bounded {bounded}, unbounded {unbounded}")
    assert bounded["unfinished"] <= 1000 + 200  # the bound, and what the last coalesced chunk held
    assert bounded["growth_mib"] < 50 * n_bounded / 30_000, bounded
    # Without the bound the work piles up in the driver: the comparison shows the test measures it.
    assert unbounded["unfinished"] > 10 * bounded["unfinished"], unbounded
    # At least a KiB a task piled up (about 1.8 here): beside a CPU-bound process fewer pile up
    # (10,000 against 25,000: the producer is slowed too), and the growth with them.
    piled = unbounded["unfinished"] - bounded["unfinished"]
    assert unbounded["growth_mib"] > bounded["growth_mib"] + piled / 1024, (bounded, unbounded)


def test_submit_waits_for_the_work_and_a_timeout_names_max_pending(client: Client) -> None:
    with QueuePool(client, max_pending=3) as queue_pool:  # no consumer yet: nothing finishes
        futures = [queue_pool.submit(noop, i) for i in range(3)]
        start = time.monotonic()
        with pytest.raises(SubmitTimeout, match=r"max_pending=3 was reached.*3 unfinished"):
            queue_pool.submit(noop, 3, timeout=0.5)
        assert time.monotonic() - start < 5
        with pytest.raises(SubmitTimeout, match="max_pending=3"):
            queue_pool.batch_submit([(noop, i) for i in range(2)], timeout=0.2)  # each task counts
        # Reviewer 27a: a batch of several chunks was named by its first chunk's count alone.
        with pytest.raises(SubmitTimeout, match=r"max_pending=3.*a batch of 5 tasks: nothing of the batch was queued") as e:
            queue_pool.batch_submit([(noop, i) for i in range(5)], timeout=0.2)
        assert e.value.queued == 0 and e.value.future is None
        consumers = ConsumerPool(client, queue_pool, n_consumers=1, start=True)
        try:
            assert queue_pool.submit(noop, 4, timeout=30).result(30) == 4  # room once work finishes
            assert [f.result(30) for f in futures] == [0, 1, 2]
        finally:
            consumers.cancel()


def test_an_executor_passes_max_pending_to_its_pool(client: Client) -> None:
    with zdq.Executor(max_workers=1, client=client, max_pending=2) as executor:
        executor.submit(sleep, 0.5)
        executor.submit(sleep, 0.5)
        with pytest.raises(SubmitTimeout, match="max_pending=2"):
            executor.queue_pool.submit(noop, 1, timeout=0.1)
        assert executor.submit(add, 1, 2).result(30) == 3


def test_a_two_stage_pipeline_runs_within_the_bound(client: Client) -> None:
    # The README's pipeline: stage two runs on each of stage one's results as it completes.
    with QueuePool(client, max_pending=50, keep_results=False) as queue_pool:
        consumers = ConsumerPool(client, queue_pool, n_consumers=2, start=True)
        try:
            done = zdq.as_completed(with_results=True, timeout=120)
            total, most = 0, 0
            for i in range(2000):
                loaded = queue_pool.submit(tiny_sleep, i)  # blocks while 50 tasks are unfinished
                done.add(queue_pool.submit(add, loaded, 1))  # stage two, once `loaded` is done
                most = max(most, queue_pool.driver.outstanding)
                for _, value in done.next_batch(block=False):  # results taken as they come
                    total += value
            for _, value in done:
                total += value
            assert total == sum(range(2000)) + 2000
            assert most <= 50 + 1, most
            stats = queue_pool.driver.statistics()  # every task counted done once: none left unfinished
            assert stats.tasks_submitted == stats.tasks_completed == 4000, stats
        finally:
            consumers.cancel()
