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
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import _base
from typing import Any, Protocol

from zdq.errors import SerializationError, ZdqError, ZdqTimeoutError
from zdq.futures import BatchFuture, TaskFuture

__all__ = [
    "FutureSlice", "MapBatch", "MapFuture", "ResultWindow", "Slice", "cancel_many", "cancel_slices", "check_map_options", "chunked",
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
        self._arrived = threading.Condition(self._fill_lock)

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


_DONE = frozenset({_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED, _base.FINISHED})


class MapFuture(TaskFuture):
    """A task's future made by ``queue_pool.map``, which makes one per call by the thousand: the
    futures of one chunk share one condition (the standard future makes a condition, and a lock,
    each: most of a map's cost per call). It is a :class:`TaskFuture` in every other way.

    Sharing is safe because a future only waits on its condition for its own state: a wakeup for
    a sibling is waited through (:meth:`result` and :meth:`exception` wait for ``done()``, where
    the standard ``result`` takes any wakeup as its own); the other uses of the condition hold it
    briefly (it is re-entrant: ``concurrent.futures.wait`` takes it once per future).
    """

    def __init__(self, key: int, condition: threading.Condition, hint: Any, driver: Any) -> None:
        # Future.__init__ is not called: it would make a condition of its own. Its fields:
        self._condition = condition
        self._state = _base.PENDING
        self._result = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[Any], object]] = []
        self.key = key
        self._hint = hint
        self._driver = driver

    def _when_done(self, timeout: float | None) -> None:
        with self._condition:
            if not self._condition.wait_for(lambda: self._state in _DONE, timeout):
                raise concurrent.futures.TimeoutError

    def _wait(self, timeout: float | None) -> None:
        """Wait until this future is done, as a :class:`TaskFuture` waits (looking whether its pool
        can run it at all; a timeout's error says why it waits)."""
        try:
            self._looking(self._when_done, timeout)
        except concurrent.futures.TimeoutError:
            raise self._timed_out(timeout, repr(self)) from None

    def result(self, timeout: float | None = None) -> Any:
        if self._state == _base.FINISHED and self._exception is None:
            return self._result  # set before the state, by set_result
        self._wait(timeout)
        return concurrent.futures.Future.result(self, 0)  # done: its result, or its own error as it is

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return concurrent.futures.Future.exception(self, 0)


def map_futures(first: int, n: int, hint: Any, driver: Any) -> list[MapFuture]:
    """The futures of tasks ``first .. first+n`` (one chunk of a map), sharing one condition."""
    condition = threading.Condition()
    return [MapFuture(key, condition, hint, driver) for key in range(first, first + n)]


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
    ) -> None:
        self._per = per_result
        self._clock = clock
        self._timeout = timeout
        self._end = None if timeout is None else (clock() if started is None else started) + timeout
        self._hint = hint
        self._calls = iter(calls)
        self._submit: Callable[[list[tuple[Any, ...]], int, float | None], Slice] | None = submit
        self._size = slice_size if buffersize is None else max(1, min(slice_size, buffersize))
        self._room = buffersize  # calls that may still be submitted before results are taken
        self._cancel = cancel
        self._slices: collections.deque[Slice] = collections.deque()
        self._at = 0  # the position of the next result in the first slice
        self._read = 0  # calls read (and submitted): the map's position of the next one
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
        self._calls = iter(())

    def _refill(self) -> None:
        """Submit slices while there is room for a whole one (or, without buffersize, to the end)."""
        size = self._size
        while self._submit is not None and (self._room is None or self._room >= size):
            part = list(itertools.islice(self._calls, size))
            if not part:
                self._stop_reading()
                return
            first = self._read
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
            self._read = first + len(part)
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
        return self._results()

    def _results(self) -> Iterator[Any]:
        slices = self._slices
        try:
            while slices:
                values, error = self._take()
                # Handed out from a list emptied as it goes: a suspended iterator holds no result
                # it has yielded (popped in C, the values are not copied once more).
                values.reverse()
                yield from map(values.pop, itertools.repeat(-1, len(values)))
                if error is not None:
                    raise error
        except GeneratorExit:
            self._cancel_left(wait=True)  # closed: what has not started is cancelled on return
            raise
        except BaseException:
            # A timeout, a task's error, a shutdown: raised at once, not after a silent queue's answer.
            self._cancel_left(wait=False)
            raise
        finally:
            self._cancel_left()
            self._submit = None


def cancel_slices(slices: Iterable[Slice], wait: bool = True) -> None:
    """Cancel what has not started of a map's ``slices`` (see :func:`cancel_many`); without
    ``wait``, on a thread of its own (its waits for the queues' answers are bounded)."""
    futures = [fut for s in slices for fut in s.futures()]
    if wait:
        cancel_many(futures)
    elif futures:
        threading.Thread(target=cancel_many, args=(futures,), name="zdq-map-cancel", daemon=True).start()


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


def cancel_many(futures: Iterable[concurrent.futures.Future[Any]]) -> None:
    """Cancel the unfinished ``futures``: zdq task and batch futures by runs of consecutive ids,
    one request to their driver per run (each ``TaskFuture.cancel()`` is a round trip to its
    queue); any other future (a standard library one) by its own ``cancel()``."""
    by_driver: dict[int, tuple[Any, list[tuple[int, int]]]] = {}
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
            fut.cancel()
    for driver, spans in by_driver.values():
        for first, n in span_runs(spans):
            try:
                driver.cancel(first, n)
            except ZdqError as e:  # a closed pool: its futures failed already, nothing runs
                logger.debug("cancelling tasks %d..%d: %s", first, first + n - 1, e)
