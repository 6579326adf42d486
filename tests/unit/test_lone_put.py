"""A lone PUT stored and delivered in one pass (issue 26, point 4): the same chunk, lease and
DELIVER as storing it and running the dispatch, and only when it would be the next chunk out."""

from __future__ import annotations

from pathlib import Path

import pytest

from zdq.broker.counters import BrokerCounters
from zdq.broker.dispatch import Dispatch
from zdq.broker.leases import LeaseTable
from zdq.broker.peers import Peer, PeerTable
from zdq.broker.rates import RateLimits
from zdq.storage import ChunkMeta, LMDBStorage, MemoryStorage, Storage
from zdq.transport import protocol as p

from .test_broker_routing import Wire
from .test_storage import storage  # noqa: F401 - the fixture: each test runs on memory and on LMDB

DRIVER, CONSUMER = b"d" * 16, b"w" * 16
NOW = 1000.0


class Broker:
    """A dispatch over a transient queue, one consumer with ``credit``."""

    def __init__(self, credit: int = 1) -> None:
        queue = MemoryStorage()
        queue.open()
        self.leases = LeaseTable(queue)
        self.peers = PeerTable()
        self.wire = Wire()
        self.gone: list[bytes] = []
        self.counters = BrokerCounters()
        self.rates = RateLimits(queue)
        self.dispatch = Dispatch(self.leases, self.peers, self.wire.send, self.counters, self._gone, self.rates)
        if credit:
            self.peers.credit(CONSUMER, credit, NOW)
        else:
            self.peers.consumer(CONSUMER, NOW)

    def _gone(self, ident: bytes, peer: Peer) -> None:
        self.gone.append(ident)


def _put(seq: int = 1, **tags: object) -> p.Put:
    fields = {"not_before": 0.0, "priority": 0, "base": 7, **tags}
    return p.Put(seq, 2, b"payload", **fields)  # type: ignore[arg-type]


def test_a_lone_put_is_stored_leased_and_delivered_as_the_usual_path_does() -> None:
    lean, usual = Broker(), Broker()
    chunk_id = lean.dispatch.put_and_deliver(DRIVER, _put(), NOW)
    put = _put()
    [usual_id] = usual.leases.put([(ChunkMeta(DRIVER, put.seq, put.n_tasks, *put[3:]), put.chunk)])
    usual.dispatch.run(NOW)
    assert chunk_id is not None
    [(ident, deliver)] = lean.wire.sent
    [(usual_ident, usual_deliver)] = usual.wire.sent
    assert ident == usual_ident == CONSUMER
    assert isinstance(deliver, p.Deliver) and deliver == usual_deliver._replace(chunk_id=chunk_id)
    for b, i in ((lean, chunk_id), (usual, usual_id)):
        held = b.leases.get(i)
        assert held is not None and held.holder == CONSUMER and held.leased_at == NOW
        assert held.meta == ChunkMeta(DRIVER, 1, 2, base=7)
        assert b.peers.by_ident[CONSUMER].credit == 0 and not b.peers.with_credit
        c = b.leases.counts()
        assert (c.ready_chunks, c.leased_chunks, c.leased_tasks) == (0, 1, 2)
    # Its DONE finishes it as any other's; its redelivery after the consumer's death counts an attempt.
    assert lean.leases.done_by(CONSUMER, chunk_id, b"results") is not None


def test_a_lone_chunk_whose_consumer_dies_is_redelivered_with_its_attempt_counted() -> None:
    b = Broker()
    chunk_id = b.dispatch.put_and_deliver(DRIVER, _put(), NOW)
    returned, lost = b.leases.expire(CONSUMER)
    assert returned == [chunk_id] and lost == []
    b.peers.credit(b"x" * 16, 1, NOW)
    b.dispatch.run(NOW)
    [(_, _), (ident, again)] = b.wire.sent
    assert ident == b"x" * 16 and isinstance(again, p.Deliver) and again.chunk_id == chunk_id and again.attempt == 2
    assert b.counters.chunks_redelivered == 1


@pytest.mark.parametrize(
    "why",
    ["a chunk is ready", "no credit", "delayed", "expires", "per-call limit", "queue limit"],
)
def test_a_put_that_would_not_be_the_next_out_is_left_to_the_usual_path(why: str) -> None:
    b = Broker(credit=0 if why == "no credit" else 1)
    put = _put()
    if why == "a chunk is ready":
        b.leases.put([(ChunkMeta(DRIVER, 9, 1), b"earlier")])
    elif why == "delayed":
        put = _put(not_before=NOW + 60)
    elif why == "expires":
        put = _put(expires=NOW + 60)
    elif why == "per-call limit":
        put = _put(rate_key=b"k", rate=1.0)
    elif why == "queue limit":
        b.rates.set_queue(10.0)
    before = b.leases.counts()
    assert b.dispatch.put_and_deliver(DRIVER, put, NOW) is None
    assert b.leases.counts() == before and b.wire.sent == []


def test_a_lone_chunk_its_consumer_cannot_take_waits_at_the_head_and_the_consumer_is_gone() -> None:
    b = Broker()
    b.wire.unreachable.add(CONSUMER)
    chunk_id = b.dispatch.put_and_deliver(DRIVER, _put(), NOW)
    assert chunk_id is not None and b.gone == [CONSUMER] and CONSUMER not in b.peers.by_ident
    c = b.leases.counts()
    assert (c.ready_chunks, c.leased_chunks) == (1, 0)
    leased = b.leases.lease(b"x" * 16, NOW)
    assert leased is not None and leased.chunk_id == chunk_id and leased.attempt == 1  # its delivery failed: no attempt used


def test_put_leased_is_put_many_then_lease(storage: Storage) -> None:  # noqa: F811 - the fixture imported above
    chunk_id, payload = storage.put_leased(ChunkMeta(DRIVER, 1, 3), b"payload")
    assert bytes(payload) == b"payload" and storage.is_leased(chunk_id) and storage.lease() is None  # type: ignore[arg-type]
    c = storage.counts()
    assert (c.ready_chunks, c.leased_chunks, c.leased_tasks) == (0, 1, 3)
    [later] = storage.put_many([(ChunkMeta(DRIVER, 2, 1), b"later")])
    assert later > chunk_id
    assert storage.release(chunk_id)  # back at the head, its attempt counted
    again = storage.lease()
    assert again is not None and again.chunk_id == chunk_id and again.attempt == 2
    assert storage.ack_many([chunk_id]) == [ChunkMeta(DRIVER, 1, 3)]
    with pytest.raises(ValueError, match="delayed"):
        storage.put_leased(ChunkMeta(DRIVER, 3, 1, not_before=NOW), b"x")


def test_a_durable_chunk_leased_as_it_arrived_is_ready_again_and_may_have_started_after_a_restart(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "q")
    s = LMDBStorage(path, map_size=1 << 20)
    s.open()
    chunk_id, _ = s.put_leased(ChunkMeta(DRIVER, 1, 1), b"payload")
    s.close()
    again = LMDBStorage(path, map_size=1 << 20)
    again.open()
    try:
        leased = again.lease()
        assert leased is not None and leased.chunk_id == chunk_id and bytes(leased.payload) == b"payload"  # type: ignore[arg-type]
        assert again.may_have_started(chunk_id)
    finally:
        again.close()
