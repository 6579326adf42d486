"""LMDB durability across processes: recovery, ownership, a full disk (what one process does
alone is in tests/unit/test_lmdb.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zdq.errors import QueueLocked, StorageFull
from zdq.storage import ChunkMeta, LMDBStorage

OWNER = b"o" * 16


def _meta(seq: int, n: int = 100) -> ChunkMeta:
    return ChunkMeta(OWNER, seq, n)


def test_a_reopened_queue_serves_every_unacknowledged_chunk_including_leased_ones(tmp_path: Path) -> None:
    path = str(tmp_path / "q")
    s = LMDBStorage(path)
    s.open()
    ids = s.put_many([(_meta(i), f"chunk-{i}".encode()) for i in range(5)])
    first, second = s.lease(), s.lease()
    assert first is not None and second is not None
    s.ack_many([first.chunk_id])
    s.commit(force=True)
    # `zdq inspect` reads the live queue from another process, read-only.
    proc = subprocess.run(
        [sys.executable, "-m", "zdq.cli", "inspect", str(tmp_path), "--json"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    (report,) = json.loads(proc.stdout)
    assert (report["ready_tasks"], report["leased_tasks"], report["dead_tasks"]) == (300, 100, 0)
    assert report["size_bytes"] > 0
    s.close()

    again = LMDBStorage(path)
    again.open()
    counts = again.counts()
    assert (counts.ready_chunks, counts.leased_chunks, counts.ready_tasks) == (4, 0, 400)
    served = [again.lease() for _ in range(4)]
    assert [bytes(x.payload) for x in served if x] == [f"chunk-{i}".encode() for i in range(1, 5)]
    assert [x.chunk_id for x in served if x] == ids[1:]
    new = again.put_many([(_meta(9), b"after")])
    assert new[0] > ids[-1]  # ids keep growing: FIFO order survives restarts
    again.close()


def test_a_second_owner_of_a_live_queue_directory_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "q")
    owner = LMDBStorage(path)
    owner.open()
    owner.put_many([(_meta(1), b"x")])
    with pytest.raises(QueueLocked):
        LMDBStorage(path).open()
    # Another process too (flock is per open file, the kernel drops it when its owner dies).
    code = f"from zdq.storage import LMDBStorage\nLMDBStorage({path!r}).open()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "QueueLocked" in proc.stderr
    owner.close()
    after = LMDBStorage(path)
    after.open()
    assert after.counts().ready_chunks == 1
    after.close()


def test_the_lock_is_released_when_the_owning_process_is_killed(tmp_path: Path) -> None:
    path = str(tmp_path / "q")
    code = (
        "import os, signal\nfrom zdq.storage import LMDBStorage, ChunkMeta\n"
        f"s = LMDBStorage({path!r}); s.open(); s.put_many([(ChunkMeta(b'o'*16, 1, 3), b'kept')])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -9
    s = LMDBStorage(path)
    s.open()
    leased = s.lease()
    assert leased is not None and bytes(leased.payload) == b"kept"  # type: ignore[arg-type]
    s.close()


def test_a_full_disk_is_storage_full_and_nothing_unconfirmed_is_stored(small_disk: Path) -> None:
    s = LMDBStorage(str(small_disk / "q"), map_size=1 << 20)
    s.open()
    payload = os.urandom(256 * 1024)
    stored = 0
    with pytest.raises(StorageFull):
        for i in range(100):
            s.put_many([(_meta(i), payload)])
            stored += 1
    assert 0 < stored < 100
    assert s.counts().ready_chunks == stored
    s.close()
    again = LMDBStorage(str(small_disk / "q"), map_size=1 << 20)
    again.open()
    assert again.counts().ready_chunks == stored
    again.close()
