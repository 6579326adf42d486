"""The consumers of a ConsumerPool: their slots, placement, health and replacement.

Placement and the slots are :mod:`zdq.client.slots`'s (one lock, a closed check: a replacement
that ends after ``close()`` is released, never written into the closed pool). What is particular
to consumers lives here: which queues each serves, and asking a few of them at a time whether
they can work. Whether the queues are reached by them is :mod:`zdq.client.consumer_reach`'s
(``reach``), which this pool's supervisor runs each round.

Ownership
---------
==================================  ===============================================================
state                               owner
==================================  ===============================================================
``slots``                           its own lock (:class:`~zdq.client.slots.ActorSlots`)
``identities``, ``placed_on``       ``_lock`` (placed by the user's thread at start, by the
                                    supervisor later; read by ``results()``)
``reach``                           its own lock (:class:`~zdq.client.consumer_reach.ConsumerReach`:
                                    which queues the consumers reach, and which none does)
``_health_due``, ``_health_next``,  the pool's supervisor thread
``replacements``, ``_retry_at``,
``_unreached``
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
from typing import Any

from distributed import Client

from zdq._actor import beside_brokers, candidate_workers, scheduler_workers
from zdq.client.consumer_reach import ConsumerReach, FedPool
from zdq.client.slots import (
    ActorSlots,
    SlotsClosed,
    gather_actors,
    answers_within,
    dask_result,
    place_actor,
    place_on_the_rest,
    release_future,
    say_unanswered,
    stop_created,
    wait_created,
)
from zdq.config import PoolSettings
from zdq.errors import ConsumerInitError, PlacementError, arrived
from zdq.consumer import Consumer, ConsumerBaseClass
from zdq.consumer.actor import REACHES_NONE
from zdq.names import consumer_names, counted
from zdq.fanout import served_queues
from zdq.transport.sockets import new_identity

__all__ = ["ConsumerSlots", "FedPool"]  # FedPool: consumer_reach's, named here too

logger = logging.getLogger(__name__)

#: Consumers whose health() is asked per supervision round (every 2 s or two heartbeats).
_HEALTH_PER_ROUND = 8

#: Seconds between two tries at placing a consumer whose placement failed: a pool whose workers
#: all left asks the scheduler once a second, not four times a second per consumer.
_RETRY_EVERY = 1.0
#: A replacement's placement is waited for at most this long (and placement-timeout) per try.
_REPLACE_TRY = 15.0
#: Seconds the brokers of a consumer whose worker left are given to answer that they heard it.
_TELL_LEFT_WAIT = 5.0
#: A consumer that reaches none of its queues is replaced (elsewhere it may reach them). While its
#: replacements reach none either (the network is cut, not one worker), each waits twice as long
#: as the one before, from the first wait up to the last: not a new consumer every few seconds.
_UNREACHED_WAITS = (10.0, 300.0)
#: Seconds a consumer future that failed is given to hand over its error once the placement's
#: timeout has passed (the error came with the failure: reading it is local).
_READ_ERROR_AT_LEAST = 0.5
#: Seconds the chunks running when a ConsumerPool closes get to end and report their results
#: (those still running then go back to their queues, costing them no attempt, and run again).
STOP_WAIT = 10.0
#: A close's wait is at most this (some 30 years: "as long as it takes"); the threads' waits
#: refuse longer ones (threading.TIMEOUT_MAX).
STOP_WAIT_MAX = 1e9
#: Seconds every consumer is given to take its stop before each one's is waited for.
_TELL_STOP = 2.0
#: Seconds a consumer's stop may answer after its wait for the chunks running (its threads close
#: the sockets; its worker's other actor calls may come first).
_STOP_ANSWER = 5.0


def _failure_text(failure: tuple[str, Exception] | None) -> str:
    """Why the last placement failed, for messages (``""``: none failed since one was live)."""
    return "" if failure is None else f"placing {failure[0]} failed: {failure[1]}"


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
        #: The endpoints the consumers were placed started with (None: not placed started).
        self._started_with: list[str] | None = None
        #: Whether the queues are reached by these consumers (start()'s check, and later ones).
        self.reach = ConsumerReach(self, client, queue_pool, settings)

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
        within a second, and every consumer placed once more on the workers that are left; one
        that does not answer (stopped) within a quarter of ``timeout`` (at least 10 s) is passed
        over, and every consumer placed once more on the others, within the rest of ``timeout``.
        """
        timeout = self.settings.placement_timeout if timeout is None else timeout

        def chosen() -> set[str]:
            with self._lock:
                return set(self.placed_on.values())

        what = f"{counted(self.n, 'consumer')} of pool {self.queue_pool.name}"
        place_on_the_rest(self.client, lambda bound: self._place_all_once(bound, start), chosen, what, timeout)

    def _place_all_once(self, timeout: float, start: bool) -> None:
        """One try of :meth:`place_all`: nothing is left placed when it fails."""
        deadline = time.monotonic() + timeout
        known = scheduler_workers(self.client)
        where = self._beside_brokers(known)
        submitted = []
        actors: list[Any] = []
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
        except BaseException:  # an interrupt too: nothing of this try may serve on unseen
            if start:
                stop_created(self.client, [fut for _, fut, _ in submitted], "consumer")
            for _, fut, _ in submitted:
                release_future(fut)
            for actor in actors:  # proxies hold their actors' keys (see release_future)
                release_future(None, actor)
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
        raise ConsumerInitError(f"{first}{alike}") from arrived(first.__cause__)

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
                missing[key] = (f"did not answer within {timeout:.3g} s" if timeout is not None else "did not answer", None)
        answers = [(i, name, told[i, name]) for i, name in calls if (i, name) in told]
        return answers, missing

    def each(
        self,
        method: str,
        *args: Any,
        timeout: float = 30.0,
        args_of: Callable[[int], tuple[Any, ...]] | None = None,
        said: str | None = None,
    ) -> None:
        """:meth:`ask_all` for a call whose answers are not needed: a lost consumer is skipped (and
        replaced), a silent one named in a warning (which begins with ``said``, the user's call,
        else ``method``)."""
        _, missing = self.ask_all(method, *args, timeout=timeout, args_of=args_of)
        for (_, name), (why, error) in missing.items():
            if error is None:
                logger.warning(
                    "%s: consumer %s %s (its worker is stopped, or too busy); going on%s",
                    said or method, name, why,
                    ": it stops when the call reaches it, and may run what is sent to it until then" if method == "cancel" else "",
                )
            else:
                # Lost consumers are replaced by the supervisor, with what they missed; so is one whose
                # start() failed (its health() says so from then on: see Consumer.start). A class
                # whose __init__ raises never gets here: the pool's placement raised it.
                (logger.warning if method == "start" else logger.debug)("%s on consumer %s: %s", said or method, name, why)

    # -- supervision (the pool's supervisor thread) -----------------------------------------------
    def cancelled(self) -> bool:
        return any(fut is not None and fut.status == "cancelled" for fut in self.slots.futures())

    def supervise_once(
        self, running: bool, stopping: Callable[[], bool], running_now: Callable[[], bool] | None = None
    ) -> None:
        """One round of supervision; ``running``: the pool's flag when the round began, and
        ``running_now()`` reads it again (a replacement placed while ``start()`` ran, which
        reached only the lost consumer, is started once in: else it waited for ever)."""
        unhealthy, silent = self._checkup() if running else ({}, set())
        self.reach.supervise_once(running, stopping, silent)
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
                if fut.status != "finished":
                    self._tell_left(i)
            try:
                self._replace(i, running_now or (lambda: running), stopping)
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

    def _tell_left(self, i: int) -> None:
        """Consumer ``i``'s worker left the cluster: the brokers it served hand its leased chunks
        to the others within a heartbeat interval (they would wait for its heartbeats to be
        missed, ``heartbeat-timeout``). Their answers are waited for at most
        :data:`_TELL_LEFT_WAIT` seconds; a broker lost with the same worker, or out of reach, is
        skipped (its heartbeats still end the consumer's leases)."""
        with self._lock:
            ident = self.identities[i][-1] if self.identities[i] else None
        if ident is None:
            return
        workers = self.queue_pool.workers()
        calls: dict[int, tuple[Any, str]] = {}
        for q in self.served[i]:
            try:
                calls[q] = (self.queue_pool.broker_actor(q).consumer_left(ident), workers[q] if q < len(workers) else "")
            except Exception as e:  # an attached pool, a broker being placed again, a closed pool
                logger.debug("telling queue %d that consumer %s left failed: %s", q, self.names[i], e)
        if calls:
            _, errors, _, _ = answers_within(self.client, calls, _TELL_LEFT_WAIT)
            for q, error in errors.items():
                logger.debug("telling queue %d that consumer %s left failed: %s", q, self.names[i], error)

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

    def _replace(self, i: int, running: Callable[[], bool], stopping: Callable[[], bool]) -> None:
        fut, ident = self._submit(i)
        try:
            # A try is bounded below placement-timeout: a worker that does not answer (stopped) is
            # noted by the wait and passed over by the next try, a second later, not a minute.
            self._wait_created([(i, fut)], min(self.settings.placement_timeout, _REPLACE_TRY))
            actor = dask_result(fut, 10)
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
        if running() and not stopping():
            actor.start(*self.start_args(i)).result(timeout=30)

    def placement(self) -> dict[int, str]:
        """Each placed slot's worker (a copy)."""
        with self._lock:
            return dict(self.placed_on)

    def release(self, timeout: float = STOP_WAIT) -> None:
        """Stop every consumer and release its actor (the slots refuse any late placement); the
        chunks running get ``timeout`` seconds to end and report (:meth:`Consumer.stop`). Every
        consumer is told first, then each is waited for: a worker runs its actors' calls one at
        a time, and the waits of its consumers would otherwise add up."""
        placed_on = self.placement()
        workers = [placed_on.get(i, "") for i in range(self.n)]
        told: dict[str, tuple[Any, str]] = {}
        for i, actor in enumerate(self.slots.actors()):
            if actor is None:
                continue
            try:
                told[self.names[i]] = (actor.stop(timeout, wait=False), workers[i])
            except Exception as e:  # noqa: BLE001 - the worker may be gone already: the stop below says so
                logger.debug("telling consumer %s to stop failed: %s", self.names[i], e)
        unanswered: set[str] = set()
        if told:
            _, _, gone, unanswered = answers_within(self.client, told, _TELL_STOP)
            unanswered |= gone
            for name in sorted(unanswered - gone):
                say_unanswered("consumer", name, told[name][1], _TELL_STOP)
        self.slots.close(self.names, "consumer", timeout + _STOP_ANSWER, self.client, workers, skip=unanswered)
