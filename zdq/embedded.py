"""Embedded mode: zdq on one machine without a cluster set up first.

``QueuePool(None, n)`` takes the default Dask client when there is one (as Dask's own APIs do);
when there is none, :func:`cluster_for` starts a :class:`~distributed.LocalCluster` of worker
processes and the pool owns it: :class:`LocalCluster` is closed with the pool, every worker and
nanny process with it. :func:`local` adds the consumers (python-task-queue's
``LocalTaskQueue(parallel=N)``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from distributed import Client

__all__ = ["OwnedCluster", "cluster_for", "local"]

logger = logging.getLogger(__name__)


class OwnedCluster:
    """A LocalCluster and its client, started for one pool and closed with it (idempotent)."""

    def __init__(self, parallel: int) -> None:
        from distributed import LocalCluster

        # One single-threaded worker process per unit of parallelism: a consumer per worker runs
        # one task at a time, outside the driver's process (tasks holding the GIL stay apart).
        self.cluster = LocalCluster(
            n_workers=parallel,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            worker_dashboard_address=None,
        )
        try:
            # The default client from now on, until closed: Dask's actor proxies look for it, and
            # ConsumerPool(None, ...) or a second QueuePool(None, ...) then share this cluster.
            self.client: Client | None = Client(self.cluster)
        except BaseException:
            self.cluster.close()
            raise
        logger.info("zdq embedded mode: started a local cluster of %d worker processes", parallel)

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()
            self.cluster.close()


def _parallel(value: Any) -> int:
    if value is None:
        return os.cpu_count() or 1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"parallel must be a positive integer, got {value!r}")
    return value


def cluster_for(parallel: int | None = None) -> tuple[Client, OwnedCluster | None]:
    """The default client if there is one (nothing to own), else a new local cluster of
    ``parallel`` worker processes (default: one per CPU) that the caller owns."""
    from distributed import default_client

    try:
        return default_client(), None
    except ValueError:
        owned = OwnedCluster(_parallel(parallel))
        assert owned.client is not None
        return owned.client, owned


def local(parallel: int | None = None, n_queues: int = 1, **kwargs: Any) -> Any:
    """A started :class:`~zdq.QueuePool` with ``parallel`` consumers, on the default client's
    cluster or, without one, on a local cluster of ``parallel`` worker processes that closes
    with the pool. The consumers are ``queue_pool.local_consumers``.

    ``kwargs`` go to the QueuePool (``durability``, ``dirpath``, ``chunk_size``, ...).

    >>> import zdq                                                          # doctest: +SKIP
    >>> with zdq.local(parallel=4) as queue_pool:                           # doctest: +SKIP
    ...     queue_pool.insert(Square(i) for i in range(1000))
    ...     queue_pool.local_consumers.join(progress=True)
    """
    from zdq.consumer_pool import ConsumerPool
    from zdq.queue_pool import QueuePool

    n = _parallel(parallel)
    queue_pool = QueuePool(None, n_queues, parallel=n, **kwargs)
    try:
        queue_pool.local_consumers = ConsumerPool(queue_pool.client, queue_pool, n_consumers=n)
        queue_pool.local_consumers.start()
    except BaseException:
        queue_pool.close()
        raise
    return queue_pool
