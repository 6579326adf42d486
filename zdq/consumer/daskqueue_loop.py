"""daskqueue's consume loop, for a consumer class placed as a Dask actor by hand.

zdq's consumers are placed by :class:`zdq.ConsumerPool`, which runs their ``process_item`` on
zdq's own consumer (ZeroMQ, leases, retries); none of this module is on that path. daskqueue
0.2 had no other way: its ``ConsumerPool`` made each consumer class a Dask actor, given a
``QueuePoolActor`` handle as ``pool``, and called ``start()``, which ran a loop on the worker's
event loop taking items from one of the pool's ``TransientQueue`` actors and handing each to
``process_item`` in the worker's executor. Programs and tests written for it do the same by hand::

    pool = await client.submit(QueuePoolActor, 1, actor=True)
    consumer = await client.submit(DummyConsumer, 1, "c", pool, 10, 100, 1, False, actor=True)
    await consumer.start()

:class:`DaskqueueLoop` is that loop, mixed into :class:`~zdq.consumer.base.ConsumerBaseClass`,
with daskqueue's method names. As in daskqueue, a consumer takes from one queue of the pool (the
pool hands them out in turn; a queue no consumer was given keeps its items: place at least as
many consumers as queues), and its items travel by Dask actor calls. Where daskqueue's loop lost
items or ran on unasked, this one does not:

- ``cancel()`` gives the items of the batch it took that have not started back to the front of
  their queue (daskqueue cancelled its loop mid-get, and the items the queue had handed over were
  lost), and waits for those running. A ``cancel()`` that reaches the consumer while ``start()``
  waits for its queue wins, as the later call (two calls sent without waiting for the first may
  reach it in either order: Dask does not order them); a ``start()`` after it resumes on the
  same queue.
- A take that its queue is slow to answer is waited for (said in the log every
  :data:`CALL_TIMEOUT`), never abandoned: Dask does not cancel an actor's call, so the items it
  takes would be lost. Meanwhile the scheduler is asked every :data:`LIVENESS_EVERY` whether the
  queue's worker is still there (Dask's call to an actor whose worker died never answers): one
  that left ends the loop (``loop_error``), and what was to go back to it runs here.
- An empty queue is asked again after a pause that grows to :data:`IDLE_CAP`, and answers with the
  items it has (not ``batch_size`` fillers: daskqueue's ``get_many`` padded with ``None``, which
  made ``None`` an item no one got, and an idle consumer of a large batch a busy one).
- An item whose ``process_item`` raises is logged and counted (``failed_items``); a coroutine
  ``process_item`` is awaited. An early acknowledgement that fails is logged; its batch runs.
- A consumer whose actor Dask has released stops taking items.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import numbers
import operator
import time
from collections.abc import Awaitable
from typing import Any

__all__ = ["CALL_TIMEOUT", "DaskqueueLoop", "call_actor", "count", "seconds"]

logger = logging.getLogger(__name__)

#: Seconds an actor call of daskqueue's loops may take before it is an error naming the call (a
#: take is waited for longer: see the module's docstring).
CALL_TIMEOUT = 60.0
#: An empty queue is asked again after this pause, doubled at each empty answer up to the cap:
#: daskqueue's asked again at once, for ever (an idle consumer costs its queue's worker about ten
#: calls a second; a new item waits at most the cap for an idle consumer).
IDLE_FIRST, IDLE_CAP = 0.001, 0.1
#: While a queue's call is waited for, how often the scheduler is asked whether the queue's
#: worker is still there (and how long its answer may take: no answer counts as there).
LIVENESS_EVERY, LIVENESS_ANSWER = 2.0, 10.0
#: How long ``cancel()`` waits, by default, for the loop and the items already handed on.
CANCEL_TIMEOUT = 300.0


def _named(handle: Any, method: str) -> str:
    cls = getattr(handle, "_cls", None) or type(handle)  # a Dask actor handle's class, else the object's
    key = getattr(handle, "key", None)
    return f"{cls.__name__}.{method}()" + (f" of actor {key}" if isinstance(key, str) else "")


async def call_actor(handle: Any, method: str, *args: Any, timeout: float | None = CALL_TIMEOUT, caller: str = "") -> Any:
    """``handle.method(*args)`` from a coroutine: a Dask actor handle's call (an awaitable
    future; a coroutine when the actor is in this worker), or a plain object's method.

    Waited for up to ``timeout`` seconds (``TimeoutError`` naming the call, which may still take
    effect: Dask does not cancel an actor's call) or, with ``None``, however long it takes, said in
    the log every :data:`CALL_TIMEOUT` (for ``caller``): a take or a give-back abandoned would
    still act, on items no one then holds. Meanwhile, every :data:`LIVENESS_EVERY`, the scheduler
    is asked whether the actor's worker is still there (Dask's call to an actor whose worker died
    never answers): ``ConnectionError`` once it is not."""
    answer = getattr(handle, method)(*args)
    if not isinstance(answer, Awaitable):
        return answer
    calling = asyncio.ensure_future(_awaited(answer))
    began, said = time.monotonic(), 0
    while True:
        slice_ = LIVENESS_EVERY if timeout is None else min(LIVENESS_EVERY, max(0.0, began + timeout - time.monotonic()))
        finished, _ = await asyncio.wait([calling], timeout=slice_)
        if finished:
            return calling.result()
        waited = time.monotonic() - began
        if timeout is not None and waited >= timeout:
            calling.cancel()
            raise TimeoutError(
                f"{_named(handle, method)} did not answer within {timeout:g} s (Dask does not cancel an actor's call: it may still take effect)"
            )
        if not await _holder_alive(handle):
            calling.cancel()
            raise ConnectionError(f"{_named(handle, method)}: its worker {getattr(handle, '_address', '?')} has left the cluster")
        if timeout is None and waited >= (said + 1) * CALL_TIMEOUT:
            said += 1
            logger.warning("[%s] %s has not answered for %.0f s; still waiting", caller, _named(handle, method), waited)


async def _holder_alive(handle: Any) -> bool:
    """Whether the scheduler still knows the worker holding ``handle`` (True when it cannot
    tell: not on a worker, or no answer in time)."""
    from distributed import get_worker

    address = getattr(handle, "_address", None)
    try:
        scheduler = get_worker().scheduler
    except ValueError:
        return True
    if not isinstance(address, str):
        return True
    try:
        workers = await asyncio.wait_for(scheduler.ncores(), LIVENESS_ANSWER)
    except Exception:
        return True
    return address in workers


async def _awaited(answer: Awaitable[Any]) -> Any:
    return await answer


def seconds(value: Any, name: str) -> float:
    """``value`` as a finite number of seconds >= 0 (any real number: numpy's too)."""
    try:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError
        result = float(value)
    except (TypeError, OverflowError):
        result = math.nan
    if not (0 <= result < math.inf):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return result


def count(value: Any, name: str, least: int = 0) -> int:
    """``value`` as an int >= ``least`` (numpy's integers too)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        result = operator.index(value)
    except TypeError:
        result = least - 1
    if result < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return result


class DaskqueueLoop:
    """daskqueue's consumer actor methods (see the module's docstring). They use the consumer's
    ``pool``, ``batch_size``, ``max_concurrency``, ``early_ack``, ``items``, ``_running_tasks``,
    ``_executor`` and ``process_item``, which :class:`ConsumerBaseClass` sets."""

    # Set by ConsumerBaseClass.__init__ (the defaults: for a subclass whose __init__ skipped it).
    pool: Any = None
    name: str = ""
    batch_size: int | None = None
    max_concurrency: int = 1
    early_ack: bool = False
    _executor: Any = None
    _worker: Any = None
    items: list[Any]
    _running_tasks: list[Any]
    #: The loop's task (daskqueue's name) and the queue it takes from (kept across restarts);
    #: ``failed_items`` counts the items whose process_item raised, ``loop_error`` is what ended
    #: the loop otherwise (its queue's worker lost, an actor call that failed).
    fetch_loop: asyncio.Task[None] | None = None
    _current_q: Any = None
    failed_items: int = 0
    loop_error: BaseException | None = None
    #: Whether the consumer should be taking items: start() sets it, cancel() clears it, the loop
    #: runs while it is set. One flag for both, so that the later call wins however they overlap.
    _wanted: bool = False
    _start_lock: asyncio.Lock | None = None  # one start() at a time: never two loops

    def process_item(self, item: Any) -> Any:
        raise NotImplementedError

    # -- what daskqueue's ConsumerPool asked ---------------------------------------------------------

    async def len_items(self) -> int:
        """How many items this consumer has been handed."""
        return len(self.items)

    async def len_pending_items(self) -> int:
        """How many of them are still running."""
        self._drop_finished()
        return len(self._running_tasks)

    async def get_items(self) -> list[Any]:
        """The items this consumer has been handed, in order."""
        return self.items

    async def get_current_queue(self) -> Any:
        """The queue (actor handle) this consumer takes from; ``None`` before :meth:`start`."""
        return self._current_q

    async def update_state(self) -> None:
        """Forget the items that have finished running (daskqueue's name)."""
        self._drop_finished()

    async def done(self) -> bool:
        """Whether the loop has ended and no item is running; ``False`` before :meth:`start`."""
        self._drop_finished()
        return self.fetch_loop is not None and self.fetch_loop.done() and not self._running_tasks

    async def is_consumming(self) -> bool:
        """Whether the loop runs (daskqueue's spelling)."""
        return self.fetch_loop is not None and not self.fetch_loop.done()

    # -- start and cancel ----------------------------------------------------------------------------

    async def start(self, timeout: float | None = 1) -> None:
        """Take items from a queue of the pool: the one this consumer had, else the pool's next
        (``pool.get_next_queue()``). ``timeout`` (daskqueue's wait of each get) is checked and
        not used: an empty queue is asked again after a growing pause.
        A loop that runs goes on (daskqueue started a second one); one that a ``cancel()`` is
        stopping goes on instead of stopping."""
        if timeout is not None:
            seconds(timeout, "start(timeout=...)")
        size = 1 if self.batch_size is None else count(self.batch_size, "batch_size", 1)
        limit = 1 if self.max_concurrency is None else count(self.max_concurrency, "max_concurrency", 1)
        if self._current_q is None and not hasattr(self.pool, "get_next_queue"):
            raise TypeError(
                f"{type(self).__name__}.start() takes items from a daskqueue QueuePoolActor given as its pool, "
                f"got {self.pool!r}; a consumer of zdq.ConsumerPool is started by the pool itself"
            )
        if "items" not in self.__dict__:
            self.items, self._running_tasks = [], []
        self._wanted = True
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.fetch_loop is not None and not self.fetch_loop.done():
                return  # it sees _wanted set again and goes on
            if self._current_q is None:
                queue = await call_actor(self.pool, "get_next_queue")
                self._current_q = self._current_q or queue
            if not self._wanted:
                return  # a cancel() came while the pool answered: it is the later call
            self.loop_error = None
            self.fetch_loop = asyncio.ensure_future(self._guarded(size, limit))

    async def cancel(self, timeout: float | None = CANCEL_TIMEOUT) -> bool:
        """Stop the loop: what it took and has not started goes back to its queue. Wait up to
        ``timeout`` seconds for it and for the items running; ``True`` when all of them ended,
        ``False`` too when a ``start()`` came meanwhile (the later call: the loop goes on)."""
        bound = CANCEL_TIMEOUT if timeout is None else seconds(timeout, "cancel(timeout=...)")
        self._wanted = False
        loop = self.fetch_loop
        give_up = time.monotonic() + bound
        # Until the loop ends, the bound passes, or a start() wants it again (the later call).
        while loop is not None and not loop.done() and not self._wanted and time.monotonic() < give_up:
            await asyncio.wait([loop], timeout=min(0.05, max(0.0, give_up - time.monotonic())))
        self._drop_finished()
        if self._running_tasks:
            await asyncio.wait(list(self._running_tasks), timeout=max(0.0, give_up - time.monotonic()))
            self._drop_finished()
        loop_ended = loop is None or loop.done()
        if self._wanted:  # a start() came meanwhile: it is the later call, and the loop goes on
            return False
        if not loop_ended or self._running_tasks:
            logger.warning(
                "[%s] cancel(): after %.1f s, %s%d item(s) still running", self.name, time.monotonic() - (give_up - bound),
                "the loop still waiting for its queue, " if not loop_ended else "", len(self._running_tasks),
            )
        return loop_ended and not self._running_tasks

    # -- the loop ------------------------------------------------------------------------------------

    async def _guarded(self, size: int, limit: int) -> None:
        """:meth:`_consume`, its end logged and kept when an actor call fails (nobody awaits it)."""
        try:
            await self._consume(size, limit)
        except Exception as e:
            self.loop_error = e
            logger.error("[%s] the consume loop ended: %s: %s", self.name, type(e).__name__, e)

    async def _consume(self, size: int, limit: int) -> None:
        """Take up to ``size`` items at a time from the queue and run each in the worker's
        executor, at most ``limit`` at once, while wanted and while this actor is the worker's."""
        queue = self._current_q
        idle = IDLE_FIRST
        while self._wanted and self._placed():
            taken = await self._take(queue, size)
            if not taken:
                await asyncio.sleep(idle)
                idle = min(idle * 2, IDLE_CAP)
                continue
            idle = IDLE_FIRST
            if self.early_ack:
                try:
                    await self._ack_items(taken)
                except Exception as e:  # the items are taken: they run all the same
                    logger.error("[%s] acknowledging a batch of %d failed: %s: %s", self.name, len(taken), type(e).__name__, e)
            for i, item in enumerate(taken):
                await self._free_slot(limit)
                if not self._wanted:  # cancelled: what has not started goes back, first in line
                    await self._give_back(queue, taken[i:], limit)
                    break
                self._start_item(queue, item)

    async def _give_back(self, queue: Any, items: list[Any], limit: int) -> None:
        """Put ``items`` back at the front of ``queue`` (waited for as a take is: a put back
        abandoned may still go in). A queue that cannot take them (its worker lost, an older
        queue without ``put_back``) leaves them here: they run, as taken."""
        try:
            await call_actor(queue, "put_back", items, timeout=None, caller=self.name)
        except Exception as e:
            logger.warning("[%s] giving %d item(s) back failed (%s: %s): running them", self.name, len(items), type(e).__name__, e)
            for item in items:
                self._drop_finished()
                while len(self._running_tasks) >= limit:
                    await asyncio.wait(self._running_tasks, return_when=asyncio.FIRST_COMPLETED)
                    self._drop_finished()
                self._start_item(queue, item)

    async def _take(self, queue: Any, size: int) -> list[Any]:
        """Up to ``size`` items of ``queue``."""
        if hasattr(queue, "get_up_to"):
            taken: list[Any] = await call_actor(queue, "get_up_to", size, timeout=None, caller=self.name)
            return taken
        return [item for item in await call_actor(queue, "get_many", size, timeout=None, caller=self.name) if item is not None]

    def _placed(self) -> bool:
        """Whether this consumer is still an actor of its worker (Dask drops a released one,
        whose loop would otherwise take items for nobody); outside a worker, always."""
        actors = getattr(getattr(self._worker, "state", None), "actors", None)
        return actors is None or any(actor is self for actor in actors.values())

    async def _free_slot(self, limit: int) -> None:
        """Return once fewer than ``limit`` items run, or once a ``cancel()`` came (it gives the
        rest back at once, without waiting for a slot)."""
        self._drop_finished()
        while len(self._running_tasks) >= limit and self._wanted:
            await asyncio.wait(self._running_tasks, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
            self._drop_finished()

    def _start_item(self, queue: Any, item: Any) -> None:
        """Hand ``item`` to ``process_item`` in the executor."""
        self.items.append(item)
        running = asyncio.get_running_loop().run_in_executor(self._executor, self.process_item, item)
        self._running_tasks.append(asyncio.ensure_future(self._settle(running, queue, item)))

    async def _settle(self, running: Awaitable[Any], queue: Any, item: Any) -> None:
        """Wait for ``item``'s run; log what it raised; acknowledge it after (not early_ack)."""
        try:
            value = await running
            if inspect.isawaitable(value):  # an async process_item: its coroutine runs here
                await value
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # this task is being cancelled (the loop closes)
                raise
            self._failed(item)  # the item's own CancelledError
        except BaseException:  # SystemExit too: one item's, not the worker's
            self._failed(item)
        if not self.early_ack:
            try:
                await self._ack_items([item], queue)
            except Exception as e:  # the queue is gone or silent: the item ran; say so
                logger.error("[%s] acknowledging %r failed: %s: %s", self.name, item, type(e).__name__, e)

    def _failed(self, item: Any) -> None:
        self.failed_items += 1
        logger.exception("[%s] process_item(%r) raised", self.name, item)

    async def _ack_items(self, items: list[Any], queue: Any = None) -> None:
        """Acknowledge the messages among ``items`` to their queue (raw items carry no id)."""
        marks = [(m.delivered_timestamp, m.id) for m in items if hasattr(m, "delivered_timestamp") and hasattr(m, "id")]
        if marks:
            await call_actor(queue if queue is not None else self._current_q, "ack_many", marks, timeout=CALL_TIMEOUT)

    def _drop_finished(self) -> None:
        tasks = getattr(self, "_running_tasks", None)
        if tasks is None:
            tasks = self._running_tasks = []
        tasks[:] = [task for task in tasks if not task.done()]
