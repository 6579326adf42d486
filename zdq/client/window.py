"""``Executor.map``'s ordering and bounding, written against slices of calls (no pool, no thread).

:class:`ResultWindow` is the whole of Python 3.14's ``Executor.map`` contract: the first tasks
are submitted at the call (all of them, or the first ``buffersize``), results come in order,
``timeout`` counts from the call (and bounds each submission), a task's exception is raised at
its position (after the results before it), and what is left is cancelled when the iterator is
closed, fails or times out (but for a close, the error is raised without waiting for the queues'
answers to the cancellation: a silent queue does not double a timeout). The calls are submitted in slices of consecutive calls (:class:`Slice`), so that a map costs
per slice what ``batch_submit`` costs per batch, not a future and a hand-off per call: with
``buffersize``, one more slice is read and submitted each time a slice's results are taken, so at
most ``buffersize`` tasks are unfinished and an endless iterable is mapped in bounded memory.

A slice is a :class:`MapBatch` (one chunked batch, whose outcomes are taken by position as they
arrive) or a :class:`FutureSlice` (a future per call: calls whose arguments hold futures, and the
unit tests' own futures). Helpers for chunked maps (the process pool's ``chunksize``) and for
cancelling many zdq futures in a few round trips live here too: they are as pure.

Ownership
---------
A window belongs to the thread iterating over it (as a generator does); nothing in it is shared
but its slices' outcomes, which the driver's I/O thread writes (see :class:`MapBatch`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from concurrent.futures import _base
from typing import Any, Protocol

from zdq.compiled import compiled
from zdq.errors import SerializationError, TaskCancelled, ZdqError, ZdqTimeoutError
from zdq.futures import BatchFuture, SignalSafeCondition, TaskFuture, _io_thread, run_inline, wait_seconds

#: ``zdq._untracked`` (see :class:`MapChunk`), or None where it was not built: the futures are then
#: made in Python, tracked.
_untracked = compiled("_untracked")
_slotted: Callable[..., list[Any]] | None = None if _untracked is None else _untracked.slotted
#: Hands an object back to the collector (nothing to do when every future is tracked already).
_track: Callable[[object], object] = id if _untracked is None else _untracked.track

__all__ = [
    "ColumnReader", "Columns", "FutureSlice", "MapBatch", "MapChunk", "MapFuture", "ResultWindow", "Slice", "cancel_many", "cancel_slices", "check_map_options", "chunked",
    "key_runs", "map_futures", "run_chunk", "span_runs",
]

logger = logging.getLogger(__name__)


def check_map_options(chunksize: int, buffersize: int | None) -> None:
    """The checks of Python 3.14's ``Executor.map`` (and the process pool's ``chunksize``)."""
    if not isinstance(chunksize, int) or isinstance(chunksize, bool):
        raise TypeError(f"chunksize must be an integer, got {chunksize!r:.80}")
    if chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    if buffersize is not None and (not isinstance(buffersize, int) or isinstance(buffersize, bool)):
        raise TypeError("buffersize must be an integer or None")
    if buffersize is not None and buffersize < 1:
        raise ValueError("buffersize must be None or > 0")


def run_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    """One task of a chunked map, run by a consumer: ``fn`` over the chunk's argument tuples,
    stopping at the first error (which fails the task), as the process pool's chunks do."""
    return [fn(*args) for args in chunk]


