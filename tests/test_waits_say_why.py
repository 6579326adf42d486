"""A wait without a bound that its pool can explain says why, once: ``result()``, ``zdq.wait``,
``zdq.as_completed`` and ``await`` log a warning past ``SAY_AFTER`` seconds naming the future and
the pool's reason (no consumer running, queues down...). One that the pool cannot explain (a task
that runs long) says nothing. The futures are zdq's, their pool's answer a :class:`WaitHint`; the
last test is the real case: a pool whose ConsumerPool was joined (which stops it, as daskqueue's).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

import zdq
from zdq import futures
from zdq.futures import TaskFuture, WaitHint

from .conftest import wait_until

REASON = "no consumer is running: call consumer_pool.start()"


@pytest.fixture(autouse=True)
def _quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(futures, "_LOOK_EVERY", 0.05)
    monkeypatch.setattr(futures, "_LOOK_AT_MOST", 0.05)
    monkeypatch.setattr(futures, "SAY_AFTER", 0.3)


def _future(reason: str) -> TaskFuture:
    fut = TaskFuture(3)
    fut._hint = WaitHint(lambda: reason, lambda f: None)  # never stuck: it waits on
    return fut


def _settle_later(fut: TaskFuture, after: float) -> threading.Timer:
    timer = threading.Timer(after, fut.set_result, (9,))
    timer.start()
    return timer


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "zdq.futures" and r.levelno == logging.WARNING]


def _waited_for(how: str, caplog: pytest.LogCaptureFixture, timeout: float | None = None) -> list[str]:
    """Wait ``how`` (with ``timeout``) on a future its pool explains, settled after a second; what
    the wait said."""
    fut = _future(REASON)
    timer = _settle_later(fut, 1.0)
    with caplog.at_level(logging.WARNING, logger="zdq.futures"):
        if how == "result":
            assert fut.result(timeout=timeout) == 9
        elif how == "exception":
            assert fut.exception(timeout=timeout) is None
        elif how == "wait":
            assert zdq.wait([fut], timeout=timeout).done == {fut}
        else:
            assert list(zdq.as_completed([fut], timeout=timeout)) == [fut]
    timer.join(5)
    return _said(caplog)


@pytest.mark.parametrize("how", ["result", "exception", "wait", "as_completed"])
def test_a_long_wait_says_once_what_it_waits_for_and_why(how: str, caplog: pytest.LogCaptureFixture) -> None:
    said = _waited_for(how, caplog)
    assert len(said) == 1, said  # once, not every look
    assert REASON in said[0] and "key=3" in said[0] and "has waited" in said[0], said


def test_a_long_await_says_once_why(caplog: pytest.LogCaptureFixture) -> None:
    fut = _future(REASON)

    async def main() -> object:
        asyncio.get_running_loop().call_later(1.0, fut.set_result, 9)
        return await asyncio.wait_for(fut, 10)  # type: ignore[arg-type]

    with caplog.at_level(logging.WARNING, logger="zdq.futures"):
        assert asyncio.run(main()) == 9
    said = _said(caplog)
    assert len(said) == 1 and REASON in said[0] and said[0].startswith("zdq: await"), said


@pytest.mark.parametrize("how", ["result", "exception", "wait", "as_completed"])
def test_a_wait_given_a_timeout_says_nothing_as_it_is_bounded_already(how: str, caplog: pytest.LogCaptureFixture) -> None:
    # Before, bf.result(timeout=60) said "give it a timeout to bound it" after 10 s (reviewer 12).
    assert _waited_for(how, caplog, timeout=20) == []


def test_a_wait_the_pool_cannot_explain_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    fut = _future("")  # consumers are running: the task is just long
    timer = _settle_later(fut, 0.7)
    with caplog.at_level(logging.WARNING, logger="zdq.futures"):
        assert fut.result() == 9
    timer.join(5)
    assert _said(caplog) == []


def test_a_result_waited_for_after_join_stopped_the_consumers_says_to_start_them(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with zdq.QueuePool(client, 1) as qp:
        consumers = zdq.ConsumerPool(client, qp, n_consumers=1)
        consumers.start()
        consumers.join(timeout=30)  # stops them, as daskqueue's join does
        fut = qp.submit(int, "7")
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(fut.result()), daemon=True)
        with caplog.at_level(logging.WARNING, logger="zdq.futures"):
            waiter.start()
            deadline = 20.0
            while not _said(caplog) and deadline > 0:
                waiter.join(0.1)
                deadline -= 0.1
            said = _said(caplog)
            assert said and "consumer_pool.start()" in said[0], said
            consumers.start()  # the result comes: the wait that said why ends with it
            waiter.join(30)
        assert got == [7]


def test_a_driver_io_thread_that_stops_coming_round_its_loop_is_reported_with_where_it_is(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing of a pool moves without its driver's I/O thread. One held up (here by a command
    that blocks it, as a bug would) is reported by the pool's supervisor past twice the heartbeat
    timeout, with its stack, once; and again when it comes back, after which the pool works."""
    gate = threading.Event()

    def held_up(fut: Any) -> None:
        gate.wait(20)
        fut.set_result(None)

    def said(words: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "zdq.client.supervision" and words in r.getMessage()]

    with zdq.QueuePool(client, 1, heartbeat_interval="100ms", heartbeat_timeout="500ms") as qp, zdq.ConsumerPool(
        client, qp, n_consumers=1
    ) as consumers:
        consumers.start()
        assert qp.submit(int, "6").result(timeout=30) == 6
        with caplog.at_level(logging.WARNING, logger="zdq.client.supervision"):
            qp.driver._loop.post(held_up)
            wait_until(lambda: said("has not come round its loop"), timeout=15)
            gate.set()
            wait_until(lambda: said("comes round its loop again"), timeout=15)
        stalled = said("has not come round its loop")
        assert len(stalled) == 1 and f"of pool {qp.name}" in stalled[0], stalled
        assert "in held_up" in stalled[0] and "gate.wait(20)" in stalled[0], stalled[0]  # where it was
        assert len(said("comes round its loop again")) == 1
        assert qp.submit(int, "7").result(timeout=30) == 7


