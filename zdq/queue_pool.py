"""QueuePool: the client-side facade that places brokers and submits work to them.

Dask places the brokers (one actor per queue, spread over the workers) and nothing else: tasks go
from this process to the brokers over ZeroMQ, through the pool's :class:`~zdq.driver.Driver`.
"""

from __future__ import annotations

import enum
import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Callable

from distributed import Client

from zdq.broker import Broker
from zdq.config import PoolSettings, settings
from zdq.driver import Driver
from zdq.errors import ClosedError, PlacementError, SerializationError, ZdqError
from zdq.futures import BatchFuture, TaskFuture
from zdq.serialization import Task, check_picklable, dumps_chunk
from zdq.stats import BrokerStats, PoolStats

__all__ = ["Durability", "QueuePool"]

logger = logging.getLogger(__name__)


class Durability(str, enum.Enum):
    """Where a queue keeps its tasks: in the broker's memory, or on disk (LMDB)."""

    TRANSIENT = "transient"
    DURABLE = "durable"


def _durability(value: Durability | str) -> Durability:
    try:
        return Durability(value.value if isinstance(value, Durability) else str(value).lower())
    except ValueError:
        raise ValueError(f"durability must be 'transient' or 'durable', got {value!r}") from None


def _split_call(call: Any, position: int) -> Task:
    if not isinstance(call, tuple) or not call or not callable(call[0]):
        raise TypeError(f"batch_submit item {position} must be a tuple (fn, *args), got {call!r:.80}")
    return (call[0], call[1:])


