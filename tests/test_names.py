"""Names: one name per queue everywhere, peers shown by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
from distributed import Client

from zdq import ConsumerPool, QueuePool
from zdq.names import (
    consumer_names,
    driver_name,
    queue_name,
    queue_name_of,
    sorted_by_name,
)
from zdq.storage import ChunkMeta, LMDBStorage
from zdq.transport import protocol as p
from zdq.transport.sockets import connect_dealer

from . import test_broker
from .conftest import wait_until
from .tasks import add
from .test_broker import _recv

broker = test_broker.broker  # its fixture: a BrokerCore on a real ROUTER


# -- the naming functions ------------------------------------------------------------------------
def test_a_queue_is_named_after_its_pool_and_index_and_its_directory_gives_the_name_back() -> None:
    assert queue_name("jobs", 3) == "jobs-queue-3"
    assert queue_name_of(os.path.join("/data", queue_name("jobs", 3)) + "/") == "jobs-queue-3"
    assert sorted_by_name(["jobs-queue-10", "jobs-queue-2", "jobs-queue-1"]) == [
        "jobs-queue-1", "jobs-queue-2", "jobs-queue-10",
    ]


def test_every_driver_of_a_pool_gets_a_name_of_its_own_that_says_where_it_runs() -> None:
    first, second = driver_name("names-unit"), driver_name("names-unit")
    assert first != second and first.startswith("names-unit-driver@") and f":{os.getpid()}" in first
    assert second.startswith(first) and second.endswith("#2")


def test_consumers_keep_daskqueues_names() -> None:
    assert consumer_names("GeneralConsumer", 2) == ["GeneralConsumer-0", "GeneralConsumer-1"]


# -- the broker shows peers by name ---------------------------------------------------------
def _hello(ctx: zmq.Context, endpoint: str, role: p.Role, name: bytes) -> zmq.Socket:
    sock = connect_dealer(ctx, endpoint, os.urandom(16))
    if name:
        sock.send_multipart(p.encode(p.Hello(role, name)))
        assert isinstance(_recv(sock, heartbeats=True), p.Heartbeat)
    return sock


def test_a_broker_counts_routed_results_by_driver_name_and_lists_consumers_by_name(
    request: pytest.FixtureRequest, zmq_ctx: zmq.Context, caplog: pytest.LogCaptureFixture
) -> None:
    core, endpoint = request.getfixturevalue("broker")
    driver = _hello(zmq_ctx, endpoint, p.Role.DRIVER, b"jobs-driver@host:1")
    stranger = _hello(zmq_ctx, endpoint, p.Role.DRIVER, b"")  # never says HELLO
    consumer = _hello(zmq_ctx, endpoint, p.Role.CONSUMER, b"GeneralConsumer-3")
    for seq, sender in ((1, driver), (2, stranger)):
        sender.send_multipart(p.encode(p.Put(seq, 2, b"chunk")))
        assert isinstance(_recv(sender), p.Confirm)
    for _ in range(2):
        consumer.send_multipart(p.encode(p.Fetch(1)))
        deliver = _recv(consumer)
        assert isinstance(deliver, p.Deliver)
        consumer.send_multipart(p.encode(p.Done(deliver.chunk_id, 2, b"results")))
    assert isinstance(_recv(driver), p.Results) and isinstance(_recv(stranger), p.Results)
    stats = core.statistics()
    (unnamed,) = [name for name in stats.routed_tasks if name != "jobs-driver@host:1"]
    assert stats.routed_tasks == {"jobs-driver@host:1": 2, unnamed: 2} and unnamed.startswith("unnamed peer ")
    assert stats.consumer_names == ("GeneralConsumer-3",)
    assert "b'" not in repr(stats) and "\\x" not in repr(stats)
    # A consumer that leaves holding a lease is named in the broker's log.
    driver.send_multipart(p.encode(p.Put(3, 1, b"chunk")))
    consumer.send_multipart(p.encode(p.Fetch(1)))
    assert isinstance(_recv(consumer), p.Deliver)
    with caplog.at_level("INFO", logger="zdq.broker.core"):
        consumer.send_multipart(p.encode(p.Bye()))
        wait_until(lambda: "consumer GeneralConsumer-3 left, 1 leased chunks return" in caplog.text, timeout=5)
    for sock in (driver, stranger, consumer):
        sock.close(linger=0)


def test_zdq_inspect_shows_the_queues_by_their_pools_names_in_counting_order(tmp_path: Path) -> None:
    for i in (0, 2, 10):
        storage = LMDBStorage(str(tmp_path / queue_name("jobs", i)))
        storage.open()
        storage.put_many([(ChunkMeta(b"o" * 16, 1, 4), b"chunk")])
        storage.close()
    proc = subprocess.run(
        [sys.executable, "-m", "zdq.cli", "inspect", str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[0] for line in proc.stdout.splitlines()[1:]]
    assert rows == ["jobs-queue-0", "jobs-queue-2", "jobs-queue-10"]


# -- on a cluster ---------------------------------------------------------------------------
def test_a_queue_has_one_name_in_sizes_statistics_and_handles(client: Client) -> None:
    with QueuePool(client, 2, name="names-one") as queue_pool, ConsumerPool(client, queue_pool, n_consumers=2) as consumers:
        names = [queue_name("names-one", i) for i in range(2)]
        assert queue_pool.queue_names == names
        queue_pool.batch_submit([(add, i) for i in range(10)])  # queued, no consumer running yet
        sizes = queue_pool.get_queue_size()
        assert list(sizes) == names and sum(sizes.values()) == 10
        assert [s.name for s in queue_pool.broker_statistics()] == names
        assert [queue_pool[i].name for i in range(2)] == names
        consumers.start()
        consumers.join(timeout=60)
        stats = queue_pool.statistics()
        driver = queue_pool.driver.driver_name
        assert driver.startswith("names-one-driver@") and stats.name == "names-one"
        assert sum(b.routed_tasks[driver] for b in stats.brokers) == 10
        assert all(b.consumer_names == ("GeneralConsumer-0", "GeneralConsumer-1") for b in stats.brokers)
        assert "b'" not in repr(stats)


def test_each_producer_of_a_pool_is_counted_under_its_own_name(client: Client) -> None:
    with (
        QueuePool(client, 1, name="names-two") as owner,
        ConsumerPool(client, owner, start=True),
        QueuePool.attach(client, "names-two") as producer,
    ):
        assert producer.driver.driver_name != owner.driver.driver_name
        assert owner.batch_submit([(add, i) for i in range(3)]).result(timeout=30) == [0, 1, 2]
        assert producer.batch_submit([(add, i) for i in range(5)]).result(timeout=30) == list(range(5))
        routed = wait_until(
            lambda: (r := owner.broker_statistics()[0].routed_tasks) and sum(r.values()) == 8 and r, timeout=10
        )
        assert routed == {owner.driver.driver_name: 3, producer.driver.driver_name: 5}
