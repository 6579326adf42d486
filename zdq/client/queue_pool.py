"""QueuePool: the client-side facade that places brokers and submits work to them.

Dask places the brokers (one actor per queue, spread over the workers) and nothing else: tasks go
from this process to the brokers over ZeroMQ, through the pool's :class:`~zdq.driver.Driver`. Tasks
are built and pickled by :mod:`zdq.tasks`; batches are cut into chunks by :mod:`zdq.chunking`.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import functools
import logging
import os
import threading
import uuid
import weakref
from dataclasses import dataclass
from datetime import timedelta
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import time

from distributed import Client

from zdq import config
from zdq._actor import allowed_workers, candidate_workers, check_resources, pick_worker, start_supervisor
from zdq.broker import Broker
from zdq.consumer import GeneralConsumer
from zdq.config import PoolSettings, seconds_or_none, settings, timeout_or_none
from zdq.client.handles import QueueHandle
from zdq.driver import Driver
from zdq.client.cluster import OwnedCluster, cluster_for
from zdq.errors import (
    WrongConsumerClass,
    BrokerLost,
    BrokerUnreachable,
    ClosedError,
    PlacementError,
    QueueLocked,
    QueueMissing,
    SerializationError,
    StorageCorrupt,
    SubmitTimeout,
    ZdqError,
    ZdqTimeoutError,
)
from zdq.client import registry
from zdq.relay.path import RelayPath
from zdq.transport import protocol as p
from zdq.transport.addresses import host_of
from zdq.transport.reach import CLIENT_OUTSIDE, OPEN_TO_CLIENT, describe
from zdq.transport.sockets import new_identity
from zdq.futures import BatchFuture, TaskFuture
from zdq.chunking import Chunking
from zdq.names import counted, queue_name
from zdq.objects import as_calls
from zdq.client.schedules import Schedule, cancel_schedule, list_schedules, make_schedule
from zdq.observe.monitor import ensure_installed
from zdq.tasks import CALLS, ITEMS, TaskOptions, call_task, check_calls, dumps_task, item_task
from zdq.stats import BrokerStats, PoolStats
from zdq.timing import Timing, timing_of
from zdq.transport.security import ClientKeys, PoolKeys

__all__ = ["Durability", "QueuePool", "DeadLetterInfo", "current_pool"]

logger = logging.getLogger(__name__)

_NO_OPTIONS = TaskOptions()


@dataclass(frozen=True)
class DeadLetterInfo:
    """A dead-lettered task: its queue, its id there, and why (with the traceback)."""

    queue: str
    chunk_id: int
    n_tasks: int
    reason: str


class Durability(str, enum.Enum):
    """Where a queue keeps its tasks: in the broker's memory, or on disk (LMDB)."""

    TRANSIENT = "transient"
    DURABLE = "durable"


def _durability(value: Durability | str) -> Durability:
    try:
        return Durability(value.value if isinstance(value, Durability) else str(value).lower())
    except ValueError:
        raise ValueError(f"durability must be 'transient' or 'durable', got {value!r}") from None


def _insert_bar(total: int | None) -> Any:
    from tqdm.auto import tqdm

    class Bar(tqdm):  # type: ignore[misc]
        monitor_interval = 0  # no monitor thread left behind (the bar is updated as chunks go)

    return Bar(total=total, unit="task", desc="zdq insert", dynamic_ncols=True)


class _Reading:
    """An iterable of the caller's, read until it ends or raises: an error of its own stops the
    reading as its end would (so that the tasks read before it are queued), and is kept for the
    caller to raise once they are."""

    __slots__ = ("_it", "error")

    def __init__(self, items: Iterable[Any]) -> None:
        self._it = iter(items)
        self.error: Exception | None = None

    def __iter__(self) -> _Reading:
        return self

    def __next__(self) -> Any:
        if self.error is not None:
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            raise
        except Exception as e:
            self.error = e
            raise StopIteration from None


def _weakly(method: Callable[[], str]) -> Callable[[], str]:
    """``method`` of a pool, called through a weak reference: the driver's thread holds what it
    is given, and a strong reference would keep a pool dropped without close() alive for ever
    (its finalizer, which closes the driver, would never run)."""
    ref = weakref.WeakMethod(method)

    def call() -> str:
        bound = ref()
        return "" if bound is None else bound()

    return call


def _check_worker_class(worker_class: type | None) -> None:
    if worker_class is not None and not (isinstance(worker_class, type) and issubclass(worker_class, GeneralConsumer)):
        raise WrongConsumerClass(
            f"submitted functions run on GeneralConsumer and its subclasses only: worker_class="
            f"{worker_class!r:.80} cannot run them (put() items for a ConsumerBaseClass's process_item)"
        )


