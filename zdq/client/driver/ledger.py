"""The driver's accounting: what was submitted, what is held, what each task's outcome is. No I/O.

Events come in as method calls (a task submitted, a chunk taken for broker ``b``, a CONFIRM, the
results of a chunk, a broker lost, a cancellation); decisions come out as return values (the next
chunk to send, the tasks a broker must be asked about, how many tasks failed). The ledger opens no
socket and starts no thread: :mod:`zdq.client.driver.loop` does the I/O and calls it, the
:class:`~zdq.client.driver.Driver` facade calls it for the user's threads, and ``tests/unit``
drives it alone.

Who owns what
-------------
==========================================  ========================================================
state                                       owner
==========================================  ========================================================
``loose``, ``queued``, ``records``,         the ledger, under its one lock ``cond`` (a Condition):
buffered chunks and bytes, next ids,        every read and write of them holds it. Callers wait on
counters, ``results``, ``done_by``,         it when a bound is hit; every change that frees room or
``packing``, ``closed_by``                  settles a task notifies it.
a record's ``got`` / ``remaining`` /        the ledger, under ``cond``: marked there by every path
``cancelled`` / ``confirmed`` / ``broker``  (results, cancel, fail) *before* the futures are settled,
                                            so a task's outcome is counted exactly once
futures (settling them)                     whoever took the tasks' outcome under ``cond``, after
                                            releasing it (done-callbacks never run under a lock)
``settlements``                             the I/O thread alone (results of its current round)
``bad``                                     the I/O thread (written); others read the int
``wake``, ``explain``                       set once by the facade before the loop starts
==========================================  ========================================================

Bounds: at most ``window`` × brokers chunks queued or unconfirmed, ``chunk-size`` × brokers loose
tasks, and ``buffer-bytes`` of pickled work held (an empty buffer takes anything). A submitter
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

import concurrent.futures
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import InvalidStateError
from typing import Any

from zdq.chunking import Chunking
from zdq.config import PoolSettings
from zdq.errors import (
    ClosedError,
    ProtocolError,
    SerializationError,
    SubmitTimeout,
    TaskCancelled,
    ZdqError,
    ZdqTimeoutError,
)
from zdq.futures import BatchFuture, TaskFuture
from zdq.reporting import FailureLog
from zdq.serialization import UNKNOWN_BASE, error_to_exception
from zdq.tasks import CANCELLED, PICKLED, cancel_in_chunk
from zdq.timing import Timing

__all__ = ["Ledger", "Record", "Settlement", "NO_CONSUMER", "first_task_id"]

logger = logging.getLogger(__name__)

#: The producer of the results of tasks that failed without running (their queue was lost, the
#: pool closed, ...): ``ConsumerPool.results()`` shows them under ``"not-run"``.
NO_CONSUMER = b""

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


#: Results of one chunk received by the I/O thread, handed to their futures before it sleeps:
#: (record or None if foreign, offset in the record (-1: none decoded, errors[0] is why), first
#: task id, consumer, values, errors by index, which were already known (cancelled) or None).
Settlement = tuple["Record | None", int, int, bytes, list[Any], dict[int, Any], "bytes | None"]


class Record:
    """A chunk from submission to its last result (its fields are the ledger's, under ``cond``)."""

    __slots__ = (
        "seq", "broker", "base", "n", "payload", "nbytes", "sink", "offset", "remaining", "confirmed", "got",
        "chunk_id", "cancelled", "rewrite", "timing",
    )

    def __init__(self, seq: int, base: int, n: int, payload: bytes, sink: Any, offset: int) -> None:
        self.seq = seq
        self.broker = -1  # the broker it was sent to; -1 while queued
        self.base = base
        self.n = n
        self.payload: bytes | None = payload  # kept until CONFIRM so it can be resent
        self.nbytes = len(payload)
        self.sink = sink  # list[TaskFuture] | BatchFuture | None
        self.offset = offset
        self.remaining = n
        self.confirmed = False
        self.got = bytearray(n)  # which tasks have an outcome: a task run twice is recorded once
        self.chunk_id = 0  # the broker's id for it, once confirmed
        self.cancelled: set[int] | None = None  # tasks cancelled (indexes): they never run
        self.rewrite = False  # cancelled tasks not yet replaced in the payload (before it is sent)
        self.timing: Timing | None = None  # release time and priority, sent with every PUT of it

    def cancel(self, indexes: Iterable[int]) -> list[int]:
        """(``cond`` held.) Record that these tasks will never run; return the indexes newly
        cancelled, for :meth:`settle_cancelled` once the lock is released."""
        fresh = [i for i in indexes if not self.got[i]]
        if not fresh:
            return []
        if self.cancelled is None:
            self.cancelled = set()
        self.cancelled.update(fresh)
        for i in fresh:  # their outcome is known now: a placeholder's result, if one comes, is not counted
            self.got[i] = 1
        self.remaining -= len(fresh)
        if self.payload is not None:
            self.rewrite = True  # unconfirmed: a resend carries the placeholders
        return fresh

    def settle_cancelled(self, fresh: list[int]) -> list[int]:
        """Settle the futures of tasks cancelled by :meth:`cancel` (their callbacks may run here:
        never under a lock). Return their task ids."""
        if isinstance(self.sink, BatchFuture):
            for i in fresh:
                self.sink._fill(self.offset + i, [None], {0: cancellation(self.base + i)})
        elif self.sink is not None:
            for i in fresh:
                cancel_future(self.sink[i])
        return [self.base + i for i in fresh]

    def take_missing(self) -> list[int]:
        """(``cond`` held.) Mark every task without an outcome as having one; return their indexes,
        for :meth:`fail_futures` once the lock is released."""
        got = self.got
        missing = [i for i in range(self.n) if not got[i]]
        for i in missing:
            got[i] = 1
        self.remaining = 0
        return missing

    def fail_futures(self, missing: list[int], exc: BaseException) -> None:
        """Fail the futures of the tasks :meth:`take_missing` returned (no lock held)."""
        if isinstance(self.sink, BatchFuture):
            for i in missing:
                self.sink._fail(self.offset + i, 1, exc)
        elif self.sink is not None:
            for i in missing:
                settle(self.sink[i], exc=exc)


def cancellation(task_id: int) -> TaskCancelled:
    """The outcome of a task cancelled before it started."""
    return TaskCancelled(f"task {task_id} was cancelled before it started")


def cancel_future(fut: TaskFuture) -> None:
    """Cancel a task's future without asking its driver (the driver is the one cancelling)."""
    # The base class's cancel: the future's own asks its driver first (see TaskFuture.cancel).
    concurrent.futures.Future.cancel(fut)


def settle(fut: TaskFuture, value: Any = None, exc: BaseException | None = None) -> None:
    """Settle a task's future, unless it is already (cancelled by the user, or a duplicate)."""
    try:
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)
    except InvalidStateError:
        pass


