"""A consumer's credit at its brokers (prefetch is a bound over all of them), and its lifecycle.

Without a cluster: :class:`~zdq.consumer.link.Credit` is driven with an explicit clock over real
inproc sockets, and a whole :class:`~zdq.consumer.Consumer` runs in this process against fake
brokers (ROUTER sockets that the test answers by hand).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from distributed import Client

from zdq.config import settings
from zdq.consumer import Consumer, GeneralConsumer
from zdq.consumer.link import _PARKED, Credit
from zdq.errors import PlacementError
from zdq.serialization import loads_results
from zdq.tasks import TASKS, dumps_chunk
from zdq.transport import protocol as p

from .conftest import wait_until

T0 = 1000.0  # the explicit clock of the Credit tests


class Brokers:
    """``n`` ROUTERs, each with a consumer DEALER connected: what Credit sends lands here."""

    def __init__(self, ctx: zmq.Context[Any], n: int) -> None:
        self.routers: list[zmq.Socket[Any]] = []
        self.dealers: list[zmq.Socket[Any]] = []
        for i in range(n):
            router = ctx.socket(zmq.ROUTER)
            router.linger = 0
            router.bind(f"inproc://credit-test-{id(self)}-{i}")
            dealer = ctx.socket(zmq.DEALER)
            dealer.linger = 0
            dealer.connect(f"inproc://credit-test-{id(self)}-{i}")
            self.routers.append(router)
            self.dealers.append(dealer)

    def fetches(self) -> list[list[int]]:
        """The credits each broker received since the last call (FETCH 0 withdraws)."""
        out: list[list[int]] = []
        for router in self.routers:
            got: list[int] = []
            while router.poll(20):
                msg = p.decode(router.recv_multipart()[1:])
                assert isinstance(msg, p.Fetch)
                got.append(msg.credit)
            out.append(got)
        return out

    def close(self) -> None:
        for sock in self.routers + self.dealers:
            sock.close(linger=0)


@pytest.fixture
def brokers4(zmq_ctx: zmq.Context[Any]) -> Iterator[Brokers]:
    brokers = Brokers(zmq_ctx, 4)
    yield brokers
    brokers.close()


def credit_over(brokers: Brokers, prefetch: int, start: int = 0) -> tuple[Credit, threading.Event]:
    fetching = threading.Event()
    fetching.set()
    return Credit(brokers.dealers, len(brokers.dealers), prefetch, fetching, start), fetching


def deliver(credit: Credit, i: int, chunk_id: int) -> None:
    """What the I/O loop does with a DELIVER from broker ``i`` that it keeps."""
    assert credit.credit[i] == 1
    credit.credit[i] = 0
    credit.outstanding -= 1
    credit.in_flight += 1
    credit.held[i].add(chunk_id)
    credit.asked_at[i] = 0.0


def test_an_idle_consumer_asks_only_prefetch_brokers_starting_where_its_rotation_says(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=1, start=2)
    assert credit.ask(T0, eager=False) > T0  # at the bound: the next look is when credit could move
    assert brokers4.fetches() == [[], [], [1], []]
    assert credit.ask(T0 + 0.001, eager=False) and brokers4.fetches() == [[], [], [], []]  # nothing more
    two, _ = credit_over(brokers4, prefetch=2, start=3)
    two.ask(T0, eager=False)
    assert brokers4.fetches() == [[1], [], [], [1]]  # wraps around


def test_with_no_more_brokers_than_prefetch_every_broker_gets_credit(zmq_ctx: zmq.Context[Any]) -> None:
    brokers = Brokers(zmq_ctx, 2)
    try:
        credit, _ = credit_over(brokers, prefetch=2, start=1)
        credit.ask(T0, eager=False)
        assert brokers.fetches() == [[1], [1]] and credit.outstanding == 2
        deliver(credit, 0, 7)  # one chunk in hand: room for one more, and broker 1 still has credit
        credit.ask(T0 + 0.01, eager=False)
        assert brokers.fetches() == [[], []]
        assert credit.in_flight + credit.outstanding == 2
        # Nothing moves by itself: every broker can hold credit, so none waits for it.
        assert credit.ask(T0 + 10, eager=False) == float("inf") and brokers.fetches() == [[], []]
    finally:
        brokers.close()


def test_held_chunks_count_against_the_bound(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=2, start=0)
    credit.ask(T0, eager=False)
    assert brokers4.fetches() == [[1], [1], [], []]
    deliver(credit, 0, 1)
    deliver(credit, 1, 2)
    credit.ask(T0 + 0.01, eager=False)
    assert brokers4.fetches() == [[], [], [], []]  # two in hand: no more credit anywhere


def test_a_busy_consumer_holds_its_next_request_back_for_a_done_to_carry(zmq_ctx: zmq.Context[Any]) -> None:
    brokers = Brokers(zmq_ctx, 2)
    try:
        credit, _ = credit_over(brokers, prefetch=2, start=0)
        credit.ask(T0, eager=False)
        brokers.fetches()
        for i in (0, 1):
            deliver(credit, i, i)
            credit.fetch_at[i] = T0 + 0.001  # as the I/O loop sets it on a DELIVER
        credit.held[1].clear()  # chunk 1 is done (its DONE carried no credit): one free place
        credit.in_flight -= 1
        assert credit.ask(T0 + 0.0005, eager=False) == pytest.approx(T0 + 0.001)
        assert brokers.fetches() == [[], []]  # held back: the next DONE may carry it
        assert credit.ask(T0 + 0.0005, eager=True) == float("inf")  # unless chunks run long
        assert brokers.fetches() == [[1], []]  # the next in rotation
    finally:
        brokers.close()


def test_a_busy_consumer_asks_a_broker_it_is_not_waiting_on_at_once(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=2, start=0)
    credit.ask(T0, eager=False)
    brokers4.fetches()
    for i in (0, 1):
        deliver(credit, i, i)
        credit.fetch_at[i] = T0 + 0.001
    credit.held[1].clear()
    credit.in_flight -= 1
    credit.ask(T0 + 0.0005, eager=False)
    assert brokers4.fetches() == [[], [], [1], []]


def test_ready_from_a_broker_gets_it_credit_when_there_is_room(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=2, start=0)
    credit.ask(T0, eager=False)
    deliver(credit, 0, 1)
    deliver(credit, 1, 2)
    credit.held[0].clear()
    credit.in_flight -= 1  # chunk 1 done, its DONE carried no credit
    brokers4.fetches()
    credit.on_ready(3, T0 + 0.01)
    assert brokers4.fetches() == [[], [], [], [1]]
    credit.on_ready(3, T0 + 0.02)  # it has credit now: nothing more
    assert brokers4.fetches() == [[], [], [], []]


def test_ready_moves_credit_parked_at_an_idle_broker_after_a_while(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=1, start=0)
    credit.ask(T0, eager=False)
    assert brokers4.fetches() == [[1], [], [], []]
    credit.on_ready(2, T0 + 0.01)  # broker 0 might still be delivering: not yet
    assert credit.ask(T0 + 0.01, eager=False) == pytest.approx(T0 + _PARKED)
    assert brokers4.fetches() == [[], [], [], []]
    credit.ask(T0 + _PARKED + 0.001, eager=False)
    assert brokers4.fetches() == [[0], [], [1], []]  # withdrawn from 0, given to 2
    assert credit.credit == [0, 0, 1, 0] and credit.outstanding == 1
    # Brokers that say READY are listened to: credit no longer wanders by itself.
    assert credit.ask(T0 + 10, eager=False) == float("inf") and brokers4.fetches() == [[], [], [], []]


def test_ready_at_the_bound_with_every_place_in_hand_waits_for_a_done(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=1, start=0)
    credit.ask(T0, eager=False)
    deliver(credit, 0, 1)
    brokers4.fetches()
    credit.on_ready(3, T0 + 0.01)
    assert credit.ask(T0 + 1, eager=False) == float("inf")
    assert brokers4.fetches() == [[], [], [], []]
    credit.held[0].clear()
    credit.in_flight -= 1  # the chunk is done: the broker that said READY is asked first
    credit.ask(T0 + 1.01, eager=False)
    assert brokers4.fetches() == [[], [], [], [1]]


def test_without_ready_parked_credit_visits_every_broker_in_turn(brokers4: Brokers) -> None:
    credit, _ = credit_over(brokers4, prefetch=1, start=0)
    now = T0
    credit.ask(now, eager=False)
    visited = [i for i, got in enumerate(brokers4.fetches()) if got == [1]]
    for _ in range(3):
        now += _PARKED + 0.001
        credit.ask(now, eager=False)
        got = brokers4.fetches()
        assert sum(c == [0] for c in got) == 1 and sum(c == [1] for c in got) == 1  # one move at a time
        visited += [i for i, c in enumerate(got) if c == [1]]
        assert credit.outstanding == 1 and sum(credit.credit) == 1
    assert visited == [0, 1, 2, 3]


def test_a_cancelled_consumer_withdraws_its_credit(brokers4: Brokers) -> None:
    credit, fetching = credit_over(brokers4, prefetch=2, start=1)
    credit.ask(T0, eager=False)
    brokers4.fetches()
    fetching.clear()
    assert credit.ask(T0 + 0.01, eager=False) == float("inf")
    assert brokers4.fetches() == [[], [0], [0], []] and credit.outstanding == 0


# -- a whole consumer against fake brokers -------------------------------------------------------


class FakeBroker:
    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.peer = b""
        self.credit = 0

    def recv(self, timeout: float = 0.02) -> list[p.Message]:
        """Messages from the consumer (heartbeats and HELLO left out), keeping ``credit`` as a
        broker would."""
        out: list[p.Message] = []
        while self.sock.poll(int(timeout * 1000)):
            frames = self.sock.recv_multipart()
            self.peer = frames[0]
            msg = p.decode(frames[1:])
            if isinstance(msg, p.Fetch):
                self.credit = self.credit + msg.credit if msg.credit else 0
            elif isinstance(msg, p.Done):
                self.credit += msg.credit
            if not isinstance(msg, (p.Heartbeat, p.Hello)):
                out.append(msg)
            timeout = 0.005
        return out

    def send(self, msg: p.Message) -> None:
        self.sock.send_multipart([self.peer, *p.encode(msg)])

    def deliver(self, chunk_id: int, seconds: float) -> None:
        self.send(p.Deliver(chunk_id, 1, 1, dumps_chunk(chunk_id, [(time.sleep, (seconds,))], None, TASKS)))


@pytest.fixture
def fake_brokers(zmq_ctx: zmq.Context[Any]) -> Iterator[list[FakeBroker]]:
    brokers = [FakeBroker(zmq_ctx) for _ in range(3)]
    yield brokers
    for broker in brokers:
        broker.sock.close(linger=0)


def a_consumer(prefetch: int) -> Consumer:
    pool = settings(prefetch=prefetch, heartbeat_interval="100ms", heartbeat_timeout="2s")
    return Consumer("test-consumer", b"c" * 16, GeneralConsumer, pool)


def test_a_deliver_beyond_the_bound_is_given_back_and_credit_rides_on_done(fake_brokers: list[FakeBroker]) -> None:
    consumer = a_consumer(prefetch=1)
    consumer.start([b.endpoint for b in fake_brokers])
    try:
        # Whichever broker has the credit delivers a chunk that runs for a while.
        first = wait_until(lambda: [b for b in fake_brokers if b.recv() and b.credit], timeout=5)[0]
        first.deliver(1, 0.5)
        wait_until(lambda: consumer.statistics().tasks_in_flight == 1, timeout=5)
        others = [b for b in fake_brokers if b is not first]
        assert all(b.credit == 0 for b in others), "prefetch 1: no other broker may have credit"
        # A DELIVER beyond the bound (as one that raced a withdrawal) comes straight back.
        for b in others:
            b.recv()
        others[0].deliver(2, 0.0)
        returned = wait_until(lambda: [m for m in others[0].recv() if isinstance(m, p.Return)], timeout=5)
        assert returned == [p.Return(2)]
        # The first chunk's DONE carries the request for the next one.
        done = wait_until(lambda: [m for m in first.recv() if isinstance(m, p.Done)], timeout=5)[0]
        assert done.chunk_id == 1 and done.credit == 1
        _, values, errors = loads_results(done.results)
        assert values == [None] and not errors
        stats = consumer.statistics()
        assert stats.chunks_received == 1 and stats.tasks_done == 1 and stats.tasks_in_flight == 0
        assert consumer.health() == (True, "running")
    finally:
        consumer.stop()
    assert consumer.health() == (True, "stopped")


def test_a_consumer_without_ready_from_its_brokers_still_asks_every_one_in_turn(
    fake_brokers: list[FakeBroker],
) -> None:
    consumer = a_consumer(prefetch=1)
    consumer.start([b.endpoint for b in fake_brokers])
    asked: set[int] = set()
    try:
        deadline = time.monotonic() + 5
        while len(asked) < 3 and time.monotonic() < deadline:
            for i, broker in enumerate(fake_brokers):
                broker.recv(0.005)
                if broker.credit:
                    asked.add(i)
        assert asked == {0, 1, 2}
    finally:
        consumer.stop()


def test_a_consumer_that_cannot_open_its_sockets_says_why_and_reports_itself_unhealthy() -> None:
    consumer = a_consumer(prefetch=1)
    assert consumer.health() == (True, "not started")
    with pytest.raises(PlacementError, match="could not open its sockets") as info:
        consumer.start(["tcp://no-such-host-or-port"])
    assert isinstance(info.value.__cause__, zmq.ZMQError)
    healthy, why = consumer.health()
    assert not healthy and "could not open its sockets" in why
    assert not [t for t in threading.enumerate() if t.name.endswith("-test-consumer")]


def test_a_consumer_whose_io_thread_stopped_on_its_own_is_unhealthy(fake_brokers: list[FakeBroker]) -> None:
    consumer = a_consumer(prefetch=1)
    consumer.start([b.endpoint for b in fake_brokers])
    try:
        consumer.cancel()
        assert consumer.health() == (True, "cancelled")
        assert consumer._link is not None
        consumer._link._alive = lambda: False  # as when Dask released the actor
        _, why = wait_until(lambda: not consumer.health()[0] and consumer.health(), timeout=5)
        assert "stopped on its own" in why and "released" in why
    finally:
        consumer.stop()


# -- on a cluster, with real brokers ---------------------------------------------------------------


def test_a_consumer_of_more_queues_than_its_prefetch_holds_no_more_than_prefetch_and_serves_them_all(
    client: Client,
) -> None:
    from zdq import ConsumerPool, QueuePool

    from .tasks import sleep

    with QueuePool(client, 4) as queue_pool, ConsumerPool(client, queue_pool, n_consumers=1, prefetch=1) as consumers:
        batch = queue_pool.batch_submit([(sleep, 0.02) for _ in range(40)], batch_size=1)  # spread over 4 queues
        queue_pool.flush()
        consumers.start()
        held: list[int] = []
        leased: list[int] = []
        while not batch.done():
            held.append(consumers.statistics()[0].tasks_in_flight)
            leased.append(sum(s.leased_chunks for s in queue_pool.broker_statistics()))
            time.sleep(0.01)
        assert batch.result(timeout=60) == [0.02] * 40
        assert max(held) <= 1, held
        # The brokers are read one after another, and a DONE may still be on its way to one broker
        # while the next has leased its chunk: at most one more. It used to hold one of every queue (4).
        assert max(leased) <= 2, leased
        assert all(s.chunks_acked == 10 for s in queue_pool.broker_statistics())
        assert consumers.statistics()[0].tasks_done == 40
