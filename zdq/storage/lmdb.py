"""Durable storage on LMDB: one environment per queue directory.

Layout (named sub-databases, big-endian 8-byte keys so a cursor walks in FIFO order)::

    meta    b"format" -> b"zdq-queue-1"
    chunks  id -> payload (opaque bytes)
    heads   id -> ChunkMeta (owner, seq, n_tasks[, not_before, priority]: the last two only when set)
    leased  id -> the attempt it was handed out for (4 bytes) if its consumer lives in the broker's
            process (dies with it), else b"" (and b"" for all once the broker stops cleanly):
            marks only, rewritten freely: recovery makes every chunk ready
    dead    id -> reason (utf-8)
    results id -> consumer id (16 bytes) + results: a done chunk whose driver had not taken them
    cancels id -> the indexes (4 bytes each) of the chunk's tasks cancelled before they started, and
            0xFFFFFFFF if its tasks may have started (its consumer died holding it): see
            :meth:`zdq.storage.base.Storage.may_have_started`
    attempts  id -> the attempts (4 bytes) a chunk used that ended with the death of its consumer or of
            its broker: a broker placed again goes on counting from there (a poison task that kills
            the worker of its queue's broker too is dead-lettered, not run for ever)
    kept    id -> a chunk's results kept after their driver acknowledged them (``result_ttl``:
            :mod:`zdq.broker.retained`), written in the acknowledgement's transaction
    schedules  schedule id -> its record (zdq.codec.schedules.ScheduleRecord): written in the transaction
            that stores the tick's chunk, so a tick is queued exactly once whatever is killed

Beside the environment, ``leases.journal`` lists (8 bytes each) the chunk ids handed out since the
lease marks were last committed, the top bit set for a consumer in the broker's own process:
appended before each DELIVER, truncated at each commit, read (with ``leased``) when the queue is
opened again, so that a broker killed before committing its lease marks still tells its successor
which chunks may have started, and which were lost with it (an attempt each).

Durability: the environment runs with LMDB's own crash-safe flags (``sync`` and ``metasync``:
every commit flushes its data pages, then its meta page, to disk), so an operating-system crash or
a power loss leaves it consistent and keeps every committed transaction.
:meth:`LMDBStorage._write` commits every chunk of a broker round in one transaction before it
returns, so the broker confirms only what is on disk. The other writes (acknowledgements, lease and
dead-letter marks) are held back and written together: with the next chunks, or by
:meth:`LMDBStorage.commit` once the oldest has waited ``_PENDING_DELAY``. Losing them in a crash
only re-runs acknowledged work (at least once); it never loses a chunk. With ``sync=False`` LMDB
does not flush at all: a killed process loses nothing (the data is in the OS page cache), but an
OS crash may lose recent chunks or leave the environment corrupt. Freed pages are reused, so
draining a queue does not grow its file.

A queue directory is owned by one broker at a time through an exclusive ``flock`` on
``zdq.lock``; the kernel drops it when the owner dies, however it dies.

A queue directory another user owns is refused: its chunks would be unpickled by our workers, and
the pool's payload key stored there would be theirs. The per-user default dirpath
(:func:`zdq.config.default_dirpath`) is made private (0700) and refused when it is not this user's
alone; a dirpath the user names is theirs to share (a group-writable project directory).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import lmdb

from zdq.config import default_dirpath
from zdq.errors import QueueLocked, StorageCorrupt, StorageError, StorageFull
from zdq.names import queue_name_of
from zdq.storage.base import MAY_HAVE_STARTED, ChunkMeta, Storage

__all__ = ["LMDBStorage", "FORMAT", "holds_work", "inspect_queue", "is_queue_dir"]

logger = logging.getLogger(__name__)

FORMAT = b"zdq-queue-1"
_KEY = struct.Struct(">Q")
_DBS = (b"meta", b"chunks", b"heads", b"leased", b"dead", b"results", b"cancels", b"schedules", b"kept", b"attempts")
#: Sub-databases a queue written by an older zdq may lack (opened read-only, they are skipped).
_LATER_DBS = (b"results", b"cancels", b"schedules", b"kept", b"attempts")
#: A count of attempts (a lease mark's, and the ``attempts`` table's values).
_ATTEMPTS = struct.Struct(">I")
#: A journal entry's top bit: the chunk went to a consumer in the broker's own process. (Chunk ids
#: are microseconds since 1970 shifted by 8 bits: below 2**62 until the year 2262.)
_WITH_BROKER = 1 << 63
_LOCK = "zdq.lock"
#: Chunk ids handed out since the lease marks were last committed, appended before each DELIVER
#: (see :meth:`LMDBStorage._read`).
_JOURNAL = "leases.journal"
_MAX_GROWTH = 64 << 30
#: Times the lock is taken again when ``zdq.lock`` was replaced while it was being locked.
_LOCK_TRIES = 5
#: Bookkeeping writes (acknowledgements, marks) wait at most this long, or until this many are
#: pending, to be written in one synced transaction: a flush costs the same for one or a thousand.
_PENDING_DELAY = 0.05
_PENDING_MAX = 4096


def _key(chunk_id: int) -> bytes:
    return _KEY.pack(chunk_id)


def is_queue_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "data.mdb"))


def _check_dir(path: str) -> bool:
    """True if ``path`` holds a queue already; raise if it holds something else, or if another
    user owns it (what it holds would run on our workers)."""
    if not os.path.exists(path):
        return False
    if not os.path.isdir(path):
        raise StorageCorrupt(f"{path} is not a directory; it was left untouched")
    owner = os.stat(path).st_uid
    if owner != os.getuid():
        raise StorageError(
            f"{path} is owned by uid {owner}, not by this user (uid {os.getuid()}): it is another user's queue, "
            "and its tasks are not run here; it was left untouched. Use a dirpath (or a pool name) of your own"
        )
    if is_queue_dir(path):
        return True
    others = [n for n in os.listdir(path) if n != _LOCK]
    if others:
        raise StorageCorrupt(
            f"{path} is not a zdq queue (it holds {sorted(others)[:5]} and no data.mdb); it was left untouched"
        )
    return False


@contextmanager
def _read_only(path: str) -> Iterator[lmdb.Environment]:
    """The queue in directory ``path`` (which holds a data.mdb), opened read-only and without
    LMDB's lock file, once it is known to be a zdq queue of this format; else ``StorageCorrupt``
    saying what is there. Nothing in ``path`` is written or made."""
    if os.path.getsize(os.path.join(path, "data.mdb")) == 0:
        # Checked first: LMDB takes an empty data file for a new database (and, read-only, fails
        # with a bare EBADF trying to write one).
        raise StorageCorrupt(f"{path} is not a zdq queue: its data.mdb is an empty file")
    try:
        env = lmdb.open(path, readonly=True, lock=False, max_dbs=len(_DBS), subdir=True, create=False)
    except lmdb.InvalidError as e:
        raise StorageCorrupt(f"{path} is not a zdq queue: its data.mdb is not an LMDB database ({e})") from e
    except lmdb.Error as e:
        raise StorageCorrupt(f"{path} cannot be read as a zdq queue: {e}") from e
    try:
        try:
            meta = env.open_db(b"meta", create=False)
        except lmdb.Error as e:
            raise StorageCorrupt(f"{path} holds an LMDB database that is not a zdq queue (no zdq 'meta' table: {e})") from e
        with env.begin() as txn:
            fmt = txn.get(b"format", db=meta)
        if fmt != FORMAT:
            raise StorageCorrupt(f"{path} holds a queue of unknown format {fmt!r}")
        yield env
    finally:
        env.close()


def _half_made(path: str) -> bool:
    """Whether ``path``, which holds zdq's lock file (zdq made it or opened it), was left by an
    open killed before its first transaction committed: beside LMDB's files (and zdq's) nothing,
    and in them no format record and no chunk. A queue of any format, or one holding a chunk,
    is not (it stays refused as what it is)."""
    if set(os.listdir(path)) - {_LOCK, _JOURNAL, "data.mdb", "lock.mdb"}:
        return False
    if os.path.getsize(os.path.join(path, "data.mdb")) == 0:
        return True
    try:
        env = lmdb.open(path, readonly=True, lock=False, max_dbs=len(_DBS), subdir=True, create=False)
    except lmdb.Error:
        return False
    try:
        with env.begin() as txn:
            for name in (b"meta", b"heads", b"chunks"):
                try:
                    db = env.open_db(name, txn=txn, create=False)
                except lmdb.NotFoundError:
                    continue
                if txn.stat(db)["entries"]:
                    return False
        return True
    except lmdb.Error:
        return False
    finally:
        env.close()


def _make_afresh(path: str, name: str, refused: StorageCorrupt) -> None:
    """Raise ``refused`` unless ``path`` was left half-made (:func:`_half_made`: zdq's own lock is
    there and nothing else of a queue, an open killed before its first transaction); then remove
    LMDB's files, so that the open makes the queue afresh (it held nothing)."""
    if not _half_made(path):
        raise refused
    logger.warning("queue %s: %s was left half-made by an open that was killed (%s); made afresh", name, path, refused)
    for file in ("data.mdb", "lock.mdb"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, file))


