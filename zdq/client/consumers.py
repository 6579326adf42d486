"""The consumers of a ConsumerPool: their slots, placement, health, replacement and reach.

Placement and the slots are :mod:`zdq.client.slots`'s (one lock, a closed check: a replacement
that ends after ``close()`` is released, never written into the closed pool). What is particular
to consumers lives here: which queues each serves, asking a few of them at a time whether they
can work, and whether a queue placed again is still reached by some consumer.

Ownership
---------
==================================  ===============================================================
state                               owner
==================================  ===============================================================
``slots``                           its own lock (:class:`~zdq.client.slots.ActorSlots`)
``identities``, ``placed_on``       ``_lock`` (placed by the user's thread at start, by the
                                    supervisor later; read by ``results()``)
``_reach_checks``, ``_reach_gen``,  ``_lock`` (written by the queue pool's supervisor, which tells
``_orphans``                        of moves, by ``start()``, which found queues none reaches, and
                                    by this pool's supervisor, which judges)
``_health_due``, ``_health_next``,  the pool's supervisor thread
``replacements``, ``_retry_at``,
``_unreached``, ``_silence_asked``,
``_partial_said``
``_none_live_since``,               ``_lock`` (written by the supervisor after each round, read by
``_last_failure``,                  ``join()`` and ``result()`` through :meth:`stranded`, and
``_class_failures``                 ``_class_failures`` by ``join()`` through :meth:`unserved`)
==================================  ===============================================================

When the workers a pool may use (``workers=``, ``resources=``) have all left, no replacement can be
placed: the supervisor keeps trying (every :data:`_RETRY_EVERY` seconds, not every round), and once
no consumer has been live for ``no_consumer_timeout`` :meth:`ConsumerSlots.stranded` says why,
naming the constraint; ``join()`` and ``result()`` raise it (:class:`~zdq.errors.NoEligibleWorkers`)
instead of waiting for ever. A matching worker that joins gets the replacements, and the waits
go on as usual.

The consumer class is made in the consumer actor's constructor: a class whose ``__init__`` raises
fails the pool's placement at once (:class:`~zdq.errors.ConsumerInitError`, nothing left placed).
A replacement whose class raises (a database its ``__init__`` opens went down since) is tried again
the same way, every :data:`_RETRY_EVERY` seconds: a passing failure heals by itself, and one that
lasts past ``no_consumer_timeout`` with no consumer live is what :meth:`ConsumerSlots.stranded`
says, naming the class and what it raised; with other consumers live, the queues that only such
consumers serve (``fan-out``) are what :meth:`ConsumerSlots.unserved` says, and ``join()`` raises
for those that hold tasks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from distributed import Client

from zdq._actor import beside_brokers, candidate_workers, scheduler_workers
from zdq.client.slots import (
    ActorSlots,
    SlotsClosed,
    gather_actors,
    answers_within,
    place_actor,
    place_on_the_rest,
    release_future,
    stop_created,
    wait_created,
)
from zdq.config import PoolSettings
from zdq.errors import ConsumerInitError, PlacementError
from zdq.consumer import Consumer, ConsumerBaseClass
from zdq.consumer.actor import REACHES_NONE
from zdq.client.driver import Driver
from zdq.names import consumer_names, counted
from zdq.fanout import served_queues
from zdq.transport.reach import DRIVER_HEARS_NOTHING, OPEN_BETWEEN_WORKERS, describe
from zdq.transport.security import ClientKeys
from zdq.transport.sockets import new_identity

__all__ = ["ConsumerSlots", "FedPool"]

logger = logging.getLogger(__name__)

#: Consumers whose health() is asked per supervision round (every 2 s or two heartbeats).
_HEALTH_PER_ROUND = 8

#: Seconds between two tries at placing a consumer whose placement failed: a pool whose workers
#: all left asks the scheduler once a second, not four times a second per consumer.
_RETRY_EVERY = 1.0
#: A replacement's placement is waited for at most this long (and placement-timeout) per try.
_REPLACE_TRY = 15.0
#: A consumer that reaches none of its queues is replaced (elsewhere it may reach them). While its
#: replacements reach none either (the network is cut, not one worker), each waits twice as long
#: as the one before, from the first wait up to the last: not a new consumer every few seconds.
_UNREACHED_WAITS = (10.0, 300.0)
#: A queue that a consumer reached, then heard nothing from (a network cut after start(), a
#: stopped broker), is asked of every consumer serving it at most this often while it lasts.
_SILENCE_REASK = 30.0
#: Seconds a consumer future that failed is given to hand over its error once the placement's
#: timeout has passed (the error came with the failure: reading it is local).
_READ_ERROR_AT_LEAST = 0.5


def _failure_text(failure: tuple[str, Exception] | None) -> str:
    """Why the last placement failed, for messages (``""``: none failed since one was live)."""
    return "" if failure is None else f"placing {failure[0]} failed: {failure[1]}"


ReachAnswers = list[tuple[str, tuple[list[str], list[tuple[str, str, str]]]]]


class FedPool(Protocol):
    """What the consumers need of their QueuePool: its public edge only."""

    name: str
    dirpath: str | None
    n_queues: int
    queue_names: list[str]

    @property
    def endpoints(self) -> list[str]: ...

    @property
    def client_keys(self) -> ClientKeys | None: ...

    @property
    def payload_key(self) -> bytes | None: ...

    @property
    def driver(self) -> Driver: ...

    def workers(self) -> list[str]: ...


class ConsumerSlots:
    """``n`` consumer actors of one class, each serving its share of the queues."""

    def __init__(
        self,
        client: Client,
        queue_pool: FedPool,
        consumer_class: type[ConsumerBaseClass],
        n: int,
        settings: PoolSettings,
        *,
        max_concurrency: int,
        early_ack: bool,
        retries: int,
        batch_size: int | None = None,
        time_limit: float | None,
        hard: bool = False,
        allowed_workers: list[str] | None,
        resources: dict[str, float] | None,
        on_identity: Callable[[bytes], None],
    ) -> None:
        self.client = client
        self.queue_pool = queue_pool
        self.consumer_class = consumer_class
        self.n = n
        self.settings = settings
        self._max_concurrency = max_concurrency
        self._early_ack = early_ack
        self._retries = retries
        self._batch_size = batch_size
        self._time_limit = time_limit
        self._hard = hard
        self._allowed = allowed_workers
        self._resources = resources
        self._on_identity = on_identity
        self.names = consumer_names(consumer_class.__name__, n)
        # The queues each consumer slot serves: at most fan-out of them, every queue by someone.
        self.served = [served_queues(i, n, queue_pool.n_queues, fan_out=settings.fan_out) for i in range(n)]
        self.slots: ActorSlots[Any] = ActorSlots(n)
        self._lock = threading.Lock()
        self.placed_on: dict[int, str] = {}
        # Every identity each consumer slot had: a replacement gets a new one, results keep all.
        self.identities: list[list[bytes]] = [[] for _ in range(n)]
        self.replacements = 0
        self._health_due = 0.0
        self._health_next = 0  # the consumer whose health is asked next
        # Queues placed again since start(): whether some consumer reaches them where they went.
        # queue -> (when to judge at the latest, [(consumer, its reach() future)], its placement)
        self._reach_checks: dict[int, tuple[float, list[tuple[str, Any]], int]] = {}
        self._reach_gen: dict[int, int] = {}  # queue -> how often it was placed again
        self._orphans: dict[int, str] = {}  # queue -> why no consumer reaches it (join raises it)
        self._retry_at: dict[int, float] = {}  # slot -> when to try placing it again (it failed)
        # Since when no slot holds a consumer Dask still has (None: some does), and why the last
        # placement failed: stranded() turns them into join()'s and result()'s error.
        self._none_live_since: float | None = None
        self._last_failure: tuple[str, Exception] | None = None  # (consumer, what placing it raised)
        # slot -> (since when, why) its class has raised on every try to place it again: while
        # other consumers live, the queues only such slots serve are what unserved() says.
        self._class_failures: dict[int, tuple[float, str]] = {}
        #: slot -> (its consumers replaced in a row for reaching no queue, not again before).
        self._unreached: dict[int, tuple[int, float]] = {}
        #: broker -> not before when to ask again who reaches it (some consumer says it went silent).
        self._silence_asked: dict[int, float] = {}
        #: broker -> what was said of the consumers that cannot reach it (others do): said once.
        self._partial_said: dict[int, str] = {}
        #: The endpoints the consumers were placed started with (None: not placed started).
        self._started_with: list[str] | None = None

    # -- placing ---------------------------------------------------------------------------------
    def place_all(self, timeout: float | None = None, *, start: bool = False) -> None:
        """Place every consumer at once: the actors are created in parallel, and their proxies
        fetched in one round trip, so a pool of 64 costs about what one does, plus the
        scheduler's work per actor. ``start``: each consumer starts in its constructor (see
        :class:`~zdq.consumer.Consumer`'s ``start_with``), one actor round trip less each.

        Raises
        ------
        ConsumerInitError
            (a :class:`PlacementError`) The consumer class raised in its ``__init__``: the first
            such error, caused by what the class raised, saying how many consumers failed so.
            Nothing is left placed.
        PlacementError
            Some actor was not created within ``timeout`` seconds: the message names each such
            consumer and its worker (stopped, or too busy to answer). Or, with ``start``, some
            consumer could not start: its own error, naming it and its worker.

        A worker that leaves the cluster while its consumers are made (killed, crashed) is seen
        within a second, and every consumer placed once more on the workers that are left.
        """
        timeout = self.settings.placement_timeout if timeout is None else timeout

        def chosen() -> set[str]:
            with self._lock:
                return set(self.placed_on.values())

        what = f"{counted(self.n, 'consumer')} of pool {self.queue_pool.name}"
        place_on_the_rest(self.client, lambda: self._place_all_once(timeout, start), chosen, what)

    def _place_all_once(self, timeout: float, start: bool) -> None:
        """One try of :meth:`place_all`: nothing is left placed when it fails."""
        deadline = time.monotonic() + timeout
        known = scheduler_workers(self.client)
        where = self._beside_brokers(known)
        submitted = []
        given = list(self.queue_pool.endpoints)  # what the consumers placed started are given
        try:
            for i in range(self.n):
                submitted.append((i, *self._submit(i, known, start=start, prefer=where[i] if where else None)))
            self._wait_created([(i, fut) for i, fut, _ in submitted], timeout, known)
            self._raise_init_errors([(i, fut) for i, fut, _ in submitted], deadline)
            actors = gather_actors(self.client, [fut for _, fut, _ in submitted], timeout)
            for (i, fut, ident), actor in zip(submitted, actors):
                self._adopt(i, fut, ident, actor)
            self._started_with = given if start else None
        except BaseException:
            if start:
                stop_created(self.client, [fut for _, fut, _ in submitted], "consumer")
            for _, fut, _ in submitted:
                release_future(fut)
            raise

    def _raise_init_errors(self, placed: list[tuple[int, Any]], deadline: float) -> None:
        """Raise the :class:`ConsumerInitError` of the consumers of ``placed`` (slot, future;
        created or failed) whose class raised in ``__init__``: a new one on this side (its traceback
        the caller's), caused by the class's own exception. Their errors are read by ``deadline``
        (the placement's), each given at least a moment: a failed future's error is already here."""
        failed = []
        for _, fut in placed:
            if fut.status != "error":
                continue
            try:
                error = fut.exception(timeout=max(deadline - time.monotonic(), _READ_ERROR_AT_LEAST))
            except Exception as e:  # noqa: BLE001 - gathering the actors says it
                logger.debug("the error of consumer future %s could not be read: %s", fut.key, e)
                continue
            if isinstance(error, ConsumerInitError):
                failed.append(error)
        if not failed:
            return
        first = failed[0]
        alike = f" ({len(failed)} of {self.n} consumers failed so)" if len(failed) > 1 else ""
        raise ConsumerInitError(f"{first}{alike}") from first.__cause__

    def _wait_created(self, placing: list[tuple[int, Any]], timeout: float, known: dict[str, Any] | None = None) -> None:
        """Wait (``timeout`` for all) until the actors of ``placing`` (slot, future) are created;
        raise :class:`PlacementError` naming each consumer that was not, and its worker."""
        with self._lock:
            where = {i: self.placed_on.get(i, "?") for i, _ in placing}
        labelled = [(self.names[i], fut, where[i]) for i, fut in placing]
        wait_created(self.client, labelled, timeout, known if known is not None else {}, "consumer")

    def _beside_brokers(self, known: dict[str, Any]) -> list[str]:
        """The worker of each slot, placed at once: spread as by slot, but beside a broker of one
        of its queues where it can be (see :func:`zdq._actor.beside_brokers`); [] if no worker
        can take them (pick_worker says why)."""
        workers = candidate_workers(self.client, self._allowed, self._resources, known)
        if not workers:
            return []
        return beside_brokers(workers, self.served, self.queue_pool.workers())

    def _submit(
        self, i: int, known: dict[str, Any] | None = None, *, start: bool = False, prefer: str | None = None
    ) -> tuple[Any, bytes]:
        ident = new_identity()
        name = self.names[i]
        qp = self.queue_pool
        args = (
            name,
            ident,
            self.consumer_class,
            self.settings,
            self._max_concurrency,
            self._early_ack,
            self._retries,
            qp.client_keys,
            qp.payload_key,
            self._time_limit,
            (qp.name, qp.dirpath),
            self._hard,
            self.start_args(i) if start else None,
            i + 1,  # the consumer's number, its class's id (daskqueue's idx + 1)
            self._batch_size,
        )
        with self._lock:  # placed_on is read by reach verdicts meanwhile
            fut = place_actor(
                self.client,
                Consumer,
                args,
                slot=i,
                allowed=self._allowed,
                placed_on=self.placed_on,
                resources=self._resources,
                key=f"zdq-consumer-{name}",
                known=known,
                prefer=prefer,
            )
        return fut, ident  # released by the caller if the actor cannot be created

    def _adopt(self, i: int, fut: Any, ident: bytes, actor: Any) -> Any:
        """Put ``actor`` in slot ``i``; return the future it replaces (SlotsClosed when closed)."""
        old = self.slots.adopt(i, fut, actor)
        self._on_identity(ident)
        with self._lock:
            self.identities[i].append(ident)
        return old

    def catch_up(self) -> None:
        """Consumers placed started: tell them of the queues placed again since they were given
        their endpoints (a move told before they were adopted reached none of them)."""
        was, self._started_with = self._started_with, None
        if was is None:
            return
        for broker, (old, new) in enumerate(zip(was, self.queue_pool.endpoints)):
            if old != new:
                self.each("set_endpoint", broker, new)

    def start_args(self, i: int) -> tuple[list[str], list[int]]:
        """What consumer ``i`` starts with: the endpoints of the queues it serves, and which."""
        endpoints = self.queue_pool.endpoints
        return [endpoints[q] for q in self.served[i]], self.served[i]

    def live(self, serving: int | None = None) -> list[tuple[int, str, Any]]:
        """``(slot, name, actor)`` of every consumer placed now (that serves queue ``serving``)."""
        return [
            (i, name, c)
            for i, (name, c, queues) in enumerate(zip(self.names, self.slots.actors(), self.served))
            if c is not None and (serving is None or serving in queues)
        ]

    def ask_all(
        self,
        method: str,
        *args: Any,
        timeout: float | None,
        args_of: Callable[[int], tuple[Any, ...]] | None = None,
    ) -> tuple[list[tuple[int, str, Any]], dict[tuple[int, str], tuple[str, BaseException | None]]]:
        """Call ``method`` on every live consumer at once (with ``args``, or ``args_of(slot)``) and
        wait for the answers within ``timeout`` seconds (``None``: no bound), one bound for all:
        consumers on stopped workers cost it once, not each. Returns ``(slot, name, answer)`` of
        those that answered, and ``{(slot, name): (why, error)}`` of the others: its worker gone,
        silent (``error`` ``None``), or the call raised (``error``). An answer already in is taken
        however little time is left: a Dask actor future asked with ``timeout=0`` raises even when
        it holds its answer, and a consumer that answered at once was reported silent behind one
        that did not."""
        calls: dict[tuple[int, str], tuple[Any, str]] = {}
        missing: dict[tuple[int, str], tuple[str, BaseException | None]] = {}
        with self._lock:
            placed_on = dict(self.placed_on)
        for i, name, consumer in self.live():
            try:
                calls[i, name] = (getattr(consumer, method)(*(args_of(i) if args_of else args)), placed_on.get(i, ""))
            except Exception as e:  # its worker is gone
                missing[i, name] = (f"could not be asked ({e})", e)
        told, errors, gone, _ = answers_within(self.client, calls, timeout)
        for key in calls:  # in slot order
            if key in told:
                continue
            if key in errors:
                error = errors[key]
                # A TimeoutError here is the consumer's own answer (a get_results() that hung).
                said = f"failed: {error}" if isinstance(error, TimeoutError) else f"failed: {type(error).__name__}: {error}"
                missing[key] = (said, error)
            elif key in gone:
                missing[key] = ("could not be asked: its worker left the cluster", ConnectionError("its worker left the cluster"))
            else:
                missing[key] = (f"did not answer within {timeout:g} s" if timeout is not None else "did not answer", None)
        answers = [(i, name, told[i, name]) for i, name in calls if (i, name) in told]
        return answers, missing

    def each(
        self, method: str, *args: Any, timeout: float = 30.0, args_of: Callable[[int], tuple[Any, ...]] | None = None
    ) -> None:
        """:meth:`ask_all` for a call whose answers are not needed: a lost consumer is skipped (and
        replaced), a silent one named in a warning."""
        _, missing = self.ask_all(method, *args, timeout=timeout, args_of=args_of)
        for (_, name), (why, error) in missing.items():
            if error is None:
                logger.warning("%s: consumer %s %s (its worker is stopped, or too busy); going on", method, name, why)
            else:
                # Lost consumers are replaced by the supervisor, with what they missed; so is one whose
                # start() failed (its health() says so from then on: see Consumer.start). A class
                # whose __init__ raises never gets here: the pool's placement raised it.
                (logger.warning if method == "start" else logger.debug)("%s on consumer %s: %s", method, name, why)

    # -- supervision (the pool's supervisor thread) -----------------------------------------------
    def cancelled(self) -> bool:
        return any(fut is not None and fut.status == "cancelled" for fut in self.slots.futures())

    def supervise_once(self, running: bool, stopping: Callable[[], bool]) -> None:
        if self._reach_checks:
            self._judge_reach(running, stopping)
        unhealthy, silent = self._checkup() if running else ({}, set())
        if silent:
            self._ask_who_hears(silent)
        no_worker = False  # a placement found no worker this round: the other slots would not either
        for i, fut in enumerate(self.slots.futures()):
            if fut is None or stopping():
                continue
            if fut.status == "finished" and i not in unhealthy:
                self._retry_at.pop(i, None)
                continue
            now = time.monotonic()
            if now < self._retry_at.get(i, 0.0):
                continue
            first_try = i not in self._retry_at
            if no_worker:
                self._retry_at[i] = now + _RETRY_EVERY
                continue
            why = unhealthy.get(i) or f"its worker was lost ({fut.status})"
            if fut.status == "finished" and REACHES_NONE in why:
                if not self._replace_unreached(i, why, now):
                    continue
            elif first_try:
                logger.warning("consumer %s cannot work: %s; placing a replacement", self.names[i], why)
            try:
                self._replace(i, running, stopping)
            except Exception as e:  # keep supervising: the supervisor tries again
                if stopping():
                    return
                no_worker = isinstance(e, PlacementError)
                self._retry_at[i] = time.monotonic() + _RETRY_EVERY
                with self._lock:
                    self._last_failure = (self.names[i], e)
                    if isinstance(e, ConsumerInitError):
                        since, _ = self._class_failures.get(i, (time.monotonic(), ""))
                        self._class_failures[i] = (since, str(e))
                    else:
                        self._class_failures.pop(i, None)
                # Said once per consumer; the tries that follow, every second, only to the debug log.
                (logger.warning if first_try else logger.debug)(
                    "replacing consumer %s failed (trying again every %g s): %s", self.names[i], _RETRY_EVERY, e
                )
            else:
                self._retry_at.pop(i, None)
        self._note_live()

    def _note_live(self) -> None:
        """Whether some slot holds a consumer Dask still has; since when none does."""
        placed = [i for i, fut in enumerate(self.slots.futures()) if fut is not None and fut.status == "finished"]
        live = bool(placed)
        with self._lock:
            for i in placed:
                self._class_failures.pop(i, None)
            if live:
                since = self._none_live_since
                if since is not None and time.monotonic() - since >= self.settings.no_consumer_timeout:
                    # Said only after a wait past the bound (join and result raised meanwhile), not
                    # after every replacement of a one-consumer pool.
                    logger.warning(
                        "the ConsumerPool on queue pool %s has a consumer placed again after %.0f s without one: "
                        "its tasks run again",
                        self.queue_pool.name,
                        time.monotonic() - since,
                    )
                self._none_live_since = None
                self._last_failure = None
            elif self._none_live_since is None:
                self._none_live_since = time.monotonic()

    def outage(self) -> str:
        """For reprs, asking nothing: since when no consumer has been live, and why the last
        placement failed; ``""`` while some consumer is (or before the supervisor first looked)."""
        with self._lock:
            since, failure = self._none_live_since, _failure_text(self._last_failure)
        if since is None:
            return ""
        return f"no consumer live for {time.monotonic() - since:.0f} s" + (f" ({failure})" if failure else "")

    def constraint(self) -> str:
        """Where these consumers may be placed, as the user said it (for errors)."""
        parts = []
        if self._allowed is not None:
            parts.append(f"workers={self._allowed}")
        if self._resources:
            parts.append(f"resources={self._resources}")
        return ", ".join(parts) if parts else "any worker (no workers= or resources=)"

    def _some_worker_fits(self) -> bool:
        """Whether a live worker satisfies the constraint now (one joined since the supervisor's
        last try, which places a consumer there within a second or so): asked of the scheduler
        only once the bound has passed, so never on a healthy pool's path."""
        try:
            return bool(candidate_workers(self.client, self._allowed, self._resources))
        except Exception as e:  # noqa: BLE001 - the client is closing: nothing fits
            logger.debug("asking the scheduler for workers failed: %s", e)
            return False

    def stranded(self) -> str:
        """Why none of these consumers has been placed for ``no_consumer_timeout`` seconds:
        every worker they may use left, or none takes them (naming the placement constraint), or
        their class raises in ``__init__`` on every try (naming it and what it raised); ``""``
        while some consumer is placed, or not for that long yet."""
        with self._lock:
            since, last = self._none_live_since, self._last_failure
        failure = _failure_text(last)
        if since is None:
            return ""
        idle = time.monotonic() - since
        if idle < self.settings.no_consumer_timeout:
            return ""
        if last is not None and isinstance(last[1], ConsumerInitError):
            # Workers fit: the class itself cannot be made there (a resource its __init__ opens is
            # down, a library is missing). Tried again every second, in case it comes back.
            return (
                f"no consumer of the ConsumerPool on queue pool {self.queue_pool.name} has been live for "
                f"{idle:.0f} s: its consumer class {self.consumer_class.__qualname__} raises in __init__ on every "
                f"try ({failure}); the pool keeps trying every {_RETRY_EVERY:g} s (the work resumes once one is "
                "made), or close it and fix the class"
            )
        if self._some_worker_fits():
            return ""
        return (
            f"no consumer of the ConsumerPool on queue pool {self.queue_pool.name} has been live for "
            f"{idle:.0f} s: no live worker satisfies its placement constraint {self.constraint()}"
            + (f" ({failure})" if failure else "")
            + "; start a worker that does (the pool keeps trying, and the work resumes there), or make a "
            "ConsumerPool with another constraint"
        )

    def unserved(self) -> dict[int, str]:
        """Queues (by index) that only consumers whose class raises in ``__init__`` on every try
        serve, for ``no_consumer_timeout`` seconds, with why: the other consumers live, so
        :meth:`stranded` says nothing, but these queues' tasks would wait for ever (join raises)."""
        bound = self.settings.no_consumer_timeout
        now = time.monotonic()
        with self._lock:
            failing = {i: (now - since, why) for i, (since, why) in self._class_failures.items() if now - since >= bound}
        out: dict[int, str] = {}
        if not failing:
            return out
        for queue in range(self.queue_pool.n_queues):
            serving = [i for i, queues in enumerate(self.served) if queue in queues]
            if serving and all(i in failing for i in serving):
                idle, why = failing[serving[0]]
                names = ", ".join(self.names[i] for i in serving)
                out[queue] = (
                    f"no consumer serving it ({names}) has been placed for {idle:.0f} s: its consumer class "
                    f"{self.consumer_class.__qualname__} raises in __init__ on every try ({why}); the pool keeps "
                    f"trying every {_RETRY_EVERY:g} s (the work resumes once one is made)"
                )
        return out

    def _replace_unreached(self, i: int, why: str, now: float) -> bool:
        """Whether to replace now the consumer of slot ``i``, which reaches none of its queues
        (``why``); said once at warning, and once more when its replacement reaches none either."""
        first, last = _UNREACHED_WAITS
        streak, not_before = self._unreached.get(i, (0, 0.0))
        if now < not_before:
            return False
        if now - not_before > last:
            # Its consumer lived well past its wait (a new consumer reports it reaches none within
            # connect-timeout): this is a new cut, not the same one, and starts over.
            streak = 0
        wait = min(last, first * 2**streak)
        self._unreached[i] = (streak + 1, now + wait)
        if streak == 0:
            logger.warning("consumer %s cannot work: %s; placing a replacement", self.names[i], why)
        else:
            (logger.warning if streak == 1 else logger.debug)(
                "consumer %s: its replacement reaches none of its queues either (%s); replaced again, "
                "less and less often while none reaches them (next in %g s, then at most every %g s)",
                self.names[i], why, wait, last,
            )
        return True

    def _checkup(self) -> tuple[dict[int, str], set[str]]:
        """Consumers alive to Dask that cannot work (their sockets failed), and the queues some of
        them reached once and hear nothing from since: a few consumers asked every few seconds,
        in turn, so that a large pool adds a bounded number of actor calls."""
        now = time.monotonic()
        if now < self._health_due:
            return {}, set()
        self._health_due = now + max(2.0, self.settings.heartbeat_interval * 2)
        first = self._health_next
        turn = [(first + k) % self.n for k in range(min(self.n, _HEALTH_PER_ROUND))]
        self._health_next = (first + len(turn)) % self.n
        calls = []
        for i in turn:
            fut, consumer = self.slots.future(i), self.slots.actor(i)
            if fut is not None and consumer is not None and fut.status == "finished":
                try:
                    calls.append((i, consumer.checkup()))
                except Exception:  # the worker is going: the next round sees its future lost
                    continue
        out: dict[int, str] = {}
        silent: set[str] = set()
        for i, call in calls:
            try:
                healthy, reason, cut_off = call.result(timeout=10)
            except Exception:
                continue
            if not healthy:
                out[i] = reason
            silent.update(cut_off)
        return out, silent

    def _ask_who_hears(self, queues: set[str]) -> None:
        """Some consumers reached ``queues`` once and hear nothing from them now: ask every
        consumer serving each whether it reaches it (at most every :data:`_SILENCE_REASK`
        seconds). If none does, the verdict is held as :meth:`check_reach`'s is, and ``join()``
        raises it rather than waiting; it is dropped once some consumer hears the queue again."""
        now = time.monotonic()
        names = self.queue_pool.queue_names
        for queue in sorted(queues):
            if queue not in names:
                continue
            broker = names.index(queue)
            with self._lock:
                if broker in self._reach_checks or broker in self._orphans:
                    continue  # being asked, or held unreached and asked again until reached
                gen = self._reach_gen.get(broker, 0)
            if now < self._silence_asked.get(broker, 0.0):
                continue
            self._silence_asked[broker] = now + _SILENCE_REASK
            self._ask_reach(broker, gen)

    def _replace(self, i: int, running: bool, stopping: Callable[[], bool]) -> None:
        fut, ident = self._submit(i)
        try:
            # A try is bounded below placement-timeout: a worker that does not answer (stopped) is
            # noted by the wait and passed over by the next try, a second later, not a minute.
            self._wait_created([(i, fut)], min(self.settings.placement_timeout, _REPLACE_TRY))
            actor = fut.result(timeout=10)
            old = self._adopt(i, fut, ident, actor)
        except SlotsClosed:
            # The pool closed while this replacement was placed: released, nothing written.
            logger.info("consumer %s was placed after its pool closed: released", self.names[i])
            release_future(fut, actor)
            return
        except BaseException:
            release_future(fut)
            raise
        release_future(old)
        self.replacements += 1
        if running and not stopping():
            actor.start(*self.start_args(i)).result(timeout=30)

    # -- whether a queue placed again is still served ------------------------------------------
    # start() checks that every queue is reached; a queue placed again later (its worker died) may
    # land where no consumer reaches it, and its tasks would wait for ever. The consumers serving
    # it are asked in the background (the QueuePool's supervisor, which tells us of the move, must
    # not wait connect-timeout for them); the supervisor judges their answers, asks again while
    # the queue stays unreached, and join() raises what it found instead of waiting.
    def broker_moved(self, broker: int, endpoint: str, running: bool) -> None:
        """Every consumer serving ``broker`` reconnects to ``endpoint``, each told on its own: one
        on a dead worker (replaced, with the current endpoints, by the supervisor) never keeps
        the others uninformed."""
        queue = self.queue_pool.queue_names[broker]
        with self._lock:
            # A new placement: what was found of the last one no longer holds, and a check of it
            # still out is stale (its generation is behind).
            self._reach_gen[broker] = self._reach_gen.get(broker, 0) + 1
            self._orphans.pop(broker, None)
            self._reach_checks.pop(broker, None)
            gen = self._reach_gen[broker]
        calls = []
        for _, name, consumer in self.live(serving=broker):
            try:
                calls.append((name, consumer.set_endpoint(broker, endpoint)))
            except Exception as e:
                logger.debug("pointing consumer %s at queue %s failed: %s", name, queue, e)
        for name, call in calls:
            try:
                call.result(timeout=30)
            except Exception as e:  # a lost consumer is replaced with the new endpoints anyway
                logger.debug("pointing consumer %s at queue %s failed: %s", name, queue, e)
        if running:
            self._ask_reach(broker, gen)

    def _reach_calls(self, broker: int) -> list[tuple[str, Any]]:
        """``consumer.reach([queue])`` of every live consumer serving ``broker``: (name, call)."""
        queue = self.queue_pool.queue_names[broker]
        calls = []
        for _, name, consumer in self.live(serving=broker):
            try:
                calls.append((name, consumer.reach([queue])))
            except Exception as e:  # a lost consumer is replaced, and the replacement connects anew
                logger.debug("reach on consumer %s failed: %s", name, e)
        return calls

    def _ask_reach(self, broker: int, gen: int) -> None:
        """Ask the consumers serving ``broker`` whether they reach it (placement ``gen`` of it)."""
        calls = self._reach_calls(broker)
        s = self.settings
        judge_by = time.monotonic() + s.connect_timeout + 2 * s.heartbeat_interval + 10
        with self._lock:
            if self._reach_gen.get(broker, 0) == gen:  # else it moved meanwhile: a newer check runs
                self._reach_checks[broker] = (judge_by, calls, gen)

    def _judge_reach(self, running: bool, stopping: Callable[[], bool]) -> None:
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
            verdict = self._hold_verdict(broker, gen, answers)
            if verdict is None:
                continue  # the queue moved since it was asked: a newer check judges it
            unreached, was, why = verdict
            queue = self.queue_pool.queue_names[broker]
            if unreached:
                if was is None:
                    logger.error("%s", why)
                if running and not stopping():
                    self._ask_reach(broker, gen)  # until some consumer reaches it
            elif was is not None:
                logger.warning("queue %s is reached by consumers of pool %s again", queue, self.queue_pool.name)
            elif why and self._partial_said.get(broker) != why:
                logger.warning("%s", why)  # some consumers cannot reach it: said once while it lasts
            if not why:
                self._partial_said.pop(broker, None)
            elif not unreached:
                self._partial_said[broker] = why

    def note_unreached(self, orphans: list[str], why: str) -> None:
        """``start()`` found ``orphans``, queues no consumer reaches (``why``): held as a move's
        check holds them, so that ``join()`` raises it rather than waiting for its timeout, and
        asked again by the supervisor until some consumer reaches them."""
        names = self.queue_pool.queue_names
        for queue in orphans:
            broker = names.index(queue)
            with self._lock:
                self._orphans[broker] = why
                gen = self._reach_gen.get(broker, 0)
            self._ask_reach(broker, gen)

    def _hold_verdict(self, broker: int, gen: int, answers: ReachAnswers) -> tuple[bool, str | None, str] | None:
        """Judge the consumers' reach ``answers`` of queue ``broker`` (placement ``gen`` of it) and
        hold the verdict: ``(unreached, the why held before, the why now)``, or ``None`` when the
        queue moved since it was asked (a newer check judges it)."""
        orphans, why = self.reach_verdict(answers)
        unreached = self.queue_pool.queue_names[broker] in orphans
        with self._lock:
            if self._reach_gen.get(broker, 0) != gen:
                return None
            was = self._orphans.pop(broker, None)
            if unreached:
                self._orphans[broker] = why
        return unreached, was, why

    def still_unreached(self, broker: int, timeout: float = 5.0) -> bool:
        """Whether queue ``broker``, held as reached by none of these consumers, still is: asked
        again now, before ``join()`` or ``result()`` raise it. A broker resumed a moment ago answers
        its status the moment its consumers reach it again, before a round of the supervisor has
        judged them: asked twice, a second apart, when the first answers say none reaches it. A
        verdict that no longer holds is dropped. Bounded by ``timeout``; a consumer that does not
        answer leaves the verdict as it is."""
        queue = self.queue_pool.queue_names[broker]
        deadline = time.monotonic() + timeout
        for ask in (1, 2):
            with self._lock:
                if broker not in self._orphans:
                    return False
                gen = self._reach_gen.get(broker, 0)
            answers: ReachAnswers = []
            for name, call in self._reach_calls(broker):
                try:
                    answers.append((name, call.result(timeout=max(0.1, deadline - time.monotonic()))))
                except Exception as e:  # noqa: BLE001 - the verdict stands
                    logger.debug("reach on consumer %s failed: %s", name, e)
            if not answers:
                return True
            verdict = self._hold_verdict(broker, gen, answers)
            if verdict is None:  # placed again meanwhile: what was found no longer holds
                return False
            if not verdict[0]:
                logger.warning("queue %s is reached by consumers of pool %s again", queue, self.queue_pool.name)
                return False
            if ask == 1 and deadline - time.monotonic() > 1.0:
                time.sleep(1.0)
        return True

    def orphans(self) -> dict[int, str]:
        """Queues none of these consumers reaches (found so by ``start()``, or placed again where
        none reaches them), with why; until some consumer reaches them."""
        with self._lock:
            return dict(self._orphans)

    def check_reach(self, *, placing: bool = False) -> tuple[list[str], str]:
        """Wait until every consumer heard from its brokers or reported them unreachable; the
        queues reached by none, and what to tell (see :meth:`reach_verdict`). Queues that are down
        (being placed again) are not waited for: the consumers are told where they went.

        A consumer whose sockets could not be opened (they open in the background, see
        :meth:`Consumer.start`) answers with its :class:`PlacementError`, naming it and its worker:
        with ``placing`` (a pool placed started) they are raised together; else each is a warning
        (the supervisor replaces such a consumer, as before)."""
        up = self.queues_up()
        wait = self.settings.connect_timeout + 2 * self.settings.heartbeat_interval + 10
        answers: ReachAnswers = []
        failed: list[str] = []
        asked = self._reach_by_worker(up, wait)
        calls: dict[str, tuple[Any, str]] = {}
        with self._lock:
            placed_on = dict(self.placed_on)
        for i, name, consumer in self.live():
            if i in asked:
                answer = asked[i]
                if isinstance(answer, str):
                    failed.append(answer)
                elif answer is not None:  # None: its worker left, it is replaced
                    answers.append((name, answer))
                continue
            try:  # not answered for by its worker: asked itself
                calls[name] = (consumer.reach(up), placed_on.get(i, ""))
            except Exception as e:  # its worker is gone: the supervisor replaces it
                logger.debug("reach on consumer %s failed: %s", name, e)
        told, errors, gone, _ = answers_within(self.client, calls, wait)
        answers.extend((name, told[name]) for name in calls if name in told)
        for name, error in errors.items():
            if isinstance(error, PlacementError):
                failed.append(str(error))
            else:
                logger.debug("reach on consumer %s failed: %s", name, error)
        for name in gone:
            logger.debug("reach on consumer %s: its worker left the cluster (it is replaced)", name)
        if failed and placing:
            raise PlacementError("; ".join(failed))
        for why in failed:
            logger.warning("%s; placing a replacement", why)
        return self.reach_verdict(answers)

    def _reach_by_worker(self, up: list[str], wait: float) -> dict[int, Any]:
        """Ask one consumer per worker for the reach of every consumer placed there
        (``Consumer.reach_here``): one actor call per worker, not per consumer. By slot: the
        answer, or the message of a consumer that could not open its sockets; a slot left out
        (its worker did not answer for it) is asked by the caller."""
        by_worker: dict[str, list[tuple[int, str, Any]]] = {}
        futures = self.slots.futures()
        with self._lock:
            placed_on = dict(self.placed_on)
        for i, _, consumer in self.live():
            fut = futures[i]
            if fut is not None and i in placed_on:
                by_worker.setdefault(placed_on[i], []).append((i, str(fut.key), consumer))
        calls: dict[str, tuple[Any, str]] = {}
        for worker, here in by_worker.items():
            try:
                calls[worker] = (here[0][2].reach_here([key for _, key, _ in here], up), worker)
            except Exception as e:  # its worker is gone: the supervisor replaces its consumers
                logger.debug("reach of the consumers on %s failed: %s", worker, e)
        answers, errors, gone, _ = answers_within(self.client, calls, wait)
        out: dict[int, Any] = {}
        for worker, here in by_worker.items():
            if worker in gone:
                # Its worker left (killed): its consumers are lost, and replaced; not asked again.
                out.update({i: None for i, _, _ in here})
            elif worker in answers:
                told = answers[worker]
                out.update({i: told[key] for i, key, _ in here if key in told})
            elif worker in errors:  # each of them is asked by the caller
                logger.debug("reach of consumers %s failed: %s", [i for i, _, _ in here], errors[worker])
        return out

    def reach_verdict(self, answers: ReachAnswers) -> tuple[list[str], str]:
        """From the consumers' ``reach()`` answers: the queues that are up and that no consumer
        reaches, and what to tell the user (empty when every consumer reaches all it serves)."""
        qp = self.queue_pool
        reached: set[str] = set()
        missed: dict[str, list[tuple[str, str, str]]] = {}  # queue -> (consumer, endpoint, why)
        for name, (ok, failed) in answers:
            reached.update(ok)
            for queue, endpoint, why in failed:
                missed.setdefault(queue, []).append((name, endpoint, why))
        up = self.queues_up()  # a queue lost meanwhile is the supervisor's, not unreachable
        missed = {queue: tries for queue, tries in missed.items() if queue in up}
        if not missed:
            return [], ""
        workers = dict(zip(qp.queue_names, qp.workers()))
        with self._lock:
            where = {name: self.placed_on.get(i, "?") for i, name in enumerate(self.names)}
        # A broker the driver does not hear either is silent to everyone (its worker stopped or
        # starved), whatever the consumers' connections say: said so, rather than blamed on a
        # port or a socket's path. Healthy brokers beat every heartbeat interval.
        quiet = max(3 * self.settings.heartbeat_interval, 1.0)
        silence = {name: qp.driver.broker_silence(i) for i, name in enumerate(qp.queue_names) if name in missed}
        unheard = {queue: f"; {DRIVER_HEARS_NOTHING} for {s:.0f} s" for queue, s in silence.items() if s >= quiet}
        lines = [
            (queue, endpoint, workers.get(queue, ""), f"{consumer} on {where.get(consumer, '?')}: {why}{unheard.get(queue, '')}")
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

    def queues_up(self) -> list[str]:
        qp = self.queue_pool
        return [name for name, up in zip(qp.queue_names, qp.driver.links_up()) if up]

    def release(self) -> None:
        """Stop every consumer and release its actor (the slots refuse any late placement)."""
        with self._lock:
            workers = [self.placed_on.get(i, "") for i in range(self.n)]
        self.slots.close(self.names, "consumer", 15, self.client, workers)
