"""The driver: the client-side end of a QueuePool's data plane.

One I/O thread owns a DEALER per broker. Callers hand it work in two shapes: single tasks
(``submit``), which it coalesces into chunks on the fly, and prepared chunks (``batch_submit``),
pickled by the caller. Every chunk is kept until its broker confirms it; at most ``window``
unconfirmed chunks per broker are in flight, and callers block when that is full, so submitting
from a generator runs in flat memory. Results stream back as RESULTS messages and resolve futures
as they arrive.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import InvalidStateError
from typing import Any

import zmq

from zdq.config import PoolSettings
from zdq.errors import (
    BrokerLost,
    ClosedError,
    ProtocolError,
    StorageFull,
    SubmitTimeout,
    TaskLost,
    ZdqError,
    ZdqTimeoutError,
)
from zdq.futures import BatchFuture, TaskFuture
from zdq.serialization import PICKLED, error_to_exception, loads_results, pack_chunks
from zdq.stats import DriverStats
from zdq.transport import protocol as p
from zdq.transport.security import ClientKeys
from zdq.transport.sockets import BrokerLinks, Waker, new_identity, process_context, recv_ready, try_send

__all__ = ["Driver"]

logger = logging.getLogger(__name__)

#: Receipts for results (RACK) are batched: sent when this many are owed to a broker, or when the
#: oldest has waited this long. Until then the broker keeps those chunks, so a broker that restarts
#: in that window runs them again (at least once, as ever); one RACK per result would cost a
#: message and a broker round per chunk, which on a single-task round trip is a fifth of the work.
_RACK_BATCH = 256
_RACK_DELAY = 0.02


class _Record:
    """A chunk from submission to its last result."""

    __slots__ = ("seq", "broker", "base", "n", "payload", "sink", "offset", "remaining", "confirmed", "got")

    def __init__(self, seq: int, base: int, n: int, payload: bytes | None, sink: Any, offset: int) -> None:
        self.seq = seq
        self.broker = -1
        self.base = base
        self.n = n
        self.payload = payload  # kept until CONFIRM so it can be resent
        self.sink = sink  # list[TaskFuture] | BatchFuture | None
        self.offset = offset
        self.remaining = n
        self.confirmed = False
        self.got = bytearray(n)  # which tasks have a result: a task run twice is recorded once

    def fail(self, exc: BaseException) -> None:
        if isinstance(self.sink, BatchFuture):
            self.sink._fail(self.offset, self.n, exc)
        elif self.sink is not None:
            for fut in self.sink:
                _settle(fut, exc=exc)


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
    ) -> None:
        self.name = name
        self._keys = keys
        self.payload_key = payload_key
        self.identity = new_identity()
        self._endpoints = list(endpoints)
        self._settings = settings
        self._keep_results = keep_results
        self._cond = threading.Condition()
        self._loose: list[tuple[int, bytes, TaskFuture]] = []
        self._queued: deque[_Record] = deque()
        self._records: dict[int, _Record] = {}
        self._unconfirmed = [0] * len(endpoints)
        self._received_from = [0] * len(endpoints)
        self._broker_seen = [time.monotonic()] * len(endpoints)
        self._rr = 0
        self._next_task = 1
        self._next_seq = 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context[Any] | None = None
        self._waker: Waker | None = None
        self._error: BaseException | None = None
        self._control: deque[tuple[int, str]] = deque()  # broker reconnections, run by the I/O thread
        # Results received in this round of the I/O thread, handed to their futures before it sleeps.
        self._settlements: list[tuple[_Record | None, int, int, bytes, list[Any], dict[int, Any]]] = []
        self.results: defaultdict[bytes, dict[int, Any]] = defaultdict(dict)
        self.done_by: defaultdict[bytes, int] = defaultdict(int)
        self._submitted = 0
        self._completed = 0
        self._failed = 0
        self._foreign = 0
        self._duplicates = 0
        self._bad = 0

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._ctx = process_context()
        self._waker = Waker(self._ctx)
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=f"zdq-driver-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(10)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the I/O thread; futures still pending fail with :class:`ClosedError`. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._waker is not None:
            self._waker.wake()
        if self._thread is not None:
            self._thread.join(timeout)
        closed = ClosedError(f"queue pool {self.name} was closed before this task finished")
        with self._cond:
            loose, self._loose = self._loose, []
            records = list(self._queued) + list(self._records.values())
            self._queued.clear()
            self._records.clear()
            self._cond.notify_all()
        for _, _, fut in loose:
            _settle(fut, exc=closed)
        seen: set[int] = set()
        for rec in records:
            if id(rec) not in seen:
                seen.add(id(rec))
                rec.fail(closed)
        if self._waker is not None:
            self._waker.close()
            self._waker = None
        self._ctx = None  # the process's context: the I/O thread closed its sockets

    def _check_open(self) -> None:
        if self._stop.is_set():
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

    def submit_task(self, task: bytes, *, timeout: float | None = None) -> TaskFuture:
        """Queue one pickled task (:func:`~zdq.serialization.dumps_task`) for coalescing into a
        chunk; return its future."""
        self._check_open()
        cap = self._settings.chunk_size * self._settings.window
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._loose) >= cap:
                self._wait(deadline)
            tid = self._next_task
            self._next_task += 1
            fut = TaskFuture(tid)
            wake = not self._loose
            self._loose.append((tid, task, fut))
            self._submitted += 1
        if wake and self._waker is not None:
            self._waker.wake()
        return fut

    def submit_chunk(
        self, base: int, n: int, payload: bytes, sink: Any, offset: int, *, timeout: float | None = None
    ) -> None:
        """Queue a chunk pickled by the caller; block while the window is full."""
        self._check_open()
        cap = self._settings.window * len(self._endpoints)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._queued) + sum(self._unconfirmed) >= cap:
                self._wait(deadline)
            rec = _Record(self._next_seq, base, n, payload, sink, offset)
            self._next_seq += 1
            self._records[rec.seq] = rec
            self._queued.append(rec)
            self._submitted += n
        if self._waker is not None:
            self._waker.wake()

    def _wait(self, deadline: float | None) -> None:
        """Wait on the condition (held) for progress; raise on close or timeout."""
        self._check_open()
        if deadline is None:
            self._cond.wait(1.0)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SubmitTimeout("the submission window stayed full until the timeout")
            self._cond.wait(min(left, 1.0))
        self._check_open()

    def flush(self, timeout: float | None = None) -> None:
        """Block until every chunk submitted so far is confirmed by its broker."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._loose or self._queued or any(self._unconfirmed):
                try:
                    self._wait(deadline)
                except SubmitTimeout:
                    raise ZdqTimeoutError("chunks were still unconfirmed at the timeout") from None

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

    def broker_silence(self, broker: int) -> float:
        """Seconds since broker ``broker`` was last heard from."""
        return time.monotonic() - self._broker_seen[broker]

    def broker_lost(self, broker: int, *, memory_lost: bool) -> int:
        """A broker died. Its unconfirmed chunks will be resent to its replacement; if its tasks
        lived only in its memory, the confirmed ones fail now with :class:`BrokerLost`.
        Return how many tasks failed."""
        failed: list[_Record] = []
        with self._cond:
            for rec in list(self._records.values()):
                if rec.broker != broker:
                    continue
                if not rec.confirmed:
                    rec.broker = -1
                    self._queued.appendleft(rec)
                elif memory_lost:
                    del self._records[rec.seq]
                    failed.append(rec)
            self._unconfirmed[broker] = 0
            n = sum(r.remaining for r in failed)
            self._completed += n
            self._failed += n
            self._cond.notify_all()
        for rec in failed:
            rec.fail(BrokerLost(f"queue {broker} was lost with its worker; this task lived only in its memory"))
        return n

    def reconnect(self, broker: int, endpoint: str) -> None:
        """Point broker ``broker`` at a new endpoint (its replacement) and resend what is unconfirmed."""
        self._endpoints[broker] = endpoint
        self._control.append((broker, endpoint))
        if self._waker is not None:
            self._waker.wake()

    def received_from(self, broker: int) -> int:
        return self._received_from[broker]

    def statistics(self) -> DriverStats:
        with self._cond:
            return DriverStats(
                tasks_submitted=self._submitted,
                tasks_completed=self._completed,
                tasks_failed=self._failed,
                foreign_tasks=self._foreign,
                duplicate_results=self._duplicates,
                chunks_unconfirmed=len(self._queued) + sum(self._unconfirmed),
                chunks_outstanding=len(self._records),
                bad_messages=self._bad,
            )

    # -- I/O thread -----------------------------------------------------------------------------
    def _run(self, ready: threading.Event) -> None:
        assert self._ctx is not None and self._waker is not None
        hello = p.encode(p.Hello(p.Role.DRIVER, self.name.encode()[:256]))
        links = BrokerLinks(
            self._ctx, self.identity, hello, keys=self._keys, max_message_size=self._settings.max_message_size
        )
        try:
            for endpoint in self._endpoints:
                links.add(endpoint)
            ready.set()
            self._serve(links, self._waker)
        except BaseException as e:
            self._error = e
            logger.exception("driver of %s failed", self.name)
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
        # Receipts (RACK) owed to each broker, and when the oldest of them must go out.
        racks: list[list[int]] = [[] for _ in socks]
        rack_due = math.inf
        rack_full = False
        while not self._stop.is_set():
            while self._control:
                i, endpoint = self._control.popleft()
                links.replace(i, endpoint)
                racks[i].clear()  # the replacement does not know those chunks
                self._broker_seen[i] = time.monotonic()
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
                owed = racks[index]
                for frames in recv_ready(sock, 1):
                    chunk_id = self._handle(index, frames)
                    if chunk_id is not None:
                        if not owed and rack_due == math.inf:
                            rack_due = time.monotonic() + _RACK_DELAY
                        owed.append(chunk_id)
                        rack_full = rack_full or len(owed) >= _RACK_BATCH
            now = time.monotonic()
            if now >= rack_due or rack_full:
                self._send_racks(socks, racks)
                rack_due = math.inf
                rack_full = False
            if now >= next_beat:
                for sock in socks:
                    try_send(sock, p.encode(p.Heartbeat()))
                next_beat = now + beat
        self._settle_all()
        self._send_racks(socks, racks)

    @staticmethod
    def _send_racks(socks: list[zmq.Socket[Any]], racks: list[list[int]]) -> None:
        """Tell each broker which chunks' results arrived: it may forget them now."""
        for sock, owed in zip(socks, racks):
            if owed:
                try_send(sock, p.encode(p.Rack(tuple(owed))))
                owed.clear()

    def _coalesce(self) -> None:
        """Turn single submissions into chunks, spread over the brokers."""
        with self._cond:
            if not self._loose:
                return
            loose, self._loose = self._loose, []
            self._cond.notify_all()
        n_brokers = len(self._endpoints)
        size = self._settings.chunk_size
        if len(loose) < size * n_brokers:  # few tasks: one slice per broker, as evenly as possible
            size = max(1, -(-len(loose) // n_brokers))
        start = 0
        while start < len(loose):
            end = min(start + size, len(loose))
            # Task ids of a chunk must be consecutive; batches may have taken ids in between.
            first = loose[start][0]
            for j in range(start + 1, end):
                if loose[j][0] != first + (j - start):
                    end = j
                    break
            part = loose[start:end]
            futures = [fut for _, _, fut in part]
            tasks = [task for _, task, _ in part]
            try:
                packed = self._pack(first, tasks)
            except ZdqError:
                # One task of the slice is refused (too large): pack them one by one, so that only
                # the culprit fails.
                packed = []
                for j, task in enumerate(tasks):
                    try:
                        packed += self._pack(first + j, [task])
                    except ZdqError as e:
                        _settle(futures[j], exc=e)
            with self._cond:
                for sub_first, n, payload in packed:
                    offset = sub_first - first
                    rec = _Record(self._next_seq, sub_first, n, payload, futures[offset : offset + n], 0)
                    self._next_seq += 1
                    self._records[rec.seq] = rec
                    self._queued.append(rec)
            start = end

    def _pack(self, first: int, tasks: list[bytes]) -> list[tuple[int, int, bytes]]:
        return pack_chunks(
            first,
            tasks,
            self.payload_key,
            PICKLED,
            None,
            chunk_bytes=self._settings.chunk_bytes,
            max_bytes=self._settings.max_message_size,
        )

    def _send_queued(self, socks: list[zmq.Socket[Any]]) -> None:
        window = self._settings.window
        n = len(socks)
        while True:
            with self._cond:
                if not self._queued:
                    return
                # Strict round robin keeps queues even (the daskqueue behaviour: 100 chunks over
                # 2 queues is 50 and 50); a full window on the next broker waits for its confirms.
                b = self._rr
                if self._unconfirmed[b] >= window:
                    return
                rec = self._queued.popleft()
                self._rr = (b + 1) % n
                self._unconfirmed[b] += 1
            rec.broker = b
            if not try_send(socks[b], p.encode(p.Put(rec.seq, rec.n, rec.payload))):
                with self._cond:  # the broker cannot take it now: keep it first in line
                    self._unconfirmed[b] -= 1
                    rec.broker = -1
                    self._queued.appendleft(rec)
                    self._rr = b
                return

    def _handle(self, broker: int, frames: list[Any]) -> int | None:
        """Handle one message; return the chunk id to acknowledge if it carried results."""
        try:
            msg = p.decode(frames)
            if isinstance(msg, p.Results):
                self._on_results(broker, msg)
                return msg.chunk_id
            elif isinstance(msg, p.Confirm):
                self._on_confirm(broker, msg)
            elif isinstance(msg, p.Heartbeat):
                self._broker_seen[broker] = time.monotonic()
            elif isinstance(msg, p.Lost):
                self._on_lost(msg)
            elif isinstance(msg, p.Bye):
                logger.info("driver %s: broker %d is shutting down", self.name, broker)
            else:
                raise ProtocolError(f"{type(msg).__name__} is not accepted by a driver")
        except (ProtocolError, ValueError) as e:
            self._bad += 1
            logger.warning("driver %s dropped a message from broker %d: %s", self.name, broker, e)
        return None

    def _on_confirm(self, broker: int, msg: p.Confirm) -> None:
        with self._cond:
            rec = self._records.get(msg.seq)
            if rec is None or rec.confirmed or rec.broker != broker:
                raise ProtocolError(f"CONFIRM of unknown chunk {msg.seq}")
            self._unconfirmed[broker] -= 1
            if msg.status is p.Status.STORED:
                rec.confirmed = True
                rec.payload = None
            else:
                del self._records[msg.seq]
            self._cond.notify_all()
        if msg.status is not p.Status.STORED:
            detail = msg.detail.decode(errors="replace")
            exc: ZdqError = (
                StorageFull(f"queue {broker} is full; the chunk was not stored: {detail}")
                if msg.status is p.Status.FULL
                else ZdqError(f"queue {broker} refused a chunk ({msg.status.name}): {detail}")
            )
            rec.fail(exc)

    def _on_results(self, broker: int, msg: p.Results) -> None:
        base, values, errors = loads_results(msg.results, self.payload_key)
        n = len(values)
        if any(not isinstance(i, int) or not 0 <= i < n for i in errors):
            raise ValueError("results name an error outside the chunk")
        with self._cond:
            self._received_from[broker] += n
            rec = self._records.get(msg.seq) if msg.seq else None
            if rec is not None and not rec.confirmed and rec.broker == broker:
                # The broker held its CONFIRM back and the results came first: they confirm it.
                rec.confirmed = True
                rec.payload = None
                self._unconfirmed[broker] -= 1
                self._cond.notify_all()
            if rec is not None:
                offset = base - rec.base
                if not (0 <= offset and offset + n <= rec.n):
                    raise ValueError(f"results for tasks {base}..{base + n} are outside chunk {msg.seq}")
                if any(rec.got[offset : offset + n]):  # executed twice (a broker re-ran it): record once
                    self._duplicates += n
                    return
                rec.got[offset : offset + n] = b"\1" * n
            elif msg.seq:
                self._duplicates += n
                return
        self._settlements.append((rec, offset if rec is not None else 0, base, msg.consumer, values, errors))

    def _settle_all(self) -> None:
        """Hand the results received in this round to their futures (and ``results``)."""
        settlements, self._settlements = self._settlements, []
        for settlement in settlements:
            self._settle_results(*settlement)

    def _settle_results(
        self, rec: _Record | None, offset: int, base: int, consumer: bytes, values: list[Any], errors: dict[int, Any]
    ) -> None:
        n = len(values)
        exceptions = {i: error_to_exception(info) for i, info in errors.items()}
        if self._keep_results:
            store = self.results[consumer]
            store.update(zip(range(base, base + n), values))
            for i, exc in exceptions.items():
                store[base + i] = exc
        if rec is not None:
            if isinstance(rec.sink, BatchFuture):
                rec.sink._fill(rec.offset + offset, values, exceptions)
            elif rec.sink is not None:
                futures = rec.sink
                for i, value in enumerate(values):
                    _settle(futures[offset + i], value, exceptions.get(i))
        with self._cond:
            self.done_by[consumer] += n
            self._failed += len(errors)
            if rec is None:
                self._foreign += n
            else:
                self._completed += n
                rec.remaining -= n
                if rec.remaining <= 0:
                    self._records.pop(rec.seq, None)
            self._cond.notify_all()

    def _on_lost(self, msg: p.Lost) -> None:
        with self._cond:
            rec = self._records.pop(msg.seq, None)
            if rec is not None:
                self._completed += rec.remaining
                self._failed += rec.remaining
            self._cond.notify_all()
        if rec is not None:
            rec.fail(TaskLost(f"the consumer of chunk {msg.chunk_id} died after acknowledging it early"))