def _check_queue(path: str) -> None:
    """Raise ``StorageCorrupt`` unless directory ``path`` holds a zdq queue of this format (read
    as :func:`_read_only` reads it: a directory that is not a queue is left as it was)."""
    try:
        with _read_only(path):
            pass
    except StorageCorrupt as e:
        raise StorageCorrupt(f"{e}; it was left untouched") from e


def private_dir(path: str) -> None:
    """Make ``path`` (the per-user default dirpath) with mode 0700, or check that the one there
    is a directory of this user that its group and others cannot write; else ``StorageError``
    naming it and what is wrong. It is never changed: a directory someone else prepared there
    (in a shared ``/tmp``) could hold queues whose payload key and chunks are theirs."""
    try:
        os.mkdir(path, 0o700)
        return
    except FileExistsError:
        pass
    except OSError as e:
        raise StorageError(f"cannot make {path}, the default directory of durable queues: {e}") from e
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        wrong = "is a symbolic link" if stat.S_ISLNK(st.st_mode) else "is not a directory"
    elif st.st_uid != os.getuid():
        wrong = f"is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    elif mode & 0o022:
        wrong = f"is writable by its group or by others (mode {mode:04o})"
    else:
        return
    raise StorageError(
        f"{path}, the default directory of durable queues (private to uid {os.getuid()}), {wrong}: it is not "
        "used, nor changed. Remove it, or pass dirpath= (or set zdq.durable.dirpath) to a directory of your own"
    )


