"""The driver's links on their own: a real Driver, real BrokerCores and raw consumer peers over TCP
on 127.0.0.1, in this process (no Dask). The pool's supervisor is played by the test: it tells the
driver when a broker was lost and where it was placed again."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from zdq.broker import BrokerCore
from zdq.config import settings
from zdq.driver import Driver
from zdq.errors import (
    BrokerLost,
    BrokerUnreachable,
    ClosedError,
    ProtocolError,
    SerializationError,
    SubmitTimeout,
    TaskLost,
)
from zdq.serialization import dumps_results
from zdq.storage.memory import MemoryStorage
from zdq.tasks import dumps_task, loads_chunk
from zdq.transport import protocol as p
from zdq.transport.sockets import bind_router, connect_dealer, new_identity

from .conftest import refused_endpoint, wait_until
from .tasks import add

FAST = settings(heartbeat_interval="100ms", heartbeat_timeout="1s", window=2, chunk_size=10)


class _Broker:
    """A real BrokerCore on 127.0.0.1 (``silent``: a bare ROUTER that reads and never answers)."""

    def __init__(self, ctx: zmq.Context[Any], *, silent: bool = False, creator: bytes = b"") -> None:
        self.sock, self.endpoint, _ = bind_router(ctx, "127.0.0.1", max_message_size=1 << 24)
        self.core: BrokerCore | None = None
        if not silent:
            storage = MemoryStorage()
            storage.open()
            self.core = BrokerCore("test", self.sock, storage, FAST, creator=creator)
            self.core.start()

    def stop(self) -> None:
        if self.core is not None:
            self.core.stop()
        elif not self.sock.closed:
            self.sock.close(linger=0)


class _Consumer(threading.Thread):
    """A raw consumer peer: runs each chunk it is delivered and reports it (``early_ack``: it
    acknowledges on receipt and never reports; ``garbage``: it reports results that do not decode;
    ``misplaced``: it reports results that decode, under task ids outside the chunk, as another
    chunk's results replayed would be).
    It sends a heartbeat every 50 ms of quiet, as a consumer does: without them, a test that waits
    a second (the heartbeat timeout) for another broker had its broker drop it under load."""

    def __init__(
        self, ctx: zmq.Context[Any], endpoint: str, *, early_ack: bool = False, garbage: bool = False,
        misplaced: bool = False,
    ) -> None:
        super().__init__(daemon=True)
        self.sock = connect_dealer(ctx, endpoint, new_identity())
        self.early_ack = early_ack
        self.garbage = garbage
        self.misplaced = misplaced
        self.received = 0
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        sock = self.sock
        sock.send_multipart(p.encode(p.Hello(p.Role.CONSUMER, b"raw")))
        sock.send_multipart(p.encode(p.Fetch(1)))
        while not self._halt.is_set():
            if not sock.poll(50):
                sock.send_multipart(p.encode(p.Heartbeat()))
                continue
            msg = p.decode(sock.recv_multipart(copy=False))
            if type(msg) is p.Ready:
                sock.send_multipart(p.encode(p.Fetch(1)))
            if type(msg) is not p.Deliver:
                continue
            self.received += 1
            if self.early_ack:
                sock.send_multipart(p.encode(p.Ack(msg.chunk_id)))
                continue
            base, _, tasks, _ = loads_chunk(msg.chunk)
            values = [task[0](*task[1]) for task in tasks]
            if self.misplaced:
                base += 1_000_000
            results = b"not a pickle" if self.garbage else dumps_results(base, values, {})
            sock.send_multipart(p.encode(p.Done(msg.chunk_id, msg.n_tasks, results, credit=1)))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.sock.close(linger=0)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def parts() -> Iterator[list[Any]]:
    """Whatever a test starts, stopped at its end, last first."""
    started: list[Any] = []
    yield started
    for part in reversed(started):
        part.stop() if not isinstance(part, Driver) else part.close()


def _driver(parts: list[Any], endpoints: list[str], **overrides: Any) -> Driver:
    driver = Driver("test", endpoints, FAST.with_overrides(**overrides))
    driver.start()
    parts.append(driver)
    return driver


def _submit(driver: Driver, n: int) -> list[Any]:
    return [driver.submit_task(dumps_task((add, (i, 1))), timeout=10) for i in range(n)]


def test_chunks_a_lost_broker_never_confirmed_go_to_the_brokers_still_up(ctx: zmq.Context[Any], parts: list[Any]) -> None:
    silent, real = _Broker(ctx, silent=True), _Broker(ctx)
    parts += [silent, real]
    parts.append(_Consumer(ctx, real.endpoint))
    driver = _driver(parts, [silent.endpoint, real.endpoint])
    futures = _submit(driver, 40)
    wait_until(lambda: driver.statistics().chunks_unconfirmed > 0, timeout=10)
    assert not all(f.done() for f in futures)  # those sent to the silent broker wait
    driver.broker_lost(0, memory_lost=True)
    assert [f.result(timeout=10) for f in futures] == [i + 1 for i in range(40)]
    assert driver.statistics().links_down == 1
    # New work skips the broker that is down.
    assert [f.result(timeout=10) for f in _submit(driver, 10)] == [i + 1 for i in range(10)]


def test_a_broker_placed_again_receives_every_chunk_its_predecessor_never_confirmed(
    ctx: zmq.Context[Any], parts: list[Any]
) -> None:
    silent = _Broker(ctx, silent=True)
    parts.append(silent)
    driver = _driver(parts, [silent.endpoint])
    futures: list[Any] = []
    # More than the driver holds while nothing is confirmed: the submitter blocks until recovery.
    submitter = threading.Thread(target=lambda: futures.extend(_submit(driver, 40)))
    submitter.start()
    wait_until(lambda: driver.statistics().chunks_unconfirmed == 2, timeout=10)  # the window is full
    time.sleep(0.3)
    assert submitter.is_alive()
    driver.broker_lost(0, memory_lost=False)
    replacement = _Broker(ctx, creator=driver.identity)
    parts.append(replacement)
    parts.append(_Consumer(ctx, replacement.endpoint))
    driver.reconnect(0, replacement.endpoint)
    submitter.join(10)
    assert [f.result(timeout=10) for f in futures] == [i + 1 for i in range(40)]
    assert driver.statistics().links_down == 0


def test_submitting_blocks_at_the_drivers_bound_and_times_out_when_nothing_is_confirmed(
    ctx: zmq.Context[Any], parts: list[Any]
) -> None:
    silent = _Broker(ctx, silent=True)
    parts.append(silent)
    driver = _driver(parts, [silent.endpoint])
    start = time.monotonic()
    with pytest.raises(SubmitTimeout, match="not confirmed"):
        for _ in range(100_000):
            driver.submit_task(dumps_task((add, (1, 1))), timeout=0.5)
    assert time.monotonic() - start < 5
    stats = driver.statistics()
    # window (2) chunks unconfirmed, and at most chunk-size loose tasks waiting for room.
    assert stats.chunks_unconfirmed <= 2
    assert stats.tasks_submitted <= 2 * 10 + 10


def test_results_that_do_not_unpickle_fail_their_own_tasks_and_the_driver_goes_on(
    ctx: zmq.Context[Any], parts: list[Any]
) -> None:
    broker = _Broker(ctx)
    parts.append(broker)
    driver = _driver(parts, [broker.endpoint])
    bad = _Consumer(ctx, broker.endpoint, garbage=True)
    parts.append(bad)
    futures = _submit(driver, 5)
    for f in futures:  # bounds for a loaded machine (the suite runs beside other work)
        assert isinstance(f.exception(timeout=30), SerializationError)
    bad.stop()
    parts.remove(bad)
    parts.append(_Consumer(ctx, broker.endpoint))
    assert [f.result(timeout=30) for f in _submit(driver, 5)] == [1, 2, 3, 4, 5]
    assert driver.statistics().bad_messages >= 1


def test_results_under_task_ids_outside_their_chunk_fail_its_tasks_and_the_broker_forgets_it(
    ctx: zmq.Context[Any], parts: list[Any]
) -> None:
    """Another chunk's results reported for this one (a peer with the pool's keys replaying them)
    settle this chunk's futures with a ProtocolError naming the queue, and are acknowledged as any
    results are: the broker forgets the chunk, and nothing waits for ever."""
    broker = _Broker(ctx)
    parts.append(broker)
    driver = _driver(parts, [broker.endpoint])
    parts.append(_Consumer(ctx, broker.endpoint, misplaced=True))
    futures = _submit(driver, 5)
    for f in futures:
        error = f.exception(timeout=30)
        assert isinstance(error, ProtocolError)
        assert "from queue test-queue-0 are refused" in str(error) and "outside chunk" in str(error)
    stats = driver.statistics()
    assert stats.bad_messages >= 1 and stats.tasks_failed == 5 and stats.chunks_outstanding == 0
    assert broker.core is not None
    wait_until(lambda: broker.core is not None and broker.core.control.statistics().awaiting_tasks == 0, timeout=10)


def test_done_callbacks_run_off_the_io_thread_and_may_wait_on_the_driver(ctx: zmq.Context[Any], parts: list[Any]) -> None:
    broker = _Broker(ctx)
    parts.append(broker)
    parts.append(_Consumer(ctx, broker.endpoint))
    driver = _driver(parts, [broker.endpoint])
    seen: list[Any] = []

    def callback(fut: Any) -> None:
        # A callback that submits and waits would deadlock on the I/O thread.
        seen.append((threading.current_thread().name, driver.submit_task(dumps_task((add, (41, 1)))).result(timeout=10)))

    (first,) = _submit(driver, 1)
    first.add_done_callback(callback)
    slow = _submit(driver, 1)[0]
    slow.add_done_callback(lambda f: time.sleep(2))
    quick = _submit(driver, 20)
    start = time.monotonic()
    assert [f.result(timeout=10) for f in quick] == [i + 1 for i in range(20)]
    assert time.monotonic() - start < 1.5  # the sleeping callback does not hold results back
    wait_until(lambda: seen, timeout=10)
    assert seen[0][0].startswith("zdq-callbacks-") and seen[0][1] == 42


def test_a_recovered_queue_that_no_longer_holds_an_early_acknowledged_chunk_fails_it_with_task_lost(
    ctx: zmq.Context[Any], parts: list[Any]
) -> None:
    broker = _Broker(ctx)
    parts.append(broker)
    consumer = _Consumer(ctx, broker.endpoint, early_ack=True)
    parts.append(consumer)
    driver = _driver(parts, [broker.endpoint])
    (future,) = _submit(driver, 1)
    wait_until(lambda: consumer.received == 1, timeout=10)
    time.sleep(0.2)  # the ACK reaches the broker
    broker.stop()
    driver.broker_lost(0, memory_lost=False)  # a durable queue: what it confirmed is kept...
    replacement = _Broker(ctx, creator=driver.identity)  # ...except what was acknowledged early
    parts.append(replacement)
    driver.reconnect(0, replacement.endpoint)
    assert isinstance(future.exception(timeout=10), TaskLost)


def test_a_transient_broker_lost_fails_its_confirmed_tasks_with_broker_lost(ctx: zmq.Context[Any], parts: list[Any]) -> None:
    broker = _Broker(ctx)
    parts.append(broker)
    driver = _driver(parts, [broker.endpoint])
    futures = _submit(driver, 10)
    driver.flush(timeout=10)
    driver.broker_lost(0, memory_lost=True)
    for f in futures:
        assert isinstance(f.exception(timeout=10), BrokerLost)


def test_a_driver_says_which_brokers_never_answered_its_hello_and_why(ctx: zmq.Context[Any], parts: list[Any]) -> None:
    real, silent = _Broker(ctx), _Broker(ctx, silent=True)
    parts += [real, silent]
    driver = _driver(parts, [real.endpoint, silent.endpoint, refused_endpoint()])
    started = time.monotonic()
    why = driver.unreached(time.monotonic() + 1.0)
    assert time.monotonic() - started < 3
    assert sorted(why) == [1, 2]
    assert "the broker sent nothing" in why[1]
    assert "refused" in why[2]
    assert driver.unreached(time.monotonic() + 1.0).keys() == {1, 2}
    only_real = _driver(parts, [real.endpoint])
    assert only_real.unreached(time.monotonic() + 5.0) == {}


def test_a_queue_placed_again_where_the_driver_cannot_reach_fails_its_tasks_and_the_others_take_new_work(
    ctx: zmq.Context[Any], parts: list[Any]
) -> None:
    first, second = _Broker(ctx), _Broker(ctx)
    parts += [first, second]
    driver = _driver(parts, [first.endpoint, second.endpoint], connect_timeout=0.5)
    futures = _submit(driver, 40)  # no consumer yet: they wait, confirmed, in both queues
    driver.flush(10)
    on_first = driver.queue_states()[0].awaiting
    assert on_first > 0
    driver.broker_lost(0, memory_lost=False)  # a durable queue: its tasks wait for it
    refused = refused_endpoint()
    driver.reconnect(0, refused, "tcp://10.9.9.9:4242")
    wait_until(lambda: driver.queue_states()[0].state == "unreachable", timeout=5)
    failed = [f for f in futures if f.done()]
    assert len(failed) == on_first
    error = failed[0].exception()
    assert isinstance(error, BrokerUnreachable)
    message = str(error)
    assert f"test-queue-0 at {refused} (worker tcp://10.9.9.9:4242)" in message and "placed again" in message
    assert "refused" in message and "Open TCP from this process" in message
    parts.append(_Consumer(ctx, second.endpoint))
    assert all(f.result(timeout=10) == i + 1 for i, f in enumerate(futures) if f not in failed)
    assert [f.result(timeout=10) for f in _submit(driver, 10)] == [i + 1 for i in range(10)]


def test_when_no_queue_can_be_reached_new_tasks_fail_instead_of_waiting(ctx: zmq.Context[Any], parts: list[Any]) -> None:
    broker = _Broker(ctx)
    parts.append(broker)
    driver = _driver(parts, [broker.endpoint], connect_timeout=0.5)
    driver.broker_lost(0, memory_lost=True)
    driver.reconnect(0, refused_endpoint())
    wait_until(lambda: driver.queue_states()[0].state == "unreachable", timeout=5)
    future = _submit(driver, 1)[0]
    match = "(?s)pool test has no queue this process .* can reach.*none of the brokers' zdq ports"
    with pytest.raises(BrokerUnreachable, match=match):
        future.result(timeout=5)


def test_a_count_waits_for_the_brokers_that_answer_and_gives_none_for_a_silent_one(
    ctx: zmq.Context[Any], parts: list[Any]
) -> None:
    silent, real = _Broker(ctx, silent=True), _Broker(ctx)
    parts += [silent, real]
    driver = _driver(parts, [silent.endpoint, real.endpoint])
    assert driver.queue_status(timeout=5, only=1)[1] is not None  # one broker's count: the other is not awaited
    started = time.monotonic()
    statuses = driver.queue_status(timeout=1)
    assert statuses[0] is None and statuses[1] is not None
    assert time.monotonic() - started < 3  # the timeout (1 s), with room for a loaded machine
    assert driver.queue_states()[1].pending == 0  # the last count is kept for reprs


def test_every_request_to_a_closed_driver_returns_at_once(ctx: zmq.Context[Any], parts: list[Any]) -> None:
    silent = _Broker(ctx, silent=True)
    parts.append(silent)
    driver = _driver(parts, [silent.endpoint])
    futures = _submit(driver, 3)
    driver.close()
    started = time.monotonic()
    with pytest.raises(ClosedError):
        driver.queue_status(timeout=30)
    assert driver.unreached(time.monotonic() + 30) == {}
    assert driver.cancel(futures[0].key, 3, timeout=30) == set()
    driver.broker_lost(0, memory_lost=False)  # a command nobody will run: dropped, not queued forever
    assert time.monotonic() - started < 5
    assert all(isinstance(f.exception(timeout=1), ClosedError) for f in futures)


def test_a_lone_tasks_chunk_a_lost_broker_never_confirmed_goes_to_a_broker_still_up(
    ctx: zmq.Context[Any], parts: list[Any]
) -> None:
    """A task submitted with nothing in flight is packed by its caller (issue 26 point 4): its
    chunk is a record like any other, sent again when its broker is lost unconfirmed."""
    silent, real = _Broker(ctx, silent=True), _Broker(ctx)
    parts += [silent, real]
    parts.append(_Consumer(ctx, real.endpoint))
    driver = _driver(parts, [silent.endpoint, real.endpoint])
    stuck = None
    for i in range(6):  # the round robin sends one of the first lone tasks to the silent broker
        fut = _submit(driver, 1)[0]
        try:
            assert fut.result(timeout=1.0) == 1
        except TimeoutError:
            stuck = fut
            break
    assert stuck is not None, "no lone task went to the silent broker"
    assert driver.statistics().chunks_unconfirmed == 1
    driver.broker_lost(0, memory_lost=True)
    assert stuck.result(timeout=10) == 1
    assert [_submit(driver, 1)[0].result(timeout=10) for _ in range(5)] == [1] * 5  # lone again, to the broker up
    assert driver.statistics().chunks_unconfirmed == 0


def test_the_drivers_eventfd_waker_merges_wakes_and_is_quiet_once_closed(ctx: zmq.Context[Any]) -> None:
    from zdq.transport.sockets import Waker

    waker = Waker(ctx, eventfd=True)
    poller = zmq.Poller()
    poller.register(waker.socket, zmq.POLLIN)
    assert poller.poll(0) == []
    for _ in range(3):
        waker.wake()
    assert [fd for fd, _ in poller.poll(100)] == [waker.socket]
    waker.drain()  # every wake pending, at once
    assert poller.poll(0) == []
    waker.drain()  # nothing pending: no error
    poller.unregister(waker.socket)
    waker.close()
    waker.wake()  # after close: nothing written anywhere
    waker.drain()
    waker.close()


def test_a_silent_broker_is_measured_silent_while_one_that_answers_is_not(ctx: zmq.Context[Any], parts: list[Any]) -> None:
    """What the pool's supervisor and a waiting future are told: silence past the heartbeat
    timeout (1 s here) of a broker that never answers, none of one that does."""
    silent, real = _Broker(ctx, silent=True), _Broker(ctx)
    parts += [silent, real]
    driver = _driver(parts, [silent.endpoint, real.endpoint])
    wait_until(lambda: driver.broker_silence(0) > 1.5, timeout=10)
    assert driver.broker_silence(1) < 0.5


def test_a_driver_whose_io_thread_did_not_run_says_so_and_blames_no_queue_for_that_time(
    ctx: zmq.Context[Any], parts: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """As when the driver's process is stopped (SIGSTOP) or starved: the brokers' messages of that
    time wait unread, so their silence is not theirs. The pool's supervisor, running meanwhile,
    used to read 41 s of silence after a 40 s SIGSTOP of the driver and say "queue ... has been
    silent for 41 s; its worker is alive (busy, or holding the GIL)"."""
    real = _Broker(ctx)
    parts += [real, _Consumer(ctx, real.endpoint)]
    driver = _driver(parts, [real.endpoint])
    release = threading.Event()
    with caplog.at_level("WARNING", logger="zdq.client.driver"):
        held = driver._loop.call(lambda: release.wait(10))  # the I/O thread runs this, and nothing else
        try:
            began = time.monotonic()
            while time.monotonic() - began < 2.5:  # past the heartbeat timeout (1 s), as the supervisor polls
                assert driver.broker_silence(0) < 1.0, "the queue was blamed for the driver's own pause"
                time.sleep(0.05)
        finally:
            release.set()
        held.result(timeout=10)
        wait_until(lambda: any("did not run for" in r.getMessage() for r in caplog.records), timeout=10)
    [said] = [r.getMessage() for r in caplog.records if "did not run for" in r.getMessage()]
    assert "its I/O thread did not run for 2." in said and "this process was stopped, or starved" in said
    assert driver.broker_silence(0) < 1.0
    # The driver goes on: the broker answers, and tasks run.
    assert [f.result(timeout=10) for f in _submit(driver, 3)] == [1, 2, 3]


def test_a_fault_in_taking_results_in_is_not_reported_to_the_tasks_as_results_refused(
    ctx: zmq.Context[Any], parts: list[Any], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only results that do not decode, or are not their chunk's, are refused (their tasks fail
    with that): a fault of the driver's own while taking them in is its own, dropped with the
    message and logged, not dressed up as the broker's results being refused."""
    from zdq.client.driver.outcomes import Outcomes

    def faulty(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("a fault in intake")

    monkeypatch.setattr(Outcomes, "intake", faulty)
    broker = _Broker(ctx)
    parts.append(broker)
    driver = _driver(parts, [broker.endpoint])
    parts.append(_Consumer(ctx, broker.endpoint))
    with caplog.at_level("WARNING", logger="zdq.client.driver"):
        [future] = _submit(driver, 1)
        wait_until(lambda: any("a fault in intake" in r.getMessage() for r in caplog.records), timeout=10)
    assert not any("refused" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert not future.done() or not isinstance(future.exception(timeout=0), ProtocolError)
