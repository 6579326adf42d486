"""The storage contract of a queue.

A queue holds *chunks*: opaque payloads (pickled by the driver, never unpickled here) with a small
:class:`ChunkMeta`. A chunk is ``delayed`` (its release time has not come), ``ready`` (waiting:
highest priority first, FIFO within a priority), ``leased`` (handed to a consumer, not yet
acknowledged) or ``dead`` (dead-lettered). Only an acknowledgement removes a chunk. The order of
ready and delayed chunks is :mod:`zdq.storage.order`'s.

The index (which chunks are ready, in what order, which are leased, how often each was tried) is the
same for every backend and lives here, in memory; backends only make payloads durable
(:meth:`Storage._write`, :meth:`Storage._read`, :meth:`Storage._delete`, ...). A durable backend
rebuilds the index on open from what it stored, which is why a leased chunk is never written as
"leased": after a crash, everything not acknowledged is ready again.
"""

from __future__ import annotations

import math
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from zdq.errors import ProtocolError
from zdq.storage.order import Delayed, ReadyQueue
from zdq.transport.protocol import TAGS, pack_tags, unpack_tags

__all__ = ["ChunkMeta", "Leased", "DeadLetter", "StorageCounts", "Storage", "MAY_HAVE_STARTED"]

#: Written among a chunk's cancelled task indexes (never a task's index: a chunk holds far fewer):
#: the chunk's tasks may have started (see :meth:`Storage.may_have_started`).
MAY_HAVE_STARTED = 0xFFFFFFFF

_META = struct.Struct(">16sQI")
#: The head of a delayed or prioritised chunk: the plain one, then the release time and priority.
#: Chunks stored before a field existed keep their head (queues written by earlier versions stay
#: readable); each layout has its own size, which is how a stored head says which it is.
_META_TIMED = struct.Struct(">16sQIdi")
#: The heads with the chunk's first task id (28 + 8 and 40 + 8 bytes); a tagged chunk's head is the
#: timed one followed by its tags (:func:`~zdq.transport.protocol.pack_tags`, 28 bytes or more).
_META_BASE = struct.Struct(">16sQIQ")
_META_TIMED_BASE = struct.Struct(">16sQIdiQ")


@dataclass(slots=True, unsafe_hash=True)
class ChunkMeta:
    """What the broker knows of a chunk without reading it.

    Treated as immutable (nothing writes a meta's field: a changed chunk gets a new one, through
    :func:`dataclasses.replace`), and hashed by value, but not declared frozen: a frozen
    dataclass's ``__init__`` sets each of its eleven fields through ``object.__setattr__``,
    which one meta per chunk stored paid on the broker's path (issue 26, point 4).

    Attributes
    ----------
    owner : bytes
        Identity of the driver that submitted it: its results are routed there.
    seq : int
        The driver's own number for the chunk.
    n_tasks : int
        How many tasks it holds.
    not_before : float
        Wall-clock seconds (``time.time()``) before which it is not delivered; ``0.0``: at once.
    priority : int
        Higher is served first within the queue.
    base : int
        The id of its first task (its tasks' ids are consecutive); ``0``: not known (a schedule's
        tick, a chunk stored by an earlier version). A dead letter's is its task's id.
    expires, rate_key, rate, unique_key, unique_for
        Its tags, as :class:`~zdq.codec.timing.Timing` says; all empty for most chunks.
    """

    owner: bytes
    seq: int
    n_tasks: int
    not_before: float = 0.0
    priority: int = 0
    base: int = 0
    expires: float = 0.0
    rate_key: bytes = b""
    rate: float = 0.0
    unique_key: bytes = b""
    unique_for: float = 0.0

    @property
    def tagged(self) -> bool:
        return bool(self.expires or self.rate_key or self.rate or self.unique_key or self.unique_for)

    def pack(self) -> bytes:
        if self.tagged:
            head = _META_TIMED_BASE.pack(self.owner, self.seq, self.n_tasks, self.not_before, self.priority, self.base)
            return head + pack_tags(self.expires, self.rate_key, self.rate, self.unique_key, self.unique_for)
        if self.not_before or self.priority:
            if not self.base:
                return _META_TIMED.pack(self.owner, self.seq, self.n_tasks, self.not_before, self.priority)
            return _META_TIMED_BASE.pack(self.owner, self.seq, self.n_tasks, self.not_before, self.priority, self.base)
        if not self.base:  # a tick, a dead letter: what earlier versions wrote
            return _META.pack(self.owner, self.seq, self.n_tasks)
        return _META_BASE.pack(self.owner, self.seq, self.n_tasks, self.base)

    @classmethod
    def unpack(cls, raw: bytes) -> ChunkMeta:
        size = len(raw)
        if size == _META_BASE.size:
            owner, seq, n_tasks, base = _META_BASE.unpack(raw)
            return cls(owner, seq, n_tasks, base=base)
        if size == _META.size:
            return cls(*_META.unpack(raw))
        if size == _META_TIMED.size:
            return cls(*_META_TIMED.unpack(raw))
        if size == _META_TIMED_BASE.size:
            return cls(*_META_TIMED_BASE.unpack(raw))
        if size < _META_TIMED_BASE.size + TAGS.size:
            raise ValueError(f"a stored chunk head of {size} bytes")
        try:
            tags = unpack_tags(raw[_META_TIMED_BASE.size :])
        except ProtocolError as e:
            raise ValueError(f"a stored chunk head's tags: {e}") from None
        owner, seq, n_tasks, not_before, priority, base = _META_TIMED_BASE.unpack_from(raw)
        return cls(owner, seq, n_tasks, not_before, priority, base, *tags)

    SIZE = _META.size


