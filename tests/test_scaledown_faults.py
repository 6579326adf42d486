"""Fault injection for issue 23, points 4 and 5: a scale-down that leaves a ConsumerPool no worker,
and messages that named the wrong cause.

Real parts only: LocalClusters of worker processes (one made here with a worker that declares a
``GPU`` resource, removed and replaced as a cluster's scale-down and scale-up do), a broker's
worker stopped with SIGSTOP by pid (SIGCONT always, in a ``finally``), and a task that waits on
its own pool's sub-task inside a consumer. Every wait is bounded: a hang fails the test, naming
what hung.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask.config
import pytest
from distributed import Client, LocalCluster

from zdq import ConsumerPool, QueuePool
from zdq.errors import BrokerLost, NoConsumers, PlacementError, ZdqTimeoutError
from zdq._actor import scheduler_workers

from .conftest import call_bounded, pid_of, stop_process, wait_until
from .tasks import add

pytestmark = pytest.mark.faults
pytest_plugins = ["tests.harness"]

FAST = {"heartbeat_interval": "250ms", "heartbeat_timeout": "2s"}


def raised_within(fn: Callable[[], Any], timeout: float, what: str) -> tuple[BaseException | None, float]:
    """The error ``fn()`` raised (None if it returned) and how long it took; bounded."""
    started = time.monotonic()
    try:
        call_bounded(fn, timeout, what)
    except Exception as e:  # noqa: BLE001 - what the test checks
        return e, time.monotonic() - started
    return None, time.monotonic() - started


# -- point 4: every worker a ConsumerPool may use leaves ----------------------------------------------


@pytest.fixture
def gpu_cluster() -> Iterator[LocalCluster]:
    """Worker ``a`` (no resources) and worker ``g`` (``GPU=1``), one thread each; the test scales
    ``g`` down and a ``g2`` with the same resource up."""
    with LocalCluster(
        n_workers=0, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None
    ) as cluster:
        add_worker(cluster, "a")
        add_worker(cluster, "g", resources={"GPU": 1})
        yield cluster


def add_worker(cluster: LocalCluster, name: str, **options: Any) -> None:
    """Scale ``cluster`` up by one worker process named ``name`` (with ``options``, e.g. resources)."""
    (template,) = cluster.new_worker_spec().values()
    cluster.worker_spec[name] = {"cls": template["cls"], "options": {**template["options"], "name": name, **options}}
    cluster.sync(cluster._correct_state)


def remove_worker(cluster: LocalCluster, name: str) -> None:
    """Scale ``cluster`` down by worker ``name``, as ``cluster.scale()`` does (its nanny closes it:
    nothing comes back under that name)."""
    del cluster.worker_spec[name]
    cluster.sync(cluster._correct_state)


def sleep_return_until(i: int, seconds: float, hurry: str) -> int:
    """Sleep ``seconds`` (none once the file ``hurry`` exists), then return ``i``."""
    if not os.path.exists(hurry):
        time.sleep(seconds)
    return i


def worker_names(client: Client) -> list[str]:
    return sorted(str(w["name"]) for w in scheduler_workers(client).values())


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("constraint", "named", "newcomer"),
    [
        ({"resources": {"GPU": 1}}, "resources={'GPU': 1.0}", "g2"),  # another worker with a GPU
        ({"workers": ["g"]}, "workers=['g']", "g"),  # a worker of the same name comes back
    ],
    ids=["resources", "workers"],
)
def test_join_and_result_raise_naming_the_constraint_nothing_satisfies_after_every_matching_worker_leaves_and_resume_when_one_joins(
    gpu_cluster: LocalCluster, constraint: dict[str, Any], named: str, newcomer: str, tmp_path: Path
) -> None:
    hurry = str(tmp_path / "hurry")
    with Client(gpu_cluster) as client:
        client.wait_for_workers(2, timeout=60)
        # The bound is set as users do (a configuration key); 1.5 s instead of 30 s (past it, the
        # verdict asks the scheduler whether some worker fits: a shorter bound cannot change it).
        with dask.config.set({"zdq.no-consumer-timeout": "1.5s"}), QueuePool(client, 1, workers=["a"], **FAST) as qp:
            consumers = ConsumerPool(client, qp, n_consumers=1, **constraint, **FAST)
            try:
                consumers.start()
                futures = [qp.submit(sleep_return_until, i, 0.3, hurry) for i in range(30)]
                futures[0].result(timeout=60)  # the consumer on g works

                remove_worker(gpu_cluster, "g")  # the only worker the pool may use leaves; tasks wait
                wait_until(lambda: worker_names(client) == ["a"], timeout=60)

                # join() raises within the bound (1.5 s, and a few supervision rounds), naming the
                # constraint nothing satisfies; before, it waited for ever ("will retry" each round).
                error, took = raised_within(lambda: consumers.join(timeout=45), 60, "join() after the scale-down")
                assert isinstance(error, NoConsumers), f"join() gave {error!r} after {took:.0f} s, not NoConsumers"
                assert took < 30, f"join() raised only after {took:.0f} s"
                assert named in str(error), str(error)
                assert type(error).__name__ == "NoEligibleWorkers"

                # A future's result() says the same, instead of waiting for ever.
                waiting = next(f for f in reversed(futures) if not f.done())
                error, took = raised_within(lambda: waiting.result(timeout=45), 60, "result() after the scale-down")
                assert isinstance(error, NoConsumers), f"result() gave {error!r} after {took:.0f} s, not NoConsumers"
                assert took < 15, f"result() raised only after {took:.0f} s"
                assert named in str(error), str(error)
                assert not waiting.done(), "the future was failed: its task must still run once a worker joins"

                # A matching worker joins: the supervisor (still trying) places the consumer there,
                # and the waits succeed (the tasks left no longer sleep: only that they run counts).
                Path(hurry).touch()
                add_worker(gpu_cluster, newcomer, resources={"GPU": 1})
                call_bounded(lambda: consumers.join(timeout=90), 120, "join() after a matching worker joined")
                assert [f.result(timeout=10) for f in futures] == list(range(30))
            finally:
                consumers.close()


# -- point 5: messages that name the cause ------------------------------------------------------------


def test_get_queue_size_says_a_stopped_brokers_worker_did_not_answer_not_that_it_is_being_placed_again(
    client_abc: Client,
) -> None:
    client3 = client_abc  # a worker is only stopped (SIGSTOP), then resumed: the shared cluster serves
    with QueuePool(client3, 2, workers=["a", "b"]) as qp:
        assert call_bounded(lambda: qp.get_queue_size(timeout=10), 30, "get_queue_size()") == dict.fromkeys(
            qp.queue_names, 0
        )
        victim = int(qp[0].pid().result(timeout=10))
        stop_process(victim)
        try:
            error, _ = raised_within(lambda: qp.get_queue_size(timeout=2), 30, "get_queue_size() of a stopped broker")
        finally:
            os.kill(victim, signal.SIGCONT)
        assert error is not None, "get_queue_size() gave sizes while a broker's worker was stopped"
        message = str(error)
        assert "placed again" not in message, message
        assert f"{qp.queue_names[0]} on " in message and "did not answer within 2 s" in message, message
        assert isinstance(error, ZdqTimeoutError) and not isinstance(error, BrokerLost), repr(error)
        # SIGCONT: it answers again.
        wait_until(lambda: _sizes_or_none(qp) is not None, timeout=30)


def test_a_join_that_times_out_says_why_its_tasks_are_not_done(client_abc: Client) -> None:
    """Not only how many were pending: the pool's reasons, as a future's timeout gives them (here
    a queue whose worker is stopped, silent past the heartbeat timeout)."""
    with QueuePool(client_abc, 1, workers=["a"], heartbeat_interval=0.3, heartbeat_timeout=1.0) as qp:
        with ConsumerPool(client_abc, qp, n_consumers=1, workers=["b"], start=True) as consumers:
            assert qp.submit(add, 1, 1).result(timeout=30) == 2
            victim = int(qp[0].pid().result(timeout=10))
            stop_process(victim)
            try:
                qp.submit(add, 2, 2)
                error, _ = raised_within(lambda: consumers.join(timeout=3), 30, "join() of a stopped queue")
            finally:
                os.kill(victim, signal.SIGCONT)
            assert isinstance(error, ZdqTimeoutError), repr(error)
            message = str(error)
            assert "still pending at the timeout: " in message, message
            assert f"queues {qp.queue_names[0]} (" in message and "have not answered" in message, message
            consumers.start()
            consumers.join(timeout=60)


def _sizes_or_none(qp: QueuePool) -> dict[str, int] | None:
    try:
        return qp.get_queue_size(timeout=2)
    except ZdqTimeoutError:
        return None


def wait_on_a_sub_task(timeout: float) -> str:
    """A task that submits a sub-task to its own pool and waits for it: what the wait said."""
    import zdq

    sub = zdq.current_pool().submit(add, 1, 2)
    try:
        return f"the sub-task gave {sub.result(timeout=timeout)}"
    except ZdqTimeoutError as e:
        return str(e)


def test_a_task_waiting_on_its_own_pools_sub_task_with_every_consumer_thread_busy_is_told_to_raise_max_concurrency(
    client_abc: Client,
) -> None:
    with (
        QueuePool(client_abc, 1, workers=["a"]) as qp,
        ConsumerPool(client_abc, qp, n_consumers=1, max_concurrency=1, workers=["b"]) as consumers,
    ):
        consumers.start()
        said = qp.submit(wait_on_a_sub_task, 1.5).result(timeout=60)  # above the 1 s step of a waiting result()
        assert "had no result within 1.5s" in said, said
        assert "no ConsumerPool consumes" not in said, said
        assert "max_concurrency" in said and "busy" in said, said
        call_bounded(lambda: consumers.join(timeout=60), 90, "join() after the nested wait")


@pytest.mark.timeout(240)
def test_a_stopped_worker_is_named_by_statistics_alone_and_by_the_placement_error_of_a_consumer_pool_placed_meanwhile(
    client3: Client,
) -> None:
    with QueuePool(client3, 1, workers=["a"]) as qp:
        with ConsumerPool(client3, qp, n_consumers=3) as consumers:
            consumers.start()
            where = dict(zip(consumers.names, (int(c.pid().result(timeout=10)) for c in consumers)))
            stopped_pid = int(client3.run(os.getpid, workers=[_address_of(client3, "c")]).popitem()[1])
            (on_c,) = [name for name, pid in where.items() if pid == stopped_pid]
            stop_process(stopped_pid)
            try:
                # Only the consumer on the stopped worker is silent: the others answered at once,
                # and were reported silent too when the deadline had passed before they were read.
                error, _ = raised_within(lambda: consumers.statistics(timeout=3), 30, "statistics()")
                assert isinstance(error, ZdqTimeoutError), repr(error)
                silent = [name for name in consumers.names if name in str(error)]
                assert silent == [on_c], f"statistics() named {silent} silent, only {on_c} is stopped: {error}"

                # A ConsumerPool placed meanwhile cannot create its actor on the stopped worker: the
                # error names that worker, not only "timed out".
                # 4 s: placing a consumer on a live worker and its first call take well under a second.
                error, took = raised_within(
                    lambda: ConsumerPool(client3, qp, n_consumers=3, placement_timeout="4s"), 60, "ConsumerPool()"
                )
                assert took < 20, f"the placement bound (zdq.placement-timeout, 4 s here) was not kept: {took:.0f} s"
            finally:
                os.kill(stopped_pid, signal.SIGCONT)
            assert isinstance(error, PlacementError), repr(error)
            assert "(worker c)" in str(error) and "did not answer" in str(error), str(error)
            # Resumed, the worker serves a new ConsumerPool, and the old one's consumers work.
            with ConsumerPool(client3, qp, n_consumers=3) as again:
                again.start()
                assert qp.submit(add, 2, 3).result(timeout=60) == 5


@pytest.mark.timeout(120)
def test_a_consumer_pool_placed_while_a_worker_is_stopped_goes_to_the_others_within_its_bound(
    client3: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Reviewer 16: one stopped worker made a new ConsumerPool fail after the whole
    placement-timeout (60 s), though the other workers could take its consumers (a second try
    right after was placed at once: the worker was passed over by then). The first try now waits
    a quarter of the bound (here 2 s of 8): the stopped worker is passed over, and every consumer
    placed once more on the others within the rest, the worker named in a warning."""
    from zdq import _actor
    from zdq.client import slots

    monkeypatch.setattr(slots, "_TRY_AT_LEAST", 2.0)
    monkeypatch.setattr(_actor, "_unanswered", {})  # this test's passing over stays in it
    stopped = _address_of(client3, "c")
    with QueuePool(client3, 1, workers=["a"]) as qp:
        stopped_pid = pid_of(client3, "c")
        stop_process(stopped_pid)
        try:
            with caplog.at_level(logging.WARNING, logger="zdq"):
                started = time.monotonic()
                consumers = call_bounded(
                    lambda: ConsumerPool(client3, qp, n_consumers=3, placement_timeout=8), 60, "ConsumerPool()"
                )
                took = time.monotonic() - started
            with consumers:
                assert took < 8 + 4, f"placed in {took:.1f} s: the bound is 8 s"
                assert stopped not in consumers._consumers.placement().values()
                consumers.start()
                assert qp.batch_submit([(add, i, 1) for i in range(300)]).result(timeout=60) == list(range(1, 301))
        finally:
            os.kill(stopped_pid, signal.SIGCONT)
    said = [r.getMessage() for r in caplog.records if "placing them again on the others" in r.getMessage()]
    assert said and stopped in said[0] and "did not answer within 2 s" in said[0], said


