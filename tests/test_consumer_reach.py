"""A consumer that cannot reach a broker says so: in its log, its statistics and its health (no
cluster: a whole Consumer in this process, against fake brokers the test answers by hand)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from zdq.config import settings
from zdq.consumer import Consumer, GeneralConsumer
from zdq.transport import protocol as p
from zdq.transport.reach import WENT_SILENT

from .conftest import refused_endpoint, wait_until
from .test_consumer_link import FakeBroker


@pytest.fixture
def broker(zmq_ctx: zmq.Context[Any]) -> Iterator[FakeBroker]:
    fake = FakeBroker(zmq_ctx)
    yield fake
    fake.sock.close(linger=0)


def a_consumer() -> Consumer:
    pool = settings(heartbeat_interval="100ms", heartbeat_timeout="2s", connect_timeout="500ms")
    return Consumer("test-consumer", b"c" * 16, GeneralConsumer, pool)


def test_a_consumer_reports_the_brokers_it_cannot_reach_and_goes_on_with_the_others(
    broker: FakeBroker, caplog: pytest.LogCaptureFixture
) -> None:
    refused = refused_endpoint()
    consumer = a_consumer()
    with caplog.at_level(logging.WARNING, logger="zdq"):
        consumer.start([broker.endpoint, refused])
        try:
            wait_until(lambda: broker.recv() is not None and broker.peer, timeout=5)  # its HELLO
            broker.send(p.Heartbeat())  # what a broker answers to a HELLO
            reached, unreached = asyncio.run(consumer.reach())
            assert reached == [broker.endpoint]
            assert [(q, e) for q, e, _ in unreached] == [(refused, refused)]
            assert "refused" in unreached[0][2]
            assert consumer.statistics().unreachable == (f"{refused} at {refused}: {unreached[0][2]}",)
            assert consumer.health() == (True, "running")  # it serves the broker it reaches
        finally:
            consumer.stop()
    assert any(
        "consumer test-consumer cannot reach queue" in r.getMessage() and refused in r.getMessage() for r in caplog.records
    )


def test_a_consumer_that_reaches_none_of_its_brokers_is_unhealthy(broker: FakeBroker) -> None:
    consumer = a_consumer()
    consumer.start([broker.endpoint])  # the fake broker never answers the HELLO
    try:
        reached, unreached = asyncio.run(consumer.reach())
        assert reached == [] and len(unreached) == 1
        assert "the broker sent nothing" in unreached[0][2]
        healthy, why = consumer.health()
        assert not healthy and "reaches none of its queues" in why and broker.endpoint in why
        # The broker answers after all: the consumer reaches it, and is healthy again.
        wait_until(lambda: broker.recv() is not None and broker.peer, timeout=5)
        broker.send(p.Heartbeat())
        wait_until(lambda: consumer.health() == (True, "running"), timeout=5)
        assert consumer.statistics().unreachable == ()
    finally:
        consumer.stop()


def test_a_consumer_says_when_a_broker_it_reached_goes_silent_and_when_it_hears_it_again(
    broker: FakeBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Cut off after it reached its broker (a network cut, the broker's worker stopped), a consumer
    said nothing: it had heard the broker once. Now a broker silent for the heartbeat timeout
    (2 s here; brokers beat every interval) is reported, and the report ends when it speaks again.
    The consumer stays healthy: a replacement would not reach that broker either."""
    consumer = a_consumer()
    with caplog.at_level(logging.WARNING, logger="zdq"):
        consumer.start([broker.endpoint])
        try:
            wait_until(lambda: broker.recv() is not None and broker.peer, timeout=5)  # its HELLO
            broker.send(p.Heartbeat())
            assert asyncio.run(consumer.reach()) == ([broker.endpoint], [])
            heard_at = time.monotonic()
            # The broker says nothing more.
            unreached = wait_until(lambda: asyncio.run(consumer.reach())[1], timeout=10)
            assert time.monotonic() - heard_at >= 1.9
            assert [(q, e) for q, e, _ in unreached] == [(broker.endpoint, broker.endpoint)]
            assert WENT_SILENT in unreached[0][2]
            assert consumer.statistics().unreachable == (f"{broker.endpoint} at {broker.endpoint}: {unreached[0][2]}",)
            assert consumer.checkup() == (True, "running", [broker.endpoint])
            assert consumer.health() == (True, "running")
            # It speaks again: heard, the report is gone.
            broker.send(p.Heartbeat())
            wait_until(lambda: consumer.checkup() == (True, "running", []), timeout=5)
            assert asyncio.run(consumer.reach()) == ([broker.endpoint], [])
            assert consumer.statistics().unreachable == ()
        finally:
            consumer.stop()
    said = [r.getMessage() for r in caplog.records]
    assert any("has heard nothing from queue" in m and broker.endpoint in m for m in said), said
    assert any("hears queue" in m and "again" in m for m in said), said