def _missing_dirs(path: str) -> list[str]:
    """The directories that ``os.makedirs(path)`` would create, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _sync_dirs(path: str, made: list[str]) -> None:
    """Make the queue's directory entries durable: fsync ``path``, the directories ``made`` for it,
    and the directory that holds the topmost of them, deepest first.

    Why: LMDB's ``sync``/``metasync`` flush ``data.mdb``'s pages, never the directories, so a power
    loss soon after a queue was created can drop its directory with every chunk confirmed in it.
    Run once per open, after the first commit and before any chunk is confirmed; an existing queue
    is synced too (its creator may have died before doing it), at the cost of two fsyncs."""
    path = os.path.abspath(path)
    chain = [path, *(d for d in made if d != path)]
    chain.append(os.path.dirname(chain[-1]))
    for directory in chain:
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise StorageError(f"queue {path}: cannot open {directory} to make the queue durable: {e}") from e
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system that cannot sync directories
                raise StorageError(f"queue {path}: cannot fsync {directory}: {e}") from e
        finally:
            os.close(fd)


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
        #: The queue's name: its directory is named after it (see :func:`zdq.names.queue_name`).
        self.name = queue_name_of(path)
        self._map_size = map_size
        self._sync = sync
        self._env: lmdb.Environment | None = None
        self._dbs: dict[bytes, Any] = {}
        self._lock_fd: int | None = None
        self._marks: dict[int, bool] = {}  # lease marks to write at the next commit
        # Bookkeeping held back for the next transaction: (op, chunk id, reason or kept results).
        self._pending: list[tuple[str, int, Any]] = []
        self._pending_since = 0.0
        self._leased_at_open: list[int] = []  # chunks leased when the queue was opened (cancellations)
        self._attempts_at_open: list[tuple[int, int]] = []  # (chunk id, attempts used) read at the open
        self._stopping = False  # closed cleanly: the lease marks say so (no attempt of theirs was lost)
        #: Chunks out to a consumer in this broker's process: if the broker dies, so does their run.
        self._with_broker: set[int] = set()
        self._journal_fd: int | None = None  # the lease journal, open for appending
        self._journaled = False  # something was appended since the last truncation
        #: This open made the queue's directory and found no data.mdb in it under the lock: what
        #: :meth:`discard` removes (a directory made before, even empty, is someone else's).
        self._created = False

    # -- opening --------------------------------------------------------------------------------
    def open(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        if parent == default_dirpath():
            private_dir(parent)
        existed = _check_dir(self.path)
        made = _missing_dirs(self.path)
        # An existing directory is read (read-only, no lock) before anything is made in it: LMDB
        # opened for writing would write a new database into an empty data.mdb and add lock.mdb,
        # and the lock would add zdq.lock, to a directory that is not a queue. With zdq.lock
        # there (a broker's), it is read under the lock instead: its owner may be writing.
        read_first = existed and not os.path.exists(os.path.join(self.path, _LOCK))
        if read_first:
            _check_queue(self.path)
        os.makedirs(parent, exist_ok=True)
        try:
            os.mkdir(self.path)
            made_it = True
        except FileExistsError:
            made_it = False
        self._take_lock()
        # Seen under the lock: a broker that created the queue and let it go before we took the
        # lock made it someone else's.
        self._created = made_it and not is_queue_dir(self.path)
        try:
            if existed and not read_first:
                try:
                    _check_queue(self.path)
                except StorageCorrupt as e:
                    _make_afresh(self.path, self.name, e)  # raises e unless an open was killed half-way
                    existed = False
                    self._created = True  # as if this open made it: a failed placement removes it
            self._env = lmdb.open(
                self.path,
                map_size=self._map_size,
                max_dbs=len(_DBS),
                subdir=True,
                create=not existed,
                sync=self._sync,  # crash-safe commits (see the module docstring)
                metasync=self._sync,
                readahead=False,
                lock=True,
            )
            self._dbs = {name: self._env.open_db(name) for name in _DBS}
            journaled = self._read_journal()
            with self._env.begin(write=True) as txn:
                if not existed:
                    txn.put(b"format", FORMAT, db=self._dbs[b"meta"])
                # Chunks the last owner had handed out (its marks, and its journal of what it handed
                # out since): consumers may run them still, so no cancel of theirs says "never
                # started". The mark is written here, in the transaction that voids the leases.
                leased = {_KEY.unpack(k)[0]: bytes(v) for k, v in txn.cursor(db=self._dbs[b"leased"])}
                handed = [entry & ~_WITH_BROKER for entry in journaled]
                self._leased_at_open = list(dict.fromkeys([*leased, *handed]))
                _mark_started(txn, self._dbs, self._leased_at_open)
                # Chunks that died with their broker (their consumer was in its process) used an
                # attempt, as those of a consumer that dies alone do: written here, so that every
                # later broker counts on from there.
                last = {entry & ~_WITH_BROKER: bool(entry & _WITH_BROKER) for entry in journaled}  # the latest wins
                _count_lost_attempts(txn, self._dbs, leased, last)
                self._attempts_at_open = [
                    (_KEY.unpack(k)[0], _ATTEMPTS.unpack(v)[0]) for k, v in txn.cursor(db=self._dbs[b"attempts"])
                ]
                txn.drop(self._dbs[b"leased"], delete=False)  # a new owner: every lease is void
            self._journal_fd = os.open(self._journal_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
            if self._sync:
                _sync_dirs(self.path, made)
        except lmdb.Error as e:
            self._release()
            raise StorageCorrupt(f"{self.path} cannot be opened as a zdq queue: {e}") from e
        except BaseException:
            self._release()
            raise
        super().open()
        if self._meta:
            logger.info(
                "queue %s recovered %d chunks (%d tasks) from %s", self.name, len(self._meta), self._ready_tasks, self.path
            )

    def _take_lock(self) -> None:
        """Take the flock of ``zdq.lock``, on the file that is at its path once locked.

        Why the check: :meth:`discard` unlinks ``zdq.lock`` while holding it. An opener that
        opened the file before the unlink gets the flock of the orphaned file once it is
        released, while a later one makes a new file and locks that: two brokers would own the
        directory. A lock on a file no longer at the path is let go and taken again."""
        path = os.path.join(self.path, _LOCK)
        for _ in range(_LOCK_TRIES):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise StorageError(f"cannot lock queue {self.path}: {e}") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise QueueLocked(f"queue {self.path} is owned by another live broker") from e
                raise StorageError(f"cannot lock queue {self.path}: {e}") from e
            held = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                self._lock_fd = fd
                return
            os.close(fd)  # locked a file that was removed or replaced meanwhile: lock the current one
        raise StorageError(
            f"cannot lock queue {self.path}: its {_LOCK} was removed or replaced {_LOCK_TRIES} times while it "
            "was being locked (other processes discard and create the queue over and over)"
        )

    @property
    def _journal_path(self) -> str:
        return os.path.join(self.path, _JOURNAL)

    def _read_journal(self) -> list[int]:
        """The chunk ids the last owner handed out after its last commit (a torn last record, from
        a kill in the middle of a write, is left out)."""
        try:
            with open(self._journal_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        size = _KEY.size
        return [_KEY.unpack_from(data, i)[0] for i in range(0, len(data) - size + 1, size)]

    def _truncate_journal(self) -> None:
        """The lease marks are committed: the journal's records are in them."""
        if self._journaled and self._journal_fd is not None:
            os.ftruncate(self._journal_fd, 0)
            self._journaled = False

    def _release(self, lock: bool = True) -> None:
        """Close the environment and the journal; and drop the directory's lock unless ``lock`` is
        False (``discard`` removes the directory's files while it still holds it)."""
        if self._env is not None:
            self._env.close()
            self._env = None
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
        if lock and self._lock_fd is not None:
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
                    # The bookkeeping held back rides along: one flush for all of it.
                    self._apply_pending(txn)
                    for chunk_id, meta, payload in records:
                        key = _key(chunk_id)
                        txn.put(key, getattr(payload, "buffer", payload), db=chunks, append=True)  # type: ignore[arg-type]
                        txn.put(key, meta.pack(), db=heads, append=True)
                        if dead and chunk_id in dead:
                            txn.put(key, dead[chunk_id].encode()[:65536], db=dead_db)
                self._written()
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
        logger.info("queue %s: growing the LMDB map to %d bytes", self.name, wanted)
        self._env.set_mapsize(wanted)

    def _read(self, chunk_id: int, with_broker: bool = False) -> object:
        assert self._env is not None
        with self._env.begin() as txn:
            payload = txn.get(_key(chunk_id), db=self._dbs[b"chunks"])
        if payload is None:
            raise StorageCorrupt(f"{self.path}: chunk {chunk_id} is indexed but not stored")
        self._marks[chunk_id] = True
        if with_broker:
            self._with_broker.add(chunk_id)
        elif self._with_broker:
            self._with_broker.discard(chunk_id)
        # Appended before the DELIVER leaves: a broker killed before its lease marks are committed
        # (they are held back up to _PENDING_DELAY) still tells its successor that this chunk was
        # handed out. One small write to the page cache; a killed process does not lose it.
        if self._journal_fd is not None:
            os.write(self._journal_fd, _KEY.pack(chunk_id | _WITH_BROKER if with_broker else chunk_id))
            self._journaled = True
        return payload

    def release(self, chunk_id: int, *, count_attempt: bool = True) -> bool:
        released = super().release(chunk_id, count_attempt=count_attempt)
        if released:
            self._marks[chunk_id] = False
            if count_attempt:  # its consumer died holding it: the attempt is kept with the chunk
                self._hold("attempts", chunk_id, _ATTEMPTS.pack(self._attempts.get(chunk_id, 1)))
        return released

    def setting(self, name: bytes, default: bytes | None) -> bytes | None:
        assert self._env is not None
        meta = self._dbs[b"meta"]
        with self._env.begin(write=default is not None) as txn:
            value: bytes | None = txn.get(name, db=meta)
            if value is None and default is not None:
                txn.put(name, default, db=meta)
                value = default
        return value

    def write_setting(self, name: bytes, value: bytes) -> None:
        assert self._env is not None
        with self._env.begin(write=True) as txn:
            txn.put(name, value, db=self._dbs[b"meta"])

    # -- bookkeeping, held back and written together ---------------------------------------------
    def _hold(self, op: str, chunk_id: int, reason: Any = "") -> None:
        if not self._pending_since:
            self._pending_since = time.monotonic()
        self._pending.append((op, chunk_id, reason))

    def _apply_pending(self, txn: lmdb.Transaction) -> None:
        dbs = self._dbs
        leased = dbs[b"leased"]
        for op, chunk_id, reason in self._pending:
            key = _key(chunk_id)
            if op == "delete":
                for name in (b"chunks", b"heads", b"leased", b"dead", b"results", b"cancels", b"attempts"):
                    txn.delete(key, db=dbs[name])
            elif op == "attempts":
                txn.put(key, reason, db=dbs[b"attempts"])
            elif op == "results":
                txn.put(key, reason, db=dbs[b"results"])
            elif op == "cancels":
                txn.put(key, reason, db=dbs[b"cancels"])
            elif op == "dead":
                txn.put(key, reason.encode()[:65536], db=dbs[b"dead"])
                txn.delete(key, db=leased)
                txn.delete(key, db=dbs[b"attempts"])  # requeued, a dead letter starts afresh
            elif op == "undead":
                txn.delete(key, db=dbs[b"dead"])
            elif op == "retain":
                txn.put(key, reason, db=dbs[b"kept"])
            elif op == "unretain":
                txn.delete(key, db=dbs[b"kept"])
            elif op == "schedule":
                if reason is None:
                    txn.delete(key, db=dbs[b"schedules"])
                else:
                    txn.put(key, reason, db=dbs[b"schedules"])
        attempts, pack, with_broker = self._attempts, _ATTEMPTS.pack, self._with_broker
        for chunk_id, on in self._marks.items():
            if on and chunk_id in self._leased:
                # With a consumer of this process, the attempt it is out for: lost if this broker
                # dies (see _count_lost_attempts); elsewhere, its consumer may live on.
                dies_here = chunk_id in with_broker and not self._stopping
                txn.put(_key(chunk_id), pack(attempts.get(chunk_id, 1)) if dies_here else b"", db=leased)
            else:
                txn.delete(_key(chunk_id), db=leased)
                with_broker.discard(chunk_id)

    def commit(self, *, force: bool = False) -> None:
        if self._env is None or not (self._pending or self._marks):
            return
        now = time.monotonic()
        if not self._pending_since:
            self._pending_since = now
        if not force and len(self._pending) + len(self._marks) < _PENDING_MAX and now - self._pending_since < _PENDING_DELAY:
            return
        try:
            with self._env.begin(write=True) as txn:
                self._apply_pending(txn)
        except lmdb.Error as e:  # kept for the next try; nothing is lost but time
            logger.warning("queue %s: acknowledgements not written yet: %s", self.name, e)
            return
        self._written()

    def _written(self) -> None:
        """What was held back is committed (lease marks included): forget it."""
        self._pending.clear()
        self._pending_since = 0.0
        self._marks.clear()
        self._truncate_journal()

    def keep_results(self, chunk_id: int, consumer: bytes, results: object) -> None:
        data = getattr(results, "bytes", results)
        if isinstance(data, (bytes, memoryview)):
            self._hold("results", chunk_id, consumer[:16].ljust(16, b"\0") + bytes(data))

    def _scan_results(self) -> Iterable[tuple[int, tuple[bytes, object]]]:
        assert self._env is not None
        with self._env.begin() as txn:
            return [
                (_KEY.unpack(k)[0], (bytes(v[:16]), bytes(v[16:])))
                for k, v in txn.cursor(db=self._dbs[b"results"])
            ]

    def retain(self, chunk_id: int, record: bytes) -> None:
        # Held with the chunk's acknowledgement (the RACK's "delete"): one transaction writes both.
        self._hold("retain", chunk_id, record)

    def unretain(self, chunk_ids: Iterable[int]) -> None:
        for chunk_id in chunk_ids:
            self._hold("unretain", chunk_id)

    def retained(self) -> list[tuple[int, bytes]]:
        assert self._env is not None
        with self._env.begin() as txn:
            return [(_KEY.unpack(k)[0], bytes(v)) for k, v in txn.cursor(db=self._dbs[b"kept"])]

    def _write_cancels(self, chunk_id: int, indexes: frozenset[int]) -> None:
        self._hold_cancels(chunk_id, indexes)
        self._flush_cancels([chunk_id])

    def _hold_cancels(self, chunk_id: int, indexes: frozenset[int]) -> None:
        self._hold("cancels", chunk_id, struct.pack(f">{len(indexes)}I", *sorted(indexes)))

    def _unhold_cancels(self, chunk_ids: list[int]) -> None:
        ids = set(chunk_ids)
        self._pending = [held for held in self._pending if not (held[0] == "cancels" and held[1] in ids)]

    def _flush_cancels(self, chunk_ids: list[int]) -> None:
        self.commit(force=True)
        if self._pending:
            raise StorageError(
                f"{self.path}: the cancellation marks of chunks {chunk_ids[:5]} were not written (see the "
                "warning above for why); a cancel of their tasks is answered 'started'"
            )

    def _scan_leased(self) -> Iterable[int]:
        return self._leased_at_open

    def _scan_attempts(self) -> Iterable[tuple[int, int]]:
        return self._attempts_at_open

    def _scan_cancels(self) -> Iterable[tuple[int, frozenset[int]]]:
        assert self._env is not None
        with self._env.begin() as txn:
            return [
                (_KEY.unpack(k)[0], frozenset(struct.unpack(f">{len(v) // 4}I", v)))
                for k, v in txn.cursor(db=self._dbs[b"cancels"])
            ]

    def _scan_schedules(self) -> Iterable[bytes]:
        assert self._env is not None
        with self._env.begin() as txn:
            return [bytes(v) for _, v in txn.cursor(db=self._dbs[b"schedules"])]

    def _write_schedule(self, schedule_id: int, record: bytes | None, now: bool) -> None:
        self._hold("schedule", schedule_id, record)
        if now:
            self.commit(force=True)
            if self._pending:
                raise StorageError(f"{self.path}: schedule {schedule_id} was not written")

    def write_schedules(self, records: list[tuple[int, bytes | None]]) -> None:
        # Held, then committed with whatever else is held: one transaction.
        first = len(self._pending)
        super().write_schedules(records)
        if self._pending:
            mine = self._pending[first : first + len(records)]
            # Not written: a later commit must not apply half of what the caller was told failed.
            self._pending = [held for held in self._pending if not any(held is m for m in mine)]
            raise StorageError(f"{self.path}: schedules {[i for i, _ in records]} were not written (see the warning above)")

    def put_tick(self, meta: ChunkMeta, payload: object, schedule_id: int, record: Callable[[int], bytes]) -> int:
        # The record rides in the chunk's own transaction (_write applies what is held).
        try:
            return super().put_tick(meta, payload, schedule_id, record)
        except BaseException:
            # Not written: a later commit must not advance the schedule without its chunk.
            self._pending = [held for held in self._pending if held[:2] != ("schedule", schedule_id)]
            raise

    def _delete(self, chunk_ids: list[int]) -> None:
        for chunk_id in chunk_ids:
            self._marks.pop(chunk_id, None)
            self._with_broker.discard(chunk_id)
            self._hold("delete", chunk_id)

    def _mark_dead(self, chunk_id: int, reason: str) -> None:
        self._marks.pop(chunk_id, None)
        self._with_broker.discard(chunk_id)
        self._hold("dead", chunk_id, reason)

    def _unmark_dead(self, chunk_ids: list[int]) -> None:
        for chunk_id in chunk_ids:
            self._hold("undead", chunk_id)

    def _close(self) -> None:
        if self._env is not None:
            # A clean stop: the chunks still out lost no attempt to it (their consumers stop
            # them, or go on with the broker placed again). Their marks are rewritten to say so.
            self._stopping = True
            self._marks.update(dict.fromkeys(self._leased, True))
            self.commit(force=True)
            self._env.sync(True)
        self._release()

    def holds_nothing(self) -> bool:
        # Writes held back (a schedule, a kept result) count: they are the pool's too.
        return not self._pending and super().holds_nothing()

    def discard(self) -> None:
        """Close; and remove the queue's directory if this open created it and it holds nothing,
        while its lock is still held (no other broker opens it meanwhile). Only the directory's
        own files go: a file another process put there keeps it, and is left untouched."""
        if self._closed:
            return
        if not (self._created and self._env is not None and self.holds_nothing()):
            self.close()
            return
        self._closed = True
        self._release(lock=False)
        try:
            for name in ("data.mdb", "lock.mdb", _JOURNAL, _LOCK):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, name))
            os.rmdir(self.path)
            logger.info("queue %s: removed %s, which its failed placement created", self.name, self.path)
        except OSError as e:
            logger.warning("queue %s: could not remove %s, which its failed placement created: %s", self.name, self.path, e)
        finally:
            self._release()  # the lock last


