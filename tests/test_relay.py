"""relay=True: a driver's tasks and results go through a relay actor on a worker, over Dask's comm.

Across real network namespaces (a client that reaches only the scheduler) it is tested in
``tests/test_hosts.py``; here on a LocalCluster: what goes through it, that it is placed again
when its worker is killed, and its settings.
"""

from __future__ import annotations

import asyncio
import os
import signal

import dask
import pytest
from distributed import Client

from zdq import ConsumerPool, QueuePool
from zdq.errors import ProtocolError
from zdq.relay.actor import Relay
from zdq._actor import scheduler_workers

from .conftest import (
    _assert_eventually_empty,
    _zdq_actor_keys,
    pid_of,
    stop_process,
    wait_until,
)
from .tasks import add, sleep_return

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]
pytest_plugins = ["tests.harness"]


def _pid(client: Client, worker: str) -> int:
    """The pid of the worker process at address ``worker``."""
    return pid_of(client, scheduler_workers(client)[worker]["name"])


def _relay_keys(client: Client) -> list[str]:
    """The relay actors' keys the scheduler still holds."""
    return [k for k in client.run_on_scheduler(_zdq_actor_keys) if k.startswith("zdq-relay-")]


def test_a_relayed_pool_runs_single_tasks_batches_and_joins_with_every_message_through_the_relay(client: Client) -> None:
    with QueuePool(client, 2, relay=True) as queue_pool:
        relay = queue_pool._relay
        assert relay is not None
        with ConsumerPool(client, queue_pool, n_consumers=2, start=True) as consumers:
            assert queue_pool.submit(add, 40, 2).result(timeout=30) == 42
            batch = queue_pool.batch_submit([(add, i, 1) for i in range(5000)])
            assert batch.result(timeout=60) == [i + 1 for i in range(5000)]
            futures = [queue_pool.submit(add, i) for i in range(200)]
            consumers.join(timeout=60)
            assert [f.result(timeout=10) for f in futures] == list(range(200))
            sizes = queue_pool.get_queue_size()
            assert set(sizes.values()) == {0}
        sent, received = relay.tunnel.carried
        assert sent > 0 and received > 0
        stats = relay._actor.statistics().result(timeout=10)
        assert stats["to_brokers"] > 0 and stats["from_brokers"] > 0
        assert stats["worker"] == relay.worker


def test_the_relay_goes_on_a_worker_without_brokers_when_there_is_one(client_abc: Client) -> None:
    with QueuePool(client_abc, 2, relay=True) as queue_pool:
        assert queue_pool._relay is not None
        assert queue_pool._relay.worker not in queue_pool._workers()
        with ConsumerPool(client_abc, queue_pool, n_consumers=2, start=True):
            assert queue_pool.submit(add, 1, 1).result(timeout=30) == 2


def test_a_relay_whose_worker_is_killed_is_placed_again_and_every_task_completes(client3: Client) -> None:
    settings = {"heartbeat_interval": "200ms", "heartbeat_timeout": "3s", "connect_timeout": "5s"}
    with QueuePool(client3, 2, relay=True, **settings) as queue_pool:
        relay = queue_pool._relay
        assert relay is not None
        with ConsumerPool(client3, queue_pool, n_consumers=2, start=True):
            batch = queue_pool.batch_submit([(sleep_return, i, 0.002) for i in range(1500)], batch_size=50)
            wait_until(lambda: batch.completed >= 50, timeout=60)  # some chunks ran, others are queued or running
            first = relay.worker
            os.kill(_pid(client3, first), signal.SIGKILL)
            wait_until(lambda: relay.replacements >= 1, timeout=60)
            assert relay.worker != first
            assert batch.result(timeout=90) == list(range(1500))
            assert queue_pool.submit(add, 2, 3).result(timeout=30) == 5


