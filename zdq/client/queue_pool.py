"""QueuePool: the client-side facade that places brokers and submits work to them.

Dask places the brokers (one actor per queue, spread over the workers) and nothing else: tasks go
from this process to the brokers over ZeroMQ, through the pool's :class:`~zdq.driver.Driver`.
The facade holds the arguments, the public API, introspection and reprs; each job is an object
of its own:

- :mod:`zdq.client.brokers`: the queues (:class:`PlacedQueues`, the brokers this pool placed,
  or :class:`AttachedQueues`, those of a live pool placed by another);
- :mod:`zdq.client.submit`: option merging (once), calls, batches, iterables, progress;
- :mod:`zdq.client.consumer_registry`: the ConsumerPools of the pool, their identities, and
  the drivers of this process that feed the pool;
- :mod:`zdq.client.supervision`: the watch over the queues and the relay, on the supervisor
  thread of :mod:`zdq.client.slots` (written once for both pools).
- :mod:`zdq.client.registry`: the live pools of the cluster, and whether a record's owner is
  alive (attach or place);
- :mod:`zdq.client.async_pool`: ``await``, ``async with`` and submissions from the event loop,
  for a pool of an asynchronous client.

Ownership
---------
==========================  =======================================================================
state                       owner
==========================  =======================================================================
``_queues``, ``_driver``,   the user's thread: set by ``start()`` (before the supervision starts),
``_relay``, ``_watch``      read by the supervisor thread; ``close()`` stops the supervision first
``_closed``                 the user's thread (``close()``); the supervisor only reads it, and a
                            late recovery is refused by the broker slots' own closed flag
``_host``                   the user's thread: the in-process owner this pool attached to, held
                            so that dropping the owner does not take its queues away
``_release_cluster``       set in ``__init__``; a :func:`weakref.finalize` (runs once: ``close()``,
                            the pool's collection or the interpreter's exit, whichever is first)
``_finalizers``             ``start()`` (the user's thread); ``close()`` detaches them
``_schedules_made``         ``_schedule_lock``
``consumer_registry``       its own lock (shared with the in-process pools of the same live pool)
==========================  =======================================================================

A second QueuePool of this process on a live pool (a durable ``dirpath`` opened again, as
daskqueue programs do by binding the same variable to a new pool without closing the first)
attaches to it with a driver of its own, shares the owner's consumer registry (so the consumers
and results of either are the other's too) and holds the owner: the first pool, dropped, no
longer takes the queues or their results away from the second (issue 22, defect 1).
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from distributed import Client

from zdq import config
from zdq._actor import allowed_workers, candidate_workers, check_resources
from zdq.client import asynchronous, registry
from zdq.client.async_pool import AsyncPoolMethods
from zdq.client.brokers import AttachedQueues, LockedWait, PlacedQueues, lock_holders, make_keys
from zdq.client.cluster import OwnedCluster, cluster_for, release_now
from zdq.client.consumer_registry import ConsumerRegistry
from zdq.client.control import ControlMethods, DeadLetterInfo
from zdq.client.drain import WaitMethods
from zdq.client.handles import QueueHandle
from zdq.client.slots import place_on_the_rest, workers_left
from zdq.client.supervision import QueueWatch
from zdq.client.submit import SubmitMethods, Submitter, TaskDefaults
from zdq.config import PoolSettings, seconds_or_none, settings, timeout_or_none
from zdq.client.driver import Driver
from zdq.errors import (
    BrokerUnreachable,
    ClosedError,
    QueueLocked,
    ZdqError,
)
from zdq.names import check_pool_name, counted, queue_name
from zdq.observe.monitor import ensure_installed
from zdq.relay.path import RelayPath
from zdq.codec.rates import limited_chunk_size, rate_of, share
from zdq.codec.tasks import TaskOptions
from zdq.transport.reach import CLIENT_OUTSIDE, OPEN_TO_CLIENT, describe
from zdq.transport.security import ClientKeys
from zdq.transport.sockets import new_identity

__all__ = ["Durability", "QueuePool", "DeadLetterInfo", "current_pool", "durability_of"]

logger = logging.getLogger(__name__)

#: The pools this process placed, by owner token: a second QueuePool of this process on the same
#: live pool finds its owner here (held weakly: a pool dropped without close() is collected).
_owners_here: weakref.WeakValueDictionary[bytes, QueuePool] = weakref.WeakValueDictionary()


class Durability(str, enum.Enum):
    """Where a queue keeps its tasks: in the broker's memory, or on disk (LMDB)."""

    TRANSIENT = "transient"
    DURABLE = "durable"