def _mark_started(txn: lmdb.Transaction, dbs: dict[bytes, Any], chunk_ids: list[int]) -> None:
    """Add :data:`MAY_HAVE_STARTED` to the stored marks of each of ``chunk_ids`` still stored."""
    heads, cancels = dbs[b"heads"], dbs[b"cancels"]
    flag = struct.pack(">I", MAY_HAVE_STARTED)
    for chunk_id in chunk_ids:
        key = _key(chunk_id)
        if txn.get(key, db=heads) is None:
            continue  # acknowledged since
        marks = bytes(txn.get(key, db=cancels) or b"")
        if flag not in {marks[i : i + 4] for i in range(0, len(marks), 4)}:
            txn.put(key, marks + flag, db=cancels)


def _count_lost_attempts(
    txn: lmdb.Transaction, dbs: dict[bytes, Any], leased: dict[int, bytes], handed: dict[int, bool]
) -> None:
    """The last owner of the queue died: each chunk it had out to a consumer of its own process
    used an attempt, written to the ``attempts`` table. ``leased`` are its committed lease marks
    (such a chunk's is the attempt it went out for; ``b""``: a consumer elsewhere, which may live
    on, a clean stop, or an older zdq's mark: no attempt lost); ``handed``, what its journal says
    of the chunks it handed out since (True: to a consumer of its process), which is newer. Done
    chunks whose results were kept are not run again, and chunks gone since are skipped."""
    heads, results, dead, table = dbs[b"heads"], dbs[b"results"], dbs[b"dead"], dbs[b"attempts"]
    for chunk_id in dict.fromkeys([*leased, *handed]):
        mark = leased.get(chunk_id, b"")
        went_out_for = _ATTEMPTS.unpack(mark)[0] if len(mark) == _ATTEMPTS.size else 0
        if not handed.get(chunk_id, went_out_for > 0):
            continue  # its last consumer was elsewhere (or the broker stopped cleanly)
        key = _key(chunk_id)
        if txn.get(key, db=heads) is None or txn.get(key, db=results) is not None or txn.get(key, db=dead) is not None:
            continue
        stored = txn.get(key, db=table)
        used = _ATTEMPTS.unpack(stored)[0] if stored is not None and len(stored) == _ATTEMPTS.size else 0
        txn.put(key, _ATTEMPTS.pack(min(max(used + 1, went_out_for), 0xFFFFFFFF)), db=table)


