"""``Executor.map``'s ordering and bounding, written against plain futures (no pool, no thread).

:class:`ResultWindow` is the whole of Python 3.14's ``Executor.map`` contract: the first tasks
are submitted at the call (all of them, or the first ``buffersize``), results come in order,
``timeout`` counts from the call, a task's exception is raised at its position, and what is left
is cancelled when the iterator is closed, fails or times out. With ``buffersize``, one more call
is read and submitted each time a result is yielded, so at most ``buffersize`` tasks are
unfinished and an endless iterable is mapped in bounded memory. It is given a ``submit`` that
returns :class:`concurrent.futures.Future` objects and a ``cancel`` for what is left; the unit
tests drive it with futures they settle themselves.

Helpers for chunked maps (the process pool's ``chunksize``) and for cancelling many zdq futures
in a few round trips live here too: they are as pure.

Ownership
---------
A window belongs to the thread iterating over it (as a generator does); nothing in it is shared.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from zdq.errors import ZdqError

__all__ = ["ResultWindow", "cancel_many", "check_map_options", "chunked", "key_runs", "run_chunk"]

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


class ResultWindow:
    """The results of ``submit(*args)`` for each ``args`` of ``calls``, in order (see the module).

    Parameters
    ----------
    submit : callable
        ``submit(*args)`` returns a future; called on the caller's thread, at the construction
        (the first tasks) and as results are taken (the following ones, with ``buffersize``).
    calls : iterable of tuples
        The arguments of each call; read lazily with ``buffersize``, at once without.
    buffersize : int or None
        At most this many tasks unfinished; ``None``: every call is submitted at once.
    timeout : float or None
        Seconds from the construction within which every result must be there.
    cancel : callable
        ``cancel(futures)`` cancels what is left when the iteration stops early.
    clock : callable
        The monotonic clock (the tests' own, to count time without waiting).
    """

    def __init__(
        self,
        submit: Callable[..., concurrent.futures.Future[Any]],
        calls: Iterable[tuple[Any, ...]],
        buffersize: int | None,
        timeout: float | None,
        cancel: Callable[[list[concurrent.futures.Future[Any]]], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._end = None if timeout is None else clock() + timeout
        self._calls = iter(calls)
        self._submit: Callable[..., concurrent.futures.Future[Any]] | None = submit
        self._buffersize = buffersize
        self._cancel = cancel
        self._fs: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        first = self._calls if buffersize is None else itertools.islice(self._calls, buffersize)
        try:
            for args in first:
                self._fs.append(submit(*args))
        except BaseException:
            self._cancel_left()  # a call that cannot be submitted: those before it do not run alone
            raise
        if buffersize is None:
            self._submit = None  # everything is submitted: hold neither the executor nor the calls
            self._calls = iter(())

    @property
    def unfinished(self) -> int:
        """Tasks submitted whose results were not taken yet."""
        return len(self._fs)

    def _result(self, fut: concurrent.futures.Future[Any]) -> Any:
        try:
            if self._end is None:
                return fut.result()
            return fut.result(max(0.0, self._end - self._clock()))
        finally:
            fut.cancel()  # no-op once done; on a timeout the task is not left to run for nobody

    def _refill(self) -> None:
        if self._submit is None:
            return
        args = next(self._calls, None)
        if args is None:
            self._submit = None
            return
        self._fs.append(self._submit(*args))

    def _take_next(self) -> Any:
        """The oldest task's result (raised if it failed); one more call submitted after it."""
        value = self._result(self._fs.popleft())
        self._refill()
        return value

    def _cancel_left(self) -> None:
        left = list(self._fs)
        self._fs.clear()
        if left:
            self._cancel(left)

    def __iter__(self) -> Iterator[Any]:
        return self._results()

    def _results(self) -> Iterator[Any]:
        fs = self._fs
        try:
            while fs:
                # Yielded straight from a call: a suspended iterator holds no future (and so no
                # result) it has handed out.
                yield self._take_next()
        finally:
            self._cancel_left()
            self._submit = None


def key_runs(keys: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted task ids as runs of consecutive ids ``(first, n)``: one cancellation per run."""
    runs: list[tuple[int, int]] = []
    for key in sorted(set(keys)):
        if runs and runs[-1][0] + runs[-1][1] == key:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((key, 1))
    return runs


def cancel_many(futures: Iterable[concurrent.futures.Future[Any]]) -> None:
    """Cancel the unfinished ``futures``: zdq task futures by runs of consecutive ids, one request
    to their driver per run (each ``TaskFuture.cancel()`` is a round trip to its queue); any other
    future (a standard library one, a batch) by its own ``cancel()``."""
    by_driver: dict[int, tuple[Any, list[int]]] = {}
    for fut in futures:
        if fut.done():
            continue
        key = getattr(fut, "key", None)
        driver = getattr(fut, "_driver", None)
        if isinstance(key, int) and driver is not None:
            by_driver.setdefault(id(driver), (driver, []))[1].append(key)
        else:
            fut.cancel()
    for driver, keys in by_driver.values():
        for first, n in key_runs(keys):
            try:
                driver.cancel(first, n)
            except ZdqError as e:  # a closed pool: its futures failed already, nothing runs
                logger.debug("cancelling tasks %d..%d: %s", first, first + n - 1, e)
