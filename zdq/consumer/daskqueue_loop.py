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
with daskqueue's method names. Where daskqueue's loop lost items or waited without end, this one
does not: ``cancel()`` lets the loop finish the batch it took (daskqueue cancelled it mid-get, and
the items the queue had handed over were lost) and waits for the running items within a bound;
an empty queue is asked again after a growing pause, not at once in a tight loop; an item whose
``process_item`` raises is logged with its error and counted, not left as an unread exception.

Every actor call it makes is bounded by :data:`CALL_TIMEOUT` (:func:`call_actor`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable
from typing import Any

__all__ = ["CALL_TIMEOUT", "DaskqueueLoop", "call_actor", "call_actor_sync"]

logger = logging.getLogger(__name__)

#: Seconds an actor call of daskqueue's loops may take before it is an error naming the call.
CALL_TIMEOUT = 60.0
#: An empty queue is asked again after this pause, doubled at each empty answer up to the cap
#: (and never more than the loop's ``timeout``): daskqueue's asked again at once, for ever.
IDLE_FIRST, IDLE_CAP = 0.001, 0.05
#: How long ``cancel()`` waits, by default, for the items already handed to ``process_item``.
CANCEL_TIMEOUT = 300.0


def _named(handle: Any, method: str) -> str:
    return f"{type(handle).__name__}.{method}()"


async def call_actor(handle: Any, method: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
    """``handle.method(*args)`` from a coroutine: a Dask actor handle's call (an awaitable
    future; a coroutine when the actor is in this worker), or a plain object's method; within
    ``timeout`` seconds, else ``TimeoutError`` naming the call."""
    answer = getattr(handle, method)(*args)
    if not isinstance(answer, Awaitable):
        return answer
    try:
        return await asyncio.wait_for(_awaited(answer), timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"{_named(handle, method)} did not answer within {timeout:g} s") from None


async def _awaited(answer: Awaitable[Any]) -> Any:
    return await answer


def call_actor_sync(handle: Any, method: str, *args: Any, loop: asyncio.AbstractEventLoop | None, timeout: float = CALL_TIMEOUT) -> Any:
    """``handle.method(*args)`` from a thread that is not ``loop``'s (an actor's plain method):
    an actor of this worker answers with a coroutine, run on ``loop``; another's with a future."""
    answer = getattr(handle, method)(*args)
    if inspect.iscoroutine(answer):
        if loop is None:
            answer.close()
            raise RuntimeError(f"{_named(handle, method)} needs the worker's event loop, and there is none here")
        answer = asyncio.run_coroutine_threadsafe(answer, loop)
    result = getattr(answer, "result", None)
    if result is None:
        return answer
    try:
        return result(timeout)
    except TimeoutError:
        raise TimeoutError(f"{_named(handle, method)} did not answer within {timeout:g} s") from None


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
    items: list[Any]
    _running_tasks: list[Any]
    #: The loop's task (daskqueue's name), the queue it takes from, and whether cancel() asked it
    #: to end; ``failed_items`` counts the items whose process_item raised, ``loop_error`` is what
    #: ended the loop otherwise (an actor call that failed or did not answer).
    fetch_loop: asyncio.Task[None] | None = None
    _current_q: Any = None
    _stopping: bool = False
    failed_items: int = 0
    loop_error: BaseException | None = None

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

    async def start(self, timeout: float = 1) -> None:
        """Ask the pool for a queue (``pool.get_next_queue()``) and start taking items from it.
        A loop that runs already goes on (daskqueue started a second one)."""
        if await self.is_consumming():
            return
        if not hasattr(self.pool, "get_next_queue"):
            raise TypeError(
                f"{type(self).__name__}.start() takes items from a daskqueue QueuePoolActor given as its pool, "
                f"got {self.pool!r}; a consumer of zdq.ConsumerPool is started by the pool itself"
            )
        wait = float(timeout)
        if not wait >= 0:
            raise ValueError(f"start(timeout=...) takes seconds >= 0, got {timeout!r}")
        if "items" not in self.__dict__:
            self.items, self._running_tasks = [], []
        self._current_q = await call_actor(self.pool, "get_next_queue")
        self._stopping = False
        self.loop_error = None
        self.fetch_loop = asyncio.ensure_future(self._guarded(wait))

    async def cancel(self, timeout: float = CANCEL_TIMEOUT) -> bool:
        """Stop the loop once it has handed out the batch it took, and wait up to ``timeout``
        seconds for the items running; ``True`` when all of them ended."""
        self._stopping = True
        loop = self.fetch_loop
        give_up = time.monotonic() + timeout
        if loop is not None and not loop.done():
            # The loop's own waits are bounded (an actor call, a pause): it ends within them.
            await asyncio.wait([loop], timeout=max(0.0, give_up - time.monotonic()))
        self._drop_finished()
        running = list(self._running_tasks)
        if running:
            await asyncio.wait(running, timeout=max(0.0, give_up - time.monotonic()))
            self._drop_finished()
        ended = (loop is None or loop.done()) and not self._running_tasks
        if not ended:
            logger.warning("[%s] cancel(): %d item(s) still running after %g s", self.name, len(self._running_tasks), timeout)
        return ended

    # -- the loop ------------------------------------------------------------------------------------

    async def _guarded(self, timeout: float) -> None:
        """:meth:`_consume`, its end logged and kept when an actor call fails (nobody awaits it)."""
        try:
            await self._consume(timeout)
        except Exception as e:
            self.loop_error = e
            logger.error("[%s] the consume loop ended: %s: %s", self.name, type(e).__name__, e)

    async def _consume(self, timeout: float = 0.1) -> None:
        """Take up to ``batch_size`` items at a time from the queue and run each in the worker's
        executor, at most ``max_concurrency`` at once, until :meth:`cancel`."""
        queue = self._current_q
        size = max(1, int(self.batch_size or 1))
        limit = max(1, int(self.max_concurrency or 1))
        idle = IDLE_FIRST
        while not self._stopping:
            taken = [item for item in await call_actor(queue, "get_many", size) if item is not None]
            if not taken:
                await asyncio.sleep(min(idle, timeout) if timeout > 0 else idle)
                idle = min(idle * 2, IDLE_CAP)
                continue
            idle = IDLE_FIRST
            if self.early_ack:
                await self._ack_items(taken)
            for item in taken:
                await self._run(queue, item, limit)

    async def _run(self, queue: Any, item: Any, limit: int) -> None:
        """Hand ``item`` to ``process_item`` in the executor, once fewer than ``limit`` run."""
        self._drop_finished()
        while len(self._running_tasks) >= limit:
            await asyncio.wait(self._running_tasks, return_when=asyncio.FIRST_COMPLETED)
            self._drop_finished()
        self.items.append(item)
        running = asyncio.get_running_loop().run_in_executor(self._executor, self.process_item, item)
        task = asyncio.ensure_future(self._settle(running, queue, item))
        self._running_tasks.append(task)

    async def _settle(self, running: Awaitable[Any], queue: Any, item: Any) -> None:
        """Wait for ``item``'s run; log what it raised; acknowledge it after (not early_ack)."""
        try:
            await running
        except Exception:
            self.failed_items += 1
            logger.exception("[%s] process_item(%r) raised", self.name, item)
        if not self.early_ack:
            try:
                await self._ack_items([item], queue)
            except Exception as e:  # the queue is gone or silent: the item ran; say so
                logger.error("[%s] acknowledging %r failed: %s: %s", self.name, item, type(e).__name__, e)

    async def _ack_items(self, items: list[Any], queue: Any = None) -> None:
        """Acknowledge the messages among ``items`` to their queue (raw items carry no id)."""
        marks = [(m.delivered_timestamp, m.id) for m in items if hasattr(m, "delivered_timestamp") and hasattr(m, "id")]
        if marks:
            await call_actor(queue if queue is not None else self._current_q, "ack_many", marks)

    def _drop_finished(self) -> None:
        tasks = getattr(self, "_running_tasks", None)
        if tasks is None:
            tasks = self._running_tasks = []
        tasks[:] = [task for task in tasks if not task.done()]
