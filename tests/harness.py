"""Two ways to run zdq in tests without starting a cluster per test.

**The in-process harness** (:class:`Harness`, fixture ``harness``): brokers, a driver and
consumers of one pool in this process, on real ZeroMQ sockets over 127.0.0.1 and zdq's real
threads, with no Dask. As dramatiq tests most behaviour against its stub broker, retries and
backoff, time limits, dead letters, callbacks and cancels are tested here in milliseconds. Tasks
are encoded as :class:`~zdq.QueuePool` encodes them (:func:`~zdq.tasks.call_task`,
:class:`~zdq.tasks.TaskOptions`, :func:`~zdq.tasks.dumps_task`, and
:meth:`~zdq.chunking.Chunking.pack_batch` for batches); what the harness adds is only wiring.

**A shared cluster of three named workers** (fixtures ``cluster_abc``/``client_abc``): worker
processes named ``a``, ``b`` and ``c``, started once per session, for tests that need Dask and
placement by worker name but kill nothing (or stop a worker, SIGCONT in a ``finally``). Each test is
checked for leaked zdq actors and threads afterwards, as ``client`` is, and finds the three workers
by name before it starts. Tests that kill workers keep their own cluster (``client3`` in
``conftest.py``): a nanny's restart must not decide what the next test sees.

Test modules load these fixtures with ``pytest_plugins = ["tests.harness"]`` (one registration
per session, so every module shares the one cluster), and import :class:`Harness` only under
``TYPE_CHECKING``: a module imported before pytest loads it as a plugin keeps plain asserts.

Contact with zdq's internals
----------------------------
All of it is in :class:`Harness`, so that a refactor of the driver, broker or consumer that keeps
these edges needs no change elsewhere in the tests:

- constructors: ``BrokerCore(name, sock, storage, settings, creator=)``, ``Driver(name,
  endpoints, settings, identity=)`` and the consumer actor class ``Consumer(name, identity,
  consumer_class, settings, max_concurrency=, early_ack=, retries=, time_limit=)``, whose methods
  run here as plain calls; their ``start``/``stop``/``close``;
- submission: ``Driver.submit_task``, ``reserve``, ``submit_chunk``, ``payload_key`` and
  ``consumers`` (as ``QueuePool.submit``/``batch_submit`` use them), ``flush``,
  ``wait_results``, ``outstanding``, ``results_for``;
- what is read: ``BrokerCore.statistics``, ``dead_letters``, ``requeue_dead``;
  ``Consumer.statistics``.

Who owns what
-------------
=============================  ====================================  ===========================
State                          Owner                                 Others
=============================  ====================================  ===========================
the brokers' zmq context       the harness (made in ``start``,       brokers' loops use their
                               destroyed with linger 0 in ``close``) sockets
brokers, driver, consumers     the harness: started in ``start``,    their own threads
                               stopped in ``close``, last first
``_closed``                    the test's thread                     none
=============================  ====================================  ===========================
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import zmq
from distributed import Client, LocalCluster

from zdq.broker import BrokerCore
from zdq.codec.chunking import Chunking
from zdq.config import PoolSettings, seconds_or_none, settings
from zdq.consumer import Consumer, ConsumerBaseClass, GeneralConsumer
from zdq.client.driver import Driver
from zdq.client.submit import TaskDefaults
from zdq.futures import BatchFuture, TaskFuture
from zdq.stats import BrokerStats, ConsumerStats
from zdq.storage.memory import MemoryStorage
from zdq.codec.tasks import CALLS, TaskOptions, call_task, check_calls, dumps_task
from zdq.transport.sockets import bind_router, new_identity
from zdq._actor import scheduler_workers

__all__ = ["Harness", "assert_no_zdq_threads", "client_abc", "cluster_abc", "harness", "make_harness"]

logger = logging.getLogger(__name__)

#: Heartbeats fast enough that a lost peer shows within a second, slow enough for a loaded machine.
HARNESS_SETTINGS = {"heartbeat_interval": "100ms", "heartbeat_timeout": "2s"}

#: A harness pool has no default task options: calls merge theirs the way QueuePool does.
_DEFAULTS = TaskDefaults(TaskOptions())


def zdq_threads() -> list[str]:
    """The zdq threads alive in this process."""
    return [t.name for t in threading.enumerate() if t.name.startswith("zdq-")]


def assert_no_zdq_threads(before: frozenset[str] | set[str] = frozenset(), timeout: float = 10.0) -> None:
    """Fail unless every zdq thread not in ``before`` ends within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [name for name in zdq_threads() if name not in before]
        if not left:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"leak: zdq threads still running {timeout:g}s after the harness closed: {left}")
        time.sleep(0.02)


