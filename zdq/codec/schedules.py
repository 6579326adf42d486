"""Periodic tasks, the pure part: when a schedule ticks, what a missed tick does, how it is stored.

Nothing here touches a socket, a clock or a disk: the broker (:mod:`zdq.broker.schedules`) asks
:func:`plan` with the time it reads, and stores :class:`ScheduleRecord` bytes with its queue.

Times are wall-clock seconds (``time.time()``), cron expressions are read in UTC (croniter).

**Missed ticks.** A tick is *on time* if the broker reaches it within :data:`GRACE` of its time;
it then runs (several ticks that fell due in one late wake-up run once). A tick later than that
was *missed* (the queue was down: its worker died, or the pool was closed; or its broker
stalled): ``missed="once"`` runs it once on recovery (however many were missed), ``"skip"``
skips them. Either way the next tick is the first one after the present, on the schedule's grid.

**Overlap.** A tick that comes while the previous tick's chunk is still in the queue (not run yet,
or running) is skipped, whatever the policy: a schedule has at most one tick in its queue, so
stopped consumers never let ticks pile up.

**Names.** A schedule made with ``name=`` is the one schedule of that name in its pool: a second
``schedule(..., name=...)`` replaces it (:meth:`ScheduleRecord.replacing`) instead of adding one.
Unnamed schedules (``schedule_name == ""``) are stored as they were before names existed.
"""

from __future__ import annotations

import enum
import json
import math
import struct
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from zdq.codec.names import check_name

__all__ = ["GRACE", "NAME_MAX", "SCHEDULED", "Missed", "ScheduleRecord", "Spec", "check_schedule_name", "plan"]

#: A tick reached later than this (seconds) is missed, and follows the schedule's ``missed`` policy.
GRACE = 1.0

#: The owner of the chunks a schedule's ticks put in its queue (a chunk's ``ChunkMeta.owner``; its
#: ``seq`` is the schedule id): their results go to the schedule, never to a driver.
SCHEDULED = b"zdq-schedule\0\0\0\0"

#: The longest schedule name, in characters (a name is stored in every record, and shown on one
#: line by ``zdq schedules list``).
NAME_MAX = 200


class Missed(str, enum.Enum):
    """What a schedule does with ticks missed while its queue was down."""

    ONCE = "once"  #: run once on recovery, however many were missed
    SKIP = "skip"  #: skip them; run at the next tick


def _missed(value: Missed | str) -> Missed:
    try:
        return Missed(value.value if isinstance(value, Missed) else value)
    except ValueError:
        raise ValueError(f"missed must be 'once' or 'skip', got {value!r}") from None


#: The shortest ``every=`` (seconds): each tick is a stored chunk and a write of its schedule.
MIN_EVERY = 0.01
#: Longer than the years 1 to 9999 that a date holds: no ``every=`` beyond it has a tick.
_LONGEST = 1e12