def chunked(calls: Iterable[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    """``calls`` in lists of ``size`` (the last one shorter), read lazily."""
    it = iter(calls)
    while part := list(itertools.islice(it, size)):
        yield part


class Columns:
    """Consecutive calls of a map of one function given by the columns of their arguments (a
    list per argument, ``n`` items each): no ``(fn, *args)`` tuple per call, which the pool packs
    by columns as they are (see :class:`ColumnReader`). Its length is its calls'."""

    __slots__ = ("columns", "n")

    def __init__(self, columns: list[list[Any]], n: int) -> None:
        self.columns = columns
        self.n = n

    def __len__(self) -> int:
        return self.n

    def calls(self, fn: Any) -> list[tuple[Any, ...]]:
        """The calls as tuples ``(fn, *args)`` (for what takes them one by one)."""
        return list(zip(itertools.repeat(fn, self.n), *self.columns))


class ColumnReader:
    """Reads a map's iterables by columns, ``size`` items of each at a time (``read(size)``,
    a :class:`Columns`; empty at their end), as ``zip`` would read them: used only where reading
    column by column reads what ``zip`` reads (:meth:`fits`), so that the map's semantics stay.

    It belongs to the thread that iterates the map (as the window does)."""

    __slots__ = ("_its",)

    #: The iterables read ahead of the shortest one without anything to see: a list, tuple or
    #: range read past the end of another iterable has no side effect.
    _SLICEABLE = frozenset({list, tuple, range})

    def __init__(self, iterables: Iterable[Iterable[Any]]) -> None:
        self._its = [iter(it) for it in iterables]

    @classmethod
    def fits(cls, iterables: tuple[Iterable[Any], ...]) -> bool:
        """Whether reading ``iterables`` by columns reads what ``zip`` reads: one iterable (any),
        or several lists, tuples or ranges (``zip`` stops at the shortest; a column read past
        it reads only items without side effects, which are dropped)."""
        return len(iterables) == 1 or (bool(iterables) and all(type(it) in cls._SLICEABLE for it in iterables))

    @classmethod
    def read_all(cls, iterables: tuple[Iterable[Any], ...]) -> tuple[Iterable[Any], ...]:
        """``iterables`` with those that are not lists, tuples or ranges read into lists (a map
        without ``buffersize`` submits every call at once, and needs its length)."""
        return tuple(it if type(it) in cls._SLICEABLE else list(it) for it in iterables)

    def __call__(self, size: int) -> Columns:
        columns = [list(itertools.islice(it, size)) for it in self._its]
        n = min(map(len, columns))
        if n < size:  # an iterable ended: the calls end with the shortest, as zip's do
            columns = [c if len(c) == n else c[:n] for c in columns]
            self._its = [iter(())] * len(self._its)  # nothing more is read: the longer ones are not read on
        return Columns(columns, n)


class Slice(Protocol):
    """Consecutive calls of a map submitted together, and their outcomes by position.

    ``ready(i, timeout)`` waits until the outcome of position ``i`` is there (``TimeoutError``
    after ``timeout`` seconds; a done outcome is returned whatever the time, as
    ``Future.result`` does), and returns the end of the run of positions from ``i`` that have
    one. ``take(i, j)`` hands out the values of positions ``i .. j`` (all with an outcome), up
    to the first failed one, whose error comes beside them (else ``None``), and forgets them.
    ``futures()`` are what to cancel, and what to count as work in flight.
    """

    @property
    def size(self) -> int:
        """The calls of the slice."""
        ...

    def ready(self, i: int, timeout: float | None) -> int: ...

    def take(self, i: int, j: int) -> tuple[list[Any], BaseException | None]: ...

    def futures(self) -> list[concurrent.futures.Future[Any]]: ...


class FutureSlice:
    """A slice whose calls were submitted one by one (a call whose arguments hold futures goes
    as ``submit`` sends it): one future per position, dropped once its result is taken."""

    __slots__ = ("_fs",)

    def __init__(self, futures: Iterable[concurrent.futures.Future[Any]]) -> None:
        self._fs: list[concurrent.futures.Future[Any] | None] = list(futures)

    @property
    def size(self) -> int:
        return len(self._fs)

    def ready(self, i: int, timeout: float | None) -> int:
        fs = self._fs
        fut = fs[i]
        assert fut is not None, "a position is taken once"
        try:
            fut.exception(timeout)  # TimeoutError (a zdq future's says why it waits)
        except concurrent.futures.CancelledError:
            pass  # an outcome too: take() raises it at its position
        j = i + 1
        while j < len(fs) and (f := fs[j]) is not None and f.done():
            j += 1
        return j

    def take(self, i: int, j: int) -> tuple[list[Any], BaseException | None]:
        values: list[Any] = []
        fs = self._fs
        for k in range(i, j):
            fut, fs[k] = fs[k], None
            assert fut is not None, "a position is taken once"
            try:
                error = fut.exception(0)
            except concurrent.futures.CancelledError as e:  # cancelled: its outcome too
                return values, e
            if error is not None:
                return values, error
            values.append(fut.result(0))
        return values, None

    def futures(self) -> list[concurrent.futures.Future[Any]]:
        return [f for f in self._fs if f is not None]


class MapBatch(BatchFuture):
    """A slice of a map submitted as one chunked batch: the driver fills it as a batch (one
    ``_fill`` per reported run of results), and the map takes each outcome at its position as
    soon as it is there, not when the whole batch is.

    The driver's I/O thread writes outcomes under ``_fill_lock`` (see :class:`BatchFuture`);
    the map's thread waits on ``_arrived`` (a condition on the same lock) and clears the values
    it takes: a position, once it has an outcome, is never written again.
    """

    def __init__(self, first_key: int, n: int) -> None:
        super().__init__(first_key, n)
        self._arrived = SignalSafeCondition(self._fill_lock)

    def _fill(self, offset: int, values: list[Any], errors: dict[int, BaseException]) -> None:
        super()._fill(offset, values, errors)
        with self._arrived:
            self._arrived.notify_all()

    @property
    def size(self) -> int:
        return len(self.keys)

    def ready(self, i: int, timeout: float | None) -> int:
        settled = self._settled
        if not settled[i]:
            arrived = self._arrived

            def wait(step: float | None) -> None:
                with arrived:
                    if not arrived.wait_for(lambda: settled[i], step):
                        raise concurrent.futures.TimeoutError

            timeout = wait_seconds(timeout)
            try:
                self._looking(wait, timeout)
            except concurrent.futures.TimeoutError:
                raise self._timed_out(timeout, f"task {self.keys[i]} (of {self!r})") from None
        j = settled.find(0, i)
        return len(settled) if j < 0 else j

    def take(self, i: int, j: int) -> tuple[list[Any], BaseException | None]:
        # Under the lock: the I/O thread may mark a position settled before it writes its outcome.
        error = None
        with self._fill_lock:
            if self._errors:
                failed = min((k for k in self._errors if i <= k < j), default=None)
                if failed is not None:
                    error, j = self._errors[failed], failed
            values = self._values[i:j]
            self._values[i:j] = itertools.repeat(None, j - i)  # settled positions: never written again
        return values, error

    def futures(self) -> list[concurrent.futures.Future[Any]]:
        return [self]


class MapChunk(BatchFuture):
    """One chunk of ``queue_pool.map``: its outcomes, and the state of its futures
    (:class:`MapFuture`), which hold nothing but their chunk and their index.

    The driver settles it as a batch (one ``_fill`` per reported run of results, on its I/O
    thread, in one step under the chunk's condition); a future reads its state from there. Per
    future there is then one small object (made in C loops, without a Python ``__init__``) and no
    lists: a future's waiters (``concurrent.futures.wait``, ``as_completed``) and done-callbacks get
    a list of their own, and the future a place in ``_watched``, only once someone waits on it
    that way or adds a callback to it. ``result(timeout)`` waits on the chunk's condition.

    **Futures out of the garbage collector's sight** (``zdq._untracked``, where it was built). A
    map of a million items keeps a million live futures, and each of CPython's full collections
    walks every live tracked object: seven of them during such a map cost three times what its
    tasks did (``benchmarks/RESULTS.md``). A chunk makes its futures untracked, and keeps them so
    only while no reference cycle can pass through them, that is while nothing the chunk holds can
    lead back to a future:

    - while its tasks are pending, it holds its futures (``_untracked``) and is held by its
      driver, which settles every chunk: it is alive anyway;
    - when an outcome comes that is not a plain scalar (``int``, ``float``, ``complex``, ``str``,
      ``bytes``, ``bool``, ``None``), or an error (a raised error's traceback holds the frames of
      whoever read it, and they hold the futures), every future of the chunk is handed back to the
      collector, before anyone can read it, and stays tracked;
    - once every outcome is in and all are plain scalars, the chunk lets go of its futures, its
      driver and its hint (what a done future does not use): it then holds nothing of anyone's.

    A future also goes back to the collector when it comes to hold more itself: a waiter or a
    callback, an attribute (:class:`MapFuture`). Refcounting frees the futures either way. Two
    ways round it are left, and a cycle made through them is kept alive, not collected: an object
    written into a future's ``__dict__`` directly (``vars(f)[name] = ...``), or set with
    ``object.__setattr__(f, ...)``, which skips the future's own ``__setattr__``.

    A future's ``_condition`` is not its chunk's lock, for the standard library's ``wait`` and
    ``as_completed`` (see :class:`_NotALock`).

    Who owns what: ``_values``, ``_errors``, ``_settled``, ``_watched``, ``_untracked`` and the
    futures' waiters are written under ``_condition`` (an RLock; the futures' own ``_condition``
    takes nothing); a position, once settled, is never written again, and its outcome is written
    before it is marked settled (a reader without the lock sees a settled position's outcome). A
    task whose outcome is :class:`~zdq.errors.TaskCancelled` (cancelled before it started) reads
    cancelled.
    """

    # Slots, not the instance dict, for the outcomes: a future's result() reads them in C
    # (``zdq._untracked.slot_result``, installed below the class of the futures).
    __slots__ = ("_values", "_errors", "_settled")

    def __init__(self, first_key: int, n: int, hint: Any, driver: Any) -> None:
        concurrent.futures.Future.__init__(self)  # its condition is its futures' too
        self.keys = range(first_key, first_key + n)
        self._values: list[Any] = [None] * n
        self._errors: dict[int, BaseException] = {}
        self._settled = bytearray(n)
        self._remaining = n
        self._hint = hint
        self._driver = driver
        self._watched: dict[int, MapFuture] | None = None
        #: The futures, made untracked, while this chunk is pending (see the class).
        self._untracked: list[MapFuture] | None = None
        #: An outcome that is an error or not a plain scalar came: futures made from now on are tracked.
        self._holds_more = False

    def futures(self) -> list[MapFuture]:
        """A future per task, in order: untracked where that is safe (see the class)."""
        n = len(self._values)
        with self._condition:  # the driver may have settled some of them already
            if _slotted is None or self._holds_more:
                return _tracked_futures(self, n)
            futures = _slotted(MapFuture, n, MapFuture._chunk, self, MapFuture._i, _indexes(n))
            if self._remaining:
                self._untracked = futures
            else:
                self._let_go()
            return futures

    def _let_go(self) -> None:
        """(``_condition`` held; every outcome in, all plain scalars.) Hold nothing that could lead
        back to an untracked future: not the futures, nor the driver and the hint (a done future
        needs neither: it neither waits nor cancels)."""
        self._untracked = None
        self._driver = self._hint = None

    def _check_outcomes(self, values: list[Any], errors: dict[int, BaseException]) -> None:
        """(``_condition`` held, the outcomes just written; ``zdq._untracked`` built.) Hand every
        future back to the collector if they may lead back to one; let go of them once all are in,
        if they cannot."""
        if self._holds_more:
            return
        if errors or not _untracked.scalars(values):
            self._holds_more = True
            if self._untracked is not None:
                _untracked.track_all(self._untracked)
                self._untracked = None
        elif not self._remaining and self._untracked is not None:
            self._let_go()

    def _watch(self, future: MapFuture) -> None:
        """(``_condition`` held.) Tell ``future`` when its outcome comes: it has waiters or callbacks."""
        if self._watched is None:
            self._watched = {}
        self._watched[future._i] = future

    def _fill(self, offset: int, values: list[Any], errors: dict[int, BaseException]) -> None:
        """Record the outcomes of positions ``offset .. offset+len(values)`` that have none yet,
        wake those who wait, then run the callbacks of the futures settled (outside the lock)."""
        n = len(values)
        told: list[MapFuture] = []
        with self._condition:
            settled = self._settled
            if settled.find(1, offset, offset + n) < 0:  # the usual case: a whole fresh run
                self._values[offset : offset + n] = values
                for i, exc in errors.items():
                    self._errors[offset + i] = exc
                settled[offset : offset + n] = b"\1" * n
                self._remaining -= n
                fresh: range | list[int] = range(offset, offset + n)
            else:
                fresh = []
                for i, value in enumerate(values):
                    k = offset + i
                    if not settled[k]:
                        if i in errors:
                            self._errors[k] = errors[i]
                        else:
                            self._values[k] = value
                        settled[k] = 1
                        self._remaining -= 1
                        fresh.append(k)
            if _slotted is not None:
                self._check_outcomes(values, errors)
            watched = self._watched
            if watched:
                for k in [k for k in watched if k in fresh]:
                    future = watched.pop(k)
                    future._tell_waiters()
                    told.append(future)
            self._condition.notify_all()
        for future in told:
            future._run_callbacks()

    def __repr__(self) -> str:
        return f"<MapChunk keys={self.keys.start}..{self.keys.stop - 1}: {self.completed} of {len(self.keys)} done>"


#: Per thread: the state of each map future (by id) as that thread's ``concurrent.futures.wait``
#: or ``as_completed`` first read it, while it holds their ``_condition`` (see :class:`_NotALock`).
_reads = threading.local()


def _read_states() -> dict[int, str]:
    states: dict[int, str] | None = getattr(_reads, "states", None)
    if states is None:
        states = _reads.states = {}
    return states


class _NotALock:
    """A map future's ``_condition`` for the standard library's ``wait`` and ``as_completed``,
    which take every future's ``_condition`` in the order of their ``id()`` while they read the
    futures' states and install their waiters. A map's futures share their chunk's lock, so that
    order is no order of the locks: two threads waiting on futures of the same two chunks took
    them crosswise and hung, with the driver's I/O thread behind them (reviewer 15); and a
    ``KeyboardInterrupt`` inside that loop left chunks' locks held, and every result of the pool
    waited behind them. So it takes nothing. What the lock gave is kept otherwise:

    - a future's state stands still for the thread that holds its ``_condition``: the first read
      is noted (``_state``), and the later reads of the same wait give it again (``wait`` reads
      each state twice, and counts its waiter's calls from the second read);
    - a waiter installed on a future read as pending that has settled since is told at once (its
      :class:`_Waiters`), under the chunk's lock, as the chunk tells the waiters installed before.

    The notes are dropped as the conditions are taken and let go (a wait's beginning and end)."""

    __slots__ = ()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        _read_states().clear()
        return True

    def release(self) -> None:
        _read_states().clear()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        pass


_NOT_A_LOCK = _NotALock()


class _Waiters(list):  # type: ignore[type-arg]
    """A map future's standard-library waiters: changed under its chunk's lock; a waiter installed
    after the future settled, by a thread that read it pending, is told at once."""

    __slots__ = ("future",)

    def __init__(self, future: MapFuture) -> None:
        super().__init__()
        self.future = future

    def append(self, waiter: Any) -> None:
        future = self.future
        chunk = future._chunk
        with chunk._condition:
            list.append(self, waiter)
            if chunk._settled[future._i] and _read_states().get(id(future)) == _base.PENDING:
                future._tell(waiter)

    def remove(self, waiter: Any) -> None:
        with self.future._chunk._condition:
            list.remove(self, waiter)


class MapFuture(TaskFuture):
    """A task's future made by ``queue_pool.map``, which makes one per call by the thousand: its
    state is its chunk's (:class:`MapChunk`) at its index, so that it costs one small object. It
    is a :class:`TaskFuture` in every way (``result(timeout)``, ``exception()``, ``cancel()`` of
    its task, ``done()``, ``add_done_callback``, :func:`concurrent.futures.wait` and
    ``as_completed``, an argument of another submission).

    The standard future's fields (``_state``, ``_condition``, ``_waiters``, ``_result``,
    ``_exception``) are read from the chunk, for the standard library's functions that use them;
    a future waits on its chunk's condition for its own position only (a sibling's outcome wakes
    it, and it waits on).

    **Out of the garbage collector's sight, while it can be**: see :class:`MapChunk`. A future
    goes back to the collector (:func:`_track`) when it comes to hold more than its chunk and
    index: a waiter or a callback (:meth:`_watch`), an attribute (``__setattr__``).
    """

    # Three slots: with Future's own dict and weak reference (inherited), the object stays in
    # pymalloc's 80-byte class (96 with four), and a full collection of the garbage collector,
    # which walks every live future, takes about a sixth less time (see benchmarks/RESULTS.md).
    __slots__ = ("_chunk", "_i", "_x")

    _chunk: MapChunk
    _i: int
    #: ``[waiters, callbacks]``, made when someone first waits on this future through the standard
    #: library's ``wait``/``as_completed`` or adds a callback to it (``None`` in the one not used).
    _x: list[Any]

    def __init__(self, *args: Any) -> None:
        raise TypeError("MapFuture is made by its chunk: MapChunk.futures()")

    # -- the state, read from the chunk ---------------------------------------------------------
    @property
    def key(self) -> int:  # type: ignore[override]
        return self._chunk.keys[self._i]

    @property
    def _driver(self) -> Any:
        return self._chunk._driver

    @property
    def _hint(self) -> Any:  # type: ignore[override]
        return self._chunk._hint

    @property
    def _condition(self) -> Any:  # type: ignore[override]
        return _NOT_A_LOCK

    @property
    def _state(self) -> str:  # type: ignore[override]
        # Read by the standard library's wait and as_completed alone: as first read in this wait
        # (see _NotALock).
        states = _read_states()
        state = states.get(id(self))
        if state is None:
            if not self._chunk._settled[self._i]:
                state = _base.PENDING
            else:
                state = _base.CANCELLED_AND_NOTIFIED if self.cancelled() else _base.FINISHED
            states[id(self)] = state
        return state

    @property
    def _result(self) -> Any:  # type: ignore[override]
        return self._chunk._values[self._i]

    @property
    def _exception(self) -> BaseException | None:  # type: ignore[override]
        error = self._chunk._errors.get(self._i)
        return None if type(error) is TaskCancelled else error

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        """The standard library's waiters (``wait``, ``as_completed``): made on first use."""
        chunk = self._chunk
        with chunk._condition:
            watch = self._watch()
            if watch[0] is None:
                watch[0] = _Waiters(self)
            return watch[0]

    def __setattr__(self, name: str, value: Any) -> None:
        _track(self)  # it may hold more than its chunk and index from now on
        object.__setattr__(self, name, value)

    def _watch(self) -> list[Any]:
        """(The chunk's condition held.) ``[waiters, callbacks]``, made and registered with the
        chunk (to be told of the outcome, if it has not come) on first use."""
        try:
            return self._x
        except AttributeError:
            self._x = [None, None]  # tracked by __setattr__: a waiter or a callback may lead back to it
            if not self._chunk._settled[self._i]:
                self._chunk._watch(self)
            return self._x

    def done(self) -> bool:
        return bool(self._chunk._settled[self._i])

    def cancelled(self) -> bool:
        chunk, i = self._chunk, self._i
        return bool(chunk._settled[i]) and type(chunk._errors.get(i)) is TaskCancelled

    def running(self) -> bool:
        return False  # a queued task's future is pending until its outcome comes

    # -- waiting --------------------------------------------------------------------------------
    def _when_done(self, timeout: float | None) -> None:
        chunk, i = self._chunk, self._i
        settled = chunk._settled
        with chunk._condition:
            if not chunk._condition.wait_for(lambda: settled[i], timeout):
                raise concurrent.futures.TimeoutError

    def _wait(self, timeout: float | None) -> None:
        """Wait until this future is done, as a :class:`TaskFuture` waits (looking whether its pool
        can run it at all; a timeout's error says why it waits)."""
        timeout = wait_seconds(timeout)
        try:
            self._looking(self._when_done, timeout)
        except concurrent.futures.TimeoutError:
            raise self._timed_out(timeout, repr(self)) from None

    def result(self, timeout: float | None = None) -> Any:
        # In C where it was built (``_untracked.slot_result``, below the class): this method
        # answers what that one does not (a pending future, a chunk with an error, a timeout).
        chunk, i = self._chunk, self._i
        if not chunk._settled[i]:
            self._wait(timeout)
        errors = chunk._errors
        if errors and i in errors:
            # Its own error, or TaskCancelled (a CancelledError) if it was cancelled; its traceback
            # from this raise alone: one error failing many tasks (a closed pool's) would otherwise
            # gain two entries for each of them read, holding every reader's frame.
            raise errors[i].with_traceback(None)
        return chunk._values[i]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        chunk, i = self._chunk, self._i
        if not chunk._settled[i]:
            self._wait(timeout)
        error = chunk._errors.get(i)
        if type(error) is TaskCancelled:
            raise error
        return error

    # -- callbacks and waiters ------------------------------------------------------------------
    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        chunk = self._chunk
        with chunk._condition:
            if not chunk._settled[self._i]:
                watch = self._watch()
                if watch[1] is None:
                    watch[1] = []
                watch[1].append(fn)
                return
        try:
            fn(self)
        except Exception:  # as concurrent.futures does: a failing callback is logged, not raised
            logger.exception("exception calling callback for %r", self)

    def _tell_waiters(self) -> None:
        """(The chunk's condition held, the outcome just written.) As ``Future.set_result`` and
        ``set_running_or_notify_cancel`` tell the standard library's waiters."""
        waiters = getattr(self, "_x", (None,))[0]
        for waiter in waiters or ():
            self._tell(waiter)

    def _tell(self, waiter: Any) -> None:
        """(The chunk's condition held, the outcome in.) Tell one standard-library waiter."""
        error = self._chunk._errors.get(self._i)
        if error is None:
            waiter.add_result(self)
        elif type(error) is TaskCancelled:
            waiter.add_cancelled(self)
        else:
            waiter.add_exception(self)

    def _run_callbacks(self) -> None:
        """(No lock held.) Run the callbacks added before the outcome came, on the driver's
        callback thread if this is its I/O thread (see :class:`~zdq.futures.CallbackRunner`)."""
        watch = getattr(self, "_x", None)
        callbacks = None if watch is None else watch[1]
        if not callbacks:
            return
        watch[1] = None  # type: ignore[index]
        runner = getattr(_io_thread, "runner", None)
        if runner is not None:
            runner.submit(callbacks, self)
            return
        run_inline(callbacks, self)

    def _invoke_callbacks(self) -> None:
        self._run_callbacks()

    # -- settling by hand (the chunk is settled by its driver) -----------------------------------
    def _settle(self, value: Any, error: BaseException | None) -> None:
        chunk = self._chunk
        if chunk._settled[self._i]:
            raise concurrent.futures.InvalidStateError(f"{self!r} is done already")
        chunk._fill(self._i, [value], {} if error is None else {0: error})  # callbacks: outside its lock

    def set_result(self, result: Any) -> None:
        self._settle(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._settle(None, exception)

    def set_running_or_notify_cancel(self) -> bool:
        if self.cancelled():
            return False
        if self.done():
            raise RuntimeError(f"{self!r} is done already")
        return True


def _tracked_futures(chunk: MapChunk, n: int) -> list[MapFuture]:
    """``chunk``'s futures, made in Python (C loops: ``object.__new__`` and slot writes, no
    ``__init__``), tracked by the collector as any object: where ``zdq._untracked`` is not built."""
    futures = list(map(object.__new__, itertools.repeat(MapFuture, n)))
    collections.deque(map(object.__setattr__, futures, itertools.repeat("_chunk", n), itertools.repeat(chunk, n)), 0)
    collections.deque(map(object.__setattr__, futures, itertools.repeat("_i", n), _indexes(n)), 0)
    return futures


#: The index of each future in its chunk, shared by every chunk's futures: an int object per
#: future would be one more object for the collector to touch (and to allocate) per future.
_INDEXES: tuple[int, ...] = tuple(range(1024))
#: Chunks larger than this give their futures ints of their own (the shared tuple stays small).
_INDEXES_MAX = 1 << 16


def _indexes(n: int) -> Sequence[int]:
    """The indexes ``0 .. n-1`` (at least: read as far as needed), shared between chunks."""
    global _INDEXES
    if n <= len(_INDEXES):
        return _INDEXES
    if n > _INDEXES_MAX:
        return range(n)
    _INDEXES = tuple(range(max(n, 2 * len(_INDEXES))))  # a race only makes one more tuple
    return _INDEXES


def map_futures(first: int, n: int, hint: Any, driver: Any) -> list[MapFuture]:
    """The futures of tasks ``first .. first+n`` (one chunk of a map: a :class:`MapChunk`)."""
    return MapChunk(first, n, hint, driver).futures()


if _untracked is not None:
    # A settled future's result, read in C: a map of a million items is read by a million calls.
    MapFuture.result = _untracked.slot_result(  # type: ignore[method-assign]
        MapFuture, vars(MapFuture)["_chunk"], vars(MapFuture)["_i"],
        MapChunk, vars(MapChunk)["_settled"], vars(MapChunk)["_errors"], vars(MapChunk)["_values"],
        MapFuture.result,
    )


class ResultWindow:
    """The results of a map, in order (see the module), its calls submitted in slices.

    Parameters
    ----------
    submit : callable
        ``submit(calls, first, timeout)`` submits a list of consecutive calls' arguments (from
        the map's position ``first``) within ``timeout`` seconds (``None``: no bound); returns a
        :class:`Slice`. Called on the caller's thread, at the construction (the first slices)
        and as results are taken (the following ones, with ``buffersize``).
    calls : iterable of tuples
        The arguments of each call; read lazily with ``buffersize``, at once without.
    buffersize : int or None
        At most this many tasks submitted whose results were not taken; ``None``: every call is
        submitted at once.
    timeout : float or None
        Seconds from ``started`` (default: the construction) within which every result must be
        there; the submissions are bounded by what is left of it.
    cancel : callable
        ``cancel(slices, wait)`` cancels what is left of them when the iteration stops early;
        ``wait=False`` after a timeout: the cancellation must not delay the raise.
    clock : callable
        The monotonic clock (the tests' own, to count time without waiting).
    slice_size : int
        Calls per slice (capped by ``buffersize``). With ``buffersize``, a slice is submitted
        each time that many results were taken.
    hint : callable, optional
        Says why results may not come (the pool's), for a timeout's message.
    per_result : int
        The map's items in each position (a chunked map's ``chunksize``), for the messages.
    read : callable, optional
        ``read(size)`` reads the next (at most) ``size`` calls as a sized part (empty at the
        end) in place of ``calls`` (a :class:`ColumnReader`'s :class:`Columns`); ``submit``
        gets those parts.
    """

    def __init__(
        self,
        submit: Callable[[list[tuple[Any, ...]], int, float | None], Slice],
        calls: Iterable[tuple[Any, ...]],
        buffersize: int | None,
        timeout: float | None,
        cancel: Callable[[list[Slice], bool], None],
        clock: Callable[[], float] = time.monotonic,
        slice_size: int = 1,
        *,
        started: float | None = None,
        hint: Callable[[], str] | None = None,
        per_result: int = 1,
        read: Callable[[int], Sized] | None = None,
    ) -> None:
        self._per = per_result
        self._clock = clock
        self._timeout = timeout
        self._end = None if timeout is None else (clock() if started is None else started) + timeout
        self._hint = hint
        self._read = read if read is not None else functools.partial(_read_calls, iter(calls))
        self._submit: Callable[[Any, int, float | None], Slice] | None = submit
        self._size = slice_size if buffersize is None else max(1, min(slice_size, buffersize))
        self._room = buffersize  # calls that may still be submitted before results are taken
        self._cancel = cancel
        self._slices: collections.deque[Slice] = collections.deque()
        self._at = 0  # the position of the next result in the first slice
        self._position = 0  # calls read (and submitted): the map's position of the next one
        self._taken = 0  # results handed out
        try:
            self._refill()
        except BaseException:
            # A call that cannot be submitted: those before it do not run alone (cancelled
            # without waiting for the queues' answers: the caller gets the error at once).
            self._cancel_left(wait=False)
            raise
        if buffersize is None:
            self._stop_reading()  # everything is submitted: hold neither the executor nor the calls

    @property
    def unfinished(self) -> int:
        """Tasks submitted whose results were not taken yet."""
        return sum(s.size for s in self._slices) - self._at

    def _stop_reading(self) -> None:
        self._submit = None
        self._read = _read_nothing

    def _refill(self) -> None:
        """Submit slices while there is room for a whole one (or, without buffersize, to the end)."""
        size = self._size
        while self._submit is not None and (self._room is None or self._room >= size):
            part = self._read(size)
            if not len(part):
                self._stop_reading()
                return
            first = self._position
            try:
                piece = self._submit(part, first, self._left())
            except SerializationError as e:
                raise SerializationError(
                    f"{e}; {self._taken * self._per} results of the map were yielded before it, and the "
                    f"{self.unfinished} tasks queued after those are cancelled"
                ) from e
            except ZdqTimeoutError as e:
                raise ZdqTimeoutError(
                    f"map(): the items from {first * self._per} on could not be queued within the map's timeout of {self._timeout:.3g}s: {e} "
                    f"({self._taken * self._per} results were yielded; what was queued after them is cancelled)"
                ) from e
            self._slices.append(piece)
            self._position = first + len(part)
            if self._room is not None:
                self._room -= len(part)

    def _left(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - self._clock())

    def _take(self) -> tuple[list[Any], BaseException | None]:
        """The next results there are (at least one: waited for), up to a failed task's error;
        the slice they end is dropped and, with buffersize, as many calls submitted."""
        head = self._slices[0]
        i = self._at
        try:
            j = head.ready(i, self._left())
        except concurrent.futures.TimeoutError:
            hint = self._hint() if self._hint is not None else ""
            raise ZdqTimeoutError(
                f"map(): the result of item {self._taken * self._per} did not come within the map's timeout of "
                f"{self._timeout:.3g}s" + (f": {hint}" if hint else "")
            ) from None
        values, error = head.take(i, j)
        self._at = i + len(values)
        if error is None and self._at == head.size:
            self._slices.popleft()
            self._at = 0
            if self._room is not None:
                self._room += head.size
            self._refill()  # its error is raised before these values are handed out, as 3.14's
        self._taken += len(values)
        return values, error

    def _cancel_left(self, wait: bool = True) -> None:
        left = list(self._slices)
        self._slices.clear()
        if left:
            self._cancel(left, wait)

    def __iter__(self) -> Iterator[Any]:
        return _Results.of(self._runs())

    def _runs(self) -> Iterator[Iterator[Any]]:
        """The runs of results in order, each an iterator that hands them out; a task's error is
        raised when the run before it has been handed out."""
        slices = self._slices
        values: list[Any] = []
        count = itertools.repeat(-1, 0)
        try:
            while slices:
                values, error = self._take()
                # Handed out from a list emptied as it goes: a suspended iterator holds no result
                # it has yielded (popped in C, the values are not copied once more).
                values.reverse()
                count = itertools.repeat(-1, len(values))
                yield map(values.pop, count)
                if error is not None:
                    raise error
        except GeneratorExit:
            # Closed: the run being handed out ends too (as a closed generator gives nothing more),
            # and what has not started is cancelled on return.
            collections.deque(count, 0)
            values.clear()
            self._cancel_left(wait=True)
            raise
        except BaseException:
            # A timeout, a task's error, a shutdown: raised at once, not after a silent queue's answer.
            self._cancel_left(wait=False)
            raise
        finally:
            self._cancel_left()
            self._submit = None


def _read_calls(calls: Iterator[tuple[Any, ...]], size: int) -> list[tuple[Any, ...]]:
    """The next (at most) ``size`` of ``calls``: a window's parts when it reads tuples."""
    return list(itertools.islice(calls, size))


def _read_nothing(size: int) -> list[tuple[Any, ...]]:
    """A window that reads no more (everything was submitted, or it was stopped)."""
    return []


class _Results(itertools.chain):  # type: ignore[type-arg]
    """A map's results: a chain over the runs that :meth:`ResultWindow._runs` yields, so that each
    result is handed out in C (the generator is resumed once a run, not once a result, as
    ``yield from`` would). ``close()`` closes the generator, as a generator's own does: what is
    left is cancelled (as when it is dropped)."""

    __slots__ = ("_runs",)

    _runs: Iterator[Iterator[Any]]

    @classmethod
    def of(cls, runs: Iterator[Iterator[Any]]) -> _Results:
        results: _Results = cls.from_iterable(runs)  # type: ignore[assignment]
        results._runs = runs
        return results

    def close(self) -> None:
        self._runs.close()  # type: ignore[attr-defined]


def cancel_slices(slices: Iterable[Slice], wait: bool = True) -> None:
    """Cancel what has not started of a map's ``slices`` (see :func:`cancel_many`); without
    ``wait``, on a thread of its own (its waits for the queues' answers are bounded)."""
    cancel_many([fut for s in slices for fut in s.futures()], wait)


def key_runs(keys: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted task ids as runs of consecutive ids ``(first, n)``: one cancellation per run."""
    return span_runs((key, 1) for key in keys)


def span_runs(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans of task ids ``(first, n)`` merged into sorted runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for first, n in sorted(spans):
        if runs and first <= runs[-1][0] + runs[-1][1]:
            start = runs[-1][0]
            runs[-1] = (start, max(runs[-1][1], first + n - start))
        elif n > 0:
            runs.append((first, n))
    return runs


def _cancel_requests(
    futures: Iterable[concurrent.futures.Future[Any]],
) -> tuple[list[tuple[Any, list[tuple[int, int]]]], list[concurrent.futures.Future[Any]]]:
    """The unfinished ``futures``: zdq task and batch futures as spans of task ids by driver
    (one request per merged run), and the others (standard library ones, held calls) apart."""
    by_driver: dict[int, tuple[Any, list[tuple[int, int]]]] = {}
    others: list[concurrent.futures.Future[Any]] = []
    for fut in futures:
        if fut.done():
            continue
        key = getattr(fut, "key", None)
        keys = getattr(fut, "keys", None)
        driver = getattr(fut, "_driver", None)
        if driver is not None and isinstance(key, int):
            by_driver.setdefault(id(driver), (driver, []))[1].append((key, 1))
        elif driver is not None and isinstance(keys, range):
            by_driver.setdefault(id(driver), (driver, []))[1].append((keys.start, len(keys)))
        else:
            others.append(fut)
    return list(by_driver.values()), others


def _ask_cancel(
    requests: list[tuple[Any, list[tuple[int, int]]]], others: list[concurrent.futures.Future[Any]]
) -> None:
    for fut in others:
        fut.cancel()
    for driver, spans in requests:
        for first, n in span_runs(spans):
            try:
                driver.cancel(first, n)
            except ZdqError as e:  # a closed pool: its futures failed already, nothing runs
                logger.debug("cancelling tasks %d..%d: %s", first, first + n - 1, e)


def cancel_many(futures: Iterable[concurrent.futures.Future[Any]], wait: bool = True) -> None:
    """Cancel the unfinished ``futures``: zdq task and batch futures by runs of consecutive ids,
    one request to their driver per run (each ``TaskFuture.cancel()`` is a round trip to its
    queue); any other future (a standard library one) by its own ``cancel()``. Without ``wait``,
    on a thread of its own (its waits for the queues' answers are bounded): for an error raised at
    its timeout, which a silent queue's answer must not delay."""
    if wait:
        _ask_cancel(*_cancel_requests(futures))
        return
    futures = list(futures)
    if futures:
        threading.Thread(target=cancel_many, args=(futures,), name="zdq-map-cancel", daemon=True).start()
