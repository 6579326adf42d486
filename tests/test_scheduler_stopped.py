"""A scheduler that does not answer (SIGSTOPped): placing a pool, its consumers or an Executor
raises PlacementError naming the scheduler within ``placement-timeout``, instead of waiting for
ever (``client.run_on_scheduler`` and ``get_dataset`` have no bound of their own), and what was
placed before keeps working. Real ``dask scheduler`` and ``dask worker`` processes: a
LocalCluster's scheduler lives in this process and cannot be stopped alone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import dask
import pytest
from distributed import Client

import zdq
from zdq import ConsumerPool, QueuePool
from zdq.errors import PlacementError

from .conftest import stop_process
from .tasks import add

pytestmark = [pytest.mark.cluster, pytest.mark.faults]

PLACEMENT_TIMEOUT = 3.0
#: The placement-timeout of the placements tried while the scheduler is stopped: each of them waits
#: it out (three in a row), and zdq raises within a millisecond of it, so one second shows the
#: bound as well as three did. The pools placed while the scheduler answers keep the longer one.
STOPPED_PLACEMENT_TIMEOUT = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def stoppable(tmp_path: os.PathLike[str]) -> Iterator[tuple[Client, int]]:
    """A client of a scheduler process (its pid given) with one worker process."""
    port = _free_port()
    log = open(os.path.join(tmp_path, "dask.log"), "wb")
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--dashboard-address", ":0", "--no-show"],
        stdout=log, stderr=log,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1",
         "--no-dashboard", "--no-nanny"],
        stdout=log, stderr=log,
    )
    try:
        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
            yield client, scheduler.pid
    finally:
        os.kill(scheduler.pid, signal.SIGCONT)
        for proc in (worker, scheduler):
            proc.terminate()
        for proc in (worker, scheduler):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
        log.close()


@pytest.mark.timeout(180)
def test_placing_while_the_scheduler_is_stopped_raises_within_the_placement_timeout(stoppable: tuple[Client, int]) -> None:
    client, scheduler_pid = stoppable
    with dask.config.set({"zdq.placement-timeout": f"{PLACEMENT_TIMEOUT}s"}):
        with QueuePool(client, 1) as before, ConsumerPool(client, before, n_consumers=1) as consumers:
            consumers.start()
            assert before.submit(add, 1, 2).result(timeout=30) == 3
            stop_process(scheduler_pid)  # every thread of it stopped
            try:
                for place in (
                    lambda: QueuePool(client, 1),
                    lambda: ConsumerPool(client, before, n_consumers=1),
                    lambda: zdq.Executor(client=client),
                ):
                    started = time.monotonic()
                    with dask.config.set({"zdq.placement-timeout": f"{STOPPED_PLACEMENT_TIMEOUT}s"}):
                        with pytest.raises(PlacementError, match=r"scheduler tcp://127\.0\.0\.1:\d+ did not answer .* within placement-timeout"):
                            place()
                    assert time.monotonic() - started < STOPPED_PLACEMENT_TIMEOUT * 3
                # The queues placed before do not need the scheduler to carry tasks.
                assert before.submit(add, 2, 3).result(timeout=30) == 5
            finally:
                os.kill(scheduler_pid, signal.SIGCONT)
            with QueuePool(client, 1) as after:  # placed again once it answers
                assert after.n_queues == 1
