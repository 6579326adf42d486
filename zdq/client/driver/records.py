"""A chunk's record from submission to its last result, and the few helpers that settle futures.

A :class:`Record`'s fields belong to the ledger and are read and written under its lock
(``Ledger.cond``); its futures are settled after the lock is released (see
:mod:`zdq.client.driver.ledger` for the ownership table).
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from collections.abc import Iterable
from concurrent.futures import InvalidStateError
from typing import Any, Protocol

from zdq.errors import TaskCancelled
from zdq.futures import BatchFuture, SignalSafeCondition, TaskFuture, notify_cancelled
from zdq.codec.timing import Timing

__all__ = ["Books", "Loose", "NO_CONSUMER", "Record", "Settlement", "cancel_future", "cancellation", "settle"]

#: The producer of the results of tasks that failed without running (their queue was lost, the
#: pool closed, ...): ``ConsumerPool.results()`` shows them under ``"not-run"``.
NO_CONSUMER = b""


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
    notify_cancelled(fut)  # concurrent.futures.wait() and as_completed() see it done


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


class Books(Protocol):
    """The ledger's buffers as :class:`~zdq.client.driver.outcomes.Outcomes` sees them.

    The ledger owns them (under ``cond``); outcomes settle and fail records in the same books, so
    they are typed against this shape rather than the ledger's class, which would make the two
    modules import each other.
    """

    name: str
    queue_names: list[str]
    cond: SignalSafeCondition
    loose: list[Loose]
    queued: deque[Record]
    pinned: dict[int, deque[Record]]
    following: set[int]
    records: dict[int, Record]
    buffered_chunks: int
    buffered_bytes: int
    closed_by: BaseException | None
    submitted: int
    packing: tuple[int, int] | None
    max_pending: int | None

    def unqueue(self, rec: Record) -> bool: ...
