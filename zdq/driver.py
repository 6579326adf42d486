"""The driver: the client-side end of a QueuePool's data plane.

One I/O thread owns a DEALER per broker. Callers hand it work in two shapes: single tasks
(``submit``), which it coalesces into chunks on the fly (cut where :mod:`zdq.chunking` says), and
prepared chunks (``batch_submit``), pickled by the caller. Every chunk is kept until its broker confirms it, and its tasks until their
results arrive. Results stream back as RESULTS messages and resolve futures as they arrive.

Who owns what
-------------
=======================================  ==================================================
state                                    owner
=======================================  ==================================================
sockets, links (up / down, endpoint,     the I/O thread, alone. Other threads (the pool's
per-broker window, receipts owed,        supervisor) post commands (:meth:`broker_lost`,
syncs in flight)                         :meth:`reconnect`, :meth:`fail_all`), which the I/O
                                         thread carries out in its next round
buffers (loose tasks, queued chunks),    shared under ``_cond``: callers add, the I/O thread
records, counters, ``results``           takes; callers block on ``_cond`` when a bound is hit
futures                                  settled by the I/O thread; their done-callbacks run on
                                         the driver's callback thread, never on the I/O thread
=======================================  ==================================================

Bounds: at most ``window`` unconfirmed chunks per broker; at most ``window`` × brokers chunks
waiting or unconfirmed in all, ``chunk-size`` × brokers loose tasks, and ``buffer-bytes`` of
pickled work held by the driver. A caller that would pass one blocks (``timeout=`` turns the wait
into :class:`~zdq.errors.SubmitTimeout`), so submitting from a generator runs in flat memory and a
stalled broker makes submitters wait instead of filling memory.
"""

from __future__ import annotations

import concurrent.futures
import enum
import functools
import itertools
import logging
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import InvalidStateError
from typing import Any

import zmq

from zdq.chunking import Chunking
from zdq.config import PoolSettings
from zdq.errors import (
    BrokerLost,
    BrokerUnreachable,
    ClosedError,
    ProtocolError,
    SerializationError,
    StorageFull,
    SubmitTimeout,
    TaskCancelled,
    TaskLost,
    ZdqError,
    ZdqTimeoutError,
)
from zdq.futures import BatchFuture, CallbackRunner, TaskFuture
from zdq.names import driver_name, queue_name
from zdq.reporting import FailureLog
from zdq.serialization import UNKNOWN_BASE, error_to_exception, loads_results
from zdq.stats import DriverStats, QueueState
from zdq.tasks import CANCELLED, PICKLED, cancel_in_chunk
from zdq.timing import Timing
from zdq.transport import protocol as p
from zdq.transport.reach import CLIENT_OUTSIDE, OPEN_TO_CLIENT, describe
from zdq.transport.security import ClientKeys
from zdq.transport.sockets import BrokerLinks, Route, Waker, new_identity, process_context, recv_ready, try_send

__all__ = ["Driver", "LinkState", "first_task_id", "NO_CONSUMER"]

#: The producer of the results of tasks that failed without running (their queue was lost, the
#: pool closed, ...): ``ConsumerPool.results()`` shows them under ``"not-run"``.
NO_CONSUMER = b""

logger = logging.getLogger(__name__)

#: Receipts for results (RACK) are batched: sent when this many are owed to a broker, or when the
#: oldest has waited this long. Until then the broker keeps those chunks, so a broker that restarts
#: in that window runs them again (at least once, as ever); one RACK per result would cost a
#: message and a broker round per chunk, which on a single-task round trip is a fifth of the work.
_RACK_BATCH = 256
_RACK_DELAY = 0.02

#: A broker whose window stays full this long without a confirm is stalled (stopped, starved):
#: round robin passes it over so the other queues take the work. Healthy brokers confirm within
#: milliseconds, so the daskqueue evenness (100 chunks over 2 queues: 50 and 50) holds otherwise.
_STALLED = 0.5

#: How long ``cancel()`` waits, by default, for the queues to say what has started: a healthy
#: queue answers in a round trip; one stopped or cut off makes its tasks count as started.
_CANCEL_WAIT = 5.0

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


class LinkState(enum.Enum):
    """The driver's view of one broker."""

    UP = "up"  # connected (or connecting, at the start): chunks are sent to it
    DOWN = "down"  # lost with its worker: nothing is sent until the pool places it again
    RECOVERING = "recovering"  # placed again: resends and a SYNC go out; new chunks once it answers
    UNREACHABLE = "unreachable"  # placed again, and silent for connect-timeout: its tasks failed


class _Link:
    """The I/O thread's link to one broker."""

    __slots__ = (
        "index", "endpoint", "worker", "state", "unconfirmed", "seen", "connected_at", "racks", "confirmed_at",
    )

    def __init__(self, index: int, endpoint: str, worker: str) -> None:
        self.index = index
        self.endpoint = endpoint
        self.worker = worker  # the Dask worker it runs on, for errors ("" if unknown)
        self.state = LinkState.UP
        self.unconfirmed = 0  # chunks sent to it and not yet confirmed
        self.seen = time.monotonic()  # when it was last heard from
        # When this connection was made: the broker has answered it once seen is later.
        self.connected_at = self.seen
        self.racks: list[int] = []  # receipts owed to it
        self.confirmed_at = time.monotonic()  # when it last confirmed a chunk

    @property
    def heard(self) -> bool:
        """Whether its broker answered since this connection was made (its answer to our HELLO)."""
        return self.seen > self.connected_at


class _Record:
    """A chunk from submission to its last result."""

    __slots__ = (
        "seq", "broker", "base", "n", "payload", "nbytes", "sink", "offset", "remaining", "confirmed", "got",
        "chunk_id", "cancelled", "rewrite", "timing",
    )

    def __init__(self, seq: int, base: int, n: int, payload: bytes, sink: Any, offset: int) -> None:
        self.seq = seq
        self.broker = -1
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
        """(Under the driver's ``_cond``.) Record that these tasks will never run; return the
        indexes newly cancelled, for :meth:`settle_cancelled` once the lock is released."""
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
                self.sink._fill(self.offset + i, [None], {0: _cancellation(self.base + i)})
        elif self.sink is not None:
            for i in fresh:
                _cancel_future(self.sink[i])
        return [self.base + i for i in fresh]

    def fail_missing(self, exc: BaseException) -> list[int]:
        """Fail every task of this chunk without an outcome; return their task ids."""
        missing = [i for i in range(self.n) if not self.got[i]]
        for i in missing:
            self.got[i] = 1
        if isinstance(self.sink, BatchFuture):
            for i in missing:
                self.sink._fail(self.offset + i, 1, exc)
        elif self.sink is not None:
            for i in missing:
                _settle(self.sink[i], exc=exc)
        self.remaining = 0
        return [self.base + i for i in missing]


def _cancellation(task_id: int) -> TaskCancelled:
    return TaskCancelled(f"task {task_id} was cancelled before it started")


def _cancel_future(fut: TaskFuture) -> None:
    # The base class's cancel: the future's own asks its driver first (see TaskFuture.cancel).
    concurrent.futures.Future.cancel(fut)


