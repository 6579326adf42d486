"""``future.cancel()`` under faults (issue 23, points 1 and 2): True means the task never starts,
through any recovery; a task whose consumer died while holding it may have started, so a cancel
of it says False and it runs again (at least once).

Real parts only: a fresh LocalCluster of three worker processes named a, b and c (``client3``),
workers killed with SIGKILL by pid, real LMDB directories under ``tmp_path``. What a task did is
proved by its side effect: a file it writes when it starts, holding the wall-clock time. Every
wait is bounded."""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from distributed import Client

from zdq import ConsumerPool, QueuePool

from .conftest import pid_of, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.cluster]

FAST = {"heartbeat_interval": "250ms", "heartbeat_timeout": "2s"}
HEARTBEAT_TIMEOUT = 2.0


def mark_start(folder: str, name: str, seconds: float) -> str:
    """A task whose side effect is the file ``folder/name``, written when it starts (with the time)."""
    Path(folder, name).write_text(repr(time.time()))
    time.sleep(seconds)
    return name


def slow_the_first_time(folder: str, name: str) -> str:
    """Writes ``folder/name`` and sleeps long the first time it runs; returns at once after that."""
    path = Path(folder, name)
    if path.exists():
        return name
    path.write_text(repr(time.time()))
    time.sleep(60)
    return name


def started_at(folder: Path) -> dict[str, float]:
    return {p.name: float(p.read_text() or 0) for p in folder.iterdir()}


