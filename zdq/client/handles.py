"""``queue_pool[i]``: a handle on one queue, with daskqueue's queue methods.

daskqueue handed out its queue actors, whose methods return Dask actor futures (``.result()``).
zdq's handle answers the same calls, each returning an object with ``.result(timeout)``: the
counts come over the data plane (no Dask actor call), the control calls (``pid``, ``statistics``,
dead letters) go to the queue's broker actor, whichever worker it lives on now.

Ownership: a handle holds only its pool and its index (set once); a ``qsize()`` future is set by
the one thread that computes it.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, Protocol

from zdq.client.driver import Driver
from zdq.config import answer_timeout
from zdq.errors import BrokerLost, ZdqTimeoutError

__all__ = ["QueueHandle", "HandlePool"]


class HandlePool(Protocol):
    """What a :class:`QueueHandle` needs of its pool (a Protocol: no import of the pool's module)."""

    queue_names: list[str]

    @property
    def driver(self) -> Driver: ...

    @property
    def closed(self) -> bool: ...

    def live_driver(self) -> Driver | None: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def put(self, item: Any) -> Any: ...

    def put_many(self, items: Any, batch_size: int | None = None, timeout: float | None = None) -> Any: ...

    def broker_actor(self, i: int) -> Any: ...


def _done(value: Any = None, exc: BaseException | None = None) -> concurrent.futures.Future[Any]:
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    if exc is None:
        fut.set_result(value)
    else:
        fut.set_exception(exc)
    return fut


def _in_background(fn: Callable[[], Any], name: str) -> concurrent.futures.Future[Any]:
    """A future of ``fn()``, run on a thread of its own: the caller gets it at once, as daskqueue's
    actor futures were, even when the queue is slow to answer."""
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - the future carries it, as an actor future would
            fut.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


class QueueHandle:
    """Queue ``index`` of a :class:`~zdq.QueuePool`.

    >>> queue_pool[0].qsize().result()        # doctest: +SKIP
    5
    """

    def __init__(self, pool: HandlePool, index: int) -> None:
        self._pool = pool
        self.index = index
        self.name = pool.queue_names[index]

    def _pending(self, timeout: float) -> int:
        # What this process submitted is counted once stored; a stalled queue elsewhere holds
        # this up for a second at most, and its answer is not waited for.
        try:
            self._pool.flush(min(timeout, 1.0))
        except ZdqTimeoutError:
            pass
        status = self._pool.driver.queue_status(timeout, only=self.index)[self.index]
        if status is None:
            if not self._pool.driver.links_up()[self.index]:
                raise BrokerLost(f"queue {self.name} is down: its worker was lost and it is being placed again")
            raise ZdqTimeoutError(f"queue {self.name} did not say its size within {timeout}s (its worker is busy or stopped)")
        return status.ready_tasks + status.leased_tasks

    def qsize(self, timeout: float = 30.0) -> concurrent.futures.Future[Any]:
        """Tasks pending in this queue (stored, not yet acknowledged): a future, returned at once."""
        timeout = answer_timeout(timeout)
        return _in_background(lambda: self._pending(timeout), f"zdq-qsize-{self.name}")

    def empty(self, timeout: float = 30.0) -> concurrent.futures.Future[Any]:
        """Whether this queue holds nothing pending: a future, returned at once."""
        timeout = answer_timeout(timeout)
        return _in_background(lambda: self._pending(timeout) == 0, f"zdq-qsize-{self.name}")

    def full(self) -> concurrent.futures.Future[Any]:
        """Always False: a zdq queue is bounded by its storage, not by a count (submitting blocks
        on the driver's window instead)."""
        return _done(False)

    def put(self, item: Any) -> concurrent.futures.Future[Any]:
        """Queue a raw item for the consumers' ``process_item`` (the pool spreads items over its
        queues); the future is the item's result."""
        return self._pool.put(item)

    def put_many(self, items: list[Any]) -> concurrent.futures.Future[Any]:
        return self._pool.put_many(items)

    # -- control plane: the queue's broker actor ------------------------------------------------
    def _broker(self) -> Any:
        return self._pool.broker_actor(self.index)

    def pid(self) -> Any:
        """The pid of the worker process that serves this queue (an actor future)."""
        return self._broker().pid()

    def statistics(self) -> Any:
        """This queue's :class:`~zdq.stats.BrokerStats` (an actor future)."""
        return self._broker().statistics()

    def dead_letters(self) -> Any:
        return self._broker().dead_letters()

    def __repr__(self) -> str:
        """The queue's state as this process knows it, asking nothing (see ``QueuePool.__repr__``)."""
        driver = self._pool.live_driver()
        if driver is None:
            return f"<QueueHandle {self.name}: pool {'closed' if self._pool.closed else 'not started'}>"
        return f"<QueueHandle {driver.queue_states()[self.index].describe()}>"
