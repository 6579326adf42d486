"""A joblib backend named ``"zdq"``: ``joblib.Parallel`` (and scikit-learn's ``n_jobs``) on zdq.

>>> import joblib, zdq.joblib                                               # doctest: +SKIP
>>> with joblib.parallel_config(backend="zdq", queue_pool=queue_pool):      # doctest: +SKIP
...     GridSearchCV(SVC(), grid, n_jobs=-1).fit(X, y)

Importing this module registers the backend (it needs the ``joblib`` extra: ``pip install
zdq[joblib]``). Each batch of calls joblib makes is one zdq task, run by a consumer.

Ownership
---------
The backend instance is made by ``joblib.parallel_config`` and reused by every ``Parallel`` in
its block. It holds one :class:`zdq.Executor`, made on first use: on ``queue_pool=`` (the
pool's consumers run the tasks; the pool stays open), else a pool of its own on ``client=`` or
the default Dask client (or, with neither, an embedded local cluster), closed at the end of each
``Parallel`` call (joblib's ``terminate``; the next call makes another). ``_futures`` holds the batches not
done yet, so that joblib's abort (a batch failed) cancels the rest; a batch leaves it when done.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

from distributed import Client
from joblib import register_parallel_backend
from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase

from zdq.client.local import Executor
from zdq.client.queue_pool import QueuePool
from zdq.errors import NoConsumers
from zdq.futures import TaskFuture, own

__all__ = ["ZdqBackend", "register"]

#: The name given to ``joblib.parallel_config(backend=...)``.
NAME = "zdq"


class ZdqBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """joblib's calls, batched, as tasks of a zdq pool.

    Parameters
    ----------
    queue_pool : QueuePool, optional
        A started pool whose consumers run the batches; left open.
    client : distributed.Client, optional
        Without ``queue_pool``: the cluster to make a pool (and consumers) on; default the
        default Dask client, else an embedded local cluster (as :class:`zdq.Executor`).
    max_workers : int, optional
        Without ``queue_pool``: the consumers of the pool made (default one per worker thread).
    **pool_options
        Without ``queue_pool``: :class:`~zdq.QueuePool` keywords for the pool made.

    ``n_jobs=-1`` is every consumer of the pool; ``n_jobs=k`` keeps about ``k`` batches in flight
    (joblib's dispatching), whatever the number of consumers.
    """

    default_n_jobs = -1
    supports_retrieve_callback = True
    supports_sharedmem = False
    supports_inner_max_num_threads = False
    uses_threads = False

    def __init__(
        self,
        queue_pool: QueuePool | None = None,
        client: Client | None = None,
        max_workers: int | None = None,
        *,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        **pool_options: Any,
    ) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        if queue_pool is not None and (client is not None or max_workers is not None or pool_options):
            raise ValueError(
                "joblib backend 'zdq': client, max_workers and pool options are for the pool it makes; "
                "with queue_pool=..., that pool's consumers run the tasks (pass queue_pool alone)"
            )
        self._queue_pool = queue_pool
        self._client = client
        self._max_workers = max_workers
        self._pool_options = pool_options
        self._executor: Executor | None = None
        self._lock = threading.Lock()  # making the executor, and _futures
        self._futures: set[concurrent.futures.Future[Any]] = set()

    # -- the pool -------------------------------------------------------------------------------
    @property
    def executor(self) -> Executor:
        """The executor the batches go to, made on first use."""
        with self._lock:
            if self._executor is None:
                if self._queue_pool is not None:
                    self._executor = Executor(queue_pool=self._queue_pool)
                else:
                    self._executor = Executor(self._max_workers, client=self._client, **self._pool_options)
            return self._executor

    @property
    def queue_pool(self) -> QueuePool:
        return self.executor.queue_pool

    def _consumers(self) -> int:
        return max(1, self.queue_pool.consumer_count())

    def _check_consumers(self) -> None:
        """Refuse to start a ``Parallel`` that nothing would run: joblib would wait forever."""
        pool = self.queue_pool
        if not pool.consumer_registry.any_running():
            why = pool.why_waiting() or "no consumer is running"
            raise NoConsumers(f"joblib backend 'zdq' on queue pool {pool.name}: {why}")

    # -- joblib's interface ---------------------------------------------------------------------
    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs < 0:
            return max(1, self._consumers() + 1 + n_jobs)
        return int(n_jobs)

    def configure(
        self,
        n_jobs: int = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **backend_kwargs: Any,
    ) -> int:
        self.parallel = parallel
        self._check_consumers()
        return self.effective_n_jobs(n_jobs)

    def submit(self, func: Callable[[], Any], callback: Callable[[Any], None] | None = None) -> TaskFuture:
        """One batch as one task; ``callback`` (joblib's) runs on the future's callback thread
        once it is done."""
        fut = self.executor.submit(func)
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(own(self._settled))
        if callback is not None:
            fut.add_done_callback(callback)
        return fut

    def _settled(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._futures.discard(fut)

    def retrieve_result_callback(self, out: TaskFuture) -> Any:
        """The batch's results (called once it is done: returns at once), or its error."""
        return out.result(timeout=0)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A batch failed: cancel the batches that have not started (those running finish)."""
        with self._lock:
            pending = list(self._futures)
            self._futures.clear()
        for fut in pending:
            fut.cancel()

    def terminate(self) -> None:
        """joblib's end of a ``Parallel`` call: a pool this backend made for itself is closed now
        (its consumers, actors and threads go at once, not at some later garbage collection); the
        next call makes another. A ``queue_pool=`` given stays open."""
        with self._lock:
            executor, own = self._executor, self._queue_pool is None
            if own:
                self._executor = None
        if own and executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def __repr__(self) -> str:
        where = "not started" if self._executor is None else f"on queue pool {self._executor.queue_pool.name}"
        return f"<zdq joblib backend {where}, {len(self._futures)} batches in flight>"


def register() -> None:
    """Make ``joblib.parallel_config(backend="zdq")`` (and ``parallel_backend``) use zdq. Run on
    import of this module."""
    register_parallel_backend(NAME, ZdqBackend)


register()