class Canceller:
    """Cancels futures (in a random order) on a thread until stopped; records each answer and
    when ``cancel()`` returned."""

    def __init__(self, futures: list[concurrent.futures.Future], seed: int) -> None:  # type: ignore[type-arg]
        self._order = list(range(len(futures)))
        random.Random(seed).shuffle(self._order)
        self._futures = futures
        self.answers: dict[int, tuple[bool, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-canceller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for i in self._order:
            if self._stop.is_set():
                return
            if self._futures[i].done():
                continue
            answer = self._futures[i].cancel()
            self.answers[i] = (answer, time.time())
            time.sleep(0.01)

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            pytest.fail(f"a cancel() did not return within {timeout}s of the canceller being stopped")


@pytest.mark.timeout(300)
def test_a_cancel_that_said_true_is_never_run_when_a_consumers_worker_and_the_durable_brokers_worker_are_killed(
    client3: Client, tmp_path: Path
) -> None:
    """Point 1: cancels race execution while a consumer's worker is killed (its chunks go back and
    are split among the consumers) and then the durable broker's (recovered from disk)."""
    side = tmp_path / "ran"
    side.mkdir()
    n = 1500
    with (
        QueuePool(client3, 1, durability="durable", dirpath=tmp_path / "q", workers=["a"], **FAST) as queue_pool,
        ConsumerPool(client3, queue_pool, n_consumers=2, workers=["b", "c"], prefetch=4, **FAST) as consumers,
    ):
        futures = [queue_pool.submit(mark_start, str(side), f"t{i}", 0.01) for i in range(n)]
        queue_pool.flush(timeout=60)
        consumers.start()
        wait_until(lambda: len(os.listdir(side)) > 50, timeout=60)
        canceller = Canceller(futures, seed=23)
        try:
            time.sleep(1.0)
            os.kill(int(consumers[0].pid().result(timeout=10)), signal.SIGKILL)
            # Past the heartbeat timeout: its chunks went back and were redelivered (split).
            time.sleep(HEARTBEAT_TIMEOUT + 1.5)
            os.kill(pid_of(client3, "a"), signal.SIGKILL)
            wait_until(lambda: queue_pool.recoveries >= 1, timeout=120)
            time.sleep(3.0)
        finally:
            canceller.stop(timeout=30)
        # Polled, not concurrent.futures.wait(): that does not count a cancelled future as done.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(f.done() for f in futures):
            time.sleep(0.2)
        not_done = [f for f in futures if not f.done()]
        assert not not_done, (
            f"{len(not_done)} of {n} futures never settled within 120 s; the queue says "
            f"{queue_pool.queue_status()}, the consumers {consumers.statistics()}"
        )
    ran = started_at(side)
    said_true = {i: at for i, (yes, at) in canceller.answers.items() if yes}
    assert said_true, "no cancel() said True: the test raced nothing"
    broken = sorted(i for i in said_true if f"t{i}" in ran)
    after = [i for i in broken if ran[f"t{i}"] > said_true[i]]
    assert not broken, (
        f"{len(broken)} of {len(said_true)} tasks whose cancel() said True ran anyway "
        f"({len(after)} of them started after cancel() returned), e.g. {broken[:10]}"
    )
    for i in said_true:
        assert futures[i].cancelled()


def test_a_task_whose_consumers_worker_was_killed_while_it_ran_is_not_cancelled_and_runs_again(
    client3: Client, tmp_path: Path
) -> None:
    """Point 2: the task started on a consumer whose worker is then killed; back in its queue, it
    may have started, so cancel() says False, the future is not cancelled, and the task runs again
    (at least once).

    The consumer may go on b or c: its replacement is placed on the other one at once (a slot
    placed again avoids the worker it lost), so the rerun never waits for a nanny to bring the
    killed worker back (which took over 120 s beside a CPU hog)."""
    side = tmp_path / "ran"
    side.mkdir()
    with (
        QueuePool(client3, 1, durability="durable", dirpath=tmp_path / "q", workers=["a"], **FAST) as queue_pool,
        ConsumerPool(client3, queue_pool, n_consumers=1, workers=["b", "c"], start=True, **FAST) as consumers,
    ):
        future = queue_pool.submit(slow_the_first_time, str(side), "t")
        wait_until(lambda: (side / "t").exists(), timeout=30)
        victim = int(consumers[0].pid().result(timeout=10))
        # Cancelled first (the task runs on: only pulling stops), so that a replacement placed at
        # once on the spare worker pulls no work until started, however soon it comes.
        consumers.cancel()
        os.kill(victim, signal.SIGKILL)
        # The broker takes the consumer for dead: the chunk is back in its queue, not leased.
        wait_until(
            lambda: [(q.ready_tasks, q.leased_tasks) for q in queue_pool.queue_status() if q is not None] == [(1, 0)],
            timeout=HEARTBEAT_TIMEOUT * 10,
        )
        assert future.cancel() is False, "cancel() said True for a task that had started"
        assert not future.cancelled()
        consumers.start()
        assert future.result(timeout=120) == "t"  # run again by the replacement consumer


_HAND_OUT_THEN_WAIT = """
import sys, time
from zdq.storage import ChunkMeta, LMDBStorage

storage = LMDBStorage(sys.argv[1])
storage.open()
ids = storage.put_many([(ChunkMeta(b"o" * 16, seq, 2), b"chunk %d" % seq) for seq in range(3)])
storage.commit(force=True)
leased = storage.lease()  # handed out: a broker sends DELIVER now; its lease mark is held back
print(leased.chunk_id, *ids, flush=True)
time.sleep(60)  # killed here, before any commit writes the lease mark
"""


def test_a_chunk_handed_out_just_before_its_durable_broker_is_killed_is_never_answered_cancelled(
    tmp_path: Path,
) -> None:
    """Lease marks are committed up to 50 ms late (delivery writes nothing to LMDB): a broker
    killed in that window must still tell its successor that the chunk was handed out, or a
    consumer that holds it unstarted may start it after the successor said "cancelled"."""
    import subprocess
    import sys

    from zdq.storage import LMDBStorage

    queue = tmp_path / "q"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HAND_OUT_THEN_WAIT, str(queue)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the process sleeps 60 s at most, and pytest's timeout
        assert line, f"the storage process failed (exit {proc.poll()})"
        leased, *ids = (int(x) for x in line.split())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    for _ in range(2):  # and again: the successor's own crash does not forget it
        storage = LMDBStorage(str(queue))
        storage.open()
        try:
            assert storage.may_have_started(leased), "a chunk handed out before the kill is taken as never started"
            assert not any(storage.may_have_started(i) for i in ids if i != leased)
        finally:
            storage._release()  # as a kill would: no close, no commit