def durability_of(value: Durability | str) -> Durability:
    try:
        return Durability(value.value if isinstance(value, Durability) else str(value).lower())
    except ValueError:
        raise ValueError(f"durability must be 'transient' or 'durable', got {value!r}") from None


def _settings_with_ack_timeout(ack_timeout: float | str | None, overrides: dict[str, Any]) -> PoolSettings:
    """The pool's settings, with daskqueue's ``ack_timeout``: how long a task delivered to a
    consumer could go unacknowledged before its queue took it back. zdq's nearest is
    ``heartbeat_timeout``: a queue takes back the tasks of a consumer unheard from for that long
    (a running task whose consumer is heard from keeps its lease, however long it runs)."""
    if ack_timeout is None:
        return settings(**overrides)
    if overrides.get("heartbeat_timeout") is not None:
        raise TypeError("ack_timeout is daskqueue's name for zdq's heartbeat_timeout: pass one of them")
    seconds = seconds_or_none(ack_timeout, "ack_timeout")
    try:
        return settings(**overrides, heartbeat_timeout=seconds)
    except ValueError as e:
        raise ValueError(
            f"ack_timeout={ack_timeout!r} is zdq's heartbeat_timeout (how long a consumer may go unheard "
            f"before its queues take its tasks back): {e}"
        ) from e



def _not_a_client(client: Any) -> str:
    """What ``QueuePool(client, ...)`` says of a ``client`` that is none: a number is daskqueue's
    early ``client.submit(QueuePool, n, actor=True)``, which the worker calls as ``QueuePool(n)``."""
    hint = (
        " (daskqueue's early QueuePool(n_queues), placed as an actor by client.submit(QueuePool, n, "
        "actor=True), is zdq.QueuePoolActor; zdq's own pool is made beside the client: QueuePool(client, n))"
        if isinstance(client, int) and not isinstance(client, bool)
        else ""
    )
    return f"QueuePool needs a distributed.Client (or None for the default one), got {client!r:.80}{hint}"


