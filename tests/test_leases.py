"""The lease table on its own (no sockets, no cluster): every chunk has one state."""

from __future__ import annotations

from pathlib import Path

import pytest

from zdq.broker.leases import LeaseTable
from zdq.errors import ProtocolError
from zdq.storage import ChunkMeta, LMDBStorage, MemoryStorage, Storage

OWNER = b"d" * 16
A, B = b"a" * 16, b"b" * 16


@pytest.fixture(params=["memory", "lmdb"])
def table(request: pytest.FixtureRequest, tmp_path: Path) -> LeaseTable:
    storage: Storage = MemoryStorage() if request.param == "memory" else LMDBStorage(str(tmp_path / "q"))
    storage.open()
    request.addfinalizer(storage.close)
    return LeaseTable(storage)


def _put(table: LeaseTable, n: int) -> list[int]:
    return table.put([(ChunkMeta(OWNER, seq, 10), f"chunk-{seq}".encode()) for seq in range(1, n + 1)])


def test_a_chunk_goes_ready_leased_done_and_is_gone_only_after_its_drivers_receipt(table: LeaseTable) -> None:
    (chunk_id,) = _put(table, 1)
    leased = table.lease(A)
    assert leased is not None and leased.chunk_id == chunk_id
    assert table.counts().leased_tasks == 10
    held = table.finish(chunk_id, A, b"results")
    assert held is not None and held.done
    counts = table.counts()
    assert (counts.ready_tasks, counts.leased_tasks, counts.done_tasks) == (0, 0, 10)
    table.sent(held, OWNER)
    assert table.forget([chunk_id], B) == 0  # only the driver it was sent to may acknowledge it
    assert table.storage.meta(chunk_id) is not None  # still stored: a broker restart re-runs it
    assert table.forget([chunk_id], OWNER) == 1
    assert table.storage.meta(chunk_id) is None
    assert table.counts().done_tasks == 0


def test_a_late_done_of_a_chunk_parked_since_its_lease_ended_takes_it_back_and_counts_stay_true(
    table: LeaseTable,
) -> None:
    # Reviewer 28b: the chunk had gone back and been parked (its rate key's bucket empty) before
    # its holder's DONE was handled: the DONE was kept without taking it back, the leased counts
    # went negative, and the broker's next SYNC answer could not be encoded.
    (chunk_id,) = _put(table, 1)
    table.lease(A)
    assert table.expire(A)[0] == [chunk_id]
    table.storage.park(chunk_id)
    assert table.counts().delayed_tasks == 10
    held = table.finish(chunk_id, A, b"results")
    assert held is not None and held.done
    counts = table.counts()
    assert (counts.ready_tasks, counts.delayed_tasks, counts.leased_chunks, counts.leased_tasks) == (0, 0, 0, 0)
    assert counts.done_tasks == 10 and table.lease(B) is None  # it never runs again


def test_a_second_done_of_the_same_chunk_is_a_duplicate(table: LeaseTable) -> None:
    (chunk_id,) = _put(table, 1)
    table.lease(A)
    assert table.finish(chunk_id, A, b"first") is not None
    assert table.finish(chunk_id, A, b"second") is None


def test_an_expired_lease_returns_the_chunk_first_and_a_late_done_of_its_holder_still_counts(
    table: LeaseTable,
) -> None:
    first, second = _put(table, 2)
    table.lease(A)
    returned, lost = table.expire(A)
    assert returned == [first] and lost == []
    assert table.counts().ready_tasks == 20
    assert table.held_by(A, first) is not None  # the previous holder may still report it
    held = table.finish(first, A, b"late results")
    assert held is not None and held.done
    # It was taken back from the queue: the next lease is the other chunk, not a second run.
    again = table.lease(B)
    assert again is not None and again.chunk_id == second


def test_a_late_word_of_a_previous_holder_while_another_consumer_holds_the_chunk_is_ignored_not_a_forgery(
    table: LeaseTable,
) -> None:
    """A consumer stopped past its lease comes back with the chunk's DONE (or DEAD, or RETRIED)
    after the chunk went to another consumer: refused as a peer that never held it, it counted in
    bad_messages, which operators read as forgeries. It is ignored: the chunk's holder now reports
    it, and what that one says (its SPLIT, its DEAD, its DONE) still counts, once."""
    C = b"c" * 16
    (chunk_id,) = table.put([(ChunkMeta(OWNER, 1, 2, base=100), b"chunk")])
    table.lease(A)
    table.expire(A)
    table.lease(B)
    table.expire(B)
    assert table.lease(C) is not None
    assert table.held_by(A, chunk_id) is None and table.held_before(A, chunk_id)
    assert table.done_by(A, chunk_id, b"late results") is None  # ignored: C holds it
    assert table.done_by(B, chunk_id, b"late results") is None
    assert table.dead_letter(A, chunk_id, b"task", "failed", 100) is None  # no second dead letter
    table.note_failed(B, chunk_id, [(100, 1)])  # a late word too: nothing kept
    assert chunk_id not in table.failed
    assert table.counts().dead_tasks == 0
    meta = table.dead_letter(C, chunk_id, b"task", "failed", 100)
    assert meta is not None and table.counts().dead_tasks == 1
    held = table.done_by(C, chunk_id, b"results")
    assert held is not None and held.results == b"results"
    with pytest.raises(ProtocolError):
        table.done_by(b"x" * 16, _put(table, 1)[0], b"forged")  # never held it: refused


