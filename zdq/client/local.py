"""``zdq.local()``: a started pool and its consumers on one machine, in one call.

It imports both pools, and nothing imports it but :mod:`zdq` itself: no import cycle.
"""

from __future__ import annotations

from typing import Any

from zdq.client.cluster import parallel_of
from zdq.client.consumer_pool import ConsumerPool
from zdq.client.queue_pool import QueuePool

__all__ = ["local"]


def local(parallel: int | None = None, n_queues: int = 1, **kwargs: Any) -> QueuePool:
    """A started :class:`~zdq.QueuePool` with ``parallel`` consumers, on the default client's
    cluster or, without one, on a local cluster of ``parallel`` worker processes that closes
    with the pool. The consumers are ``queue_pool.local_consumers``.

    ``kwargs`` go to the QueuePool (``durability``, ``dirpath``, ``chunk_size``, ...).

    >>> import zdq                                                          # doctest: +SKIP
    >>> with zdq.local(parallel=4) as queue_pool:                           # doctest: +SKIP
    ...     queue_pool.insert(Square(i) for i in range(1000))
    ...     queue_pool.local_consumers.join(progress=True)
    """
    n = parallel_of(parallel)
    queue_pool = QueuePool(None, n_queues, parallel=n, **kwargs)
    try:
        queue_pool.local_consumers = ConsumerPool(queue_pool.client, queue_pool, n_consumers=n)
        queue_pool.local_consumers.start()
    except BaseException:
        queue_pool.close()
        raise
    return queue_pool
