"""Results kept after their driver's receipt, for ``result_ttl``: what :func:`zdq.result` and
:func:`zdq.state` read from any process of the cluster.

A chunk's results leave the lease table when the driver they were sent to acknowledges them
(RACK). A pool with ``result_ttl`` set keeps them here a while longer, sealed as the consumer sent
them (the broker cannot read them; the asking process unseals them with the pool's payload key):
each for ``result_ttl`` seconds after its receipt, and at most ``result_bytes`` of them, the oldest
dropped first beyond it. A durable queue writes each kept result in the transaction that writes
the chunk's acknowledgement (:meth:`~zdq.storage.base.Storage.retain`), so a broker killed after
that finds it again; on reopening, those whose time has passed are dropped.

The index is by first task id (a chunk's ids are consecutive from its ``base``): a sorted list,
searched with a bisection. Chunks without a known base (a schedule's tick, one written by an earlier
version) are not kept. A pool without ``result_ttl`` has no :class:`Retained` at all: its brokers
pay nothing for this.

Who owns what: the broker's loop thread (through the lease table, at each RACK, and its
housekeeping); the control plane reads it under the broker's lock.
"""

from __future__ import annotations

import bisect
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass

from zdq.storage.base import ChunkMeta, Storage

__all__ = ["CANCELLED_BY", "CANCELLED_RESULTS", "Kept", "Retained"]

#: What is kept for a chunk cancelled whole before it was delivered (it leaves the queue at once,
#: with no results of its own): :func:`~zdq.broker.task_state.task_state` reads it as "cancelled".
CANCELLED_RESULTS = b"zdq:cancelled-chunk"
#: The "consumer" of that record (no consumer has this identity).
CANCELLED_BY = b"zdq:cancelled\0\0\0"
#: Unique tasks' followers remembered after their holder ended, at most (the oldest go first).
MAX_ALIASES = 100_000

#: A kept result as stored: its expiry (wall clock), first task id, task count, consumer id.
_HEAD = struct.Struct(">dQI16s")


@dataclass(slots=True)
class Kept:
    """One chunk's sealed results, kept until ``until`` (wall-clock seconds)."""

    until: float
    base: int
    n_tasks: int
    consumer: bytes
    results: object  # as the consumer sent them (bytes, or a ZeroMQ frame): sealed, opaque here
    size: int

    def holds(self, task_id: int) -> bool:
        return self.base <= task_id < self.base + self.n_tasks

    def payload(self) -> bytes:
        results = self.results
        return bytes(getattr(results, "bytes", results))  # type: ignore[call-overload]

    def pack(self) -> bytes:
        return _HEAD.pack(self.until, self.base, self.n_tasks, self.consumer[:16].ljust(16, b"\0")) + self.payload()

    @classmethod
    def unpack(cls, record: bytes) -> Kept:
        until, base, n_tasks, consumer = _HEAD.unpack_from(record)
        results = bytes(record[_HEAD.size :])
        return cls(until, base, n_tasks, consumer, results, len(results))


