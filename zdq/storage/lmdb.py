"""Durable storage on LMDB: one environment per queue directory.

Layout (named sub-databases, big-endian 8-byte keys so a cursor walks in FIFO order)::

    meta    b"format" -> b"zdq-queue-1"
    chunks  id -> payload (opaque bytes)
    heads   id -> ChunkMeta (owner, seq, n_tasks)
    leased  id -> b""          marks only, rewritten freely: recovery makes every chunk ready
    dead    id -> reason (utf-8)

Durability: :meth:`LMDBStorage._write` commits every chunk of a broker round in one transaction and,
with ``sync=True``, flushes it to disk before returning, so the broker confirms only what is on disk.
Other writes (lease marks, acknowledgements) are committed without an explicit flush: a process
that dies loses nothing committed (the data is in the OS page cache), and an OS crash can at worst
undo them, which re-runs a task (at least once) but never loses one. Freed pages are reused, so
draining a queue does not grow its file.

A queue directory is owned by one broker at a time through an exclusive ``flock`` on
``zdq.lock``; the kernel drops it when the owner dies, however it dies.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import struct
from collections.abc import Iterable
from typing import Any

import lmdb

from zdq.errors import QueueLocked, StorageCorrupt, StorageError, StorageFull
from zdq.storage.base import ChunkMeta, Storage

__all__ = ["LMDBStorage", "FORMAT", "inspect_queue", "is_queue_dir"]

logger = logging.getLogger(__name__)

FORMAT = b"zdq-queue-1"
_KEY = struct.Struct(">Q")
_DBS = (b"meta", b"chunks", b"heads", b"leased", b"dead")
_LOCK = "zdq.lock"
_MAX_GROWTH = 64 << 30


def _key(chunk_id: int) -> bytes:
    return _KEY.pack(chunk_id)


def is_queue_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "data.mdb"))


def _check_dir(path: str) -> bool:
    """True if ``path`` holds a queue already; raise if it holds something else."""
    if not os.path.exists(path):
        return False
    if not os.path.isdir(path):
        raise StorageCorrupt(f"{path} is not a directory; it was left untouched")
    if is_queue_dir(path):
        return True
    others = [n for n in os.listdir(path) if n != _LOCK]
    if others:
        raise StorageCorrupt(
            f"{path} is not a zdq queue (it holds {sorted(others)[:5]} and no data.mdb); it was left untouched"
        )
    return False


class LMDBStorage(Storage):
    """Chunks in an LMDB environment under ``path``; survives the broker and its worker.

    Parameters
    ----------
    path : str
        The queue directory (``<dirpath>/<pool name>-queue-<i>``).
    map_size : int
        Initial LMDB map size; it doubles when full while the disk has room.
    sync : bool
        Flush each group commit to disk before confirming it (default). ``False`` survives any
        process being killed, but an OS crash or power loss may lose the last confirmed chunks.
    """

    durable = True

    def __init__(self, path: str, *, map_size: int = 1 << 30, sync: bool = True) -> None:
        super().__init__()
        self.path = path
        self._map_size = map_size
        self._sync = sync
        self._env: lmdb.Environment | None = None
        self._dbs: dict[bytes, Any] = {}
        self._lock_fd: int | None = None
        self._marks: dict[int, bool] = {}  # lease marks to write at the next flush_marks()

    # -- opening --------------------------------------------------------------------------------
    def open(self) -> None:
        existed = _check_dir(self.path)
        os.makedirs(self.path, exist_ok=True)
        self._take_lock()
        try:
            self._env = lmdb.open(
                self.path,
                map_size=self._map_size,
                max_dbs=len(_DBS),
                subdir=True,
                create=not existed,
                sync=False,  # flushed explicitly after group commits (see module docstring)
                metasync=False,
                readahead=False,
                lock=True,
            )
            if existed:
                self._check_format()
            self._dbs = {name: self._env.open_db(name) for name in _DBS}
            with self._env.begin(write=True) as txn:
                if not existed:
                    txn.put(b"format", FORMAT, db=self._dbs[b"meta"])
                txn.drop(self._dbs[b"leased"], delete=False)  # a new owner: every lease is void
            self._env.sync(True)
        except lmdb.Error as e:
            self._release()
            raise StorageCorrupt(f"{self.path} cannot be opened as a zdq queue: {e}") from e
        except BaseException:
            self._release()
            raise
        super().open()
        if self._meta:
            logger.info("queue %s recovered %d chunks (%d tasks)", self.path, len(self._meta), self._ready_tasks)

    def _check_format(self) -> None:
        assert self._env is not None
        try:
            meta = self._env.open_db(b"meta", create=False)
            with self._env.begin() as txn:
                fmt = txn.get(b"format", db=meta)
        except lmdb.Error as e:
            raise StorageCorrupt(f"{self.path} holds an LMDB database that is not a zdq queue: {e}") from e
        if fmt != FORMAT:
            raise StorageCorrupt(f"{self.path} holds a queue of unknown format {fmt!r}; it was left untouched")

    def _take_lock(self) -> None:
        fd = os.open(os.path.join(self.path, _LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise QueueLocked(f"queue {self.path} is owned by another live broker") from e
            raise StorageError(f"cannot lock queue {self.path}: {e}") from e
        self._lock_fd = fd

    def _release(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    # -- backend primitives ---------------------------------------------------------------------
    def _scan(self) -> Iterable[tuple[int, ChunkMeta, str | None]]:
        assert self._env is not None
        with self._env.begin() as txn:
            dead = {_KEY.unpack(k)[0]: v.decode(errors="replace") for k, v in txn.cursor(db=self._dbs[b"dead"])}
            out = []
            for key, raw in txn.cursor(db=self._dbs[b"heads"]):
                chunk_id = _KEY.unpack(key)[0]
                try:
                    meta = ChunkMeta.unpack(raw)
                except struct.error as e:
                    raise StorageCorrupt(f"{self.path}: chunk {chunk_id} has a corrupt header") from e
                out.append((chunk_id, meta, dead.get(chunk_id)))
        return out

    def _write(self, records: list[tuple[int, ChunkMeta, object]], dead: dict[int, str] | None = None) -> None:
        assert self._env is not None
        chunks, heads, dead_db = self._dbs[b"chunks"], self._dbs[b"heads"], self._dbs[b"dead"]
        for _ in range(32):
            try:
                with self._env.begin(write=True) as txn:
                    for chunk_id, meta, payload in records:
                        key = _key(chunk_id)
                        txn.put(key, getattr(payload, "buffer", payload), db=chunks, append=True)  # type: ignore[arg-type]
                        txn.put(key, meta.pack(), db=heads, append=True)
                        if dead and chunk_id in dead:
                            txn.put(key, dead[chunk_id].encode()[:65536], db=dead_db)
                if self._sync:
                    self._env.sync(True)
                return
            except lmdb.MapFullError:
                self._grow()
            except lmdb.DiskError as e:
                raise StorageFull(f"queue {self.path}: disk full: {e}") from e
            except lmdb.Error as e:
                if "No space left" in str(e) or getattr(e, "errno", None) == errno.ENOSPC:
                    raise StorageFull(f"queue {self.path}: disk full: {e}") from e
                raise StorageError(f"queue {self.path}: write failed: {e}") from e
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise StorageFull(f"queue {self.path}: disk full: {e}") from e
                raise StorageError(f"queue {self.path}: write failed: {e}") from e
        raise StorageFull(f"queue {self.path}: the LMDB map stays full")

    def _grow(self) -> None:
        assert self._env is not None
        current = self._env.info()["map_size"]
        wanted = current * 2
        free = shutil.disk_usage(self.path).free
        used = os.path.getsize(os.path.join(self.path, "data.mdb"))
        if wanted > _MAX_GROWTH or wanted - used > free:
            raise StorageFull(
                f"queue {self.path}: the LMDB map ({current} bytes) is full and cannot grow "
                f"({free} bytes free on disk)"
            )
        logger.info("queue %s: growing the LMDB map to %d bytes", self.path, wanted)
        self._env.set_mapsize(wanted)

    def _read(self, chunk_id: int) -> object:
        assert self._env is not None
        with self._env.begin() as txn:
            payload = txn.get(_key(chunk_id), db=self._dbs[b"chunks"])
        if payload is None:
            raise StorageCorrupt(f"{self.path}: chunk {chunk_id} is indexed but not stored")
        self._marks[chunk_id] = True
        return payload

    def release(self, chunk_id: int, *, count_attempt: bool = True) -> bool:
        released = super().release(chunk_id, count_attempt=count_attempt)
        if released:
            self._marks[chunk_id] = False
        return released

    def setting(self, name: bytes, default: bytes | None) -> bytes | None:
        assert self._env is not None
        meta = self._dbs[b"meta"]
        with self._env.begin(write=default is not None) as txn:
            value: bytes | None = txn.get(name, db=meta)
            if value is None and default is not None:
                txn.put(name, default, db=meta)
                value = default
        if default is not None:
            self._env.sync(True)
        return value

    def flush_marks(self) -> None:
        if not self._marks or self._env is None:
            return
        marks, self._marks = self._marks, {}
        leased = self._dbs[b"leased"]
        try:
            with self._env.begin(write=True) as txn:
                for chunk_id, on in marks.items():
                    if on and chunk_id in self._leased:
                        txn.put(_key(chunk_id), b"", db=leased)
                    else:
                        txn.delete(_key(chunk_id), db=leased)
        except lmdb.Error as e:  # marks are informational: never fail the queue for them
            logger.warning("queue %s: lease marks not written: %s", self.path, e)

    def _delete(self, chunk_ids: list[int]) -> None:
        assert self._env is not None
        try:
            with self._env.begin(write=True) as txn:
                for chunk_id in chunk_ids:
                    key = _key(chunk_id)
                    for name in (b"chunks", b"heads", b"leased", b"dead"):
                        txn.delete(key, db=self._dbs[name])
                    self._marks.pop(chunk_id, None)
        except lmdb.Error as e:
            raise StorageError(f"queue {self.path}: acknowledgement not written: {e}") from e

    def _mark_dead(self, chunk_id: int, reason: str) -> None:
        assert self._env is not None
        with self._env.begin(write=True) as txn:
            txn.put(_key(chunk_id), reason.encode()[:65536], db=self._dbs[b"dead"])
            txn.delete(_key(chunk_id), db=self._dbs[b"leased"])
        self._marks.pop(chunk_id, None)

    def _unmark_dead(self, chunk_ids: list[int]) -> None:
        assert self._env is not None
        with self._env.begin(write=True) as txn:
            for chunk_id in chunk_ids:
                txn.delete(_key(chunk_id), db=self._dbs[b"dead"])

    def _close(self) -> None:
        if self._env is not None:
            self.flush_marks()
            self._env.sync(True)
        self._release()


def inspect_queue(path: str) -> dict[str, int | str]:
    """Counts of a queue directory, read-only and without taking its lock (for ``zdq inspect``)."""
    if not is_queue_dir(path):
        raise StorageCorrupt(f"{path} is not a zdq queue")
    try:
        env = lmdb.open(path, readonly=True, lock=False, max_dbs=len(_DBS), subdir=True, create=False)
    except lmdb.Error as e:
        raise StorageCorrupt(f"{path} cannot be read: {e}") from e
    try:
        try:
            dbs = {name: env.open_db(name, create=False) for name in _DBS}
        except lmdb.Error as e:
            raise StorageCorrupt(f"{path} is not a zdq queue: {e}") from e
        with env.begin() as txn:
            if txn.get(b"format", db=dbs[b"meta"]) != FORMAT:
                raise StorageCorrupt(f"{path} is not a zdq queue of a known format")
            leased = {k for k, _ in txn.cursor(db=dbs[b"leased"])}
            dead = {k for k, _ in txn.cursor(db=dbs[b"dead"])}
            counts = {"ready_chunks": 0, "ready_tasks": 0, "leased_chunks": 0, "leased_tasks": 0, "dead_chunks": 0, "dead_tasks": 0}
            for key, raw in txn.cursor(db=dbs[b"heads"]):
                n = ChunkMeta.unpack(raw).n_tasks
                state = "dead" if key in dead else "leased" if key in leased else "ready"
                counts[f"{state}_chunks"] += 1
                counts[f"{state}_tasks"] += n
    finally:
        env.close()
    size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    return {"path": path, **counts, "size_bytes": size}
