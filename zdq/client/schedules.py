"""Periodic tasks, the client side: ``QueuePool.schedule``, ``schedules()`` and their handles.

A schedule is made on the driver (its task pickled and sealed once, as a one-task chunk) and
handed to one queue's broker over the control plane (an actor call, as dead letters are): the
queue keeps it (on disk for a durable queue) and puts a chunk of that task in itself at every
tick (:mod:`zdq.broker.schedules`). So schedules outlive the driver that made them; a transient
pool's live as long as its brokers. The ``i``-th unnamed schedule a pool makes is given to its
queue ``i % n_queues``; a named one (``name=``) to queue ``crc32(name) % n_queues``
(:func:`home_queue`), whatever process or restart makes it, and that queue's broker replaces the
schedule of the name it keeps (the name -> schedule mapping is the broker's). A durable pool
opened with fewer queues, then with all again, may find one of that name on another queue: each
call with a name asks the other queues to drop theirs, so one schedule of a name remains.

A tick's result goes to the schedule, not to a driver: :class:`Schedule` shows the last one
(``last_value`` or ``last_error``), never a growing pile.

Ownership: no state here; a :class:`Schedule` is a frozen snapshot, and which queue keeps the next
schedule is counted by the pool (``next_schedule_queue``, under its lock).
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from zdq.config import answer_timeout
from zdq.errors import SerializationError
from zdq.codec.schedules import Missed, ScheduleRecord, Spec, _missed, check_schedule_name
from zdq.codec.results import error_to_exception, loads_results
from zdq.codec.tasks import TASKS, TaskOptions, call_task, dumps_chunk
from zdq.codec.timing import timing_of

from zdq.client.driver import Driver

__all__ = ["Schedule", "SchedulePool", "cancel_schedule", "home_queue", "list_schedules", "make_schedule"]


class SchedulePool(Protocol):
    """What schedules need of their pool (a Protocol: no import of the pool's module)."""

    name: str
    n_queues: int
    queue_names: list[str]

    @property
    def payload_key(self) -> bytes | None: ...

    @property
    def driver(self) -> Driver: ...

    def next_schedule_queue(self) -> int: ...

    def broker_actor(self, i: int) -> Any: ...

    def ask_brokers(
        self, method: str, asks: Mapping[int, tuple[Any, ...]] | None = None, *, timeout: float, consequence: str
    ) -> dict[int, Any]: ...


def _utc(t: float) -> datetime | None:
    return datetime.fromtimestamp(t, tz=timezone.utc) if t else None


@dataclass(frozen=True)
class Schedule:
    """A periodic task of a pool, as its queue reported it when asked (a snapshot).

    Attributes
    ----------
    schedule_id : int
        Its id (``queue_pool.cancel_schedule(id)``).
    queue : str
        The queue that keeps it and puts its ticks in itself.
    name : str
        The task's name (its function's).
    cron, every : str or timedelta
        When it ticks (one of them is ``None``); cron in UTC.
    missed : str
        ``"once"`` or ``"skip"``: what ticks missed while the queue was down do.
    next_tick : datetime
        When the next tick is due (UTC).
    ticks, skipped : int
        Ticks put in the queue, and ticks skipped (missed with ``"skip"``, or while the previous
        tick had not finished).
    last_tick, last_done : datetime or None
        When the last tick was queued, and when the last results came back.
    last_value, last_error
        The last tick's result, or its error (``None`` before the first).
    priority : int
        The priority of its ticks in their queue.
    schedule_name : str or None
        The schedule's own name, given with ``schedule(..., name=...)`` (``None`` if unnamed);
        ``name`` stays the task's, as before names existed.

    >>> handle = queue_pool.schedule(report, every=timedelta(minutes=5), name="report")  # doctest: +SKIP
    >>> [(s.schedule_name, s.name) for s in queue_pool.schedules()]                      # doctest: +SKIP
    [('report', 'report')]
    >>> handle.cancel()                                                                  # doctest: +SKIP
    True
    """

    schedule_id: int
    queue: str
    name: str
    cron: str | None
    every: timedelta | None
    missed: str
    next_tick: datetime
    ticks: int
    skipped: int
    last_tick: datetime | None
    last_done: datetime | None
    last_value: Any = None
    last_error: BaseException | None = None
    priority: int = 0
    _pool: Any = field(default=None, repr=False, compare=False)
    schedule_name: str | None = None

    def cancel(self, timeout: float = 30.0) -> bool:
        """End the schedule: no tick after this (one already queued still runs). True if it
        was live."""
        return cancel_schedule(self._pool, self.schedule_id, answer_timeout(timeout))


def _snapshot(pool: SchedulePool, index: int, record: ScheduleRecord) -> Schedule:
    value, error = None, None
    if record.last_results:
        try:
            _, values, errors = loads_results(record.last_results, pool.payload_key)
            if errors:
                error = error_to_exception(next(iter(errors.values())))
            else:
                value = values[0]
        except Exception as e:  # noqa: BLE001 - the schedule is still shown; its last result is not
            error = SerializationError(f"the last result of schedule {record.name} does not unpickle here: {e}")
    return Schedule(
        record.schedule_id,
        pool.queue_names[index],
        record.name,
        record.spec.cron,
        None if record.spec.every is None else timedelta(seconds=record.spec.every),
        record.missed.value,
        datetime.fromtimestamp(record.due, tz=timezone.utc),
        record.ticks,
        record.skipped,
        _utc(record.last_tick),
        _utc(record.last_done),
        value,
        error,
        record.priority,
        pool,
        record.schedule_name or None,
    )


def home_queue(name: str, n_queues: int) -> int:
    """The queue that keeps the schedule named ``name``: the same in every process and run (a
    CRC-32 of its UTF-8 bytes; Python's ``hash`` of a str changes from one process to the next).

    >>> home_queue("report", 1)
    0
    """
    return zlib.crc32(name.encode()) % n_queues


def make_schedule(
    pool: SchedulePool,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    cron: str | None,
    every: timedelta | float | None,
    missed: Missed | str,
    options: TaskOptions | None,
    priority: int,
    timeout: float,
    name: str | None = None,
) -> Schedule:
    """Check the arguments (errors name the one at fault), then give the schedule to its queue
    (a named one: replacing the schedule of that name)."""
    if name is not None:
        check_schedule_name(name)
    if not callable(fn):
        raise TypeError(f"schedule(fn=...) needs a callable or a zdq.Task, got {fn!r:.80}")
    now = time.time()
    spec = Spec.parse(cron, every, anchor=now)
    policy = _missed(missed)
    timing = timing_of(None, None, priority)  # checks it as submit() does
    driver = pool.driver
    payload = dumps_chunk(driver.reserve(1), [call_task(fn, args, kwargs, options)], driver.payload_key, TASKS)
    schedule_id = int.from_bytes(os.urandom(8), "big") >> 1 or 1
    task_name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    record = ScheduleRecord(
        schedule_id, task_name, spec, policy, spec.next_after(now), payload,
        priority=timing.priority if timing else 0, schedule_name=name or "",
    )
    index = pool.next_schedule_queue() if name is None else home_queue(name, pool.n_queues)
    kept = pool.ask_brokers(
        "add_schedule", {index: (record.pack(),)}, timeout=timeout,
        consequence="the schedule is not made (or made where its worker resumes)",
    )[index]
    if name is None:
        return _snapshot(pool, index, record)
    _drop_elsewhere(pool, index, name, timeout)
    return _snapshot(pool, index, ScheduleRecord.unpack(kept))


def _drop_elsewhere(pool: SchedulePool, home: int, name: str, timeout: float) -> None:
    """Cancel the schedules named ``name`` on every queue but its home (left by the pool when it had
    another number of queues). Raises ``BrokerLost`` or ``ZdqTimeoutError`` naming the queues that
    did not answer: one of them may keep one still (calling ``schedule`` again is safe: it
    replaces, never adds)."""
    others = {i: (name,) for i in range(pool.n_queues) if i != home}
    if others:
        pool.ask_brokers(
            "cancel_schedule", others, timeout=timeout,
            consequence=(
                f"schedule {name!r} is kept by queue {pool.queue_names[home]} of pool {pool.name}, but one of them may "
                "keep a schedule of that name from when the pool had another number of queues; call schedule() again "
                "once they are back"
            ),
        )


def list_schedules(pool: SchedulePool, timeout: float) -> list[Schedule]:
    """Every schedule of the pool's queues, by next tick.

    Raises
    ------
    BrokerLost, ZdqTimeoutError
        Some queues did not answer within ``timeout`` (each asked in parallel): lost or being
        placed again, or stopped; named, since the list would miss their schedules.
    """
    answers = pool.ask_brokers("schedules", timeout=timeout, consequence="their schedules are not listed")
    found = [_snapshot(pool, i, ScheduleRecord.unpack(raw)) for i, raws in answers.items() for raw in raws]
    return sorted(found, key=lambda s: s.next_tick)


def cancel_schedule(pool: SchedulePool, schedule_id: int | str, timeout: float) -> bool:
    """End the schedule of this id (an int) or name (a str); True if one was live."""
    if isinstance(schedule_id, str):
        check_schedule_name(schedule_id)
    elif not isinstance(schedule_id, int) or isinstance(schedule_id, bool) or schedule_id <= 0:
        raise ValueError(f"cancel_schedule takes a schedule's id (a positive integer) or name (a str), got {schedule_id!r}")
    # Asked of every queue, not only its home: a durable pool opened again with another number of
    # queues still finds it (cancelling is rare; the calls run in parallel).
    answers = pool.ask_brokers(
        "cancel_schedule", dict.fromkeys(range(pool.n_queues), (schedule_id,)), timeout=timeout,
        consequence="the schedule may live on there (it is cancelled where they resume)",
    )
    return any(bool(kept) for kept in answers.values())
