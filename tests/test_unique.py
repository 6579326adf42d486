"""Unique tasks (``submit(..., unique_key=)``) through the public API, on real LocalClusters:
one run per key while a task with it is queued or running, whichever producer submits it, its
``unique_for`` window, and a durable queue that keeps the key through its worker's SIGKILL."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from distributed import Client

from zdq import ConsumerPool, DuplicateTask, QueuePool, TaskExpired

from .conftest import wait_until

FAST = {"heartbeat_interval": "250ms", "heartbeat_timeout": "2s"}


def report(folder: str, token: str, seconds: float) -> str:
    """A task whose side effect is one line in ``folder/runs`` per run (the token it was given)."""
    with open(Path(folder, "runs"), "a") as f:
        f.write(token + "\n")
    time.sleep(seconds)
    return f"report {token}"


def report_when_let_go(folder: str, token: str, gate: str) -> str:
    """:func:`report`, running until the file ``gate`` exists (at most 60 s): the test, not a
    guessed duration, decides that the task is still running."""
    with open(Path(folder, "runs"), "a") as f:
        f.write(token + "\n")
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    return f"report {token}"


def runs(folder: Path) -> list[str]:
    path = folder / "runs"
    return path.read_text().split() if path.exists() else []


def test_two_producers_submitting_one_key_run_the_task_once_and_both_get_its_result(
    client: Client, tmp_path: Path
) -> None:
    folder = str(tmp_path)
    with QueuePool(client, 2, name="unique-shared") as first:
        second = QueuePool.attach(client, "unique-shared")
        try:
            with ConsumerPool(client, first, n_consumers=2, start=True):
                owner = first.submit(report, folder, "a", 1.5, unique_key="user-42-report")
                wait_until(lambda: runs(tmp_path) == ["a"], timeout=30)  # running
                others = [
                    second.submit(report, folder, "b", 0.0, unique_key="user-42-report"),
                    first.submit(report, folder, "c", 0.0, unique_key="user-42-report"),
                ]
                other_key = second.submit(report, folder, "d", 0.0, unique_key="user-43-report")
                assert other_key.result(timeout=30) == "report d"  # another key runs at once
                results = [f.result(timeout=30) for f in [owner, *others]]
                assert results == ["report a"] * 3
                assert sorted(runs(tmp_path)) == ["a", "d"]
                assert others[0].key != owner.key  # each future keeps its own task id
                stats = first.broker_statistics()
                assert sum(b.tasks_unique_duplicates for b in stats) == 2
                assert sum(b.unique_keys for b in stats) == 0  # both tasks ended: no key held
                # The task ended: the key is free, the next submission runs.
                again = second.submit(report, folder, "e", 0.0, unique_key="user-42-report")
                assert again.result(timeout=30) == "report e"
                assert sorted(runs(tmp_path)) == ["a", "d", "e"]
        finally:
            second.close()


def test_unique_for_holds_the_key_after_the_task_ended_then_frees_it(client: Client, tmp_path: Path) -> None:
    folder = str(tmp_path)
    with QueuePool(client, 1) as pool, ConsumerPool(client, pool, n_consumers=1, start=True):
        assert pool.submit(report, folder, "a", 0.0, unique_key="nightly", unique_for=2.0).result(timeout=30) == "report a"
        refused = pool.submit(report, folder, "b", 0.0, unique_key="nightly")
        with pytest.raises(DuplicateTask, match="nightly") as caught:
            refused.result(timeout=30)
        assert caught.value.key == "nightly" and caught.value.free_at > time.time() - 1
        time.sleep(max(0.0, caught.value.free_at - time.time()) + 0.2)
        assert pool.submit(report, folder, "c", 0.0, unique_key="nightly").result(timeout=30) == "report c"
        assert runs(tmp_path) == ["a", "c"]
        assert pool.broker_statistics()[0].tasks_unique_duplicates == 1


def test_a_unique_task_that_expires_takes_its_followers_with_it_and_frees_its_key(client: Client, tmp_path: Path) -> None:
    folder = str(tmp_path)
    with QueuePool(client, 1, name="unique-expiring") as queue_pool:
        # No consumer yet: the holder waits in its broker until its expiry passes.
        owner = queue_pool.submit(report, folder, "a", 0.0, unique_key="nightly", expires=1)
        follower = queue_pool.submit(report, folder, "b", 0.0, unique_key="nightly")
        for future in (owner, follower):
            with pytest.raises(TaskExpired):
                future.result(timeout=30)
        with ConsumerPool(client, queue_pool, n_consumers=1, start=True):
            again = queue_pool.submit(report, folder, "c", 0.0, unique_key="nightly")
            assert again.result(timeout=30) == "report c"  # the key was freed by the expiry
        assert runs(tmp_path) == ["c"]


def test_unique_keywords_are_checked_at_the_call(client: Client) -> None:
    with QueuePool(client, 1) as pool:
        with pytest.raises(ValueError, match="1 to 1024 bytes"):
            pool.submit(report, "x", "a", 0.0, unique_key="")
        with pytest.raises(ValueError, match="1 to 1024 bytes"):
            pool.submit(report, "x", "a", 0.0, unique_key="é" * 600)
        with pytest.raises(TypeError, match="unique_key must be a str"):
            pool.submit(report, "x", "a", 0.0, unique_key=b"bytes")
        with pytest.raises(ValueError, match="needs a unique_key"):
            pool.submit(report, "x", "a", 0.0, unique_for=5)
        with pytest.raises(ValueError, match="unique_for must be"):
            pool.submit_call(report, ("x", "a", 0.0), unique_key="k", unique_for=-1)
        with pytest.raises(TypeError, match="unique_key"):
            pool.batch_submit([(report, "x", "a", 0.0)], unique_key="k")  # type: ignore[call-arg]


@pytest.mark.faults
def test_a_durable_queue_keeps_a_unique_key_through_its_workers_sigkill(client3: Client, tmp_path: Path) -> None:
    folder = tmp_path / "side-effects"
    folder.mkdir()
    with QueuePool(client3, 1, durability="durable", dirpath=tmp_path / "q", workers=["a"], **FAST) as pool:
        other = QueuePool(client3, 1, durability="durable", dirpath=tmp_path / "q", workers=["a"], **FAST)
        try:
            assert other.attached
            with ConsumerPool(client3, pool, n_consumers=1, workers=["c"], start=True):
                # The owner runs until the test lets it go, after `after` was confirmed: its key is
                # held throughout, however long the recovery takes.
                gate = str(tmp_path / "let-go")
                owner = pool.submit(report_when_let_go, str(folder), "a", gate, unique_key="invoice-7")
                wait_until(lambda: runs(folder) == ["a"], timeout=30)
                before = other.submit(report, str(folder), "b", 0.0, unique_key="invoice-7")
                pool.flush(timeout=30)
                other.flush(timeout=30)
                os.kill(int(pool[0].pid().result(timeout=10)), signal.SIGKILL)
                wait_until(lambda: pool.recoveries >= 1, timeout=60)
                after = other.submit(report, str(folder), "c", 0.0, unique_key="invoice-7", timeout=30)
                other.flush(timeout=30)
                Path(gate).touch()
                results = [f.result(timeout=60) for f in (owner, before, after)]
                assert results == ["report a"] * 3
                assert set(runs(folder)) == {"a"}  # at least once, and never a second task
        finally:
            other.close()
