"""A durable queue's rate limit through a SIGKILL of its broker's worker (issue 25, point 2: "a
durable queue keeps its own limit across restarts"), on a real LocalCluster of workers a, b and c:
the queue may go on a or c, so that its broker is placed again at once on the spare one (same
host, same directory), never waiting for a nanny to bring the killed worker back (which can take
over 60 s on a loaded machine); the consumers go on the two workers left alive."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from distributed import Client

from tests.conftest import pid_of, wait_until
from zdq import ConsumerPool, QueuePool
from zdq._actor import scheduler_workers

pytestmark = [pytest.mark.cluster, pytest.mark.faults]

FAST = {"heartbeat_interval": "250ms", "heartbeat_timeout": "2s"}


def _rate(starts: list[float]) -> float:
    starts = sorted(starts)
    return (len(starts) - 1) / (starts[-1] - starts[0])


def test_a_durable_queues_limit_set_live_holds_after_its_brokers_worker_is_killed(client3: Client, tmp_path: Path) -> None:
    with QueuePool(client3, 1, "durable", str(tmp_path), workers=["a", "c"], **FAST) as queue_pool:
        queue_pool.set_rate_limit("10/s")  # set live, not given to the pool: the queue keeps it
        names = {a: w["name"] for a, w in scheduler_workers(client3).items()}
        killed = names[queue_pool.workers()[0]]
        os.kill(pid_of(client3, killed), signal.SIGKILL)
        # Placed again on the spare worker (or on the killed one, if its nanny was quicker than the
        # heartbeat timeout): detection plus placing, bounded without any nanny's restart.
        wait_until(lambda: queue_pool.recoveries >= 1, timeout=30)
        assert [b.rate_limit for b in queue_pool.broker_statistics()] == [10.0]  # read back from its disk
        futures = [queue_pool.submit(time.time) for _ in range(30)]
        alive = [w for w in "abc" if w != killed]
        with ConsumerPool(client3, queue_pool, n_consumers=2, workers=alive, **FAST) as consumers:
            consumers.start()
            starts = [f.result(timeout=60) for f in futures]
    # 30 starts at 10/s take about 3 s (a full bucket lets its first few go at once).
    assert _rate(starts) <= 10 * 1.25, sorted(starts)
    assert max(starts) - min(starts) >= 2.0
