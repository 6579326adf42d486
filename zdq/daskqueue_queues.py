"""daskqueue's queue classes that a program can use on their own: ``TransientQueue``, and the
name ``QueuePoolActor``, which zdq refuses with what to use instead.

zdq's own queues are brokers reached over ZeroMQ (:class:`zdq.QueuePool`); nothing in zdq uses
these. ``TransientQueue`` is daskqueue's in-memory queue, meant to be placed as a Dask actor
(``client.submit(TransientQueue, maxsize=..., actor=True)``) and called through it: its
coroutine methods run on the worker's event loop, its plain ones on the actor's one thread
(Dask's), and every one of them is safe beside the others.

Only :meth:`TransientQueue.put` waits (for room), on the event loop, woken by the call that
makes room, within a bound. daskqueue's put held the worker's event loop for as long as the
queue stayed full. Nothing else waits. A plain method that waited would hold the actor's one
thread, and with it every other plain call to the worker's actors. A get that waited for an
item would take it for a caller who may have given up meanwhile (Dask does not cancel an
actor's call), and that item would be lost. daskqueue's get answered at once, too.

>>> import asyncio
>>> q = TransientQueue(maxsize=2)
>>> asyncio.run(q.put_many([1, 2])); q.qsize(), q.full()
(2, True)
>>> q.put_nowait(3)
Traceback (most recent call last):
...
queue.Full: TransientQueue is full: maxsize 2 (holds 2)
>>> asyncio.run(q.get()), q.get_nowait(), asyncio.run(q.get())
(1, 2, None)
"""

from __future__ import annotations

import asyncio
import math
import numbers
import operator
import threading
import time
from collections import deque
from collections.abc import Iterable
from queue import Empty, Full
from typing import Any, NoReturn

from zdq.client.queue_pool import Durability
from zdq.consumer.base import Message

__all__ = ["TransientQueue", "QueuePoolActor", "Empty", "Full"]

#: How long ``put(item)`` waits for room when it is given no timeout, in seconds: every wait of
#: zdq has a bound (daskqueue's waited for ever, holding the worker's event loop).
DEFAULT_PUT_TIMEOUT = 60.0


def _seconds(timeout: Any, name: str) -> float:
    """``timeout`` as a finite number of seconds >= 0 (any real number: numpy's too)."""
    try:
        if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
            raise TypeError
        seconds = float(timeout)
    except (TypeError, OverflowError):
        seconds = math.nan
    if not (0 <= seconds < math.inf):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {timeout!r}")
    return seconds


def _count(n: Any, name: str) -> int:
    """``n`` as an int >= 0 (numpy's integers too)."""
    try:
        if isinstance(n, bool):
            raise TypeError
        value = operator.index(n)
    except TypeError:
        value = -1
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    return value


def _no_wait(timeout: Any, call: str, instead: str) -> None:
    """Refuse a wait that ``call`` never does (see the module's docstring)."""
    if timeout is not None and _seconds(timeout, "timeout") > 0:
        raise ValueError(f"TransientQueue.{call} never waits (timeout={timeout!r}): {instead}")


