"""Embedded mode: zdq on one machine without a cluster set up first.

``QueuePool(None, n)`` takes the default Dask client when there is one (as Dask's own APIs do);
when there is none, :func:`cluster_for` starts a :class:`~distributed.LocalCluster` of worker
processes and the pool owns it: :class:`LocalCluster` is closed with the pool, every worker and
nanny process with it. :func:`zdq.local` (:mod:`zdq.client.local`) adds the consumers
(python-task-queue's ``LocalTaskQueue(parallel=N)``).

Ownership
---------
``_live`` (the embedded clusters of this process) and each ``OwnedCluster._users``: ``_lock``.

A pool dropped without ``close()`` (daskqueue programs never close theirs), or alive when the
interpreter exits, still lets go of its share: :meth:`OwnedCluster.closed_with` ties the share to
the pool object with a :func:`weakref.finalize`, which runs once, whichever comes first of
``close()``, the pool's collection and the interpreter's exit (issue 23, point 7).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import weakref
from typing import Any

from distributed import Client

from zdq._actor import scheduler_workers

__all__ = ["OwnedCluster", "cluster_for", "release_now"]

logger = logging.getLogger(__name__)

#: Said with a local cluster's failure to start, when the program is a script.
_SPAWN_HINT = (
    "zdq: Dask starts a local cluster's workers as new processes that import the main script; if the "
    "script makes the cluster (zdq.local(), zdq.Executor(), QueuePool(None, ...)) at its top level, "
    'put that code under `if __name__ == "__main__":`'
)

#: The embedded clusters alive in this process, by their client: a second ``QueuePool(None, ...)``
#: finds the first one's cluster as the default client and shares it, so that closing the first
#: does not pull the cluster from under the second.
_live: dict[int, OwnedCluster] = {}
_lock = threading.Lock()


class OwnedCluster:
    """A LocalCluster and its client, started for a pool and closed with the last pool that uses
    it (each pool calls :meth:`close` once)."""

    def __init__(self, parallel: int) -> None:
        from distributed import LocalCluster

        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # A process spawned by another (a worker of the cluster that script starts) is
            # importing the main script, which starts a cluster at its top level: this process can
            # do nothing else, so it ends here, saying why in one line (a traceback per worker, or
            # Dask's nannies of its own failing with a page each, would bury it).
            raise SystemExit(_SPAWN_HINT)
        # One single-threaded worker process per unit of parallelism: a consumer per worker runs
        # one task at a time, outside the driver's process (tasks holding the GIL stay apart).
        try:
            self.cluster = LocalCluster(
                n_workers=parallel,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                worker_dashboard_address=None,
            )
        except Exception as e:
            if getattr(sys.modules.get("__main__"), "__file__", None):
                # The commonest cause in a script, which Dask's own error buries in a page of text.
                e.add_note(_SPAWN_HINT)
            raise
        try:
            # The default client from now on, until closed: Dask's actor proxies look for it, and
            # ConsumerPool(None, ...) or a second QueuePool(None, ...) then share this cluster.
            self.client: Client | None = Client(self.cluster)
        except BaseException:
            self.cluster.close()
            raise
        self._users = 1
        with _lock:
            _live[id(self.client)] = self
        logger.info("zdq embedded mode: started a local cluster of %d worker processes", parallel)

    def closed_with(self, owner: object) -> weakref.finalize[[OwnedCluster], Any]:
        """This user's share, released when ``owner`` (a pool, held weakly) is collected or the
        interpreter exits. ``owner.close()`` calls :func:`release_now` with what is returned. At
        most once either way: a pool's ``close()`` and its collection never count twice against a
        shared cluster."""
        return weakref.finalize(owner, _close_share, self)

    def close(self) -> None:
        with _lock:
            if self.client is None:
                return
            self._users -= 1
            if self._users > 0:
                return
            client, self.client = self.client, None
            _live.pop(id(client), None)
        client.close()
        self.cluster.close()


def release_now(share: weakref.finalize[[OwnedCluster], Any]) -> None:
    """Release a share made by :meth:`OwnedCluster.closed_with` now, on this thread (``close()``
    returns once the cluster's processes are gone), unless it was released already."""
    taken = share.detach()
    if taken is not None:
        _, _, (owned,), _ = taken
        owned.close()


def _close_share(owned: OwnedCluster) -> None:
    """Release ``owned`` (a pool's share of it), its pool being collected. On the main thread (a
    collection there, the interpreter's exit) at once; a collection on another thread (Dask's event loop
    among them: closing the cluster from it would wait on itself) hands it to a thread of its own."""
    if threading.current_thread() is threading.main_thread():
        owned.close()
        return
    try:
        threading.Thread(target=owned.close, name="zdq-embedded-close", daemon=True).start()
    except RuntimeError:  # no new thread at interpreter shutdown: closed here
        owned.close()


def parallel_of(value: Any) -> int:
    if value is None:
        return os.cpu_count() or 1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"parallel must be a positive integer, got {value!r}")
    return value


def cluster_for(parallel: int | None = None) -> tuple[Client, OwnedCluster | None]:
    """The default client if there is one (nothing to own, unless it is an embedded cluster of
    this process: then the caller shares it), else a new local cluster of ``parallel`` worker
    processes (default: one per CPU) that the caller owns."""
    from distributed import default_client

    wanted = parallel_of(parallel) if parallel is not None else None
    try:
        client: Client | None = default_client()
    except ValueError:  # none: the cluster is started below, outside this handler (its errors are not "during" it)
        client = None
    if client is None:
        owned = OwnedCluster(wanted or parallel_of(None))
        assert owned.client is not None
        return owned.client, owned
    with _lock:
        shared = _live.get(id(client))
        if shared is not None and shared.client is client:
            shared._users += 1
        else:
            shared = None
    if wanted is not None:
        workers = len(scheduler_workers(client))
        if workers != wanted:
            logger.warning(
                "parallel=%d does not apply: there is a default Dask client, whose cluster (%d workers) "
                "this pool uses; close that client first for a local cluster of %d workers",
                wanted, workers, wanted,
            )
    return client, shared
