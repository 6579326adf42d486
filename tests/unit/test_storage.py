"""One behaviour suite for every storage backend, so they cannot drift apart."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from zdq.storage import ChunkMeta, LMDBStorage, MemoryStorage, Storage

OWNER = b"d" * 16


def _meta(seq: int, n: int = 10) -> ChunkMeta:
    return ChunkMeta(OWNER, seq, n)


@pytest.fixture(params=["memory", "lmdb"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    s: Storage = MemoryStorage() if request.param == "memory" else LMDBStorage(str(tmp_path / "q"), map_size=1 << 20)
    s.open()
    yield s
    s.close()


def _payload(leased: object) -> bytes:
    return bytes(getattr(leased, "payload"))


def test_chunks_are_leased_in_fifo_order(storage: Storage) -> None:
    ids = storage.put_many([(_meta(i), f"chunk-{i}".encode()) for i in range(5)])
    assert ids == sorted(ids)
    got = [storage.lease() for _ in range(5)]
    assert [_payload(g) for g in got] == [f"chunk-{i}".encode() for i in range(5)]
    assert storage.lease() is None


def test_counts_follow_chunks_through_their_states(storage: Storage) -> None:
    storage.put_many([(_meta(1, 10), b"a"), (_meta(2, 20), b"b")])
    c = storage.counts()
    assert (c.ready_chunks, c.ready_tasks, c.leased_chunks) == (2, 30, 0)
    leased = storage.lease()
    assert leased is not None
    c = storage.counts()
    assert (c.ready_tasks, c.leased_chunks, c.leased_tasks) == (20, 1, 10)
    assert storage.ack_many([leased.chunk_id]) == [leased.meta]
    c = storage.counts()
    assert (c.ready_tasks, c.leased_chunks, c.leased_tasks) == (20, 0, 0)


def test_a_released_chunk_returns_to_the_head_with_its_attempts_counted(storage: Storage) -> None:
    storage.put_many([(_meta(1), b"first"), (_meta(2), b"second")])
    first = storage.lease()
    assert first is not None and first.attempt == 1
    assert storage.release(first.chunk_id)
    again = storage.lease()
    assert again is not None and _payload(again) == b"first" and again.attempt == 2
    storage.release(again.chunk_id, count_attempt=False)
    assert storage.lease().attempt == 2  # type: ignore[union-attr]


def test_acknowledging_twice_reports_a_duplicate(storage: Storage) -> None:
    (chunk_id,) = storage.put_many([(_meta(1), b"x")])
    storage.lease()
    assert storage.ack_many([chunk_id]) == [_meta(1)]
    assert storage.ack_many([chunk_id]) == [None]


def test_a_late_ack_of_a_returned_chunk_removes_it_from_the_queue(storage: Storage) -> None:
    (chunk_id,) = storage.put_many([(_meta(1), b"x")])
    storage.lease()
    storage.release(chunk_id)
    assert storage.ack_many([chunk_id]) == [_meta(1)]
    assert storage.lease() is None


def test_dead_letters_can_be_listed_requeued_and_purged(storage: Storage) -> None:
    a, b = storage.put_many([(_meta(1), b"a"), (_meta(2), b"b")])
    storage.lease()
    storage.lease()
    assert storage.dead_letter(a, "boom")
    assert storage.dead_letter(b, "bang")
    assert {d.chunk_id: d.reason for d in storage.dead_letters()} == {a: "boom", b: "bang"}
    assert storage.counts().dead_chunks == 2
    assert storage.requeue_dead([a]) == 1
    leased = storage.lease()
    assert leased is not None and leased.chunk_id == a and leased.attempt == 1
    assert storage.purge_dead() == 1
    assert storage.counts().dead_chunks == 0


def test_a_split_chunk_is_replaced_by_its_parts_at_the_head(storage: Storage) -> None:
    first, second = storage.put_many([(_meta(1, 3), b"abc"), (_meta(2), b"next")])
    leased = storage.lease()
    assert leased is not None and leased.chunk_id == first
    parts = storage.split(first, [(ChunkMeta(OWNER, 1, 1), p) for p in (b"a", b"b", b"c")])
    assert len(parts) == 3
    got = [storage.lease() for _ in range(4)]
    assert [_payload(g) for g in got] == [b"a", b"b", b"c", b"next"]
    assert all(g.attempt == 1 for g in got if g)
    assert storage.counts().leased_tasks == 13
    assert storage.ack_many([first]) == [None]


def test_a_task_can_be_stored_straight_into_the_dead_letters(storage: Storage) -> None:
    (dead,) = storage.put_dead([(ChunkMeta(OWNER, 0, 1), b"poison", "ValueError: boom")])
    assert storage.lease() is None
    assert [(d.chunk_id, d.reason) for d in storage.dead_letters()] == [(dead, "ValueError: boom")]
    assert storage.requeue_dead() == 1
    leased = storage.lease()
    assert leased is not None and _payload(leased) == b"poison"


def test_cancelled_tasks_are_kept_with_their_chunk_and_follow_it_into_a_split(storage: Storage) -> None:
    a, b = storage.put_many([(_meta(1, 3), b"a"), (_meta(2, 3), b"b")])
    assert storage.find(OWNER, 2) == [b] and storage.find(OWNER, 9) == []
    assert storage.is_ready(a)
    assert storage.cancel(a, [0, 2, 7]) is True  # an index beyond the chunk is ignored
    assert storage.cancelled(a) == {0, 2} and storage.cancelled(b) == frozenset()
    storage.lease()
    assert not storage.is_ready(a)
    parts = storage.split(a, [(_meta(1, 1), b"a0"), (_meta(1, 1), b"a1"), (_meta(1, 1), b"a2")])
    assert [storage.cancelled(p) for p in parts] == [{0}, frozenset(), {0}]
    assert storage.cancelled(a) == frozenset()
    storage.ack_many(parts[:1])
    assert storage.cancelled(parts[0]) == frozenset()
    assert storage.cancel(12345, [0]) is False


def test_cancellations_survive_a_restart_of_a_durable_queue(tmp_path: Path) -> None:
    first = LMDBStorage(str(tmp_path / "q"), map_size=1 << 20)
    first.open()
    a, b = first.put_many([(_meta(1, 4), b"a"), (_meta(2, 4), b"b")])
    first.cancel(a, [1, 3])
    first.cancel(b, [0])
    first.ack_many([b])
    first.close()
    again = LMDBStorage(str(tmp_path / "q"), map_size=1 << 20)
    again.open()
    try:
        assert again.cancelled(a) == {1, 3}
        assert again.cancelled(b) == frozenset()
    finally:
        again.close()


# -- delayed and prioritised chunks ------------------------------------------------------------
def _leased_payloads(storage: Storage) -> list[bytes]:
    out = []
    while (leased := storage.lease()) is not None:
        out.append(bytes(leased.payload))  # type: ignore[call-overload]
    return out


def test_a_high_priority_chunk_is_leased_before_those_stored_earlier(storage: Storage) -> None:
    storage.put_many([(ChunkMeta(OWNER, i, 1), f"low-{i}".encode()) for i in range(3)])
    storage.put_many([(ChunkMeta(OWNER, 9, 1, priority=5), b"high")])
    storage.put_many([(ChunkMeta(OWNER, 10, 1, priority=-1), b"lowest")])
    assert _leased_payloads(storage) == [b"high", b"low-0", b"low-1", b"low-2", b"lowest"]


def test_a_delayed_chunk_is_not_leased_before_its_time_and_counts_as_delayed(storage: Storage) -> None:
    now = time.time()
    storage.put_many([(ChunkMeta(OWNER, 1, 4, not_before=now + 60), b"later"), (ChunkMeta(OWNER, 2, 1), b"now")])
    counts = storage.counts()
    assert (counts.ready_tasks, counts.delayed_chunks, counts.delayed_tasks) == (1, 1, 4)
    assert storage.next_release == now + 60
    assert _leased_payloads(storage) == [b"now"]
    assert storage.release_due(now + 59) == 0 and storage.lease() is None
    assert storage.release_due(now + 60) == 1
    assert storage.counts().delayed_tasks == 0 and storage.next_release == math.inf
    assert _leased_payloads(storage) == [b"later"]


def test_a_delayed_chunk_whose_tasks_are_all_cancelled_leaves_at_once(storage: Storage) -> None:
    [chunk_id] = storage.put_many([(ChunkMeta(OWNER, 1, 2, not_before=time.time() + 60), b"later")])
    assert storage.is_ready(chunk_id) and storage.is_delayed(chunk_id)  # a cancel marks it like a ready one
    assert storage.cancel(chunk_id, [0, 1])
    assert storage.ack_many([chunk_id])[0] is not None
    assert storage.counts().delayed_chunks == 0 and storage.release_due(math.inf) == 0


def test_waiting_chunks_are_the_ready_and_delayed_ones_and_a_delayed_one_can_be_released_at_once(
    storage: Storage,
) -> None:
    later, now_, leased = storage.put_many(
        [(ChunkMeta(OWNER, 1, 2, not_before=time.time() + 60), b"later"), (ChunkMeta(OWNER, 2, 1), b"now"),
         (ChunkMeta(OWNER, 3, 1), b"leased")]
    )
    assert storage.lease() is not None and storage.lease() is not None  # "now", then "leased"
    storage.release(now_, count_attempt=False)  # back at the head
    assert sorted(storage.waiting_ids()) == sorted([later, now_])
    assert storage.release_now(later) and not storage.release_now(later) and not storage.release_now(now_)
    counts = storage.counts()
    assert (counts.ready_tasks, counts.delayed_tasks) == (3, 0) and storage.next_release == math.inf
    assert _leased_payloads(storage) == [b"now", b"later"]


def test_a_durable_queue_keeps_release_times_and_priorities_across_a_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "q")
    now = time.time()
    s = LMDBStorage(path, map_size=1 << 20)
    s.open()
    s.put_many(
        [
            (ChunkMeta(OWNER, 1, 1), b"plain"),
            (ChunkMeta(OWNER, 2, 1, not_before=now + 60, priority=2), b"later"),
            (ChunkMeta(OWNER, 3, 1, not_before=now - 1), b"passed while down"),
            (ChunkMeta(OWNER, 4, 1, priority=9), b"urgent"),
        ]
    )
    s.close()
    s = LMDBStorage(path, map_size=1 << 20)
    s.open()
    try:
        assert s.counts().delayed_tasks == 1 and s.next_release == now + 60
        assert _leased_payloads(s) == [b"urgent", b"plain", b"passed while down"]
        assert s.release_due(now + 60) == 1
        assert _leased_payloads(s) == [b"later"]
    finally:
        s.close()


def test_a_plain_chunk_keeps_the_head_earlier_versions_wrote_and_both_heads_read() -> None:
    plain = ChunkMeta(OWNER, 1, 10)
    assert len(plain.pack()) == ChunkMeta.SIZE == 28  # what every earlier version stored
    assert ChunkMeta.unpack(plain.pack()) == plain
    timed = ChunkMeta(OWNER, 1, 10, 1_800_000_000.5, -7)
    assert ChunkMeta.unpack(timed.pack()) == timed


def test_every_head_reads_back_with_its_first_task_id_and_tags_and_bad_tags_are_refused() -> None:
    heads = [
        ChunkMeta(OWNER, 1, 10, base=77),
        ChunkMeta(OWNER, 1, 10, 1_800_000_000.5, -7, base=77),
        ChunkMeta(OWNER, 1, 10, base=77, expires=1_800_000_000.0, rate_key=b"mod.fn", rate=2.5),
        ChunkMeta(OWNER, 1, 1, 5.0, 0, 3, unique_key=b"user-42", unique_for=60.0),
    ]
    assert len({len(h.pack()) for h in heads[:2]} | {28, 40}) == 4  # every layout has its own size
    for head in heads:
        assert ChunkMeta.unpack(head.pack()) == head
    with pytest.raises(ValueError, match="tags"):
        ChunkMeta.unpack(heads[2].pack()[:-1])


def test_a_tick_stores_its_chunk_and_the_schedule_record_together(storage: Storage) -> None:
    from zdq.schedules import SCHEDULED

    chunk_id = storage.put_tick(ChunkMeta(SCHEDULED, 5, 1), b"task", 5, lambda cid: f"record of {cid}".encode())
    leased = storage.lease()
    assert leased is not None and leased.chunk_id == chunk_id and _payload(leased) == b"task" and leased.meta.seq == 5
    if isinstance(storage, LMDBStorage):  # kept with the queue; a memory queue's live in its broker
        storage.close()
        again = LMDBStorage(storage.path)
        again.open()
        try:
            assert again.stored_schedules() == [f"record of {chunk_id}".encode()]
            assert again.meta(chunk_id) == ChunkMeta(SCHEDULED, 5, 1)
            again.write_schedule(5, None, now=True)
            assert again.stored_schedules() == []
        finally:
            again.close()


def test_a_queue_holds_nothing_until_a_chunk_is_stored_and_again_once_it_is_acknowledged(storage: Storage) -> None:
    assert storage.holds_nothing()
    [chunk_id] = storage.put_many([(_meta(1), b"chunk")])
    assert not storage.holds_nothing()
    storage.lease()
    storage.ack_many([chunk_id])
    storage.commit(force=True)  # the acknowledgement written (a durable queue holds it back)
    assert storage.holds_nothing()
