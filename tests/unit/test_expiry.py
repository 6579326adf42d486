"""Expiry's pure parts (issue 25): the broker's watch of expiry times, a chunk expired in the lease
table and told to its driver as EXPIRED (kept on disk by a durable queue until the driver's
receipt), the wire message, the options that carry the time to consumers, and old options."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest

from zdq.broker.counters import BrokerCounters
from zdq.broker.expiry import EXPIRED_BY, EXPIRED_RESULTS, MAX_REMEMBERED, ExpiryWatch
from zdq.broker.leases import LeaseTable
from zdq.broker.peers import Peer
from zdq.broker.routing import ResultRouting
from zdq.client.submit import with_expiry
from zdq.codec.tasks import TaskOptions
from zdq.codec.timing import Timing, timing_of
from zdq.errors import ProtocolError
from zdq.storage import ChunkMeta, LMDBStorage, Storage
from zdq.transport import protocol as p

from .test_storage import storage  # noqa: F401 - the fixture: each test runs on memory and on LMDB

DRIVER = b"d" * 16


def _routing(leases: LeaseTable, sent: list[tuple[bytes, p.Message]]) -> ResultRouting:
    peers = {DRIVER: Peer(p.Role.DRIVER, last_seen=time.monotonic())}

    def send(ident: bytes, msg: p.Message) -> bool:
        sent.append((ident, msg))
        return True

    return ResultRouting(
        leases, peers, send, creator=DRIVER, orphaned_after=60.0, counters=BrokerCounters(), confirmed=lambda d, s: None
    )


def test_the_watch_gives_each_chunk_once_when_its_time_comes_and_remembers_those_that_expired() -> None:
    watch = ExpiryWatch([(1, ChunkMeta(DRIVER, 1, 1, expires=30.0)), (2, ChunkMeta(DRIVER, 2, 1))])
    watch.add(3, 10.0)
    assert watch.next_at == 10.0
    assert watch.due(5.0) == []
    assert watch.due(40.0) == [3, 1] and watch.due(40.0) == [] and watch.next_at == float("inf")
    watch.note(3, ChunkMeta(DRIVER, 3, 4, base=100))
    assert watch.has_expired(103) and watch.has_expired(100, DRIVER)
    assert not watch.has_expired(104) and not watch.has_expired(100, b"x" * 16)
    for i in range(MAX_REMEMBERED):
        watch.note(10 + i, ChunkMeta(DRIVER, 10 + i, 1, base=1000 + i))
    assert not watch.has_expired(100) and len(watch.expired) == MAX_REMEMBERED  # bounded: the oldest went


def test_a_waiting_chunk_expires_out_of_the_queue_and_its_driver_is_sent_expired_not_results(
    storage: Storage,  # noqa: F811 - the fixture imported above
) -> None:
    leases = LeaseTable(storage)
    [ready, delayed, leased] = leases.put([
        (ChunkMeta(DRIVER, 1, 2, base=10, expires=1.0), b"a"),
        (ChunkMeta(DRIVER, 2, 1, not_before=time.time() + 60, base=12, expires=time.time() + 120), b"b"),
        (ChunkMeta(DRIVER, 3, 1, base=13), b"c"),
    ])
    assert leases.lease(b"w" * 16) is not None  # the first ready chunk: 'ready'
    assert leases.expire_unsent(ready) is None  # leased to a consumer: its to check, not the broker's
    held = leases.expire_unsent(ready, just_leased=True)
    assert held is not None and held.results is EXPIRED_RESULTS and held.holder is None
    assert leases.expire_unsent(ready, just_leased=True) is None  # done already
    assert leases.expire_unsent(delayed) is not None  # a delayed one leaves its release heap too
    assert leases.counts().delayed_tasks == 0 and leases.counts().ready_tasks == 1
    sent: list[tuple[bytes, p.Message]] = []
    routing = _routing(leases, sent)
    routing.finished(ready, held, time.monotonic())
    assert sent == [(DRIVER, p.Expired(1, ready, 10, 2))]
    routing.receipt(DRIVER, [ready])  # the driver's RACK: it leaves the queue for good
    assert storage.meta(ready) is None and storage.meta(leased) is not None


def test_a_durable_queue_keeps_an_expired_outcome_no_driver_took_and_tells_it_after_a_restart(tmp_path: Path) -> None:
    disk = LMDBStorage(str(tmp_path / "q"), map_size=1 << 20)
    disk.open()
    leases = LeaseTable(disk)
    [chunk_id] = leases.put([(ChunkMeta(DRIVER, 7, 3, base=40, expires=1.0), b"x")])
    held = leases.expire_unsent(chunk_id)
    assert held is not None
    leases.keep(chunk_id, held)  # no driver took it: written down
    disk.commit(force=True)
    disk.close()
    reopened = LMDBStorage(str(tmp_path / "q"), map_size=1 << 20)
    reopened.open()
    try:
        again = LeaseTable(reopened)
        recovered = again.get(chunk_id)
        assert recovered is not None and recovered.results is EXPIRED_RESULTS and recovered.consumer == EXPIRED_BY
        assert reopened.waiting_ids() == []  # not ready: never delivered after the restart
        sent: list[tuple[bytes, p.Message]] = []
        routing = _routing(again, sent)
        routing.route_waiting(time.monotonic())
        assert sent == [(DRIVER, p.Expired(7, chunk_id, 40, 3))]
    finally:
        reopened.close()


def test_expired_travels_in_one_frame_and_a_bad_count_is_refused() -> None:
    msg = p.Expired(5, 2**40, 123, 7)
    frames = p.encode(msg)
    assert len(frames) == 1 and p.decode(frames) == msg
    with pytest.raises(ProtocolError):
        p.decode(p.encode(p.Expired(5, 1, 0, 0)))


def test_the_expiry_reaches_the_consumers_in_the_task_options_and_nothing_travels_without_one() -> None:
    assert with_expiry(None, None) is None
    plain = TaskOptions(retries=2)
    assert with_expiry(plain, Timing(priority=3)) is plain
    at = timing_of(None, None, None, 30)
    assert at is not None and time.time() + 29 < at.expires <= time.time() + 30
    assert with_expiry(None, at) == TaskOptions(expires=at.expires)
    assert with_expiry(plain, at) == TaskOptions(retries=2, expires=at.expires)
    with pytest.raises(ValueError, match="expires"):
        TaskOptions(expires=-1.0)


def test_options_pickled_before_expiry_existed_load_with_no_expiry() -> None:
    old = pickle.dumps(TaskOptions(retries=1, time_limit=5.0))
    # The state an earlier TaskOptions wrote: its five fields, without expires.
    state = TaskOptions(retries=1, time_limit=5.0).__getstate__()[:5]  # type: ignore[misc]
    fresh = object.__new__(TaskOptions)
    fresh.__setstate__(state)
    assert fresh == TaskOptions(retries=1, time_limit=5.0) and fresh.expires == 0.0
    assert pickle.loads(old) == TaskOptions(retries=1, time_limit=5.0)
