"""LMDB durability in one process: bad directories, full maps, space reuse, crash-safe flags
(recovery and ownership across processes, and a full disk, are in tests/test_lmdb.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from zdq.errors import StorageCorrupt
from zdq.storage import ChunkMeta, LMDBStorage

OWNER = b"o" * 16


def _meta(seq: int, n: int = 100) -> ChunkMeta:
    return ChunkMeta(OWNER, seq, n)


def test_a_directory_that_is_not_a_queue_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "photos"
    path.mkdir()
    (path / "holiday.jpg").write_bytes(b"\xff\xd8 not a queue")
    with pytest.raises(StorageCorrupt, match="not a zdq queue"):
        LMDBStorage(str(path)).open()
    assert sorted(os.listdir(path)) == ["holiday.jpg"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(StorageCorrupt):
        LMDBStorage(str(a_file)).open()


def test_a_corrupt_queue_file_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "q"
    path.mkdir()
    (path / "data.mdb").write_bytes(os.urandom(64 * 1024))
    before = (path / "data.mdb").read_bytes()
    with pytest.raises(StorageCorrupt):
        LMDBStorage(str(path)).open()
    assert (path / "data.mdb").read_bytes() == before


def test_the_map_grows_when_full(tmp_path: Path) -> None:
    s = LMDBStorage(str(tmp_path / "q"), map_size=256 * 1024)
    s.open()
    payload = os.urandom(64 * 1024)
    for i in range(40):  # 2.5 MiB through a 256 KiB map
        s.put_many([(_meta(i), payload)])
    assert s.counts().ready_chunks == 40
    s.close()


def test_draining_a_queue_reuses_its_space(tmp_path: Path) -> None:
    path = tmp_path / "q"
    s = LMDBStorage(str(path), sync=False)
    s.open()
    payload = os.urandom(16 * 1024)
    sizes = []
    for _ in range(5):
        for i in range(200):
            s.put_many([(_meta(i), payload)])
        while (leased := s.lease()) is not None:
            s.ack_many([leased.chunk_id])
        sizes.append((path / "data.mdb").stat().st_size)
    s.close()
    # 5 rounds of 3.2 MB: the file stays at about one round's size instead of growing fivefold.
    assert sizes[-1] <= sizes[0] * 1.5


def test_the_environment_runs_with_lmdbs_crash_safe_flags_and_acknowledgements_reach_the_disk(tmp_path: Path) -> None:
    """Finding 12: unsynced commits may corrupt an LMDB environment on an OS crash. Every commit
    flushes its data; its meta page rides the next flush (metasync off: an OS crash may undo the
    last commit only, whose chunks the broker has not confirmed); acknowledgements held back are
    written within the delay, and at close, so a reopened queue does not serve them again."""
    path = str(tmp_path / "q")
    s = LMDBStorage(path)
    s.open()
    try:
        assert s._env is not None
        flags = s._env.flags()
        assert flags["sync"] and not flags["metasync"]
        ids = s.put_many([(_meta(i), b"chunk") for i in range(3)])
        leased = s.lease()
        assert leased is not None and leased.chunk_id == ids[0]
        s.ack_many([ids[0]])
    finally:
        s.close()  # writes what was held back
    s = LMDBStorage(path)
    s.open()
    try:
        assert s.meta(ids[0]) is None and s.counts().ready_chunks == 2
    finally:
        s.close()
    relaxed = LMDBStorage(str(tmp_path / "r"), sync=False)
    relaxed.open()
    try:
        assert relaxed._env is not None and not relaxed._env.flags()["sync"]
    finally:
        relaxed.close()


def test_a_commit_is_on_disk_once_a_later_commit_or_a_flush_has_flushed_its_meta_page(tmp_path: Path) -> None:
    """Design 2 of issue 26, point 5: one flush a commit. A commit's chunks are on disk (``flushed``
    reaches its number) after the next commit that writes something, or after ``flush()``; an
    empty commit flushes nothing and covers nothing."""
    s = LMDBStorage(str(tmp_path / "q"))
    s.open()
    try:
        s.put_many([(_meta(1), b"one")])
        first = s.committed
        assert first > 0 and s.flushed < first  # the meta page of that commit is not flushed yet
        s.commit(force=False)  # nothing held: no transaction, nothing flushed
        assert s.flushed < first
        s.put_many([(_meta(2), b"two")])  # its data flush writes the first commit's meta page
        assert s.committed > first and s.flushed == first
        s.flush()
        assert s.flushed == s.committed
        s.flush()  # nothing left: no flush
        leased = s.lease()
        assert leased is not None
        s.ack_many([leased.chunk_id])
        s.commit(force=True)  # a forced commit is on disk before it returns
        assert s._env is not None and s.flushed == s._env.info()["last_txnid"]
    finally:
        s.close()
    relaxed = LMDBStorage(str(tmp_path / "r"), sync=False)  # promises only to outlive a killed process
    relaxed.open()
    try:
        relaxed.put_many([(_meta(1), b"one")])
        assert relaxed.flushed >= relaxed.committed
    finally:
        relaxed.close()
