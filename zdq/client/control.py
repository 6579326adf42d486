"""The control plane of a QueuePool: schedules, dead letters and statistics, asked of the brokers
over Dask (actor calls), never over the data plane.

:class:`ControlMethods` is that part of :class:`~zdq.QueuePool`'s API; the brokers are its
:class:`~zdq.client.brokers.PlacedQueues`' (an attached pool has none: it says so, or asks the
in-process owner it holds).

Ownership
---------
=======================  ==========================================================================
state                    owner
=======================  ==========================================================================
``_schedules_made``      ``_schedule_lock`` (the i-th unnamed schedule made here goes to queue i % n_queues)
everything else          the pool's (see :mod:`zdq.client.queue_pool`); read here, never written
=======================  ==========================================================================
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from zdq.client.brokers import AttachedQueues, PlacedQueues
from zdq.client.asynchronous import off_loop_when_async
from zdq.client.schedules import Schedule, cancel_schedule, list_schedules, make_schedule
from zdq.client.submit import Submitter
from zdq.client.driver import Driver
from zdq.config import PoolSettings, answer_timeout
from zdq.codec.rates import limited_chunk_size, rate_key_of, rate_of, share
from zdq.errors import BrokerLost, ClosedError, ZdqError, ZdqTimeoutError
from zdq.stats import BrokerStats, PoolStats

__all__ = ["ControlMethods", "DeadLetterInfo"]

#: ``submit``'s own keywords that a schedule does not take (refused, never passed to ``fn``).
_SUBMIT_ONLY = frozenset({"expires", "rate_limit", "unique_key", "unique_for", "delay", "eta"})


@dataclass(frozen=True)
class DeadLetterInfo:
    """A dead-lettered task: its queue, its id there, and why (with the traceback)."""

    queue: str
    chunk_id: int
    n_tasks: int
    reason: str


class ControlMethods:
    """Schedules, dead letters and statistics of a :class:`~zdq.QueuePool`."""

    name: str
    n_queues: int
    queue_names: list[str]
    _queues: PlacedQueues | AttachedQueues | None
    _host: Any  # the in-process owner of an attached pool (a QueuePool), or None
    _submitter: Submitter
    _schedules_made: int
    _schedule_lock: threading.Lock
    client: Any
    dirpath: str | None
    settings: PoolSettings
    rate_limit: float | None
    _free_chunk_size: int
    _driver: Driver | None

    @property
    def driver(self) -> Driver:
        raise NotImplementedError

    @property
    def payload_key(self) -> bytes | None:
        raise NotImplementedError

    def unanswered(
        self, unknown: list[int], timeout: float, consequence: str, failed: Mapping[int, BaseException] | None = None
    ) -> BrokerLost | ZdqTimeoutError:
        raise NotImplementedError

    def ask_brokers(
        self, method: str, asks: Mapping[int, tuple[Any, ...]] | None = None, *, timeout: float, consequence: str
    ) -> dict[int, Any]:
        """Ask the broker of each queue of ``asks`` ``method(*asks[queue])`` over Dask (``None``:
        every queue, without arguments), in parallel, all within ``timeout``: their answers, by
        queue. What a broker's method raises is raised.

        Raises
        ------
        BrokerLost, ZdqTimeoutError
            Some queues gave no answer: down (lost, being placed again), or up and silent (their
            workers stopped or too busy): each named with its worker and when it was last heard,
            then ``consequence`` (:meth:`unanswered`). The request may still be done where a
            stopped worker resumes.
        """
        self._owned(f"calls to the queues' brokers ({method})")
        if asks is None:
            asks = dict.fromkeys(range(self.n_queues), ())
        deadline = time.monotonic() + timeout
        calls: list[tuple[int, Any]] = []
        failed: dict[int, BaseException] = {}  # the queues that gave no answer, and why
        for i, args in asks.items():
            try:
                calls.append((i, getattr(self.broker_actor(i), method)(*args)))
            except Exception as e:  # noqa: BLE001 - its worker is gone, or the pool is being closed
                failed[i] = e
        answers: dict[int, Any] = {}
        for i, call in calls:
            try:
                answers[i] = call.result(timeout=max(0.1, deadline - time.monotonic()))
            except (ZdqError, ValueError, TypeError):
                raise  # the broker's own answer (a refusal)
            except Exception as e:  # noqa: BLE001 - Dask's timeout, or its worker gone: named below
                failed[i] = e
        if failed:
            raise self.unanswered(sorted(failed), timeout, consequence, failed) from next(iter(failed.values()))
        return answers

    # -- schedules (zdq.client.schedules) ----------------------------------------------------------
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
        hard: bool | None = None,
        priority: int = 0,
        timeout: float = 30.0,
        name: str | None = None,
        **kwargs: Any,
    ) -> Schedule:
        """Run ``fn(*args, **kwargs)`` (or a :class:`~zdq.Task`) periodically: at each time of
        the ``cron`` expression (UTC; croniter's syntax, ``"*/5 * * * *"``), or ``every``
        (a timedelta or seconds) from now. Return its :class:`~zdq.Schedule`.

        The schedule lives with its queue: on disk for a durable pool (it survives the driver,
        the broker and their restarts, and each tick is queued exactly once: its chunk and the
        schedule's next tick are committed together), in the broker's memory for a transient
        pool (as long as that broker lives). Ticks missed while the queue was down run once on
        recovery (``missed="once"``) or are skipped (``"skip"``); a tick that comes while the
        previous one has not finished is skipped. A tick runs as any task (at least once,
        ``retries``, ``time_limit``, dead letters, ``priority`` in its queue); its result goes
        to the schedule, shown by :meth:`schedules` (the last one only).

        ``name`` makes it the pool's one schedule of that name (as Celery beat's entries and
        APScheduler's ``id=``/``replace_existing``): a program that calls ``schedule(...,
        name="report")`` each time it starts keeps one schedule, not one per start. A second
        call with the name replaces the first: its task, arguments and options always; with the
        same timing (``cron`` or ``every``, and ``missed``) the schedule keeps its id, next tick
        and history (``ticks``, the last result), with another it starts afresh under a new id.
        Unnamed schedules are each a new one. (So ``name`` is not passed to ``fn``, as
        ``timeout`` is not: wrap a task that takes a ``name`` keyword in ``functools.partial``.)

        Raises
        ------
        ValueError
            ``cron`` does not parse, ``every`` is not positive, or both or neither are given;
            ``name`` is empty, longer than 200 characters, not printable, or digits alone.
        TypeError
            ``fn`` is not callable, ``name`` is not a str, or a keyword of ``submit`` that a
            schedule does not take is given (``expires``, ``rate_limit``, ``unique_key``,
            ``unique_for``, ``delay``, ``eta``): it would otherwise reach ``fn`` at every tick.
        BrokerLost, ZdqTimeoutError
            (named) the schedule's queue, or another that may keep one of that name, did not
            answer: lost or being placed again, or its worker stopped.
        """
        self._owned("schedules")
        timeout = answer_timeout(timeout)  # before anything is asked: a bad one changes nothing
        refused = sorted(_SUBMIT_ONLY & kwargs.keys())
        if refused:
            raise TypeError(
                f"schedule() takes no {', '.join(refused)} (submit's own keywords, which a schedule's ticks do not "
                "have): to pass keyword arguments of those names to fn, schedule a functools.partial of it"
            )
        options = self._submitter.defaults.merge(retries, retry_backoff, retry_on, time_limit, hard)
        return self._on_brokers(
            lambda: make_schedule(
                self, fn, args, kwargs, cron=cron, every=every, missed=missed, options=options, priority=priority,
                timeout=timeout, name=name,
            )
        )

    def schedules(self, timeout: float = 30.0) -> list[Schedule]:
        """The pool's schedules, as their queues report them now (by next tick)."""
        self._owned("schedules")
        timeout = answer_timeout(timeout)
        return self._on_brokers(lambda: list_schedules(self, timeout))

    @off_loop_when_async
    def cancel_schedule(self, schedule_id: int | str, timeout: float = 30.0) -> bool:
        """End a schedule, by its id or its name (``Schedule.cancel()``); True if it was live."""
        self._owned("schedules")
        timeout = answer_timeout(timeout)
        return self._on_brokers(lambda: cancel_schedule(self, schedule_id, timeout))

    def next_schedule_queue(self) -> int:
        """The queue that keeps the next unnamed schedule made here: the queues in turn."""
        with self._schedule_lock:
            index = self._schedules_made % self.n_queues
            self._schedules_made += 1
        return index

    def broker_actor(self, i: int) -> Any:
        """The broker actor of queue ``i`` (control plane), as placed now."""
        self._owned("calls to a queue's broker")
        assert isinstance(self._queues, PlacedQueues)
        return self._queues.broker(i)

    def _on_brokers(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (ZdqError, ValueError, TypeError):
            raise
        except Exception as e:  # an actor call: its worker may be gone or the call timed out
            raise ZdqError(f"pool {self.name}: a broker did not answer about schedules: {e!r}") from e

    # -- rate limits (zdq.broker.rates) -----------------------------------------------------------
    @off_loop_when_async
    def set_rate_limit(
        self, rate: float | str | None, queue: int | str | None = None, key: Any = None, timeout: float = 30.0
    ) -> None:
        """Change a rate limit of the live pool, effective at the brokers' next round.

        ``rate`` is ``"100/s"``, ``"6000/m"``, ``"10/h"`` or tasks per second; ``None`` removes
        the limit. Without ``queue`` it is the pool's total, split evenly among its queues; with
        ``queue`` (an index or a queue name) that queue's own. Without ``key`` it limits every
        task of the queues; with ``key`` (a function, or its ``"module:qualname"``) only that
        function's tasks, as ``submit(..., rate_limit=)`` does (until a submission gives another
        rate). A durable queue keeps its own limit (not a key's) across restarts.

        Raises
        ------
        TypeError, ValueError
            ``rate`` is not a rate, ``queue`` names no queue of this pool, or ``key`` is a string
            that is no function's ``"module:qualname"`` (or over 1024 bytes).
        """
        value = rate_of(rate)
        timeout = answer_timeout(timeout)
        indexes = range(self.n_queues) if queue is None else [self._queue_index(queue)]
        each = share(value, self.n_queues) if queue is None else value
        name = b"" if key is None else rate_key_of(key, "key")
        self._owned("rate limits")
        assert isinstance(self._queues, PlacedQueues)  # _owned said so
        if not name and queue is None:
            self.rate_limit = value
        try:
            self.ask_brokers(
                "set_rate_limit", {i: (each, name) for i in indexes}, timeout=timeout,
                consequence="their rate limit may not be changed (it is where they resume)",
            )
            if not name:
                for i in indexes:
                    self._queues.rate_limits[i] = each
        finally:
            if not name:
                self._chunk_for_limits(self._queues.rate_limits.values())

    def _chunk_for_limits(self, rates: Iterable[float | None]) -> None:
        """This pool's chunks sized for its queues' own limits ``rates`` (see
        :func:`~zdq.codec.rates.limited_chunk_size`): a limit set on the live pool cuts what this
        driver sends next into chunks of a twentieth of a second of it; lifting the last one
        restores the settings' size. (Chunks cut before, or by another process, are paced by
        their broker: see :mod:`zdq.broker.rates`.)"""
        size = limited_chunk_size(self._free_chunk_size, rates)
        if size != self.settings.chunk_size:
            self.settings = self.settings.with_overrides(chunk_size=size)
            if self._driver is not None:
                self._driver.set_chunk_size(size)

    def _queue_index(self, queue: int | str) -> int:
        if isinstance(queue, int) and not isinstance(queue, bool) and 0 <= queue < self.n_queues:
            return queue
        if isinstance(queue, str) and queue in self.queue_names:
            return self.queue_names.index(queue)
        raise ValueError(f"pool {self.name} has no queue {queue!r} (its queues: 0 to {self.n_queues - 1}, {', '.join(self.queue_names)})")

    # -- dead letters -------------------------------------------------------------------------
    def _owned(self, what: str) -> None:
        if not isinstance(self._queues, PlacedQueues):
            if self._queues is None:
                raise ClosedError(f"queue pool {self.name} has no brokers: it is not started, or closed")
            raise ZdqError(
                f"{what} go to the queues' brokers through the QueuePool that placed them: this one is "
                f"attached to pool {self.name}"
            )

    @off_loop_when_async
    def dead_letters(self, timeout: float = 30.0) -> list[DeadLetterInfo]:
        """Tasks that used up their attempts, in every queue, with the reason and traceback
        (each queue asked within ``timeout``: see :meth:`ask_brokers`)."""
        timeout = answer_timeout(timeout)
        answers = self.ask_brokers("dead_letters", timeout=timeout, consequence="their dead letters are not listed")
        return [
            DeadLetterInfo(self.queue_names[i], d.chunk_id, d.meta.n_tasks, d.reason)
            for i in sorted(answers)
            for d in answers[i]
        ]

    @off_loop_when_async
    def requeue_dead_letters(self, letters: Iterable[DeadLetterInfo] | None = None, timeout: float = 30.0) -> int:
        """Put dead letters (all, or those given) back at the tail of their queues; return how many
        (each queue asked within ``timeout``: see :meth:`ask_brokers`).

        Their results arrive like those of new tasks: in ``ConsumerPool.results()``.
        """
        return self._on_dead(letters, "requeue_dead", timeout)

    @off_loop_when_async
    def purge_dead_letters(self, letters: Iterable[DeadLetterInfo] | None = None, timeout: float = 30.0) -> int:
        """Delete dead letters (all, or those given); return how many (each queue asked within
        ``timeout``: see :meth:`ask_brokers`)."""
        return self._on_dead(letters, "purge_dead", timeout)

    def _on_dead(self, letters: Iterable[DeadLetterInfo] | None, method: str, timeout: float) -> int:
        timeout = answer_timeout(timeout)
        self._owned("dead letters")
        by_queue: dict[int, list[int] | None] = {}
        if letters is None:
            by_queue = dict.fromkeys(range(self.n_queues))
        else:
            for letter in letters:
                ids = by_queue.setdefault(self.queue_names.index(letter.queue), [])
                assert ids is not None
                ids.append(letter.chunk_id)
        what = "requeued" if method == "requeue_dead" else "purged"
        consequence = f"their dead letters may not be {what} (they are where they resume)"
        asks = {i: (ids,) for i, ids in by_queue.items()}  # each queue its own chunks
        return sum(int(n) for n in self.ask_brokers(method, asks, timeout=timeout, consequence=consequence).values())

    # -- results by id (zdq.client.by_id) -----------------------------------------------------------
    def state_of(self, key: int) -> str:
        """:func:`zdq.state` of task ``key`` of this pool (any process may ask it by the pool's name)."""
        from zdq.client.by_id import state

        return state(self.name, key, client=self.client, dirpath=self.dirpath)

    def result_of(self, key: int, timeout: float | None = None) -> Any:
        """:func:`zdq.result` of task ``key`` of this pool (kept after its driver took it only with
        ``result_ttl=``)."""
        from zdq.client.by_id import result

        return result(self.name, key, timeout, client=self.client, dirpath=self.dirpath)

    # -- introspection --------------------------------------------------------------------------
    def broker_statistics(self, timeout: float = 10.0) -> list[BrokerStats]:
        """Every broker's statistics, asked in parallel (one actor call each)."""
        self._owned("broker statistics")
        timeout = answer_timeout(timeout)
        out = self.broker_answers(timeout)
        failed = [(name, a) for name, a in zip(self.queue_names, out) if isinstance(a, BaseException)]
        if failed:
            # Each with its own cause: a stopped worker (silent, alive to Dask) is not a lost one.
            why = "; ".join(f"{name} {_why_no_answer(a, timeout)}" for name, a in failed)
            raise BrokerLost(f"some queues gave no statistics: {why}") from failed[0][1]
        return out  # type: ignore[return-value]

    def broker_answers(self, timeout: float) -> list[BrokerStats | BaseException]:
        """Each broker's statistics, or the exception that says why it did not answer."""
        queues = self._queues
        if isinstance(queues, PlacedQueues):
            return queues.statistics(timeout)
        if self._host is not None and not self._host.closed:
            return self._host.broker_answers(timeout)
        why = ClosedError(
            f"attached to pool {self.name}: its brokers answer statistics() to the QueuePool that placed them, "
            "in another process"
        )
        return [why] * self.n_queues

    @off_loop_when_async
    def statistics(self, timeout: float = 10.0) -> PoolStats:
        """The driver's counters, and the statistics of every queue that answers; those that did
        not (down, stalled, or held by the owner of an attached pool) are in ``missing``, with why."""
        timeout = answer_timeout(timeout)
        answers = self.broker_answers(timeout)
        missing = {
            name: _why_no_answer(a, timeout) for name, a in zip(self.queue_names, answers) if isinstance(a, BaseException)
        }
        brokers = [a for a in answers if isinstance(a, BrokerStats)]
        return PoolStats(self.driver.statistics(), brokers, self.name, missing)


def _why_no_answer(error: BaseException, timeout: float) -> str:
    """Why a broker gave no statistics, from the error its actor call ended with."""
    if isinstance(error, TimeoutError):
        return f"did not answer within {timeout:g} s (its worker is stopped, or too busy to answer)"
    return str(error) or repr(error)
