"""Attempts lost with a durable queue's broker: a chunk out to a consumer in the broker's own
process when the broker died used an attempt (its consumer died with it), as one whose consumer
died alone does, and every later broker of the queue counts on from there.

Before, the count lived in the broker's memory: a task that killed its worker, when that worker
hosted its queue's broker too, came back from the queue's LMDB files as new, and ran (and killed
the worker) for ever; a chunk of many tasks was never split. Pure code over LMDB files under
``tmp_path``; a broker's death is :meth:`LMDBStorage._release` without the close (what a SIGKILL
leaves: the last commit and the lease journal, nothing held back).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from zdq.storage import ChunkMeta, LMDBStorage

pytestmark = pytest.mark.unit

DRIVER = b"d" * 16


def _open(path: Path) -> LMDBStorage:
    s = LMDBStorage(str(path), map_size=1 << 20)
    s.open()
    return s


def _killed(s: LMDBStorage) -> None:
    """The broker dies: nothing more is written, the lock goes with the process."""
    s._release()


def _attempt(s: LMDBStorage, chunk_id: int, with_broker: bool = True) -> int:
    """Lease the chunk at the head (it must be ``chunk_id``) to a consumer of the broker's process
    (``with_broker``) or of another; its attempt."""
    leased = s.lease(with_broker=with_broker)
    assert leased is not None and leased.chunk_id == chunk_id
    return leased.attempt


def test_a_chunk_out_when_its_broker_died_comes_back_as_its_next_attempt_each_time(tmp_path: Path) -> None:
    path = tmp_path / "q"
    s = _open(path)
    (a,) = s.put_many([(ChunkMeta(DRIVER, 1, 1), b"a")])
    assert _attempt(s, a) == 1
    s.commit(force=True)  # its lease mark is written
    _killed(s)
    s = _open(path)
    assert s.is_ready(a) and s.may_have_started(a)
    assert _attempt(s, a) == 2  # the consumer is told one run of it was lost (a crash)
    _killed(s)  # handed out since the last commit: known from the lease journal alone
    s = _open(path)
    assert _attempt(s, a) == 3
    s.close()


def test_a_chunk_out_to_a_consumer_of_another_process_loses_no_attempt_with_the_broker(tmp_path: Path) -> None:
    path = tmp_path / "q"
    s = _open(path)
    a, b = s.put_many([(ChunkMeta(DRIVER, 1, 1), b"a"), (ChunkMeta(DRIVER, 2, 1), b"b")])
    assert _attempt(s, a, with_broker=False) == 1
    s.commit(force=True)
    assert _attempt(s, b, with_broker=False) == 1  # in the journal alone
    _killed(s)
    s = _open(path)
    assert s.may_have_started(a) and s.may_have_started(b)
    assert _attempt(s, a) == 1 and _attempt(s, b) == 1  # their consumer lives on: no crash
    s.release(a, count_attempt=False)
    assert _attempt(s, a, with_broker=False) == 1  # out to this process, then to another: the latest counts
    _killed(s)
    s = _open(path)
    assert _attempt(s, a) == 1 and _attempt(s, b) == 2
    s.close()


def test_a_clean_stop_loses_no_attempt_of_the_chunks_out(tmp_path: Path) -> None:
    path = tmp_path / "q"
    s = _open(path)
    a, b = s.put_many([(ChunkMeta(DRIVER, 1, 2), b"a"), (ChunkMeta(DRIVER, 2, 2), b"b")])
    _attempt(s, a)
    s.commit(force=True)
    s.close()  # the pool closed with a chunk out: its consumer stops it, no crash
    s = _open(path)
    assert s.may_have_started(a)  # still: a cancellation cannot say "never started"
    assert _attempt(s, a) == 1 and _attempt(s, b) == 1
    s.close()


def test_attempts_lost_with_consumers_survive_a_clean_stop_and_a_kill_adds_to_them(tmp_path: Path) -> None:
    path = tmp_path / "q"
    s = _open(path)
    (a,) = s.put_many([(ChunkMeta(DRIVER, 1, 1), b"a")])
    _attempt(s, a)
    s.release(a)  # its consumer died holding it
    s.close()
    s = _open(path)
    assert _attempt(s, a) == 2
    s.commit(force=True)
    _killed(s)
    s = _open(path)
    assert _attempt(s, a) == 3
    s.release(a, count_attempt=False)  # given back unstarted: no attempt used
    assert _attempt(s, a) == 3
    s.close()


def test_a_done_chunk_whose_results_were_kept_is_not_counted_and_acknowledged_chunks_leave_no_count(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q"
    s = _open(path)
    a, b = s.put_many([(ChunkMeta(DRIVER, 1, 1), b"a"), (ChunkMeta(DRIVER, 2, 1), b"b")])
    _attempt(s, a)
    s.keep_results(a, b"c" * 16, b"results")  # done; its driver had not taken the results
    _attempt(s, b)
    s.commit(force=True)
    _killed(s)
    s = _open(path)
    assert a in s.recovered_results and s.is_leased(a)
    assert _attempt(s, b) == 2
    s.ack_many([a, b])
    s.commit(force=True)
    _killed(s)
    s = _open(path)
    assert s.meta(a) is None and s.meta(b) is None
    (c,) = s.put_many([(ChunkMeta(DRIVER, 3, 1), b"c")])
    assert _attempt(s, c) == 1
    s.close()


def test_split_parts_start_afresh_and_a_requeued_dead_letter_too(tmp_path: Path) -> None:
    path = tmp_path / "q"
    s = _open(path)
    (a,) = s.put_many([(ChunkMeta(DRIVER, 1, 2), b"a")])
    _attempt(s, a)
    s.commit(force=True)
    _killed(s)
    s = _open(path)
    assert _attempt(s, a) == 2  # its consumer splits it, a crash having been counted
    parts = s.split(a, [(ChunkMeta(DRIVER, 1, 1), b"a0"), (ChunkMeta(DRIVER, 1, 1), b"a1")])
    assert _attempt(s, parts[0]) == 1
    s.commit(force=True)
    _killed(s)
    s = _open(path)
    assert _attempt(s, parts[0]) == 2  # the part out when its broker died
    assert _attempt(s, parts[1]) == 1
    assert s.dead_letter(parts[0], "killed its consumer 2 times")
    s.close()
    s = _open(path)
    assert s.requeue_dead() == 1  # at the tail, behind the part out at the clean stop
    assert _attempt(s, parts[1]) == 1
    assert _attempt(s, parts[0]) == 1
    s.close()
