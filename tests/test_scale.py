"""Large pools on a small machine: bounded fan-out, placement, and the control plane."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from distributed import Client

from zdq import ConsumerPool, QueuePool
from zdq.errors import PlacementError
from zdq._actor import scheduler_workers

from .conftest import wait_until

from .tasks import add


def test_each_consumer_connects_to_at_most_fan_out_queues_and_every_queue_is_served(client: Client) -> None:
    with (
        QueuePool(client, 6) as queue_pool,
        ConsumerPool(client, queue_pool, n_consumers=3, fan_out=2, start=True) as consumers,
    ):
        assert consumers.served == [[0, 1], [2, 3], [4, 5]]
        batch = queue_pool.batch_submit([(add, i, 1) for i in range(600)], batch_size=10)
        assert batch.result(timeout=60) == [i + 1 for i in range(600)]
        brokers = queue_pool.statistics().brokers
        assert [b.consumers for b in brokers] == [1] * 6  # each queue: exactly the one consumer serving it
        assert all(b.tasks_acked == 100 for b in brokers)


def test_fewer_consumers_than_queues_over_fan_out_still_serve_every_queue(client: Client) -> None:
    with (
        QueuePool(client, 5) as queue_pool,
        ConsumerPool(client, queue_pool, n_consumers=2, fan_out=1, start=True) as consumers,
    ):
        assert consumers.served == [[0, 1, 2], [2, 3, 4]]  # each takes ceil(5 / 2): together, all
        futures = [queue_pool.submit(add, i, i) for i in range(50)]
        assert [f.result(timeout=60) for f in futures] == [2 * i for i in range(50)]
        assert [b.consumers for b in queue_pool.statistics().brokers] == [1, 1, 2, 1, 1]


def _worker_name() -> str:
    from distributed import get_worker

    return str(get_worker().name)


@pytest.fixture
def gpu_worker(client: Client) -> Iterator[str]:
    """A real `dask worker` process that declares the resource GPU=1, beside the cluster's own."""
    before = len(scheduler_workers(client))
    proc = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", client.scheduler.address, "--name", "gpu",
         "--nthreads", "1", "--no-nanny", "--no-dashboard", "--resources", "GPU=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        client.wait_for_workers(before + 1, timeout=60)
        yield "gpu"
    finally:
        proc.terminate()
        try:
            # A worker's graceful close beside a loaded suite once took past 30 s (alone: 0.4 s);
            # a kill after a few seconds ends it as surely, and the scheduler sees it leave at once.
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        wait_until(lambda: len(scheduler_workers(client)) == before, timeout=60)


def test_pools_placed_by_dask_resources_run_only_on_workers_that_declare_them(client: Client, gpu_worker: str) -> None:
    with (
        QueuePool(client, 2, resources={"GPU": 1}) as queue_pool,
        ConsumerPool(client, queue_pool, n_consumers=2, resources={"GPU": 1}, start=True) as consumers,
    ):
        (gpu_address,) = [a for a, w in scheduler_workers(client).items() if w["name"] == gpu_worker]
        gpu_pid = client.run(os.getpid, workers=[gpu_address])[gpu_address]
        assert [queue_pool[i].pid().result(timeout=30) for i in range(2)] == [gpu_pid, gpu_pid]
        assert {s.worker for s in consumers.statistics()} == {gpu_address}
        assert {f.result(timeout=60) for f in [queue_pool.submit(_worker_name) for _ in range(20)]} == {gpu_worker}


def test_resources_that_no_worker_declares_are_a_clear_error(client: Client) -> None:
    with pytest.raises(PlacementError, match=r'dask worker --resources "TPU=2"'):
        QueuePool(client, 1, resources={"TPU": 2})
    with pytest.raises(ValueError, match="resources must map"):
        QueuePool(client, 1, resources={"GPU": -1})
    with QueuePool(client, 1) as queue_pool:
        with pytest.raises(PlacementError, match="no worker"):
            ConsumerPool(client, queue_pool, resources={"TPU": 1})