def test_a_late_done_of_a_previous_holder_counts_while_no_one_holds_the_chunk(table: LeaseTable) -> None:
    (chunk_id,) = _put(table, 1)
    table.lease(A)
    table.expire(A)
    table.lease(B)
    table.expire(B)  # back in the queue: nobody holds it
    held = table.done_by(A, chunk_id, b"late results")
    assert held is not None and held.results == b"late results"
    assert table.lease(B) is None  # taken back: it does not run once more
    assert table.done_by(B, chunk_id, b"later") is None  # a duplicate


def test_a_split_from_a_previous_holder_changes_nothing_and_is_no_forgery(table: LeaseTable) -> None:
    (chunk_id,) = _put(table, 1)
    table.lease(A)
    table.expire(A)
    table.lease(B)
    assert table.split_by(A, chunk_id, [b"part"] * 10) is False
    assert table.held_by(B, chunk_id) is not None and table.counts().leased_tasks == 10
    assert table.split_by(B, chunk_id, [b"part"] * 10) is True  # the holder's own split still goes
    with pytest.raises(ProtocolError):
        table.split_by(b"x" * 16, chunk_id, [b"part"] * 10)


def test_a_chunk_acknowledged_early_is_lost_with_its_consumer_and_never_runs_again(table: LeaseTable) -> None:
    (chunk_id,) = _put(table, 1)
    table.lease(A)
    assert table.ack_early(chunk_id)
    assert table.storage.meta(chunk_id) is None  # at most once: it left storage on receipt
    assert table.counts().leased_tasks == 10  # still running, and counted so
    returned, lost = table.expire(A)
    assert returned == [] and [i for i, _ in lost] == [chunk_id]
    assert table.lease(B) is None


def test_the_seqs_of_a_drivers_chunks_are_known_in_every_state(table: LeaseTable) -> None:
    ids = _put(table, 3)
    table.lease(A)
    table.finish(ids[0], A, b"results")
    assert table.seqs_of(OWNER) == {1, 2, 3}
    assert table.seqs_of(B) == set()


def test_a_split_replaces_a_leased_chunk_by_parts_first_in_line(table: LeaseTable) -> None:
    first, _ = _put(table, 2)
    table.lease(A)
    parts = table.split(first, [(ChunkMeta(OWNER, 1, 1), b"p1"), (ChunkMeta(OWNER, 1, 1), b"p2")])
    assert len(parts) == 2
    nxt = table.lease(B)
    assert nxt is not None and nxt.chunk_id == parts[0] and bytes(nxt.payload) == b"p1"  # type: ignore[arg-type]
    assert table.get(first) is None


def test_a_driver_finds_its_chunk_and_the_parts_it_was_split_into_and_no_one_elses(table: LeaseTable) -> None:
    first, second = _put(table, 2)
    assert table.locate(OWNER, 1, first, [0, 3, 42]) == {first: {0: 0, 3: 3}}  # past the chunk: ignored
    assert table.locate(OWNER, 2, 0, [1]) == {second: {1: 1}}  # not confirmed yet: found by its seq
    assert table.locate(A, 1, first, [0]) == {}  # another driver
    assert table.locate(OWNER, 2, first, [0]) == {}  # the wrong seq for that id
    table.lease(A)
    parts = table.split(first, [(ChunkMeta(OWNER, 1, 1), f"p{i}".encode()) for i in range(10)])
    assert table.locate(OWNER, 1, first, [2, 7]) == {parts[2]: {0: 2}, parts[7]: {0: 7}}
    assert table.locate(A, 1, first, [2]) == {}  # a forged CANCEL by another peer finds nothing
    assert table.locate(A, 12345, first, [2]) == {}


