"""``queue_pool[i]``: a handle on one queue, with daskqueue's queue methods.

daskqueue handed out its queue actors, whose methods return Dask actor futures (``.result()``).
zdq's handle answers the same calls, each returning an object with ``.result(timeout)``: the
counts come over the data plane (no Dask actor call), the control calls (``pid``, ``statistics``,
dead letters) go to the queue's broker actor, whichever worker it lives on now.
"""

from __future__ import annotations

import concurrent.futures
from typing import TYPE_CHECKING, Any

from zdq.errors import BrokerLost

if TYPE_CHECKING:
    from zdq.queue_pool import QueuePool

__all__ = ["QueueHandle"]


def _done(value: Any = None, exc: BaseException | None = None) -> concurrent.futures.Future[Any]:
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    if exc is None:
        fut.set_result(value)
    else:
        fut.set_exception(exc)
    return fut


class QueueHandle:
    """Queue ``index`` of a :class:`~zdq.queue_pool.QueuePool`.

    >>> queue_pool[0].qsize().result()        # doctest: +SKIP
    5
    """

    def __init__(self, pool: QueuePool, index: int) -> None:
        self._pool = pool
        self.index = index
        self.name = pool.queue_names[index]

    def _pending(self, timeout: float) -> concurrent.futures.Future[Any]:
        try:
            self._pool.flush(timeout)
            status = self._pool.queue_status(timeout)[self.index]
        except Exception as e:  # the future carries it, as an actor future would
            return _done(exc=e)
        if status is None:
            return _done(exc=BrokerLost(f"queue {self.name} is down: its worker was lost and it is being placed again"))
        return _done(status.ready_tasks + status.leased_tasks)

    def qsize(self, timeout: float = 30.0) -> concurrent.futures.Future[Any]:
        """Tasks pending in this queue (stored, not yet acknowledged)."""
        return self._pending(timeout)

    def empty(self, timeout: float = 30.0) -> concurrent.futures.Future[Any]:
        fut = self._pending(timeout)
        return fut if fut.exception() is not None else _done(fut.result() == 0)

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
        self._pool._owned("calls to a queue's broker")
        return self._pool._brokers[self.index]

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
        driver = self._pool._driver
        if self._pool._closed or driver is None:
            return f"<QueueHandle {self.name}: pool {'closed' if self._pool._closed else 'not started'}>"
        return f"<QueueHandle {driver.queue_states()[self.index].describe()}>"
