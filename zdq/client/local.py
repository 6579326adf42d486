"""``zdq.local()`` and ``zdq.Executor``: a started pool and its consumers, in one call.

Its ``with`` block is an executor's: leaving it waits for every task inserted or submitted (as
python-task-queue's ``LocalTaskQueue`` runs what was inserted, and ``ThreadPoolExecutor`` waits
at exit), then closes the consumers, the pool and the local cluster. Its consumers stay up across
``join()``: a join waits, it does not stop them.

:class:`Executor` is :class:`~zdq.client.executor.PoolExecutor` on a pool it makes (with its
consumers, on the given or default client's cluster, else by :func:`local`) unless given one.

It imports both pools, and nothing imports it but :mod:`zdq` itself and its joblib backend: no
import cycle.

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
import weakref
from typing import Any, Self, cast

from distributed import Client

from zdq._actor import scheduler_workers
from zdq.client.cluster import parallel_of
from zdq.client.consumer_pool import ConsumerPool
from zdq.client.executor import ASYNC_REFUSED, PoolExecutor
from zdq.client.queue_pool import QueuePool
from zdq.futures import SayOnce
from zdq.names import counted

__all__ = ["Executor", "LocalConsumers", "LocalPool", "local"]

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


class Executor(PoolExecutor):
    """A :class:`concurrent.futures.Executor` on a zdq pool, made here unless given.

    Parameters
    ----------
    max_workers : int, optional
        Consumers of the pool this executor makes (default: one per thread of the cluster's
        workers; in embedded mode, one worker process per CPU). Must be above 0.
    client : distributed.Client, optional
        The cluster to make the pool on (default: the default Dask client when there is one;
        without one, a local cluster of ``max_workers`` processes, as :func:`zdq.local`).
    queue_pool : QueuePool, optional
        A started pool to submit to: its consumers run the tasks, and shutdown leaves it open
        (as ``queue_pool.executor()``'s :class:`~zdq.PoolExecutor`).
    **pool_options
        For the pool this executor makes: any :class:`~zdq.QueuePool` keyword (``n_queues``,
        ``durability``, ``retries``, ``chunk_size`` ...). ``keep_results`` defaults to False
        here: a result is held by its future only.

    A pool (and cluster) the executor made is closed by :meth:`shutdown`, or at exit.

    Examples
    --------
    >>> with zdq.Executor(max_workers=4) as executor:                       # doctest: +SKIP
    ...     print(list(executor.map(pow, range(5), range(5))))
    [1, 1, 4, 27, 256]
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        client: Client | None = None,
        queue_pool: QueuePool | None = None,
        **pool_options: Any,
    ) -> None:
        if max_workers is not None:
            if not isinstance(max_workers, int) or isinstance(max_workers, bool):
                raise TypeError(f"max_workers must be an integer or None, got {max_workers!r:.80}")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if queue_pool is not None:
            if max_workers is not None or client is not None or pool_options:
                raise ValueError(
                    "max_workers, client and pool options are for the pool an Executor makes: with queue_pool=..., "
                    "that pool's consumers run the tasks (pass queue_pool alone)"
                )
            super().__init__(queue_pool)
            return
        if getattr(client, "asynchronous", False):
            raise TypeError(ASYNC_REFUSED)
        pool = _make_pool(max_workers, client, pool_options)
        try:
            super().__init__(pool)
        except BaseException:
            pool.close()
            raise
        self._owns_pool = True
        weakref.finalize(self, pool.close)  # dropped idle, never shut down: the pool goes too

    @property
    def queue_pool(self) -> QueuePool:
        """The pool the tasks go to (a :class:`~zdq.QueuePool`, given or made here)."""
        return cast(QueuePool, self._pool)


def _make_pool(max_workers: int | None, client: Client | None, options: dict[str, Any]) -> QueuePool:
    """The pool and consumers an :class:`Executor` makes, on ``client``'s cluster (or the default
    client's, else a local cluster of ``max_workers`` processes)."""
    options.setdefault("keep_results", False)
    # A consumer holds only the chunk it runs, as a thread pool's idle thread takes the next
    # task: a task submitted while another runs long goes to an idle consumer, not behind it.
    options.setdefault("prefetch", 1)
    if client is None and not _has_default_client():
        return local(max_workers, **options)
    pool = QueuePool(client, **options)
    try:
        n = max_workers or _cluster_threads(pool.client)
        pool.local_consumers = ConsumerPool(pool.client, pool, n_consumers=n, start=True)
    except BaseException:
        pool.close()
        raise
    return pool


def _cluster_threads(client: Client) -> int:
    """The threads of the cluster's workers (at least 1): the consumers of a pool made for it."""
    workers = scheduler_workers(client).values()
    return max(1, sum(int(w.get("nthreads", 1)) for w in workers))


def _has_default_client() -> bool:
    from distributed import default_client

    try:
        default_client()
    except ValueError:
        return False
    return True
