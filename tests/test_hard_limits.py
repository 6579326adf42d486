"""Hard time limits (``hard=True``): a task runs in a child process of its consumer, killed at its
limit. Real worker processes (the session's LocalCluster), real SIGKILLs, real pids read in /proc.

Each test places one queue and one consumer, so that "the next task runs on the same consumer"
needs no bookkeeping. The child's pid comes from the TaskTimeout message ("in process PID") or
from the task itself.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from zdq import ConsumerPool, QueuePool, TaskTimeout
from zdq.errors import BatchError, RemoteTaskError, SerializationError, TaskProcessDied

from .conftest import wait_until
from .hard_tasks import (
    add_here,
    allocate_and_sleep,
    blob_here,
    exit_now,
    fork_and_sleep,
    pid_and_parent,
    MuteTwoArgError,
    TwoArgError,
    raise_mute_two_arg_error,
    raise_new_wants_two,
    raise_two_arg_error,
    return_a_lock,
    return_loads_badly,
    sleep_here,
    start_sleep_and_sleep,
    write_pid_and_sleep,
)
from .tasks import add, sleep

FAST = {"heartbeat_interval": "250ms", "heartbeat_timeout": "5s"}


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a zombie's memory is freed, but it was not reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _killed_pid(error: BaseException) -> int:
    match = re.search(r"in process (\d+)", str(error))
    assert match is not None, f"the TaskTimeout does not name the killed process: {error}"
    return int(match.group(1))


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture
def pools(client: Client) -> Iterator[Any]:
    """``pools(**consumer_options)``: a queue and one started consumer (both returned), closed
    after the test."""
    made: list[Any] = []

    def make(**options: Any) -> tuple[QueuePool, ConsumerPool]:
        queue_pool = QueuePool(client, 1, **FAST)
        made.append(queue_pool)
        consumers = ConsumerPool(client, queue_pool, n_consumers=1, start=True, **options)
        made.append(consumers)
        return queue_pool, consumers

    yield make
    for pool in reversed(made):
        pool.close()


@pytest.mark.faults
def test_a_hard_limited_task_is_killed_at_its_limit_and_its_consumer_runs_the_next_tasks(pools: Any) -> None:
    queue_pool, _ = pools()
    warm_pid, worker_pid = queue_pool.submit(pid_and_parent, time_limit=30, hard=True).result(timeout=60)
    assert worker_pid != os.getpid() and warm_pid != worker_pid  # a child of the worker, not the worker
    started = time.monotonic()
    error = queue_pool.submit(sleep_here, 60, time_limit=1, hard=True).exception(timeout=30)
    assert isinstance(error, TaskTimeout), error
    assert time.monotonic() - started < 15
    assert "killed after 1s" in str(error)
    killed = _killed_pid(error)
    assert killed == warm_pid  # the warm child ran it
    assert not _exists(killed)  # killed and reaped: no zombie left
    # The consumer goes on: plain tasks, and hard ones in a new child of the same worker.
    assert queue_pool.submit(add, 1, 2).result(timeout=30) == 3
    new_pid, parent = queue_pool.submit(pid_and_parent, time_limit=30, hard=True).result(timeout=60)
    assert parent == worker_pid and new_pid != killed
    assert queue_pool.submit(pid_and_parent, time_limit=30, hard=True).result(timeout=60)[0] == new_pid  # warm
    # Arguments and values larger than a pipe's buffer go through whole.
    assert queue_pool.submit(len, b"x" * 3_000_000, time_limit=30, hard=True).result(timeout=60) == 3_000_000
    assert len(queue_pool.submit(blob_here, 2_000_000, time_limit=30, hard=True).result(timeout=60)) == 2_000_000


@pytest.mark.faults
def test_a_killed_task_gives_its_memory_back(pools: Any, tmp_path: Path) -> None:
    queue_pool, _ = pools()
    report = tmp_path / "allocated"
    n_bytes = 200 * 2**20
    future = queue_pool.submit(allocate_and_sleep, str(report), n_bytes, 60, time_limit=3, hard=True)
    wait_until(lambda: report.exists() and report.read_text(), timeout=30)
    pid = int(report.read_text().split()[0])
    assert _rss_bytes(pid) >= n_bytes  # held by the child, not the worker
    assert isinstance(future.exception(timeout=30), TaskTimeout)
    wait_until(lambda: not _exists(pid), timeout=10)  # its pages went with it
    assert queue_pool.submit(add, 2, 2).result(timeout=30) == 4


@pytest.mark.faults
@pytest.mark.parametrize("max_concurrency", [1, 2])
def test_a_consumer_pools_hard_limit_kills_every_task_without_its_own(pools: Any, max_concurrency: int) -> None:
    queue_pool, _ = pools(time_limit=1, hard=True, max_concurrency=max_concurrency)
    single = queue_pool.submit(sleep_here, 60)
    batch = queue_pool.batch_submit([(sleep_here, 60), (add_here, 1, 2)])
    for error in (single.exception(timeout=30),):
        assert isinstance(error, TaskTimeout) and "killed" in str(error), error
    with pytest.raises(BatchError) as info:
        batch.result(timeout=30)
    assert isinstance(info.value.errors[0], TaskTimeout) and info.value.values[1] == 3
    assert not _exists(_killed_pid(info.value.errors[0]))
    assert queue_pool.submit(sleep_here, 0.1).result(timeout=30) == 0.1
    assert queue_pool.put((add_here, 2, 3)).result(timeout=30) == 5  # a raw item: process_item in the child


@pytest.mark.faults
def test_a_consumer_pools_hard_limit_holds_for_tasks_with_options_but_no_limit_of_their_own(pools: Any) -> None:
    """``expires=``, ``retries=`` or ``retry_on=`` give a task options of its own: they must not
    lift the consumer's limit (a safety net), while a task's own time limit still wins."""
    # The four tasks run side by side (a slot each): the limit is each task's own, whatever runs beside.
    queue_pool, _ = pools(time_limit=1, hard=True, max_concurrency=4)
    started = time.monotonic()
    futures = [
        queue_pool.submit(sleep_here, 60, expires=time.time() + 120),
        queue_pool.submit(sleep_here, 60, retries=1, retry_on=(KeyError,)),  # a TaskTimeout is not retried
        queue_pool.batch_submit([(sleep_here, 60)], expires=time.time() + 120),  # the chunk's options
    ]
    own = queue_pool.submit(sleep_here, 1.5, time_limit=10)
    for future in futures[:2]:
        error = future.exception(timeout=30)
        assert isinstance(error, TaskTimeout) and "hard time limit" in str(error), error
    with pytest.raises(BatchError) as info:
        futures[2].result(timeout=30)
    assert isinstance(info.value.errors[0], TaskTimeout) and "hard time limit" in str(info.value.errors[0])
    assert time.monotonic() - started < 20
    assert own.result(timeout=30) == 1.5  # its own limit wins


@pytest.mark.faults
@pytest.mark.parametrize("task", [start_sleep_and_sleep, fork_and_sleep])
def test_the_processes_a_hard_task_started_die_with_it(pools: Any, tmp_path: Path, task: Any) -> None:
    queue_pool, _ = pools()
    report = tmp_path / "grandchild"
    future = queue_pool.submit(task, str(report), 60, time_limit=2, hard=True)
    wait_until(lambda: report.exists() and report.read_text(), timeout=30)
    grandchild = int(report.read_text())
    assert _alive(grandchild)
    assert isinstance(future.exception(timeout=30), TaskTimeout)
    wait_until(lambda: not _alive(grandchild), timeout=10)  # killed with its group (init reaps it)
    assert queue_pool.submit(add_here, 1, 1, time_limit=10, hard=True).result(timeout=60) == 2


@pytest.mark.faults
def test_a_hard_tasks_exception_that_does_not_unpickle_comes_back_as_itself_and_a_value_as_a_remote_task_error(pools: Any) -> None:
    queue_pool, _ = pools()
    # An exception whose __init__ refuses its own args comes back as itself, made without its
    # __init__, from the worker's threads and from a hard task's child alike (reviewer 27a).
    soft = queue_pool.submit(raise_two_arg_error).exception(timeout=30)
    hard = queue_pool.submit(raise_two_arg_error, time_limit=30, hard=True).exception(timeout=60)
    assert type(soft) is TwoArgError and type(hard) is TwoArgError, (soft, hard)
    assert str(hard) == str(soft) == "1-2"
    assert any("raised in the task's child process" in note for note in hard.__notes__), hard.__notes__
    # One whose own __new__ refuses comes as a RemoteTaskError, not as zdq's TypeError; one whose
    # __str__ raises does not kill the child (reviewer 27c).
    refused = queue_pool.submit(raise_new_wants_two, time_limit=30, hard=True).exception(timeout=60)
    assert isinstance(refused, RemoteTaskError) and refused.type_name.endswith("NewWantsTwo"), repr(refused)
    mute = queue_pool.submit(raise_mute_two_arg_error, time_limit=30, hard=True).exception(timeout=60)
    assert type(mute) is MuteTwoArgError, repr(mute)
    value = queue_pool.submit(return_loads_badly, time_limit=30, hard=True).exception(timeout=60)
    assert isinstance(value, RemoteTaskError), value
    assert "could not unpickle the value or exception of its child process" in str(value)
    assert "refusing to load 'a LoadsBadly'" in str(value)
    # A value that does not pickle is zdq's SerializationError, hard or not (reviewer 28a: a
    # RemoteTaskError saying the task raised it).
    for hard_task in (False, True):
        options = {"time_limit": 30, "hard": True} if hard_task else {}
        lock = queue_pool.submit(return_a_lock, **options).exception(timeout=60)
        assert type(lock) is SerializationError and "cannot be pickled" in str(lock), (hard_task, repr(lock))
    assert queue_pool.submit(add, 2, 3, time_limit=30, hard=True).result(timeout=60) == 5


@pytest.mark.faults
def test_a_child_that_exits_on_its_own_fails_its_task_and_is_replaced(pools: Any) -> None:
    queue_pool, _ = pools()
    first, _ = queue_pool.submit(pid_and_parent, time_limit=30, hard=True).result(timeout=60)
    error = queue_pool.submit(exit_now, 7, time_limit=30, hard=True).exception(timeout=60)
    assert isinstance(error, TaskProcessDied) and f"process {first} exited with status 7" in str(error), error
    assert not _exists(first)
    second, _ = queue_pool.submit(pid_and_parent, time_limit=30, hard=True).result(timeout=60)
    assert second != first


@pytest.mark.faults
def test_hard_limited_attempts_are_retried_and_each_is_killed(pools: Any) -> None:
    queue_pool, consumers = pools()
    error = queue_pool.submit(sleep, 60, time_limit=0.5, hard=True, retries=1, retry_backoff=0.0).exception(timeout=30)
    assert isinstance(error, TaskTimeout), error
    assert consumers.statistics()[0].tasks_retried == 1


@pytest.mark.faults
def test_stopping_the_consumer_leaves_no_child_process(client: Client, tmp_path: Path) -> None:
    with QueuePool(client, 1, **FAST) as queue_pool:
        consumers = ConsumerPool(client, queue_pool, n_consumers=1, max_concurrency=3, start=True)
        try:
            idle, _ = queue_pool.submit(pid_and_parent, time_limit=30, hard=True).result(timeout=60)
            marker, started = tmp_path / "busy", tmp_path / "grandchild"
            queue_pool.submit(write_pid_and_sleep, str(marker), 60, time_limit=120, hard=True)
            queue_pool.submit(start_sleep_and_sleep, str(started), 60, time_limit=120, hard=True)
            wait_until(lambda: marker.exists() and marker.read_text() and started.exists() and started.read_text(), timeout=30)
            busy, grandchild = int(marker.read_text()), int(started.read_text())
            assert _alive(idle) and _alive(busy) and _alive(grandchild)
        finally:
            consumers.close()
        wait_until(lambda: not _exists(idle) and not _exists(busy) and not _alive(grandchild), timeout=20)


def test_hard_without_a_time_limit_is_refused_at_the_call(pools: Any) -> None:
    queue_pool, _ = pools()
    with pytest.raises(ValueError, match="give a time_limit"):
        queue_pool.submit(add, 1, 2, hard=True)
    with pytest.raises(ValueError, match="give a time_limit"):
        queue_pool.batch_submit([(add, 1, 2)], hard=True)
    with pytest.raises(ValueError, match="give time_limit"):
        ConsumerPool(queue_pool.client, queue_pool, n_consumers=1, hard=True)


@pytest.mark.faults
def test_a_child_ends_when_its_consumers_process_is_killed() -> None:
    """A worker killed with SIGKILL closes nothing: the child's watchdog sees it reparented, and
    ends (an orphan would hold its task's memory and CPU forever)."""
    code = (
        "import sys, time\n"
        "from zdq.consumer.hard import Child\n"
        "child = Child(); child.start(); print(child.pid, flush=True)\n"
        "child._send(__import__('cloudpickle').dumps((time.sleep, (60,), None)))\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        line = parent.stdout.readline() if parent.stdout is not None else ""
        assert line.strip().isdigit(), f"the parent did not start its child: {line!r}"
        child = int(line)
        assert _alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_until(lambda: not _alive(child), timeout=10)  # reaped by init, or a zombie at worst
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