@dataclass(frozen=True)
class Spec:
    """When a schedule ticks: a cron expression (UTC), or every ``every`` seconds from ``anchor``."""

    cron: str | None = None
    every: float | None = None
    anchor: float = 0.0

    @classmethod
    def parse(cls, cron: Any = None, every: Any = None, *, anchor: float) -> Spec:
        """Check ``cron`` / ``every`` (exactly one of them); raise naming the one that is wrong.

        >>> Spec.parse(every=timedelta(minutes=5), anchor=0.0).every
        300.0
        >>> Spec.parse(cron="*/5 * * * *", anchor=0.0).next_after(0.0)
        300.0
        """
        if (cron is None) == (every is None):
            raise ValueError("a schedule needs exactly one of cron=... or every=...")
        if cron is not None:
            from croniter import croniter

            if not isinstance(cron, str) or not croniter.is_valid(cron):
                raise ValueError(f"cron={cron!r} is not a cron expression (such as '*/5 * * * *')")
            if len(cron.split()) > 6:
                # croniter reads a seventh field as a year: such a schedule ends, and a broker's
                # loop would have no next tick to plan.
                raise ValueError(f"cron={cron!r} has {len(cron.split())} fields: a schedule takes 5, or 6 with seconds last")
            spec = cls(cron=cron, anchor=anchor)
            what = f"cron={cron!r}"
        else:
            seconds = every.total_seconds() if isinstance(every, timedelta) else every
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
                raise ValueError(f"every={every!r} must be a positive timedelta or number of seconds")
            if seconds > _LONGEST:  # a float would not even hold it (10**400)
                raise ValueError(f"every={every!r:.40} is longer than any date can be apart ({_LONGEST:.0f} s)")
            if seconds < MIN_EVERY:
                raise ValueError(
                    f"every={every!r} is under {MIN_EVERY} s: a schedule ticks at most {1 / MIN_EVERY:.0f} times a second "
                    "(for more, submit the tasks)"
                )
            spec = cls(every=float(seconds), anchor=anchor)
            what = f"every={every!r}"
        try:
            datetime.fromtimestamp(spec.next_after(anchor), tz=timezone.utc)
        except (ValueError, OverflowError, OSError) as e:  # croniter's CroniterBadDateError is a ValueError
            raise ValueError(f"{what} has no next tick a date can hold ({e})") from e
        return spec

    def next_after(self, t: float) -> float:
        """The first tick strictly after ``t``."""
        if self.every is not None:
            return self.anchor + (math.floor((t - self.anchor) / self.every) + 1) * self.every
        from croniter import croniter

        assert self.cron is not None
        return float(croniter(self.cron, datetime.fromtimestamp(t, tz=timezone.utc)).get_next(float))


def plan(spec: Spec, due: float, now: float, missed: Missed) -> tuple[bool, float]:
    """``(run a tick now, the next tick's time)`` for a schedule whose next tick is at ``due``.

    >>> every = Spec(every=10.0)
    >>> plan(every, 10.0, 9.0, Missed.ONCE)         # not yet
    (False, 10.0)
    >>> plan(every, 10.0, 10.2, Missed.SKIP)        # on time: runs whatever the policy
    (True, 20.0)
    >>> plan(every, 10.0, 35.0, Missed.ONCE)        # three ticks missed: one run, then on the grid
    (True, 40.0)
    >>> plan(every, 10.0, 35.0, Missed.SKIP)
    (False, 40.0)
    """
    if now < due:
        return False, due
    return (now - due <= GRACE or missed is Missed.ONCE), spec.next_after(now)


def check_schedule_name(name: object) -> str:
    """``name`` if it can name a schedule; else raise naming what is wrong with it.

    A name follows the rules of every name (:func:`zdq.codec.names.check_name`: a non-empty
    ``str`` of printable characters, without surrounding spaces, not starting with ``-``) in at
    most :data:`NAME_MAX` characters, and is not digits alone (those read as a schedule id, in
    ``cancel_schedule`` and ``zdq schedules cancel``).

    >>> check_schedule_name("hourly report")
    'hourly report'
    """
    checked = check_name(name, "a schedule's name", NAME_MAX, when_empty="leave name=None for an unnamed schedule")
    if checked.isdigit():
        raise ValueError(f"a schedule's name must not be digits alone (it would read as a schedule id), got {checked!r}")
    return checked


_HEAD = struct.Struct(">II")


