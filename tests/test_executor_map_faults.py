"""Executor.map when its queue cannot answer (its broker's worker stopped with SIGSTOP), and how
a map's calls are shared by the consumers, on the shared a/b/c cluster: the queue on a, two
consumers on b and c (a consumer holds only the chunk it runs).

- ``timeout`` bounds the whole map: its submission into a full window too, and the raise is not
  delayed by the cancellation of what is left (a stopped queue does not answer it);
- ``shutdown(wait=False)`` returns at once whatever a map is doing, and a map blocked on the full
  window stops (RuntimeError);
- a map's calls are spread over the consumers in chunks: closing its iterator early leaves most
  of them unrun.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

import zdq
from zdq import ConsumerPool, QueuePool

from .conftest import pid_of, stop_process, wait_until
from .executor_tasks import nap_noted, square

pytestmark = [pytest.mark.cluster, pytest.mark.faults]
pytest_plugins = ["tests.harness"]


@pytest.fixture
def pool(client_abc: Client) -> Iterator[QueuePool]:
    with (
        QueuePool(client_abc, 1, workers=["a"], keep_results=False) as queue_pool,
        ConsumerPool(client_abc, queue_pool, n_consumers=2, workers=["b", "c"], prefetch=1, start=True),
    ):
        yield queue_pool


class Outcome:
    """What a call run on a thread of its own gave, and when (seconds from its start)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.took = -1.0
        self._fn = fn
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        try:
            self.value = self._fn()
        except BaseException as e:  # noqa: BLE001 - the outcome the test asserts on
            self.error = e
        self.took = time.monotonic() - start


def test_a_map_on_a_silent_queue_raises_at_its_timeout_and_shutdown_does_not_wait_for_one_blocked(
    pool: QueuePool,
) -> None:
    executor = pool.executor()
    assert list(executor.map(square, range(5), timeout=60)) == [0, 1, 4, 9, 16]
    pid = pid_of(pool.client, "a")
    stop_process(pid)
    try:
        # Queued (the window has room), but no result comes: raised at the timeout, not once the
        # stopped queue did not answer the cancellation of what is left either.
        waiting = Outcome(lambda: list(executor.map(square, range(100), timeout=3, buffersize=40)))
        # Its buffer (13 slices of 3) queued before the next map fills the window: a map of a
        # range submits at once, without reading it into tuples first.
        wait_until(lambda: pool.driver.outstanding >= 39, timeout=10)
        # Too many for the window: the submission blocks, within the timeout for the first ...
        bounded = Outcome(lambda: executor.map(square, range(200_000), timeout=3))
        # ... and, without one, until the executor is shut down.
        blocked = Outcome(lambda: executor.map(square, range(200_000)))
        waiting.thread.join(15)
        bounded.thread.join(15)
        assert isinstance(waiting.error, TimeoutError), waiting.error
        assert waiting.took < 4.5, f"timeout=3 raised after {waiting.took:.1f} s"
        assert str(waiting.error).startswith("map(): the result of item 0 did not come within the map's timeout of 3s")
        assert isinstance(bounded.error, TimeoutError), bounded.error
        assert bounded.took < 4.5, f"timeout=3 raised after {bounded.took:.1f} s: map() blocked on the window"
        assert "could not be queued within the map's timeout of 3s" in str(bounded.error)
        assert blocked.thread.is_alive()  # back-pressure: no timeout, no shutdown
        start = time.monotonic()
        executor.shutdown(wait=False, cancel_futures=True)
        took = time.monotonic() - start
        assert took < 1.0, f"shutdown(wait=False) took {took:.1f} s behind a blocked map"
        blocked.thread.join(10)
        assert isinstance(blocked.error, RuntimeError) and "after shutdown" in str(blocked.error), blocked.error
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: pool.driver.outstanding == 0, timeout=60)


def test_a_maps_calls_are_spread_over_the_consumers_and_closing_it_early_leaves_most_unrun(
    pool: QueuePool, tmp_path: Path
) -> None:
    # 120 calls of 50 ms: they were cut in two chunks (one per consumer), which ran side by side
    # before the first result came (a chunk's results come together): 64 ran. Now in slices of 30,
    # each spread over the two consumers in chunks of 15: about 30 run.
    n = 120
    with pool.executor() as executor:
        results = executor.map(nap_noted, [str(tmp_path)] * n, range(n), [0.05] * n, timeout=60)
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        results.close()  # type: ignore[attr-defined]
        wait_until(lambda: pool.driver.outstanding == 0, timeout=30)
    ran = len(os.listdir(tmp_path))
    assert ran < 45, f"{ran} of {n} tasks ran although the map was closed after 3 results"


def test_an_unpicklable_item_is_named_by_its_position_in_the_map(pool: QueuePool) -> None:
    def items() -> Iterator[Any]:
        for i in range(60):
            yield threading.Lock() if i == 45 else i

    got: list[int] = []
    pattern = r"^item 45 of the map: .*nothing from item (\d+) on was queued; (\d+) results of the map were yielded"
    with pool.executor() as executor, pytest.raises(zdq.errors.SerializationError, match=pattern):
        got.extend(executor.map(square, items(), buffersize=20, timeout=60))
    assert got == [i * i for i in range(len(got))]


def test_queue_pool_map_blocked_on_a_full_window_raises_at_its_timeout_and_cancels_what_it_queued(
    pool: QueuePool,
) -> None:
    # A range is taken by slices, chunk by chunk within the window: with the queue's worker stopped,
    # the window fills and timeout bounds the wait for room; what was queued is cancelled.
    assert zdq.gather(pool.map(square, range(20), timeout=30), timeout=60) == [i * i for i in range(20)]
    pid = pid_of(pool.client, "a")
    stop_process(pid)
    try:
        bounded = Outcome(lambda: pool.map(square, range(200_000), timeout=2))
        bounded.thread.join(20)
        assert isinstance(bounded.error, zdq.errors.SubmitTimeout), bounded.error
        # The wait for room within timeout=2, and the raise then: the cancellation of what was
        # queued is asked on a thread, not waited for (the stopped queue answers in 5 s at best).
        assert bounded.took < 4, f"timeout=2 raised after {bounded.took:.1f} s"
        notes = getattr(bounded.error, "__notes__", [])
        queued = [int(n.split()[4]) for n in notes if n.startswith("zdq: map() cancelled the")]
        assert queued and 0 < queued[0] < 200_000, notes
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: pool.driver.outstanding == 0, timeout=60)
