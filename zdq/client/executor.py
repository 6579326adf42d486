"""``zdq.PoolExecutor``: a :class:`concurrent.futures.Executor` whose tasks run on a zdq pool's consumers.

It goes wherever an executor goes (``loop.run_in_executor``, ``concurrent.futures.wait`` and
``as_completed`` beside the standard library's futures, code written for ``ThreadPoolExecutor``),
with the standard contract: ``submit`` and ``map`` (Python 3.14's, ``buffersize`` included, and
the process pool's ``chunksize``), ``shutdown(wait, cancel_futures=)``, a context manager, and
the work already submitted runs before the program ends. ``queue_pool.executor()`` makes one on a
pool the caller keeps; :class:`zdq.Executor` (:mod:`zdq.client.local`) is the same executor on a
pool it may make itself. This module imports no pool: the pools import it.

Ownership
---------
==========================  =======================================================================
state                       owner
==========================  =======================================================================
``_pool``                   set by the constructor; closed by this executor only when it made it
                            (``_owns_pool``, set by :class:`zdq.Executor`), once, under
                            ``_close_lock``
``_shutdown``,              ``_state``: set by shutdown without waiting for a submission (one
``_cancelling``             blocked on a full window sees it, stops, and cancels what it queued);
                            a submission that ends after shutdown with ``cancel_futures`` cancels
                            its own futures, so none escapes the cancellation
``_submissions``            ``_state``: submissions in progress, waited for at the end of the work
                            (as ``ThreadPoolExecutor``'s lock makes shutdown wait for one)
``_inflight``               ``_state`` (a condition, never held while submitting: the callback
                            thread takes it): the futures not done yet, a map's slices' batch
                            futures too (futures only: a future holds no callable nor argument,
                            and its result is the caller's)
``_busy`` (module)          an executor with work in flight is held here, so that dropping it does
                            not take its pool (and the work) away; it leaves when its work is done
``_open`` (module)          every executor not closed, held weakly: the at-exit hook finishes them
==========================  =======================================================================
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, Self

from zdq.client.window import (
    ColumnReader,
    Columns,
    ResultWindow,
    Slice,
    cancel_many,
    cancel_slices,
    check_map_options,
    chunked,
    run_chunk,
)
from zdq.config import PoolSettings
from zdq.errors import ZdqError
from zdq.futures import SignalSafeCondition, TaskFuture, WaitHint, own
from zdq.transport.protocol import QueueStatus

__all__ = ["ExecutorPool", "PoolExecutor"]

logger = logging.getLogger(__name__)

#: How long the work may be unable to progress (no consumer running, queues down) before a wait
#: for it at shutdown or at exit gives up, saying why.
STALL_LIMIT = 60.0

#: An executor blocks: refused on an asynchronous client, and said what to use instead.
ASYNC_REFUSED = (
    "zdq.Executor is a concurrent.futures executor: it blocks, so it takes a synchronous Dask "
    "client; with Client(asynchronous=True), use the pool itself: `queue_pool = await "
    "zdq.QueuePool(client, n)`, then `await queue_pool.submit(fn, x)`, `await queue_pool.map(fn, xs)`"
)

#: A map's tasks in flight are cut in fourths, each spread over the consumers as a batch: with
#: ``buffersize``, the next slice is submitted while three fourths of the buffer still run.
_SLICES_IN_BUFFER = 4

_busy: dict[int, PoolExecutor] = {}
_open: weakref.WeakSet[PoolExecutor] = weakref.WeakSet()
_exiting = False


def _at_exit() -> None:
    """Run by the interpreter before it joins its threads (as ``ThreadPoolExecutor``'s hook is):
    the work submitted to every executor still open runs, then the pools they made are closed,
    while Dask's own threads still serve (its at-exit hooks run later)."""
    global _exiting
    _exiting = True
    for executor in list(_open):
        try:
            executor._finish(wait=True, reason="the program is ending")
        except Exception:  # one executor's failing pool does not keep the others' work from running
            logger.exception("zdq Executor: finishing %r at exit failed", executor)


# ``threading._register_atexit`` is what concurrent.futures uses for the same purpose: plain
# ``atexit`` hooks run after Dask's clients and clusters were already closed.
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_at_exit)
else:  # pragma: no cover - every CPython from 3.9 has it
    import atexit

    atexit.register(_at_exit)


