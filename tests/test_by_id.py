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
from zdq.errors import TaskCancelled

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
            "pool": name, "key": str(ok), "state": "done", "result": "42", "detail": "done"
        }  # the key a string: past 2**53, a JSON reader's double would name another task
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


# Asks for task KEY of pool NAME from a process that cannot import the test suite's code (its
# sys.path holds zdq alone): prints zdq.state's answer, then what zdq.result raised.
_NO_APP_CODE = r"""
import sys
from distributed import Client
import zdq
from zdq.cli import main

address, name, key = sys.argv[1:4]
try:
    import tests  # noqa: F401
    raise SystemExit("the asker must not see the test suite's code")
except ImportError:
    pass
with Client(address, timeout=60) as client:
    print("state", zdq.state(name, int(key), client=client), flush=True)
    try:
        zdq.result(name, int(key), timeout=5, client=client)
    except Exception as e:
        print("raised", type(e).__module__, type(e).__name__, str(e), flush=True)
print("cli", main(["result", "--scheduler", address, name, key]), flush=True)
"""


def test_a_cancelled_task_reads_as_cancelled_while_its_record_is_kept(
    client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    name, lone = _name(), _name()
    with QueuePool(client, name=name, result_ttl=60) as pool, QueuePool(client, name=f"{lone}@x"):
        future = pool.submit(add, 1, 2)  # no consumer: it waits
        wait_until(lambda: zdq.state(name, future.key) == "pending", timeout=10)
        assert future.cancel()
        wait_until(lambda: zdq.state(name, future.key) == "cancelled", timeout=10)
        with pytest.raises(TaskCancelled):
            zdq.result(name, str(future.key), timeout=5)  # a key as a web route receives it
        assert main(["result", "--scheduler", client.scheduler.address, name, str(future.key)]) == 1
        assert main(["result", "--scheduler", client.scheduler.address, name, str(future.key + 10**6)]) == 2
        assert main(["result", "--scheduler", client.scheduler.address, name, str(future.key), "--wait", "nan"]) == 1
        assert "--wait must be a finite number" in capsys.readouterr().err
        assert main(["result", "--scheduler", client.scheduler.address, name, "12ab"]) == 1
        assert "string of its digits, got '12ab'" in capsys.readouterr().err
        with pytest.raises(ValueError, match="string of its digits"):
            zdq.state(name, "12ab")
        with pytest.raises(PoolNotFound, match=lone):  # the pool "<lone>@x" is not a durable pool "<lone>"
            zdq.state(lone, future.key)


def test_a_unique_tasks_follower_reads_as_its_holder(client: Client) -> None:
    name = _name()
    with QueuePool(client, name=name, result_ttl=60) as pool, ConsumerPool(client, pool, n_consumers=1) as consumers:
        consumers.start()
        holder = pool.submit(sleep, 1.5, unique_key="report-42")
        wait_until(lambda: zdq.state(name, holder.key) == "started", timeout=20, interval=0.02)
        follower = pool.submit(sleep, 1.5, unique_key="report-42")
        wait_until(lambda: zdq.state(name, follower.key) == "started", timeout=10, interval=0.02)
        assert follower.result(timeout=30) == 1.5 and holder.result(timeout=30) == 1.5
        assert zdq.result(name, follower.key, timeout=10) == 1.5
        wait_until(lambda: pool.broker_statistics()[0].kept_tasks >= 1, timeout=10)  # the holder's RACK
        assert zdq.state(name, follower.key) == "done"
        assert zdq.result(name, follower.key, timeout=5) == 1.5


def test_a_failed_tasks_state_is_read_where_its_exception_cannot_be_imported(client: Client, tmp_path: Path) -> None:
    from .by_id_tasks import app_fail

    name = _name()
    alone = tmp_path / "zdq_alone"
    alone.mkdir()
    (alone / "zdq").symlink_to(Path(ROOT) / "zdq")
    with QueuePool(client, name=name, result_ttl=60) as pool, ConsumerPool(client, pool, n_consumers=1) as consumers:
        consumers.start()
        future = pool.submit(app_fail, "out of paper")
        with pytest.raises(Exception, match="out of paper"):
            future.result(timeout=30)
        done = subprocess.run(
            [sys.executable, "-c", _NO_APP_CODE, client.scheduler.address, name, str(future.key)],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(alone)},
            capture_output=True, text=True, timeout=90, check=False,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "state failed", done.stdout
    # The error the driver's future gives where the class cannot be imported: a RemoteTaskError.
    assert lines[1] == "raised zdq.errors RemoteTaskError tests.by_id_tasks.AppError: out of paper", done.stdout
    assert lines[-1] == "cli 1" and "Traceback" not in done.stdout + done.stderr
    assert lines[2].startswith(f"task {future.key} of pool {name}: failed: RemoteTaskError: tests.by_id_tasks.AppError"), done.stdout
    assert "out of paper zdq: the task raised tests.by_id_tasks.AppError, which cannot be rebuilt here" in lines[2]
    assert "tests.by_id_tasks.AppError cannot be imported in this process" in lines[2], done.stdout


@pytest.mark.faults
def test_waits_are_bounded_when_the_brokers_worker_is_stopped(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from zdq.client import by_id

    name = _name()
    with QueuePool(client, name=name, result_ttl=60) as pool:
        future = pool.submit(add, 1, 2)  # no consumer: it waits
        wait_until(lambda: zdq.state(name, future.key) == "pending", timeout=10)
        pid = int(pool[0].pid().result(timeout=10))
        os.kill(pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(ZdqTimeoutError, match=f"{pool.queue_names[0]}.*no answer within"):
                zdq.result(name, future.key, timeout=1)  # not one whole ASK_TIMEOUT (10 s)
            assert time.monotonic() - start < 4
            monkeypatch.setattr(by_id, "UNKNOWN_GRACE", 1.0)
            monkeypatch.setattr(by_id, "ASK_TIMEOUT", 2.0)
            start = time.monotonic()
            with pytest.raises(ZdqTimeoutError, match=f"{pool.queue_names[0]}.*no answer within"):
                zdq.result(name, future.key + 10**6)  # the cause is the silent queue, not the key
            assert time.monotonic() - start < 8
            # A stopped worker's queue is not lost: state() says it timed out (it said BrokerLost,
            # which code that treats a lost queue as gone would misread; reviewer 27b).
            with pytest.raises(ZdqTimeoutError, match=f"{pool.queue_names[0]}.*no answer within 2 s: its worker is stopped"):
                zdq.state(name, future.key)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert zdq.state(name, future.key) == "pending"
        future.cancel()
