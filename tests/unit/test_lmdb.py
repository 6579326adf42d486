"""LMDB durability in one process: bad directories, full maps, space reuse, crash-safe flags
(recovery and ownership across processes, and a full disk, are in tests/test_lmdb.py)."""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest

from zdq.config import default_dirpath
from zdq.errors import QueueLocked, StorageCorrupt, StorageError
from zdq.storage import ChunkMeta, LMDBStorage
from zdq.storage.lmdb import holds_work, is_queue_dir

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
    with pytest.raises(StorageCorrupt, match="data.mdb is not an LMDB database"):
        LMDBStorage(str(path)).open()
    assert (path / "data.mdb").read_bytes() == before
    assert sorted(os.listdir(path)) == ["data.mdb"]  # no lock file made in it either


def _contents(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def test_an_empty_data_file_is_refused_as_empty_and_the_directory_is_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "jobs-queue-0"
    path.mkdir()
    (path / "data.mdb").write_bytes(b"")
    with pytest.raises(StorageCorrupt, match="its data.mdb is an empty file; it was left untouched"):
        LMDBStorage(str(path)).open()
    assert _contents(path) == {"data.mdb": b""}  # LMDB would have written a new database into it


def _half_made(path: Path, how: str) -> None:
    """What an open killed before its first commit leaves: zdq's lock file, and LMDB's files."""
    import lmdb

    path.mkdir()
    (path / "zdq.lock").write_bytes(b"")
    if how == "empty data file":
        (path / "data.mdb").write_bytes(b"")
        return
    env = lmdb.open(str(path), max_dbs=2)
    if how == "meta table, no format":
        with env.begin(write=True) as txn:
            env.open_db(b"meta", txn=txn)
    env.close()


@pytest.mark.parametrize("how", ["empty data file", "no table", "meta table, no format"])
def test_a_queue_left_half_made_by_a_killed_open_is_made_afresh(tmp_path: Path, how: str) -> None:
    """A worker killed while it created a new durable queue left its directory refused for good
    (StorageCorrupt, at every later open of the pool), though it never held anything."""
    path = tmp_path / "jobs-queue-0"
    _half_made(path, how)
    s = LMDBStorage(str(path), map_size=1 << 20)
    s.open()
    try:
        (chunk_id,) = s.put_many([(_meta(1), b"payload")])
        assert s.lease() is not None
    finally:
        s.close()
    again = LMDBStorage(str(path), map_size=1 << 20)
    again.open()
    try:
        assert again.meta(chunk_id) == _meta(1)
    finally:
        again.close()


def test_a_directory_with_zdqs_lock_that_holds_chunks_without_a_format_is_still_refused(tmp_path: Path) -> None:
    import lmdb

    path = tmp_path / "jobs-queue-0"
    path.mkdir()
    (path / "zdq.lock").write_bytes(b"")
    env = lmdb.open(str(path), max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put((1).to_bytes(8, "big"), b"head", db=env.open_db(b"heads", txn=txn))
    env.close()
    before = _contents(path)
    with pytest.raises(StorageCorrupt, match="not a zdq queue"):
        LMDBStorage(str(path)).open()
    assert {n: v for n, v in _contents(path).items() if n != "lock.mdb"} == {
        n: v for n, v in before.items() if n != "lock.mdb"
    }


def test_an_lmdb_database_that_is_not_a_queue_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    import lmdb

    path = tmp_path / "jobs-queue-0"
    env = lmdb.open(str(path), max_dbs=1, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v", db=env.open_db(b"other", txn=txn))
    env.close()
    before = _contents(path)
    with pytest.raises(StorageCorrupt, match="an LMDB database that is not a zdq queue"):
        LMDBStorage(str(path)).open()
    assert _contents(path) == before


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
    is flushed (data, then meta); acknowledgements held back are written within the delay, and at
    close, so a reopened queue does not serve them again."""
    path = str(tmp_path / "q")
    s = LMDBStorage(path)
    s.open()
    try:
        assert s._env is not None
        flags = s._env.flags()
        assert flags["sync"] and flags["metasync"]
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


def test_a_queue_discarded_after_a_failed_placement_is_removed_only_if_this_open_created_it_and_it_holds_nothing(
    tmp_path: Path,
) -> None:
    created = LMDBStorage(str(tmp_path / "new"))
    created.open()
    assert created.holds_nothing()
    created.discard()
    assert not (tmp_path / "new").exists()  # a failed open leaves no queue behind

    written = LMDBStorage(str(tmp_path / "written"))
    written.open()
    written.put_many([(_meta(1), b"chunk")])
    assert not written.holds_nothing()
    written.discard()
    assert is_queue_dir(str(tmp_path / "written"))  # it holds a task: kept, however it was opened

    earlier = LMDBStorage(str(tmp_path / "old"))  # made by an earlier open, closed since
    earlier.open()
    earlier.close()
    reopened = LMDBStorage(str(tmp_path / "old"))
    reopened.open()
    assert reopened.holds_nothing()
    reopened.discard()
    assert is_queue_dir(str(tmp_path / "old"))  # not this open's: an empty queue is still someone's


def test_only_queue_directories_holding_tasks_or_schedules_count_as_holding_work(tmp_path: Path) -> None:
    empty = LMDBStorage(str(tmp_path / "empty"))
    empty.open()
    empty.close()
    full = LMDBStorage(str(tmp_path / "full"))
    full.open()
    full.put_many([(_meta(1), b"chunk")])
    full.close()
    scheduled = LMDBStorage(str(tmp_path / "scheduled"))
    scheduled.open()
    scheduled.write_schedule(1, b"a schedule's record", now=True)
    scheduled.close()
    assert not holds_work(str(tmp_path / "empty")) and holds_work(str(tmp_path / "full"))
    assert holds_work(str(tmp_path / "scheduled")) and not holds_work(str(tmp_path / "absent"))
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "data.mdb").write_bytes(b"not an LMDB database")
    assert holds_work(str(tmp_path / "unreadable"))  # taken to hold some: the warning is kept


def test_a_directory_the_user_made_before_is_kept_by_a_discard_even_when_empty(tmp_path: Path) -> None:
    made = tmp_path / "made-by-the-user"
    made.mkdir()
    s = LMDBStorage(str(made))
    s.open()
    assert s.holds_nothing()
    s.discard()
    assert made.is_dir()  # not this open's directory: closed, never removed


def test_a_lock_file_replaced_while_it_was_being_locked_is_let_go_and_the_current_one_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a discard does: the lock file this opener opened is unlinked, and another made, before
    # its flock succeeds on the orphan.
    path = tmp_path / "q"
    lock = path / "zdq.lock"
    flock = fcntl.flock
    replaced = []

    def replace_once(fd: int, op: int) -> Any:
        if not replaced:
            replaced.append(os.fstat(fd).st_ino)
            lock.unlink()
            lock.write_bytes(b"")
        return flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", replace_once)
    s = LMDBStorage(str(path))
    s.open()
    monkeypatch.undo()
    try:
        assert replaced and s._lock_fd is not None
        assert os.fstat(s._lock_fd).st_ino == os.stat(lock).st_ino != replaced[0]
        with pytest.raises(QueueLocked):  # the file at the path is the one held: a second broker is refused
            LMDBStorage(str(path)).open()
    finally:
        s.close()


def test_a_lock_file_replaced_at_every_try_is_refused_naming_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "q"
    flock = fcntl.flock

    def replace_always(fd: int, op: int) -> Any:
        (path / "zdq.lock").unlink()
        return flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", replace_always)
    with pytest.raises(StorageError, match=f"cannot lock queue {path}: .*replaced"):
        LMDBStorage(str(path)).open()


def test_the_default_dirpath_is_this_users_own_directory_made_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    base = default_dirpath()
    assert base == str(tmp_path / f"zdq-{os.getuid()}")
    s = LMDBStorage(os.path.join(base, "default-queue-0"))
    s.open()
    s.close()
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o700 and os.stat(base).st_uid == os.getuid()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_default_dirpath_its_group_or_others_may_write_is_refused_and_left_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    base = default_dirpath()
    os.mkdir(base)
    os.chmod(base, mode)
    with pytest.raises(StorageError, match=f"{base}, the default directory .* is writable by its group or by others"):
        LMDBStorage(os.path.join(base, "default-queue-0")).open()
    assert stat.S_IMODE(os.stat(base).st_mode) == mode and os.listdir(base) == []


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")
def test_a_default_dirpath_or_a_queue_directory_another_user_owns_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    base = default_dirpath()
    os.mkdir(base, 0o700)
    os.chown(base, 4242, 4242)
    with pytest.raises(StorageError, match=f"{base}, the default directory .* is owned by uid 4242"):
        LMDBStorage(os.path.join(base, "default-queue-0")).open()
    assert os.stat(base).st_uid == 4242 and os.listdir(base) == []

    # A dirpath the user names may be shared (a group-writable project directory), but a queue
    # directory in it that another user made is theirs.
    shared = tmp_path / "project"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    mine = LMDBStorage(str(shared / "default-queue-0"))
    mine.open()
    mine.close()
    theirs = shared / "default-queue-1"
    theirs.mkdir()
    os.chown(theirs, 4242, 4242)
    with pytest.raises(StorageError, match="owned by uid 4242.*another user's queue"):
        LMDBStorage(str(theirs)).open()
    assert os.listdir(theirs) == []
