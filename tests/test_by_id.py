"""Results and states by task id from another process (issue 25, point 5): ``zdq.result`` and
``zdq.state``, through the public API on a LocalCluster.

A submitter process (``python -c``, its own Dask client) attaches to a pool by name, submits,
waits for its futures and exits; this process asks for the results by the futures' keys. The
durable case kills the broker's worker (SIGKILL) after the submitter got its result: the result
is read again from disk after the recovery, and the task did not run again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from distributed import Client

import zdq
from zdq import ConsumerPool, PoolNotFound, QueuePool, ZdqTimeoutError
from zdq.cli import main

from .conftest import wait_until
from .tasks import add, blob, sleep

ROOT = str(Path(__file__).resolve().parent.parent)
FAST = {"heartbeat_interval": "250ms", "heartbeat_timeout": "2s"}

# Attaches to the live pool NAME (durable: with its DIRPATH), submits, waits, prints the keys, exits.
_SUBMITTER = r"""
import sys
from distributed import Client
from zdq import QueuePool
from tests.tasks import add, fail, flaky

address, name, dirpath, counter = sys.argv[1:5]
with Client(address, timeout=60) as client:
    kwargs = {"durability": "durable", "dirpath": dirpath} if dirpath else {}
    with QueuePool(client, name=name, **kwargs) as pool:
        assert pool.attached, "the submitter must attach to the pool of the test's process"
        ok, bad, once = pool.submit(add, 20, 22), pool.submit(fail, "no luck"), pool.submit(flaky, counter, 0)
        assert ok.result(timeout=60) == 42 and once.result(timeout=60) == 1
        try:
            bad.result(timeout=60)
        except ValueError:
            pass
        print(ok.key, bad.key, once.key, flush=True)
"""


def _submit_elsewhere(client: Client, name: str, tmp_path: Path, dirpath: Path | None = None) -> tuple[int, int, int]:
    """Run the submitter process to its end; return the keys of its three tasks."""
    done = subprocess.run(
        [sys.executable, "-c", _SUBMITTER, client.scheduler.address, name, str(dirpath or ""), str(tmp_path / "runs")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, f"the submitter process failed: {done.stderr[-3000:]}"
    ok, bad, once = (int(k) for k in done.stdout.split())
    return ok, bad, once


def _name() -> str:
    return f"byid-{uuid.uuid4().hex[:8]}"


def test_results_by_id_are_read_by_another_process_after_their_submitter_exited(
    client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = _name()
    with QueuePool(client, name=name, result_ttl=60) as pool, ConsumerPool(client, pool, n_consumers=1) as consumers:
        consumers.start()
        ok, bad, once = _submit_elsewhere(client, name, tmp_path)
        assert zdq.result(name, ok, timeout=10) == 42
        assert zdq.state(name, ok) == "done" and pool.state_of(ok) == "done"
        wait_until(lambda: pool.broker_statistics()[0].kept_tasks == 3, timeout=10)  # also on the page, /metrics
        assert zdq.state(name, bad) == "failed"
        with pytest.raises(ValueError, match="no luck"):
            zdq.result(name, bad, timeout=10)
        assert zdq.state(name, once + 10**6) == "unknown"
        assert main(["result", "--scheduler", client.scheduler.address, name, str(ok), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {
            "pool": name, "key": ok, "state": "done", "result": "42", "detail": "done"
        }
        with pytest.raises(ZdqTimeoutError, match="last state: unknown"):
            zdq.result(name, once + 10**6, timeout=0.2)
    with pytest.raises(PoolNotFound, match=name):
        zdq.state(name, ok)  # its owner closed it


def test_without_result_ttl_a_result_its_driver_took_is_unknown(client: Client) -> None:
    name = _name()
    with QueuePool(client, name=name) as pool, ConsumerPool(client, pool, n_consumers=1) as consumers:
        consumers.start()
        future = pool.submit(add, 1, 2)
        assert future.result(timeout=30) == 3
        wait_until(lambda: zdq.state(name, future.key) == "unknown", timeout=10)


def test_a_tasks_state_goes_from_pending_to_started_to_done(client: Client) -> None:
    name = _name()
    with QueuePool(client, name=name, result_ttl=60) as pool, ConsumerPool(client, pool, n_consumers=1) as consumers:
        future = pool.submit(sleep, 1.5)
        wait_until(lambda: zdq.state(name, future.key) == "pending", timeout=10)
        consumers.start()
        wait_until(lambda: zdq.state(name, future.key) == "started", timeout=20, interval=0.02)
        assert zdq.result(name, future.key, timeout=20) == 1.5
        assert future.result(timeout=10) == 1.5
        assert zdq.state(name, future.key) == "done"


def test_kept_results_expire_after_result_ttl(client: Client) -> None:
    name = _name()
    with QueuePool(client, name=name, result_ttl=3) as pool, ConsumerPool(client, pool, n_consumers=1) as consumers:
        consumers.start()
        future = pool.submit(add, 2, 3)
        assert future.result(timeout=30) == 5
        assert zdq.result(name, future.key, timeout=2) == 5
        wait_until(lambda: zdq.state(name, future.key) == "unknown", timeout=15)


def test_past_result_bytes_the_oldest_kept_results_are_dropped_first(client: Client) -> None:
    name = _name()
    with QueuePool(client, name=name, result_ttl=60, result_bytes=3000) as pool, ConsumerPool(
        client, pool, n_consumers=1
    ) as consumers:
        consumers.start()
        keys = []
        for _ in range(3):  # one chunk each, about 1.3 kB of results: two fit
            future = pool.submit(blob, 1200)
            assert len(future.result(timeout=30)) == 1200
            keys.append(future.key)
            wait_until(lambda: zdq.state(name, keys[-1]) == "done", timeout=10)
        wait_until(lambda: zdq.state(name, keys[0]) == "unknown", timeout=10)
        assert [zdq.state(name, k) for k in keys[1:]] == ["done", "done"]


@pytest.mark.faults
def test_a_durable_pool_keeps_results_by_id_through_the_loss_of_its_brokers_worker(client3: Client, tmp_path: Path) -> None:
    name, dirpath = _name(), tmp_path / "queues"
    with QueuePool(
        client3, 1, "durable", dirpath, name=name, workers=["a"], result_ttl=120, **FAST
    ) as pool, ConsumerPool(client3, pool, n_consumers=1, workers=["c"]) as consumers:
        consumers.start()
        ok, _, once = _submit_elsewhere(client3, name, tmp_path, dirpath)
        wait_until(lambda: zdq.state(name, once) == "done", timeout=10)
        time.sleep(0.5)  # kept results are written with the acknowledgement, within 50 ms of it
        os.kill(int(pool[0].pid().result(timeout=10)), signal.SIGKILL)
        wait_until(lambda: pool.recoveries >= 1, timeout=60)
        assert zdq.result(name, ok, timeout=60) == 42
        assert zdq.result(name, once, timeout=10) == 1
        assert (tmp_path / "runs").read_text() == "1"  # read from disk, not run again