# -- on a cluster: a queue placed again where no consumer reaches it ----------------------------------


def test_join_says_which_queue_no_consumer_reaches_after_it_was_placed_again_instead_of_waiting(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import time

    from zdq import ConsumerPool, QueuePool
    from zdq.errors import BrokerUnreachable

    from .tasks import add

    with (
        QueuePool(client, 2, connect_timeout="1s") as queue_pool,
        ConsumerPool(client, queue_pool, n_consumers=2, start=True) as consumers,
    ):
        assert all(1 in served for served in consumers.served)  # fan-out 2: each serves both
        real = queue_pool.endpoints[1]
        # As when queue 1's worker died and it was placed where the consumers' packets do not get
        # through: the consumers are told of an endpoint that refuses them (the driver still
        # reaches the queue, so its tasks are stored there and wait).
        with caplog.at_level(logging.ERROR, logger="zdq"):
            consumers.on_broker_moved(1, refused_endpoint())
            batch = queue_pool.batch_submit([(add, i) for i in range(20)])
            began = time.monotonic()
            with pytest.raises(BrokerUnreachable) as caught:
                consumers.join(timeout=60)
        assert time.monotonic() - began < 20  # connect-timeout, a heartbeat or two, a supervisor round
        message = str(caught.value)
        assert queue_pool.queue_names[1] in message and "would never run" in message and "refused" in message
        assert queue_pool.queue_names[1] in consumers.unreached()
        assert any("would never run" in r.getMessage() for r in caplog.records)  # said once when found
        # Where the consumers reach it again, it is served, and join() finishes.
        consumers.on_broker_moved(1, real)
        consumers.join(timeout=60, stop=False)
        assert batch.result(timeout=30) == list(range(20))
        wait_until(lambda: not consumers.unreached(), timeout=30)


def test_a_pool_placed_started_learns_from_its_brokers_that_they_hear_every_consumer_without_asking_them(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zdq import ConsumerPool, QueuePool
    from zdq.client.consumer_reach import ConsumerReach

    from .tasks import add

    asked: list[list[str]] = []
    ask = ConsumerReach._reach_by_worker

    def counted(self: ConsumerReach, up: list[str], wait: float) -> dict[int, Any]:
        asked.append(up)
        return ask(self, up, wait)

    monkeypatch.setattr(ConsumerReach, "_reach_by_worker", counted)
    with (
        QueuePool(client, 3) as queue_pool,
        ConsumerPool(client, queue_pool, n_consumers=4, start=True) as consumers,
    ):
        assert asked == []  # the brokers said they hear every consumer: no actor call asked it
        statuses = queue_pool.driver.queue_status(timeout=10, consumers=True)
        slots = consumers._consumers
        for q, status in enumerate(statuses):
            assert status is not None and status.consumer_digests is not None
            serving = {slots.identities[i][-1] for i, queues in enumerate(consumers.served) if q in queues}
            # Each broker tells its own consumers, and no other, by digest: never an identity.
            assert set(status.consumer_digests) == {p.consumer_digest(ident) for ident in serving}
            assert not set(status.consumer_digests) & serving
        assert queue_pool.driver.queue_status(timeout=10)[0].consumer_digests is None  # type: ignore[union-attr]
        assert queue_pool.batch_submit([(add, i) for i in range(30)]).result(timeout=60) == list(range(30))
