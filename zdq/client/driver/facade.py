"""The driver: the client-side end of a QueuePool's data plane (the facade over its three parts).

One I/O thread owns a DEALER per broker. Callers hand it work in two shapes: single tasks
(``submit_task``), which it coalesces into chunks on the fly (cut where :mod:`zdq.chunking` says),
and prepared chunks (``submit_chunk``), pickled by the caller. Every chunk is kept until its broker
confirms it, and its tasks until their results arrive. Results stream back as RESULTS messages and
resolve futures as they arrive.

The work is split three ways:

- :mod:`.ledger`: the accounting, no I/O (records, buffers and bounds, outcomes, counters), under
  one lock;
- :mod:`.links`: each broker's state, window and receipts, the I/O thread's alone, published to
  the other threads as a snapshot;
- :mod:`.loop`: the I/O thread; other threads' requests to it are commands that return futures.

Who owns what
-------------
=================================  ==================================================================
state                              owner
=================================  ==================================================================
the ledger                         its lock (callers add work and read counters; the I/O thread
                                   takes work and records outcomes)
the links, sockets, pending        the I/O thread; this facade reads the links' published snapshot
requests                           (``links.views``) and asks the rest through ``loop.post``
futures' done-callbacks            run on the driver's callback threads (the user's, zdq's own), never on the I/O thread
=================================  ==================================================================

Bounds: at most ``window`` unconfirmed chunks per broker; at most ``window`` × brokers chunks
waiting or unconfirmed in all, ``chunk-size`` × brokers loose tasks, and ``buffer-bytes`` of
pickled work held by the driver. A caller that would pass one blocks (``timeout=`` turns the wait
into :class:`~zdq.errors.SubmitTimeout`), so submitting from a generator runs in flat memory and a
stalled broker makes submitters wait instead of filling memory.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from zdq.config import PoolSettings
from zdq.errors import ClosedError
from zdq.futures import CallbackRunner, TaskFuture
from zdq.names import driver_name, queue_name
from zdq.reporting import FailureLog
from zdq.stats import DriverStats, QueueState
from zdq.codec.chunking import Packed
from zdq.codec.tasks import PICKLED
from zdq.codec.timing import Timing
from zdq.transport import protocol as p
from zdq.transport.security import ClientKeys
from zdq.transport.sockets import Route, Waker, new_identity, process_context

from .ledger import Ledger
from .links import Links, LinkState, explain_full, names_down
from .loop import DriverLoop, wait_all
from .requests import StatusAsk

__all__ = ["Driver"]

logger = logging.getLogger(__name__)

#: How long ``cancel()`` waits, by default, for the queues to say what has started: a healthy
#: queue answers in a round trip; one stopped or cut off makes its tasks count as started.
_CANCEL_WAIT = 5.0

#: How long a request to the I/O thread may take beyond its own deadline before the caller gives
#: up on it (the thread answers within a round: only a thread stuck or gone takes longer).
_GRACE = 5.0


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
        #: The name this driver announces to the brokers (their statistics show it, not the
        #: driver's identity bytes): unique to this driver, for a pool may have several producers.
        self.driver_name = driver_name(name)
        self.payload_key = payload_key
        self.identity = identity or new_identity()
        self._queue_names = queue_names or [queue_name(name, i) for i in range(len(endpoints))]
        self._settings = settings
        failures = FailureLog(name)
        self._ledger = Ledger(
            name, self._queue_names, settings,
            keep_results=keep_results, payload_key=payload_key, hint=hint, owner=self, failures=failures,
        )
        self._outcomes = self._ledger.outcomes
        self._links = Links(endpoints, workers or [""] * len(endpoints), time.monotonic())
        self._callbacks = CallbackRunner(name)
        self._loop = DriverLoop(
            self._ledger, self._links, settings,
            name=name, driver_name=self.driver_name, queue_names=self._queue_names, identity=self.identity,
            keys=keys, route=route, callbacks=self._callbacks,
        )
        self._ledger.explain = self._explain_full
        self._waker: Waker | None = None
        self._started = False

    @property
    def consumers(self) -> int:
        """Consumers serving this pool (set by the pool): single tasks are cut so all get some."""
        return self._loop.consumers

    @consumers.setter
    def consumers(self, n: int) -> None:
        self._loop.consumers = n

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the I/O thread (and the callback thread); idempotent. Raises :class:`ZdqError`
        if the thread cannot open its sockets."""
        if self._started:
            return
        self._started = True
        ctx = process_context()
        self._waker = Waker(ctx, eventfd=True)
        self._ledger.wake = self._waker.wake
        self._callbacks.start()
        self._loop.start(ctx, self._waker)

    def close(self, timeout: float = 10.0, *, reason: BaseException | None = None) -> int:
        """Stop the I/O thread; futures still pending fail with ``reason`` (default
        :class:`ClosedError`). Idempotent. Return how many tasks failed so (0 once closed)."""
        exc = reason or ClosedError(f"queue pool {self.name} was closed before this task finished")
        if not self._ledger.close(exc):
            return 0
        self._loop.stop(timeout)
        with self._callbacks.adopted():  # their callbacks go to the callback threads, still running
            failed = self._outcomes.fail_everything(exc)
        waker, self._waker = self._waker, None
        if waker is not None:
            self._ledger.wake = None
            waker.close()
        self._callbacks.stop(timeout)
        return failed

    @property
    def stopped(self) -> bool:
        """Whether the driver takes no more work (closed, or stopped by :meth:`fail_all`)."""
        return self._ledger.closed_by is not None

    def fail_all(self, exc: BaseException) -> int:
        """Stop taking work and fail every pending future with ``exc`` (the cluster was reset, or
        the pool's client closed). Return how many tasks failed (0: none was pending)."""
        return self.close(reason=exc)

    # -- submission -----------------------------------------------------------------------------
    def reserve(self, n: int) -> int:
        """Reserve ``n`` consecutive task ids; return the first."""
        return self._ledger.reserve(n)

    def submit_task(self, task: bytes, *, timeout: float | None = None) -> TaskFuture:
        """Queue one pickled task (:func:`~zdq.tasks.dumps_task`) for coalescing into a
        chunk; return its future. Blocks while the driver's buffers are full."""
        return self._ledger.submit_task(task, timeout)

    def new_future(self, tid: int) -> TaskFuture:
        """A future for the reserved task id ``tid``, knowing this driver (to cancel) and the hint."""
        return self._ledger.new_future(tid)

    def submit_timed(self, task: bytes, timing: Timing, *, timeout: float | None = None) -> TaskFuture:
        """Queue one pickled task with a release time or priority, as a chunk of its own: loose
        tasks are coalesced into plain chunks, and the broker orders chunks, not tasks."""
        ledger = self._ledger
        ledger.check_open()
        tid = ledger.reserve(1)
        [(first, n, payload)] = ledger.chunking.pack(tid, [task], self.payload_key, PICKLED, None)  # too large: raises
        fut = ledger.new_future(tid)
        ledger.submit_chunk(first, n, payload, [fut], 0, timeout, timing)
        return fut

    def set_chunk_size(self, n: int) -> None:
        """Cut chunks of at most ``n`` tasks from now on (see :meth:`Ledger.set_chunk_size`)."""
        self._ledger.set_chunk_size(n)

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
        self._ledger.submit_chunk(base, n, payload, sink, offset, timeout, timing)

    def submit_chunks(
        self,
        chunks: Sequence[Packed],
        start: int,
        sink: Any,
        base: int,
        *,
        timeout: float | None = None,
        timing: Timing | None = None,
    ) -> int:
        """Queue ``chunks[start:]`` (a batch's, pickled by the caller; ``sink`` offsets counted
        from task ``base``) as far as the buffers have room, after waiting for room for one; return
        the index after the last queued (see :meth:`Ledger.submit_chunks`)."""
        return self._ledger.submit_chunks(chunks, start, sink, base, timeout, timing)

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
        cancelled, asks = self._outcomes.cancel_local(first, n)
        if not asks:
            return cancelled
        loop = self._loop
        futures = [loop.post(functools.partial(loop.ask_cancel, rec, indexes)) for rec, indexes in asks]
        answers, late = wait_all(futures, timeout)
        for ids in answers:
            cancelled.update(ids)
        if late:
            queues = sorted({self._queue_names[rec.broker] for rec, _ in asks if rec.broker >= 0})
            logger.warning(
                "%s: queue %s did not answer a cancellation within %.1fs; its tasks count as started "
                "(they are cancelled still if the answer comes later)",
                self.driver_name, ", ".join(queues) or "?", timeout,
            )
        return cancelled

    def flush(self, timeout: float | None = None) -> None:
        """Block until every chunk submitted so far is confirmed by its broker."""
        self._ledger.flush(timeout)

    def wait_results(self, timeout: float | None = None) -> bool:
        """Block until every task submitted so far has its result; False on timeout."""
        return self._ledger.wait_results(timeout)

    # -- what callers read ----------------------------------------------------------------------
    @property
    def outstanding(self) -> int:
        """Tasks submitted whose results have not all arrived."""
        return self._ledger.outstanding

    @property
    def completed(self) -> int:
        """Tasks with a result (own and foreign)."""
        return self._outcomes.completed + self._outcomes.foreign

    @property
    def unsent(self) -> int:
        """Tasks submitted that no queue has been handed yet (coalescing, or waiting for room)."""
        return self._ledger.unsent

    def results_for(self, producers: Iterable[bytes], into: dict[int, Any] | None = None) -> dict[int, Any]:
        """The results kept from these consumers (by identity), by task id, written into ``into``
        when given, else a dict of the caller's own (see :meth:`Outcomes.results_for`)."""
        return self._outcomes.results_for(producers, into)

    def start_folding(self) -> None:
        """A reader of the kept results showed up: keep them folded by task id from now on (see
        :mod:`~zdq.client.driver.outcomes`)."""
        self._outcomes.start_folding()

    def done_count(self, producers: Iterable[bytes]) -> int:
        """Tasks whose results came from these consumers."""
        return self._outcomes.done_count(producers)

    def producers(self) -> set[bytes]:
        """Every consumer identity that results came from."""
        return self._outcomes.producers()

    def brokers_holding(self, first: int, n: int) -> set[int]:
        """The brokers holding tasks ``first .. first + n - 1`` still without an outcome."""
        return self._ledger.brokers_holding(first, n)

    def awaiting(self) -> list[int]:
        """This driver's tasks awaiting results, by broker (walks the chunks in flight: not for a
        per-task path)."""
        return self._ledger.awaiting()

    def links_up(self) -> list[bool]:
        """Which brokers the driver can reach now (the I/O thread's published snapshot)."""
        return [view.state is LinkState.UP for view in self._links.views]

    @property
    def heartbeat_timeout(self) -> float:
        """Seconds of silence after which a peer is taken as gone (the pool's setting)."""
        return self._settings.heartbeat_timeout

    def io_stall(self, since: float = -math.inf) -> tuple[float, str] | None:
        """``(seconds, stack)`` when this driver's I/O thread has not come round its loop for
        twice the heartbeat timeout (it ticks every heartbeat interval, however idle), counted
        from ``since`` at the earliest (monotonic: when the watching thread resumed after a stop
        of its own); every task and result of the pool waits for it. ``None`` otherwise."""
        now = time.monotonic()
        stalled = min(self._loop.stalled_for(now), now - since)
        if stalled <= 2 * self._settings.heartbeat_timeout:
            return None
        return stalled, self._loop.where()

    def broker_silence(self, broker: int) -> float:
        """Seconds broker ``broker`` had not been heard from at the I/O thread's last heartbeat
        tick (at most a heartbeat interval less than the truth). A time the I/O thread did not run
        is not the broker's silence: it is not counted (see :mod:`~zdq.client.driver.links`)."""
        return self._links.views[broker].silence

    def queue_states(self) -> list[QueueState]:
        """What this driver knows of each queue, asking none: its link's state, its tasks there
        awaiting results, and the queue's last count. Cheap, and never blocks on a broker (reprs
        use it); walks the chunks in flight, so it is not for a per-task path."""
        now = time.monotonic()
        awaiting = self._ledger.awaiting()
        views = self._links.views
        counts = list(self._loop.last_counts)
        out = []
        for i, (name, view, last) in enumerate(zip(self._queue_names, views, counts)):
            pending = None if last is None else last[0].ready_tasks + last[0].leased_tasks
            ago = None if last is None else now - last[1]
            out.append(QueueState(name, view.state.value, awaiting[i], pending, ago))
        return out

    def statistics(self) -> DriverStats:
        """The driver's counters, read in one step, and the queues its links see down."""
        submitted, completed, failed, cancelled, foreign, duplicates, unconfirmed, outstanding = self._outcomes.statistics()
        views = self._links.views
        down = names_down(views, self._queue_names)
        return DriverStats(
            tasks_submitted=submitted,
            tasks_completed=completed,
            tasks_failed=failed,
            tasks_cancelled=cancelled,
            foreign_tasks=foreign,
            duplicate_results=duplicates,
            chunks_unconfirmed=unconfirmed,
            chunks_outstanding=outstanding,
            bad_messages=self._outcomes.bad,
            links_down=len(down),
            name=self.driver_name,
            queues_down=tuple(down),
        )

    def _explain_full(self) -> str:
        return explain_full(self._links.views, self._queue_names, self._settings.window, time.monotonic())

    # -- requests to the I/O thread -------------------------------------------------------------
    def unreached(self, deadline: float) -> dict[int, str]:
        """Wait until every broker has answered since its link was made, or ``deadline``
        (monotonic); return why each broker that did not is silent, by index.

        The answer is the broker's reply to our HELLO: the data plane itself, no actor call.
        """
        if self.stopped:
            return {}
        loop = self._loop
        fut = loop.post(functools.partial(loop.wait_heard, deadline))
        try:
            return fut.result(max(0.0, deadline - time.monotonic()) + _GRACE)
        except ClosedError:
            return {}
        except concurrent.futures.TimeoutError:
            silent = [i for i, view in enumerate(self._links.views) if not view.heard]
            return {i: "no answer" for i in silent}

    def queue_status(
        self, timeout: float = 10.0, only: int | None = None, *, consumers: bool = False
    ) -> list[p.QueueStatus | None]:
        """Each broker's counts, asked over the data plane (no Dask actor call); ``only``: wait for
        that broker's answer alone (another, stalled, does not hold it up); ``consumers``: each
        answer also tells the consumers its broker hears (``QueueStatus.consumer_digests``).

        A reply also says that every result the broker routed here before it has arrived (one
        socket keeps order). ``None`` for a broker that is down or did not answer in time.
        """
        self._ledger.check_open()
        ask = StatusAsk([None] * len(self._queue_names), only, time.monotonic() + timeout, consumers=consumers)
        fut = self._loop.post(functools.partial(self._loop.ask_status, ask))
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            # What came in time (a copy: the I/O thread writes whole slots); it drops the ask at
            # its deadline.
            return list(ask.replies)
        except ClosedError:
            self._ledger.check_open()
            raise

    def broker_lost(self, broker: int, *, memory_lost: bool) -> None:
        """A broker died. Its unconfirmed chunks go to the other brokers (or its replacement); if
        its tasks lived only in its memory, its confirmed chunks fail with :class:`BrokerLost`."""
        self._loop.call(functools.partial(self._loop.broker_lost, broker, memory_lost))

    def reconnect(self, broker: int, endpoint: str, worker: str = "") -> None:
        """Broker ``broker`` was placed again at ``endpoint`` (on ``worker``): connect there, resend
        what it never confirmed, and ask it which confirmed chunks it does not hold (they fail with
        TaskLost). If it does not answer within ``connect-timeout``, the tasks it holds fail with
        :class:`~zdq.errors.BrokerUnreachable`."""
        self._loop.call(functools.partial(self._loop.reconnect, broker, endpoint, worker))

    def reroute(self, broker: int) -> None:
        """The path to broker ``broker`` changed (a new relay), not the broker: connect again and
        ask it which of the chunks it never confirmed to us it holds. Those it holds count as
        confirmed (their receipts were lost on the old path; their results come), the others
        are sent again; the broker sends again the results it sent on the old path. Unlike
        :meth:`reconnect`, a broker silent meanwhile fails nothing (it is alive, maybe busy)."""
        self._loop.call(functools.partial(self._loop.reroute, broker))

    def fail_chunks_of(self, broker: int, exc: BaseException) -> None:
        """Fail every task confirmed by ``broker`` that has no result yet (its queue is gone for good)."""
        self._loop.call(functools.partial(self._loop.fail_confirmed, broker, exc))

    def __repr__(self) -> str:
        return f"<Driver {self.driver_name} {'stopped' if self.stopped else 'running'}>"

