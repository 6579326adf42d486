"""A PUTS (several chunks in one message) at a real broker over real sockets, without a cluster:
each chunk stored, confirmed and delivered as its own, and a forged one dropped without harm."""

from __future__ import annotations

import zmq

from tests.conftest import wait_until
from tests.test_broker import _peer, _recv, broker  # noqa: F401 - broker is a fixture
from zdq.broker.core import BrokerCore
from zdq.transport import protocol as p


def test_each_chunk_of_a_puts_is_stored_confirmed_and_delivered_as_its_own(
    broker: tuple[BrokerCore, str], zmq_ctx: zmq.Context
) -> None:
    core, endpoint = broker
    driver = _peer(zmq_ctx, endpoint, p.Role.DRIVER)
    consumer = _peer(zmq_ctx, endpoint, p.Role.CONSUMER)
    try:
        puts = (
            p.Put(1, 2, b"chunk-one", base=100),
            p.Put(2, 3, b"chunk-two", 0.0, 5, 102, 4_000_000_000.0),  # a priority and an expiry of its own
            p.Put(3, 1, b"chunk-three", base=105),
        )
        driver.send_multipart(p.encode(p.Puts(puts)))
        confirms = _recv(driver)
        assert isinstance(confirms, p.Confirms) and confirms.seqs == (1, 2, 3)
        assert len(set(confirms.chunk_ids)) == 3
        assert core.statistics().ready_tasks == 6
        consumer.send_multipart(p.encode(p.Fetch(3)))
        delivered = [_recv(consumer) for _ in range(3)]
        assert all(isinstance(d, p.Deliver) for d in delivered)
        by_id = {d.chunk_id: (d.n_tasks, bytes(d.chunk)) for d in delivered}  # type: ignore[union-attr]
        ids = dict(zip(confirms.seqs, confirms.chunk_ids))
        assert by_id == {ids[1]: (2, b"chunk-one"), ids[2]: (3, b"chunk-two"), ids[3]: (1, b"chunk-three")}
        assert delivered[0].chunk_id == ids[2]  # type: ignore[union-attr]  # its priority went first
    finally:
        driver.close(linger=0)
        consumer.close(linger=0)


def test_a_forged_puts_is_dropped_and_counted_and_stores_nothing(
    broker: tuple[BrokerCore, str], zmq_ctx: zmq.Context
) -> None:
    core, endpoint = broker
    driver = _peer(zmq_ctx, endpoint, p.Role.DRIVER)
    try:
        good = p.encode(p.Puts((p.Put(1, 2, b"a", base=10), p.Put(2, 2, b"b", base=12))))
        driver.send_multipart([good[0], good[1]])  # a chunk frame missing: the other would be read as nothing
        driver.send_multipart([*good, b"extra"])  # a frame no chunk announces
        driver.send_multipart([good[0][:-3], *good[1:]])  # a head cut short
        wait_until(lambda: core.statistics().bad_messages == 3, timeout=10)
        assert core.statistics().ready_tasks == 0
        driver.send_multipart(good)  # the broker carries on
        confirms = _recv(driver)
        assert isinstance(confirms, p.Confirms) and confirms.seqs == (1, 2)
    finally:
        driver.close(linger=0)