class TransientQueue:
    """daskqueue's in-memory FIFO queue, to place as a Dask actor; ``maxsize <= 0`` is unbounded.

    Its items live in the memory of the process that holds it: they are lost with that worker,
    as daskqueue's were. An item is handed out once: ``ack_timeout`` and ``retry`` are taken for
    daskqueue's signature and kept as attributes, and :meth:`ack` has nothing to acknowledge
    (daskqueue's redelivery of unacknowledged items never ran: its collector wrote to a table that
    did not exist). zdq's pools do not use this class; their queues are brokers with leases and
    retries (:class:`zdq.QueuePool`).
    """

    def __init__(self, maxsize: Any = -1, ack_timeout: float = 5, retry: bool = False) -> None:
        try:
            if isinstance(maxsize, bool):
                raise TypeError
            whole = isinstance(maxsize, float) and maxsize.is_integer()  # daskqueue's Queue took 2.0
            self.maxsize = int(maxsize) if whole else operator.index(maxsize)
        except TypeError:
            raise TypeError(f"maxsize must be an int (<= 0: unbounded), got {maxsize!r}") from None
        self.ack_timeout = _seconds(ack_timeout, "ack_timeout")
        if not isinstance(retry, bool):
            raise TypeError(f"retry must be a bool, got {retry!r}")
        self.retry = retry
        self.durability = Durability.TRANSIENT
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()  # the event loop's calls and the actor thread's share the items
        #: The puts waiting for room, oldest first: a take of n items wakes the n oldest (on their
        #: loops). One that gave up stays, marked gone, until a take or a compaction drops it.
        self._room: deque[_Waiter] = deque()
        self._gone = 0  # how many of them are gone

    def __repr__(self) -> str:
        return f"<TransientQueue: {self.qsize()} item(s), maxsize {self.maxsize}>"

    # -- sizes -------------------------------------------------------------------------------------

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._items)

    # -- put ---------------------------------------------------------------------------------------

    def _add(self, items: list[Any]) -> None:
        """All of ``items``, or none of them (``queue.Full``)."""
        with self._lock:
            if self.maxsize > 0 and len(self._items) + len(items) > self.maxsize:
                raise Full(
                    f"TransientQueue is full: maxsize {self.maxsize} (holds {len(self._items)})"
                    + (f"; {len(items)} items do not fit" if len(items) > 1 else "")
                )
            self._items.extend(items)

    def put_nowait(self, item: Any) -> None:
        """Add ``item``, or raise ``queue.Full`` at once."""
        self._add([item])

    def put_sync(self, item: Any, timeout: float | None = None) -> None:
        """Add ``item``, or raise ``queue.Full`` at once (daskqueue's waited for room, for ever)."""
        _no_wait(timeout, "put_sync", "a wait would hold the actor's one thread; await put(item, timeout=...) instead")
        self._add([item])

    def put_nowait_batch(self, items: Iterable[Any]) -> None:
        """Add every one of ``items``, or none of them (``queue.Full``) when they do not all fit."""
        self._add(list(items))

    async def put_many(self, list_items: Iterable[Any]) -> None:
        """Add every one of ``list_items``, or none of them (``queue.Full``)."""
        self._add(list(list_items))

    async def put(self, item: Any, timeout: float | None = None) -> None:
        """Add ``item``, waiting for room up to ``timeout`` seconds (none given:
        :data:`DEFAULT_PUT_TIMEOUT`) without holding the event loop; ``queue.Full`` after it.

        As an actor's call, a put whose caller gave up waiting for its answer goes on waiting on
        the worker (Dask does not cancel an actor's call), and its item goes in if room comes
        within the put's own timeout: give ``timeout`` shorter than the caller's wait."""
        bound = DEFAULT_PUT_TIMEOUT if timeout is None else _seconds(timeout, "timeout")
        give_up = time.monotonic() + bound
        loop: asyncio.AbstractEventLoop | None = None
        while True:
            with self._lock:
                if not 0 < self.maxsize <= len(self._items):
                    self._items.append(item)
                    return
                loop = loop or asyncio.get_running_loop()
                waiter = _Waiter(loop)
                self._room.append(waiter)  # under the lock: a take after this wakes it
            left = give_up - time.monotonic()
            try:
                if left > 0:
                    await asyncio.wait([waiter.room], timeout=left)
            except BaseException:  # cancelled: the room a take made for it goes to the next put
                with self._lock:
                    passed_on = self._next_waiters(1) if waiter.woken else []
                    if not waiter.woken:
                        self._give_up(waiter)
                _notify(passed_on)
                raise
            with self._lock:
                if not waiter.woken:  # timed out: no take counts on it any more
                    self._give_up(waiter)
            if not waiter.woken:
                self._full_after(timeout, bound)

    def _give_up(self, waiter: _Waiter) -> None:
        """Mark ``waiter`` gone (under the lock); drop the gone once they are half the waiters."""
        waiter.gone = True
        self._gone += 1
        if self._gone * 2 > len(self._room):
            self._room = deque(w for w in self._room if not w.gone)
            self._gone = 0

    def _next_waiters(self, n: int) -> list[_Waiter]:
        """The ``n`` oldest puts still waiting, marked woken (under the lock; wake them with
        :func:`_notify` once it is released)."""
        woken: list[_Waiter] = []
        while len(woken) < n and self._room:
            waiter = self._room.popleft()
            if waiter.gone:
                self._gone -= 1
            else:
                waiter.woken = True
                woken.append(waiter)
        return woken

    def _full_after(self, timeout: float | None, bound: float) -> NoReturn:
        waited = f"{bound:g} s" if timeout is not None else f"{bound:g} s (no timeout was given)"
        raise Full(f"TransientQueue is full: maxsize {self.maxsize} (holds {len(self._items)}); waited {waited} for room")

    # -- get ---------------------------------------------------------------------------------------

    def _take(self, n: int, exactly: bool = False) -> list[Any]:
        """Up to ``n`` of the oldest items (``exactly``: all ``n`` or ``queue.Empty``, taking
        none); as many waiting puts as items taken are woken."""
        with self._lock:
            if exactly and n > len(self._items):
                raise Empty(f"cannot get {n} items from a TransientQueue of {len(self._items)}")
            taken = [self._items.popleft() for _ in range(min(n, len(self._items)))]
            woken = self._next_waiters(len(taken)) if self._room else []
        _notify(woken)
        now = time.time()
        for item in taken:
            if isinstance(item, Message):
                item.delivered_timestamp = now  # as daskqueue's queue marked a message it handed out
        return taken

    def get_nowait(self) -> Any:
        """The oldest item, or ``queue.Empty`` when there is none (as daskqueue's raised)."""
        taken = self._take(1)
        if not taken:
            raise Empty("the TransientQueue is empty")
        return taken[0]

    def get_nowait_batch(self, num_items: int) -> list[Any]:
        """The ``num_items`` oldest items, or ``queue.Empty`` (taking none) when there are fewer."""
        return self._take(_count(num_items, "num_items"), exactly=True)

    def get_sync(self, timeout: float | None = None) -> Any:
        """The oldest item, or ``None`` when there is none, at once (as daskqueue's)."""
        _no_wait(timeout, "get_sync", "a wait would hold the actor's one thread, and take an item its caller may have given up on")
        taken = self._take(1)
        return taken[0] if taken else None

    async def get(self, timeout: float | None = None) -> Any:
        """The oldest item, or ``None`` when there is none, at once (daskqueue's answer;
        ``timeout``, taken for its signature, is never waited: an item taken by a get whose caller
        gave up would be lost)."""
        if timeout is not None:
            _seconds(timeout, "timeout")
        taken = self._take(1)
        return taken[0] if taken else None

    async def get_many(self, n: int, timeout: float | None = None) -> list[Any]:
        """``n`` answers of :meth:`get`, as daskqueue gave them: the oldest items, then ``None``
        for each the queue did not have."""
        count = _count(n, "n")
        if timeout is not None:
            _seconds(timeout, "timeout")
        taken = self._take(count)
        return taken + [None] * (count - len(taken))

    # -- daskqueue's acknowledgements ----------------------------------------------------------------

    async def ack(self, timestamp: float, msg_id: Any) -> bool:
        """daskqueue's acknowledgement of a delivered item: nothing is redelivered here, so there
        is nothing to acknowledge; ``True``, as daskqueue's answered."""
        return True

    async def ack_many(self, items: Iterable[tuple[float, Any]]) -> None:
        """:meth:`ack` of each ``(timestamp, id)``: nothing to do (see :meth:`ack`)."""
        for timestamp, msg_id in items:
            await self.ack(timestamp, msg_id)

    def stop_gc(self) -> None:
        """daskqueue stopped its redelivery thread here; this queue runs none."""


