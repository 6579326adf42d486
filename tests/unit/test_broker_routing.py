"""The broker's pure parts without its loop: where results go, cancel questions, peers, the route table.

Each runs over a :class:`~zdq.broker.leases.LeaseTable` on :class:`~zdq.storage.memory.MemoryStorage`
with a recorder for what the broker would send; nothing here opens a socket.
"""

from __future__ import annotations

import pytest

from zdq.broker.core import BrokerCore, BrokerCounters
from zdq.broker.leases import LeaseTable
from zdq.broker.peers import Peer, PeerTable
from zdq.broker.questions import CancelQuestions
from zdq.broker.routing import ResultRouting
from zdq.config import settings
from zdq.errors import ProtocolError
from zdq.storage.base import ChunkMeta
from zdq.storage.memory import MemoryStorage
from zdq.transport import protocol as p

DRIVER, OTHER, CREATOR, CONSUMER = b"d" * 16, b"o" * 16, b"c" * 16, b"w" * 16
NOW = 1000.0
ORPHANED_AFTER = 60.0


class Wire:
    """What the broker sends, per peer; peers in ``unreachable`` cannot take anything."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, p.Message]] = []
        self.unreachable: set[bytes] = set()

    def send(self, ident: bytes, msg: p.Message) -> bool:
        if ident in self.unreachable:
            return False
        self.sent.append((ident, msg))
        return True

    def take(self) -> list[tuple[bytes, p.Message]]:
        out, self.sent = self.sent, []
        return out


@pytest.fixture
def leases() -> LeaseTable:
    storage = MemoryStorage()
    storage.open()
    return LeaseTable(storage)


def put(leases: LeaseTable, owner: bytes, seq: int, n_tasks: int = 1) -> int:
    return leases.put([(ChunkMeta(owner, seq, n_tasks), b"chunk")])[0]


def done(leases: LeaseTable, owner: bytes, seq: int, n_tasks: int = 1) -> int:
    """A chunk of ``owner`` stored, leased to CONSUMER and done: its results await a driver."""
    chunk_id = put(leases, owner, seq, n_tasks)
    leased = leases.lease(CONSUMER, NOW)
    assert leased is not None and leased.chunk_id == chunk_id
    assert leases.finish(chunk_id, CONSUMER, b"results") is not None
    return chunk_id


class Routing:
    def __init__(self, leases: LeaseTable) -> None:
        self.leases = leases
        self.peers: dict[bytes, Peer] = {}
        self.wire = Wire()
        self.counters = BrokerCounters()
        self.confirmed: list[tuple[bytes, int]] = []
        self.routing = ResultRouting(
            leases, self.peers, self.wire.send, creator=CREATOR, orphaned_after=ORPHANED_AFTER,
            counters=self.counters, confirmed=lambda driver, seq: self.confirmed.append((driver, seq)),
        )

    def heard(self, ident: bytes, at: float = NOW) -> Peer:
        peer = self.peers[ident] = Peer(p.Role.DRIVER, last_seen=at)
        return peer

    def finish(self, owner: bytes, seq: int, n_tasks: int = 1) -> int:
        chunk_id = done(self.leases, owner, seq, n_tasks)
        held = self.leases.get(chunk_id)
        assert held is not None
        self.routing.finished(chunk_id, held, NOW)
        return chunk_id


@pytest.fixture
def routing(leases: LeaseTable) -> Routing:
    return Routing(leases)


# -- where results go ----------------------------------------------------------------------------


def test_results_go_to_their_own_driver_and_confirm_its_chunk(routing: Routing) -> None:
    routing.heard(DRIVER)
    chunk_id = routing.finish(DRIVER, seq=7, n_tasks=3)
    assert routing.wire.take() == [(DRIVER, p.Results(7, chunk_id, CONSUMER, b"results"))]
    assert routing.confirmed == [(DRIVER, 7)] and routing.routing.routed == {DRIVER: 3}
    assert not routing.routing.waiting and routing.counters.orphan_results == 0


def test_results_of_a_driver_that_left_go_to_the_creator_marked_foreign(routing: Routing) -> None:
    routing.heard(DRIVER).gone = True
    routing.heard(CREATOR)
    chunk_id = routing.finish(DRIVER, seq=7)
    assert routing.wire.take() == [(CREATOR, p.Results(0, chunk_id, CONSUMER, b"results"))]
    assert routing.counters.orphan_results == 1 and routing.confirmed == []


def test_results_of_a_driver_silent_past_the_orphan_time_go_to_the_creator(routing: Routing) -> None:
    routing.heard(DRIVER, at=NOW - ORPHANED_AFTER - 1)
    routing.heard(CREATOR)
    routing.finish(DRIVER, seq=1)
    assert [ident for ident, _ in routing.wire.take()] == [CREATOR]


def test_the_creators_own_results_wait_for_it_and_go_when_it_is_heard(routing: Routing) -> None:
    chunk_id = routing.finish(CREATOR, seq=2)
    assert routing.wire.take() == [] and list(routing.routing.waiting) == [chunk_id]
    assert routing.routing.waiting_tasks() == 1
    routing.heard(CREATOR)
    routing.routing.route_waiting(NOW)
    assert routing.wire.take() == [(CREATOR, p.Results(2, chunk_id, CONSUMER, b"results"))]
    assert not routing.routing.waiting and routing.routing.waiting_tasks() == 0


def test_results_a_driver_cannot_take_now_wait_and_are_kept(routing: Routing) -> None:
    routing.heard(DRIVER)
    routing.wire.unreachable.add(DRIVER)
    chunk_id = routing.finish(DRIVER, seq=1)
    assert list(routing.routing.waiting) == [chunk_id] and routing.routing.routed == {}
    routing.wire.unreachable.clear()
    routing.routing.route_waiting(NOW)
    assert [ident for ident, _ in routing.wire.take()] == [DRIVER] and not routing.routing.waiting


def test_a_drivers_hello_sends_again_what_it_was_sent_and_did_not_acknowledge(routing: Routing) -> None:
    routing.heard(DRIVER)
    chunk_id = routing.finish(DRIVER, seq=1)
    routing.wire.take()
    routing.routing.resend_to(OTHER)  # another driver's HELLO changes nothing
    assert not routing.routing.waiting
    routing.routing.resend_to(DRIVER)
    assert list(routing.routing.waiting) == [chunk_id]
    routing.routing.route_waiting(NOW)
    assert [msg for _, msg in routing.wire.take()] == [p.Results(1, chunk_id, CONSUMER, b"results")]


def test_results_sent_to_a_driver_silent_since_are_sent_again_and_those_it_heard_are_not(routing: Routing) -> None:
    peer = routing.heard(DRIVER)
    chunk_id = routing.finish(DRIVER, seq=1)
    peer.last_seen = NOW + 1  # heard after they were sent
    routing.routing.resend_unheard(NOW + 100)
    assert not routing.routing.waiting
    peer.last_seen = NOW - 1  # silent since
    routing.routing.resend_unheard(NOW + 100)
    assert list(routing.routing.waiting) == [chunk_id]


def test_a_driver_that_leaves_hands_its_unacknowledged_results_to_the_creator(routing: Routing) -> None:
    routing.heard(DRIVER)
    routing.heard(CREATOR)
    chunk_id = routing.finish(DRIVER, seq=1)
    routing.wire.take()
    routing.peers[DRIVER].gone = True
    routing.routing.driver_left(DRIVER, NOW)
    assert routing.wire.take() == [(CREATOR, p.Results(0, chunk_id, CONSUMER, b"results"))]


def test_only_the_driver_the_results_were_sent_to_acknowledges_them(routing: Routing, leases: LeaseTable) -> None:
    routing.heard(DRIVER)
    chunk_id = routing.finish(DRIVER, seq=1)
    routing.routing.receipt(OTHER, [chunk_id])
    assert leases.get(chunk_id) is not None
    routing.routing.receipt(DRIVER, [chunk_id])
    assert leases.get(chunk_id) is None and leases.storage.meta(chunk_id) is None


def test_a_sync_says_what_the_queue_holds_and_which_awaited_chunks_it_does_not(
    routing: Routing, leases: LeaseTable
) -> None:
    routing.heard(DRIVER)
    routing.finish(DRIVER, seq=1, n_tasks=2)
    put(leases, DRIVER, seq=2, n_tasks=5)
    status = routing.routing.status(DRIVER, p.Sync(9, (1, 2, 3)))
    assert status == p.QueueStatus(9, 5, 0, 0, 0, 2, (3,))


def test_a_sync_that_asks_is_told_the_digests_of_the_consumers_heard_and_no_driver(routing: Routing) -> None:
    routing.heard(DRIVER)
    routing.peers[CONSUMER] = Peer(p.Role.CONSUMER, last_seen=NOW)
    routing.peers[b"left"] = Peer(p.Role.CONSUMER, last_seen=NOW, gone=True)
    assert routing.routing.status(DRIVER, p.Sync(9)).consumer_digests is None  # not asked: not told
    # Their digests, never the identities (a peer that has one may take that consumer's place).
    assert routing.routing.status(DRIVER, p.Sync(9, (), True)).consumer_digests == (p.consumer_digest(CONSUMER),)


# -- cancel questions ----------------------------------------------------------------------------


class Questions:
    def __init__(self, leases: LeaseTable) -> None:
        self.leases = leases
        self.peers: dict[bytes, Peer] = {CONSUMER: Peer(p.Role.CONSUMER)}
        self.wire = Wire()
        self.questions = CancelQuestions("q", leases, self.peers, self.wire.send, timeout=5.0)


@pytest.fixture
def questions(leases: LeaseTable) -> Questions:
    return Questions(leases)


def test_a_cancel_of_a_ready_chunk_is_answered_at_once_and_its_tasks_marked(questions: Questions) -> None:
    chunk_id = put(questions.leases, DRIVER, seq=1, n_tasks=3)
    questions.questions.ask(DRIVER, p.Cancel(4, 0, 1, (0, 2)), NOW)
    assert questions.wire.take() == [(DRIVER, p.Cancelled(4, (0, 2)))]
    assert questions.leases.storage.cancelled(chunk_id) == {0, 2}


def test_a_chunk_cancelled_whole_leaves_the_queue(questions: Questions) -> None:
    chunk_id = put(questions.leases, DRIVER, seq=1, n_tasks=2)
    questions.questions.ask(DRIVER, p.Cancel(4, chunk_id, 1, (0, 1)), NOW)
    assert questions.leases.storage.meta(chunk_id) is None


def test_only_its_own_driver_cancels_a_chunk(questions: Questions) -> None:
    chunk_id = put(questions.leases, DRIVER, seq=1, n_tasks=2)
    questions.questions.ask(OTHER, p.Cancel(4, chunk_id, 1, (0,)), NOW)
    assert questions.wire.take() == [(OTHER, p.Cancelled(4, ()))]
    assert not questions.leases.storage.cancelled(chunk_id)


def test_a_leased_chunks_consumer_is_asked_and_the_driver_answered_with_what_it_says(questions: Questions) -> None:
    chunk_id = put(questions.leases, DRIVER, seq=1, n_tasks=3)
    questions.leases.lease(CONSUMER, NOW)
    questions.questions.ask(DRIVER, p.Cancel(4, 0, 1, (1, 2)), NOW)
    [(to, ask)] = questions.wire.take()
    assert to == CONSUMER and isinstance(ask, p.Cancel) and ask.chunk_id == chunk_id and ask.indexes == (1, 2)
    questions.questions.answered(CONSUMER, p.Cancelled(ask.token, (2, 7)))  # 7 was not asked: ignored
    assert questions.wire.take() == [(DRIVER, p.Cancelled(4, (2,)))]
    assert not questions.questions.asked


def test_a_cancelled_from_a_consumer_that_was_not_asked_is_refused_and_a_late_one_ignored(
    questions: Questions,
) -> None:
    put(questions.leases, DRIVER, seq=1, n_tasks=1)
    questions.leases.lease(CONSUMER, NOW)
    questions.questions.ask(DRIVER, p.Cancel(4, 0, 1, (0,)), NOW)
    [(_, ask)] = questions.wire.take()
    assert isinstance(ask, p.Cancel)
    with pytest.raises(ProtocolError, match="not asked"):
        questions.questions.answered(OTHER, p.Cancelled(ask.token, (0,)))
    questions.questions.answered(CONSUMER, p.Cancelled(ask.token + 1, (0,)))  # late: nothing
    assert questions.wire.take() == [] and questions.questions.asked


@pytest.mark.parametrize("how", ["leaves", "times out"])
def test_a_consumer_that_does_not_answer_counts_as_having_started_its_tasks(questions: Questions, how: str) -> None:
    put(questions.leases, DRIVER, seq=1, n_tasks=1)
    questions.leases.lease(CONSUMER, NOW)
    questions.questions.ask(DRIVER, p.Cancel(4, 0, 1, (0,)), NOW)
    questions.wire.take()
    questions.questions.expire(NOW + 4.9)
    assert questions.wire.take() == []
    if how == "leaves":
        questions.questions.consumer_left(CONSUMER)
    else:
        questions.questions.expire(NOW + 5.0)
    assert questions.wire.take() == [(DRIVER, p.Cancelled(4, ()))]


def test_a_purge_cancels_every_task_not_yet_delivered_and_counts_each_once(questions: Questions) -> None:
    first = put(questions.leases, DRIVER, seq=1, n_tasks=2)
    put(questions.leases, DRIVER, seq=2, n_tasks=3)
    questions.leases.lease(CONSUMER, NOW)  # the first is delivered: not purged
    assert questions.questions.purge_ready() == 3
    assert questions.questions.purge_ready() == 0
    assert not questions.leases.storage.cancelled(first)


def test_a_cancel_that_empties_a_purged_chunk_tells_its_driver_every_task_of_it(questions: Questions) -> None:
    # Reviewer 13: after a purge, one future's cancel() took the chunk out of the queue, and the
    # driver, told of that task only, waited for ever for the others' DONE.
    chunk_id = put(questions.leases, DRIVER, seq=1, n_tasks=4)
    assert questions.questions.purge_ready() == 4
    questions.questions.ask(DRIVER, p.Cancel(4, chunk_id, 1, (1,)), NOW)
    assert questions.wire.take() == [(DRIVER, p.Cancelled(4, (0, 1, 2, 3)))]
    assert questions.leases.storage.meta(chunk_id) is None  # it left


def test_a_cancel_of_part_of_a_chunk_that_stays_answers_only_what_was_asked(questions: Questions) -> None:
    chunk_id = put(questions.leases, DRIVER, seq=1, n_tasks=3)
    questions.questions.ask(DRIVER, p.Cancel(4, chunk_id, 1, (0, 2)), NOW)
    assert questions.wire.take() == [(DRIVER, p.Cancelled(4, (0, 2)))]
    assert questions.leases.storage.meta(chunk_id) is not None  # task 1 still runs


# -- peers and the route table ----------------------------------------------------------------------


def test_credit_is_capped_and_a_local_consumer_is_served_first() -> None:
    peers = PeerTable()
    peers.credit(b"far", 5000, NOW)
    peers.consumer(b"near", NOW).local = True
    peers.credit(b"near", 1, NOW)
    assert list(peers.with_credit) == [b"near", b"far"] and peers.by_ident[b"far"].credit == 1024
    peers.credit(b"far", 0, NOW, revoke=True)
    assert peers.by_ident[b"far"].credit == 0


def test_consumers_are_told_ready_at_most_once_per_interval_and_silent_ones_removed() -> None:
    peers = PeerTable()
    peers.consumer(b"a", NOW - 10)
    peers.consumer(b"b", NOW)
    peers.driver(b"d", NOW - 10)
    assert list(peers.to_notify(NOW, 0.1)) == [b"a", b"b"]
    assert list(peers.to_notify(NOW + 0.05, 0.1)) == []
    assert [ident for ident, _ in peers.silent_consumers(NOW - 1)] == [b"a"]
    assert set(peers.by_ident) == {b"b", b"d"} and peers.drivers_present() == 1


def test_the_broker_routes_every_message_a_peer_sends_and_none_that_only_a_broker_sends() -> None:
    storage = MemoryStorage()
    storage.open()
    core = BrokerCore("q", None, storage, settings())  # type: ignore[arg-type]  # the socket is not touched
    from_peers = {
        p.Hello, p.Put, p.Puts, p.Fetch, p.Done, p.Return, p.Ack, p.Dead, p.Split, p.Rack, p.Sync, p.Cancel, p.Cancelled,
        p.Heartbeat, p.Bye, p.Retried,
    }
    assert set(core._routes) == from_peers
    assert not {p.Confirm, p.Deliver, p.Results, p.Lost, p.Ready, p.QueueStatus} & set(core._routes)


# -- what only a chunk's holder may report ----------------------------------------------------------


def test_only_the_consumer_that_holds_a_chunk_may_report_it_done_and_twice_counts_once(leases: LeaseTable) -> None:
    chunk_id = put(leases, DRIVER, seq=1)
    leases.lease(CONSUMER, NOW)
    with pytest.raises(ProtocolError, match="never held"):
        leases.done_by(OTHER, chunk_id, b"forged")
    held = leases.done_by(CONSUMER, chunk_id, b"results")
    assert held is not None and held.results == b"results" and held.consumer == CONSUMER
    assert leases.done_by(CONSUMER, chunk_id, b"results") is None  # a duplicate


def test_a_split_or_dead_letter_from_a_consumer_that_does_not_hold_the_chunk_is_refused(leases: LeaseTable) -> None:
    chunk_id = put(leases, DRIVER, seq=1, n_tasks=2)
    leases.lease(CONSUMER, NOW)
    with pytest.raises(ProtocolError, match="SPLIT"):
        leases.split_by(OTHER, chunk_id, [b"a", b"b"])
    with pytest.raises(ProtocolError, match="SPLIT"):
        leases.split_by(CONSUMER, chunk_id, [b"a"])  # not one part per task
    with pytest.raises(ProtocolError, match="DEAD"):
        leases.dead_letter(OTHER, chunk_id, b"task", "failed")
    leases.split_by(CONSUMER, chunk_id, [b"a", b"b"])
    assert leases.storage.counts().ready_chunks == 2


def test_a_schedules_tick_that_used_up_its_attempts_is_not_kept_as_a_dead_letter(leases: LeaseTable) -> None:
    from zdq.schedules import SCHEDULED

    tick = put(leases, SCHEDULED, seq=3)
    task = put(leases, DRIVER, seq=1)
    leases.lease(CONSUMER, NOW)
    leases.lease(CONSUMER, NOW)
    assert leases.dead_letter(CONSUMER, tick, b"task", "failed").owner == SCHEDULED
    assert leases.storage.counts().dead_chunks == 0
    assert leases.dead_letter(CONSUMER, task, b"task", "failed").owner == DRIVER
    assert leases.storage.counts().dead_chunks == 1


# -- chunks out ------------------------------------------------------------------------------------


def test_a_consumer_gets_no_more_chunks_than_its_credit_and_others_hear_ready(leases: LeaseTable) -> None:
    from zdq.broker.dispatch import READY_EVERY, Dispatch

    peers, wire, gone = PeerTable(), Wire(), []
    dispatch = Dispatch(leases, peers, wire.send, BrokerCounters(), lambda i, peer: gone.append(i))
    for seq in range(3):
        put(leases, DRIVER, seq=seq)
    peers.credit(CONSUMER, 2, NOW)
    peers.consumer(OTHER, NOW)  # no credit
    dispatch.run(NOW)
    sent = wire.take()
    # A chunk still waits and no one has credit left: both may ask for it.
    assert [(i, type(m)) for i, m in sent] == [
        (CONSUMER, p.Deliver), (CONSUMER, p.Deliver), (CONSUMER, p.Ready), (OTHER, p.Ready),
    ]
    assert peers.by_ident[CONSUMER].credit == 0 and not gone
    dispatch.run(NOW + READY_EVERY / 2)  # told a moment ago: not again yet
    assert wire.take() == []


def test_a_consumer_that_cannot_be_reached_is_taken_for_gone_and_its_chunk_served_to_another(
    leases: LeaseTable,
) -> None:
    from zdq.broker.dispatch import Dispatch

    peers, wire, gone = PeerTable(), Wire(), []
    dispatch = Dispatch(leases, peers, wire.send, BrokerCounters(), lambda i, peer: gone.append(i))
    chunk_id = put(leases, DRIVER, seq=1)
    peers.credit(OTHER, 1, NOW)
    peers.credit(CONSUMER, 1, NOW)
    wire.unreachable.add(OTHER)
    dispatch.run(NOW)
    assert gone == [OTHER] and OTHER not in peers.by_ident
    assert wire.take() == [(CONSUMER, p.Deliver(chunk_id, 1, 1, b"chunk"))]  # no attempt used


class _StuckLoop:
    """A loop thread that does not end within the join's timeout (only ``join`` and ``is_alive``)."""

    def join(self, timeout: float | None = None) -> None:
        pass

    def is_alive(self) -> bool:
        return True


def test_a_plain_stop_after_a_discarding_stop_whose_join_timed_out_keeps_the_discard() -> None:
    # The pool's failed placement stops each broker with discard=True, then its slots stop them
    # again: the loop, still running, reads the flag only when it ends.
    storage = MemoryStorage()
    storage.open()
    core = BrokerCore("q", None, storage, settings())  # type: ignore[arg-type]  # the socket is not touched
    core._thread = _StuckLoop()  # type: ignore[assignment]
    core.stop(0.0, discard=True)
    core.stop(0.0)
    assert core._discard


def test_a_broker_tells_no_more_consumers_than_a_driver_reads(routing: Routing, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(p, "MAX_CONSUMERS_TOLD", 3)
    for i in range(5):
        routing.peers[b"consumer-%d" % i] = Peer(p.Role.CONSUMER, last_seen=NOW)
    told = routing.routing.status(DRIVER, p.Sync(9, (), True)).consumer_digests
    assert told is not None and len(told) == 3  # the driver then asks the consumers themselves
