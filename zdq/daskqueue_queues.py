"""daskqueue's queue classes that a program can use on their own: ``TransientQueue``, and the
name ``QueuePoolActor``, which zdq refuses with what to use instead.

zdq's own queues are brokers reached over ZeroMQ (:class:`zdq.QueuePool`); nothing in zdq uses
these. ``TransientQueue`` is daskqueue's in-memory queue, meant to be placed as a Dask actor
(``client.submit(TransientQueue, maxsize=..., actor=True)``) and called through it: its
coroutine methods run on the worker's event loop, its plain ones on the actor's thread, and
every one of them is safe beside the others. Unlike daskqueue's, no call blocks the worker's
event loop, and every wait is bounded.

>>> import asyncio
>>> q = TransientQueue(maxsize=2)
>>> asyncio.run(q.put_many([1, 2])); q.qsize(), q.full()
(2, True)
>>> q.put_nowait(3)
Traceback (most recent call last):
...
queue.Full: TransientQueue is full: maxsize 2 (holds 2)
>>> asyncio.run(q.get()), q.get_nowait(), q.get_nowait()
(1, 2, None)
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from queue import Empty, Full
from typing import Any, NoReturn

from zdq.client.queue_pool import Durability

__all__ = ["TransientQueue", "QueuePoolActor", "Empty", "Full"]

#: How long ``put(item)`` waits for room when it is given no timeout, in seconds: every wait of
#: zdq has a bound (daskqueue's waited for ever, holding the worker's event loop).
DEFAULT_PUT_TIMEOUT = 60.0

_POLL_FIRST, _POLL_MOST = 0.001, 0.02  # an async wait's first and longest sleep between looks


def _seconds(timeout: Any, name: str) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0, got {timeout!r}")
    return float(timeout)


class TransientQueue:
    """daskqueue's in-memory FIFO queue, to place as a Dask actor; ``maxsize <= 0`` is unbounded.

    Its items live in the memory of the process that holds it: they are lost with that worker,
    as daskqueue's were. An item is handed out once: ``ack_timeout`` and ``retry`` are taken for
    daskqueue's signature and kept as attributes, but nothing is redelivered (daskqueue's
    redelivery of unacknowledged items never ran: its collector wrote to a table that did not
    exist). zdq's pools do not use this class; their queues are brokers with leases and retries
    (:class:`zdq.QueuePool`).
    """

    def __init__(self, maxsize: int = -1, ack_timeout: float = 5, retry: bool = False) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"maxsize must be an int (<= 0: unbounded), got {maxsize!r}")
        self.ack_timeout = _seconds(ack_timeout, "ack_timeout")
        if not isinstance(retry, bool):
            raise TypeError(f"retry must be a bool, got {retry!r}")
        self.retry = retry
        self.maxsize = maxsize
        self.durability = Durability.TRANSIENT
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()  # the event loop's calls and the actor thread's share the items

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

    def put_nowait_batch(self, items: Iterable[Any]) -> None:
        """Add every one of ``items``, or none of them (``queue.Full``) when they do not all fit."""
        self._add(list(items))

    async def put_many(self, list_items: Iterable[Any]) -> None:
        """Add every one of ``list_items``, or none of them (``queue.Full``)."""
        self._add(list(list_items))

    def put_sync(self, item: Any, timeout: float | None = None) -> None:
        """Add ``item``, waiting for room up to ``timeout`` seconds (none given:
        :data:`DEFAULT_PUT_TIMEOUT`); ``queue.Full`` naming the wait after it. Blocks the calling
        thread: as an actor's plain method, the actor's thread, never the worker's event loop."""
        wait = _Wait(DEFAULT_PUT_TIMEOUT if timeout is None else _seconds(timeout, "timeout"))
        while not self._offer(item):
            time.sleep(wait.pause() or self._full_after(timeout))

    async def put(self, item: Any, timeout: float | None = None) -> None:
        """Add ``item``, waiting for room up to ``timeout`` seconds (none given:
        :data:`DEFAULT_PUT_TIMEOUT`) without holding the event loop; ``queue.Full`` after it."""
        wait = _Wait(DEFAULT_PUT_TIMEOUT if timeout is None else _seconds(timeout, "timeout"))
        while not self._offer(item):
            await asyncio.sleep(wait.pause() or self._full_after(timeout))

    def _offer(self, item: Any) -> bool:
        """Add ``item`` if there is room; whether there was."""
        with self._lock:
            if 0 < self.maxsize <= len(self._items):
                return False
            self._items.append(item)
            return True

    def _full_after(self, timeout: float | None) -> NoReturn:
        waited = f"{timeout:g} s" if timeout is not None else f"{DEFAULT_PUT_TIMEOUT:g} s (no timeout was given)"
        raise Full(f"TransientQueue is full: maxsize {self.maxsize} (holds {len(self._items)}); waited {waited} for room")

    # -- get ---------------------------------------------------------------------------------------

    def get_nowait(self) -> Any:
        """The oldest item, or ``None`` when the queue is empty (daskqueue's answer)."""
        with self._lock:
            return self._items.popleft() if self._items else None

    def get_nowait_batch(self, num_items: int) -> list[Any]:
        """The ``num_items`` oldest items, or ``queue.Empty`` (taking none) when there are fewer."""
        if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 0:
            raise ValueError(f"num_items must be an int >= 0, got {num_items!r}")
        with self._lock:
            if num_items > len(self._items):
                raise Empty(f"cannot get {num_items} items from a TransientQueue of {len(self._items)}")
            return [self._items.popleft() for _ in range(num_items)]

    def get_sync(self, timeout: float | None = None) -> Any:
        """The oldest item, waiting for one up to ``timeout`` seconds (none given: no wait);
        ``None`` when none came. Blocks the calling thread (see :meth:`put_sync`)."""
        wait = _Wait(0.0 if timeout is None else _seconds(timeout, "timeout"))
        while (item := self._take()) is _NOTHING:
            pause = wait.pause()
            if not pause:
                return None
            time.sleep(pause)
        return item

    async def get(self, timeout: float | None = None) -> Any:
        """The oldest item, waiting for one up to ``timeout`` seconds (none given: no wait) without
        holding the event loop; ``None`` when none came (daskqueue's answer for an empty queue)."""
        wait = _Wait(0.0 if timeout is None else _seconds(timeout, "timeout"))
        while (item := self._take()) is _NOTHING:
            pause = wait.pause()
            if not pause:
                return None
            await asyncio.sleep(pause)
        return item

    async def get_many(self, n: int, timeout: float | None = None) -> list[Any]:
        """``n`` answers of :meth:`get`, as daskqueue gave them: the oldest items, then ``None``
        for each the queue did not have (``timeout`` is the wait for the first item only)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if n == 0:
            return []
        first = await self.get(timeout)
        with self._lock:
            rest = [self._items.popleft() if self._items else None for _ in range(n - 1)]
        return [first, *rest]

    def _take(self) -> Any:
        with self._lock:
            return self._items.popleft() if self._items else _NOTHING


_NOTHING = object()  # no item (``None`` may be one)


class _Wait:
    """The sleeps of a wait that looks again after each, up to ``bound`` seconds from now."""

    def __init__(self, bound: float) -> None:
        self._give_up = time.monotonic() + bound
        self._next = _POLL_FIRST

    def pause(self) -> float:
        """The next sleep: shorter ones first, none past the bound; ``0.0`` once it has passed."""
        left = self._give_up - time.monotonic()
        if left <= 0:
            return 0.0
        pause, self._next = min(self._next, left), min(self._next * 2, _POLL_MOST)
        return pause


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

