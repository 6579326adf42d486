"""Each task's outcome, decided once: results taken in and settled, failures, cancellations.

Every path that gives a task its outcome (its result came, it failed without running, it was
cancelled) marks it on its record (``got``, ``remaining``) and counts it under the ledger's one
lock, in one step, *then* settles its future with the lock released: whichever path comes first
takes the task, the others find it taken, and no task is counted twice or settled under a lock.

Who owns what
-------------
=========================================  =====================================================
state                                      owner
=========================================  =====================================================
``history`` (``history_tasks``,            the ledger's lock (``cond``, shared with the ledger;
``without_history``), ``kept``,
``folded``, ``folding``,
``fold_due``, ``reading``, ``done_by``,    the I/O thread reads ``fold_due`` without it, a hint)
``errored``,
``stale``, the counters (completed,
failed, cancelled, foreign, duplicates)
``read_lock``                              readers of the kept results (``results_for``), one at
                                           a time; taken before ``cond``, never by the I/O thread
``settlements``                            the I/O thread alone (results of its current round)
``bad``                                    the I/O thread (written); other threads read the int
the records and buffers it changes         the ledger's, under the same lock
=========================================  =====================================================

Kept results (``keep_results``, for ``ConsumerPool.results()``) are kept as they came, a chunk's
outcomes as one entry, and folded into a dict by task id per consumer only once a reader of them
shows up (``ConsumerPool.join()`` or ``results()``, :meth:`Outcomes.start_folding`): from then on
the I/O thread folds them, oldest first, in the turns where nothing else is ready for it
(:meth:`Outcomes.fold_some`, a step at a time), so that ``results()`` mostly hands the folded
dict over (:meth:`Outcomes.results_for`; every entry stays in ``history``, to be folded again for
a later reader). A program
that reads its results from futures never pays a dict insertion per task on the I/O thread; that
cost the futures path of a pool keeping its results (the default) a fifth to a quarter of its
throughput, and a kept result took ten times the memory (``benchmarks/RESULTS.md``, issue 26's
sixth session). Folded as each chunk arrived, they cost a ``join()`` the same insertions on the
I/O thread's busy turns, between the results and the chunks it sends (the sixteenth session).

A task's outcome is kept once: a second run of a chunk of a record here is a duplicate, dropped.
A task that failed can run again under its id from a chunk of no record here (a dead letter
requeued): its kept failure is then stale (``errored``, ``stale``), and ``results()`` gives the
latest outcome alone, under the consumer that produced it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from typing import Any

from zdq.errors import ProtocolError, TaskExpired, ZdqError
from zdq.futures import BatchFuture
from zdq.reporting import FailureLog
from zdq.codec.results import UNKNOWN_BASE, ErrorInfo, error_to_exception
from zdq.codec.tasks import CANCELLED, EXPIRED

from .records import (
    Books,
    NO_CONSUMER,
    Loose,
    Record,
    Settlement,
    cancel_future,
    cancellation,
    settle,
)


__all__ = ["Outcomes"]

logger = logging.getLogger(__name__)

#: Tasks' outcomes the I/O thread folds in one turn where nothing else is ready for it, once
#: folding is on (about 150 µs: what arrives meanwhile waits at most that) ...
_FOLD_TASKS = 2048
#: ... and at most this many entries (chunks of one task each fold at about half a microsecond).
_FOLD_ENTRIES = 64
#: A producer's ``history`` is kept while its entries hold this many outcomes on average (judged
#: once it has :data:`_HISTORY_JUDGED` entries): about 12 bytes an outcome at most, against 75-85
#: for a folded dict's entry. Chunks of one task each cost 130 (reviewer 19): such a producer's
#: history is dropped for good, and its results are copied, not handed over.
_HISTORY_PER_ENTRY = 32
_HISTORY_JUDGED = 64


def _fold(into: dict[int, Any], kept: Iterable[Any]) -> None:
    """Add ``kept`` outcomes to ``into`` by task id, in their order: each a chunk's ``(base,
    values, exceptions or None)`` or a dict of single outcomes. A later outcome of a task (a chunk
    run twice) replaces the earlier, as it would have had it been folded when it came."""
    for item in kept:
        if type(item) is dict:
            into.update(item)
            continue
        base, values, exceptions = item
        if len(values) == 1:  # a lone task's chunk (submit(), batch_size=1)
            into[base] = values[0]
        else:
            into.update(zip(range(base, base + len(values)), values))
        if exceptions:
            into.update({base + i: exc for i, exc in exceptions.items()})


class Outcomes:
    """The outcomes of one driver's tasks, and their counts; thread-safe under the ledger's lock.

    Parameters
    ----------
    ledger : Books
        Whose records these outcomes end (and whose lock guards them).
    keep_results : bool
        Whether outcomes are kept for :meth:`results_for`.
    failures : FailureLog, optional
        Where task failures are logged, in batches.
    """

    def __init__(self, ledger: Books, *, keep_results: bool = True, failures: FailureLog | None = None) -> None:
        self.ledger = ledger
        self.cond = ledger.cond
        self.name = ledger.name
        self.keep_results = keep_results
        self.failures = failures or FailureLog(ledger.name)
        # -- under cond --------------------------------------------------------------------------
        #: By producer: every outcome kept, as it came (see the module), while its entries are
        #: large enough (:data:`_HISTORY_PER_ENTRY`; the outcomes they hold, by producer) ...
        self.history: defaultdict[bytes, list[Any]] = defaultdict(list)
        self.history_tasks: defaultdict[bytes, int] = defaultdict(int)
        #: ... the producers whose history was dropped (small entries): their results are copied ...
        self.without_history: set[bytes] = set()
        #: ... those not yet folded ...
        self.kept: defaultdict[bytes, deque[Any]] = defaultdict(deque)
        #: ... and folded, by task id: what results() hands over, or copies.
        self.folded: defaultdict[bytes, dict[int, Any]] = defaultdict(dict)
        self.folding = False
        #: Folding is on and kept entries wait for it: the I/O thread folds some in its idle turns.
        self.fold_due = False
        #: A reader builds a backlog it took out of ``kept``, without the lock: arrivals are
        #: only kept meanwhile (folding them would put them before that backlog).
        self.reading = False
        #: Readers one at a time (taken before ``cond``; the I/O thread never takes it).
        self.read_lock = threading.Lock()
        #: Kept failures by task id, with their producer: a task that fails may run again under
        #: the same id (a dead letter requeued), from a chunk of no record here ...
        self.errored: dict[int, bytes] = {}
        #: ... and then its kept failure is superseded: ids whose outcome kept from this producer
        #: is not the task's latest (results() leaves them out there: a task's outcome once).
        self.stale: defaultdict[bytes, set[int]] = defaultdict(set)
        self.done_by: defaultdict[bytes, int] = defaultdict(int)
        self.completed = 0
        self.failed = 0
        self.cancelled = 0
        self.foreign = 0
        self.duplicates = 0
        #: Results took a chunk's room in the buffers (its CONFIRM held back) and the waiting
        #: submitters are not told yet: the settlement of those results tells them.
        self.room_freed = False
        # -- the I/O thread's --------------------------------------------------------------------
        self.settlements: list[Settlement] = []
        self.bad = 0

    # -- results (the I/O thread) ----------------------------------------------------------------
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
        chunk (its CONFIRM was held back and the results came first: its window slot is free).

        Raises
        ------
        ProtocolError
            They are not the chunk's (tasks outside it, an error outside them), checked before
            anything changes: the caller refuses them with :meth:`intake_refused`, which settles
            the chunk.
        """
        confirmed = False
        n = len(values)
        offset = 0
        if errors and any(not isinstance(i, int) or not 0 <= i < n for i in errors):
            raise ProtocolError("results name an error outside the chunk")
        with self.cond:
            rec = self.ledger.records.get(seq) if seq else None
            if rec is not None:
                if base == UNKNOWN_BASE and n == rec.n:  # the chunk did not decode: all of it
                    base = rec.base
                offset = base - rec.base
                if not (0 <= offset and offset + n <= rec.n):  # checked before anything changes
                    if not (rec.seq in self.ledger.following and n == rec.n):
                        raise ProtocolError(f"results for tasks {base}..{base + n} are outside chunk {seq}")
                    # A follower's: the results of the chunk holding its unique key, under its own ids.
                    base, offset = rec.base, 0
                    self.ledger.following.discard(rec.seq)
                if not rec.confirmed and rec.broker == broker:
                    rec.confirmed = True
                    rec.payload = None
                    rec.chunk_id = chunk_id
                    self.ledger.buffered_chunks -= 1
                    self.ledger.buffered_bytes -= rec.nbytes
                    confirmed = True
                    # The room freed is told to waiting submitters by the settlement queued below,
                    # in this round (one notify for both), or at once if nothing is queued.
                    self.room_freed = True
                seen = rec.got[offset : offset + n]
                if any(seen):
                    if all(seen) or not rec.cancelled:  # executed twice (a broker re-ran it): record once
                        self.duplicates += n - _placeholders(errors)
                        if rec.remaining <= 0 and rec.confirmed:
                            self.ledger.records.pop(rec.seq, None)
                        if confirmed:
                            self.room_freed = False
                            self.cond.notify_all()
                        return confirmed
                    # Some of these tasks were cancelled (their placeholders report here): only
                    # the others are recorded.
                    self.settlements.append((rec, offset, base, consumer, values, errors, bytes(seen)))
                    rec.got[offset : offset + n] = b"\1" * n
                    return confirmed
                rec.got[offset : offset + n] = b"\1" * n
            elif seq:  # its record ended: every task had its outcome
                self.duplicates += n - _placeholders(errors)
                return confirmed
        self.settlements.append((rec, offset, base, consumer, values, errors, None))
        return confirmed

    def intake_refused(self, broker: int, seq: int, chunk_id: int, consumer: bytes, error: ZdqError) -> bool:
        """Results of chunk ``seq`` refused here: every task of the chunk still awaiting its outcome
        fails with ``error`` (at :meth:`settle_all`), as if these were its results; the caller
        acknowledges them (RACK) as any others, since the broker would only send the same bytes
        again. The caller says why in ``error``: a :class:`~zdq.errors.SerializationError` when they
        do not decode (they do not unpickle here, or were not sealed by a member of the pool), a
        :class:`~zdq.errors.ProtocolError` when they decode to results that are not the chunk's
        (:meth:`intake` raised it). Results of no chunk here have nothing to settle. Return whether
        they confirmed the chunk, as :meth:`intake`."""
        confirmed = False
        with self.cond:
            rec = self.ledger.records.get(seq) if seq else None
            if rec is not None and not rec.confirmed and rec.broker == broker:
                rec.confirmed = True
                rec.payload = None
                rec.chunk_id = chunk_id
                self.ledger.buffered_chunks -= 1
                self.ledger.buffered_bytes -= rec.nbytes
                confirmed = True
                self.cond.notify_all()
        if rec is not None:
            self.settlements.append((rec, -1, 0, consumer, [], {0: error}, None))
        return confirmed

    def intake_expired(self, broker: int, seq: int, chunk_id: int, base: int, n: int) -> bool:
        """A broker's EXPIRED: the ``n`` tasks from ``base`` (0: every task of chunk ``seq``) never
        ran; they fail with :class:`~zdq.errors.TaskExpired` (under "not-run" in ``results()``),
        through :meth:`intake`. Return whether this confirmed the chunk, as :meth:`intake`."""
        first = base if base else UNKNOWN_BASE
        errors = {}
        for i in range(n):
            why = f"task {base + i if base else '?'} expired before it started (expires=); it never ran"
            errors[i] = ErrorInfo(TaskExpired(why), EXPIRED, why, "")
        return self.intake(broker, seq, chunk_id, NO_CONSUMER, first, [None] * n, errors)

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
        #: Tasks cancelled where they waited, unasked by this driver (``zdq purge``, or a cancel
        #: that reached the broker before the driver's own answer): counted and settled as a
        #: ``cancel()`` here leaves them.
        withdrawn: list[int] = []
        if errors:
            # Cancelled and expired tasks never ran: not logged as failures (expired ones count as failed).
            skipped = [i for i, info in errors.items() if info.type_name == CANCELLED or info.type_name == EXPIRED]
            withdrawn = [i for i in skipped if errors[i].type_name == CANCELLED]
            failed -= len(withdrawn)
            self.failures.note(base, {i: info for i, info in errors.items() if i not in skipped} if skipped else errors)
            exceptions = {i: error_to_exception(info) for i, info in errors.items()}
        if rec is not None:
            if isinstance(rec.sink, BatchFuture):
                rec.sink._fill(rec.offset + offset, values, exceptions)
            elif rec.sink is not None:
                futures = rec.sink
                for i in withdrawn:
                    cancel_future(futures[offset + i])  # settle() below then leaves it as it is
                for i, value in enumerate(values):
                    settle(futures[offset + i], value, exceptions.get(i))
        with self.cond:
            if self.keep_results:
                self._keep(consumer, (base, values, exceptions or None))
                if rec is None and self.errored:
                    self._supersede(consumer, base, n)
                if exceptions:
                    self.errored.update((base + i, consumer) for i in exceptions)
            self.done_by[consumer] += n
            self.failed += failed
            self.cancelled += len(withdrawn)
            if rec is None:
                self.foreign += n
            else:
                self.completed += n
                rec.remaining -= n
                if rec.remaining <= 0:
                    self.ledger.records.pop(rec.seq, None)
            self._notify_settled()

    def _notify_settled(self) -> None:
        """(``cond`` held.) Wake the threads that wait for outcomes, when one of them may go on:
        ``max_pending`` waits on every outcome, ``wait_results`` (a ``join``) on the last one. Not
        on every chunk otherwise: a ``join`` woken per chunk to find work left takes the
        interpreter from this thread a thousand times a million tasks. (Room in the buffers is
        freed by confirms, which notify for themselves, and by results that confirmed their chunk:
        ``room_freed``, told here.)"""
        ledger = self.ledger
        if self.room_freed or ledger.max_pending is not None or not (ledger.records or ledger.loose):
            self.room_freed = False
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
            for rec in records:
                missing = rec.take_missing()
                self.ledger.records.pop(rec.seq, None)
                if missing:
                    n += len(missing)
                    taken.append((rec, missing))
                    if self.keep_results:
                        self._keep(NO_CONSUMER, {rec.base + i: exc for i in missing})
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

    def fail_everything(self, exc: BaseException) -> int:
        """Fail every task without an outcome (the driver stopped). Return how many."""
        with self.cond:
            loose, self.ledger.loose = self.ledger.loose, []
            records = list(self.ledger.records.values())
            self.ledger.queued.clear()
            self.ledger.pinned.clear()
            self.ledger.buffered_chunks = 0
            self.ledger.buffered_bytes = 0
            self._fail_loose(loose)
        for _, _, fut in loose:
            settle(fut, exc=exc)
        return len(loose) + self.fail_records(records, exc)

    def fail_unsent(self, exc: BaseException) -> int:
        """Fail every task no broker has been handed (no broker can take it). Return how many."""
        with self.cond:
            loose, self.ledger.loose = self.ledger.loose, []
            records = list(self.ledger.queued)
            self.ledger.queued.clear()
            for line in self.ledger.pinned.values():
                records.extend(line)
            self.ledger.pinned.clear()
            self.ledger.buffered_chunks -= len(records)
            self.ledger.buffered_bytes -= sum(len(task) for _, task, _ in loose) + sum(rec.nbytes for rec in records)
            self._fail_loose(loose)
        for _, _, fut in loose:
            settle(fut, exc=exc)
        return len(loose) + self.fail_records(records, exc)

    def fail_pinned(self, broker: int, exc: BaseException) -> int:
        """Fail the unique tasks queued for ``broker`` alone (it cannot be reached). Return how many."""
        with self.cond:
            records = list(self.ledger.pinned.pop(broker, ()))
            self.ledger.buffered_chunks -= len(records)
            self.ledger.buffered_bytes -= sum(rec.nbytes for rec in records)
        return self.fail_records(records, exc) if records else 0

    def fail_seq(self, seq: int, exc: BaseException) -> int:
        """Fail what chunk ``seq`` awaits (its consumer died after acknowledging it early)."""
        with self.cond:
            rec = self.ledger.records.get(seq)
        return 0 if rec is None else self.fail_records([rec], exc)

    def fail_confirmed(self, broker: int, exc: BaseException, only: set[int] | None = None) -> int:
        """Fail the tasks of chunks ``broker`` confirmed (those of ``only``, if given) that have no
        outcome yet. Return how many."""
        with self.cond:
            failed = [
                r for seq, r in self.ledger.records.items()
                if r.broker == broker and r.confirmed and (only is None or seq in only)
            ]
        return self.fail_records(failed, exc)

    # -- cancellation ----------------------------------------------------------------------------
    def cancel_local(self, first: int, n: int) -> tuple[set[int], list[tuple[Record, tuple[int, ...]]]]:
        """Cancel the tasks ``first .. first+n`` no broker holds; return their ids, and the
        (record, indexes) of those a broker holds: only it can say which have not started."""
        last = first + n
        asks: list[tuple[Record, tuple[int, ...]]] = []
        unsent: list[tuple[Record, list[int]]] = []
        with self.cond:
            packing_until = time.monotonic() + 10.0
            while self.ledger.packing is not None and self.ledger.packing[0] < last and first < self.ledger.packing[1]:
                # The I/O thread is turning these loose tasks into chunks: in neither place now.
                if time.monotonic() > packing_until or self.ledger.closed_by is not None:
                    break
                self.cond.wait(0.05)
            loose = [entry for entry in self.ledger.loose if first <= entry[0] < last]
            if loose:
                gone = {id(entry) for entry in loose}
                self.ledger.loose = [entry for entry in self.ledger.loose if id(entry) not in gone]
                self.ledger.buffered_bytes -= sum(len(task) for _, task, _ in loose)
                self._note_cancelled([tid for tid, _, _ in loose])
                self.cond.notify_all()
            for rec in list(self.ledger.records.values()):
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
            if rec.broker < 0 and rec.seq in self.ledger.records:
                if self.ledger.unqueue(rec):
                    self.ledger.buffered_chunks -= 1
                    self.ledger.buffered_bytes -= rec.nbytes
                del self.ledger.records[rec.seq]
            elif rec.confirmed:
                self.ledger.records.pop(rec.seq, None)
        self.cond.notify_all()
        return fresh

    def _note_cancelled(self, ids: list[int]) -> None:
        """(``cond`` held.) Tasks cancelled before they ran: done; in ``results()`` under "not-run"."""
        self.completed += len(ids)
        self.cancelled += len(ids)
        if self.keep_results:
            self._keep(NO_CONSUMER, {tid: cancellation(tid) for tid in ids})

    # -- kept results (keep_results) -------------------------------------------------------------
    def _supersede(self, producer: bytes, base: int, n: int) -> None:
        """(``cond`` held.) Outcomes of tasks ``base .. base + n - 1`` came from ``producer`` in a
        chunk of no record here: those that had failed before (a dead letter requeued and run
        again) have a new latest outcome, and the failure kept from another producer is stale."""
        errored = self.errored
        ids = range(base, base + n) if n <= len(errored) else [t for t in errored if base <= t < base + n]
        for tid in ids:
            old = errored.pop(tid, None)
            if old is not None and old != producer:
                self.stale[old].add(tid)
        mine = self.stale.get(producer)
        if mine:  # run again where it was stale: this producer's outcome is the latest again
            mine.difference_update(range(base, base + n))

    def _keep(self, producer: bytes, item: Any) -> None:
        """(``cond`` held.) Keep one chunk's outcomes, or a dict of single ones, to be folded in the
        I/O thread's idle turns once folding is on (:meth:`fold_some`)."""
        self.kept[producer].append(item)
        if producer not in self.without_history:
            self._remember(producer, item)
        if self.folding and not self.reading:
            self.fold_due = True

    def _remember(self, producer: bytes, item: Any) -> None:
        """(``cond`` held.) Add ``item`` to ``producer``'s history, or drop that history for good
        once its entries prove too small to be worth their memory (see :data:`_HISTORY_PER_ENTRY`)."""
        history = self.history[producer]
        history.append(item)
        tasks = self.history_tasks[producer] = self.history_tasks[producer] + len(item if type(item) is dict else item[1])
        if len(history) >= _HISTORY_JUDGED and tasks < _HISTORY_PER_ENTRY * len(history):
            self.without_history.add(producer)
            del self.history[producer], self.history_tasks[producer]

    def fold_some(self, tasks: int = _FOLD_TASKS) -> None:
        """(The I/O thread, in a turn where nothing else is ready for it.) Fold about ``tasks``
        kept outcomes of one producer, from its oldest; ``fold_due`` says whether any are left.
        Nothing while a reader folds the backlog it took out (:meth:`results_for` asks for the
        rest when it is done: what arrived meanwhile goes behind that backlog)."""
        with self.cond:
            if self.folding and not self.reading:
                for producer, kept in self.kept.items():
                    if kept:
                        self._fold_kept(producer, tasks)
                        break
            self.fold_due = self.folding and not self.reading and any(self.kept.values())

    def _fold_kept(self, producer: bytes, tasks: int | None = None, entries: int = _FOLD_ENTRIES) -> bool:
        """(``cond`` held.) Fold ``producer``'s kept entries from the oldest, until about ``tasks``
        outcomes or ``entries`` entries are folded (at least one entry; ``tasks=None``: all);
        whether any are left. Entries leave from the front of a deque: folding a backlog is linear in it,
        however small its chunks (one task each with ``batch_size=1``)."""
        kept = self.kept.get(producer)
        if not kept:
            return False
        if tasks is None:
            _fold(self.folded[producer], kept)
            kept.clear()
            return False
        step: list[Any] = []
        while kept and tasks > 0 and entries > 0:
            item = kept.popleft()
            step.append(item)
            tasks -= len(item) if type(item) is dict else len(item[1])
            entries -= 1
        _fold(self.folded[producer], step)
        return bool(kept)

    def start_folding(self) -> None:
        """A reader of the kept results showed up (``ConsumerPool.join()``, ``results()``): from
        now on the I/O thread folds the kept outcomes by task id, oldest first, in its idle turns
        (:meth:`fold_some`); ``results()`` folds what is left when it is called. Idempotent."""
        with self.cond:
            self.folding = True
            self.fold_due = not self.reading and any(self.kept.values())

    def results_for(self, producers: Iterable[bytes], into: dict[int, Any] | None = None) -> dict[int, Any]:
        """The outcomes kept from these consumers (by identity), by task id: written into ``into``
        when it is given, else a dict of the caller's own. Folding starts (:meth:`start_folding`).

        **Handed over, not copied**, in the usual case (no ``into``, one of ``producers`` has
        outcomes, none of them superseded, its history kept): the folded dict itself is the answer, and the producer's
        outcomes go back to be folded anew (``kept`` is its ``history`` again), by the I/O thread
        once a reader shows up again (:meth:`start_folding`: folding stops with the hand-over), or
        by the next call. A copy of a million outcomes took 5 to 120 ms, most of it the page
        faults of 40 MB of fresh memory (``benchmarks/RESULTS.md``, issue 26's seventeenth
        session); a second call without a ``join()`` between now folds them again instead.

        What is still unfolded (kept before any reader came, or not yet folded) is taken out under
        the lock and folded without it, straight into the folded dicts: while ``reading`` is set,
        nothing else writes them (the I/O thread only keeps what arrives, behind that backlog, and
        readers come one at a time). Then, under the lock, the copy is made: the I/O thread,
        settling results, waits for that copy, as it always has, never for the backlog's
        insertions. What arrived during the call is kept behind it, folded in the I/O thread's
        idle turns that follow (or by the next call): this call's answer holds everything that
        had arrived when it was made, as before. A backlog folded in part when the call is
        interrupted goes back in front of what arrived since: folded again, it writes the same."""
        merged: dict[int, Any] = {} if into is None else into
        wanted = list(producers)
        with self.read_lock:
            backlogs: dict[bytes, deque[Any]] = {}
            try:
                with self.cond:
                    self.folding = self.reading = True
                    for ident in wanted:
                        if self.kept.get(ident):
                            # Named here before it leaves ``kept``: a signal's exception between
                            # the two steps finds it in one place or both, never in neither.
                            backlogs[ident] = self.kept[ident]
                            self.kept[ident] = deque()
                for ident, backlog in backlogs.items():
                    _fold(self.folded[ident], backlog)
            except BaseException:  # a signal's exception on the main thread: nothing is lost
                with self.cond:
                    self.reading = False
                    self.fold_due = True
                    for ident, backlog in backlogs.items():  # back in front of what arrived since
                        if self.kept.get(ident) is not backlog:
                            self.kept[ident].extendleft(reversed(backlog))
                raise
            try:
                with self.cond:
                    self.reading = False
                    self.fold_due = any(self.kept.values())  # what arrived while the backlog was folded
                    having = [ident for ident in wanted if self.folded.get(ident)]
                    if (
                        into is None
                        and len(having) == 1
                        and having[0] not in self.without_history
                        and not any(self.stale.get(ident) for ident in wanted)
                    ):
                        return self._hand_over(having[0])
                    for ident in wanted:
                        merged.update(self.folded.get(ident, {}))
                    if self.stale:
                        self._drop_stale(wanted, merged)
            except BaseException:
                # An exception at the with line, before the lock is taken (reviewer 19 found a
                # signal's there, when the lock's methods were looked up in Python): the backlog
                # is folded, and the I/O thread must not wait for a reader that has gone.
                self.reading = False
                self.fold_due = self.folding
                raise
        return merged

    def _hand_over(self, producer: bytes) -> dict[int, Any]:
        """(``cond`` held.) ``producer``'s folded dict, given away: its outcomes are to be folded
        again from the start, once a reader shows up. In this order, so that a signal's exception
        between the two steps leaves the dict here, and what is folded again writes the same."""
        self.kept[producer] = deque(self.history[producer])
        mine = self.folded.pop(producer)
        self.folding = False
        self.fold_due = False
        return mine

    def _drop_stale(self, wanted: list[bytes], merged: dict[int, Any]) -> None:
        """(``cond`` held.) Leave out of ``merged`` the outcomes of ``wanted`` producers that a
        later run of the same task superseded (see :meth:`_supersede`), keeping the latest when
        another of them has it."""
        stale: set[int] = set()
        for ident in wanted:
            stale.update(self.stale.get(ident, ()))
        for tid in stale:
            merged.pop(tid, None)
            for ident in wanted:
                folded = self.folded.get(ident)
                if folded is not None and tid in folded and tid not in self.stale.get(ident, ()):
                    merged[tid] = folded[tid]

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
        ledger = self.ledger
        with self.cond:
            return (
                ledger.submitted, self.completed, self.failed, self.cancelled, self.foreign, self.duplicates,
                ledger.buffered_chunks, len(ledger.records),
            )


def _placeholders(errors: dict[int, Any]) -> int:
    """How many of a report's tasks are placeholders of tasks cancelled before they started: each
    reports once, after its future was settled here, and is no duplicate."""
    return sum(1 for info in errors.values() if info.type_name == CANCELLED) if errors else 0
