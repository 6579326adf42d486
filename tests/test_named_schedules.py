"""Named schedules on real clusters (issue 25, point 1): a service that calls
``schedule(..., name="report")`` each time it starts keeps one schedule, not one per start, with its
next tick and history; across a restart of the program, a SIGKILL of its broker's worker, two
producers naming it at once, and the CLI.

Real LocalClusters, real LMDB directories, real signals; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, LocalCluster

from zdq import ConsumerPool, QueuePool, Schedule
from zdq.client.schedules import home_queue
from zdq.storage.lmdb import inspect_queue

from .conftest import pid_of, wait_until
from .inprocess_cli import zdq_here
from .tasks import Stamp, add

pytestmark = pytest.mark.cluster

FAST: dict[str, Any] = {"heartbeat_interval": "250ms", "heartbeat_timeout": "2s"}
EVERY = 0.5  # seconds: the waits below are for ticks (two each), bounded polls all


def _stamps(path: Path) -> list[float]:
    return [float(line) for line in path.read_text().split()] if path.exists() else []


def _the_one(queue_pool: QueuePool, name: str) -> Schedule:
    """The pool's one schedule: named ``name``, or the test fails naming what it found."""
    found = queue_pool.schedules()
    assert [s.schedule_name for s in found] == [name], f"one schedule named {name!r} expected, found {found}"
    return found[0]


def _on_the_same_grid(a: Schedule, b: Schedule) -> bool:
    """Next ticks a whole number of periods apart: the same grid (a schedule made afresh is
    anchored at the time of its call, off that grid by a random fraction of a period)."""
    periods = (b.next_tick - a.next_tick).total_seconds() / EVERY
    return abs(periods - round(periods)) < 1e-6


def _schedules_on_disk(dirpath: Path) -> int:
    return sum(int(inspect_queue(str(q))["schedules"]) for q in dirpath.iterdir() if q.is_dir())


def test_a_program_that_names_its_schedule_at_each_start_keeps_one_with_its_next_tick_and_history(
    client: Client, tmp_path: Path
) -> None:
    stamps, dirpath = tmp_path / "stamps", tmp_path / "q"
    cleanup = Stamp(str(stamps))
    assert (home_queue("cleanup", 2), home_queue("cleanup", 1)) == (1, 0)

    def start(n_queues: int = 2, **timing: Any) -> tuple[QueuePool, Schedule]:
        queue_pool = QueuePool(client, n_queues, durability="durable", dirpath=dirpath)
        return queue_pool, queue_pool.schedule(cleanup, name="cleanup", **(timing or {"every": EVERY}))

    # First start: the schedule is made on its name's queue, and ticks.
    queue_pool, first = start()
    with queue_pool, ConsumerPool(client, queue_pool, n_consumers=1, start=True):
        assert first.schedule_name == "cleanup" and first.name == "Stamp" and first.ticks == 0
        assert first.queue == queue_pool.queue_names[1]
        wait_until(lambda: _the_one(queue_pool, "cleanup").last_done is not None and len(_stamps(stamps)) >= 2, timeout=30)
        before = _the_one(queue_pool, "cleanup")
    # Started again, twice: the same schedule, its history and its grid kept.
    for _ in range(2):
        queue_pool, again = start()
        with queue_pool:
            assert again.schedule_id == first.schedule_id and again.ticks >= before.ticks >= 2
            assert again.last_done is not None and _on_the_same_grid(before, again)
            assert _the_one(queue_pool, "cleanup").schedule_id == first.schedule_id
    assert _schedules_on_disk(dirpath) == 1  # `zdq inspect` counts one, not three
    # Opened with one queue, the name's queue is not served: a schedule of the name is made on
    # queue 0 (afresh), and the one on queue 1 waits on disk.
    queue_pool, alone = start(1)
    with queue_pool:
        assert alone.schedule_id != first.schedule_id and _the_one(queue_pool, "cleanup").schedule_id == alone.schedule_id
    # Opened with both again: the one of its name's queue is kept, the other is dropped.
    queue_pool, back = start()
    with queue_pool:
        assert back.schedule_id == first.schedule_id and back.ticks >= before.ticks
        assert _the_one(queue_pool, "cleanup").schedule_id == first.schedule_id
    assert _schedules_on_disk(dirpath) == 1
    # Started with another timing: a new schedule in its place, from now.
    queue_pool, changed = start(every=timedelta(hours=1))
    with queue_pool:
        assert changed.schedule_id != first.schedule_id and changed.ticks == 0 and changed.every == timedelta(hours=1)
        assert _the_one(queue_pool, "cleanup").schedule_id == changed.schedule_id
        assert queue_pool.cancel_schedule("cleanup") is True and queue_pool.schedules() == []
    assert _schedules_on_disk(dirpath) == 0