class Retained:
    """The results kept for ``ttl`` seconds after their receipt, at most ``max_bytes`` of them.

    Parameters
    ----------
    storage : Storage
        The queue's storage: a durable one keeps them on disk (and held some when it was opened).
    ttl : float
        Seconds each is kept after its receipt.
    max_bytes : int
        Most bytes kept; the oldest are dropped first beyond it (a single result larger than
        this is not kept at all).
    """

    def __init__(self, storage: Storage, ttl: float, max_bytes: int, now: float | None = None) -> None:
        self._storage = storage
        self._durable = storage.durable
        self.ttl = ttl
        self.max_bytes = max_bytes
        #: chunk id -> its kept results, in the order they were kept (the order they expire in).
        self._kept: OrderedDict[int, Kept] = OrderedDict()
        self._bases: list[int] = []  # every kept chunk's first task id, sorted
        self._chunk_at: dict[int, int] = {}  # first task id -> chunk id
        self.nbytes = 0
        self.tasks = 0  # tasks whose results are kept
        #: A unique task's follower -> the task it followed (whose results stand for its own).
        self.aliases: OrderedDict[int, int] = OrderedDict()
        self._load(time.time() if now is None else now)

    def __len__(self) -> int:
        return len(self._kept)

    def _load(self, now: float) -> None:
        """Take back what a durable queue kept before it was last closed; drop what has expired."""
        stored = self._storage.retained()
        if not stored:
            return
        loaded = sorted(((chunk_id, Kept.unpack(record)) for chunk_id, record in stored), key=lambda e: e[1].until)
        stale = [chunk_id for chunk_id, kept in loaded if kept.until <= now]
        for chunk_id, kept in loaded:
            if kept.until > now:
                self._add(chunk_id, kept)
        if stale:
            self._storage.unretain(stale)
        self._evict(now)  # the bound may be smaller than it was

    # -- the loop thread --------------------------------------------------------------------------
    def keep(self, chunk_id: int, meta: ChunkMeta, consumer: bytes, results: object, now: float | None = None) -> None:
        """A driver acknowledged these results: keep them ``ttl`` seconds (durable: on disk, in
        the acknowledgement's transaction)."""
        if not meta.base or results is None:
            return
        size = len(results)  # type: ignore[arg-type]
        if size > self.max_bytes:
            return
        now = time.time() if now is None else now
        kept = Kept(now + self.ttl, meta.base, meta.n_tasks, consumer, results, size)
        self._add(chunk_id, kept)
        if self._durable:
            self._storage.retain(chunk_id, kept.pack())
        self._evict(now)

    def alias(self, follower: int, holder: int) -> None:
        """Task ``follower`` (a unique task's follower) has the results of task ``holder``: its
        state is read as the holder's while they are kept (memory only; the oldest of
        :data:`MAX_ALIASES` are forgotten first)."""
        self.aliases[follower] = holder
        if len(self.aliases) > MAX_ALIASES:
            self.aliases.popitem(last=False)

    def expire(self, now: float | None = None) -> int:
        """Drop what has been kept ``ttl`` seconds; return how many (the broker's housekeeping)."""
        return self._evict(time.time() if now is None else now)

    def _add(self, chunk_id: int, kept: Kept) -> None:
        if chunk_id in self._kept:
            self._drop(chunk_id)
        other = self._chunk_at.get(kept.base)
        if other is not None:  # the same tasks kept twice (run again): the later results stand
            self._drop(other)
            if self._durable:
                self._storage.unretain([other])
        self._kept[chunk_id] = kept
        bisect.insort(self._bases, kept.base)
        self._chunk_at[kept.base] = chunk_id
        self.nbytes += kept.size
        self.tasks += kept.n_tasks

    def _drop(self, chunk_id: int) -> Kept:
        kept = self._kept.pop(chunk_id)
        i = bisect.bisect_left(self._bases, kept.base)
        if i < len(self._bases) and self._bases[i] == kept.base:
            del self._bases[i]
        if self._chunk_at.get(kept.base) == chunk_id:
            del self._chunk_at[kept.base]
        self.nbytes -= kept.size
        self.tasks -= kept.n_tasks
        return kept

    def _evict(self, now: float) -> int:
        """Drop the oldest while they expired or the bytes pass the bound; return how many."""
        dropped: list[int] = []
        kept = self._kept
        while kept:
            chunk_id, oldest = next(iter(kept.items()))
            if oldest.until > now and self.nbytes <= self.max_bytes:
                break
            self._drop(chunk_id)
            dropped.append(chunk_id)
        if dropped and self._durable:
            self._storage.unretain(dropped)
        return len(dropped)

    # -- the control plane (under the broker's lock) ----------------------------------------------
    def find(self, task_id: int, now: float | None = None) -> Kept | None:
        """The kept results that hold task ``task_id``, if they have not expired."""
        i = bisect.bisect_right(self._bases, task_id) - 1
        if i < 0:
            return None
        kept = self._kept.get(self._chunk_at.get(self._bases[i], -1))
        if kept is None or not kept.holds(task_id):
            return None
        return kept if kept.until > (time.time() if now is None else now) else None
