"""Waiting for a pool's work: every queue drained, every result of this process's tasks in.

``ConsumerPool.join()`` used to build "drained" out of five driver calls; it is
:meth:`QueuePool.wait_drained <zdq.QueuePool.wait_drained>` now, which runs this function over
the pool's own driver and the other drivers of this process on the same live pool (a second
QueuePool on a durable directory: the tasks of the first are waited for too).

It holds no state: everything is local to the call, on the caller's thread. :class:`WaitMethods`
is the pool's side of it (a mixin of :class:`~zdq.QueuePool`): ``wait_drained``,
``get_queue_size`` and the reasons a waiting future is given (``why_waiting``, ``stuck``).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from zdq.client import asynchronous
from zdq.client.consumer_registry import ConsumerRegistry
from zdq.client.driver import Driver
from zdq.config import PoolSettings, answer_timeout, timeout_or_none
from zdq.futures import WaitHint
from zdq.errors import BrokerLost, BrokerUnreachable, NoConsumers, NoEligibleWorkers, ZdqTimeoutError
from zdq.transport import protocol as p

__all__ = ["WaitMethods", "wait_drained"]


#: join() flushes what its drivers hold in steps of at most this long (see :func:`wait_drained`).
_FLUSH_STEP = 2.0


def wait_drained(
    own: Driver,
    registry: ConsumerRegistry,
    what: str,
    queue_names: Sequence[str],
    down_bound: float,
    timeout: float | None = None,
    *,
    timestep: float = 0.2,
    progress: Callable[[int, int], None] | None = None,
    check: Callable[[list[p.QueueStatus | None]], None] | None = None,
    why: Callable[[], str] | None = None,
) -> list[p.QueueStatus | None]:
    """Block until every queue answers "nothing pending" and no driver of ``registry`` waits for a
    result; return the queues' last counts. ``why()``: the pool's reasons the tasks may not be
    done (its futures' hint), said in the timeout's error.

    ``progress(done, total)`` is called at each look, ``total`` counted against the tasks
    submitted (or, when this process submitted none, against what the queues hold, once all
    answered); the last call, once drained, has ``done == total``;
    ``check(statuses)`` may raise. A queue that has not answered for ``down_bound`` seconds raises
    :class:`BrokerLost` naming it, and started consumers none of which could be placed for their
    bound raise :class:`NoEligibleWorkers` naming their constraint: no wait here is without a
    bound or an error that names it.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    down_since: dict[int, float] = {}
    total: int | None = None
    while True:
        drivers = [own] + [d for d in registry.drivers() if d is not own]
        # The queues' counts come over the data plane: no actor call, so a broker that is being
        # placed again (its worker died) only makes this wait, within a bound, never fail.
        for driver in drivers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                # In steps: a stopped broker confirms nothing, and the checks below (which name
                # why the tasks cannot be done) must still run.
                driver.flush(timeout=_FLUSH_STEP if left is None else min(left, _FLUSH_STEP))
            except ZdqTimeoutError:
                pass  # the deadline is checked below
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        statuses = own.queue_status(timeout=10 if left is None else min(10.0, max(left, 0.1)))
        known = [s for s in statuses if s is not None]
        pending = sum(s.ready_tasks + s.leased_tasks + s.waiting_tasks for s in known)
        outstanding = sum(d.outstanding for d in drivers)
        drained = len(known) == len(statuses) and pending == 0 and outstanding == 0
        if progress is not None:
            stats = [d.statistics() for d in drivers]
            done = sum(s.tasks_completed + s.foreign_tasks for s in stats)
            submitted = sum(s.tasks_submitted for s in stats)
            if submitted:
                # Against the tasks this process submitted (and the results of earlier drivers'
                # tasks that came in: those are counted done as they arrive).
                total = max(total or 0, submitted + sum(s.foreign_tasks for s in stats))
            elif len(known) == len(statuses):
                # None submitted here (a durable pool opened again after a restart): against what
                # the queues hold and what they sent here, in one count per queue, once every
                # queue has answered. (Against what had come in here, the results on their way
                # were counted twice: reviewer 23 saw 108000 of 100000.) At the end, what was done.
                total = max(total or 0, pending + sum(s.routed_tasks for s in known))
            if total is not None:
                if drained:
                    total = done
                progress(min(done, total), total)
        # A STATUS reply comes after every result its broker routed here before it (one socket
        # keeps order): when every queue answers "nothing pending", those are in.
        if drained:
            return statuses
        if (pending or outstanding) and not registry.any_running():
            raise NoConsumers(
                f"join: {max(pending, outstanding)} tasks are pending and no consumer is running: "
                "call consumer_pool.start() first"
            )
        if pending or outstanding:
            stranded = registry.stranded()
            if stranded:
                raise NoEligibleWorkers(f"join: {max(pending, outstanding)} tasks are pending and {stranded}")
        if check is not None:
            check(statuses)
        now = time.monotonic()
        for i, status in enumerate(statuses):
            if status is not None:
                down_since.pop(i, None)
            elif now - down_since.setdefault(i, now) > down_bound:
                raise BrokerLost(
                    f"join: queue {queue_names[i]} of {what} has not answered for "
                    f"{now - down_since[i]:.0f} s (lost and not placed again, or its owner's pool was "
                    "dropped): its tasks are not known to be done"
                )
        if deadline is not None and now > deadline:
            down = len(statuses) - len(known)
            reasons = why() if why is not None else ""
            raise ZdqTimeoutError(
                f"join: {max(pending, outstanding)} tasks were still pending at the timeout"
                + (f" ({down} queues did not answer: stopped, or lost and being placed again)" if down and not reasons else "")
                + (f": {reasons}" if reasons else "")
            )
        own.wait_results(timeout=timestep)


def _weakly(method: Callable[[], str]) -> Callable[[], str]:
    """``method`` of a pool, called through a weak reference: the driver's thread holds what it
    is given, and a strong reference would keep a pool dropped without close() alive for ever
    (its finalizer, which closes the driver, would never run)."""
    ref = weakref.WeakMethod(method)

    def call() -> str:
        bound = ref()
        return "" if bound is None else bound()

    return call


class WaitMethods:
    """Waiting for a :class:`~zdq.QueuePool`'s work, and saying why it does not come: draining,
    queue sizes, and the reasons a future's ``result()`` gives while it waits."""

    name: str
    queue_names: list[str]
    settings: PoolSettings
    consumer_registry: ConsumerRegistry
    _closed: bool

    @property
    def driver(self) -> Driver:
        raise NotImplementedError

    @property
    def attached(self) -> bool:
        raise NotImplementedError

    def live_driver(self) -> Driver | None:
        raise NotImplementedError

    def workers(self) -> list[str]:
        raise NotImplementedError

    def consumer_pools(self) -> list[Any]:
        raise NotImplementedError

    def gone_queues(self) -> list[str]:
        """The queues given up for good (not placed again within the recovery bound)."""
        raise NotImplementedError

    def flush(self, timeout: float | None = None) -> None:
        raise NotImplementedError

    @asynchronous.off_loop_when_async
    def wait_drained(
        self,
        timeout: float | None = None,
        *,
        timestep: float = 0.2,
        progress: Callable[[int, int], None] | None = None,
        check: Callable[[list[p.QueueStatus | None]], None] | None = None,
    ) -> list[p.QueueStatus | None]:
        """Block until every queue is drained and every result of this process's tasks on the pool
        (this pool's, and those of the other QueuePools of this process on the same live pool)
        has arrived; return the queues' last counts (see :func:`zdq.client.drain.wait_drained`).

        Raises
        ------
        NoConsumers
            Tasks are pending and no consumer of the pool is running.
        BrokerLost
            A queue has been down longer than a lost queue takes to be placed again.
        ClosedError
            The pool (or its owner) was closed meanwhile.
        ZdqTimeoutError
            Not drained by ``timeout``.
        TypeError, ValueError
            ``timeout`` or ``timestep`` is not a number of seconds (``timestep`` must be above 0).
        """
        timeout = timeout_or_none(timeout, "timeout")
        step = timeout_or_none(timestep, "timestep")
        if not step:  # None or 0: a loop that never sleeps
            raise ValueError(f"timestep must be a positive number of seconds, got {timestep!r}")
        return wait_drained(
            self.driver,
            self.consumer_registry,
            f"pool {self.name}",
            self.queue_names,
            max(60.0, 4 * self.settings.heartbeat_timeout),
            timeout,
            timestep=step,
            progress=progress,
            check=check,
            why=self.why_waiting,
        )

    @asynchronous.off_loop_when_async
    def queue_status(self, timeout: float = 10.0) -> list[p.QueueStatus | None]:
        """Each queue's counts, asked over the data plane (``None`` for a queue that is down)."""
        return self.driver.queue_status(answer_timeout(timeout))

    @asynchronous.off_loop_when_async
    def get_queue_size(self, timeout: float = 30.0) -> dict[str, int]:
        """Tasks pending (stored, not yet acknowledged) in each queue, by queue name
        (``<pool name>-queue-<i>``, as in :attr:`queue_names`, reprs, statistics and logs).

        daskqueue keyed this by its queue actors (whose repr was their Dask key); zdq's queues are
        not actors a user holds, and a name reads the same in every process and after a restart.

        Raises
        ------
        BrokerLost
            A queue is down (lost with its worker, being placed again): its size is not known.
        ZdqTimeoutError
            A queue is up but did not answer within ``timeout`` (its worker is stopped, or too busy):
            the message names it, its worker, and when it was last heard from.
        """
        timeout = answer_timeout(timeout)
        try:
            self.flush(timeout)
        except ZdqTimeoutError as e:
            raise ZdqTimeoutError(f"the queues' sizes are not known within {timeout}s ({e})") from None
        statuses = self.queue_status(timeout)
        unknown = [i for i, s in enumerate(statuses) if s is None]
        if unknown:
            raise self.unanswered(unknown, timeout, "their sizes are not known now")
        return {name: s.ready_tasks + s.leased_tasks for name, s in zip(self.queue_names, statuses) if s is not None}

    def unanswered(
        self, unknown: list[int], timeout: float, consequence: str, failed: Mapping[int, BaseException] | None = None
    ) -> BrokerLost | ZdqTimeoutError:
        """The error for queues ``unknown``, which gave no answer within ``timeout``: down (lost,
        being placed again: :class:`BrokerLost`) is not the same as up and silent (a stopped
        worker, alive to Dask: :class:`ZdqTimeoutError`); each is named with its cause, and the
        message ends with ``consequence`` (what is not known or done because of them).
        ``failed``: the queues whose ask failed at once, not by a timeout (Dask says their actor's
        worker is lost or cannot be reached, before this process has seen the queue go down)."""
        driver = self.driver
        states = driver.queue_states()
        workers = self.workers()
        down, silent = [], []
        for i in unknown:
            name, state = self.queue_names[i], states[i].state
            where = f" on {workers[i]}" if workers[i] else ""
            error = (failed or {}).get(i)
            # Dask's connect to a stopped worker times out as an OSError ("Timed out ..."): silent.
            if error is not None and not isinstance(error, TimeoutError) and "timed out" not in str(error).lower():
                down.append(f"{name}{where} could not be asked ({type(error).__name__}: {error}): its worker is lost")
            elif state == "up":
                silent.append(
                    f"{name}{where} did not answer within {timeout:g} s (last heard "
                    f"{driver.broker_silence(i):.0f} s ago: its worker is stopped, or too busy to answer)"
                )
            elif state == "unreachable":
                down.append(f"{name} was placed again where this process cannot reach it")
            else:
                down.append(f"{name} is down (lost with its worker, being placed again)")
        why = "; ".join(down + silent) + f": {consequence}"
        return BrokerLost(why) if down else ZdqTimeoutError(why)

    @property
    def wait_hint(self) -> WaitHint:
        """What this pool's futures are told while they wait (held weakly: a future never keeps
        its pool alive): :meth:`why_waiting` and :meth:`stuck`."""
        ref = weakref.ref(self)

        def stuck(future: Any = None) -> BaseException | None:
            pool = ref()
            return None if pool is None else pool.stuck(future)

        return WaitHint(_weakly(self.why_waiting), stuck)

    def stuck(self, future: Any = None) -> BaseException | None:
        """The error a future's result() raises while it waits, when no result can come as things
        stand: ConsumerPools were started and none has had a consumer placed for
        ``zdq.no-consumer-timeout`` (every worker they may use left); or some of ``future``'s tasks
        wait on a queue that no running ConsumerPool serves now (its only consumers cannot be
        made, or it was placed again where none reaches it: what ``join()`` raises for that
        queue). ``None`` otherwise: the future waits on."""
        if self._closed:
            return None
        registry = self.consumer_registry
        why = registry.stranded()
        if why:
            return NoEligibleWorkers(f"a task of pool {self.name} waits, and {why}")
        keys = _keys_of(future)
        if keys is None:
            return None
        held_up = registry.held_up()
        driver = self.live_driver() if held_up else None
        if driver is None:
            return None
        for broker in sorted(driver.brokers_holding(keys.start, len(keys))):
            if broker in held_up and registry.still_held_up(broker):
                error, why = held_up[broker]
                queue = self.queue_names[broker]
                if error is BrokerUnreachable:
                    return BrokerUnreachable(f"a task of pool {self.name} waits on queue {queue}, and {why}")
                return error(f"a task of pool {self.name} waits on queue {queue}, which holds tasks and {why}")
        return None

    def _waits_in_own_task(self) -> bool:
        """Whether the calling thread runs a task of this very pool (a task waiting on sub-tasks)."""
        from zdq._actor import CURRENT_POOL

        key = CURRENT_POOL.get()
        return key is not None and key[0] == self.name

    def why_waiting(self) -> str:
        """Why results may not come: said in the error of a future's result(timeout)."""
        reasons = []
        driver = self.live_driver()
        if driver is None:
            return ""
        stranded = self.consumer_registry.stranded()
        if stranded:
            reasons.append(stranded)
        states = driver.queue_states()
        gone = set(self.gone_queues())
        if gone:
            reasons.append(
                f"queues {', '.join(sorted(gone))} could not be served again (their tasks failed with BrokerLost)"
            )
        down = [q.name for q in states if q.state in ("down", "recovering") and q.name not in gone]
        if down:
            reasons.append(f"queues {', '.join(down)} are down and being placed again")
        silent = [
            f"{q.name} ({driver.broker_silence(i):.0f} s)"
            for i, q in enumerate(states)
            if q.state == "up" and driver.broker_silence(i) > self.settings.heartbeat_timeout
        ]
        if silent:
            reasons.append(
                f"queues {', '.join(silent)} have not answered for that long: their workers are stopped, or too "
                "busy to answer (alive to Dask, so not placed again)"
            )
        unreachable = [q.name for q in states if q.state == "unreachable"]
        if unreachable:
            reasons.append(f"queues {', '.join(unreachable)} were placed again where this process cannot reach them")
        if self._waits_in_own_task():
            # The pool attached inside a task knows no ConsumerPool (they live in the process that
            # made them), but one exists: it runs this very task.
            reasons.append(
                f"this task runs on a consumer of pool {self.name} and waits for tasks of the same pool: while "
                "every consumer thread is busy running tasks that wait (as this one does), the tasks they wait "
                "for never start; raise max_concurrency of the ConsumerPool (threads per consumer) above the "
                "number of tasks that may wait at once, or do not wait on sub-tasks inside a task"
            )
        elif not self.consumer_pools():
            if self.attached:
                reasons.append(
                    f"no ConsumerPool of this process consumes queue pool {self.name} (those of the process "
                    "that placed it are not seen from here)"
                )
            else:
                reasons.append(f"no ConsumerPool consumes queue pool {self.name}: make one and call its start()")
        elif not self.consumer_registry.any_running():
            reasons.append("no consumer is running: call consumer_pool.start()")
        return "; ".join(reasons)


def _keys_of(future: Any) -> range | None:
    """The task ids a future of this pool stands for: a batch's ``keys``, one task's ``key``."""
    keys = getattr(future, "keys", None)
    if isinstance(keys, range):
        return keys
    key = getattr(future, "key", None)
    return range(key, key + 1) if type(key) is int else None
