"""The broker loop on its own: a real BrokerCore on a real ROUTER, driven by raw DEALER peers."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from zdq.broker import BrokerCore
from zdq.config import settings
from zdq.storage.memory import MemoryStorage
from zdq.transport import protocol as p
from zdq.transport.security import PoolKeys
from zdq.transport.sockets import (
    BrokerLinks,
    bind_router,
    connect_dealer,
    local_endpoint,
    process_context,
    serve_locally,
    stop_serving_locally,
)

from .conftest import wait_until


@pytest.fixture
def broker(zmq_ctx: zmq.Context) -> Iterator[tuple[BrokerCore, str]]:
    sock, endpoint, _ = bind_router(zmq_ctx, "127.0.0.1", max_message_size=1 << 20)
    storage = MemoryStorage()
    storage.open()
    core = BrokerCore("test", sock, storage, settings())
    core.start()
    yield core, endpoint
    core.stop()


def _recv(sock: zmq.Socket, timeout: float = 5.0, *, heartbeats: bool = False) -> p.Message | None:
    """The next message within ``timeout`` (heartbeats and READY notices skipped unless asked for), or None."""
    deadline = time.monotonic() + timeout
    while sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        msg = p.decode(sock.recv_multipart())
        if heartbeats or not isinstance(msg, (p.Heartbeat, p.Ready)):
            return msg
    return None


def _peer(ctx: zmq.Context, endpoint: str, role: p.Role) -> zmq.Socket:
    sock = connect_dealer(ctx, endpoint, os.urandom(16))
    sock.send_multipart(p.encode(p.Hello(role, role.name.encode())))
    assert isinstance(_recv(sock, heartbeats=True), p.Heartbeat)  # the broker greets every peer
    return sock


def _leased(driver: zmq.Socket, consumer: zmq.Socket, n_tasks: int) -> p.Deliver:
    """A chunk of ``n_tasks`` put by ``driver`` (confirmed), then delivered to ``consumer``."""
    driver.send_multipart(p.encode(p.Put(1, n_tasks, b"chunk")))
    assert isinstance(_recv(driver), p.Confirm)
    consumer.send_multipart(p.encode(p.Fetch(1)))
    deliver = _recv(consumer)
    assert isinstance(deliver, p.Deliver)
    return deliver


@pytest.fixture
def peers(broker: tuple[BrokerCore, str], zmq_ctx: zmq.Context) -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    """A driver and a consumer, introduced to the broker."""
    driver = _peer(zmq_ctx, broker[1], p.Role.DRIVER)
    consumer = _peer(zmq_ctx, broker[1], p.Role.CONSUMER)
    yield driver, consumer
    driver.close(linger=0)
    consumer.close(linger=0)


def test_a_done_carrying_credit_brings_the_next_chunk_without_a_fetch(
    broker: tuple[BrokerCore, str], peers: tuple[zmq.Socket, zmq.Socket]
) -> None:
    core, driver, consumer = broker[0], *peers
    for seq in (1, 2, 3):
        driver.send_multipart(p.encode(p.Put(seq, 1, f"chunk-{seq}".encode())))
        assert isinstance(_recv(driver), p.Confirm)
    consumer.send_multipart(p.encode(p.Fetch(1)))
    first = _recv(consumer)
    assert isinstance(first, p.Deliver) and bytes(first.chunk) == b"chunk-1"  # type: ignore[arg-type]
    assert _recv(consumer, 0.3) is None  # one credit, one chunk
    consumer.send_multipart(p.encode(p.Done(first.chunk_id, 1, b"results-1", credit=1)))
    second = _recv(consumer)
    assert isinstance(second, p.Deliver) and bytes(second.chunk) == b"chunk-2"  # type: ignore[arg-type]
    results = _recv(driver)
    assert isinstance(results, p.Results) and results.seq == 1 and bytes(results.results) == b"results-1"  # type: ignore[arg-type]
    # Without credit, a DONE brings nothing more.
    consumer.send_multipart(p.encode(p.Done(second.chunk_id, 1, b"results-2")))
    assert _recv(consumer, 0.3) is None
    assert core.control.statistics().ready_chunks == 1


def test_results_stay_stored_until_the_driver_acknowledges_them(
    broker: tuple[BrokerCore, str], peers: tuple[zmq.Socket, zmq.Socket]
) -> None:
    core, driver, consumer = broker[0], *peers
    deliver = _leased(driver, consumer, 4)
    consumer.send_multipart(p.encode(p.Done(deliver.chunk_id, 4, b"results")))
    assert isinstance(_recv(driver), p.Results)
    wait_until(lambda: core.control.statistics().awaiting_tasks == 4)
    driver.send_multipart(p.encode(p.Rack((deliver.chunk_id,))))
    wait_until(lambda: core.control.statistics().awaiting_tasks == 0)
    stats = core.control.statistics()
    assert stats.leased_chunks == 0 and stats.ready_chunks == 0 and stats.chunks_acked == 1


def test_a_consumer_that_speaks_as_a_driver_gives_back_the_chunks_it_held(
    broker: tuple[BrokerCore, str], peers: tuple[zmq.Socket, zmq.Socket]
) -> None:
    # Reviewer 28b: a peer took a chunk as a consumer, then said HELLO as a driver: its lease was
    # never expired (only consumers are), and the task never ran.
    core, driver, consumer = broker[0], *peers
    _leased(driver, consumer, 2)
    assert core.control.statistics().leased_chunks == 1
    consumer.send_multipart(p.encode(p.Hello(p.Role.DRIVER, b"turncoat")))
    wait_until(lambda: core.control.statistics().ready_chunks == 1, timeout=5)
    assert core.control.statistics().leased_chunks == 0
    honest = _peer(consumer.context, broker[1], p.Role.CONSUMER)
    try:
        honest.send_multipart(p.encode(p.Fetch(1)))
        again = _recv(honest)
        assert isinstance(again, p.Deliver) and bytes(again.chunk) == b"chunk"  # type: ignore[arg-type]
    finally:
        honest.close(linger=0)


def test_results_that_come_before_the_held_back_confirm_replace_it(
    broker: tuple[BrokerCore, str], peers: tuple[zmq.Socket, zmq.Socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    import zdq.broker.intake

    monkeypatch.setattr(zdq.broker.intake, "CONFIRM_DELAY", 3.0)  # a slow consumer is not what this tests
    driver, consumer = peers
    consumer.send_multipart(p.encode(p.Fetch(1)))
    driver.send_multipart(p.encode(p.Put(1, 1, b"chunk")))
    deliver = _recv(consumer)
    assert isinstance(deliver, p.Deliver)
    consumer.send_multipart(p.encode(p.Done(deliver.chunk_id, 1, b"results")))
    results = _recv(driver, 2.0)
    assert isinstance(results, p.Results) and results.seq == 1
    assert _recv(driver, 4.0) is None  # and no CONFIRM follows
    # A burst of chunks is confirmed at once, without waiting for the delay.
    for seq in range(2, 2 + zdq.broker.intake.CONFIRM_BATCH):
        driver.send_multipart(p.encode(p.Put(seq, 1, b"chunk")))
    # In one message: a CONFIRMS naming each chunk.
    confirmed = _recv(driver, 1.0)
    assert isinstance(confirmed, p.Confirms), confirmed
    assert confirmed.seqs == tuple(range(2, 2 + zdq.broker.intake.CONFIRM_BATCH)) and len(set(confirmed.chunk_ids)) == len(confirmed.seqs)
    assert _recv(driver, 0.5) is None


def test_a_consumer_in_the_brokers_process_is_reached_over_inproc_and_served_first(zmq_ctx: zmq.Context) -> None:
    """Brokers and consumers share the process's context: a consumer placed on its broker's worker
    connects over inproc (no keys: ZeroMQ applies no security mechanism to inproc, and only the
    process reaches it) and takes the chunks a remote consumer with credit would otherwise get."""
    keys = PoolKeys.generate()
    ctx = process_context()
    sock, endpoint, admission = bind_router(ctx, "127.0.0.1", max_message_size=1 << 20, keys=keys.server)
    serve_locally(sock, endpoint)
    storage = MemoryStorage()
    storage.open()
    core = BrokerCore("local", sock, storage, settings())
    core.start()
    hello = p.encode(p.Hello(p.Role.CONSUMER, b"local"))
    links = BrokerLinks(ctx, os.urandom(16), hello, keys=keys.client, max_message_size=1 << 20)
    remote = driver = unauthenticated = None
    try:
        assert local_endpoint(zmq_ctx, endpoint) is None  # another context cannot reach inproc
        remote = connect_dealer(zmq_ctx, endpoint, os.urandom(16), keys=keys.client)
        remote.send_multipart(p.encode(p.Hello(p.Role.CONSUMER, b"remote")))
        assert isinstance(_recv(remote, heartbeats=True), p.Heartbeat)
        remote.send_multipart(p.encode(p.Fetch(1)))  # the remote consumer asks first
        wait_until(lambda: len(core._peer_table.with_credit) == 1)
        links.add(endpoint)
        local = links.socks[0]
        assert local.get(zmq.LAST_ENDPOINT).startswith(b"inproc://")
        assert isinstance(_recv(local, heartbeats=True), p.Heartbeat)
        local.send_multipart(p.encode(p.Fetch(1)))
        wait_until(lambda: len(core._peer_table.with_credit) == 2)
        driver = _peer_with(zmq_ctx, endpoint, keys)
        driver.send_multipart(p.encode(p.Put(1, 1, b"first")))
        first = _recv(local)
        assert isinstance(first, p.Deliver) and bytes(first.chunk) == b"first"  # type: ignore[arg-type]
        driver.send_multipart(p.encode(p.Put(2, 1, b"second")))
        second = _recv(remote)
        assert isinstance(second, p.Deliver) and bytes(second.chunk) == b"second"  # type: ignore[arg-type]
        # Results of a chunk done over inproc reach a driver over TCP as ever.
        local.send_multipart(p.encode(p.Done(first.chunk_id, 1, b"results")))
        results = _recv(driver)
        while isinstance(results, (p.Confirm, p.Confirms)):  # the two PUTs' confirms may travel together
            results = _recv(driver)
        assert isinstance(results, p.Results) and results.seq == 1
        # Over TCP the keys are still required.
        unauthenticated = connect_dealer(zmq_ctx, endpoint, os.urandom(16))
        unauthenticated.send_multipart(p.encode(p.Hello(p.Role.CONSUMER, b"intruder")))
        assert _recv(unauthenticated, 1.0, heartbeats=True) is None
        assert core.control.statistics().consumers == 2
    finally:
        for s in (remote, driver, unauthenticated):
            if s is not None:
                s.close(linger=0)
        links.close()
        stop_serving_locally(endpoint)
        core.stop()
        admission.stop()


def _peer_with(ctx: zmq.Context, endpoint: str, keys: PoolKeys) -> zmq.Socket:
    sock = connect_dealer(ctx, endpoint, os.urandom(16), keys=keys.client)
    sock.send_multipart(p.encode(p.Hello(p.Role.DRIVER, b"driver")))
    assert isinstance(_recv(sock, heartbeats=True), p.Heartbeat)
    return sock


def test_results_wait_for_their_driver_while_it_is_away_and_reach_it_when_it_speaks_again(
    broker: tuple[BrokerCore, str], zmq_ctx: zmq.Context
) -> None:
    """A driver that went quiet (paused, GIL-starved, reconnecting) loses nothing: its results
    are kept, not acknowledged away, and sent when it is heard from again."""
    core, endpoint = broker
    identity = os.urandom(16)
    driver = connect_dealer(zmq_ctx, endpoint, identity)
    driver.send_multipart(p.encode(p.Hello(p.Role.DRIVER, b"driver")))
    assert isinstance(_recv(driver, heartbeats=True), p.Heartbeat)
    driver.send_multipart(p.encode(p.Put(1, 3, b"chunk")))
    assert isinstance(_recv(driver), p.Confirm)
    driver.close(linger=0)  # gone for now, without a word
    consumer = _peer(zmq_ctx, endpoint, p.Role.CONSUMER)
    consumer.send_multipart(p.encode(p.Fetch(1)))
    deliver = _recv(consumer)
    assert isinstance(deliver, p.Deliver)
    time.sleep(0.3)  # the TCP disconnection is noticed by the broker's socket
    consumer.send_multipart(p.encode(p.Done(deliver.chunk_id, 3, b"results")))
    wait_until(lambda: core.control.statistics().awaiting_tasks == 3)
    time.sleep(1.0)
    stats = core.control.statistics()
    assert stats.dropped_results == 0 and stats.awaiting_tasks == 3  # kept, not acknowledged away
    back = connect_dealer(zmq_ctx, endpoint, identity)  # the same driver, reconnected
    back.send_multipart(p.encode(p.Heartbeat()))
    results = _recv(back, 5.0)
    assert isinstance(results, p.Results) and results.seq == 1 and bytes(results.results) == b"results"  # type: ignore[arg-type]
    back.send_multipart(p.encode(p.Rack((deliver.chunk_id,))))
    wait_until(lambda: core.control.statistics().awaiting_tasks == 0)
    back.close(linger=0)
    consumer.close(linger=0)


def test_a_sync_reports_the_queue_and_which_of_the_drivers_chunks_it_does_not_hold(
    broker: tuple[BrokerCore, str], peers: tuple[zmq.Socket, zmq.Socket]
) -> None:
    driver, consumer = peers
    for seq in (1, 2):
        driver.send_multipart(p.encode(p.Put(seq, 5, b"chunk")))
        assert isinstance(_recv(driver), p.Confirm)
    consumer.send_multipart(p.encode(p.Fetch(1)))
    assert isinstance(_recv(consumer), p.Deliver)
    driver.send_multipart(p.encode(p.Sync(7, (1, 2, 3))))
    status = _recv(driver)
    assert isinstance(status, p.QueueStatus) and status.token == 7
    assert (status.ready_tasks, status.leased_tasks, status.missing) == (5, 5, (3,))


def test_chunks_leased_to_a_consumer_that_reconnects_go_back_to_the_queue_without_an_attempt(
    broker: tuple[BrokerCore, str], zmq_ctx: zmq.Context
) -> None:
    """A second connection of one identity takes the first one's pipe over, dropping what was
    queued on it: a DELIVER may have vanished. The consumer's HELLO on its new connection returns
    its leases (a DONE from it for them still counts)."""
    core, endpoint = broker
    driver = _peer(zmq_ctx, endpoint, p.Role.DRIVER)
    identity = os.urandom(16)
    first = connect_dealer(zmq_ctx, endpoint, identity)
    first.send_multipart(p.encode(p.Hello(p.Role.CONSUMER, b"c")))
    driver.send_multipart(p.encode(p.Put(1, 2, b"chunk")))
    assert isinstance(_recv(driver), p.Confirm)
    first.send_multipart(p.encode(p.Fetch(1)))
    deliver = _recv(first)
    assert isinstance(deliver, p.Deliver) and deliver.attempt == 1
    first.close(linger=0)
    again = connect_dealer(zmq_ctx, endpoint, identity)
    again.send_multipart(p.encode(p.Hello(p.Role.CONSUMER, b"c")))
    wait_until(lambda: core.control.statistics().ready_chunks == 1)
    again.send_multipart(p.encode(p.Fetch(1)))
    redelivered = _recv(again)
    assert isinstance(redelivered, p.Deliver) and redelivered.chunk_id == deliver.chunk_id
    assert redelivered.attempt == 1  # not counted as a crash: no split, no poison count
    driver.close(linger=0)
    again.close(linger=0)


def test_a_delayed_chunk_is_confirmed_at_once_and_delivered_at_its_time_not_before(
    broker: tuple[BrokerCore, str], peers: tuple[zmq.Socket, zmq.Socket]
) -> None:
    core, driver, consumer = broker[0], *peers
    release = time.time() + 0.5
    driver.send_multipart(p.encode(p.Put(1, 3, b"later", release, 0)))
    assert isinstance(_recv(driver), p.Confirm)
    consumer.send_multipart(p.encode(p.Fetch(2)))  # credit held while it waits
    stats = core.control.statistics()
    assert (stats.delayed_chunks, stats.delayed_tasks, stats.ready_tasks) == (1, 3, 0)
    deliver = _recv(consumer, 5.0)
    arrived = time.time()
    assert isinstance(deliver, p.Deliver) and bytes(deliver.chunk) == b"later"  # type: ignore[arg-type]
    assert release <= arrived < release + 1.0
    assert core.control.statistics().delayed_tasks == 0


def test_a_high_priority_chunk_stored_last_is_delivered_first_and_equal_ones_in_order(
    broker: tuple[BrokerCore, str], peers: tuple[zmq.Socket, zmq.Socket]
) -> None:
    driver, consumer = peers
    for seq, priority in [(1, 0), (2, 0), (3, 5), (4, 5), (5, -1)]:
        driver.send_multipart(p.encode(p.Put(seq, 1, f"chunk-{seq}".encode(), 0.0, priority)))
        assert isinstance(_recv(driver), p.Confirm)
    consumer.send_multipart(p.encode(p.Fetch(5)))
    got = [_recv(consumer) for _ in range(5)]
    assert [bytes(m.chunk) for m in got] == [  # type: ignore[union-attr]
        b"chunk-3", b"chunk-4", b"chunk-1", b"chunk-2", b"chunk-5"
    ]


def test_a_thousand_delayed_chunks_cost_the_broker_loop_no_cpu_while_they_wait(
    broker: tuple[BrokerCore, str], peers: tuple[zmq.Socket, zmq.Socket]
) -> None:
    import psutil

    core, driver, _ = broker[0], *peers
    later = time.time() + 3600
    for seq in range(1, 1001):
        driver.send_multipart(p.encode(p.Put(seq, 1, b"chunk", later + seq, 0)))
    assert wait_until(lambda: core.control.statistics().delayed_chunks == 1000, timeout=10)
    thread_id = core._thread.native_id  # type: ignore[union-attr]

    def cpu() -> float:
        (t,) = [t for t in psutil.Process().threads() if t.id == thread_id]
        return t.user_time + t.system_time

    before = cpu()
    time.sleep(1.0)
    # Its heartbeat ticks and idle polls only (the heartbeat interval bounds each wait): no scan.
    assert cpu() - before < 0.05


def test_a_broker_whose_loop_did_not_run_takes_none_of_its_consumers_as_lost(zmq_ctx: zmq.Context) -> None:
    """A broker stopped with its worker (SIGSTOP) reads nothing; a consumer stopped with it (same
    worker) sent nothing: on SIGCONT the broker used to take that consumer as lost ("missed its
    heartbeats") and put back the chunk it was running. The stall is made here by holding the
    broker's lock (its loop takes it to do anything) past the heartbeat timeout."""
    sock, endpoint, _ = bind_router(zmq_ctx, "127.0.0.1", max_message_size=1 << 20)
    storage = MemoryStorage()
    storage.open()
    core = BrokerCore("deaf", sock, storage, settings(heartbeat_interval="200ms", heartbeat_timeout="1s"))
    core.start()
    driver = consumer = None
    try:
        driver = _peer(zmq_ctx, endpoint, p.Role.DRIVER)
        consumer = _peer(zmq_ctx, endpoint, p.Role.CONSUMER)
        driver.send_multipart(p.encode(p.Put(1, 1, b"chunk")))
        assert isinstance(_recv(driver), p.Confirm)
        consumer.send_multipart(p.encode(p.Fetch(1)))
        assert isinstance(_recv(consumer), p.Deliver)
        with core._lock:  # the broker stalls, and its consumer with it: neither speaks
            time.sleep(3.0)
        for _ in range(12):  # the consumer resumes its heartbeats (it does not know it was stopped)
            time.sleep(0.1)
            consumer.send_multipart(p.encode(p.Heartbeat()))
        stats = core.control.statistics()
        assert stats.consumers == 1 and stats.leased_chunks == 1 and stats.chunks_redelivered == 0, stats
    finally:
        for s in (driver, consumer):
            if s is not None:
                s.close(linger=0)
        core.stop()


# -- several chunks in one PUTS ---------------------------------------------------------------------


def test_each_chunk_of_a_puts_is_stored_confirmed_and_delivered_as_its_own(
    broker: tuple[BrokerCore, str], peers: tuple[zmq.Socket, zmq.Socket]
) -> None:
    core = broker[0]
    driver, consumer = peers
    puts = (
        p.Put(1, 2, b"chunk-one", base=100),
        p.Put(2, 3, b"chunk-two", 0.0, 5, 102, 4_000_000_000.0),  # a priority and an expiry of its own
        p.Put(3, 1, b"chunk-three", base=105),
    )
    driver.send_multipart(p.encode(p.Puts(puts)))
    confirms = _recv(driver)
    assert isinstance(confirms, p.Confirms) and confirms.seqs == (1, 2, 3)
    assert len(set(confirms.chunk_ids)) == 3
    assert core.control.statistics().ready_tasks == 6
    consumer.send_multipart(p.encode(p.Fetch(3)))
    delivered = [_recv(consumer) for _ in range(3)]
    assert all(isinstance(d, p.Deliver) for d in delivered)
    by_id = {d.chunk_id: (d.n_tasks, bytes(d.chunk)) for d in delivered}  # type: ignore[union-attr]
    ids = dict(zip(confirms.seqs, confirms.chunk_ids))
    assert by_id == {ids[1]: (2, b"chunk-one"), ids[2]: (3, b"chunk-two"), ids[3]: (1, b"chunk-three")}
    assert delivered[0].chunk_id == ids[2]  # type: ignore[union-attr]  # its priority went first


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
        wait_until(lambda: core.control.statistics().bad_messages == 3, timeout=10)
        assert core.control.statistics().ready_tasks == 0
        driver.send_multipart(good)  # the broker carries on
        confirms = _recv(driver)
        assert isinstance(confirms, p.Confirms) and confirms.seqs == (1, 2)
    finally:
        driver.close(linger=0)


def test_a_round_too_large_for_a_full_disk_stores_what_fits_and_refuses_only_the_rest(
    zmq_ctx: zmq.Context, small_disk: object
) -> None:
    """One round of 40 PUTs of 200 KB on a 4 MiB disk: its single transaction cannot fit, so the
    broker stores what fits, in order, by halves (each failed transaction stores nothing), and
    refuses only the rest, FULL. A round refused whole failed every chunk of a durable window
    (48 chunks a broker) although most would have fit. The round is given to the broker's
    ``_store`` directly: a round's size over the wire depends on timing."""
    from zdq.storage.lmdb import LMDBStorage

    sock, endpoint, _ = bind_router(zmq_ctx, "127.0.0.1", max_message_size=1 << 22)
    storage = LMDBStorage(os.path.join(str(small_disk), "q"), map_size=1 << 20)
    storage.open()
    core = BrokerCore("q", sock, storage, settings())
    driver = connect_dealer(zmq_ctx, endpoint, b"driver-1")
    try:
        driver.send_multipart(p.encode(p.Hello(p.Role.DRIVER, b"driver-1")))
        assert sock.poll(5000), "the driver's HELLO did not arrive"
        sock.recv_multipart()  # the router knows the driver now (the loop is not running: no answer)
        puts = [(b"driver-1", p.Put(seq, 1, b"z" * 200_000)) for seq in range(1, 41)]
        core._intake.store(puts)
        stored = dict(core._intake.confirms)  # confirmed with the round's commit: the loop is not running
        refused = []
        while len(stored) + len(refused) < 40 and driver.poll(15000):  # bounded by each answer's wait
            msg = p.decode(driver.recv_multipart())
            if isinstance(msg, p.Confirm):
                assert msg.status is p.Status.FULL, msg
                refused.append(msg.seq)
        assert stored and refused and len(stored) + len(refused) == 40
        assert sorted(seq for _, seq in stored) == list(range(1, len(stored) + 1))  # the first ones, in order
        assert storage.counts().ready_chunks == len(stored)
    finally:
        driver.close(linger=0)
        sock.close(linger=0)
        storage.close()


def test_a_retried_naming_a_waiting_chunk_it_never_held_is_counted_and_the_broker_carries_on(
    broker: tuple[BrokerCore, str], zmq_ctx: zmq.Context
) -> None:
    """A forged RETRIED for a chunk waiting in the queue raised KeyError in the lease table, which
    ended the broker's loop (reviewer 32): a queue lost to one message of a key holder. It is a
    bad message; and any failure of zdq's own while handling a message costs that message only."""
    core, endpoint = broker
    driver = _peer(zmq_ctx, endpoint, p.Role.DRIVER)
    forger = _peer(zmq_ctx, endpoint, p.Role.CONSUMER)
    try:
        driver.send_multipart(p.encode(p.Put(1, 1, b"chunk", base=100)))
        confirm = _recv(driver)
        assert isinstance(confirm, (p.Confirm, p.Confirms))
        chunk_id = confirm.chunk_id if isinstance(confirm, p.Confirm) else confirm.chunk_ids[0]
        forger.send_multipart(p.encode(p.Retried(chunk_id, ((100, 1),))))
        wait_until(lambda: core.control.statistics().bad_messages == 1, timeout=10)
        assert core.running and core.control.statistics().ready_tasks == 1

        def broken(ident: bytes, msg: p.Fetch, work: Any) -> None:
            raise KeyError("a bug of zdq's")

        core._routes[p.Fetch] = broken  # a handler with a bug, as the lease table's was
        forger.send_multipart(p.encode(p.Fetch(1)))
        wait_until(lambda: core.control.statistics().bad_messages == 2, timeout=10)
        assert core.running
        driver.send_multipart(p.encode(p.Put(2, 1, b"next", base=101)))  # the broker carries on
        assert isinstance(_recv(driver), (p.Confirm, p.Confirms))
    finally:
        driver.close(linger=0)
        forger.close(linger=0)