def test_results_no_driver_took_survive_a_restart_of_a_durable_queue_and_the_chunk_does_not_run_again(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "q")
    storage = LMDBStorage(path)
    storage.open()
    table = LeaseTable(storage)
    first, second = _put(table, 2)
    table.lease(A)
    held = table.finish(first, A, b"results of the first")
    assert held is not None
    table.keep(first, held)  # no driver to take them
    storage.close()

    storage = LMDBStorage(path)
    storage.open()
    try:
        table = LeaseTable(storage)
        (done,) = list(table.done_entries())
        assert done[0] == first and done[1].results == b"results of the first" and done[1].consumer == A
        nxt = table.lease(B)  # the kept chunk is not ready: only the other one runs
        assert nxt is not None and nxt.chunk_id == second and table.lease(B) is None
        table.sent(done[1], OWNER)
        assert table.forget([first], OWNER) == 1
        storage.commit(force=True)
    finally:
        storage.close()
    storage = LMDBStorage(path)
    storage.open()
    try:
        assert storage.recovered_results == {} and storage.meta(first) is None
    finally:
        storage.close()


def test_the_attempts_a_consumer_retried_are_kept_for_the_chunks_next_delivery_and_its_parts(table: LeaseTable) -> None:
    """A consumer dying between a task's retries gave it its retries anew on the next consumer
    (retries=2 ran five times): the broker keeps what each RETRIED says, until the chunk is done."""
    (chunk_id,) = table.put([(ChunkMeta(OWNER, 1, 3, base=100), b"chunk")])
    table.lease(A)
    table.note_failed(A, chunk_id, [(101, 1)])
    table.note_failed(A, chunk_id, [(101, 2), (102, 1)])
    table.note_failed(A, chunk_id, [(101, 1)])  # never less than said before
    assert table.failed[chunk_id] == {101: 2, 102: 1}
    with pytest.raises(ProtocolError):
        table.note_failed(B, chunk_id, [(101, 5)])  # B never held it
    with pytest.raises(ProtocolError):
        table.note_failed(A, chunk_id, [(7, 1)])  # not a task of the chunk
    table.expire(A)  # A died: the chunk goes back, and its parts take their tasks' counts
    table.lease(B)
    parts = table.split_by(B, chunk_id, [b"p0", b"p1", b"p2"])
    assert parts and chunk_id not in table.failed
    counts = sorted(table.failed.values(), key=lambda d: sorted(d))
    assert counts == [{101: 2}, {102: 1}]
    for part_id in list(table.failed):
        leased = table.lease(A)
        assert leased is not None
        table.finish(leased.chunk_id, A, b"results")
    leased = table.lease(A)
    while leased is not None:
        table.finish(leased.chunk_id, A, b"results")
        leased = table.lease(A)
    assert table.failed == {}  # a chunk done forgets its counts


def test_a_previous_holders_late_word_after_the_chunk_was_split_or_done_is_ignored_not_a_forgery(
    table: LeaseTable,
) -> None:
    """Split (as a redelivered chunk is) or done and acknowledged, the chunk forgets its previous
    holders: their RETRIED and DEAD, late, were refused as forgeries (bad_messages)."""
    (chunk_id,) = table.put([(ChunkMeta(OWNER, 1, 3, base=100), b"chunk")])
    table.lease(A)
    table.expire(A)
    table.lease(B)
    assert table.split_by(B, chunk_id, [b"p0", b"p1", b"p2"])
    table.note_failed(A, chunk_id, [(101, 1)])
    assert table.dead_letter(A, chunk_id, b"task", "failed", 101) is None
    assert table.done_by(A, chunk_id, b"late") is None
    assert chunk_id not in table.failed and table.counts().dead_tasks == 0
    (other,) = table.put([(ChunkMeta(OWNER, 2, 3, base=200), b"chunk")])
    leased = table.lease(A)
    while leased is not None and leased.chunk_id != other:  # the parts first
        table.finish(leased.chunk_id, A, b"results")
        leased = table.lease(A)
    table.expire(A)
    table.lease(B)
    held = table.done_by(B, other, b"results")
    assert held is not None
    table.sent(held, OWNER)
    assert table.forget([other], OWNER) == 1
    table.note_failed(A, other, [(201, 1)])
    assert table.dead_letter(A, other, b"task", "failed", 201) is None
    assert table.counts().dead_tasks == 0 and table.failed == {}


def test_an_early_acknowledged_chunk_lost_with_its_consumer_keeps_no_retry_counts(table: LeaseTable) -> None:
    (chunk_id,) = table.put([(ChunkMeta(OWNER, 1, 3, base=100), b"chunk")])
    table.lease(A)
    assert table.ack_early(chunk_id)
    table.note_failed(A, chunk_id, [(101, 1)])
    _, lost = table.expire(A)
    assert [i for i, _ in lost] == [chunk_id] and table.failed == {}


def test_a_retried_from_a_peer_that_never_held_a_waiting_chunk_is_a_protocol_error(table: LeaseTable) -> None:
    (chunk_id,) = table.put([(ChunkMeta(OWNER, 1, 3, base=100), b"chunk")])
    with pytest.raises(ProtocolError):  # it raised KeyError, which ended the broker's loop
        table.note_failed(B, chunk_id, [(101, 1)])
    assert table.failed == {}