def test_producers_naming_a_schedule_at_once_end_with_one_and_it_is_cancelled_by_name(client: Client) -> None:
    with QueuePool(client, 2) as queue_pool:
        n = 8
        barrier = threading.Barrier(n)
        made: list[Schedule] = []
        errors: list[BaseException] = []

        def produce(i: int) -> None:
            try:
                barrier.wait(timeout=30)
                made.append(queue_pool.schedule(add, i, every=3600, name=f"race {i % 2}"))
            except BaseException as e:  # noqa: BLE001 - reported by the test below
                errors.append(e)

        threads = [threading.Thread(target=produce, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors and len(made) == n
        kept = {str(s.schedule_name): s.schedule_id for s in queue_pool.schedules()}
        assert sorted(kept) == ["race 0", "race 1"]  # one per name, whatever the interleaving
        assert {s.schedule_id for s in made} == set(kept.values())  # each call saw the one kept
        # Unnamed ones add up beside them, as before names existed.
        unnamed = [queue_pool.schedule(add, 1, every=3600) for _ in range(2)]
        assert {s.schedule_name for s in unnamed} == {None} and len(queue_pool.schedules()) == 4
        assert queue_pool.cancel_schedule("race 0") is True and queue_pool.cancel_schedule("race 0") is False
        assert queue_pool.cancel_schedule(kept["race 1"]) is True
        assert sorted(s.schedule_id for s in queue_pool.schedules()) == sorted(s.schedule_id for s in unnamed)
        for bad, error, match in [
            ("", ValueError, "must not be empty"),
            ("x" * 201, ValueError, "at most 200 characters"),
            ("7", ValueError, "digits alone"),
            (7, TypeError, "must be a str"),
        ]:
            with pytest.raises(error, match=match):
                queue_pool.schedule(add, 1, every=1, name=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="must not be empty"):
            queue_pool.cancel_schedule("")
        assert len(queue_pool.schedules()) == 2  # nothing of the refused ones


def _zdq(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # --timeout 20: the cluster answers within it even on a machine loaded by the suite's other workers.
    command = [sys.executable, "-m", "zdq.cli", *args, "--timeout", "20"]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, input=stdin, check=False)


def _zdq_here(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """As :func:`_zdq`, in this process (a Python start saved; see tests/inprocess_cli.py)."""
    return zdq_here(*args, "--timeout", "20", stdin=stdin)


def test_zdq_schedules_lists_a_live_pools_schedules_with_their_names_and_cancels_one_by_name(
    cluster: LocalCluster, client: Client
) -> None:
    address = cluster.scheduler_address
    with QueuePool(client, 2, name="cron-jobs") as queue_pool:
        named = queue_pool.schedule(add, 1, cron="0 3 * * *", name="nightly")
        unnamed = queue_pool.schedule(add, 2, every=3600)
        listed = wait_until(
            lambda: (p := _zdq_here("schedules", "list", "--scheduler", address, "cron-jobs", "--json")).returncode == 0 and p,
            timeout=30, interval=0.5,
        )
        # Ids as strings: they pass 2**53, where a JSON reader's double would name another one.
        rows = {int(s["schedule_id"]): (q, s) for q, found in json.loads(listed.stdout).items() for s in found}
        assert all(isinstance(s["schedule_id"], str) for _, s in rows.values())
        assert rows[named.schedule_id][0] == named.queue and rows[named.schedule_id][1]["schedule_name"] == "nightly"
        assert rows[named.schedule_id][1]["cron"] == "0 3 * * *" and rows[unnamed.schedule_id][1]["schedule_name"] is None
        # Each command runs once as a subprocess, as a user runs it (list here, cancel --yes below).
        text = _zdq("schedules", "list", "--scheduler", address, "cron-jobs", "nightly")
        assert text.returncode == 0 and "nightly" in text.stdout and str(unnamed.schedule_id) not in text.stdout, text
        refused = _zdq_here("schedules", "cancel", "--scheduler", address, "cron-jobs", "nightly", stdin="")
        assert refused.returncode == 1 and "--yes" in refused.stderr and len(queue_pool.schedules()) == 2
        cancelled = _zdq("schedules", "cancel", "--scheduler", address, "cron-jobs", "nightly", "--yes")
        assert cancelled.returncode == 0 and "schedule 'nightly' cancelled" in cancelled.stdout, cancelled
        assert [s.schedule_id for s in queue_pool.schedules()] == [unnamed.schedule_id]
        gone = _zdq_here("schedules", "cancel", "--scheduler", address, "cron-jobs", "nightly", "--yes")
        assert gone.returncode == 1 and "pool cron-jobs has no schedule 'nightly'" in gone.stderr, gone
        by_id = _zdq_here("schedules", "cancel", "--scheduler", address, "cron-jobs", str(unnamed.schedule_id), "--yes")
        assert by_id.returncode == 0 and queue_pool.schedules() == [], by_id


@pytest.mark.faults
def test_a_named_durable_schedule_stays_one_with_its_history_when_its_brokers_worker_is_sigkilled(
    client3: Client, tmp_path: Path
) -> None:
    stamps = tmp_path / "stamps"
    report = Stamp(str(stamps))
    with (
        QueuePool(client3, 2, durability="durable", dirpath=tmp_path / "q", workers=["a"], **FAST) as queue_pool,
        ConsumerPool(client3, queue_pool, n_consumers=1, workers=["b"], start=True),
    ):
        first = queue_pool.schedule(report, every=EVERY, name="report")
        wait_until(lambda: len(_stamps(stamps)) >= 2 and _the_one(queue_pool, "report").ticks >= 2, timeout=30)
        before = _the_one(queue_pool, "report")
        os.kill(pid_of(client3, "a"), signal.SIGKILL)
        wait_until(lambda: queue_pool.recoveries >= 1, timeout=120)
        # The service's start-up code runs again (a supervisor restarted it, or it retries).
        again = wait_until(lambda: _schedule_when_back(queue_pool, report), timeout=60, interval=0.5)
        assert again.schedule_id == first.schedule_id and again.ticks >= before.ticks and _on_the_same_grid(before, again)
        ticked = len(_stamps(stamps))
        wait_until(lambda: len(_stamps(stamps)) >= ticked + 2, timeout=30)  # ticking again, once a period
        assert _the_one(queue_pool, "report").schedule_id == first.schedule_id


def _schedule_when_back(queue_pool: QueuePool, report: Stamp) -> Schedule | None:
    try:
        return queue_pool.schedule(report, every=EVERY, name="report", timeout=5)
    except Exception:  # noqa: BLE001 - a queue placed again may not answer yet: asked again
        return None