Loose = tuple[int, bytes, TaskFuture]


class Ledger:
    """Records, buffers and bounds, outcomes and counters of one driver; thread-safe under ``cond``.

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
        self.keep_results = keep_results
        self.payload_key = payload_key
        self.hint = hint
        self.owner = owner
        self.failures = failures or FailureLog(name)
        self.n_brokers = len(queue_names)
        #: Called after a submission that the I/O thread must see (set by the facade).
        self.wake: Callable[[], None] | None = None
        #: What the links say about a full buffer, for SubmitTimeout (set by the facade).
        self.explain: Callable[[], str] = lambda: ""
        self.cond = threading.Condition()
        # -- under cond --------------------------------------------------------------------------
        self.loose: list[Loose] = []
        self.queued: deque[Record] = deque()
        self.records: dict[int, Record] = {}
        self.buffered_chunks = 0  # queued + unconfirmed
        self.buffered_bytes = 0  # loose tasks + queued and unconfirmed payloads
        self.next_task = first_task_id()
        self.next_seq = 1
        self.closed_by: BaseException | None = None  # why the driver stopped taking work
        self.failed_by: BaseException | None = None  # why the I/O thread died
        self.results: defaultdict[bytes, dict[int, Any]] = defaultdict(dict)
        self.done_by: defaultdict[bytes, int] = defaultdict(int)
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.cancelled = 0
        self.foreign = 0
        self.duplicates = 0
        # Task ids the I/O thread is turning from loose tasks into records (neither, meanwhile).
        self.packing: tuple[int, int] | None = None
        # -- the I/O thread's --------------------------------------------------------------------
        self.settlements: list[Settlement] = []
        self.bad = 0

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
        cap = self.settings.chunk_size * self.n_brokers
        budget = self.settings.buffer_bytes - len(task)
        with self.cond:
            if len(self.loose) >= cap or (self.buffered_bytes > budget and self.buffered_bytes):
                deadline = None if timeout is None else time.monotonic() + timeout
                while len(self.loose) >= cap or not self._room(len(task)):
                    self._wait(deadline)
            tid = self.next_task
            self.next_task += 1
            fut = TaskFuture(tid)
            fut._hint = self.hint
            fut._driver = self.owner
            wake = not self.loose
            self.loose.append((tid, task, fut))
            self.buffered_bytes += len(task)
            self.submitted += 1
        if wake and self.wake is not None:
            self.wake()
        return fut

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
            while self.buffered_chunks >= cap or not self._room(len(payload)):
                self._wait(deadline)
            rec = Record(self.next_seq, base, n, payload, sink, offset)
            rec.timing = timing
            self.next_seq += 1
            self.records[rec.seq] = rec
            self.queued.append(rec)
            self.buffered_chunks += 1
            self.buffered_bytes += rec.nbytes
            self.submitted += n
        if self.wake is not None:
            self.wake()

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
            while self.loose or self.buffered_chunks:
                try:
                    self._wait(deadline)
                except SubmitTimeout as e:
                    raise ZdqTimeoutError(f"flush: {e}") from None

    def wait_results(self, timeout: float | None = None) -> bool:
        """Wait until every task submitted so far has its outcome; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self.loose or self.records:
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
        with self.cond:
            room = self.settings.window * n_brokers - self.buffered_chunks
            if not self.loose or room <= 0:
                return
            take = chunking.loose_take(room)
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

    def put_back(self, rec: Record) -> None:
        """A chunk its broker could not take now: first in line again."""
        with self.cond:
            rec.broker = -1
            self.queued.appendleft(rec)

    def _rewrite(self, rec: Record) -> None:
        """(``cond`` held.) Put placeholders in place of the record's cancelled tasks before it is
        sent: they report TaskCancelled and never run."""
        assert rec.payload is not None and rec.cancelled is not None
        payload = cancel_in_chunk(rec.payload, self.payload_key, rec.cancelled)
        self.buffered_bytes += len(payload) - rec.nbytes
        rec.payload, rec.nbytes, rec.rewrite = payload, len(payload), False

    # -- confirms and results (the I/O thread) ---------------------------------------------------
    def confirm(self, seq: int, broker: int, stored: bool, chunk_id: int) -> Record:
        """Broker ``broker`` confirmed chunk ``seq`` (``stored``, or refused it: the caller then
        fails it with :meth:`fail_records`). Its room in the buffers is free."""
        with self.cond:
            rec = self.records.get(seq)
            if rec is None or rec.confirmed or rec.broker != broker:
                raise ProtocolError(f"CONFIRM of unknown chunk {seq}")
            self.buffered_chunks -= 1
            self.buffered_bytes -= rec.nbytes
            if stored:
                rec.confirmed = True
                rec.payload = None
                rec.chunk_id = chunk_id
                if rec.remaining <= 0:  # every task of it was cancelled meanwhile
                    del self.records[seq]
            else:
                del self.records[seq]
            self.cond.notify_all()
        return rec

    def intake(
        self,
        broker: int,
        seq: int,
        chunk_id: int,
        consumer: bytes,
        base: int,
        values: list[Any],
        errors: dict[int, Any],
    ) -> bool:
        """Results of chunk ``seq`` (0: a chunk of no record here) from ``broker``: queue them for
        :meth:`settle_all`, unless they were recorded already. Return whether they confirmed the
        chunk (its CONFIRM was held back and the results came first: its window slot is free)."""
        confirmed = False
        n = len(values)
        offset = 0
        with self.cond:
            rec = self.records.get(seq) if seq else None
            if rec is not None:
                if base == UNKNOWN_BASE and n == rec.n:  # the chunk did not decode: all of it
                    base = rec.base
                offset = base - rec.base
                if not (0 <= offset and offset + n <= rec.n):  # checked before anything changes
                    raise ProtocolError(f"results for tasks {base}..{base + n} are outside chunk {seq}")
                if not rec.confirmed and rec.broker == broker:
                    rec.confirmed = True
                    rec.payload = None
                    rec.chunk_id = chunk_id
                    self.buffered_chunks -= 1
                    self.buffered_bytes -= rec.nbytes
                    confirmed = True
                    self.cond.notify_all()
                seen = rec.got[offset : offset + n]
                if any(seen):
                    if all(seen) or not rec.cancelled:  # executed twice (a broker re-ran it): record once
                        self.duplicates += n
                        if rec.remaining <= 0 and rec.confirmed:
                            self.records.pop(rec.seq, None)
                        return confirmed
                    # Some of these tasks were cancelled (their placeholders report here): only
                    # the others are recorded.
                    self.settlements.append((rec, offset, base, consumer, values, errors, bytes(seen)))
                    rec.got[offset : offset + n] = b"\1" * n
                    return confirmed
                rec.got[offset : offset + n] = b"\1" * n
            elif seq:
                self.duplicates += n
                return confirmed
        self.settlements.append((rec, offset, base, consumer, values, errors, None))
        return confirmed

    def intake_undecodable(self, broker: int, seq: int, chunk_id: int, consumer: bytes, failure: Exception) -> bool:
        """Results of chunk ``seq`` that do not decode here: its tasks fail (at :meth:`settle_all`).
        Return whether they confirmed the chunk, as :meth:`intake`."""
        confirmed = False
        with self.cond:
            rec = self.records.get(seq) if seq else None
            if rec is not None and not rec.confirmed and rec.broker == broker:
                rec.confirmed = True
                rec.payload = None
                rec.chunk_id = chunk_id
                self.buffered_chunks -= 1
                self.buffered_bytes -= rec.nbytes
                confirmed = True
                self.cond.notify_all()
        if rec is not None:
            exc = SerializationError(
                f"the results of {rec.n} tasks from queue {self.queue_names[broker]} cannot be unpickled "
                f"in this process: {type(failure).__name__}: {failure}"
            )
            exc.__cause__ = failure
            self.settlements.append((rec, -1, 0, consumer, [], {0: exc}, None))
        return confirmed

    def settle_all(self) -> None:
        """Hand the results taken in by this round to their futures and to ``results``."""
        settlements, self.settlements = self.settlements, []
        for settlement in settlements:
            try:
                self._settle_results(*settlement)
            except Exception:  # never the loop: this chunk's futures are failed instead
                logger.exception("%s could not settle the results of a chunk", self.name)
                rec = settlement[0]
                if rec is not None:
                    self.fail_records([rec], ZdqError("zdq could not settle this task's result"))

    def _settle_results(
        self,
        rec: Record | None,
        offset: int,
        base: int,
        consumer: bytes,
        values: list[Any],
        errors: dict[int, Any],
        seen: bytes | None = None,
    ) -> None:
        if offset < 0:  # the whole chunk's results did not decode: errors[0] is why
            assert rec is not None
            self.fail_records([rec], errors[0])
            return
        if seen is not None:
            # Some of these tasks were cancelled and counted then: the others only, one at a time
            # through the common path (rare: cancellations during a chunk's run).
            for i in (i for i in range(len(values)) if not seen[i]):
                one = {0: errors[i]} if i in errors else {}
                self._settle_results(rec, offset + i, base + i, consumer, [values[i]], one)
            return
        n = len(values)
        exceptions: dict[int, BaseException] = {}
        failed = len(errors)
        if errors:
            skipped = [i for i, info in errors.items() if info.type_name == CANCELLED]
            failed -= len(skipped)
            self.failures.note(base, {i: info for i, info in errors.items() if i not in skipped} if skipped else errors)
            exceptions = {i: error_to_exception(info) for i, info in errors.items()}
        if rec is not None:
            if isinstance(rec.sink, BatchFuture):
                rec.sink._fill(rec.offset + offset, values, exceptions)
            elif rec.sink is not None:
                futures = rec.sink
                for i, value in enumerate(values):
                    settle(futures[offset + i], value, exceptions.get(i))
        with self.cond:
            if self.keep_results:
                store = self.results[consumer]
                store.update(zip(range(base, base + n), values))
                for i, exc in exceptions.items():
                    store[base + i] = exc
            self.done_by[consumer] += n
            self.failed += failed
            if rec is None:
                self.foreign += n
            else:
                self.completed += n
                rec.remaining -= n
                if rec.remaining <= 0:
                    self.records.pop(rec.seq, None)
            self.cond.notify_all()

    # -- failing (any thread) --------------------------------------------------------------------
    def fail_records(self, records: Iterable[Record], exc: BaseException) -> int:
        """Fail every task of these records without an outcome with ``exc`` (kept as their value in
        ``results()`` too, under no consumer: none ran them); the records go. Return how many.

        The outcome is marked and counted under ``cond`` in one step, the futures settled after:
        a cancellation racing this one finds the tasks taken, and no task is counted twice.
        """
        taken: list[tuple[Record, list[int]]] = []
        n = 0
        with self.cond:
            store = self.results[NO_CONSUMER] if self.keep_results else None
            for rec in records:
                missing = rec.take_missing()
                self.records.pop(rec.seq, None)
                if missing:
                    n += len(missing)
                    taken.append((rec, missing))
                    if store is not None:
                        for i in missing:
                            store[rec.base + i] = exc
            self.completed += n
            self.failed += n
            self.cond.notify_all()
        for rec, missing in taken:
            rec.fail_futures(missing, exc)
        return n

    def _fail_loose(self, loose: list[Loose]) -> None:
        """(``cond`` held.) Count loose tasks taken out of the buffer as failed; the caller settles
        their futures after releasing it."""
        self.completed += len(loose)
        self.failed += len(loose)

    def fail_everything(self, exc: BaseException) -> None:
        """Fail every task without an outcome (the driver stopped)."""
        with self.cond:
            loose, self.loose = self.loose, []
            records = list(self.records.values())
            self.queued.clear()
            self.buffered_chunks = 0
            self.buffered_bytes = 0
            self._fail_loose(loose)
        for _, _, fut in loose:
            settle(fut, exc=exc)
        self.fail_records(records, exc)

    def fail_unsent(self, exc: BaseException) -> int:
        """Fail every task no broker has been handed (no broker can take it). Return how many."""
        with self.cond:
            loose, self.loose = self.loose, []
            records = list(self.queued)
            self.queued.clear()
            self.buffered_chunks -= len(records)
            self.buffered_bytes -= sum(len(task) for _, task, _ in loose) + sum(rec.nbytes for rec in records)
            self._fail_loose(loose)
        for _, _, fut in loose:
            settle(fut, exc=exc)
        return len(loose) + self.fail_records(records, exc)

    def fail_seq(self, seq: int, exc: BaseException) -> int:
        """Fail what chunk ``seq`` awaits (its consumer died after acknowledging it early)."""
        with self.cond:
            rec = self.records.get(seq)
        return 0 if rec is None else self.fail_records([rec], exc)

    def fail_confirmed(self, broker: int, exc: BaseException, only: set[int] | None = None) -> int:
        """Fail the tasks of chunks ``broker`` confirmed (those of ``only``, if given) that have no
        outcome yet. Return how many."""
        with self.cond:
            failed = [
                r for seq, r in self.records.items()
                if r.broker == broker and r.confirmed and (only is None or seq in only)
            ]
        return self.fail_records(failed, exc)

    # -- brokers lost, rerouted (the I/O thread) -------------------------------------------------
    def requeue(self, broker: int) -> int:
        """Chunks sent to ``broker`` and not confirmed go first in line again, for any broker.
        Return how many (the links reset that broker's unconfirmed count)."""
        with self.cond:
            again = [r for r in self.records.values() if r.broker == broker and not r.confirmed]
            again.sort(key=lambda r: r.seq, reverse=True)
            for rec in again:
                rec.broker = -1
                self.queued.appendleft(rec)
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
                self.queued.appendleft(rec)
            self.cond.notify_all()
        return resolved, len(again)

    # -- cancellation ----------------------------------------------------------------------------
    def cancel_local(self, first: int, n: int) -> tuple[set[int], list[tuple[Record, tuple[int, ...]]]]:
        """Cancel the tasks ``first .. first+n`` no broker holds; return their ids, and the
        (record, indexes) of those a broker holds: only it can say which have not started."""
        last = first + n
        asks: list[tuple[Record, tuple[int, ...]]] = []
        unsent: list[tuple[Record, list[int]]] = []
        with self.cond:
            packing_until = time.monotonic() + 10.0
            while self.packing is not None and self.packing[0] < last and first < self.packing[1]:
                # The I/O thread is turning these loose tasks into chunks: in neither place now.
                if time.monotonic() > packing_until or self.closed_by is not None:
                    break
                self.cond.wait(0.05)
            loose = [entry for entry in self.loose if first <= entry[0] < last]
            if loose:
                gone = {id(entry) for entry in loose}
                self.loose = [entry for entry in self.loose if id(entry) not in gone]
                self.buffered_bytes -= sum(len(task) for _, task, _ in loose)
                self._note_cancelled([tid for tid, _, _ in loose])
                self.cond.notify_all()
            for rec in list(self.records.values()):
                lo, hi = max(first, rec.base), min(last, rec.base + rec.n)
                if lo >= hi:
                    continue
                indexes = tuple(t - rec.base for t in range(lo, hi))
                if rec.broker < 0:  # not sent: its payload is rewritten before it is
                    unsent.append((rec, self._cancel_held(rec, indexes)))
                else:
                    asks.append((rec, indexes))
        cancelled = {tid for tid, _, _ in loose}
        for _, _, fut in loose:
            cancel_future(fut)
        for rec, fresh in unsent:
            cancelled.update(rec.settle_cancelled(fresh))
        return cancelled, asks

    def cancel_record(self, rec: Record, indexes: Iterable[int]) -> list[int]:
        """These tasks of ``rec`` will never run (its broker said so, or it is queued again):
        count them, settle their futures; return their task ids (those not settled before)."""
        with self.cond:
            fresh = self._cancel_held(rec, indexes)
        return rec.settle_cancelled(fresh)

    def _cancel_held(self, rec: Record, indexes: Iterable[int]) -> list[int]:
        """(``cond`` held.) Tasks of ``rec`` just cancelled are done: counted, kept in ``results()``
        under "not-run", and the record goes once nothing of it is awaited (a chunk not sent yet
        is not sent at all; one sent waits for its confirm, which frees its window slot)."""
        fresh = rec.cancel(indexes)
        if not fresh:
            return fresh
        self._note_cancelled([rec.base + i for i in fresh])
        if rec.remaining <= 0:
            if rec.broker < 0 and rec.seq in self.records:
                try:
                    self.queued.remove(rec)
                except ValueError:
                    pass
                else:
                    self.buffered_chunks -= 1
                    self.buffered_bytes -= rec.nbytes
                del self.records[rec.seq]
            elif rec.confirmed:
                self.records.pop(rec.seq, None)
        self.cond.notify_all()
        return fresh

    def _note_cancelled(self, ids: list[int]) -> None:
        """(``cond`` held.) Tasks cancelled before they ran: done; in ``results()`` under "not-run"."""
        self.completed += len(ids)
        self.cancelled += len(ids)
        if self.keep_results:
            store = self.results[NO_CONSUMER]
            for tid in ids:
                store[tid] = cancellation(tid)

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
            return len(self.loose) + sum(r.remaining for r in self.queued)

    def awaiting(self) -> list[int]:
        """Tasks awaiting results, by broker."""
        awaiting = [0] * self.n_brokers
        with self.cond:
            for rec in self.records.values():
                if rec.broker >= 0:
                    awaiting[rec.broker] += rec.remaining
        return awaiting

    def results_for(self, producers: Iterable[bytes]) -> dict[int, Any]:
        """The outcomes kept from these consumers (by identity), by task id: a copy."""
        with self.cond:
            merged: dict[int, Any] = {}
            for ident in producers:
                merged.update(self.results.get(ident, {}))
            return merged

    def done_count(self, producers: Iterable[bytes]) -> int:
        """Tasks whose results came from these consumers."""
        with self.cond:
            return sum(self.done_by.get(ident, 0) for ident in producers)

    def producers(self) -> set[bytes]:
        """Every consumer identity that results came from."""
        with self.cond:
            return set(self.done_by)

    def statistics(self) -> tuple[int, int, int, int, int, int, int, int]:
        """(submitted, completed, failed, cancelled, foreign, duplicates, chunks unconfirmed or
        queued, chunks outstanding), read in one step."""
        with self.cond:
            return (
                self.submitted, self.completed, self.failed, self.cancelled, self.foreign, self.duplicates,
                self.buffered_chunks, len(self.records),
            )