def _address_of(client: Client, name: str) -> str:
    (address,) = [a for a, w in scheduler_workers(client).items() if w["name"] == name]
    return address


def test_cancel_waits_once_for_consumers_on_stopped_workers_not_once_each(
    client3: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """join() ends by cancel(): with two consumers' workers stopped (SIGSTOP), it took the answer
    bound once per silent consumer (30 s each, in turn) and said nothing. Now one bound for all,
    and each silent consumer is named."""
    import zdq.client.consumer_pool

    monkeypatch.setattr(zdq.client.consumer_pool, "CANCEL_ANSWER", 2.0)
    by_name = {w["name"]: a for a, w in scheduler_workers(client3).items()}
    with QueuePool(client3, 1, workers=[by_name["a"]]) as queue_pool:
        with ConsumerPool(client3, queue_pool, n_consumers=2, workers=[by_name["b"], by_name["c"]], start=True) as consumers:
            assert queue_pool.submit(add, 1, 2).result(timeout=30) == 3
            stopped = [pid_of(client3, "b"), pid_of(client3, "c")]
            try:
                for pid in stopped:
                    stop_process(pid)
                started = time.monotonic()
                with caplog.at_level(logging.WARNING, logger="zdq"):
                    consumers.cancel()
                took = time.monotonic() - started
            finally:
                for pid in stopped:
                    os.kill(pid, signal.SIGCONT)
            assert 1.9 <= took < 3.5, took  # the bound once (2 s), not twice
            silent = [r.getMessage() for r in caplog.records if "did not answer within 2 s" in r.getMessage()]
            assert len(silent) == 2 and all(m.startswith("cancel: consumer GeneralConsumer-") for m in silent), silent