def _settle(fut: TaskFuture, value: Any = None, exc: BaseException | None = None) -> None:
    try:
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)
    except InvalidStateError:
        pass  # cancelled by the user, or already settled by a duplicate


class Driver:
    """Data-plane client of one QueuePool. Thread-safe for callers; one I/O thread inside."""

    def __init__(
        self,
        name: str,
        endpoints: list[str],
        settings: PoolSettings,
        *,
        keep_results: bool = True,
        keys: ClientKeys | None = None,
        payload_key: bytes | None = None,
        queue_names: list[str] | None = None,
        identity: bytes | None = None,
        hint: Callable[[], str] | None = None,
        workers: list[str] | None = None,
        route: Route | None = None,
    ) -> None:
        self.name = name  # the pool's
        self._route = route  # a relay's tunnel, which every link goes through; None: direct
        #: The name this driver announces to the brokers (their statistics show it, not the
        #: driver's identity bytes): unique to this driver, for a pool may have several producers.
        self.driver_name = driver_name(name)
        self._keys = keys
        self.payload_key = payload_key
        self.identity = identity or new_identity()
        self._queue_names = queue_names or [queue_name(name, i) for i in range(len(endpoints))]
        self._settings = settings
        self._chunking = Chunking.of(settings)
        self._keep_results = keep_results
        self._cond = threading.Condition()
        # -- shared under _cond ------------------------------------------------------------------
        self._loose: list[tuple[int, bytes, TaskFuture]] = []
        self._queued: deque[_Record] = deque()
        self._records: dict[int, _Record] = {}
        self._buffered_chunks = 0  # queued + unconfirmed
        self._buffered_bytes = 0  # loose tasks + queued and unconfirmed payloads
        self._next_task = first_task_id()
        self._next_seq = 1
        self._error: BaseException | None = None
        self._closed_by: BaseException | None = None  # why the driver stopped taking work
        self._statuses: dict[int, dict[int, p.QueueStatus]] = {}  # token -> broker -> reply
        self._link_states = [LinkState.UP] * len(endpoints)  # a copy of the links' states, for callers
        # Each queue's last answer to a count (a STATUS), and when: reprs show it, never ask.
        self._last_counts: list[tuple[p.QueueStatus, float] | None] = [None] * len(endpoints)
        self._results: defaultdict[bytes, dict[int, Any]] = defaultdict(dict)
        self._done_by: defaultdict[bytes, int] = defaultdict(int)
        self._submitted = 0
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        # CANCELs sent and not answered: token -> (record, indexes asked); and the answers awaited
        # by a caller (token -> task ids cancelled, None until the answer comes).
        self._cancel_asks: dict[int, tuple[_Record, tuple[int, ...]]] = {}
        self._cancel_answers: dict[int, list[int] | None] = {}
        #: Consumers serving this pool (set by the pool): single tasks are cut so all get some.
        self.consumers = 0
        # Task ids the I/O thread is turning from loose tasks into records (neither, meanwhile).
        self._packing: tuple[int, int] | None = None
        self._foreign = 0
        self._duplicates = 0
        self._bad = 0
        # -- the I/O thread's, once started ------------------------------------------------------
        self._links = [_Link(i, e, w) for i, (e, w) in enumerate(zip(endpoints, workers or [""] * len(endpoints)))]
        self._rr = 0
        self._control: deque[Callable[[BrokerLinks], None]] = deque()
        self._tokens = itertools.count(1)
        self._reconciling: dict[int, int] = {}  # SYNC token -> broker, after a recovery
        # SYNC token -> (broker, the unconfirmed chunks asked about), after its path changed (a new relay)
        self._rerouting: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._whys: dict[int, dict[int, str]] = {}  # token -> why each unheard broker is silent
        # Results received in this round of the I/O thread, handed to their futures before it sleeps.
        self._settlements: list[tuple[_Record | None, int, int, bytes, list[Any], dict[int, Any], bytes | None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context[Any] | None = None
        self._waker: Waker | None = None
        self._callbacks = CallbackRunner(name)
        self._hint = hint  # why a result may not come: told by a future's result(timeout)
        self._failures = FailureLog(name)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._ctx = process_context()
        self._waker = Waker(self._ctx)
        self._callbacks.start()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=f"zdq-driver-{self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise ZdqError(f"the driver of pool {self.name} did not start within 30 s")
        if self._error is not None:
            raise ZdqError(f"the driver of pool {self.name} could not start: {self._error!r}") from self._error

    def close(self, timeout: float = 10.0, *, reason: BaseException | None = None) -> None:
        """Stop the I/O thread; futures still pending fail with ``reason`` (default
        :class:`ClosedError`). Idempotent."""
        if self._stop.is_set():
            return
        exc = reason or ClosedError(f"queue pool {self.name} was closed before this task finished")
        with self._cond:
            self._closed_by = self._closed_by or exc
        self._stop.set()
        if self._waker is not None:
            self._waker.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._fail_everything(exc)
        if self._waker is not None:
            self._waker.close()
            self._waker = None
        self._callbacks.stop(timeout)
        self._ctx = None  # the process's context: the I/O thread closed its sockets

    def _fail_everything(self, exc: BaseException) -> None:
        with self._cond:
            loose, self._loose = self._loose, []
            records = list(self._records.values())
            self._queued.clear()
            self._records.clear()
            self._buffered_chunks = 0
            self._buffered_bytes = 0
            self._cond.notify_all()
        self._fail_taken(loose, records, exc)

    def _fail_unsent(self, exc: BaseException) -> None:
        """Fail every task no broker has been handed (no broker can take it)."""
        with self._cond:
            loose, self._loose = self._loose, []
            records = list(self._queued)
            self._queued.clear()
            for rec in records:
                del self._records[rec.seq]
            self._buffered_chunks -= len(records)
            self._buffered_bytes -= sum(len(task) for _, task, _ in loose) + sum(rec.nbytes for rec in records)
            self._cond.notify_all()
        self._fail_taken(loose, records, exc)

    def _fail_taken(
        self, loose: list[tuple[int, bytes, TaskFuture]], records: list[_Record], exc: BaseException
    ) -> None:
        """Fail loose tasks and records already taken out of the buffers."""
        for _, _, fut in loose:
            _settle(fut, exc=exc)
        n = sum(self._fail(rec, exc) for rec in records)
        with self._cond:
            self._completed += n + len(loose)
            self._failed += n + len(loose)

    @property
    def stopped(self) -> bool:
        """Whether the driver takes no more work (closed, or stopped by :meth:`fail_all`)."""
        return self._stop.is_set()

    def fail_all(self, exc: BaseException) -> None:
        """Stop taking work and fail every pending future with ``exc`` (the cluster was reset)."""
        self.close(reason=exc)

    def _check_open(self) -> None:
        if self._stop.is_set():
            reason = self._closed_by
            if reason is not None and not isinstance(reason, ClosedError):
                raise ClosedError(f"queue pool {self.name} stopped: {reason}") from reason
            raise ClosedError(f"queue pool {self.name} is closed")
        if self._error is not None:
            raise ZdqError(f"queue pool {self.name} driver failed: {self._error!r}") from self._error

    # -- caller side ----------------------------------------------------------------------------
    def reserve(self, n: int) -> int:
        """Reserve ``n`` consecutive task ids; return the first."""
        with self._cond:
            first = self._next_task
            self._next_task += n
            return first

    def _room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit in the byte budget (an empty buffer takes anything)."""
        return self._buffered_bytes == 0 or self._buffered_bytes + nbytes <= self._settings.buffer_bytes

    def submit_task(self, task: bytes, *, timeout: float | None = None) -> TaskFuture:
        """Queue one pickled task (:func:`~zdq.tasks.dumps_task`) for coalescing into a
        chunk; return its future. Blocks while the driver's buffers are full."""
        self._check_open()
        cap = self._settings.chunk_size * len(self._links)
        budget = self._settings.buffer_bytes - len(task)
        with self._cond:
            if len(self._loose) >= cap or (self._buffered_bytes > budget and self._buffered_bytes):
                deadline = None if timeout is None else time.monotonic() + timeout
                while len(self._loose) >= cap or not self._room(len(task)):
                    self._wait(deadline)
            tid = self._next_task
            self._next_task += 1
            fut = TaskFuture(tid)
            fut._hint = self._hint
            fut._driver = self
            wake = not self._loose
            self._loose.append((tid, task, fut))
            self._buffered_bytes += len(task)
            self._submitted += 1
        if wake and self._waker is not None:
            self._waker.wake()
        return fut

    def submit_timed(self, task: bytes, timing: Timing, *, timeout: float | None = None) -> TaskFuture:
        """Queue one pickled task with a release time or priority, as a chunk of its own: loose
        tasks are coalesced into plain chunks, and the broker orders chunks, not tasks."""
        self._check_open()
        tid = self.reserve(1)
        [(first, n, payload)] = self._chunking.pack(tid, [task], self.payload_key, PICKLED, None)  # too large: raises
        fut = TaskFuture(tid)
        fut._hint = self._hint
        fut._driver = self
        self.submit_chunk(first, n, payload, [fut], 0, timeout=timeout, timing=timing)
        return fut

    def submit_chunk(
        self,
        base: int,
        n: int,
        payload: bytes,
        sink: Any,
        offset: int,
        *,
        timeout: float | None = None,
        timing: Timing | None = None,
    ) -> None:
        """Queue a chunk pickled by the caller; block while the driver's buffers are full."""
        self._check_open()
        cap = self._settings.window * len(self._links)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._buffered_chunks >= cap or not self._room(len(payload)):
                self._wait(deadline)
            rec = _Record(self._next_seq, base, n, payload, sink, offset)
            rec.timing = timing
            self._next_seq += 1
            self._records[rec.seq] = rec
            self._queued.append(rec)
            self._buffered_chunks += 1
            self._buffered_bytes += rec.nbytes
            self._submitted += n
        if self._waker is not None:
            self._waker.wake()

    def cancel(self, first: int, n: int, timeout: float | None = None) -> set[int]:
        """Cancel the tasks ``first .. first+n`` that have not started; return the ids of those
        that never will run (their futures are cancelled; a batch's hold TaskCancelled).

        A task not yet sent is cancelled here. For a task with a broker, the broker answers: a
        ready chunk's tasks are marked and skipped when it is delivered; a leased chunk's consumer
        says which have not started. The wait is bounded by ``timeout`` (default: the heartbeat
        timeout and a few seconds, within which a broker always answers); a task whose queue
        does not answer in time counts as started. An answer that comes later still cancels.
        """
        if timeout is None:
            timeout = _CANCEL_WAIT
        last = first + n
        cancelled: set[int] = set()
        asks: list[tuple[_Record, tuple[int, ...]]] = []
        with self._cond:
            packing_until = time.monotonic() + 10.0
            while self._packing is not None and self._packing[0] < last and first < self._packing[1]:
                # The I/O thread is turning these loose tasks into chunks: in neither place now.
                if time.monotonic() > packing_until or self._stop.is_set():
                    break
                self._cond.wait(0.05)
            loose = [entry for entry in self._loose if first <= entry[0] < last]
            if loose:
                gone = {id(entry) for entry in loose}
                self._loose = [entry for entry in self._loose if id(entry) not in gone]
                self._buffered_bytes -= sum(len(task) for _, task, _ in loose)
                self._note_cancelled_unsent([tid for tid, _, _ in loose])
                self._cond.notify_all()
            unsent: list[tuple[_Record, list[int]]] = []
            for rec in list(self._records.values()):
                lo, hi = max(first, rec.base), min(last, rec.base + rec.n)
                if lo >= hi:
                    continue
                indexes = tuple(t - rec.base for t in range(lo, hi))
                if rec.broker < 0:  # not sent: its payload is rewritten before it is
                    fresh = rec.cancel(indexes)
                    self._count_cancelled(rec, fresh)
                    unsent.append((rec, fresh))
                else:
                    asks.append((rec, indexes))
        for _, _, fut in loose:
            _cancel_future(fut)
        for rec, fresh in unsent:
            cancelled.update(rec.settle_cancelled(fresh))
        cancelled.update(tid for tid, _, _ in loose)
        if not asks:
            return cancelled
        tokens = [next(self._tokens) for _ in asks]
        with self._cond:
            for token in tokens:
                self._cancel_answers[token] = None
        for token, (rec, indexes) in zip(tokens, asks):
            self._post(functools.partial(self._ask_cancel, token=token, rec=rec, indexes=indexes))
        deadline = time.monotonic() + timeout
        with self._cond:
            try:
                while any(self._cancel_answers[t] is None for t in tokens):
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stop.is_set():
                        queues = sorted({self._queue_names[rec.broker] for rec, _ in asks if rec.broker >= 0})
                        logger.warning(
                            "%s: queue %s did not answer a cancellation within %.1fs; its tasks count as started "
                            "(they are cancelled still if the answer comes later)",
                            self.driver_name, ", ".join(queues) or "?", timeout,
                        )
                        break
                    self._cond.wait(min(left, 0.5))
                for token in tokens:
                    cancelled.update(self._cancel_answers[token] or ())
            finally:
                for token in tokens:
                    self._cancel_answers.pop(token, None)
        return cancelled

    def _note_cancelled_unsent(self, ids: list[int]) -> None:
        """Tasks cancelled before they left this process: done; in ``results()`` under "not-run"
        (``_cond`` held)."""
        self._completed += len(ids)
        self._cancelled += len(ids)
        if self._keep_results:
            store = self._results[NO_CONSUMER]
            for tid in ids:
                store[tid] = _cancellation(tid)

    def _count_cancelled(self, rec: _Record, fresh: list[int]) -> None:
        """(``_cond`` held.) Tasks of ``rec`` just cancelled are done: counted, kept in ``results()``
        under "not-run", and the record goes once nothing of it is awaited (a chunk not sent yet
        is not sent at all; one sent waits for its confirm, which frees its window slot)."""
        if not fresh:
            return
        self._note_cancelled_unsent([rec.base + i for i in fresh])
        if rec.remaining <= 0:
            if rec.broker < 0 and rec.seq in self._records:
                try:
                    self._queued.remove(rec)
                except ValueError:
                    pass
                else:
                    self._buffered_chunks -= 1
                    self._buffered_bytes -= rec.nbytes
                del self._records[rec.seq]
            elif rec.confirmed:
                self._records.pop(rec.seq, None)
        self._cond.notify_all()

    def _wait(self, deadline: float | None) -> None:
        """Wait on the condition (held) for progress; raise on close or timeout."""
        self._check_open()
        if deadline is None:
            self._cond.wait(1.0)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SubmitTimeout(self._why_full())
            self._cond.wait(min(left, 1.0))
        self._check_open()

    def _why_full(self) -> str:
        down = self._queues_down()
        why = (
            f"the driver of pool {self.name} holds {self._buffered_chunks} chunks and "
            f"{self._buffered_bytes} bytes that its brokers have not confirmed"
        )
        if down:
            why += f"; queues {', '.join(down)} are down (their workers were lost) and being placed again"
        now = time.monotonic()
        stalled = [
            self._queue_names[link.index]
            for link in self._links
            if link.state is LinkState.UP
            and link.unconfirmed >= self._settings.window
            and now - link.confirmed_at >= _STALLED
        ]
        if stalled:
            why += (
                f"; queues {', '.join(stalled)} have confirmed nothing for a while (their workers are stopped, "
                "or too busy to serve them)"
            )
        return why + ": the submission timed out waiting for room"

    def flush(self, timeout: float | None = None) -> None:
        """Block until every chunk submitted so far is confirmed by its broker."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._loose or self._buffered_chunks:
                try:
                    self._wait(deadline)
                except SubmitTimeout as e:
                    raise ZdqTimeoutError(f"flush: {e}") from None

    def wait_results(self, timeout: float | None = None) -> bool:
        """Block until every task submitted so far has its result; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._loose or self._records:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._check_open()
                self._cond.wait(1.0 if left is None else min(left, 1.0))
        return True

    @property
    def outstanding(self) -> int:
        """Tasks submitted whose results have not all arrived."""
        with self._cond:
            return len(self._loose) + sum(r.remaining for r in self._records.values())

    @property
    def completed(self) -> int:
        """Tasks with a result (own and foreign)."""
        return self._completed + self._foreign

    def results_for(self, producers: Iterable[bytes]) -> dict[int, Any]:
        """The results kept from these consumers (by identity), by task id: a copy."""
        with self._cond:
            merged: dict[int, Any] = {}
            for ident in producers:
                merged.update(self._results.get(ident, {}))
            return merged

    def done_count(self, producers: Iterable[bytes]) -> int:
        """Tasks whose results came from these consumers."""
        with self._cond:
            return sum(self._done_by.get(ident, 0) for ident in producers)

    def producers(self) -> set[bytes]:
        """Every consumer identity that results came from."""
        with self._cond:
            return set(self._done_by)

    def links_up(self) -> list[bool]:
        """Which brokers the driver can reach now (a copy of the I/O thread's link states)."""
        with self._cond:
            return [state is LinkState.UP for state in self._link_states]

    def unreached(self, deadline: float) -> dict[int, str]:
        """Wait until every broker has answered since its link was made, or ``deadline``
        (monotonic); return why each broker that did not is silent, by index.

        The answer is the broker's reply to our HELLO: the data plane itself, no actor call.
        """
        while not self._stop.is_set():
            silent = [link.index for link in self._links if not link.heard]
            if not silent or time.monotonic() >= deadline:
                break
            time.sleep(0.005)  # a handshake takes milliseconds; this runs once per placement
        else:
            return {}
        if not silent:
            return {}
        token = next(self._tokens)
        self._post(lambda links: self._tell_why(links, token, silent))
        give_up = time.monotonic() + 5.0
        with self._cond:
            while token not in self._whys and time.monotonic() < give_up and not self._stop.is_set():
                self._cond.wait(0.1)
            whys = self._whys.pop(token, {})
        return {i: whys.get(i, "no answer") for i in silent}

    def _tell_why(self, links: BrokerLinks, token: int, silent: list[int]) -> None:
        whys = {i: links.why(i) for i in silent}
        with self._cond:
            self._whys[token] = whys
            self._cond.notify_all()

    def _queues_down(self) -> list[str]:
        """The names of the queues not up (``_cond`` held)."""
        return [name for name, state in zip(self._queue_names, self._link_states) if state is not LinkState.UP]

    def queue_states(self) -> list[QueueState]:
        """What this driver knows of each queue, asking none: its link's state, its tasks there
        awaiting results, and the queue's last count. Cheap, and never blocks on a broker (reprs
        use it); walks the chunks in flight, so it is not for a per-task path."""
        now = time.monotonic()
        with self._cond:
            awaiting = [0] * len(self._links)
            for rec in self._records.values():
                if rec.broker >= 0:
                    awaiting[rec.broker] += rec.remaining
            out = []
            for i, (name, state, last) in enumerate(zip(self._queue_names, self._link_states, self._last_counts)):
                pending = None if last is None else last[0].ready_tasks + last[0].leased_tasks
                ago = None if last is None else now - last[1]
                out.append(QueueState(name, state.value, awaiting[i], pending, ago))
            return out

    @property
    def unsent(self) -> int:
        """Tasks submitted that no queue has been handed yet (coalescing, or waiting for room)."""
        with self._cond:
            return len(self._loose) + sum(r.remaining for r in self._queued)

    def broker_silence(self, broker: int) -> float:
        """Seconds since broker ``broker`` was last heard from."""
        return time.monotonic() - self._links[broker].seen

    def queue_status(self, timeout: float = 10.0, only: int | None = None) -> list[p.QueueStatus | None]:
        """Each broker's counts, asked over the data plane (no Dask actor call); ``only``: wait for
        that broker's answer alone (another, stalled, does not hold it up).

        A reply also says that every result the broker routed here before it has arrived (one
        socket keeps order). ``None`` for a broker that is down or did not answer in time.
        """
        token = next(self._tokens)
        with self._cond:
            self._statuses[token] = {}
        self._post(lambda links: self._ask_status(links, token))
        deadline = time.monotonic() + timeout
        with self._cond:
            try:
                while (
                    len(self._statuses[token]) < self._link_states.count(LinkState.UP)
                    if only is None
                    else only not in self._statuses[token] and self._link_states[only] is LinkState.UP
                ):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._check_open()
                    self._cond.wait(min(left, 0.5))
                replies = self._statuses[token]
            finally:
                self._statuses.pop(token, None)
            return [replies.get(i) for i in range(len(self._links))]

    def broker_lost(self, broker: int, *, memory_lost: bool) -> None:
        """A broker died. Its unconfirmed chunks go to the other brokers (or its replacement); if
        its tasks lived only in its memory, its confirmed chunks fail with :class:`BrokerLost`."""
        self._post(lambda links: self._on_broker_lost(links, broker, memory_lost))

    def reconnect(self, broker: int, endpoint: str, worker: str = "") -> None:
        """Broker ``broker`` was placed again at ``endpoint`` (on ``worker``): connect there, resend
        what it never confirmed, and ask it which confirmed chunks it does not hold (they fail with
        TaskLost). If it does not answer within ``connect-timeout``, the tasks it holds fail with
        :class:`~zdq.errors.BrokerUnreachable`."""
        self._post(lambda links: self._on_reconnect(links, broker, endpoint, worker))

    def reroute(self, broker: int) -> None:
        """The path to broker ``broker`` changed (a new relay), not the broker: connect again and
        ask it which of the chunks it never confirmed to us it holds. Those it holds count as
        confirmed (their receipts were lost on the old path; their results come), the others
        are sent again; the broker sends again the results it sent on the old path. Unlike
        :meth:`reconnect`, a broker silent meanwhile fails nothing (it is alive, maybe busy)."""
        self._post(lambda links: self._on_reroute(links, broker))

    def fail_chunks_of(self, broker: int, exc: BaseException) -> None:
        """Fail every task confirmed by ``broker`` that has no result yet (its queue is gone for good)."""
        def fail(links: BrokerLinks) -> None:
            self._fail_confirmed(broker, exc)

        self._post(fail)

    def statistics(self) -> DriverStats:
        with self._cond:
            return DriverStats(
                tasks_submitted=self._submitted,
                tasks_completed=self._completed,
                tasks_failed=self._failed,
                tasks_cancelled=self._cancelled,
                foreign_tasks=self._foreign,
                duplicate_results=self._duplicates,
                chunks_unconfirmed=self._buffered_chunks,
                chunks_outstanding=len(self._records),
                bad_messages=self._bad,
                links_down=len(self._link_states) - self._link_states.count(LinkState.UP),
                name=self.driver_name,
                queues_down=tuple(self._queues_down()),
            )

    def _post(self, command: Callable[[BrokerLinks], None]) -> None:
        self._control.append(command)
        if self._waker is not None:
            self._waker.wake()

    # -- I/O thread -----------------------------------------------------------------------------
    def _run(self, ready: threading.Event) -> None:
        assert self._ctx is not None and self._waker is not None
        self._callbacks.adopt_current_thread()
        hello = p.encode(p.Hello(p.Role.DRIVER, self.driver_name.encode()[:256]))
        links = BrokerLinks(
            self._ctx,
            self.identity,
            hello,
            keys=self._keys,
            max_message_size=self._settings.max_message_size,
            route=self._route,
        )
        try:
            for link in self._links:
                links.add(link.endpoint)
            ready.set()
            self._serve(links, self._waker)
        except BaseException as e:
            self._error = e
            logger.exception("%s failed", self.driver_name)
        finally:
            ready.set()
            links.close(farewell=p.encode(p.Bye()))
            with self._cond:
                self._cond.notify_all()

    def _serve(self, links: BrokerLinks, waker: Waker) -> None:
        poller, socks = links.poller, links.socks
        poller.register(waker.socket, zmq.POLLIN)
        beat = self._settings.heartbeat_interval
        next_beat = time.monotonic() + beat
        rack_due = math.inf
        rack_full = False
        link_of = self._links
        while not self._stop.is_set():
            while self._control:
                self._control.popleft()(links)
            if self._loose:  # read without the lock: a stale answer only delays to the next wake
                self._coalesce()
            if self._queued:
                self._send_queued(socks)
            now = time.monotonic()
            timeout = max(0, math.ceil((min(next_beat, rack_due) - now) * 1000))
            if self._settlements:
                # Last thing before sleeping: a caller woken by its result gets this process's
                # interpreter at once, instead of waiting for this thread to finish its round.
                self._settle_all()
            for sock, _ in poller.poll(timeout):
                index = links.index(sock)
                if index is None:
                    waker.drain()
                    continue
                link = link_of[index]
                owed = link.racks
                for frames in recv_ready(sock, 1):
                    chunk_id = self._handle(link, frames)
                    if chunk_id is not None:
                        if not owed and rack_due == math.inf:
                            rack_due = time.monotonic() + _RACK_DELAY
                        owed.append(chunk_id)
                        rack_full = rack_full or len(owed) >= _RACK_BATCH
            now = time.monotonic()
            if now >= rack_due or rack_full:
                self._send_racks(socks)
                rack_due = math.inf
                rack_full = False
            if now >= next_beat:
                self._tick(links, now)
                next_beat = now + beat
        self._settle_all()
        self._send_racks(socks)
        self._failures.flush()

    def _tick(self, links: BrokerLinks, now: float) -> None:
        """Every heartbeat interval: heartbeats, and the links that were never answered."""
        socks = links.socks
        beat = p.encode(p.Heartbeat())
        for link in self._links:
            if link.state is LinkState.UP or link.state is LinkState.RECOVERING:
                try_send(socks[link.index], beat)
            if link.heard:
                links.settle(link.index)  # its connection needs no watching any more
            elif link.state is LinkState.RECOVERING and now - link.connected_at >= self._settings.connect_timeout:
                self._unreachable(links, link)
        if (self._queued or self._loose) and all(link.state is LinkState.UNREACHABLE for link in self._links):
            exc = BrokerUnreachable(
                self._describe_unreachable(
                    links,
                    self._links,
                    f"pool {self.name} has no queue this process ({self.driver_name}) can reach: its brokers were "
                    f"placed again and did not answer within {self._settings.connect_timeout:g} s",
                )
            )
            self._fail_unsent(exc)

    def _unreachable(self, links: BrokerLinks, link: _Link) -> None:
        """A broker placed again never answered: what it never confirmed goes to the others, what
        it holds fails (this process cannot reach it to get the results)."""
        self._set_state(link, LinkState.UNREACHABLE)
        self._requeue_unconfirmed(link.index)
        name = self._queue_names[link.index]
        exc = BrokerUnreachable(
            self._describe_unreachable(
                links,
                [link],
                f"queue {name} was placed again, and this process ({self.driver_name}) heard nothing from it within "
                f"{self._settings.connect_timeout:g} s; its tasks failed",
            )
        )
        n = self._fail_confirmed(link.index, exc)
        logger.error("%s: %s (%d tasks failed)", self.driver_name, exc, n)

    def _describe_unreachable(self, links: BrokerLinks, unheard: list[_Link], subject: str) -> str:
        every = all(k in unheard or k.state is LinkState.UNREACHABLE for k in self._links)
        return describe(
            subject,
            [(self._queue_names[k.index], k.endpoint, k.worker, links.why(k.index)) for k in unheard],
            CLIENT_OUTSIDE if every else OPEN_TO_CLIENT,
        )

    def _send_racks(self, socks: list[zmq.Socket[Any]]) -> None:
        """Tell each broker which chunks' results arrived: it may forget them now."""
        for link in self._links:
            if link.racks:
                if link.state is LinkState.UP:
                    try_send(socks[link.index], p.encode(p.Rack(tuple(link.racks))))
                link.racks.clear()

    def _set_state(self, link: _Link, state: LinkState) -> None:
        link.state = state
        with self._cond:
            self._link_states[link.index] = state
            self._cond.notify_all()

    def _on_broker_lost(self, links: BrokerLinks, broker: int, memory_lost: bool) -> None:
        link = self._links[broker]
        if link.state is LinkState.DOWN:
            return
        self._set_state(link, LinkState.DOWN)
        link.racks.clear()  # the broker that owed them is gone
        links.disconnect(broker)  # nothing more is queued for a dead peer
        self._unask_cancels(broker)
        self._requeue_unconfirmed(broker)
        if memory_lost:
            n = self._fail_confirmed(
                broker, BrokerLost(f"queue {self._queue_names[broker]} was lost with its worker; this task lived only in its memory")
            )
            logger.warning("%s: %d tasks of lost queue %s failed with BrokerLost", self.driver_name, n, self._queue_names[broker])

    def _requeue_unconfirmed(self, broker: int) -> None:
        """Chunks sent to ``broker`` and not confirmed go first in line again, for any broker."""
        link = self._links[broker]
        with self._cond:
            again = [r for r in self._records.values() if r.broker == broker and not r.confirmed]
            again.sort(key=lambda r: r.seq, reverse=True)
            for rec in again:
                rec.broker = -1
                self._queued.appendleft(rec)
            link.unconfirmed = 0
            self._cond.notify_all()
        if again:
            logger.info("%s: %d unconfirmed chunks of queue %s will be sent again", self.driver_name, len(again), self._queue_names[broker])

    def _fail_confirmed(self, broker: int, exc: BaseException) -> int:
        with self._cond:
            failed = [r for r in self._records.values() if r.broker == broker and r.confirmed]
            for rec in failed:
                del self._records[rec.seq]
        n = sum(self._fail(rec, exc) for rec in failed)
        with self._cond:
            self._completed += n
            self._failed += n
            self._cond.notify_all()
        return n

    def _on_reconnect(self, links: BrokerLinks, broker: int, endpoint: str, worker: str) -> None:
        link = self._links[broker]
        links.replace(broker, endpoint)
        link.endpoint = endpoint
        link.worker = worker
        link.seen = link.connected_at = time.monotonic()
        link.racks.clear()  # the replacement does not know those chunks
        if link.state is LinkState.UP:  # placed again without being reported lost first
            self._set_state(link, LinkState.DOWN)
        self._unask_cancels(broker)
        self._requeue_unconfirmed(broker)
        self._set_state(link, LinkState.RECOVERING)
        # Which confirmed chunks did the queue keep? A durable queue serves every chunk it stored,
        # except those acknowledged early (at most once) whose results never came: they are lost.
        with self._cond:
            seqs = sorted(r.seq for r in self._records.values() if r.broker == broker and r.confirmed)
        for start in range(0, max(len(seqs), 1), p.MAX_CHUNK_TASKS):
            token = next(self._tokens)
            self._reconciling[token] = broker
            try_send(links.socks[broker], p.encode(p.Sync(token, tuple(seqs[start : start + p.MAX_CHUNK_TASKS]))))

    def _on_reroute(self, links: BrokerLinks, broker: int) -> None:
        link = self._links[broker]
        if link.state is LinkState.DOWN:
            return  # lost: its placement again reconnects it
        links.replace(broker, link.endpoint)  # a new socket says HELLO: the broker resends results
        link.seen = link.connected_at = time.monotonic()
        self._unask_cancels(broker)  # questions on the old path will not be answered
        with self._cond:
            seqs = sorted(r.seq for r in self._records.values() if r.broker == broker and not r.confirmed)
        for start in range(0, len(seqs), p.MAX_CHUNK_TASKS):
            token, asked = next(self._tokens), tuple(seqs[start : start + p.MAX_CHUNK_TASKS])
            self._rerouting[token] = (broker, asked)
            try_send(links.socks[broker], p.encode(p.Sync(token, asked)))

    def _rerouted(self, broker: int, asked: tuple[int, ...], missing: set[int]) -> None:
        """The broker's answer after a reroute: the chunks of ``asked`` not ``missing`` are
        stored (confirmed); the missing ones go first in line again, for any broker."""
        link = self._links[broker]
        again: list[_Record] = []
        with self._cond:
            for seq in asked:
                rec = self._records.get(seq)
                if rec is None or rec.broker != broker or rec.confirmed:
                    continue
                link.unconfirmed -= 1
                if seq in missing:
                    rec.broker = -1
                    again.append(rec)
                    continue
                self._buffered_chunks -= 1
                self._buffered_bytes -= rec.nbytes
                rec.confirmed = True
                rec.payload = None
                if rec.remaining <= 0:
                    del self._records[seq]
            for rec in sorted(again, key=lambda r: r.seq, reverse=True):
                self._queued.appendleft(rec)
            self._cond.notify_all()
        if again:
            logger.info("%s: %d chunks never reached queue %s over the old path; sent again", self.driver_name, len(again), self._queue_names[broker])

    def _ask_cancel(self, links: BrokerLinks, *, token: int, rec: _Record, indexes: tuple[int, ...]) -> None:
        if rec.broker < 0:  # sent back to the queue meanwhile (its broker was lost): not sent yet
            with self._cond:
                fresh = rec.cancel(indexes)
                self._count_cancelled(rec, fresh)
            self._answer_cancel(token, rec.settle_cancelled(fresh))
            return
        link = self._links[rec.broker]
        if link.state is not LinkState.UP:  # its queue is down: nobody can say what started
            self._answer_cancel(token, [])
            return
        self._cancel_asks[token] = (rec, indexes)
        try_send(links.socks[rec.broker], p.encode(p.Cancel(token, rec.chunk_id, rec.seq, indexes)))

    def _on_cancelled(self, msg: p.Cancelled) -> None:
        asked = self._cancel_asks.pop(msg.token, None)
        if asked is None:
            raise ProtocolError(f"CANCELLED answers no question ({msg.token})")
        rec, indexes = asked
        with self._cond:
            fresh = rec.cancel(i for i in msg.indexes if i in indexes)
            self._count_cancelled(rec, fresh)
        self._answer_cancel(msg.token, rec.settle_cancelled(fresh))

    def _unask_cancels(self, broker: int) -> None:
        """Broker ``broker`` is gone: the cancellations it was asked will not be answered, and
        their callers need not wait (what it held counts as started)."""
        for token, (rec, _) in list(self._cancel_asks.items()):
            if rec.broker == broker:
                del self._cancel_asks[token]
                self._answer_cancel(token, [])

    def _answer_cancel(self, token: int, ids: list[int]) -> None:
        """Hand the answer to a caller waiting."""
        with self._cond:
            if token in self._cancel_answers:
                self._cancel_answers[token] = ids
            self._cond.notify_all()

    def _ask_status(self, links: BrokerLinks, token: int) -> None:
        # Receipts owed go first: when the reply comes, the broker has taken them (one socket
        # keeps order), so a pool closed right after its results came leaves nothing to re-run.
        self._send_racks(links.socks)
        for link in self._links:
            if link.state is not LinkState.DOWN:
                try_send(links.socks[link.index], p.encode(p.Sync(token)))

    def _coalesce(self) -> None:
        """Turn single submissions into chunks, spread over the brokers, while there is room
        (:class:`~zdq.chunking.Chunking` says where they are cut)."""
        n_brokers = len(self._links)
        chunking = self._chunking
        with self._cond:
            room = self._settings.window * n_brokers - self._buffered_chunks
            if not self._loose or room <= 0:
                return
            take = chunking.loose_take(room)
            if len(self._loose) <= take:
                loose, self._loose = self._loose, []
            else:
                loose, self._loose = self._loose[:take], self._loose[take:]
            self._packing = (loose[0][0], loose[-1][0] + 1)  # a cancel() of these waits for the records
            self._cond.notify_all()
        try:
            self._pack_loose(loose, n_brokers)
        finally:
            with self._cond:
                self._packing = None
                self._cond.notify_all()

    def _pack_loose(self, loose: list[tuple[int, bytes, TaskFuture]], n_brokers: int) -> None:
        chunking = self._chunking
        for start, end in chunking.loose_runs(loose, n_brokers, self.consumers):
            part = loose[start:end]
            first = part[0][0]
            futures = [fut for _, _, fut in part]
            tasks = [task for _, task, _ in part]
            loose_bytes = sum(len(t) for t in tasks)
            packed, refused = chunking.pack_loose(first, tasks, self.payload_key)
            for j, exc in refused:  # too large: only that task fails
                _settle(futures[j], exc=exc)
            with self._cond:
                self._buffered_bytes -= loose_bytes
                for sub_first, n, payload in packed:
                    offset = sub_first - first
                    rec = _Record(self._next_seq, sub_first, n, payload, futures[offset : offset + n], 0)
                    self._next_seq += 1
                    self._records[rec.seq] = rec
                    self._queued.append(rec)
                    self._buffered_chunks += 1
                    self._buffered_bytes += rec.nbytes

    def _send_queued(self, socks: list[zmq.Socket[Any]]) -> None:
        window = self._settings.window
        links = self._links
        n = len(links)
        up = LinkState.UP
        while True:
            with self._cond:
                if not self._queued:
                    return
                # Strict round robin keeps queues even (the daskqueue behaviour: 100 chunks over 2
                # queues is 50 and 50): a full window on the next broker waits for its confirms.
                # But a broker that is down, or stalled (its window full and no confirm for
                # _STALLED), is passed over: one queue never holds up a pool's submissions.
                b = self._rr
                link = links[b]
                if link.state is not up or link.unconfirmed >= window:
                    if link.state is up and time.monotonic() - link.confirmed_at < _STALLED:
                        return  # full, and confirming: wait for it
                    for _ in range(n - 1):
                        b = (b + 1) % n
                        link = links[b]
                        if link.state is up and link.unconfirmed < window:
                            break
                    else:
                        return  # every broker is down or full: chunks wait (bounded) for room
                rec = self._queued.popleft()
                self._rr = (b + 1) % n
                link.unconfirmed += 1
                rec.broker = b
                if rec.rewrite:
                    self._rewrite(rec)
            payload = rec.payload
            assert payload is not None
            timing = rec.timing
            if timing is None:
                put = p.Put(rec.seq, rec.n, payload)
            else:
                put = p.Put(rec.seq, rec.n, payload, timing.not_before, timing.priority)
            if not try_send(socks[b], p.encode(put)):
                with self._cond:  # the broker cannot take it now: keep it first in line
                    link.unconfirmed -= 1
                    rec.broker = -1
                    self._queued.appendleft(rec)
                    self._rr = (b + 1) % n
                return

    def _rewrite(self, rec: _Record) -> None:
        """(``_cond`` held.) Put placeholders in place of the record's cancelled tasks before it is
        sent: they report TaskCancelled and never run."""
        assert rec.payload is not None and rec.cancelled is not None
        payload = cancel_in_chunk(rec.payload, self.payload_key, rec.cancelled)
        self._buffered_bytes += len(payload) - rec.nbytes
        rec.payload, rec.nbytes, rec.rewrite = payload, len(payload), False

    def _handle(self, link: _Link, frames: list[Any]) -> int | None:
        """Handle one message; return the chunk id to acknowledge if it carried results.

        A message that breaks anything is counted and dropped, and fails only its own tasks: the
        loop that carries every other message of the pool goes on.
        """
        if link.state is not LinkState.UP:
            if link.state is LinkState.DOWN:
                return None  # a late message from a broker declared lost
            if link.state is LinkState.UNREACHABLE:
                name = self._queue_names[link.index]
                logger.warning("%s: queue %s at %s answers now", self.driver_name, name, link.endpoint)
            self._set_state(link, LinkState.UP)  # the broker placed again answers: it takes work
        link.seen = time.monotonic()
        try:
            msg = p.decode(frames)
            if type(msg) is p.Results:
                return self._on_results(link, msg)
            if type(msg) is p.Confirm:
                self._on_confirm(link, msg)
            elif type(msg) is p.Heartbeat:
                pass
            elif type(msg) is p.QueueStatus:
                self._on_status(link, msg)
            elif type(msg) is p.Lost:
                self._on_lost(msg)
            elif type(msg) is p.Cancelled:
                self._on_cancelled(msg)
            elif type(msg) is p.Bye:
                logger.info("%s: queue %s is shutting down", self.driver_name, self._queue_names[link.index])
            else:
                raise ProtocolError(f"{type(msg).__name__} is not accepted by a driver")
        except Exception as e:
            self._bad += 1
            logger.warning("%s dropped a message from queue %s: %s", self.driver_name, self._queue_names[link.index], e)
        return None

    def _on_confirm(self, link: _Link, msg: p.Confirm) -> None:
        with self._cond:
            rec = self._records.get(msg.seq)
            if rec is None or rec.confirmed or rec.broker != link.index:
                raise ProtocolError(f"CONFIRM of unknown chunk {msg.seq}")
            link.unconfirmed -= 1
            link.confirmed_at = time.monotonic()
            self._buffered_chunks -= 1
            self._buffered_bytes -= rec.nbytes
            if msg.status is p.Status.STORED:
                rec.confirmed = True
                rec.payload = None
                rec.chunk_id = msg.chunk_id
                if rec.remaining <= 0:  # every task of it was cancelled meanwhile
                    del self._records[msg.seq]
            else:
                del self._records[msg.seq]
            self._cond.notify_all()
        if msg.status is not p.Status.STORED:
            detail = msg.detail.decode(errors="replace")
            name = self._queue_names[link.index]
            exc: ZdqError = (
                StorageFull(f"queue {name} is full; the chunk was not stored: {detail}")
                if msg.status is p.Status.FULL
                else ZdqError(f"queue {name} refused a chunk ({msg.status.name}): {detail}")
            )
            n = self._fail(rec, exc)
            with self._cond:
                self._completed += n
                self._failed += n

    def _on_results(self, link: _Link, msg: p.Results) -> int:
        broker = link.index
        try:
            base, values, errors = loads_results(msg.results, self.payload_key)
        except Exception as e:
            # Results that do not decode (forged, or an object that pickles but does not unpickle
            # here) fail their own tasks; the broker may forget the chunk: running it again would
            # give the same bytes.
            self._bad += 1
            logger.warning(
                "%s: results of chunk %d from queue %s do not decode: %r",
                self.driver_name, msg.chunk_id, self._queue_names[broker], e,
            )
            failure: BaseException | None = e
        else:
            failure = None
            n = len(values)
            if any(not isinstance(i, int) or not 0 <= i < n for i in errors):
                raise ProtocolError("results name an error outside the chunk")
        offset = 0
        with self._cond:
            rec = self._records.get(msg.seq) if msg.seq else None
            if rec is not None and not rec.confirmed and rec.broker == broker:
                # The broker held its CONFIRM back and the results came first: they confirm it.
                rec.confirmed = True
                rec.payload = None
                rec.chunk_id = msg.chunk_id
                link.unconfirmed -= 1
                link.confirmed_at = time.monotonic()
                self._buffered_chunks -= 1
                self._buffered_bytes -= rec.nbytes
                self._cond.notify_all()
            if failure is None:
                if rec is not None:
                    if base == UNKNOWN_BASE and n == rec.n:  # the chunk did not decode: all of it
                        base = rec.base
                    offset = base - rec.base
                    if not (0 <= offset and offset + n <= rec.n):
                        raise ProtocolError(f"results for tasks {base}..{base + n} are outside chunk {msg.seq}")
                    seen = rec.got[offset : offset + n]
                    if any(seen):
                        if all(seen) or not rec.cancelled:  # executed twice (a broker re-ran it): record once
                            self._duplicates += n
                            if rec.remaining <= 0 and rec.confirmed:
                                self._records.pop(rec.seq, None)
                            return msg.chunk_id
                        # Some of these tasks were cancelled (their placeholders report here):
                        # only the others are recorded.
                        self._settlements.append((rec, offset, base, msg.consumer, values, errors, bytes(seen)))
                        rec.got[offset : offset + n] = b"\1" * n
                        return msg.chunk_id
                    rec.got[offset : offset + n] = b"\1" * n
                elif msg.seq:
                    self._duplicates += n
                    return msg.chunk_id
        if failure is not None:
            if rec is not None:
                exc = SerializationError(
                    f"the results of {rec.n} tasks from queue {self._queue_names[broker]} cannot be unpickled "
                    f"in this process: {type(failure).__name__}: {failure}"
                )
                exc.__cause__ = failure
                self._settlements.append((rec, -1, 0, msg.consumer, [], {0: exc}, None))
            return msg.chunk_id
        self._settlements.append((rec, offset, base, msg.consumer, values, errors, None))
        return msg.chunk_id

    def _settle_all(self) -> None:
        """Hand the results received in this round to their futures (and ``results``)."""
        settlements, self._settlements = self._settlements, []
        for settlement in settlements:
            try:
                self._settle_results(*settlement)
            except Exception:  # never the loop: this chunk's futures are settled by fail_missing
                logger.exception("%s could not settle the results of a chunk", self.driver_name)
                rec = settlement[0]
                if rec is not None:
                    self._finish_record(rec, self._fail(rec, ZdqError("zdq could not settle this task's result")), 0)

    def _settle_results(
        self,
        rec: _Record | None,
        offset: int,
        base: int,
        consumer: bytes,
        values: list[Any],
        errors: dict[int, Any],
        seen: bytes | None = None,
    ) -> None:
        if offset < 0:  # the whole chunk's results did not decode: errors[0] is why
            assert rec is not None
            self._finish_record(rec, self._fail(rec, errors[0]), 0)
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
            self._failures.note(base, {i: info for i, info in errors.items() if i not in skipped} if skipped else errors)
            exceptions = {i: error_to_exception(info) for i, info in errors.items()}
        if rec is not None:
            if isinstance(rec.sink, BatchFuture):
                rec.sink._fill(rec.offset + offset, values, exceptions)
            elif rec.sink is not None:
                futures = rec.sink
                for i, value in enumerate(values):
                    _settle(futures[offset + i], value, exceptions.get(i))
        with self._cond:
            if self._keep_results:
                store = self._results[consumer]
                store.update(zip(range(base, base + n), values))
                for i, exc in exceptions.items():
                    store[base + i] = exc
            self._done_by[consumer] += n
            self._failed += failed
            if rec is None:
                self._foreign += n
            else:
                self._completed += n
                rec.remaining -= n
                if rec.remaining <= 0:
                    self._records.pop(rec.seq, None)
            self._cond.notify_all()

    def _fail(self, rec: _Record, exc: BaseException) -> int:
        """Fail the tasks of ``rec`` that have no outcome with ``exc``; keep ``exc`` as their value in
        ``results()`` too (under no consumer: none ran them). Return how many."""
        ids = rec.fail_missing(exc)
        if ids and self._keep_results:
            with self._cond:
                store = self._results[NO_CONSUMER]
                for tid in ids:
                    store[tid] = exc
        return len(ids)

    def _finish_record(self, rec: _Record, failed: int, done: int) -> None:
        with self._cond:
            self._completed += failed + done
            self._failed += failed
            if rec.remaining <= 0:
                self._records.pop(rec.seq, None)
            self._cond.notify_all()

    def _on_status(self, link: _Link, msg: p.QueueStatus) -> None:
        rerouted = self._rerouting.pop(msg.token, None)
        if rerouted is not None:
            self._rerouted(rerouted[0], rerouted[1], set(msg.missing))
            return
        broker = self._reconciling.pop(msg.token, None)
        with self._cond:
            self._last_counts[link.index] = (msg, time.monotonic())
            replies = self._statuses.get(msg.token) if broker is None else None
            if replies is not None:
                replies[link.index] = msg
                self._cond.notify_all()
        if broker is not None and msg.missing:
            self._lost_in_recovery(broker, set(msg.missing))

    def _lost_in_recovery(self, broker: int, missing: set[int]) -> None:
        """The recovered queue does not hold these chunks: acknowledged early (at most once), their
        results never came, and they are not stored any more."""
        with self._cond:
            lost = [r for seq, r in self._records.items() if seq in missing and r.broker == broker and r.confirmed]
            for rec in lost:
                del self._records[rec.seq]
        exc = TaskLost(
            f"queue {self._queue_names[broker]} was lost while this task ran; it had been acknowledged on "
            "receipt (early_ack, at most once), so it was not kept to run again"
        )
        n = sum(self._fail(rec, exc) for rec in lost)
        with self._cond:
            self._completed += n
            self._failed += n
            self._cond.notify_all()
        if n:
            logger.warning("%s: %d tasks acknowledged early were lost with queue %s", self.driver_name, n, self._queue_names[broker])

    def _on_lost(self, msg: p.Lost) -> None:
        with self._cond:
            rec = self._records.pop(msg.seq, None)
        if rec is not None:
            n = self._fail(
                rec,
                TaskLost(f"the consumer of chunk {msg.chunk_id} died after acknowledging it early (at most once)")
            )
            with self._cond:
                self._completed += n
                self._failed += n
                self._cond.notify_all()
