"""Futures handed back by submissions.

Both kinds are :class:`concurrent.futures.Future` subclasses, so ``result(timeout)``,
``exception()``, ``done()``, ``add_done_callback()``, :func:`concurrent.futures.wait` and
:func:`concurrent.futures.as_completed` work as usual; both are also awaitable. Done-callbacks run
on zdq's driver I/O thread: keep them short.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Generator
from typing import Any

from zdq.errors import BatchError

__all__ = ["TaskFuture", "BatchFuture", "wait", "as_completed"]

wait = concurrent.futures.wait
as_completed = concurrent.futures.as_completed


class _Awaitable(concurrent.futures.Future):  # type: ignore[type-arg]
    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()


class TaskFuture(_Awaitable):
    """The result of one submitted task.

    Attributes
    ----------
    key : int
        The task id; the key of its result in ``ConsumerPool.results()``.
    """

    def __init__(self, key: int) -> None:
        super().__init__()
        self.key = key

    def __repr__(self) -> str:
        state = "finished" if self.done() else "pending"
        return f"<TaskFuture key={self.key} {state}>"


class BatchFuture(_Awaitable):
    """The results of a batch, in submission order; resolves when every task has finished.

    ``result()`` returns the list of values, or raises :class:`~zdq.errors.BatchError` (which holds
    every error and every value) if any task failed. ``completed`` counts finished tasks as they
    arrive.

    Attributes
    ----------
    keys : range
        The task ids of the batch, in order.
    """

    def __init__(self, first_key: int, n: int) -> None:
        super().__init__()
        self.keys = range(first_key, first_key + n)
        self._values: list[Any] = [None] * n
        self._errors: dict[int, BaseException] = {}
        self._remaining = n
        self._fill_lock = threading.Lock()
        if n == 0:
            self.set_result([])

    @property
    def completed(self) -> int:
        return len(self._values) - self._remaining

    def _fill(self, offset: int, values: list[Any], errors: dict[int, BaseException]) -> None:
        """Record results of tasks ``offset .. offset+len(values)``; resolve when all are in."""
        with self._fill_lock:
            if self.done():
                return
            self._values[offset : offset + len(values)] = values
            for i, exc in errors.items():
                self._errors[offset + i] = exc
            self._remaining -= len(values)
            finished = self._remaining <= 0
        if finished:
            if self._errors:
                self.set_exception(BatchError(self._errors, self._values))
            else:
                self.set_result(self._values)

    def _fail(self, offset: int, n: int, exc: BaseException) -> None:
        self._fill(offset, [None] * n, dict.fromkeys(range(n), exc))

    def __repr__(self) -> str:
        return f"<BatchFuture {len(self.keys)} tasks, {self.completed} done>"
