"""The in-process harness itself: it encodes tasks as QueuePool does, closes everything it
started, and fails a test that leaves a zdq thread running; the cluster leak check of
``tests/conftest.py`` is bounded."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from zdq._actor import scheduler_workers
from zdq.codec.tasks import TaskOptions

from .tasks import add

pytest_plugins = ["tests.harness"]

# tests.harness is imported inside the tests: imported here, before pytest loads it as a plugin
# for other modules, its asserts would not be rewritten.


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, None),
        ({"retries": 3}, TaskOptions(retries=3)),
        (
            {"retries": 2, "retry_backoff": 0.01, "retry_on": ValueError},
            TaskOptions(retries=2, retry_backoff=0.01, retry_on=(ValueError,)),
        ),
        ({"retry_on": (KeyError, ValueError)}, TaskOptions(retry_on=(KeyError, ValueError))),
        ({"time_limit": "300ms"}, TaskOptions(time_limit=0.3)),
        ({"time_limit": 5}, TaskOptions(time_limit=5.0)),
    ],
)
def test_the_harness_builds_the_task_options_a_queue_pool_without_defaults_builds(
    given: dict[str, Any], expected: TaskOptions | None
) -> None:
    # The harness merges through the pool's own TaskDefaults; this pins what that merge gives.
    from .harness import Harness

    assert Harness._options(given) == expected


def test_the_harness_closes_brokers_driver_and_consumers_and_leaves_no_thread() -> None:
    from .harness import Harness, zdq_threads

    before = set(zdq_threads())
    with Harness(2, 2) as h:
        assert h.batch_submit([(add, i, 1) for i in range(100)]).result(timeout=30) == list(range(1, 101))
        assert sum(s.consumers for s in h.broker_statistics()) == 4
        assert set(zdq_threads()) - before  # it did start zdq's threads
    from .harness import assert_no_zdq_threads

    assert_no_zdq_threads(before)


def test_the_harness_fails_a_test_that_leaves_a_zdq_thread_running() -> None:
    from .harness import make_harness

    stop = threading.Event()
    teardown = make_harness(leak_timeout=0.5)
    next(teardown)  # what the fixture yields to the test
    leak = threading.Thread(target=stop.wait, args=(30,), name="zdq-left-behind", daemon=True)
    leak.start()
    try:
        with pytest.raises(pytest.fail.Exception, match="zdq-left-behind"):
            next(teardown, None)  # the fixture's teardown
    finally:
        stop.set()
        leak.join(5)


@pytest.mark.faults
def test_the_leak_check_fails_naming_a_worker_that_does_not_answer_instead_of_hanging(client_abc: Any) -> None:
    """A worker stopped (SIGSTOP) during a test's teardown: the leak check gives up on it at its
    bound and names it (``client.run`` alone would wait for ever)."""
    import os
    import signal
    import time

    from .conftest import assert_no_zdq_leaks, pid_of, stop_process, wait_until

    victim = pid_of(client_abc, "c")
    stop_process(victim)
    try:
        began = time.monotonic()
        with pytest.raises(pytest.fail.Exception, match=r"worker c \(tcp://.*\) did not answer client.run within 1s") as failed:
            assert_no_zdq_leaks(client_abc, answer_timeout=1.0)
        assert time.monotonic() - began < 10, "the leak check did not keep its bound"
    finally:
        os.kill(victim, signal.SIGCONT)
    # It asked the worker for its threads' stacks (written once resumed), and that did not end it.
    assert "stacks are in the log" in str(failed.value), failed.value

    def worker_c_answers() -> bool:
        # Resumed, it answers; under a loaded machine Dask may have replaced it meanwhile (its
        # address then leaves the scheduler's list): a worker named c answers either way.
        addresses = [a for a, w in scheduler_workers(client_abc).items() if w["name"] == "c"]
        try:
            return bool(addresses) and len(client_abc.run(os.getpid, workers=addresses)) == 1
        except OSError:  # a connection the stop closed (pooled by the scheduler), or a worker gone
            return False

    wait_until(worker_c_answers, timeout=90, interval=0.5)


def test_the_leak_check_collects_a_pool_frozen_alive_and_dropped_into_a_cycle_since(client: Any) -> None:
    """Each test starts with gc.freeze() (tests/conftest.py): a pool alive then and dropped into
    a reference cycle since was never collected, and its actors failed every later leak check of
    the process, charged to tests that had nothing to do with it (reviewer 11). The check
    collects everything once when it finds something."""
    import gc

    from zdq import QueuePool

    from .conftest import assert_no_zdq_leaks

    pool = QueuePool(client, 1)
    box: dict[str, Any] = {"pool": pool}
    box["self"] = box  # only the collector frees it
    gc.freeze()  # as the next test's start does
    del pool, box
    assert_no_zdq_leaks(client)  # within its bound: the pool collected, its finalizer closed it