class _Waiter:
    """A put waiting for room: its loop, the future a take completes, and how it ended (each
    written under the queue's lock)."""

    __slots__ = ("loop", "room", "woken", "gone")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.room: asyncio.Future[None] = loop.create_future()
        self.woken = False  # a take made room for it: it tries again
        self.gone = False  # it timed out or was cancelled first


def _notify(woken: list[_Waiter]) -> None:
    """Complete each woken put's future, on its own loop."""
    for waiter in woken:
        try:
            waiter.loop.call_soon_threadsafe(_wake, waiter.room)
        except RuntimeError:  # its loop closed: that put is gone
            pass


def _wake(room: asyncio.Future[None]) -> None:
    if not room.done():
        room.set_result(None)


class QueuePoolActor:
    """daskqueue's actor that held a pool's queues and took every task through Dask actor calls.

    zdq has none: its :class:`zdq.QueuePool` places brokers as actors and sends tasks to them over
    ZeroMQ. The name exists so that modules importing it load; making one raises, naming what to
    use instead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "zdq has no QueuePoolActor: daskqueue's actor that took every task through Dask actor calls. "
            "Use zdq.QueuePool(client, n_queues, ...) (its queues are brokers reached over ZeroMQ) with "
            "zdq.ConsumerPool; for daskqueue's in-memory queue as a Dask actor, zdq.TransientQueue"
        )