class QueuePool:
    """A pool of ``n_queues`` queues placed on the workers of a Dask cluster.

    Parameters
    ----------
    client : distributed.Client
        The cluster's client; used only to place and supervise the brokers.
    n_queues : int
        Number of queues (brokers), spread over the workers.
    durability : Durability or str
        ``"transient"`` (memory) or ``"durable"`` (LMDB under ``dirpath``).
    dirpath : str, optional
        Directory of durable queues: queue ``i`` lives in ``<dirpath>/<name>-queue-<i>/``.
    name : str, optional
        Pool name; defaults to ``"default"`` for durable pools (so the same call finds the same
        queues after a restart) and to a random name for transient ones.
    keep_results : bool
        Keep every result for :meth:`ConsumerPool.results` (the daskqueue behaviour). Turn it off
        for huge runs that read results from futures only, so driver memory stays flat.
    start : bool
        Place the brokers at once (the daskqueue behaviour). With ``False``, call :meth:`start`.
    **overrides
        Any :class:`~zdq.config.PoolSettings` field (``chunk_size``, ``window``, ...).

    Examples
    --------
    >>> from distributed import Client                                      # doctest: +SKIP
    >>> client = Client(n_workers=2, threads_per_worker=1)                  # doctest: +SKIP
    >>> queue_pool = QueuePool(client, 2)                                   # doctest: +SKIP
    >>> future = queue_pool.submit(pow, 2, 10)                              # doctest: +SKIP
    >>> consumer_pool = ConsumerPool(client, queue_pool, n_consumers=2)     # doctest: +SKIP
    >>> consumer_pool.start(); future.result()                              # doctest: +SKIP
    1024
    """

    def __init__(
        self,
        client: Client,
        n_queues: int = 1,
        durability: Durability | str = Durability.TRANSIENT,
        dirpath: str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
        keep_results: bool = True,
        start: bool = True,
        **overrides: Any,
    ) -> None:
        if not isinstance(n_queues, int) or n_queues < 1:
            raise ValueError(f"n_queues must be a positive integer, got {n_queues!r}")
        self.durability = _durability(durability)
        if self.durability is Durability.DURABLE and dirpath is None:
            raise ValueError("a durable QueuePool needs dirpath=...")
        self.client = client
        self.n_queues = n_queues
        self.dirpath = None if dirpath is None else os.path.abspath(os.fspath(dirpath))
        self.name = name or ("default" if self.durability is Durability.DURABLE else f"zdq-{uuid.uuid4().hex[:8]}")
        self.settings: PoolSettings = settings(**overrides)
        self.keep_results = keep_results
        self.queue_names = [f"{self.name}-queue-{i}" for i in range(n_queues)]
        self._actor_futures: list[Any] = []
        self._brokers: list[Any] = []
        self.endpoints: list[str] = []
        self._driver: Driver | None = None
        self._closed = False
        if start:
            self.start()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> QueuePool:
        """Place one broker per queue on the workers and connect to them. Idempotent."""
        if self._closed:
            raise ClosedError(f"queue pool {self.name} is closed")
        if self._driver is not None:
            return self
        workers = sorted(self.client.scheduler_info(n_workers=-1)["workers"])
        if not workers:
            raise PlacementError("the Dask cluster has no workers to place queues on")
        try:
            for i, queue_name in enumerate(self.queue_names):
                dirpath = None if self.dirpath is None else os.path.join(self.dirpath, queue_name)
                fut = self.client.submit(
                    Broker,
                    queue_name,
                    self.settings,
                    dirpath,
                    actor=True,
                    workers=[workers[i % len(workers)]],
                    allow_other_workers=False,
                    pure=False,
                    key=f"zdq-broker-{queue_name}-{uuid.uuid4().hex[:8]}",
                )
                self._actor_futures.append(fut)
            self._brokers = [fut.result() for fut in self._actor_futures]
            self.endpoints = [b.start().result() for b in self._brokers]
        except ZdqError:
            self._release_actors()
            raise
        except Exception as e:
            self._release_actors()
            raise PlacementError(f"could not place the queues of pool {self.name}: {e}") from e
        self._driver = Driver(self.name, self.endpoints, self.settings, keep_results=self.keep_results)
        self._driver.start()
        logger.info("Created %d queues in the cluster (pool %s).", self.n_queues, self.name)
        return self

    def close(self) -> None:
        """Stop the driver and every broker; pending futures fail with ClosedError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._driver is not None:
            self._driver.close()
        self._release_actors()

    def _release_actors(self) -> None:
        stops = []
        for broker in self._brokers:
            try:
                stops.append(broker.stop())
            except Exception as e:  # the worker may be gone already
                logger.debug("stopping a broker of %s failed: %s", self.name, e)
        for fut in stops:
            try:
                fut.result(timeout=10)
            except Exception as e:
                logger.debug("stopping a broker of %s failed: %s", self.name, e)
        for fut in self._actor_futures:
            fut.release()
        self._actor_futures.clear()
        self._brokers.clear()

    def __enter__(self) -> QueuePool:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def driver(self) -> Driver:
        if self._closed:
            raise ClosedError(f"queue pool {self.name} is closed")
        if self._driver is None:
            raise ClosedError(f"queue pool {self.name} is not started: call start()")
        return self._driver

    # -- submission -----------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> TaskFuture:
        """Queue ``fn(*args, **kwargs)``; return a future of its result.

        Raises
        ------
        SerializationError
            ``fn`` or an argument cannot be pickled; nothing was queued.
        """
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, got {fn!r:.80}")
        check_picklable(fn, args, kwargs)
        return self.driver.submit_task((fn, args, kwargs) if kwargs else (fn, args))

    def put(self, item: Any) -> TaskFuture:
        """Queue a raw item for the consumers' ``process_item``; return a future of its result."""
        check_picklable(None, (item,), None)
        return self.driver.submit_task((None, item))

    def batch_submit(
        self,
        list_calls: Sequence[tuple[Any, ...]],
        batch_size: int | None = None,
        timeout: float | None = None,
        **_compat: Any,
    ) -> BatchFuture:
        """Queue many calls ``(fn, *args)`` at once; return one future of all their results.

        The calls are pickled into chunks of at most ``batch_size`` (and ``chunk-size``) tasks
        before anything is sent: if one of them cannot be pickled, :class:`SerializationError`
        names it and nothing of the batch is queued. ``timeout`` bounds how long this call may
        block on a full submission window.
        """
        tasks = [_split_call(call, i) for i, call in enumerate(list_calls)]
        return self._submit_tasks(tasks, batch_size, timeout)

    def put_many(self, items: Sequence[Any], batch_size: int | None = None, timeout: float | None = None) -> BatchFuture:
        """Queue many raw items at once; same guarantees as :meth:`batch_submit`."""
        return self._submit_tasks([(None, item) for item in items], batch_size, timeout)

    def _chunk_size(self, batch_size: int | None) -> int:
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return min(batch_size or self.settings.chunk_size, self.settings.chunk_size)

    def _submit_tasks(self, tasks: list[Task], batch_size: int | None, timeout: float | None) -> BatchFuture:
        driver = self.driver
        size = self._chunk_size(batch_size)
        base = driver.reserve(len(tasks))
        # Pickle everything before sending anything: a task that cannot be pickled leaves nothing
        # queued (its reserved ids are simply never used).
        chunks = [(base + i, tasks[i : i + size]) for i in range(0, len(tasks), size)]
        payloads = [dumps_chunk(first, part) for first, part in chunks]
        batch = BatchFuture(base, len(tasks))
        for (first, part), payload in zip(chunks, payloads):
            driver.submit_chunk(first, len(part), payload, batch, first - base, timeout=timeout)
        return batch

    def submit_iter(
        self,
        calls: Iterable[tuple[Any, ...]],
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> int:
        """Queue calls ``(fn, *args)`` from any iterable, lazily, in flat memory; return the count.

        Memory stays flat because at most ``window`` chunks per broker are waiting for
        confirmation. Unlike :meth:`batch_submit` this does not hold the whole submission: if
        item ``k`` cannot be pickled, the chunks before it are already queued and the
        :class:`SerializationError` says how many tasks were.
        """
        driver = self.driver
        size = self._chunk_size(batch_size)
        count = 0
        part: list[Task] = []

        def flush() -> None:
            nonlocal count
            base = driver.reserve(len(part))
            try:
                payload = dumps_chunk(base, part)
            except SerializationError as e:
                raise SerializationError(f"{e} ({count} tasks before this chunk were queued)") from e
            driver.submit_chunk(base, len(part), payload, None, 0, timeout=timeout)
            count += len(part)
            part.clear()

        for i, call in enumerate(calls):
            part.append(_split_call(call, i))
            if len(part) >= size:
                flush()
        if part:
            flush()
        return count

    def flush(self, timeout: float | None = None) -> None:
        """Block until every chunk submitted so far is stored by its broker."""
        self.driver.flush(timeout)

    # -- introspection --------------------------------------------------------------------------
    def broker_statistics(self, timeout: float = 10.0) -> list[BrokerStats]:
        """Every broker's statistics, asked in parallel (one actor call each)."""
        calls = [b.statistics() for b in self._brokers]
        return [c.result(timeout=timeout) for c in calls]

    def statistics(self) -> PoolStats:
        return PoolStats(self.driver.statistics(), self.broker_statistics())

    def get_queue_size(self) -> dict[str, int]:
        """Tasks pending (stored, not yet acknowledged) in each queue, by queue name."""
        self.flush()
        return {s.name: s.pending_tasks for s in self.broker_statistics()}

    def __len__(self) -> int:
        return self.n_queues

    def __getitem__(self, index: int) -> Any:
        """The broker actor of queue ``index`` (``statistics()``, ``dead_letters()``...)."""
        return self._brokers[index]

    def __repr__(self) -> str:
        kind = "Durable" if self.durability is Durability.DURABLE else "Transient"
        if self._closed or self._driver is None:
            state = "closed" if self._closed else "not started"
            return f"QueuePool : {self.n_queues} queue(s), {state}"
        try:
            self.flush(timeout=2)
            stats = self.broker_statistics(timeout=2)
            lines = [f"\n\t{kind}Queue-{s.name}: {s.pending_tasks} pending items" for s in stats]
        except Exception as e:  # a repr must not raise
            lines = [f"\n\t(statistics unavailable: {e!r:.80})"]
        return f"QueuePool : {self.n_queues} queue(s)" + "".join(lines)