class Harness:
    """One pool's brokers, driver and consumers in this process (no Dask).

    Parameters
    ----------
    n_queues : int
        Brokers (transient, on :class:`MemoryStorage`), each bound on 127.0.0.1.
    n_consumers : int
        Consumers, each connected to every broker.
    start_consumers : bool
        Start the consumers with the pool (else :meth:`start_consumers` does, as
        ``ConsumerPool.start()`` would).
    max_concurrency, early_ack, retries, time_limit :
        As for :class:`~zdq.ConsumerPool`: the consumers' settings.
    consumer_class : type
        What the consumers instantiate (``GeneralConsumer`` runs submitted calls).
    **overrides :
        Pool settings (``window``, ``chunk_size``, heartbeats...), as for :class:`~zdq.QueuePool`.

    >>> with Harness() as h:  # doctest: +SKIP
    ...     h.submit(add, 1, 2).result(timeout=10)
    3
    """

    def __init__(
        self,
        n_queues: int = 1,
        n_consumers: int = 1,
        *,
        max_concurrency: int = 1,
        early_ack: bool = False,
        retries: int = 0,
        time_limit: float | str | None = None,
        consumer_class: type[ConsumerBaseClass] = GeneralConsumer,
        start_consumers: bool = True,
        **overrides: Any,
    ) -> None:
        self.settings: PoolSettings = settings(**{**HARNESS_SETTINGS, **overrides})
        self.n_queues = n_queues
        self.n_consumers = n_consumers
        self._consumer_options: dict[str, Any] = {
            "max_concurrency": max_concurrency,
            "early_ack": early_ack,
            "retries": retries,
            "time_limit": seconds_or_none(time_limit, "time_limit"),
        }
        self._consumer_class = consumer_class
        self._start_consumers = start_consumers
        self._ctx: zmq.Context[Any] | None = None
        self.brokers: list[BrokerCore] = []
        self.endpoints: list[str] = []
        self.driver: Driver | None = None
        self.consumers: list[Consumer] = []
        self.consumer_identities: list[bytes] = []
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Harness:
        """Bind the brokers, start the driver, then the consumers (consuming at once); on a
        failure, close what was started and raise."""
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> Harness:
        self._ctx = zmq.Context()
        identity = new_identity()
        for i in range(self.n_queues):
            sock, endpoint, _ = bind_router(self._ctx, "127.0.0.1", max_message_size=self.settings.max_message_size)
            storage = MemoryStorage()
            storage.open()
            core = BrokerCore(f"harness-{i}", sock, storage, self.settings, creator=identity)
            core.start()
            self.brokers.append(core)
            self.endpoints.append(endpoint)
        self.driver = Driver("harness", self.endpoints, self.settings, identity=identity)
        self.driver.start()
        self.driver.consumers = self.n_consumers
        if self._start_consumers:
            self.start_consumers()
        return self

    def start_consumers(self) -> None:
        """Start the pool's ``n_consumers`` consumers (once)."""
        for i in range(len(self.consumers), self.n_consumers):
            self.add_consumer(f"harness-consumer-{i}")

    def add_consumer(self, name: str) -> Consumer:
        """Start one more consumer on every broker (consuming at once)."""
        ident = new_identity()
        consumer = Consumer(name, ident, self._consumer_class, self.settings, **self._consumer_options)
        consumer.start(list(self.endpoints))
        self.consumers.append(consumer)
        self.consumer_identities.append(ident)
        return consumer

    def close(self) -> None:
        """Stop consumers, driver and brokers (last started first); idempotent."""
        if self._closed:
            return
        self._closed = True
        for consumer in reversed(self.consumers):
            consumer.stop()
        if self.driver is not None:
            self.driver.close()
        for core in reversed(self.brokers):
            core.stop()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)

    def __enter__(self) -> Harness:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- submission, as QueuePool does it --------------------------------------------------------
    @staticmethod
    def _options(given: dict[str, Any]) -> TaskOptions | None:
        """TaskOptions from the call's keywords, merged as a QueuePool without defaults merges them."""
        return _DEFAULTS.merge_all(**given)

    def _driver(self) -> Driver:
        if self.driver is None:
            raise RuntimeError("the harness is not started")
        return self.driver

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        retries: int | None = None,
        retry_backoff: float | None = None,
        retry_on: tuple[type[BaseException], ...] | type[BaseException] | None = None,
        time_limit: float | str | None = None,
        timeout: float | None = 10.0,
        **kwargs: Any,
    ) -> TaskFuture:
        """Queue ``fn(*args, **kwargs)`` with the options of :meth:`QueuePool.submit`."""
        options = self._options(
            {"retries": retries, "retry_backoff": retry_backoff, "retry_on": retry_on, "time_limit": time_limit}
        )
        return self._driver().submit_task(dumps_task(call_task(fn, args, kwargs, options)), timeout=timeout)

    def batch_submit(
        self,
        calls: Sequence[tuple[Any, ...]],
        batch_size: int | None = None,
        *,
        timeout: float | None = 10.0,
        **options: Any,
    ) -> BatchFuture:
        """Queue calls ``(fn, *args)`` as chunks, as :meth:`QueuePool.batch_submit` does."""
        driver = self._driver()
        entries = list(calls)
        check_calls(entries)
        chunking = Chunking.of(self.settings)
        size = chunking.batch_size(batch_size, len(entries), consumers=self.n_consumers, queues=self.n_queues)
        base = driver.reserve(len(entries))
        packed = chunking.pack_batch(base, entries, size, driver.payload_key, CALLS, self._options(options))
        batch = BatchFuture(base, len(entries))
        batch._driver = driver
        for first, n, payload in packed:
            driver.submit_chunk(first, n, payload, batch, first - base, timeout=timeout)
        return batch

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every task submitted so far is confirmed by its broker."""
        self._driver().flush(timeout)

    def join(self, timeout: float = 30.0) -> None:
        """Wait until every task submitted has its result and every queue is drained (what
        ``ConsumerPool.join`` waits for); fail the test naming what is left at the timeout."""
        deadline = time.monotonic() + timeout
        driver = self._driver()
        if not driver.wait_results(timeout):
            pytest.fail(f"join: {driver.outstanding} tasks still without a result after {timeout:g}s")
        while True:
            left = {s.name: s.pending_tasks for s in self.broker_statistics() if s.pending_tasks}
            if not left:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"join: queues not drained after {timeout:g}s (tasks pending by queue: {left})")
            time.sleep(0.01)

    # -- what the brokers and consumers say ------------------------------------------------------
    def dead_letters(self) -> list[Any]:
        """Every broker's dead letters (``DeadLetter`` records: chunk id, meta, reason)."""
        return [letter for core in self.brokers for letter in core.control.dead_letters()]

    def requeue_dead_letters(self) -> int:
        return sum(core.control.requeue_dead(None) for core in self.brokers)

    def broker_statistics(self) -> list[BrokerStats]:
        return [core.control.statistics(endpoint) for core, endpoint in zip(self.brokers, self.endpoints)]

    def consumer_statistics(self) -> list[ConsumerStats]:
        return [consumer.statistics() for consumer in self.consumers]

    def results(self) -> dict[str, dict[int, Any]]:
        """Every result the driver took, per consumer: ``{name: {task id: value}}``."""
        driver = self._driver()
        return {c.name: driver.results_for([i]) for c, i in zip(self.consumers, self.consumer_identities)}