class _Outstanding(Protocol):
    @property
    def outstanding(self) -> int: ...


class ExecutorPool(Protocol):
    """What an executor asks of its pool: a :class:`~zdq.QueuePool`'s submission, map, state and
    account of why it waits (the edge between the two, which lets this module import no pool)."""

    @property
    def name(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    @property
    def settings(self) -> PoolSettings: ...
    @property
    def driver(self) -> _Outstanding: ...
    @property
    def wait_hint(self) -> WaitHint: ...

    def submit_call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> TaskFuture: ...
    def map_slice(
        self,
        fn: Callable[..., Any],
        calls: list[tuple[Any, ...]] | Columns,
        chunk: int,
        *,
        first: int,
        timeout: float | None,
        check: Callable[[], None],
        per_task: int,
        plain: bool,
    ) -> Slice: ...
    def map_chunk_size(self, n_tasks: int | None) -> int: ...
    def consumer_count(self) -> int: ...
    def why_waiting(self) -> str: ...
    def queue_status(self, timeout: float = ...) -> list[QueueStatus | None]: ...
    def close(self) -> None: ...


class PoolExecutor(concurrent.futures.Executor):
    """A :class:`concurrent.futures.Executor` on a started zdq pool: its consumers run the tasks,
    and shutdown leaves the pool open. ``queue_pool.executor()`` makes one;
    :class:`zdq.Executor` is one that may make its pool too.

    Parameters
    ----------
    queue_pool : QueuePool
        A started, synchronous pool (an asynchronous client's pool is awaited directly).

    Examples
    --------
    >>> with queue_pool.executor() as executor:                              # doctest: +SKIP
    ...     print(list(executor.map(pow, range(5), range(5))))
    [1, 1, 4, 27, 256]
    """

    def __init__(self, queue_pool: ExecutorPool) -> None:
        if getattr(getattr(queue_pool, "client", None), "asynchronous", False) or getattr(
            queue_pool, "_asynchronous", False
        ):
            raise TypeError(ASYNC_REFUSED)
        if queue_pool.closed:
            raise RuntimeError(f"queue pool {queue_pool.name} is closed: an Executor needs an open one")
        self._state = SignalSafeCondition()
        self._close_lock = threading.Lock()
        self._shutdown = False
        self._cancelling = False
        self._submissions = 0
        self._closed = False
        self._inflight: set[concurrent.futures.Future[Any]] = set()
        ref = weakref.ref(self)

        def on_done(fut: concurrent.futures.Future[Any]) -> None:
            executor = ref()
            if executor is not None:
                executor._settled(fut)

        self._on_done = on_done
        self._pool = queue_pool
        self._owns_pool = False
        _open.add(self)

    @property
    def queue_pool(self) -> ExecutorPool:
        """The pool the tasks go to."""
        return self._pool

    # -- submitting -----------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Run ``fn(*args, **kwargs)`` on a consumer; return its future. Every keyword goes to
        ``fn`` (zdq's own task options are the pool's defaults). Blocks while the pool's
        submission window is full.

        Raises
        ------
        RuntimeError
            The executor was shut down, or the program is ending.
        SerializationError
            ``fn`` or an argument cannot be pickled; nothing was queued.
        """
        self._begin()
        fut = None
        try:
            fut = self._pool.submit_call(fn, args, kwargs)
        finally:
            self._end([] if fut is None else [fut])
        return fut

    def _submit_slice(
        self,
        fn: Callable[..., Any],
        calls: list[tuple[Any, ...]] | Columns,
        first: int,
        chunk: int,
        timeout: float | None,
        per_task: int = 1,
        plain: bool = False,
    ) -> Slice:
        """One slice of a map's calls ``(fn, *args)`` (or their :class:`Columns`) from its position ``first``, queued as one
        chunked batch (``queue_pool.map_slice``; ``plain``: no argument holds a future) within
        ``timeout``; a shutdown stops it while it waits for room (RuntimeError)."""
        self._begin()
        piece = None
        try:
            piece = self._pool.map_slice(
                fn, calls, chunk, first=first, timeout=timeout, check=self._check_open, per_task=per_task, plain=plain
            )
        finally:
            self._end([] if piece is None else piece.futures())
        return piece

    def _begin(self) -> None:
        """A submission starts (refused after shutdown): counted until :meth:`_end`."""
        with self._state:
            self._check_open()
            self._submissions += 1

    def _end(self, futures: list[concurrent.futures.Future[Any]]) -> None:
        """A submission ended with ``futures``: counted as work in flight until they are done, and
        cancelled at once if a shutdown with ``cancel_futures`` came meanwhile."""
        with self._state:
            self._submissions -= 1
            if futures and not self._inflight:
                _busy[id(self)] = self
            self._inflight.update(futures)
            cancel = self._cancelling
            self._state.notify_all()
        for fut in futures:
            fut.add_done_callback(own(self._on_done))
        if cancel:
            cancel_many(futures)

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    def _settled(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._state:
            self._inflight.discard(fut)
            if not self._inflight:
                _busy.pop(id(self), None)
                self._state.notify_all()

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """``fn`` over the iterables' items, as Python 3.14's ``Executor.map``: the results in
        order, ``timeout`` counted from this call (then ``TimeoutError``), a task's exception
        raised at its position, what is left cancelled when the iterator is closed or fails.

        ``buffersize``: at most that many tasks unfinished; the iterables are read as results are
        taken (at most ``buffersize`` and a slice ahead), so an endless generator is mapped in
        bounded memory (without it, every call is submitted now); the map holds its executor until
        it has read them all, or stops (a temporary executor, ``pool.executor().map(...)``, maps
        every item). ``chunksize``: that many calls per task, as the process pool's ``map`` (a
        call's error fails its chunk, and is raised at the chunk's first position).

        The calls are queued in slices of a fourth of what is in flight, each as one batch with
        one future, in chunks that spread it over the consumers as ``batch_submit`` spreads a
        batch; the results come chunk by chunk: a map costs about what ``batch_submit`` does, not
        a future per call. ``timeout`` bounds the submission too: a map blocked on a full
        submission window raises ``TimeoutError`` when it is spent (what it queued is cancelled),
        and stops with ``RuntimeError`` when the executor is shut down meanwhile.
        """
        check_map_options(chunksize, buffersize)
        start = time.monotonic()
        read = None
        calls: Iterable[tuple[Any, ...]] = ()
        task = fn
        if chunksize > 1:  # a task per chunk of calls, which run_chunk runs in order
            calls = ((run_chunk, fn, part) for part in chunked(zip(*iterables), chunksize))
            task = run_chunk
        elif callable(fn) and ColumnReader.fits(iterables):
            # The calls by the columns of their arguments, read as zip would read them: no
            # (fn, *args) tuple per call to make, to take apart and for the collector to walk.
            if buffersize is None:  # every call is submitted now: read them all, and spread them
                iterables = ColumnReader.read_all(iterables)
            read = ColumnReader(iterables)
        else:
            # The calls as batch_submit takes them, (task, *args), made by zip.
            calls = zip(itertools.repeat(fn), *iterables) if iterables else iter(())
        if buffersize is None and read is None:
            calls = list(calls)  # every call is submitted now: read them all, and spread them
        pool = self._pool
        if buffersize is None:
            # Every call now: in slices of a fourth (a chunk per consumer's prefetch at most),
            # each spread over the consumers as a batch of its size is.
            total = len(calls) if read is None else min(map(len, iterables))  # type: ignore[arg-type]
            size = self._slice_size(total)
            chunk = pool.map_chunk_size(size)
        else:
            chunk, size = self._buffered_slices(buffersize)
        plain = all(type(it) is range for it in iterables)  # ints only: no future among them to look for
        # The map holds its executor while it reads its iterables (the window lets go of this at
        # their end, or when the map stops): `for r in pool.executor().map(f, xs, buffersize=8)`
        # maps every item. Held weakly, as 3.14's does, the executor was collected at a refill
        # that found no task in flight, and the map stopped there (reviewer 20).
        executor = self

        def submit(part: list[tuple[Any, ...]] | Columns, first: int, left: float | None) -> Slice:  # calls (task, *args)
            return executor._submit_slice(task, part, first, chunk, left, chunksize, plain)

        window = ResultWindow(
            submit, calls, buffersize, timeout, cancel_slices, slice_size=size, started=start,
            hint=self._pool.wait_hint, per_result=chunksize, read=read,
        )
        return iter(window) if chunksize == 1 else _flatten(iter(window))

    def _buffered_slices(self, buffersize: int) -> tuple[int, int]:
        """Tasks per chunk, and calls per slice, of a map with ``buffersize``: a fourth of the
        buffer spread over the consumers as a batch of as many is, in slices of a fourth of the
        buffer (one submitted each time a slice's results were taken), but never so large that
        the tasks still in flight while a slice refills fall short of every consumer's prefetch:
        a slice is then one chunk, refilled result by result as 3.14's map refills.

        A slice of one chunk (a submission, a PUT, a wake of the broker and of a consumer each)
        ran the no-op map at 0.84 of the rate of a fourth of the buffer, the driver spending a
        fourth more CPU (benchmarks/RESULTS.md, issue 26's eighteenth session); with a buffer
        about the consumers' own size, a fourth of it out of flight is a fourth of them idle."""
        pool = self._pool
        fourth = max(1, buffersize // _SLICES_IN_BUFFER)
        chunk = pool.map_chunk_size(fourth)
        return chunk, max(chunk, min(fourth, buffersize - self._held(chunk)))

    def _slice_size(self, n: int) -> int:
        """Calls per slice of a map of ``n`` calls submitted at once: a fourth of them, so that
        the consumers share each slice, and at most a chunk per consumer's prefetch, so that the
        slices pickled ahead of the window hold little."""
        return max(1, min(-(-n // _SLICES_IN_BUFFER), self._held(self._pool.map_chunk_size(None))))

    def _held(self, chunk: int) -> int:
        """Tasks the consumers hold at most in chunks of ``chunk``: each its prefetch's worth."""
        pool = self._pool
        return chunk * max(1, pool.consumer_count()) * pool.settings.prefetch

    # -- ending ---------------------------------------------------------------------------------
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more work. ``cancel_futures``: the tasks that have not started are cancelled
        (the others finish). ``wait``: return once the work is done and, if this executor made
        its pool, the pool (and its cluster) is closed; without it, return at once, whatever a
        submission is doing (the cancellations are sent from a thread of their own, which then
        closes the pool when the work is done; the program does not end before that). A
        submission blocked on a full window (a map's) stops with RuntimeError, its tasks
        cancelled.

        Whether a task has started is its queue's to say: the futures of the tasks that had not
        read cancelled once their queues answered (with ``wait``, when this returns; without it,
        a round trip later, from the thread that then closes the pool made here), and a task that
        had started runs to its end, its future given its result. None reads cancelled for a task
        that ran (reviewer 27a: they did, without ``wait``, when they were marked before asking).
        """
        with self._state:  # not waiting for a submission: one blocked on a full window sees this and stops
            self._shutdown = True
            self._cancelling = self._cancelling or cancel_futures
            pending = list(self._inflight)
        if wait:
            if cancel_futures:
                cancel_many(pending)
            self._finish(wait=True, reason="shutdown(wait=True)")
        elif not self._closed:
            # Not a daemon: the program ends once the work is done, and the pool closed. The
            # queues are asked from there (their answers are bounded, but a silent queue's is long).
            ask = functools.partial(cancel_many, pending) if cancel_futures else _nothing
            threading.Thread(target=self._finish_later, args=(ask,), name="zdq-executor-shutdown").start()
        elif cancel_futures:
            cancel_many(pending)

    def _finish_later(self, cancel: Callable[[], None]) -> None:
        """``shutdown(wait=False)``'s thread: ask the queues to cancel (``cancel()``), then finish."""
        cancel()
        self._finish(wait=True, reason="shutdown(wait=False)")

    def _finish(self, *, wait: bool, reason: str) -> None:
        """Wait for the work in flight (as long as it can progress), then close the pool made."""
        with self._state:
            self._shutdown = True
        if wait:
            self._wait_for_work(reason)
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            _open.discard(self)
            if self._owns_pool:
                self._pool.close()

    def _wait_for_work(self, reason: str) -> None:
        """Wait until every task submitted here is done. A task that runs is waited for however
        long it takes (as ``ThreadPoolExecutor`` does); work that cannot progress for
        :data:`STALL_LIMIT` seconds (none of it finishes, the pool says why it waits, and its
        queues run nothing) is given up on, with a warning saying why (the pool made here is then
        closed: its pending futures fail)."""
        stalled_since: float | None = None
        left: int | None = None
        while True:
            running = self._started_tasks()
            with self._state:
                if self._inflight or self._submissions or running:
                    self._state.wait(1.0)  # started tasks do not notify: looked at again within a second
                n = len(self._inflight) + self._submissions + running
            if n == 0:
                return
            if left is None or n < left:
                left, stalled_since = n, None  # some finished: progress
                continue
            why = self._why_stuck()  # asks the queues: not under the lock the callbacks take
            if not why:
                stalled_since = None
                continue
            now = time.monotonic()
            stalled_since = now if stalled_since is None else stalled_since
            if now - stalled_since >= STALL_LIMIT:
                logger.warning(
                    "zdq Executor (%s): %d tasks cannot finish: %s; not waiting for them any longer", reason, n, why
                )
                return

    def _started_tasks(self) -> int:
        """Tasks of the pool this executor made that have no outcome yet: after a
        ``shutdown(cancel_futures=True)`` without wait, those that had started run on although
        their futures read cancelled, and the pool is closed only once they ended. 0 for a pool
        given (others may use it: its tasks are not this executor's to wait for)."""
        if not self._owns_pool or self._pool.closed:
            return 0
        try:
            return int(self._pool.driver.outstanding)
        except ZdqError:  # closed meanwhile
            return 0

    def _why_stuck(self) -> str:
        """Why the work cannot progress, or "" if it may: the pool's own account of why results
        wait, unless its queues have tasks running (consumers of another process, say)."""
        pool = self._pool
        if pool.closed:
            return "its queue pool is closed"
        why: str = pool.why_waiting()
        if not why:
            return ""
        try:
            statuses = pool.queue_status(timeout=2.0)
        except ZdqError as e:
            return f"{why} ({e})"
        return "" if any(s is not None and s.leased_tasks for s in statuses) else why

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "shut down" if self._shutdown else "running"
        owner = "its own pool" if self._owns_pool else "the pool"
        return f"<zdq.{type(self).__name__} on {owner} {self._pool.name}: {state}, {len(self._inflight)} tasks in flight>"


def _nothing() -> None:
    """No cancellation to ask for (a shutdown without ``cancel_futures``)."""


def _flatten(chunks: Iterator[list[Any]]) -> Iterator[Any]:
    """A chunked map's results, one by one (the chunk iterator closed with this one)."""
    try:
        for chunk in chunks:
            yield from chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
