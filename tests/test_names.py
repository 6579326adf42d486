"""Names and reprs: one name per queue everywhere, peers by name, reprs that never wait."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq
from distributed import Client, LocalCluster

from zdq import ConsumerPool, QueuePool
from zdq.errors import ClosedError
from zdq.names import (
    queue_name,
)
from zdq.storage import ChunkMeta, LMDBStorage
from zdq.transport import protocol as p
from zdq.transport.sockets import connect_dealer

from . import test_broker
from .conftest import stop_process, wait_until
from .tasks import add, fail
from .test_broker import _recv

broker = test_broker.broker  # its fixture: a BrokerCore on a real ROUTER

#: A repr is local: well under this, whatever the cluster does.
FAST_REPR = 0.05


def _timed(fn: Callable[[], str]) -> tuple[str, float]:
    start = time.perf_counter()
    text = fn()
    return text, time.perf_counter() - start


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
    stats = core.control.statistics()
    (unnamed,) = [name for name in stats.routed_tasks if name != "jobs-driver@host:1"]
    assert stats.routed_tasks == {"jobs-driver@host:1": 2, unnamed: 2} and unnamed.startswith("unnamed peer ")
    assert stats.consumer_names == ("GeneralConsumer-3",)
    # No bytes literal (a hex name ending in "b" before its closing quote is not one).
    assert re.search(r"(?<![0-9a-f])b'", repr(stats)) is None and "\\x" not in repr(stats)
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
def test_a_queue_has_one_name_in_reprs_sizes_statistics_and_handles(client: Client) -> None:
    with QueuePool(client, 2, name="names-one") as queue_pool, ConsumerPool(client, queue_pool, n_consumers=2) as consumers:
        names = [queue_name("names-one", i) for i in range(2)]
        assert queue_pool.queue_names == names
        queue_pool.batch_submit([(add, i) for i in range(10)])  # queued, no consumer running yet
        sizes = queue_pool.get_queue_size()
        assert list(sizes) == names and sum(sizes.values()) == 10
        assert [s.name for s in queue_pool.broker_statistics()] == names
        assert [queue_pool[i].name for i in range(2)] == names
        text = repr(queue_pool)
        assert text.splitlines()[0] == (
            "QueuePool names-one: 2 transient queues, running, 2 consumers in this process"
        ), text
        assert "tasks: 10 submitted, 0 done, 0 failed" in text
        for name in names:
            assert f"\t{name}: up, {sizes[name]} awaiting results, {sizes[name]} pending (counted" in text, text
            assert repr(queue_pool[names.index(name)]).startswith(f"<QueueHandle {name}: up, {sizes[name]} awaiting")
        consumers.start()
        consumers.join(timeout=60)
        stats = queue_pool.statistics()
        driver = stats.driver.name
        assert driver == queue_pool.driver.driver_name and driver.startswith("names-one-driver@")
        assert stats.name == "names-one"
        assert sum(b.routed_tasks[driver] for b in stats.brokers) == 10
        assert all(b.consumer_names == ("GeneralConsumer-0", "GeneralConsumer-1") for b in stats.brokers)
        assert "b'" not in repr(stats)
        processed = "".join(f"\n\t{name}: {len(r)} processed" for name, r in consumers.results().items())
        assert repr(consumers) == "ConsumerPool of names-one: 2 GeneralConsumer consumers, idle (call start())" + processed


def test_each_producer_of_a_pool_is_counted_under_its_own_name(client: Client) -> None:
    with (
        QueuePool(client, 1, name="names-two") as owner,
        ConsumerPool(client, owner, start=True),
        QueuePool.attach(client, "names-two") as producer,
    ):
        assert producer.driver.driver_name != owner.driver.driver_name
        assert owner.batch_submit([(add, i) for i in range(3)]).result(timeout=30) == [0, 1, 2]
        assert producer.batch_submit([(add, i) for i in range(5)]).result(timeout=30) == list(range(5))
        assert repr(producer).splitlines()[0].endswith("attached to its owner's queues, 0 consumers in this process")
        routed = wait_until(
            lambda: (r := owner.broker_statistics()[0].routed_tasks) and sum(r.values()) == 8 and r, timeout=10
        )
        assert routed == {owner.driver.driver_name: 3, producer.driver.driver_name: 5}


def test_reprs_return_at_once_while_a_broker_is_stopped(client: Client) -> None:
    with QueuePool(client, 2, name="names-stop") as queue_pool, ConsumerPool(client, queue_pool, n_consumers=2) as consumers:
        future = queue_pool.submit(add, 1)
        batch = queue_pool.batch_submit([(add, i) for i in range(4)])
        queue_pool.flush(timeout=30)
        pid = int(queue_pool[0].pid().result(timeout=10))
        stop_process(pid)  # stopped, every thread of it: not merely sent SIGSTOP
        try:
            for obj in (queue_pool, queue_pool[0], queue_pool[1], consumers, future, batch):
                text, took = _timed(lambda obj=obj: repr(obj))
                assert took < FAST_REPR, f"repr took {took * 1000:.0f} ms: {text}"
            assert "names-stop-queue-0: up" in repr(queue_pool)
        finally:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.cluster
def test_reprs_return_at_once_when_the_cluster_is_gone() -> None:
    cluster = LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", worker_dashboard_address=None
    )
    client = Client(cluster)
    queue_pool = QueuePool(client, 1, name="names-gone")
    consumers = ConsumerPool(client, queue_pool)
    future = queue_pool.submit(add, 1)
    try:
        client.close()
        cluster.close()
        # At once, while the pool's supervisor may or may not have seen the client go.
        for obj in (queue_pool, queue_pool[0], consumers, future):
            text, took = _timed(lambda obj=obj: repr(obj))
            assert took < FAST_REPR, f"repr took {took * 1000:.0f} ms: {text}"
        assert re.match(r"QueuePool names-gone: 1 transient queue, (running|stopped)\b", repr(queue_pool)), repr(queue_pool)
        # Then once it has (its pending task failed, saying so): the state it then says is certain.
        # Which of the two the lines above saw is a race with the supervisor's next look, which a
        # loaded machine decides, so the wait is on that state, not on how long a look takes.
        with pytest.raises(ClosedError, match="names-gone was closed"):
            future.result(timeout=60)  # bound: the supervisor noticing the closed client
        for obj in (queue_pool, queue_pool[0], consumers, future):
            text, took = _timed(lambda obj=obj: repr(obj))
            assert took < FAST_REPR, f"repr took {took * 1000:.0f} ms: {text}"
        assert repr(queue_pool).startswith("QueuePool names-gone: 1 transient queue, stopped"), repr(queue_pool)
    finally:
        consumers.close()
        queue_pool.close()
    assert repr(queue_pool) == "QueuePool names-gone: 1 transient queue, closed"
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("zdq-")], timeout=15)


def test_a_pools_repr_counts_its_done_failed_and_cancelled_tasks_apart(client: Client) -> None:
    # "100000 done, 100000 failed" was said of 100000 tasks that all failed (reviewer 23): done
    # counted every settled task.
    with QueuePool(client, 1) as queue_pool:
        ok, bad = queue_pool.submit(add, 1), queue_pool.submit(fail, "no")
        later = queue_pool.submit(add, 2, delay=600)
        assert later.cancel()
        with ConsumerPool(client, queue_pool, n_consumers=1, start=True):
            assert ok.result(timeout=60) == 1 and bad.exception(timeout=60) is not None
        assert "tasks: 3 submitted, 1 done, 1 failed, 1 cancelled" in repr(queue_pool), repr(queue_pool)