@dataclass(slots=True)
class Leased:
    """A chunk :meth:`Storage.lease` took for a consumer (made per delivery: not frozen, whose
    ``__init__`` costs a call per field)."""

    chunk_id: int
    meta: ChunkMeta
    payload: object
    attempt: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    chunk_id: int
    meta: ChunkMeta
    reason: str


@dataclass(frozen=True, slots=True)
class StorageCounts:
    ready_chunks: int
    ready_tasks: int
    leased_chunks: int
    leased_tasks: int
    dead_chunks: int
    dead_tasks: int
    delayed_chunks: int = 0
    delayed_tasks: int = 0


class Storage(ABC):
    """Base of every backend: the shared index over a backend's durable primitives.

    Not thread-safe: one broker thread owns it.
    """

    durable: bool = False

    def __init__(self) -> None:
        self._meta: dict[int, ChunkMeta] = {}
        self._ready = ReadyQueue()
        self._delayed = Delayed()
        self._leased: set[int] = set()
        self._dead: dict[int, str] = {}
        self._attempts: dict[int, int] = {}
        self._ready_tasks = 0
        self._leased_tasks = 0
        # Chunk ids must never repeat across broker incarnations of a queue: a consumer may still
        # report a chunk of the previous one. So they start from the clock (microseconds, shifted
        # to leave room for 256 chunks per microsecond), and a durable queue after its largest
        # stored id too: the largest id it ever gave may belong to a chunk acknowledged since.
        self._next_id = (time.time_ns() // 1000) << 8
        self._closed = False
        #: Results a durable queue kept for chunks whose driver had not taken them when it stopped:
        #: chunk id -> (consumer id, results). Those chunks are leased (done), not ready.
        self.recovered_results: dict[int, tuple[bytes, object]] = {}
        #: Tasks cancelled before they started, by chunk: chunk id -> their indexes in the chunk.
        #: Consumers are told before the chunk is delivered, and skip them.
        self._cancels: dict[int, frozenset[int]] = {}
        #: Chunks whose tasks may have started: a consumer (or a broker before this one) held them
        #: when it died, so no cancellation of their tasks can say "never started". Written with
        #: the marks (:data:`MAY_HAVE_STARTED`).
        self._started: set[int] = set()

    # -- the contract -------------------------------------------------------------------------
    def open(self) -> None:
        """Open the backend and rebuild the index from what it holds."""
        kept = dict(self._scan_results())
        now = time.time()
        for chunk_id, meta, dead_reason in self._scan():
            self._meta[chunk_id] = meta
            if chunk_id in kept and dead_reason is None:
                self._leased.add(chunk_id)
                self._leased_tasks += meta.n_tasks
                self.recovered_results[chunk_id] = kept[chunk_id]
            elif dead_reason is None:
                self._enqueue(chunk_id, meta, now)  # a time that passed while the queue was down: ready now
            else:
                self._dead[chunk_id] = dead_reason
            self._next_id = max(self._next_id, chunk_id + 1)
        for chunk_id, indexes in self._scan_cancels():
            if chunk_id in self._meta:
                if MAY_HAVE_STARTED in indexes:
                    self._started.add(chunk_id)
                    indexes = indexes - {MAY_HAVE_STARTED}
                if indexes:
                    self._cancels[chunk_id] = indexes
        for chunk_id in self._scan_leased():
            # Leased when the last broker stopped: its consumer may still run it (or have run part).
            if chunk_id in self._meta and chunk_id not in self._dead:
                self._started.add(chunk_id)
        for chunk_id, used in self._scan_attempts():
            # Attempts lost with consumers and brokers before this one: the next lease goes on from
            # there, so that a chunk that kills its worker every time is split and dead-lettered.
            if chunk_id in self._meta and chunk_id not in self._dead and chunk_id not in self.recovered_results:
                self._attempts[chunk_id] = used

    def put_many(self, entries: Sequence[tuple[ChunkMeta, object]]) -> list[int]:
        """Store chunks at the tail, all or none; return their ids once they are stored.

        Raises
        ------
        StorageFull
            Nothing of ``entries`` was stored.
        """
        first = self._next_id
        if len(entries) == 1:  # a lone chunk (the single task's round trip): no comprehension
            meta, payload = entries[0]
            records = [(first, meta, payload)]
        else:
            records = [(i, meta, payload) for i, (meta, payload) in enumerate(entries, first)]
        self._write(records)  # stored (a durable backend: committed) before any is indexed
        self._next_id = first + len(records)
        ready, now = self._ready, 0.0
        for chunk_id, meta, _ in records:
            self._meta[chunk_id] = meta
            if meta.not_before or meta.priority:
                now = now or time.time()
                self._enqueue(chunk_id, meta, now)
            else:  # the plain chunk, kept short: priority 0's FIFO
                ready.plain.append(chunk_id)
                ready.n += 1
                self._ready_tasks += meta.n_tasks
        return list(range(first, self._next_id))

    def put_leased(self, meta: ChunkMeta, payload: object, *, with_broker: bool = False) -> tuple[int, object]:
        """Store a chunk and lease it at once: :meth:`put_many` then :meth:`lease`, for a chunk
        handed out as it arrives (the caller checked that no chunk is ready: it would be the next
        out). Not for a delayed chunk. Return its id and its payload as :meth:`lease` reads it
        (through :meth:`_read`, which a durable backend's lease bookkeeping rides on). Raises as
        :meth:`put_many` (then nothing is stored)."""
        if meta.not_before:
            raise ValueError("a delayed chunk is not leased as it arrives")
        chunk_id = self._next_id
        self._write([(chunk_id, meta, payload)])  # stored (a durable backend: committed) first
        self._next_id = chunk_id + 1
        self._meta[chunk_id] = meta
        self._leased.add(chunk_id)
        self._leased_tasks += meta.n_tasks
        self._attempts[chunk_id] = 1
        return chunk_id, self._read(chunk_id, with_broker)

    def _enqueue(self, chunk_id: int, meta: ChunkMeta, now: float) -> None:
        """A stored chunk that is neither leased nor dead: delayed until its time, else ready."""
        if meta.not_before > now:
            self._delayed.add(chunk_id, meta.not_before, meta.n_tasks)
        else:
            self._ready.append(chunk_id, meta.priority)
            self._ready_tasks += meta.n_tasks

    @property
    def next_id(self) -> int:
        """The id the next chunk stored gets: every chunk stored before has a smaller one."""
        return self._next_id

    @property
    def ready_order(self) -> ReadyQueue:
        """The ready chunks: the broker reads their count (``n``, :meth:`has_ready`'s) after
        every round as an attribute, without a call."""
        return self._ready

    @property
    def delayed_order(self) -> Delayed:
        """The delayed chunks: the broker's loop reads their ``next_at`` (:attr:`next_release`)
        every turn as an attribute, without this property's call."""
        return self._delayed

    @property
    def next_release(self) -> float:
        """Wall-clock time of the next delayed chunk's release (``inf``: none waits); it may be
        early (a chunk cancelled since), never late."""
        return self._delayed.next_at

    def release_due(self, now: float) -> int:
        """Move the delayed chunks whose time is ``now`` or past to the tail of their priority's
        FIFO, in release order; return how many."""
        due = self._delayed.due(now)
        for chunk_id in due:
            meta = self._meta[chunk_id]
            self._delayed.released(meta.n_tasks)
            self._ready.append(chunk_id, meta.priority)
            self._ready_tasks += meta.n_tasks
        return len(due)

    def is_delayed(self, chunk_id: int) -> bool:
        return chunk_id in self._delayed

    def release_now(self, chunk_id: int) -> bool:
        """Move a delayed chunk to the tail of its priority's FIFO before its time (a purge: its
        tasks are cancelled, and their futures should not wait for the release); False if it is
        not delayed."""
        meta = self._meta.get(chunk_id)
        if meta is None or not self._delayed.discard(chunk_id, meta.n_tasks):
            return False
        self._ready.append(chunk_id, meta.priority)
        self._ready_tasks += meta.n_tasks
        return True

    def put_dead(self, entries: Sequence[tuple[ChunkMeta, object, str]]) -> list[int]:
        """Store chunks directly as dead letters (a task that used up its attempts)."""
        ids = list(range(self._next_id, self._next_id + len(entries)))
        records = [(i, meta, payload) for i, (meta, payload, _) in zip(ids, entries)]
        self._write(records, {i: reason for i, (_, _, reason) in zip(ids, entries)})
        self._next_id += len(entries)
        for chunk_id, (meta, _, reason) in zip(ids, entries):
            self._meta[chunk_id] = meta
            self._dead[chunk_id] = reason
        return ids

    def split(self, chunk_id: int, parts: Sequence[tuple[ChunkMeta, object]]) -> list[int]:
        """Replace a leased chunk by ``parts``, placed at the head of the queue with fresh attempts.

        A redelivered chunk is split so that a task that kills its consumer is tried alone and
        the others are not held hostage. Parts are stored before the chunk is deleted: a crash in
        between duplicates work, never loses it.
        """
        if chunk_id not in self._leased or not parts:
            return []
        ids = list(range(self._next_id, self._next_id + len(parts)))
        marks = self._marks_of_parts(chunk_id, ids)
        for part_id, part_marks in marks.items():
            # Held, not written yet: they ride in the parts' own transaction (all or none).
            self._hold_cancels(part_id, part_marks)
        try:
            self._write([(i, meta, payload) for i, (meta, payload) in zip(ids, parts)])
        except BaseException:
            self._unhold_cancels(list(marks))  # the ids are given again: their marks must not stay
            raise
        self._next_id += len(parts)
        self._leased.discard(chunk_id)
        self._leased_tasks -= self._meta.pop(chunk_id).n_tasks
        self._attempts.pop(chunk_id, None)
        self._cancels.pop(chunk_id, None)
        self._started.discard(chunk_id)
        self._delete([chunk_id])
        for new_id, (meta, _) in zip(reversed(ids), reversed(parts)):
            self._meta[new_id] = meta
            self._ready.appendleft(new_id, meta.priority)
            self._ready_tasks += meta.n_tasks
        for part_id, part_marks in marks.items():
            if MAY_HAVE_STARTED in part_marks:
                self._started.add(part_id)
                part_marks = part_marks - {MAY_HAVE_STARTED}
            if part_marks:
                self._cancels[part_id] = part_marks
        return ids

    def _marks_of_parts(self, chunk_id: int, ids: list[int]) -> dict[int, frozenset[int]]:
        """What a chunk split into one-task parts ``ids`` (in order) passes on to each part: its
        task's cancellation, and whether it may have started (every part, if the chunk may)."""
        cancelled = self._cancels.get(chunk_id, frozenset())
        started = chunk_id in self._started
        marks: dict[int, frozenset[int]] = {}
        for index, part_id in enumerate(ids):
            one = {0} if index in cancelled else set()
            if started:
                one.add(MAY_HAVE_STARTED)
            if one:
                marks[part_id] = frozenset(one)
        return marks

    def cancel(self, chunk_id: int, indexes: Iterable[int]) -> bool:
        """Mark tasks of a stored chunk as cancelled (durable backends write it at once); False if
        the chunk is not stored, or is a dead letter."""
        if chunk_id not in self._meta or chunk_id in self._dead:
            return False
        n = self._meta[chunk_id].n_tasks
        marks = self._cancels.get(chunk_id, frozenset()) | {i for i in indexes if 0 <= i < n}
        if marks != self._cancels.get(chunk_id):
            self._write_cancels(chunk_id, self._record(chunk_id, marks))  # raises StorageError: nothing is marked
            self._cancels[chunk_id] = marks
        return True

    def cancelled(self, chunk_id: int) -> frozenset[int]:
        """The indexes of the tasks of this chunk that were cancelled (usually none)."""
        return self._cancels.get(chunk_id, frozenset()) if self._cancels else frozenset()

    def may_have_started(self, chunk_id: int) -> bool:
        """Whether a consumer that died (or the consumer of a broker before this one) held this
        chunk: any of its tasks may have started, so none can be cancelled as "never started"."""
        return chunk_id in self._started if self._started else False

    def note_started(self, chunk_ids: Iterable[int]) -> None:
        """Record that the tasks of these stored chunks may have started (their consumer died
        holding them); durable backends write it before this returns.

        Raises
        ------
        StorageError
            If it could not be written (it holds here still, for as long as this broker lives).
        """
        fresh = [i for i in chunk_ids if i in self._meta and i not in self._dead and i not in self._started]
        if not fresh:
            return
        self._started.update(fresh)
        for chunk_id in fresh:
            self._hold_cancels(chunk_id, self._record(chunk_id, self._cancels.get(chunk_id, frozenset())))
        self._flush_cancels(fresh)

    def _record(self, chunk_id: int, marks: frozenset[int]) -> frozenset[int]:
        """What is written for a chunk's marks: its cancelled tasks, and whether it may have started."""
        return marks | {MAY_HAVE_STARTED} if chunk_id in self._started else marks

    def find(self, owner: bytes, seq: int) -> list[int]:
        """The ids of the stored chunks a driver numbered ``seq`` (several once split), in order.
        A scan: for rare requests (cancellations) only."""
        return sorted(i for i, m in self._meta.items() if m.seq == seq and m.owner == owner)

    def is_ready(self, chunk_id: int) -> bool:
        """Stored and not yet delivered: ready, or delayed (a cancellation marks it all the same)."""
        return chunk_id in self._meta and chunk_id not in self._leased and chunk_id not in self._dead

    # -- rate limits (zdq.broker.rates): a parked chunk waits for a token, out of the ready order --
    def peek(self) -> int | None:
        """The chunk :meth:`lease` would take next, or ``None``."""
        return self._ready.peek()

    def park(self, chunk_id: int) -> None:
        """Take the chunk at the head of the ready order (:meth:`peek`'s) out of it: it waits,
        counted as delayed but with no release time, until :meth:`lease` takes it by id or
        :meth:`unpark` (or a purge: :meth:`release_now`) puts it back. Not written: a queue
        opened again finds it ready."""
        meta = self._meta[chunk_id]
        taken = self._ready.popleft()
        assert taken == chunk_id, "only the head of the ready order is parked"
        self._ready_tasks -= meta.n_tasks
        self._delayed.add(chunk_id, math.inf, meta.n_tasks)

    def is_parked(self, chunk_id: int) -> bool:
        return self._delayed.when(chunk_id) == math.inf

    def unpark(self, chunk_id: int) -> bool:
        """Put a parked chunk back at the tail of its priority's FIFO (its key lost its limit)."""
        return self.is_parked(chunk_id) and self.release_now(chunk_id)

    def lease(self, chunk_id: int | None = None, *, with_broker: bool = False) -> Leased | None:
        """Take the chunk at the head of the queue (or the parked chunk ``chunk_id``), or ``None``
        when none is ready. ``with_broker``: it goes to a consumer in the broker's own process,
        which dies with the broker: a durable backend counts the attempt as lost if the broker
        dies holding it (one that goes to a consumer elsewhere is not: that consumer lives on)."""
        if chunk_id is not None:
            meta = self._meta[chunk_id]
            self._delayed.discard(chunk_id, meta.n_tasks)
        else:
            ready = self._ready
            if not ready.n:
                return None
            plain = ready.plain
            if len(plain) == ready.n:  # every ready chunk is of priority 0: its FIFO's head, without a call
                chunk_id = plain.popleft()
                ready.n -= 1
            else:
                chunk_id = ready.popleft()
            meta = self._meta[chunk_id]
            self._ready_tasks -= meta.n_tasks
        self._leased.add(chunk_id)
        self._leased_tasks += meta.n_tasks
        attempt = self._attempts.get(chunk_id, 0) + 1
        self._attempts[chunk_id] = attempt
        return Leased(chunk_id, meta, self._read(chunk_id, with_broker), attempt)

    def ack_many(self, chunk_ids: Iterable[int]) -> list[ChunkMeta | None]:
        """Remove chunks for good; ``None`` for an id that is no longer stored (a duplicate)."""
        out: list[ChunkMeta | None] = []
        gone: list[int] = []
        leased, metas = self._leased, self._meta
        for chunk_id in chunk_ids:
            if chunk_id in leased:  # the common case: results a driver acknowledged
                leased.discard(chunk_id)
                meta = metas.pop(chunk_id)
                self._leased_tasks -= meta.n_tasks
            elif chunk_id in metas and chunk_id not in self._dead:
                # A late DONE for a chunk whose lease expired: the work is done, do not run it again.
                # (Or a delayed chunk whose every task was cancelled.)
                meta = metas[chunk_id]
                if not self._delayed.discard(chunk_id, meta.n_tasks):
                    try:
                        self._ready.remove(chunk_id, meta.priority)
                    except ValueError:
                        out.append(None)
                        continue
                    self._ready_tasks -= meta.n_tasks
                del metas[chunk_id]
            else:
                out.append(None)
                continue
            self._attempts.pop(chunk_id, None)
            if self._cancels:
                self._cancels.pop(chunk_id, None)
            if self._started:
                self._started.discard(chunk_id)
            gone.append(chunk_id)
            out.append(meta)
        if gone:
            self._delete(gone)
        return out

    def release(self, chunk_id: int, *, count_attempt: bool = True) -> bool:
        """Put a leased chunk back at the head of the queue.

        ``count_attempt=False`` is for a chunk given back unstarted: it does not use up an attempt.
        """
        if chunk_id not in self._leased:
            return False
        self._leased.discard(chunk_id)
        meta = self._meta[chunk_id]
        self._leased_tasks -= meta.n_tasks
        self._ready.appendleft(chunk_id, meta.priority)
        self._ready_tasks += meta.n_tasks
        if not count_attempt:
            self._attempts[chunk_id] = max(0, self._attempts.get(chunk_id, 1) - 1)
        return True

    def meta(self, chunk_id: int) -> ChunkMeta | None:
        return self._meta.get(chunk_id)

    def keep_results(self, chunk_id: int, consumer: bytes, results: object) -> None:
        """Keep the results of a leased chunk that no driver has taken yet (durable backends write
        them down, so that a restarted broker serves them instead of running the chunk again)."""

    def chunk_of(self, task_id: int) -> int | None:
        """The id of the stored chunk (ready, delayed, leased or dead) that holds task ``task_id``
        (its ids run from ``meta.base``), or None. A scan of every stored chunk's head: for rare
        requests (:func:`zdq.state`) only."""
        for chunk_id, meta in self._meta.items():
            if meta.base <= task_id < meta.base + meta.n_tasks and meta.base:
                return chunk_id
        return None

    # -- results kept after their receipt (``result_ttl``: :mod:`zdq.broker.retained`) ----------
    def retain(self, chunk_id: int, record: bytes) -> None:
        """Keep a chunk's results after its acknowledgement (durable backends write ``record``
        with that acknowledgement, in the same transaction); memory keeps nothing here."""

    def unretain(self, chunk_ids: Iterable[int]) -> None:
        """Drop results kept by :meth:`retain` (expired, or evicted by the byte bound)."""

    def retained(self) -> list[tuple[int, bytes]]:
        """The records :meth:`retain` wrote before the queue was last closed."""
        return []

    def metas(self) -> Iterable[ChunkMeta]:
        """The header of every stored chunk (ready, leased or dead)."""
        return self._meta.values()

    def stored_metas(self) -> Iterable[tuple[int, ChunkMeta]]:
        """``(chunk id, header)`` of every stored chunk (ready, leased or dead)."""
        return self._meta.items()

    def has_ready(self) -> bool:
        return self._ready.n > 0

    def waiting_ids(self) -> list[int]:
        """The ids of the chunks stored and not yet delivered: ready or delayed (see
        :meth:`is_ready`). A scan: for rare requests (a purge) only."""
        return [i for i in self._meta if self.is_ready(i)]

    def is_leased(self, chunk_id: int) -> bool:
        return chunk_id in self._leased

    def is_dead(self, chunk_id: int) -> bool:
        return chunk_id in self._dead

    def take_back(self, chunk_id: int) -> bool:
        """Move a ready chunk to leased without delivering it (its results came in late)."""
        try:
            self._ready.remove(chunk_id, self._meta[chunk_id].priority)
        except ValueError:
            return False
        n = self._meta[chunk_id].n_tasks
        self._ready_tasks -= n
        self._leased.add(chunk_id)
        self._leased_tasks += n
        return True

    def dead_letter(self, chunk_id: int, reason: str) -> bool:
        """Move a leased chunk to the dead letters, with why."""
        if chunk_id not in self._leased:
            return False
        self._mark_dead(chunk_id, reason)
        self._leased.discard(chunk_id)
        self._leased_tasks -= self._meta[chunk_id].n_tasks
        self._dead[chunk_id] = reason
        return True

    def dead_letters(self) -> list[DeadLetter]:
        return [DeadLetter(i, self._meta[i], r) for i, r in self._dead.items()]

    def requeue_dead(self, chunk_ids: Iterable[int] | None = None) -> int:
        """Put dead letters back at the tail of the queue with fresh attempts; return how many."""
        ids = list(self._dead) if chunk_ids is None else [i for i in chunk_ids if i in self._dead]
        if ids:
            self._unmark_dead(ids)
        for chunk_id in ids:
            del self._dead[chunk_id]
            self._attempts.pop(chunk_id, None)
            self._ready.append(chunk_id, self._meta[chunk_id].priority)
            self._ready_tasks += self._meta[chunk_id].n_tasks
        return len(ids)

    def purge_dead(self, chunk_ids: Iterable[int] | None = None) -> int:
        """Delete dead letters; return how many."""
        ids = list(self._dead) if chunk_ids is None else [i for i in chunk_ids if i in self._dead]
        if ids:
            self._delete(ids)
        for chunk_id in ids:
            del self._dead[chunk_id]
            del self._meta[chunk_id]
            self._attempts.pop(chunk_id, None)
            self._cancels.pop(chunk_id, None)
            self._started.discard(chunk_id)
        return len(ids)

    # -- schedules (their records are the broker's; storage keeps them with the queue) --------
    def stored_schedules(self) -> list[bytes]:
        """The schedule records written before the queue was last closed."""
        return list(self._scan_schedules())

    def write_schedule(self, schedule_id: int, record: bytes | None, *, now: bool = False) -> None:
        """Keep (``None``: drop) a schedule's record; ``now`` writes it before returning, else it
        may wait for the next commit (a schedule's state after a skip or a result)."""
        self._write_schedule(schedule_id, record, now)

    def write_schedules(self, records: list[tuple[int, bytes | None]]) -> None:
        """Keep (``None``: drop) several schedules' records together, before returning: on a
        durable backend in one transaction (a named schedule replaced by one of another id: the
        old dropped and the new kept, or neither). Raises ``StorageError`` (then none is kept)."""
        for schedule_id, record in records:
            self._write_schedule(schedule_id, record, False)
        self.commit(force=True)

    def put_tick(self, meta: ChunkMeta, payload: object, schedule_id: int, record: Callable[[int], bytes]) -> int:
        """Store a tick's chunk at the tail together with its schedule's new record (next tick,
        count; ``record(chunk id)``): on a durable backend in one transaction, so a crash keeps
        both or neither and a tick is put in the queue exactly once. Raises as :meth:`put_many`
        (then neither is kept)."""
        chunk_id = self._next_id
        self._write_schedule(schedule_id, record(chunk_id), False)
        (stored,) = self.put_many([(meta, payload)])
        assert stored == chunk_id
        return chunk_id

    def counts(self) -> StorageCounts:
        dead_tasks = sum(self._meta[i].n_tasks for i in self._dead)
        return StorageCounts(
            len(self._ready), self._ready_tasks, len(self._leased), self._leased_tasks, len(self._dead), dead_tasks,
            len(self._delayed), self._delayed.tasks,
        )

    def setting(self, name: bytes, default: bytes | None) -> bytes | None:
        """A value kept with the queue: the stored one, else ``default`` (stored if not None)."""
        return default

    def write_setting(self, name: bytes, value: bytes) -> None:
        """Keep ``value`` with the queue under ``name`` (replacing what was there; written now)."""

    def commit(self, *, force: bool = False) -> None:
        """Write the bookkeeping that may lag (acknowledgements, lease and dead-letter marks).

        The broker calls it after every round. New chunks never wait for it: :meth:`put_many`
        returns only once they are stored. A backend may hold these writes back a little to
        write them together (``force`` writes them now); losing them in a crash only re-runs
        acknowledged work (at least once), it never loses a chunk.
        """

    def holds_nothing(self) -> bool:
        """Whether the queue holds nothing its pool wrote: no chunk (ready, leased or dead), no
        kept result, no schedule. Such a queue may take its pool's payload key (a pool that grew,
        see :meth:`zdq.broker.Broker.join_key`), or be discarded (:meth:`discard`)."""
        return not self._meta and not self.retained() and not self.stored_schedules()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def discard(self) -> None:
        """Close, for a queue whose placement failed: a durable backend also removes the queue if
        this open created it and it holds nothing yet, so that a failed open leaves no queue
        behind (a later open would find a queue its pool never had). Memory only closes."""
        self.close()

    # -- what a backend implements ------------------------------------------------------------
    @abstractmethod
    def _scan(self) -> Iterable[tuple[int, ChunkMeta, str | None]]:
        """Every stored chunk in FIFO order, with its dead-letter reason or ``None``."""

    def _scan_results(self) -> Iterable[tuple[int, tuple[bytes, object]]]:
        """Results kept by :meth:`keep_results` before the queue was last closed."""
        return ()

    def _scan_cancels(self) -> Iterable[tuple[int, frozenset[int]]]:
        """Cancellations written by :meth:`_write_cancels` before the queue was last closed."""
        return ()

    def _write_cancels(self, chunk_id: int, indexes: frozenset[int]) -> None:
        """Durable backends write a chunk's cancelled tasks before this returns (a broker answers
        a driver that they will never run only then). ``indexes`` may hold
        :data:`MAY_HAVE_STARTED`: written as it is."""

    def _hold_cancels(self, chunk_id: int, indexes: frozenset[int]) -> None:
        """As :meth:`_write_cancels`, but durable backends may write it with their next
        transaction (:meth:`_write` or :meth:`_flush_cancels`)."""

    def _unhold_cancels(self, chunk_ids: list[int]) -> None:
        """Drop the marks of these chunks held and not written (their chunks were not stored)."""

    def _flush_cancels(self, chunk_ids: list[int]) -> None:
        """Durable backends write the marks held by :meth:`_hold_cancels` before this returns
        (raise StorageError naming ``chunk_ids`` if they could not)."""

    def _scan_leased(self) -> Iterable[int]:
        """The chunks a durable backend found leased when it was opened (its last broker had
        handed them to consumers, which may run them still)."""
        return ()

    def _scan_attempts(self) -> Iterable[tuple[int, int]]:
        """The attempts each chunk used that ended with the death of its consumer or of the
        broker before this one (a durable backend's count; none elsewhere)."""
        return ()

    def _scan_schedules(self) -> Iterable[bytes]:
        """Schedule records written by :meth:`_write_schedule` before the queue was last closed."""
        return ()

    def _write_schedule(self, schedule_id: int, record: bytes | None, now: bool) -> None:
        """Durable backends keep a schedule's record (see :meth:`write_schedule`)."""

    @abstractmethod
    def _write(self, records: list[tuple[int, ChunkMeta, object]], dead: dict[int, str] | None = None) -> None:
        """Store new chunks atomically (all or none); those in ``dead`` as dead letters."""

    @abstractmethod
    def _read(self, chunk_id: int, with_broker: bool = False) -> object:
        """The payload of a stored chunk, read to lease it (``with_broker``: see :meth:`lease`)."""

    @abstractmethod
    def _delete(self, chunk_ids: list[int]) -> None:
        """Remove chunks for good."""

    @abstractmethod
    def _mark_dead(self, chunk_id: int, reason: str) -> None:
        """Record that a chunk is dead-lettered."""

    @abstractmethod
    def _unmark_dead(self, chunk_ids: list[int]) -> None:
        """Record that chunks are no longer dead-lettered."""

    @abstractmethod
    def _close(self) -> None:
        """Release the backend's resources."""
