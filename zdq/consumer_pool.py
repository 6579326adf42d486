"""ConsumerPool: places consumer actors on the workers and watches them work."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from distributed import Client

from zdq.consumer import Consumer, ConsumerBaseClass, GeneralConsumer
from zdq.errors import ClosedError, PlacementError, ZdqTimeoutError
from zdq.queue_pool import QueuePool
from zdq.stats import ConsumerStats
from zdq.transport.sockets import new_identity

__all__ = ["ConsumerPool"]

logger = logging.getLogger(__name__)


class ConsumerPool:
    """``n_consumers`` consumers of a :class:`QueuePool`, each connected to all of its queues.

    Parameters
    ----------
    client : distributed.Client
        The cluster's client.
    queue_pool : QueuePool
        The queues to consume.
    ConsumerClass : type
        A :class:`ConsumerBaseClass` subclass; its ``process_item`` handles raw items.
    n_consumers : int
        Consumers to place, spread over the workers (fewer than queues is fine).
    batch_size : int, optional
        Accepted for daskqueue compatibility. zdq consumers fetch whole chunks, whose size the
        submitter sets (``batch_size`` of ``batch_submit``, capped by ``chunk-size``).
    max_concurrency : int
        Threads per consumer that run tasks (raise it for I/O-bound tasks).
    early_ack : bool
        ``False`` (default): a chunk is acknowledged after its results, so a consumer that dies
        mid-chunk loses nothing (at least once). ``True``: acknowledged on receipt (at most once).
    prefetch : int, optional
        Chunks a consumer keeps in hand (default from ``zdq.prefetch``).

    Examples
    --------
    >>> consumer_pool = ConsumerPool(client, queue_pool, n_consumers=2)   # doctest: +SKIP
    >>> consumer_pool.start()                                             # doctest: +SKIP
    >>> consumer_pool.join(progress=True)                                 # doctest: +SKIP
    >>> consumer_pool.results()                                           # doctest: +SKIP
    {'GeneralConsumer-0': {1: 328350, ...}, 'GeneralConsumer-1': {...}}
    """

    def __init__(
        self,
        client: Client,
        queue_pool: QueuePool,
        ConsumerClass: type[ConsumerBaseClass] = GeneralConsumer,
        n_consumers: int = 1,
        batch_size: int | None = None,
        max_concurrency: int = 1,
        early_ack: bool = False,
        retries: int | None = None,
        *,
        prefetch: int | None = None,
    ) -> None:
        if not (isinstance(ConsumerClass, type) and issubclass(ConsumerClass, ConsumerBaseClass)):
            raise TypeError(f"ConsumerClass must be a subclass of ConsumerBaseClass, got {ConsumerClass!r}")
        if not isinstance(n_consumers, int) or n_consumers < 1:
            raise ValueError(f"n_consumers must be a positive integer, got {n_consumers!r}")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.client = client
        self.queue_pool = queue_pool
        self.consumer_class = ConsumerClass
        self.n_consumers = n_consumers
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.early_ack = early_ack
        self.retries = retries
        self.settings = queue_pool.settings.with_overrides(prefetch=prefetch)
        self.names = [f"{ConsumerClass.__name__}-{i}" for i in range(n_consumers)]
        self._identities = [new_identity() for _ in range(n_consumers)]
        self._actor_futures: list[Any] = []
        self._consumers: list[Any] = []
        self._closed = False
        self._place()

    def _place(self) -> None:
        workers = sorted(self.client.scheduler_info(n_workers=-1)["workers"])
        if not workers:
            raise PlacementError("the Dask cluster has no workers to place consumers on")
        try:
            for i, (name, ident) in enumerate(zip(self.names, self._identities)):
                self._actor_futures.append(
                    self.client.submit(
                        Consumer,
                        name,
                        ident,
                        self.consumer_class,
                        self.settings,
                        self.max_concurrency,
                        self.early_ack,
                        actor=True,
                        workers=[workers[i % len(workers)]],
                        allow_other_workers=False,
                        pure=False,
                        key=f"zdq-consumer-{name}-{uuid.uuid4().hex[:8]}",
                    )
                )
            self._consumers = [f.result() for f in self._actor_futures]
        except Exception as e:
            self.close()
            raise PlacementError(f"could not place consumers: {e}") from e

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("consumer pool is closed")

    # -- daskqueue API --------------------------------------------------------------------------
    def start(self) -> None:
        """Start every consumer: each connects to every queue and pulls work."""
        self._check_open()
        logger.info("Starting %d consumers", self.n_consumers)
        endpoints = self.queue_pool.endpoints
        for call in [c.start(endpoints) for c in self._consumers]:
            call.result()

    def cancel(self) -> None:
        """Stop pulling work; chunks already received finish and report. ``start()`` resumes."""
        if self._closed:
            return
        for call in [c.cancel() for c in self._consumers]:
            call.result()

    def join(self, timestep: float = 0.2, print_timestep: float = 2.0, progress: bool = False, timeout: float | None = None) -> None:
        """Wait until every queue is drained and every result has reached this process.

        Then the consumers stop pulling (as in daskqueue); ``start()`` resumes them.

        Parameters
        ----------
        timestep : float
            Seconds between two looks at the brokers' counters.
        progress : bool
            Show a progress bar (tqdm), advanced by results as they arrive, with the rate.
        timeout : float, optional
            Raise :class:`ZdqTimeoutError` if the work is not done by then.
        """
        self._check_open()
        driver = self.queue_pool.driver
        logger.info("Waiting for the %d consumers to process all items in queue_pool...", self.n_consumers)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=0, unit="task", desc="zdq", dynamic_ncols=True)
        start_done = driver.completed
        try:
            while True:
                driver.flush(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
                stats = self.queue_pool.broker_statistics()
                pending = sum(s.pending_tasks for s in stats)
                me = driver.identity
                behind = sum(
                    max(0, s.routed_tasks.get(me, 0) - driver.received_from(i)) for i, s in enumerate(stats)
                )
                outstanding = driver.outstanding
                if bar is not None:
                    done = driver.completed - start_done
                    bar.total = done + max(pending + behind, outstanding)
                    bar.update(done - bar.n)
                if pending == 0 and behind == 0 and outstanding == 0:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise ZdqTimeoutError(f"join: {max(pending, outstanding)} tasks were still pending at the timeout")
                driver.wait_results(timeout=timestep)
                if pending == 0 and outstanding == 0:
                    time.sleep(min(timestep, 0.05))  # results routed but still on the wire
        finally:
            if bar is not None:
                bar.close()
        logger.info("All consumers are done ! %d items processed.", self.nb_consumed())
        self.cancel()

    def results(self) -> dict[str, dict[int, Any]]:
        """Every result this pool's consumers produced, per consumer: ``{name: {task key: result}}``.

        A failed task's value is its exception. Needs ``keep_results=True`` on the QueuePool.
        """
        if not self.queue_pool.keep_results:
            raise ClosedError("the QueuePool was made with keep_results=False: read results from futures")
        store = self.queue_pool.driver.results
        return {name: dict(store.get(ident, {})) for name, ident in zip(self.names, self._identities)}

    def nb_consumed(self) -> int:
        """Tasks whose results reached this process from this pool's consumers."""
        done_by = self.queue_pool.driver.done_by
        return sum(done_by.get(ident, 0) for ident in self._identities)

    def statistics(self, timeout: float = 10.0) -> list[ConsumerStats]:
        calls = [c.statistics() for c in self._consumers]
        return [c.result(timeout=timeout) for c in calls]

    def __len__(self) -> int:
        return self.n_consumers

    def __getitem__(self, index: int) -> Any:
        return self._consumers[index]

    def __repr__(self) -> str:
        if self._closed:
            return f"Consumers : {self.n_consumers} Consumers(s), closed"
        try:
            done_by = self.queue_pool.driver.done_by
            lines = [
                f"\n\t{name}: {done_by.get(ident, 0)} processed" for name, ident in zip(self.names, self._identities)
            ]
        except ClosedError:
            lines = []
        return f"Consumers : {self.n_consumers} Consumers(s)" + "".join(lines)

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every consumer and release its actor. Idempotent."""
        if self._closed:
            return
        self._closed = True
        stops = []
        for consumer in self._consumers:
            try:
                stops.append(consumer.stop())
            except Exception as e:
                logger.debug("stopping a consumer failed: %s", e)
        for call in stops:
            try:
                call.result(timeout=15)
            except Exception as e:
                logger.debug("stopping a consumer failed: %s", e)
        for fut in self._actor_futures:
            fut.release()
        self._actor_futures.clear()
        self._consumers.clear()

    def __enter__(self) -> ConsumerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
