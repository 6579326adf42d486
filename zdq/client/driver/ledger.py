"""The driver's accounting: what was submitted and what is held, within bounds. No I/O.

Events come in as method calls (a task submitted, a chunk taken for broker ``b``, a CONFIRM, a
broker lost or rerouted); decisions come out as return values (the next chunk to send, the chunks
to send again). Each task's outcome (results, failures, cancels) and the counts are the ledger's
:class:`~zdq.client.driver.outcomes.Outcomes`, under the same lock. The ledger opens no socket
and starts no thread: :mod:`zdq.client.driver.loop` does the I/O and calls it, the
:class:`~zdq.client.driver.Driver` facade calls it for the user's threads, and ``tests/unit``
drives it alone.

Who owns what
-------------
==========================================  ========================================================
state                                       owner
==========================================  ========================================================
``loose``, ``queued``, ``records``,         the ledger, under its one lock ``cond`` (a Condition):
buffered chunks and bytes, next ids,        every read and write of them holds it. Callers wait on
``submitted``, ``packing``, ``closed_by``,  it when a bound is hit; every change that frees room or
``failed_by``                               settles a task notifies it. (``closed_by`` and
                                            ``failed_by`` are also read without it: one reference)
``outcomes`` (results, counters)            the same lock: see :mod:`.outcomes`
a record's fields                           ``cond``; ``broker`` is written only by the I/O thread
                                            (under ``cond``), which may read it without the lock
``wake``, ``explain``                       set once by the facade before the loop starts
==========================================  ========================================================

Bounds: at most ``window`` × brokers chunks queued or unconfirmed, ``chunk-size`` × brokers loose
tasks, and ``buffer-bytes`` of pickled work held (an empty buffer takes anything); with
``max-pending``, at most that many of this driver's tasks unfinished (submitted, no outcome yet:
``submitted - outcomes.completed``, both under ``cond``), so a producer faster than its consumers
waits for the work, not only for the brokers' confirmations. A submitter
that would pass one waits on ``cond`` (``timeout=`` turns the wait into
:class:`~zdq.errors.SubmitTimeout`). The per-broker window is the links' (they know which broker
is full): :meth:`Ledger.take` hands out the next chunk for the broker they picked.

>>> from zdq.config import settings
>>> ledger = Ledger("p", ["q0"], settings(window=2, chunk_size=10))
>>> fut = ledger.submit_task(b"task")
>>> ledger.coalesce(1, 0)
>>> rec = ledger.take(0)   # the links picked broker 0
>>> (rec.base == fut.key, rec.n, ledger.buffered_chunks)
(True, 1, 1)
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from zdq.codec.chunking import Chunking, Packed
from zdq.config import PoolSettings
from zdq.errors import (
    ClosedError,
    ProtocolError,
    SubmitTimeout,
    ZdqError,
    ZdqTimeoutError,
)
from zdq.futures import SignalSafeCondition, TaskFuture
from zdq.reporting import FailureLog
from zdq.codec.tasks import PICKLED, cancel_in_chunk, dumps_chunk
from zdq.codec.timing import Timing

from .outcomes import Outcomes
from .records import NO_CONSUMER, Loose, Record, settle

__all__ = ["Ledger", "NO_CONSUMER", "first_task_id", "queue_of_key"]

logger = logging.getLogger(__name__)

#: The largest pickled task the caller packs into its own chunk (the lone path, :meth:`Ledger._hold_lone`):
#: its copy and seal (about 1 µs a KiB) run under the ledger's lock.
_LONE_BYTES = 16 << 10

#: Every ledger of this process: a forked child marks them closed (:func:`_in_forked_child`).
_ledgers: weakref.WeakSet[Ledger] = weakref.WeakSet()


def _in_forked_child() -> None:
    """After ``os.fork()``, in the child: each pool's I/O thread and sockets stayed in the parent,
    so what the child submits would never be sent; it is refused at the call instead."""
    parent = os.getppid()
    for ledger in list(_ledgers):
        if ledger.closed_by is None:
            ledger.closed_by = ZdqError(
                f"this process is a fork of the one that made it (pid {parent}), where its sockets and "
                "its I/O thread stayed; make a pool in this process"
            )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_forked_child)

_first_ids_lock = threading.Lock()
_last_first_id = 0


def first_task_id() -> int:
    """The first task id of a new driver: ids never repeat across pools, so results of an earlier
    pool (served by a durable queue after a restart) never overwrite a new pool's in ``results()``.

    Milliseconds since the epoch, shifted left by 20 bits: a pool may submit a million tasks per
    millisecond of its age before it reaches the ids of a pool made after it, and the values stay
    below 2**63 for the next hundred thousand years.
    """
    global _last_first_id
    with _first_ids_lock:
        first = max((time.time_ns() // 1_000_000) << 20, _last_first_id + (1 << 20))
        _last_first_id = first
        return first


def queue_of_key(key: bytes, n_queues: int) -> int:
    """The queue a unique key's chunks go to: the same in every process of the pool (CRC-32, not
    Python's salted ``hash``), so one broker owns each key.

    >>> queue_of_key(b"user-42-report", 4) == queue_of_key(b"user-42-report", 4)
    True
    """
    return zlib.crc32(key) % n_queues


class Ledger:
    """Records, buffers and bounds of one driver, and its :class:`Outcomes`; thread-safe under ``cond``.

    Parameters
    ----------
    name : str
        The pool's name (for errors).
    queue_names : list of str
        The queues' names, by broker index (for errors).
    settings : PoolSettings
        Bounds (``window``, ``chunk-size``, ``buffer-bytes``) and chunking.
    keep_results : bool
        Whether outcomes are kept for :meth:`results_for`.
    payload_key : bytes, optional
        The key payloads are sealed with (cancel placeholders, chunking).
    hint : callable, optional
        Why a result may not come: told by a future's ``result(timeout)``.
    owner : object, optional
        What a task's future asks to cancel it (the driver facade).
    """

    def __init__(
        self,
        name: str,
        queue_names: list[str],
        settings: PoolSettings,
        *,
        keep_results: bool = True,
        payload_key: bytes | None = None,
        hint: Callable[[], str] | None = None,
        owner: Any = None,
        failures: FailureLog | None = None,
    ) -> None:
        self.name = name
        self.queue_names = queue_names
        self.settings = settings
        self.chunking = Chunking.of(settings)
        self.payload_key = payload_key
        self.hint = hint
        self.owner = owner
        self.n_brokers = len(queue_names)
        #: Called after a submission that the I/O thread must see (set by the facade).
        self.wake: Callable[[], None] | None = None
        #: What the links say about a full buffer, for SubmitTimeout (set by the facade).
        self.explain: Callable[[], str] = lambda: ""
        self.cond = SignalSafeCondition()  # a Ctrl-C in a with-statement on it never leaves it held
        # -- under cond --------------------------------------------------------------------------
        self.loose: list[Loose] = []
        self.consumers = 0  # the consumers the I/O thread last packed loose tasks for
        self.pack_all = False  # the I/O thread packs every loose task at once, whatever the window
        self.queued: deque[Record] = deque()
        #: Records of unique tasks, queued for the one broker that owns their key (by its index):
        #: never sent to another. A deque is made when used and dropped when empty.
        self.pinned: dict[int, deque[Record]] = {}
        #: Seqs of records their broker confirmed as followers of another chunk holding their
        #: unique key (CONFIRM DUPLICATE): their payload is kept, to follow again after a recovery.
        self.following: set[int] = set()
        self.records: dict[int, Record] = {}
        self.buffered_chunks = 0  # queued + unconfirmed
        self.buffered_bytes = 0  # loose tasks + queued and unconfirmed payloads
        self.next_task = first_task_id()
        self.next_seq = 1
        self.closed_by: BaseException | None = None  # why the driver stopped taking work
        self.failed_by: BaseException | None = None  # why the I/O thread died
        _ledgers.add(self)  # refused in a forked child
        self.submitted = 0
        # Task ids the I/O thread is turning from loose tasks into records (neither, meanwhile).
        self.packing: tuple[int, int] | None = None
        #: Whether a task submitted with nothing in flight is packed into its chunk by the caller
        #: (:meth:`_hold_lone`); False: every task goes loose, for the I/O thread to coalesce.
        self.lone_chunks = True
        #: The bound on unfinished tasks (``max_pending``; None: none), read once per submission.
        self.max_pending: int | None = settings.max_pending
        #: Each task's outcome and the counts (the same lock).
        self.outcomes = Outcomes(self, keep_results=keep_results, failures=failures)

    # -- open / closed ---------------------------------------------------------------------------
    def check_open(self) -> None:
        """Raise :class:`ClosedError` if the driver takes no more work (a read of one reference)."""
        reason = self.closed_by
        if reason is not None:
            if not isinstance(reason, ClosedError):
                raise ClosedError(f"queue pool {self.name} stopped: {reason}") from reason
            raise ClosedError(f"queue pool {self.name} is closed")
        if self.failed_by is not None:
            raise ZdqError(f"queue pool {self.name} driver failed: {self.failed_by!r}") from self.failed_by

    def close(self, reason: BaseException) -> bool:
        """Take no more work; waiters wake and raise. False if it was closed already."""
        with self.cond:
            if self.closed_by is not None:
                return False
            self.closed_by = reason
            self.cond.notify_all()
            return True

    # -- submission (callers' threads) -----------------------------------------------------------
    def reserve(self, n: int) -> int:
        """Reserve ``n`` consecutive task ids; return the first."""
        with self.cond:
            first = self.next_task
            self.next_task += n
            return first

    def set_chunk_size(self, n: int) -> None:
        """Cut chunks of at most ``n`` tasks from now on (a rate limit set or lifted on the live
        pool: see :meth:`zdq.QueuePool.set_rate_limit`); tasks held loose are cut by it too."""
        with self.cond:
            self.settings = self.settings.with_overrides(chunk_size=n)
            self.chunking = Chunking.of(self.settings)
            self.cond.notify_all()  # a submitter waiting for room under the old cap looks again

    def new_future(self, tid: int) -> TaskFuture:
        """A future for task ``tid`` that knows its driver (to cancel) and why it may wait."""
        fut = TaskFuture(tid)
        fut._hint = self.hint
        fut._driver = self.owner
        return fut

    def submit_task(self, task: bytes, timeout: float | None = None) -> TaskFuture:
        """Hold one pickled task for coalescing; return its future. Waits while a bound is hit."""
        if self.closed_by is not None or self.failed_by is not None:  # two reads, not a call: per task
            self.check_open()
        if self.chunking.refuses_task(len(task)):  # refused at the call, as a batch's task is: never queued
            raise self.chunking.refusal("the task", len(task))
        cap = self.settings.chunk_size * self.n_brokers
        budget = self.settings.buffer_bytes - len(task)
        with self.cond:
            if self.max_pending is not None:  # the one test the plain path pays for the bound
                self._wait_unfinished(1, timeout)
            if len(self.loose) >= cap or (self.buffered_bytes > budget and self.buffered_bytes):
                deadline = None if timeout is None else time.monotonic() + timeout
                while len(self.loose) >= cap or not self._room(len(task)):
                    self._wait(deadline)
            tid = self.next_task
            self.next_task += 1
            fut = TaskFuture(tid)
            fut._hint = self.hint
            fut._driver = self.owner
            self.submitted += 1
            wake = True
            if self.records or self.loose or self.packing is not None or not self.lone_chunks or not self._hold_lone(tid, task, fut):
                wake = not self.loose
                self.loose.append((tid, task, fut))
                self.buffered_bytes += len(task)
        if wake and self.wake is not None:
            self.wake()
        return fut

    def _hold_lone(self, tid: int, task: bytes, fut: TaskFuture) -> bool:
        """(``cond`` held; nothing loose, packing or in flight.) A lone task: packed into its chunk
        here, on the caller's thread that pickled it, and queued, so that the I/O thread only sends
        it (a chunk of one task is what :meth:`coalesce` would cut of it alone). False, and nothing
        held, if it does not pack (too large): it goes loose, and the I/O thread fails it as it
        fails any task too large. While anything is in flight, tasks go loose and are coalesced
        (a loop of submissions makes a few chunks, not one per task). A task of more than
        :data:`_LONE_BYTES` goes loose too: packing it here would hold every other thread's
        submission (and the results' intake) behind its copy and seal."""
        if len(task) > _LONE_BYTES:  # packed (a copy and the seal) under cond: only small ones
            return False
        payload = dumps_chunk(tid, [task], self.payload_key, PICKLED)  # bytes in a list: it pickles
        if self.chunking.too_large(len(payload)):
            return False  # as Chunking.pack refuses it
        rec = Record(self.next_seq, tid, 1, payload, [fut], 0)
        self.next_seq += 1
        self.records[rec.seq] = rec
        self.queued.append(rec)
        self.buffered_chunks += 1
        self.buffered_bytes += rec.nbytes
        return True

    def submit_chunk(
        self,
        base: int,
        n: int,
        payload: bytes,
        sink: Any,
        offset: int,
        timeout: float | None = None,
        timing: Timing | None = None,
    ) -> None:
        """Hold a chunk pickled by the caller; wait while a bound is hit."""
        self.check_open()
        cap = self.settings.window * self.n_brokers
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            if self.max_pending is not None:
                self._wait_unfinished(n, timeout)
            if self.loose or self.packing is not None:
                self._after_loose()
            while self.buffered_chunks >= cap or not self._room(len(payload)):
                self._wait(deadline)
            self._hold(base, n, payload, sink, offset, timing)
        if self.wake is not None:
            self.wake()

    def submit_chunks(
        self,
        chunks: Sequence[Packed],
        start: int,
        sink: Any,
        base: int,
        timeout: float | None = None,
        timing: Timing | None = None,
    ) -> int:
        """Hold ``chunks[start:]`` (pickled by the caller; ``sink`` offsets counted from task
        ``base``) as the bounds allow: wait (within ``timeout``) for room for one, then take every
        one that fits, under one lock, and wake the I/O thread once; return the index after the
        last taken. The caller calls again for the rest.

        The bounds are :meth:`submit_chunk`'s, checked per chunk; what changes is the handoff: a
        batch's chunks cross from the caller's thread to the I/O thread a window's room at a time,
        not one at a time (each crossing was a lock, a wake-up and a switch of the interpreter lock
        between two threads, 1,000 times for a million tasks). With ``max_pending`` set, one chunk
        a call, as :meth:`submit_chunk` (its wait is per chunk)."""
        if self.max_pending is not None:
            first, n, payload = chunks[start]
            self.submit_chunk(first, n, payload, sink, first - base, timeout, timing)
            return start + 1
        self.check_open()
        cap = self.settings.window * self.n_brokers
        deadline = None if timeout is None else time.monotonic() + timeout
        i = start
        with self.cond:
            if self.loose or self.packing is not None:
                self._after_loose()
            while self.buffered_chunks >= cap or not self._room(len(chunks[i].payload)):
                self._wait(deadline)
            while i < len(chunks) and self.buffered_chunks < cap and self._room(len(chunks[i].payload)):
                first, n, payload = chunks[i]
                self._hold(first, n, payload, sink, first - base, timing)
                i += 1
        if self.wake is not None:
            self.wake()
        return i

    def _after_loose(self) -> None:
        """(``cond`` held.) Have the tasks submitted alone before now packed into line before a
        chunk held next: first in, first out (reviewers 28a, 28e). The I/O thread packs them at
        once, whatever the window (they are few), and this waits for it: a moment, which no
        ``timeout`` counts, and which a Ctrl-C on this thread may cut without losing any of them.
        Before the I/O thread starts, they are packed here."""
        if self.wake is None:
            if self.loose:
                loose, self.loose = self.loose, []
                self._pack_loose(loose, self.n_brokers, self.consumers)
            return
        upto = self.loose[-1][0] if self.loose else self.packing[1] - 1  # type: ignore[index]
        self.pack_all = True
        self.wake()
        while (self.loose and self.loose[0][0] <= upto) or (self.packing is not None and self.packing[0] <= upto):
            self.check_open()
            self.cond.wait(0.1)

    def _hold(self, base: int, n: int, payload: bytes, sink: Any, offset: int, timing: Timing | None) -> None:
        """(``cond`` held, room checked.) A chunk's record, queued to be sent."""
        rec = Record(self.next_seq, base, n, payload, sink, offset)
        rec.timing = timing
        self.next_seq += 1
        self.records[rec.seq] = rec
        if timing is not None and timing.unique_key:
            self._line_up(rec, first=False)
        else:
            self.queued.append(rec)
        self.buffered_chunks += 1
        self.buffered_bytes += rec.nbytes
        self.submitted += n

    @property
    def unfinished(self) -> int:
        """(``cond`` held.) This driver's tasks submitted and without an outcome yet: two counters,
        no walk (every path that ends a task counts it in ``outcomes.completed``)."""
        return self.submitted - self.outcomes.completed

    def _wait_unfinished(self, n: int, timeout: float | None) -> None:
        """(``cond`` held.) Wait while ``n`` more tasks would pass ``max-pending`` unfinished tasks
        (a submission larger than the bound waits until none is unfinished, then goes alone).
        Results, failures and cancels notify ``cond``; ``timeout`` turns the wait into
        :class:`SubmitTimeout` naming the bound."""
        limit = self.max_pending
        assert limit is not None
        if self.unfinished + n <= limit or not self.unfinished:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.unfinished and self.unfinished + n > limit:
            self.check_open()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise SubmitTimeout(
                    f"max_pending={limit} was reached: the driver of pool {self.name} has {self.unfinished} "
                    f"unfinished tasks, and the submission of {n} more timed out waiting for some to finish "
                    "(consume results faster, raise max_pending, or give submit() a longer timeout)"
                )
            self.cond.wait(1.0 if left is None else min(left, 1.0))

    def _room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit in the byte budget (an empty buffer takes anything)."""
        return self.buffered_bytes == 0 or self.buffered_bytes + nbytes <= self.settings.buffer_bytes

    def _wait(self, deadline: float | None) -> None:
        """Wait on ``cond`` (held) for progress; raise on close or timeout."""
        self.check_open()
        if deadline is None:
            self.cond.wait(1.0)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SubmitTimeout(self.why_full())
            self.cond.wait(min(left, 1.0))
        self.check_open()

    def why_full(self) -> str:
        """(``cond`` held.) Why a submission waits for room."""
        why = (
            f"the driver of pool {self.name} holds {self.buffered_chunks} chunks and "
            f"{self.buffered_bytes} bytes that its brokers have not confirmed"
        )
        return why + self.explain() + ": the submission timed out waiting for room"

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every chunk submitted so far is confirmed by its broker."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            # ``packing``: loose tasks the I/O thread took and is packing (no longer loose, not yet
            # chunks): without it, a flush in that moment returned with them unconfirmed.
            while self.loose or self.packing is not None or self.buffered_chunks:
                try:
                    self._wait(deadline)
                except SubmitTimeout as e:
                    raise ZdqTimeoutError(f"flush: {e}") from None

    def wait_results(self, timeout: float | None = None) -> bool:
        """Wait until every task submitted so far has its outcome; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self.loose or self.packing is not None or self.records:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.check_open()
                self.cond.wait(1.0 if left is None else min(left, 1.0))
        return True

    # -- coalescing and sending (the I/O thread) -------------------------------------------------
    def coalesce(self, n_brokers: int, consumers: int) -> None:
        """Turn loose tasks into chunks (queued), while the chunk bound leaves room."""
        chunking = self.chunking
        self.consumers = consumers  # for a batch's caller that packs them (_after_loose)
        with self.cond:
            room = self.settings.window * n_brokers - self.buffered_chunks
            pack_all, self.pack_all = self.pack_all, False  # a batch's caller waits for these (_after_loose)
            if not self.loose or (room <= 0 and not pack_all):
                return
            take = len(self.loose) if pack_all else chunking.loose_take(room)
            if len(self.loose) <= take:
                loose, self.loose = self.loose, []
            else:
                loose, self.loose = self.loose[:take], self.loose[take:]
            self.packing = (loose[0][0], loose[-1][0] + 1)  # a cancel() of these waits for the records
            self.cond.notify_all()
        try:
            self._pack_loose(loose, n_brokers, consumers)
        finally:
            with self.cond:
                self.packing = None
                self.cond.notify_all()

    def _pack_loose(self, loose: list[Loose], n_brokers: int, consumers: int) -> None:
        chunking = self.chunking
        for start, end in chunking.loose_runs(loose, n_brokers, consumers):
            part = loose[start:end]
            first = part[0][0]
            futures = [fut for _, _, fut in part]
            tasks = [task for _, task, _ in part]
            loose_bytes = sum(len(t) for t in tasks)
            packed, refused = chunking.pack_loose(first, tasks, self.payload_key)
            for j, exc in refused:  # too large: only that task fails
                settle(futures[j], exc=exc)
            with self.cond:
                self.buffered_bytes -= loose_bytes
                if refused:  # they have their outcome: counted done (and failed), as every other path
                    self.outcomes.completed += len(refused)
                    self.outcomes.failed += len(refused)
                    self.cond.notify_all()
                for sub_first, n, payload in packed:
                    offset = sub_first - first
                    rec = Record(self.next_seq, sub_first, n, payload, futures[offset : offset + n], 0)
                    self.next_seq += 1
                    self.records[rec.seq] = rec
                    self.queued.append(rec)
                    self.buffered_chunks += 1
                    self.buffered_bytes += rec.nbytes

    def take(self, broker: int) -> Record | None:
        """The next queued chunk, now sent to ``broker`` (None if none waits). Its payload carries
        the placeholders of tasks cancelled while it waited."""
        with self.cond:
            if not self.queued:
                return None
            rec = self.queued.popleft()
            rec.broker = broker
            if rec.rewrite:
                self._rewrite(rec)
            return rec

    def take_pinned(self, broker: int) -> Record | None:
        """The next unique task's chunk queued for ``broker`` (None if none waits), now sent to it."""
        with self.cond:
            line = self.pinned.get(broker)
            if not line:
                return None
            rec = line.popleft()
            if not line:
                del self.pinned[broker]
            rec.broker = broker
            if rec.rewrite:
                self._rewrite(rec)
            return rec

    def put_back(self, rec: Record) -> None:
        """A chunk its broker could not take now: first in line again."""
        self.put_back_run([rec])

    def put_back_run(self, run: list[Record]) -> None:
        """Chunks their broker could not take now: first in line again, in their order."""
        with self.cond:
            for rec in reversed(run):
                rec.broker = -1
                self._line_up(rec)

    def _line_up(self, rec: Record, first: bool = True) -> None:
        """(``cond`` held.) Queue ``rec`` to be sent (first, or last): a unique task's for the
        broker that owns its key, any other for any broker."""
        timing = rec.timing
        if timing is not None and timing.unique_key:
            line = self.pinned.setdefault(queue_of_key(timing.unique_key, self.n_brokers), deque())
        else:
            line = self.queued
        if first:
            line.appendleft(rec)
        else:
            line.append(rec)

    def unqueue(self, rec: Record) -> bool:
        """(``cond`` held.) Take ``rec``, not sent, out of its line; False if it is in none."""
        try:
            self.queued.remove(rec)
            return True
        except ValueError:
            pass
        for broker, line in list(self.pinned.items()):
            if rec in line:
                line.remove(rec)
                if not line:
                    del self.pinned[broker]
                return True
        return False

    def _rewrite(self, rec: Record) -> None:
        """(``cond`` held.) Put placeholders in place of the record's cancelled tasks before it is
        sent: they report TaskCancelled and never run."""
        assert rec.payload is not None and rec.cancelled is not None
        payload = cancel_in_chunk(rec.payload, self.payload_key, rec.cancelled)
        self.buffered_bytes += len(payload) - rec.nbytes
        rec.payload, rec.nbytes, rec.rewrite = payload, len(payload), False

    # -- confirms and results (the I/O thread) ---------------------------------------------------
    def confirm(self, seq: int, broker: int, stored: bool, chunk_id: int, follows: bool = False) -> Record:
        """Broker ``broker`` confirmed chunk ``seq`` (``stored``, or refused it: the caller then
        fails it with :meth:`fail_records`). Its room in the buffers is free. ``follows``: not
        stored, it follows chunk ``chunk_id``, which holds its unique key (its results are ours)."""
        with self.cond:
            rec = self._unconfirmed(seq, broker)
            if rec is None:
                raise ProtocolError(f"CONFIRM of unknown chunk {seq}")
            if stored:
                self._stored(rec, chunk_id, follows)
            else:
                self.buffered_chunks -= 1
                self.buffered_bytes -= rec.nbytes
                del self.records[seq]
            self.cond.notify_all()
        return rec

    def confirm_stored(self, seqs: Sequence[int], broker: int, chunk_ids: Sequence[int]) -> tuple[int, list[int]]:
        """Broker ``broker`` stored chunks ``seqs`` as ``chunk_ids`` (a CONFIRMS): :meth:`confirm`
        of each, under one lock and with one wake of the waiting submitters. Return how many were
        confirmed, and the seqs that name no chunk unconfirmed at that broker (skipped: the
        caller drops them as a malformed CONFIRM)."""
        unknown: list[int] = []
        with self.cond:
            for seq, chunk_id in zip(seqs, chunk_ids):
                rec = self._unconfirmed(seq, broker)
                if rec is None:
                    unknown.append(seq)
                else:
                    self._stored(rec, chunk_id, False)
            self.cond.notify_all()
        return len(seqs) - len(unknown), unknown

    def _unconfirmed(self, seq: int, broker: int) -> Record | None:
        """(``cond`` held.) Chunk ``seq`` if it was sent to ``broker`` and is not confirmed yet."""
        rec = self.records.get(seq)
        if rec is None or rec.confirmed or rec.broker != broker:
            return None
        return rec

    def _stored(self, rec: Record, chunk_id: int, follows: bool) -> None:
        """(``cond`` held.) ``rec``'s broker stored it as ``chunk_id`` (or, ``follows``, it follows
        that chunk): its room in the buffers is free, its payload too unless it may be sent again."""
        self.buffered_chunks -= 1
        self.buffered_bytes -= rec.nbytes
        rec.confirmed = True
        if follows:  # kept to be sent again if the broker restarts (see follow_again)
            self.following.add(rec.seq)
        else:
            rec.payload = None
        rec.chunk_id = chunk_id
        if rec.remaining <= 0:  # every task of it was cancelled meanwhile
            del self.records[rec.seq]

    # -- brokers lost, rerouted (the I/O thread) -------------------------------------------------
    def requeue(self, broker: int) -> int:
        """Chunks sent to ``broker`` and not confirmed go first in line again, for any broker.
        Return how many (the links reset that broker's unconfirmed count)."""
        with self.cond:
            again = [r for r in self.records.values() if r.broker == broker and not r.confirmed]
            again.sort(key=lambda r: r.seq, reverse=True)
            for rec in again:
                rec.broker = -1
                self._line_up(rec)
            self.cond.notify_all()
        return len(again)

    def seqs_of(self, broker: int, *, confirmed: bool) -> list[int]:
        """The chunks sent to ``broker``, confirmed or not, in order."""
        with self.cond:
            return sorted(r.seq for r in self.records.values() if r.broker == broker and r.confirmed is confirmed)

    def rerouted(self, broker: int, asked: tuple[int, ...], missing: set[int]) -> tuple[int, int]:
        """The broker's answer after its path changed: the chunks of ``asked`` not ``missing`` are
        stored (confirmed); the missing ones go first in line again. Return (chunks no longer
        unconfirmed at ``broker``, chunks sent again)."""
        again: list[Record] = []
        resolved = 0
        with self.cond:
            for seq in asked:
                rec = self.records.get(seq)
                if rec is None or rec.broker != broker or rec.confirmed:
                    continue
                resolved += 1
                if seq in missing:
                    rec.broker = -1
                    again.append(rec)
                    continue
                self.buffered_chunks -= 1
                self.buffered_bytes -= rec.nbytes
                rec.confirmed = True
                rec.payload = None
                if rec.remaining <= 0:
                    del self.records[seq]
            for rec in sorted(again, key=lambda r: r.seq, reverse=True):
                self._line_up(rec)
            self.cond.notify_all()
        return resolved, len(again)

    def follow_again(self, broker: int, missing: set[int]) -> set[int]:
        """The queue ``broker``, recovered, does not hold these chunks: those that followed a unique
        task's chunk (never stored) go to it again, to follow the chunk it recovered (or to run,
        if that one ended meanwhile). Return their seqs; the others were lost."""
        again = set()
        with self.cond:
            for seq in missing & self.following:
                rec = self.records.get(seq)
                self.following.discard(seq)
                if rec is None or rec.broker != broker or rec.payload is None:
                    continue
                rec.confirmed = False
                rec.broker = -1
                self.buffered_chunks += 1
                self.buffered_bytes += rec.nbytes
                self._line_up(rec)
                again.add(seq)
            self.cond.notify_all()
        return again

    # -- what callers read -----------------------------------------------------------------------
    @property
    def outstanding(self) -> int:
        """Tasks submitted whose outcomes have not all arrived."""
        with self.cond:
            return len(self.loose) + sum(r.remaining for r in self.records.values())

    @property
    def unsent(self) -> int:
        """Tasks submitted that no broker has been handed yet."""
        with self.cond:
            pinned = sum(r.remaining for line in self.pinned.values() for r in line)
            return len(self.loose) + sum(r.remaining for r in self.queued) + pinned

    def brokers_holding(self, first: int, n: int) -> set[int]:
        """The brokers (by index) holding tasks ``first .. first + n - 1`` that have no outcome
        yet (a chunk queued here, not yet sent, is nobody's). A scan of the chunks in flight:
        for an occasional question (a waiting future's), not for a path per task."""
        last = first + n
        with self.cond:
            return {
                rec.broker
                for rec in self.records.values()
                if rec.broker >= 0 and rec.remaining and rec.base < last and first < rec.base + rec.n
            }

    def awaiting(self) -> list[int]:
        """Tasks awaiting results, by broker."""
        awaiting = [0] * self.n_brokers
        with self.cond:
            for rec in self.records.values():
                if rec.broker >= 0:
                    awaiting[rec.broker] += rec.remaining
        return awaiting
