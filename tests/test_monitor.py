"""The broker's side of purge and round trips, over real sockets without a cluster (the monitor's
own figures are in tests/unit/test_monitor.py)."""

from __future__ import annotations

import zmq

from tests.conftest import wait_until
from tests.test_broker import _peer, _recv, broker  # noqa: F401 - broker is a fixture
from zdq.broker.core import BrokerCore
from zdq.transport import protocol as p


def test_purge_marks_every_ready_task_cancelled_and_keeps_the_chunks_for_their_drivers(
    broker: tuple[BrokerCore, str], zmq_ctx: zmq.Context
) -> None:
    core, endpoint = broker
    driver = _peer(zmq_ctx, endpoint, p.Role.DRIVER)
    consumer = _peer(zmq_ctx, endpoint, p.Role.CONSUMER)
    try:
        for seq in (1, 2):
            driver.send_multipart(p.encode(p.Put(seq, 3, f"chunk-{seq}".encode())))
            assert isinstance(_recv(driver), p.Confirm)
        assert core.control.purge_ready() == 6
        assert core.control.purge_ready() == 0  # already cancelled: nothing counted twice
        assert core.control.statistics().ready_tasks == 6  # kept: their drivers' futures settle through them
        consumer.send_multipart(p.encode(p.Fetch(1)))
        told = _recv(consumer)
        assert isinstance(told, p.Cancel) and told.indexes == (0, 1, 2)  # the consumer skips them all
        deliver = _recv(consumer)
        assert isinstance(deliver, p.Deliver)
        consumer.send_multipart(p.encode(p.Done(deliver.chunk_id, 3, b"results")))
        stats = wait_until(lambda: (s := core.control.statistics()).chunks_acked == 1 and s, timeout=10)
        assert sum(stats.round_trips) == 1 and 0 <= stats.round_trip_sum < 5
        assert "round_trips" not in repr(stats)  # kept out of the one-screen repr
    finally:
        driver.close(linger=0)
        consumer.close(linger=0)