_STOPPED_DRIVER = """
import sys, time
from distributed import Client
import zdq

client = Client(sys.argv[1], timeout=60)
with zdq.QueuePool(client, 1, heartbeat_interval="250ms", heartbeat_timeout="1s") as pool:
    with zdq.ConsumerPool(client, pool, n_consumers=1, start=True):
        assert pool.submit(int, "6").result(timeout=60) == 6
        print("ready", flush=True)
        sys.stdin.readline()  # the test stops this process (SIGSTOP) for 4 s, resumes it, then writes a line
        time.sleep(2)  # the supervisor's rounds after the stop
        assert pool.submit(int, "7").result(timeout=60) == 7
        print("done", flush=True)
client.close()
"""


def test_a_driver_process_stopped_whole_is_not_reported_as_its_io_thread_stuck(client: Client, tmp_path: Path) -> None:
    # Reviewer 23: after a SIGSTOP of 32 s (twice the heartbeat timeout and more), the supervisor
    # woke before the I/O thread's next tick and blamed "a zdq bug". Its own gap says the process
    # was stopped whole: the I/O thread is given its time from then.
    root = Path(__file__).resolve().parent.parent
    log = tmp_path / "driver.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _STOPPED_DRIVER, client.scheduler.address],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n", log.read_text()[-2000:]
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(4)  # past twice the heartbeat timeout (2 s)
        os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "done\n", log.read_text()[-2000:]
        assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(timeout=10)
    said = log.read_text()
    assert "this process was stopped" in said or "did not run for" in said, said[-2000:]  # the stop is seen...
    assert "has not come round its loop" not in said, said[-3000:]  # ...and not blamed on the I/O thread
