"""daskqueue's queue classes that a program can use on their own: ``TransientQueue``, and
``QueuePoolActor``, a pool of them, from which consumer classes placed as Dask actors by hand
take items (:mod:`zdq.consumer.daskqueue_loop`), as daskqueue's own tests and programs did.

zdq's own queues are brokers reached over ZeroMQ (:class:`zdq.QueuePool`); nothing of zdq's own
path uses these. ``TransientQueue`` is daskqueue's in-memory queue, meant to be placed as a Dask actor
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
import operator
import threading
import time
from collections import deque
from collections.abc import Iterable
from queue import Empty, Full
from typing import Any, NoReturn

from zdq.client.queue_pool import Durability, durability_of
from zdq.client.submit import check_worker_class
from zdq.consumer.base import GeneralConsumer, Message
from zdq.consumer.daskqueue_loop import CALL_TIMEOUT, call_actor
from zdq.consumer.daskqueue_loop import count as _count  # the checks daskqueue's calls share
from zdq.consumer.daskqueue_loop import seconds as _seconds

__all__ = ["TransientQueue", "QueuePoolActor", "Empty", "Full"]

#: The most queues a QueuePoolActor places (each is a Dask actor, placed before it answers).
MAX_QUEUES = 1024

#: How long ``put(item)`` waits for room when it is given no timeout, in seconds: every wait of
#: zdq has a bound (daskqueue's waited for ever, holding the worker's event loop).
DEFAULT_PUT_TIMEOUT = 60.0


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

    async def put_back(self, items: Iterable[Any]) -> None:
        """Put ``items``, taken a moment ago, back at the front, in their order, whatever
        ``maxsize`` (they had room): a consumer placed by hand gives back so, when cancelled,
        what it took and had not started."""
        back = list(items)
        with self._lock:
            self._items.extendleft(reversed(back))

    async def get_up_to(self, n: int) -> list[Any]:
        """Up to ``n`` of the oldest items, at once: what the queue has, without daskqueue's
        ``None`` for each it had not (the consume loop of consumers placed by hand takes so)."""
        return self._take(_count(n, "n"))

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
    """daskqueue's pool of in-memory queues, to place as a Dask actor: ``n_queues``
    :class:`TransientQueue` actors, put to and handed to consumers in turn.

    ``client.submit(QueuePoolActor, 2, actor=True)`` places it and its queues (as daskqueue's
    did, each queue an actor of its own, wherever Dask puts it). Consumer classes placed as actors
    by hand with its handle as their ``pool`` take from its queues once started (daskqueue's
    ``consumer.start()``: :mod:`zdq.consumer.daskqueue_loop`). Every item travels by Dask actor
    calls, as in daskqueue: this is the path zdq exists to avoid, kept for the programs written
    for it. :class:`zdq.QueuePool` with :class:`zdq.ConsumerPool` is zdq's (brokers and consumers
    reached over ZeroMQ, with leases and retries).

    Its items live in its queues' memory, lost with their workers, as daskqueue's were.
    daskqueue's durable queue (its segment files) has no counterpart: ``durability="durable"``
    is refused, naming :class:`zdq.QueuePool`'s, which keeps tasks in LMDB.
    """

    def __init__(self, n_queues: Any, durability: Durability | str = Durability.TRANSIENT, ack_timeout: float = 5, retry: bool = False, **kwargs: Any) -> None:
        try:
            count = _count(n_queues, "n_queues")
        except ValueError:
            count = 0
        if not 1 <= count <= MAX_QUEUES:
            raise ValueError(f"n_queues must be an int from 1 to {MAX_QUEUES} (each queue is a Dask actor), got {n_queues!r}")
        if durability_of(durability) is Durability.DURABLE:
            raise NotImplementedError(
                "zdq has no counterpart of daskqueue's durable queue (its segment files): "
                "zdq.QueuePool(client, n_queues, durability='durable') keeps its tasks in LMDB"
            )
        if kwargs:
            raise TypeError(f"QueuePoolActor got unexpected keyword arguments: {', '.join(sorted(kwargs))}")
        self.n_queues = count
        self.durability = Durability.TRANSIENT
        self.ack_timeout = _seconds(ack_timeout, "ack_timeout")
        if not isinstance(retry, bool):
            raise TypeError(f"retry must be a bool, got {retry!r}")
        self.retry = retry
        self.worker_class = GeneralConsumer
        self._queues = _place_queues(count, self.ack_timeout, retry)
        self._index_queue = {q.key: q for q in self._queues}
        self._lock = threading.Lock()  # its plain methods run on the actor's thread, the rest on the loop
        self._turns = {"put": 0, "get": 0}
        self._total_put = 0

    def _next(self, turn: str) -> Any:
        with self._lock:
            i = self._turns[turn]
            self._turns[turn] = (i + 1) % self.n_queues
        return self._queues[i]

    def _counted(self, n: int) -> None:
        with self._lock:
            self._total_put += n

    async def _sizes(self) -> list[int]:
        return list(await asyncio.gather(*(call_actor(q, "qsize") for q in self._queues)))

    # -- what daskqueue's QueuePool and consumers asked ----------------------------------------------
    # Every method that asks its queues is a coroutine, on the worker's event loop: a plain one
    # would wait on the worker's one actor thread for another worker's, and two pools placed
    # crosswise would wait on each other.

    async def print(self) -> str:
        """The queues and their sizes, as daskqueue printed them."""
        sizes = await self._sizes()
        if len(sizes) < 5:
            return f"QueuePool : {self.n_queues} queue(s)" + "".join(
                f"\n\t{key}: {size} pending items" for key, size in zip(self._index_queue, sizes)
            )
        return f"QueuePool : \n\t{self.n_queues} queue(s) \n\t{self._total_put} received \n\t{sum(sizes)} pending"

    def get_len(self) -> int:
        return self.n_queues

    async def get_queues(self) -> list[Any]:
        return list(self._queues)

    def get_next_queue(self) -> Any:
        """The queue the next consumer takes from: each in turn."""
        return self._next("get")

    async def get_queue(self, idx: int) -> Any:
        return self._queues[idx]

    async def get_queue_size(self) -> dict[Any, int]:
        """Each queue (its handle) and how many items it holds."""
        return dict(zip(self._queues, await self._sizes()))

    async def get_max_queue(self) -> Any:
        """The queue that holds the most items; ``None`` when all are empty."""
        sizes = await self._sizes()
        most = max(range(len(sizes)), key=sizes.__getitem__)
        return self._queues[most] if sizes[most] else None

    # -- put -----------------------------------------------------------------------------------------

    async def submit(self, func: Any, *args: Any, timeout: float | None = None, worker_class: type = GeneralConsumer, **kwargs: Any) -> None:
        """Put ``Message(func, *args, **kwargs)``: a :class:`GeneralConsumer` runs it."""
        check_worker_class(worker_class)
        if not callable(func):
            raise TypeError(f"submit() takes a function to call, got {func!r:.80}")
        await self.put(Message(func, *args, **kwargs), timeout=timeout)

    async def put(self, msg: Any, timeout: float | None = None) -> None:
        """Put ``msg`` in the next queue, each in turn (``queue.Full`` after ``timeout``)."""
        bound = CALL_TIMEOUT if timeout is None else CALL_TIMEOUT + _seconds(timeout, "timeout")
        await call_actor(self._next("put"), "put", msg, timeout, timeout=bound)
        self._counted(1)

    async def put_many(self, list_items: Iterable[Any], timeout: float | None = None) -> None:
        """Put all of ``list_items`` in the next queue (none of them when they do not fit)."""
        items = list(list_items)
        if timeout is not None:
            _seconds(timeout, "timeout")
        await call_actor(self._next("put"), "put_many", items)
        self._counted(len(items))

    async def put_many_sync(self, list_items: Iterable[Any]) -> None:
        """:meth:`put_many` (daskqueue's ``batch_submit`` called it so)."""
        await self.put_many(list_items)

    async def put_nowait(self, item: Any) -> None:
        """Put ``item`` in the next queue, or ``queue.Full`` at once."""
        await call_actor(self._next("put"), "put_nowait", item)
        self._counted(1)

    def stop_gc(self) -> None:
        """daskqueue stopped its queues' redelivery threads; these run none."""


def _place_queues(n: int, ack_timeout: float, retry: bool) -> list[Any]:
    """``n`` TransientQueue actors, placed from the worker this runs on (a task's thread: it
    leaves the worker's pool of threads while it waits, so that the queues can be placed on this
    worker too), or from this process's Dask client."""
    from distributed import get_client, get_worker, wait, worker_client

    def place(client: Any) -> list[Any]:
        futures = [
            client.submit(TransientQueue, maxsize=-1, ack_timeout=ack_timeout, retry=retry, actor=True, pure=False)
            for _ in range(n)
        ]
        try:
            wait(futures, timeout=CALL_TIMEOUT)
        except TimeoutError:
            client.cancel(futures)
            raise TimeoutError(f"QueuePoolActor: placing its {n} TransientQueue actors took more than {CALL_TIMEOUT:g} s") from None
        return [future.result() for future in futures]

    try:
        get_worker()
    except ValueError:
        try:
            client = get_client()
        except ValueError:
            raise RuntimeError(
                "QueuePoolActor places its queues as Dask actors: make it as one, "
                "client.submit(QueuePoolActor, n_queues, actor=True), or where a Dask client is"
            ) from None
        return place(client)
    with worker_client() as client:
        return place(client)