class QueuePool(AsyncPoolMethods, WaitMethods, SubmitMethods, ControlMethods):
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
        Directory of durable queues: queue ``i`` lives in ``<dirpath>/<name>-queue-<i>/``. Default
        ``zdq.durable.dirpath``, else ``<tempfile.gettempdir()>/zdq-<uid>``: this user's own, made
        0700, and refused if it is not (daskqueue's ``/tmp`` is every user's). A queue directory
        another user owns is refused under any dirpath. Opened again with more queues, a durable
        pool grows: its new queues join the old ones (which keep their tasks).
    name : str, optional
        Pool name; defaults to ``"default"`` for durable pools (so the same call finds the same
        queues after a restart) and to a random name for transient ones. At most 128 bytes of
        printable characters, without surrounding spaces, ``/`` or ``\\``, not starting with
        ``.`` or ``-`` (:func:`zdq.names.check_pool_name`): its queues' directories stay in
        ``dirpath`` and its queues show in ``zdq status``.
    keep_results : bool
        Keep every result for :meth:`ConsumerPool.results` (the daskqueue behaviour). They cost
        no time per task until :meth:`ConsumerPool.join` or ``results()`` first reads them, but
        every value is held: turn it off for huge runs that read results from futures only, so
        driver memory stays flat.
    retries, retry_backoff, retry_on, time_limit, hard
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
    rate_limit : str or float, optional
        At most this many tasks start per second in the whole pool: ``"100/s"``, ``"6000/m"``,
        ``"10/h"`` or tasks per second (Celery's forms). Each queue's broker holds an even share
        (a token bucket: it holds for every consumer together); chunks are cut small enough that
        the starts are smooth. Change it live with :meth:`set_rate_limit` (or ``zdq rate-limit``);
        a durable queue keeps the last one set across restarts, and a pool opened without
        ``rate_limit`` keeps it.
    ack_timeout : float or str, optional
        daskqueue's: how long a task delivered to a consumer could go unacknowledged before its
        queue took it back. zdq's nearest is ``heartbeat_timeout``, which it sets: the tasks of a
        consumer unheard from for that long return to their queues (a consumer that is heard from
        keeps its tasks, however long they run). It must be longer than ``heartbeat_interval``.
    retry : bool, optional
        daskqueue's: whether a task delivered and never acknowledged (its consumer lost) is
        delivered again. ``True``, or not given: yes, zdq's at least once. ``False``: at most once,
        as daskqueue's default was: the ConsumerPools of this pool acknowledge each chunk on
        receipt (``early_ack=True``) unless given ``early_ack=``; a task whose consumer is lost is
        not run again, and its future fails with ``TaskLost``.
    **overrides
        Any :class:`~zdq.config.PoolSettings` field (``chunk_size``, ``window``, ...). A durable
        pool not given ``window`` takes ``durable_window`` (``zdq.durable.window``, 48) as its window.

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
        hard: bool = False,
        workers: Sequence[str] | None = None,
        resources: Mapping[str, float] | None = None,
        auth: bool | None = None,
        relay: bool | None = None,
        start: bool = True,
        parallel: int | None = None,
        rate_limit: float | str | None = None,
        ack_timeout: float | str | None = None,
        retry: bool | None = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(n_queues, int) or isinstance(n_queues, bool) or n_queues < 1:
            raise ValueError(f"n_queues must be a positive integer, got {n_queues!r}")
        if name is not None:
            check_pool_name(name)  # before anything is placed, made or asked
        self.durability = durability_of(durability)
        if self.durability is Durability.DURABLE and dirpath is None:
            dirpath = config.get("durable.dirpath") or config.default_dirpath()  # this user's, not /tmp
        if self.durability is Durability.TRANSIENT and dirpath is not None:
            raise ValueError(
                f"dirpath={dirpath!r} is for durable queues: pass durability='durable' too (a transient "
                "queue keeps its tasks in memory)"
            )
        if client is not None and not isinstance(client, Client):
            raise TypeError(_not_a_client(client))
        if client is not None and parallel is not None:
            raise ValueError("parallel= sizes the local cluster of QueuePool(None, ...): pass client=None, or no parallel")
        self.n_queues = n_queues
        self.dirpath = None if dirpath is None else os.path.abspath(os.fspath(dirpath))
        self.name = name if name is not None else "default" if self.durability is Durability.DURABLE else f"zdq-{uuid.uuid4().hex[:8]}"
        self.settings: PoolSettings = _settings_with_ack_timeout(ack_timeout, overrides)
        if retry is not None and not isinstance(retry, bool):
            raise TypeError(f"retry must be True or False, got {retry!r:.80}")
        #: daskqueue's ``retry``: ``False`` makes this pool's ConsumerPools acknowledge on receipt
        #: (at most once) unless given ``early_ack=``; ``None`` and ``True``: at least once.
        self.retry = retry
        if self.durability is Durability.DURABLE and overrides.get("window") is None:
            self.settings = self.settings.for_durable()  # a larger window (zdq.durable.window)
        self.rate_limit = rate_of(rate_limit)
        #: Tasks per chunk when no limit of this pool's queues applies (the settings' own).
        self._free_chunk_size = self.settings.chunk_size
        if self.rate_limit is not None:  # smooth starts: chunks of a twentieth of a second of the rate
            self.settings = self.settings.with_overrides(chunk_size=limited_chunk_size(self._free_chunk_size, [share(self.rate_limit, n_queues)]))
        self.keep_results = keep_results
        self.default_options = TaskOptions(
            retries=retries,
            retry_backoff=retry_backoff,
            retry_on=tuple(retry_on) if isinstance(retry_on, (tuple, list)) else retry_on,
            time_limit=seconds_or_none(time_limit, "time_limit"),
            hard=hard,
        )
        self._submitter = Submitter(TaskDefaults(self.default_options))
        #: Each queue's name (see :func:`zdq.names.queue_name`): the keys of get_queue_size().
        self.queue_names = [queue_name(self.name, i) for i in range(n_queues)]
        self.resources = check_resources(resources)
        #: The local cluster this pool started (embedded mode), closed with it.
        self._owned_cluster: OwnedCluster | None = None
        #: The ConsumerPool that :func:`zdq.local` started with this pool (held here: ConsumerPools
        #: are otherwise known to their QueuePool by weak reference).
        self.local_consumers: Any = None
        #: Releases this pool's share of ``_owned_cluster`` once: on close(), or when the pool is
        #: collected or the interpreter exits without close() (issue 23, point 7).
        self._release_cluster: weakref.finalize[[OwnedCluster], Any] | None = None
        #: What stops the supervision, the relay and the driver when the pool is collected without
        #: close(); close() does it and takes them out of weakref's registry, which would otherwise
        #: hold the driver (and what its closing error's traceback holds: the frames that read it,
        #: the pool itself) for the life of the process.
        self._finalizers: list[weakref.finalize[..., Any]] = []
        if client is None:  # as Dask's own APIs do: the default client, else an embedded cluster
            client, self._owned_cluster = cluster_for(parallel)
            if self._owned_cluster is not None:
                self._release_cluster = self._owned_cluster.closed_with(self)
        self.client = client
        #: Made with an asynchronous client, used from its event loop: started by ``await``, on a
        #: synchronous twin client of its own (see :mod:`zdq.client.asynchronous`).
        self._asynchronous = asynchronous.is_asynchronous(client)
        self._twin: Client | None = None
        self._workers_asked = workers
        self._start_on_await = start
        self._loop_submissions: asynchronous.LoopSubmissions | None = None
        self._allowed_workers: list[str] | None = None
        if not self._asynchronous:
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
        self._queues: PlacedQueues | AttachedQueues | None = None
        self._host: QueuePool | None = None
        self._driver: Driver | None = None
        self._closed = False
        self._watch: QueueWatch | None = None  # the supervision of the queues (and relay)
        self._identity = new_identity()  # the driver's: brokers hand it the results nobody else takes
        self._owner_token = os.urandom(16)  # names this owner in the registry (never the identity)
        #: The ConsumerPools of this pool, their consumers' identities, and this process's drivers
        #: on the pool (shared with an in-process owner when attached to one).
        self.consumer_registry = ConsumerRegistry(self.name)
        self._schedules_made = 0  # the i-th schedule made here goes to queue i % n_queues
        self._schedule_lock = threading.Lock()
        # Attaching: a durable pool always may (one name and directory is one pool); a transient
        # one when it was given the name of a live pool.
        self._may_attach = self.durability is Durability.DURABLE or name is not None
        if start and not self._asynchronous:
            try:
                self.start()
            except BaseException:
                self._close_owned_cluster()
                raise

    # -- state seen by others -------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def attached(self) -> bool:
        """Whether this pool feeds queues placed by another QueuePool (see :meth:`attach`)."""
        return isinstance(self._queues, AttachedQueues)

    def gone_queues(self) -> list[str]:
        """The queues this pool gave up for good (not placed again within the recovery bound)."""
        queues = self._queues
        return queues.gone() if isinstance(queues, PlacedQueues) else []

    @property
    def endpoints(self) -> list[str]:
        return [] if self._queues is None else self._queues.endpoints

    @property
    def payload_key(self) -> bytes | None:
        return None if self._queues is None else self._queues.payload_key

    @property
    def client_keys(self) -> ClientKeys | None:
        """The CURVE keys of this pool's drivers and consumers (``None`` without authentication)."""
        return None if self._queues is None else self._queues.client_keys

    @property
    def reset_by_restart(self) -> bool:
        """Whether ``client.restart()`` took the brokers (the pool's tasks failed)."""
        return self._watch is not None and self._watch.reset_by_restart

    @property
    def recoveries(self) -> int:
        """Queues placed again since the pool started (followed, for an attached pool)."""
        return 0 if self._queues is None else self._queues.recoveries

    @property
    def consumer_identities(self) -> frozenset[bytes]:
        """Every consumer identity that a ConsumerPool of this process placed for this pool."""
        return self.consumer_registry.identities()

    @property
    def consumer_batch_size(self) -> int | None:
        """The batch size of this pool's ConsumerPool (daskqueue's batch_size): caps the chunks
        submitted from then on, so that a consumer takes at most that many tasks at once."""
        return self.consumer_registry.batch_size

    @consumer_batch_size.setter
    def consumer_batch_size(self, value: int | None) -> None:
        self.consumer_registry.batch_size = value

    def subscribe(self, listener: Any) -> None:
        """Tell ``listener`` (held weakly) when a lost queue is served again: the pool calls
        ``listener.on_broker_moved(queue index, new endpoint)``. ConsumerPools subscribe."""
        self.consumer_registry.subscribe(listener)

    def consumers_changed(self) -> None:
        """A ConsumerPool of this pool was made or closed: single tasks are cut for the new count."""
        self.consumer_registry.consumers_changed()

    def consumer_count(self) -> int:
        return self.consumer_registry.n_consumers()

    def consumer_pools(self) -> list[Any]:
        """The live ConsumerPools of this pool, oldest first."""
        return self.consumer_registry.pools()

    def live_driver(self) -> Driver | None:
        """The driver, or ``None`` when the pool is not started or closed (asks nothing)."""
        return None if self._closed else self._driver

    @property
    def driver(self) -> Driver:
        if self._closed:
            raise ClosedError(f"queue pool {self.name} is closed")
        if self._driver is None:
            if self._asynchronous:
                raise asynchronous.not_started("QueuePool", self.name)
            raise ClosedError(f"queue pool {self.name} is not started: call start()")
        return self._driver

    # -- lifecycle ------------------------------------------------------------------------------
    @asynchronous.off_loop_when_async
    def start(self) -> QueuePool:
        """Place one broker per queue on the workers and connect to them; or, if a live pool of
        this name (and directory) runs on the cluster, attach to it. Idempotent.

        For a pool made with an asynchronous client, called on its event loop: returns an
        awaitable (``await queue_pool.start()``), and the work is done on a helper thread."""
        if self._asynchronous:
            self._take_twin()
            return asynchronous.with_twin(self._twin, self._start)
        return self._start()

    def _start(self) -> QueuePool:
        if self._closed:
            raise ClosedError(f"queue pool {self.name} is closed")
        if self._driver is not None:
            return self
        # A durable pool's directories may be locked a moment: by another producer placing this
        # pool just before us (it registers: attach to it), by the brokers of a crashed driver of
        # it (they let go within a heartbeat of Dask releasing them: place again at once), or by
        # a pool of ours dropped without close(). Waited for within a bound, saying what for.
        wait = LockedWait(self.name, self.queue_names, now=time.monotonic())
        while True:
            record = self._live_record()
            if record is not None:
                return self._attach(record)
            if wait.may_place(time.monotonic()):
                try:
                    return self._place()
                except QueueLocked as e:
                    told = wait.locked(e, self._lock_holders(), time.monotonic())  # raises at the bound
                    if told:
                        logger.warning("%s", told)
            elif wait.may_probe(time.monotonic()):
                wait.probed(self._lock_holders(), time.monotonic())
            time.sleep(0.2)

    def _lock_holders(self) -> dict[str, str] | None:
        """Who holds this pool's locked queue directories, asked of the workers it may use."""
        if self.dirpath is None:
            return None
        dirs = [os.path.join(self.dirpath, n) for n in self.queue_names]
        try:
            workers = candidate_workers(self.client, self._allowed_workers, self.resources)
        except Exception as e:  # noqa: BLE001 - unknown for now: placing again tells
            logger.debug("pool %s: could not list its workers: %s", self.name, e)
            return None
        return lock_holders(self.client, dirs, workers)

    def _live_record(self) -> registry.PoolRecord | None:
        if not self._may_attach:
            return None
        return registry.live_record(self.client, self.name, self.dirpath, _owners_here)

    @classmethod
    def attach(cls, client: Client | None, name: str, *, dirpath: str | os.PathLike[str] | None = None, **kwargs: Any) -> QueuePool:
        """Attach to the live pool ``name`` (a durable one: with its ``dirpath``), placed by another
        QueuePool in this or any other process of the cluster, a task of the pool included. It
        submits to the same queues; its futures and ``results()`` hold its own tasks' results.

        Raises
        ------
        ClosedError
            No live pool of that name runs on the cluster.
        TypeError, ValueError
            ``name`` cannot name a pool (:func:`zdq.names.check_pool_name`).
        """
        check_pool_name(name)
        if asynchronous.is_asynchronous(client):
            raise TypeError(
                "QueuePool.attach does not take an asynchronous Dask client on its event loop yet: pass "
                f"QueuePool(client, name={name!r}, ...) to `await` (it attaches to a live pool of that name), "
                "or call attach with a synchronous client"
            )
        pool = cls(client, 1, "durable" if dirpath is not None else "transient", dirpath, name=name, start=False, **kwargs)
        record = registry.lookup(pool.client, name, pool.dirpath)
        if record is None:
            raise registry.not_found(pool.client, name, pool.dirpath)
        return pool._attach(record)

    def _attach(self, record: registry.PoolRecord) -> QueuePool:
        if record.durable != (self.durability is Durability.DURABLE):
            raise ZdqError(f"pool {self.name} is live on the cluster as a {'durable' if record.durable else 'transient'} pool")
        if self.n_queues != len(record.queue_names):
            logger.info("attaching to pool %s: it has %d queues", self.name, len(record.queue_names))
        if self._allowed_workers is not None:
            logger.info("pool %s is live on the cluster: attached to it (workers= applies to its owner only)", self.name)
        host = _owners_here.get(record.owner_token)
        if host is not None and not host.closed:
            # Its owner is in this process: held, so that dropping it keeps its queues, and its
            # consumers and results are this pool's too.
            self._host = host
            self.consumer_registry = host.consumer_registry
        self._queues = AttachedQueues(self.client, record, self.dirpath)
        self.n_queues = len(record.queue_names)
        self.queue_names = list(record.queue_names)
        self.settings = record.settings.with_overrides(window=self.settings.window, buffer_bytes=self.settings.buffer_bytes)
        started = time.monotonic()
        self._start_driver()
        self._check_reach(started)
        self._supervise(interval=1.0)
        logger.info("Attached to the %d queues of pool %s.", self.n_queues, self.name)
        return self

    def _place(self) -> QueuePool:
        started = time.monotonic()
        keys = make_keys(self.client, self.auth, self.name)
        ensure_installed(self.client)  # once per cluster: what /zdq, /metrics and `zdq status` read
        made: list[PlacedQueues] = []

        def attempt(bound: float) -> PlacedQueues:
            queues = PlacedQueues(
                self.client,
                self.name,
                self.queue_names,
                self.settings,
                dirpath=self.dirpath,
                durable=self.durability is Durability.DURABLE,
                keys=keys,
                allowed_workers=self._allowed_workers,
                resources=self.resources,
                identity=self._identity,
                owner_token=self._owner_token,
            )
            made.append(queues)
            queues.place(self.auth, bound)  # releases what it made when it fails
            return queues

        chosen = lambda: set(made[-1].placed_on.values()) if made else set()  # noqa: E731
        queues = place_on_the_rest(
            self.client, attempt, chosen, f"the queues of pool {self.name}", self.settings.placement_timeout
        )
        self._queues = queues
        try:
            if self.rate_limit is not None:
                self.set_rate_limit(self.rate_limit)
            self._start_driver()
            self._check_reach(started)
            self._supervise(interval=0.25)
        except Exception:
            raise  # each step leaves nothing started when it fails
        except BaseException:  # an interrupt: nobody holds this pool to close it, nothing serves on
            self.close()
            raise
        _owners_here[self._owner_token] = self
        queues.publish()
        logger.info("Created %d queues in the cluster (pool %s).", self.n_queues, self.name)
        return self

    def _supervise(self, interval: float) -> None:
        assert self._driver is not None and self._queues is not None
        self._watch = QueueWatch(
            self.client, self.name, self.dirpath, self._queues, self._driver, self._relay, self.consumer_registry
        )
        self._watch.start(interval)
        # A pool dropped without close() stops its supervision first: finalizers run last made,
        # first run, so before its embedded cluster closes, which a round in progress would
        # otherwise report as "the Dask client was closed while the pool was open".
        self._finalizers.append(weakref.finalize(self, self._watch.stop, 2.0))

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
            self._finalizers.append(weakref.finalize(self, self._relay.close))
        self._driver = Driver(
            self.name,
            self.endpoints,
            self.settings,
            keep_results=self.keep_results,
            keys=self.client_keys,
            payload_key=self.payload_key,
            queue_names=self.queue_names,
            identity=self._identity,
            hint=self.wait_hint,
            workers=self._workers(),
            route=route,
        )
        self._driver.start()
        self._driver.consumers = self.consumer_registry.n_consumers()
        self.consumer_registry.add_feeder(self)
        # A pool dropped without close() (daskqueue programs never close theirs) still stops its driver.
        self._finalizers.append(weakref.finalize(self, self._driver.close))

    def workers(self) -> list[str]:
        """The worker of each queue ("" where unknown)."""
        return [""] * self.n_queues if self._queues is None else self._queues.workers()

    _workers = workers  # the name tests and the benchmark used

    def _check_reach(self, started: float) -> None:
        """Raise :class:`BrokerUnreachable` if this process hears nothing from some broker within
        ``connect-timeout`` of ``started`` (the handshakes get at least 2 s however long placing
        took), after stopping what was started: an error, where a silent pool would hang."""
        driver = self.driver
        timeout = self.settings.connect_timeout
        deadline = max(started + timeout, time.monotonic() + min(2.0, timeout))
        workers = self._workers()
        while True:
            # In steps: a broker whose worker left (killed as the pool was placed) never answers.
            silent = driver.unreached(min(deadline, time.monotonic() + 1.0))
            if not silent:
                return
            left = set(workers_left(self.client, {workers[i] for i in silent}, 0.0))
            gone = {i for i in silent if workers[i] in left}
            if len(gone) == len(silent) or time.monotonic() >= deadline:
                break
        if gone:
            # Lost as any queue is lost: its supervisor, started next, places it again (or
            # recovers it, durable) and fails or resends what it held; nothing is unreachable.
            logger.warning(
                "pool %s: the worker of %s left the cluster as the pool was placed; placed again by the pool's supervisor",
                self.name, ", ".join(self.queue_names[i] for i in sorted(gone)),
            )
            silent = {i: why for i, why in silent.items() if i not in gone}
            if not silent:
                return
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
        if isinstance(self._queues, PlacedQueues):
            self._queues.release()
        self._queues = None
        self._host = None
        raise exc

    @asynchronous.off_loop_when_async
    def close(self) -> None:
        """Stop the driver and every broker; pending futures fail with ClosedError. The
        ConsumerPools made on this pool are closed first (their consumers would serve nothing).
        Idempotent. For a pool made with an asynchronous client, called on its event loop:
        ``await queue_pool.close()``."""
        if self._closed:
            return
        try:
            self._close()
        finally:
            self._close_twin()

    def _close(self) -> None:
        owner = isinstance(self._queues, PlacedQueues)
        for consumers in self.consumer_pools():
            if owner or consumers.queue_pool is self:
                # At once: the results of the tasks running would reach no future (those fail
                # with ClosedError); their chunks go back to their queues (a durable one keeps them).
                consumers.close(timeout=0)
        self._closed = True
        if self._watch is not None:
            # A round in progress (a recovery waiting on the cluster) is not waited for long: what
            # it places after this is refused by the closed slots, and released.
            self._watch.stop(join=2.0)
        if self._driver is not None:
            try:  # the receipts for results already here reach the brokers before they stop
                self._driver.queue_status(timeout=2)
            except ZdqError as e:
                logger.debug("pool %s: receipts not confirmed before closing: %s", self.name, e)
            self._driver.close()
        self._close_relay()
        for finalizer in self._finalizers:  # closed above: they would only hold what they close
            finalizer.detach()
        if isinstance(self._queues, PlacedQueues):
            _owners_here.pop(self._owner_token, None)
            self._queues.withdraw()
            self._queues.release()
        self._host = None
        self._close_owned_cluster()

    def _close_relay(self) -> None:
        if self._relay is not None:
            self._relay.close()
            self._relay = None

    def _close_owned_cluster(self) -> None:
        if self._release_cluster is not None:
            release_now(self._release_cluster)  # at most once, whether close() or the collection came first

    def __enter__(self) -> QueuePool:
        if self._asynchronous:
            raise asynchronous.sync_with("QueuePool")
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @asynchronous.off_loop_when_async
    def flush(self, timeout: float | None = None) -> None:
        """Block until every chunk submitted so far is stored by its broker."""
        self.driver.flush(timeout_or_none(timeout))

    def stop_gc(self) -> None:
        """daskqueue's: stopped the thread of each queue that took back the tasks delivered and
        not acknowledged within ``ack_timeout``. zdq runs no such thread: a queue takes back only
        the tasks of a consumer unheard from for ``heartbeat_timeout`` (a dead one), which must go
        on while the pool lives, and the brokers stop with :meth:`close`. So this does nothing."""

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
        consumers = sum(pool.n_consumers for pool in self.consumer_pools() if pool.queue_pool is self)
        head += f", {state}, {counted(consumers, 'consumer')} in this process"
        stats = driver.statistics()
        unsent = driver.unsent
        # Completed counts every task settled: those that failed or were cancelled are said apart.
        done = stats.tasks_completed - stats.tasks_failed - stats.tasks_cancelled
        lines = [
            f"tasks: {stats.tasks_submitted} submitted"
            + (f" ({unsent} not sent yet)" if unsent else "")
            + f", {done} done, {stats.tasks_failed} failed"
            + (f", {stats.tasks_cancelled} cancelled" if stats.tasks_cancelled else "")
            + (f", and {stats.foreign_tasks} results of others' tasks" if stats.foreign_tasks else "")
        ]
        if self.reset_by_restart:  # its brokers are gone: what the driver last knew of them is not news
            where = " (a new pool on its dirpath serves what they stored)" if self.dirpath else ""
            return head + "".join(f"\n\t{line}" for line in [*lines, f"its queues were taken by the restart{where}"])
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
        if pool is None or pool.closed:
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
