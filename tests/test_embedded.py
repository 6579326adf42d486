"""Embedded mode: QueuePool(None, n) and zdq.local(parallel=N) on one machine, with no cluster first.

These tests start their own local clusters (not the shared one), so they must run where no
default client exists: each checks that first.
"""

from __future__ import annotations

import os
import threading

import psutil
import pytest
from distributed import Client, LocalCluster

import zdq
from zdq import QueuePool

from .conftest import wait_until
from .tasks import Square

pytestmark = pytest.mark.cluster


def _no_default_client() -> None:
    from distributed import default_client

    with pytest.raises(ValueError):
        default_client()


def _processes_of(client: Client) -> list[int]:
    """The pids of every worker process (their nannies run in this process)."""
    return list(client.run(os.getpid).values())


def _children() -> set[int]:
    """This process's live child processes, but multiprocessing's resource tracker (started once)."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def _gone(pids: list[int], before: set[int]) -> bool:
    """The workers' processes are gone, no other child process is left, and no zdq thread."""
    alive = {pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE}
    return not alive and _children() <= before and not [t for t in threading.enumerate() if t.name.startswith("zdq-")]


def test_queue_pool_without_a_client_runs_on_a_local_cluster_that_closes_with_it_leaving_no_process() -> None:
    _no_default_client()
    before = _children()
    queue_pool = QueuePool(None, 1, parallel=2)
    try:
        pids = _processes_of(queue_pool.client)
        assert len(set(pids)) == 2 and set(pids) <= _children()
        consumers = zdq.ConsumerPool(None, queue_pool, n_consumers=2)  # on the same cluster
        consumers.start()
        assert queue_pool.submit(Square(9)).result(timeout=60) == 81
    finally:
        queue_pool.close()
    wait_until(lambda: _gone(pids, before), timeout=30)
    _no_default_client()  # the pool's client is no longer the default
    queue_pool.close()  # idempotent


def test_local_runs_tasks_end_to_end_in_a_few_lines() -> None:
    _no_default_client()
    before = _children()
    with zdq.local(parallel=2) as queue_pool:
        pids = _processes_of(queue_pool.client)
        assert queue_pool.insert((Square(i) for i in range(1000)), progress=False) == 1000
        consumers = queue_pool.local_consumers
        assert queue_pool.consumer_pools() == [consumers]
        consumers.join(timeout=60)
        assert sorted(v for per in consumers.results().values() for v in per.values()) == [i * i for i in range(1000)]
    wait_until(lambda: _gone(pids, before), timeout=30)


def test_queue_pool_without_a_client_uses_the_default_client_and_leaves_its_cluster_running() -> None:
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        with QueuePool(None, 1) as queue_pool:
            assert queue_pool.client is client
        assert client.run(os.getpid)  # still up: the pool did not own it


def test_parallel_is_refused_with_a_client_or_when_it_is_not_a_positive_integer(client: Client) -> None:
    with pytest.raises(ValueError, match="parallel="):
        QueuePool(client, 1, parallel=2)
    with pytest.raises(ValueError, match="parallel must be a positive integer"):
        zdq.embedded._parallel(0)


def test_two_embedded_pools_share_one_local_cluster_which_closes_with_the_last(caplog: pytest.LogCaptureFixture) -> None:
    """The second QueuePool(None, ...) finds the first one's cluster as the default client: closing
    the first must not pull it from under the second (whose futures hung when it did)."""
    _no_default_client()
    before = _children()
    first = QueuePool(None, 1, parallel=2)
    try:
        pids = _processes_of(first.client)
        with caplog.at_level("WARNING", logger="zdq"):
            second = QueuePool(None, 1, parallel=3)  # parallel= cannot apply to a cluster already there
        assert any("parallel=3 does not apply" in r.getMessage() for r in caplog.records)
        try:
            assert second.client is first.client
            first.close()
            consumers = zdq.ConsumerPool(None, second, n_consumers=1, start=True)
            assert second.submit(Square(5)).result(timeout=60) == 25
            assert all(psutil.pid_exists(pid) for pid in pids)
            consumers.close()
        finally:
            second.close()
    finally:
        first.close()
    wait_until(lambda: _gone(pids, before), timeout=30)
    _no_default_client()


def test_a_script_that_makes_a_local_pool_at_its_top_level_is_told_to_guard_it(tmp_path) -> None:
    """Dask spawns a local cluster's workers, which import the main script again: unguarded, its
    top level fails in each of them, and Dask's error says so in a page of text per nanny each
    worker starts (some 500 lines). zdq ends a worker there with what to do, in one line, before
    it starts nannies of its own; the script says it too, and ends (no hang, no process left)."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text("import zdq\nwith zdq.local(parallel=1) as qp:\n    qp.submit(abs, -3).result(timeout=60)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode != 0
    assert 'put that code under `if __name__ == "__main__":`' in proc.stderr, proc.stderr[-2000:]
    hint = [line for line in proc.stderr.splitlines() if line.startswith("zdq: Dask starts a local cluster's workers")]
    assert len(hint) >= 2  # the worker's one line (no traceback), and the script's note
    assert "An attempt has been made to start a new process" not in proc.stderr
    assert len(proc.stderr.splitlines()) < 120, proc.stderr[-2000:]
