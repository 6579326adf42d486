"""The lease table: the one place that knows where each chunk of a queue stands.

::

    PUT ──> ready ──lease──> leased ──DONE──> done ──RACK──> gone
              ^                │  │              (results kept until a driver of the pool
              └──expired/RETURN┘  └─ACK (early)─> leased, not stored    says it holds them)

A chunk is *ready* (in the storage's FIFO), *leased* to one consumer, *done* (its results are held
here until a driver acknowledges them with RACK), or *dead* (dead-lettered, in storage). The
storage backend keeps what must survive the broker (every chunk not yet acknowledged, dead letters);
this table adds what lives only as long as the broker: who holds a lease, which chunks were
acknowledged early, whose lease expired (a late DONE from that consumer still counts), and the
results waiting for a driver's receipt. Nothing is deleted from storage before that receipt. A
pool with ``result_ttl`` keeps the results a while after it (:mod:`zdq.broker.retained`).

Owned by the broker's loop thread; control-plane readers take the broker's lock.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from zdq.broker.expiry import EXPIRED_BY, EXPIRED_RESULTS
from zdq.errors import ProtocolError, StorageError
from zdq.codec.schedules import SCHEDULED
from zdq.storage.base import ChunkMeta, Leased, Storage
from zdq.broker.retained import Retained
from zdq.transport.protocol import ID_SIZE

__all__ = ["Held", "LeaseTable", "QueueCounts"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Held:
    """A chunk out of the ready queue: leased to a consumer, or done and awaiting a receipt."""

    meta: ChunkMeta
    holder: bytes | None  # the consumer holding the lease; None once done
    early: bool = False  # acknowledged on receipt (at most once): no longer in storage
    results: object | None = None  # once done: the results, until a driver acknowledges them
    consumer: bytes = b""  # who produced the results
    driver: bytes | None = None  # the driver the results were last sent to (None: not sent)
    sent_at: float = 0.0
    leased_at: float = 0.0  # when it was delivered (0: not by this broker), for the round-trip histogram

    @property
    def done(self) -> bool:
        return self.results is not None


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """Tasks in each state (the STATUS a driver asks for, and the broker's statistics)."""

    ready_chunks: int
    ready_tasks: int
    leased_chunks: int
    leased_tasks: int
    done_chunks: int
    done_tasks: int
    dead_chunks: int
    dead_tasks: int
    delayed_chunks: int = 0
    delayed_tasks: int = 0


class LeaseTable:
    """Every chunk's state over ``storage`` (which the table owns from now on)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._held: dict[int, Held] = {}
        # Consumers whose lease on a chunk expired (the chunk went back to the queue, and may have
        # been leased again since). While no one else holds the chunk, a DONE from them still
        # counts, so work that finished late is not thrown away; while another consumer does, what
        # they say of it is a late word, ignored (that consumer reports the chunk), never taken for
        # a forgery. Kept until the chunk is done or split, the oldest dropped past a bound.
        self._previous: dict[int, tuple[bytes, ...]] = {}
        #: Tasks of a chunk that failed and were retried by a consumer (RETRIED): task id ->
        #: attempts failed, told to the next consumer the chunk goes to, so that a consumer's
        #: death between retries does not give a task its retries anew. Kept until the chunk is
        #: done or split (its parts take theirs); in memory, as the attempts are.
        self.failed: dict[int, dict[int, int]] = {}
        # Chunks split into one-task parts (after a consumer died holding them): their part ids.
        self._parts: dict[int, tuple[bytes, int, list[int]]] = {}
        #: Results kept after their receipt (``result_ttl``), set by the broker; None: not kept.
        self.retained: Retained | None = None
        for chunk_id, (consumer, results) in storage.recovered_results.items():
            meta = storage.meta(chunk_id)
            if meta is not None:  # done before the last stop; no driver had taken the results
                if consumer == EXPIRED_BY:  # expired: its outcome is told by EXPIRED (see zdq.broker.expiry)
                    results = EXPIRED_RESULTS
                self._held[chunk_id] = Held(meta, None, results=results, consumer=consumer)

    # -- reading --------------------------------------------------------------------------------
    def get(self, chunk_id: int) -> Held | None:
        return self._held.get(chunk_id)

    def meta(self, chunk_id: int) -> ChunkMeta | None:
        held = self._held.get(chunk_id)
        return held.meta if held is not None else self.storage.meta(chunk_id)

    def held_by(self, consumer: bytes, chunk_id: int) -> Held | None:
        """The chunk if ``consumer`` holds its lease (or held it before it expired, and no other
        consumer holds it now)."""
        held = self._held.get(chunk_id)
        if held is not None and held.holder == consumer:
            return held
        if (held is None or held.holder is None) and consumer in self._previous.get(chunk_id, ()):
            return held or _RETURNED
        return None

    def held_before(self, consumer: bytes, chunk_id: int) -> bool:
        """Whether ``consumer`` held the chunk before its lease expired (what it says of the
        chunk while another consumer holds it is a late word, not a forgery)."""
        return consumer in self._previous.get(chunk_id, ())

    def leases_of(self, consumer: bytes) -> list[int]:
        return [chunk_id for chunk_id, held in self._held.items() if held.holder == consumer]

    def done_entries(self) -> Iterator[tuple[int, Held]]:
        return ((i, h) for i, h in self._held.items() if h.results is not None)

    def counts(self) -> QueueCounts:
        c = self.storage.counts()
        done = [h for h in self._held.values() if h.results is not None]
        done_tasks = sum(h.meta.n_tasks for h in done)
        early = [h for h in self._held.values() if h.early and h.results is None]
        early_tasks = sum(h.meta.n_tasks for h in early)
        stored_done = [h for h in done if not h.early]
        return QueueCounts(
            ready_chunks=c.ready_chunks,
            ready_tasks=c.ready_tasks,
            # Stored chunks that are done are leased to the storage (kept until the receipt);
            # early-acknowledged ones still running are not stored but are leased all the same.
            leased_chunks=c.leased_chunks - len(stored_done) + len(early),
            leased_tasks=c.leased_tasks - sum(h.meta.n_tasks for h in stored_done) + early_tasks,
            done_chunks=len(done),
            done_tasks=done_tasks,
            dead_chunks=c.dead_chunks,
            dead_tasks=c.dead_tasks,
            delayed_chunks=c.delayed_chunks,
            delayed_tasks=c.delayed_tasks,
        )

    def locate(self, owner: bytes, seq: int, chunk_id: int, indexes: Iterable[int]) -> dict[int, dict[int, int]]:
        """Where the tasks ``indexes`` of a driver's chunk ``seq`` are now: chunk id -> {index in
        that chunk: index in the driver's chunk}. ``chunk_id`` 0: the driver has no confirm yet
        (the chunk is looked up by its seq). A chunk split after a crash is one part per task."""
        if not chunk_id:
            found = self.storage.find(owner, seq)
            if len(found) != 1:
                return {}
            chunk_id = found[0]
        split = self._parts.get(chunk_id)
        if split is not None:  # only its own driver may cancel what it submitted
            part_owner, part_seq, parts = split
            if part_owner != owner or part_seq != seq:
                return {}
            return {parts[i]: {0: i} for i in indexes if i < len(parts)}
        meta = self.meta(chunk_id)
        if meta is None or meta.owner != owner or meta.seq != seq:
            return {}
        return {chunk_id: {i: i for i in indexes if i < meta.n_tasks}}

    def holding(self, task_id: int) -> tuple[int, Held] | None:
        """The chunk out of the ready queue (leased, or done and awaiting a receipt) that holds task
        ``task_id``, or None. A scan: for rare requests (:func:`zdq.state`) only."""
        for chunk_id, held in self._held.items():
            meta = held.meta
            if meta.base and meta.base <= task_id < meta.base + meta.n_tasks:
                return chunk_id, held
        return None

    def seqs_of(self, owner: bytes) -> set[int]:
        """The driver seqs of every chunk this queue holds for ``owner``, in any state."""
        seqs = {h.meta.seq for h in self._held.values() if h.meta.owner == owner}
        seqs.update(m.seq for m in self.storage.metas() if m.owner == owner)
        return seqs

    # -- transitions ----------------------------------------------------------------------------
    def put(self, entries: Sequence[tuple[ChunkMeta, object]]) -> list[int]:
        """Store new chunks at the tail (raises StorageFull/StorageError: nothing stored)."""
        return self.storage.put_many(entries)

    def put_leased(
        self, meta: ChunkMeta, payload: object, consumer: bytes, now: float, with_broker: bool = False
    ) -> tuple[int, object]:
        """Store a new chunk and lease it to ``consumer`` at once (:meth:`put`, then :meth:`lease`
        when it would be the next chunk out); its id and payload (see
        :meth:`~zdq.storage.base.Storage.put_leased`). Raises as :meth:`put`: nothing stored."""
        chunk_id, payload = self.storage.put_leased(meta, payload, with_broker=with_broker)
        self._held[chunk_id] = Held(meta, consumer, leased_at=now)
        return chunk_id, payload

    def lease(
        self, consumer: bytes, now: float = 0.0, chunk_id: int | None = None, with_broker: bool = False
    ) -> Leased | None:
        """The chunk at the head of the queue (or the parked ``chunk_id``), leased to ``consumer``
        (``with_broker``: a consumer in the broker's own process, which dies with it; see
        :meth:`~zdq.storage.base.Storage.lease`)."""
        leased = self.storage.lease(chunk_id, with_broker=with_broker)
        if leased is not None:
            self._held[leased.chunk_id] = Held(leased.meta, consumer, leased_at=now)
        return leased

    def expire_unsent(self, chunk_id: int, *, just_leased: bool = False) -> Held | None:
        """The chunk's expiry passed before it was delivered: it is done, its outcome
        :data:`~zdq.broker.expiry.EXPIRED_RESULTS` (see :mod:`zdq.broker.expiry`). ``just_leased``:
        it was leased a moment ago and not sent; otherwise it must be waiting (ready or delayed).
        ``None`` if it is not (delivered, done, or gone): nothing changes."""
        held = self._held.get(chunk_id)
        if just_leased:
            if held is None or held.results is not None or held.early:
                return None
        else:
            storage = self.storage
            meta = storage.meta(chunk_id)
            if held is not None or meta is None or not storage.is_ready(chunk_id):
                return None
            storage.release_now(chunk_id)  # a delayed one leaves its release heap first
            if not storage.take_back(chunk_id):
                return None
            held = self._held[chunk_id] = Held(meta, None)
            self._previous.pop(chunk_id, None)
        self.failed.pop(chunk_id, None)
        self._previous.pop(chunk_id, None)
        held.holder = None
        held.leased_at = 0.0
        held.results = EXPIRED_RESULTS
        held.consumer = EXPIRED_BY
        return held

    def give_back(self, chunk_id: int, *, count_attempt: bool) -> None:
        """A leased chunk goes back to the head of the queue (unstarted, or its delivery failed)."""
        held = self._held.get(chunk_id)
        if held is not None and held.results is None and not held.early:
            del self._held[chunk_id]
            self.storage.release(chunk_id, count_attempt=count_attempt)

    def ack_early(self, chunk_id: int) -> bool:
        """Acknowledge a leased chunk on receipt: it leaves storage now (at most once)."""
        held = self._held.get(chunk_id)
        if held is None or held.early or held.results is not None:
            return False
        self.storage.ack_many([chunk_id])
        held.early = True
        return True

    def reclaim(self, consumer: bytes) -> list[int]:
        """``consumer`` reconnected: chunks leased to it that it may never have received go back
        to the head of the queue, using no attempt (those it acknowledged early, it had)."""
        returned = []
        for chunk_id in sorted(self.leases_of(consumer), reverse=True):
            held = self._held[chunk_id]
            if held.results is None and not held.early:
                del self._held[chunk_id]
                self.storage.release(chunk_id, count_attempt=False)
                self._was_held(chunk_id, consumer)
                returned.append(chunk_id)
        self._may_have_started(returned)  # it may have received them, and runs what it received
        return returned

    def expire(self, consumer: bytes, *, count_attempt: bool = True) -> tuple[list[int], list[tuple[int, Held]]]:
        """``consumer`` is gone: its leased chunks go back to the head of the queue (remembering
        who held them). Return the ids returned and the early-acknowledged chunks that are lost."""
        returned: list[int] = []
        lost: list[tuple[int, Held]] = []
        for chunk_id in sorted(self.leases_of(consumer), reverse=True):
            held = self._held[chunk_id]
            if held.results is not None:
                continue
            del self._held[chunk_id]
            if held.early:
                lost.append((chunk_id, held))  # it never comes back: nothing kept for it stays
                self.failed.pop(chunk_id, None)
                self._previous.pop(chunk_id, None)
            else:
                self.storage.release(chunk_id, count_attempt=count_attempt)
                self._was_held(chunk_id, consumer)
                returned.append(chunk_id)
        self._may_have_started(returned)
        return returned, lost

    def _was_held(self, chunk_id: int, consumer: bytes) -> None:
        previous = self._previous
        before = previous.get(chunk_id, ())
        if consumer not in before:
            if not before and len(previous) >= _MAX_PREVIOUS:
                del previous[next(iter(previous))]  # the oldest: its holder is long gone
            previous[chunk_id] = (*before, consumer)

    def _may_have_started(self, chunk_ids: list[int]) -> None:
        """Chunks a consumer held when it died or reconnected go back to the queue: any of their
        tasks may have started, and a cancellation must say so, through any recovery (the mark
        is written with the chunk; see :meth:`~zdq.storage.base.Storage.may_have_started`)."""
        if not chunk_ids:
            return
        try:
            self.storage.note_started(chunk_ids)
        except StorageError as e:  # it holds in memory still: only a recovered broker forgets it
            logger.error("%s", e)

    def finish(self, chunk_id: int, consumer: bytes, results: object) -> Held | None:
        """A DONE from the chunk's holder (or its holder before its lease expired): the chunk is
        done, its results held until a receipt. ``None`` if it was done already (a duplicate)."""
        if self._previous:
            self._previous.pop(chunk_id, None)
        if self.failed:
            self.failed.pop(chunk_id, None)
        held = self._held.get(chunk_id)
        if held is None:
            # A late DONE of a chunk whose lease expired: it went back to the queue (or was
            # leased again); take it back so that it does not run once more.
            meta = self.storage.meta(chunk_id)
            if meta is None or self.storage.is_dead(chunk_id):
                return None
            if not self.storage.is_leased(chunk_id):
                # Delayed, or parked by its rate key, it leaves its heap first (as an expiry's);
                # one that cannot be taken back runs again rather than be counted twice (reviewer
                # 28b: a DONE in the round its holder's lease ended, of a chunk parked since,
                # drove the leased counts negative and the next SYNC's answer ended the loop).
                self.storage.release_now(chunk_id)
                if not self.storage.take_back(chunk_id):
                    return None
            held = self._held[chunk_id] = Held(meta, None)
        elif held.results is not None:
            return None
        held.holder = None
        held.results = results
        held.consumer = consumer
        return held

    def done_by(self, consumer: bytes, chunk_id: int, results: object) -> Held | None:
        """A DONE from ``consumer``: :meth:`finish` if it holds the chunk (or held it before its
        lease expired); None for a duplicate (done already, or gone).

        Raises
        ------
        ProtocolError
            If ``consumer`` never held the chunk: an authenticated peer still cannot forge
            another's results.
        """
        current = self._held.get(chunk_id)
        if current is not None and current.holder == consumer and len(consumer) == ID_SIZE:
            # The common case, kept short (finish's, for a chunk its holder reports: not done yet).
            if self._previous:
                self._previous.pop(chunk_id, None)
            if self.failed:
                self.failed.pop(chunk_id, None)
            current.holder = None
            current.results = results
            current.consumer = consumer
            return current
        if (current is None or current.holder != consumer) and self.held_by(consumer, chunk_id) is None:
            if (current is not None and current.done) or self.meta(chunk_id) is None or self.held_before(consumer, chunk_id):
                return None  # a duplicate, or a late word: the chunk's holder now reports it
            raise ProtocolError(f"DONE of chunk {chunk_id} that this peer never held")
        # RESULTS name their consumer in 16 bytes.
        producer = consumer if len(consumer) == ID_SIZE else consumer[:ID_SIZE].ljust(ID_SIZE, b"\0")
        return self.finish(chunk_id, producer, results)

    def keep(self, chunk_id: int, held: Held) -> None:
        """No driver takes these results now: a durable queue writes them down, so that a broker
        started again serves them instead of running the chunk once more."""
        if not held.early and held.results is not None:
            self.storage.keep_results(chunk_id, held.consumer, held.results)

    def sent(self, held: Held, driver: bytes | None, now: float | None = None) -> None:
        """The results of ``held`` went to ``driver`` (at ``now``): it alone may acknowledge them."""
        held.driver = driver
        held.sent_at = time.monotonic() if now is None else now

    def forget(self, chunk_ids: Iterable[int], driver: bytes) -> int:
        """``driver`` holds the results of these chunks: remove them for good. Return how many."""
        gone = []
        retained = self.retained
        for chunk_id in chunk_ids:
            held = self._held.get(chunk_id)
            if held is not None and held.results is not None and held.driver == driver:
                del self._held[chunk_id]
                if retained is not None:  # result_ttl: kept a while longer, for zdq.result()
                    retained.keep(chunk_id, held.meta, held.consumer, held.results)
                if not held.early:
                    gone.append(chunk_id)
        if gone:
            self.storage.ack_many(gone)
        return len(gone)

    def forget_now(self, chunk_id: int) -> None:
        """Remove a done chunk whose results nobody can take (they were dropped, and counted)."""
        held = self._held.pop(chunk_id, None)
        if held is not None and not held.early:
            self.storage.ack_many([chunk_id])

    def note_failed(self, consumer: bytes, chunk_id: int, failed: Sequence[tuple[int, int]]) -> None:
        """``consumer`` retries these tasks of a chunk it holds (or held): (task id, attempts
        failed so far) each, kept for the chunk's next delivery.

        Raises
        ------
        ProtocolError
            If it never held the chunk, or names a task that is not the chunk's.
        """
        held = self.held_by(consumer, chunk_id)
        meta = self.meta(chunk_id)
        if held is None or meta is None or held.done:
            current = self._held.get(chunk_id)
            if held is not None or meta is None or self.held_before(consumer, chunk_id) or (current is not None and current.done):
                # Done, split or gone meanwhile, or a late word of a previous holder: nothing to
                # keep (what names a chunk no longer here cannot be checked, and does no harm).
                return
            raise ProtocolError(f"RETRIED of chunk {chunk_id} that this peer never held")
        first = meta.base
        if first and any(not first <= task < first + meta.n_tasks for task, _ in failed):
            raise ProtocolError(f"RETRIED names a task that is not one of chunk {chunk_id}'s")
        kept = self.failed.setdefault(chunk_id, {})
        for task, n in failed:
            if n > kept.get(task, 0) and (task in kept or len(kept) < meta.n_tasks):
                kept[task] = n

    def split_by(self, consumer: bytes, chunk_id: int, parts: Sequence[object]) -> bool:
        """``consumer`` splits the chunk it holds (redelivered, or whose results did not fit
        together) into one-task ``parts``, each marked as may have started. False, and nothing
        changes, if it held the chunk before its lease expired: the chunk went back to the queue
        (or on to another consumer), which runs it again.

        Raises
        ------
        ProtocolError
            If it does not hold the chunk whole, or the parts are not as many as its tasks.
        StorageError
            If the parts could not be stored (the chunk stays as it was).
        """
        held = self._held.get(chunk_id)
        if (held is None or held.holder != consumer) and consumer in self._previous.get(chunk_id, ()):
            return False
        if held is None or held.holder != consumer or held.early or held.done or len(parts) != held.meta.n_tasks:
            raise ProtocolError(f"SPLIT of chunk {chunk_id} into {len(parts)} parts")
        # Its tasks may have started: a chunk whose results did not fit together ran whole, and a
        # redelivered one was held by a consumer that died. A cancellation of a part says so.
        self.storage.note_started([chunk_id])
        meta = held.meta
        self.split(chunk_id, [(_part_of(meta, i), part) for i, part in enumerate(parts)])
        return True

    def dead_letter(self, consumer: bytes, chunk_id: int, task: object, reason: str, task_id: int = 0) -> ChunkMeta | None:
        """A task of the chunk ``consumer`` holds (or held) used up its attempts: it is stored as a
        dead letter (``task``, a one-task chunk), unless the chunk is a schedule's tick (the next
        tick runs the same task: one dead letter per tick would pile up without bound). Return
        the chunk's meta; ``None`` for a late word of a previous holder while another consumer
        holds the chunk (that one runs the task, and dead-letters it if it fails: once).

        Raises
        ------
        ProtocolError
            If ``consumer`` never held the chunk.
        StorageError
            If the dead letter could not be stored.
        """
        held = self.held_by(consumer, chunk_id)
        if held is None or (held.done and held.holder is None and held.consumer != consumer):
            current = self._held.get(chunk_id)
            if self.held_before(consumer, chunk_id) or self.meta(chunk_id) is None or (current is not None and current.done):
                return None  # a late word: the chunk is another's, done, split or gone
            raise ProtocolError(f"DEAD of chunk {chunk_id} that is not leased to this peer")
        meta = self.meta(chunk_id) or held.meta
        if meta.owner != SCHEDULED:
            # seq 0: if the dead letter is requeued, its result goes to the pool's driver as a new one.
            # Its base is the task's id (``task_id``): zdq.state() finds it by that.
            self.storage.put_dead([(ChunkMeta(meta.owner, 0, 1, priority=meta.priority, base=task_id), task, reason)])
        return meta

    def split(self, chunk_id: int, parts: Sequence[tuple[ChunkMeta, object]]) -> list[int]:
        """Replace a leased chunk by one-task parts at the head of the queue."""
        meta = self.meta(chunk_id)
        ids = self.storage.split(chunk_id, parts)
        if ids:
            self._held.pop(chunk_id, None)
            self._previous.pop(chunk_id, None)
            failed = self.failed.pop(chunk_id, None)
            if failed and meta is not None and meta.base:  # each part takes its task's count
                for i, part_id in enumerate(ids):
                    n = failed.get(meta.base + i)
                    if n:
                        self.failed[part_id] = {meta.base + i: n}
            if meta is not None:
                self._parts[chunk_id] = (meta.owner, meta.seq, ids)  # a driver cancels by the original's id
            if len(self._parts) > _MAX_SPLITS_KEPT:
                del self._parts[next(iter(self._parts))]
        return ids


#: Split chunks whose parts are remembered (for cancellations by the original chunk's id).
_MAX_SPLITS_KEPT = 10_000
#: Chunks whose previous holders are remembered (see ``LeaseTable._previous``).
_MAX_PREVIOUS = 100_000

# A chunk whose previous holder reports it after its lease expired and before anyone leased it again.
_RETURNED = Held(ChunkMeta(b"\0" * 16, 0, 1), None)


def _part_of(meta: ChunkMeta, i: int) -> ChunkMeta:
    """The meta of the ``i``-th one-task part of a split chunk: its own task id, the chunk's tags."""
    base = meta.base + i if meta.base else 0
    return dataclasses.replace(meta, n_tasks=1, base=base)