def holds_work(path: str) -> bool:
    """Whether ``path`` is a queue holding chunks or schedules (a queue that cannot be read is
    taken to hold some). Two table sizes, read from their roots: every broker asks it of each
    higher-numbered queue directory beside its own, at start-up, only to decide a warning."""
    if not is_queue_dir(path):
        return False
    try:
        with _read_only(path) as env, env.begin() as txn:
            if txn.stat(env.open_db(b"heads", txn=txn, create=False))["entries"]:
                return True
            try:  # a queue written before schedules existed has no such table
                schedules = env.open_db(b"schedules", txn=txn, create=False)
            except lmdb.NotFoundError:
                return False
            return bool(txn.stat(schedules)["entries"])
    except StorageCorrupt:
        return True
    except lmdb.Error:
        return True


def inspect_queue(path: str) -> dict[str, int | str]:
    """Counts of a queue directory, read-only and without taking its lock (for ``zdq inspect``)."""
    if not is_queue_dir(path):
        raise StorageCorrupt(f"{path} is not a zdq queue")
    with _read_only(path) as env:
        try:
            dbs = {name: env.open_db(name, create=False) for name in _DBS if name not in _LATER_DBS}
        except lmdb.Error as e:
            raise StorageCorrupt(f"{path} is not a zdq queue: {e}") from e
        with env.begin() as txn:
            leased = {k for k, _ in txn.cursor(db=dbs[b"leased"])}
            dead = {k for k, _ in txn.cursor(db=dbs[b"dead"])}
            counts = {
                f"{state}_{what}": 0 for state in ("ready", "leased", "dead", "delayed") for what in ("chunks", "tasks")
            }
            now = time.time()
            for key, raw in txn.cursor(db=dbs[b"heads"]):
                meta = ChunkMeta.unpack(raw)
                n = meta.n_tasks
                state = (
                    "dead" if key in dead else "leased" if key in leased else "delayed" if meta.not_before > now else "ready"
                )
                counts[f"{state}_chunks"] += 1
                counts[f"{state}_tasks"] += n
            try:  # a queue written before schedules existed has no such sub-database
                counts["schedules"] = txn.stat(env.open_db(b"schedules", txn=txn, create=False))["entries"]
            except lmdb.Error:
                counts["schedules"] = 0
    size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    return {"name": queue_name_of(path), "path": path, **counts, "size_bytes": size}