@dataclass(frozen=True)
class ScheduleRecord:
    """A schedule as its queue stores it: its timing, its task (a chunk of one task, pickled and
    sealed by the driver: opaque here) and its state. ``due`` and ``ticks`` change only together
    with the tick's chunk being stored (one transaction on a durable queue)."""

    schedule_id: int
    name: str
    spec: Spec
    missed: Missed
    due: float
    payload: bytes
    ticks: int = 0  # ticks whose chunk was put in the queue
    skipped: int = 0  # ticks missed and skipped (missed="skip")
    last_tick: float = 0.0  # when the last tick's chunk was put in the queue (0: never)
    last_done: float = 0.0  # when the last results came back
    last_results: bytes = b""  # those results, sealed by the consumer: opaque here
    chunk: int = 0  # the chunk id of the last tick (0: none yet)
    priority: int = 0  # of every tick's chunk in its queue
    schedule_name: str = ""  # given with name=: the one schedule of that name ("" for unnamed)

    def pack(self) -> bytes:
        head = json.dumps(
            {
                "id": self.schedule_id,
                "name": self.name,
                "cron": self.spec.cron,
                "every": self.spec.every,
                "anchor": self.spec.anchor,
                "missed": self.missed.value,
                "due": self.due,
                "ticks": self.ticks,
                "skipped": self.skipped,
                "last_tick": self.last_tick,
                "last_done": self.last_done,
                "chunk": self.chunk,
                "priority": self.priority,
                # Only when named: an unnamed record is written as before names existed.
                **({"schedule_name": self.schedule_name} if self.schedule_name else {}),
            }
        ).encode()
        return _HEAD.pack(len(head), len(self.payload)) + head + self.payload + self.last_results

    @classmethod
    def unpack(cls, raw: bytes) -> ScheduleRecord:
        """Raises ``ValueError`` if ``raw`` is not a packed record."""
        try:
            n_head, n_payload = _HEAD.unpack_from(raw)
            start = _HEAD.size
            h = json.loads(bytes(raw[start : start + n_head]))
            payload = bytes(raw[start + n_head : start + n_head + n_payload])
            results = bytes(raw[start + n_head + n_payload :])
            return cls(
                int(h["id"]),
                str(h["name"]),
                Spec(h["cron"], h["every"], float(h["anchor"])),
                Missed(h["missed"]),
                float(h["due"]),
                payload,
                int(h["ticks"]),
                int(h["skipped"]),
                float(h["last_tick"]),
                float(h["last_done"]),
                results,
                int(h["chunk"]),
                int(h.get("priority", 0)),
                str(h.get("schedule_name", "")),  # records written before names existed have none
            )
        except (struct.error, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"not a stored schedule: {e}") from e

    def same_timing(self, other: ScheduleRecord) -> bool:
        """Whether ``other`` ticks as this one does: same cron or every, same missed policy (the
        anchor of an ``every`` grid is when it was made: not compared)."""
        return (self.spec.cron, self.spec.every, self.missed) == (other.spec.cron, other.spec.every, other.missed)

    def replacing(self, old: ScheduleRecord) -> ScheduleRecord:
        """This record (made by a new ``schedule(..., name=...)``) in the place of ``old``, the
        schedule of that name so far.

        The new call's task, arguments, options and priority always win (as Celery beat's entry
        of a name is replaced). If the timing is the same (:meth:`same_timing`), the schedule
        stays the old one: its id, grid, next tick, counts and last results are kept. Otherwise
        it starts afresh, as the new record (its id, next tick, no history); the old one's chunk
        id is kept, so a tick of the old timing still queued is waited for (at most one tick of a
        name in its queue).

        >>> old = ScheduleRecord(1, "report", Spec(every=60.0), Missed.ONCE, 120.0, b"old", ticks=5)
        >>> new = ScheduleRecord(2, "report2", Spec(every=60.0, anchor=7.0), Missed.ONCE, 67.0, b"new")
        >>> kept = new.replacing(old)
        >>> (kept.schedule_id, kept.due, kept.ticks, kept.payload, kept.name)
        (1, 120.0, 5, b'new', 'report2')
        """
        if self.same_timing(old):
            return replace(old, name=self.name, payload=self.payload, priority=self.priority, schedule_name=self.schedule_name)
        return replace(self, chunk=old.chunk)

    def after_tick(self, now: float, next_due: float, chunk: int) -> ScheduleRecord:
        return replace(self, due=next_due, ticks=self.ticks + 1, last_tick=now, chunk=chunk)

    def after_skip(self, next_due: float) -> ScheduleRecord:
        return replace(self, due=next_due, skipped=self.skipped + 1)

    def after_done(self, now: float, results: bytes) -> ScheduleRecord:
        return replace(self, last_done=now, last_results=results)
