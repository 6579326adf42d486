"""ConsumerPool: the facade of the consumers placed on the workers for a QueuePool.

Its consumers' slots, placement, health and reach are :class:`~zdq.client.consumers.ConsumerSlots`';
its supervisor is :class:`~zdq.client.slots.Supervisor`. It talks to its QueuePool through the queue
pool's public edge only: the consumer registry it subscribes to (which the queue pool owns),
``wait_drained`` for ``join()``, and the endpoints and keys.

Ownership
---------
=====================  ============================================================================
state                  owner
=====================  ============================================================================
``_running``           the user's thread (``start``/``cancel``/``join``); read by the supervisors
``_closed``            the user's thread (``close()``); a late replacement is refused by the slots
``_supervisor``        the user's thread
``_consumers``         :class:`~zdq.client.consumers.ConsumerSlots` (its own lock)
=====================  ============================================================================
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Generator, Mapping, Sequence
from typing import Any

from distributed import Client

from zdq._actor import allowed_workers, check_resources
from zdq.client import asynchronous
from zdq.client.consumers import STOP_WAIT, STOP_WAIT_MAX, ConsumerSlots
from zdq.client.queue_pool import QueuePool
from zdq.client.slots import Supervisor
from zdq.config import seconds_or_none, timeout_or_none
from zdq.consumer import ConsumerBaseClass, GeneralConsumer
from zdq.errors import (
    BrokerUnreachable,
    ClosedError,
    ConsumerInitError,
    NoConsumers,
    NoEligibleWorkers,
    PlacementError,
    ZdqError,
    ZdqTimeoutError,
)
from zdq.names import agreeing, counted
from zdq.stats import ConsumerStats

__all__ = ["ConsumerPool", "EARLIER", "NOT_RUN"]

#: The key in :meth:`ConsumerPool.results` of results produced by consumers of an earlier run.
EARLIER = "earlier-consumers"
#: The key in :meth:`ConsumerPool.results` of tasks that failed without running (their queue was
#: lost with its worker, a chunk could not be stored...): their value is the error.
NOT_RUN = "not-run"

logger = logging.getLogger(__name__)

#: Seconds cancel() (and so join()) waits for the consumers' answers, all together: one on a
#: stopped worker is named in a warning and passed over (it fetches nothing while stopped).
CANCEL_ANSWER = 30.0
#: The least a join's stop of the consumers waits for their answers, however little is left of its
#: timeout: healthy consumers answer in milliseconds, and one not waited for at all is named as
#: stopped (reviewer 13).
_LEAST_STOP_WAIT = 0.5


def _integer(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _keeps_own_results(cls: type) -> bool:
    """Whether ``cls`` defines a ``get_results()`` of its own (a daskqueue consumer keeping its
    results): ``GeneralConsumer``'s is for daskqueue's consume loop, not for a ConsumerPool."""
    own = getattr(cls, "get_results", None)
    return callable(own) and own is not GeneralConsumer.get_results


def _meant(not_a_class: Any) -> str:
    """What a number in the consumer class's place likely meant (a daskqueue user's slip)."""
    if isinstance(not_a_class, int) and not isinstance(not_a_class, bool):
        return f" (the third argument is the class, as in daskqueue: n_consumers={not_a_class!r}?)"
    return ""


class _JoinBar:
    """join()'s progress bar, made at the first count (its total known then) and counted against
    the tasks submitted: its total does not move unless more are submitted meanwhile."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            class Bar(tqdm):  # type: ignore[misc]
                # tqdm's monitor thread would outlive the bar (and the program's own checks for
                # threads); the bar is refreshed by join's loop anyway.
                monitor_interval = 0

            # What was done before the bar was made is its start, not its progress: a join called
            # once the work is done would otherwise show it all done in no time (billions a second).
            self.bar = Bar(total=total, initial=done, unit="task", desc="zdq", dynamic_ncols=True)
        elif self.bar.total != total:
            self.bar.total = total
        if done != self.bar.n:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ConsumerPool:
    """``n_consumers`` consumers of a :class:`QueuePool`, each connected to all of its queues.

    Parameters
    ----------
    client : distributed.Client
        The cluster's client.
    queue_pool : QueuePool
        The queues to consume.
    ConsumerClass : type
        A :class:`ConsumerBaseClass` subclass; its ``process_item`` handles raw items. Each
        consumer makes one on its worker when it is placed, here, with daskqueue's arguments
        (see :class:`ConsumerBaseClass`): as in daskqueue, what its ``__init__`` raises is raised
        here (a :class:`ConsumerInitError` caused by it), and nothing stays placed.
    n_consumers : int
        Consumers to place, spread over the workers (fewer than queues is fine).
    batch_size : int, optional
        Accepted for daskqueue compatibility. zdq consumers fetch whole chunks, whose size the
        submitter sets (``batch_size`` of ``batch_submit``, capped by ``chunk-size``).
    retries : int, optional
        Retries for tasks submitted without their own ``retries=``.
    max_concurrency : int
        Threads per consumer that run tasks (raise it for I/O-bound tasks).
    early_ack : bool, optional
        ``False`` (default): a chunk is acknowledged after its results, so a consumer that dies
        mid-chunk loses nothing (at least once). ``True``: acknowledged on receipt (at most once).
        Not given, the queue pool's daskqueue ``retry`` decides: ``retry=False`` is at most once.
    prefetch : int, optional
        Chunks a consumer keeps in hand (default from ``zdq.prefetch``).
    workers : list of str, optional
        Addresses or names of the workers to place consumers on (default: all workers).
    resources : dict, optional
        Place consumers only on workers that declare these Dask resources (``{"GPU": 1}``): the
        tasks of this pool then run there. :class:`PlacementError` if no worker does.
    time_limit : float or str, optional
        Time limit of the tasks that carry no options of their own.
    hard : bool
        Those tasks run in a child process of their consumer, killed at ``time_limit`` (which it
        needs): see :meth:`QueuePool.submit`.
    fan_out : int, optional (a keyword of the settings)
        Queues each consumer connects to, at most (default ``zdq.fan-out``); every queue is still
        served. See :attr:`served`.
    start : bool
        Place the consumers started (each starts as it is made), and check their reach as
        :meth:`start` does. What that raises (:class:`BrokerUnreachable`, a
        :class:`PlacementError`) is raised here, the pool closed first: nothing stays placed.

    The positional order is daskqueue 0.2.0's. zdq's defaults differ on purpose: at least once
    (``early_ack=False``), no retries, one execution thread (fastest for short tasks).

    A supervisor thread replaces a consumer whose worker dies, so ``n_consumers`` stay alive;
    the dead one's chunks return to their queues as its brokers are told (or, where they cannot be,
    when its heartbeats stop). A replacement whose
    class raises in ``__init__`` is tried again every second; past ``zdq.no-consumer-timeout``
    with no consumer live, or with queues holding tasks that only such consumers serve,
    ``join()`` raises, naming the class and what it raised.

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
        client: Client | None,
        queue_pool: QueuePool,
        ConsumerClass: type[ConsumerBaseClass] = GeneralConsumer,
        n_consumers: int = 1,
        batch_size: int | None = None,
        retries: int | None = None,
        early_ack: bool | None = None,
        max_concurrency: int = 1,
        *,
        prefetch: int | None = None,
        workers: Sequence[str] | None = None,
        resources: Mapping[str, float] | None = None,
        time_limit: float | str | None = None,
        hard: bool = False,
        start: bool = False,
        **overrides: Any,
    ) -> None:
        if not (isinstance(ConsumerClass, type) and issubclass(ConsumerClass, ConsumerBaseClass)):
            raise TypeError(f"ConsumerClass must be a subclass of ConsumerBaseClass, got {ConsumerClass!r}{_meant(ConsumerClass)}")
        if inspect.isabstract(ConsumerClass):  # said here, before any actor is placed to fail the same
            missing = ", ".join(sorted(getattr(ConsumerClass, "__abstractmethods__", ())))
            raise ConsumerInitError(
                f"consumer class {ConsumerClass.__qualname__} cannot be made: it does not define {missing} "
                "(a ConsumerBaseClass subclass defines process_item(self, item))"
            )
        for label, value, least in (("n_consumers", n_consumers, 1), ("max_concurrency", max_concurrency, 1)):
            if not _integer(value, least):
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if batch_size is not None and not _integer(batch_size, 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if retries is not None and not _integer(retries, 0):
            raise ValueError(f"retries must be a non-negative integer, got {retries!r}")
        if early_ack is not None and not isinstance(early_ack, bool):
            raise TypeError(f"early_ack must be True or False, got {early_ack!r}")
        if not isinstance(queue_pool, QueuePool):
            raise TypeError(f"ConsumerPool needs a QueuePool, got {queue_pool!r:.80}")
        if early_ack is None:  # daskqueue's QueuePool(retry=False): nothing delivered twice
            early_ack = queue_pool.retry is False
        queue_pool.driver  # a pool that is not started or is closed raises ClosedError here
        if client is not None and not isinstance(client, Client):
            raise TypeError(f"ConsumerPool needs a distributed.Client (or None), got {client!r:.80}")
        #: Made for a QueuePool of an asynchronous client: placed by ``await``, with the queue
        #: pool's synchronous twin client (see :mod:`zdq.client.asynchronous`).
        self._asynchronous = queue_pool._asynchronous
        if asynchronous.is_asynchronous(client) and not self._asynchronous:
            raise TypeError(
                "ConsumerPool was given an asynchronous Dask client and a QueuePool made with a synchronous "
                "one: make the QueuePool with the asynchronous client too (queue_pool = await QueuePool(client, n))"
            )
        if client is None or self._asynchronous:  # as QueuePool(None, ...): the queue pool's own client
            client = queue_pool.client
        self.client = client
        self.queue_pool = queue_pool
        self.consumer_class = ConsumerClass
        self.n_consumers = n_consumers
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.early_ack = early_ack
        self.retries = retries
        self.time_limit = seconds_or_none(time_limit, "time_limit")
        if not isinstance(hard, bool):
            raise TypeError(f"hard must be True or False, got {hard!r}")
        if hard and self.time_limit is None:
            raise ValueError("hard=True kills tasks at the consumers' time limit: give time_limit= too")
        self.hard = hard
        # Every keyword a QueuePool takes for its settings is taken here too (heartbeat_interval,
        # ...): it applies to these consumers.
        self.settings = queue_pool.settings.with_overrides(prefetch=prefetch, **overrides)
        registry = queue_pool.consumer_registry
        if batch_size is not None:
            # daskqueue's batch_size was how many items a consumer takes at once: in zdq, what a
            # consumer takes is a chunk, cut by the submitter; so this caps the chunks of what is
            # submitted from now on.
            registry.batch_size = batch_size
        self.resources = check_resources(resources)
        self._running = False
        self._closed = False
        self._supervisor: Supervisor | None = None
        self._placing = (workers, start)
        if not (self._asynchronous and asynchronous.on_event_loop()):
            self._place(workers, start)

    def _place(self, workers: Sequence[str] | None, start: bool) -> None:
        """Place the consumers (and start them, with ``start``): at once, or, for a pool of an
        asynchronous client, when it is awaited (on a helper thread)."""
        client, queue_pool, registry = self.client, self.queue_pool, self.queue_pool.consumer_registry
        self._consumers = ConsumerSlots(
            client,
            queue_pool,
            self.consumer_class,
            self.n_consumers,
            self.settings,
            max_concurrency=self.max_concurrency,
            early_ack=self.early_ack,
            retries=self.retries or 0,
            batch_size=self.batch_size,
            time_limit=self.time_limit,
            hard=self.hard,
            allowed_workers=allowed_workers(client, workers),
            resources=self.resources,
            on_identity=registry.add_identity,
        )
        self.names = self._consumers.names
        self.served = self._consumers.served
        # The queue pool's failed and cancelled tasks, and its dead letters, when this pool's
        # last join said them (or when it was made): a join tells what happened since, not
        # again what an earlier ConsumerPool's tasks did.
        stats = queue_pool.driver.statistics()
        self._told = (stats.tasks_failed, stats.tasks_cancelled, 0)
        registry.subscribe(self)
        registry.consumers_changed()
        try:
            # Placed started, each consumer starts in its constructor: start() then only checks reach.
            self._consumers.place_all(start=start)
        except ConsumerInitError:  # the class's own error, as it is (it names the class and consumer)
            self.close()
            raise
        except Exception as e:
            self.close()
            error = PlacementError(f"could not place consumers: {e}")
            for note in getattr(e, "__notes__", ()):  # e.g. workers that left while placed, twice
                error.add_note(note)
            raise error from e
        except BaseException:  # an interrupt: nobody holds this pool to close it, nothing serves on
            self.close()
            raise
        if start:
            try:
                self._start(started=True)
            except PlacementError as e:  # a consumer could not open its sockets (said by its reach)
                self.close()
                raise PlacementError(f"could not place consumers: {e}") from e
            except BaseException:
                # BrokerUnreachable (a queue no consumer reaches), or an interrupt: the constructor
                # raises, so nobody holds a handle to close this pool. Its consumers go, rather
                # than serving on (and being replaced) unseen.
                self.close()
                raise

    # -- asynchronous clients (see zdq.client.asynchronous) --------------------------------------
    def __await__(self) -> Generator[Any, None, ConsumerPool]:
        """``consumers = await ConsumerPool(client, queue_pool, n)`` for a QueuePool of an
        asynchronous client: placed (and started, with ``start=True``) on a helper thread."""
        if not self._asynchronous:
            raise TypeError("await ConsumerPool(...) is for asynchronous Dask clients: this one is synchronous, drop the await")
        return self._placed_off_loop().__await__()

    async def _placed_off_loop(self) -> ConsumerPool:
        if not hasattr(self, "_consumers"):
            workers, start = self._placing
            await asyncio.to_thread(asynchronous.with_twin, self._own_client, self._place, workers, start)
        return self

    async def __aenter__(self) -> ConsumerPool:
        return await self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def _own_client(self) -> Client | None:
        """The queue pool's synchronous twin of an asynchronous client (see :mod:`zdq.client.asynchronous`)."""
        return self.queue_pool._own_client

    def _check_placed(self) -> None:
        if not hasattr(self, "_consumers"):
            raise asynchronous.not_started("ConsumerPool", f"of queue pool {self.queue_pool.name}")

    # -- seen by the queue pool's registry -------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._running

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def replacements(self) -> int:
        return self._consumers.replacements

    def on_broker_moved(self, broker: int, endpoint: str) -> None:
        """Called when a lost queue is served again: every consumer serving it reconnects."""
        self._consumers.reach.broker_moved(broker, endpoint, self._running)

    def stranded(self) -> str:
        """Why none of this pool's consumers has been placed for ``no_consumer_timeout``, naming
        its ``workers=`` / ``resources=`` constraint (``""`` if some is, or the pool is not
        started): ``join()`` and ``result()`` raise it as :class:`NoEligibleWorkers`."""
        return self._consumers.stranded() if self._running and not self._closed else ""

    def unreached(self) -> dict[str, str]:
        """Queues placed again where none of this pool's consumers reaches them, with why:
        ``join()`` raises :class:`BrokerUnreachable` for those that hold tasks."""
        names = self.queue_pool.queue_names
        return {names[i]: why for i, why in self._consumers.reach.orphans().items()}

    def held_up(self) -> dict[int, tuple[type[ZdqError], str]]:
        """The queues (by index) whose tasks none of this pool's consumers will take as things
        stand, each with the error to raise and why: placed again where none reaches it
        (:class:`BrokerUnreachable`, first), or served only by consumers whose class cannot be
        made (:class:`NoEligibleWorkers`). Empty while the pool is not running."""
        if not self._running or self._closed:
            return {}
        out: dict[int, tuple[type[ZdqError], str]] = {
            i: (NoEligibleWorkers, why) for i, why in self._consumers.unserved().items()
        }
        out.update((i, (BrokerUnreachable, why)) for i, why in self._consumers.reach.orphans().items())
        return out

    def still_held_up(self, broker: int) -> bool:
        """Whether queue ``broker``, which :meth:`held_up` lists, still is held up, asked again
        now (see :meth:`ConsumerReach.still_unreached <zdq.client.consumer_reach.ConsumerReach.still_unreached>`): join() and result() confirm before they
        raise."""
        if not self._running or self._closed:
            return False
        if broker in self._consumers.reach.orphans():
            return self._consumers.reach.still_unreached(broker)
        return broker in self.held_up()  # as it is now, not as the caller read it a moment ago

    def unserved(self) -> dict[str, str]:
        """Queues that only consumers of this pool whose class raises in ``__init__`` on every try
        serve, for ``zdq.no-consumer-timeout`` (the others live), with why: ``join()`` raises
        :class:`NoEligibleWorkers` for those that hold tasks."""
        if not self._running or self._closed:
            return {}
        names = self.queue_pool.queue_names
        return {names[i]: why for i, why in self._consumers.unserved().items()}

    # -- supervision ------------------------------------------------------------------------------
    def _stopping(self) -> bool:
        return self._closed or self._supervisor is None or self._supervisor.stopping

    def _supervise_once(self) -> None:
        if self._stopping():
            return
        if self._consumers.cancelled():
            logger.info("the consumers were cancelled (client.restart?); supervision stops")
            if self._supervisor is not None:
                self._supervisor.stop()
            return
        # The running flag read again when a replacement is in: start() may have come meanwhile.
        self._consumers.supervise_once(self._running, self._stopping, lambda: self._running)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"the consumer pool of queue pool {self.queue_pool.name} is closed")
        self._check_placed()

    # -- daskqueue API --------------------------------------------------------------------------
    @asynchronous.off_loop_when_async
    def start(self) -> None:
        """Start every consumer: each connects to the queues it serves and pulls work.

        It returns once every consumer has heard from its brokers. A consumer that hears nothing
        from a broker for ``connect-timeout`` reports it (a warning here, in its worker's log, and
        in ``statistics()``).

        Raises
        ------
        BrokerUnreachable
            A queue that no consumer reaches: its tasks would never run. The consumers keep
            running (and connecting); the message names each queue, its worker, the consumers
            that tried, and why they failed.
        """
        self._start(started=False)

    def _start(self, started: bool) -> None:
        """:meth:`start`; ``started``: the consumers were placed started (by their constructors),
        and are told only of queues that moved since."""
        self._check_open()
        self.queue_pool.driver  # a QueuePool closed meanwhile raises ClosedError here
        logger.info("Starting %d consumers", self.n_consumers)
        self._running = True
        self.queue_pool.consumer_registry.keep(self)  # serves while its QueuePool is open, named or not
        if started:
            self._consumers.catch_up()
        else:
            self._consumers.each("start", timeout=self.settings.placement_timeout, args_of=self._consumers.start_args)
        if self._supervisor is None:
            # Ends when the pool closes or is collected, or its Dask client is closed: the same
            # rule as the queue pool's supervisor (daskqueue programs close only their client).
            self._supervisor = Supervisor(self, "zdq-supervisor-consumers", client=self.client, method="_supervise_once")
            self._supervisor.start()
        orphans, why = self._consumers.reach.check_reach(placing=started)
        if orphans:
            self._consumers.reach.note_unreached(orphans, why)  # join() raises it too, until reached
            raise BrokerUnreachable(why)
        if why:
            logger.warning("%s", why)

    @asynchronous.off_loop_when_async
    def cancel(self) -> None:
        """Stop pulling work; chunks already received finish and report. ``start()`` resumes."""
        self._stop_pulling(CANCEL_ANSWER, "cancel")

    def _stop_pulling(self, bound: float, said: str) -> None:
        """:meth:`cancel`, waiting at most ``bound`` seconds for the consumers' answers: one that
        does not answer by then (its worker stopped) is named, and stops when the call reaches it."""
        if self._closed:
            return
        self._check_placed()
        self._running = False
        self._consumers.each("cancel", timeout=bound, said=said)

    @asynchronous.off_loop_when_async
    def join(
        self,
        timestep: float = 0.2,
        print_timestep: float = 2.0,
        progress: bool = False,
        timeout: float | None = None,
        *,
        stop: bool = True,
    ) -> None:
        """Wait until every queue is drained and every result has reached this process.

        Delayed tasks (``submit(..., delay=)``) count as queued: join waits until their time has
        come and their results are in.

        Then the consumers stop pulling (as in daskqueue; ``start()`` resumes them), unless
        ``stop=False``: they go on serving what producers submit next.

        Raises
        ------
        NoConsumers
            Tasks are pending and no consumer of the pool is running (call :meth:`start`): said at
            once, instead of waiting for work that nothing would do.
        NoEligibleWorkers
            (a :class:`NoConsumers`) Tasks are pending and no consumer of any started ConsumerPool
            of the queue pool has been placed for ``zdq.no-consumer-timeout`` (30 s): every worker
            its ``workers=`` / ``resources=`` allow has left (the message names the constraint),
            or its consumer class raises in ``__init__`` on every try (the message names the class
            and what it raised); also, while other consumers live, for a queue holding tasks that
            only such consumers serve (named). The pool keeps trying: a ``join()`` once a consumer
            is placed again waits as usual.

        Parameters
        ----------
        timestep : float
            Seconds between two looks at the brokers' counters.
        progress : bool
            Show a progress bar (tqdm), advanced by results as they arrive, with the rate.
        print_timestep : float
            Accepted for daskqueue compatibility and ignored: the bar refreshes as results come.
        timeout : float, optional
            Raise :class:`ZdqTimeoutError` if the work is not done by then. It bounds the whole
            join: the consumers' stop waits what is left of it (at least half a second; 30 s
            without a timeout) for their answers. One that does not answer by then (its worker
            stopped) is named in a warning, and stops when the call reaches it: until then, a
            task submitted after the join may still be sent to it and run there.
        """
        self._check_open()
        timeout = timeout_or_none(timeout, "join's timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        logger.info("Waiting for the %d consumers to process all items in queue_pool...", self.n_consumers)
        bar = _JoinBar() if progress else None
        if self.queue_pool.keep_results:
            # results() comes next, in daskqueue's way: the results arriving from now on are
            # folded by task id as they come, while the tasks run, not all when it is called.
            self.queue_pool.consumer_registry.start_folding()
        try:
            statuses = self.queue_pool.wait_drained(timeout, timestep=timestep, progress=bar, check=self._raise_unserved)
        except NoConsumers as e:
            if self._closed:  # not "call start()": a closed pool cannot start (reviewer 24)
                raise ClosedError(
                    f"the ConsumerPool of {self.queue_pool.name} was closed while join() waited: the tasks not done "
                    "are left to their queues (another ConsumerPool on the queue pool runs them)"
                ) from e
            raise
        finally:
            if bar is not None:
                bar.close()
        self._report(statuses)
        if stop:
            left = CANCEL_ANSWER if deadline is None else deadline - time.monotonic()
            self._stop_pulling(min(CANCEL_ANSWER, max(_LEAST_STOP_WAIT, left)), "join (stopping the consumers)")

    def _raise_unserved(self, statuses: list[Any]) -> None:
        """Raise if a queue that holds tasks is served by no consumer of any of the queue pool's
        running ConsumerPools (:meth:`ConsumerRegistry.held_up`): it was placed again where they
        cannot connect (:class:`BrokerUnreachable`), or the only consumers that serve it cannot be
        made (:class:`NoEligibleWorkers`)."""
        names = self.queue_pool.queue_names
        registry = self.queue_pool.consumer_registry
        held_up = registry.held_up()
        awaiting: list[int] | None = None
        for broker, (error, why) in held_up.items():
            status = statuses[broker] if broker < len(statuses) else None
            if status is None:
                # A broker that did not answer (stopped) holds what this process still awaits of it.
                awaiting = self.queue_pool.driver.awaiting() if awaiting is None else awaiting
                holds = broker < len(awaiting) and awaiting[broker] > 0
            else:
                holds = bool(status.ready_tasks)
            if holds and registry.still_held_up(broker):
                raise error(f"join: {why}" if error is BrokerUnreachable else f"join: queue {names[broker]} holds tasks and {why}")

    def _report(self, statuses: list[Any]) -> None:
        """The end of a join: how much ran, and what failed since this pool's last join (or its
        making), said where it shows."""
        stats = self.queue_pool.driver.statistics()
        dead = sum(s.dead_tasks for s in statuses if s is not None)
        told_failed, told_cancelled, told_dead = self._told
        self._told = (stats.tasks_failed, stats.tasks_cancelled, dead)
        failed, cancelled = stats.tasks_failed - told_failed, stats.tasks_cancelled - told_cancelled
        logger.info("All consumers are done ! %d items processed.", self.nb_consumed())
        if failed or dead != told_dead:
            logger.warning(
                "join: %s failed (their futures and results() hold the errors, those that never ran "
                "under 'not-run'); %s dead-lettered (queue_pool.dead_letters())",
                counted(failed, "task"),
                f"{dead} {agreeing(dead, 'is', 'are')}",
            )
        if cancelled:
            logger.info(
                "join: %s cancelled before they started (they never ran)",
                f"{counted(cancelled, 'task')} {agreeing(cancelled)}",
            )

    def results(self, timeout: float = 30.0) -> dict[str, Any]:
        """Every result this pool's consumers produced, per consumer: ``{name: {task key: result}}``.

        A failed task's value is its exception. Needs ``keep_results=True`` on the QueuePool.
        Results that a durable queue kept from consumers of an earlier run (done, but never taken
        by their driver before a restart) appear under ``"earlier-consumers"``, and tasks that
        failed without running (``BrokerLost``, ``StorageFull``...) under ``"not-run"``, in the
        results of the newest ConsumerPool of the queue pool.

        A consumer class that defines ``get_results()`` (a daskqueue consumer keeping results of
        its own) is asked instead, as daskqueue's ``results()`` did: ``{name: what each placed
        consumer's get_results() returns}``, asked of all at once within ``timeout`` seconds
        (:class:`ZdqTimeoutError` naming those that did not answer, or whose ``get_results()``
        raised, hung, or returned what cannot be pickled); ``keep_results`` is then not needed.
        With an asynchronous client, that call is awaitable (it asks the workers), as
        :meth:`statistics` is.
        """
        timeout_or_none(timeout, "results' timeout")  # checked at the call, whichever path answers
        if _keeps_own_results(self.consumer_class):
            return self._own_results(timeout)
        if not self.queue_pool.keep_results:
            raise ClosedError("the QueuePool was made with keep_results=False: read results from futures")
        self.queue_pool.driver  # a closed queue pool raises ClosedError here
        registry = self.queue_pool.consumer_registry
        out = {name: registry.results_for(idents) for name, idents in zip(self.names, self._consumers.identities)}
        if self._newest():
            earlier = registry.earlier_producers()
            if earlier:
                out[EARLIER] = registry.results_for(earlier)
            not_run = registry.not_run()
            if not_run:
                out[NOT_RUN] = not_run
        return out

    @asynchronous.off_loop_when_async
    def _own_results(self, timeout: float) -> dict[str, Any]:
        """:meth:`results` of a class that defines ``get_results()``: each consumer's answer. The
        consumer gives its call of it most of the bound, so that one that hangs is named as such."""
        self.queue_pool.driver  # a closed queue pool raises ClosedError here
        bound = timeout_or_none(timeout, "timeout")
        inner = 3600.0 if bound is None else max(0.1, 0.8 * bound)
        return dict(self._ask_each("get_results", bound, "results", inner))

    def _newest(self) -> bool:
        """Whether this is the newest ConsumerPool of the pool: it reports what no consumer of this
        process produced (results a durable queue kept from before a restart, tasks never run)."""
        pools = self.queue_pool.consumer_pools()
        return bool(pools) and pools[-1] is self

    def nb_consumed(self) -> int:
        """Tasks whose results reached this process from this pool's consumers (and, for the
        newest ConsumerPool, from consumers of an earlier run: see :meth:`results`)."""
        self.queue_pool.driver  # a closed queue pool raises ClosedError here
        registry = self.queue_pool.consumer_registry
        own = registry.done_count(ident for idents in self._consumers.identities for ident in idents)
        return own + (registry.done_count(registry.earlier_producers()) if self._newest() else 0)

    @asynchronous.off_loop_when_async
    def statistics(self, timeout: float = 10.0) -> list[ConsumerStats]:
        """Each placed consumer's statistics, asked of all at once.

        Raises
        ------
        ZdqTimeoutError
            Some consumer did not answer within ``timeout`` (one bound for all): the message names
            each, with its worker and why (silent, or its worker gone), rather than leaving a
            consumer out of the list without a word.
        """
        return [stats for _, stats in self._ask_each("statistics", timeout, "statistics")]

    def _ask_each(self, method: str, timeout: float | None, what: str, *args: Any) -> list[tuple[str, Any]]:
        """``(name, answer)`` of each placed consumer's actor ``method(*args)``, asked of all at once
        within ``timeout`` (one bound for all); :class:`ZdqTimeoutError` naming each consumer that
        did not answer, with its worker and why (silent, its worker gone, the call failed)."""
        bound = timeout_or_none(timeout, "timeout")
        answers, missing = self._consumers.ask_all(method, *args, timeout=bound)
        if missing:
            where = self._consumers.placed_on
            why = "; ".join(f"{name} (on {where.get(i, 'an unknown worker')}) {reason}" for (i, name), (reason, _) in missing.items())
            raise ZdqTimeoutError(f"{what} of the consumers of queue pool {self.queue_pool.name}: {why}")
        return [(name, answer) for _, name, answer in answers]

    def __len__(self) -> int:
        return self.n_consumers

    def __getitem__(self, index: int) -> Any:
        return self._consumers.slots.actors()[index]

    #: Past this many consumers, a repr shows their total instead of one line each.
    _REPR_CONSUMERS = 8

    def __repr__(self) -> str:
        """What this process knows, asking no consumer: the results that reached it from each
        (a repr never waits on the cluster; ``statistics()`` asks the consumers)."""
        consumers = counted(self.n_consumers, f"{self.consumer_class.__name__} consumer")
        head = f"ConsumerPool of {self.queue_pool.name}: {consumers}"
        if self._closed:
            return f"{head}, closed"
        if not hasattr(self, "_consumers"):
            return f"{head}, not placed yet (await it)"
        state = "running" if self._running else "idle (call start())"
        if self.replacements:
            state += f", {self.replacements} replaced"
        outage = self._consumers.outage() if self._running else ""
        if outage:  # "running" alone would hide that nothing runs (a class whose __init__ raises)
            state += f"; {outage}"
        if self.queue_pool.live_driver() is None:
            return f"{head}, {state}; its queue pool is closed"
        registry = self.queue_pool.consumer_registry
        done = [registry.done_count(idents) for idents in self._consumers.identities]
        if self.n_consumers > self._REPR_CONSUMERS:
            lines = [f"{sum(done)} tasks processed"]
        else:
            lines = [f"{name}: {n} processed" for name, n in zip(self.names, done)]
        return f"{head}, {state}" + "".join(f"\n\t{line}" for line in lines)

    # -- lifecycle ------------------------------------------------------------------------------
    @asynchronous.off_loop_when_async
    def close(self, timeout: float = STOP_WAIT) -> None:
        """Stop every consumer and release its actor. Idempotent. For a pool of an asynchronous
        client, called on its event loop: ``await consumer_pool.close()``.

        No chunk starts from then on. The chunks running may end and report their results for
        ``timeout`` seconds (10 by default: the close returns as soon as they have; a chunk
        reports whole, its tasks run to its last); those still running then, with every chunk
        taken and not started, go back to their queues whole and run again on other consumers
        (a consumer stopped costs them no attempt: none is dead-lettered for it; with
        ``early_ack`` they fail with ``TaskLost`` instead, at most once), while their tasks
        running run on to their end where they are, their results dropped.
        ``queue_pool.close()`` closes its ConsumerPools with ``timeout=0``."""
        wait = timeout_or_none(timeout, "close's timeout")
        if wait is None:
            raise ValueError(f"close's timeout must be a finite number of seconds (a close always ends), got {timeout!r}")
        wait = min(wait, STOP_WAIT_MAX)
        if self._closed:
            return
        self._closed = True
        self._running = False
        if self._supervisor is not None:
            # A replacement in progress is not waited for long: the closed slots refuse it.
            self._supervisor.stop(join=2.0)
        if hasattr(self, "_consumers"):
            self._consumers.release(wait)
            self.queue_pool.consumer_registry.let_go(self)
            self.queue_pool.consumer_registry.consumers_changed()

    def __enter__(self) -> ConsumerPool:
        if self._asynchronous:
            raise asynchronous.sync_with("ConsumerPool")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
