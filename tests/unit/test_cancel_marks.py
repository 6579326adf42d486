"""Cancellation marks and "may have started" (issue 23): what storage keeps with a chunk, through
splits and reopenings, and what the broker's cancel questions answer from it. Pure code: a
LeaseTable over MemoryStorage or LMDB files under ``tmp_path``, a recorder for what is sent."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from zdq.broker.leases import LeaseTable
from zdq.broker.peers import Peer
from zdq.broker.questions import CancelQuestions
from zdq.codec.tasks import ITEMS, TaskOptions, dumps_chunk
from zdq.consumer.base import ConsumerBaseClass
from zdq.consumer.runner import Counters, Runner
from zdq.storage import ChunkMeta, LMDBStorage, MemoryStorage, Storage
from zdq.transport import protocol as p

DRIVER, CONSUMER, OTHER = b"d" * 16, b"w" * 16, b"x" * 16
NOW = 1000.0


def _meta(seq: int, n: int) -> ChunkMeta:
    return ChunkMeta(DRIVER, seq, n)


@pytest.fixture(params=["memory", "lmdb"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    s: Storage = MemoryStorage() if request.param == "memory" else LMDBStorage(str(tmp_path / "q"), map_size=1 << 20)
    s.open()
    yield s
    s.close()


def _reopen(path: Path) -> LMDBStorage:
    s = LMDBStorage(str(path), map_size=1 << 20)
    s.open()
    return s


class Asked:
    """A CancelQuestions over ``leases``, with CONSUMER (and OTHER) connected; records what it sends."""

    def __init__(self, leases: LeaseTable) -> None:
        self.leases = leases
        self.sent: list[tuple[bytes, p.Message]] = []
        peers = {CONSUMER: Peer(p.Role.CONSUMER), OTHER: Peer(p.Role.CONSUMER)}
        self.questions = CancelQuestions("q", leases, peers, self._send, timeout=5.0)

    def _send(self, ident: bytes, msg: p.Message) -> bool:
        self.sent.append((ident, msg))
        return True

    def take(self) -> list[tuple[bytes, p.Message]]:
        sent, self.sent = self.sent, []
        return sent


def test_a_chunk_whose_consumer_died_holding_it_may_have_started_and_no_cancel_says_otherwise(storage: Storage) -> None:
    leases = LeaseTable(storage)
    asked = Asked(leases)
    chunk_id = leases.put([(_meta(1, 3), b"c")])[0]
    leases.lease(CONSUMER, NOW)
    returned, _ = leases.expire(CONSUMER)
    assert returned == [chunk_id] and storage.is_ready(chunk_id)
    assert storage.may_have_started(chunk_id)
    asked.questions.ask(DRIVER, p.Cancel(4, chunk_id, 1, (0, 1, 2)), NOW)
    assert asked.take() == [(DRIVER, p.Cancelled(4, ()))]  # ready, yet none is "never started"
    assert storage.cancelled(chunk_id) == frozenset()
    leases.lease(OTHER, NOW)  # leased again: its new consumer is not asked either
    asked.questions.ask(DRIVER, p.Cancel(5, chunk_id, 1, (2,)), NOW)
    assert asked.take() == [(DRIVER, p.Cancelled(5, ()))]


def test_a_consumer_that_reconnects_may_have_started_what_it_held(storage: Storage) -> None:
    leases = LeaseTable(storage)
    chunk_id = leases.put([(_meta(1, 2), b"c")])[0]
    leases.lease(CONSUMER, NOW)
    assert leases.reclaim(CONSUMER) == [chunk_id]
    assert storage.may_have_started(chunk_id)


def test_a_split_gives_each_part_its_tasks_mark_and_whether_it_may_have_started(storage: Storage) -> None:
    a = storage.put_many([(_meta(1, 3), b"a")])[0]
    storage.cancel(a, [1])
    storage.lease()
    storage.note_started([a])
    parts = storage.split(a, [(_meta(1, 1), b"a0"), (_meta(1, 1), b"a1"), (_meta(1, 1), b"a2")])
    assert [storage.cancelled(i) for i in parts] == [frozenset(), {0}, frozenset()]
    assert all(storage.may_have_started(i) for i in parts) and not storage.may_have_started(a)
    storage.ack_many(parts)
    assert not any(storage.may_have_started(i) for i in parts)


def test_marks_and_may_have_started_survive_a_reopen_with_split_parts(tmp_path: Path) -> None:
    path = tmp_path / "q"
    first = _reopen(path)
    a, b = first.put_many([(_meta(1, 3), b"a"), (_meta(2, 2), b"b")])
    first.cancel(a, [0, 2])
    first.lease()
    parts = first.split(a, [(_meta(1, 1), b"a0"), (_meta(1, 1), b"a1"), (_meta(1, 1), b"a2")])
    first.note_started([b])
    first.cancel(b, [1])
    first.close()
    again = _reopen(path)
    try:
        assert [again.cancelled(i) for i in parts] == [{0}, frozenset(), {0}]
        assert again.meta(a) is None
        assert again.may_have_started(b) and again.cancelled(b) == {1}
        assert not any(again.may_have_started(i) for i in parts)
    finally:
        again.close()


def test_a_chunk_leased_when_a_durable_queue_stopped_may_have_started_once_reopened(tmp_path: Path) -> None:
    path = tmp_path / "q"
    first = _reopen(path)
    a, b = first.put_many([(_meta(1, 2), b"a"), (_meta(2, 2), b"b")])
    first.lease()  # a: handed to a consumer of this broker, which may run it after the broker died
    first.commit(force=True)  # the lease mark is written (held back up to 50 ms otherwise)
    first.close()
    again = _reopen(path)
    try:
        assert again.is_ready(a) and again.may_have_started(a)
        assert not again.may_have_started(b)
    finally:
        again.close()


def test_marks_of_a_split_that_could_not_be_stored_are_dropped_with_it(tmp_path: Path) -> None:
    s = _reopen(tmp_path / "q")
    try:
        a = s.put_many([(_meta(1, 2), b"a")])[0]
        s.cancel(a, [0])
        s.lease()
        with pytest.raises(TypeError):  # LMDB refuses a payload that is not bytes: nothing is written
            s.split(a, [(_meta(1, 1), b"a0"), (_meta(1, 1), object())])
        assert not [held for held in s._pending if held[0] == "cancels"]
        assert s.cancelled(a) == {0} and s.is_leased(a)
        # The ids it would have used go to the next chunks, which carry no stale mark.
        b = s.put_many([(_meta(2, 1), b"b"), (_meta(3, 1), b"c")])
        s.close()
        s = _reopen(tmp_path / "q")
        assert [s.cancelled(i) for i in b] == [frozenset(), frozenset()]
        assert s.cancelled(a) == {0}
    finally:
        s.close()


# -- a consumer whose broker is placed again ---------------------------------------------------


class Recorder(ConsumerBaseClass):
    """Records the items it is given (ITEMS chunks: ``process_item(item)``)."""

    def __init__(self) -> None:
        super().__init__(name="recorder")
        self.seen: list[object] = []

    def process_item(self, item: object) -> object:
        self.seen.append(item)
        return item


def _runner(handler: Recorder, sent: list[tuple[int, p.Message]]) -> Runner:
    fetching = threading.Event()
    fetching.set()
    return Runner(
        "c", handler, lambda broker, msg: sent.append((broker, msg)), threading.Event(), fetching, Counters(),
        max_concurrency=1, defaults=TaskOptions(), crash_attempts=3, payload_key=None, queues=["q0", "q1"],
    )


def _deliver(chunk_id: int, items: list[object]) -> p.Deliver:
    return p.Deliver(chunk_id, len(items), 1, dumps_chunk(0, items, None, ITEMS))


def test_what_a_broker_placed_again_had_delivered_never_starts_and_a_copy_its_successor_delivers_runs() -> None:
    handler, sent = Recorder(), []
    runner = _runner(handler, sent)
    for chunk_id, broker in ((7, 0), (8, 1)):
        runner.received(chunk_id, broker)
    runner.broker_replaced(0)
    runner.received(7, 0)  # the new broker 0 delivers chunk 7 again (from its storage)
    runner.execute(0, _deliver(7, ["old"]))  # the copy the broker before had given: dropped, unreported
    runner.execute(1, _deliver(8, ["other queue"]))
    runner.execute(0, _deliver(7, ["new"]))
    assert handler.seen == ["other queue", "new"]
    assert [(broker, type(msg).__name__, msg.chunk_id) for broker, msg in sent] == [(1, "Done", 8), (0, "Done", 7)]


def test_a_chunk_running_when_its_broker_is_placed_again_starts_no_more_tasks_and_reports_nothing() -> None:
    sent: list[tuple[int, p.Message]] = []
    runner: Runner

    class ReplacedMidway(Recorder):
        def process_item(self, item: object) -> object:
            if item == "first":
                runner.broker_replaced(0)  # told while this chunk runs
            return super().process_item(item)

    handler = ReplacedMidway()
    runner = _runner(handler, sent)
    runner.received(5, 0)
    runner.execute(0, _deliver(5, ["first", "second", "third"]))
    assert handler.seen == ["first"] and sent == []
