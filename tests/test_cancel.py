"""``future.cancel()``: a task that has not started never runs and the call returns True; a task
that started (or finished) is left alone and the call returns False. Real cluster, real sockets;
the side effect of a task (a file it writes) is what proves whether it ran.

Tests that ask only the futures and the side effects run on the in-process harness (``harness``:
brokers, driver and consumers in this process, real sockets and threads); those that ask the pools'
statistics or results run on the shared cluster (``client``); those that kill a worker, on their own
(``client3``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from distributed import Client

from zdq import ConsumerBaseClass, ConsumerPool, QueuePool
from zdq.errors import BatchError, TaskCancelled

from .conftest import pid_of, stop_process, wait_until

if TYPE_CHECKING:  # pytest loads tests.harness as a plugin: imported here first, its asserts would not be rewritten
    from .harness import Harness

pytest_plugins = ["tests.harness"]


def touch(folder: str, name: str, seconds: float = 0.0) -> str:
    """A task with a side effect: it writes ``folder/name`` (then sleeps)."""
    Path(folder, name).write_text("ran")
    time.sleep(seconds)
    return name


def touch_until(folder: str, name: str, gate: str) -> str:
    """:func:`touch`, then run until the file ``gate`` exists (at most 60 s): the test decides how
    long the task keeps its consumer busy."""
    Path(folder, name).write_text("ran")
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    return name


def ran(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _side_effects(tmp_path: Path) -> Path:
    """A folder for the files tasks write (beside the queue's own directory)."""
    side = tmp_path / "ran"
    side.mkdir()
    return side


FAST = {"heartbeat_interval": "250ms", "heartbeat_timeout": "2s"}


def test_cancelling_tasks_a_consumer_holds_but_has_not_started(client: Client, tmp_path: Path, short_tmp_path: Path) -> None:
    # Prefetch room for every chunk the six tasks may be cut into (the driver cuts single tasks as
    # they come): all of them are held by the busy consumer, none is left at the broker.
    gate = short_tmp_path / "let-go"  # the long task runs until the cancels are done
    with QueuePool(client, 1) as queue_pool, ConsumerPool(client, queue_pool, start=True, prefetch=8) as consumers:
        long = queue_pool.submit(touch_until, str(tmp_path), "long", str(gate))
        wait_until(lambda: (tmp_path / "long").exists(), timeout=30)
        later = [queue_pool.submit(touch, str(tmp_path), f"t{i}") for i in range(6)]
        queue_pool.flush(timeout=30)
        # Every chunk leased to the consumer: none ready at the broker.
        wait_until(lambda: all(q is not None and q.ready_tasks == 0 for q in queue_pool.queue_status()), timeout=30)
        assert long.cancel() is False  # running
        assert [later[i].cancel() for i in (1, 3, 5)] == [True, True, True]
        assert all(later[i].cancelled() for i in (1, 3, 5))
        assert later[1].cancel() is True  # cancelling again says it is cancelled
        with pytest.raises(concurrent.futures.CancelledError):
            later[3].result(timeout=1)
        assert not long.done()  # the cancels above all came while it ran
        gate.touch()
        assert long.result(timeout=30) == "long"
        assert [later[i].result(timeout=30) for i in (0, 2, 4)] == ["t0", "t2", "t4"]
        consumers.join(timeout=30)
        assert ran(tmp_path) == {"long", "t0", "t2", "t4"}
        assert later[0].cancel() is False  # finished
        assert queue_pool.statistics().driver.tasks_cancelled == 3
        # Their placeholders reported once each, as expected: not counted as duplicates (reviewer 29).
        assert queue_pool.statistics().driver.duplicate_results == 0
        by_producer = consumers.results()
        assert sorted(by_producer["not-run"]) == sorted(later[i].key for i in (1, 3, 5)), by_producer
        assert all(isinstance(v, TaskCancelled) for v in by_producer["not-run"].values())
        assert sum(s.tasks_cancelled for s in consumers.statistics()) == 3
        assert sum(s.tasks_failed for s in consumers.statistics()) == 0


def test_cancelling_tasks_waiting_in_a_queue_with_no_consumer(harness: Callable[..., Harness], tmp_path: Path) -> None:
    queue_pool = harness(2, 1, start_consumers=False)
    futures = [queue_pool.submit(touch, str(tmp_path), f"t{i}") for i in range(20)]
    batch = queue_pool.batch_submit([(touch, str(tmp_path), f"b{i}") for i in range(30)])
    queue_pool.flush(timeout=30)
    assert all(futures[i].cancel() for i in range(0, 20, 2))
    assert batch.cancel() is True
    assert batch.cancelled()
    queue_pool.start_consumers()
    for i in range(1, 20, 2):
        assert futures[i].result(timeout=30) == f"t{i}"
    queue_pool.join(timeout=30)
    assert ran(tmp_path) == {f"t{i}" for i in range(1, 20, 2)}


def test_a_batch_partly_started_cancels_the_rest_and_reports_them(harness: Callable[..., Harness], tmp_path: Path) -> None:
    queue_pool = harness()
    batch = queue_pool.batch_submit([(touch, str(tmp_path), f"b{i}", 0.5) for i in range(8)], batch_size=8)
    wait_until(lambda: (tmp_path / "b0").exists(), timeout=30)
    assert batch.cancel() is False  # b0 runs
    with pytest.raises(BatchError) as info:
        batch.result(timeout=30)
    errors = info.value.errors
    assert errors and all(isinstance(e, TaskCancelled) for e in errors.values())
    started = ran(tmp_path)
    assert {f"b{i}" for i in errors}.isdisjoint(started)
    assert len(started) + len(errors) == 8
    queue_pool.join(timeout=30)


def test_cancel_right_after_submit_is_exact_whatever_the_task_reached(harness: Callable[..., Harness], tmp_path: Path) -> None:
    """Loose in the driver, in a chunk not sent, sent and unconfirmed, ready, held by a consumer:
    whichever it reached, True means it never runs and False means it runs."""
    queue_pool = harness(2, 2)
    futures = [queue_pool.submit(touch, str(tmp_path), f"t{i}", 0.01) for i in range(120)]
    answers = {i: futures[i].cancel() for i in range(0, 120, 3)}
    queue_pool.join(timeout=60)
    for i, fut in enumerate(futures):
        assert fut.done()
    cancelled = {f"t{i}" for i, yes in answers.items() if yes}
    assert ran(tmp_path) == {f"t{i}" for i in range(120)} - cancelled
    for i, yes in answers.items():
        assert futures[i].cancelled() is yes


def test_tasks_on_task_threads_are_cancelled_until_they_start(harness: Callable[..., Harness], tmp_path: Path) -> None:
    queue_pool = harness(1, 1, max_concurrency=2)
    batch = queue_pool.batch_submit([(touch, str(tmp_path), f"b{i}", 1.0) for i in range(6)], batch_size=6)
    wait_until(lambda: len(ran(tmp_path)) == 2, timeout=30)
    assert batch.cancel() is False  # two are running
    with pytest.raises(BatchError) as info:
        batch.result(timeout=30)
    assert len(info.value.errors) == 4
    queue_pool.join(timeout=30)
    assert len(ran(tmp_path)) == 2


def test_a_cancelled_coroutine_cancels_the_task_it_awaited(harness: Callable[..., Harness], tmp_path: Path) -> None:
    queue_pool = harness(start_consumers=False)
    future = queue_pool.submit(touch, str(tmp_path), "t")
    queue_pool.flush(timeout=30)

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(future, 0.2)
        await asyncio.sleep(0)

    asyncio.run(main())
    wait_until(future.cancelled, timeout=30)
    queue_pool.start_consumers()
    queue_pool.join(timeout=30)
    assert not os.path.exists(tmp_path / "t")


def test_tasks_cancelled_in_a_durable_queue_stay_cancelled_after_its_worker_is_killed(
    client3: Client, tmp_path: Path
) -> None:
    side = _side_effects(tmp_path)
    with QueuePool(client3, 1, durability="durable", dirpath=tmp_path / "q", workers=["a"], **FAST) as queue_pool:
        with ConsumerPool(client3, queue_pool, n_consumers=1, workers=["b"]) as consumers:
            futures = [queue_pool.submit(touch, str(side), f"t{i}") for i in range(10)]
            queue_pool.flush(timeout=30)
            assert all(futures[i].cancel() for i in range(0, 10, 2))
            os.kill(pid_of(client3, "a"), signal.SIGKILL)
            wait_until(lambda: queue_pool.recoveries >= 1, timeout=120)
            consumers.start()
            for i in range(1, 10, 2):
                assert futures[i].result(timeout=120) == f"t{i}"
            consumers.join(timeout=60)
        assert ran(side) == {f"t{i}" for i in range(1, 10, 2)}


class Echo(ConsumerBaseClass):
    def process_item(self, item: object) -> object:
        return ("processed", item)


def test_cancelled_items_never_reach_process_item_on_task_threads(client: Client) -> None:
    with (
        QueuePool(client, 1) as queue_pool,
        ConsumerPool(client, queue_pool, Echo, n_consumers=1, max_concurrency=2) as consumers,
    ):
        batch = queue_pool.put_many(["a", "b", "c"])
        kept = queue_pool.put("d")
        queue_pool.flush(timeout=30)
        assert batch.cancel() is True
        consumers.start()
        assert kept.result(timeout=30) == ("processed", "d")
        consumers.join(timeout=30)
        values = [v for per in consumers.results().values() for v in per.values()]
        assert ("processed", "d") in values and not any(isinstance(v, tuple) and v[1] != "d" for v in values)
        assert sum(isinstance(v, TaskCancelled) for v in values) == 3


def test_cancel_is_exact_while_the_driver_turns_single_tasks_into_chunks(harness: Callable[..., Harness]) -> None:
    blob = os.urandom(3000)  # pickling takes a while: a cancel lands while tasks are being packed
    queue_pool = harness(2, 2, start_consumers=False)
    futures = [queue_pool.submit(len, blob) for _ in range(900)]
    answers = [f.cancel() for f in futures[::3]]
    assert all(answers), f"{answers.count(False)} of {len(answers)} cancels said started, no consumer ran"
    queue_pool.start_consumers()
    queue_pool.join(timeout=60)
    assert all(f.cancelled() for f in futures[::3])
    assert all(f.result(timeout=1) == 3000 for i, f in enumerate(futures) if i % 3)


def test_cancelling_everything_leaves_nothing_pending_and_counts_nothing_as_consumed(client: Client) -> None:
    with QueuePool(client, 2) as queue_pool, ConsumerPool(client, queue_pool) as consumers:
        loose = queue_pool.submit(len, "x")
        assert loose.cancel() is True  # still in the driver
        batch = queue_pool.batch_submit([(len, "ab")] * 1000)
        queue_pool.flush(timeout=30)
        assert batch.cancel() is True
        consumers.join(timeout=10)  # nothing pending: no consumer needed
        assert set(queue_pool.get_queue_size().values()) == {0}
        assert consumers.nb_consumed() == 0
        results = consumers.results()
        assert set(results) <= {"GeneralConsumer-0", "not-run"}  # never "earlier-consumers"
        assert len(results.get("not-run", {})) == 1001
        assert queue_pool.statistics().driver.tasks_cancelled == 1001


def test_a_cancel_that_a_stopped_queue_cannot_answer_returns_false_in_seconds(
    client_abc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zdq.client.driver import facade

    # cancel()'s own wait for the queue's answer: 2 s instead of 5 (the test waited it out).
    monkeypatch.setattr(facade, "_CANCEL_WAIT", 2.0)
    client3 = client_abc  # a worker is only stopped (SIGSTOP), then resumed: the shared cluster serves
    with QueuePool(client3, 1, workers=["a"], **FAST) as queue_pool:
        future = queue_pool.submit(len, "abc")
        queue_pool.flush(timeout=30)
        wait_until(lambda: sum(queue_pool.get_queue_size().values()) == 1, timeout=30)  # in its queue
        pid = pid_of(client3, "a")
        # Stopped, not only sent SIGSTOP: on a loaded machine the broker's loop thread answered
        # the cancel before its process had stopped (the test failed with cancel() == True).
        stop_process(pid)
        try:
            start = time.monotonic()
            assert future.cancel() is False
            took = time.monotonic() - start
            # Bound: cancel()'s own wait for the queue's answer (facade._CANCEL_WAIT), and 3 s slack.
            assert took < facade._CANCEL_WAIT + 3, f"cancel() took {took:.1f} s for a task whose queue cannot answer"
        finally:
            os.kill(pid, signal.SIGCONT)


def test_a_cancel_sent_while_a_queue_is_stopped_lands_before_the_delayed_task_that_fell_due_meanwhile(
    client_abc: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reviewer 27b: cancel() of a delayed task while its queue's worker was stopped returned False
    (no answer), and the cancellation still reached the queue once it resumed, as the README
    says; but the task's time had passed meanwhile, and the woken broker released it to an idle
    consumer before it read the CANCEL waiting in its socket: the task ran. A broker woken from a
    stall now reads what came meanwhile first."""
    from zdq.client.driver import facade

    monkeypatch.setattr(facade, "_CANCEL_WAIT", 1.0)
    client3 = client_abc  # a worker is only stopped (SIGSTOP), then resumed: the shared cluster serves
    side = _side_effects(tmp_path)
    with (
        QueuePool(client3, 1, workers=["a"], **FAST) as queue_pool,
        ConsumerPool(client3, queue_pool, n_consumers=2, workers=["b"], start=True, **FAST),
    ):
        futures = [queue_pool.submit(touch, str(side), f"t{i}", delay=2.0) for i in range(4)]
        queue_pool.flush(timeout=30)
        pid = pid_of(client3, "a")
        stop_process(pid)
        try:
            assert [f.cancel() for f in futures[:2]] == [False, False]  # no answer from a stopped queue
            time.sleep(max(0.0, 3.0 - 2 * facade._CANCEL_WAIT))  # the tasks fall due while it is stopped
        finally:
            os.kill(pid, signal.SIGCONT)
        assert [f.result(timeout=60) for f in futures[2:]] == ["t2", "t3"]
        for f in futures[:2]:
            with pytest.raises(concurrent.futures.CancelledError):
                f.result(timeout=30)
    assert ran(side) == {"t2", "t3"}


def test_a_durable_queue_placed_again_never_runs_tasks_cancelled_in_the_consumer_that_held_them(
    client3: Client, tmp_path: Path
) -> None:
    side = _side_effects(tmp_path)
    with (
        QueuePool(client3, 1, durability="durable", dirpath=tmp_path / "q", workers=["a"], **FAST) as queue_pool,
        ConsumerPool(client3, queue_pool, n_consumers=1, workers=["b"], start=True, **FAST) as consumers,
    ):
        # The long task keeps the consumer busy (holding the batch unstarted) until the queue is
        # placed again; it then ends (and its rerun, if any, ends at once).
        gate = tmp_path / "let-go"
        long = queue_pool.submit(touch_until, str(side), "long", str(gate))
        wait_until(lambda: (side / "long").exists(), timeout=30)
        batch = queue_pool.batch_submit([(touch, str(side), f"t{i}") for i in range(6)])
        queue_pool.flush(timeout=30)
        # Some of the batch prefetched by the busy consumer: it holds more than its long task.
        wait_until(lambda: all(q is not None and q.leased_tasks > 1 for q in queue_pool.queue_status()), timeout=30)
        assert batch.cancel() is True
        os.kill(pid_of(client3, "a"), signal.SIGKILL)
        wait_until(lambda: queue_pool.recoveries >= 1, timeout=120)
        gate.touch()
        assert long.result(timeout=120) == "long"
        consumers.join(timeout=120)
    assert ran(side) == {"long"}