def make_harness(leak_timeout: float = 10.0, **options: Any) -> Iterator[Callable[..., Harness]]:
    """Yield a factory of started harnesses; close them all at the end, then fail unless every
    zdq thread started meanwhile ends within ``leak_timeout`` seconds."""
    gc.collect()
    before = set(zdq_threads())
    made: list[Harness] = []

    def factory(n_queues: int = 1, n_consumers: int = 1, **kwargs: Any) -> Harness:
        h = Harness(n_queues, n_consumers, **{**options, **kwargs})
        made.append(h)
        return h.start()

    try:
        yield factory
    finally:
        for h in reversed(made):
            h.close()
        assert_no_zdq_threads(before, leak_timeout)


@pytest.fixture
def harness() -> Iterator[Callable[..., Harness]]:
    """A factory of in-process pools: ``harness(n_queues, n_consumers, **options)``; each one is
    closed at the end of the test, which then fails if a zdq thread is left running."""
    yield from make_harness()


# -- a shared cluster of three named workers ---------------------------------------------------
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test on the shared cluster starts one: marked `cluster`, as conftest.py marks those on
    # `client`, so that `-m "not cluster"` stays the quick run (harness tests are not marked).
    for item in items:
        if "cluster_abc" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def cluster_abc() -> Iterator[LocalCluster]:
    """Worker processes named a, b and c (one thread each), started once for the session."""
    from .conftest import abc_cluster

    with abc_cluster() as cluster:
        yield cluster


@pytest.fixture
def client_abc(cluster_abc: LocalCluster) -> Iterator[Client]:
    """A client of the shared a/b/c cluster; the test fails if it leaves a zdq actor or thread."""
    from .conftest import assert_no_zdq_leaks

    with Client(cluster_abc) as client:
        client.wait_for_workers(3, timeout=60)
        names = sorted(w["name"] for w in scheduler_workers(client).values())
        assert names == ["a", "b", "c"], f"the shared cluster lost a worker (a test killed one?): {names}"
        yield client
        assert_no_zdq_leaks(client)
