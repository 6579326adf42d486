"""``zdq.local()``: a started pool and its consumers on one machine, in one call.

Its ``with`` block is an executor's: leaving it waits for every task inserted or submitted (as
python-task-queue's ``LocalTaskQueue`` runs what was inserted, and ``ThreadPoolExecutor`` waits
at exit), then closes the consumers, the pool and the local cluster. Its consumers stay up across
``join()``: a join waits, it does not stop them.

It imports both pools, and nothing imports it but :mod:`zdq` itself: no import cycle.

Ownership
---------
:class:`LocalPool` owns its :class:`LocalConsumers` (``local_consumers``, closed with the pool)
and, in embedded mode, the local cluster (the QueuePool's own rule). The wait at exit runs on the
caller's thread and holds nothing: it is :meth:`QueuePool.wait_drained`, whose bounds are the
ones of ``join()`` (no consumer running: :class:`NoConsumers` at once; a queue down past its
bound: :class:`BrokerLost`).
"""

from __future__ import annotations

import logging
from typing import Any, Self

from zdq.client.cluster import parallel_of
from zdq.client.consumer_pool import ConsumerPool
from zdq.client.queue_pool import QueuePool
from zdq.futures import SayOnce
from zdq.names import counted

__all__ = ["LocalConsumers", "LocalPool", "local"]

logger = logging.getLogger(__name__)



class LocalConsumers(ConsumerPool):
    """The consumers :func:`local` starts: a :class:`ConsumerPool` whose :meth:`join` leaves them
    running (``stop=False``) unless told otherwise, as a ``LocalTaskQueue``'s processes serve
    until its block ends."""

    def join(
        self,
        timestep: float = 0.2,
        print_timestep: float = 2.0,
        progress: bool = False,
        timeout: float | None = None,
        *,
        stop: bool = False,
    ) -> None:
        """:meth:`ConsumerPool.join`, the consumers left running by default (``stop=True``
        stops them, as a plain ConsumerPool's join does)."""
        super().join(timestep, print_timestep, progress, timeout, stop=stop)


class LocalPool(QueuePool):
    """The :class:`QueuePool` :func:`local` returns: leaving its ``with`` block waits for the work.

    ``close()`` alone still closes at once (pending futures fail with ClosedError), as a
    QueuePool's does; only the block's end waits.
    """

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Wait for every task inserted or submitted (also when the block ends on an exception, as
        ``ThreadPoolExecutor`` does), then close. A wait that cannot end (no consumer running, a
        queue lost) raises its error after closing; when the block already raised, that error
        is logged and the block's own propagates."""
        exc = exc_info[1] if exc_info else None
        try:
            self.wait_for_work()
        except Exception:
            if exc is None:
                raise
            logger.warning("zdq.local: the work queued before %r was not all done", exc, exc_info=True)
        finally:
            self.close()

    def wait_for_work(self, timeout: float | None = None) -> None:
        """Block until every queue is drained and every result is in, consumers left running.

        Raises
        ------
        NoConsumers
            Tasks are pending and no consumer runs (the local consumers were cancelled, or
            joined with ``stop=True``): said at once rather than waiting for nothing.
        BrokerLost
            A queue has been down longer than a lost queue takes to be placed again.
        ZdqTimeoutError
            Not done by ``timeout``.
        """
        if self.closed:
            return
        once = SayOnce()

        def say_why_it_waits(statuses: list[Any]) -> None:
            # A block whose tasks run long, or wait for their time (submit(..., delay=)), would
            # otherwise end in silence long after its last line: said once, after a while.
            if not once.due():
                return
            pending = sum(s.ready_tasks + s.leased_tasks for s in statuses if s is not None)
            logger.warning(
                "zdq.local: the end of the block waits for %s of pool %s (running, queued, or delayed "
                "until their time); close() the pool instead to drop them",
                counted(pending, "task"),
                self.name,
            )

        self.wait_drained(timeout, check=say_why_it_waits)


def local(parallel: int | None = None, n_queues: int = 1, **kwargs: Any) -> LocalPool:
    """A started :class:`~zdq.QueuePool` with ``parallel`` consumers, on the default client's
    cluster or, without one, on a local cluster of ``parallel`` worker processes that closes
    with the pool. The consumers are ``queue_pool.local_consumers``.

    ``kwargs`` go to the QueuePool (``durability``, ``dirpath``, ``chunk_size``, ...).

    Leaving the ``with`` block waits for every task inserted or submitted, then closes
    everything; ``local_consumers.join()`` waits without stopping the consumers.

    >>> import zdq                                                          # doctest: +SKIP
    >>> with zdq.local(parallel=4) as queue_pool:                           # doctest: +SKIP
    ...     queue_pool.insert(Square(i) for i in range(1000))
    """
    n = parallel_of(parallel)
    queue_pool = LocalPool(None, n_queues, parallel=n, **kwargs)
    try:
        queue_pool.local_consumers = LocalConsumers(queue_pool.client, queue_pool, n_consumers=n)
        queue_pool.local_consumers.start()
    except BaseException:
        queue_pool.close()
        raise
    return queue_pool