def test_a_queue_lost_while_the_relay_is_placed_again_on_a_stopped_worker_fails_its_tasks_at_once(
    client3: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay's worker dies (its nanny stopped, so that it does not come back) and the new
    relay goes to a stopped worker: placing it waits its bound (10 s here). A queue whose worker
    dies meanwhile had its tasks failed only after that wait (reviewer 11: 9.7 s); the wait tells
    lost queues between its steps now. While the relay is down, no broker is said to be silent."""
    import logging
    import time

    from .test_faults import assert_settled

    settings = {"heartbeat_interval": "250ms", "heartbeat_timeout": "2s", "connect_timeout": "10s"}
    queue_pool = QueuePool(client3, 2, relay=True, placement_timeout=20.0, **settings)
    stopped: list[int] = []
    try:
        relay = queue_pool._relay
        assert relay is not None
        brokers = queue_pool.workers()
        assert relay.worker not in brokers and len(set(brokers)) == 2, (relay.worker, brokers)
        # Its new place: the first of the brokers' workers (zdq.relay.path: none is free of
        # brokers, and the count of replacements picks); that one is stopped, the other killed.
        waited_on = sorted(brokers)[0]
        lost = brokers.index(sorted(brokers)[1])
        pending = [queue_pool.submit(add, i, 1) for i in range(20)]
        queue_pool.flush(timeout=30)
        held = [f for f in pending if queue_pool.driver.brokers_holding(f.key, 1) == {lost}]
        assert held, "no task on the queue to lose"
        (nanny,) = client3.run(os.getppid, workers=[relay.worker]).values()
        os.kill(nanny, signal.SIGSTOP)
        stopped.append(nanny)
        paused, relay_pid, victim = (_pid(client3, w) for w in (waited_on, relay.worker, brokers[lost]))
        stop_process(paused)
        stopped.append(paused)
        caplog.set_level(logging.WARNING, logger="zdq.client.brokers")
        os.kill(relay_pid, signal.SIGKILL)
        wait_until(lambda: relay.worker == waited_on, timeout=30)  # its placement waits there
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        assert_settled(held, 30.0, "the tasks of the queue lost while the relay is placed again")
        took = time.monotonic() - killed_at
        assert took < 5.0, f"the lost queue's tasks failed {took:.1f} s after its worker died (the relay's bound: 10 s)"
        silent = [r.getMessage() for r in caplog.records if "silent" in r.getMessage()]
        assert silent == [], silent
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        queue_pool.close()


def test_relay_is_a_setting_and_anything_but_true_or_false_is_refused_at_the_call(client: Client) -> None:
    with pytest.raises(TypeError, match="relay must be True or False"):
        QueuePool(client, 1, relay="yes")  # type: ignore[arg-type]
    with dask.config.set({"zdq.relay": True}):
        with QueuePool(client, 1) as queue_pool:
            assert queue_pool.relay and queue_pool._relay is not None
    with dask.config.set({"zdq.relay": "maybe"}):
        with pytest.raises(ValueError, match="zdq.relay must be true or false"):
            QueuePool(client, 1)


def test_a_relay_refuses_malformed_pushes_and_pulls_at_the_call_and_keeps_carrying(client: Client) -> None:
    with QueuePool(client, 1, relay=True) as queue_pool:
        assert queue_pool._relay is not None
        actor = queue_pool._relay._actor
        # What is not a sealed batch is refused before it is opened; what does not open (not
        # sealed by the driver), after: neither is carried, nor disturbs the driver's session.
        for bad in (5, [(0, [b"a"])], "text", None):
            with pytest.raises(TypeError, match="push takes a sealed batch"):
                actor.push(bad).result(timeout=10)
        for bad in (b"", b"ZR", b"not sealed at all, but long enough to have a header", b"ZR\x01\x01" + bytes(40)):
            with pytest.raises(ProtocolError, match="sealed relay batch|failed authentication"):
                actor.push(bad).result(timeout=10)
        for wait in ("x", float("nan"), None):
            with pytest.raises(TypeError, match="pull takes"):
                actor.pull(wait).result(timeout=10)
        stats = actor.statistics().result(timeout=10)
        with ConsumerPool(client, queue_pool, n_consumers=1, start=True):
            assert queue_pool.submit(add, 1, 2).result(timeout=30) == 3  # it still carries the driver
        assert queue_pool._relay.replacements == 0  # nothing of it broke the relay
        assert stats["worker"]


@pytest.mark.faults
def test_a_relay_stalled_past_its_call_timeout_is_replaced_and_nothing_is_lost_or_failed(client_abc: Client) -> None:
    # The relay shares its worker with a broker (3 queues on 3 workers): the stall silences both.
    # The relay is replaced on another worker; the broker, alive, is waited for, not failed, and
    # the results it sent on the old path come again through the new one.
    settings = {"heartbeat_interval": "200ms", "heartbeat_timeout": "20s", "connect_timeout": "2s"}
    with QueuePool(client_abc, 3, relay=True, **settings) as queue_pool:
        relay = queue_pool._relay
        assert relay is not None
        with ConsumerPool(client_abc, queue_pool, n_consumers=3, start=True):
            batch = queue_pool.batch_submit([(sleep_return, i, 0.002) for i in range(3000)], batch_size=50)
            wait_until(lambda: batch.completed >= 50, timeout=60)  # the relay carries results
            stalled = relay.worker
            pid = _pid(client_abc, stalled)
            stop_process(pid)
            try:
                wait_until(lambda: relay.replacements >= 1, timeout=30)
                # Stalled on until results come through the new relay (the old one is silent):
                # what the brokers sent on the old path must come again on the new one.
                replaced_at = batch.completed
                wait_until(lambda: batch.completed > replaced_at, timeout=60)
            finally:
                os.kill(pid, signal.SIGCONT)
            assert relay.worker != stalled
            assert batch.result(timeout=90) == list(range(3000))
            assert queue_pool.submit(add, 2, 3).result(timeout=30) == 5
            assert queue_pool.driver.statistics().tasks_failed == 0
    # Closing the pool releases the stalled relay too, not only the one that replaced it.
    _assert_eventually_empty(lambda: _relay_keys(client_abc), "relay actors on the scheduler after close", timeout=15)


def test_the_relay_actor_is_a_plain_class_dask_can_place() -> None:
    relay = Relay("pool", b"\x00" * 16, None, 1 << 20)
    assert relay.statistics() == {"worker": "", "to_brokers": 0, "from_brokers": 0}
    with pytest.raises(ConnectionError, match="hello comes first"):  # no keys agreed: nothing carried
        asyncio.run(relay.push(b"ZR" + bytes(40)))
    relay.stop()  # never started: nothing to stop, and it says so by returning
