"""A lone task's round trip on the caller's thread: the baton of :mod:`zdq.client.driver.loop`.

A ``submit()`` with nothing else in flight sends its PUT on the caller's thread, and that
future's ``result()`` reads the brokers' sockets itself, while the driver's I/O thread is parked.
These tests hold that every guarantee of the I/O thread's path stays: results right, a result
nobody asks for still settles, ``cancel()`` from another thread and ``result(timeout)`` give the
sockets back, two callers at once, heartbeats kept while a caller holds the sockets, and the
future settles when the broker's or the consumer's process is SIGKILLed meanwhile.

Real parts: the in-process harness (brokers, driver and consumers in this process, real sockets
and threads), and a fresh LocalCluster of three named workers (``client3``) where a process is
killed. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from distributed import Client

import zdq
from zdq import BrokerLost, ConsumerPool, QueuePool, ZdqError

from .conftest import call_bounded, wait_until
from .tasks import add, sleep_return

if TYPE_CHECKING:
    from .harness import Harness

pytest_plugins = ["tests.harness"]

FAST = {"heartbeat_interval": "250ms", "heartbeat_timeout": "2s"}


def _loop(h: Harness) -> Any:
    assert h.driver is not None
    return h.driver._loop


def _parked(loop: Any) -> bool:
    """The I/O thread has given the sockets up (nothing in flight, the baton free)."""
    return bool(loop._idle() and not loop._baton.locked())


def _lone(h: Harness, fn: Callable[..., Any], *args: Any) -> Any:
    """Submit a lone task, once the I/O thread is parked; check that the caller sent it itself."""
    wait_until(lambda: _parked(_loop(h)), timeout=10)
    fut = h.submit(fn, *args)
    assert fut._lender is not None, "the lone task went the I/O thread's way: it was not parked"
    return fut


def test_lone_tasks_are_sent_and_read_by_their_callers_and_every_result_is_right(harness: Callable[..., Harness]) -> None:
    h = harness(2, 2)
    h.submit(add, 0, 0).result(timeout=10)
    wait_until(lambda: _parked(_loop(h)), timeout=10)
    before = _loop(h).lent
    for i in range(200):
        assert h.submit(add, i, 1).result(timeout=10) == i + 1
    # Nearly all: the parked thread's look (every 2 ms) may take over a few between submit and result.
    assert _loop(h).lent - before >= 150, _loop(h).lent - before


#: Heartbeats far apart: a lone task's result read only at the I/O thread's next tick would take 5 s.
SLOW_BEATS = {"heartbeat_interval": "5s", "heartbeat_timeout": "20s"}


def test_a_lone_task_whose_result_nobody_asks_for_still_settles_at_once(harness: Callable[..., Harness]) -> None:
    h = harness(**SLOW_BEATS)
    h.submit(add, 0, 0).result(timeout=10)

    def took(wait: Callable[[Any], Any]) -> float:
        fut = _lone(h, add, 2, 3)
        started = time.monotonic()
        wait(fut)
        assert fut.done() and fut.result(0) == 5
        return time.monotonic() - started

    # Nobody calls result(): the parked I/O thread reads it (at its next look, or at once when asked).
    assert took(lambda f: concurrent.futures.wait([f], timeout=10)) < 2.0
    assert took(lambda f: zdq.wait([f], timeout=10)) < 2.0
    called = threading.Event()
    assert took(lambda f: (f.add_done_callback(lambda _: called.set()), called.wait(10))) < 2.0

    async def awaited(f: Any) -> Any:
        return await asyncio.wait_for(f, 10)

    assert took(lambda f: asyncio.run(awaited(f))) < 2.0


@pytest.mark.faults
def test_cancel_from_another_thread_takes_the_sockets_back_from_a_caller_reading_its_own_result(
    harness: Callable[..., Harness],
) -> None:
    h = harness(1, 1)
    h.submit(add, 0, 0).result(timeout=10)
    running = _lone(h, sleep_return, 7, 1.5)
    box: dict[str, Any] = {}

    def cancel_later() -> None:
        time.sleep(0.3)  # the caller is in result(), holding the sockets
        started = time.monotonic()
        box["cancelled"] = running.cancel()
        box["took"] = time.monotonic() - started

    canceller = threading.Thread(target=cancel_later, daemon=True)
    canceller.start()
    assert running.result(timeout=30) == 7  # it was running: not cancelled, and its result comes
    canceller.join(10)
    assert not canceller.is_alive(), "cancel() from another thread never returned"
    assert box["cancelled"] is False
    # The queue answered: had the caller kept the sockets, cancel() would have waited out its 5 s.
    assert box["took"] < 1.0, f"cancel() took {box['took']:.2f}s while a caller read its own result"


@pytest.mark.faults
def test_a_result_timeout_gives_the_sockets_back_and_the_result_still_comes(harness: Callable[..., Harness]) -> None:
    h = harness(1, 2, max_concurrency=2)
    h.submit(add, 0, 0).result(timeout=10)
    slow = _lone(h, sleep_return, "slow", 1.0)
    started = time.monotonic()
    with pytest.raises(concurrent.futures.TimeoutError, match=r"within 0\.2s"):  # the timeout given, not what was left
        slow.result(timeout=0.2)
    assert time.monotonic() - started < 1.0, "result(timeout=0.2) overran its timeout"
    # Another thread's task goes through the I/O thread, which has the sockets back.
    other = call_bounded(lambda: h.submit(add, 2, 2).result(timeout=10), 15, "a task after a result() timed out")
    assert other == 4
    done, _ = concurrent.futures.wait([slow], timeout=10)
    assert slow in done, "the result of a task whose result() timed out never came"
    assert slow.result(0) == "slow"


@pytest.mark.faults
def test_two_callers_racing_for_the_sockets_each_get_every_result(harness: Callable[..., Harness]) -> None:
    h = harness(2, 2)
    h.submit(add, 0, 0).result(timeout=10)
    errors: list[BaseException] = []

    def caller(offset: int) -> None:
        try:
            for i in range(150):
                assert h.submit(add, offset, i).result(timeout=10) == offset + i
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(k * 1000,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a caller racing another for the sockets hung"
    assert not errors, errors


@pytest.mark.faults
def test_heartbeats_are_kept_while_a_caller_holds_the_sockets_past_the_heartbeat_timeout(
    harness: Callable[..., Harness],
) -> None:
    h = harness(1, 1, **FAST)
    h.submit(add, 0, 0).result(timeout=10)
    long = _lone(h, sleep_return, "long", 3.0)  # past the broker's heartbeat timeout (2 s)
    assert long.result(timeout=30) == "long"
    assert h.driver is not None
    assert h.driver.links_up() == [True], "the driver's link went down while a caller held the sockets"
    stats = h.brokers[0].statistics()
    assert stats.drivers >= 1, "the broker forgot the driver while a caller held its sockets"


# -- processes killed while a caller reads its own result --------------------------------------------


def _read_while_killed(qp: QueuePool, consumers: ConsumerPool, victim: Callable[[], int], value: str) -> Any:
    """A lone task of 2 s, sent by this thread; ``victim()``'s process SIGKILLed 0.5 s into its
    ``result()`` (which this thread is serving); return its value, or the ZdqError it settled with."""
    consumers.start()
    assert qp.submit(add, 1, 2).result(timeout=30) == 3
    driver = qp.live_driver()
    assert driver is not None
    wait_until(lambda: _parked(driver._loop), timeout=10)
    fut = qp.submit(sleep_return, value, 2.0)
    assert fut._lender is not None, "the lone task went the I/O thread's way"
    threading.Timer(0.5, os.kill, (victim(), signal.SIGKILL)).start()
    try:
        return call_bounded(lambda: fut.result(timeout=90), 100, "result() of a task whose process was killed")
    except ZdqError as e:
        return e


@pytest.mark.faults
def test_a_broker_killed_while_the_caller_reads_its_own_result_settles_the_future_and_the_pool_recovers(
    client3: Client,
) -> None:
    with QueuePool(client3, 1, workers=["a"], **FAST) as qp:
        with ConsumerPool(client3, qp, n_consumers=1, workers=["b"]) as consumers:
            outcome = _read_while_killed(qp, consumers, lambda: int(qp[0].pid().result(timeout=10)), "x")
            # Transient: the chunk lived only in the dead broker's memory (or it had run already).
            assert outcome == "x" or isinstance(outcome, BrokerLost), repr(outcome)
            wait_until(lambda: qp.recoveries >= 1, timeout=60)
            assert qp.submit(add, 2, 3).result(timeout=60) == 5


@pytest.mark.faults
def test_a_consumer_killed_while_the_caller_reads_its_own_result_has_its_task_run_again(client3: Client) -> None:
    with QueuePool(client3, 1, workers=["a"], **FAST) as qp:
        with ConsumerPool(client3, qp, n_consumers=1, workers=["b"]) as consumers:
            outcome = _read_while_killed(qp, consumers, lambda: int(consumers[0].pid().result(timeout=10)), "again")
            assert outcome == "again", f"the task of a killed consumer did not run again: {outcome!r}"
