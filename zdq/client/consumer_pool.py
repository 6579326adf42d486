"""ConsumerPool: places consumer actors on the workers and watches them work."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from distributed import Client

from zdq._actor import allowed_workers, check_resources, pick_worker, start_supervisor
from zdq.config import seconds_or_none, timeout_or_none
from zdq.consumer import Consumer, ConsumerBaseClass, GeneralConsumer
from zdq.driver import NO_CONSUMER
from zdq.errors import BrokerUnreachable, ClosedError, NoConsumers, PlacementError, ZdqTimeoutError
from zdq.fanout import served_queues
from zdq.names import consumer_names, counted
from zdq.client.queue_pool import QueuePool
from zdq.stats import ConsumerStats
from zdq.transport.reach import OPEN_BETWEEN_WORKERS, describe
from zdq.transport.sockets import new_identity

__all__ = ["ConsumerPool", "EARLIER", "NOT_RUN"]

#: The key in :meth:`ConsumerPool.results` of results produced by consumers of an earlier run.
EARLIER = "earlier-consumers"
#: The key in :meth:`ConsumerPool.results` of tasks that failed without running (their queue was
#: lost with its worker, a chunk could not be stored...): their value is the error.
NOT_RUN = "not-run"

logger = logging.getLogger(__name__)


def _integer(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least

#: Consumers whose health() is asked per supervision round (every 2 s or two heartbeats).
_HEALTH_PER_ROUND = 8


def _progress_bar() -> Any:
    from tqdm.auto import tqdm

    class Bar(tqdm):  # type: ignore[misc]
        # tqdm's monitor thread would outlive the bar (and the program's own checks for threads);
        # the bar is refreshed by join's loop anyway.
        monitor_interval = 0

    return Bar(total=0, unit="task", desc="zdq", dynamic_ncols=True)


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
    retries : int, optional
        Retries for tasks submitted without their own ``retries=``.
    max_concurrency : int
        Threads per consumer that run tasks (raise it for I/O-bound tasks).
    early_ack : bool
        ``False`` (default): a chunk is acknowledged after its results, so a consumer that dies
        mid-chunk loses nothing (at least once). ``True``: acknowledged on receipt (at most once).
    prefetch : int, optional
        Chunks a consumer keeps in hand (default from ``zdq.prefetch``).
    workers : list of str, optional
        Addresses or names of the workers to place consumers on (default: all workers).
    resources : dict, optional
        Place consumers only on workers that declare these Dask resources (``{"GPU": 1}``): the
        tasks of this pool then run there. :class:`PlacementError` if no worker does.
    fan_out : int, optional (a keyword of the settings)
        Queues each consumer connects to, at most (default ``zdq.fan-out``); every queue is still
        served. See :attr:`served`.

    The positional order is daskqueue 0.2.0's. zdq's defaults differ on purpose: at least once
    (``early_ack=False``), no retries, one execution thread (fastest for short tasks).

    A supervisor thread replaces a consumer whose worker dies, so ``n_consumers`` stay alive;
    the dead one's chunks return to their queues when its heartbeats stop.

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
        early_ack: bool = False,
        max_concurrency: int = 1,
        *,
        prefetch: int | None = None,
        workers: Sequence[str] | None = None,
        resources: Mapping[str, float] | None = None,
        time_limit: float | str | None = None,
        start: bool = False,
        **overrides: Any,
    ) -> None:
        if not (isinstance(ConsumerClass, type) and issubclass(ConsumerClass, ConsumerBaseClass)):
            raise TypeError(f"ConsumerClass must be a subclass of ConsumerBaseClass, got {ConsumerClass!r}")
        for label, value, least in (("n_consumers", n_consumers, 1), ("max_concurrency", max_concurrency, 1)):
            if not _integer(value, least):
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if batch_size is not None and not _integer(batch_size, 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if retries is not None and not _integer(retries, 0):
            raise ValueError(f"retries must be a non-negative integer, got {retries!r}")
        if not isinstance(early_ack, bool):
            raise TypeError(f"early_ack must be True or False, got {early_ack!r}")
        if not isinstance(queue_pool, QueuePool):
            raise TypeError(f"ConsumerPool needs a QueuePool, got {queue_pool!r:.80}")
        queue_pool.driver  # a pool that is not started or is closed raises ClosedError here
        if client is None:  # as QueuePool(None, ...): the queue pool's own client
            client = queue_pool.client
        elif not isinstance(client, Client):
            raise TypeError(f"ConsumerPool needs a distributed.Client (or None), got {client!r:.80}")
        self.client = client
        self.queue_pool = queue_pool
        self.consumer_class = ConsumerClass
        self.n_consumers = n_consumers
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.early_ack = early_ack
        self.retries = retries
        self.time_limit = seconds_or_none(time_limit, "time_limit")
        # Every keyword a QueuePool takes for its settings is taken here too (heartbeat_interval,
        # ...): it applies to these consumers.
        self.settings = queue_pool.settings.with_overrides(prefetch=prefetch, **overrides)
        if batch_size is not None:
            # daskqueue's batch_size was how many items a consumer takes at once: in zdq, what a
            # consumer takes is a chunk, cut by the submitter; so this caps the chunks of what is
            # submitted from now on.
            queue_pool.consumer_batch_size = batch_size
        self.names = consumer_names(ConsumerClass.__name__, n_consumers)
        # The queues each consumer slot serves: at most fan-out of them, every queue by someone.
        self.served = [
            served_queues(i, n_consumers, queue_pool.n_queues, fan_out=self.settings.fan_out)
            for i in range(n_consumers)
        ]
        self._allowed_workers = allowed_workers(client, workers)
        self.resources = check_resources(resources)
        self._placed_on: dict[int, str] = {}
        # Every identity each consumer slot had: a replacement gets a new one, results keep all.
        self._identities: list[list[bytes]] = [[] for _ in range(n_consumers)]
        self._actor_futures: list[Any] = [None] * n_consumers
        self._consumers: list[Any] = [None] * n_consumers
        self._lock = threading.RLock()
        self._running = False
        self._closed = False
        self._stop_supervisor = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.replacements = 0
        self._health_due = 0.0
        self._health_next = 0  # the consumer whose health is asked next
        # Queues placed again since start(): whether some consumer reaches them where they went.
        # queue -> (when to judge at the latest, [(consumer, its reach() future)], its placement)
        self._reach_checks: dict[int, tuple[float, list[tuple[str, Any]], int]] = {}
        self._reach_gen: dict[int, int] = {}  # queue -> how often it was placed again
        self._orphans: dict[int, str] = {}  # queue -> why no consumer reaches it (join raises it)
        queue_pool.subscribe(self)
        queue_pool.consumers_changed()
        try:
            self._place_all()
        except Exception as e:
            self.close()
            raise PlacementError(f"could not place consumers: {e}") from e
        if start:
            self.start()

    def _place_all(self) -> None:
        """Place every consumer at once: the actors are created in parallel, so a pool of 64 costs
        about what one does, plus the scheduler's work per actor."""
        known = self.client.scheduler_info(n_workers=-1)["workers"]
        submitted = []
        try:
            for i in range(self.n_consumers):
                submitted.append((i, *self._submit(i, known)))
            for i, fut, ident in submitted:
                self._adopt(i, fut, ident, fut.result(timeout=60))
        except BaseException:
            for _, fut, _ in submitted:
                fut.release()
            raise

    def _place(self, i: int) -> None:
        fut, ident = self._submit(i)
        try:
            actor = fut.result(timeout=60)
        except BaseException:
            fut.release()
            raise
        self._adopt(i, fut, ident, actor)

    def _submit(self, i: int, known: dict[str, Any] | None = None) -> tuple[Any, bytes]:
        address = pick_worker(self.client, self._allowed_workers, i, self._placed_on, self.resources, known)
        ident = new_identity()
        name = self.names[i]
        fut = self.client.submit(  # released below if the actor cannot be created
            Consumer,
            name,
            ident,
            self.consumer_class,
            self.settings,
            self.max_concurrency,
            self.early_ack,
            self.retries or 0,
            self.queue_pool.client_keys,
            self.queue_pool.payload_key,
            self.time_limit,
            (self.queue_pool.name, self.queue_pool.dirpath),
            actor=True,
            workers=[address],
            allow_other_workers=False,
            pure=False,
            key=f"zdq-consumer-{name}-{uuid.uuid4().hex[:8]}",
        )
        return fut, ident

    def _adopt(self, i: int, fut: Any, ident: bytes, actor: Any) -> None:
        self.queue_pool.consumer_identities.add(ident)
        with self._lock:
            self._identities[i].append(ident)
            self._actor_futures[i] = fut
            self._consumers[i] = actor

    # -- supervision ----------------------------------------------------------------------------
    def _supervise_once(self) -> None:
        if self._closed or self.client.status != "running":
            return
        if any(fut is not None and fut.status == "cancelled" for fut in self._actor_futures):
            logger.info("the consumers were cancelled (client.restart?); supervision stops")
            self._stop_supervisor.set()
            return
        if self._reach_checks:
            self._judge_reach()
        unhealthy = self._unhealthy() if self._running else {}
        for i, fut in enumerate(list(self._actor_futures)):
            if fut is None or self._closed:
                continue
            if fut.status == "finished" and i not in unhealthy:
                continue
            why = unhealthy.get(i) or f"its worker was lost ({fut.status})"
            logger.warning("consumer %s cannot work: %s; placing a replacement", self.names[i], why)
            try:
                self._replace(i)
            except Exception as e:  # keep supervising: the next round tries again
                logger.warning("replacing consumer %s failed (will retry): %s", self.names[i], e)

    def _unhealthy(self) -> dict[int, str]:
        """Consumers alive to Dask that cannot work (their sockets failed): a few of them asked
        every few seconds, in turn, so that a large pool adds a bounded number of actor calls."""
        now = time.monotonic()
        if now < self._health_due:
            return {}
        self._health_due = now + max(2.0, self.settings.heartbeat_interval * 2)
        calls = []
        with self._lock:
            first = self._health_next
            turn = [(first + k) % self.n_consumers for k in range(min(self.n_consumers, _HEALTH_PER_ROUND))]
            self._health_next = (first + len(turn)) % self.n_consumers
            for i in turn:
                fut, consumer = self._actor_futures[i], self._consumers[i]
                if fut is not None and fut.status == "finished" and hasattr(Consumer, "health"):
                    try:
                        calls.append((i, consumer.health()))
                    except Exception:  # the worker is going: the next round sees its future lost
                        continue
        out: dict[int, str] = {}
        for i, call in calls:
            try:
                healthy, reason = call.result(timeout=10)
            except Exception:
                continue
            if not healthy:
                out[i] = reason
        return out

    def _replace(self, i: int) -> None:
        old = self._actor_futures[i]
        self._place(i)
        if old is not None:
            old.release()
        self.replacements += 1
        if self._running and not self._closed:
            self._consumers[i].start(*self._start_args(i)).result(timeout=30)

    def _start_args(self, i: int) -> tuple[list[str], list[int]]:
        """What consumer ``i`` starts with: the endpoints of the queues it serves, and which."""
        endpoints = self.queue_pool.endpoints
        return [endpoints[q] for q in self.served[i]], self.served[i]

    def on_broker_moved(self, broker: int, endpoint: str) -> None:
        """Called by the QueuePool when it placed a lost broker again: every consumer serving it
        reconnects.

        Each consumer is told on its own: one on a dead worker (replaced, with the current
        endpoints, by the supervisor) never keeps the others uninformed.
        """
        queue = self.queue_pool.queue_names[broker]
        with self._lock:
            # A new placement: what was found of the last one no longer holds, and a check of it
            # still out is stale (its generation is behind).
            self._reach_gen[broker] = self._reach_gen.get(broker, 0) + 1
            self._orphans.pop(broker, None)
            self._reach_checks.pop(broker, None)
        calls = []
        for name, consumer in self._live(serving=broker):
            try:
                calls.append((name, consumer.set_endpoint(broker, endpoint)))
            except Exception as e:
                logger.debug("pointing consumer %s at queue %s failed: %s", name, queue, e)
        for name, call in calls:
            try:
                call.result(timeout=30)
            except Exception as e:  # a lost consumer is replaced with the new endpoints anyway
                logger.debug("pointing consumer %s at queue %s failed: %s", name, queue, e)
        if self._running:
            self._ask_reach(broker, self._reach_gen[broker])

    # -- whether a queue placed again is still served ------------------------------------------
    # start() checks that every queue is reached; a queue placed again later (its worker died) may
    # land where no consumer reaches it, and its tasks would wait for ever. The consumers serving
    # it are asked in the background (the QueuePool's supervisor, which tells us of the move, must
    # not wait connect-timeout for them); the supervisor judges their answers, asks again while
    # the queue stays unreached, and join() raises what it found instead of waiting.
    def _ask_reach(self, broker: int, gen: int) -> None:
        """Ask the consumers serving ``broker`` whether they reach it (placement ``gen`` of it)."""
        queue = self.queue_pool.queue_names[broker]
        calls = []
        for name, consumer in self._live(serving=broker):
            try:
                calls.append((name, consumer.reach([queue])))
            except Exception as e:  # a lost consumer is replaced, and the replacement connects anew
                logger.debug("reach on consumer %s failed: %s", name, e)
        s = self.settings
        judge_by = time.monotonic() + s.connect_timeout + 2 * s.heartbeat_interval + 10
        with self._lock:
            if self._reach_gen.get(broker, 0) == gen:  # else it moved meanwhile: a newer check runs
                self._reach_checks[broker] = (judge_by, calls, gen)

    def _judge_reach(self) -> None:
        """Judge the reach checks whose answers are all in (or overdue)."""
        now = time.monotonic()
        with self._lock:
            due = {
                broker: (calls, gen)
                for broker, (judge_by, calls, gen) in self._reach_checks.items()
                if now >= judge_by or all(call.done() for _, call in calls)
            }
            for broker in due:
                del self._reach_checks[broker]
        for broker, (calls, gen) in due.items():
            answers = []
            for name, call in calls:
                try:
                    answers.append((name, call.result(timeout=0.1)))
                except Exception as e:
                    logger.debug("reach on consumer %s failed: %s", name, e)
            orphans, why = self._reach_verdict(answers)
            queue = self.queue_pool.queue_names[broker]
            with self._lock:
                if self._reach_gen.get(broker, 0) != gen:
                    continue  # the queue moved since it was asked: a newer check judges it
                was = self._orphans.pop(broker, None)
                if queue in orphans:
                    self._orphans[broker] = why
            if queue in orphans:
                if was is None:
                    logger.error("%s", why)
                if self._running and not self._closed:
                    self._ask_reach(broker, gen)  # until some consumer reaches it
            elif was is not None:
                logger.warning("queue %s is reached by consumers of pool %s again", queue, self.queue_pool.name)
            elif why:
                logger.warning("%s", why)

    def unreached(self) -> dict[str, str]:
        """Queues placed again where none of this pool's consumers reaches them, with why:
        ``join()`` raises :class:`BrokerUnreachable` for those that hold tasks."""
        names = self.queue_pool.queue_names
        with self._lock:
            return {names[i]: why for i, why in self._orphans.items()}

    def _live(self, serving: int | None = None) -> list[tuple[str, Any]]:
        """``(name, actor)`` of every consumer placed now (that serves queue ``serving``)."""
        with self._lock:
            return [
                (name, c)
                for name, c, queues in zip(self.names, self._consumers, self.served)
                if c is not None and (serving is None or serving in queues)
            ]

    def _ensure_supervisor(self) -> None:
        if self._supervisor is None:
            self._supervisor = start_supervisor(self, self._stop_supervisor, "zdq-supervisor-consumers")

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"the consumer pool of queue pool {self.queue_pool.name} is closed")

    # -- daskqueue API --------------------------------------------------------------------------
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
        self._check_open()
        self.queue_pool.driver  # a QueuePool closed meanwhile raises ClosedError here
        logger.info("Starting %d consumers", self.n_consumers)
        self._running = True
        self._each("start", timeout=60, args_of=self._start_args)
        self._ensure_supervisor()
        self._check_reach()

    def _check_reach(self) -> None:
        """Wait until every consumer heard from its brokers or reported them unreachable; raise if
        some queue is reached by none (its tasks would never run), warn if some consumers miss
        queues that others serve. Queues that are down (being placed again) are not waited for:
        the consumers are told where they went when they are placed again."""
        qp = self.queue_pool
        up = self._queues_up()
        calls = []
        for name, consumer in self._live():
            try:
                calls.append((name, consumer.reach(up)))
            except Exception as e:  # its worker is gone: the supervisor replaces it
                logger.debug("reach on consumer %s failed: %s", name, e)
        wait = self.settings.connect_timeout + 2 * self.settings.heartbeat_interval + 10
        answers = []
        for name, call in calls:
            try:
                answers.append((name, call.result(timeout=wait)))
            except Exception as e:
                logger.debug("reach on consumer %s failed: %s", name, e)
        orphans, why = self._reach_verdict(answers)
        if orphans:
            raise BrokerUnreachable(why)
        if why:
            logger.warning("%s", why)

    def _reach_verdict(
        self, answers: list[tuple[str, tuple[list[str], list[tuple[str, str, str]]]]]
    ) -> tuple[list[str], str]:
        """From the consumers' ``reach()`` answers: the queues that are up and that no consumer
        reaches, and what to tell the user (empty when every consumer reaches all it serves)."""
        qp = self.queue_pool
        reached: set[str] = set()
        missed: dict[str, list[tuple[str, str, str]]] = {}  # queue -> (consumer, endpoint, why)
        for name, (ok, failed) in answers:
            reached.update(ok)
            for queue, endpoint, why in failed:
                missed.setdefault(queue, []).append((name, endpoint, why))
        up = self._queues_up()  # a queue lost meanwhile is the supervisor's, not unreachable
        missed = {queue: tries for queue, tries in missed.items() if queue in up}
        if not missed:
            return [], ""
        workers = dict(zip(qp.queue_names, qp._workers()))
        where = {name: self._placed_on.get(i, "?") for i, name in enumerate(self.names)}
        lines = [
            (queue, endpoint, workers.get(queue, ""), f"{consumer} on {where.get(consumer, '?')}: {why}")
            for queue, tries in missed.items()
            for consumer, endpoint, why in tries
        ]
        orphans = [queue for queue in missed if queue not in reached]
        if orphans:
            subject = (
                f"no consumer of pool {qp.name} reaches {', '.join(orphans)}: their tasks would never run "
                "(the consumers keep running and connecting)"
            )
        else:
            subject = f"some consumers of pool {qp.name} cannot reach some of its queues (other consumers serve them)"
        return orphans, describe(subject, lines, OPEN_BETWEEN_WORKERS)

    def _queues_up(self) -> list[str]:
        qp = self.queue_pool
        return [name for name, up in zip(qp.queue_names, qp.driver.links_up()) if up]

    def cancel(self) -> None:
        """Stop pulling work; chunks already received finish and report. ``start()`` resumes."""
        if self._closed:
            return
        self._running = False
        self._each("cancel")

    def _each(
        self, method: str, *args: Any, timeout: float = 30.0, args_of: Callable[[int], tuple[Any, ...]] | None = None
    ) -> None:
        """Call ``method`` on every consumer at once (with ``args``, or ``args_of(slot)``); a lost
        one is skipped (and replaced)."""
        calls = []
        with self._lock:
            live = [(i, name, c) for i, (name, c) in enumerate(zip(self.names, self._consumers)) if c is not None]
        for i, name, consumer in live:
            try:
                calls.append((name, getattr(consumer, method)(*(args_of(i) if args_of else args))))
            except Exception as e:  # its worker is gone
                logger.debug("%s on consumer %s failed: %s", method, name, e)
        for name, call in calls:
            try:
                call.result(timeout=timeout)
            except Exception as e:
                # Lost or unhealthy consumers are replaced by the supervisor, with what they missed.
                (logger.warning if method == "start" else logger.debug)("%s on consumer %s failed: %s", method, name, e)

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

        Parameters
        ----------
        timestep : float
            Seconds between two looks at the brokers' counters.
        progress : bool
            Show a progress bar (tqdm), advanced by results as they arrive, with the rate.
        print_timestep : float
            Accepted for daskqueue compatibility and ignored: the bar refreshes as results come.
        timeout : float, optional
            Raise :class:`ZdqTimeoutError` if the work is not done by then.
        """
        self._check_open()
        timeout = timeout_or_none(timeout, "join's timeout")
        driver = self.queue_pool.driver
        logger.info("Waiting for the %d consumers to process all items in queue_pool...", self.n_consumers)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        if progress:
            bar = _progress_bar()
        pending = outstanding = 0
        try:
            while True:
                # The queues' counts come over the data plane: no actor call, so a broker that is
                # being placed again (its worker died) only makes join wait, never fail.
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    driver.flush(timeout=left)
                except ZdqTimeoutError:
                    pass  # the deadline is checked below
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                statuses = driver.queue_status(timeout=10 if left is None else min(10.0, max(left, 0.1)))
                known = [s for s in statuses if s is not None]
                pending = sum(s.ready_tasks + s.leased_tasks + s.waiting_tasks for s in known)
                outstanding = driver.outstanding
                if bar is not None:
                    # Every result of the pool's tasks counts, those in before join() began too,
                    # against every task this driver submitted plus what the queues hold for others.
                    stats = driver.statistics()
                    done = stats.tasks_completed + stats.foreign_tasks
                    bar.total = max(stats.tasks_submitted + stats.foreign_tasks, done + pending)
                    bar.update(done - bar.n)
                # A STATUS reply comes after every result its broker routed here before it (one
                # socket keeps order): when every queue answers "nothing pending", those are in.
                if len(known) == len(statuses) and pending == 0 and outstanding == 0:
                    break
                if (pending or outstanding) and not any(pool._running for pool in self.queue_pool.consumer_pools()):
                    raise NoConsumers(
                        f"join: {max(pending, outstanding)} tasks are pending and no consumer is running: "
                        "call consumer_pool.start() first"
                    )
                self._raise_unreached(statuses)
                if deadline is not None and time.monotonic() > deadline:
                    down = len(statuses) - len(known)
                    raise ZdqTimeoutError(
                        f"join: {max(pending, outstanding)} tasks were still pending at the timeout"
                        + (f" ({down} queues were down, being placed again)" if down else "")
                    )
                driver.wait_results(timeout=timestep)
        finally:
            if bar is not None:
                bar.close()
        self._report(statuses)
        if stop:
            self.cancel()

    def _raise_unreached(self, statuses: list[Any]) -> None:
        """Raise if a queue that holds tasks is reached by no consumer of any of the queue pool's
        ConsumerPools (it was placed again where they cannot connect)."""
        with self._lock:
            if not self._orphans:
                return
            orphans = dict(self._orphans)
        for broker, why in orphans.items():
            status = statuses[broker] if broker < len(statuses) else None
            if status is None or not status.ready_tasks:
                continue
            queue = self.queue_pool.queue_names[broker]
            others = [pool for pool in self.queue_pool.consumer_pools() if pool is not self and pool._running]
            if any(queue not in pool.unreached() for pool in others):
                continue  # another pool's consumers serve it
            raise BrokerUnreachable(f"join: {why}")

    def _report(self, statuses: list[Any]) -> None:
        """The end of a join: how much ran, and what failed, said where it shows."""
        stats = self.queue_pool.driver.statistics()
        dead = sum(s.dead_tasks for s in statuses if s is not None)
        logger.info("All consumers are done ! %d items processed.", self.nb_consumed())
        if stats.tasks_failed or dead:
            logger.warning(
                "join: %d tasks failed (their futures and results() hold the errors, those that never ran "
                "under 'not-run'); %d are dead-lettered (queue_pool.dead_letters())",
                stats.tasks_failed,
                dead,
            )
        if stats.tasks_cancelled:
            logger.info("join: %d tasks were cancelled before they started (they never ran)", stats.tasks_cancelled)

    def results(self) -> dict[str, dict[int, Any]]:
        """Every result this pool's consumers produced, per consumer: ``{name: {task key: result}}``.

        A failed task's value is its exception. Needs ``keep_results=True`` on the QueuePool.
        Results that a durable queue kept from consumers of an earlier run (done, but never taken
        by their driver before a restart) appear under ``"earlier-consumers"``, and tasks that
        failed without running (``BrokerLost``, ``StorageFull``...) under ``"not-run"``, in the
        results of the newest ConsumerPool of the queue pool.
        """
        if not self.queue_pool.keep_results:
            raise ClosedError("the QueuePool was made with keep_results=False: read results from futures")
        driver = self.queue_pool.driver
        out = {name: driver.results_for(idents) for name, idents in zip(self.names, self._identities)}
        earlier = self._earlier_producers()
        if earlier:
            out[EARLIER] = driver.results_for(earlier)
        pools = self.queue_pool.consumer_pools()
        if pools and pools[-1] is self:
            not_run = driver.results_for([NO_CONSUMER])
            if not_run:
                out[NOT_RUN] = not_run
        return out

    def _earlier_producers(self) -> set[bytes]:
        """Consumers that no ConsumerPool of this process placed (a durable queue kept their
        results from before a restart): the newest ConsumerPool of the queue pool reports them."""
        pools = self.queue_pool.consumer_pools()
        if not pools or pools[-1] is not self:
            return set()
        return self.queue_pool.driver.producers() - self.queue_pool.consumer_identities

    def nb_consumed(self) -> int:
        """Tasks whose results reached this process from this pool's consumers (and, for the
        newest ConsumerPool, from consumers of an earlier run: see :meth:`results`)."""
        driver = self.queue_pool.driver
        own = driver.done_count(ident for idents in self._identities for ident in idents)
        return own + driver.done_count(self._earlier_producers())

    def statistics(self, timeout: float = 10.0) -> list[ConsumerStats]:
        with self._lock:
            calls = [c.statistics() for c in self._consumers]
        return [c.result(timeout=timeout) for c in calls]

    def __len__(self) -> int:
        return self.n_consumers

    def __getitem__(self, index: int) -> Any:
        return self._consumers[index]

    #: Past this many consumers, a repr shows their total instead of one line each.
    _REPR_CONSUMERS = 8

    def __repr__(self) -> str:
        """What this process knows, asking no consumer: the results that reached it from each
        (a repr never waits on the cluster; ``statistics()`` asks the consumers)."""
        consumers = counted(self.n_consumers, f"{self.consumer_class.__name__} consumer")
        head = f"ConsumerPool of {self.queue_pool.name}: {consumers}"
        if self._closed:
            return f"{head}, closed"
        state = "running" if self._running else "idle (call start())"
        if self.replacements:
            state += f", {self.replacements} replaced"
        driver = self.queue_pool._driver
        if self.queue_pool._closed or driver is None:
            return f"{head}, {state}; its queue pool is closed"
        done = [driver.done_count(idents) for idents in self._identities]
        if self.n_consumers > self._REPR_CONSUMERS:
            lines = [f"{sum(done)} tasks processed"]
        else:
            lines = [f"{name}: {n} processed" for name, n in zip(self.names, done)]
        return f"{head}, {state}" + "".join(f"\n\t{line}" for line in lines)

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every consumer and release its actor. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._running = False
        self._stop_supervisor.set()
        if self._supervisor is not None:
            self._supervisor.join(10)
        stops = []
        for name, consumer in self._live():
            try:
                stops.append((name, consumer.stop()))
            except Exception as e:
                logger.debug("stopping consumer %s failed: %s", name, e)
        for name, call in stops:
            try:
                call.result(timeout=15)
            except Exception as e:
                logger.debug("stopping consumer %s failed: %s", name, e)
        for fut in self._actor_futures:
            if fut is not None:
                fut.release()
        self._actor_futures = [None] * self.n_consumers
        self._consumers = [None] * self.n_consumers
        self.queue_pool.consumers_changed()

    def __enter__(self) -> ConsumerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