class QueuePool:
    """A pool of ``n_queues`` queues placed on the workers of a Dask cluster.

    Parameters
    ----------
    client : distributed.Client or None
        The cluster's client; used only to place and supervise the brokers. ``None``: the
        default client (the one made last in this process) if there is one, else **embedded
        mode**: the pool starts a local cluster of ``parallel`` worker processes (default one
        per CPU) and closes it, every process of it, on :meth:`close` (see :func:`zdq.local`).
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
    retries, retry_backoff, retry_on, time_limit
        Default task options (see :meth:`submit`).
    workers : list of str, optional
        Addresses or names of the workers to place brokers on (default: all workers).
    resources : dict, optional
        Place brokers only on workers that declare these Dask resources (``{"GPU": 1}`` for workers
        started with ``dask worker --resources "GPU=1"``); :class:`PlacementError` if none does.
    auth : bool, optional
        CurveZMQ on every socket (default ``zdq.auth``, true). ``False`` is for trusted networks
        and benchmarks only: anyone who can reach a broker's port can then run code on the
        workers. It is refused when the Dask cluster itself uses TLS.
    relay : bool, optional
        Carry this process's tasks and results through a relay actor on a worker, over Dask's
        own comm, instead of straight to the brokers' ports (default ``zdq.relay``, false). For
        a client that reaches the scheduler but not the workers (Dask Gateway, Kubernetes, a
        laptop on a cloud cluster); slower than the direct path. Consumers always connect to the
        brokers directly. A relay whose worker dies is placed again.
    parallel : int, optional
        Worker processes of the local cluster started in embedded mode (``client=None`` and no
        default client).
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
        client: Client | None,
        n_queues: int = 1,
        durability: Durability | str = Durability.TRANSIENT,
        dirpath: str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
        keep_results: bool = True,
        retries: int = 0,
        retry_backoff: float = 0.1,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        time_limit: float | str | None = None,
        workers: Sequence[str] | None = None,
        resources: Mapping[str, float] | None = None,
        auth: bool | None = None,
        relay: bool | None = None,
        start: bool = True,
        parallel: int | None = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(n_queues, int) or isinstance(n_queues, bool) or n_queues < 1:
            raise ValueError(f"n_queues must be a positive integer, got {n_queues!r}")
        self.durability = _durability(durability)
        if self.durability is Durability.DURABLE and dirpath is None:
            raise ValueError("a durable QueuePool needs dirpath=...")
        if self.durability is Durability.TRANSIENT and dirpath is not None:
            raise ValueError(
                f"dirpath={dirpath!r} is for durable queues: pass durability='durable' too (a transient "
                "queue keeps its tasks in memory)"
            )
        if client is not None and not isinstance(client, Client):
            raise TypeError(f"QueuePool needs a distributed.Client (or None for the default one), got {client!r:.80}")
        if client is not None and parallel is not None:
            raise ValueError("parallel= sizes the local cluster of QueuePool(None, ...): pass client=None, or no parallel")
        self.n_queues = n_queues
        self.dirpath = None if dirpath is None else os.path.abspath(os.fspath(dirpath))
        self.name = name or ("default" if self.durability is Durability.DURABLE else f"zdq-{uuid.uuid4().hex[:8]}")
        self.settings: PoolSettings = settings(**overrides)
        self.keep_results = keep_results
        self.default_options = TaskOptions(
            retries=retries,
            retry_backoff=retry_backoff,
            retry_on=tuple(retry_on) if isinstance(retry_on, (tuple, list)) else retry_on,
            time_limit=seconds_or_none(time_limit, "time_limit"),
        )
        #: The batch size of this pool's ConsumerPool (daskqueue's batch_size): caps the chunks
        #: submitted from then on, so that a consumer takes at most that many tasks at once.
        self.consumer_batch_size: int | None = None
        #: Each queue's name (see :func:`zdq.names.queue_name`): the keys of get_queue_size().
        self.queue_names = [queue_name(self.name, i) for i in range(n_queues)]
        self.resources = check_resources(resources)
        #: The local cluster this pool started (embedded mode), closed with it.
        self._owned_cluster: OwnedCluster | None = None
        #: The ConsumerPool that :func:`zdq.local` started with this pool (held here: ConsumerPools
        #: are otherwise known to their QueuePool by weak reference).
        self.local_consumers: Any = None
        if client is None:  # as Dask's own APIs do: the default client, else an embedded cluster
            client, self._owned_cluster = cluster_for(parallel)
        self.client = client
        try:
            self._allowed_workers = allowed_workers(client, workers)
        except BaseException:
            self._close_owned_cluster()
            raise
        self.auth = bool(config.get("auth")) if auth is None else bool(auth)
        if relay is not None and not isinstance(relay, bool):
            raise TypeError(f"relay must be True or False, got {relay!r:.80}")
        self.relay = config.flag("relay") if relay is None else relay
        self._relay: RelayPath | None = None  # the relay the driver goes through, when relay=True
        self._keys: PoolKeys | None = None
        self.payload_key: bytes | None = None
        self._actor_futures: list[Any] = []
        self._brokers: list[Any] = []
        self.endpoints: list[str] = []
        self._driver: Driver | None = None
        self._closed = False
        self._stop_supervisor = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._lost_since: dict[int, float] = {}  # queues lost and not yet placed again
        self._gone: set[int] = set()  # durable queues that cannot be placed again (their futures failed)
        self._silent_logged: set[int] = set()
        self._placed_on: dict[int, str] = {}
        self._where: list[tuple[str, str]] = []  # (host, queue id) of each queue
        self._identity = new_identity()  # the driver's: brokers hand it the results nobody else takes
        self._owner_token = os.urandom(16)  # names this owner in the registry (never the identity)
        self._listeners: weakref.WeakSet[Any] = weakref.WeakSet()
        self._subscribed: list[weakref.ref[Any]] = []
        #: Every consumer identity that a ConsumerPool of this process placed for this pool.
        self.consumer_identities: set[bytes] = set()
        self.recoveries = 0
        self.reset_by_restart = False
        self._schedules_made = 0  # the i-th schedule made here goes to queue i % n_queues
        self._schedule_lock = threading.Lock()
        # Attaching: a durable pool always may (one name and directory is one pool); a transient
        # one when it was given the name of a live pool.
        self._may_attach = self.durability is Durability.DURABLE or name is not None
        self._record: registry.PoolRecord | None = None  # set when attached to another's pool
        self._attached_keys: ClientKeys | None = None
        # How long a lost queue may take to be placed again (a nanny restarting its worker takes
        # seconds) before what it held fails: every future settles within a bound.
        self._recovery_timeout = max(60.0, 4 * self.settings.heartbeat_timeout)
        if start:
            try:
                self.start()
            except BaseException:
                self._close_owned_cluster()
                raise

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> QueuePool:
        """Place one broker per queue on the workers and connect to them; or, if a live pool of
        this name (and directory) runs on the cluster, attach to it. Idempotent."""
        if self._closed:
            raise ClosedError(f"queue pool {self.name} is closed")
        if self._driver is not None:
            return self
        if self._may_attach:
            record = registry.lookup(self.client, self.name, self.dirpath)
            if record is not None:
                return self._attach(record)
        try:
            return self._place()
        except QueueLocked:
            # Another producer placed this durable pool a moment ago: attach to it once it is
            # published (within a bound).
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                record = registry.lookup(self.client, self.name, self.dirpath) if self._may_attach else None
                if record is not None:
                    return self._attach(record)
                time.sleep(0.2)
            raise

    @classmethod
    def attach(cls, client: Client | None, name: str, *, dirpath: str | os.PathLike[str] | None = None, **kwargs: Any) -> QueuePool:
        """Attach to the live pool ``name`` (a durable one: with its ``dirpath``), placed by another
        QueuePool in this or any other process of the cluster, a task of the pool included. It
        submits to the same queues; its futures and ``results()`` hold its own tasks' results.

        Raises
        ------
        ClosedError
            No live pool of that name runs on the cluster.
        """
        pool = cls(client, 1, "durable" if dirpath is not None else "transient", dirpath, name=name, start=False, **kwargs)
        record = registry.lookup(pool.client, name, pool.dirpath)
        if record is None:
            where = f" with dirpath {pool.dirpath}" if pool.dirpath else ""
            raise ClosedError(f"no live zdq pool named {name!r}{where} on this cluster")
        return pool._attach(record)

    def _attach(self, record: registry.PoolRecord) -> QueuePool:
        if record.durable != (self.durability is Durability.DURABLE):
            raise ZdqError(f"pool {self.name} is live on the cluster as a {'durable' if record.durable else 'transient'} pool")
        if self.n_queues != len(record.queue_names):
            logger.info("attaching to pool %s: it has %d queues", self.name, len(record.queue_names))
        if self._allowed_workers is not None:
            logger.info("pool %s is live on the cluster: attached to it (workers= applies to its owner only)", self.name)
        self._record = record
        self.n_queues = len(record.queue_names)
        self.queue_names = list(record.queue_names)
        self.endpoints = list(record.endpoints)
        self._attached_keys = record.client_keys
        self.payload_key = record.payload_key
        self.settings = record.settings.with_overrides(window=self.settings.window, buffer_bytes=self.settings.buffer_bytes)
        started = time.monotonic()
        self._start_driver()
        self._check_reach(started)
        self._supervisor = start_supervisor(self, self._stop_supervisor, "zdq-supervisor-queues", interval=1.0)
        logger.info("Attached to the %d queues of pool %s.", self.n_queues, self.name)
        return self

    @property
    def attached(self) -> bool:
        """Whether this pool feeds queues placed by another QueuePool (see :meth:`attach`)."""
        return self._record is not None

    def _place(self) -> QueuePool:
        started = time.monotonic()
        self._keys = self._make_keys()
        ensure_installed(self.client)  # once per cluster: what /zdq, /metrics and `zdq status` read
        try:
            # Every step runs for all queues at once: placing a pool costs about the same per queue
            # whatever its size.
            known = self.client.scheduler_info(n_workers=-1)["workers"]  # asked once, not per queue
            for i in range(self.n_queues):
                self._actor_futures.append(self._place_broker(i, known=known))
            self._brokers = [fut.result(timeout=60) for fut in self._actor_futures]
            # A durable queue keeps the payload key of the pool that created it, so that a pool
            # reopened after a restart reads what was stored; the queues of one dirpath agree on it.
            proposed = os.urandom(32) if self.auth else None
            opens = [b.open(self._identity, proposed, self.n_queues) for b in self._brokers]
            opened = [call.result(timeout=60) for call in opens]
            self.endpoints = [endpoint for endpoint, _, _, _, _ in opened]
            # A queue's host is its worker's as the scheduler names it, the name recovery places
            # by (the broker's own view may be another name of the same machine).
            self._where = [(host_of(self._placed_on[i]), str(queue_id)) for i, (_, _, queue_id, _, _) in enumerate(opened)]
            beyond = sorted({d for i, (_, _, _, _, dirs) in enumerate(opened) for d in dirs})
            if beyond:
                logger.warning(
                    "durable pool %s was opened with %s, but its directory also holds queues beyond "
                    "them, which this pool does not serve (their tasks and schedules wait there): %s; open it "
                    "with as many queues to serve them",
                    self.name, counted(self.n_queues, "queue"), ", ".join(beyond),
                )
            keys = {key for _, _, _, key, _ in opened}
            if len(keys) > 1:
                raise StorageCorrupt(f"the queues under {self.dirpath} were written by different pools (their keys differ)")
            self.payload_key = keys.pop()
        except ZdqError:
            self._release_actors()
            raise
        except Exception as e:
            self._release_actors()
            raise PlacementError(f"could not place the queues of pool {self.name}: {e}") from e
        self._start_driver()
        self._check_reach(started)
        self._supervisor = start_supervisor(self, self._stop_supervisor, "zdq-supervisor-queues")
        self._publish()
        logger.info("Created %d queues in the cluster (pool %s).", self.n_queues, self.name)
        return self

    def _publish(self) -> None:
        """Tell the cluster where this pool's queues are (other producers attach by name)."""
        try:
            registry.publish(
                self.client,
                registry.PoolRecord(
                    name=self.name,
                    durable=self.durability is Durability.DURABLE,
                    dirpath=self.dirpath,
                    queue_names=tuple(self.queue_names),
                    endpoints=tuple(self.endpoints),
                    client_keys=self.client_keys,
                    payload_key=self.payload_key,
                    settings=self.settings,
                    owner_client=str(self.client.id),
                    owner_token=self._owner_token,
                    workers=tuple(self._workers()),
                ),
            )
        except Exception as e:  # the pool works without it; only attaching does not
            logger.warning("pool %s could not be published on the cluster: %s", self.name, e)

    def _start_driver(self) -> None:
        route = None
        if self.relay:
            self._relay = RelayPath(
                self.client,
                self.name,
                self._identity,
                self.client_keys,
                self.settings.max_message_size,
                call_timeout=self.settings.connect_timeout + 2 * self.settings.heartbeat_interval,
                workers=self._allowed_workers,
            )
            self._relay.start(avoid=self._workers())
            route = self._relay.tunnel
            # A pool dropped without close() still lets go of its relay (and its threads).
            weakref.finalize(self, self._relay.close)
        self._driver = Driver(
            self.name,
            self.endpoints,
            self.settings,
            keep_results=self.keep_results,
            keys=self.client_keys,
            payload_key=self.payload_key,
            queue_names=self.queue_names,
            identity=self._identity,
            hint=_weakly(self._why_waiting),
            workers=self._workers(),
            route=route,
        )
        self._driver.start()
        # A pool dropped without close() (daskqueue programs never close theirs) still stops its driver.
        weakref.finalize(self, self._driver.close)

    def _workers(self) -> list[str]:
        """The worker of each queue ("" where unknown)."""
        if self._record is not None:
            known = list(self._record.workers)
            return known + [""] * (self.n_queues - len(known))
        return [self._placed_on.get(i, "") for i in range(self.n_queues)]

    def _check_reach(self, started: float) -> None:
        """Raise :class:`BrokerUnreachable` if this process hears nothing from some broker within
        ``connect-timeout`` of ``started`` (the handshakes get at least 2 s however long placing
        took), after stopping what was started: an error, where a silent pool would hang."""
        driver = self.driver
        timeout = self.settings.connect_timeout
        silent = driver.unreached(max(started + timeout, time.monotonic() + min(2.0, timeout)))
        if not silent:
            return
        workers = self._workers()
        subject = (
            f"pool {self.name}: this process ({driver.driver_name}) reaches the Dask scheduler at "
            f"{getattr(self.client.scheduler, 'address', '?')}, but heard nothing within {timeout:g} s from {len(silent)} of its "
            f"{self.n_queues} brokers"
        )
        exc = BrokerUnreachable(
            describe(
                subject,
                [(self.queue_names[i], self.endpoints[i], workers[i], why) for i, why in sorted(silent.items())],
                CLIENT_OUTSIDE if len(silent) == self.n_queues else OPEN_TO_CLIENT,
            )
        )
        self._driver = None
        driver.close(reason=exc)
        self._close_relay()
        if self._record is None:
            self._release_actors()
        self._record = None
        raise exc

    def _make_keys(self) -> PoolKeys | None:
        if self.auth:
            return PoolKeys.generate()
        security = getattr(self.client, "security", None)
        if security is not None and getattr(security, "require_encryption", False):
            raise ZdqError(
                "this Dask cluster is secured with TLS: zdq will not run its sockets unauthenticated (auth=False)"
            )
        logger.warning(
            "zdq pool %s runs WITHOUT authentication (auth=False): anyone who can reach its brokers' "
            "ports can submit tasks, which means running code on your workers. Use this on trusted "
            "networks only.",
            self.name,
        )
        return None

    @property
    def client_keys(self) -> ClientKeys | None:
        """The CURVE keys of this pool's drivers and consumers (``None`` without authentication)."""
        if self._record is not None:
            return self._attached_keys
        return None if self._keys is None else self._keys.client

    def _place_broker(self, i: int, *, host: str | None = None, known: dict[str, Any] | None = None) -> Any:
        """Place the broker of queue ``i``; ``host``: only on a worker of that host (recovery of a
        durable queue, whose directory is on that host's disk), and never creating a new queue."""
        allowed = self._allowed_workers
        if host is not None:
            here = [a for a in candidate_workers(self.client, allowed, self.resources) if host_of(a) == host]
            if not here:
                raise PlacementError(
                    f"durable queue {self.queue_names[i]} lives in {self._queue_dir(i)} on host {host}, "
                    "and no worker of that host is available to serve it"
                )
            allowed = here
        address = pick_worker(self.client, allowed, i, self._placed_on, self.resources, known)
        queue_name = self.queue_names[i]
        return self.client.submit(
            Broker,
            queue_name,
            self.settings,
            self._queue_dir(i),
            None if self._keys is None else self._keys.server,
            host is not None,
            actor=True,
            workers=[address],
            allow_other_workers=False,
            pure=False,
            key=f"zdq-broker-{queue_name}-{uuid.uuid4().hex[:8]}",
        )

    def subscribe(self, listener: Any) -> None:
        """Tell ``listener`` (held weakly) when a lost queue is served again: the pool calls
        ``listener.on_broker_moved(queue index, new endpoint)``. ConsumerPools subscribe."""
        self._listeners.add(listener)
        self._subscribed.append(weakref.ref(listener))

    def consumers_changed(self) -> None:
        """A ConsumerPool of this pool was made or closed: single tasks are cut for the new count."""
        if self._driver is not None:
            self._driver.consumers = sum(pool.n_consumers for pool in self.consumer_pools())

    def consumer_pools(self) -> list[Any]:
        """The live ConsumerPools of this pool, oldest first."""
        from zdq.client.consumer_pool import ConsumerPool

        alive = [ref() for ref in self._subscribed]
        return [pool for pool in alive if isinstance(pool, ConsumerPool) and not pool._closed]

    def _queue_dir(self, i: int) -> str | None:
        return None if self.dirpath is None else os.path.join(self.dirpath, self.queue_names[i])

    # -- supervision ----------------------------------------------------------------------------
    def _supervise_once(self) -> None:
        driver = self._driver
        if self._closed or driver is None:
            return
        if self.client.status in ("closing", "closed"):
            # The pool's Dask client was closed under it (or its cluster with it): no queue can
            # be placed again, and nothing its futures wait for is sure to come. They fail now,
            # saying so, instead of waiting for ever.
            logger.error("the Dask client of pool %s was closed while the pool was open: its pending tasks fail", self.name)
            self._stop_supervisor.set()
            self._close_relay()
            kept = " (a durable queue kept them: a new pool on the same dirpath runs them)" if self.dirpath else ""
            driver.fail_all(
                ClosedError(
                    f"the Dask client of pool {self.name} was closed (or its cluster) while this task was pending"
                    f"{kept}: close pools before their client"
                )
            )
            return
        if self.client.status != "running":
            return  # reconnecting to its scheduler
        if self._relay is not None and self._relay.needs_replacing():
            self._replace_relay(driver)
        if self._record is not None:
            return self._follow_owner(driver)
        if any(fut.status == "cancelled" for fut in self._actor_futures):
            # client.restart() (or a cancel) took the actors: the cluster was reset on purpose, and a
            # new pool may reopen the same queues. Recovering here would race it for the directories;
            # what this pool's futures wait for will not come, so they fail now.
            logger.warning("the brokers of pool %s were cancelled (client.restart?): its pending tasks fail", self.name)
            self._stop_supervisor.set()
            self.reset_by_restart = True
            self._withdraw()  # a new pool on the same name must not attach to these dead queues
            kept = " (a durable queue kept them: a new pool on the same dirpath runs them)" if self.dirpath else ""
            driver.fail_all(
                BrokerLost(
                    f"the cluster was restarted (client.restart()) while this task of pool {self.name} was "
                    f"pending{kept}; make a new QueuePool"
                )
            )
            return
        for i, fut in enumerate(list(self._actor_futures)):
            if i in self._gone or self._closed:
                continue
            if fut.status == "finished" and i not in self._lost_since:
                # Silence alone is not a loss: a task holding the GIL beside the broker, or a
                # paused worker, keeps it quiet. Dask says when its worker is really gone.
                silence = driver.broker_silence(i)
                if silence > self.settings.heartbeat_timeout and i not in self._silent_logged:
                    self._silent_logged.add(i)
                    logger.warning(
                        "queue %s has been silent for %.0f s; its worker is alive (busy, or holding the GIL)",
                        self.queue_names[i], silence,
                    )
                elif silence < self.settings.heartbeat_timeout:
                    self._silent_logged.discard(i)
                continue
            self._recover(i)

    def _recover(self, i: int) -> None:
        driver = self.driver
        transient = self.durability is Durability.TRANSIENT
        name = self.queue_names[i]
        if i not in self._lost_since:
            self._lost_since[i] = time.monotonic()
            driver.broker_lost(i, memory_lost=transient)
            logger.warning(
                "queue %s was lost with its worker%s; placing it again",
                name,
                " (the tasks and schedules that lived only in its memory are gone: the tasks fail with BrokerLost)"
                if transient
                else "",
            )
        host = None if transient else self._where[i][0]
        try:
            fut = self._place_broker(i, host=host)
        except Exception as e:  # the next round tries again, within the recovery bound
            if time.monotonic() - self._lost_since[i] > self._recovery_timeout:
                return self._unrecoverable(i, e)
            logger.debug("placing queue %s again failed (will retry): %s", name, e)
            return None
        try:
            broker = fut.result(timeout=60)
            endpoint, _, id_found, key, _ = broker.open(self._identity, self.payload_key).result(timeout=60)
            where = (host_of(self._placed_on[i]), str(id_found))
            if not transient and where != self._where[i]:
                raise QueueMissing(
                    f"durable queue {name} placed again on host {where[0]} found queue id {where[1]} in "
                    f"{self._queue_dir(i)}, not {self._where[i][1]} on host {self._where[i][0]}: not the same queue"
                )
            if key != self.payload_key:
                raise StorageCorrupt(f"queue {name} was reopened with another pool's key")
        except QueueMissing as e:
            fut.release()
            return self._unrecoverable(i, e)
        except Exception as e:
            fut.release()
            if time.monotonic() - self._lost_since[i] > self._recovery_timeout:
                return self._unrecoverable(i, e)
            logger.warning("placing queue %s again failed (will retry): %s", name, e)
            return None
        old = self._actor_futures[i]
        self._actor_futures[i], self._brokers[i] = fut, broker
        old.release()
        self.endpoints[i] = endpoint
        del self._lost_since[i]
        self.recoveries += 1
        driver.reconnect(i, endpoint, self._placed_on.get(i, ""))
        self._publish()
        logger.info("queue %s is served again at %s", name, endpoint)
        for listener in list(self._listeners):
            try:
                listener.on_broker_moved(i, endpoint)
            except Exception as e:  # one listener's failure never keeps the others uninformed
                logger.warning("telling %s that queue %s moved failed: %s", type(listener).__name__, name, e)
        return None

    def _replace_relay(self, driver: Driver) -> None:
        """The relay failed: place another and carry every link through it. Each broker is asked
        which of the chunks it never confirmed it holds (the others are sent again), and sends
        again the results it sent on the old path; a broker silent meanwhile fails nothing."""
        assert self._relay is not None
        if not self._relay.replace(avoid=self._workers()):
            return
        for i in range(self.n_queues):
            if i not in self._lost_since and i not in self._gone:
                driver.reroute(i)

    def _follow_owner(self, driver: Driver) -> None:
        """An attached pool follows its owner: queues placed again, and the pool's end."""
        assert self._record is not None
        try:
            record = registry.lookup(self.client, self.name, self.dirpath)
        except Exception as e:  # the scheduler is busy or going: try again next round
            logger.debug("attached pool %s could not read its record: %s", self.name, e)
            return
        if record is None or record.owner_token != self._record.owner_token:
            logger.warning("pool %s was closed by its owner: the tasks this producer still waits for fail", self.name)
            self._stop_supervisor.set()
            driver.fail_all(ClosedError(f"pool {self.name} was closed by the process that placed it"))
            return
        for i, (old, new) in enumerate(zip(self._record.endpoints, record.endpoints)):
            if old != new:
                driver.broker_lost(i, memory_lost=not record.durable)
                driver.reconnect(i, new, record.workers[i] if i < len(record.workers) else "")
                self.endpoints[i] = new
                for listener in list(self._listeners):
                    try:
                        listener.on_broker_moved(i, new)
                    except Exception as e:
                        logger.warning(
                            "telling %s that queue %s moved failed: %s", type(listener).__name__, self.queue_names[i], e
                        )
        self._record = record

    def _unrecoverable(self, i: int, error: Exception) -> None:
        """A queue cannot be placed again (a durable one: not where its directory is): fail what
        it held; the other queues take what it never confirmed."""
        self._gone.add(i)
        self._lost_since.pop(i, None)
        logger.error("queue %s cannot be served again: %s", self.queue_names[i], error)
        self.driver.fail_chunks_of(i, BrokerLost(str(error)))

    def close(self) -> None:
        """Stop the driver and every broker; pending futures fail with ClosedError. The
        ConsumerPools made on this pool are closed first (their consumers would serve nothing).
        Idempotent."""
        if self._closed:
            return
        for consumers in self.consumer_pools():
            consumers.close()
        self._closed = True
        self._stop_supervisor.set()
        if self._supervisor is not None:
            self._supervisor.join(10)
        if self._driver is not None:
            try:  # the receipts for results already here reach the brokers before they stop
                self._driver.queue_status(timeout=2)
            except ZdqError as e:
                logger.debug("pool %s: receipts not confirmed before closing: %s", self.name, e)
            self._driver.close()
        self._close_relay()
        self._withdraw()
        self._release_actors()
        self._close_owned_cluster()

    def _close_relay(self) -> None:
        if self._relay is not None:
            self._relay.close()
            self._relay = None

    def _close_owned_cluster(self) -> None:
        if self._owned_cluster is not None:
            self._owned_cluster.close()

    def _withdraw(self) -> None:
        if self._record is None and self._driver is not None:
            registry.withdraw(
                self.client,
                registry.PoolRecord(self.name, False, self.dirpath, (), (), None, None, self.settings, "", self._owner_token),
            )

    def _release_actors(self) -> None:
        stops = []
        for name, broker in zip(self.queue_names, self._brokers):
            try:
                stops.append((name, broker.stop()))
            except Exception as e:  # the worker may be gone already
                logger.debug("stopping the broker of queue %s failed: %s", name, e)
        for name, fut in stops:
            try:
                fut.result(timeout=10)
            except Exception as e:
                logger.debug("stopping the broker of queue %s failed: %s", name, e)
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
    def _options(self, given: dict[str, Any]) -> TaskOptions | None:
        """Task options from call keywords over the pool's defaults; ``None`` if all are default."""
        if not given:
            return None if self.default_options == _NO_OPTIONS else self.default_options
        fields: dict[str, Any] = {
            "retries": self.default_options.retries,
            "retry_backoff": self.default_options.retry_backoff,
            "retry_on": self.default_options.retry_on,
            "time_limit": self.default_options.time_limit,
        }
        fields.update({k: v for k, v in given.items() if v is not None})
        if "time_limit" in given:
            fields["time_limit"] = seconds_or_none(given["time_limit"], "time_limit")
        if isinstance(fields["retry_on"], type):
            fields["retry_on"] = (fields["retry_on"],)
        options = TaskOptions(**fields)
        return None if options == _NO_OPTIONS else options

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        retries: int | None = None,
        retry_backoff: float | None = None,
        retry_on: tuple[type[BaseException], ...] | type[BaseException] | None = None,
        time_limit: float | str | None = None,
        timeout: float | None = None,
        worker_class: type | None = None,
        delay: float | datetime.timedelta | None = None,
        eta: datetime.datetime | None = None,
        priority: int | None = None,
        **kwargs: Any,
    ) -> TaskFuture:
        """Queue ``fn(*args, **kwargs)``; return a future of its result.

        Parameters
        ----------
        retries : int, optional
            Extra attempts after a failure (exponential backoff with jitter, starting at
            ``retry_backoff`` seconds); after the last one the task is dead-lettered.
        retry_on : exception type or tuple of them, optional
            Only these are retried (default: any ``Exception``).
        time_limit : float, optional
            Time limit of one attempt: an attempt running longer fails with ``TaskTimeout``.
        timeout : float, optional
            How long this call may block while the driver's buffers are full (a stalled or lost
            broker); past it, :class:`~zdq.errors.SubmitTimeout` and nothing is queued.
        worker_class : type, optional
            Accepted for daskqueue compatibility: submitted functions run on any consumer, so it
            must be a :class:`GeneralConsumer` subclass, as daskqueue required.
        delay : float or timedelta, optional
            Seconds from now before the task may start (the broker holds it until then; a
            durable queue keeps the time across restarts).
        eta : datetime, optional
            A timezone-aware time before which the task may not start (instead of ``delay``).
        priority : int, optional
            Within its queue, a higher priority is served first; equal priorities are first in,
            first out (default 0). Chunks already with a consumer (its prefetch) run first.

        These keywords are zdq's own: to pass keyword arguments of those names to ``fn``,
        use :meth:`submit_call`.

        Raises
        ------
        SerializationError
            ``fn`` or an argument cannot be pickled; nothing was queued.
        TypeError, ValueError
            A ``delay``, ``eta`` or ``priority`` that is not one (the message names it); nothing
            was queued.
        """
        _check_worker_class(worker_class)
        options = {"retries": retries, "retry_backoff": retry_backoff, "retry_on": retry_on, "time_limit": time_limit}
        return self.submit_call(
            fn, args, kwargs, timeout=timeout, delay=delay, eta=eta, priority=priority,
            **{k: v for k, v in options.items() if v is not None},
        )

    def submit_call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        delay: float | datetime.timedelta | None = None,
        eta: datetime.datetime | None = None,
        priority: int | None = None,
        **options: Any,
    ) -> TaskFuture:
        """Like :meth:`submit` with explicit ``args``/``kwargs``; ``options`` as in :class:`TaskOptions`."""
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, got {fn!r:.80}")
        timeout = timeout_or_none(timeout)
        # Three identity tests when unused: the plain path builds nothing more per task.
        timing = None if delay is None and eta is None and priority is None else timing_of(delay, eta, priority)
        task = call_task(fn, args, kwargs, self._options(options))
        if timing is None:
            return self.driver.submit_task(dumps_task(task), timeout=timeout)
        return self.driver.submit_timed(dumps_task(task), timing, timeout=timeout)

    # -- asyncio ------------------------------------------------------------------------------
    async def asubmit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> TaskFuture:
        """:meth:`submit` for coroutines: never blocks the event loop. A full submission window
        is awaited on a helper thread instead of waited for on the loop; the returned future can
        be awaited (``await (await queue_pool.asubmit(f, x))``)."""
        try:
            return self.submit(fn, *args, **{**kwargs, "timeout": 0})
        except SubmitTimeout:  # the window is full: wait for room off the loop
            timeout = kwargs.pop("timeout", None)
            return await asyncio.to_thread(functools.partial(self.submit, fn, *args, timeout=timeout, **kwargs))

    async def abatch_submit(self, list_calls: Sequence[tuple[Any, ...]], **kwargs: Any) -> BatchFuture:
        """:meth:`batch_submit` for coroutines: the batch is pickled and queued on a helper thread,
        so the event loop goes on meanwhile; the returned future can be awaited."""
        return await asyncio.to_thread(functools.partial(self.batch_submit, list_calls, **kwargs))

    def put(self, item: Any) -> TaskFuture:
        """Queue a raw item for the consumers' ``process_item``; return a future of its result."""
        return self.driver.submit_task(dumps_task(item_task(item)))

    def batch_submit(
        self,
        list_calls: Sequence[tuple[Any, ...]],
        batch_size: int | None = None,
        timeout: float | None = None,
        *,
        retries: int | None = None,
        retry_backoff: float | None = None,
        retry_on: tuple[type[BaseException], ...] | type[BaseException] | None = None,
        time_limit: float | str | None = None,
        worker_class: type | None = None,
        sync_mode: bool = True,
        delay: float | datetime.timedelta | None = None,
        eta: datetime.datetime | None = None,
        priority: int | None = None,
    ) -> BatchFuture:
        """Queue many calls ``(fn, *args)`` at once; return one future of all their results.

        The calls are pickled into chunks of at most ``batch_size`` (and ``chunk-size``) tasks
        before anything is sent: if one of them cannot be pickled, :class:`SerializationError`
        names it and nothing of the batch is queued. ``timeout`` bounds how long this call may
        block on a full submission window (``time_limit`` is the tasks' own time limit);
        ``retries``, ``retry_backoff`` and ``retry_on`` are as in :meth:`submit`. ``worker_class``
        and ``sync_mode`` are daskqueue's (the first is checked as in :meth:`submit`, the second
        has no effect: a batch is always sent from this process). ``delay``, ``eta`` and
        ``priority`` are as in :meth:`submit`, for every call of the batch (one release time).
        """
        _check_worker_class(worker_class)
        timing = timing_of(delay, eta, priority)
        given = {"retries": retries, "retry_backoff": retry_backoff, "retry_on": retry_on, "time_limit": time_limit}
        options = self._options({k: v for k, v in given.items() if v is not None})
        calls = list_calls if isinstance(list_calls, list) else list(list_calls)
        check_calls(calls)
        return self._submit_entries(calls, CALLS, options, batch_size, timeout, timing)

    def put_many(self, items: Sequence[Any], batch_size: int | None = None, timeout: float | None = None) -> BatchFuture:
        """Queue many raw items at once; same guarantees as :meth:`batch_submit`."""
        return self._submit_entries(list(items), ITEMS, self._options({}), batch_size, timeout)

    def _chunk_size(self, chunking: Chunking, batch_size: int | None, n_tasks: int | None = None) -> int:
        """Tasks per chunk of a batch of ``n_tasks`` (see :meth:`Chunking.batch_size`)."""
        consumers = sum(pool.n_consumers for pool in self.consumer_pools()) if n_tasks is not None else 0
        return chunking.batch_size(
            batch_size,
            n_tasks,
            consumer_batch_size=self.consumer_batch_size,
            consumers=consumers,
            queues=self.n_queues,
        )

    def _submit_entries(
        self,
        entries: list[Any],
        kind: int,
        options: TaskOptions | None,
        batch_size: int | None,
        timeout: float | None,
        timing: Timing | None = None,
    ) -> BatchFuture:
        driver = self.driver
        timeout = timeout_or_none(timeout)
        chunking = Chunking.of(self.settings)
        size = self._chunk_size(chunking, batch_size, len(entries))
        base = driver.reserve(len(entries))
        # Pickle everything before sending anything: a task that cannot be pickled leaves nothing
        # queued (its reserved ids are simply never used).
        try:
            packed = chunking.pack_batch(base, entries, size, driver.payload_key, kind, options)
        except SerializationError as e:
            if e.task_id is None:
                raise
            raise SerializationError(f"item {e.task_id - base} of the batch: {e}; nothing of the batch was queued") from e
        batch = BatchFuture(base, len(entries))
        batch._hint = self._why_waiting
        batch._driver = driver
        for first, n, payload in packed:
            try:
                driver.submit_chunk(first, n, payload, batch, first - base, timeout=timeout, timing=timing)
            except SubmitTimeout as e:
                queued = first - base
                if not queued:
                    raise
                # Part of the batch is queued and will run: its future must still settle.
                error = SubmitTimeout(
                    f"{e} ({queued} of the batch's {len(entries)} tasks were queued before the timeout: "
                    "they run and report on this error's .future, where the others hold this error; "
                    "error.future.cancel() cancels those that have not started)"
                )
                error.future, error.queued = batch, queued
                batch._fail(queued, len(entries) - queued, error)
                raise error from None
        return batch

    def submit_iter(
        self,
        calls: Iterable[tuple[Any, ...]],
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        retry_backoff: float | None = None,
        retry_on: tuple[type[BaseException], ...] | type[BaseException] | None = None,
        time_limit: float | str | None = None,
        total: int | None = None,
        progress: bool = False,
        delay: float | datetime.timedelta | None = None,
        eta: datetime.datetime | None = None,
        priority: int | None = None,
    ) -> int:
        """Queue calls ``(fn, *args)`` from any iterable, lazily, in flat memory; return the count.

        ``progress=True`` shows a bar of the tasks inserted (python-task-queue's
        ``insert(..., total=)``), against ``total`` when given (or ``len(calls)`` when it has one).

        Memory stays flat because at most ``window`` chunks per broker are waiting for
        confirmation. Unlike :meth:`batch_submit` this does not hold the whole submission: if
        item ``k`` cannot be pickled, the chunks before it are already queued and the
        :class:`SerializationError` says how many tasks were. ``timeout`` bounds each wait for
        room (:class:`~zdq.errors.SubmitTimeout`); the task options are as in :meth:`submit`.
        ``delay``/``eta`` and ``priority`` too: a ``delay`` is counted from this call, the same
        release time for every task of the iterable, however long it takes to read.
        """
        driver = self.driver
        timing = timing_of(delay, eta, priority)
        timeout = timeout_or_none(timeout)
        chunking = Chunking.of(self.settings)
        given = {"retries": retries, "retry_backoff": retry_backoff, "retry_on": retry_on, "time_limit": time_limit}
        options = self._options({k: v for k, v in given.items() if v is not None})
        if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 0):
            raise ValueError(f"total must be a non-negative integer, got {total!r}")
        if total is None and hasattr(calls, "__len__"):
            total = len(calls)  # type: ignore[arg-type]
        # A known total is spread over every consumer, as a batch is; an endless stream is not.
        size = self._chunk_size(chunking, batch_size, total or None)
        count = 0
        bar = _insert_bar(total) if progress else None
        reading = _Reading(calls)
        try:
            for part in chunking.batches(reading, size):
                check_calls(part, count)
                base = driver.reserve(len(part))
                try:
                    packed = chunking.pack(base, part, driver.payload_key, CALLS, options)
                except SerializationError as e:
                    at = f"item {count + e.task_id - base}: " if e.task_id is not None else ""
                    raise SerializationError(f"{at}{e} ({count} tasks before this chunk were queued)") from e
                for first, n, payload in packed:
                    driver.submit_chunk(first, n, payload, None, 0, timeout=timeout, timing=timing)
                count += len(part)
                if bar is not None:
                    bar.update(len(part))
        finally:
            if bar is not None:
                bar.close()
        if reading.error is not None:
            # The caller's iterable failed: what it gave before is queued (above), and said so.
            reading.error.add_note(f"zdq: the {count} tasks read from the iterable before this error were queued")
            raise reading.error
        return count

    def insert(self, tasks: Any, total: int | None = None, progress: bool = True, **kwargs: Any) -> int:
        """Queue :class:`~zdq.Task` objects (or callables of no argument), one or an iterable of
        them, lazily and in flat memory (python-task-queue's ``insert``); return the count.

        A thin layer over :meth:`submit_iter` (same bounds, keywords and errors), with a bar on
        by default against ``total`` (or the iterable's ``len``). An item that is neither a Task
        nor a callable raises ``TypeError`` naming its position, after every item before it is
        queued; the iterable is not read past it.
        """
        calls, known = as_calls(tasks)
        count = self.submit_iter(calls, total=known if total is None else total, progress=progress, **kwargs)
        calls.check()
        return count

    def flush(self, timeout: float | None = None) -> None:
        """Block until every chunk submitted so far is stored by its broker."""
        self.driver.flush(timeout_or_none(timeout))

    # -- schedules (zdq.scheduling) ----------------------------------------------------------
    def schedule(
        self,
        fn: Callable[..., Any],
        *args: Any,
        cron: str | None = None,
        every: timedelta | float | None = None,
        missed: str = "once",
        retries: int | None = None,
        retry_backoff: float | None = None,
        retry_on: tuple[type[BaseException], ...] | type[BaseException] | None = None,
        time_limit: float | str | None = None,
        priority: int = 0,
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> Schedule:
        """Run ``fn(*args, **kwargs)`` (or a :class:`~zdq.Task`) periodically: at each time of
        the ``cron`` expression (UTC; croniter's syntax, ``"*/5 * * * *"``), or ``every``
        (a timedelta or seconds) from now. Return its :class:`~zdq.scheduling.Schedule`.

        The schedule lives with its queue: on disk for a durable pool (it survives the driver,
        the broker and their restarts, and each tick is queued exactly once: its chunk and the
        schedule's next tick are committed together), in the broker's memory for a transient
        pool (as long as that broker lives). Ticks missed while the queue was down run once on
        recovery (``missed="once"``) or are skipped (``"skip"``); a tick that comes while the
        previous one has not finished is skipped. A tick runs as any task (at least once,
        ``retries``, ``time_limit``, dead letters, ``priority`` in its queue); its result goes
        to the schedule, shown by :meth:`schedules` (the last one only).

        Raises
        ------
        ValueError
            ``cron`` does not parse, ``every`` is not positive, or both or neither are given.
        TypeError
            ``fn`` is not callable.
        """
        self._owned("schedules")
        given = {"retries": retries, "retry_backoff": retry_backoff, "retry_on": retry_on, "time_limit": time_limit}
        options = self._options({k: v for k, v in given.items() if v is not None})
        return self._on_brokers(
            lambda: make_schedule(
                self, fn, args, kwargs, cron=cron, every=every, missed=missed, options=options, priority=priority, timeout=timeout
            )
        )

    def schedules(self, timeout: float = 30.0) -> list[Schedule]:
        """The pool's schedules, as their queues report them now (by next tick)."""
        self._owned("schedules")
        return self._on_brokers(lambda: list_schedules(self, timeout))

    def cancel_schedule(self, schedule_id: int, timeout: float = 30.0) -> bool:
        """End a schedule (``Schedule.cancel()``); True if it was live."""
        self._owned("schedules")
        return self._on_brokers(lambda: cancel_schedule(self, schedule_id, timeout))

    def next_schedule_queue(self) -> int:
        """The queue that keeps the next schedule made here: the queues in turn."""
        with self._schedule_lock:
            index = self._schedules_made % self.n_queues
            self._schedules_made += 1
        return index

    def broker_actor(self, i: int) -> Any:
        """The broker actor of queue ``i`` (control plane), as placed now."""
        if not self._brokers:
            raise ClosedError(f"queue pool {self.name} has no brokers: it is not started, or closed")
        return self._brokers[i]

    def _on_brokers(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (ZdqError, ValueError, TypeError):
            raise
        except Exception as e:  # an actor call: its worker may be gone or the call timed out
            raise ZdqError(f"pool {self.name}: a broker did not answer about schedules: {e!r}") from e

    # -- dead letters -------------------------------------------------------------------------
    def _owned(self, what: str) -> None:
        if self._record is not None:
            raise ZdqError(
                f"{what} go to the queues' brokers through the QueuePool that placed them: this one is "
                f"attached to pool {self.name}"
            )

    def dead_letters(self) -> list[DeadLetterInfo]:
        """Tasks that used up their attempts, in every queue, with the reason and traceback."""
        self._owned("dead letters")
        calls = [(i, b.dead_letters()) for i, b in enumerate(self._brokers)]
        return [
            DeadLetterInfo(self.queue_names[i], d.chunk_id, d.meta.n_tasks, d.reason)
            for i, call in calls
            for d in call.result(timeout=30)
        ]

    def requeue_dead_letters(self, letters: Iterable[DeadLetterInfo] | None = None) -> int:
        """Put dead letters (all, or those given) back at the tail of their queues; return how many.

        Their results arrive like those of new tasks: in ``ConsumerPool.results()``.
        """
        return self._on_dead(letters, "requeue_dead")

    def purge_dead_letters(self, letters: Iterable[DeadLetterInfo] | None = None) -> int:
        """Delete dead letters (all, or those given); return how many."""
        return self._on_dead(letters, "purge_dead")

    def _on_dead(self, letters: Iterable[DeadLetterInfo] | None, method: str) -> int:
        self._owned("dead letters")
        by_queue: dict[int, list[int] | None] = {}
        if letters is None:
            by_queue = dict.fromkeys(range(self.n_queues))
        else:
            for letter in letters:
                ids = by_queue.setdefault(self.queue_names.index(letter.queue), [])
                assert ids is not None
                ids.append(letter.chunk_id)
        calls = [getattr(self._brokers[i], method)(ids) for i, ids in by_queue.items()]
        return sum(int(c.result(timeout=30)) for c in calls)

    # -- introspection --------------------------------------------------------------------------
    def broker_statistics(self, timeout: float = 10.0) -> list[BrokerStats]:
        """Every broker's statistics, asked in parallel (one actor call each)."""
        self._owned("broker statistics")
        out = self._broker_statistics(timeout)
        down = [name for name, stats in zip(self.queue_names, out) if isinstance(stats, BaseException)]
        if down:
            first = next(s for s in out if isinstance(s, BaseException))
            raise BrokerLost(f"queues {', '.join(down)} did not answer (lost, being placed again, or stalled)") from first
        return out  # type: ignore[return-value]

    def _broker_statistics(self, timeout: float) -> list[BrokerStats | BaseException]:
        calls: list[Any] = []
        for broker in self._brokers:
            try:
                calls.append(broker.statistics())
            except Exception as e:  # its worker is gone
                calls.append(e)
        out: list[BrokerStats | BaseException] = []
        for call in calls:
            try:
                out.append(call if isinstance(call, BaseException) else call.result(timeout=timeout))
            except Exception as e:
                out.append(e)
        return out

    def statistics(self, timeout: float = 10.0) -> PoolStats:
        """The driver's counters, and the statistics of every queue that answers (a queue that is
        down is left out of ``brokers``; ``driver.links_down`` counts it)."""
        brokers = [] if self._record is not None else self._broker_statistics(timeout)
        return PoolStats(self.driver.statistics(), [b for b in brokers if isinstance(b, BrokerStats)], self.name)

    def queue_status(self, timeout: float = 10.0) -> list[p.QueueStatus | None]:
        """Each queue's counts, asked over the data plane (``None`` for a queue that is down)."""
        return self.driver.queue_status(timeout)

    def get_queue_size(self, timeout: float = 30.0) -> dict[str, int]:
        """Tasks pending (stored, not yet acknowledged) in each queue, by queue name
        (``<pool name>-queue-<i>``, as in :attr:`queue_names`, reprs, statistics and logs).

        daskqueue keyed this by its queue actors (whose repr was their Dask key); zdq's queues are
        not actors a user holds, and a name reads the same in every process and after a restart.

        Raises
        ------
        BrokerLost
            A queue is down (lost with its worker, being placed again): its size is not known.
        """
        try:
            self.flush(timeout)
        except ZdqTimeoutError as e:
            raise ZdqTimeoutError(f"the queues' sizes are not known within {timeout}s ({e})") from None
        statuses = self.queue_status(timeout)
        down = [name for name, s in zip(self.queue_names, statuses) if s is None]
        if down:
            raise BrokerLost(f"queues {', '.join(down)} are down (being placed again): their sizes are not known now")
        return {name: s.ready_tasks + s.leased_tasks for name, s in zip(self.queue_names, statuses) if s is not None}

    def __len__(self) -> int:
        return self.n_queues

    def __getitem__(self, index: int) -> QueueHandle:
        """Queue ``index``: ``qsize()``, ``empty()``, ``pid()``, ``statistics()``... (daskqueue's
        queue methods), each returning something with ``.result()``."""
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"queue indices are integers, got {index!r:.80}")
        if not -self.n_queues <= index < self.n_queues:
            raise IndexError(f"queue index {index!r} out of range: the pool has {self.n_queues} queues")
        return QueueHandle(self, index % self.n_queues)

    def _why_waiting(self) -> str:
        """Why results may not come: said in the error of a future's result(timeout)."""
        reasons = []
        if self._closed or self._driver is None:
            return ""
        states = self._driver.queue_states()
        down = [q.name for q in states if q.state in ("down", "recovering")]
        if down:
            reasons.append(f"queues {', '.join(down)} are down and being placed again")
        unreachable = [q.name for q in states if q.state == "unreachable"]
        if unreachable:
            reasons.append(f"queues {', '.join(unreachable)} were placed again where this process cannot reach them")
        pools = self.consumer_pools()
        if not pools:
            reasons.append(f"no ConsumerPool consumes queue pool {self.name}: make one and call its start()")
        elif not any(pool._running for pool in pools):
            reasons.append("no consumer is running: call consumer_pool.start()")
        return "; ".join(reasons)

    #: Past this many queues, a repr shows the queues that are not up, and a summary of the rest.
    _REPR_QUEUES = 8

    def __repr__(self) -> str:
        """What this process knows, asking no broker: a repr never waits on the cluster (a stopped
        or lost worker, a busy scheduler). ``get_queue_size()`` asks the queues."""
        head = f"QueuePool {self.name}: {counted(self.n_queues, self.durability.value + ' queue')}"
        driver = self._driver
        if self._closed or driver is None:
            return f"{head}, {'closed' if self._closed else 'not started'}"
        if self.reset_by_restart:
            state = "stopped (the cluster was restarted)"
        elif driver.stopped:
            state = "stopped (its owner closed the pool)" if self.attached else "stopped"
        else:
            state = "attached to its owner's queues" if self.attached else "running"
        consumers = sum(pool.n_consumers for pool in self.consumer_pools())
        head += f", {state}, {counted(consumers, 'consumer')} in this process"
        stats = driver.statistics()
        unsent = driver.unsent
        lines = [
            f"tasks: {stats.tasks_submitted} submitted"
            + (f" ({unsent} not sent yet)" if unsent else "")
            + f", {stats.tasks_completed} done, {stats.tasks_failed} failed"
            + (f", and {stats.foreign_tasks} results of others' tasks" if stats.foreign_tasks else "")
        ]
        queues = driver.queue_states()
        if len(queues) <= self._REPR_QUEUES:
            lines += [q.describe() for q in queues]
        else:
            lines += [q.describe() for q in queues if q.state != "up"]
            up = [q for q in queues if q.state == "up"]
            lines.append(f"{len(up)} queues up, {sum(q.awaiting for q in up)} tasks awaiting results")
        return head + "".join(f"\n\t{line}" for line in lines)


_attached_lock = threading.Lock()
_attached_here: dict[tuple[str, str | None], QueuePool] = {}


def current_pool(timeout: float = 60.0) -> QueuePool:
    """Inside a zdq task: the pool whose consumer runs it, attached from this worker, to submit
    more work (a document task submitting its pages). Submitting never waits on consumers;
    waiting on the new tasks' results from inside a task holds that consumer meanwhile.

    >>> def document(path):                                   # doctest: +SKIP
    ...     pool = zdq.current_pool()
    ...     pool.batch_submit([(page, path, i) for i in range(n_pages(path))])

    Raises
    ------
    ZdqError
        Called outside a zdq task.
    """
    from zdq._actor import CURRENT_POOL, when_pool_done

    key = CURRENT_POOL.get()
    if key is None:
        raise ZdqError("current_pool() is for code that runs in a zdq task; elsewhere use QueuePool.attach()")
    with _attached_lock:
        pool = _attached_here.get(key)
        if pool is None or pool._closed:
            from distributed import get_client

            name, dirpath = key
            pool = QueuePool.attach(get_client(timeout=timeout), name, dirpath=dirpath)
            _attached_here[key] = pool

            def close(pool: QueuePool = pool) -> None:
                with _attached_lock:
                    if _attached_here.get(key) is pool:
                        del _attached_here[key]
                pool.close()

            when_pool_done(key, close)
        return pool
